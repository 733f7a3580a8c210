"""Chapter 01 (minGPT): the notebook's GPT against Hugging Face's GPT-2, given the same weights.

The model is loaded from the notebook's `model` cells (labkit.notebook.load); the reference is
`transformers.GPT2LMHeadModel` with eager (explicit-matrix) attention, so the two share no attention code.
Every tensor of the reference is randomised (biases and LayerNorms included) before the weights are copied,
so a wrongly mapped or transposed parameter cannot pass by accident.

Tolerances, float32 on CPU: logits and loss atol 1e-5, gradients atol 1e-5 + rtol 1e-4 (observed ~1e-6).
"""
import math

import pytest
import torch

from labkit import notebook

from .test_exercises import assert_wrong_answers_fail

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

NB = "01_mingpt"
ATOL = 1e-5
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SMALL = dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)


@pytest.fixture(scope="module")
def ns():
    return notebook.load(NB)


def hf_reference(seed: int = 0) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=SMALL["vocab_size"], n_positions=SMALL["block_size"], n_embd=SMALL["n_embd"],
                     n_layer=SMALL["n_layer"], n_head=SMALL["n_head"], activation_function="gelu_new",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                     tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "eager"  # the explicit T×T attention: independent of our SDPA call
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # the tied wte/lm_head tensor is listed (and filled) once
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:  # matrices large enough that greedy decoding does not just repeat one token
                std = 0.1 if name.endswith("bias") else 0.05 if name.endswith(("wte.weight", "wpe.weight")) else 0.3
                p.copy_(std * torch.randn(p.shape, generator=g))
    assert model.lm_head.weight is model.transformer.wte.weight
    return model.eval()


def ours_from_hf(ns, hf: GPT2LMHeadModel):
    """Our GPT with the reference's weights: drop the `transformer.` prefix, transpose HF's Conv1D (in, out)."""
    model = ns["GPT"](ns["GPTConfig"](**SMALL))
    state = {}
    for key, value in hf.state_dict().items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of older transformers
            continue
        state[key] = value.t() if key.endswith(HF_CONV1D) else value
    model.load_state_dict(state, strict=True)
    assert model.lm_head.weight is model.wte.weight, "loading must keep the weight tying"
    return model.eval()


def hf_param(hf, our_name: str) -> torch.Tensor:
    p = hf.get_parameter(our_name if our_name.startswith("lm_head") else "transformer." + our_name)
    return p


