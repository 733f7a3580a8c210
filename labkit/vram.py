"""The VRAM meter: the peak memory of one training step, measured on a GPU or estimated without one.

Every chapter asks "will the full-size model train on a 12 GB card?", and readers (and CI) often have
no GPU. :func:`estimate` answers by *tracing* one full-size training step on fake tensors: nothing is
allocated and nothing computed, so GPT-2 124M takes a few seconds on a laptop CPU.

How :func:`estimate` works
    1. ``make_model()`` runs under ``torch.device("meta")`` (shapes, no storage); inside
       ``FakeTensorMode`` the model then gets fake CPU storage (``to_empty``). ``to_empty`` unties tied
       weights (GPT-2's ``lm_head``/``wte``), so we tie them again.
    2. ``MemTracker`` (torch.distributed._tools) sees every storage created or freed and tags it:
       parameter, buffer, gradient, activation (made in forward), temporary (made in backward),
       optimizer state (made in ``optimizer.step``).
    3. A warm-up step on zero gradients creates AdamW's (lazy) state. Then one steady step is traced:
       **two micro-batches** (forward + backward each), then the optimizer step. The first one's
       gradients are alive while the second runs, as in gradient accumulation; a loop that frees the
       gradients before every forward peaks lower by at most the ``grads`` line.
    4. The breakdown is the tracker's categories at the instant of the peak, so they add up to it
       (the batch counts as ``activations``); then two GPU-only lines are added (below).

Where a CPU trace differs from a CUDA step, and what we do about it
    * Attention. On CUDA, ``F.scaled_dot_product_attention`` runs a fused kernel (flash or memory-
      efficient, dropout and masks included) that saves q, k, v, the output and a float32 log-sum-exp,
      never the s x s scores. The CPU takes its math path whenever dropout is on and stores several
      s x s tensors per layer. We swap in a stand-in with the fused kernels' memory (and output layout);
      its backward allocates dq, dk, dv and FlashAttention-2's float32 dq accumulator. Attention
      written by hand (matmul + softmax) is traced as is: a GPU stores those scores too.
    * Autocast. CUDA runs softmax, log_softmax, layer_norm, group_norm, pow, exp, log, rsqrt and
      reciprocal in float32; CPU autocast keeps them in bfloat16. We apply the CUDA rule to these,
      which store big tensors in common models (attention probabilities, log-probabilities over a
      vocabulary, GPT-2's tanh GELU). CUDA's other float32 ops (sum, cumsum, norm, the losses, ...)
      keep the CPU rule: a small error.
    * Optimizer. torch's CUDA default is the multi-tensor ("foreach") step, which allocates a
      temporary as large as all parameters; on CPU it loops per tensor. Where the optimizer leaves the
      choice open we set ``foreach=True``.
    * Loss. Cross-entropy runs the same aten ops on both: its float32 log-probabilities and their
      gradient (for a 50k vocabulary, the biggest tensors of a small LM's step) are traced faithfully,
      as is a chunked loss written in PyTorch. A fused Triton loss cannot run here: put the plain loss
      in ``loss_fn`` and read the estimate as an upper bound. The same holds for ``torch.compile``
      (compiled graphs usually save less): the estimate is for eager mode.
    * What torch's allocator never sees: the CUDA context (driver, torch's kernels, cuBLAS):
      ``CUDA_CONTEXT_BYTES``; and what it reserves beyond what it hands out (rounding, fragmentation):
      ``ALLOCATOR_OVERHEAD``, a fraction of the traced peak. Both are documented constants below.

Budget: "12 GB" on an RTX 4070's box means 12 GiB (nvidia-smi shows 12,282 MiB, 6 MiB short of
12 GiB), so ``budget_gb`` is read in GiB: ``budget_bytes = budget_gb * 2**30``. If the card also
drives a display, the desktop takes a few hundred MiB: pass a smaller budget.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map_only

GiB = 1024**3

# The CUDA context of a torch 2.x process with lazy module loading (CUDA_MODULE_LOADING=LAZY, which
# torch sets when unset) is commonly reported at ~300-450 MiB in nvidia-smi once a matmul has run,
# plus a few to tens of MiB of cuBLAS workspace. With eager loading the kernels alone took ~1.3 GB
# (Hugging Face docs, "Model training anatomy"). 0.5 GiB is a slightly cautious round figure, not
# yet measured on a 4070 here: compare nvidia-smi with cuda_peak() there and adjust.
CUDA_CONTEXT_BYTES = 512 * 1024**2
# The caching allocator rounds sizes up (512 B; 2 MiB and 20 MiB segments) and freed blocks fragment,
# so max_memory_reserved() exceeds max_memory_allocated() in a steady training loop, by a few to
# ~15 % (a rule of thumb; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lowers it). We add 8 %.
ALLOCATOR_OVERHEAD = 0.08

CATEGORIES = ("params", "grads", "optimizer", "activations", "temporaries", "buffers",
              "cuda_context", "allocator_overhead")
_FROM_TRACKER = {"Parameter": "params", "Gradient": "grads", "Optstate": "optimizer",
                 "Activation": "activations", "Other": "activations", "Temp": "temporaries",
                 "Buffer": "buffers"}


@dataclass
class TrainJob:
    """One full-size training step to estimate: how to build the model, a micro-batch, and the loss.

    ``make_model`` runs under ``torch.device("meta")`` and ``make_batch`` under ``FakeTensorMode``, so
    both are free at any size (but must not read values: no ``.item()``, no weight loading).
    ``loss_fn(model, batch)`` runs the forward and returns the scalar loss, under autocast(amp_dtype).
    ``make_optimizer(params)`` defaults to ``AdamW(params, lr=1e-4)``: two fp32 states per parameter. To trace
    the optimizer the Trainer runs, pass what it builds: ``lambda params: labkit.train.adamw(params, cfg, "cuda")``
    (fused on CUDA, the decay groups of ``labkit.train.decays``).
    Fake tensors have no values, so shapes that depend on data (``bincount``, ``nonzero``, ``.tolist()``, as
    in a dropless MoE dispatch) cannot be traced: trace a static-shape path that bounds it (capacity dispatch).
    """
    make_model: Callable[[], torch.nn.Module]
    make_batch: Callable[[], Any]
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]
    make_optimizer: Callable[[Iterable], torch.optim.Optimizer] | None = None
    amp_dtype: torch.dtype | None = torch.bfloat16
    name: str = ""
    notes: str = ""


@dataclass
class VramReport:
    """The estimated peak of one training step, split by what holds the memory."""
    name: str
    breakdown: dict[str, int]
    peak_bytes: int
    budget_bytes: int
    notes: str

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        return {"name": self.name, "peak_bytes": self.peak_bytes, "peak_gib": self.peak_bytes / GiB,
                "budget_bytes": self.budget_bytes, "fits": self.fits,
                "breakdown": dict(self.breakdown), "notes": self.notes}

    def _verdict(self) -> str:
        budget, margin = self.budget_bytes / GiB, abs(self.budget_bytes - self.peak_bytes) / GiB
        return (f"fits {budget:.1f} GB with {margin:.1f} GiB headroom" if self.fits
                else f"does NOT fit {budget:.1f} GB: over by {margin:.1f} GiB")

    def __str__(self) -> str:
        lines = [f"VRAM estimate: {self.name or 'training step'} (peak of one training step)"]
        lines += [f"  {cat:<20}{b / GiB:8.2f} GiB" for cat, b in self.breakdown.items()]
        lines += ["  " + "-" * 32, f"  {'peak':<20}{self.peak_bytes / GiB:8.2f} GiB"]
        if self.notes:
            lines.append(f"  notes: {self.notes}")
        return "\n".join(lines + [self._verdict()])

    def plot(self, ax=None):
        """A horizontal bar of the peak split by category, with the budget marked. Returns the Figure."""
        import matplotlib.pyplot as plt

        from labkit.plot import PALETTE, apply_style  # the book's one look

        apply_style()
        own = ax is None
        fig, ax = plt.subplots(figsize=(8, 2.8), layout="constrained") if own else (ax.figure, ax)
        left = 0.0
        for i, (cat, b) in enumerate(self.breakdown.items()):
            if b > 0:
                ax.barh(0, b / GiB, left=left, height=0.6, color=PALETTE[i % len(PALETTE)],
                        label=cat.replace("_", " "))
                left += b / GiB
        budget = self.budget_bytes / GiB
        ax.axvline(budget, color="black", linestyle="--", linewidth=1.5, label=f"budget {budget:.1f} GB")
        ax.set_xlim(0, max(left, budget) * 1.05)
        ax.set_yticks([])
        ax.set_xlabel("GiB")
        ax.set_title(f"{self.name or 'training step'}: peak {self.peak_bytes / GiB:.1f} GiB, "
                     + ("fits" if self.fits else "does NOT fit") + f" {budget:.1f} GB")
        if own:  # below the bar, outside it; on a caller's axes, inside
            fig.legend(loc="outside lower center", ncols=5, fontsize=8)
        else:
            ax.legend(fontsize=8)
        return fig


# ---------------------------------------------------------------- making the CPU trace look like CUDA
def _autocast_dtype() -> torch.dtype | None:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


class _FusedAttention(torch.autograd.Function):
    """Memory stand-in for CUDA's flash / memory-efficient attention (no values: the trace is fake)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        shape = q.shape[:-1] + v.shape[-1:]  # CUDA's kernels write (batch, seq, heads, dim) and return
        # a transposed view, so the usual `y.transpose(1, 2).contiguous()` after attention is free
        out = (q.new_empty(shape[0], shape[2], shape[1], shape[3]).transpose(1, 2) if q.dim() == 4
               else q.new_empty(shape))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # log-sum-exp, one per query row
        ctx.save_for_backward(q, k, v, out, lse, mask if isinstance(mask, torch.Tensor) else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _, lse, _ = ctx.saved_tensors
        # FlashAttention-2's workspace, alive while the gradients are made: dq accumulated in float32,
        # and rowsum(dO * O) per query row
        workspace = (q.new_empty(q.shape, dtype=torch.float32), torch.empty_like(lse))  # noqa: F841
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    dtype = _autocast_dtype()  # autocast casts SDPA's inputs to the low precision on CUDA and CPU
    if dtype is not None:
        query, key, value = (t.to(dtype) for t in (query, key, value))
        if isinstance(attn_mask, torch.Tensor) and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
    return _FusedAttention.apply(query, key, value, attn_mask)


# CUDA autocast's float32 rules that matter for memory. Softmax-like ops get dtype=float32 (they read
# the low precision and write float32); the others have their inputs cast to float32, as CUDA does.
# The numbers give where each softmax variant takes `dtype` positionally.
_FP32_OUTPUT = {F.softmax: 3, F.log_softmax: 3, torch.softmax: 2, torch.log_softmax: 2,
                torch.Tensor.softmax: 2, torch.Tensor.log_softmax: 2}
_FP32_INPUTS = {F.layer_norm, F.group_norm, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__,
                torch.Tensor.__rpow__, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log,
                torch.rsqrt, torch.Tensor.rsqrt, torch.reciprocal, torch.Tensor.reciprocal}


def _to_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


class _CudaLikeKernels(TorchFunctionMode):
    """Route the calls whose memory differs between CPU and CUDA to a CUDA-like version."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            return _fused_sdpa(*args, **kwargs)
        low = _autocast_dtype()
        if low is not None and (func in _FP32_OUTPUT or func in _FP32_INPUTS):
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if any(t.dtype == low for t in tensors):
                if func in _FP32_INPUTS:
                    args, kwargs = tree_map_only(torch.Tensor, _to_fp32, (args, kwargs))
                elif len(args) <= _FP32_OUTPUT[func] and kwargs.get("dtype") is None:
                    kwargs["dtype"] = torch.float32
        return func(*args, **kwargs)


@contextlib.contextmanager
def _cuda_like_recompute():
    """Activation checkpointing recomputes a block inside the backward pass, where autograd runs without our
    function mode: the recompute would call the CPU attention kernel (saving other tensors than the traced
    forward did: wrong shapes with grouped-query attention) and skip the float32 rules. Give every
    non-reentrant checkpoint a recompute context that re-enters the mode. Checkpoint's metadata check guards
    numerics, which a fake trace does not have: it is switched off (``determinism_check="none"``)."""
    import torch.utils.checkpoint as ckpt

    original = ckpt._checkpoint_without_reentrant_generator

    def generator(fn, preserve_rng_state=True, context_fn=ckpt.noop_context_fn, determinism_check="none",
                  debug=False, early_stop=True, *args, **kwargs):
        @contextlib.contextmanager
        def recompute(inner):
            with inner, _CudaLikeKernels():
                yield

        def contexts():
            forward_ctx, recompute_ctx = context_fn()
            return forward_ctx, recompute(recompute_ctx)
        return original(fn, preserve_rng_state, contexts, "none", debug, early_stop, *args, **kwargs)

    ckpt._checkpoint_without_reentrant_generator = generator
    try:
        yield
    finally:
        ckpt._checkpoint_without_reentrant_generator = original


# ---------------------------------------------------------------- the estimate
def _call(what: str, fn: Callable, *args):
    """Call one of the user's callables; say which one failed instead of a deep torch traceback."""
    try:
        return fn(*args)
    except Exception as e:
        hint = ""
        if "meta" in str(e):
            hint = (" (a tensor made in make_model that is neither a parameter nor a buffer stays on "
                    "the meta device: register it with register_buffer, or build it in forward)")
        raise RuntimeError(f"labkit.vram.estimate: {what} raised {type(e).__name__}: {e}{hint}") from e


def _shared(named: Iterable[tuple[str, torch.Tensor]]) -> list[list[str]]:
    """Groups of names under which one tensor is registered more than once (tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, t in named:
        groups.setdefault(id(t), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: torch.nn.Module, groups: list[list[str]], registry: str) -> None:
    for first, *others in groups:
        prefix, _, leaf = first.rpartition(".")
        tensor = getattr(model.get_submodule(prefix), registry)[leaf]
        for name in others:
            prefix, _, leaf = name.rpartition(".")
            getattr(model.get_submodule(prefix), registry)[leaf] = tensor


_NO_HOOK = SimpleNamespace(remove=lambda: None)  # stands for a hook handle we never registered


def _peak_tracker():
    """A MemTracker that keeps only the global peak (its per-module peaks, unused here, cost half the
    run time: every op walks every module) and accepts frozen parameters (LoRA's base weights)."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class PeakTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # MemTracker hooks every parameter's gradient, which raises for one without requires_grad
            for p in module.parameters():
                if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[p] = (_NO_HOOK, _NO_HOOK)
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        if callable(getattr(MemTracker.__torch_dispatch__, "__wrapped__", None)):
            # MemTracker's dispatch is wrapped in torch._disable_dynamo, which costs ~10% of a trace (a context
            # switch per op); nothing is compiled while we trace, so call the function it wraps directly.
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return MemTracker.__torch_dispatch__.__wrapped__(self, func, types, args, kwargs)

        def _update_peak_stats(self, peak_state) -> None:
            if not hasattr(self, "_peak_mem_snap"):  # a torch that renamed its internals: slow path
                return super()._update_peak_stats(peak_state)
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev], self._peak_mem_snap[dev] = snap[_TOTAL_KEY], dict(snap)

    return PeakTracker()


def _step(job: TrainJob, model, optimizer, batch, tracker, micro_batches: int) -> None:
    for _ in range(micro_batches):
        tracker.reset_mod_stats()  # MemTracker refuses a second root forward otherwise
        with torch.autocast("cpu", dtype=job.amp_dtype, enabled=job.amp_dtype is not None):
            loss = _call("loss_fn", job.loss_fn, model, batch)
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
            raise ValueError("labkit.vram.estimate: loss_fn must return a scalar tensor that requires "
                             f"grad, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
        _call("loss.backward() (the backward of loss_fn)", loss.backward)
        del loss
    _call("optimizer.step()", optimizer.step)
    optimizer.zero_grad(set_to_none=True)


def _trace(job: TrainJob) -> tuple[str, dict[str, int]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        model = _call("make_model", job.make_model)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"labkit.vram.estimate: make_model must return an nn.Module, "
                         f"got {type(model).__name__}")
    tied_params = _shared(model.named_parameters(remove_duplicate=False))
    tied_buffers = _shared(model.named_buffers(remove_duplicate=False))
    # to_empty makes new Parameter objects: keep the attributes set on the old ones (``_no_weight_decay``)
    marks = {name: dict(vars(p)) for name, p in model.named_parameters() if vars(p)}
    with FakeTensorMode(allow_non_fake_inputs=True), torch.enable_grad():
        model.to_empty(device="cpu")
        _retie(model, tied_params, "_parameters")
        _retie(model, tied_buffers, "_buffers")
        for name, attributes in marks.items():
            vars(model.get_parameter(name)).update(attributes)
        model.train()
        make_opt = job.make_optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        optimizer = _call("make_optimizer", make_opt, model.parameters())
        for group in optimizer.param_groups:  # leave the choice open -> what CUDA would pick
            if group.get("foreach", False) is None and not group.get("fused"):
                group["foreach"] = True
        batch = _call("make_batch", job.make_batch)
        # Warm-up: one step on zero gradients creates the optimizer state (AdamW makes it lazily)
        # without paying for a forward and backward; the tracker then sees it as optimizer memory.
        trained = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        for p in trained:
            p.grad = torch.zeros_like(p)
        _call("optimizer.step()", optimizer.step)
        for p in trained:
            p.grad = None
        tracker = _peak_tracker()
        tracker.track_external(model, optimizer,
                               *[t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)])
        with tracker, _CudaLikeKernels(), _cuda_like_recompute():
            _step(job, model, optimizer, batch, tracker, micro_batches=2)  # a steady accumulation step
        peak = tracker.get_tracker_snapshot("peak")
    traced = dict.fromkeys(CATEGORIES[:6], 0)
    for device_snapshot in peak.values():
        for kind, nbytes in device_snapshot.items():
            category = _FROM_TRACKER.get(getattr(kind, "value", kind))
            if category:
                traced[category] += nbytes
    return job.name or type(model).__name__, traced


def estimate(job: TrainJob, budget_gb: float = 12.0, world_size: int = 1, strategy: str | None = None) -> VramReport:
    """Estimate the peak GPU memory of one training step of ``job`` at full size, on any machine.

    ``budget_gb`` is read in GiB (see the module docstring): 12.0 -> 12 * 2**30 bytes.
    ``strategy`` ("ddp" / "fsdp", with ``world_size`` GPUs): the peak on each GPU, see :func:`per_gpu`.
    Global state (default device and dtype, grad mode, autocast) is restored even when the job raises.
    """
    device, dtype, grad = torch.get_default_device(), torch.get_default_dtype(), torch.is_grad_enabled()
    autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")  # logs a traceback per failed op
    log_level = fake_log.level
    try:
        fake_log.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            name, breakdown = _trace(job)
    finally:
        fake_log.setLevel(log_level)
        if torch.get_default_device() != device:
            torch.set_default_device(device)
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        torch.set_autocast_enabled("cpu", autocast[0])
        torch.set_autocast_dtype("cpu", autocast[1])
    report = _with_gpu_lines(name, breakdown, int(budget_gb * GiB), job.notes)
    return report if strategy is None else per_gpu(report, job, world_size, strategy)


def _with_gpu_lines(name: str, traced: dict[str, int], budget_bytes: int, notes: str) -> VramReport:
    breakdown = {k: v for k, v in traced.items() if k not in ("cuda_context", "allocator_overhead")}
    traced_peak = sum(breakdown.values())
    breakdown["cuda_context"] = CUDA_CONTEXT_BYTES
    breakdown["allocator_overhead"] = int(ALLOCATOR_OVERHEAD * traced_peak)
    return VramReport(name=name, breakdown=breakdown, peak_bytes=sum(breakdown.values()),
                      budget_bytes=budget_bytes, notes=notes)


# ---------------------------------------------------------------- more than one GPU (labkit.distributed)
@dataclass
class ModelSizes:
    """What sharding and communication depend on, counted on the meta device (free at any size)."""
    param_bytes: int            # every parameter (frozen ones too), as stored
    param_numel: int
    trainable_bytes: int        # = the gradients' bytes (a gradient has its parameter's dtype)
    trainable_numel: int
    largest_group_numel: int    # the biggest FSDP unit: one block, or the root (embeddings, head, final norm)
    largest_group_trainable: int

    @classmethod
    def of(cls, job: TrainJob) -> "ModelSizes":
        from labkit.distributed import blocks

        with torch.device("meta"):
            model = _call("make_model", job.make_model)
        params = list(model.parameters())  # tied weights once
        in_block = [list(b.parameters()) for b in blocks(model)]
        seen = {id(p) for group in in_block for p in group}
        groups = in_block + [[p for p in params if id(p) not in seen]]
        return cls(param_bytes=sum(p.numel() * p.element_size() for p in params),
                   param_numel=sum(p.numel() for p in params),
                   trainable_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad),
                   trainable_numel=sum(p.numel() for p in params if p.requires_grad),
                   largest_group_numel=max(sum(p.numel() for p in g) for g in groups),
                   largest_group_trainable=max(sum(p.numel() for p in g if p.requires_grad) for g in groups))


