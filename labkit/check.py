"""Exercise checks: compare the learner's answer with a reference and explain a wrong one precisely.

Every check raises :class:`ExerciseError` (an ``AssertionError``, so nbval and pytest report it)
with what was expected and what came back: shape, dtype, the largest error and where, and the input
that exposed it. A correct answer prints one line with the max error.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


class ExerciseError(AssertionError):
    """A wrong exercise answer. The message says what was expected."""


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"[:200]


def _short(t: torch.Tensor, n: int = 6) -> str:
    flat = t.detach().flatten()[:n].tolist()
    return "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in flat) + (", ...]" if t.numel() > n else "]")


def _inputs_text(args: tuple) -> str:
    parts = []
    for a in args:
        parts.append(f"{_describe(a)} {_short(a)}" if isinstance(a, torch.Tensor) else _describe(a))
    return "(" + ", ".join(parts) + ")"


def assert_close(got: Any, expected: Any, *, atol: float = 1e-5, rtol: float = 1e-4, name: str = "your answer",
                 inputs: tuple = ()) -> float:
    """Compare two tensors (or nested tuples/lists of them). Returns the max absolute error."""
    where = f"\n  failing input: {_inputs_text(inputs)}" if inputs else ""
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            raise ExerciseError(f"{name}: expected a sequence of {len(expected)} items, got {_describe(got)}{where}")
        return max((assert_close(g, e, atol=atol, rtol=rtol, name=f"{name}[{i}]", inputs=inputs)
                    for i, (g, e) in enumerate(zip(got, expected))), default=0.0)
    if not isinstance(expected, torch.Tensor):
        if got != expected:
            raise ExerciseError(f"{name}: expected {expected!r}, got {got!r}{where}")
        return 0.0
    if got is None:
        raise ExerciseError(f"{name}: returned None; did you forget a `return`?{where}")
    if not isinstance(got, torch.Tensor):
        raise ExerciseError(f"{name}: expected a {_describe(expected)}, got {_describe(got)}{where}")
    if got.shape != expected.shape:
        raise ExerciseError(f"{name}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}{where}")
    if got.dtype != expected.dtype and not (got.is_floating_point() and expected.is_floating_point()):
        raise ExerciseError(f"{name}: expected dtype {expected.dtype}, got {got.dtype}{where}")
    g, e = got.detach().double(), expected.detach().double()
    nan_mismatch = torch.isnan(g) != torch.isnan(e)
    if nan_mismatch.any():
        idx = tuple(nan_mismatch.nonzero()[0].tolist())
        raise ExerciseError(f"{name}: NaN where none was expected at index {idx}{where}")
    finite = torch.isfinite(e) & torch.isfinite(g)
    inf_mismatch = (~finite) & (g != e) & ~torch.isnan(e)
    if inf_mismatch.any():
        idx = tuple(inf_mismatch.nonzero()[0].tolist())
        raise ExerciseError(f"{name}: at index {idx} expected {e[idx].item():.6g}, got {g[idx].item():.6g}{where}")
    diff = torch.where(finite, (g - e).abs(), torch.zeros_like(g))
    max_err = diff.max().item() if diff.numel() else 0.0
    bad = diff > atol + rtol * e.abs().nan_to_num(0.0)
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise ExerciseError(
            f"{name}: values differ. At index {idx} expected {e[idx].item():.6g}, got {g[idx].item():.6g}; "
            f"max abs error {max_err:.3g} > tolerance {atol:g} (+{rtol:g}·|expected|); "
            f"{int(bad.sum())} of {bad.numel()} elements wrong.{where}")
    return max_err


def compare(learner: Callable, reference: Callable, inputs: Iterable[tuple] | Callable[[torch.Generator], tuple], *,
            trials: int = 5, seed: int = 0, atol: float = 1e-5, rtol: float = 1e-4, name: str | None = None) -> float:
    """Call ``learner`` and ``reference`` on the same inputs and require equal outputs.

    ``inputs`` is a list of argument tuples, or a function ``gen -> args`` called ``trials`` times
    with a seeded ``torch.Generator`` (random inputs, reproducible). Prints the max error on success.
    """
    name = name or getattr(learner, "__name__", "your function")
    if callable(inputs):
        g = torch.Generator().manual_seed(seed)
        cases = [inputs(g) for _ in range(trials)]
    else:
        cases = list(inputs)
    worst = 0.0
    for args in cases:
        args = args if isinstance(args, tuple) else (args,)
        expected = reference(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        try:
            got = learner(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        except NotImplementedError as e:
            raise ExerciseError(f"{name} is not written yet: {e}") from None
        except Exception as e:  # a crash in the learner's code: say which input caused it
            raise ExerciseError(f"{name} raised {type(e).__name__}: {e}\n  failing input: {_inputs_text(args)}") from e
        worst = max(worst, assert_close(got, expected, atol=atol, rtol=rtol, name=name, inputs=args))
    print(f"✓ {name}: matches the reference on {len(cases)} inputs (max abs error {worst:.2e})")
    return worst


def check_true(condition: bool, message: str) -> None:
    """For checks of a property (e.g. 'loss decreased', 'every row sums to one')."""
    if not condition:
        raise ExerciseError(message)


def run(name: str, fn: Callable[[], Any]) -> Any:
    """Run a learner's code; turn NotImplementedError into a friendly ExerciseError."""
    try:
        return fn()
    except NotImplementedError as e:
        raise ExerciseError(f"{name} is not written yet: {e}") from None


