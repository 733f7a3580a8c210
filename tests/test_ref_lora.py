"""Chapter 04 (LoRA, QLoRA) against independent references: peft's LoRA and bitsandbytes' NF4.

The chapter's code is loaded from the notebook's `model` cells. LoRA: a random transformers GPT-2 with peft's
LoRA (`fan_in_fan_out=True`, GPT-2's Conv1D stores (in, out)) and the chapter's GPT (chapter 02's, converted from
the same transformers model) with the chapter's LoRA, given the same base and adapter weights, give the same
logits and adapter gradients; the output at init is the base model's; merged = unmerged. NF4: the derived
levels, the 4-bit codes, the block scales, the double quantisation and the dequantisation match bitsandbytes
(CPU), and so does a whole `bnb.nn.Linear4bit`. Also: the full-size data formatting on local rows, the 7B
shapes, and a wrong answer for each exercise.
"""
import json

import pytest
import torch
from torch import nn

from labkit import notebook
from labkit.data import DataUnavailable

from .conftest import ROOT
from .grads import perturb_
from .test_exercises import assert_wrong_answers_fail

NB = ROOT / "notebooks" / "04_lora.ipynb"
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]          # peft matches "c_proj" as a suffix: attn.c_proj and mlp.c_proj


@pytest.fixture(scope="module")
def ns():
    return notebook.load(NB)


def random_hf_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=101, n_positions=32, bos_token_id=100,
                                  eos_token_id=100, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    return perturb_(transformers.GPT2LMHeadModel(cfg).eval())


def paired_models(ns, r=4, alpha=8):
    hf = random_hf_gpt2()
    ours = ns["GPT"].from_pretrained("gpt2", hf_model=hf).eval()          # chapter 02's conversion
    ns["inject_lora"](ours, TARGETS, r=r, alpha=alpha)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, fan_in_fan_out=True)
    theirs = peft.get_peft_model(hf, cfg).eval()
    return ours, theirs


def copy_adapters(ns, ours, theirs, randomize_b=True):
    """Give peft's B random values, then copy peft's A and B into ours; returns the list of layer names."""
    names = [n for n, m in ours.named_modules() if isinstance(m, ns["LoRALinear"])]
    g = torch.Generator().manual_seed(1)
    for n in names:
        pm = theirs.base_model.model.get_submodule(n)
        with torch.no_grad():
            if randomize_b:
                pm.lora_B["default"].weight.copy_(0.1 * torch.randn(pm.lora_B["default"].weight.shape, generator=g))
            mine = ours.get_submodule(n)
            mine.lora_A.copy_(pm.lora_A["default"].weight)
            mine.lora_B.copy_(pm.lora_B["default"].weight)
    return names


