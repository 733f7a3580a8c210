"""Run a chapter's own kernel benchmark (registered in ``benchmarks.KERNELS``) and save what it returns.

The function lives in the chapter notebook, in a cell tagged `model` or `bench` (so the reader sees it beside
the kernels it times); it is loaded from there, never copied. Its return value is printed and saved as JSON to
``benchmarks/results/NAME.json``; the size switch (``LABKIT_SIZE``) reaches the notebook as usual.

    python -m benchmarks mamba_scans [--arg lengths=64,256,1024] [--out FILE]
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import Kernel
from benchmarks._common import RESULTS_DIR, load_notebook, machine_info, write_json


def _value(text: str):
    """``64,256`` -> (64, 256); ``3`` -> 3; anything else stays a string."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    vals = []
    for p in parts:
        try:
            vals.append(ast.literal_eval(p))
        except (ValueError, SyntaxError):
            vals.append(p)
    return tuple(vals) if "," in text else (vals[0] if vals else "")


def _jsonable(x):
    """Make what the chapter returned storable: tensors/arrays to lists, dataframes to records, else str."""
    if hasattr(x, "to_dict") and callable(x.to_dict):  # a pandas DataFrame
        try:
            return x.to_dict(orient="records")
        except TypeError:
            return x.to_dict()
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return repr(x)


def run_kernel(name: str, kernel: Kernel, argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=f"{kernel.about}: "
                                f"{kernel.notebook}'s `{kernel.function}`. " + (__doc__ or "").split("\n")[0])
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help=f"keyword arguments for {kernel.function} (default {kernel.kwargs})")
    p.add_argument("--notebook", default=kernel.notebook, help="the notebook defining the function")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json")
    args = p.parse_args(argv)
    kwargs = dict(kernel.kwargs)
    for item in args.arg:
        key, _, text = item.partition("=")
        kwargs[key.strip()] = _value(text)
    try:
        ns = load_notebook(args.notebook, ("model", "bench"))
    except FileNotFoundError as e:
        print(f"{name}: {e} (the chapter is not written yet?)", file=sys.stderr)
        return 2
    fn = ns.get(kernel.function)
    if not callable(fn):
        print(f"{name}: {args.notebook} defines no `{kernel.function}` in its `model`/`bench` cells", file=sys.stderr)
        return 2
    print(f"{name}: {kernel.about} -- {kernel.function}(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")",
          flush=True)
    t0 = time.perf_counter()
    import inspect

    try:
        inspect.signature(fn).bind(**kwargs)
        call_args, call_kwargs = (), kwargs
    except TypeError:  # a parameter named differently: pass the values in order
        call_args, call_kwargs = tuple(kwargs.values()), {}
    returned = fn(*call_args, **call_kwargs)
    seconds = time.perf_counter() - t0
    if returned is not None:
        print(returned)
    write_json(args.out, {"benchmark": name, "notebook": args.notebook, "function": kernel.function,
                          "kwargs": _jsonable(kwargs), "seconds": round(seconds, 2), "machine": machine_info(),
                          "result": _jsonable(returned)})
    print(f"wrote {args.out} ({seconds:.1f} s)")
    return 0
