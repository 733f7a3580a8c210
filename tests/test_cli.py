"""The `labkit` command, end to end on a small notebook made here."""
import json
import subprocess
import sys

import nbformat
import pytest

from labkit.cli import main

from .test_labkit_notebook import make_nb

VRAM_CELL = '''import torch
from torch import nn
import labkit
from labkit.vram import TrainJob

WIDTH = labkit.pick(tiny=64, full=1024)

def vram_job():
    return TrainJob(
        make_model=lambda: nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(4)]),
        make_batch=lambda: torch.randn(32, WIDTH),
        loss_fn=lambda m, x: m(x).square().mean(),
        amp_dtype=None, name="mlp")
'''


@pytest.fixture
def demo(tmp_path):
    return make_nb(tmp_path / "98_cli.ipynb", [
        ("code", "import labkit\nSIZE = labkit.size()\nprint('size', SIZE)", ["parameters"]),
        ("code", "X = 2", ["model"]),
        ("code", VRAM_CELL, ["vram"]),
        ("code", "def triple(x):\n    return 3 * x", ["exercise"]),
        ("code", "from labkit.check import check_true\ncheck_true(triple(2) == 6, 'no')", ["check"]),
    ])


def test_doctor(capsys):
    assert main(["doctor", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"


def test_vram_reports_and_exit_code_follows_fit(demo, capsys):
    assert main(["vram", str(demo), "--size", "full", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fits"] and r["breakdown"]["params"] == 4 * (1024 * 1024 + 1024) * 4
    assert main(["vram", str(demo), "--size", "full", "--budget-gb", "0.01"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    # the size switch reaches the notebook: tiny is 16x narrower
    assert main(["vram", str(demo), "--size", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["breakdown"]["params"] == 4 * (64 * 64 + 64) * 4


def test_vram_job_picks_one_of_a_chapters_full_configs(tmp_path, capsys):
    cell = VRAM_CELL.replace("def vram_job():", "def vram_job(which='narrow'):\n    width = {'narrow': WIDTH, 'wide': 2 * WIDTH}[which]") \
                    .replace("nn.Linear(WIDTH, WIDTH)", "nn.Linear(width, width)").replace("randn(32, WIDTH)", "randn(32, width)")
    nb = make_nb(tmp_path / "96_jobs.ipynb", [("code", "X = 1", ["model"]), ("code", cell, ["vram"])])
    params = []
    for extra in ([], ["--job", "wide"]):
        assert main(["vram", str(nb), "--json", *extra]) == 0
        params.append(json.loads(capsys.readouterr().out)["breakdown"]["params"])
    assert params == [4 * (1024 * 1024 + 1024) * 4, 4 * (2048 * 2048 + 2048) * 4]
    assert main(["vram", str(nb), "--job", "huge"]) == 2           # the chapter's own KeyError, reported
    assert "KeyError" in capsys.readouterr().err


def test_vram_without_vram_cell_is_a_clear_error(tmp_path, capsys):
    nb = make_nb(tmp_path / "97_none.ipynb", [("code", "X = 1", ["model"])])
    assert main(["vram", str(nb)]) == 2
    assert "no `vram_job()` in a cell tagged `vram`" in capsys.readouterr().err


def test_strip(demo, tmp_path):
    out = tmp_path / "learner.ipynb"
    assert main(["strip", str(demo), "-o", str(out)]) == 0
    src = [c.source for c in nbformat.read(out, as_version=4).cells if "exercise" in c.metadata.tags][0]
    assert "NotImplementedError" in src and "3 * x" not in src


def test_run_executes_at_the_requested_size(demo, tmp_path):
    out = tmp_path / "ran.ipynb"
    proc = subprocess.run([sys.executable, "-m", "labkit", "run", str(demo), "--size", "full", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] is True
    first = nbformat.read(out, as_version=4).cells[0]
    assert "size full" in first.outputs[0]["text"]


def test_run_reports_a_failing_cell(tmp_path):
    nb = make_nb(tmp_path / "96_fail.ipynb", [("code", "raise ValueError('broken chapter')", [])])
    proc = subprocess.run([sys.executable, "-m", "labkit", "run", str(nb), "--out", str(tmp_path / "o.ipynb")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "broken chapter" in proc.stderr


def test_bad_size_is_rejected():
    with pytest.raises(SystemExit):
        main(["run", "x.ipynb", "--size", "huge"])


def test_vram_crash_exits_2_not_1(tmp_path, capsys):
    nb = make_nb(tmp_path / "94_crash.ipynb", [("code", "def vram_job():\n    raise RuntimeError('bad config')", ["vram"])])
    assert main(["vram", str(nb)]) == 2
    assert "bad config" in capsys.readouterr().err
