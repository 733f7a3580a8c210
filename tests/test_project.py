"""House rules that keep the project installable and the book complete."""
import json
import re
import subprocess
import sys
import tomllib

import yaml

from .conftest import NOTEBOOKS, ROOT


def test_environment_yml_installs_the_same_package():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [d for d in env["dependencies"] if isinstance(d, str)]
    assert any(p.startswith("python=3.11") for p in pins)
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    extras = set(pyproject["project"]["optional-dependencies"])
    installs = [re.match(r"-e \.\[(.+)\]", line) for line in pip]
    named = {e for m in installs if m for e in m.group(1).split(",")}
    assert "dev" in named and named <= extras, f"environment.yml installs extras {named}, pyproject has {extras}"
    # nothing installed beside the package that pyproject does not declare
    assert all(line.startswith("-e .") for line in pip), pip


def test_torch_requirement_is_loose_and_makefile_installs_cpu_build():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.startswith("torch"))
    assert torch_dep.replace(" ", "").startswith("torch>=") and "==" not in torch_dep
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text()


def test_readme_shows_the_two_commands_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make book" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_chapter_is_in_the_toc_and_the_readme_table():
    toc = (ROOT / "_toc.yml").read_text()
    readme = (ROOT / "README.md").read_text()
    for nb in NOTEBOOKS:
        assert f"notebooks/{nb.stem}" in toc, f"{nb.name} is missing from _toc.yml"
        assert nb.name in readme, f"{nb.name} has no row in the README's chapter table"


def test_notebooks_are_committed_without_outputs_and_follow_the_template():
    for nb_path in NOTEBOOKS:
        nb = json.loads(nb_path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert not any(c.get("outputs") for c in code), f"{nb_path.name} carries outputs"
        # the Colab set-up cell (tests/test_newcomer.py checks it is the current one), then the size switch
        assert "colab" in code[0]["metadata"].get("tags", []), f"{nb_path.name}: first code cell must be the Colab cell"
        assert "parameters" in code[1]["metadata"].get("tags", []), f"{nb_path.name}: second code cell must be `parameters`"
        assert "jupytext" not in nb["metadata"], f"{nb_path.name} carries jupytext metadata"
        tags = {t for c in code for t in c["metadata"].get("tags", [])}
        assert {"model", "vram", "exercise", "check"} <= tags, f"{nb_path.name} lacks tags: {tags}"


def test_prose_holds_no_control_characters():
    """A LaTeX command written in a normal Python string loses its backslash (\\top -> TAB + "op", \\frac -> form
    feed + "rac"): such characters never belong in a markdown cell."""
    import re

    for nb_path in NOTEBOOKS:
        for i, c in enumerate(json.loads(nb_path.read_text())["cells"]):
            if c["cell_type"] == "markdown":
                m = re.search(r"[\x00-\x09\x0b-\x1f\x7f]", "".join(c["source"]))
                assert not m, f"{nb_path.name} cell {i}: control character {m.group()!r} in the prose"


def test_each_chapter_has_a_reference_test():
    for nb in NOTEBOOKS:
        name = nb.stem.split("_", 1)[1]
        assert (ROOT / "tests" / f"test_ref_{name}.py").exists(), f"tests/test_ref_{name}.py is missing"


def test_labkit_holds_no_chapter_code():
    names = [nb.stem.split("_", 1)[1] for nb in NOTEBOOKS] + ["mamba", "rwkv", "retnet", "bitnet", "lora"]
    for py in (ROOT / "labkit").glob("*.py"):
        text = py.read_text().lower()
        for n in names:
            assert f"def {n}" not in text and f"class {n}" not in text, f"{py.name} defines chapter code ({n})"


def test_labkit_stays_small():
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / "labkit").glob("*.py"))
    print(f"labkit: {lines} lines")
    # ~2,000 was the aim for the one-GPU kit; labkit.distributed (DDP/FSDP2/DCP under torchrun, ~270 lines) is
    # shared by every chapter and belongs here, as do labkit.widgets (the explorations and the VRAM calculator every
    # chapter uses, ~290 lines) and the exercises' leak detector (~90). Past 2,900, move a chapter-specific helper
    # back into its chapter.
    assert lines < 2900


