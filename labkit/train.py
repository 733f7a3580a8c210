"""One Trainer for the whole book.

What it does, in the order a training step does it:
  sample a micro-batch (from a generator whose state is checkpointed, so a resumed run sees the very
  same batches) -> forward under autocast (bf16 where supported) -> loss / grad_accum -> backward,
  repeated grad_accum times -> clip the gradient norm -> set the learning rate (linear warmup, cosine
  decay) -> optimizer step. Every ``eval_every`` steps it estimates train/val loss on fixed batches,
  updates the live plot in Jupyter and writes a checkpoint atomically (temp file + rename).

Stopping with the ■ button (KeyboardInterrupt) saves a checkpoint and returns the history so far:
nothing is lost. Under torchrun, Ctrl-C does the same: the ranks stop together at the next step boundary and write
one checkpoint (``labkit.distributed.StopRequest``). A CUDA out-of-memory error is answered with the memory in use and the knobs to turn.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from labkit import distributed
from labkit.device import amp_dtype as default_amp_dtype
from labkit.device import device as default_device
from labkit.device import peak_flops as device_peak_flops

Batch = Any


@dataclass
class TrainConfig:
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr: float | None = None          # default: lr / 10 (as in Chinchilla / nanoGPT)
    warmup_steps: int = 100
    weight_decay: float = 0.1            # applied to matrices (dim >= 2) only, never to biases or norms
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    grad_accum: int = 1                  # micro-batches per optimizer step
    eval_every: int = 100
    eval_batches: int = 10
    log_every: int = 10
    amp: bool | str = True               # True: labkit.device.amp_dtype() (bf16 on recent GPUs, off on CPU);
                                         # "bf16" / "fp16": force that autocast dtype (bf16 also helps some CPUs)
    seed: int = 1337
    ckpt_path: str | None = None         # where checkpoints go; None = no checkpoints
    progress: bool = True                # tqdm progress bar (a widget in Jupyter)
    live_plot: bool = True               # redraw the loss plot at each eval, in Jupyter only
    strategy: str | None = None          # under torchrun only: "ddp" or "fsdp" (None: $LABKIT_STRATEGY, else "ddp");
                                         # see labkit.distributed. grad_accum counts micro-batches over all ranks

    def __post_init__(self):
        problems = []
        if self.strategy not in (None, "ddp", "fsdp"):
            problems.append(f"strategy must be None, 'ddp' or 'fsdp' (got {self.strategy!r})")
        if self.max_steps < 1:
            problems.append(f"max_steps must be >= 1 (got {self.max_steps})")
        if self.grad_accum < 1:
            problems.append(f"grad_accum must be >= 1 (got {self.grad_accum})")
        if not 0 <= self.warmup_steps <= self.max_steps:
            problems.append(f"warmup_steps must be between 0 and max_steps={self.max_steps} (got {self.warmup_steps})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.eval_every < 1:
            problems.append(f"eval_every must be >= 1 (got {self.eval_every})")
        if problems:
            raise ValueError("bad TrainConfig: " + "; ".join(problems))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def is_matrix(p: torch.Tensor) -> bool:
    """A weight matrix (or conv kernel): at least two dimensions longer than 1. Vectors stored with extra unit
    dimensions (RWKV's (1, 1, C) mixing coefficients, a (1, C) scale) are not matrices."""
    return sum(n > 1 for n in p.shape) >= 2


def decays(p: torch.Tensor) -> bool:
    """Whether AdamW decays ``p``: matrices (``is_matrix``), unless marked ``p._no_weight_decay = True``, the marker
    mamba-ssm and transformers put on Mamba's ``A_log`` and ``D``."""
    return is_matrix(p) and not getattr(p, "_no_weight_decay", False)


def adamw(params: nn.Module | Iterable[torch.Tensor], cfg: TrainConfig | None = None,
          device: torch.device | str | None = None, **overrides) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (embeddings, linear and conv weights; see ``decays``), fused on
    CUDA and CPU.

    ``params``: a model or its parameters (frozen ones are left out). ``cfg`` gives ``lr``, ``betas`` and
    ``weight_decay``; keywords override them. ``device``: where the step runs (fused kernels exist for CUDA
    and CPU, torch >= 2.4). The Trainer calls this, and so does a chapter's ``vram_job``
    (``make_optimizer=lambda params: adamw(params, cfg, "cuda")``): the estimate traces the optimizer that trains.
    """
    unknown = set(overrides) - {"lr", "betas", "weight_decay"}
    if unknown:
        raise TypeError(f"adamw() got unexpected keywords {sorted(unknown)} (lr, betas, weight_decay)")
    cfg = cfg or TrainConfig()
    hp = {"lr": cfg.lr, "betas": cfg.betas, "weight_decay": cfg.weight_decay, **overrides}
    params = [p for p in (params.parameters() if isinstance(params, nn.Module) else params) if p.requires_grad]
    groups = [{"params": [p for p in params if decays(p)], "weight_decay": hp["weight_decay"]},
              {"params": [p for p in params if not decays(p)], "weight_decay": 0.0}]
    device = torch.device(device) if device is not None else None
    fused = device is not None and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=hp["lr"], betas=hp["betas"], fused=fused)


def to_device(batch: Batch, dev: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(dev, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, dev) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, dev) for k, v in batch.items()}
    return batch


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Call ``model(*batch)``; accept a scalar loss or the nanoGPT convention ``(logits, loss)``."""
    out = model(**batch) if isinstance(batch, dict) else model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    loss = out[1] if isinstance(out, (tuple, list)) else out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError("the model's forward must return a scalar loss or (logits, loss); pass loss_fn= otherwise")
    return loss


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None and hasattr(get_ipython(), "kernel")
    except ImportError:
        return False


class Trainer:
    """Train ``model`` on batches from ``get_batch(split, generator)``.

    Args:
        model: any nn.Module.
        get_batch: ``(split, generator) -> batch``; split is "train" or "val". Draw all randomness from
            ``generator``: its state is checkpointed, which is what makes resume exact.
        loss_fn: ``(model, batch) -> scalar loss``; default calls ``model(*batch)`` (see ``default_loss``).
        config: a TrainConfig.
        items_per_batch: tokens (or samples) in one micro-batch, for the throughput figure.
        flops_per_item: training FLOPs per token/sample (~6 N for a transformer), for MFU where the
            device's peak is known (labkit.device.GPU_PEAK_FLOPS) or given as ``peak_flops``.
        eval_fn: optional ``model -> dict`` of extra metrics (accuracy, samples...) logged at each eval.
    """

    def __init__(self, model: nn.Module, get_batch: Callable[[str, torch.Generator], Batch], loss_fn=None,
                 config: TrainConfig | None = None, *, optimizer: torch.optim.Optimizer | None = None,
                 items_per_batch: int | None = None, item_name: str = "tok", flops_per_item: float | None = None,
                 peak_flops: float | None = None, eval_fn: Callable[[nn.Module], dict] | None = None,
                 device: torch.device | str | None = None):
        self.cfg = config or TrainConfig()
        self.dist = None  # a labkit.distributed.Dist under torchrun; None in a single process
        if distributed.launched():
            self.dist = distributed.setup(torch.device(device) if device is not None else None,
                                          distributed.strategy_from(self.cfg.strategy), self.cfg.grad_accum)
            device = self.dist.device
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device)
        self.get_batch = get_batch
        self.loss_fn = loss_fn or default_loss
        forced = {"bf16": torch.bfloat16, "fp16": torch.float16}
        if isinstance(self.cfg.amp, str) and self.cfg.amp not in forced:
            raise ValueError(f"TrainConfig.amp must be True, False, 'bf16' or 'fp16' (got {self.cfg.amp!r})")
        self.amp_dtype = forced[self.cfg.amp] if isinstance(self.cfg.amp, str) else (
            default_amp_dtype(self.device) if self.cfg.amp else None)
        self.net = self.model  # what the training step calls: the model, or its DDP / FSDP2 wrapping
        if self.dist is not None:
            names = {id(p): n for n, p in self.model.named_parameters()}
            self.net = distributed.wrap(self.model, self.dist, self.amp_dtype)
            if optimizer is not None and self.dist.strategy == "fsdp":
                optimizer = distributed.rebind_optimizer(optimizer, names, self.model)
        self.optimizer = optimizer or adamw(self.model, self.cfg, self.device)
        self.items_per_batch, self.item_name = items_per_batch, item_name
        self.flops_per_item = flops_per_item
        self.peak = peak_flops if peak_flops is not None else device_peak_flops(self.device)
        if self.peak and self.dist is not None:
            self.peak *= self.dist.world_size  # MFU of the whole job: tokens/s are counted over all ranks
        self.eval_fn = eval_fn
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.history: list[dict] = []
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.tracked: dict[str, object] = {}  # more state that checkpoints carry (an EMA of the weights, ...)
        self._plot_handle = None

    # ---- one step ------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss."""
        cfg, model, d = self.cfg, self.net, self.dist
        model.train()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:   # a group may run at a multiple of the schedule
            group["lr"] = lr * group.get("lr_scale", 1.0)
        draws, local = (self.get_batch("train", self.generator) for _ in range(cfg.grad_accum)), cfg.grad_accum
        if d is not None:  # every rank draws every micro-batch and keeps its share (see labkit.distributed)
            distributed.seed_dropout(cfg.seed, self.step, d)
            draws, local = distributed.mine(draws, d), cfg.grad_accum // d.world_size
        total = 0.0
        for i, batch in enumerate(draws):
            batch = to_device(batch, self.device)
            with distributed.accumulating(model, d, last=i == local - 1) if d else contextlib.nullcontext():
                with self._autocast():
                    loss = self.loss_fn(model, batch)
                self.scaler.scale(loss / local).backward()
            total += loss.item()
        if d is not None:
            total = distributed.global_sum(total, d)  # the loss reported is the mean over all ranks' micro-batches
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / cfg.grad_accum

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss over ``eval_batches`` fixed batches per split (the same batches every time)."""
        self.model.eval()
        out, d, count = {}, self.dist, self.cfg.eval_batches
        for split in ("train", "val"):
            g = torch.Generator().manual_seed(self.cfg.seed + (1 if split == "train" else 2))
            draws = (self.get_batch(split, g) for _ in range(count))
            if d is not None:  # each rank its share, all ranks the same number of forwards (FSDP gathers need all)
                draws = distributed.mine((self.get_batch(split, g) for _ in range(-(-count // d.world_size) * d.world_size)), d)
            losses = []
            for batch in draws:
                batch = to_device(batch, self.device)
                with self._autocast():
                    losses.append(self.loss_fn(self.model, batch).item())
            if d is None:
                out[f"{split}_loss"] = sum(losses) / len(losses)
            else:  # the k-th batch of rank r is batch r + k * world; the padding past eval_batches does not count
                own = sum(x for k, x in enumerate(losses) if d.rank + k * d.world_size < count)
                out[f"{split}_loss"] = distributed.global_sum(own, d) / count
        if self.eval_fn is not None:
            out.update(self.eval_fn(self.model) if d is None else distributed.on_main(self.eval_fn, self.model, d))
        self.model.train()
        return out

    # ---- checkpoints ---------------------------------------------------------------------------------
    def track(self, name: str, obj) -> None:
        """Checkpoint ``obj`` with the run: anything with ``state_dict()`` / ``load_state_dict()`` of tensors
        (an EMA of the weights, a data cursor...). Saved with every checkpoint, restored on resume, so an
        interrupted run loses it no more than it loses the weights."""
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(f"Trainer.track({name!r}, ...): {type(obj).__name__} needs state_dict() and "
                            "load_state_dict()")
        self.tracked[name] = obj

    def _tracked_state(self) -> dict:
        return {name: obj.state_dict() for name, obj in self.tracked.items()}

    def _load_tracked(self, stored: dict | None, path) -> None:
        missing = sorted(set(self.tracked) - set(stored or {}))
        if missing:
            raise ValueError(f"checkpoint {path} has no state for {missing} (tracked by this run with "
                             "Trainer.track): it was written without them; start this run with another ckpt_path")
        for name, obj in self.tracked.items():
            obj.load_state_dict(stored[name])

    def state_dict(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "history": self.history,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.cfg).items()},
            "tracked": self._tracked_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    @property
    def is_main(self) -> bool:
        """True in a single process and on rank 0: the one that prints, plots and shows progress."""
        return self.dist is None or self.dist.is_main

    def _counters(self) -> dict:
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.cfg).items()}
        return {"step": self.step, "history": self.history, "scaler": self.scaler.state_dict(), "config": config}

    def save(self, path: str | os.PathLike | None = None) -> Path:
        path = Path(path or self.cfg.ckpt_path)
        if self.dist is not None:  # a sharded checkpoint folder (torch.distributed.checkpoint), each rank its part
            return distributed.save(path, self.model, self.optimizer, self.generator, self._counters(), self.dist,
                                    tracked=self._tracked_state())
        save_atomic(self.state_dict(), path)
        return path

    def load(self, path: str | os.PathLike | None = None) -> None:
        """Restore everything a step depends on: weights, optimizer, step, data order, dropout RNG.
        A checkpoint folder written under torchrun loads on any number of ranks (one included)."""
        path = distributed.resolve(path or self.cfg.ckpt_path)
        if distributed.is_dcp(path):
            counters = distributed.load(path, self.model, self.optimizer, self.generator,
                                        tracked=self._tracked_state() if self.tracked else None)
            self._load_tracked(counters.pop("tracked", None), path)
            self.step, self.history = counters["step"], counters["history"]
            self.scaler.load_state_dict(counters["scaler"])
            return
        if self.dist is not None:
            raise ValueError(f"{path} is a one-process checkpoint (a torch.save file); under torchrun the Trainer "
                             "resumes from checkpoint folders written under torchrun: resume it in one process, "
                             "or start this run with another ckpt_path")
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self._load_tracked(state.get("tracked"), path)
        self.step, self.history = state["step"], state["history"]
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self, resume: bool = True, steps: int | None = None) -> list[dict]:
        """Train until ``max_steps`` (or ``steps`` more steps). Resumes from ``ckpt_path`` if it exists."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if resume and cfg.ckpt_path and distributed.resolve(cfg.ckpt_path).exists() and self.step == 0:
            self.load()
            if self.is_main:
                print(f"resumed from {cfg.ckpt_path} at step {self.step}")
        end = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        bar = tqdm(total=end, initial=self.step, desc="training", unit="step", disable=not (cfg.progress and self.is_main))
        # Under torchrun, Ctrl-C (SIGINT) and torchrun's SIGTERM only ask to stop; the ranks stop together
        # (labkit.distributed.StopRequest). In one process it is a KeyboardInterrupt, wherever the step is.
        stop = distributed.StopRequest() if self.dist is not None else None
        self._step_start = (self.generator.get_state(), torch.get_rng_state())
        with stop or contextlib.nullcontext():  # held through the save: a second signal cannot cut it short
            try:
                self._loop(end, bar, stop)
            except KeyboardInterrupt:
                bar.close()
                return self._interrupted()
            except torch.cuda.OutOfMemoryError as e:
                bar.close()
                raise RuntimeError(self._oom_message()) from e
        bar.close()
        self._draw(final=True)
        return self.history

    def _interrupted(self) -> list[dict]:
        """Back to the last step boundary, save, say so: nothing is lost."""
        self.optimizer.zero_grad(set_to_none=True)
        self.generator.set_state(self._step_start[0])
        torch.set_rng_state(self._step_start[1])
        if self.cfg.ckpt_path:
            self.save()
        if self.is_main:
            print(f"interrupted at step {self.step}: checkpoint saved to {self.cfg.ckpt_path}; fit() again resumes"
                  if self.cfg.ckpt_path else f"interrupted at step {self.step}; the history so far is returned")
        return self.history

    def _loop(self, end: int, bar, stop: "distributed.StopRequest | None") -> None:
        cfg = self.cfg
        t_last, items, step_t0 = time.perf_counter(), 0, time.perf_counter()
        while self.step < end:
            # An interrupt mid-step rolls back to here, so the checkpoint is always at a step boundary.
            self._step_start = (self.generator.get_state(), torch.get_rng_state())
            if stop is not None and stop.agreed(self.dist):
                raise KeyboardInterrupt  # every rank at once, at the same step boundary
            loss = self.train_step()
            items += (self.items_per_batch or 0) * cfg.grad_accum
            record = {"step": self.step, "lr": lr_at(self.step - 1, cfg), "train_loss_step": loss}
            if self.step % cfg.log_every == 0 or self.step == end:
                dt = time.perf_counter() - t_last
                if self.items_per_batch and dt > 0:
                    record["items_per_s"] = items / dt
                    if self.flops_per_item and self.peak:
                        record["mfu"] = items * self.flops_per_item / dt / self.peak
                t_last, items = time.perf_counter(), 0
                if self.device.type == "cuda":
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 1024**3
                postfix = {"loss": f"{loss:.4f}"}
                if "items_per_s" in record:
                    postfix[f"{self.item_name}/s"] = f"{record['items_per_s']:,.0f}"
                bar.set_postfix(postfix)
            is_eval = self.step % cfg.eval_every == 0 or self.step == end
            if is_eval:
                record.update(self.evaluate())
                record["time_s"] = time.perf_counter() - step_t0
            self.history.append(record)
            if is_eval:
                self._draw()
                if cfg.ckpt_path:
                    self.save()
            bar.update(1)

    def _oom_message(self) -> str:
        used = ""
        if self.device.type == "cuda" and torch.cuda.is_available():
            alloc = torch.cuda.max_memory_allocated(self.device) / 1024**3
            total = torch.cuda.get_device_properties(self.device).total_memory / 1024**3
            used = f" (peak allocated {alloc:.2f} GiB of {total:.2f} GiB)"
            torch.cuda.empty_cache()
        return (f"CUDA ran out of memory at step {self.step}{used}.\n"
                "Knobs, from cheapest to dearest:\n"
                "  - halve the micro-batch and double TrainConfig.grad_accum (same tokens per step, same result);\n"
                "  - turn on activation checkpointing in the model config, if the chapter offers it;\n"
                "  - shorten the sequence length / image size;\n"
                "  - see where the memory goes first: `labkit vram NOTEBOOK --size full` prints the breakdown.")

    def _draw(self, final: bool = False) -> None:
        if not self.cfg.live_plot or not self.is_main or not _in_notebook():
            return
        evals = [h for h in self.history if "val_loss" in h]
        if len(evals) < 1 or (final and self._plot_handle is None and len(evals) < 2):
            return
        import matplotlib.pyplot as plt
        from IPython.display import display

        from labkit.plot import history_curves, loss_curves

        fig = loss_curves(history_curves(self.history), title="Training (live)" if not final else "Training")
        if self._plot_handle is None:
            self._plot_handle = display(fig, display_id=True)
        else:
            self._plot_handle.update(fig)
        plt.close(fig)
