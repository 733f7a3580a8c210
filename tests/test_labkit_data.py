"""Data loaders, on local data only (the hub path is exercised with a local folder: same code)."""
import json

import pytest
import torch

from labkit import data


def test_stdlib_corpus_is_real_and_deterministic():
    text = data.stdlib_text(max_chars=200_000)
    assert len(text) == 200_000 and text.isascii()
    assert "def " in text and "import" in text
    assert text == data.stdlib_text(max_chars=200_000)
    ds = data.stdlib_dataset(max_chars=50_000)
    assert set(ds.column_names) == {"path", "text"} and ds.num_rows >= 1


def test_char_tokenizer_roundtrip_and_error():
    tok = data.CharTokenizer.from_text("hello world")
    ids = tok.encode("hello")
    assert ids.dtype == torch.long and tok.decode(ids) == "hello"
    assert tok.vocab_size == len(set("hello world"))
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("z")


def test_random_windows_are_shifted_by_one():
    ids = torch.arange(100)
    x, y = data.random_windows(ids, block_size=8, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y, x + 1)
    with pytest.raises(ValueError, match="shorter than one block"):
        data.random_windows(torch.arange(5), 8, 2)


def test_train_val_split():
    tr, va = data.train_val_split(torch.arange(100), 0.1)
    assert len(tr) == 90 and len(va) == 10 and va[0] == 90


def test_sort_task_targets():
    x, y = data.sort_task(5, length=6, num_digits=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 11)
    assert (y[:, :5] == -1).all()
    full = torch.cat([x, y[:, -1:]], 1)
    assert torch.equal(full[:, 6:], full[:, :6].sort(1).values)


def test_shapes_images_and_captions():
    imgs, caps, labels = data.shapes(12, image_size=24, generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (12, 3, 24, 24) and imgs.min() >= -1 and imgs.max() <= 1
    assert len(caps) == 12 and all(c.startswith("a ") for c in caps)
    for i, cap in enumerate(caps):
        colour = list(data.SHAPE_COLORS)[labels["color"][i]]
        assert colour in cap and data.SHAPE_KINDS[labels["kind"][i]] in cap
        # the shape's pixels carry that colour, and a large shape covers more pixels than a small one would
        fg = (imgs[i] > -0.8).any(0)
        assert fg.sum() > 10
        rgb = (imgs[i][:, fg].mean(1) + 1) / 2
        assert torch.allclose(rgb, torch.tensor(data.SHAPE_COLORS[colour]), atol=0.02)


def test_hub_text_reads_a_local_folder_with_the_same_code(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    rows = [{"text": f"document number {i}", "id": i} for i in range(20)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    texts = list(data.hub_text(str(folder), split="train"))
    assert texts == [r["text"] for r in rows]
    ids = data.pack_tokens(texts, lambda s: [len(w) for w in s.split()], n_tokens=25, eos=0, progress=False)
    assert ids.tolist()[:4] == [8, 6, 1, 0] and len(ids) == 25
    with pytest.raises(ValueError, match="ran out"):
        data.pack_tokens(texts, lambda s: [1], n_tokens=1000, progress=False)


def test_hub_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(data.DataUnavailable) as e:
        next(data.hub_text("fineweb-edu"))
    msg = str(e.value)
    assert "HuggingFaceFW/fineweb-edu" in msg and "LABKIT_SIZE=tiny" in msg


def test_tokenizer_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(data.DataUnavailable, match="tokenizer 'gpt2'"):
        data.gpt2_tokenizer()