def test_logits_match(ns):
    hf = hf_reference()
    ours = ours_from_hf(ns, hf)
    idx = torch.randint(SMALL["vocab_size"], (3, SMALL["block_size"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        got, loss = ours(idx)
    err = (got - expected).abs().max().item()
    print(f"\nlogits {tuple(got.shape)}: max abs error {err:.2e} (atol {ATOL:g}); logits std {expected.std():.2f}")
    assert loss is None
    assert got.shape == expected.shape
    assert err < ATOL


def test_loss_and_gradients_match(ns):
    hf = hf_reference(seed=1)
    ours = ours_from_hf(ns, hf)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(SMALL["vocab_size"], (4, 24), generator=g)
    ignored = torch.rand(4, 24, generator=g) < 0.2                 # some targets not scored
    # HF shifts labels inside the model (position t predicts labels[t + 1]) and ignores -100;
    # ours takes already-shifted targets and ignores -1.
    labels = idx.masked_fill(ignored, -100)
    targets = torch.cat([idx[:, 1:].masked_fill(ignored[:, 1:], -1), torch.full((4, 1), -1)], dim=1)

    hf_loss = hf(idx, labels=labels).loss
    _, our_loss = ours(idx, targets)
    loss_err = abs(our_loss.item() - hf_loss.item())
    hf_loss.backward()
    our_loss.backward()

    worst, worst_name = 0.0, ""
    for name, p in ours.named_parameters():
        ref = hf_param(hf, name).grad
        ref = ref.t() if name.endswith(HF_CONV1D) else ref
        assert p.grad is not None and ref is not None, name
        torch.testing.assert_close(p.grad, ref, atol=ATOL, rtol=1e-4, msg=lambda m: f"gradient of {name}: {m}")
        err = (p.grad - ref).abs().max().item()
        if err > worst:
            worst, worst_name = err, name
    print(f"\nloss {our_loss.item():.6f} vs {hf_loss.item():.6f}: error {loss_err:.2e}; "
          f"gradients of all {len(list(ours.parameters()))} parameter tensors: max abs error {worst:.2e} ({worst_name})")
    assert loss_err < ATOL


def test_greedy_generate_matches_hf(ns):
    hf = hf_reference(seed=2)
    ours = ours_from_hf(ns, hf)
    prompt = torch.randint(SMALL["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(2))
    got = ours.generate(prompt, max_new_tokens=20, temperature=0)
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                           pad_token_id=0)
    print(f"\ngreedy continuation: {got[0, 6:].tolist()}")
    assert len(set(got[0, 6:].tolist())) > 3, "a degenerate test: the reference repeats one token"
    assert torch.equal(got, expected)


def test_generate_crops_context_and_samples_like_reference(ns):
    """Past block_size, generate() must condition on the last block_size tokens; temperature and top_k as
    a hand-written loop on the reference model does them, draw for draw with the same generator."""
    hf = hf_reference(seed=3)
    ours = ours_from_hf(ns, hf)
    T = SMALL["block_size"]
    prompt = torch.randint(SMALL["vocab_size"], (2, T - 4), generator=torch.Generator().manual_seed(3))
    got = ours.generate(prompt, max_new_tokens=12, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(7))

    idx, g = prompt, torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _ in range(12):
            logits = hf(idx[:, -T:]).logits[:, -1, :] / 0.7
            kth = logits.topk(5, dim=-1).values[:, -1:]
            probs = logits.masked_fill(logits < kth, float("-inf")).softmax(dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g)], dim=1)
    assert got.shape == (2, T + 8)
    assert torch.equal(got, idx)
    greedy = ours.generate(prompt, max_new_tokens=12, temperature=0)
    assert torch.equal(greedy, ours.generate(prompt, max_new_tokens=12, top_k=1)), "top_k=1 must be greedy"


def test_causal(ns):
    model = ns["GPT"](ns["GPTConfig"](**SMALL)).eval()
    idx = torch.randint(SMALL["vocab_size"], (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % SMALL["vocab_size"]
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gpt2_initialisation(ns):
    GPT, GPTConfig = ns["GPT"], ns["GPTConfig"]
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt-micro", vocab_size=512, block_size=256))
    L = model.config.n_layer
    assert model.lm_head.weight is model.wte.weight
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05), name
        elif name.startswith("ln") or ".ln_" in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:  # wte (= lm_head), wpe, c_attn, c_fc
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
    idx, targets = torch.randint(512, (8, 256)), torch.randint(512, (8, 256))
    _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(512), abs=0.05), "a fresh model should predict ~uniformly"


@pytest.mark.parametrize("name,n_layer,n_head,n_embd", [("gpt2", 12, 12, 768), ("gpt2-medium", 24, 16, 1024)])
def test_preset_sizes_match_hf(ns, name, n_layer, n_head, n_embd):
    cfg = ns["GPTConfig"].preset(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size) == (n_layer, n_head, n_embd, 50257, 1024)
    with torch.device("meta"):
        ours = ns["GPT"](cfg).num_params()
        hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).num_parameters()
    print(f"\n{name}: {ours:,} parameters (transformers: {hf:,})")
    assert ours == hf


def test_presets_and_errors(ns):
    GPT, GPTConfig = ns["GPT"], ns["GPTConfig"]
    assert [(GPTConfig.preset(n).n_layer, GPTConfig.preset(n).n_head, GPTConfig.preset(n).n_embd)
            for n in ("gpt-nano", "gpt-micro", "gpt-mini")] == [(3, 3, 48), (4, 4, 128), (6, 6, 192)]
    cfg = GPTConfig.preset("gpt-nano", vocab_size=10, block_size=11, dropout=0.1)
    assert (cfg.vocab_size, cfg.block_size, cfg.dropout, cfg.bias) == (10, 11, 0.1, True)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=3, n_embd=16)
    model = GPT(cfg)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 12, dtype=torch.long))
    no_bias = GPT(GPTConfig.preset("gpt-nano", vocab_size=10, block_size=11, bias=False))
    assert not any(n.endswith("bias") for n, _ in no_bias.named_parameters())


