"""Device and dtype choice, seeding, and the ``labkit doctor`` report."""
from __future__ import annotations

import os
import platform
import random

import numpy as np
import torch

from labkit.config import size

# Dense bf16/fp16 tensor-core peak (FLOP/s, fp32 accumulate) of cards readers are likely to have,
# from the vendors' architecture whitepapers. Used for MFU; unknown devices simply report no MFU.
GPU_PEAK_FLOPS = {
    "RTX 4070": 58.3e12,
    "RTX 4070 Ti": 80.2e12,
    "RTX 4080": 97.5e12,
    "RTX 4090": 165.2e12,
    "RTX 3060": 25.6e12,
    "RTX 3090": 71.0e12,
    "T4": 65.0e12,
    "L4": 121.0e12,
    "A10": 125.0e12,
    "A100": 312.0e12,
    "H100": 989.0e12,
    "H200": 989.0e12,
}


def device() -> torch.device:
    """The best device here: CUDA, then Apple MPS, then CPU. ``LABKIT_DEVICE`` overrides."""
    forced = os.environ.get("LABKIT_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def native_bf16(dev: torch.device | str | None = None) -> bool:
    """Does this CUDA GPU compute in bf16 natively (compute capability 8.0+: Ampere, Ada, Hopper)?

    ``torch.cuda.is_bf16_supported()`` is also true on older cards (a T4 is 7.5), where bf16 is emulated
    and slow: those train in fp16 with a GradScaler instead."""
    dev = torch.device(dev) if dev is not None else device()
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 0)


def amp_dtype(dev: torch.device | str | None = None) -> torch.dtype | None:
    """The autocast dtype for training: bf16 on GPUs with native bf16, fp16 (the Trainer adds a GradScaler) on
    older CUDA GPUs, None (fp32) elsewhere."""
    dev = torch.device(dev) if dev is not None else device()
    if dev.type == "cuda":
        return torch.bfloat16 if native_bf16(dev) else torch.float16
    return None  # CPU/MPS: fp32 keeps the tiny runs exact and deterministic


def compile_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """``model`` compiled in place with ``torch.compile`` (same object, same state_dict keys), or left eager with
    one line saying why where compiling is unavailable (Windows without a compiler, some MPS builds): the
    result is the same, only slower. A compile failure shows at the first call, so that call falls back too."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        print(f"torch.compile is not supported here (Python {platform.python_version()}, {platform.system()}): "
              "running eagerly, same results, slower")
        return model
    model.compile(**kwargs)
    compiled = model._compiled_call_impl

    def first_call(*args, **kw):
        try:
            out = compiled(*args, **kw)
        except Exception as e:  # a real bug in the model raises again below, eagerly
            model._compiled_call_impl = None
            e = getattr(e, "inner_exception", None) or e   # dynamo wraps the backend's error: say what went wrong
            first_line = (str(e).strip().splitlines() or [""])[0][:160]
            print(f"torch.compile failed here ({type(e).__name__}: {first_line}): running eagerly, same results, slower")
            return model(*args, **kw)
        model._compiled_call_impl = compiled
        return out

    model._compiled_call_impl = first_call
    return model


def seed_everything(seed: int = 1337) -> torch.Generator:
    """Seed Python, NumPy and torch; return a fresh torch.Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def peak_flops(dev: torch.device | str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of this GPU if it is in the table, else None."""
    dev = torch.device(dev) if dev is not None else device()
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return GPU_PEAK_FLOPS[key]
    return None


def doctor() -> dict:
    """What this machine can do, and what size of the course to run on it."""
    dev = device()
    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(dev),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "size": size(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        report.update(
            gpu=props.name,
            vram_gib=round(props.total_memory / 1024**3, 2),
            bf16=native_bf16(dev),                  # else fp16 + GradScaler (bf16 would be emulated)
            amp=str(amp_dtype(dev)).removeprefix("torch."),
            peak_tflops=(peak_flops(dev) or 0) / 1e12 or None,
        )
        report["advice"] = (
            "run the full size: LABKIT_SIZE=full" if props.total_memory >= 11.5 * 1024**3
            else "less than 12 GB of VRAM: full configs may not fit; lower the micro-batch, or stay on tiny"
        )
    else:
        report["advice"] = "no CUDA GPU: run the tiny size (the default); each chapter takes about a minute"
    return report
