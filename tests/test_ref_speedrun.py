"""Chapter 12 (the speedrun) against independent references and invariants.

The chapter's model is loaded from the notebook's `model` cells. Muon against torch.optim.Muon and its
orthogonalisation against an SVD in float64; rotary against transformers' Llama rotary embedding and the
relative-position invariance of the scores; QK-norm against transformers' Qwen3RMSNorm; ReLU² against
transformers' ReLUSquaredActivation; all switches off = chapter 02's GPT; zero-init gives loss ln V; causality.
Each exercise check rejects a plausible wrong answer.
"""
import math

import pytest
import torch

from labkit import notebook

from .conftest import ROOT
from .test_exercises import assert_wrong_answers_fail

NB = ROOT / "notebooks" / "12_speedrun.ipynb"
transformers = pytest.importorskip("transformers")

WRONG_ANSWERS = {
    0: "def softcap_grad(z, cap):\n    return 1 - torch.tanh(z) ** 2\n",
    1: ("def rotary_complex(x, angles):\n"
        "    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())\n"
        "    z = z * torch.polar(torch.ones_like(angles), angles)\n"
        "    return torch.view_as_real(z).flatten(-2)\n"),
    # the classic KV-cache bug with rotary: every step rotates the new token as if it stood at position 0
    2: """
@torch.no_grad()
def generate_kv(model, idx, max_new_tokens):
    cfg, t = model.config, model.transformer
    B, C, H = idx.shape[0], cfg.n_embd, cfg.n_head
    d = C // H
    cache = [None] * cfg.n_layer
    tokens, new, chosen = idx, idx, []
    for _ in range(max_new_tokens):
        T = new.shape[1]
        x = t.wte(new)
        for i, block in enumerate(t.h):
            attn = block.attn
            q, k, v = (z.view(B, T, H, d).transpose(1, 2) for z in attn.c_attn(block.ln_1(x)).split(C, dim=2))
            if attn.qk_norm:
                q, k = F.rms_norm(q, (d,)), F.rms_norm(k, (d,))
            q, k = apply_rotary(q, attn.cos[:T], attn.sin[:T]), apply_rotary(k, attn.cos[:T], attn.sin[:T])
            if cache[i] is not None:
                k, v = torch.cat((cache[i][0], k), dim=2), torch.cat((cache[i][1], v), dim=2)
            cache[i] = (k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.ln_2(x))
        logits = model.lm_head(t.ln_f(x[:, -1]))
        if cfg.softcap:
            logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
        chosen.append(logits)
        new = logits.argmax(-1, keepdim=True)
        tokens = torch.cat((tokens, new), dim=1)
    return tokens, torch.stack(chosen, dim=1)
""",
    # off by one: `<=` lets each query see window + 1 keys
    3: ("def sliding_window_attention(q, k, v, window):\n"
        "    t = torch.arange(q.size(-2))\n"
        "    distance = t[:, None] - t[None, :]\n"
        "    return F.scaled_dot_product_attention(q, k, v, attn_mask=(distance >= 0) & (distance <= window))\n"),
}


@pytest.fixture(scope="module")
def ns():
    return notebook.load(NB)


def test_muon_matches_torch_optim_muon(ns):
    g = torch.Generator().manual_seed(1)
    for shape in [(40, 12), (12, 40), (24, 24)]:
        w0 = torch.randn(*shape, generator=g)
        grads = [torch.randn(*shape, generator=g) for _ in range(6)]
        for nesterov in (True, False):
            a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
            ours = ns["Muon"]([a], lr=0.03, weight_decay=0.05, momentum=0.9, nesterov=nesterov)
            ref = torch.optim.Muon([b], lr=0.03, weight_decay=0.05, momentum=0.9, nesterov=nesterov)
            for gr in grads:
                a.grad, b.grad = gr.clone(), gr.clone()
                ours.step()
                ref.step()
            err = (a - b).abs().max().item()
            print(f"\n{shape} nesterov={nesterov}: max |ours - torch.optim.Muon| {err:.1e}")
            assert err < 1e-6