def test_offline_guard_blocks_the_network():
    """The notebook runs use this guard; prove it refuses a real address at once and allows loopback."""
    code = (
        "import socket\n"
        "try:\n    socket.create_connection(('93.184.216.34', 80), timeout=5)\nexcept OSError as e:\n"
        "    print('BLOCKED' if 'blocked' in str(e) else 'OTHER', e)\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); c = socket.socket();"
        " c.connect(s.getsockname()); print('LOOPBACK OK')\n"
    )
    env = {"PYTHONPATH": str(ROOT / "tests" / "offline"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60).stdout
    assert "BLOCKED" in out and "LOOPBACK OK" in out, out


def test_notebook_runs_use_the_offline_guard():
    make = (ROOT / "Makefile").read_text()
    assert "notebooks --nbval-lax -p tests.offline.plugin" in make


def test_ruff_check_is_clean():
    """`ruff check` (rules in pyproject's [tool.ruff]) over labkit, tests, benchmarks and the notebooks' code cells."""
    from pathlib import Path

    ruff = Path(sys.executable).with_name("ruff")
    assert ruff.exists(), f"ruff is not installed next to {sys.executable}: pip install -e '.[dev]'"
    out = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"ruff check found problems:\n{out.stdout}{out.stderr}"


def _chapter_imports() -> dict[str, set[str]]:
    """Top-level modules the chapters' code cells import -> the chapters importing them. An import guarded by
    ``try: ... except ImportError`` is optional and not counted."""
    import ast
    import sys

    from labkit.notebook import _clean

    found: dict[str, set[str]] = {}
    for nb_path in NOTEBOOKS:
        for c in json.loads(nb_path.read_text())["cells"]:
            if c["cell_type"] != "code":
                continue
            tree = ast.parse(_clean("".join(c["source"])))
            optional = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Try) and any(
                        isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                        for h in node.handlers):
                    optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
            for node in ast.walk(tree):
                if id(node) in optional:
                    continue
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "labkit":
                        found.setdefault(top, set()).add(nb_path.stem)
    return found


