"""Chapter 11 (DiT and PixArt-α) against an independent reference: diffusers.

The chapter's DiT (loaded from the notebook's `model` cells) gets its weights copied into
`diffusers.DiTTransformer2DModel` (norm "ada_norm_zero"; diffusers does not zero-initialise, so we perturb our
weights first and copy them all) and must give the same outputs and gradients; the chapter's PixArt-α the same
against `diffusers.PixArtTransformer2DModel(norm_type="ada_norm_single", use_additional_conditions=False)`.

Conventions of diffusers' DiT port that the name map handles (read from its source):
* patch embedding and position embedding live together in `pos_embed` (`PatchEmbed`: `proj` conv + sin-cos buffer);
* every block carries its own copy of the timestep MLP and the class table (`norm1.emb`), where the DiT repo
  shares one: we copy ours into every block, and our gradient is the sum over the copies;
* the final layer is `proj_out_1` (adaLN shift, scale) and `proj_out_2` (linear);
* with learn_sigma the output has 2·C channels, ε first;
* its timestep features use `downscale_freq_shift=1` (frequencies 10000^(−i/(half−1))), where the DiT repo
  (and this chapter) use 10000^(−i/half): we give the reference the DiT repo's features (a `Timesteps` module
  with shift 0) and show that this is the only difference.
Plus: the 2-D sin-cos embedding equals diffusers' `get_2d_sincos_pos_embed`, adaLN-Zero makes the blocks the
identity at init, gradient checkpointing changes nothing, the full-size data path (hub images → SD-VAE latents)
runs on local images with a tiny random `AutoencoderKL` and explains itself offline, and each exercise check
rejects a plausible wrong answer.

PixArt-α trained: the caption mask against diffusers' `encoder_attention_mask`; the batch with CFG dropout to the
empty caption; 2 steps of the full-size training code (`pixart_trainer`: Trainer, EMA) on random latents and
features, with and without checkpointing; the sampler's caption table against guided DDIM written out; the T5
encoder sizes against `transformers`; the full-size T5 feature cache (`t5_encode`, `cache_t5`,
`prepare_pixart_data`, built on chapter 10's `cache_to_disk`) on a tiny random `T5EncoderModel` with a word-level
stand-in tokenizer, and its resume; the T5 loader offline; the full-size PixArt-α step fits 12 GiB.
"""
import re

import pytest
import torch

from labkit import notebook
from labkit.data import DataUnavailable

from .conftest import ROOT
from .grads import grad_errors, perturb_
from .test_exercises import assert_wrong_answers_fail

NB = ROOT / "notebooks" / "11_dit.ipynb"
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def ns():
    return notebook.load(NB, ("model", "data"))


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ DiT
def dit_names(ours: str, depth: int) -> list[str]:
    """Our parameter name -> its name(s) in diffusers' DiTTransformer2DModel (shared embedders: one per block)."""
    k = ours.replace("x_embedder.proj.", "pos_embed.proj.")
    k = re.sub(r"^blocks\.(\d+)\.adaLN_modulation\.1\.", r"transformer_blocks.\1.norm1.linear.", k)
    k = re.sub(r"^blocks\.(\d+)\.attn\.to_out\.", r"transformer_blocks.\1.attn1.to_out.0.", k)
    k = re.sub(r"^blocks\.(\d+)\.attn\.", r"transformer_blocks.\1.attn1.", k)
    k = re.sub(r"^blocks\.(\d+)\.mlp\.fc1\.", r"transformer_blocks.\1.ff.net.0.proj.", k)
    k = re.sub(r"^blocks\.(\d+)\.mlp\.fc2\.", r"transformer_blocks.\1.ff.net.2.", k)
    k = k.replace("final_layer.adaLN_modulation.1.", "proj_out_1.").replace("final_layer.linear.", "proj_out_2.")
    if k.startswith(("t_embedder.", "y_embedder.")):
        k = (k.replace("t_embedder.mlp.0.", "norm1.emb.timestep_embedder.linear_1.")
              .replace("t_embedder.mlp.2.", "norm1.emb.timestep_embedder.linear_2.")
              .replace("y_embedder.", "norm1.emb.class_embedder."))
        return [f"transformer_blocks.{i}.{k}" for i in range(depth)]
    return [k]


