"""Chapter 03 (GPT-2 in C with hand-written backward passes) against independent references.

The C library is compiled from the notebook's `model` cells (cached by source hash). The references:
  * transformers' GPT2LMHeadModel: a random model (every tensor perturbed) is copied into the C arrays *by this
    test's own mapping* (HF Conv1D weights are (in, out): transposed), not by the chapter's converter; the C
    forward must give its logits and loss, the C backward the gradients autograd computes through it;
  * torch autograd for each kernel's backward, in float64 (so the reference carries no rounding of its own);
  * torch.optim.AdamW + clip_grad_norm_ for the optimizer step.

Tolerances. Everything is float32 (24-bit mantissa, eps = 6e-8). The C code and PyTorch add the same terms in
different orders (PyTorch's BLAS blocks its sums; ours add each number up in plain order), so results differ by
rounding: about sqrt(K) * eps relative for a sum of K terms. The C kernels use no OpenMP reductions (each number
is summed by one thread in a fixed order), so the thread count does not change the bits (tested); what remains is
summation order. Gradients are compared per parameter group with atol = 1e-4 * max|grad| + 1e-7: the observed
errors are ~1e-6 relative, two orders of magnitude inside it.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from labkit import notebook
from labkit.data import DataUnavailable

from .conftest import ROOT
from .grads import perturb_
from .test_exercises import assert_wrong_answers_fail

NB = ROOT / "notebooks" / "03_llmc.ipynb"
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ns():
    return notebook.load(NB)


def random_hf_gpt2(seed=0, n_layer=3, n_head=4, n_embd=64, vocab_size=101, n_positions=48):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                                  n_positions=n_positions, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    return perturb_(transformers.GPT2LMHeadModel(cfg).eval())


# C tensor -> (transformers name, Conv1D weight to transpose?)
HF_NAMES = {
    "wte": ("transformer.wte.weight", False), "wpe": ("transformer.wpe.weight", False),
    "ln1w": ("transformer.h.{l}.ln_1.weight", False), "ln1b": ("transformer.h.{l}.ln_1.bias", False),
    "qkvw": ("transformer.h.{l}.attn.c_attn.weight", True), "qkvb": ("transformer.h.{l}.attn.c_attn.bias", False),
    "attprojw": ("transformer.h.{l}.attn.c_proj.weight", True), "attprojb": ("transformer.h.{l}.attn.c_proj.bias", False),
    "ln2w": ("transformer.h.{l}.ln_2.weight", False), "ln2b": ("transformer.h.{l}.ln_2.bias", False),
    "fcw": ("transformer.h.{l}.mlp.c_fc.weight", True), "fcb": ("transformer.h.{l}.mlp.c_fc.bias", False),
    "fcprojw": ("transformer.h.{l}.mlp.c_proj.weight", True), "fcprojb": ("transformer.h.{l}.mlp.c_proj.bias", False),
    "lnfw": ("transformer.ln_f.weight", False), "lnfb": ("transformer.ln_f.bias", False),
}


def hf_tensors(hf, attr="data"):
    """transformers' parameters (or their .grad) in the C layout: stacked over layers, Conv1D transposed."""
    params = dict(hf.named_parameters())
    out = {}
    for name, (key, transpose) in HF_NAMES.items():
        keys = [key.format(l=l) for l in range(hf.config.n_layer)] if "{l}" in key else [key]
        ts = [getattr(params[k], attr) for k in keys]
        ts = [t.t() if transpose else t for t in ts]
        out[name] = torch.stack(ts) if "{l}" in key else ts[0]
    return out


def c_model_from_hf(ns, hf, B, T):
    cfg = ns["GPTConfig"](block_size=hf.config.n_positions, vocab_size=hf.config.vocab_size,
                          n_layer=hf.config.n_layer, n_head=hf.config.n_head, n_embd=hf.config.n_embd)
    m = ns["GPT2C"](cfg, B, T)
    with torch.no_grad():
        for name, t in hf_tensors(hf).items():
            m.param_views()[name].copy_(t)
    return m


