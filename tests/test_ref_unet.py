"""Chapter 10 (diffusion with a U-Net) against an independent reference: diffusers.

The chapter's schedules, forward process and samplers are loaded from the notebook's `model` cells and
compared with diffusers' `DDPMScheduler` / `DDIMScheduler` for the linear and the cosine ("squaredcos_cap_v2")
schedules: `add_noise`, one ancestral step, one DDIM step (several η, with and without x̂₀ clipping, every
step and respaced), and whole sampling loops. The chapter's U-Net has exactly diffusers' `UNet2DModel` layout:
the same parameter count for every preset, and with our weights loaded into diffusers (through the name map
below) the same outputs and gradients. Cross-attention is checked against diffusers' `Attention`. With SD's
spatial Transformer block (`attention_block="transformer"`) the U-Net has exactly `UNet2DConditionModel`'s layout:
the same parameter count, and with the same weights the same outputs and gradients (input, text context and
every parameter), for several layouts; the block alone matches `Transformer2DModel`. The full-size SD training
code (`sd_trainer`, `sd_batches`, `sd_sample`) runs two Trainer steps on random latents and contexts. Also:
gradient checkpointing changes nothing, EMA follows its formula, the full-size image loader works on a local
image folder and explains itself offline, and each exercise check rejects a plausible wrong answer.
"""
import re
from dataclasses import replace

import pytest
import torch

from labkit import notebook
from labkit.data import DataUnavailable

from .conftest import ROOT
from .grads import backward_same, grad_errors, perturb_
from .test_exercises import assert_wrong_answers_fail

NB = ROOT / "notebooks" / "10_unet.ipynb"
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def ns():
    return notebook.load(NB, ("model", "data"))


# name of the diffusers scheduler config -> how the chapter builds the same schedule
SCHEDULES = {
    "linear": (dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), lambda NS: NS.linear(1000)),
    "squaredcos_cap_v2": (dict(beta_schedule="squaredcos_cap_v2"), lambda NS: NS.cosine(1000)),
}


def _ddpm(kind, clip=True):
    return diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=clip, **SCHEDULES[kind][0])


def _ddim(kind, clip=True):
    return diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=clip, set_alpha_to_one=True,
                                   steps_offset=0, timestep_spacing="leading", **SCHEDULES[kind][0])


def _ours(ns, kind):
    return SCHEDULES[kind][1](ns["NoiseSchedule"])


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedule_and_add_noise_match_diffusers(ns, kind):
    ref, ours = _ddpm(kind), _ours(ns, kind)
    err_beta = (ours.betas - ref.betas).abs().max().item()
    err_abar = (ours.alphas_cumprod - ref.alphas_cumprod).abs().max().item()
    x0, noise = _randn(8, 3, 16, 16, seed=1).clamp(-1, 1), _randn(8, 3, 16, 16, seed=2)
    t = torch.tensor([0, 1, 10, 250, 500, 750, 998, 999])
    err_noise = (ours.add_noise(x0, t, noise) - ref.add_noise(x0, noise, t)).abs().max().item()
    print(f"\n[{kind}] max |Δβ| {err_beta:.1e}, max |Δᾱ| {err_abar:.1e}, max |Δ add_noise| {err_noise:.1e}")
    assert err_beta < 1e-7 and err_abar < 1e-7
    assert err_noise < 1e-6


@pytest.mark.parametrize("steps", [50, 25, 10])
def test_timesteps_match_diffusers(ns, steps):
    ref_ddim, ref_ddpm = _ddim("linear"), _ddpm("linear")
    ref_ddim.set_timesteps(steps)
    ref_ddpm.set_timesteps(steps)
    ours = ns["timesteps_for"](_ours(ns, "linear"), steps)
    assert ours == ref_ddim.timesteps.tolist() == ref_ddpm.timesteps.tolist()