def test_dropout_only_in_training(ns):
    model = ns["GPT"](ns["GPTConfig"](**SMALL, dropout=0.5))
    idx = torch.randint(SMALL["vocab_size"], (2, 16))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_tokenize_to_file(tmp_path):
    """The full size's data path on local documents: chunked, eos-separated, cached, atomic."""
    import numpy as np

    import labkit
    import labkit.data  # noqa: F401  (the cell uses labkit.data.pack_tokens)

    source = next(c.source for c in notebook.read(NB).cells if c.cell_type == "code" and "def tokenize_to_file" in c.source)
    env = notebook.run_sources([source], {"__name__": "__test__", "labkit": labkit, "np": np, "torch": torch})
    tokenize_to_file = env["tokenize_to_file"]
    docs = ["abc", "de", "fghij", "k", "lmnop"] * 3
    encode = lambda s: [ord(ch) - ord("a") for ch in s]  # noqa: E731
    path = tmp_path / "tokens.u16"
    ids = tokenize_to_file(iter(docs), encode, eos=99, n_tokens=11, path=path, chunk_tokens=4)
    # pack_tokens drops the rest of the document that ends a chunk; the next chunk starts a new document
    assert ids.dtype == torch.uint16 and len(ids) == 11
    assert path.stat().st_size == 22 and not path.with_suffix(".tmp").exists()
    assert ids.tolist() == [0, 1, 2, 99, 3, 4, 99, 5, 10, 99, 11]

    def must_not_be_read():
        raise AssertionError("a cached file must not be re-tokenized")
        yield

    again = tokenize_to_file(must_not_be_read(), encode, eos=99, n_tokens=11, path=path)
    assert torch.equal(again, ids)


_KV_CACHED = '''
@torch.no_grad()
def generate_cached(model, idx, max_new_tokens):
    B, T0 = idx.shape
    if T0 + max_new_tokens > model.config.block_size:
        raise ValueError("too long")
    cache = [None] * len(model.h)
    new, out, past = idx, idx, 0
    for _ in range(max_new_tokens):
        T = new.size(1)
        x = model.wte(new) + model.wpe(torch.arange(past, past + T))
        for i, block in enumerate(model.h):
            attn, C = block.attn, x.size(-1)
            q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
            if cache[i] is not None:
                k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)
            cache[i] = (k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.ln_2(x))
        past += T
        new = model.lm_head(model.ln_f(x[:, -1])).argmax(dim=-1, keepdim=True)
        out = torch.cat([out, new], dim=1)
    return out
'''

