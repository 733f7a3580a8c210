"""Load the cells of a chapter notebook that carry a tag into a namespace.

The model lives in its chapter, cell by cell. Tests and later chapters reach into the notebook
instead of copying code::

    ns = labkit.notebook.load("notebooks/01_mingpt.ipynb")          # cells tagged `model`
    GPT, GPTConfig = ns["GPT"], ns["GPTConfig"]
    ns = labkit.notebook.load("01_mingpt.ipynb", tags=("model", "vram"))

Conventions (the full table of cell tags is in CONTRIBUTING.md):
- `model`    cells define the model; they must run on their own, top to bottom (imports included).
- `vram`     a cell defining ``vram_job() -> labkit.vram.TrainJob`` for the FULL config.
- `exercise` a cell whose top-level functions/classes are the solution; ``strip`` replaces their bodies.
- `check`    the cell right after an exercise, calling ``labkit.check``; it needs only the `model`
             cells and the exercise cell.
"""
from __future__ import annotations

import ast
import itertools
import os
import re
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"   # in a checkout (or an editable install)
NOTEBOOKS_ENV = "LABKIT_NOTEBOOKS"          # folders holding the chapters (os.pathsep-separated), searched first
CLONE_ENV = "LABKIT_CLONE"                  # where the Colab cell clones the course
DEFAULT_CLONE = "~/ai-from-scratch"
_counter = itertools.count()


def clone_dir() -> Path:
    return Path(os.environ.get(CLONE_ENV) or DEFAULT_CLONE).expanduser()


def search_path() -> list[Path]:
    """Where a bare chapter name is looked up, in order: $LABKIT_NOTEBOOKS, the current folder (a kernel's is its
    notebook's folder) and its notebooks/, the checkout labkit was imported from, the Colab cell's clone."""
    env = [Path(p).expanduser() for p in os.environ.get(NOTEBOOKS_ENV, "").split(os.pathsep) if p]
    folders = [*env, Path.cwd(), Path.cwd() / "notebooks", NOTEBOOK_DIR, clone_dir() / "notebooks"]
    return list(dict.fromkeys(f.resolve() for f in folders))


def resolve(path: str | os.PathLike) -> Path:
    """A notebook path, also accepting a bare name like ``01_mingpt`` (looked up in ``search_path()``)."""
    p = Path(path)
    candidates = [p, p.with_suffix(".ipynb")]
    if not p.is_absolute():
        candidates += [f / q for f in search_path() for q in (p, p.with_suffix(".ipynb"))]
    for c in candidates:
        if c.is_file():
            return c
    looked = "\n  ".join(str(f) for f in search_path())
    raise FileNotFoundError(
        f"notebook {str(path)!r} not found. Looked in:\n  {looked}\nOutside a copy of the course (Colab, a chapter "
        f"downloaded alone) run the chapter's first cell, which fetches the course, or set {NOTEBOOKS_ENV} to the "
        f"folder that holds the chapters.")


# --- the first cell of every chapter: Colab, or a chapter opened outside a copy of the course --------------

COLAB_TAGS = ["colab", "remove-cell"]       # `remove-cell`: the book leaves it out; Colab and Jupyter show it
COLAB_CELL = '''# Colab, or this chapter opened outside a copy of the course: fetch the course, install labkit.
# In a checkout (`make lab`, the book, the tests) this cell does nothing and downloads nothing.
import importlib.util, os, subprocess, sys
from pathlib import Path

try:
    import labkit.notebook
    labkit.notebook.resolve("01_mingpt")
except (ImportError, FileNotFoundError):
    clone = Path(os.environ.get("{clone_env}") or "{default_clone}").expanduser()
    if not (clone / "notebooks").is_dir():
        url = os.environ.get("LABKIT_REPO") or "{url}"
        subprocess.run(["git", "clone", "-q", "--depth", "1", url, str(clone)], check=True)
    if importlib.util.find_spec("labkit") is None:
        extra = "[full]" if os.environ.get("LABKIT_SIZE") == "full" else ""
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"{{clone}}{{extra}}"], check=True)
        importlib.invalidate_caches()
    os.environ["{notebooks_env}"] = str(clone / "notebooks")
    print(f"the course is in {{clone}}")
'''