def dit_reference(cfg, dit_time_features=True):
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth, sample_size=cfg.input_size,
        patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes, norm_eps=1e-6,
        activation_fn="gelu-approximate")
    if dit_time_features:
        from diffusers.models.embeddings import Timesteps

        for block in ref.transformer_blocks:
            block.norm1.emb.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    return ref.eval()             # eval: its LabelEmbedding would drop labels at random in train mode


def load_dit_into_reference(ours, ref):
    state = {}
    for k, v in ours.state_dict().items():
        for name in dit_names(k, ours.cfg.depth):
            state[name] = v.clone()
    ref.load_state_dict(state, strict=True)


def _dit_layouts(ns):
    C = ns["DiTConfig"]
    return {
        "tiny": ns["DIT_PRESETS"]["tiny"],
        "pixels, p=4": C(input_size=16, patch_size=4, in_channels=3, hidden_size=48, depth=2, num_heads=3, num_classes=5),
        "latents, p=2, learn_sigma": C(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
                                       num_classes=10, learn_sigma=True),
        "p=1, 1 head": C(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=1, num_classes=3),
    }


@pytest.mark.parametrize("layout", ["tiny", "pixels, p=4", "latents, p=2, learn_sigma", "p=1, 1 head"])
def test_dit_outputs_and_grads_match_diffusers(ns, layout):
    cfg = _dit_layouts(ns)[layout]
    torch.manual_seed(0)
    ours = ns["DiT"](cfg)
    perturb_(ours, 0.05, seed=0)
    ref = dit_reference(cfg)
    load_dit_into_reference(ours, ref)
    B, S = 3, cfg.input_size
    x, t, y = _randn(B, cfg.in_channels, S, S, seed=1), torch.tensor([0, 421, 999]), torch.tensor([0, cfg.num_classes, 1])
    out_ours, out_ref = ours(x, t, y), ref(x, t, y).sample
    err = (out_ours - out_ref).abs().max().item()
    assert out_ours.shape == (B, cfg.out_channels, S, S)
    (out_ours * _randn(*out_ours.shape, seed=2)).sum().backward()
    (out_ref * _randn(*out_ref.shape, seed=2)).sum().backward()
    refp = dict(ref.named_parameters())
    # shared embedders: their gradient is the sum over the reference's per-block copies
    grad_err, bad = grad_errors(ours, lambda n: sum(refp[m].grad for m in dit_names(n, cfg.depth)), atol=1e-6)
    print(f"\n[DiT {layout}] {sum(p.numel() for p in ours.parameters()):,} params: max |output error| {err:.1e} "
          f"(outputs up to {out_ref.abs().max():.2f}), max |grad error| {grad_err:.1e}")
    assert err < 1e-5
    assert not bad, bad


def test_dit_timestep_features_are_the_only_difference_from_diffusers(ns):
    """Unmodified, diffusers' DiT uses frequencies 10000^(−i/(half−1)): outputs differ, by a little."""
    cfg = _dit_layouts(ns)["latents, p=2, learn_sigma"]
    torch.manual_seed(0)
    ours = ns["DiT"](cfg)
    perturb_(ours, 0.05, seed=0)
    ref = dit_reference(cfg, dit_time_features=False)
    load_dit_into_reference(ours, ref)
    x, t, y = _randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([2, 5])
    err = (ours(x, t, y) - ref(x, t, y).sample).abs().max().item()
    print(f"\ndiffusers' own DiT timestep features (downscale_freq_shift=1): max output difference {err:.1e}")
    assert 1e-4 < err < 1.0


@pytest.mark.parametrize("preset", ["DiT-S/2", "DiT-B/2", "DiT-XL/2"])
def test_presets_have_the_paper_sizes_and_match_diffusers_count(ns, preset):
    cfg = ns["DIT_PRESETS"][preset]
    with torch.device("meta"):
        ours, ref = ns["DiT"](cfg), dit_reference(cfg)
    n_ours = sum(p.numel() for p in ours.parameters())
    shared = sum(p.numel() for n, p in ours.named_parameters() if n.startswith(("t_embedder.", "y_embedder.")))
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"\n[{preset}] ours {n_ours / 1e6:.1f}M; diffusers {n_ref / 1e6:.1f}M with the embedders copied into every block")
    assert n_ref == n_ours + (cfg.depth - 1) * shared
    paper = {"DiT-S/2": 33e6, "DiT-B/2": 130e6, "DiT-XL/2": 675e6}[preset]      # Peebles & Xie, Table 1
    assert abs(n_ours - paper) / paper < 0.02


