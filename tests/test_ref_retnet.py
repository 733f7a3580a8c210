"""Chapter 09 (RetNet) against the PyPI reference, given the same weights, plus its internal equivalences.

Reference: Microsoft's `torchscale` (0.3.0), `RetNetDecoder(RetNetConfig(...), embed_tokens=nn.Embedding(...))`, in
its three modes: parallel, chunkwise (`chunkwise_recurrent=True`) and recurrent (`incremental_state`, one token
per call). torchscale imports `timm.models.layers.drop_path` for stochastic depth; timm is not installed (it
pulls in torchvision, which does not load next to CPU torch), so a stand-in module provides it here.

torchscale rescales retention scores differently in each mode; the per-head RMSNorm cancels any positive
per-row scale only up to its epsilon, so the comparisons use layernorm_eps = 1e-12 (at 1e-6 its own modes
differ by ~1e-2). Internal: parallel = recurrent = chunkwise (any chunk size, with a starting state),
outputs and gradients; prompt + recurrent decoding = parallel forward. Every comparison prints its max error.
"""
import sys
import types
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import labkit.notebook
from labkit.check import ExerciseError

from .grads import report
from .test_exercises import assert_wrong_answers_fail

NB = "09_retnet"
ATOL, RTOL = 1e-5, 1e-4
EPS = 1e-12
V, D_MODEL, N_LAYER, N_HEAD, D_VALUE, D_FFN = 64, 64, 2, 4, 128, 96


@pytest.fixture(scope="module")
def ch():
    return labkit.notebook.load(NB, ("model", "bench"))


def _drop_path(x, drop_prob: float = 0.0, training: bool = False):
    """Stochastic depth, per sample (timm's signature). Identity at p = 0 or in eval mode."""
    if not drop_prob or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


@pytest.fixture(scope="module")
def torchscale():
    """torchscale's RetNet modules, imported with a stand-in for timm.models.layers (restored afterwards)."""
    names = ("timm", "timm.models", "timm.models.layers")
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    sys.modules["timm"].models = sys.modules["timm.models"]
    sys.modules["timm.models"].layers = sys.modules["timm.models.layers"]
    sys.modules["timm.models.layers"].drop_path = _drop_path
    try:
        from torchscale.architecture.config import RetNetConfig
        from torchscale.architecture.retnet import RetNetDecoder

        yield types.SimpleNamespace(RetNetConfig=RetNetConfig, RetNetDecoder=RetNetDecoder)
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod


_report = partial(report, atol=ATOL, rtol=RTOL)   # print the max error, assert closeness


def _ours(ch, seed=0, **overrides):
    kw = dict(vocab_size=V, d_model=D_MODEL, n_layer=N_LAYER, n_head=N_HEAD, d_value=D_VALUE, d_ffn=D_FFN,
              norm_eps=EPS, chunk_size=8)
    torch.manual_seed(seed)
    model = ch["RetNetLM"](ch["RetNetConfig"](**{**kw, **overrides})).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():                       # move every weight off its init (norm gains = 1...)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _reference(ts, ours, chunk_size=None):
    """torchscale's decoder with our weights. chunk_size: its chunkwise mode with chunks of that size."""
    c = ours.config
    cfg = ts.RetNetConfig(vocab_size=c.vocab_size, decoder_embed_dim=c.d_model, decoder_value_embed_dim=c.d_value,
                          decoder_retention_heads=c.n_head, decoder_ffn_embed_dim=c.d_ffn, decoder_layers=c.n_layer,
                          activation_fn=c.activation, layernorm_eps=c.norm_eps, dropout=0.0, drop_path_rate=0.0,
                          share_decoder_input_output_embed=c.tie_embeddings,
                          chunkwise_recurrent=chunk_size is not None, recurrent_chunk_size=chunk_size or 512)
    ref = ts.RetNetDecoder(cfg, embed_tokens=torch.nn.Embedding(c.vocab_size, c.d_model)).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    # the only names torchscale has and we do not: its rotation angles and log-decays, computed, not learned
    assert sorted(missing) == ["retnet_rel_pos.angle", "retnet_rel_pos.decay"] and not unexpected
    assert torch.allclose(ref.retnet_rel_pos.decay.exp(), ours.layers[0].retention.gammas)
    if c.tie_embeddings:
        assert ref.output_projection.weight is ref.embed_tokens.weight
    return ref


