"""What the reference tests share: weights off their defaults, one upstream gradient for both models, and the
parameter-by-parameter gradient comparison."""
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


@torch.no_grad()
def perturb_(model: torch.nn.Module, scale: float = 0.1, seed: int | None = None) -> torch.nn.Module:
    """Move every parameter off its initial value (LayerNorm 1/0, zero biases, D = 1), so that no match is a lucky
    one. ``seed``: draw from a generator of that seed instead of the global one."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def backward_same(*outputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Backpropagate one random upstream gradient g through each output (all of one shape): d sum(out * g)."""
    upstream = torch.randn(outputs[0].shape, generator=generator, dtype=outputs[0].dtype)
    for out in outputs:
        (out * upstream).sum().backward()
    return upstream


def report(name: str, got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> float:
    """Print the max abs error of ``got`` against ``expected``, assert they are close; return the error."""
    err = (got - expected).abs().max().item()
    print(f"{name}: max abs error {err:.2e} (|ref| max {expected.abs().max().item():.2e})")
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    return err