def test_sincos_pos_embed_matches_diffusers(ns):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for dim, grid in [(16, 4), (64, 8), (768, 16)]:
        ref = get_2d_sincos_pos_embed(dim, grid, base_size=grid, output_type="pt").float()
        err = (ns["sincos_pos_embed_2d"](dim, grid) - ref).abs().max().item()
        print(f"\n[dim {dim}, {grid}×{grid}] 2-D sin-cos position embedding: max error {err:.1e}")
        assert err < 1e-6


def test_adaln_zero_blocks_start_as_identity_and_output_starts_at_zero(ns):
    cfg = ns["DIT_PRESETS"]["tiny"]
    torch.manual_seed(0)
    model = ns["DiT"](cfg)
    h, c = torch.randn(2, cfg.num_patches, cfg.hidden_size), torch.randn(2, cfg.hidden_size)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)
    S, C = cfg.input_size, cfg.in_channels
    out = model(torch.randn(2, C, S, S), torch.tensor([1, 500]), torch.tensor([0, cfg.num_classes]))
    assert torch.equal(out, torch.zeros_like(out))
    # ...and yet every weight that matters gets a gradient after one step's worth of signal
    sched = ns["NoiseSchedule"].cosine(1000)
    loss = ns["diffusion_loss"](model, sched, torch.randn(4, C, S, S), torch.tensor([1, 10, 100, 900]),
                                torch.randn(4, C, S, S), torch.tensor([0, 1, 2, cfg.num_classes]))
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_changes_nothing(ns):
    from dataclasses import replace

    cfg = _dit_layouts(ns)["latents, p=2, learn_sigma"]
    torch.manual_seed(0)
    plain = ns["DiT"](cfg).train()
    perturb_(plain, 0.05, seed=0)
    ckpt = ns["DiT"](replace(cfg, grad_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = _randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    outs = []
    for m in (plain, ckpt):
        out = m(x, t, y)
        out.pow(2).mean().backward()
        outs.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    err_g = max((outs[0][1][n] - outs[1][1][n]).abs().max().item() for n in outs[0][1])
    assert torch.equal(outs[0][0], outs[1][0]) and err_g < 1e-6


def test_drop_labels(ns):
    labels = torch.arange(10).repeat(1000)
    dropped = ns["drop_labels"](labels, 10, 0.1, torch.Generator().manual_seed(0))
    frac = (dropped == 10).float().mean().item()
    assert 0.08 < frac < 0.12
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])


# ------------------------------------------------------------------------------------------------ PixArt-α
def pixart_name(ours: str) -> str:
    k = ours.replace("x_embedder.proj.", "pos_embed.proj.")
    k = k.replace("t_embedder.mlp.0.", "adaln_single.emb.timestep_embedder.linear_1.")
    k = k.replace("t_embedder.mlp.2.", "adaln_single.emb.timestep_embedder.linear_2.")
    k = k.replace("t_block.1.", "adaln_single.linear.")
    k = k.replace("y_embedder.0.", "caption_projection.linear_1.").replace("y_embedder.2.", "caption_projection.linear_2.")
    k = re.sub(r"^blocks\.(\d+)\.attn\.to_out\.", r"transformer_blocks.\1.attn1.to_out.0.", k)
    k = re.sub(r"^blocks\.(\d+)\.attn\.", r"transformer_blocks.\1.attn1.", k)
    k = re.sub(r"^blocks\.(\d+)\.cross_attn\.to_out\.", r"transformer_blocks.\1.attn2.to_out.0.", k)
    k = re.sub(r"^blocks\.(\d+)\.cross_attn\.", r"transformer_blocks.\1.attn2.", k)
    k = re.sub(r"^blocks\.(\d+)\.mlp\.fc1\.", r"transformer_blocks.\1.ff.net.0.proj.", k)
    k = re.sub(r"^blocks\.(\d+)\.mlp\.fc2\.", r"transformer_blocks.\1.ff.net.2.", k)
    k = re.sub(r"^blocks\.(\d+)\.scale_shift_table$", r"transformer_blocks.\1.scale_shift_table", k)
    k = k.replace("final_scale_shift_table", "scale_shift_table").replace("final_linear.", "proj_out.")
    return k


def pixart_reference(cfg):
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        cross_attention_dim=cfg.hidden_size, sample_size=cfg.input_size, patch_size=cfg.patch_size,
        caption_channels=cfg.context_dim, norm_type="ada_norm_single", use_additional_conditions=False,
        interpolation_scale=1, activation_fn="gelu-approximate").eval()


