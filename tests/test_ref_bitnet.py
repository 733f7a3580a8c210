"""Chapter 05 (BitNet b1.58) against `transformers`, given the same weights.

References:
* `transformers.integrations.bitnet.AutoBitLinear(in, out, bias=False, online_quant=True)`: the trainable BitLinear
  (absmean ternary weights, per-token absmax int8 activations, straight-through estimator). Same latent weights →
  same outputs and the same gradients (input and weight). Its quantisers are `torch.compile`d: the first call
  compiles (~17 s on a CPU).
* `transformers.BitNetForCausalLM(BitNetConfig(...))`: built from a config it uses plain `nn.Linear`s, i.e. our
  decoder with `quant=False` (same parameter names, sub-norms, RoPE, GQA, SwiGLU / squared ReLU). With its linear
  layers swapped for `AutoBitLinear` by `replace_with_bitnet_linear` (what `from_pretrained` does with an
  "autobitlinear"/"online" quantization config) it is the b1.58 model: our decoder with `quant=True`.
* `transformers.integrations.bitnet.BitLinear` and `pack_weights`: the inference layer reading 2-bit packed
  ternary weights. Our packing layout is theirs, so our packed buffers load into their layer.
Every comparison prints its max error; tolerances are for float32.
"""
import pytest
import torch

import labkit.notebook

from .grads import backward_same, report
from .test_exercises import assert_wrong_answers_fail

NB = "05_bitnet"


@pytest.fixture(scope="module")
def ch():
    return labkit.notebook.load(NB)


_report = report   # print the max error, assert closeness (tests/grads.py)


def _hf_config(**overrides):
    from transformers import BitNetConfig

    kw = dict(vocab_size=120, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, hidden_act="relu2", max_position_embeddings=64, rms_norm_eps=1e-5,
              bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    return BitNetConfig(**{**kw, **overrides})


def _our_config(ch, hf_config, quant):
    c = hf_config
    return ch["BitNetConfig"](vocab_size=c.vocab_size, block_size=c.max_position_embeddings, n_layer=c.num_hidden_layers,
                              n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads, n_embd=c.hidden_size,
                              n_hidden=c.intermediate_size, act=c.hidden_act, norm_eps=c.rms_norm_eps,
                              rope_theta=c.rope_parameters["rope_theta"], quant=quant)


def _random_hf_model(hf_config, seed=0):
    from transformers import BitNetForCausalLM

    torch.manual_seed(seed)
    model = BitNetForCausalLM(hf_config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():          # norm gains ≠ 1, so that every tensor matters
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _to_autobitlinear(model):
    """transformers' own route to a trainable b1.58 model: every Linear but lm_head → AutoBitLinear(online)."""
    from transformers import BitNetQuantConfig
    from transformers.integrations.bitnet import AutoBitLinear, replace_with_bitnet_linear

    state = {k: v.clone() for k, v in model.state_dict().items()}
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"],
                               quantization_config=BitNetQuantConfig(linear_class="autobitlinear",
                                                                     quantization_mode="online"))
    model.load_state_dict(state, assign=True)               # the new layers were built on the meta device
    n = sum(isinstance(m, AutoBitLinear) for m in model.modules())
    assert n == 7 * model.config.num_hidden_layers, n
    return model


# --------------------------------------------------------------------------- BitLinear vs AutoBitLinear
@pytest.mark.parametrize("shape", [(64, 48, (3, 7)), (96, 32, (5,)), (33, 20, (2, 3, 4))])
def test_bitlinear_matches_autobitlinear(ch, shape):
    from transformers.integrations.bitnet import AutoBitLinear

    n_in, n_out, lead = shape
    torch.manual_seed(0)
    ref = AutoBitLinear(n_in, n_out, bias=False, online_quant=True)
    ours = ch["BitLinear"](n_in, n_out)
    ours.load_state_dict(ref.state_dict())                  # the same latent weights
    x = torch.randn(*lead, n_in) * torch.logspace(-1, 1, lead[-1])[..., None]    # tokens of different scales
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    _report(f"BitLinear({n_in}, {n_out}) output", y_ours, y_ref)
    backward_same(y_ref, y_ours)
    _report("  d loss / d input (STE)", x_ours.grad, x_ref.grad)
    _report("  d loss / d latent weight (STE)", ours.weight.grad, ref.weight.grad)


def test_quantisers_match_transformers(ch):
    from transformers.integrations.bitnet import ActQuant, WeightQuant

    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 0.02, 3.0):
        w = torch.randn(40, 24, generator=g) * scale
        # equal but for the last bit: the compiled reference may divide by s as a multiplication by 1/s
        _report(f"weight_quant (std {scale})", ch["weight_quant"](w), WeightQuant.apply(w), atol=0, rtol=1e-6)
        w_t, s = ch["ternarize"](w)
        assert set(w_t.unique().tolist()) <= {-1, 0, 1} and w_t.dtype == torch.int8
        _report("  ternarize, dequantised", w_t.float() / s, WeightQuant.apply(w), atol=1e-7 * scale, rtol=1e-6)
    x = torch.randn(4, 9, 32, generator=g) * torch.logspace(-3, 3, 9)[:, None]
    _report("activation_quant (per token)", ch["activation_quant"](x), ActQuant.apply(x), atol=0, rtol=1e-6)
    x_int, s_x = ch["activation_int8"](x)
    assert x_int.dtype == torch.int8 and s_x.shape == (4, 9, 1)
    _report("  activation_int8, dequantised", x_int.float() / s_x, ActQuant.apply(x), atol=1e-9, rtol=1e-6)


