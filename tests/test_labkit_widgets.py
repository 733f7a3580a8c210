"""labkit.widgets: the explorer's controls, its headless use (what the chapters' tests do), the static fallback,
and the VRAM calculator."""
import matplotlib.pyplot as plt
import pytest
import torch

from labkit import notebook, widgets
from labkit.widgets import explore


def _compute(temperature=1.0, top_k=5, greedy=False):
    return {"temperature": temperature, "top_k": top_k, "greedy": greedy}


def _plot(data):
    fig, ax = plt.subplots()
    ax.bar([0], [data["temperature"]])
    return fig


def test_explorer_starts_at_compute_defaults_and_set_recomputes():
    calls = []

    def compute(temperature=1.0, top_k=5, greedy=False):
        calls.append(temperature)
        return _compute(temperature, top_k, greedy)

    view = explore(compute, _plot, title="t", temperature=(0.1, 2.0, 0.1), top_k=[1, 5, 20], greedy=False)
    assert view.values == {"temperature": 1.0, "top_k": 5, "greedy": False} and calls == [1.0]
    assert view.set(temperature=0.5, top_k=20) == {"temperature": 0.5, "top_k": 20, "greedy": False}
    assert view.result["top_k"] == 20 and view.calls == 2
    assert isinstance(view.figure(), plt.Figure)
    assert "temperature = 0.5" in view.caption()


def test_explorer_integer_slider_and_clear_errors():
    view = explore(lambda n=3: n * 2, n=(1, 10))
    assert view.controls["n"].integer and view.set(n=4) == 8 and isinstance(view.result, int)
    with pytest.raises(ValueError, match=r"n must be a number in \[1, 10\]"):
        view.set(n=11)
    with pytest.raises(TypeError, match="no control named"):
        view.set(m=1)
    with pytest.raises(ValueError, match="must be one of"):
        explore(_compute, top_k=[1, 2])              # the default 5 is not a choice
    with pytest.raises(TypeError, match="needs a default"):
        explore(lambda x: x, x=(0, 1))
    with pytest.raises(TypeError, match="not a parameter"):
        explore(_compute, nope=(0, 1))
    with pytest.raises(TypeError, match="for a slider"):
        explore(_compute, temperature="hot")
    with pytest.raises(ValueError, match="lo < hi"):
        explore(_compute, temperature=(2.0, 1.0))
    with pytest.raises(ValueError, match="at least one control"):
        explore(_compute)


def test_static_fallback_shows_the_figure_at_the_defaults(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: shown.append(obj))
    monkeypatch.setenv(widgets.STATIC_ENV, "1")
    view = explore(_compute, _plot, title="Sampling", temperature=(0.1, 2.0))
    view._ipython_display_()
    assert not widgets._live()
    assert "Sampling: at temperature = 1.0" in shown[0].data and isinstance(shown[1], plt.Figure)


def test_live_mode_builds_controls_that_redraw(monkeypatch):
    import ipywidgets as w

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: shown.append(obj))
    monkeypatch.setattr(widgets, "_live", lambda: True)
    view = explore(_compute, _plot, temperature=(0.1, 2.0), top_k=[1, 5], greedy=False)
    view._ipython_display_()
    box = shown[0]
    assert isinstance(box, w.VBox)
    sliders = box.children[0].children
    assert [type(s).__name__ for s in sliders] == ["FloatSlider", "Dropdown", "Checkbox"]
    sliders[0].value = 0.3                           # what moving the slider does
    assert view.result["temperature"] == pytest.approx(0.3) and view.calls == 2


@pytest.fixture(scope="module")
def gpt():
    return notebook.load("01_mingpt")


def test_vram_calculator_moves_the_lines_it_should(gpt):
    GPT, GPTConfig = gpt["GPT"], gpt["GPTConfig"]
    view = widgets.vram_calculator(lambda p, T: GPT(GPTConfig.preset(p, block_size=T, vocab_size=512)),
                                   ["gpt-micro", "gpt-mini"], vocab_size=512, micro_batch=8, seq_len=256,
                                   seq_lens=(128, 256))
    base = view.result
    bigger = view.set(micro_batch=16)
    assert bigger.breakdown["activations"] > 1.5 * base.breakdown["activations"]
    assert bigger.breakdown["params"] == base.breakdown["params"]
    checkpointed = view.set(checkpointing=True)
    assert checkpointed.breakdown["activations"] < 0.6 * bigger.breakdown["activations"], (bigger, checkpointed)
    eight = view.set(adam_8bit=True)
    n = sum(p.numel() for p in GPT(GPTConfig.preset("gpt-micro", block_size=256, vocab_size=512)).parameters())
    assert eight.breakdown["optimizer"] == 2 * n + 8 * -(-n // widgets.ADAM8_BLOCK)
    assert eight.breakdown["optimizer"] < checkpointed.breakdown["optimizer"] / 3
    larger = view.set(preset="gpt-mini")
    assert larger.breakdown["params"] > eight.breakdown["params"]
    assert isinstance(view.figure(), plt.Figure)
    print(f"gpt-micro 8×256: {base.peak_bytes / 2**20:.0f} MiB; ×16: {bigger.peak_bytes / 2**20:.0f}; "
          f"checkpointed {checkpointed.peak_bytes / 2**20:.0f}; 8-bit AdamW {eight.peak_bytes / 2**20:.0f}")


def test_checkpoint_blocks_keeps_the_numbers(gpt):
    GPT, GPTConfig = gpt["GPT"], gpt["GPTConfig"]
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt-nano", vocab_size=11, block_size=8))
    idx = torch.randint(11, (2, 8))
    loss = model(idx, idx)[1]
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    widgets.checkpoint_blocks(model)
    loss2 = model(idx, idx)[1]
    loss2.backward()
    assert torch.equal(loss, loss2)
    assert all(torch.allclose(g, p.grad) for g, p in zip(grads, model.parameters()))
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        widgets.checkpoint_blocks(torch.nn.Linear(2, 2))
