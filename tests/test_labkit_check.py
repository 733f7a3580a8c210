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
