"""Chapter 10's full-size text-to-image data, run on the CPU with no download.

The `data` cells load a captioned image data set through `datasets`, encode it once with a frozen VAE and a frozen
CLIP text encoder and cache the results to disk (`cache_to_disk` / `load_cache`, resumable). Here they run on a
small local image folder (`imagefolder` + metadata.jsonl) with a tiny randomly initialised `AutoencoderKL` and
`CLIPTextModel` built from their configs and a tiny `CLIPTokenizer` built from a vocabulary in memory. Checked:
the loader's shapes, range, centre crop and captions; cached = encoded directly; an interrupted cache resumes
without recomputing finished shards and ends bit for bit like an uninterrupted one; another meta is refused by
name; a missing or incomplete cache says what to run; offline, every hub loader raises DataUnavailable with the
advice; and `prepare_sd_data`, the full-size cell's code path, end to end (a second run only loads).
"""
import json
import string

import numpy as np
import pytest
import torch

from labkit import notebook
from labkit.data import DataUnavailable

from .conftest import ROOT

NB = ROOT / "notebooks" / "10_unet.ipynb"
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

N_IMAGES, IMAGE_SIZE = 12, 16
SIZES = [(30, 20), (20, 30), (24, 24)]          # (width, height): landscape, portrait, square


@pytest.fixture(scope="module")
def ns():
    return notebook.load(NB, ("data",))          # the data cells alone, as chapter 11 loads them


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """N_IMAGES small PNGs: a green centre square with a red strip left and a blue strip right of it (the centre
    crop must drop both), captions in metadata.jsonl."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("faces")
    rows = []
    for i in range(N_IMAGES):
        w, h = SIZES[i % len(SIZES)]
        side = min(w, h)
        a = np.zeros((h, w, 3), np.uint8)
        a[:, :] = (0, 255, 0)
        left, top = (w - side) // 2, (h - side) // 2
        a[:, :left] = (255, 0, 0)
        a[:, left + side:] = (0, 0, 255)
        a[:top], a[top + side:] = (255, 0, 0), (0, 0, 255)
        a[top + 2 + i % 3, left + 3] = (255, 255, 255)          # a little variety inside the crop
        Image.fromarray(a).save(folder / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "text": f"a face number {i} with {'short long'.split()[i % 2]} hair"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder, [r["text"] for r in rows]


@pytest.fixture(autouse=True)
def _hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))          # the datasets cache: never the user's


@pytest.fixture(scope="module")
def tiny_models():
    """A tiny random AutoencoderKL (2 levels: 16 px → 8 px × 4) and CLIP text encoder (width 32), and a
    character-level CLIPTokenizer. Nothing is downloaded."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=IMAGE_SIZE)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return vae.eval(), tokenizer, text_encoder.eval()


def prepare(ns, image_folder, tiny_models, cache_dir, **kw):
    vae, tokenizer, text_encoder = tiny_models
    kw = {"image_size": IMAGE_SIZE, "batch_size": 4, "shard_size": 5, **kw}
    return ns["prepare_sd_data"]("imagefolder", vae, text_encoder, cache_dir, tokenizer=tokenizer,
                                 data_dir=str(image_folder[0]), device="cpu", **kw)


# ------------------------------------------------------------------------------------------------ (a) the loader
def test_loader_shapes_range_crop_and_captions(ns, image_folder):
    folder, captions = image_folder
    data = ns["load_captioned_images"]("imagefolder", data_dir=str(folder), image_size=IMAGE_SIZE)
    assert len(data) == N_IMAGES and data.captions == captions
    x = data.images(0, N_IMAGES)
    assert x.shape == (N_IMAGES, 3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    # the centre square is green: the red and blue strips of the landscape and portrait images are cropped away
    mean_rgb = x.mean(dim=(0, 2, 3))
    print("mean RGB of the crops:", [round(v, 3) for v in mean_rgb.tolist()])
    assert mean_rgb[1] > 0.9 and mean_rgb[0] < -0.85 and mean_rgb[2] < -0.85
    assert torch.equal(data.images(3, 5), x[3:5])                      # any slice, decoded lazily


def test_loader_finds_or_asks_for_the_caption_column(ns, image_folder, tmp_path):
    import shutil

    folder = tmp_path / "other"
    shutil.copytree(image_folder[0], folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": r["file_name"], "caption": r["text"]})
                                                     for r in rows))
    data = ns["load_captioned_images"]("imagefolder", data_dir=str(folder), image_size=8, limit=3)
    assert data.captions == image_folder[1][:3] and len(data) == 3      # "caption" found, limit honoured
    with pytest.raises(ValueError, match=r"columns are \['image', 'caption'\]"):
        ns["load_captioned_images"]("imagefolder", data_dir=str(folder), caption_column="prompt")


