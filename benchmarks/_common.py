"""What the benchmark scripts share: paths, chapter discovery, machine facts, JSON output."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import sys
from pathlib import Path

from labkit.notebook import chapters as labkit_chapters

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MiB, GiB = 1024**2, 1024**3


def chapters(notebooks_dir: Path | str | None = None, only: list[str] | None = None) -> list[Path]:
    """The chapter notebooks (``NN_name.ipynb``), found at run time, optionally filtered by stem.

    ``only`` accepts stems (``01_mingpt``), file names, or the bare number (``01``).
    """
    folder = Path(notebooks_dir) if notebooks_dir else NOTEBOOKS_DIR
    found = labkit_chapters(folder)                  # not the learner copies beside them
    if not only:
        return found
    wanted = {w.removesuffix(".ipynb") for w in only}
    picked = [nb for nb in found if nb.stem in wanted or nb.stem[:2] in wanted]
    missing = wanted - {nb.stem for nb in picked} - {nb.stem[:2] for nb in picked}
    if missing:
        raise SystemExit(f"no chapter notebook named {', '.join(sorted(missing))} in {folder} "
                         f"(found: {', '.join(nb.stem for nb in found) or 'none'})")
    return picked


def chapter_title(nb_path: Path) -> str:
    """The chapter's name, read from the first heading of its first markdown cell (``# 01 · minGPT`` -> ``minGPT``).

    Falls back to the file name. Reading it from the notebook keeps the README from going stale.
    """
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            m = re.match(r"^#+\s*(.+?)\s*$", line)
            if m:
                title = re.sub(r"^\d+\s*[·.:|\-–—]?\s*", "", m.group(1)).strip()
                return title or m.group(1)
        break  # only the first markdown cell holds the title
    return nb_path.stem.split("_", 1)[-1]


def chapter_name(nb_path: Path) -> str:
    """The short name for tables: the title up to a colon or dash (``minGPT: a GPT, line by line`` -> ``minGPT``)."""
    return re.split(r"\s*[:—–]\s+|\s+-\s+", chapter_title(nb_path), maxsplit=1)[0]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info() -> dict:
    """Facts that make a timing comparable: cores, CPU model, versions, date, load when measured."""
    import torch

    flags = cpu_flags()
    info = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_isa": sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1min"] = round(os.getloadavg()[0], 2)
    return info


def write_json(path: Path | str, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def read_json(path: Path | str) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def labkit_command() -> list[str]:
    """How to call the ``labkit`` command of this interpreter's environment (the venv's, normally)."""
    exe = Path(sys.executable).parent / "labkit"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "labkit"]


def load_notebook(path, tags=("model",)) -> dict:
    """A chapter's cells (``labkit.notebook.as_module``) in a module named ``benchmarks._notebook_<chapter>``;
    returns its namespace."""
    import labkit.notebook

    nb = labkit.notebook.resolve(path)
    name = f"benchmarks._notebook_{re.sub(r'[^0-9a-zA-Z_]', '_', nb.stem)}"
    return vars(labkit.notebook.as_module(nb, tags, name=name))
