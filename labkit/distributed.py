"""Beyond one GPU: what ``labkit.train.Trainer`` does when it runs under ``torchrun``.

Nothing here is called in a single process: without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)
the Trainer never imports this module and trains exactly as it always did.

Under ``torchrun --nproc_per_node=N`` every rank runs the same script and builds the same Trainer. Then
    * the process group comes from torchrun's environment: NCCL on CUDA (one GPU per local rank), gloo on CPU;
    * the model is wrapped as ``TrainConfig.strategy`` (or ``LABKIT_STRATEGY``) says:
        ``ddp``  - DistributedDataParallel: every rank holds all weights; gradients are averaged (all-reduce)
                   once per optimizer step (``no_sync`` on the other micro-batches);
        ``fsdp`` - FSDP2 (``fully_shard``) per block and at the root: each rank holds 1/N of the weights,
                   gradients and optimizer state; a block's weights are gathered just before it runs, with a
                   mixed-precision policy (weights in the autocast dtype for compute, gradients reduced in fp32);
    * ``grad_accum`` stays the number of micro-batches per optimizer step *over all ranks*: every rank draws all
      of them from the same seeded generator and keeps micro-batch i when i % N == rank. The union is what one
      process draws, the generator state is the same on every rank, and so a run is reproducible, its weights
      equal a single-process run's (up to the order of float sums), and a checkpoint resumes on any N that
      divides ``grad_accum``;
    * checkpoints are ``torch.distributed.checkpoint`` folders (each rank writes its shard), written to a temp
      folder and swapped in, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    strategy: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def strategy_from(configured: str | None) -> str:
    strategy = configured or os.environ.get("LABKIT_STRATEGY", "ddp")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} (got {strategy!r})")
    return strategy


def setup(device: torch.device | None, strategy: str, grad_accum: int) -> Dist:
    """Join the process group torchrun prepared; pick this rank's device; check the batch splits evenly."""
    rank, world, local = (int(os.environ[k]) for k in TORCHRUN_ENV)
    if grad_accum % world:
        raise ValueError(f"TrainConfig.grad_accum={grad_accum} is the number of micro-batches per optimizer step "
                         f"over all {world} processes, so it must be a multiple of the world size {world}: "
                         f"use grad_accum={world * max(1, round(grad_accum / world))} (or another multiple)")
    if device is None:
        from labkit.device import device as default_device
        device = default_device()
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but this machine sees {torch.cuda.device_count()} GPU(s): "
                               "start at most one process per GPU (torchrun --nproc_per_node=<number of GPUs>)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        if not dist.is_nccl_available():
            raise RuntimeError("this torch build has no NCCL (the CUDA communication library; Windows and macOS builds "
                               "lack it): install a Linux CUDA build of torch, or train on the CPU with gloo "
                               "(LABKIT_DEVICE=cpu)")
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise RuntimeError(f"torchrun on a {device.type!r} device is not supported: use CUDA (NCCL) or the CPU (gloo)")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if dist.get_world_size() != world:
        raise RuntimeError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE={world}")
    return Dist(rank, world, local, strategy, device)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the entries of the ModuleList holding the most parameters
    (GPT's ``transformer.h``, a U-Net's stages...). Empty if the model has none (then only the root is sharded)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return []
    biggest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(biggest)


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that forwards unknown attributes to the wrapped model, so loss functions that call
    ``model.something(...)`` work unchanged (a plain DDP only has ``.module``)."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model: nn.Module, d: Dist, amp_dtype: torch.dtype | None) -> nn.Module:
    """The module the training step calls: a DDP wrapper, or the model itself sharded in place by FSDP2."""
    if d.strategy == "ddp":
        # gradient_as_bucket_view: the gradients live in DDP's communication buckets instead of beside them
        # (the default keeps both: one more copy of every gradient)
        return _DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if amp_dtype == torch.float16:
        raise ValueError("FSDP here supports bf16 or fp32 (fp16 needs a sharded loss scaler): set TrainConfig.amp='bf16'")
    with torch.no_grad():  # FSDP2 shards each rank's own copy: make sure they all start from rank 0's
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=0)
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def rebind_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], model: nn.Module):
    """The same optimizer (class, groups, hyper-parameters) over the model's new parameters, matched by name:
    FSDP2 replaces each parameter with a sharded one, so an optimizer built before it points at dead tensors."""
    if optimizer.state:
        raise ValueError("under FSDP, pass an optimizer that has not stepped yet (its state cannot be re-sharded)")
    new = dict(model.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [new[names[id(p)]] for p in g["params"]]}
              for g in optimizer.param_groups]
    return type(optimizer)(groups, **optimizer.defaults)


def accumulating(net: nn.Module, d: Dist, last: bool):
    """DDP skips its all-reduce on every micro-batch but the last of a step. FSDP2 reduce-scatters every
    micro-batch: keeping unsharded gradients instead would undo its memory saving."""
    return net.no_sync() if d.strategy == "ddp" and not last else contextlib.nullcontext()


def mine(items, d: Dist):
    """Yield the items (drawn in the same order on every rank) that belong to this rank: i % world == rank."""
    for i, item in enumerate(items):
        if i % d.world_size == d.rank:
            yield item


