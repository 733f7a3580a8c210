import pytest

import labkit
from labkit.config import SizeError


def test_default_size_is_tiny(monkeypatch):
    monkeypatch.delenv("LABKIT_SIZE", raising=False)
    assert labkit.size() == "tiny" and not labkit.is_full()
    assert labkit.pick(tiny=1, full=2) == 1


def test_full_size_switch(monkeypatch):
    monkeypatch.setenv("LABKIT_SIZE", " FULL ")
    assert labkit.size() == "full" and labkit.is_full()
    assert labkit.pick(tiny=1, full=2) == 2


def test_unknown_size_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LABKIT_SIZE", "huge")
    with pytest.raises(SizeError) as e:
        labkit.size()
    msg = str(e.value)
    assert "'huge'" in msg and "tiny" in msg and "full" in msg


def test_runs_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LABKIT_RUNS", str(tmp_path / "runs"))
    p = labkit.runs_dir("01_x")
    assert p == tmp_path / "runs" / "01_x" and p.is_dir()


def test_doctor_reports_the_essentials():
    r = labkit.doctor()
    for key in ("torch", "device", "cuda", "size", "advice"):
        assert key in r
    assert r["device"] == "cpu" and r["cuda"] is False   # the CI machine has no GPU


def test_seed_everything_is_reproducible():
    import torch

    labkit.seed_everything(3)
    a = torch.rand(4)
    g = labkit.seed_everything(3)
    assert torch.equal(a, torch.rand(4))
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(3)))
