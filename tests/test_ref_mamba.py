"""Chapter 07 (Mamba) against the PyPI references, given the same weights, plus its internal equivalences.

References: `transformers` `MambaMixer` and `MambaForCausalLM` on their pure-PyTorch slow path (no mamba-ssm /
causal-conv1d needed; they print that they fall back), and `mambapy`'s parallel scan when it is installed.
Internal: sequential = parallel (any chunk size, with and without recomputation) = recurrent steps; cached
decoding = full forward. Every comparison prints its max error; tolerances are for float32. Each exercise check
rejects plausible wrong answers; the memory explorer remembers fewer steps as Δ grows.
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import labkit.notebook

from .grads import backward_same, perturb_, report
from .test_exercises import assert_wrong_answers_fail

NB = "07_mamba"
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def ch():
    return labkit.notebook.load(NB, ("model", "bench"))


def _ref_config(**overrides):
    from transformers import MambaConfig

    kw = dict(vocab_size=128, hidden_size=64, state_size=16, expand=2, conv_kernel=4, num_hidden_layers=2)
    return MambaConfig(**{**kw, **overrides})


def _our_config(ch, **overrides):
    kw = dict(vocab_size=128, d_model=64, n_layer=2, d_state=16, expand=2, d_conv=4)
    return ch["MambaConfig"](**{**kw, **overrides})


_report = partial(report, atol=ATOL, rtol=RTOL)   # print the max error, assert closeness


# --------------------------------------------------------------------------- the block vs transformers
@pytest.mark.parametrize("scan,chunk_size", [("sequential", 64), ("parallel", 64), ("parallel", 7)])
def test_mixer_matches_transformers(ch, scan, chunk_size):
    from transformers.models.mamba.modeling_mamba import MambaMixer as RefMixer

    torch.manual_seed(0)
    ref = RefMixer(_ref_config(), layer_idx=0).eval()
    perturb_(ref, 0.05, seed=0)
    ours = ch["MambaMixer"](_our_config(ch, scan=scan, chunk_size=chunk_size), 0).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)       # same names, same shapes: 1:1

    x = torch.randn(2, 37, 64)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    _report(f"MambaMixer output ({scan}, chunk {chunk_size})", y_ours, y_ref)

    backward_same(y_ref, y_ours)
    _report("d loss / d input", x_ours.grad, x_ref.grad)
    ref_params = dict(ref.named_parameters())
    worst = max(_report(f"d loss / d {name}", p.grad, ref_params[name].grad, atol=1e-4, rtol=1e-4)
                for name, p in ours.named_parameters())
    print(f"worst parameter-gradient error: {worst:.2e}")


def test_lm_matches_transformers(ch):
    from transformers import MambaForCausalLM

    torch.manual_seed(0)
    ref = MambaForCausalLM(_ref_config()).eval()
    perturb_(ref, 0.05, seed=0)
    ours = ch["MambaLM"](_our_config(ch)).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    assert ours.lm_head.weight is ours.backbone.embeddings.weight         # still tied after loading
    idx = torch.randint(0, 128, (2, 45))
    with torch.no_grad():
        _report("MambaForCausalLM logits", ours(idx)[0], ref(idx).logits)


def test_greedy_generation_matches_transformers(ch):
    """Our prefill + recurrent steps vs transformers' generate() with its own cache: the same tokens."""
    from transformers import MambaForCausalLM

    torch.manual_seed(1)
    ref = MambaForCausalLM(_ref_config()).eval()
    perturb_(ref, 0.2, seed=1)
    ours = ch["MambaLM"](_our_config(ch)).eval()
    ours.load_state_dict(ref.state_dict())
    prompt = torch.randint(1, 128, (1, 9))
    expected = ref.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, use_cache=True,
                            pad_token_id=0, eos_token_id=None)
    got = ours.generate(prompt, max_new_tokens=12, temperature=0)
    print("transformers:", expected[0].tolist(), "\nours:        ", got[0].tolist())
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------- internal equivalences
def test_cached_decoding_equals_full_forward(ch):
    torch.manual_seed(0)
    model = ch["MambaLM"](_our_config(ch)).eval()
    perturb_(model, 0.1, seed=0)
    idx = torch.randint(0, 128, (3, 40))
    with torch.no_grad():
        full, _ = model(idx)
        cache = ch["MambaCache"].empty(model.config, batch_size=3)
        pieces = [model(idx[:, :11], cache=cache)[0], model(idx[:, 11:20], cache=cache)[0]]   # two prefills
        pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(20, 40)]             # then steps
    _report("cached decoding (prefill 11 + 9, 20 steps) vs full forward", torch.cat(pieces, 1), full)
    assert cache.nbytes == ch["mamba_state_bytes"](model.config, batch_size=3, bytes_per_value=4)