# ------------------------------------------------------------------------------------------------ (b) cache = direct
def test_cached_latents_and_embeddings_equal_direct_encoding(ns, image_folder, tiny_models, tmp_path):
    vae, tokenizer, text_encoder = tiny_models
    sd = prepare(ns, image_folder, tiny_models, tmp_path / "cache")
    images = ns["load_captioned_images"]("imagefolder", data_dir=str(image_folder[0]), image_size=IMAGE_SIZE)
    with torch.no_grad():
        x = images.images(0, N_IMAGES)
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor        # diffusers' own calls
        ids = tokenizer(image_folder[1], padding="max_length", max_length=77, return_tensors="pt").input_ids
        context = text_encoder(ids).last_hidden_state
        null = text_encoder(tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids)
    errors = {"latents": (sd["sd_latents"].float() - latents).abs().max().item(),
              "context": (sd["sd_context"].float() - context).abs().max().item(),
              "null context": (sd["sd_null_context"].float() - null.last_hidden_state[0]).abs().max().item()}
    print("max |cached (fp16) − direct (fp32)|:", {k: f"{v:.2e}" for k, v in errors.items()}, "(tolerance 1e-3 + 1e-3 |x|; fp16 rounds by ≤ 2⁻¹¹ |x|)")
    torch.testing.assert_close(sd["sd_latents"].float(), latents, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(sd["sd_context"].float(), context, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(sd["sd_null_context"].float(), null.last_hidden_state[0], atol=1e-3, rtol=1e-3)
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    raw = latents / vae.config.scaling_factor                                       # the unscaled means differ
    assert (sd["sd_latents"].float() - raw).abs().max() > 0.5 * raw.abs().max()


# ------------------------------------------------------------------------------------------------ (c) resume
def _encoder(calls, fail_at=None):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=g)

    def encode_batch(start, stop):
        if fail_at is not None and start >= fail_at:
            raise KeyboardInterrupt("Ctrl-C")
        calls.append((start, stop))
        x = torch.arange(start, stop, dtype=torch.float32)[:, None] * torch.linspace(0.1, 1, 6)
        return {"z": torch.sin(x @ weight).half(), "index": torch.arange(start, stop)}

    return encode_batch


def test_resume_skips_finished_shards_and_matches_an_uninterrupted_run(ns, tmp_path):
    cache_to_disk, load_cache = ns["cache_to_disk"], ns["load_cache"]
    kw = dict(batch_size=3, shard_size=7, meta={"model": "toy", "image_size": 16})
    whole_calls = []
    cache_to_disk(tmp_path / "a", "toy", 30, _encoder(whole_calls), **kw)
    whole = load_cache(tmp_path / "a", "toy")

    first = []
    with pytest.raises(KeyboardInterrupt):                 # stopped in the middle of the third shard (14 … 20)
        cache_to_disk(tmp_path / "b", "toy", 30, _encoder(first, fail_at=17), **kw)
    folder = tmp_path / "b" / "toy"
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not list(folder.glob(".*.tmp")) and not list(folder.glob("shard-00002*"))   # no half-written shard
    with pytest.raises(ValueError, match="incomplete: 3 of its 5 shards"):
        load_cache(tmp_path / "b", "toy")

    rerun = []
    cache_to_disk(tmp_path / "b", "toy", 30, _encoder(rerun), **kw)
    print(f"interrupted run computed {first}, the rerun {rerun}")
    assert min(start for start, _ in rerun) == 14          # shards 0 and 1 (items 0 … 13) are not recomputed
    assert sum(b - a for a, b in rerun) == 30 - 14
    again = []
    cache_to_disk(tmp_path / "b", "toy", 30, _encoder(again), **kw)
    assert again == []                                      # a finished cache computes nothing
    resumed = load_cache(tmp_path / "b", "toy")
    assert resumed.keys() == whole.keys()
    for k in whole:
        assert resumed[k].dtype == whole[k].dtype and torch.equal(resumed[k], whole[k]), k   # bit for bit
    assert torch.equal(whole["index"], torch.arange(30))


def test_encode_batch_returning_the_wrong_length_is_refused(ns, tmp_path):
    with pytest.raises(ValueError, match=r"encode_batch\(0, 4\) returned 'z' with first dim 3"):
        ns["cache_to_disk"](tmp_path, "bad", 8, lambda a, b: {"z": torch.zeros(3, 2)}, batch_size=4)


# ------------------------------------------------------------------------------------------------ (d) meta
def test_a_different_meta_is_refused_naming_the_key(ns, tmp_path):
    cache_to_disk = ns["cache_to_disk"]
    kw = dict(batch_size=4, shard_size=4, meta={"model": "toy", "image_size": 16})
    cache_to_disk(tmp_path, "toy", 8, _encoder([]), **kw)
    calls = []
    cache_to_disk(tmp_path, "toy", 8, _encoder(calls), **{**kw, "meta": {"image_size": 16, "model": "toy"}})
    assert calls == []                                      # the same meta, in another order: accepted, nothing to do
    with pytest.raises(ValueError, match=r"image_size: cached 16, asked 32") as e:
        cache_to_disk(tmp_path, "toy", 8, _encoder(calls), **{**kw, "meta": {"model": "toy", "image_size": 32}})
    assert "model" not in str(e.value).split("(")[1].split(")")[0]       # only the key that differs is named
    with pytest.raises(ValueError, match="n_items: cached 8, asked 9"):
        cache_to_disk(tmp_path, "toy", 9, _encoder(calls), **kw)
    with pytest.raises(ValueError, match="shard_size"):
        cache_to_disk(tmp_path, "toy", 8, _encoder(calls), **{**kw, "shard_size": 8})
    assert calls == []


def test_prepare_refuses_to_mix_another_model_into_its_cache(ns, image_folder, tiny_models, tmp_path):
    from diffusers import AutoencoderKL

    vae, tokenizer, text_encoder = tiny_models
    prepare(ns, image_folder, tiny_models, tmp_path)
    other_vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2)
    with pytest.raises(ValueError, match="vae: cached"):
        prepare(ns, image_folder, (other_vae, tokenizer, text_encoder), tmp_path)


