"""Gradient comparison shared by the reference tests: ours vs a reference model's, parameter by parameter."""
from typing import Callable

import torch


def grad_errors(ours: torch.nn.Module, ref_grad: Callable[[str], torch.Tensor], atol: float,
                rtol: float = 1e-4) -> tuple[float, list[str]]:
    """(max abs error over all parameters, the parameters beyond ``atol + rtol * max|reference grad|``).

    ``ref_grad(name)`` gives the reference's gradient for our parameter ``name`` (a renamed parameter, or a sum
    over the reference's copies of a shared one)."""
    worst, bad = 0.0, []
    for name, p in ours.named_parameters():
        g_ref = ref_grad(name)
        err = (p.grad - g_ref).abs().max().item()
        worst = max(worst, err)
        if err > atol + rtol * g_ref.abs().max().item():
            bad.append(f"{name}: {err:.1e}")
    return worst, bad