@pytest.mark.parametrize("with_h0", [False, True])
def test_three_scans_agree(ch, with_h0):
    x, delta, A, B, C, D, z = ch["random_scan_inputs"](b=2, L=83, d=12, n=16, seed=3)
    h0 = torch.randn(2, 12, 16) if with_h0 else None
    y_seq, h_seq = ch["selective_scan_sequential"](x, delta, A, B, C, D, z, h0)
    for chunk_size in (1, 5, 16, 64, 100):
        y_par, h_par = ch["selective_scan_parallel"](x, delta, A, B, C, D, z, h0, chunk_size=chunk_size)
        _report(f"parallel (chunk {chunk_size}) vs sequential: y", y_par, y_seq)
        _report(f"parallel (chunk {chunk_size}) vs sequential: last state", h_par, h_seq)
    h = torch.zeros(2, 12, 16) if h0 is None else h0
    ys = []
    for t in range(x.shape[1]):
        y_t, h = ch["selective_scan_step"](h, x[:, t], delta[:, t], A, B[:, t], C[:, t], D)
        ys.append(y_t * F.silu(z[:, t]))
    _report("recurrent steps vs sequential: y", torch.stack(ys, 1), y_seq)
    _report("recurrent steps vs sequential: last state", h, h_seq)


def test_scan_gradients_agree_with_and_without_recompute(ch):
    inputs = ch["random_scan_inputs"](b=2, L=50, d=8, n=16, seed=4)
    w = torch.randn(2, 50, 8)
    grads = {}
    for name, fn in {
        "sequential": ch["selective_scan_sequential"],
        "parallel": lambda *a: ch["selective_scan_parallel"](*a, chunk_size=16),
        "parallel, recomputed": lambda *a: ch["selective_scan_parallel"](*a, chunk_size=16, checkpoint_chunks=True),
    }.items():
        leaves = [t.clone().requires_grad_() for t in inputs]
        (fn(*leaves)[0] * w).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for name in ("parallel", "parallel, recomputed"):
        for arg, g, g_ref in zip("x delta A B C D z".split(), grads[name], grads["sequential"]):
            _report(f"{name} vs sequential: d/d{arg}", g, g_ref, atol=1e-4, rtol=1e-4)


def test_logspace_is_exact_when_short_and_overflows_when_long(ch):
    """The chapter's claim about the cumsum closed form, both halves."""
    short = ch["random_scan_inputs"](L=12, seed=5)
    _report("log-space vs sequential (short)", ch["selective_scan_logspace"](*short)[0],
            ch["selective_scan_sequential"](*short)[0])
    long = ch["random_scan_inputs"](L=300, seed=5)
    assert torch.isnan(ch["selective_scan_logspace"](*long)[0]).any()
    assert torch.isfinite(ch["selective_scan_parallel"](*long)[0]).all()


def test_mambapy_pscan_matches(ch):
    pscan = pytest.importorskip("mambapy.pscan").pscan
    x, delta, A, B, C, D, z = ch["random_scan_inputs"](b=2, L=64, d=8, n=16, seed=6)
    dA = torch.exp(delta[..., None] * A)
    dBx = (delta * x)[..., None] * B[:, :, None, :]
    _, H = ch["hillis_steele"](dA, dBx)
    _report("Hillis-Steele vs mambapy pscan (all states)", H, pscan(dA.clone(), dBx.clone()))


def test_causal_conv_is_causal_and_matches_nn_conv1d(ch):
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 6, 20)
    y, _ = ch["causal_conv1d"](x, conv.weight, conv.bias)
    _report("causal_conv1d vs nn.Conv1d(padding=k-1)[..., :L]", y, conv(x)[..., :20])


