"""pytest plugin for the notebook runs: every kernel starts with the network blocked and the hub offline."""
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("LABKIT_SIZE", "tiny")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