def test_newton_schulz_against_svd_float64(ns):
    g = torch.Generator().manual_seed(2)
    for shape in [(32, 80), (100, 20)]:
        G = torch.randn(*shape, generator=g, dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        O = ns["newton_schulz"](G, dtype=torch.float64)
        D = U.T @ O @ Vh.T
        off = (D - torch.diag(torch.diag(D))).abs().max().item()
        sv = torch.diag(D)
        print(f"\n{shape}: off-diagonal {off:.1e}, singular values [{sv.min():.3f}, {sv.max():.3f}]")
        assert off < 1e-10 and sv.min() > 0.6 and sv.max() < 1.25
        # a wrong coefficient set does not land in the band
        bad = ns["newton_schulz"](G, coefficients=(1.0, 0.0, 0.0), dtype=torch.float64)
        assert torch.linalg.svdvals(bad).max() < 0.6


def test_rotary_matches_transformers_llama(ns):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    d, T = 16, 24
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=T, rope_theta=10000.0)
    rope = LlamaRotaryEmbedding(cfg)
    q, k = torch.randn(2, 4, T, d), torch.randn(2, 4, T, d)
    cos_hf, sin_hf = rope(q, torch.arange(T)[None])
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    cos, sin = ns["rotary_cos_sin"](T, d)
    err = max((ns["apply_rotary"](q, cos, sin) - q_hf).abs().max().item(),
              (ns["apply_rotary"](k, cos, sin) - k_hf).abs().max().item())
    print(f"\nmax |ours - transformers' rotary| {err:.1e}")
    assert err < 1e-5


def test_rotary_scores_depend_on_relative_position_only(ns):
    d, T = 32, 64
    cos, sin = ns["rotary_cos_sin"](T, d)
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    rot = ns["apply_rotary"]

    def score(t, s):
        return (rot(q, cos[t].double(), sin[t].double()) @ rot(k, cos[s].double(), sin[s].double())).item()

    for t, s, shift in [(3, 1, 10), (40, 0, 23), (7, 7, 50)]:
        assert abs(score(t, s) - score(t + shift, s + shift)) < 1e-4
    assert abs(score(3, 1) - score(3, 2)) > 1e-3


def test_qk_norm_and_relu2_match_transformers(ns):
    from transformers.activations import ACT2FN
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    cfg = ns["SpeedConfig"].preset("tiny", vocab_size=50, qk_norm=True, relu2=True)
    x = torch.randn(3, 16, cfg.n_embd)
    mlp = ns["SpeedMLP"](cfg)
    ref = mlp.c_proj(ACT2FN["relu2"](mlp.c_fc(x)))
    assert (mlp(x) - ref).abs().max().item() < 1e-6
    h = torch.randn(2, 4, 16, 32)
    norm = Qwen3RMSNorm(32, eps=torch.finfo(torch.float32).eps)
    err = (torch.nn.functional.rms_norm(h, (32,)) - norm(h)).abs().max().item()
    print(f"\nQK-norm vs Qwen3RMSNorm: {err:.1e}")
    assert err < 1e-5


def test_switches_off_is_chapter02_gpt_and_zero_init_is_uniform(ns):
    cfg = ns["SpeedConfig"].preset("tiny", vocab_size=60)
    torch.manual_seed(0)
    ours, theirs = ns["SpeedGPT"](cfg).eval(), ns["GPT"](cfg).eval()
    theirs.load_state_dict(ours.state_dict())
    idx = torch.randint(60, (2, 64))
    assert (ours(idx)[0] - theirs(idx)[0]).abs().max().item() < 1e-6
    from dataclasses import replace
    full = replace(cfg, rotary=True, qk_norm=True, relu2=True, zero_init=True, untied=True, softcap=15.0,
                   value_embeds=True, skips=True)
    m = ns["SpeedGPT"](full)
    assert abs(m(idx, idx)[1].item() - math.log(60)) < 1e-5
    assert m.lm_head.weight is not m.transformer.wte.weight


