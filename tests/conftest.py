import os
from pathlib import Path

import pytest

from labkit.notebook import chapters

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = chapters(ROOT / "notebooks")          # NN_name.ipynb, not the learner copies beside them

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: builds the book or executes notebooks (minutes)")


@pytest.fixture(autouse=True)
def _tiny_size(monkeypatch):
    monkeypatch.setenv("LABKIT_SIZE", "tiny")


@pytest.fixture
def hub_offline(tmp_path, monkeypatch):
    """The Hugging Face Hub switched offline, with an empty cache: a hub loader must explain itself."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config                                     # both read the variables at import: set them too
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