# --------------------------------------------------------------------------- initialisation and configs
def test_initialisation_follows_the_paper(ch):
    torch.manual_seed(0)
    cfg = _our_config(ch, d_model=256)
    mixer = ch["MambaMixer"](cfg)
    N = cfg.d_state
    assert torch.allclose(mixer.A_log, torch.log(torch.arange(1, N + 1.0)).expand(cfg.d_inner, N))   # S4D-real
    assert torch.equal(mixer.D, torch.ones(cfg.d_inner))
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= cfg.dt_min * (1 - 1e-4) and dt.max() <= cfg.dt_max * (1 + 1e-4)
    median = dt.log().median().exp().item()                     # log-uniform: geometric middle 0.01
    print(f"Δ at init: min {dt.min():.2e} median {median:.2e} max {dt.max():.2e}")
    assert 0.005 < median < 0.02
    bound = cfg.dt_rank ** -0.5
    assert mixer.dt_proj.weight.abs().max() <= bound


def test_presets(ch):
    cfg = ch["MambaConfig"].preset("mamba-130m")
    assert (cfg.n_layer, cfg.d_model, cfg.d_state, cfg.expand, cfg.vocab_size, cfg.dt_rank) == (24, 768, 16, 2, 50280, 48)
    with torch.device("meta"):
        n = ch["MambaLM"](cfg).num_params()
    print(f"Mamba-130M: {n / 1e6:.1f}M parameters")
    assert 125e6 < n < 135e6
    with pytest.raises(ValueError, match="unknown preset"):
        ch["MambaConfig"].preset("mamba-7b")
    with pytest.raises(ValueError, match="scan must be"):
        ch["MambaConfig"](scan="fast")


def test_benchmark_function_runs(ch):
    out = ch["benchmark_scans"](lengths=(8, 16), repeats=1)
    assert out["lengths"] == [8, 16]
    assert all(len(v) == 2 and all(t > 0 for t in v) for mode in ("forward", "train") for v in out[mode].values())


# --------------------------------------------------------------------------- the exercises' wrong answers
WRONG_ANSWERS = {
    # exp(ΔA) - 1 computed through exp: right algebra, two correct digits left at Δ = 1e-5 (cancellation)
    0: """
def zoh_exact(delta, A, B):
    dtA = delta[..., None] * A
    return torch.exp(dtA), (torch.exp(dtA) - 1) / A * B[..., None, :]
""",
    # ∂L/∂Ā_t taken as g_t h_t: the state after the step instead of the one Ā_t multiplies
    1: """
def scan_backward(dA, u, C, grad_y):
    L = dA.shape[1]
    h, states = torch.zeros_like(u[:, 0]), []
    for t in range(L):
        h = dA[:, t] * h + u[:, t]
        states.append(h)
    grad_dA, grad_u, grad_C = torch.zeros_like(dA), torch.zeros_like(u), torch.zeros_like(C)
    g = torch.zeros_like(h)
    for t in reversed(range(L)):
        if t + 1 < L:
            g = dA[:, t + 1] * g
        g = g + grad_y[:, t, :, None] * C[:, t, None, :]
        grad_u[:, t] = g
        grad_dA[:, t] = g * states[t]
        grad_C[:, t] = torch.einsum("be,ben->bn", grad_y[:, t], states[t])
    return grad_dA, grad_u, grad_C
""",
    # "same" padding as for images: the output sees one step of the future
    2: """
def causal_conv_shifts(x, weight, bias):
    k = weight.shape[-1]
    return F.conv1d(x, weight, bias, padding=k // 2, groups=x.shape[1])[..., :x.shape[-1]]
""",
    # the positions are not sorted: the answers come in the order drawn, not the order they appear
    3: """
def selective_copying(batch_size, seq_len, n_memorize, vocab_size, generator):
    positions = torch.rand(batch_size, seq_len, generator=generator).argsort(dim=1)[:, :n_memorize]
    data = torch.randint(2, vocab_size, (batch_size, n_memorize), generator=generator)
    inputs = torch.zeros(batch_size, seq_len + n_memorize, dtype=torch.long)
    inputs.scatter_(1, positions, data)
    inputs[:, seq_len:] = 1
    targets = torch.full_like(inputs, -1)
    targets[:, seq_len:] = data
    return inputs, targets
""",
}

