"""labkit.notebook: tagged-cell loading, exercises, stubs, the learner copy."""
import nbformat
import pytest

from labkit import notebook
from labkit.check import ExerciseError


def make_nb(path, cells):
    nb = nbformat.v4.new_notebook()
    for kind, src, tags in cells:
        cell = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


EXERCISE = '''def double(x):
    """Return twice x."""
    y = x * 2
    return y


class Box:
    def area(self, w, h):
        return w * h
'''


@pytest.fixture
def nb(tmp_path):
    return make_nb(tmp_path / "99_demo.ipynb", [
        ("md", "# Demo", []),
        ("code", "import math\nSCALE = 3", ["model"]),
        ("code", "print('training, not for tests')\nraise SystemExit", []),
        ("code", "def scaled(x):\n    return SCALE * x\n%matplotlib inline", ["model"]),
        ("code", EXERCISE, ["exercise"]),
        ("code", "from labkit.check import check_true\ncheck_true(double(21) == 42, 'double(21) should be 42')", ["check"]),
        ("code", "def vram_job():\n    return 'job'", ["vram"]),
    ])


def test_load_runs_only_tagged_cells(nb):
    ns = notebook.load(nb)
    assert ns["scaled"](2) == 6 and "double" not in ns and "vram_job" not in ns
    ns = notebook.load(nb, ("model", "vram"))
    assert ns["vram_job"]() == "job"
    assert notebook.as_module(nb).scaled(1) == 3
    with pytest.raises(LookupError, match="no code cells tagged"):
        notebook.load(nb, "nothing")


def test_exercise_solution_passes_and_wrong_answer_fails(nb):
    assert len(notebook.exercises(nb)) == 1
    notebook.run_exercise(nb, 0)
    with pytest.raises(ExerciseError, match="should be 42"):
        notebook.run_exercise(nb, 0, "def double(x):\n    return x + 2")


def test_stub_keeps_signature_and_docstring():
    stub = notebook.stub_source(EXERCISE)
    assert 'def double(x):\n    """Return twice x."""\n    raise NotImplementedError' in stub
    assert "def area(self, w, h):\n        raise NotImplementedError" in stub
    assert "x * 2" not in stub and "w * h" not in stub
    ns = {}
    exec(stub, ns)
    with pytest.raises(NotImplementedError, match="double"):
        ns["double"](1)


def test_strip_writes_learner_copy(nb, tmp_path):
    out = notebook.strip(nb, tmp_path / "learner.ipynb")
    cells = nbformat.read(out, as_version=4).cells
    ex = [c for c in cells if "exercise" in c.metadata.get("tags", [])][0]
    assert "NotImplementedError" in ex.source and "x * 2" not in ex.source
    with pytest.raises(NotImplementedError, match="Exercise: write `double`"):
        notebook.run_exercise(out, 0)


def test_resolve_by_bare_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        notebook.resolve("00_no_such_chapter")


def test_dataclasses_and_future_imports_work_in_loaded_cells(tmp_path):
    """Cells run in a registered module: @dataclass (which looks its module up) works, and labkit's own
    `from __future__ import annotations` does not leak into the cells."""
    nb = make_nb(tmp_path / "95_dc.ipynb", [
        ("code", "from dataclasses import dataclass\n@dataclass\nclass Config:\n    width: int = 4\n"
                 "def hint(x: 'int') -> int:\n    return x\nANNOT = hint.__annotations__", ["model"]),
    ])
    ns = notebook.load(nb)
    assert ns["Config"]().width == 4
    assert ns["ANNOT"]["return"] is int          # a string here would mean the future import leaked
    assert notebook.as_module(nb).Config(width=2).width == 2


def test_exercise_link_goes_under_the_heading_once():
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    from labkit.notebook import EXERCISE_LINK, set_exercise_link

    nb = new_notebook(cells=[new_markdown_cell("## 4 · Exercises\n\n**Exercise 1.** Write it."),
                             new_code_cell("def f():\n    return 1", metadata={"tags": ["exercise"]})])
    assert set_exercise_link(nb, "09_x")
    line = EXERCISE_LINK.format(stem="09_x")
    assert nb.cells[0].source == f"## 4 · Exercises\n\n{line}\n\n**Exercise 1.** Write it."
    assert "{download}`09_x_exercises.ipynb`" in line and "labkit check notebooks/09_x_exercises.ipynb" in line
    assert not set_exercise_link(nb, "09_x")                      # already there: no change, no second copy
    assert set_exercise_link(nb, "10_y") and nb.cells[0].source.count("Your copy of this chapter") == 1
    assert not set_exercise_link(new_notebook(cells=[new_markdown_cell("# no exercises")]), "x")
    after = new_notebook(cells=[new_markdown_cell("The end of section 3.\n\n## 4 · Exercises\n\nWrite them."),
                                new_code_cell("def f():\n    return 1", metadata={"tags": ["exercise"]})])
    assert set_exercise_link(after, "x")                        # under the heading, not above it
    assert after.cells[0].source.split("\n\n")[1:3] == ["## 4 · Exercises", EXERCISE_LINK.format(stem="x")]
    with pytest.raises(LookupError, match="Exercises"):
        set_exercise_link(new_notebook(cells=[new_code_cell("def f(): pass", metadata={"tags": ["exercise"]})]), "x")
