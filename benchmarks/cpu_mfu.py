"""How close the tiny GPT training step comes to this CPU's matmul limit (model FLOP utilisation, MFU).

In one run (so both figures see the same machine load):

1. **Roofline**: the best FLOP/s of large square GEMMs (``--gemm-n``, 2048 by default: 2·n³ FLOPs each), in
   float32 and in bfloat16, best of a few. This is the practical ceiling of this CPU for dense math.
2. **The training step** of nanoGPT's CPU recipe shape: 4 layers, 4 heads, 128 dims, block 64, batch 12,
   vocabulary 96, dropout 0, bias off, AdamW, gradient clipping at 1.0. The model is loaded from the chapter
   notebook (``02_nanogpt``, else ``01_mingpt``; ``--notebook`` to choose), never copied. Timed in float32 and
   under bfloat16 autocast: median step time over ``--iters`` steps after a warm-up.
3. **FLOPs per step**: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward. It counts every
   matmul, but not CPU's fused attention kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its
   backward), so those two are counted by formula from their real shapes (torch's SDPA forward formula):
   forward 4·B·T²·C (QKᵀ and PV), backward twice that (so ×3 in all; the kernel's recomputation of QKᵀ in
   backward is hardware work, not model FLOPs, and is left out). The count is *dense*: the causal mask's
   zero half is counted, as it is for attention written with explicit matmuls; the causal-halved total is
   reported beside it. The optimizer's element-wise work is not counted (conventional MFU).
4. **MFU** = counted FLOPs / step time / roofline, against the fp32 and the bf16 roofline.
5. **What limits it**: the time split of a step (forward / backward / clip + optimizer), and torch.profiler's
   top operators by self time, grouped into GEMM (mm, addmm, bmm, attention kernels) and everything else; the
   GEMM rate *inside* the step shows how much slower these small matrices (768 x 128 x 384 ...) run than 2048³.

Target: MFU >= 40 % of the matching roofline at this shape. Writes ``benchmarks/results/cpu_mfu.json``.

    python -m benchmarks cpu_mfu            (about a minute)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/cpu_mfu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks._common import RESULTS_DIR, load_notebook, machine_info, write_json

TARGET_MFU = 0.40
# nanoGPT's CPU recipe (README: block 64, batch 12, 4 layers, 4 heads, 128 dims, dropout 0; bias off by default)
RECIPE = dict(vocab_size=96, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False, batch_size=12)
CANDIDATES = ("02_nanogpt", "01_mingpt")  # the nanoGPT chapter first; minGPT while it does not exist
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::mkldnn_matmul")


# ------------------------------------------------------------------ the roofline
def gemm_flops(n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5) -> dict:
    """Best FLOP/s of an n x n x n matmul (2·n³ FLOPs) over ``repeats`` timed calls after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up (oneDNN/MKL pick their kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "best_s": min(times),
            "median_s": statistics.median(times), "flops_per_s": flops / min(times)}


# ------------------------------------------------------------------ the model and its step
def load_gpt(notebook: str | None = None):
    """(GPT class, GPTConfig class, notebook name) from the chapter notebook's `model` cells."""
    import labkit.notebook

    names = [notebook] if notebook else list(CANDIDATES)
    for name in names:
        try:
            path = labkit.notebook.resolve(name)
        except FileNotFoundError:
            continue
        ns = load_notebook(path, ("model",))
        if "GPT" not in ns or "GPTConfig" not in ns:
            raise SystemExit(f"{path.name}'s `model` cells define no GPT / GPTConfig")
        return ns["GPT"], ns["GPTConfig"], path.stem
    raise SystemExit(f"cpu_mfu: none of {', '.join(names)} exists yet in notebooks/: the training step comes from "
                     "the GPT chapter (pass --notebook PATH to use another notebook defining GPT and GPTConfig)")


def build(GPT, GPTConfig, shape: dict = RECIPE, seed: int = 1337):
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in shape.items() if k != "batch_size"}
    try:
        config = GPTConfig(**kwargs)
    except TypeError:  # a config without a `bias` switch
        config = GPTConfig(**{k: v for k, v in kwargs.items() if k != "bias"})
    model = GPT(config)
    model.train()
    return model, config


def make_optimizer(model):
    """nanoGPT's recipe optimizer: AdamW(lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on matrices)."""
    if hasattr(model, "configure_optimizers"):
        try:
            return model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu"), "model.configure_optimizers"
        except TypeError:
            pass
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), "torch AdamW"