def test_forward_and_backward_match_transformers(ns):
    hf = random_hf_gpt2()
    ids = torch.randint(101, (3, 48), generator=torch.Generator().manual_seed(1))
    m = c_model_from_hf(ns, hf, 3, 47)
    logits, loss = m.forward(ids[:, :-1], ids[:, 1:])
    m.backward()
    out = hf(ids, labels=ids)                      # transformers shifts the labels itself
    out.loss.backward()
    err_logits = (logits - out.logits[:, :-1]).abs().max().item()
    err_loss = abs(loss - out.loss.item())
    print(f"\nC vs transformers: max |logits error| {err_logits:.2e} (max |logit| {logits.abs().max():.1f}), "
          f"|loss error| {err_loss:.2e}")
    assert err_logits < 1e-5 and err_loss < 1e-5
    hf_grads, c_grads = hf_tensors(hf, "grad"), m.param_views("grads")
    for name in HF_NAMES:
        err = (c_grads[name] - hf_grads[name]).abs().max().item()
        scale = hf_grads[name].abs().max().item()
        print(f"  grad {name:9s} {tuple(c_grads[name].shape)!s:16s} max error {err:.2e} (max |grad| {scale:.2e})")
        assert err <= 1e-4 * scale + 1e-7, name


def test_chapter02_conversion_agrees_with_direct_mapping(ns):
    """The chapter copies weights through chapter 02's GPT (from_torch): same arrays as the direct HF mapping."""
    hf = random_hf_gpt2(seed=4)
    direct = c_model_from_hf(ns, hf, 2, 48)
    via02 = ns["GPT2C"](direct.config, 2, 48).from_torch(ns["GPT"].from_pretrained("gpt2", hf_model=hf))
    assert torch.equal(direct.params, via02.params)
    sd = via02.to_torch()
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])


def _rel(got, ref) -> float:
    """max |got - ref| / max |ref|, the worst over a tuple of tensors."""
    got, ref = (got, ref) if isinstance(got, (tuple, list)) else ((got,), (ref,))
    return max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))


def _f64_grads(fn, inputs, dout):
    leaves = [x.double().requires_grad_() for x in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, dout.double())