@pytest.mark.parametrize("padded", [False, True], ids=["full captions", "padded captions"])
@pytest.mark.parametrize("layout", ["pixels p=4", "latents p=2 learn_sigma"])
def test_pixart_outputs_and_grads_match_diffusers(ns, layout, padded):
    """Padded: captions of 3, 7 and 1 real tokens of 7, our mask against diffusers' encoder_attention_mask."""
    C = ns["DiTConfig"]
    cfg = {"pixels p=4": C(input_size=16, patch_size=4, in_channels=3, hidden_size=48, depth=2, num_heads=2, context_dim=32),
           "latents p=2 learn_sigma": C(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
                                        learn_sigma=True, context_dim=24)}[layout]
    torch.manual_seed(0)
    ours = ns["PixArtAlpha"](cfg)
    perturb_(ours, 0.05, seed=0)
    ref = pixart_reference(cfg)
    ref.load_state_dict({pixart_name(k): v.clone() for k, v in ours.state_dict().items()}, strict=True)
    B, S, M = 3, cfg.input_size, 7
    x, t, ctx = _randn(B, cfg.in_channels, S, S, seed=1), torch.tensor([0, 421, 999]), _randn(B, M, cfg.context_dim, seed=3)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7, [1, 0, 0, 0, 0, 0, 0]]).bool() if padded else None
    out_ours = ours(x, t, ctx, mask)
    out_ref = ref(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=None if mask is None else mask.long(),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    err = (out_ours - out_ref).abs().max().item()
    (out_ours * _randn(*out_ours.shape, seed=2)).sum().backward()
    (out_ref * _randn(*out_ref.shape, seed=2)).sum().backward()
    refp = dict(ref.named_parameters())
    grad_err, bad = grad_errors(ours, lambda n: refp[pixart_name(n)].grad, atol=1e-6)
    print(f"\n[PixArt-α {layout}, {'padded' if padded else 'full'} captions] {sum(p.numel() for p in ours.parameters()):,} "
          f"params: max |output error| {err:.1e} (outputs up to {out_ref.abs().max():.2f}), max |grad error| {grad_err:.1e}")
    assert err < 1e-5
    assert not bad, bad
    if padded:
        with torch.no_grad():
            moved = (ours(x, t, ctx) - out_ours).abs().max().item()
            noisy_padding = torch.where(mask[..., None], ctx, 100 * _randn(B, M, cfg.context_dim, seed=4))
            padding_err = (ours(x, t, noisy_padding, mask) - out_ours).abs().max().item()
        print(f"the mask moves the output by {moved:.2f}; noise in the padding by {padding_err:.1e}")
        assert moved > 1e-3 and padding_err < 1e-5                      # the padding is not read, whatever it holds


def test_adaln_single_saves_the_per_block_mlps(ns):
    dit_cfg = ns["DIT_PRESETS"]["DiT-XL/2"]
    with torch.device("meta"):
        dit = ns["DiT"](dit_cfg)
        pix = ns["PixArtAlpha"](ns["PIXART_PRESETS"]["PixArt-α-XL/2"])
    per_block = sum(p.numel() for b in dit.blocks for p in b.adaLN_modulation.parameters())
    print(f"\nDiT-XL/2 adaLN MLPs: {per_block / 1e6:.0f}M of {ns['count_params'](dit) / 1e6:.0f}M parameters")
    assert 0.25 < per_block / ns["count_params"](dit) < 0.40
    assert sum(p.numel() for p in pix.t_block.parameters()) == per_block // dit_cfg.depth



# ------------------------------------------------------------------------------------------------ PixArt-α trained
def _tiny_pixart_cfg(ns, **kw):
    return ns["DiTConfig"](input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                           context_dim=16, **kw)


def test_pixart_batch_drops_captions_to_the_null_caption(ns):
    N, M, d, B = 40, 5, 16, 4000
    latents, contexts = _randn(N, 4, 8, 8, seed=0), _randn(N, M, d, seed=1)
    masks = torch.arange(M)[None] < torch.randint(1, M + 1, (N, 1), generator=torch.Generator().manual_seed(2))
    null_ctx, null_mask = _randn(M, d, seed=3), torch.tensor([True] + [False] * (M - 1))
    z0, t, noise, ctx, mask = ns["pixart_batch"](latents, contexts, masks, null_ctx, null_mask, B, 0.1, 1000,
                                                 torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)                               # the same draws, in the documented order
    idx = torch.randint(N, (B,), generator=g)
    drop = torch.rand(B, generator=g) < 0.1
    assert z0.shape == (B, 4, 8, 8) and ctx.shape == (B, M, d) and mask.shape == (B, M) and mask.dtype == torch.bool
    assert 0.08 < drop.float().mean() < 0.12 and torch.equal(z0, latents[idx]) and t.max() < 1000
    assert torch.equal(ctx[drop], null_ctx.expand(int(drop.sum()), M, d)) and torch.equal(mask[drop][:, 1:].any(1),
                                                                                        torch.zeros(int(drop.sum()), dtype=torch.bool))
    assert torch.equal(ctx[~drop], contexts[idx[~drop]]) and torch.equal(mask[~drop], masks[idx[~drop]])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_pixart_trainer_two_steps_on_random_latents_and_features(ns, checkpointing):
    """The full-size training code (pixart_trainer: Trainer + CFG dropout + EMA) for 2 steps on a tiny config."""
    from labkit.train import TrainConfig

    cfg = _tiny_pixart_cfg(ns, grad_checkpoint=checkpointing)
    N, M = 24, 6
    masks = torch.arange(M)[None] < torch.randint(1, M + 1, (N, 1), generator=torch.Generator().manual_seed(2))
    data = {"latents": _randn(N, 4, 8, 8, seed=0).half(), "context": _randn(N, M, 16, seed=1).to(torch.bfloat16),
            "mask": masks}
    null = {"context": _randn(M, 16, seed=3).to(torch.bfloat16), "mask": torch.tensor([True] + [False] * (M - 1))}
    torch.manual_seed(0)
    model = ns["PixArtAlpha"](cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(max_steps=2, lr=1e-3, warmup_steps=0, weight_decay=0.0, eval_every=2, eval_batches=1,
                         log_every=1, progress=False, live_plot=False)
    trainer, ema = ns["pixart_trainer"](model, data, null, ns["NoiseSchedule"].cosine(1000), config, batch_size=8,
                                        ema_decay=0.9, device="cpu")
    history = trainer.fit()
    losses = [r["train_loss_step"] for r in history if "train_loss_step" in r]
    print(f"\n[pixart_trainer, checkpointing {checkpointing}] losses {losses}, val {history[-1]['val_loss']:.4f}")
    assert trainer.step == 2 and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    still = sorted(k for k, v in model.state_dict().items() if torch.equal(v, before[k]))
    # PixArt-α's zero init, step by step: step 1 moves only what the zero final linear lets a gradient reach (itself
    # and the self-attention path); step 2 also the cross-attentions' zero output projections; what reads the caption
    # before them (q, k, v of the cross-attentions, the caption MLP) first gets a gradient at step 3
    reads_caption = sorted([f"blocks.{i}.cross_attn.to_{p}.{w}" for i in range(2) for p in "qkv" for w in ("weight", "bias")]
                           + [f"y_embedder.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")])
    assert still == reads_caption, still
    assert ema.updates == 2
    ema_w, w0, w = ema.model.blocks[0].attn.to_q.weight, before["blocks.0.attn.to_q.weight"], model.blocks[0].attn.to_q.weight
    assert not torch.equal(ema_w, w0) and not torch.equal(ema_w, w)  # the average: neither the start nor the end


def test_caption_table_and_pixart_sample(ns):
    cfg = _tiny_pixart_cfg(ns)
    torch.manual_seed(0)
    model = ns["PixArtAlpha"](cfg).eval()
    perturb_(model, 0.05, seed=0)
    ctx, mask = _randn(3, 5, 16, seed=1), torch.tensor([[1, 1, 0, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]).bool()
    null_ctx, null_mask = _randn(5, 16, seed=2), torch.tensor([1, 0, 0, 0, 0]).bool()
    table = ns["CaptionTable"](model, torch.cat([ctx, null_ctx[None]]), torch.cat([mask, null_mask[None]]))
    x, t = _randn(4, 4, 8, 8, seed=3), torch.tensor([5, 50, 500, 900])
    with torch.no_grad():
        rows = torch.tensor([2, 0, 3, 1])
        assert torch.allclose(table(x, t, rows), model(x, t, torch.cat([ctx, null_ctx[None]])[rows],
                                                       torch.cat([mask, null_mask[None]])[rows]), atol=1e-6)
    sched = ns["NoiseSchedule"].cosine(1000)
    z = ns["pixart_sample"](model, sched, (3, 4, 8, 8), ctx, mask, null_ctx, null_mask, guidance=3.0, steps=4, seed=0)
    # the same as chapter 10's sampler with guidance written out: ε_u + w (ε_c − ε_u) per step
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(3, 4, 8, 8, generator=g)
    ts = ns["ch10"].timesteps_for(sched, 4)
    with torch.no_grad():
        for i, step in enumerate(ts):
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            tb = torch.full((3,), step)
            e_c, e_u = model(xs, tb, ctx, mask), model(xs, tb, null_ctx.expand(3, 5, 16), null_mask.expand(3, 5))
            noise = torch.randn(3, 4, 8, 8, generator=g)
            xs = ns["ch10"].ddim_step(sched, e_u + 3.0 * (e_c - e_u), step, prev, xs, 0.0, noise, False)
    err = (z - xs).abs().max().item()
    print(f"\npixart_sample vs the guided DDIM loop written out: max error {err:.1e}")
    assert z.shape == (3, 4, 8, 8) and err < 1e-4


# ------------------------------------------------------------------------------------------------ full-size T5 features
def _tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()


class WordTokenizer:
    """A stand-in for T5's SentencePiece tokenizer (which needs a file we cannot download): one id per word, then
    EOS (1), pad 0; called like a transformers tokenizer."""

    def __init__(self):
        self.calls = 0

    def __call__(self, texts, max_length=None, padding=False, truncation=False, return_tensors=None):
        self.calls += 1
        rows = [[2 + sum(map(ord, w)) % 48 for w in text.split()] + [1] for text in texts]
        if truncation and max_length:
            rows = [r[:max_length] for r in rows]
        if padding == "max_length":
            rows = [r + [0] * (max_length - len(r)) for r in rows]
        masks = [[1 if i < len(r) - r.count(0) else 0 for i in range(len(r))] for r in rows]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}
        return {"input_ids": rows, "attention_mask": masks}


def test_t5_encoder_parameter_formula_matches_transformers(ns):
    from transformers import T5EncoderModel

    for name, shape in ns["T5_SHAPES"].items():
        with torch.device("meta"):
            n_ref = sum(p.numel() for p in T5EncoderModel(ns["t5_config"](name)).parameters())
        n = ns["t5_encoder_params"](**shape)
        print(f"\n[{name}] encoder: formula {n:,}, transformers {n_ref:,}")
        assert n == n_ref


def test_t5_encode_with_a_tiny_random_t5(ns):
    t5, tok = _tiny_t5(), WordTokenizer()
    captions = ["a red rose", "", "three yellow tulips in a tall glass vase on a table"]
    hidden, mask = ns["t5_encode"](tok, t5, captions, max_length=8)
    assert hidden.shape == (3, 8, 16) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4, 1, 8]                           # words + EOS; "" is EOS alone; cut at 8
    tokens = tok(captions, max_length=8, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = t5(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    err = (hidden - ref).abs().max().item()
    print(f"\nt5_encode vs T5EncoderModel called directly: max error {err:.1e}")
    assert err == 0


def test_cache_t5_and_prepare_pixart_data_on_a_tiny_t5(ns, tmp_path):
    t5, tok = _tiny_t5(), WordTokenizer()
    captions = [f"a {c} {k}" for c in ("red", "green", "blue", "pink", "white") for k in ("rose", "tulip in a vase")]
    loads = []

    def load_encoder():
        loads.append(1)
        return tok, t5

    latents = _randn(len(captions), 4, 8, 8, seed=0).half()
    pix = ns["prepare_pixart_data"](tmp_path, latents, captions, ["a red rose", "a white tulip"], load_encoder, tok,
                                    name="t5-tiny", model_name="tiny-random-t5")
    L = max(len(c.split()) + 1 for c in captions)
    assert pix["max_length"] == L and len(loads) == 1                   # T5 loaded once, for both caches
    data = pix["data"]
    assert data["context"].shape == (10, L, 16) and data["context"].dtype == torch.bfloat16 and data["latents"] is latents
    hidden, mask = ns["t5_encode"](tok, t5, captions, max_length=L)
    err = (data["context"].float() - hidden.to(torch.bfloat16).float()).abs().max().item()
    print(f"\ncached T5 features vs encoding directly: max error {err:.1e} (bf16 storage)")
    assert err == 0 and torch.equal(data["mask"], mask)
    null, _ = ns["t5_encode"](tok, t5, [""], max_length=L)
    assert torch.equal(pix["null"]["context"], null[0].to(torch.bfloat16)) and pix["null"]["mask"].sum() == 1
    assert pix["prompts"]["context"].shape == (2, L, 16)
    again = ns["prepare_pixart_data"](tmp_path, latents, captions, ["a red rose", "a white tulip"], load_encoder, tok,
                                      name="t5-tiny", model_name="tiny-random-t5")
    assert len(loads) == 1 and torch.equal(again["data"]["context"], data["context"])   # loaded, T5 never run again
    with pytest.raises(ValueError, match="max_length"):                # another padding: refused, not mixed
        ns["cache_t5"](tmp_path, "t5-tiny-captions", captions, load_encoder, max_length=L + 2,
                       model_name="tiny-random-t5")


def test_t5_loader_offline_says_what_to_do(ns, hub_offline):
    with pytest.raises(DataUnavailable, match="tiny size"):
        ns["load_t5"]("google/t5-v1_1-xl")


def test_pixart_full_size_step_fits_12_gib_with_checkpointing(ns):
    import labkit.vram

    vram = notebook.load(NB, ("model", "vram"))
    report = labkit.vram.estimate(vram["vram_job"]("PixArt-α-B/2"))
    # not extrapolated from 1 and 2 blocks (chapter 04's estimate_by_depth), as the chapter says: it misses here
    by_depth = notebook.load(NB, ("model", "vram"))
    ch04 = notebook.as_module("04_lora")
    exec("def pixart_job(depth):\n"
         "    cfg = replace(PIXART_PRESETS['PixArt-α-B/2'], depth=depth)\n"
         "    return replace(vram_job('PixArt-α-B/2'), make_model=lambda: PixArtAlpha(cfg))", by_depth)
    extrapolated = ch04.estimate_by_depth(by_depth["pixart_job"], 12)
    print(f"\n{report}\nfrom 1 and 2 blocks: {(extrapolated.peak_bytes - report.peak_bytes) / 2**30:+.2f} GiB")
    assert report.fits and report.peak_bytes < 10 * 2**30
    assert report.peak_bytes - extrapolated.peak_bytes > 0.5 * 2**30
    cfg = ns["PIXART_PRESETS"]["PixArt-α-B/2"]
    assert cfg.grad_checkpoint and cfg.context_dim == ns["t5_config"](ns["T5_NAME"]).d_model == 2048
    with pytest.raises(ValueError, match="PixArt-α-B/2"):
        vram["vram_job"]("PixArt-α-XL/2")


# ------------------------------------------------------------------------------------------------ full-size data
def _image_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "flowers"
    for label, colour in [("rose", (200, 30, 40)), ("tulip", (240, 220, 30))]:
        folder = root / "train" / label
        folder.mkdir(parents=True)
        for i, size in enumerate([(60, 40), (40, 70), (64, 64)]):
            Image.new("RGB", size, colour).save(folder / f"{i}.png")
    return root


def test_hub_labelled_images_on_a_local_image_folder(ns, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    images, labels = ns["hub_labelled_images"]("imagefolder", image_size=16, data_dir=str(_image_folder(tmp_path)))
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    red = images[labels == 0]
    assert red[:, 0].float().mean().item() == pytest.approx(200, abs=2)


def test_encode_latents_with_a_tiny_autoencoder(ns, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    images, labels = ns["hub_labelled_images"]("imagefolder", image_size=16, data_dir=str(_image_folder(tmp_path)))
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=4, layers_per_block=1).eval()
    mean, std = ns["encode_latents"](vae, images, batch_size=4)
    assert mean.shape == (12, 4, 8, 8) and std.shape == mean.shape          # every image and its mirror
    with torch.no_grad():
        expected = vae.encode(ns["to_model_range"](images[:2])).latent_dist
        mirrored = vae.encode(ns["to_model_range"](images[:2]).flip(-1)).latent_dist
    assert torch.allclose(mean[:2].float(), expected.mean, atol=1e-2)
    assert torch.allclose(mean[6:8].float(), mirrored.mean, atol=1e-2)
    assert torch.allclose(std[:2].float(), expected.std, atol=1e-2)
    z = ns["sample_latents"](mean, std, torch.tensor([0, 7]), torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32


def test_full_size_loaders_offline_say_what_to_do(ns, hub_offline):
    with pytest.raises(DataUnavailable, match="tiny size"):
        ns["hub_labelled_images"]("nelorth/oxford-flowers", image_size=256)
    with pytest.raises(DataUnavailable, match="tiny size"):
        ns["load_sd_vae"]()


# ------------------------------------------------------------------------------------------------ exercises
WRONG_ANSWERS = {
    # U-Net-style conditioning: c = e_t + e_y added to every image token, no extra tokens. Shape, parameter count and
    # "the condition changes the output" all pass; with attention off the condition still reaches the output
    0: """
class InContextBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class InContextDiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, D = cfg, cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, cfg.input_size // cfg.patch_size)[None])
        self.t_embedder, self.y_embedder = TimestepEmbedder(D), LabelEmbedder(cfg.num_classes, D)
        self.blocks = nn.ModuleList(InContextBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_final = nn.LayerNorm(D, eps=1e-6)
        self.linear = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x, t, y):
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        c = self.t_embedder(t) + self.y_embedder(y)
        h = self.x_embedder(x) + self.pos_embed + c[:, None]
        for block in self.blocks:
            h = block(h)
        return unpatchify(self.linear(self.norm_final(h)), self.cfg.patch_size, self.cfg.out_channels)
""",
    # interpolates the variances instead of their logarithms: v outside [-1, 1] makes the mixture negative (NaN)
    1: """
def learned_log_variance(v, t, alphas_cumprod):
    a_t, a_prev = alphas_cumprod[t], alphas_cumprod[t - 1]
    beta = 1 - a_t / a_prev
    beta_tilde = (1 - a_prev) / (1 - a_t) * beta
    frac = (v + 1) / 2
    return (frac * beta + (1 - frac) * beta_tilde).log()


def learned_sigma_step(schedule, model_output, t, x_t, noise):
    eps, v = model_output.chunk(2, dim=1)
    mean = ch10.ddpm_step(schedule, eps, t, t - 1, x_t, torch.zeros_like(x_t))
    return mean + (0.5 * learned_log_variance(v, t, schedule.alphas_cumprod)).exp() * noise
""",
    # counts one attention product per block (QKᵀ) and forgets A·V
    2: """
def dit_forward_flops(cfg):
    D, N, p = cfg.hidden_size, cfg.num_patches, cfg.patch_size
    M = int(cfg.mlp_ratio * D)
    block = 2 * D * 6 * D + 4 * 2 * N * D * D + 2 * N * N * D + 2 * 2 * N * D * M
    return int(2 * N * p * p * cfg.in_channels * D + 2 * 256 * D + 2 * D * D + cfg.depth * block
               + 2 * D * 2 * D + 2 * N * D * p * p * cfg.out_channels)
""",
}


def test_wrong_answers_are_rejected():
    assert_wrong_answers_fail(NB, WRONG_ANSWERS)



def test_patch_size_explorer_shows_what_it_should():
    import matplotlib.pyplot as plt

    ns = notebook.load(NB, ("model", "explore"))
    view = ns["explore_patch_size"]()
    assert view.values == {"patch_size": 2, "preset": "DiT-B/2", "latent_size": 32}
    assert view.result["tokens"] == 256
    fine, coarse = dict(view.set(patch_size=1)), dict(view.set(patch_size=4))
    print(f"\nDiT-B on 32² latents: p = 1: {fine['tokens']} tokens, attention {fine['attention_share']:.0%} of "
          f"{(fine['attention_flops'] + fine['other_flops']) / 1e9:.0f} GFLOP; p = 4: {coarse['tokens']} tokens, "
          f"attention {coarse['attention_share']:.0%} of {(coarse['attention_flops'] + coarse['other_flops']) / 1e9:.0f} GFLOP")
    assert fine["tokens"] == 16 * coarse["tokens"] == 1024
    assert fine["attention_share"] > coarse["attention_share"]                   # N² outgrows N
    assert fine["attention_flops"] > 200 * coarse["attention_flops"]             # 16² = 256× (the softmax aside)
    assert 10 < fine["other_flops"] / coarse["other_flops"] < 17                 # ~16× (N), less the per-image parts
    assert fine["attention_matrix_bytes"] == 256 * coarse["attention_matrix_bytes"]
    small = view.set(patch_size=2, latent_size=8)                                # fewer tokens at a smaller latent
    assert small["tokens"] == 16 and small["attention_flops"] < fine["attention_flops"]
    assert isinstance(view.figure(), plt.Figure)
    plt.close("all")