def per_gpu(report: VramReport, job: TrainJob, world_size: int, strategy: str,
            sizes: ModelSizes | None = None) -> VramReport:
    """The peak on each of ``world_size`` GPUs under labkit's DDP or FSDP2 (see labkit.distributed), from a
    one-GPU report of the same micro-batch (the global batch is spread as fewer micro-batches per GPU).

    ``ddp``: nothing is sharded. The gradients live in DDP's buckets (``gradient_as_bucket_view``) from the
    first step on, so ``comm_buckets`` adds whatever gradient bytes the traced peak did not already hold.
    ``fsdp``: parameters, gradients and optimizer state are split N ways; ``comm_buckets`` adds the unsharded
    working set: two FSDP units' weights in the compute dtype (the one running and the one prefetched) and two
    units' fp32 gradients (the one being reduce-scattered and the next one being made).
    Not counted: NCCL's own buffers (outside torch's allocator, tens to hundreds of MiB; not measured here), and
    under FSDP the autocast copies of the weights that the trace holds as activations (an upper bound).
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp' (got {strategy!r})")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1 (got {world_size})")
    sizes = sizes or ModelSizes.of(job)
    traced = {k: v for k, v in report.breakdown.items() if k not in ("cuda_context", "allocator_overhead")}
    if strategy == "ddp":
        traced["comm_buckets"] = max(0, sizes.trainable_bytes - traced["grads"])
    else:
        for cat in ("params", "grads", "optimizer"):
            traced[cat] = -(-traced[cat] // world_size)
        compute_bytes = job.amp_dtype.itemsize if job.amp_dtype is not None else 4
        traced["comm_buckets"] = 2 * sizes.largest_group_numel * compute_bytes + 2 * sizes.largest_group_trainable * 4
    name = f"{report.name} ({strategy.upper()} x{world_size}, per GPU)"
    return _with_gpu_lines(name, traced, report.budget_bytes, report.notes)


def traffic_bytes(sizes: ModelSizes, world_size: int, strategy: str, micro_batches_per_gpu: int = 1,
                  compute_dtype: torch.dtype | None = torch.bfloat16) -> int:
    """Bytes each GPU sends per optimizer step (ring collectives: a GPU sends (N-1)/N of the data per
    all-gather or reduce-scatter, twice that per all-reduce).

    ``ddp``: one all-reduce of the gradients as they are (fp32) per step (``no_sync`` on the other micro-batches).
    ``fsdp``: per micro-batch, the weights are all-gathered twice in the compute dtype (forward, and again in
    backward since they were freed after the forward) and the fp32 gradients reduce-scattered once."""
    share = (world_size - 1) / world_size
    if strategy == "ddp":
        return int(2 * share * sizes.trainable_bytes)
    compute_bytes = compute_dtype.itemsize if compute_dtype is not None else 4
    per_micro_batch = share * (2 * sizes.param_numel * compute_bytes + 4 * sizes.trainable_numel)
    return int(micro_batches_per_gpu * per_micro_batch)


# ---------------------------------------------------------------- the live meter
def cuda_peak() -> dict | None:
    """The real peak since the last reset, on CUDA: allocated (tensors) and reserved (allocator)."""
    if not torch.cuda.is_available():
        return None
    return {"allocated_bytes": torch.cuda.max_memory_allocated(),
            "reserved_bytes": torch.cuda.max_memory_reserved()}


def reset_cuda_peak() -> None:
    """Start a new peak measurement (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
