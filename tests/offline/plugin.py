"""pytest plugin for the notebook runs: every kernel starts with the network blocked and the hub offline."""
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("LABKIT_SIZE", "tiny")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


# nbval waits only 5 s (hard-coded) for each output message once a cell has finished; a kernel flushing many
# progress-bar updates on a loaded machine can miss that and fail the cell with "Timeout of 5 seconds exceeded
# waiting for output". Cells still have their own overall limit (--nbval-cell-timeout).
NBVAL_OUTPUT_TIMEOUT_S = 120


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if type(item).__name__ == "IPyNbCell" and hasattr(item, "output_timeout"):
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT_S