# ------------------------------------------------------------------------------------------------ (e) missing
def test_a_missing_or_incomplete_cache_says_what_to_run(ns, tmp_path):
    load_cache = ns["load_cache"]
    with pytest.raises(FileNotFoundError, match=r"build it first with cache_to_disk"):
        load_cache(tmp_path, "latents")
    ns["cache_to_disk"](tmp_path, "latents", 10, _encoder([]), batch_size=5, shard_size=5)
    assert load_cache(tmp_path, "latents")["z"].shape == (10, 5)
    (tmp_path / "latents" / "shard-00001.safetensors").unlink()
    with pytest.raises(ValueError, match=r"incomplete: 1 of its 2 shards are missing \(shard-00001.safetensors\)"
                                         r".*again \(cache_to_disk resumes"):
        load_cache(tmp_path, "latents")


# ------------------------------------------------------------------------------------------------ (f) offline
def test_hub_loaders_offline_say_what_to_do(ns, hub_offline, tiny_models, tmp_path):
    _, _, text_encoder = tiny_models
    with pytest.raises(DataUnavailable, match="tiny size"):
        ns["load_captioned_images"](ns["SD_DATASET"])
    with pytest.raises(DataUnavailable, match=r"(?s)the VAE 'stabilityai/sd-vae-ft-mse'.*tiny size"):
        ns["load_sd_vae"](ns["SD_VAE"], device="cpu")
    with pytest.raises(DataUnavailable, match=r"(?s)the text encoder 'openai/clip-vit-large-patch14'.*HF_HUB_OFFLINE"):
        ns["load_clip_text"](ns["SD_TEXT_ENCODER"], device="cpu")
    # offline, transformers builds an empty CLIPTokenizer instead of failing: the loader must notice
    with pytest.raises(DataUnavailable, match=r"it has 2 tokens for a text encoder of \d+"):
        ns["load_clip_text"](text_encoder, tokenizer=ns["SD_TEXT_ENCODER"], device="cpu")
    with pytest.raises(DataUnavailable, match="tiny size"):
        ns["prepare_sd_data"](cache_dir=tmp_path, device="cpu")