def test_each_kernel_backward_matches_autograd(ns):
    """Every backward kernel, on shapes that are not multiples of the 64-wide tiles, vs float64 autograd."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)     # noqa: E731
    errors = {}
    # encoder
    idx = torch.randint(0, 7, (3, 11), generator=g, dtype=torch.int32)
    wte, wpe, d = r(7, 20), r(11, 20), r(3, 11, 20)
    errors["encoder"] = _rel(ns["encoder_backward"](d, idx, 7, 11),
                             _f64_grads(lambda e, p: e[idx.long()] + p, [wte, wpe], d))
    # layernorm
    x, w, b, d = 2 * r(130, 70) + 1, r(70), r(70), r(130, 70)
    _, mean, rstd = ns["layernorm_forward"](x, w, b)
    errors["layernorm"] = _rel(ns["layernorm_backward"](d, x, w, mean, rstd),
                               _f64_grads(lambda x, w, b: F.layer_norm(x, (70,), w, b), [x, w, b], d))
    # matmul (N=130, C=70, OC=200: partial tiles everywhere)
    x, W, bias, d = r(130, 70), r(200, 70), r(200), r(130, 200)
    errors["matmul"] = _rel(ns["matmul_backward"](d, x, W), _f64_grads(F.linear, [x, W, bias], d))
    assert (ns["matmul_forward"](x, W, bias) - F.linear(x, W, bias)).abs().max() < 1e-4
    # attention
    qkv, d = r(2, 19, 3 * 24), r(2, 19, 24)
    _, att = ns["attention_forward"](qkv, 3)

    def attn(qkv):
        q, k, v = (z.view(2, 19, 3, 8).transpose(1, 2) for z in qkv.split(24, dim=-1))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 19, 24)
    errors["attention"] = _rel(ns["attention_backward"](d, qkv, att), _f64_grads(attn, [qkv], d)[0])
    # gelu
    x, d = 4 * r(5000), r(5000)
    errors["gelu"] = _rel(ns["gelu_backward"](d, x), _f64_grads(lambda x: F.gelu(x, approximate="tanh"), [x], d)[0])
    # residual
    a, bb, d = r(33), r(33), r(33)
    errors["residual"] = _rel(ns["residual_backward"](d), _f64_grads(torch.add, [a, bb], d))
    # softmax + cross-entropy
    z, t = 5 * r(37, 50), torch.randint(0, 50, (37,), generator=g, dtype=torch.int32)
    loss, probs, _ = ns["softmax_xent_forward"](z, t)
    assert abs(loss - F.cross_entropy(z.double(), t.long()).item()) < 1e-5
    errors["softmax_xent"] = _rel(ns["softmax_xent_backward"](probs, t),
                                  _f64_grads(lambda z: F.cross_entropy(z, t.long()), [z], torch.tensor(1.0))[0])
    print("\nmax |C backward - float64 autograd| / max |grad|, per kernel: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert errors.pop("residual") == 0.0                     # a copy is exact
    for k, v in errors.items():                              # float32 eps is 6e-8: sums of ~100 terms, ~1e-6
        assert v < 1e-5, (k, v)


def test_threads_do_not_change_the_bits(ns):
    hf = random_hf_gpt2(seed=2)
    m = c_model_from_hf(ns, hf, 4, 48)
    ids = torch.randint(101, (4, 49), generator=torch.Generator().manual_seed(3))
    grads, losses = [], []
    for n in (1, 2, 3):
        ns["set_threads"](n)
        losses.append(m.forward(ids[:, :-1], ids[:, 1:])[1])
        m.backward()
        grads.append(m.grads.clone())
    ns["set_threads"](1)
    assert losses[0] == losses[1] == losses[2]
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_adamw_steps_match_torch(ns):
    """C training steps (forward, backward, clip, AdamW in one call) vs PyTorch forward/backward + torch.optim.AdamW.

    The torch optimizer gets the C gradients (already clipped), so parameters differ only by the update arithmetic;
    the torch loss at each step checks forward/backward at the new weights. (With each side's own gradients the key
    bias, whose exact gradient is 0, would drift: Adam turns its ~1e-9 rounding noise into steps of ~lr/10.)
    """
    GPT = ns["GPT"]
    hf = random_hf_gpt2(seed=5)
    torch_model = GPT.from_pretrained("gpt2", hf_model=hf)
    m = ns["GPT2C"](torch_model.config, 3, 40).from_torch(torch_model)
    opt = torch_model.configure_optimizers(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95), device_type="cpu")
    gen = torch.Generator().manual_seed(6)
    for step in range(5):
        ids = torch.randint(101, (3, 41), generator=gen)
        lr = 1e-3 * (step + 1) / 5                               # a changing learning rate, as in warmup
        for group in opt.param_groups:
            group["lr"] = lr
        loss_c = m.step(ids[:, :-1], ids[:, 1:], lr=lr, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=0.5)
        _, loss_t = torch_model(ids[:, :-1], ids[:, 1:])
        loss_t.backward()
        norm_t = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 0.5)
        grads_c = m.to_torch("grads")
        for name, p in torch_model.named_parameters():
            p.grad.copy_(grads_c[name])
        opt.step()
        opt.zero_grad(set_to_none=True)
        sd_c, sd_t = m.to_torch(), torch_model.state_dict()
        err = max((sd_c[k] - sd_t[k]).abs().max().item() for k in sd_c)
        print(f"\nstep {step + 1}: loss C {loss_c:.6f} torch {loss_t.item():.6f}, grad norm C {m.grad_norm.value:.5f} "
              f"torch {norm_t.item():.5f}, max |param difference| {err:.1e}")
        assert abs(loss_c - loss_t.item()) < 1e-5
        assert abs(m.grad_norm.value - norm_t.item()) < 1e-4 * norm_t.item()
        assert err < 1e-6
    assert m.t == 5


def test_adamw_kernel_alone(ns):
    """One tensor, given gradients, several steps with weight decay: adamw_update vs torch.optim.AdamW."""
    lib = ns["LIB"]
    ptr = ns["ptr"]
    g = torch.Generator().manual_seed(0)
    p_c = torch.randn(1000, generator=g)
    p_t = torch.nn.Parameter(p_c.clone())
    m, v = torch.zeros(1000), torch.zeros(1000)
    opt = torch.optim.AdamW([p_t], lr=2e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3)
    for t in range(1, 8):
        grad = torch.randn(1000, generator=g) * 10 ** (-t)      # shrinking gradients: eps matters later
        lib.adamw_update(ptr(p_c), ptr(grad), ptr(m), ptr(v), 1000, 2e-3, 0.8, 0.99, 1e-6, 0.3, t)
        p_t.grad = grad.clone()
        opt.step()
    err = (p_c - p_t.detach()).abs().max().item()
    print(f"\nadamw_update vs torch.optim.AdamW after 7 steps: max error {err:.1e}")
    assert err < 1e-6


def test_training_tracks_the_pytorch_twin(ns):
    """Twenty independent steps each: C and PyTorch losses stay together (the key bias aside, all is the same run)."""
    GPT, GPTConfig = ns["GPT"], ns["GPTConfig"]
    cfg = GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    twin = GPT(cfg)
    m = ns["GPT2C"](cfg, 4).from_torch(twin)
    opt = twin.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    data = torch.randint(50, (5000,), generator=torch.Generator().manual_seed(0))
    data = (data % 7) * (torch.arange(5000) % 3)               # some structure to learn
    gen = torch.Generator().manual_seed(1)
    lc, lt = [], []
    for _ in range(20):
        starts = torch.randint(len(data) - 33, (4,), generator=gen)
        xy = torch.stack([data[s: s + 33] for s in starts])
        lc.append(m.step(xy[:, :-1], xy[:, 1:], lr=3e-3))
        _, loss = twin(xy[:, :-1], xy[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lt.append(loss.item())
    diffs = [abs(a - b) for a, b in zip(lc, lt)]
    print(f"\nloss {lc[0]:.4f} -> {lc[-1]:.4f}; max |C - PyTorch| over 20 steps {max(diffs):.1e}")
    assert lc[-1] < lc[0] - 0.5
    assert max(diffs) < 1e-3


def test_generate_greedy_matches_pytorch(ns):
    hf = random_hf_gpt2(seed=7, n_positions=16)
    torch_model = ns["GPT"].from_pretrained("gpt2", hf_model=hf).eval()
    m = ns["GPT2C"](torch_model.config, 1).from_torch(torch_model)
    prompt = torch.tensor([[5, 17, 3]])
    ours = ns["generate"](m, prompt, 20, temperature=0)          # longer than block_size: the window slides
    theirs = torch_model.generate(prompt, 20, temperature=0)
    assert torch.equal(ours, theirs)
    a = ns["generate"](m, prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    b = ns["generate"](m, prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (1, 13)


def test_clear_errors(ns, monkeypatch):
    ptr = ns["ptr"]
    with pytest.raises(TypeError, match="contiguous"):
        ptr(torch.randn(4, 5).t())
    with pytest.raises(TypeError, match="float32"):
        ptr(torch.randn(4, dtype=torch.float64))
    cfg = ns["GPTConfig"](block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=8)
    m = ns["GPT2C"](cfg, 2)
    with pytest.raises(ValueError, match="sized for batches"):
        m.forward(torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        m.forward(torch.full((2, 8), 10))
    with pytest.raises(RuntimeError, match="forward"):
        ns["GPT2C"](cfg, 2).backward()
    with pytest.raises(RuntimeError, match="training=False"):
        inference = ns["GPT2C"](cfg, 2, training=False)
        inference.forward(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
        inference.backward()
    # no compiler: a clear message saying what to install
    import shutil

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ns["CompilerNotFound"], match="apt-get install gcc"):
        ns["compile_kernels"]({"x": "int f(void) { return 1; }"})


def test_compile_cache_and_failure(ns, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RUNS", str(tmp_path))
    lib = ns["compile_kernels"]({"x": "int answer(void) { return 42; }"})
    assert lib.answer() == 42
    built = sorted(p.name for p in (tmp_path / "03_llmc").iterdir())
    assert len([n for n in built if n.endswith(".so")]) == 1 and not [n for n in built if "tmp" in n]
    ns["compile_kernels"]({"x": "int answer(void) { return 42; }"})       # cached: nothing new
    assert sorted(p.name for p in (tmp_path / "03_llmc").iterdir()) == built
    with pytest.raises(RuntimeError, match="compiling the kernels failed"):
        ns["compile_kernels"]({"x": "int broken(void) { return }"})


def test_memory_accounting_for_gpt2_124m(ns):
    cfg = ns["RECIPES"]["full"].model
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size) == (12, 12, 768, 50257, 1024)
    assert ns["RECIPES"]["full"].batch_size == 4
    ps = ns["param_sizes"](cfg)
    assert sum(ps.values()) == 124_439_808
    B, T, C, L, H, V = 4, 1024, 768, 12, 12, 50257
    acts = ns["act_sizes"](cfg, B, T)
    analytic = B * T * C * (1 + 18 * L + 1) + 4 * L * B * T + 3 * B * T + L * B * H * T * T + 2 * B * T * V
    assert sum(acts.values()) == analytic
    gacts = ns["grad_act_sizes"](cfg, B, T)
    assert sum(gacts.values()) == B * T * C * 16 + B * T * V
    gib = (16 * sum(ps.values()) + 4 * sum(acts.values()) + 4 * sum(gacts.values())) / 2**30
    print(f"\nGPT-2 124M in C at 4 x 1024: {gib:.2f} GiB of host RAM")
    assert 8 < gib < 11


def test_full_data_functions_on_local_files(tmp_path, monkeypatch):
    data = notebook.load(NB, "data")
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = [f"story {i}: once upon a time" for i in range(50)]
    (folder / "part.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    encode = lambda s: [ord(c) for c in s]     # noqa: E731
    ids = data["finetune_tokens"](300, corpus=str(folder), encode=encode, eos=0)
    assert ids.shape == (300,) and ids.dtype == torch.long
    assert ids[:len(docs[0]) + 1].tolist() == encode(docs[0]) + [0]
    # offline: the weights loader explains itself
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DataUnavailable, match="tiny size"):
        data["load_gpt2_hf"]("gpt2")


def test_benchmark_function_runs():
    bench_ns = notebook.load(NB, ("model", "bench"))
    out = bench_ns["benchmark_c_vs_torch"](shapes=("tiny",), steps=1)
    assert out["shape"][0].startswith("tiny") and out["c_ms"][0] > 0 and out["torch_ms"][0] > 0
    assert out["c_gflops"][0] > 0 and out["threads_c"] >= 1
    json.dumps(out)                                  # plain lists and numbers


WRONG_ANSWERS = {
    # forgets that normalisation also removes the component along xhat (the third term)
    0: '''
def layernorm_backward_torch(dout, x, weight, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    rstd = (x.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    xhat = (x - mean) * rstd
    g = dout * weight
    return rstd * (g - g.mean(-1, keepdim=True)), (dout * xhat).sum(0), dout.sum(0)
''',
    # differentiates only the (1 + tanh u) factor, as if x were a constant
    1: '''
def gelu_tanh_grad(x):
    k = math.sqrt(2.0 / math.pi)
    return 0.5 * (1 + torch.tanh(k * (x + 0.044715 * x**3)))
''',
    # the gradient of the summed loss: forgets the 1/N of the mean
    2: '''
def softmax_xent_grad(logits, targets):
    grad = logits.softmax(-1)
    grad[torch.arange(len(targets)), targets] -= 1.0
    return grad
''',
    # treats softmax as element-wise: ds = a * da, missing the row sum
    3: '''
def attention_backward_torch(q, k, v, dout):
    T, d = q.shape[-2], q.shape[-1]
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    a = (q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(mask, float("-inf")).softmax(-1)
    dv = a.transpose(-2, -1) @ dout
    ds = a * (dout @ v.transpose(-2, -1))
    return ds @ k / math.sqrt(d), ds.transpose(-2, -1) @ q / math.sqrt(d), dv
''',
    # the mean over all N rows, not over the rows that count: ignored (-1) positions still dilute loss and gradient
    4: '''
def fused_classifier_source() -> str:
    return r"""
