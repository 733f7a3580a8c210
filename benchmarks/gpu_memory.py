"""The real peak GPU memory of each chapter's full-size training step, against ``labkit.vram.estimate``.

For every chapter notebook with a `vram` cell: build the full config's job from the notebook
(``vram_job()`` -> ``labkit.vram.TrainJob``), cap this process at 12 GiB of the card
(``torch.cuda.set_per_process_memory_fraction``), and run a few real training steps on the GPU: model and batch
on CUDA, autocast with the job's dtype, and each step made of **two micro-batches** (forward + backward each,
gradients accumulating) then ``optimizer.step()`` -- the step that ``labkit.vram.estimate`` traces. Recorded:

* ``peak_allocated_gib`` / ``peak_reserved_gib``: ``torch.cuda.max_memory_allocated/reserved`` (tensors / what
  the caching allocator holds).
* ``cuda_context_gib``: what the device uses beyond torch's allocator (driver, kernels, cuBLAS workspaces),
  from ``cudaMemGetInfo`` after the steps (assumes no other process uses the GPU).
* ``measured_total_gib`` = reserved + context: what ``nvidia-smi`` would show at the peak, and what the estimate
  (which adds a CUDA-context and an allocator-overhead line) predicts. ``error_pct`` = estimate vs this.
* ``fits``: no out-of-memory error under the 12 GiB cap and ``measured_total_gib`` <= 12 (None if the step
  failed for another reason). An OOM is recorded, never a crash.
* ``step_s`` (median after a warm-up step) and ``items_per_s`` (tokens for integer batches, samples else).

Each chapter runs in its own process (a clean allocator and peak, and a crash stays contained), within one time
budget for the whole run (``--budget-s``, 540 s: one command within 10 minutes on any CUDA GPU).
Output: ``benchmarks/results/gpu_memory.json`` in the shape ``book/reality_check.md`` reads.

    python -m benchmarks gpu_memory                      # on a CUDA machine
    python -m benchmarks gpu_memory --device cpu --dry-run   # the same logic on a tiny job, on any machine
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/gpu_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import GiB, RESULTS_DIR, ROOT, chapters, load_notebook, read_json, write_json

BUDGET_GIB = 12.0
DRY_RUN = "@dry-run"  # the chapter name of the built-in tiny job

NO_CUDA = ("gpu_memory needs a CUDA GPU: it measures the real peak memory of each chapter's full-size training "
           "step. torch.cuda.is_available() is False here (torch {torch}). Without a GPU, the estimate is "
           "`labkit vram notebooks/NN_name.ipynb --size full`; to check this script's logic on a CPU, run "
           "`python -m benchmarks gpu_memory --device cpu --dry-run`.")


def dry_run_job():
    """A tiny job with the shape of a chapter's (an MLP regressor), to exercise the logic without a GPU."""
    import torch
    from torch import nn

    from labkit.vram import TrainJob

    return TrainJob(make_model=lambda: nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)),
                    make_batch=lambda: torch.randn(16, 64),
                    loss_fn=lambda model, x: (model(x) - x).square().mean(),
                    amp_dtype=torch.bfloat16, name="dry-run MLP 64-256-64")


# ------------------------------------------------------------------ one chapter (runs in its own process)
def items_in(batch) -> tuple[int, str]:
    """How many items one micro-batch holds: tokens if it carries an integer tensor of ids, else samples."""
    import torch
    from torch.utils._pytree import tree_flatten

    tensors = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
    ids = [t for t in tensors if not t.is_floating_point() and t.dim() >= 2]
    if ids:
        return ids[0].numel(), "tokens"
    return (tensors[0].shape[0] if tensors and tensors[0].dim() else 1), "samples"