# --------------------------------------------------------------------------- the decoder vs BitNetForCausalLM
@pytest.mark.parametrize("act,n_kv", [("relu2", 2), ("silu", 4)])
def test_decoder_without_quantisation_matches_bitnet_for_causal_lm(ch, act, n_kv):
    hf_config = _hf_config(hidden_act=act, num_key_value_heads=n_kv)
    ref = _random_hf_model(hf_config)
    ours = ch["BitNetLM"](_our_config(ch, hf_config, quant=False)).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    idx = torch.randint(0, hf_config.vocab_size, (2, 45))
    logits_ref, logits_ours = ref(idx).logits, ours(idx)[0]
    _report(f"BitNetForCausalLM ({act}, {n_kv} kv heads) logits, quant=False", logits_ours, logits_ref)
    backward_same(logits_ref, logits_ours)
    ref_params = dict(ref.named_parameters())
    worst = max(_report(f"  d loss / d {name}", p.grad, ref_params[name].grad, atol=1e-4, rtol=1e-4)
                for name, p in ours.named_parameters())
    print(f"worst parameter-gradient error: {worst:.2e}")


def test_b158_decoder_matches_transformers_with_autobitlinear(ch):
    """The whole b1.58 model: our quant=True decoder vs BitNetForCausalLM with AutoBitLinear layers (STE)."""
    hf_config = _hf_config(hidden_act="silu", num_key_value_heads=2)
    ref = _to_autobitlinear(_random_hf_model(hf_config, seed=2))
    ours = ch["BitNetLM"](_our_config(ch, hf_config, quant=True)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    idx = torch.randint(0, hf_config.vocab_size, (2, 33))
    logits_ref, logits_ours = ref(idx).logits, ours(idx)[0]
    _report("b1.58 decoder logits vs transformers + AutoBitLinear", logits_ours, logits_ref, atol=1e-4)
    backward_same(logits_ref, logits_ours)
    ref_params = dict(ref.named_parameters())
    # gradients pass 2 layers of rounding: a token whose absmax entry sits on a rounding tie could differ, so
    # the tolerance is looser than float32's, and the errors are printed
    worst = max(_report(f"  d loss / d {name}", p.grad, ref_params[name].grad, atol=1e-3, rtol=1e-3)
                for name, p in ours.named_parameters())
    print(f"worst parameter-gradient error: {worst:.2e}")


# --------------------------------------------------------------------------- inference: packing
def test_packing_matches_transformers_layout_and_round_trips(ch):
    from transformers.integrations.bitnet import pack_weights

    g = torch.Generator().manual_seed(0)
    for n, m in [(4, 1), (8, 3), (64, 48), (1024, 7)]:
        w_t = torch.randint(-1, 2, (n, m), generator=g, dtype=torch.int8)
        packed = ch["pack_ternary"](w_t)
        assert packed.dtype == torch.uint8 and packed.shape == (n // 4, m)
        assert torch.equal(packed, pack_weights(w_t.clone().float())), f"layout differs from transformers at {n}x{m}"
        assert torch.equal(ch["unpack_ternary"](packed), w_t)
    # and the other way: any bytes whose 2-bit codes are valid (0, 1, 2) survive unpack → pack
    codes = torch.randint(0, 3, (4, 16, 5), generator=g, dtype=torch.uint8)
    packed = codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6
    assert torch.equal(ch["pack_ternary"](ch["unpack_ternary"](packed)), packed)
    with pytest.raises(ValueError, match="multiple of 4"):
        ch["pack_ternary"](torch.zeros(6, 2, dtype=torch.int8))
    print("pack_ternary = transformers.pack_weights on 4 shapes; unpack∘pack and pack∘unpack are identities")


def test_packed_layer_matches_transformers_bitlinear(ch):
    """Our packed buffers (weight uint8, weight_scale = 1/γ) in transformers' inference BitLinear."""
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    torch.manual_seed(3)
    layer = ch["BitLinear"](96, 64)
    torch.nn.init.normal_(layer.weight, std=0.02)
    packed = ch["PackedBitLinear"].from_bitlinear(layer)
    ref = HFBitLinear(96, 64, bias=False, dtype=torch.float32)
    ref.load_state_dict({"weight": packed.weight, "weight_scale": packed.weight_scale.reshape(1)})
    x = torch.randn(3, 11, 96)
    with torch.no_grad():
        y_ref = ref(x)
        _report("PackedBitLinear vs transformers BitLinear (packed, int8 path)", packed(x), y_ref, atol=1e-6)
        _report("BitLinear (training path) vs transformers BitLinear", layer(x), y_ref, atol=1e-5)


def test_packed_model_equals_training_model(ch):
    """Whole model: equal up to rare rounding flips. One layer is exact to float rounding (the test above); across
    layers, a last-bit difference can move an activation over a rounding boundary of the next quantiser."""
    torch.manual_seed(0)
    model = ch["BitNetLM"](ch["BitNetConfig"].preset("tiny")).eval()
    packed = ch["pack_model"](model)
    assert not any(isinstance(m, ch["BitLinear"]) and m.quant for m in packed.modules())
    assert sum(isinstance(m, ch["PackedBitLinear"]) for m in packed.modules()) == 7 * model.config.n_layer
    idx = torch.randint(0, 96, (4, 64))
    with torch.no_grad():
        got, expected = packed(idx)[0], model(idx)[0]
    _report("packed tiny model vs training model, logits", got, expected, atol=0.05, rtol=0)
    same_top1 = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"same most likely token at {same_top1:.1%} of positions")
    assert same_top1 > 0.95
    assert ch["size_bytes"](packed) < ch["size_bytes"](model) / 4


def test_addsub_matmul_is_the_integer_product(ch):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (3, 4, 50), generator=g, dtype=torch.int8)
    w = torch.randint(-1, 2, (24, 50), generator=g, dtype=torch.int8)
    assert torch.equal(ch["ternary_matmul_addsub"](x, w), x.int() @ w.int().T)


