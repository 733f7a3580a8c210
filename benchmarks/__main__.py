"""``python -m benchmarks [NAME [ARGS...]]``: list the benchmarks, or run one."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import KERNELS, SCRIPTS


def listing() -> str:
    width = max(map(len, [*SCRIPTS, *KERNELS]))
    lines = ["usage: python -m benchmarks NAME [ARGS...]   (NAME --help for its options)", "", "course:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in SCRIPTS.items()]
    lines += ["", "chapter kernels (from the notebooks):"]
    lines += [f"  {name:<{width}}  {k.about} ({k.notebook}: {k.function})" for name, k in KERNELS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(listing())
        return 0
    name, rest = argv[0], argv[1:]
    if name in SCRIPTS:
        return importlib.import_module(SCRIPTS[name][0]).main(rest)
    if name in KERNELS:
        from benchmarks.kernels import run_kernel

        return run_kernel(name, KERNELS[name], rest)
    print(f"unknown benchmark {name!r}\n\n{listing()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