# ------------------------------------------------------------------------------------------------ one step
@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps", [None, 50])            # None: every step (t → t − 1); 50: respaced (t → t − 20)
def test_ancestral_step_matches_ddpm_scheduler(ns, kind, clip, steps):
    ours, ref = _ours(ns, kind), _ddpm(kind, clip)
    if steps:
        ref.set_timesteps(steps)
    stride = 1000 // steps if steps else 1
    worst = 0.0
    for i, t in enumerate([980, 960, 500, 40, 20, 0] if steps else [999, 998, 500, 37, 1, 0]):
        x_t, eps = _randn(4, 3, 8, 8, seed=10 + i), _randn(4, 3, 8, 8, seed=20 + i)
        expected = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = _randn(4, 3, 8, 8, seed=i)                 # what diffusers draws from the same generator
        got = ns["ddpm_step"](ours, eps, t, t - stride, x_t, noise, clip=clip)
        worst = max(worst, (got - expected).abs().max().item())
    print(f"\n[{kind}, clip={clip}, steps={steps}] ancestral step: max error {worst:.1e}")
    assert worst < 2e-5


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_ddim_scheduler(ns, kind, clip, eta):
    ours, ref = _ours(ns, kind), _ddim(kind, clip)
    worst = 0.0
    for steps in (50, 25):
        ref.set_timesteps(steps)
        ts = ns["timesteps_for"](ours, steps)
        for i, t in enumerate(ts[:2] + ts[len(ts) // 2: len(ts) // 2 + 1] + ts[-2:]):
            x_t, eps, z = _randn(4, 3, 8, 8, seed=i), _randn(4, 3, 8, 8, seed=50 + i), _randn(4, 3, 8, 8, seed=99 + i)
            expected = ref.step(eps, t, x_t, eta=eta, variance_noise=z if eta > 0 else None).prev_sample
            got = ns["ddim_step"](ours, eps, t, t - 1000 // steps, x_t, eta=eta, noise=z, clip=clip)
            worst = max(worst, (got - expected).abs().max().item())
    print(f"\n[{kind}, clip={clip}, η={eta}] DDIM step: max error {worst:.1e}")
    assert worst < 2e-5


def test_sinusoidal_embedding_matches_diffusers(ns):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 7, 100, 999])
    for dim in (16, 64, 128):
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        err = (ns["sinusoidal_embedding"](t, dim) - ref).abs().max().item()
        print(f"\n[dim {dim}] timestep embedding: max error {err:.1e}")
        assert err < 1e-6


# ------------------------------------------------------------------------------------------------ the U-Net
def diffusers_name(ours: str) -> str:
    """Our parameter name -> the same tensor's name in diffusers' UNet2DModel."""
    k = ours
    k = re.sub(r"^(down|up)\.(\d+)\.attns\.(\d+)\.self_attn\.", lambda m: f"{m[1]}_blocks.{m[2]}.attentions.{m[3]}.", k)
    k = re.sub(r"^mid\.attns\.0\.self_attn\.", "mid_block.attentions.0.", k)
    k = re.sub(r"^down\.(\d+)\.resample\.", r"down_blocks.\1.downsamplers.0.", k)
    k = re.sub(r"^up\.(\d+)\.resample\.", r"up_blocks.\1.upsamplers.0.", k)
    k = re.sub(r"^(down|up)\.", r"\1_blocks.", k)
    k = re.sub(r"^mid\.", "mid_block.", k)
    for a, b in [(".time_proj.", ".time_emb_proj."), (".skip.", ".conv_shortcut."), (".norm.", ".group_norm."),
                 (".to_out.", ".to_out.0."), ("time_mlp.0.", "time_embedding.linear_1."),
                 ("time_mlp.2.", "time_embedding.linear_2."), ("class_emb.", "class_embedding."),
                 ("norm_out.", "conv_norm_out.")]:
        k = k.replace(a, b)
    return k


def unet2d_like(cfg):
    """diffusers' UNet2DModel with the layout a chapter UNetConfig describes (no cross-attention)."""
    assert cfg.context_dim is None, "UNet2DModel has no cross-attention"
    return diffusers.UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_level,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)),
        norm_num_groups=cfg.norm_groups, attention_head_dim=cfg.head_dim, norm_eps=cfg.norm_eps,
        num_class_embeds=cfg.num_classes, dropout=cfg.dropout, flip_sin_to_cos=True, freq_shift=0)


def _layouts(ns):
    P, C = ns["UNET_PRESETS"], ns["UNetConfig"]
    return {
        "pixel-tiny": P["pixel-tiny"],
        "3 levels, 2 blocks, classes": C(image_size=16, channels=(16, 32, 48), attention=(False, True, True),
                                        layers_per_level=2, norm_groups=8, head_dim=8, num_classes=7),
        "attention everywhere": C(image_size=8, in_channels=4, out_channels=4, channels=(32, 32),
                                  attention=(True, True), norm_groups=8, head_dim=16),
    }


