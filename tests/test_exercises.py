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
