"""The course's benchmarks: how fast it runs, and how close to the machine's limit.

    python -m benchmarks                 list them
    python -m benchmarks NAME [ARGS...]  run one (``--help`` after the name for its options)

Results go to ``benchmarks/results/``. Speed targets are printed, never asserted by the tests.

Note: fairscale (a dependency of the RetNet reference) installs a top-level package also called ``benchmarks``.
Run these from the repository root (``python -m`` puts it first on the path) or as ``python benchmarks/NAME.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Whole-course benchmarks: name -> (module with a `main(argv) -> int`, what it measures).
SCRIPTS = {
    "course_time": ("benchmarks.course_time", "every chapter at the tiny size: wall time and peak RAM; README table"),
    "cpu_mfu": ("benchmarks.cpu_mfu", "this CPU's GEMM roofline vs the tiny GPT training step (MFU, fp32 and bf16)"),
    "gpu_memory": ("benchmarks.gpu_memory", "on a CUDA GPU: real peak memory of each full config vs labkit.vram"),
}


@dataclass(frozen=True)
class Kernel:
    """A chapter's own kernel benchmark: a function defined in the notebook's `model` (or `bench`) cells."""
    notebook: str
    function: str
    about: str
    kwargs: dict = field(default_factory=dict)


# The scan / recurrence chapters' kernel benchmarks. A chapter registers its own with one line here.
KERNELS = {
    "mamba_scans": Kernel("07_mamba", "benchmark_scans", "Mamba: sequential vs parallel selective scan",
                          {"lengths": (64, 256, 1024)}),
    "llmc": Kernel("03_llmc", "benchmark_c_vs_torch", "llm.c: a GPT-2 training step in C vs eager PyTorch",
                   {"shapes": ("tiny", "bigger"), "steps": 3}),
    "rwkv_wkv": Kernel("08_rwkv", "benchmark_wkv", "RWKV-4: WKV as recurrence (autograd / hand-written backward), T×T matrix, chunked scan",
                       {"lengths": (64, 256, 1024)}),
    "retnet_forms": Kernel("09_retnet", "benchmark_retention", "RetNet: parallel vs chunkwise vs recurrent retention, decode cost per token",
                           {"lengths": (256, 1024, 4096)}),
    "speedrun": Kernel("12_speedrun", "benchmark_speedrun",
                       "speedrun: chapter 02's tiny recipe vs the chapter's final recipe, time to the same val loss",
                       {"repeats": 2}),
}
