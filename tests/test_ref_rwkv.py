"""Chapter 08 (RWKV-4) against the PyPI reference, given the same weights, plus its internal equivalences.

Reference: `transformers.RwkvForCausalLM` (RWKV-4) on its CPU path (`rwkv_linear_attention_cpu`), built with
`rescale_every=0` (otherwise it halves the hidden state every 6 layers in eval mode). Our model's weights are
copied into it with `load_state_dict(strict=True)`: the parameter names are the same.
Internal: the sequential, parallel (T×T) and chunked WKV forms agree (values, states, gradients, huge keys);
RNN mode = full forward. Every comparison prints its max error; tolerances are for float32.
"""
from functools import partial

import pytest
import torch

import labkit.notebook
from labkit.check import ExerciseError

from .grads import backward_same, report
from .test_exercises import assert_wrong_answers_fail

NB = "08_rwkv"
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def ch():
    return labkit.notebook.load(NB, ("model", "bench"))


_report = partial(report, atol=ATOL, rtol=RTOL)   # print the max error, assert closeness


def _our_model(ch, seed=0, scale=0.3, **overrides):
    """A small RWKV with every parameter moved off its (mostly zero) initialisation, so each one matters."""
    kw = dict(vocab_size=128, n_embd=64, n_layer=3, dim_ffn=224)
    torch.manual_seed(seed)
    model = ch["RWKV"](ch["RWKVConfig"](**{**kw, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _reference_from(model):
    from transformers import RwkvConfig, RwkvForCausalLM

    c = model.config
    ref = RwkvForCausalLM(RwkvConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, attention_hidden_size=c.n_embd,
                                     intermediate_size=c.dim_ffn, num_hidden_layers=c.n_layer,
                                     layer_norm_epsilon=c.layer_norm_eps, context_length=1024, rescale_every=0,
                                     tie_word_embeddings=False))
    ref.load_state_dict(model.state_dict(), strict=True)          # same names, same shapes: 1:1
    assert ref.head.weight is not ref.rwkv.embeddings.weight      # RWKV-4's head is not tied
    return ref


# --------------------------------------------------------------------------- the model vs transformers
@pytest.mark.parametrize("wkv,chunk_size", [("sequential", 32), ("parallel", 32), ("chunked", 7), ("chunked", 16)])
def test_logits_and_gradients_match_transformers(ch, wkv, chunk_size):
    ours = _our_model(ch, wkv=wkv, chunk_size=chunk_size)
    ref = _reference_from(ours)
    idx = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(1))
    ours.train(), ref.train()                                  # training mode: no state, no rescaling
    logits = ours(idx)[0]
    ref_logits = ref(idx, use_cache=False).logits
    _report(f"logits ({wkv}, chunk {chunk_size})", logits, ref_logits)

    backward_same(logits, ref_logits, generator=torch.Generator().manual_seed(2))
    ref_params = dict(ref.named_parameters())
    worst = max(_report(f"d/d {name}", p.grad, ref_params[name].grad, atol=1e-4, rtol=1e-4)
                for name, p in ours.named_parameters())
    print(f"worst parameter-gradient error ({wkv}): {worst:.2e} over {len(ref_params)} tensors")


def test_loss_matches_transformers(ch):
    ours = _our_model(ch).eval()
    ref = _reference_from(ours).eval()
    idx = torch.randint(0, 128, (3, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours_loss = ours(idx[:, :-1], idx[:, 1:])[1]
        ref_loss = ref(idx, labels=idx, use_cache=False).loss          # transformers shifts the labels itself
    _report("mean cross-entropy", ours_loss, ref_loss)


def test_rnn_mode_matches_transformers_stateful_path(ch):
    """Prefill 9 tokens, then one token at a time, both models carrying their state (batch 1: see TOOLCHAIN.md)."""
    ours = _our_model(ch, seed=4).eval()
    ref = _reference_from(ours).eval()
    idx = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    state = ch["RWKVState"].empty(ours.config, 1)
    with torch.no_grad():
        got = [ours(idx[:, :9], state=state)[0]]
        out = ref(idx[:, :9], use_cache=True)
        expected, ref_state = [out.logits], out.state
        for t in range(9, 20):
            got.append(ours(idx[:, t:t + 1], state=state)[0])
            out = ref(idx[:, t:t + 1], state=ref_state, use_cache=True)
            expected.append(out.logits)
            ref_state = out.state
    _report("RNN mode (prefill 9, 11 steps) vs transformers' stateful path", torch.cat(got, 1), torch.cat(expected, 1))
    # the states mean the same thing: transformers keeps [ffn_x, att_x, a', b', p] as (B, d, L)
    for layer, s in enumerate(state):
        _report(f"layer {layer} token-shift states", torch.stack([s.ffn_x, s.att_x]),
                torch.stack([ref_state[0][..., layer], ref_state[1][..., layer]]))
        a, b, p = s.wkv
        ra, rb, rp = (ref_state[i][..., layer] for i in (2, 3, 4))
        _report(f"layer {layer} wkv a = a' e^p", a * p.exp(), ra * rp.exp(), atol=1e-4, rtol=1e-4)
        _report(f"layer {layer} wkv b = b' e^p", b * p.exp(), rb * rp.exp(), atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers(ch):
    ours = _our_model(ch, seed=5, scale=0.5).eval()
    ref = _reference_from(ours).eval()
    prompt = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    expected = ref.generate(prompt, max_new_tokens=15, min_new_tokens=15, do_sample=False, use_cache=True,
                            pad_token_id=0, eos_token_id=None)
    got = ours.generate(prompt, max_new_tokens=15, temperature=0)
    print("transformers:", expected[0].tolist(), "\nours:        ", got[0].tolist())
    assert torch.equal(got, expected)


def test_wkv_forms_match_transformers_cpu_kernel(ch):
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    w, u, k, v = ch["random_wkv_inputs"](B=2, T=45, C=16, seed=6, key_scale=3.0)
    expected, _ = rwkv_linear_attention_cpu(torch.log(w), u, k, v)     # it takes time_decay = log w
    for name, fn in (("sequential", ch["wkv_sequential"]), ("parallel", ch["wkv_parallel"]),
                     ("chunked 8", lambda *a: ch["wkv_chunked"](*a, chunk_size=8))):
        _report(f"wkv {name} vs rwkv_linear_attention_cpu", fn(w, u, k, v)[0], expected)


# --------------------------------------------------------------------------- internal equivalences
@pytest.mark.parametrize("with_state", [False, True])
def test_three_wkv_forms_agree(ch, with_state):
    w, u, k, v = ch["random_wkv_inputs"](B=2, T=83, C=12, seed=7, key_scale=2.0)
    state = None
    if with_state:                                             # a state left by 30 earlier tokens
        _, _, k_prev, v_prev = ch["random_wkv_inputs"](B=2, T=30, C=12, seed=8)
        _, state = ch["wkv_sequential"](w, u, k_prev, v_prev)
    y_seq, s_seq = ch["wkv_sequential"](w, u, k, v, state)
    forms = {"parallel": lambda: ch["wkv_parallel"](w, u, k, v, state)}
    for c in (1, 5, 16, 64, 100):
        forms[f"chunked {c}"] = lambda c=c: ch["wkv_chunked"](w, u, k, v, state, chunk_size=c)
    for name, fn in forms.items():
        y, s = fn()
        _report(f"{name} vs sequential: wkv", y, y_seq)
        for i, part in ((0, "a"), (1, "b")):                   # states may differ in p; compare a' e^p, b' e^p
            _report(f"{name} vs sequential: last state {part}", s[i] * s[2].exp(), s_seq[i] * s_seq[2].exp(),
                    atol=1e-5, rtol=1e-4)
    ys = []
    st = state if state is not None else ch["wkv_empty_state"](2, 12)
    for t in range(k.shape[1]):
        y_t, st = ch["wkv_step"](w, u, k[:, t], v[:, t], st)
        ys.append(y_t)
    _report("wkv_step loop vs sequential", torch.stack(ys, 1), y_seq)


def test_hand_written_backward_passes_gradcheck(ch):
    w, u, k, v = (t.double().requires_grad_() for t in ch["random_wkv_inputs"](B=2, T=11, C=6, seed=12, key_scale=3.0))
    assert torch.autograd.gradcheck(lambda *a: ch["wkv_sequential_fast"](*a)[0], (w, u, k, v))


@pytest.mark.parametrize("key_scale", [1.0, 40.0])
def test_hand_written_backward_matches_autograd(ch, key_scale):
    inputs = ch["random_wkv_inputs"](B=3, T=70, C=16, seed=13, key_scale=key_scale)
    g_out = torch.randn(3, 70, 16, generator=torch.Generator().manual_seed(13))
    grads, outs = {}, {}
    for name in ("wkv_sequential", "wkv_sequential_fast"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, state = ch[name](*leaves)
        (y * g_out).sum().backward()
        grads[name], outs[name] = [t.grad for t in leaves], (y, *state)
    for part, got, expected in zip(("wkv", "a'", "b'", "p"), outs["wkv_sequential_fast"], outs["wkv_sequential"]):
        _report(f"hand-written vs autograd (keys x{key_scale:g}): {part}", got, expected, atol=0, rtol=0)
    for arg, g, g_ref in zip("w u k v".split(), grads["wkv_sequential_fast"], grads["wkv_sequential"]):
        _report(f"hand-written vs autograd (keys x{key_scale:g}): d/d{arg}", g, g_ref, atol=1e-4, rtol=1e-4)


def test_wkv_gradients_agree_with_and_without_recompute(ch):
    inputs = ch["random_wkv_inputs"](B=2, T=50, C=8, seed=9)
    g_out = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(9))
    grads = {}
    for name, fn in {
        "sequential": ch["wkv_sequential"],
        "parallel": ch["wkv_parallel"],
        "chunked": lambda *a: ch["wkv_chunked"](*a, chunk_size=16),
        "chunked, recomputed": lambda *a: ch["wkv_chunked"](*a, chunk_size=16, checkpoint_chunks=True),
    }.items():
        leaves = [t.clone().requires_grad_() for t in inputs]
        (fn(*leaves)[0] * g_out).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for name in ("parallel", "chunked", "chunked, recomputed"):
        for arg, g, g_ref in zip("w u k v".split(), grads[name], grads["sequential"]):
            _report(f"{name} vs sequential: d/d{arg}", g, g_ref, atol=1e-4, rtol=1e-4)


def test_stable_forms_survive_huge_keys_and_the_naive_one_does_not(ch):
    """The chapter's claim about the max trick, both halves."""
    w, u, k, v = ch["random_wkv_inputs"](B=2, T=40, C=8, seed=10, key_scale=100.0)
    assert torch.isnan(ch["wkv_recurrent_naive"](w, u, k, v)).any()
    y_seq = ch["wkv_sequential"](w, u, k, v)[0]
    assert torch.isfinite(y_seq).all()
    _report("parallel vs sequential, keys ~ N(0, 100²)", ch["wkv_parallel"](w, u, k, v)[0], y_seq)
    _report("chunked vs sequential, keys ~ N(0, 100²)", ch["wkv_chunked"](w, u, k, v, chunk_size=6)[0], y_seq)
    small = ch["random_wkv_inputs"](B=2, T=40, C=8, seed=10)
    _report("naive vs stable, keys ~ N(0, 1)", ch["wkv_recurrent_naive"](*small), ch["wkv_sequential"](*small)[0])


def test_rnn_mode_equals_full_forward_any_batch(ch):
    for wkv in ("sequential", "chunked"):
        model = _our_model(ch, seed=11, wkv=wkv, chunk_size=8).eval()
        idx = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            full, _ = model(idx)
            state = ch["RWKVState"].empty(model.config, 3)
            pieces = [model(idx[:, :11], state=state)[0], model(idx[:, 11:20], state=state)[0]]   # two prefills
            pieces += [model(idx[:, t:t + 1], state=state)[0] for t in range(20, 40)]              # then steps
        _report(f"RNN mode (11 + 9 tokens, 20 steps, {wkv}) vs full forward", torch.cat(pieces, 1), full)
        assert state.nbytes == 3 * 5 * 64 * 3 * 4                  # layers × 5 vectors × d × batch × 4 bytes


def test_bf16_autocast_training_step_stays_close_to_float32(ch):
    """The full config trains under bf16 autocast with WKV in float32 (chunked, recomputed in backward)."""
    model = _our_model(ch, seed=14, scale=0.1, wkv="chunked", chunk_size=8, checkpoint_wkv=True)
    idx = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(14))
    loss32 = model(idx[:, :-1], idx[:, 1:])[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model(idx[:, :-1], idx[:, 1:])[1]
    loss16.backward()
    print(f"loss fp32 {loss32.item():.4f}, bf16 autocast {loss16.item():.4f}")
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------- initialisation and configs
def test_initialisation_follows_the_paper(ch):
    torch.manual_seed(0)
    model = ch["RWKV"](ch["RWKVConfig"](vocab_size=100, n_embd=64, n_layer=4))
    blocks = model.rwkv.blocks
    assert model.rwkv.embeddings.weight.abs().max() <= 1e-4                         # small init embedding
    att0, att3 = blocks[0].attention, blocks[3].attention
    assert att0.time_decay[0].item() == pytest.approx(-5) and att0.time_decay[-1].item() == pytest.approx(3)
    assert att3.time_decay[-1].item() == pytest.approx(3) and att3.time_decay[32] < att0.time_decay[32]
    assert att0.time_first[:3].tolist() == pytest.approx([-1.2040, -0.7040, -1.7040], abs=1e-4)   # log 0.3 + zigzag
    for b in blocks:
        for lin in (b.attention.key, b.attention.receptance, b.attention.output,
                    b.feed_forward.receptance, b.feed_forward.value):
            assert torch.count_nonzero(lin.weight) == 0
    k = blocks[1].feed_forward.key.weight                                           # (4d, d), orthogonal, gain 2
    torch.testing.assert_close(k.T @ k, 4 * torch.eye(64), atol=1e-4, rtol=0)
    idx = torch.randint(0, 100, (2, 16))
    logits, loss = model(idx, idx)
    print(f"loss at init {loss.item():.4f} vs ln 100 = {torch.log(torch.tensor(100.0)).item():.4f}")
    assert abs(loss.item() - torch.log(torch.tensor(100.0)).item()) < 0.3


def test_presets(ch):
    cfg = ch["RWKVConfig"].preset("rwkv4-169m")
    assert (cfg.n_layer, cfg.n_embd, cfg.dim_ffn, cfg.vocab_size, cfg.wkv) == (12, 768, 3072, 50277, "chunked")
    with torch.device("meta"):
        n = ch["RWKV"](cfg).num_params()
    print(f"RWKV-4 169M: {n:,} parameters")
    assert n == 169_342_464                       # the paper's Table 2: 1.693e8 (2VD + 13D²L + D(11L + 4))
    with pytest.raises(ValueError, match="unknown preset"):
        ch["RWKVConfig"].preset("rwkv-7b")
    with pytest.raises(ValueError, match="wkv must be"):
        ch["RWKVConfig"](wkv="fast")


def test_optimizer_never_decays_mixing_decay_or_norm_parameters(ch):
    """The chapter trains with the Trainer's AdamW (labkit.train.adamw): its rule must spare RWKV's vectors."""
    from labkit.train import TrainConfig, adamw

    model = _our_model(ch)
    opt = adamw(model, TrainConfig(lr=1e-3, weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert names and all(name.endswith("weight") and "ln" not in name for name in names)
    assert not any("time_" in name for name in names)


def test_benchmark_function_runs(ch):
    out = ch["benchmark_wkv"](lengths=(8, 40), repeats=1, max_parallel_length=16)
    assert out["lengths"] == [8, 40]
    assert out["forward"]["parallel (T×T)"][1] is None and out["train"]["parallel (T×T)"][0] > 0
    for mode in ("forward", "train"):
        for name, times in out[mode].items():
            assert len(times) == 2 and all(t is None or t > 0 for t in times), name


# --------------------------------------------------------------------------- the exercises' wrong answers
WRONG_ANSWERS = {
    # the taps the wrong way round (a convolution's weights read as a correlation's): mus[j] weighs x_{t-(K-1-j)}
    0: '''
def token_shift_k(x, mus, last):
    K, T = mus.shape[0], x.shape[1]
    xx = torch.cat([last, x], dim=1)
    out = sum(mus[K - 1 - j] * xx[:, K - 1 - j:K - 1 - j + T] for j in range(K))
    return out, xx[:, xx.shape[1] - (K - 1):]
''',
    # the state emptied after a document's first token instead of before it: that token reads the last document
    1: '''
def wkv_with_resets(w, u, k, v, reset):
    B, T, C = k.shape
    empty = wkv_empty_state(B, C, k.device, k.dtype)
    state, ys = empty, []
    for t in range(T):
        y, state = wkv_step(w, u, k[:, t], v[:, t], state)
        state = tuple(torch.where(reset[:, t, None], e, s) for e, s in zip(empty, state))
        ys.append(y)
    return torch.stack(ys, dim=1)
''',
    # RetNet's order: the state updated first, then read, and no bonus u for the current token
    2: '''
def wkv5_recurrent(r, k, v, w, u, state=None):
    B, T, H, N = k.shape
    S = k.new_zeros(B, H, N, N) if state is None else state
    ys = []
    for t in range(T):
        S = w[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append((r[:, t, :, None, :] @ S).squeeze(-2))
    return torch.stack(ys, dim=1), S
''',
}


def test_wrong_answers_are_rejected():
    assert_wrong_answers_fail(NB, WRONG_ANSWERS)


def test_more_wrong_answers_are_rejected():
    """Two more mistakes a learner makes: the new state taken from x alone (wrong when x is shorter than K - 1),
    and documents reset with the first row's flags for every row."""
    wrong = {0: '''
def token_shift_k(x, mus, last):
    K, T = mus.shape[0], x.shape[1]
    xx = torch.cat([last, x], dim=1)
    out = sum(mus[j] * xx[:, K - 1 - j:K - 1 - j + T] for j in range(K))
    return out, x[:, -(K - 1):]
''', 1: '''
def wkv_with_resets(w, u, k, v, reset):
    B, T, C = k.shape
    empty = wkv_empty_state(B, C, k.device, k.dtype)
    state, ys = empty, []
    for t in range(T):
        state = tuple(torch.where(reset[0, t], e, s) for e, s in zip(empty, state))
        y, state = wkv_step(w, u, k[:, t], v[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1)
'''}
    for i, src in wrong.items():
        with pytest.raises(ExerciseError):
            labkit.notebook.run_exercise(NB, i, src)


# --------------------------------------------------------------------------- the exploration
def test_explore_decay_shows_longer_memory_for_slower_decay():
    """explore_decay on an untrained tiny model (zero keys at init): layer 0's channel 0 decays at w = e^-5, its last
    channel at e^3, so the first looks much further back; the figure is a matplotlib Figure."""
    import matplotlib
    import matplotlib.pyplot as plt

    ns = labkit.notebook.load(NB, ("model", "explore"))
    torch.manual_seed(0)
    model = ns["RWKV"](ns["RWKVConfig"].preset("rwkv-tiny", vocab_size=96)).eval()
    idx = torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(0))
    view = ns["explore_decay"](model, idx)
    slow = view.set(layer=0, channel=0, position=47)
    assert abs(slow["weights"].sum().item() - 1) < 1e-5 and slow["weights"].shape == (48,)
    fast = view.set(channel=127)
    print(f"w = {slow['w']:.3g}: memory {slow['memory']} tokens; w = {fast['w']:.3g}: memory {fast['memory']}")
    assert slow["w"] < fast["w"] and slow["memory"] > 10 * fast["memory"]
    early = view.set(channel=0, position=10)
    assert early["weights"].shape == (11,) and early["memory"] <= 11
    with_keys = view.set(use_keys=False)                     # the zero-init keys are zero anyway: the same row
    assert torch.allclose(with_keys["weights"], early["weights"])
    fig = view.figure()
    assert isinstance(fig, matplotlib.figure.Figure)
    plt.close(fig)