def test_lora_at_init_is_the_base_model(ns):
    hf = random_hf_gpt2()
    ids = torch.randint(101, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = hf(ids).logits.clone()
    ours, theirs = paired_models(ns)
    with torch.no_grad():
        err_ours = (ours(ids)[0] - base_logits).abs().max().item()
        err_theirs = (theirs(input_ids=ids).logits - base_logits).abs().max().item()
    print(f"\nat init: ours vs base {err_ours:.2e}, peft vs base {err_theirs:.2e}")
    assert err_ours < 1e-5 and err_theirs == 0.0
    # A is Kaiming-uniform (U(-1/sqrt(d_in), 1/sqrt(d_in))) like peft's, B is zero
    layer = ours.transformer.h[0].mlp.c_fc
    bound = 1 / layer.in_features ** 0.5
    assert torch.all(layer.lora_B == 0)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert abs(layer.lora_A.std().item() - bound / 3**0.5) < 0.1 * bound


def test_logits_and_lora_gradients_match_peft(ns):
    ours, theirs = paired_models(ns)
    names = copy_adapters(ns, ours, theirs)
    assert len(names) == 2 * 4
    ids = torch.randint(101, (3, 32), generator=torch.Generator().manual_seed(2))
    logits, loss = ours(ids[:, :-1], ids[:, 1:])
    out = theirs(input_ids=ids, labels=ids)
    err_logits = (logits - out.logits[:, :-1]).abs().max().item()
    err_loss = abs(loss.item() - out.loss.item())
    print(f"\nmax |logits error| {err_logits:.2e}, |loss error| {err_loss:.2e}")
    assert err_logits < 1e-5 and err_loss < 1e-6
    loss.backward()
    out.loss.backward()
    worst = 0.0
    for n in names:
        pm, mine = theirs.base_model.model.get_submodule(n), ours.get_submodule(n)
        for ab in ("A", "B"):
            g_ours = getattr(mine, f"lora_{ab}").grad
            g_peft = getattr(pm, f"lora_{ab}")["default"].weight.grad
            err = (g_ours - g_peft).abs().max().item()
            worst = max(worst, err / (g_peft.abs().max().item() + 1e-12))
            assert err < 1e-6 + 1e-4 * g_peft.abs().max().item(), (n, ab, err)
    print(f"LoRA gradients: max relative error {worst:.2e} over {len(names)} layers")
    frozen = [n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n]
    assert not frozen, f"parameters that should be frozen: {frozen}"


def test_merge_equals_unmerged_and_peft_merge(ns):
    ours, theirs = paired_models(ns)
    names = copy_adapters(ns, ours, theirs)
    ids = torch.randint(101, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unmerged = ours(ids)[0]
        ns["merge_lora"](ours)
        merged = ours(ids)[0]
        merged_theirs = theirs.merge_and_unload()
        w_err = max((ours.get_submodule(n).base.weight - merged_theirs.get_submodule(n).weight.t()).abs().max().item()
                    for n in names)
        ns["unmerge_lora"](ours)
        again = ours(ids)[0]
    err = (merged - unmerged).abs().max().item()
    print(f"\nmerged vs unmerged logits {err:.2e}; merged weights vs peft's merge_and_unload {w_err:.2e}; "
          f"unmerge round trip {(again - unmerged).abs().max().item():.2e}")
    assert err < 1e-5 and w_err < 1e-6 and (again - unmerged).abs().max() < 1e-5


def test_inject_lora_errors_and_counts(ns):
    model = ns["GPT"](ns["GPTConfig"].preset("tiny", vocab_size=50))
    with pytest.raises(ValueError, match="no linear layer matches"):
        ns["inject_lora"](model, ["q_proj"])
    with pytest.raises(ValueError, match="rank"):
        ns["LoRALinear"](nn.Linear(4, 4), r=0)
    ns["inject_lora"](model, ["c_attn"], r=2, alpha=4)
    c = ns["count_parameters"](model)
    assert c["trainable"] == 4 * 2 * (128 + 384)


# ----------------------------------------------------------------------------------------- NF4 vs bitsandbytes
def test_nf4_levels_and_dynamic_code_equal_bitsandbytes(ns):
    assert torch.equal(ns["NF4"], BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(ns["DYNAMIC_8BIT"], BF.create_dynamic_map())
    assert abs(ns["nf4_bits_per_weight"]() - 4.127) < 5e-4 and ns["nf4_bits_per_weight"](double_quant=False) == 4.5


@pytest.mark.parametrize("shape,dtype", [((256, 512), torch.float32), ((96, 128), torch.float32),
                                         ((64, 320), torch.bfloat16)])
def test_nf4_codes_absmax_and_dequantisation_equal_bitsandbytes(ns, shape, dtype):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.05).to(dtype)
    w.view(-1)[7] = 0.9                                      # an outlier in one block
    q, qs = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    codes, absmax = ns["nf4_quantize"](w)
    packed = ns["pack_4bit"](codes)
    assert torch.equal(packed, q.view(-1)), f"{(packed != q.view(-1)).sum()} bytes differ"
    assert torch.equal(absmax, qs.absmax)
    for out_dtype in (torch.float32, torch.bfloat16):
        qs.dtype = out_dtype
        theirs = BF.dequantize_4bit(q, qs)
        ours = ns["nf4_dequantize"](packed, absmax, shape, dtype=out_dtype)
        err = (theirs.float() - ours.float()).abs().max().item()
        print(f"\n{shape} {dtype} → {out_dtype}: codes and absmax equal; dequantisation max error {err:.1e}")
        assert err == 0.0


def _near_tie(ns, x_scaled, code_a, code_b):
    """How far x is from the midpoint between the two candidate levels, as a fraction of their gap."""
    code = ns["DYNAMIC_8BIT"]
    a, b = code[code_a.long()], code[code_b.long()]
    return ((x_scaled - (a + b) / 2).abs() / (a - b).abs()).max().item()


def test_double_quantisation_matches_bitsandbytes(ns):
    torch.manual_seed(1)
    w = torch.randn(512, 2048) * 0.02
    q, qs = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    codes, absmax = ns["nf4_quantize"](w)
    c, s2, offset = ns["double_quantize"](absmax)
    # the same scheme: offset = mean of the scales, 8-bit dynamic code, blocks of 256, fp32 second-level absmax
    assert qs.state2.blocksize == 256 and torch.equal(qs.state2.code, ns["DYNAMIC_8BIT"])
    assert torch.equal(offset, qs.offset) and torch.equal(s2, qs.state2.absmax)
    # our codes are the exact nearest level; bitsandbytes' CPU kernel finds it with an approximate binary search
    # that, near a midpoint (within ~15% of the gap, measured), can return the neighbour: one step, rarely
    differ = c != qs.absmax
    n_differ = int(differ.sum())
    scaled = ((absmax - offset).view(-1, 256) / s2[:, None]).view(-1)
    tie = _near_tie(ns, scaled[differ], c[differ], qs.absmax[differ]) if n_differ else 0.0
    print(f"\ndouble-quant codes: {n_differ} of {c.numel()} differ (by one step, at most {tie:.1%} of a gap "
          f"from a midpoint); offset and second-level scales equal")
    assert n_differ <= 0.005 * c.numel()
    assert (c.int() - qs.absmax.int()).abs().max() <= 1 and tie < 0.25
    # dequantisation of bitsandbytes' own state is exact
    theirs = BF.dequantize_4bit(q, qs)
    absmax_theirs = ns["double_dequantize"](qs.absmax, qs.state2.absmax, qs.offset)
    ours = ns["nf4_dequantize"](q.view(-1), absmax_theirs, w.shape)
    err_state = (theirs - ours).abs().max().item()
    ours_e2e = ns["nf4_dequantize"](ns["pack_4bit"](codes), ns["double_dequantize"](c, s2, offset), w.shape)
    err_e2e = (theirs - ours_e2e).abs().max().item()
    print(f"dequantised weights: from bitsandbytes' state {err_state:.1e}; end to end {err_e2e:.1e} "
          f"(weights ~{w.abs().max():.2f})")
    assert err_state == 0.0 and err_e2e < 1e-2 * w.abs().max().item()


def _bnb_linear4bit(linear):
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone())
    return layer.to("cpu")                                   # quantises (Params4bit: double quant by default)


def test_linear4bit_forward_matches_bitsandbytes(ns):
    torch.manual_seed(2)
    linear = nn.Linear(256, 192)
    theirs = _bnb_linear4bit(linear)
    state = theirs.weight.quant_state
    assert state.nested                                     # compress_statistics=True
    ours = ns["NF4Linear"].from_linear(linear)
    x = torch.randn(3, 5, 256)
    with torch.no_grad():
        y_theirs = theirs(x)
        err_e2e = (ours(x) - y_theirs).abs().max().item()
        # the same quantised state in our layer: then the forward is the same function
        ours.weight_packed.copy_(theirs.weight.data.view(-1))
        ours.absmax_codes.copy_(state.absmax)
        ours.absmax_scales.copy_(state.state2.absmax)
        ours.absmax_offset.copy_(state.offset)
        err_state = (ours(x) - y_theirs).abs().max().item()
    print(f"\nLinear4bit forward: same state {err_state:.1e}; our own quantisation {err_e2e:.1e} "
          f"(outputs ~{y_theirs.abs().mean():.2f})")
    assert err_state < 1e-5 and err_e2e < 1e-2


def test_qlora_layer_gradients(ns):
    torch.manual_seed(3)
    base = ns["NF4Linear"].from_linear(nn.Linear(128, 64))
    layer = ns["LoRALinear"](base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    reference = base.to_linear()
    x = torch.randn(6, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = reference(x_ref) + x_ref @ layer.lora_A.t() @ layer.lora_B.t() * layer.scaling
    (y * torch.arange(64)).sum().backward()
    (y_ref * torch.arange(64)).sum().backward()
    err = (y - y_ref).abs().max().item()
    gerr = (x.grad - x_ref.grad).abs().max().item()
    print(f"\nQLoRA layer vs nn.Linear on the dequantised weight: output {err:.1e}, input grad {gerr:.1e}")
    assert err < 1e-5 and gerr < 1e-4
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert not any(p.requires_grad for p in base.parameters())
    with pytest.raises(TypeError, match="dequantise"):
        layer.merge()


def test_decoder_shapes_and_checkpointing(ns):
    with torch.device("meta"):
        m = ns["QuantizedDecoder"](ns["DecoderConfig"].preset("qwen2.5-7b"))
        ns["inject_lora"](m, ns["QWEN_LORA_TARGETS"], r=16, alpha=32)
    counts = ns["count_parameters"](m)
    assert counts["total"] - counts["trainable"] == 7_615_616_512          # Qwen2.5-7B
    assert counts["trainable"] == 40_370_176                             # r=16 on all 7 linears, 28 layers
    # a tiny one runs for real, with and without checkpointing: same loss and LoRA gradients
    c = ns["DecoderConfig"].preset("tiny")
    torch.manual_seed(0)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = ns["QuantizedDecoder"](c, linear=lambda i, o, b: ns["NF4Linear"].from_linear(nn.Linear(i, o, bias=b)),
                                       gradient_checkpointing=ckpt, dtype=torch.float32)
        ns["inject_lora"](model, ns["QWEN_LORA_TARGETS"], r=2, alpha=4)
        for layer in ns["lora_layers"](model):
            nn.init.normal_(layer.lora_B)
        model.train()
        ids = torch.randint(96, (2, 12), generator=torch.Generator().manual_seed(1))
        loss = model(ids, ids)[1]
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    err = max((a - b).abs().max().item() for a, b in zip(*grads))
    print(f"\ncheckpointed vs plain LoRA gradients: {err:.1e}")
    assert err < 1e-5


def test_estimate_by_depth_equals_a_full_trace(ns):
    """The memory tools chapters 10 and 11 load: 1 + 2 traced blocks extrapolate to the full trace of a deeper model,
    line by line, with and without checkpointing; a GPU measurement is shown only for the configuration it measured."""
    from dataclasses import replace

    import labkit.vram

    def job(n_layer, ckpt):
        config = replace(ns["DecoderConfig"].preset("tiny"), n_layer=n_layer, vocab_size=4096)

        def make_model():
            model = ns["QuantizedDecoder"](config, gradient_checkpointing=ckpt)
            return ns["inject_lora"](model, ns["QWEN_LORA_TARGETS"], r=4, alpha=8)

        def make_batch():
            ids = torch.randint(config.vocab_size, (2, 65))
            return ids[:, :-1], ids[:, 1:]

        return labkit.vram.TrainJob(make_model=make_model, make_batch=make_batch, loss_fn=lambda m, b: m(*b)[1],
                                    name=f"tiny decoder, {n_layer} layers")

    for ckpt in (True, False):
        full = labkit.vram.estimate(job(5, ckpt))
        extrapolated = ns["estimate_by_depth"](lambda n: job(n, ckpt), 5)
        diff = {k: extrapolated.breakdown[k] - v for k, v in full.breakdown.items()}
        print(f"\ncheckpointing {ckpt}: extrapolated - traced, per line (bytes): {diff}")
        assert all(abs(d) <= 8 for d in diff.values()) and full.breakdown["activations"] > 0
    entry = json.loads((ROOT / "benchmarks" / "results" / "gpu_memory.json").read_text())["chapters"]["04_lora"]
    same = labkit.vram.VramReport("x", {}, int(entry["estimate_gib"] * 2**30), 12 * 2**30, "")
    other = labkit.vram.VramReport("x", {}, same.peak_bytes + 2**21, 12 * 2**30, "")
    assert ns["measured_peak_gib"]("04_lora", same) == entry["measured_total_gib"]
    assert ns["measured_peak_gib"]("04_lora", other) is None and ns["measured_peak_gib"]("99_none", same) is None


def test_rope_matches_transformers_qwen2(ns):
    """Our rotary embedding is Qwen2's (half-split layout, θ = 1e6)."""
    from transformers.models.qwen2 import modeling_qwen2 as mq

    cfg = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)
    rope = mq.Qwen2RotaryEmbedding(cfg)
    x = torch.randn(1, 4, 10, 16)
    pos = torch.arange(10)[None]
    cos_hf, sin_hf = rope(x, pos)
    q_hf, _ = mq.apply_rotary_pos_emb(x, x, cos_hf, sin_hf)
    cos, sin = ns["rope_tables"](10, 16, 1e6)
    err = (ns["rotate"](x, cos, sin) - q_hf).abs().max().item()
    print(f"\nRoPE vs transformers' Qwen2: {err:.1e}")
    assert err < 1e-5


# ----------------------------------------------------------------------------------------- full-size data code
ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Say hi.", "input": "", "output": "Hi!" * 30},
]


def test_instruction_formatting_on_local_rows(tmp_path):
    data = notebook.load(NB, ("model", "data"))
    path = tmp_path / "rows.json"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    ds = data["load_instruction_dataset"]("json", data_files=str(path))
    assert len(ds) == 3
    prompt, response = data["format_instruction"](ds[0])
    assert "Add the numbers." in prompt and "2 and 3" in prompt and prompt.endswith("### Response:\n")
    assert response == "5"
    prompt2, _ = data["format_instruction"](ds[1])
    assert "### Input" not in prompt2                       # no empty input section
    encode = lambda s: [ord(ch) for ch in s]               # noqa: E731
    row = data["tokenize_instruction"](ds[0], encode, eos_id=0, max_len=1024)
    n_prompt = len(prompt)
    assert row["input_ids"] == encode(prompt) + encode("5") + [0]
    assert row["labels"] == [-100] * n_prompt + encode("5") + [0]       # only the response (and EOS) is learned
    long_row = data["tokenize_instruction"](ds[2], encode, eos_id=0, max_len=64)
    assert len(long_row["input_ids"]) == len(long_row["labels"]) == 64
    batch = data["collate"]([row, long_row], pad_id=1)
    T = max(len(row["input_ids"]), 64)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, T)
    assert batch["attention_mask"][0].sum() == len(row["input_ids"]) and (batch["labels"][0, len(row["labels"]):] == -100).all()