@pytest.mark.parametrize("preset", ["pixel-tiny", "pixel-64", "latent-tiny"])
def test_parameter_count_matches_unet2dmodel_exactly(ns, preset):
    cfg = ns["UNET_PRESETS"][preset]
    assert cfg.attention_block == "groupnorm"
    extra = 0
    if cfg.context_dim:                         # our cross-attention blocks: compare the rest with UNet2DModel
        with torch.device("meta"):
            ours = ns["UNet"](cfg)
        extra = sum(p.numel() for n, p in ours.named_parameters() if ".cross_attn." in n)
        cfg = replace(cfg, context_dim=None)
    with torch.device("meta"):
        ours, ref = ns["UNet"](cfg), unet2d_like(cfg)
    n_ref = same_parameters(ours, ref, diffusers_name, "UNet2DModel")
    print(f"\n[{preset}] ours {n_ref + extra:,} = UNet2DModel {n_ref:,} + cross-attention {extra:,}")


def same_parameters(ours, ref, name_map, ref_name: str) -> int:
    """Our parameters, renamed by name_map, have the reference's names and shapes; returns the count."""
    mapped = {name_map(n): tuple(p.shape) for n, p in ours.named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    n_ours, n_ref = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in ref.parameters())
    assert n_ours == n_ref, f"{n_ours:,} parameters, {ref_name} has {n_ref:,}"
    assert mapped == theirs, f"the parameter names/shapes differ from {ref_name}'s"
    return n_ref


@pytest.mark.parametrize("layout", ["pixel-tiny", "3 levels, 2 blocks, classes", "attention everywhere"])
def test_unet_outputs_and_grads_match_unet2dmodel(ns, layout):
    cfg = _layouts(ns)[layout]
    torch.manual_seed(0)
    ours, ref = ns["UNet"](cfg), unet2d_like(cfg)
    with torch.no_grad():                                      # nothing at its default (GroupNorm 1/0, zero biases)
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.load_state_dict({diffusers_name(k): v for k, v in ours.state_dict().items()}, strict=True)
    B, S = 3, cfg.image_size
    x = _randn(B, cfg.in_channels, S, S, seed=3)
    t = torch.tensor([0, 421, 999])
    labels = torch.tensor([0, 3, 6]) if cfg.num_classes else None
    out_ours = ours(x, t, labels=labels)
    out_ref = ref(x, t, class_labels=labels).sample
    err = (out_ours - out_ref).abs().max().item()
    out_ours.pow(2).mean().backward()
    out_ref.pow(2).mean().backward()
    ref_params = dict(ref.named_parameters())       # (key biases have zero gradient: softmax ignores them)
    grad_err, bad = grad_errors(ours, lambda n: ref_params[diffusers_name(n)].grad, atol=1e-7)
    print(f"\n[{layout}] {sum(p.numel() for p in ours.parameters()):,} params: max |output error| {err:.1e} "
          f"(outputs up to {out_ref.abs().max():.2f}), max |grad error| {grad_err:.1e} over all parameters")
    assert err < 1e-5
    assert not bad, bad


def test_cross_attention_matches_diffusers_attention(ns):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    ours = ns["Attention"](32, head_dim=16, groups=4, eps=1e-5, context_dim=24)
    ref = Attention(32, cross_attention_dim=24, heads=2, dim_head=16, norm_num_groups=4, eps=1e-5, bias=True,
                    out_bias=True, residual_connection=True)
    perturb_(ours)
    ref.load_state_dict({k.replace("norm.", "group_norm.").replace("to_out.", "to_out.0."): v
                         for k, v in ours.state_dict().items()}, strict=True)
    x, ctx = _randn(2, 32, 8, 8, seed=1), _randn(2, 4, 24, seed=2)
    err = (ours(x, ctx) - ref(x, encoder_hidden_states=ctx)).abs().max().item()
    err_self = (ns["Attention"](32, 16, 4)(x) - x).abs().max().item()    # sanity: not the identity
    print(f"\ncross-attention vs diffusers Attention: max error {err:.1e}")
    assert err < 1e-5 and err_self > 1e-3


# ------------------------------------------------------------------------------------------------ SD's U-Net
def diffusers_cond_name(ours: str) -> str:
    """Our parameter name -> the same tensor's name in diffusers' UNet2DConditionModel (SD's attention blocks)."""
    k = re.sub(r"^(down|up)\.(\d+)\.attns\.", r"\1_blocks.\2.attentions.", ours)
    k = re.sub(r"^mid\.attns\.", "mid_block.attentions.", k)
    if ".attentions." not in k:
        return diffusers_name(ours)                                   # ResBlocks, resamplers, time MLP: as UNet2DModel
    return transformer2d_name(k)