# --- a learner's whole copy: `labkit check NOTEBOOK` ------------------------------------------------

# Cells a check needs (CONTRIBUTING.md: a `check` needs only the `model` cells and its exercise).
QUICK_TAGS = {"colab", "parameters", "model", "exercise", "check"}


def _error_of(cell) -> dict | None:
    return next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), None)


def _verdict(exercise_cell, check_cell) -> tuple[str, str]:
    """(status, message) of one exercise from its two executed cells."""
    if check_cell.get("execution_count") is None:
        return "not run", "the notebook stopped before this check (see the failing cell below)"
    err = _error_of(exercise_cell)
    if err is not None:
        return "wrong", f"your exercise cell raised {err['ename']}: {err['evalue']}"
    err = _error_of(check_cell)
    if err is None:
        return "passed", ""
    if err["ename"] == "NotImplementedError" or "not written yet" in err["evalue"]:
        return "not attempted", "still the stub (raise NotImplementedError)"
    return "wrong", err["evalue"] if err["ename"] == "ExerciseError" else f"{err['ename']}: {err['evalue']}"


def check_notebook(path, *, quick: bool = False, timeout: int = 900, size: str = "tiny") -> dict:
    """Run a learner's copy of a chapter at ``size`` in a fresh kernel, the way nbval does (every cell, errors
    recorded, the run goes on), and report each exercise: passed / not attempted / wrong (the check's message).
    ``quick`` runs only the cells the checks need (``QUICK_TAGS``): seconds instead of the chapter's minute."""
    import ast
    import os
    import time

    import nbclient
    import nbformat

    from labkit.config import ENV_VAR
    from labkit.notebook import resolve, tags_of

    nb_path = resolve(path)
    nb = nbformat.read(nb_path, as_version=4)
    if quick:
        nb.cells = [c for c in nb.cells if c.cell_type == "code" and QUICK_TAGS & set(tags_of(c))]
    code = [c for c in nb.cells if c.cell_type == "code"]
    pairs = []
    for i, c in enumerate(code):
        if "exercise" in tags_of(c):
            check = next((d for d in code[i + 1:] if "check" in tags_of(d)), None)
            if check is not None:
                pairs.append((c, check))
    if not pairs:
        raise LookupError(f"{nb_path.name} has no exercise cells (tagged `exercise`, each followed by a `check`)")
    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = size                 # the kernel inherits it
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                                     resources={"metadata": {"path": str(nb_path.parent)}})
    t0 = time.perf_counter()
    stopped = ""
    try:
        client.execute()
    except Exception as e:  # a timeout or a dead kernel: what ran is still reported
        stopped = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old
    results = []
    for ex, ck in pairs:
        try:
            names = [n.name for n in ast.parse(ex.source).body
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        except SyntaxError:
            names = []
        status, message = _verdict(ex, ck)
        results.append({"exercise": ", ".join(names) or f"cell {code.index(ex)}", "status": status,
                        "message": message})
    in_pairs = {id(c) for pair in pairs for c in pair}
    failures = [{"cell": i, "error": f"{e['ename']}: {e['evalue']}"} for i, c in enumerate(code)
                if id(c) not in in_pairs and (e := _error_of(c)) is not None]
    return {"notebook": nb_path.name, "size": size, "quick": quick, "seconds": round(time.perf_counter() - t0, 1),
            "exercises": results, "other_failures": failures, "stopped": stopped}


def format_report(report: dict) -> str:
    scope = " (quick: the model, exercise and check cells only)" if report["quick"] else ""
    lines = [f"{report['notebook']} at the {report['size']} size{scope}, {report['seconds']:.0f} s:"]
    width = max(len(r["exercise"]) for r in report["exercises"])
    for i, r in enumerate(report["exercises"], 1):
        mark = {"passed": "✓", "not attempted": "·"}.get(r["status"], "✗")
        first, *rest = (r["message"] or "").splitlines() or [""]
        lines.append(f"  {mark} {i}. {r['exercise']:<{width}}  {r['status']}" + (f": {first}" if first else ""))
        lines += [f"{' ' * (width + 9)}{line}" for line in rest[:8]]
    for f in report["other_failures"]:
        lines.append(f"  ! code cell {f['cell']} (not an exercise) failed: {f['error'].splitlines()[0][:300]}")
    if report["stopped"]:
        lines.append(f"  ! the run stopped: {report['stopped']}")
    counts = {s: sum(r["status"] == s for r in report["exercises"]) for s in ("passed", "not attempted", "wrong", "not run")}
    lines.append(f"{len(report['exercises'])} exercises: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)