def test_full_run_checkpoints_and_resumes_the_adapters_only(tmp_path):
    """The full run's wrapper, on a tiny GPT-2 with peft LoRA: the Trainer's checkpoint holds the adapters only,
    and a fresh base + fresh adapters resume from it exactly (the 7B base is never saved or strictly loaded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from labkit.train import Trainer, TrainConfig

    data = notebook.load(NB, ("model", "data"))

    def fresh():
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2))
        lm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
        return data["CausalLMLoss"](lm)

    def batch(split, g):
        ids = torch.randint(50, (2, 12), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    cfg = TrainConfig(max_steps=4, lr=1e-2, warmup_steps=0, eval_every=2, eval_batches=1, progress=False,
                      live_plot=False, ckpt_path=str(tmp_path / "adapters.pt"))
    wrapped = fresh()
    Trainer(wrapped, batch, config=cfg, device="cpu").fit(steps=2)
    saved = torch.load(cfg.ckpt_path, weights_only=True)["model"]
    trained = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert set(saved) == trained and all("lora_" in n for n in saved), sorted(saved)[:4]
    resumed = fresh()
    trainer = Trainer(resumed, batch, config=cfg, device="cpu")
    trainer.load()
    assert trainer.step == 2
    for name, p in resumed.named_parameters():
        assert torch.equal(p, wrapped.get_parameter(name)), name
    with pytest.raises(RuntimeError, match="does not fit"):
        resumed.load_state_dict({"lm.nonsense": torch.zeros(1)})


def test_hub_data_offline_explains(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants as hub_constants

    data = notebook.load(NB, ("model", "data"))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets", raising=False)
    with pytest.raises(DataUnavailable, match="tiny") as e:
        data["load_instruction_dataset"]("yahma/alpaca-cleaned")
    print("\n" + str(e.value).splitlines()[0])


# ----------------------------------------------------------------------------------------- exercises
WRONG_ANSWERS = {
    # the scale s left out of the gradient of A (it is in B's and in x's): right shapes, A's gradient 1/s off
    0: """