WRONG_ANSWERS = {
    # 0: an absolute threshold (p >= min_p) instead of one relative to the most likely token
    0: ("def min_p_filter(logits, min_p):\n"
        "    return logits.masked_fill(logits.softmax(dim=-1) < min_p, float('-inf'))\n"),
    # 1: is_causal=True at every step: with one query and past + 1 keys, SDPA's top-left triangle lets the new
    #    token see key 0 only
    1: _KV_CACHED,
    # 2: ranks the continuations by the new token's log-probability alone, forgetting the beam's score
    2: ('''
@torch.no_grad()
def beam_search(model, idx, max_new_tokens, num_beams):
    beams = idx
    for _ in range(max_new_tokens):
        logp = F.log_softmax(model(beams[:, -model.config.block_size:])[0][:, -1], dim=-1)
        V = logp.size(-1)
        best = logp.flatten().topk(min(num_beams, logp.numel()))
        beams = torch.cat([beams[best.indices // V], (best.indices % V)[:, None]], dim=1)
    return beams[:1]
'''),
    # 3: counts lm_head as a separate V x C matrix (ignores the weight tying)
    3: ("def count_params(config):\n"
        "    V, T, L, C, b = config.vocab_size, config.block_size, config.n_layer, config.n_embd, int(config.bias)\n"
        "    ln = C + b * C\n"
        "    block = 2 * ln + 4 * C * C + 4 * b * C + 8 * C * C + 5 * b * C\n"
        "    return V * C + T * C + L * block + ln + V * C\n"),
}


def test_wrong_answers_are_caught():
    assert_wrong_answers_fail(NB, WRONG_ANSWERS)


@pytest.mark.parametrize("mistake,replacement", [
    # the positions restart at 0 for every new token
    ("position offset", ("torch.arange(past, past + T)", "torch.arange(T)")),
    # a mask for one query over all keys: right tokens, but still no cache (the whole context every step)
    ("no cache", None),
])
def test_more_kv_cache_mistakes_are_caught(mistake, replacement):
    from labkit.check import ExerciseError

    if replacement is not None:
        src = _KV_CACHED.replace("is_causal=True", "attn_mask=torch.ones(T, past + T, dtype=torch.bool).tril(past)")
        src = src.replace(*replacement)
    else:
        src = ("@torch.no_grad()\n"
               "def generate_cached(model, idx, max_new_tokens):\n"
               "    if idx.size(1) + max_new_tokens > model.config.block_size:\n"
               "        raise ValueError('too long')\n"
               "    return model.generate(idx, max_new_tokens, temperature=0)\n")
    with pytest.raises(ExerciseError) as e:
        notebook.run_exercise(NB, 1, src)
    print(f"{mistake}: {str(e.value).splitlines()[0][:120]}")


def test_correct_kv_cache_variant_passes():
    """The mask written out (instead of the solution's) passes: the check tests behaviour, not one spelling."""
    src = _KV_CACHED.replace("is_causal=True", "attn_mask=torch.ones(T, past + T, dtype=torch.bool).tril(past)")
    notebook.run_exercise(NB, 1, src)


def test_sampling_explorer():
    """The exploration on an untrained model: lower temperature, lower entropy; top_k=1 is greedy (0 bits);
    top_k=3 caps each draw at log2(3) bits; the figure is a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import labkit.data

    ns = notebook.load(NB, ("model", "explore"))
    text = "def f(x):\n    return x + 1\n" * 20
    tok = labkit.data.CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = ns["GPT"](ns["GPTConfig"].preset("gpt-nano", vocab_size=tok.vocab_size, block_size=32))
    view = ns["explore_sampling"](model, tok, prompt="def ", n=40)
    assert view.values == {"temperature": 0.8, "top_k": 0}
    cold = view.set(temperature=0.2)["mean_entropy_bits"]
    hot = view.set(temperature=1.5)["mean_entropy_bits"]
    print(f"\nmean entropy: {cold:.3f} bits at temperature 0.2, {hot:.3f} at 1.5")
    assert cold < hot - 0.5
    greedy = view.set(temperature=1.0, top_k=1)
    assert greedy["mean_entropy_bits"] == 0.0
    assert greedy["sample"] == tok.decode(model.generate(torch.as_tensor(tok.encode("def "))[None].long(), 40, temperature=0)[0].tolist())
    assert max(view.set(top_k=3)["entropy_bits"]) <= math.log2(3) + 1e-6
    fig = view.figure()
    assert isinstance(fig, matplotlib.figure.Figure)
    plt.close(fig)