def measure(job, device: str = "cuda", steps: int = 3, micro_batches: int = 2, budget_gib: float = BUDGET_GIB,
            deadline_s: float = 120.0) -> dict:
    """Run ``steps`` real training steps (after one warm-up step) of ``job`` on ``device``; peaks and speed."""
    import torch
    from torch.utils._pytree import tree_map_only

    t_start = time.perf_counter()
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda and dev.index is None:  # the memory-stat calls want an indexed device ("cuda:0"), not "cuda"
        dev = torch.device("cuda", torch.cuda.current_device())
    out = {"peak_allocated_gib": None, "peak_reserved_gib": None, "cuda_context_gib": None,
           "measured_total_gib": None, "step_s": None, "items_per_s": None, "item": None, "steps_done": 0,
           "micro_batches": micro_batches, "fits": None, "error": None}
    if cuda:
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GiB / total), dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        out["device_total_gib"] = total / GiB
        out["device"] = torch.cuda.get_device_name(dev)
    oom = False
    times = []
    try:
        with torch.device(dev):
            model = job.make_model()
        model = model.to(dev).train()
        make_opt = job.make_optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        optimizer = make_opt(model.parameters())
        batch = tree_map_only(torch.Tensor, lambda t: t.to(dev), job.make_batch())
        n_items, out["item"] = items_in(batch)
        for i in range(steps + 1):  # step 0 is the warm-up (kernel selection, optimizer state)
            t0 = time.perf_counter()
            for _ in range(micro_batches):
                with torch.autocast(dev.type, dtype=job.amp_dtype, enabled=job.amp_dtype is not None):
                    loss = job.loss_fn(model, batch)
                loss.backward()
                del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(dev)
            if i > 0:
                times.append(time.perf_counter() - t0)
                out["steps_done"] = i
            if time.perf_counter() - t_start > deadline_s and i > 0:
                out["note"] = f"stopped after {i} timed steps: the chapter's time slot ({deadline_s:.0f} s) ran out"
                break
    except torch.cuda.OutOfMemoryError as e:  # a subclass of RuntimeError: catch it first
        oom = True
        out["error"] = f"out of memory under the {budget_gib:g} GiB cap: {str(e).splitlines()[0][:300]}"
    except Exception as e:  # recorded, not raised: one chapter's failure must not hide the others
        out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    if times:
        out["step_s"] = statistics.median(times)
        out["items_per_s"] = n_items * micro_batches / out["step_s"]
    if cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / GiB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / GiB
        free, total = torch.cuda.mem_get_info(dev)
        context = max(0, (total - free) - torch.cuda.memory_reserved(dev))
        out["cuda_context_gib"] = context / GiB
        out["measured_total_gib"] = out["peak_reserved_gib"] + out["cuda_context_gib"]
        if out["error"] is None:
            out["fits"] = out["measured_total_gib"] <= budget_gib
    if oom:
        out["fits"] = False
    return out


def chapter_result(nb: str, device: str, size: str, steps: int, micro_batches: int, budget_gib: float,
                   deadline_s: float, job_name: str | None = None) -> dict:
    """Everything about one chapter: the estimate, the measurement, and the error between them."""
    os.environ["LABKIT_SIZE"] = size
    from labkit.vram import estimate

    t0 = time.perf_counter()
    if nb == DRY_RUN:
        job = dry_run_job()
    else:
        ns = load_notebook(nb, ("model", "vram"))
        if "vram_job" not in ns:
            return {"error": "no vram_job() in a cell tagged `vram`", "fits": None}
        job = ns["vram_job"](job_name) if job_name else ns["vram_job"]()
    result = {"name": job.name, "amp_dtype": str(job.amp_dtype).removeprefix("torch.") if job.amp_dtype else None,
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}  # as this worker's allocator saw it
    try:
        report = estimate(job, budget_gb=budget_gib)
        result["estimate_gib"] = report.peak_bytes / GiB
        result["estimate_breakdown_gib"] = {k: v / GiB for k, v in report.breakdown.items()}
        result["estimate_s"] = time.perf_counter() - t0
    except Exception as e:
        result["estimate_gib"] = None
        result["estimate_error"] = f"{type(e).__name__}: {str(e)[:500]}"
    remaining = deadline_s - (time.perf_counter() - t0)
    result.update(measure(job, device, steps, micro_batches, budget_gib, deadline_s=max(10.0, remaining - 5)))
    est, real = result.get("estimate_gib"), result.get("measured_total_gib")
    result["error_pct"] = 100 * (est - real) / real if est is not None and real else None
    return result


