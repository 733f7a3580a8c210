"""Chapter 02 (nanoGPT) against an independent reference: transformers' GPT2LMHeadModel.

The chapter's model is loaded from the notebook's `model` cells. A *random* GPT2LMHeadModel (every tensor
perturbed, biases and LayerNorms included) goes through the chapter's own conversion code
(`GPT.from_pretrained(hf_model=...)`); logits, loss and gradients must then agree. Also: the SDPA and
explicit-mask attention paths are the same function, the init and tying rules hold, sampling behaves, the
full-size data code works on local data, and each exercise check rejects a plausible wrong answer.
"""
import json
import math

import pytest
import torch

from labkit import notebook
from labkit.data import DataUnavailable

from .conftest import ROOT
from .grads import perturb_
from .test_exercises import assert_wrong_answers_fail

NB = ROOT / "notebooks" / "02_nanogpt.ipynb"
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ns():
    return notebook.load(NB)


def random_hf_gpt2(attn_implementation="eager", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=101, n_positions=48, bos_token_id=100,
                                  eos_token_id=100, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    cfg._attn_implementation = attn_implementation
    return perturb_(transformers.GPT2LMHeadModel(cfg).eval())


# name in our model -> (name in transformers, transpose?)
GRAD_NAMES = {
    "transformer.wte.weight": ("transformer.wte.weight", False),     # tied with lm_head: both contributions
    "transformer.wpe.weight": ("transformer.wpe.weight", False),
    "transformer.h.0.attn.c_attn.weight": ("transformer.h.0.attn.c_attn.weight", True),
    "transformer.h.0.attn.c_attn.bias": ("transformer.h.0.attn.c_attn.bias", False),
    "transformer.h.1.ln_1.weight": ("transformer.h.1.ln_1.weight", False),
    "transformer.h.2.mlp.c_proj.weight": ("transformer.h.2.mlp.c_proj.weight", True),
    "transformer.ln_f.bias": ("transformer.ln_f.bias", False),
}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_loss_and_grads_match_transformers(ns, attn_implementation):
    hf = random_hf_gpt2(attn_implementation)
    ours = ns["GPT"].from_pretrained("gpt2", hf_model=hf).eval()
    assert ours.config.n_layer == 3 and ours.config.vocab_size == 101 and ours.config.block_size == 48
    ids = torch.randint(101, (3, 48), generator=torch.Generator().manual_seed(1))

    logits, loss = ours(ids[:, :-1], ids[:, 1:])
    out = hf(ids, labels=ids)                    # transformers shifts the labels itself
    err_logits = (logits - out.logits[:, :-1]).abs().max().item()
    err_loss = abs(loss.item() - out.loss.item())
    print(f"\n[{attn_implementation}] max |logits error| {err_logits:.2e}, |loss error| {err_loss:.2e}")
    assert err_logits < 1e-5
    assert err_loss < 1e-6

    loss.backward()
    out.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, (hf_name, transpose) in GRAD_NAMES.items():
        g_ours = ours.get_parameter(name).grad
        g_hf = hf_params[hf_name].grad
        g_hf = g_hf.t() if transpose else g_hf
        err = (g_ours - g_hf).abs().max().item()
        scale = g_hf.abs().max().item()
        print(f"  grad {name:40s} max error {err:.2e} (max |grad| {scale:.2e})")
        assert err < 1e-5 + 1e-4 * scale


def test_sdpa_logits_match_and_greedy_generation_agrees(ns):
    hf = random_hf_gpt2("sdpa", seed=3)
    ours = ns["GPT"].from_pretrained("gpt2", hf_model=hf).eval()
    ids = torch.randint(101, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = (ours(ids)[0] - hf(ids).logits).abs().max().item()
    print(f"\nmax |logits error| over all 48 positions: {err:.2e}")
    assert err < 1e-5
    # greedy decoding = transformers' greedy generate
    prompt = ids[:1, :8]
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 10, temperature=0), theirs)