MORE_WRONG_ANSWERS = {
    # Mamba's own simplification B̄ = ΔB: not the exact hold
    "zoh-simplified": (0, """
def zoh_exact(delta, A, B):
    return torch.exp(delta[..., None] * A), delta[..., None] * B[..., None, :]
"""),
    # the backward recurrence multiplies by Ā_t instead of Ā_{t+1}
    "scan-backward-shift": (1, WRONG_ANSWERS[1].replace(
        """        if t + 1 < L:
            g = dA[:, t + 1] * g
        g = g + grad_y[:, t, :, None] * C[:, t, None, :]""",
        """        g = dA[:, t] * g + grad_y[:, t, :, None] * C[:, t, None, :]""").replace(
        """        grad_dA[:, t] = g * states[t]""",
        """        if t > 0:
            grad_dA[:, t] = g * states[t - 1]""")),
    # next-token habit: the answers shifted one position left, onto the last noise position
    "copying-shifted": (3, """
def selective_copying(batch_size, seq_len, n_memorize, vocab_size, generator):
    positions = torch.rand(batch_size, seq_len, generator=generator).argsort(dim=1)[:, :n_memorize].sort(1).values
    data = torch.randint(2, vocab_size, (batch_size, n_memorize), generator=generator)
    inputs = torch.zeros(batch_size, seq_len + n_memorize, dtype=torch.long)
    inputs.scatter_(1, positions, data)
    inputs[:, seq_len:] = 1
    targets = torch.full_like(inputs, -1)
    targets[:, seq_len - 1:-1] = data
    return inputs, targets
"""),
    # data drawn from 2..vocab_size-2: randint's high end is exclusive already
    "copying-off-by-one": (3, """
def selective_copying(batch_size, seq_len, n_memorize, vocab_size, generator):
    positions = torch.rand(batch_size, seq_len, generator=generator).argsort(dim=1)[:, :n_memorize].sort(1).values
    data = torch.randint(2, vocab_size - 1, (batch_size, n_memorize), generator=generator)
    inputs = torch.zeros(batch_size, seq_len + n_memorize, dtype=torch.long)
    inputs.scatter_(1, positions, data)
    inputs[:, seq_len:] = 1
    targets = torch.full_like(inputs, -1)
    targets[:, seq_len:] = data
    return inputs, targets
"""),
}


def test_wrong_answers_are_rejected():
    assert_wrong_answers_fail(NB, WRONG_ANSWERS)


@pytest.mark.parametrize("name", list(MORE_WRONG_ANSWERS))
def test_more_wrong_answers_are_rejected(name):
    from labkit.check import ExerciseError

    index, source = MORE_WRONG_ANSWERS[name]
    with pytest.raises(ExerciseError):
        labkit.notebook.run_exercise(NB, index, source)


def test_memory_explorer_remembers_less_with_larger_steps():
    import matplotlib.figure

    ex = labkit.notebook.load(NB, ("model", "explore"))
    torch.manual_seed(0)
    model = ex["MambaLM"](ex["MambaConfig"].preset("mamba-tiny")).eval()     # untrained: Δ from the init range
    idx = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    view = ex["explore_memory"](model, idx)
    small, large = view.set(delta_scale=0.2), view.set(delta_scale=5.0)
    print(f"\nsteps kept above 1/e: Δ × 0.2 {small['span']}; Δ × 5 {large['span']}")
    assert all(a >= b for a, b in zip(small["span"], large["span"])) and sum(small["span"]) > sum(large["span"])
    left = large["left"]
    assert torch.allclose(left[:, -1], torch.ones(len(left)))            # the last step: nothing decayed yet
    assert bool((left[:, 1:] >= left[:, :-1]).all())                     # older inputs: less is left
    assert bool((left[-1] <= left[0] + 1e-7).all())                      # the fastest state forgets first
    r = view.set(layer=1, channel=5, delta_scale=1.0)
    assert r["delta"].shape == (40,) and bool((r["delta"] > 0).all())
    assert isinstance(view.figure(), matplotlib.figure.Figure)