def transformer2d_name(k: str) -> str:
    """Inside one SpatialTransformer: our names -> Transformer2DModel's."""
    k = re.sub(r"(^|\.)blocks\.", r"\1transformer_blocks.", k)
    return k.replace("ff.proj.", "ff.net.0.proj.").replace("ff.out.", "ff.net.2.").replace(".to_out.", ".to_out.0.")


def unet2dcond_like(cfg):
    """diffusers' UNet2DConditionModel with the layout a chapter UNetConfig (attention_block="transformer") describes."""
    assert cfg.attention_block == "transformer" and cfg.context_dim
    return diffusers.UNet2DConditionModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_level,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)),
        mid_block_type="UNetMidBlock2DCrossAttn", norm_num_groups=cfg.norm_groups, norm_eps=cfg.norm_eps,
        cross_attention_dim=cfg.context_dim, transformer_layers_per_block=cfg.transformer_layers,
        attention_head_dim=tuple(c // cfg.head_dim for c in cfg.channels),   # diffusers' name: heads per level
        use_linear_projection=False, flip_sin_to_cos=True, freq_shift=0, dropout=cfg.dropout)


def _sd_layouts(ns):
    P, C = ns["UNET_PRESETS"], ns["UNetConfig"]
    sd = dict(in_channels=4, out_channels=4, attention_block="transformer")
    return {
        "sd-tiny": P["sd-tiny"],
        "SD's pattern: 3 attention levels + 1 plain, 2 blocks": C(image_size=16, channels=(16, 32, 32, 48),
                                                                 attention=(True, True, True, False), layers_per_level=2,
                                                                 norm_groups=8, head_dim=8, context_dim=12, **sd),
        "2 transformer layers, attention at the bottom only": C(image_size=8, channels=(16, 32), attention=(False, True),
                                                               norm_groups=4, head_dim=16, context_dim=20,
                                                               transformer_layers=2, **sd),
    }


@pytest.mark.parametrize("preset", ["sd-tiny", "latent-full", "sd-256"])
def test_sd_parameter_count_matches_unet2dconditionmodel_exactly(ns, preset):
    cfg = ns["UNET_PRESETS"][preset]
    with torch.device("meta"):
        ours, ref = ns["UNet"](cfg), unet2dcond_like(cfg)
    n_ref = same_parameters(ours, ref, diffusers_cond_name, "UNet2DConditionModel")
    print(f"\n[{preset}] ours {n_ref:,} parameters = UNet2DConditionModel's")


def _compare_with_grads(ours, ref, run_ours, run_ref, inputs, name_map, label, atol_out=1e-5, atol_grad=1e-6):
    """Same weights, same inputs (fresh leaves for each model), one random upstream gradient: the max errors of
    the output, of each input's gradient and of every parameter's gradient."""
    perturb_(ours, 0.05, seed=0)
    ref.load_state_dict({name_map(k): v for k, v in ours.state_dict().items()}, strict=True)
    xs_ours = [x.clone().requires_grad_(True) for x in inputs]
    xs_ref = [x.clone().requires_grad_(True) for x in inputs]
    out_ours, out_ref = run_ours(*xs_ours), run_ref(*xs_ref)
    err = (out_ours - out_ref).abs().max().item()
    backward_same(out_ours, out_ref, generator=torch.Generator().manual_seed(1))
    input_errs = [(a.grad - b.grad).abs().max().item() for a, b in zip(xs_ours, xs_ref)]
    ref_params = dict(ref.named_parameters())
    grad_err, bad = grad_errors(ours, lambda n: ref_params[name_map(n)].grad, atol=atol_grad)
    print(f"\n[{label}] {sum(p.numel() for p in ours.parameters()):,} params: max |output error| {err:.1e} "
          f"(outputs up to {out_ref.abs().max():.2f}); max |input grad errors| "
          + ", ".join(f"{e:.1e}" for e in input_errs) + f"; max |param grad error| {grad_err:.1e}")
    assert err < atol_out                                           # fp32: rounding only
    assert all(e < atol_grad * 10 for e in input_errs), input_errs
    assert all(b.grad.abs().max() > 0 for b in xs_ref)              # the inputs do reach the output
    assert not bad, bad