def test_from_pretrained_refuses_what_it_cannot_represent(ns):
    with pytest.raises(ValueError, match="activation_function"):
        ns["GPT"].from_pretrained("gpt2", hf_model=random_hf_gpt2(activation_function="relu"))
    with pytest.raises(ValueError, match="does not tie"):
        ns["GPT"].from_pretrained("gpt2", hf_model=random_hf_gpt2(tie_word_embeddings=False))
    with pytest.raises(ValueError, match="model_type"):
        ns["GPT"].from_pretrained("gpt3")


def test_from_pretrained_offline_explains(ns, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DataUnavailable, match="hf_model=") as e:
        ns["GPT"].from_pretrained("gpt2")
    print("\n" + str(e.value).splitlines()[0])


@pytest.mark.parametrize("bias", [True, False])
def test_sdpa_path_equals_explicit_path(ns, bias):
    GPT, GPTConfig = ns["GPT"], ns["GPTConfig"]
    cfg = GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=32, dropout=0.1, bias=bias)
    torch.manual_seed(0)
    a = GPT(cfg).eval()                               # eval: dropout off, both paths deterministic
    b = GPT(GPTConfig(**{**cfg.__dict__, "attention": "explicit"})).eval()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(50, (4, 32))
    la, lossa = a(ids, ids.roll(-1, 1))
    lb, lossb = b(ids, ids.roll(-1, 1))
    lossa.backward()
    lossb.backward()
    err = (la - lb).abs().max().item()
    gerr = max((pa.grad - pb.grad).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
    print(f"\nsdpa vs explicit (bias={bias}): logits {err:.2e}, grads {gerr:.2e}")
    assert err < 1e-5 and gerr < 1e-5
    # the attention functions themselves, under training-mode dropout, have the same statistics:
    q = torch.randn(64, 2, 16, 8)
    ones = torch.ones(64, 2, 16, 8)
    y = ns["causal_attention_explicit"](q, q, ones, dropout_p=0.5, training=True)
    assert abs(y.mean().item() - 1.0) < 0.05      # dropout rescales by 1/(1-p): the mean is kept


def test_config_interface_presets_and_validation(ns):
    GPTConfig = ns["GPTConfig"]
    cfg = GPTConfig(1024, 50257, 12, 12, 768)      # the positional interface the benchmark script uses
    assert (cfg.dropout, cfg.bias, cfg.attention) == (0.0, True, "sdpa")
    assert GPTConfig.preset("gpt2") == cfg
    assert GPTConfig.preset("tiny", vocab_size=65).vocab_size == 65
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(64, 10, 1, 3, 32)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt5")
    with torch.device("meta"):
        sizes = {n: ns["GPT"](GPTConfig.preset(n)).num_params(non_embedding=False) for n in ("gpt2", "gpt2-medium")}
    hf_124m = sum(p.numel() for p in transformers.GPT2LMHeadModel(transformers.GPT2Config()).parameters())
    assert sizes["gpt2"] == hf_124m == 124_439_808
    assert round(sizes["gpt2-medium"] / 1e6) == 355


def test_init_tying_and_residual_scaling(ns):
    cfg = ns["GPTConfig"](block_size=64, vocab_size=500, n_layer=6, n_head=4, n_embd=256)
    torch.manual_seed(0)
    m = ns["GPT"](cfg)
    assert m.lm_head.weight is m.transformer.wte.weight
    stds = {n: p.std().item() for n, p in m.named_parameters() if n.endswith(".weight") and p.dim() == 2}
    for n, s in stds.items():
        want = 0.02 / math.sqrt(2 * 6) if n.endswith("c_proj.weight") else 0.02
        assert abs(s - want) / want < 0.05, (n, s, want)
    assert all((p == 0).all() for n, p in m.named_parameters() if n.endswith(".bias"))
    with pytest.raises(ValueError, match="longer than block_size"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_generate_sampling_rules(ns):
    cfg = ns["GPTConfig"](block_size=8, vocab_size=30, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    m = ns["GPT"](cfg)
    start = torch.zeros(2, 1, dtype=torch.long)
    a = m.generate(start, 20, generator=torch.Generator().manual_seed(5))      # longer than block_size: crops
    b = m.generate(start, 20, generator=torch.Generator().manual_seed(5))
    assert a.shape == (2, 21) and torch.equal(a, b)
    assert torch.equal(m.generate(start, 12, top_k=1), m.generate(start, 12, temperature=0))
    # top_k=3 only ever picks among the 3 most likely next tokens
    torch.manual_seed(1)
    ctx = torch.randint(30, (200, 5))
    nxt = m.generate(ctx, 1, top_k=3, generator=torch.Generator().manual_seed(0))[:, -1]
    with torch.no_grad():
        top3 = m(ctx)[0][:, -1].topk(3).indices
    assert (top3 == nxt[:, None]).any(dim=1).all()
    assert m.training                                      # generate restores the mode


def test_configure_optimizers_groups(ns):
    m = ns["GPT"](ns["GPTConfig"].preset("tiny"))
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params(non_embedding=False)
    assert opt.defaults["fused"]                              # "where available": CPU has a fused AdamW
    foreach = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", fused=False)
    assert not foreach.defaults.get("fused") and foreach.defaults["foreach"]
    assert not m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "xpu-unknown").defaults.get("fused")


def test_full_recipe_is_nanogpt_batch(ns):
    """nanoGPT's GPT-2 batch (12 x 1024 x 40 on its 8 GPUs), here 6 x 1024 micro-batches accumulated 80 times."""
    full = ns["RECIPES"]["full"]
    assert full.tokens_per_step == 491_520 and full.model.vocab_size == 50304 and full.model.vocab_size % 64 == 0


def test_full_data_code_on_local_files(tmp_path):
    """The FineWeb sharding code, run on a local folder of json lines through the same hub_text path."""
    from labkit.data import hub_text

    data = notebook.load(NB, "data")
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = [f"document {i}: " + "abc" * (i % 7 + 1) for i in range(200)]
    (folder / "part.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    encode = lambda s: [ord(c) for c in s]     # noqa: E731
    out = tmp_path / "shards"
    paths = data["tokenize_to_shards"](hub_text(str(folder)), encode, 0, out, n_tokens=2500, shard_tokens=1000)
    arrays = [__import__("numpy").load(p) for p in paths]
    assert [len(a) for a in arrays] == [1000, 1000, 500] and arrays[0].dtype.name == "uint16"
    stream = [t for d in docs for t in encode(d) + [0]]
    assert arrays[0].tolist() == stream[:1000]                   # shard 0 is the stream's beginning
    # interrupted after two shards: delete the last one and its index entry; a rerun rebuilds it identically
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({"docs_used": index["docs_used"][:2]}))
    paths[2].unlink()
    again = data["tokenize_to_shards"](hub_text(str(folder)), encode, 0, out, n_tokens=2500, shard_tokens=1000)
    assert __import__("numpy").load(again[2]).tolist() == arrays[2].tolist()

    def untouchable():  # with every shard on disk, a rerun must not stream the corpus again (10B tokens at full size)
        raise AssertionError("the documents were read although every shard exists")
        yield

    assert data["tokenize_to_shards"](untouchable(), encode, 0, out, n_tokens=2500, shard_tokens=1000) == again
    x, y = data["shard_windows"](arrays, 16, 4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long and torch.equal(x[:, 1:], y[:, :-1])
    # asking for more tokens than the corpus holds (10.0B from sample-10BT) keeps what there is, without raising
    short = data["tokenize_to_shards"](hub_text(str(folder)), encode, 0, tmp_path / "short", n_tokens=len(stream) + 1500,
                                       shard_tokens=1000)
    lengths = [len(__import__("numpy").load(p)) for p in short]
    # (a shard drops the rest of the document it ends in, so the shards hold a little less than the stream)
    assert lengths[:-1] == [1000] * (len(short) - 1) and 0 < lengths[-1] < 1000 and len(stream) - 1000 < sum(lengths)
    assert data["tokenize_to_shards"](untouchable(), encode, 0, tmp_path / "short", n_tokens=len(stream) + 1500,
                                      shard_tokens=1000) == short



@pytest.mark.parametrize("max_chars, val_fraction", [(None, 0.1), (2_000_000, 0.05)])
def test_lm_corpus_tiny_is_the_chapters_data(max_chars, val_fraction):
    """lm_corpus("tiny"), which chapters 02 and 05-09 load, gives exactly the tokens they built themselves before:
    the standard library's characters (all of them, or the first 2M), the last val_fraction held out."""
    from labkit.data import CharTokenizer, stdlib_text, train_val_split

    corpus = notebook.load(NB, "data")["lm_corpus"]("tiny", max_chars=max_chars, val_fraction=val_fraction)
    text = stdlib_text(max_chars=max_chars)
    tok = CharTokenizer.from_text(text)
    train, val = train_val_split(tok.encode(text), val_fraction=val_fraction)
    assert torch.equal(corpus.train, train) and torch.equal(corpus.val, val)
    assert corpus.vocab_size == tok.vocab_size and corpus.decode(corpus.train[:50]) == text[:50]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    from labkit.data import random_windows

    for a, b in zip(corpus.windows("val", 16, 4, g1), random_windows(val, 16, 4, g2)):
        assert torch.equal(a, b)                       # the same batches as the chapters drew before
    assert corpus.n_train_tokens == len(train)


def test_lm_corpus_full_on_local_files(tmp_path):
    """The full branch of lm_corpus on a local json-lines folder with a stand-in tokenizer: the first shard is
    the validation set, the rest the training tokens; windows come from the memory-mapped shards."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "part.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " + "xyz" * (i % 5 + 1)}) for i in range(300)))

    class Bytes:                                       # the interface lm_corpus uses of a transformers tokenizer
        eos_token_id, model_max_length = 0, 1024

        def encode(self, s):
            return [ord(c) for c in s]

        def decode(self, ids):
            return "".join(map(chr, ids))

        def __len__(self):
            return 128

    lm_corpus = notebook.load(NB, "data")["lm_corpus"]
    corpus = lm_corpus("full", tokenizer=Bytes(), source=str(folder), shard_dir=tmp_path / "shards",
                       n_train_tokens=1500, shard_tokens=1000)
    assert [len(s) for s in corpus.val] == [1000] and [len(s) for s in corpus.train] == [1000, 500]
    assert corpus.n_train_tokens == 1500 and corpus.vocab_size == 128 and corpus.decode(corpus.val[0][:5]) == "doc 0"
    x, y = corpus.windows("train", 16, 4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="shard_dir"):
        lm_corpus("full", tokenizer=Bytes(), source=str(folder))

_ROPE = '''
def apply_rope(x, positions, base=10000.0):
    d = x.size(-1)
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    angle = positions.float()[:, None] * theta[None, :]
    cos, sin = angle.cos(), angle.sin()
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
'''

_ACCUMULATE = '''
def accumulate_gradients(model, x, y, grad_accum):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for x_i, y_i in zip(x.chunk(grad_accum), y.chunk(grad_accum)):
        _, loss_i = model(x_i, y_i)
        (loss_i / grad_accum).backward()
        total += loss_i.item() / grad_accum
    return total
'''

WRONG_ANSWERS = {
    # RoFormer's interleaved pairs (2i, 2i+1): the relative-position property holds, but it is not the rotate-half
    # layout of LLaMA / transformers that the exercise asks for
    0: _ROPE,
    # the usual accumulation, loss / grad_accum: right only when every micro-batch scores as many targets
    1: _ACCUMULATE,
    # cosine that decays to zero, ignoring min_lr
    2: '''
def lr_schedule(step, max_lr, min_lr, warmup_steps, max_steps):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * max_lr
''',
    # the classic off-by-one: drop the token whose cumulative mass crosses p (may drop even the top token)
    3: '''
def top_p_filter(logits, p):
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    sorted_logits = sorted_logits.masked_fill(probs.cumsum(dim=-1) > p, float("-inf"))
    return torch.empty_like(logits).scatter(-1, order, sorted_logits)
''',
}


def test_wrong_answers_are_rejected():
    assert_wrong_answers_fail(NB, WRONG_ANSWERS)


_ROPE_HALF = (_ROPE.replace("x[..., 0::2], x[..., 1::2]", "x[..., : d // 2], x[..., d // 2:]")
              .replace("torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)",
                       "torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)"))


@pytest.mark.parametrize("index,mistake,source", [
    # theta_i = base^(-i/d): every frequency wrong but the first (only the comparison with transformers sees it)
    (0, "exponent i/d", _ROPE_HALF.replace("torch.arange(0, d, 2, dtype=torch.float32) / d",
                                           "torch.arange(d // 2, dtype=torch.float32) / d")),
    # positions ignored: rows rotated by 0, 1, 2, ... whatever positions says
    (0, "positions ignored", _ROPE_HALF.replace("positions.float()", "torch.arange(x.size(-2)).float()")),
    # the rotation's sign flipped: rotates by -m theta
    (0, "rotation by -angle", _ROPE_HALF.replace("a * cos - b * sin, a * sin + b * cos",
                                                 "a * cos + b * sin, b * cos - a * sin")),
    # no zero_grad: the stale gradients of an earlier step are added in
    (1, "no zero_grad", _ACCUMULATE.replace("    model.zero_grad(set_to_none=True)\n", "").replace(
        "(loss_i / grad_accum)", "(loss_i * (y_i != -1).sum() / (y != -1).sum())").replace(
        "loss_i.item() / grad_accum", "(loss_i * (y_i != -1).sum() / (y != -1).sum()).item()")),
    # one forward/backward on the whole batch: the right gradient, but no accumulation
    (1, "no micro-batches", "def accumulate_gradients(model, x, y, grad_accum):\n    model.zero_grad()\n"
                            "    loss = model(x, y)[1]\n    loss.backward()\n    return loss.item()\n"),
])
def test_more_mistakes_are_caught(index, mistake, source):
    from labkit.check import ExerciseError

    with pytest.raises(ExerciseError) as e:
        notebook.run_exercise(NB, index, source)
    print(f"{mistake}: {str(e.value).splitlines()[0][:120]}")


def test_correct_variants_pass():
    """Differently written right answers pass: the checks test behaviour, not one spelling."""
    notebook.run_exercise(NB, 0, _ROPE_HALF)
    weighted = (_ACCUMULATE.replace("(loss_i / grad_accum)", "(loss_i * (y_i != -1).sum() / (y != -1).sum())")
                .replace("loss_i.item() / grad_accum", "(loss_i * (y_i != -1).sum() / (y != -1).sum()).item()"))
    notebook.run_exercise(NB, 1, weighted)


def test_attention_explorer():
    """The exploration on an untrained model: each map is causal and row-stochastic, equals the explicit
    attention's weights for that layer and head, and changes with the layer and the head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = notebook.load(NB, ("model", "explore"))
    torch.manual_seed(0)
    model = ns["GPT"](ns["GPTConfig"](block_size=32, vocab_size=50, n_layer=3, n_head=4, n_embd=32))
    ids = torch.randint(50, (1, 20), generator=torch.Generator().manual_seed(0))
    view = ns["explore_attention"](model, ids, [str(i) for i in ids[0].tolist()])
    assert view.values == {"layer": 0, "head": 0}
    assert view.controls["layer"].choices == [0, 1, 2] and view.controls["head"].choices == [0, 1, 2, 3]

    # the weights of layer 1, head 2, from the explicit formula on that layer's input
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(20))
    x = model.transformer.h[0](x)
    block = model.transformer.h[1]
    q, k, _ = block.attn.c_attn(block.ln_1(x)).split(32, dim=2)
    q, k = (t.view(1, 20, 4, 8).transpose(1, 2)[0, 2] for t in (q, k))
    expected = (q @ k.t() / math.sqrt(8)).masked_fill(~torch.ones(20, 20, dtype=torch.bool).tril(), float("-inf"))
    expected = expected.softmax(dim=-1)

    first = view.result["weights"]
    got = view.set(layer=1, head=2)["weights"]
    assert got.shape == (20, 20)
    torch.testing.assert_close(got, expected.detach(), atol=1e-6, rtol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(20)) and torch.equal(got.triu(1), torch.zeros(20, 20))
    assert not torch.allclose(got, first), "another layer and head should attend differently"
    assert not torch.allclose(view.set(head=3)["weights"], got)
    assert 0 <= view.result["previous_token_share"] <= 1 and view.result["mean_entropy_bits"] > 0
    fig = view.figure()
    assert isinstance(fig, matplotlib.figure.Figure)
    plt.close(fig)