def colab_cell(url: str) -> str:
    """The source of every chapter's first cell, cloning ``url`` (the repository in _config.yml)."""
    return COLAB_CELL.format(url=url, clone_env=CLONE_ENV, default_clone=DEFAULT_CLONE, notebooks_env=NOTEBOOKS_ENV)


def set_colab_cell(nb: nbformat.NotebookNode, url: str) -> bool:
    """Make ``nb``'s first cell the current Colab cell (inserting or updating it). True if it changed."""
    cell = nbformat.v4.new_code_cell(colab_cell(url), metadata={"tags": list(COLAB_TAGS)})
    cell.id = "colab-setup"                       # stable, so that re-running the script leaves no diff
    first = nb.cells[0] if nb.cells else None
    if first is not None and first.cell_type == "code" and "colab" in tags_of(first):
        if first.source == cell.source and tags_of(first) == COLAB_TAGS:
            return False
        first.source, first.metadata["tags"] = cell.source, list(COLAB_TAGS)
        return True
    nb.cells.insert(0, cell)
    return True


def read(path: str | os.PathLike) -> nbformat.NotebookNode:
    return nbformat.read(resolve(path), as_version=4)


def tags_of(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def cells(path, tag: str) -> list[str]:
    """The sources of the code cells tagged ``tag``, in order."""
    return [c.source for c in read(path).cells if c.cell_type == "code" and tag in tags_of(c)]


def _clean(source: str) -> str:
    # IPython magics and shell escapes have no meaning outside a kernel.
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


@contextmanager
def _chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def new_namespace(name: str) -> dict:
    """A fresh module registered in ``sys.modules``, so that cells defining dataclasses (which look their
    module up there) or pickling classes work exactly as in a kernel."""
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    return mod.__dict__


def run_sources(sources: list[str], namespace: dict | None = None, filename: str = "<notebook>", cwd=None) -> dict:
    ns = namespace if namespace is not None else new_namespace(f"labkit_notebook_{next(_counter)}")
    with _chdir(Path(cwd) if cwd else Path.cwd()):
        for i, src in enumerate(sources):
            # dont_inherit: this file's `from __future__ import annotations` must not leak into the cells
            code = compile(_clean(src), f"{filename}[cell {i}]", "exec", dont_inherit=True)
            exec(code, ns)  # noqa: S102 - running the course's own notebook cells is the point
    return ns


def load(path, tags: tuple[str, ...] | str = ("model",), namespace: dict | None = None) -> dict:
    """Execute the code cells carrying any of ``tags`` and return the namespace (a dict).

    Runs with the notebook's folder as the working directory, like Jupyter does.
    """
    nb_path = resolve(path)
    tags = (tags,) if isinstance(tags, str) else tuple(tags)
    nb = read(nb_path)
    sources = [c.source for c in nb.cells if c.cell_type == "code" and set(tags) & set(tags_of(c))]
    if not sources:
        raise LookupError(f"{nb_path.name} has no code cells tagged {tags}")
    return run_sources(sources, namespace, filename=nb_path.name, cwd=nb_path.parent)


def as_module(path, tags=("model",), name: str | None = None) -> types.ModuleType:
    """Like ``load`` but returns the module object (attribute access: ``m.GPT``)."""
    ns = new_namespace(name or f"labkit_notebook_{Path(path).stem}_{next(_counter)}")
    load(path, tags, ns)
    return sys.modules[ns["__name__"]]


# --- exercises -------------------------------------------------------------------------------------

def exercises(path) -> list[tuple[str, str]]:
    """``(exercise_source, check_source)`` pairs: each `exercise` cell and the `check` cell after it."""
    nb = read(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    pairs = []
    for i, c in enumerate(code):
        if "exercise" in tags_of(c):
            nxt = next((d for d in code[i + 1:] if "check" in tags_of(d)), None)
            if nxt is None:
                raise LookupError(f"exercise cell {len(pairs)} of {resolve(path).name} has no `check` cell after it")
            pairs.append((c.source, nxt.source))
    return pairs


def run_exercise(path, index: int, replacement: str | None = None) -> dict:
    """Run the `model` cells, exercise ``index`` (or ``replacement`` source instead), then its check.

    Raises whatever the check raises: this is how tests prove a wrong answer is caught.
    """
    exercise_src, check_src = exercises(path)[index]
    nb_path = resolve(path)
    ns = load(nb_path, ("model",))
    return run_sources([replacement if replacement is not None else exercise_src, check_src], ns,
                       filename=f"{nb_path.name}:exercise{index}", cwd=nb_path.parent)


def stub_source(source: str) -> str:
    """Replace the body of every top-level function (and method of top-level classes) with a stub.

    Signatures, decorators and docstrings stay, so the learner sees what to write.
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    edits = []  # (start, end, indent, docstring_end) line ranges, 0-based inclusive

    def visit(fn):
        body = fn.body
        keep = 0
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            keep = 1
        if len(body) == keep:
            return
        first, last = body[keep], body[-1]
        indent = " " * first.col_offset
        edits.append((first.lineno - 1, last.end_lineno - 1, indent, fn.name))

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            visit(node)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    visit(item)
    for start, end, indent, name in sorted(edits, reverse=True):
        lines[start:end + 1] = [f'{indent}raise NotImplementedError("Exercise: write `{name}` (see the text above)")']
    return "\n".join(lines) + ("\n" if source.endswith("\n") else "")


def strip(path, out: str | os.PathLike | None = None) -> Path:
    """Write the learner copy: exercise solutions replaced by stubs, outputs cleared."""
    nb_path = resolve(path)
    nb = read(nb_path)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
            if "exercise" in tags_of(c):
                c.source = stub_source(c.source)
    out = Path(out) if out else nb_path.with_name(nb_path.stem + "_exercises.ipynb")
    nbformat.write(nb, out)
    return out


def repo_url(config: str | os.PathLike = NOTEBOOK_DIR.parent / "_config.yml") -> str:
    """The course's repository, from the book's _config.yml (the one place it is written)."""
    import yaml

    return yaml.safe_load(Path(config).read_text())["repository"]["url"]


def chapters(folder: str | os.PathLike | None = None) -> list[Path]:
    """The chapters ``NN_name.ipynb`` in ``folder`` (default: the checkout's notebooks/), not the learner copies
    (``NN_name_exercises.ipynb``, written beside them by ``make exercises``)."""
    found = Path(folder or NOTEBOOK_DIR).glob("[0-9][0-9]_*.ipynb")
    return sorted(p for p in found if not p.stem.endswith("_exercises"))


# --- the line that links a chapter's learner copy, at the top of its exercises ---------------------------

EXERCISE_LINK = ("Your copy of this chapter, with the solutions below as stubs: {{download}}`{stem}_exercises.ipynb` "
                 "(`make exercises` writes it beside the chapter). Check your answers with "
                 "`.venv/bin/labkit check notebooks/{stem}_exercises.ipynb --quick`.")
_EXERCISE_LINK_START = EXERCISE_LINK.split(":", 1)[0]


def set_exercise_link(nb: nbformat.NotebookNode, stem: str) -> bool:
    """Put the learner-copy line right under the chapter's `Exercises` heading (the markdown cell before the first
    `exercise` cell). True if it changed."""
    first = next((i for i, c in enumerate(nb.cells) if "exercise" in tags_of(c)), None)
    if first is None:
        return False
    heading = next((c for c in reversed(nb.cells[:first]) if c.cell_type == "markdown"
                    and re.search(r"^#+ .*Exercises", c.source, re.M)), None)
    if heading is None:
        raise LookupError(f"{stem}: no markdown heading with 'Exercises' before the first exercise cell")
    paragraphs = [p for p in heading.source.split("\n\n") if not p.startswith(_EXERCISE_LINK_START)]
    at = next(i for i, p in enumerate(paragraphs) if re.search(r"^#+ .*Exercises", p, re.M)) + 1
    source = "\n\n".join([*paragraphs[:at], EXERCISE_LINK.format(stem=stem), *paragraphs[at:]])
    changed = source != heading.source
    heading.source = source
    return changed


def update_chapter_cells(paths=None, url: str | None = None) -> list[Path]:
    """Give every chapter (default: ``chapters()``) the current first cell (``colab_cell``) and learner-copy line
    (``EXERCISE_LINK``); returns the chapters that changed. ``make chapter-cells`` runs it."""
    url = url or repo_url()
    changed = []
    for p in paths or chapters():
        nb = nbformat.read(p, as_version=4)
        if set_colab_cell(nb, url) | set_exercise_link(nb, Path(p).stem):
            nbformat.write(nb, p)
            changed.append(Path(p))
    return changed


# --- answers the learner copy must not give away -----------------------------------------------------------

class _Normalise(ast.NodeTransformer):
    """Rename variables and arguments to v0, v1, ... by first appearance; keep attributes, calls' keyword names and
    constants: two bodies that differ only in what their locals are called normalise to the same text."""

    def __init__(self):
        self.names: dict[str, str] = {}

    def _name(self, s):
        return self.names.setdefault(s, f"v{len(self.names)}")

    def visit_Name(self, node):
        return ast.copy_location(ast.Name(id=self._name(node.id), ctx=node.ctx), node)

    def visit_arg(self, node):
        return ast.copy_location(ast.arg(arg=self._name(node.arg), annotation=None), node)


def _is_docstring(stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _norm(stmts) -> str:
    import copy

    t = _Normalise()
    return "\n".join(ast.dump(t.visit(copy.deepcopy(s))) for s in stmts if not _is_docstring(s))


def _solution_bodies(source: str):
    """(name, statements) of each function an exercise cell defines (top level, and methods of top-level classes)."""
    for node in ast.parse(_clean(source)).body:
        fns = [node] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else \
            [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] \
            if isinstance(node, ast.ClassDef) else []
        for fn in fns:
            body = [s for s in fn.body if not _is_docstring(s)]
            if body:
                yield fn.name, body


def _statement_lists(tree):
    """Every list of statements in a tree: module, function and loop bodies, branches."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                yield block


def answer_leaks(path, min_chars: int = 300, similar: float = 0.9) -> list[str]:
    """Where the learner copy (``strip``) still shows an exercise's answer: a solution function whose body (names
    normalised) stands in another code cell, as a whole function body or as a run of statements inside one, or a
    function body at least ``similar`` alike (difflib ratio). Bodies shorter than ``min_chars`` of normalised AST
    (a one-line ``return``) are too small to count. Returns one line per leak; ``[]`` is the goal."""
    import difflib

    nb = read(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    others = []
    for c in code:
        if "exercise" in tags_of(c):
            continue
        try:
            others.append(ast.parse(_clean(c.source)))
        except SyntaxError:
            continue
    blocks = [b for t in others for b in _statement_lists(t)]
    functions = [n for t in others for n in ast.walk(t) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    leaks = []
    for i, (src, _check) in enumerate(exercises(path)):
        for name, body in _solution_bodies(src):
            target = _norm(body)
            if len(target) < min_chars:
                continue
            k = len(body)
            hit = next((b for b in blocks for j in range(len(b) - k + 1) if _norm(b[j:j + k]) == target), None)
            if hit is not None:
                leaks.append(f"exercise {i} `{name}`: its body stands in another cell (line {hit[0].lineno})")
                continue
            for fn in functions:
                ratio = difflib.SequenceMatcher(None, target, _norm(fn.body), autojunk=False).ratio()
                if ratio >= similar:
                    leaks.append(f"exercise {i} `{name}`: {ratio:.0%} like `{fn.name}` in another cell")
                    break
    return leaks