def test_rope_is_relative(ch):
    """RoPE: q·k depends only on the distance between positions."""
    cos, sin = ch["rope_cos_sin"](40, 16, 10000.0)
    q, k = torch.randn(16), torch.randn(16)
    rq, rk = ch["apply_rope"](q.expand(40, 16), cos, sin), ch["apply_rope"](k.expand(40, 16), cos, sin)
    dots = rq @ rk.T
    _report("RoPE: q_t·k_s at distance 3, over t", torch.diagonal(dots, 3), torch.diagonal(dots, 3)[:1].expand(37))


def test_flops_per_token_counts_the_matrices(ch):
    c = ch["BitNetConfig"].preset("bitnet-350m", grad_checkpoint=False)
    with torch.device("meta"):
        model = ch["BitNetLM"](c)
    n_matmul = model.num_params(non_embedding=True) - sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight") or "layernorm" in n)
    expected = 6 * (n_matmul + c.n_embd * c.vocab_size) + 12 * c.n_layer * c.block_size * c.n_embd
    assert ch["train_flops_per_token"](c) == expected


# --------------------------------------------------------------------------- exercises
WRONG_ANSWERS = {
    # the groups taken with the wrong reshape: shapes right, but each "group" is a strided set of columns
    0: """
def ternarize_groups(w, group_size):
    n, m = w.shape
    groups = w.float().reshape(n, group_size, m // group_size)
    scales = 1.0 / groups.abs().mean(dim=1).clamp(min=1e-5)
    w_ternary = (groups * scales[:, None, :]).round().clamp(-1, 1)
    return w_ternary.reshape(n, m).to(torch.int8), scales
""",
    # the first weight as the most significant digit: a valid code that round-trips, in the wrong layout
    1: """
def pack_base3(w_ternary):
    codes = w_ternary.reshape(-1).to(torch.int32) + 1
    codes = F.pad(codes, (0, -codes.numel() % 5), value=1)
    powers = 3 ** torch.arange(4, -1, -1, dtype=torch.int32)
    return (codes.view(-1, 5) * powers).sum(dim=1).to(torch.uint8)


def unpack_base3(packed, shape):
    powers = 3 ** torch.arange(4, -1, -1, dtype=torch.int32)
    codes = packed.to(torch.int32)[:, None] // powers % 3
    return (codes.reshape(-1)[:math.prod(shape)] - 1).to(torch.int8).view(*shape)
""",
    # the table's patterns in {0, 1, 2} (the codes) instead of the weights {-1, 0, 1}: every entry off by Σ x
    2: """
def ternary_lut(x_int, g):
    N, m = x_int.shape
    k = torch.arange(3 ** g)
    patterns = (k[:, None] // 3 ** torch.arange(g) % 3).to(torch.int32)
    groups = x_int.to(torch.int32).view(N, m // g, g)
    return (groups[:, :, None, :] * patterns).sum(dim=-1, dtype=torch.int32)


def lut_matmul(lut, w_ternary):
    N, n_groups, n_patterns = lut.shape
    g = round(math.log(n_patterns, 3))
    codes = (w_ternary.to(torch.int64) + 1).view(w_ternary.shape[0], n_groups, g)
    index = (codes * 3 ** torch.arange(g)).sum(dim=-1)
    return lut[:, torch.arange(n_groups), index].sum(dim=-1, dtype=torch.int32)
""",
}