# ------------------------------------------------------------------ the whole run
def _worker_cmd(nb: str, args, result_file: Path, deadline_s: float, job: str | None = None) -> list[str]:
    return [sys.executable, "-m", "benchmarks.gpu_memory", "--worker", nb, "--result-file", str(result_file),
            "--device", args.device, "--size", args.size, "--steps", str(args.steps),
            "--micro-batches", str(args.micro_batches), "--budget-gib", str(args.budget_gib),
            "--deadline-s", str(deadline_s), *(["--job-name", job] if job else [])]


def job_specs(specs: list[str], notebooks_dir) -> list[tuple[str, str]]:
    """``--job NB=NAME`` -> [(notebook path, NAME)]: a chapter's further full config, ``vram_job(NAME)``."""
    out = []
    for spec in specs:
        stem, sep, name = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"--job {spec!r}: write it as CHAPTER=NAME, e.g. --job 10_unet=sd-256")
        out += [(str(nb), name) for nb in chapters(notebooks_dir, [stem])]
    return out


def run_all(args) -> dict:
    import torch

    if args.dry_run:
        names = [DRY_RUN]
    else:
        import labkit.notebook

        names = [str(nb) for nb in chapters(args.notebooks_dir, args.only) if labkit.notebook.cells(nb, "vram")]
    # The device's name comes from the workers: CUDA is never initialised in this process, whose context would
    # otherwise sit on the GPU and be counted in the workers' measurement.
    device_name = "cuda (no chapter measured)" if args.device == "cuda" else "cpu (dry logic check: no memory peaks)"
    results = {"device": device_name, "torch": torch.__version__, "budget_gib": args.budget_gib, "size": args.size,
               "steps": args.steps, "micro_batches": args.micro_batches, "chapters": {}}
    if not names:
        print("no chapter notebook has a `vram` cell yet", file=sys.stderr)
    t_start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if args.expandable_segments:  # the allocator grows segments in place instead of caching blocks of many sizes
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    results["alloc_conf"] = env.get("PYTORCH_CUDA_ALLOC_CONF", "")
    # A chapter's further full configs (--job NB=NAME) go under "jobs" as "NB:NAME", so that readers of
    # "chapters" (the README table, the reality-check page, the chapters themselves) see one entry per chapter.
    runs = [(nb, None) for nb in names] + job_specs(args.job, args.notebooks_dir)
    if args.job:
        results["jobs"] = {}
    for i, (nb, job) in enumerate(runs):
        stem = Path(nb).stem if nb != DRY_RUN else "dry_run"
        where, key = (results["chapters"], stem) if job is None else (results["jobs"], f"{stem}:{job}")
        left = args.budget_s - (time.perf_counter() - t_start)
        slot = left / (len(runs) - i)  # a fair share of what is left
        if slot < 20:
            where[key] = {"error": f"skipped: the {args.budget_s:.0f} s budget ran out", "fits": None}
            continue
        print(f"{key}: estimate + {args.steps} steps on {args.device} (slot {slot:.0f} s) ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result_file = Path(tmp) / "result.json"
            try:
                proc = subprocess.run(_worker_cmd(nb, args, result_file, slot - 5, job), cwd=ROOT, env=env,
                                      capture_output=True, text=True, timeout=slot)
                if result_file.exists():
                    r = json.loads(result_file.read_text())
                else:
                    r = {"error": f"worker exited {proc.returncode}: {proc.stderr.strip()[-800:]}", "fits": None}
            except subprocess.TimeoutExpired:
                r = {"error": f"killed after its {slot:.0f} s slot", "fits": None}
        for field in ("peak_reserved_gib", "peak_allocated_gib", "estimate_gib", "error_pct", "step_s", "fits", "error"):
            r.setdefault(field, None)
        if r.get("device"):
            results["device"] = r["device"]
        where[key] = r
        print("  " + summary_line(r), flush=True)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    return results


def _g(x, fmt="{:.2f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "—"


def summary_line(r: dict) -> str:
    line = (f"estimate {_g(r.get('estimate_gib'))} GiB, measured {_g(r.get('measured_total_gib'))} GiB "
            f"(reserved {_g(r.get('peak_reserved_gib'))}, allocated {_g(r.get('peak_allocated_gib'))}, "
            f"context {_g(r.get('cuda_context_gib'))}), error {_g(r.get('error_pct'), '{:+.0f}')} %, "
            f"step {_g(r.get('step_s'), '{:.3f}')} s, {_g(r.get('items_per_s'), '{:,.0f}')} {r.get('item') or 'items'}/s, "
            f"fits: {r.get('fits')}")
    return line + (f"\n  error: {r['error']}" if r.get("error") else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dry-run", action="store_true", help="a built-in tiny job instead of the chapters")
    p.add_argument("--size", default="full", choices=("full", "tiny"), help="the size vram_job() is built at")
    p.add_argument("--only", action="append", default=[], metavar="NB", help="only these chapters")
    p.add_argument("--notebooks-dir", type=Path, default=None)
    p.add_argument("--job", action="append", default=[], metavar="NB=NAME",
                   help="also measure a chapter's further full config, vram_job(NAME) (e.g. 10_unet=sd-256)")
    p.add_argument("--job-name", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step (the estimate traces 2)")
    p.add_argument("--budget-gib", type=float, default=BUDGET_GIB, help="the memory cap, GiB (an RTX 4070: 12)")
    p.add_argument("--budget-s", type=float, default=540, help="wall-clock budget for all chapters")
    p.add_argument("--expandable-segments", action="store_true",
                   help="run the steps with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (less allocator slack)")
    p.add_argument("--out", type=Path, default=None,
                   help="default benchmarks/results/gpu_memory.json (a dry run prints instead, unless given)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline-s", type=float, default=120.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__), file=sys.stderr)
        return 2
    if args.worker:
        r = chapter_result(args.worker, args.device, args.size, args.steps, args.micro_batches, args.budget_gib,
                           args.deadline_s, job_name=args.job_name)
        write_json(args.result_file, r)
        return 0
    only = [s for item in args.only for s in item.split(",") if s]
    args.only = only
    results = run_all(args)
    out = args.out or (None if args.dry_run else RESULTS_DIR / "gpu_memory.json")
    if out is None:
        print(json.dumps(results, indent=2, default=str))
    else:
        if only and out.exists():  # --only merges into earlier results of the same device
            earlier = read_json(out)
            if earlier.get("device") == results["device"]:
                results["chapters"] = {**earlier.get("chapters", {}), **results["chapters"]}
                if earlier.get("jobs") or results.get("jobs"):
                    results["jobs"] = {**earlier.get("jobs", {}), **results.get("jobs", {})}
        write_json(out, results)
        print(f"wrote {out}")
    print(f"{'chapter':<20}{'estimate':>10}{'measured':>10}{'error':>8}  fits")
    for stem, r in {**results["chapters"], **results.get("jobs", {})}.items():
        print(f"{stem:<20}{_g(r.get('estimate_gib')):>10}{_g(r.get('measured_total_gib')):>10}"
              f"{_g(r.get('error_pct'), '{:+.0f}%'):>8}  {r.get('fits')}")
    failed = [k for k, r in {**results["chapters"], **results.get("jobs", {})}.items()
              if r.get("error") and r.get("fits") is not False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