def test_every_switch_stays_causal_and_softcap_bounds(ns):
    from dataclasses import replace
    cfg = replace(ns["SpeedConfig"].preset("tiny", vocab_size=40), rotary=True, qk_norm=True, relu2=True,
                  untied=True, softcap=5.0, value_embeds=True, skips=True)
    torch.manual_seed(1)
    m = ns["SpeedGPT"](cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    idx = torch.randint(40, (2, 32))
    idx2 = idx.clone()
    idx2[:, -1] = (idx2[:, -1] + 1) % 40
    a, b = m(idx)[0], m(idx2)[0]
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-5)
    assert a.abs().max().item() < 5.0


def test_wsd_multiplier(ns):
    w = ns["wsd_multiplier"]
    assert [w(s, 100, 0, 0.4) for s in (0, 59)] == [1.0, 1.0]
    assert abs(w(80, 100, 0, 0.4) - 0.5) < 1e-12 and w(100, 100, 0, 0.4) == 0.0
    assert abs(w(4, 100, 10, 0.4) - 0.5) < 1e-12


def test_wrong_answers_are_caught():
    assert_wrong_answers_fail(NB, WRONG_ANSWERS)


def test_newton_schulz_explorer():
    """The exploration: the cubic converges to U Vᵀ with enough steps, the quintic stays in its band; more quintic
    steps lift the smallest singular value of a gradient-like matrix."""
    import matplotlib.figure

    ns_ = notebook.load(NB, ("model", "explore"))
    view = ns_["explore_newton_schulz"]()
    assert view.values == {"steps": 5, "polynomial": "quintic (Jordan)", "matrix": "gradient-like"}
    few = view.set(steps=2)["min_sv"]
    more = view.set(steps=10)["min_sv"]
    assert more > 10 * few
    cubic = {s: view.set(polynomial="cubic (1.5, −0.5)", matrix="Gaussian", steps=s)["error"] for s in (3, 20)}
    quintic = view.set(polynomial="quintic (Jordan)", matrix="Gaussian", steps=20)["error"]
    print(f"\nmin σ after 2 / 10 quintic steps {few:.2g} / {more:.2g}; Gaussian max |σ − 1|: cubic 3 steps "
          f"{cubic[3]:.2g}, 20 steps {cubic[20]:.1e}; quintic 20 steps {quintic:.2g}")
    assert cubic[20] < 1e-6 < 0.1 < cubic[3]
    assert 0.05 < quintic < 0.35                                  # never exactly 1: the band
    assert isinstance(view.figure(), matplotlib.figure.Figure)


def test_greedy_pass_stops_a_trial_that_can_no_longer_be_kept(ns):
    """A trial still above the target at an evaluation past 0.97 x the kept recipe's steps stops there (its
    crossing would lie after that evaluation, so it cannot be kept): dropped at the same verdict as a full run,
    for a fraction of its budget. A kept recipe and its crossing are unchanged by the rule."""
    from dataclasses import replace

    vocab, train, val, windows = ns["tiny_corpus"]()
    get_batch = ns["tiny_get_batch"](train, val)
    small = ns["GPTConfig"](block_size=64, vocab_size=vocab, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    base = ns["SpeedRecipe"](model=small, max_steps=200, warmup_steps=5, eval_every=10)
    probe = ns["time_to_target"](base, get_batch, windows, target=0.0, give_up_at=40)
    assert probe["gave_up"] and not probe["reached"] and probe["curve"][-1][0] == 40    # first eval at >= 40
    target = probe["curve"][3][2] + 1e-4                                                # base's val at step 30
    stages = {"hopeless (lr 1e-6)": dict(lr=1e-6)}
    results, _, kept, best = ns["greedy_stages"](base, stages, get_batch, windows, target, log=lambda s: None)
    assert kept == base and results["chapter 02's recipe"]["reached"] and 20 < best["steps"] <= 30
    bad = results["hopeless (lr 1e-6)"]
    stop = bad["curve"][-1][0]
    assert bad["gave_up"] and not bad["kept"] and stop == 10 * math.ceil(0.97 * best["steps"] / 10) < base.max_steps
    full = ns["time_to_target"](replace(base, lr=1e-6), get_batch, windows, target)       # without the rule
    assert not full["reached"] and not full["gave_up"] and full["curve"][-1][0] == base.max_steps
    assert [c[2] for c in full["curve"][:len(bad["curve"])]] == [c[2] for c in bad["curve"]]   # same run, cut short