# --------------------------------------------------------------------------- the decoder vs torchscale
@pytest.mark.parametrize("tie,activation", [(True, "gelu"), (False, "swish")])
def test_parallel_matches_torchscale_outputs_and_gradients(ch, torchscale, tie, activation):
    ours = _ours(ch, tie_embeddings=tie, activation=activation)
    ref = _reference(torchscale, ours)
    idx, targets = torch.randint(0, V, (2, 33)), torch.randint(0, V, (2, 33))
    logits, loss = ours(idx, targets, form="parallel")
    ref_logits = ref(idx)[0]
    _report(f"parallel logits (tied={tie}, {activation})", logits, ref_logits)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten())
    _report("loss", loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    worst = max(_report(f"d loss / d {name}", p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4)
                for name, p in ours.named_parameters())
    print(f"worst parameter-gradient error: {worst:.2e}")
    assert len(list(ours.parameters())) == len(ref_params)


@pytest.mark.parametrize("T,chunk_size", [(32, 8), (29, 8), (40, 16)])
def test_chunkwise_matches_torchscale(ch, torchscale, T, chunk_size):
    """torchscale's chunkwise mode (it pads T up to a multiple of the chunk) vs ours (a short last chunk)."""
    ours = _ours(ch, chunk_size=chunk_size)
    ref = _reference(torchscale, ours, chunk_size=chunk_size)
    idx = torch.randint(0, V, (2, T))
    with torch.no_grad():
        got, expected = ours(idx, form="chunkwise")[0], ref(idx)[0]
        _report(f"chunkwise logits (T={T}, chunk {chunk_size}) vs torchscale chunkwise", got, expected)
        _report("torchscale chunkwise vs our parallel", expected, ours(idx, form="parallel")[0])


def test_recurrent_matches_torchscale(ch, torchscale):
    """torchscale's incremental_state decoding (one token per call) vs our recurrent form and our state."""
    ours = _ours(ch)
    ref = _reference(torchscale, ours)
    idx = torch.randint(0, V, (2, 25))
    with torch.no_grad():
        incremental_state = {}
        expected = torch.cat([ref(idx[:, :t + 1], incremental_state=incremental_state)[0] for t in range(25)], 1)
        _report("recurrent form vs torchscale recurrent", ours(idx, form="recurrent")[0], expected)
        state = ch["RetNetState"].empty(ours.config, batch_size=2)
        stepped = torch.cat([ours(idx[:, t:t + 1], state=state)[0] for t in range(25)], 1)
        _report("token-by-token with RetNetState vs torchscale recurrent", stepped, expected)
        _report("torchscale recurrent vs torchscale parallel", expected, ref(idx)[0])


def test_greedy_generation_matches_torchscale(ch, torchscale):
    ours = _ours(ch, seed=1)
    with torch.no_grad():                       # smaller embeddings: a varied greedy continuation
        ours.embed_tokens.weight.mul_(0.5)
    ref = _reference(torchscale, ours)
    prompt = torch.randint(0, V, (1, 7))
    got = ours.generate(prompt, 15, temperature=0)
    with torch.no_grad():
        seq, state = prompt, {}
        for t in range(prompt.shape[1] - 1):                    # feed the prompt, one token per call
            ref(seq[:, :t + 1], incremental_state=state)
        for _ in range(15):
            logits = ref(seq, incremental_state=state)[0][:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    print("torchscale:", seq[0].tolist(), "\nours:      ", got[0].tolist())
    assert torch.equal(got, seq)
    assert len(set(got[0, 7:].tolist())) >= 4, "a degenerate continuation would make this test weak"


# --------------------------------------------------------------------------- internal equivalences
@pytest.mark.parametrize("with_state", [False, True])
def test_three_forms_agree(ch, with_state):
    q, k, v, gammas = ch["random_qkv"](b=2, h=3, T=45, dk=8, dv=6, seed=3)
    S0 = torch.randn(2, 3, 8, 6) if with_state else None
    out_rec, S_rec = ch["retention_recurrent"](q, k, v, gammas, S0)
    if not with_state:
        _report("parallel vs recurrent", ch["retention_parallel"](q, k, v, gammas), out_rec)
    for chunk_size in (1, 4, 7, 16, 45, 64):
        out, S = ch["retention_chunkwise"](q, k, v, gammas, chunk_size, S0)
        _report(f"chunkwise ({chunk_size}) vs recurrent: outputs", out, out_rec)
        _report(f"chunkwise ({chunk_size}) vs recurrent: last state", S, S_rec)


def test_state_is_the_sum_it_claims(ch):
    """S_T = Σ_m γ^(T-1-m) k_mᵀ v_m, the closed form the recurrence accumulates."""
    q, k, v, gammas = ch["random_qkv"](b=1, h=2, T=20, dk=4, dv=5, seed=9)
    _, S = ch["retention_recurrent"](q, k, v, gammas)
    weights = gammas[:, None] ** torch.arange(19, -1, -1, dtype=torch.float32)            # (h, T)
    expected = torch.einsum("ht,bhtk,bhtv->bhkv", weights, k, v)
    _report("recurrent state vs closed form", S, expected)


def test_gradients_agree_across_forms(ch):
    inputs = ch["random_qkv"](b=2, h=3, T=30, dk=8, dv=6, seed=4)
    w = torch.randn(2, 3, 30, 6)
    grads = {}
    forms = {"parallel": lambda q, k, v, g: ch["retention_parallel"](q, k, v, g),
             "chunkwise": lambda q, k, v, g: ch["retention_chunkwise"](q, k, v, g, 7)[0],
             "recurrent": lambda q, k, v, g: ch["retention_recurrent"](q, k, v, g)[0]}
    for name, fn in forms.items():
        leaves = [t.clone().requires_grad_() for t in inputs[:3]]
        (fn(*leaves, inputs[3]) * w).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for name in ("chunkwise", "recurrent"):
        for arg, g, g_ref in zip("qkv", grads[name], grads["parallel"]):
            _report(f"{name} vs parallel: d/d{arg}", g, g_ref, atol=1e-4, rtol=1e-4)


def test_decoding_equals_parallel_forward(ch):
    model = _ours(ch, norm_eps=1e-6, chunk_size=5)
    idx = torch.randint(0, V, (3, 40))
    with torch.no_grad():
        full = model(idx, form="parallel")[0]
        state = ch["RetNetState"].empty(model.config, batch_size=3)
        pieces = [model(idx[:, :13], state=state)[0], model(idx[:, 13:22], state=state)[0]]   # two prompts
        pieces += [model(idx[:, t:t + 1], state=state)[0] for t in range(22, 40)]             # then steps
    _report("prompt 13 + 9 (chunkwise), 18 recurrent steps vs parallel forward", torch.cat(pieces, 1), full)
    assert state.n_seen == 40
    assert state.nbytes == N_LAYER * 3 * D_MODEL * D_VALUE // N_HEAD * 4


def test_rotation_is_relative(ch):
    """After the rotation, q_n · k_m depends only on n - m."""
    theta = ch["rotation_frequencies"](16)
    q, k = torch.randn(16), torch.randn(16)

    def dot(n, m):
        return (ch["rotate"](q[None], torch.tensor([n]), theta) @ ch["rotate"](k[None], torch.tensor([m]), theta).T).item()

    assert abs(dot(5, 2) - dot(105, 102)) < 1e-4 and abs(dot(5, 2) - dot(5, 3)) > 1e-3


def test_decay_mask(ch):
    D = ch["decay_mask"](5, ch["retention_gammas"](2))
    assert torch.equal(D.triu(1), torch.zeros(2, 5, 5))
    torch.testing.assert_close(D[1, 4, 1], torch.tensor((1 - 2.0 ** -6) ** 3))
    assert torch.isfinite(ch["decay_mask"](4096, ch["retention_gammas"](4))).all()


# --------------------------------------------------------------------------- configs and the benchmark
def test_presets(ch):
    cfg = ch["RetNetConfig"].preset("retnet-124m")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_key_head, cfg.d_value, cfg.d_ffn) == (12, 768, 3, 256, 1536, 1024)
    with torch.device("meta"):
        n = ch["RetNetLM"](cfg).num_params()
    print(f"RetNet-124M: {n / 1e6:.2f}M parameters")
    assert 120e6 < n < 128e6
    with pytest.raises(ValueError, match="unknown preset"):
        ch["RetNetConfig"].preset("retnet-7b")
    with pytest.raises(ValueError, match="divisible"):
        ch["RetNetConfig"](d_model=100, n_head=3)
    with pytest.raises(ValueError, match="form must be"):
        ch["RetNetConfig"](form="fast")


def test_flops_count(ch):
    cfg = ch["RetNetConfig"].preset("retnet-124m")
    f = ch["retnet_flops_per_token"](cfg, 1024)
    with torch.device("meta"):
        model = ch["RetNetLM"](cfg)
    n_matmul = sum(p.numel() for name, p in model.named_parameters() if name.endswith("proj.weight")
                   or ".ffn." in name)
    assert f["layer matmuls (6N)"] == 6 * n_matmul


def test_benchmark_function_runs(ch):
    out = ch["benchmark_retention"](lengths=(16, 32), repeats=1)
    assert out["lengths"] == [16, 32]
    for key in ("forward_ms", "train_saved_mib", "decode_us"):
        assert all(len(v) == 2 and all(x > 0 for x in v) for v in out[key].values()), key


# --------------------------------------------------------------------------- the exercises against torchscale
def _exercise_ns(index):
    """The `model` cells plus exercise `index`'s solution."""
    ns = labkit.notebook.load(NB, ("model",))
    return labkit.notebook.run_sources([labkit.notebook.exercises(NB)[index][0]], ns)


def test_exercise_normalised_retention_matches_torchscale(torchscale):
    """Exercise 1's solution = torchscale's parallel_forward with RetNetRelPos's normalised decay mask."""
    from torchscale.architecture.retnet import RetNetRelPos
    from torchscale.component.multiscale_retention import MultiScaleRetention

    ns = _exercise_ns(0)
    b, h, T, dk, dv = 2, 4, 23, 8, 6
    cfg = torchscale.RetNetConfig(decoder_embed_dim=h * dk, decoder_value_embed_dim=h * dv, decoder_retention_heads=h)
    msr = MultiScaleRetention(cfg, h * dk, h * dv, h)
    _, mask = RetNetRelPos(cfg)(T)                                   # (h, T, T): D / sqrt(row sums)
    g = torch.Generator().manual_seed(0)
    for size in (0.05, 1.0, 20.0):                                   # |Σ R| below and above 1
        q, k = size * torch.randn(b, h, T, dk, generator=g), torch.randn(b, h, T, dk, generator=g) / dk ** 0.5
        v = torch.randn(b, h, T, dv, generator=g)
        expected = msr.parallel_forward(q, k, v.transpose(1, 2).reshape(b, T, h * dv), mask)   # (b, T, h, dv)
        _report(f"retention_normalised vs torchscale parallel_forward (|q| x{size:g})",
                ns["retention_normalised"](q, k, v, ns["retention_gammas"](h)), expected.transpose(1, 2))


def test_exercise_xpos_matches_torchscale(torchscale):
    """Exercise 3's solution gives torchscale's XPOS scores. torchscale centres the scale's positions on the
    sequence (a constant factor per channel that cancels between query and key), so compare q_n · k_m."""
    from torchscale.component.xpos_relative_position import XPOS

    ns = _exercise_ns(2)
    T, d = 37, 16
    ref = XPOS(d, scale_base=64)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, T, d, generator=g), torch.randn(1, T, d, generator=g)
    pos = torch.arange(T)
    ours = ns["xpos"](q, pos, 64) @ ns["xpos"](k, pos, 64, downscale=True).transpose(-1, -2)
    theirs = ref(q) @ ref(k, downscale=True).transpose(-1, -2)
    _report("xpos scores q_n · k_m vs torchscale XPOS", ours, theirs, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- the exercises' wrong answers
WRONG_ANSWERS = {
    # D divided by its row sums instead of their square roots: the same wherever |Σ R| > 1, wrong where it is clamped
    0: '''
def retention_normalised(q, k, v, gammas):
    D = decay_mask(q.shape[-2], gammas)
    D = D / D.sum(-1, keepdim=True)
    R = (q @ k.transpose(-1, -2)) * D
    return R / R.sum(-1, keepdim=True).abs().clamp(min=1) @ v
''',
    # off by one: the product runs over m <= i <= n, so token m is decayed by its own γ_m too
    1: '''
def gated_retention(q, k, v, log_gamma):
    T = q.shape[-2]
    c = log_gamma.float().cumsum(-1)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    D = torch.exp((c[..., :, None] - c[..., None, :] + log_gamma[..., None, :]).masked_fill(future, float("-inf")))
    return (q @ k.transpose(-1, -2) * D) @ v
''',
    # RetNet's own frequencies (i / (d/2 - 1), rotation_frequencies) instead of xPos's i / (d/2)
    2: '''
def xpos(x, positions, scale_base=512, downscale=False):
    d = x.shape[-1]
    i = torch.arange(d // 2, dtype=torch.float32)
    zeta = ((2 * i + 0.4 * d) / (1.4 * d)).repeat_interleave(2)
    power = positions.float()[:, None] / scale_base * (-1 if downscale else 1)
    return rotate(x, positions, rotation_frequencies(d)) * zeta ** power
''',
}


def test_wrong_answers_are_rejected():
    assert_wrong_answers_fail(NB, WRONG_ANSWERS)


def test_more_wrong_answers_are_rejected():
    """The clamp forgotten (exercise 1), the causal mask applied after the exp (exercise 2: inf · 0 = NaN), the key's
    downscale ignored (exercise 3)."""
    wrong = {0: '''
def retention_normalised(q, k, v, gammas):
    D = decay_mask(q.shape[-2], gammas)
    D = D / D.sum(-1, keepdim=True).sqrt()
    R = (q @ k.transpose(-1, -2)) * D
    return R / R.sum(-1, keepdim=True).abs() @ v
''', 1: '''
def gated_retention(q, k, v, log_gamma):
    T = q.shape[-2]
    c = log_gamma.float().cumsum(-1)
    D = torch.exp(c[..., :, None] - c[..., None, :]) * torch.ones(T, T).tril()
    return (q @ k.transpose(-1, -2) * D) @ v
''', 2: '''
def xpos(x, positions, scale_base=512, downscale=False):
    d = x.shape[-1]
    i = torch.arange(d // 2, dtype=torch.float32)
    theta = (10000.0 ** (-i / (d // 2))).repeat_interleave(2)
    zeta = ((2 * i + 0.4 * d) / (1.4 * d)).repeat_interleave(2)
    return rotate(x, positions, theta) * zeta ** (positions.float()[:, None] / scale_base)
'''}
    for i, src in wrong.items():
        with pytest.raises(ExerciseError):
            labkit.notebook.run_exercise(NB, i, src)


# --------------------------------------------------------------------------- the exploration
def test_explore_retention_memory_grows_with_head_and_mass(ch):
    """explore_retention on an untrained tiny RetNet: later heads decay more slowly (longer memory), a larger mass
    needs more tokens, the retention matrix is causal, and the figure is a matplotlib Figure."""
    import matplotlib
    import matplotlib.pyplot as plt

    ns = labkit.notebook.load(NB, ("model", "explore"))
    torch.manual_seed(0)
    model = ns["RetNetLM"](ns["RetNetConfig"].preset("retnet-tiny")).eval()
    idx = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    view = ns["explore_retention"](model, idx)
    first = view.set(layer=0, head=0, mass=0.9)
    last = view.set(head=3)
    more = view.set(mass=0.99)
    print(f"memory at 90 %: head 0 {first['memory']}, head 3 {last['memory']}; head 3 at 99 %: {more['memory']}")
    assert first["memory"] == 73 and last["memory"] == 589          # ceil(ln 0.1 / ln(1 - 2^-5)), ... (1 - 2^-8)
    assert more["memory"] > last["memory"] > first["memory"]
    assert first["scores"].shape == (40, 40) and torch.equal(first["scores"].triu(1), torch.zeros(40, 40))
    assert not torch.equal(first["scores"], last["scores"])
    fig = view.figure()
    assert isinstance(fig, matplotlib.figure.Figure)
    plt.close(fig)
