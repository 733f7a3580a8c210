import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: builds the book or executes notebooks (minutes)")


@pytest.fixture(autouse=True)
def _tiny_size(monkeypatch):
    monkeypatch.setenv("LABKIT_SIZE", "tiny")
