"""Interactive explorations: sliders and menus over a function, live in Jupyter, a still figure in the book.

    view = explore(sample_stats, plot_stats, temperature=(0.1, 2.0, 0.1), top_k=[0, 1, 5, 20])
    view                      # last line of a cell: the controls and the figure (Jupyter, Colab)
    view.set(temperature=0.3) # what a test does: recompute with new values, returns compute's result

``compute(**values)`` does the work and returns data (numbers, tensors, a dict); ``plot(data)`` draws it and
returns a matplotlib Figure. Keeping the two apart is what lets tests drive a widget headless: they set values and
check the data, not the pixels. The start values are ``compute``'s own defaults, so the built book (where nothing
runs live) shows the figure at those defaults. Controls follow ``ipywidgets.interact``'s shorthand:

    (lo, hi) or (lo, hi, step)   a slider (integer if all three are ints)
    [a, b, c]                    a menu of those choices
    True / False                 a check box

Static mode (the figure at the defaults, no controls): when ``LABKIT_STATIC=1`` (``make book`` sets it), when
ipywidgets is missing, or outside a Jupyter kernel.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable

STATIC_ENV = "LABKIT_STATIC"


def _live() -> bool:
    if os.environ.get(STATIC_ENV, "") not in ("", "0"):
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class Control:
    """One control: its kind (``slider``, ``menu``, ``toggle``), range or choices, and a value check."""

    def __init__(self, name: str, spec: Any):
        self.name = name
        if isinstance(spec, bool):
            self.kind, self.choices = "toggle", [False, True]
        elif isinstance(spec, tuple) and len(spec) in (2, 3) and all(isinstance(v, (int, float)) for v in spec):
            lo, hi, *step = spec
            if not lo < hi:
                raise ValueError(f"control {name!r}: a slider needs lo < hi, got {spec}")
            self.integer = all(isinstance(v, int) and not isinstance(v, bool) for v in spec)
            self.kind, self.lo, self.hi = "slider", lo, hi
            self.step = step[0] if step else (1 if self.integer else (hi - lo) / 100)
        elif isinstance(spec, list) and spec:
            self.kind, self.choices = "menu", list(spec)
        else:
            raise TypeError(f"control {name!r}: use (lo, hi[, step]) for a slider, a non-empty list for a menu or "
                            f"a bool for a check box; got {spec!r}")

    def check(self, value):
        if self.kind == "slider":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.lo <= value <= self.hi:
                raise ValueError(f"{self.name} must be a number in [{self.lo}, {self.hi}], got {value!r}")
            return int(value) if self.integer else float(value)
        if value not in self.choices:
            raise ValueError(f"{self.name} must be one of {self.choices}, got {value!r}")
        return value

    def widget(self, value):
        import ipywidgets as w

        style, layout = {"description_width": "initial"}, w.Layout(width="auto")
        if self.kind == "toggle":
            return w.Checkbox(value=value, description=self.name, style=style)
        if self.kind == "menu":
            return w.Dropdown(options=[(str(c), c) for c in self.choices], value=value, description=self.name,
                              style=style, layout=layout)
        cls = w.IntSlider if self.integer else w.FloatSlider
        return cls(value=value, min=self.lo, max=self.hi, step=self.step, description=self.name,
                   continuous_update=False, style=style, layout=w.Layout(width="420px"))


class Explorer:
    """The object ``explore`` returns. ``values`` are the current control values, ``result`` compute's last result,
    ``set(**values)`` recomputes (a test's way in), ``figure()`` draws the current result."""

    def __init__(self, compute: Callable, plot: Callable | None = None, title: str | None = None, **controls):
        if not controls:
            raise ValueError("explore needs at least one control, e.g. temperature=(0.1, 2.0)")
        self.compute, self.plot, self.title = compute, plot, title
        params = inspect.signature(compute).parameters
        self.controls = {name: Control(name, spec) for name, spec in controls.items()}
        self.values = {}
        for name, control in self.controls.items():
            if name not in params:
                raise TypeError(f"control {name!r} is not a parameter of {compute.__name__}{inspect.signature(compute)}")
            default = params[name].default
            if default is inspect.Parameter.empty:
                raise TypeError(f"{compute.__name__}'s parameter {name!r} needs a default: it is the value the "
                                f"page shows when nothing runs live")
            self.values[name] = control.check(default)
        self.result = compute(**self.values)
        self.calls = 1

    def set(self, **values):
        unknown = set(values) - set(self.controls)
        if unknown:
            raise TypeError(f"no control named {sorted(unknown)}; the controls are {list(self.controls)}")
        checked = {name: self.controls[name].check(v) for name, v in values.items()}
        self.values.update(checked)
        self.result = self.compute(**self.values)
        self.calls += 1
        return self.result

    def figure(self):
        """The current result drawn by ``plot`` (None without one)."""
        return self.plot(self.result) if self.plot is not None else None

    def caption(self) -> str:
        shown = ", ".join(f"{k} = {v}" for k, v in self.values.items())
        return f"{self.title + ': ' if self.title else ''}at {shown} (in Jupyter or Colab the controls change them)"

    def _show(self):
        from IPython.display import display

        import matplotlib.pyplot as plt

        fig = self.figure()
        if fig is None:
            display(self.result)
        else:
            display(fig)
            plt.close(fig)

    def _ipython_display_(self):
        from IPython.display import Markdown, display

        if not _live():
            display(Markdown(f"*{self.caption()}*"))
            self._show()
            return
        import ipywidgets as w

        out = w.Output()
        widgets = {name: c.widget(self.values[name]) for name, c in self.controls.items()}

        def redraw(_=None):
            try:
                self.set(**{name: wd.value for name, wd in widgets.items()})
            except Exception as e:  # noqa: BLE001 - shown to the reader, the widget stays alive
                with out:
                    out.clear_output(wait=True)
                    print(f"{type(e).__name__}: {e}")
                return
            with out:
                out.clear_output(wait=True)
                self._show()

        for wd in widgets.values():
            wd.observe(redraw, names="value")
        header = [w.HTML(f"<b>{self.title}</b>")] if self.title else []
        display(w.VBox([*header, w.HBox(list(widgets.values()), layout=w.Layout(flex_flow="row wrap")), out]))
        with out:
            self._show()


def explore(compute: Callable, plot: Callable | None = None, *, title: str | None = None, **controls) -> Explorer:
    """An interactive view of ``compute`` over ``controls`` (see the module's text); computes once at the defaults."""
    return Explorer(compute, plot, title, **controls)


# --- the VRAM calculator --------------------------------------------------------------------------------

AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": None}
ADAM8_BLOCK = 256      # values per absmax scale in a block-wise 8-bit optimizer (bitsandbytes' AdamW8bit)


def checkpoint_blocks(model):
    """Activation checkpointing on every repeated block (``labkit.distributed.blocks``): each keeps only its input
    and recomputes the rest in the backward pass. Returns the model (changed in place)."""
    import functools

    import torch.utils.checkpoint as ckpt

    from labkit.distributed import blocks

    found = blocks(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to checkpoint")
    for block in found:
        block.forward = functools.partial(ckpt.checkpoint, block.forward, use_reentrant=False)
    return model


def with_8bit_optimizer(report, trainable_numel: int):
    """``report`` (traced with fp32 AdamW) with the optimizer line of a block-wise 8-bit AdamW: m and v in one byte
    each plus one fp32 scale per ``ADAM8_BLOCK`` values of each. The line is recomputed, not traced (the 8-bit
    kernels are CUDA-only): the rest of the breakdown is the fp32 trace's."""
    from labkit.vram import _with_gpu_lines

    traced = {k: v for k, v in report.breakdown.items() if k not in ("cuda_context", "allocator_overhead")}
    traced["optimizer"] = 2 * trainable_numel + 2 * 4 * -(-trainable_numel // ADAM8_BLOCK)
    return _with_gpu_lines(report.name + ", 8-bit AdamW", traced, report.budget_bytes, report.notes)


def vram_calculator(make_model, presets, *, vocab_size: int, budget_gb: float = 12.0, micro_batch: int = 4,
                    seq_len: int = 1024, seq_lens=(256, 512, 1024, 2048), title: str = "VRAM calculator"):
    """An explorer over one training step's estimated peak (``labkit.vram.estimate``): model preset, micro-batch,
    sequence length, autocast dtype, activation checkpointing, 8-bit AdamW; the bar against ``budget_gb``.

    ``make_model(preset, seq_len)`` builds a language model called as ``model(idx, targets) -> (logits, loss)``
    (it runs on the meta device: free at any size). Each change traces a step: a few seconds for GPT-2 124M."""
    import torch

    from labkit.vram import TrainJob, estimate

    presets = list(presets)

    def compute(preset=presets[0], micro_batch=micro_batch, seq_len=seq_len, dtype="bf16", checkpointing=False,
                adam_8bit=False):
        def model():
            m = make_model(preset, seq_len)
            return checkpoint_blocks(m) if checkpointing else m

        def batch():
            idx = torch.randint(vocab_size, (micro_batch, seq_len))
            return idx, idx

        amp = AMP_DTYPES[dtype]
        job = TrainJob(make_model=model, make_batch=batch, loss_fn=lambda m, b: m(*b)[1],
                       amp_dtype=getattr(torch, amp) if amp else None,
                       name=f"{preset}, {micro_batch}×{seq_len}, {dtype}" + (", checkpointed" if checkpointing else ""))
        report = estimate(job, budget_gb=budget_gb)
        if adam_8bit:
            with torch.device("meta"):
                n = sum(p.numel() for p in make_model(preset, seq_len).parameters() if p.requires_grad)
            report = with_8bit_optimizer(report, n)
        return report

    return explore(compute, lambda report: report.plot(), title=title, preset=presets,
                   micro_batch=(1, 32), seq_len=list(seq_lens),
                   dtype=list(AMP_DTYPES), checkpointing=False, adam_8bit=False)
