"""Every chapter's full config fits a 12 GiB card, per `labkit vram` (the command readers run)."""
import json

import pytest

from labkit import notebook
from labkit.cli import main

from .conftest import NOTEBOOKS

WITH_VRAM = [nb for nb in NOTEBOOKS if notebook.cells(nb, "vram")]


@pytest.mark.parametrize("nb", WITH_VRAM, ids=[nb.stem for nb in WITH_VRAM])
def test_full_config_fits_12_gib(nb, capsys):
    code = main(["vram", str(nb), "--size", "full", "--json"])
    report = json.loads(capsys.readouterr().out)
    print(f"{nb.stem}: estimated full-size peak {report['peak_bytes'] / 1024**3:.2f} GiB")
    assert report["peak_bytes"] == sum(report["breakdown"].values())
    assert report["breakdown"]["params"] > 0 and report["breakdown"]["activations"] > 0
    assert code == 0 and report["fits"], f"{nb.stem} does not fit: {report}"
    # and with a budget below the estimate the same command says no
    small = max(0.5, report["peak_bytes"] / 1024**3 * 0.5)
    assert main(["vram", str(nb), "--size", "full", "--budget-gb", str(small)]) == 1
