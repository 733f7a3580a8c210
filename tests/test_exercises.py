"""Every exercise of every chapter: the solution passes its check; the stripped stub fails it.

Each chapter's own test file adds a plausible *wrong* answer per exercise (WRONG_ANSWERS).
"""
import pytest

from labkit import notebook
from labkit.check import ExerciseError

from .conftest import NOTEBOOKS

CASES = [(nb, i) for nb in NOTEBOOKS for i in range(len(notebook.exercises(nb)))]
IDS = [f"{nb.stem}-ex{i}" for nb, i in CASES]

def test_every_chapter_has_three_exercises():
    for nb in NOTEBOOKS:
        assert len(notebook.exercises(nb)) >= 3, f"{nb.name} has fewer than 3 exercises"

@pytest.mark.parametrize("nb,i", CASES, ids=IDS)
def test_solution_passes(nb, i):
    notebook.run_exercise(nb, i)

@pytest.mark.parametrize("nb,i", CASES, ids=IDS)
def test_stub_fails(nb, i):
    stub = notebook.stub_source(notebook.exercises(nb)[i][0])
    assert "NotImplementedError" in stub, "the exercise cell defines no function to stub"
    with pytest.raises((ExerciseError, NotImplementedError)):
        notebook.run_exercise(nb, i, stub)


def assert_wrong_answers_fail(nb, wrong_answers):
    """Used by chapter test files: each wrong answer must raise ExerciseError; every exercise needs one."""
    n = len(notebook.exercises(nb))
    assert sorted(wrong_answers) == list(range(n)), f"WRONG_ANSWERS must cover exercises 0..{n - 1}"
    for i, src in sorted(wrong_answers.items()):
        with pytest.raises(ExerciseError) as e:
            notebook.run_exercise(nb, i, src)
        print(f"exercise {i}: wrong answer rejected with: {str(e.value).splitlines()[0][:120]}")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_no_answer_in_the_learner_copy(nb):
    """The learner copy stubs only the exercise cells: no other cell may hold a solution's body (names normalised)."""
    assert notebook.answer_leaks(nb) == []


def test_answer_leaks_finds_a_copied_body(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    model = "def attend(q, k):\n    s = q @ k.T / q.shape[-1] ** 0.5\n    s = s - s.max(-1, keepdims=True)\n" \
            "    e = s.exp()\n    return e / e.sum(-1, keepdims=True)\n"
    answer = "def softmax_scores(a, b):\n    '''doc'''\n" + "\n".join(model.splitlines()[1:]).replace("q", "a") \
        .replace("k", "b").replace("s ", "scores ").replace("(s", "(scores").replace("s.", "scores.")
    cells = [("model", model), ("exercise", answer), ("check", "pass")]
    nb.cells = [nbformat.v4.new_code_cell(src, metadata={"tags": [tag]}) for tag, src in cells]
    nbformat.write(nb, tmp_path / "00_x.ipynb")
    leaks = notebook.answer_leaks(tmp_path / "00_x.ipynb", min_chars=0)
    assert leaks and "softmax_scores" in leaks[0], leaks
    nb.cells[0].source = "def other(x):\n    return x.sum()\n"
    nbformat.write(nb, tmp_path / "00_x.ipynb")
    assert notebook.answer_leaks(tmp_path / "00_x.ipynb", min_chars=0) == []


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_every_exercise_has_a_collapsed_hint(nb):
    """The last markdown cell before each exercise is its hint (tag `hint`), collapsed: <details><summary>Hint."""
    cells = notebook.read(nb).cells
    for i, c in enumerate(cells):
        if "exercise" not in notebook.tags_of(c):
            continue
        before = next(d for d in reversed(cells[:i]) if d.cell_type == "markdown")
        assert "hint" in notebook.tags_of(before), f"{nb.name}: no `hint` cell before exercise cell {i}"
        src = before.source.strip()
        assert src.startswith("<details><summary>Hint") and src.endswith("</details>"), \
            f"{nb.name}: the hint before cell {i} is not a collapsed <details> block"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_every_chapter_has_an_exploration(nb):
    """At least one `explore` cell, runnable on the `model` cells alone, defining an explore_<what> function that
    the chapter then calls (the chapter's own test drives it)."""
    sources = notebook.cells(nb, "explore")
    assert sources, f"{nb.name} has no `explore` cell"
    ns = notebook.load(nb, ("model", "explore"))
    names = [k for k, v in ns.items() if k.startswith("explore_") and callable(v)]
    assert names, f"{nb.name}: its `explore` cells define no explore_<what> function"
    text = "\n".join(c.source for c in notebook.read(nb).cells if c.cell_type == "code"
                     and "explore" not in notebook.tags_of(c))
    assert any(f"{name}(" in text for name in names), f"{nb.name} never calls {names}"
