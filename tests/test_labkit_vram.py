"""labkit.vram: the CPU estimate of a training step's GPU memory, checked against counts made by hand.

All on CPU and fake tensors: nothing here allocates the memory it measures.
"""
import contextlib
import json
import math
import re
import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

from labkit import vram  # noqa: E402
from labkit.vram import GiB, TrainJob, VramReport, cuda_peak, estimate, reset_cuda_peak  # noqa: E402

MiB = 1024**2


def show(report, **analytic):
    print(report)
    for key, value in analytic.items():
        print(f"  analytic {key:<12} {value:>14,d} B   estimate {report.breakdown[key]:>14,d} B")


# ---------------------------------------------------------------- a stack of Linear layers, by hand
N, D, L = 4096, 1024, 4  # 4096 rows of 1024 features through 4 x Linear(1024, 1024), fp32
P = L * (D * D + D)  # parameters
UNIT = N * D * 4  # one (N, D) fp32 tensor: 16 MiB


def linear_job(rows=N, **kw):
    return TrainJob(make_model=lambda: nn.Sequential(*[nn.Linear(D, D) for _ in range(L)]),
                    make_batch=lambda: (torch.randn(rows, D), torch.randn(rows, D)),
                    loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]), amp_dtype=None, name="4 x Linear", **kw)


def test_linear_stack_matches_the_analytic_counts():
    report = estimate(linear_job())
    b = report.breakdown
    # AdamW keeps exp_avg and exp_avg_sq (fp32, like the parameter) and a 0-dim fp32 step counter per tensor
    analytic = dict(params=4 * P, grads=4 * P, optimizer=8 * P + 4 * 2 * L,
                    # the peak is in the backward of the last layer of the 2nd micro-batch: still saved are
                    # the inputs of the 4 layers (x, h1, h2, h3) and the target that mse_loss keeps
                    activations=5 * UNIT,
                    # ... and alive: the gradient arriving at the last layer, the one it sends back, and
                    # the layer's weight and bias gradients before they are added into .grad
                    temporaries=2 * UNIT + 4 * (D * D + D))
    show(report, **analytic)
    for key in ("params", "grads", "optimizer", "temporaries"):
        assert b[key] == analytic[key], key
    # activations: the saved inputs exactly, plus a few bytes of scalar losses (tolerance 0.01 %)
    assert analytic["activations"] <= b["activations"] <= analytic["activations"] * 1.0001
    assert b["buffers"] == 0
    traced = sum(b[k] for k in vram.CATEGORIES[:6])
    assert b["cuda_context"] == vram.CUDA_CONTEXT_BYTES
    assert b["allocator_overhead"] == int(vram.ALLOCATOR_OVERHEAD * traced)
    assert list(b) == list(vram.CATEGORIES)
    assert report.peak_bytes == sum(b.values())
    assert report.budget_bytes == 12 * GiB  # "12 GB" is read as 12 GiB
    assert report.name == "4 x Linear"


def test_optimizer_step_is_traced_as_cuda_runs_it():
    # With one row the peak is the optimizer step. On CUDA torch's default AdamW is the multi-tensor
    # ("foreach") one, whose step makes a temporary as large as all parameters (sqrt of exp_avg_sq).
    report = estimate(linear_job(rows=1))
    show(report, optimizer=12 * P + 4 * 2 * L)
    assert report.breakdown["optimizer"] == 12 * P + 4 * 2 * L
    # an optimizer that asks for the per-tensor loop keeps it: temporaries of one or two weights only
    loop = estimate(linear_job(rows=1, make_optimizer=lambda p: torch.optim.AdamW(p, foreach=False)))
    assert 8 * P < loop.breakdown["optimizer"] <= 8 * P + 4 * 2 * L + 2 * 4 * (D * D + D)


