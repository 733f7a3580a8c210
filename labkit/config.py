"""The size switch: one environment variable, ``LABKIT_SIZE=tiny|full``.

``tiny`` (the default) runs every chapter on a laptop CPU in about a minute, offline.
``full`` is the real size for a 12 GB GPU. Notebooks never need editing to change size::

    LABKIT_SIZE=full jupyter lab
"""
from __future__ import annotations

import os
from typing import TypeVar

SIZES = ("tiny", "full")
ENV_VAR = "LABKIT_SIZE"
T = TypeVar("T")


class SizeError(ValueError):
    """An unknown value of LABKIT_SIZE."""


def size() -> str:
    """The current size, read from ``LABKIT_SIZE`` (default ``tiny``)."""
    value = os.environ.get(ENV_VAR, "tiny").strip().lower() or "tiny"
    if value not in SIZES:
        raise SizeError(
            f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not a size this course knows. "
            f"Valid values: {', '.join(SIZES)} (e.g. `export {ENV_VAR}=full` on a 12 GB GPU)."
        )
    return value


def is_full() -> bool:
    return size() == "full"


def pick(tiny: T, full: T) -> T:
    """Return ``tiny`` or ``full`` according to the current size.

    Chapters keep their configs as named presets of one config type and choose with this::

        config = labkit.pick(tiny=GPTConfig.preset("gpt-nano"), full=GPTConfig.preset("gpt2"))
    """
    return full if is_full() else tiny


def runs_dir(name: str = "") -> "os.PathLike":
    """Where checkpoints and run outputs go: ``$LABKIT_RUNS`` or ``~/.cache/labkit/runs`` (never the repo)."""
    from pathlib import Path

    root = Path(os.environ.get("LABKIT_RUNS", Path.home() / ".cache" / "labkit" / "runs"))
    path = root / name if name else root
    path.mkdir(parents=True, exist_ok=True)
    return path
