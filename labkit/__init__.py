"""labkit: the small shared toolkit of the course.

The models live in the chapter notebooks; labkit holds only what every chapter shares:
the size switch, device choice, data, one Trainer, the VRAM meter, exercise checks,
notebook loading and one plotting style.
"""
from labkit.config import SIZES, size, is_full, pick, runs_dir
from labkit.device import device, amp_dtype, seed_everything, doctor

__all__ = ["SIZES", "size", "is_full", "pick", "runs_dir", "device", "amp_dtype", "seed_everything", "doctor"]
__version__ = "0.1.0"