def test_frozen_parameters_have_no_gradient_and_no_optimizer_state():
    def half_frozen():  # as LoRA's base weights: trained layer after a frozen one
        model = nn.Sequential(nn.Linear(D, D), nn.Linear(D, D))
        model[0].requires_grad_(False)
        return model

    job = linear_job()
    job.make_model = half_frozen  # the default AdamW is handed all parameters, frozen ones too
    report = estimate(job)
    layer = D * D + D
    show(report, params=2 * 4 * layer, grads=4 * layer, optimizer=8 * layer + 4 * 2)
    b = report.breakdown
    assert (b["params"], b["grads"], b["optimizer"]) == (2 * 4 * layer, 4 * layer, 8 * layer + 4 * 2)


def test_estimate_works_under_no_grad_and_leaves_it_off():
    with torch.no_grad():
        report = estimate(linear_job())
        assert not torch.is_grad_enabled()
    assert report.breakdown["grads"] == 4 * P


# ---------------------------------------------------------------- GPT-2 124M, nanoGPT style
class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).split(d, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, s, d))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab=50257, ctx=1024, layers=12, d=768, heads=12):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt_loss(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def test_gpt2_124m_batch_12x1024_bf16():
    B, S, V, Lyr, d, H = 12, 1024, 50257, 12, 768, 12
    job = TrainJob(make_model=GPT, make_batch=lambda: (torch.randint(0, V, (B, S)), torch.randint(0, V, (B, S))),
                   loss_fn=gpt_loss, name="GPT-2 124M, micro-batch 12 x 1024", notes="bf16 autocast, AdamW")
    t0 = time.perf_counter()
    report = estimate(job)
    seconds = time.perf_counter() - t0
    b, sbh, tokens = report.breakdown, B * S * d, B * S
    n_params = 124_439_808  # GPT-2 small with lm_head tied to wte: the embedding counted once
    with torch.device("meta"):
        n_tensors = sum(1 for _ in GPT().parameters())  # AdamW keeps a step counter for each
    per_layer = (36 * sbh  # bytes per (token x channel): fp32 into both LayerNorms (4 + 4), bf16 casts
                 #   of their outputs for qkv and fc (2 + 2), q, k, v (6), attention output = proj input
                 #   (2), fc output = GELU input (8), GELU output (8)
                 + 2 * 8 * tokens  # LayerNorm mean and rstd, fp32
                 + 4 * B * H * S  # the attention kernel's fp32 log-sum-exp
                 + 2 * 12 * d * d)  # bf16 copies of the weights that autocast made and matmul saved
    analytic_act = (Lyr * per_layer + 6 * sbh + 8 * tokens  # fp32 ln_f input, bf16 head input, ln_f stats
                    + 2 * V * d  # bf16 copy of the tied head weight
                    + 4 * tokens * V  # fp32 log-probabilities kept by cross-entropy
                    + 2 * 8 * tokens + 8 * S)  # token ids, targets, positions (int64)
    show(report, params=4 * n_params, optimizer=8 * n_params + 4 * n_tensors, activations=analytic_act,
         temporaries=2 * 4 * tokens * V)
    print(f"  estimated in {seconds:.1f} s")
    assert b["params"] == b["grads"] == 4 * n_params  # 0.46 GiB, not 0.61 (to_empty unties wte/lm_head)
    assert b["optimizer"] == 8 * n_params + 4 * n_tensors
    # exact up to the scalar losses (tolerance 0.01 %); no s x s term: a flash-like attention kernel
    assert abs(b["activations"] / analytic_act - 1) < 1e-4
    # the peak is in cross-entropy's backward: the gradient of nll_loss and of log_softmax, both fp32
    assert b["temporaries"] == 2 * 4 * tokens * V
    assert 14 * GiB < report.peak_bytes < 15 * GiB and not report.fits
    assert "bf16 autocast" in str(report)


# ---------------------------------------------------------------- where CPU and CUDA differ
class DropoutAttention(nn.Module):
    def __init__(self, d=256, heads=4):
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(d, 3 * d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).split(d, 2))
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)