def global_sum(value: float, d: Dist) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item()


def from_main(obj, d: Dist):
    """Rank 0's copy of a picklable object, on every rank (so every rank logs the same history)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=d.device if d.device.type == "cuda" else None)
    return box[0]


def on_main(fn, model: nn.Module, d: Dist):
    """Run an eval_fn (samples, accuracy...) for rank 0 and hand its result to every rank. Under DDP rank 0
    alone runs it; under FSDP every rank must (each forward gathers shards from all), the others silenced."""
    result = None
    if d.is_main:
        result = fn(model)
    elif d.strategy == "fsdp":
        with contextlib.redirect_stdout(io.StringIO()):
            fn(model)
    return from_main(result, d)


class StopRequest:
    """Ctrl-C under torchrun, without losing the run. The terminal's SIGINT reaches every rank at once, and torchrun
    passes it (or its SIGTERM) on and kills what is left 30 s later. A KeyboardInterrupt would stop each rank at a
    different instruction, one inside an all-reduce, another not, and the collective checkpoint could not be
    written. So during ``fit`` these signals only set a flag; at each step boundary the ranks agree (``agreed``: one
    all-reduce of one number) and all stop together, at the same step, and save one consistent checkpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._old = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def agreed(self, d: Dist) -> bool:
        """True on every rank as soon as any rank was asked to stop."""
        t = torch.tensor([float(self.requested)], device=d.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def seed_dropout(seed: int, step: int, d: Dist) -> None:
    """Each rank's dropout RNG is a function of (seed, step, rank): ranks differ, and a resume on any number of
    ranks continues reproducibly without per-rank RNG state in the checkpoint."""
    torch.manual_seed((seed * 1_000_003 + step * 1_009 + d.rank) % 2**63)


# ---------------------------------------------------------------- checkpoints (torch.distributed.checkpoint)
def is_dcp(path: str | os.PathLike) -> bool:
    return (Path(path) / ".metadata").is_file()


def _json_tensor(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def save(path: str | os.PathLike, model: nn.Module, optimizer, generator: torch.Generator, extra: dict,
         d: Dist | None, tracked: dict | None = None) -> Path:
    """Write a sharded checkpoint folder: model and optimizer (each rank its shard), the data generator and
    the trainer's counters (as JSON in a byte tensor, so loading never unpickles). Temp folder, then swap."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "generator": generator.get_state(), "trainer": _json_tensor(extra)}
    if tracked:  # Trainer.track's state (an EMA copy: the same on every rank), kept as plain tensors
        state["tracked"] = tracked
    tmp = path.with_name(path.name + ".tmp")
    main = d is None or d.is_main
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if d is not None:
        dist.barrier()
    dcp.save(state, checkpoint_id=tmp)
    if d is not None:
        dist.barrier()
    if main:  # the swap: a crash between the two renames leaves NAME.old, which load() falls back to
        old = path.with_name(path.name + ".old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    if d is not None:
        dist.barrier()
    return path


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint folder to read: PATH, or PATH.old if a save was interrupted mid-swap."""
    path, old = Path(path), Path(str(path) + ".old")
    return old if not path.exists() and is_dcp(old) else path


def load(path: str | os.PathLike, model: nn.Module, optimizer, generator: torch.Generator,
         tracked: dict | None = None) -> dict:
    """Read a checkpoint folder written by any number of ranks into this run (any number of ranks, 1 included:
    torch.distributed.checkpoint re-shards on load). Returns the trainer's counters, with the state of
    Trainer.track's objects under "tracked" when ``tracked`` (their current state dicts, as templates) is given."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = resolve(path)
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if "trainer" not in meta:
        raise ValueError(f"{path} is a torch.distributed.checkpoint folder but not a labkit Trainer checkpoint")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "generator": torch.empty_like(generator.get_state()),
             "trainer": torch.empty(meta["trainer"].size, dtype=torch.uint8)}
    has_tracked = any(k.startswith("tracked.") for k in meta)
    if tracked and has_tracked:
        state["tracked"] = tracked
    wanted = {f"model.{k}" for k in model_sd}
    stored = {k for k in meta if k.startswith("model.")}
    if wanted != stored:
        raise ValueError(f"checkpoint {path} does not match this model: "
                         f"missing {sorted(wanted - stored)[:5]}, unexpected {sorted(stored - wanted)[:5]}")
    resized = [f"{k}: {tuple(meta['model.' + k].size)} stored, {tuple(v.shape)} here" for k, v in model_sd.items()
               if tuple(meta["model." + k].size) != tuple(v.shape)]
    if resized:
        raise ValueError(f"checkpoint {path} does not match this model: " + "; ".join(resized[:5]))
    try:
        dcp.load(state, checkpoint_id=path)
    except CheckpointException as e:  # a BaseException listing every rank's traceback: keep the last line
        raise ValueError(f"checkpoint {path} does not fit this run: {str(e).strip().splitlines()[-1]}") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    generator.set_state(state["generator"])
    counters = json.loads(bytes(state["trainer"].tolist()).decode())
    if tracked and has_tracked:
        counters["tracked"] = state["tracked"]
    return counters