@pytest.mark.parametrize("depth", [1, 2])
def test_spatial_transformer_matches_transformer2dmodel(ns, depth):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    C, head_dim, groups, ctx_dim = 32, 8, 4, 24
    torch.manual_seed(0)
    ours = ns["SpatialTransformer"](C, head_dim, groups, ctx_dim, depth)
    ref = Transformer2DModel(num_attention_heads=C // head_dim, attention_head_dim=head_dim, in_channels=C,
                             num_layers=depth, norm_num_groups=groups, cross_attention_dim=ctx_dim,
                             attention_bias=False, use_linear_projection=False)
    _compare_with_grads(ours, ref, lambda x, c: ours(x, c), lambda x, c: ref(x, encoder_hidden_states=c).sample,
                        [_randn(2, C, 4, 6, seed=1), _randn(2, 5, ctx_dim, seed=2)], transformer2d_name,
                        f"spatial transformer, depth {depth}")


@pytest.mark.parametrize("layout", ["sd-tiny", "SD's pattern: 3 attention levels + 1 plain, 2 blocks",
                                    "2 transformer layers, attention at the bottom only"])
def test_sd_unet_outputs_and_grads_match_unet2dconditionmodel(ns, layout):
    cfg = _sd_layouts(ns)[layout]
    torch.manual_seed(0)
    ours, ref = ns["UNet"](cfg), unet2dcond_like(cfg)
    B, S = 3, cfg.image_size
    t = torch.tensor([0, 421, 999])
    _compare_with_grads(ours, ref, lambda x, c: ours(x, t, context=c),
                        lambda x, c: ref(x, t, encoder_hidden_states=c).sample,
                        [_randn(B, cfg.in_channels, S, S, seed=3), _randn(B, 7, cfg.context_dim, seed=4)],
                        diffusers_cond_name, layout)


def test_sd_block_is_not_the_groupnorm_block(ns):
    """The two attention blocks are different networks: a mix-up of the config field would be caught."""
    C = ns["UNetConfig"]
    cfg = C(image_size=8, in_channels=4, out_channels=4, channels=(16, 32), attention=(False, True), context_dim=8)
    with torch.device("meta"):
        a, b = ns["UNet"](cfg), ns["UNet"](replace(cfg, attention_block="transformer"))
    assert any(".blocks.0.ff." in n for n, _ in b.named_parameters())
    assert not any(".ff." in n for n, _ in a.named_parameters())
    with pytest.raises(ValueError, match="attention_block"):
        C(attention_block="flash")


def test_scaled_linear_schedule_matches_diffusers(ns):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012)
    ours = ns["NoiseSchedule"].scaled_linear(1000)
    err = (ours.alphas_cumprod - ref.alphas_cumprod).abs().max().item()
    print(f"\nscaled_linear: max |Δᾱ| {err:.1e}")
    assert err < 1e-6 and (ours.betas - ref.betas).abs().max() < 1e-8


# ------------------------------------------------------------------------------------------------ SD full-size code
def _sd_data(n=48, ctx_len=6, ctx_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g).half()                      # as the cache stores them
    context = torch.randn(n, ctx_len, ctx_dim, generator=g).half()
    null = torch.randn(ctx_len, ctx_dim, generator=g).half()
    return latents, context, null


def test_sd_batches_drop_captions_to_the_null_context(ns):
    latents, context, null = _sd_data()
    sched = ns["NoiseSchedule"].scaled_linear(1000)
    for p, lo, hi in [(0.0, 0, 0), (1.0, 1, 1), (0.1, 0.05, 0.16)]:
        get = ns["sd_batches"](latents, context, null, 64, sched, p_uncond=p)
        g = torch.Generator().manual_seed(0)
        dropped = []
        for _ in range(20):
            z0, t, noise, ctx = get("train", g)
            assert z0.dtype == ctx.dtype == torch.float32 and z0.shape == (64, 4, 8, 8) and ctx.shape == (64, 6, 16)
            is_null = (ctx == null.float()).flatten(1).all(1)
            is_caption = (ctx[:, None] == context.float()[None]).flatten(2).all(2).any(1)
            assert (is_null | is_caption).all()                          # each row: a caption's context or ∅'s
            dropped.append(is_null.float().mean().item())
        frac = sum(dropped) / len(dropped)
        print(f"\np_uncond {p}: {frac:.3f} of the contexts are the null context")
        assert lo <= frac <= hi
    # train and val draw from disjoint items (the last n // 10 are validation)
    get = ns["sd_batches"](latents, context, null, 256, sched, p_uncond=0.0)
    z_val = get("val", torch.Generator().manual_seed(1))[0]
    val_rows = {tuple(r.flatten()[:4].tolist()) for r in z_val}
    assert val_rows <= {tuple(r.float().flatten()[:4].tolist()) for r in latents[-4:]}