def test_the_full_extra_names_every_package_the_chapters_import():
    """`pip install .[full]` (the core dependencies plus [full]) must be enough to run every chapter at every size."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def dist(req: str) -> str:
        return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()

    installed = {dist(r) for r in project["dependencies"] + project["optional-dependencies"]["full"]}
    module_to_dist = {"PIL": "pillow", "yaml": "pyyaml"}
    missing = {m: sorted(chapters) for m, chapters in _chapter_imports().items()
               if module_to_dist.get(m, m).lower() not in installed}
    assert not missing, f"chapters import packages that neither the dependencies nor [full] name: {missing}"


WORKFLOWS = ROOT / ".github" / "workflows"


def test_the_workflows_pass_actionlint_and_build_what_the_readme_says(tmp_path):
    """The GitHub workflows: `make book` published on Pages, `.ci/run` on every change; actionlint finds no
    problem in them, and does find one in a broken copy (so the check can fail)."""
    from pathlib import Path

    actionlint = Path(sys.executable).with_name("actionlint")
    assert actionlint.exists(), f"actionlint is not installed next to {sys.executable}: pip install -e '.[dev]'"
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"book.yml", "tests.yml"}
    out = subprocess.run([actionlint, "-color=false", *files], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"actionlint found problems:\n{out.stdout}{out.stderr}"
    book = yaml.safe_load((WORKFLOWS / "book.yml").read_text())
    steps = [s for job in book["jobs"].values() for s in job["steps"]]
    assert any(s.get("run") == "make book" for s in steps)
    assert any(s.get("with", {}).get("path") == "_build/html" for s in steps if "upload-pages" in s.get("uses", ""))
    assert any("deploy-pages" in s.get("uses", "") for s in steps)
    tests = yaml.safe_load((WORKFLOWS / "tests.yml").read_text())
    assert [s.get("run") for job in tests["jobs"].values() for s in job["steps"] if s.get("run")] == ["bash .ci/run"]
    bad = tmp_path / ".github" / "workflows"
    bad.mkdir(parents=True)
    (bad / "book.yml").write_text((WORKFLOWS / "book.yml").read_text().replace("runs-on:", "runs_on:"))
    out = subprocess.run([actionlint, "-color=false", bad / "book.yml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "runs_on" in out.stdout, out.stdout


def test_binder_installs_what_make_install_does():
    """The Binder launch button builds from binder/: the Makefile's torch pin (as the CPU build), the dev extra and
    torchscale without its dependencies, as `make install` does."""
    import os

    post = ROOT / "binder" / "postBuild"
    assert os.access(post, os.X_OK), "binder/postBuild must be executable"
    script, make = post.read_text(), (ROOT / "Makefile").read_text()
    pin = re.search(r'TORCH_CPU \?= (\S+)', make).group(1)
    assert f'"{pin}" --index-url https://download.pytorch.org/whl/cpu' in script
    assert 'pip install --no-cache-dir -e ".[dev]"' in script
    torchscale = re.search(r'--no-deps "(torchscale==[^"]+)"', make).group(1)
    assert f'--no-deps "{torchscale}"' in script
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["launch_buttons"]["binderhub_url"] and config["launch_buttons"]["colab_url"]


def test_every_page_shows_the_same_commands_and_the_configured_clone_url():
    """One repository URL (_config.yml) in every clone command; the same short commands on the README, the intro
    and the set-up page; the chapters point to them, never to a bare `jupyter lab` or a pip install of the repo."""
    from labkit.notebook import read, repo_url

    url = repo_url()
    folder = url.rstrip("/").rsplit("/", 1)[-1]
    pages = {p: p.read_text() for p in (ROOT / "README.md", ROOT / "book" / "intro.md", ROOT / "book" / "setup.md")}
    for page, text in pages.items():
        clones = re.findall(r"git clone (\S+) && cd (\S+)", text)
        assert clones, f"{page.name} shows no `git clone URL && cd FOLDER`"
        assert set(clones) == {(url, folder)}, f"{page.name}: {clones} is not {url} (the URL in _config.yml)"
        for command in ("make lab", "LABKIT_SIZE=full make lab", "make exercises", "labkit check"):
            assert command in text, f"{page.name} does not show `{command}`"
        assert "jupyter lab" not in text and "git+" not in text, f"{page.name} shows another way to start"
    for command in ("make book", "make test"):
        assert command in pages[ROOT / "README.md"] and command in pages[ROOT / "book" / "setup.md"]
    for nb in NOTEBOOKS:
        prose = "\n".join(c.source for c in read(nb).cells if c.cell_type == "markdown")
        assert "jupyter lab" not in prose and "git+" not in prose, f"{nb.name}: point to `make lab` instead"


def test_every_chapter_has_its_generated_cells_current(tmp_path):
    """The first cell (Colab) and the learner-copy line are written by `make chapter-cells`; none is stale."""
    import shutil
    from pathlib import Path

    from labkit.notebook import update_chapter_cells

    stale = update_chapter_cells([Path(shutil.copy(nb, tmp_path / nb.name)) for nb in NOTEBOOKS])
    assert not stale, f"run `make chapter-cells`: {[p.name for p in stale]} are out of date"


def test_chapters_compile_through_labkit():
    """A chapter compiles with labkit.device.compile_model (eager with one line where torch.compile is missing or
    fails), never torch.compile(...) directly."""
    from labkit.notebook import read

    for nb in NOTEBOOKS:
        for i, c in enumerate(read(nb).cells):
            if c.cell_type == "code":
                assert not re.search(r"torch\.compile\(", c.source), f"{nb.name} cell {i}: use compile_model(model)"