# ------------------------------------------------------------------------------------------------ (g) end to end
def test_prepare_sd_data_end_to_end_and_a_rerun_only_loads(ns, image_folder, tiny_models, tmp_path, monkeypatch):
    vae, tokenizer, text_encoder = tiny_models
    sd = prepare(ns, image_folder, tiny_models, tmp_path)
    n, width = N_IMAGES, text_encoder.config.hidden_size
    assert sd["sd_built"] and sd["sd_captions"] == image_folder[1]
    assert sd["sd_latents"].shape == (n, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2) and sd["sd_latents"].dtype == torch.float16
    assert sd["sd_context"].shape == (n, 77, width) and sd["sd_context"].dtype == torch.float16
    assert sd["sd_null_context"].shape == (77, width) and sd["sd_null_context"].dtype == torch.float16
    prompts = sd["sd_encode_prompts"]([image_folder[1][3], ""])
    assert prompts.shape == (2, 77, width)
    assert torch.equal(prompts[0], sd["sd_context"][3]) and torch.equal(prompts[1], sd["sd_null_context"])
    images = sd["sd_decode"](sd["sd_latents"][:3])
    with torch.no_grad():
        direct = vae.decode(sd["sd_latents"][:3].float() / vae.config.scaling_factor).sample.clamp(-1, 1)
    print(f"decode: max error vs diffusers' decode {(images - direct).abs().max():.2e}")
    assert images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and -1 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, direct, atol=1e-5, rtol=0)
    assert not vae.training and not any(p.requires_grad for p in [*vae.parameters(), *text_encoder.parameters()])
    assert sd["sd_cache_bytes"] > sd["sd_latents"].numel() * 2 + sd["sd_context"].numel() * 2
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["sd-clip-null", "sd-clip-text", f"sd-latents-{IMAGE_SIZE}"]

    # a second run loads the cache: no data set read, no image or caption encoded
    def forbidden(*a, **k):
        raise AssertionError("the rerun encoded again")

    monkeypatch.setattr(vae, "encode", forbidden)
    monkeypatch.setitem(ns, "load_captioned_images", forbidden)
    again = prepare(ns, image_folder, tiny_models, tmp_path)
    assert not again["sd_built"] and again["sd_captions"] == sd["sd_captions"]
    for k in ("sd_latents", "sd_context", "sd_null_context"):
        assert torch.equal(again[k], sd[k]), k


def test_the_full_size_cell_leaves_the_names_the_training_cell_uses(ns, image_folder, tiny_models, tmp_path, capsys):
    """The chapter's own full-size cell (found by its text), run with SIZE = "full" on the tiny local set-up."""
    import matplotlib

    matplotlib.use("Agg")
    from labkit.notebook import read
    from labkit.plot import image_grid

    cells = [c.source for c in read(NB).cells if c.cell_type == "code" and "sd = prepare_sd_data(" in c.source]
    assert len(cells) == 1, "the full-size data cell of chapter 10 is not found"
    vae, tokenizer, text_encoder = tiny_models
    names = dict(ns)
    names.update(SIZE="full", image_grid=image_grid,
                 prepare_sd_data=lambda dataset, vae_name, text_name, **kw: prepare(ns, image_folder, tiny_models, tmp_path))
    for run in ("built", "loaded"):                                   # a second run only loads, the names are the same
        exec(cells[0], names)                                         # noqa: S102 - the chapter's own cell
        out = capsys.readouterr().out
        assert f", {run} in " in out and f"{N_IMAGES:,} captioned images" in out, out
    for name in ("sd_latents", "sd_context", "sd_null_context", "sd_encode_prompts", "sd_decode", "sd_captions"):
        assert name in names, name
    assert names["sd_latents"].shape[0] == names["sd_context"].shape[0] == len(names["sd_captions"]) == N_IMAGES
    names.update(SIZE="tiny")
    exec(cells[0], names)                                             # noqa: S102
    assert capsys.readouterr().out.count("\n") == 1                   # tiny: one line, nothing done