def test_attention_is_traced_as_the_fused_cuda_kernel(monkeypatch):
    b, s, heads = 2, 1024, 4
    job = TrainJob(make_model=DropoutAttention, make_batch=lambda: torch.randn(b, s, 256),
                   loss_fn=lambda m, x: m(x).float().square().mean())
    scores = b * heads * s * s * 2  # one bf16 s x s matrix: 16 MiB
    fused = estimate(job).breakdown["activations"]
    monkeypatch.setattr(vram, "_CudaLikeKernels", contextlib.nullcontext)  # the raw CPU trace
    cpu = estimate(job).breakdown["activations"]
    print(f"activations: fused stand-in {fused / MiB:.1f} MiB, CPU math path {cpu / MiB:.1f} MiB, "
          f"one score matrix {scores / MiB:.0f} MiB")
    assert fused < scores < cpu  # CUDA's kernels never store the scores; the CPU's dropout path does


def test_cuda_autocast_float32_rules():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), vram._CudaLikeKernels():
        for out in (F.softmax(x, -1), x.softmax(-1), torch.log_softmax(x, -1), F.log_softmax(x, dim=-1),
                    F.layer_norm(x, (8,)), torch.pow(x, 3.0), x**3, 2**x, x.exp(), torch.rsqrt(x)):
            assert out.dtype == torch.float32
        assert (x + 1).dtype == F.gelu(x).dtype == torch.bfloat16  # not in CUDA's float32 list
        assert F.softmax(x, -1, dtype=torch.bfloat16).dtype == torch.bfloat16  # an explicit dtype wins
    with vram._CudaLikeKernels():  # without autocast nothing changes
        assert F.softmax(x, -1).dtype == torch.bfloat16


# ---------------------------------------------------------------- the report
def make_report(peak_gib, budget_gb=12.0):
    parts = dict.fromkeys(vram.CATEGORIES, 0)
    parts.update(params=int(0.5 * GiB), activations=int((peak_gib - 0.5) * GiB))
    return VramReport("demo", parts, sum(parts.values()), int(budget_gb * GiB), "micro-batch 4")


def test_fits_flips_with_the_budget():
    assert make_report(10.0).fits and not make_report(12.5).fits
    report = estimate(linear_job())
    peak_gb = report.peak_bytes / GiB
    assert estimate(linear_job(), budget_gb=peak_gb * 1.01).fits
    assert not estimate(linear_job(), budget_gb=peak_gb * 0.99).fits
    exact = VramReport("x", report.breakdown, report.peak_bytes, report.peak_bytes, "")
    assert exact.fits and not VramReport("x", report.breakdown, report.peak_bytes, report.peak_bytes - 1, "").fits


def test_to_dict_is_json_and_adds_up():
    for report in (make_report(9.25), estimate(linear_job())):
        d = json.loads(json.dumps(report.to_dict()))
        assert d["peak_bytes"] == sum(d["breakdown"].values()) == report.peak_bytes
        assert list(d["breakdown"]) == list(vram.CATEGORIES)
        assert math.isclose(d["peak_gib"], report.peak_bytes / GiB)
        assert d["fits"] is report.fits and d["budget_bytes"] == report.budget_bytes
        assert d["name"] == report.name and d["notes"] == report.notes


def test_str_is_a_table_ending_with_the_verdict():
    text = str(make_report(9.25))
    print(text)
    assert text.splitlines()[-1] == "fits 12.0 GB with 2.8 GiB headroom"  # 12 - 9.25 = 2.75
    assert re.search(r"activations\s+8\.75 GiB", text) and re.search(r"peak\s+9\.25 GiB", text)
    assert "micro-batch 4" in text
    assert str(make_report(13.5)).splitlines()[-1] == "does NOT fit 12.0 GB: over by 1.5 GiB"


def test_plot_is_a_stacked_bar_with_the_budget():
    report = make_report(13.5)
    fig = report.plot()
    try:
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        bars = [p for p in ax.patches]
        assert len(bars) == 2  # the two non-zero categories
        assert bars[1].get_x() == pytest.approx(0.5) and bars[1].get_width() == pytest.approx(13.0)
        assert [tuple(line.get_xdata()) for line in ax.lines] == [(12.0, 12.0)]  # the budget line
        assert ax.get_xlabel() == "GiB" and "demo" in ax.get_title() and "NOT" in ax.get_title()
        _, given = plt.subplots()
        assert report.plot(ax=given) is given.figure
        plt.close(given.figure)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- errors and global state