float fused_classifier(float* logits, float* losses, const int* targets, int N, int V) {
    float dloss = 1.0f / N;
    for (int n = 0; n < N; n++) {
        float* z = logits + (size_t)n * V;
        int y = targets[n];
        if (y < 0) { losses[n] = 0.0f; for (int j = 0; j < V; j++) z[j] = 0.0f; continue; }
        float m = -INFINITY;
        for (int j = 0; j < V; j++) if (z[j] > m) m = z[j];
        double sum = 0.0;
        for (int j = 0; j < V; j++) sum += exp((double)z[j] - m);
        losses[n] = (float)(log(sum) + m - z[y]);
        for (int j = 0; j < V; j++) z[j] = (float)(exp((double)z[j] - m) / sum) * dloss;
        z[y] -= dloss;
    }
    double total = 0.0;
    for (int n = 0; n < N; n++) total += losses[n];
    return (float)(total / N);
}
"""
''',
    # the LayerNorm formula with the mean-of-g term kept: RMSNorm subtracts no mean, so that term must go
    5: '''
def rmsnorm_source() -> str:
    return r"""
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C) {
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;
        float ss = 0.0f;
        for (int i = 0; i < C; i++) ss += x[i] * x[i];
        float r = 1.0f / sqrtf(ss / C + 1e-5f);
        for (int i = 0; i < C; i++) out[(size_t)n * C + i] = weight[i] * x[i] * r;
        rstd[n] = r;
    }
}
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int N, int C) {
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;
        const float* dy = dout + (size_t)n * C;
        float r = rstd[n], mean_g = 0.0f, mean_gx = 0.0f;
        for (int i = 0; i < C; i++) { mean_g += dy[i] * weight[i] / C; mean_gx += dy[i] * weight[i] * x[i] * r / C; }
        for (int i = 0; i < C; i++) {
            dinp[(size_t)n * C + i] += r * (dy[i] * weight[i] - mean_g - x[i] * r * mean_gx);
            dweight[i] += dy[i] * x[i] * r;
        }
    }
}
"""
''',
}


def test_wrong_answers_are_rejected():
    assert_wrong_answers_fail(NB, WRONG_ANSWERS)


def test_kernel_times_explorer():
    """The exploration: longer sequences give attention a larger share of a block (FLOPs exactly, time measured);
    a wider model gives the matmuls back their share."""
    import matplotlib.figure

    ns = notebook.load(NB, ("model", "explore"))
    view = ns["explore_kernel_times"]()
    assert view.values == {"seq_len": 64, "n_embd": 64}
    short = view.set(seq_len=16, n_embd=64)
    long = view.set(seq_len=256, n_embd=64)
    print(f"\nattention share at T=16 / 256, C=64: FLOPs {short['flop_share']['attention']:.2f} / "
          f"{long['flop_share']['attention']:.2f}, time {short['ms_share']['attention']:.2f} / "
          f"{long['ms_share']['attention']:.2f}")
    assert long["flop_share"]["attention"] > 5 * short["flop_share"]["attention"]
    assert long["ms_share"]["attention"] > 2 * short["ms_share"]["attention"]
    assert long["ms"]["attention"] > short["ms"]["attention"]
    wide = view.set(seq_len=256, n_embd=256)
    assert wide["flop_share"]["matmul"] > long["flop_share"]["matmul"]
    assert wide["ms_share"]["matmul"] > long["ms_share"]["matmul"]
    assert isinstance(view.figure(), matplotlib.figure.Figure)