def test_sd_trainer_two_steps_on_random_latents(ns):
    """The full-size training cell's code (sd_trainer: Trainer + CFG-dropout batches + EMA) for 2 steps, tiny config."""
    from labkit.train import TrainConfig

    C = ns["UNetConfig"]
    cfg = C(image_size=8, in_channels=4, out_channels=4, channels=(16, 32), attention=(True, False), norm_groups=4,
            head_dim=8, context_dim=16, attention_block="transformer", grad_checkpoint=True)
    latents, context, null = _sd_data()
    sched = ns["NoiseSchedule"].scaled_linear(1000)
    train = TrainConfig(max_steps=2, lr=1e-3, warmup_steps=0, eval_every=100, eval_batches=1, log_every=1,
                        progress=False, live_plot=False)
    trainer, ema = ns["sd_trainer"](cfg, latents, context, null, train, 8, sched, ema_decay=0.9, device="cpu")
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    ema_start = {n: p.detach().clone() for n, p in ema.model.named_parameters()}
    batch = trainer.get_batch("val", torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss_before = trainer.loss_fn(trainer.model, batch).item()
    history = trainer.fit()
    with torch.no_grad():
        loss_after = trainer.loss_fn(trainer.model, batch).item()
    moved = max((p.detach() - start[n]).abs().max().item() for n, p in trainer.model.named_parameters())
    ema_moved = max((p - ema_start[n]).abs().max().item() for n, p in ema.model.named_parameters())
    ema_gap = max((p - q.detach()).abs().max().item()
                  for p, q in zip(ema.model.parameters(), trainer.model.parameters()))
    print(f"\nsd_trainer: {trainer.step} steps, loss {loss_before:.4f} -> {loss_after:.4f}, weights moved {moved:.1e}, "
          f"EMA moved {ema_moved:.1e}, EMA - weights {ema_gap:.1e}, {ema.updates} EMA updates")
    assert trainer.step == 2 and ema.updates == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history if "loss" in h)
    assert torch.isfinite(torch.tensor(loss_after)) and loss_after != loss_before
    assert moved > 0 and ema_moved > 0 and ema_gap > 0                 # EMA follows, but lags
    assert isinstance(trainer.model, ns["TextConditionedUNet"])
    z = ns["sd_sample"](ema.model, sched, context[:2].float(), null, latent_shape=(4, 8, 8), guidance=7.5, steps=3)
    z2 = ns["sd_sample"](ema.model, sched, context[:2].float(), null, latent_shape=(4, 8, 8), guidance=7.5, steps=3)
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all() and torch.equal(z, z2)


def test_sd_vram_job_fits_and_names_its_configs():
    import labkit.vram

    ns = notebook.load(NB, ("model", "vram"))
    report = labkit.vram.estimate(ns["vram_job"]("sd-256"))
    print(f"\n{report}")
    assert report.fits and report.budget_bytes - report.peak_bytes > 2 * 2**30
    assert ns["vram_job"]().name.startswith("pixel U-Net")
    with pytest.raises(ValueError, match="sd-256"):
        ns["vram_job"]("sd-512")


# ------------------------------------------------------------------------------------------------ sampling loops
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_whole_sampling_loop_matches_diffusers(ns, sampler):
    """Our `sample` vs a diffusers loop (scheduler.set_timesteps + step) with the same U-Net weights."""
    cfg = ns["UNET_PRESETS"]["pixel-tiny"]
    torch.manual_seed(0)
    ours = ns["UNet"](cfg).eval()
    ref = unet2d_like(cfg).eval()
    ref.load_state_dict({diffusers_name(k): v for k, v in ours.state_dict().items()})
    sched = _ours(ns, "squaredcos_cap_v2")
    shape, steps = (2, 3, 16, 16), 10
    got = ns["sample"](ours, sched, shape, steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(5))
    scheduler = (_ddim if sampler == "ddim" else _ddpm)("squaredcos_cap_v2")
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = ref(x, t).sample
            x = (scheduler.step(eps, t, x).prev_sample if sampler == "ddim"
                 else scheduler.step(eps, t, x, generator=g).prev_sample)
    err = (got - x).abs().max().item()
    print(f"\n[{sampler}, {steps} steps] whole sampling loop: max error {err:.1e}")
    assert err < 1e-4