def state():
    return (torch.get_default_device(), torch.get_default_dtype(), torch.is_grad_enabled(),
            torch.is_autocast_enabled("cpu"))


def test_a_failing_make_model_is_named_and_leaves_no_trace():
    before = state()

    def broken():
        torch.set_grad_enabled(False)
        torch.set_default_dtype(torch.float64)
        raise ValueError("boom: bad width")

    with pytest.raises(RuntimeError, match=r"make_model raised ValueError: boom: bad width") as info:
        estimate(TrainJob(make_model=broken, make_batch=lambda: None, loss_fn=lambda m, b: None))
    assert isinstance(info.value.__cause__, ValueError)
    assert state() == before == (torch.device("cpu"), torch.float32, True, False)


def test_other_failures_are_named_too():
    before = state()
    job = linear_job()
    job.loss_fn = lambda m, b: m(b[0][:, :7])  # a shape error inside the forward, under autocast
    job.amp_dtype = torch.bfloat16
    with pytest.raises(RuntimeError, match="loss_fn raised"):
        estimate(job)
    job.loss_fn = lambda m, b: m(b[0])  # not a scalar
    with pytest.raises(ValueError, match="scalar"):
        estimate(job)
    job.make_model = lambda: "not a module"
    with pytest.raises(ValueError, match="nn.Module"):
        estimate(job)
    job = linear_job()
    job.make_batch = lambda: 1 / 0
    with pytest.raises(RuntimeError, match="make_batch raised ZeroDivisionError"):
        estimate(job)
    assert state() == before


def test_live_meter_without_cuda():
    assert not torch.cuda.is_available()
    assert cuda_peak() is None
    assert reset_cuda_peak() is None


def test_activation_checkpointing_under_bf16_traces_and_saves_memory():
    """Checkpointed blocks are recomputed in backward, where autograd runs outside the CUDA-like function
    mode; the estimate must still run (and restore torch's checkpoint afterwards), and show the saving."""
    import torch.utils.checkpoint as ckpt
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    from labkit.vram import TrainJob, estimate

    class Net(nn.Module):
        def __init__(self, use_ckpt):
            super().__init__()
            self.use_ckpt = use_ckpt
            self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU())
                                        for _ in range(4))

        def forward(self, x):
            for b in self.blocks:
                x = checkpoint(b, x, use_reentrant=False) if self.use_ckpt else b(x)
            return x

    def job(use_ckpt):
        return TrainJob(make_model=lambda: Net(use_ckpt), make_batch=lambda: torch.randn(8, 16, 32, 32),
                        loss_fn=lambda m, x: m(x).float().square().mean(), amp_dtype=torch.bfloat16)

    plain, ckpted = estimate(job(False)), estimate(job(True))
    print(f"activations: plain {plain.breakdown['activations']:,} B, checkpointed {ckpted.breakdown['activations']:,} B")
    assert ckpted.breakdown["activations"] < 0.5 * plain.breakdown["activations"]
    assert ckpt._checkpoint_without_reentrant_generator.__module__ == "torch.utils.checkpoint"  # restored


def test_checkpoint_recompute_uses_the_cuda_like_attention():
    """Grouped-query attention (fewer key/value heads than query heads) inside a checkpointed block: the
    recompute in backward must save what the traced forward saved (the fused-attention stand-in), not what
    the CPU kernel saves, or autograd gets gradients of the wrong shapes."""
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    from labkit.vram import TrainJob, estimate

    class GQA(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(64, 64), nn.Linear(64, 32)  # 8 query heads, 2 key/value heads of 8

        def attend(self, x):
            B, T, _ = x.shape
            q = self.q(x).view(B, T, 8, 8).transpose(1, 2)
            k, v = self.kv(x).view(B, T, 2, 2, 8).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(B, T, 64)

        def forward(self, x):
            return checkpoint(self.attend, x, use_reentrant=False)

    report = estimate(TrainJob(make_model=GQA, make_batch=lambda: torch.randn(2, 16, 64),
                               loss_fn=lambda m, x: m(x).float().square().mean()))
    assert report.peak_bytes > 0
