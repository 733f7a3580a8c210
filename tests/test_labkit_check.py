import pytest
import torch

from labkit.check import ExerciseError, assert_close, check_true, compare


def softmax_ref(x):
    return torch.softmax(x, dim=-1)


def rand_inputs(g):
    return (torch.randn(3, 5, generator=g),)


def test_right_answer_passes_and_reports_error(capsys):
    err = compare(lambda x: x.exp() / x.exp().sum(-1, keepdim=True), softmax_ref, rand_inputs, name="softmax")
    assert err < 1e-6
    assert "softmax: matches the reference on 5 inputs" in capsys.readouterr().out


def test_wrong_values_are_located():
    with pytest.raises(ExerciseError) as e:
        compare(lambda x: x.exp() / x.exp().sum(0, keepdim=True), softmax_ref, rand_inputs, name="softmax")
    msg = str(e.value)
    assert "softmax: values differ" in msg and "expected" in msg and "failing input" in msg and "(3, 5)" in msg


def test_wrong_shape_and_missing_return():
    with pytest.raises(ExerciseError, match=r"expected shape \(3, 5\), got \(3,\)"):
        compare(lambda x: x.sum(-1), softmax_ref, rand_inputs)
    with pytest.raises(ExerciseError, match="returned None"):
        compare(lambda x: None, softmax_ref, rand_inputs)


def test_stub_and_crash_are_friendly():
    def stub(x):
        raise NotImplementedError("Exercise: write `stub`")

    with pytest.raises(ExerciseError, match="not written yet"):
        compare(stub, softmax_ref, rand_inputs)
    with pytest.raises(ExerciseError, match="raised IndexError"):
        compare(lambda x: x[99], softmax_ref, rand_inputs)


def test_dtype_mismatch_and_nan():
    with pytest.raises(ExerciseError, match="dtype"):
        assert_close(torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ExerciseError, match="NaN"):
        assert_close(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ExerciseError, match="index"):
        assert_close(torch.tensor([1.0, float("inf")]), torch.tensor([1.0, float("-inf")]))
    assert assert_close(torch.tensor([1.0, float("-inf")]), torch.tensor([1.0, float("-inf")])) == 0.0


def test_tolerance_is_respected():
    assert_close(torch.tensor([1.0]), torch.tensor([1.0 + 1e-7]))
    with pytest.raises(ExerciseError):
        assert_close(torch.tensor([1.0]), torch.tensor([1.01]))


def test_check_true():
    check_true(True, "fine")
    with pytest.raises(ExerciseError, match="rows must sum to one"):
        check_true(False, "rows must sum to one")


# --- labkit check NOTEBOOK: a learner's copy run at the tiny size ------------------------------------

def _learner_copy(tmp_path, replace: dict[int, str] | None = None, strip: bool = False):
    """Chapter 01 as a learner would have it: stripped (stubs), or the solution with some exercises replaced."""
    import nbformat

    from labkit import notebook

    from .conftest import NOTEBOOKS

    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    ex = [c for c in nb.cells if c.cell_type == "code" and "exercise" in notebook.tags_of(c)]
    for i, c in enumerate(ex):
        if strip:
            c.source = notebook.stub_source(c.source)
        if replace and i in replace:
            c.source = replace[i]
    out = tmp_path / f"{NOTEBOOKS[0].stem}_exercises.ipynb"     # chapter 01 loads no other chapter
    nbformat.write(nb, out)
    return out


@pytest.fixture
def copies(tmp_path):
    return lambda **kw: _learner_copy(tmp_path, **kw)


def test_check_a_stripped_copy_says_not_attempted(copies, capsys):
    from labkit.cli import main

    path = copies(strip=True)
    assert main(["check", str(path), "--quick"]) == 1
    out = capsys.readouterr().out
    print(out)
    assert out.count("not attempted") >= 4 and "4 exercises: 4 not attempted" in out


def test_check_names_the_wrong_answer_and_passes_the_rest(copies):
    from labkit.check import check_notebook

    from .test_ref_mingpt import WRONG_ANSWERS

    report = check_notebook(copies(replace={0: WRONG_ANSWERS[0]}), quick=True)
    status = [r["status"] for r in report["exercises"]]
    assert status == ["wrong", "passed", "passed", "passed"], report
    assert report["exercises"][0]["exercise"] == "min_p_filter"
    assert "min_p_filter" in report["exercises"][0]["message"]         # the check's own message, not a traceback


def test_check_the_solution_exits_zero(capsys):
    from labkit.cli import main

    from .conftest import NOTEBOOKS

    assert main(["check", str(NOTEBOOKS[0]), "--quick"]) == 0
    assert "4 exercises: 4 passed" in capsys.readouterr().out


def test_check_runs_every_cell_and_reports_other_failures(tmp_path):
    """Without --quick every cell runs (as nbval does); a failing cell that is not an exercise is reported and the
    run goes on to the checks after it; a syntax error in the exercise is 'wrong'."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    from labkit.check import check_notebook, format_report

    cells = [new_markdown_cell("# a chapter"), new_code_cell("import labkit.check\nx = 1"),
             new_code_cell("1 / 0"),
             new_code_cell("def double(x):\n    return 2 * x", metadata={"tags": ["exercise"]}),
             new_code_cell("labkit.check.check_true(double(2) == 4, 'double(2) should be 4')",
                           metadata={"tags": ["check"]}),
             new_code_cell("def half(x) return x / 2", metadata={"tags": ["exercise"]}),
             new_code_cell("labkit.check.check_true(half(2) == 1, 'half(2) should be 1')", metadata={"tags": ["check"]})]
    path = tmp_path / "chapter.ipynb"
    nbformat.write(new_notebook(cells=cells), path)
    report = check_notebook(path)
    text = format_report(report)
    print(text)
    assert [r["status"] for r in report["exercises"]] == ["passed", "wrong"]
    assert "SyntaxError" in report["exercises"][1]["message"]
    assert report["other_failures"] == [{"cell": 1, "error": "ZeroDivisionError: division by zero"}]
    assert "code cell 1 (not an exercise) failed" in text


def test_check_refuses_a_notebook_without_exercises(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from labkit.check import check_notebook

    nbformat.write(new_notebook(cells=[new_code_cell("x = 1")]), tmp_path / "plain.ipynb")
    with pytest.raises(LookupError, match="no exercise cells"):
        check_notebook(tmp_path / "plain.ipynb")