def batches(shape: dict = RECIPE, n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = (shape["batch_size"], shape["block_size"])
    return [(torch.randint(0, shape["vocab_size"], size, generator=g),
             torch.randint(0, shape["vocab_size"], size, generator=g)) for _ in range(n)]


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def train_step(model, optimizer, x, y, bf16: bool = False, clock: list | None = None):
    """One step of the recipe; appends (forward, backward, optimizer) seconds to ``clock`` if given."""
    t0 = time.perf_counter()
    with _autocast(bf16):
        _, loss = model(x, y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if clock is not None:
        clock.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    return loss


# ------------------------------------------------------------------ counting FLOPs
def _sdpa_cpu_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # Model FLOPs: the four backward matmuls (dV, dP, dQ, dK) = 2x forward. torch's own backward formula also
    # counts the kernel's recomputation of QK^T (2.5x): hardware FLOPs, which MFU leaves out.
    from torch.utils.flop_counter import sdpa_flop_count

    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode looks formulas up by operator packet (``func._overloadpacket``), not by overload.
ATTENTION_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


def count_flops(model, x, y, bf16: bool = False) -> dict:
    """FLOPs of one forward + backward, per operator; CPU fused attention counted by formula (dense)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS)
    with counter:
        with _autocast(bf16):
            _, loss = model(x, y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in per_op.items() if "scaled_dot_product" in op)
    total = int(counter.get_total_flops())
    return {"total": total, "per_op": per_op, "attention_by_formula": attention,
            "total_causal_halved": total - attention // 2}


# ------------------------------------------------------------------ what limits it
def profile_step(model, optimizer, data, bf16: bool, steps: int = 8, top: int = 40) -> dict:
    """Self CPU time per operator over ``steps`` steps: GEMM share and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    for x, y in data[:2]:
        train_step(model, optimizer, x, y, bf16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            x, y = data[i % len(data)]
            train_step(model, optimizer, x, y, bf16)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    gemm_us = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "steps": steps,
        "self_time_per_step_ms": total_us / steps / 1e3,
        "gemm_share": gemm_us / total_us if total_us else 0.0,
        "gemm_time_per_step_ms": gemm_us / steps / 1e3,
        "top_ops": [{"op": e.key, "share": e.self_cpu_time_total / total_us, "calls_per_step": e.count / steps,
                     "ms_per_step": e.self_cpu_time_total / steps / 1e3} for e in events[:top]],
    }


# ------------------------------------------------------------------ the measurement
def time_steps(model, optimizer, data, bf16: bool, warmup: int, iters: int) -> dict:
    for i in range(warmup):
        x, y = data[i % len(data)]
        train_step(model, optimizer, x, y, bf16)
    clock, totals = [], []
    for i in range(iters):
        x, y = data[i % len(data)]
        t0 = time.perf_counter()
        train_step(model, optimizer, x, y, bf16, clock)
        totals.append(time.perf_counter() - t0)
    med = statistics.median(totals)
    phases = [statistics.median(c[k] for c in clock) for k in range(3)]
    return {"median_step_s": med, "best_step_s": min(totals), "mean_step_s": statistics.fmean(totals),
            "phase_median_s": dict(zip(("forward", "backward", "clip_and_optimizer"), phases)),
            "tokens_per_s": data[0][0].numel() / med}


def run(notebook: str | None = None, gemm_n: int = 2048, gemm_repeats: int = 5, warmup: int = 5, iters: int = 40,
        profile_steps: int = 8, precisions=("fp32", "bf16"), shape: dict = RECIPE) -> dict:
    GPT, GPTConfig, source = load_gpt(notebook)
    result = {"machine": machine_info(), "model_source": source, "recipe": dict(shape),
              "is_nanogpt_cpu_recipe": dict(shape) == RECIPE,
              "target_mfu": TARGET_MFU}
    print(f"roofline: {gemm_n}³ GEMMs, best of {gemm_repeats} (measured again at the end; the best is kept) ...",
          flush=True)
    roof = {"fp32": gemm_flops(gemm_n, torch.float32, gemm_repeats),
            "bf16": gemm_flops(gemm_n, torch.bfloat16, gemm_repeats)}
    result["roofline"] = roof
    for k, r in roof.items():
        print(f"  {k}: {r['flops_per_s'] / 1e9:7.1f} GFLOP/s  (best {r['best_s'] * 1e3:.1f} ms)")

    model, config = build(GPT, GPTConfig, shape)
    optimizer, opt_name = make_optimizer(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = sum(1 for p in model.parameters())
    result.update(params=n_params, param_tensors=n_tensors, optimizer=opt_name, config=repr(config))
    data = batches(shape)
    flops = count_flops(model, *data[0])
    result["flops_per_step"] = flops
    print(f"model from {source}: {n_params / 1e6:.2f}M parameters, {flops['total'] / 1e9:.2f} GFLOP per step "
          f"(of which attention by formula {flops['attention_by_formula'] / 1e9:.2f}; "
          f"causal-halved total {flops['total_causal_halved'] / 1e9:.2f})", flush=True)

    result["runs"] = {}
    for prec in precisions:
        bf16 = prec.startswith("bf16")
        model, _ = build(GPT, GPTConfig, shape)  # the same start for each precision
        optimizer, _ = make_optimizer(model)
        if prec.endswith("+compile"):  # inductor fuses the element-wise work (GELU, LayerNorm, adds) into C++ loops
            print(f"compiling the model for {prec} (tens of seconds, once) ...", flush=True)
            model = torch.compile(model)
        print(f"timing the training step, {prec}{' autocast' if bf16 else ''}: {warmup} warm-up + {iters} steps ...",
              flush=True)
        timing = time_steps(model, optimizer, data, bf16, warmup, iters)
        result["runs"][prec] = {**timing, "profile": profile_step(model, optimizer, data, bf16, profile_steps)}

    print("roofline again ...", flush=True)
    for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        again = gemm_flops(gemm_n, dtype, gemm_repeats)
        roof[prec]["flops_per_s_first"] = roof[prec]["flops_per_s"]
        roof[prec]["flops_per_s_again"] = again["flops_per_s"]
        roof[prec]["flops_per_s"] = max(roof[prec]["flops_per_s"], again["flops_per_s"])
        print(f"  {prec}: {again['flops_per_s'] / 1e9:7.1f} GFLOP/s -> roofline {roof[prec]['flops_per_s'] / 1e9:.1f}")

    for prec, r in result["runs"].items():
        roof_key = prec.removesuffix("+compile")
        own = roof[roof_key]["flops_per_s"]
        achieved = flops["total"] / r["median_step_s"]
        gemm_s = r["profile"]["gemm_time_per_step_ms"] / 1e3
        r.update({
            "param_tensors": n_tensors,
            "achieved_flops_per_s": achieved,
            "mfu_vs_fp32_roofline": achieved / roof["fp32"]["flops_per_s"],
            "mfu_vs_bf16_roofline": achieved / roof["bf16"]["flops_per_s"],
            "mfu_vs_own_roofline": achieved / own,
            "mfu_best_step_vs_own_roofline": flops["total"] / r["best_step_s"] / own,
            "mfu_causal_halved_vs_own_roofline": flops["total_causal_halved"] / r["median_step_s"] / own,
            # FlopCounterMode counts only matmuls and attention: all counted FLOPs run in GEMM-like kernels
            "gemm_flops_per_s_inside_step": flops["total"] / gemm_s if gemm_s else None,
        })
        r["diagnosis"] = diagnose(roof_key, r, roof, shape)
        report_run(roof_key, r, roof, label=prec)
    return result


def diagnose(prec: str, r: dict, roof: dict, shape: dict = RECIPE) -> list[str]:
    """Plain-words reading of the profile: MFU ~ (GEMM share of the step) x (GEMM speed at these shapes)."""
    p = r["profile"]
    own = roof[prec]["flops_per_s"]
    lines = []
    share = p["gemm_share"]
    inside = r["gemm_flops_per_s_inside_step"]
    if inside:
        lines.append(f"MFU ~ GEMM share of the step x GEMM speed at the step's shapes / roofline = "
                     f"{share:.0%} x {inside / own:.0%} = {share * inside / own:.0%} (profiled steps, with profiler "
                     f"overhead) vs {r['mfu_vs_own_roofline']:.0%} measured")
    ops = {o["op"]: o["share"] for o in p["top_ops"]}
    groups = {
        "layer norm": sum(v for k, v in ops.items() if "layer_norm" in k),
        "GELU": sum(v for k, v in ops.items() if "gelu" in k),
        "element-wise adds/muls (residuals, AdamW's per-tensor updates)":
            sum(v for k, v in ops.items() if k in ("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::addcmul_",
                                                   "aten::addcdiv_", "aten::lerp_", "aten::div", "aten::sqrt", "aten::div_")),
        "dtype casts (autocast copies weights to bf16 on every use)" if prec == "bf16" else "copies":
            sum(v for k, v in ops.items() if k in ("aten::copy_", "aten::_to_copy")),
        "softmax / cross-entropy": sum(v for k, v in ops.items() if "softmax" in k or "nll" in k),
        "concatenation / fills": sum(v for k, v in ops.items() if k in ("aten::cat", "aten::fill_", "aten::zero_")),
    }
    top = sorted(((v, k) for k, v in groups.items() if v >= 0.03), reverse=True)
    if top:
        lines.append(f"non-GEMM time ({1 - share:.0%} of the step): " + ", ".join(f"{k} {v:.0%}" for v, k in top))
    ph = r["phase_median_s"]
    lines.append(f"clip + AdamW take {ph['clip_and_optimizer'] / r['median_step_s']:.0%} of the step and count no FLOPs "
                 f"(element-wise, memory-bound updates of {r.get('param_tensors', '?')} parameter tensors; on a CPU even "
                 f"the foreach path loops over them one by one)")
    if inside and inside / own < 0.6:
        lines.append(f"the GEMMs are small ((B*T={shape['batch_size'] * shape['block_size']}) x {shape['n_embd']} x "
                     f"{3 * shape['n_embd']}..{4 * shape['n_embd']}): they reach {inside / own:.0%} of the "
                     f"{roof[prec]['n']}^3 rate; per-call overhead and little reuse per byte dominate")
    return lines


def report_run(prec: str, r: dict, roof: dict, label: str | None = None) -> None:
    ph = r["phase_median_s"]
    step_ms = r["median_step_s"] * 1e3
    print(f"  {label or prec}: {step_ms:.1f} ms/step median (best {r['best_step_s'] * 1e3:.1f}), {r['tokens_per_s']:,.0f} tok/s, "
          f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(f"     MFU {r['mfu_vs_fp32_roofline']:.0%} of the fp32 roofline, {r['mfu_vs_bf16_roofline']:.0%} of bf16"
          f"  -> vs its own ({prec}) roofline {r['mfu_vs_own_roofline']:.0%} "
          f"[target {TARGET_MFU:.0%}: {'met' if r['mfu_vs_own_roofline'] >= TARGET_MFU else 'NOT met'}]; "
          f"from the best step {r['mfu_best_step_vs_own_roofline']:.0%}, causal-halved count "
          f"{r['mfu_causal_halved_vs_own_roofline']:.0%}")
    print(f"     step split: forward {ph['forward'] * 1e3:.1f} ms, backward {ph['backward'] * 1e3:.1f} ms, "
          f"clip + AdamW {ph['clip_and_optimizer'] * 1e3:.1f} ms")
    p = r["profile"]
    inside = r["gemm_flops_per_s_inside_step"]
    print(f"     profiler: GEMM/attention kernels take {p['gemm_share']:.0%} of the step's self time"
          + (f"; inside the step they run at {inside / 1e9:.0f} GFLOP/s = "
             f"{inside / roof[prec]['flops_per_s']:.0%} of the {roof[prec]['n']}³ {prec} GEMM" if inside else ""))
    print("     top operators by self time:")
    for op in p["top_ops"][:8]:
        print(f"       {op['share']:6.1%}  {op['ms_per_step']:6.2f} ms/step  {op['calls_per_step']:5.0f} calls  {op['op']}")
    print("     what limits it:")
    for line in r["diagnosis"]:
        print(f"       - {line}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks cpu_mfu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--notebook", help="notebook defining GPT and GPTConfig (default: 02_nanogpt, else 01_mingpt)")
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument("--gemm-repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    p.add_argument("--compile", action="store_true",
                   help="also time the fp32 step under torch.compile (inductor; ~20-50 s to compile on 2 cores)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                   help=f"change the shape (an experiment, no longer the recipe): keys {', '.join(RECIPE)}")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "cpu_mfu.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    if args.compile:
        precisions += tuple(f"{p}+compile" for p in precisions)
    shape = dict(RECIPE)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in RECIPE:
            p.error(f"--set {item}: unknown key {key!r} (keys: {', '.join(RECIPE)})")
        shape[key] = type(RECIPE[key])(float(value) if key == "dropout" else int(value))
    result = run(args.notebook, args.gemm_n, args.gemm_repeats, args.warmup, args.iters, args.profile_steps,
                 precisions, shape)
    result["machine"]["loadavg_1min_after"] = round(__import__("os").getloadavg()[0], 2)
    write_json(args.out, result)
    print(f"wrote {args.out}  (machine load avg {result['machine'].get('loadavg_1min')} -> "
          f"{result['machine']['loadavg_1min_after']} on {result['machine']['cores']} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