# a lookup that reads the digits the other way round: right with a table built the same wrong way, so only the
# check's reference table exposes it
LUT_MATMUL_REVERSED = (WRONG_ANSWERS[2].replace("torch.arange(g)", "torch.arange(g - 1, -1, -1)")
                       .replace("% 3)", "% 3 - 1)"))
assert LUT_MATMUL_REVERSED.count("torch.arange(g - 1, -1, -1)") == 2 and "% 3 - 1)" in LUT_MATMUL_REVERSED


def test_lut_check_rejects_a_consistently_reversed_digit_order():
    from labkit.check import ExerciseError

    with pytest.raises(ExerciseError, match="ternary_lut"):
        labkit.notebook.run_exercise(NB, 2, LUT_MATMUL_REVERSED)


def test_explore_ternary_threshold(ch):
    """The exploration: a higher threshold gives more zeros; at t = ½ with γ it is the chapter's ternarize."""
    import matplotlib.pyplot as plt

    ns = labkit.notebook.load(NB, ("model", "explore"))
    torch.manual_seed(0)
    weight = ns["BitNetLM"](ns["BitNetConfig"].preset("tiny")).model.layers[0].mlp.up_proj.weight
    view = ns["explore_ternary_threshold"](weight)
    assert view.values == {"threshold": 0.5, "scale": "γ (BitNet)"}
    w_t, _ = ns["ternarize"](weight.detach())
    assert abs(view.result["zeros"] - (w_t == 0).float().mean().item()) < 1e-6      # t = ½: the chapter's zeros
    low, high = view.set(threshold=0.2), view.set(threshold=1.0)
    print(f"\nzeros: {low['zeros']:.3f} at t = 0.2, {high['zeros']:.3f} at t = 1.0")
    assert low["zeros"] < 0.31 < high["zeros"]
    assert all(a <= b for a, b in zip(high["zeros_curve"], high["zeros_curve"][1:]))
    fitted = view.set(scale="least squares")
    assert fitted["error"] < high["error"]                  # the least-squares scale fits better at the same t
    fig = view.figure()
    assert isinstance(fig, plt.Figure)
    plt.close(fig)


def test_wrong_answers_fail():
    assert_wrong_answers_fail(NB, WRONG_ANSWERS)
