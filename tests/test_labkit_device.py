"""labkit.device on GPUs this machine does not have (faked capabilities), fp16 with the GradScaler on the CPU,
and the torch.compile fallback."""
import pytest
import torch
from torch import nn

from labkit.device import amp_dtype, compile_model, doctor, native_bf16
from labkit.device import device as best_device
from labkit.train import TrainConfig, Trainer

from .test_labkit_train import TinyModel, get_batch


class Affine(nn.Module):
    """A model of the reader's own (torch.compile leaves torch's built-in modules such as a bare nn.Linear alone)."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))

    def forward(self, x):
        return torch.tanh(x @ self.weight.T + self.bias)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA GPU of a given compute capability that, like a T4, claims bf16 support (emulated below 8.0)."""
    def make(capability, name="NVIDIA GPU", total_gib=15):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
        props = type("Props", (), {"name": name, "total_memory": int(total_gib * 1024**3)})()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: props)
        monkeypatch.delenv("LABKIT_DEVICE", raising=False)
    return make


@pytest.mark.parametrize("capability, name, expected", [
    ((7, 5), "Tesla T4", torch.float16),           # Colab's free GPU: bf16 only emulated
    ((7, 0), "Tesla V100-SXM2-16GB", torch.float16),
    ((8, 6), "NVIDIA GeForce RTX 3060", torch.bfloat16),
    ((8, 9), "NVIDIA GeForce RTX 4070", torch.bfloat16),
    ((9, 0), "NVIDIA H100", torch.bfloat16),
])
def test_amp_dtype_follows_compute_capability_not_is_bf16_supported(fake_gpu, capability, name, expected):
    fake_gpu(capability, name)
    assert best_device().type == "cuda"
    assert amp_dtype() == expected
    assert native_bf16("cuda") == (expected == torch.bfloat16)
    report = doctor()
    assert report["bf16"] == (expected == torch.bfloat16) and report["amp"] == str(expected).removeprefix("torch.")
    assert report["gpu"] == name


def test_cpu_and_mps_train_in_fp32():
    assert amp_dtype("cpu") is None and amp_dtype("mps") is None
    assert not native_bf16("cpu")


def test_fp16_trains_with_a_grad_scaler_on_the_cpu():
    """The T4 path (fp16 autocast + GradScaler), run on the CPU: the scaler is on, it learns, and a step with
    overflowing gradients is skipped and halves the scale instead of writing inf into the weights."""
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=40, lr=3e-3, warmup_steps=3, eval_every=20, eval_batches=2, progress=False,
                      live_plot=False, amp="fp16", grad_clip=1.0)
    t = Trainer(TinyModel(), get_batch, config=cfg, device="cpu")
    assert t.amp_dtype == torch.float16 and t.scaler.is_enabled()
    first = t.train_step()
    for _ in range(30):
        last = t.train_step()
    print(f"fp16 on CPU: loss {first:.3f} -> {last:.3f}, scale {t.scaler.get_scale()}")
    assert last < first - 0.2

    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    scale = t.scaler.get_scale()
    t.loss_fn = lambda m, b: m(*b)[1] * float("inf")         # every gradient overflows
    t.train_step()
    assert t.scaler.get_scale() == scale / 2
    assert all(torch.equal(before[n], p) for n, p in t.model.named_parameters()), "an overflowing step was applied"


def test_compile_model_unsupported_falls_back_with_one_line(monkeypatch, capsys):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    model = Affine()
    assert compile_model(model) is model
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "not supported here" in out[0] and "eagerly" in out[0]
    x = torch.randn(2, 4)
    assert torch.equal(model(x), torch.tanh(x @ model.weight.T + model.bias))


def test_compile_model_failing_backend_falls_back_at_the_first_call(capsys):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found (cl.exe)\nlong traceback...")

    torch._dynamo.reset()
    model = Affine()
    x = torch.randn(2, 4)
    expected = torch.tanh(x @ model.weight.T + model.bias)
    compiled = compile_model(model, backend=broken_backend)
    assert compiled is model and set(model.state_dict()) == {"weight", "bias"}   # compiled in place
    assert torch.allclose(model(x), expected)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "torch.compile failed here" in out[0] and "cl.exe" in out[0], out
    assert torch.allclose(model(x), expected) and capsys.readouterr().out == ""   # said once, eager from then on


def test_compile_model_works_where_compile_works_and_real_errors_still_raise(capsys):
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(len(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    model = Affine()
    compile_model(model, backend=counting_backend)
    x = torch.randn(2, 4)
    assert torch.allclose(model(x), torch.tanh(x @ model.weight.T + model.bias))
    assert calls, "the backend was never called: the model did not compile"
    assert capsys.readouterr().out == ""
    torch._dynamo.reset()
    model = compile_model(Affine(), backend=counting_backend)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied|size mismatch|mat1 and mat2"):
        model(torch.randn(2, 5))                                 # a bug in the caller is not hidden