def lora_backward(x, W, A, B, scaling, grad_y):
    x2, g2 = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])
    h = x2 @ A.t()
    grad_B = scaling * (g2.t() @ h)
    grad_A = (g2 @ B).t() @ x2
    grad_x = (g2 @ W + scaling * (g2 @ B) @ A).reshape(x.shape)
    return grad_x, grad_A, grad_B
""",
    # the paper's "column-wise" norm read on a (d_out, d_in) weight: each input column normalised, not each row
    1: """
def dora_forward(x, W, b, A, B, magnitude, alpha, rslora=False):
    r = A.shape[0]
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    W_adapted = W + scaling * (B @ A)
    direction = W_adapted / torch.linalg.norm(W_adapted, dim=0, keepdim=True).detach()
    return F.linear(x, magnitude[:, None] * direction) + b
""",
    # indexes the adapter list with every id, -1 included: the base model's sequences get the last adapter
    2: """
def multi_lora_forward(x, W, b, adapters, adapter_ids):
    rows = []
    for n, k in enumerate(adapter_ids.tolist()):
        A, B, scaling = adapters[k]
        rows.append(F.linear(x[n], W, b) + scaling * (x[n] @ A.t() @ B.t()))
    return torch.stack(rows)
""",
}

# more wrong DoRAs that exercise 2's check must reject: right outputs with the norm in the graph (wrong gradients),
# rsLoRA's flag ignored, and the bias rescaled with the rest
DORA_WRONG = {
    "norm not detached": """