# ------------------------------------------------------------------------------------------------ internals
@pytest.mark.parametrize("block", ["groupnorm", "transformer"])
def test_gradient_checkpointing_changes_nothing(ns, block):
    if block == "groupnorm":
        cfg = ns["UNetConfig"](image_size=8, in_channels=4, out_channels=4, channels=(16, 32),
                               attention=(True, True), context_dim=8)
    else:                                                        # SD's spatial Transformer blocks
        cfg = replace(ns["UNET_PRESETS"]["sd-tiny"], context_dim=8)
    torch.manual_seed(0)
    plain = ns["UNet"](cfg).train()
    ckpt = ns["UNet"](replace(cfg, grad_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, ctx, t = _randn(2, 4, 8, 8), _randn(2, 3, 8, seed=1), torch.tensor([3, 700])
    outs = []
    for m in (plain, ckpt):
        y = m(x, t, context=ctx)
        y.pow(2).mean().backward()
        outs.append((y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    err_y = (outs[0][0] - outs[1][0]).abs().max().item()
    err_g = max((outs[0][1][n] - outs[1][1][n]).abs().max().item() for n in outs[0][1])
    print(f"\n{block} blocks, checkpointing: output error {err_y:.1e}, grad error {err_g:.1e}")
    assert err_y == 0.0 and err_g < 1e-6


def test_ema_follows_its_formula(ns):
    model = torch.nn.Linear(3, 2)
    ema = ns["EMA"](model, decay=0.9)
    start = ema.model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    expected = start.clone()
    for k in range(1, 21):
        ema.update(model)
        d = min(0.9, (1 + k) / (10 + k))
        expected = d * expected + (1 - d) * 1.0
    assert torch.allclose(ema.model.weight, expected, atol=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_is_saved_and_resumed_with_the_trainer(ns, tmp_path):
    """EMA.follow: updated after every step and carried by the Trainer's checkpoints, so a run interrupted at step
    4 and resumed ends with the same EMA weights (and update count) as one that ran straight through."""
    from labkit.train import Trainer, TrainConfig

    def get_batch(split, g):
        x = torch.randn(8, 3, generator=g)
        return x, x.sum(1, keepdim=True)

    def run(ckpt, steps=None, seed=0):
        torch.manual_seed(seed)
        cfg = TrainConfig(max_steps=10, lr=1e-2, warmup_steps=1, eval_every=100, progress=False, live_plot=False,
                          ckpt_path=ckpt)
        trainer = Trainer(torch.nn.Linear(3, 1), get_batch, config=cfg, device="cpu",
                          loss_fn=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        ema = ns["EMA"].follow(trainer, decay=0.9)
        trainer.fit(steps=steps)
        return ema

    straight = run(None)
    run(str(tmp_path / "run.pt"), steps=4)
    resumed = run(str(tmp_path / "run.pt"), seed=1)
    assert straight.updates == resumed.updates == 10
    assert all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()))


def test_diffusion_loss_is_l_simple_without_weighting(ns):
    sched = _ours(ns, "squaredcos_cap_v2")
    x0, noise, t = _randn(4, 3, 8, 8).clamp(-1, 1), _randn(4, 3, 8, 8, seed=1), torch.tensor([1, 10, 500, 990])
    model = lambda x_t, t_: torch.zeros_like(x_t)               # predicts no noise: loss = mean ε²
    plain = ns["diffusion_loss"](model, sched, x0, t, noise, min_snr_gamma=None)
    assert torch.allclose(plain, noise.pow(2).mean())
    weighted = ns["diffusion_loss"](model, sched, x0, t, noise, min_snr_gamma=5.0)
    w = (sched.snr(t).clamp(max=5.0) / sched.snr(t))
    assert torch.allclose(weighted, (noise.pow(2).mean((1, 2, 3)) * w).mean())
    assert w[0] < 0.1 and w[-1] == 1.0                          # low noise down-weighted, high noise untouched


def test_tokenizer_and_text_to_image_shapes(ns):
    ids = ns["tokenize"](["a large red circle", ""])
    assert ids.tolist()[1] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="prompts are"):
        ns["tokenize"](["a huge red circle"])
    model = ns["TextToImage"](ns["UNET_PRESETS"]["sd-tiny"])
    assert model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), ids).shape == (2, 4, 8, 8)


# ------------------------------------------------------------------------------------------------ full-size data
def test_hub_images_on_a_local_image_folder(ns, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    for i, size in enumerate([(40, 30), (30, 50), (64, 64)]):
        Image.new("RGB", size, (10 * i, 100, 200)).save(folder / f"{i}.png")
    images = ns["hub_images"]("imagefolder", image_size=16, data_dir=str(tmp_path / "images"))
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert images[:, 1].float().mean().item() == pytest.approx(100, abs=1)
    x = ns["to_model_range"](images)
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_hub_images_offline_says_what_to_do(ns, hub_offline):
    with pytest.raises(DataUnavailable, match="tiny size"):
        ns["hub_images"]("huggan/flowers-102-categories", image_size=64)


# ------------------------------------------------------------------------------------------------ exercises
WRONG_ANSWERS = {
    # v with the wrong sign convention (√(1−ᾱ) x₀ − √ᾱ ε): the inversion is consistent with it, diffusers' is not
    0: """
def v_target(x0, noise, alpha_bar):
    return (1 - alpha_bar).sqrt() * x0 - alpha_bar.sqrt() * noise


def v_to_x0_eps(v, x_t, alpha_bar):
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return a * x_t + s * v, s * x_t - a * v
""",
    # shifts and scales ᾱ instead of √ᾱ: ᾱ_{T−1} = 0 as well, but a different schedule everywhere else
    1: """
def zero_terminal_snr(betas):
    abar = torch.cumprod(1 - betas, dim=0)
    first, last = abar[0].item(), abar[-1].item()
    abar = (abar - last) * first / (first - last)
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])
""",
    # r upside down (h / h₀ instead of h₀ / h): exact on the first step, wrong from the second on
    2: """
def dpmpp_2m_step(x_t, x0, x0_prev, abar_prev, abar_t, abar_next):
    lam = lambda a: 0.5 * (torch.log(a) - torch.log1p(-a))
    h = lam(abar_next) - lam(abar_t)
    d = x0
    if x0_prev is not None:
        r = h / (lam(abar_t) - lam(abar_prev))
        d = x0 + (x0 - x0_prev) / (2 * r)
    return ((1 - abar_next) / (1 - abar_t)).sqrt() * x_t - abar_next.sqrt() * torch.expm1(-h) * d
""",
}


def test_wrong_answers_are_rejected():
    assert_wrong_answers_fail(NB, WRONG_ANSWERS)


# ------------------------------------------------------------------------------------------------ exploration
class _Oracle(torch.nn.Module):
    """A "model" that returns the true noise of the scrubber's x_t: its x̂₀ must be x₀ exactly."""

    def __init__(self, schedule, x0):
        super().__init__()
        self.schedule, self.x0, self.anchor = schedule, x0, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t):
        a = self.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()


def test_timestep_scrubber_shows_what_it_should():
    import matplotlib.pyplot as plt

    ns = notebook.load(NB, ("model", "explore"))
    sched = ns["NoiseSchedule"].cosine(1000)
    torch.manual_seed(0)
    view = ns["explore_denoising"](ns["UNet"](ns["UNET_PRESETS"]["pixel-tiny"]).eval(), sched)
    assert view.values == {"t": 500, "clip": True}
    early, late = dict(view.set(t=20)), dict(view.set(t=900))
    print(f"\nuntrained U-Net: MSE(x_t, x0) {early['x_t_mse']:.3f} → {late['x_t_mse']:.3f}, "
          f"MSE(x̂0, x0) {early['x0_hat_mse']:.3f} → {late['x0_hat_mse']:.3f} from t = 20 to 900")
    assert late["x_t_mse"] > 10 * early["x_t_mse"]                # more noise in x_t at larger t
    assert late["x0_hat_mse"] > 10 * early["x0_hat_mse"]          # an untrained ε̂ ruins x̂0 only at high noise
    assert view.set(clip=False)["x0_hat"].abs().max() > 1.5       # unclipped x̂0 leaves the data range
    assert isinstance(view.figure(), plt.Figure)
    plt.close("all")
    x0 = view.result["x0"]
    oracle = ns["explore_denoising"](_Oracle(sched, x0), sched)
    for t in (0, 500, 900):                                       # (at 999 √ᾱ is ~1e-3: float32 rounding shows)
        d = oracle.set(t=t, clip=False)
        assert torch.allclose(d["x0_hat"], x0, atol=1e-3), t        # the true ε gives back x0 at every t
        assert d["eps_mse"] < 1e-8
