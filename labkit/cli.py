"""The ``labkit`` command.

  labkit doctor                                   what this machine can run
  labkit run NOTEBOOK [--size tiny|full]          execute a chapter, write the executed copy
  labkit run NOTEBOOK --torchrun N [--strategy ddp|fsdp]
                                                  export the chapter as a script, run it on N processes
  labkit vram NOTEBOOK [--size full] [--budget-gb 12] [--world-size N --strategy ddp|fsdp] [--json]
                                                  estimate the chapter's training peak (per GPU); exit 0 if
                                                  it fits, 1 if it does not, 2 on an error
  labkit strip NOTEBOOK [-o OUT]                  learner copy: exercise solutions become stubs
  labkit check NOTEBOOK [--quick] [--json]        run your copy at the tiny size: each exercise passed /
                                                  not attempted / wrong (with the check's message); exit 0
                                                  only when every exercise passed
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from labkit.config import ENV_VAR, SIZES


def cmd_doctor(args) -> int:
    from labkit.device import doctor

    report = doctor()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(map(len, report))
        for k, v in report.items():
            print(f"{k:<{width}}  {v}")
    return 0


def cmd_run(args) -> int:
    import nbclient
    import nbformat

    from labkit.notebook import resolve

    path = resolve(args.notebook)
    if args.torchrun:
        return run_torchrun(path, args)
    out = Path(args.out) if args.out else Path("_build") / "runs" / f"{path.stem}.{args.size}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(path, as_version=4)
    os.environ[ENV_VAR] = args.size
    client = nbclient.NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    status = 0
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        print(f"{path.name}: a cell failed:\n{str(e)[-3000:]}", file=sys.stderr)
        status = 1
    finally:
        nbformat.write(nb, out)
    seconds = time.perf_counter() - t0
    print(json.dumps({"notebook": path.name, "size": args.size, "seconds": round(seconds, 1),
                      "ok": status == 0, "output": str(out)}))
    return status


def export_script(path: Path, out: Path) -> Path:
    """The notebook's code cells as one Python script (IPython magics and shell lines commented out)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    cells = ["\n".join(f"# {line}" if line.lstrip().startswith(("%", "!")) else line for line in c.source.splitlines())
             for c in nb.cells if c.cell_type == "code"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Exported from {path.name} by `labkit run --torchrun`: every rank runs all of it.\n"
                   "import matplotlib\nmatplotlib.use('Agg')\n\n" + "\n\n".join(cells) + "\n")
    return out


def run_torchrun(path: Path, args) -> int:
    """Export the chapter to a script and run it on ``--torchrun N`` processes of this machine; rank 0's output
    is shown. For several machines, run the printed script with torchrun's --nnodes / --rdzv-endpoint."""
    import subprocess

    script = export_script(path, Path(args.out) if args.out else Path("_build") / "runs" / f"{path.stem}.{args.size}.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.torchrun}",
           "--local-ranks-filter=0", str(script.resolve())]
    env = dict(os.environ, **{ENV_VAR: args.size}, **({"LABKIT_STRATEGY": args.strategy} if args.strategy else {}))
    print(f"exported {script}; running: LABKIT_STRATEGY={env.get('LABKIT_STRATEGY', 'ddp')} {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    status = subprocess.run(cmd, cwd=path.parent, env=env).returncode
    print(json.dumps({"notebook": path.name, "size": args.size, "processes": args.torchrun,
                      "seconds": round(time.perf_counter() - t0, 1), "ok": status == 0, "script": str(script)}))
    return 0 if status == 0 else 1


def cmd_vram(args) -> int:
    from labkit.notebook import load, resolve
    from labkit.vram import estimate

    path = resolve(args.notebook)
    os.environ[ENV_VAR] = args.size
    ns = load(path, ("model", "vram"))
    if "vram_job" not in ns:
        print(f"{path.name} has no `vram_job()` in a cell tagged `vram` (see CONTRIBUTING.md, 'Cell tags')", file=sys.stderr)
        return 2
    if args.world_size < 1:
        print(f"labkit vram: --world-size must be >= 1 (got {args.world_size})", file=sys.stderr)
        return 2
    strategy = args.strategy or ("ddp" if args.world_size > 1 else None)
    try:
        job = ns["vram_job"](args.job) if args.job else ns["vram_job"]()
        report = estimate(job, budget_gb=args.budget_gb, world_size=args.world_size, strategy=strategy)
    except Exception as e:  # a crash is not "does not fit": exit 2, so scripts can tell them apart
        print(f"labkit vram: estimating {path.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.fits else 1


def cmd_strip(args) -> int:
    from labkit.notebook import strip

    print(strip(args.notebook, args.out))
    return 0


def cmd_check(args) -> int:
    from labkit.check import check_notebook, format_report

    report = check_notebook(args.notebook, quick=args.quick, timeout=args.timeout)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if all(r["status"] == "passed" for r in report["exercises"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="what this machine can run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_doctor)
    p = sub.add_parser("run", help="execute a chapter notebook")
    p.add_argument("notebook")
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--out", help="where the executed notebook goes (default _build/runs/NAME.SIZE.ipynb)")
    p.add_argument("--timeout", type=int, default=900, help="per-cell timeout in seconds")
    p.add_argument("--torchrun", type=int, metavar="N", help="export the chapter as a script (to --out, default "
                   "_build/runs/NAME.SIZE.py) and run it on N processes with torchrun (see book/distributed)")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), help="with --torchrun: LABKIT_STRATEGY (default ddp)")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("vram", help="estimate a chapter's training peak memory")
    p.add_argument("notebook")
    p.add_argument("--size", choices=SIZES, default="full")
    p.add_argument("--budget-gb", type=float, default=12.0, help="the card's memory in GiB (default 12, an RTX 4070)")
    p.add_argument("--world-size", type=int, default=1, help="GPUs the run is spread over (under torchrun)")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), help="how it is spread (default ddp when --world-size > 1)")
    p.add_argument("--job", help="a chapter with several full configs: vram_job(JOB) (e.g. 10_unet's sd-256)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_vram)
    p = sub.add_parser("strip", help="write the learner copy without exercise solutions")
    p.add_argument("notebook")
    p.add_argument("-o", "--out")
    p.set_defaults(fn=cmd_strip)
    p = sub.add_parser("check", help="check the exercises of your copy of a chapter (runs it at the tiny size)")
    p.add_argument("notebook")
    p.add_argument("--quick", action="store_true", help="run only the model, exercise and check cells")
    p.add_argument("--timeout", type=int, default=900, help="per-cell timeout in seconds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_check)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, LookupError, ValueError) as e:
        print(f"labkit {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