def dora_forward(x, W, b, A, B, magnitude, alpha, rslora=False):
    r = A.shape[0]
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    W_adapted = W + scaling * (B @ A)
    return F.linear(x, W_adapted) * (magnitude / torch.linalg.norm(W_adapted, dim=1)) + b
""",
    "rslora ignored": """
def dora_forward(x, W, b, A, B, magnitude, alpha, rslora=False):
    W_adapted = W + alpha / A.shape[0] * (B @ A)
    return F.linear(x, W_adapted) * (magnitude / torch.linalg.norm(W_adapted, dim=1).detach()) + b
""",
    "bias rescaled": """
def dora_forward(x, W, b, A, B, magnitude, alpha, rslora=False):
    r = A.shape[0]
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    W_adapted = W + scaling * (B @ A)
    return F.linear(x, W_adapted, b) * (magnitude / torch.linalg.norm(W_adapted, dim=1).detach())
""",
}


@pytest.mark.parametrize("mistake", sorted(DORA_WRONG))
def test_dora_check_rejects_more_mistakes(mistake):
    from labkit.check import ExerciseError

    with pytest.raises(ExerciseError) as e:
        notebook.run_exercise(NB, 1, DORA_WRONG[mistake])
    print(f"\n{mistake}: {str(e.value).splitlines()[0][:120]}")


def test_explore_nf4_blocksize():
    """The exploration: a larger block gives a larger error (and fewer bits); outliers make it worse."""
    import matplotlib.pyplot as plt

    ns = notebook.load(NB, ("model", "explore"))
    view = ns["explore_nf4_blocksize"]()
    assert view.values == {"blocksize": 64, "outlier_share": 0.002, "outlier_size": 10.0}
    small, large = view.set(blocksize=32), view.set(blocksize=1024)
    print(f"\nblock 32: {small['error']:.4f} at {small['bits']:.3f} bits; block 1024: {large['error']:.4f} at "
          f"{large['bits']:.3f} bits")
    assert large["error"] > small["error"] + 0.05 and large["bits"] < small["bits"]
    assert all(a < b for a, b in zip(large["errors"], large["errors"][1:]))       # the curve rises with the block
    assert abs(sum(large["code_share"]) - 1) < 1e-6
    gaussian = view.set(outlier_share=0.0)
    assert gaussian["error"] < large["error"] - 0.05                                # outliers cost the large block most
    fig = view.figure()
    assert isinstance(fig, plt.Figure)
    plt.close(fig)


def test_wrong_answers_are_rejected():
    assert_wrong_answers_fail(NB, WRONG_ANSWERS)
