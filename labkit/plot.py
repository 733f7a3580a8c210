"""One plotting style for the whole book: loss curves, image grids, memory bars."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

import matplotlib.pyplot as plt
import torch

PALETTE = ["#3b6fb6", "#d9742b", "#4c9a5b", "#b8463d", "#7d5ba6", "#8c6d46", "#c45c9b", "#6b6b6b"]
STYLE = {
    "figure.figsize": (7.0, 3.6),
    "figure.dpi": 110,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titleweight": "bold",
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "legend.frameon": False,
    "font.size": 10,
}


def apply_style() -> None:
    plt.rcParams.update(STYLE)


def loss_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str = "Loss",
                xlabel: str = "step", ylabel: str = "loss", logy: bool = False, ax=None):
    """Plot named curves ``{label: (xs, ys)}`` on one axis; returns the Figure."""
    apply_style()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots()
    for label, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    return fig


def history_curves(history: Sequence[Mapping], keys=("train_loss", "val_loss"), x: str = "step") -> dict:
    """Turn a Trainer history (list of dicts) into ``{key: (xs, ys)}`` for :func:`loss_curves`."""
    out = {}
    for k in keys:
        pts = [(h[x], h[k]) for h in history if h.get(k) is not None]
        if pts:
            out[k.replace("_", " ")] = tuple(zip(*pts))
    return out


def image_grid(images: torch.Tensor, *, nrow: int = 8, title: str = "", captions: Sequence[str] | None = None,
               value_range: tuple[float, float] = (-1.0, 1.0), ax=None):
    """Show a batch of images (N, C, H, W) in a grid. Values are mapped from ``value_range`` to [0, 1]."""
    apply_style()
    x = images.detach().float().cpu()
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    pad = 2
    grid = torch.ones(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(1.1 * ncol, 12), min(1.1 * nrows + (0.4 if title else 0), 12)))
    else:
        fig = ax.figure
    img = grid.permute(1, 2, 0).numpy()
    ax.imshow(img[..., 0] if c == 1 else img, cmap="gray" if c == 1 else None, interpolation="nearest")
    ax.set_axis_off()
    ax.grid(False)
    if title:
        ax.set_title(title)
    if captions is not None:
        ax.set_xlabel("; ".join(captions[:ncol]))
    fig.tight_layout()
    return fig


def bars(values: Mapping[str, float], *, title: str, xlabel: str, ax=None, fmt: str = "{:.2f}"):
    """Horizontal bars with the values printed at their ends (timings, speed-ups)."""
    apply_style()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 0.45 * len(values) + 1.2))
    names, vals = list(values), list(values.values())
    ax.barh(names, vals, color=PALETTE[: len(vals)])
    for i, v in enumerate(vals):
        ax.text(v, i, " " + fmt.format(v), va="center")
    ax.invert_yaxis()
    ax.set(title=title, xlabel=xlabel)
    fig.tight_layout()
    return fig
