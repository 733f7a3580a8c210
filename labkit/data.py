"""Data for every chapter, built on Hugging Face ``datasets``.

Tiny size: offline corpora that every machine has (the Python standard library's own source code:
megabytes of real English prose in docstrings and comments, and real code) and procedural generators
(minGPT's sort task, captioned coloured shapes). Nothing is downloaded.

Full size: real hub data through ``datasets.load_dataset(..., streaming=True)`` and the GPT-2 tokenizer
through ``transformers``. Offline, they stop with :class:`DataUnavailable`, which says what to do.
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

# ---------------------------------------------------------------------------------------------------
# Offline text: the standard library


def stdlib_files() -> list[Path]:
    """The standard library's ``*.py`` files, sorted; tests, idlelib and site-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo"}
    files = [p for p in root.rglob("*.py") if not (skip & set(p.relative_to(root).parts))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_text(max_chars: int | None = None) -> str:
    """The standard library's sources as one ASCII text (non-ASCII lines dropped), deterministic.

    About 11 M characters on Python 3.11; ``max_chars`` stops early (fast for tiny runs).
    """
    parts, total = [], 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = "\n".join(line for line in text.splitlines() if line.isascii()) + "\n"
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    out = "".join(parts)
    return out[:max_chars] if max_chars is not None else out


def stdlib_dataset(max_chars: int | None = None):
    """The same text as a ``datasets.Dataset`` with one row per file: columns ``path`` and ``text``."""
    from datasets import Dataset

    root = Path(sysconfig.get_paths()["stdlib"])
    rows, total = [], 0
    for path in stdlib_files():
        try:
            text = "\n".join(l for l in path.read_text(encoding="utf-8").splitlines() if l.isascii()) + "\n"
        except (UnicodeDecodeError, OSError):
            continue
        rows.append({"path": path.relative_to(root).as_posix(), "text": text})
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------------
# Tokenizers


@dataclass
class CharTokenizer:
    """Characters to integers and back: the simplest tokenizer, vocab = the set of characters seen."""

    chars: list[str]

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        stoi = {c: i for i, c in enumerate(self.chars)}
        try:
            return torch.tensor([stoi[c] for c in text], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this tokenizer's vocabulary") from None

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.chars[i] for i in ids)


class DataUnavailable(RuntimeError):
    """Full-size data or a tokenizer could not be loaded (usually: no internet). The message says what to do."""


def _explain_offline(what: str, err: Exception) -> DataUnavailable:
    return DataUnavailable(
        f"Could not load {what} from the Hugging Face Hub ({type(err).__name__}: {str(err)[:200]}).\n"
        "The full size needs the internet once; afterwards the data is cached under ~/.cache/huggingface.\n"
        "What to do:\n"
        "  - offline, or on a CPU: run the tiny size, which needs no download (unset LABKIT_SIZE or set LABKIT_SIZE=tiny);\n"
        "  - on a connected machine: run this cell again (check HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are not set to 1);\n"
        "  - behind a firewall: download on another machine, copy ~/.cache/huggingface here, and set HF_HUB_OFFLINE=1."
    )


def gpt2_tokenizer(name: str = "gpt2"):
    """The GPT-2 BPE tokenizer (50,257 tokens) from ``transformers``; offline it raises DataUnavailable."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dependency of [full] and [dev]
        raise DataUnavailable("the full size needs `transformers`: pip install -e '.[full]'") from e
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ConnectionError, ValueError) as e:
        raise _explain_offline(f"the tokenizer {name!r}", e) from None


# ---------------------------------------------------------------------------------------------------
# Hub corpora for the full size

HUB_CORPORA = {
    # name: (hub path, config, split, text column)
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text"),
    "tinystories": ("roneneldan/TinyStories", None, "train", "text"),
    "openwebtext": ("Skylion007/openwebtext", None, "train", "text"),
}


def hub_text(name: str, split: str | None = None, *, streaming: bool = True, text_field: str | None = None,
             config: str | None = None) -> Iterator[str]:
    """Yield documents' text from a hub corpus (a key of ``HUB_CORPORA``, a hub path, or a local folder
    of json/parquet/txt files, which is how the tests exercise this code offline)."""
    from datasets import load_dataset

    path, cfg, default_split, field = HUB_CORPORA.get(name, (name, config, "train", "text"))
    split, field, cfg = split or default_split, text_field or field, config or cfg
    try:
        ds = load_dataset(path, cfg, split=split, streaming=streaming)
        for row in ds:
            yield row[field]
    except ConnectionError as e:
        raise _explain_offline(f"the data set {path!r}", e) from None
    except FileNotFoundError as e:
        if os.path.exists(path):
            raise
        raise _explain_offline(f"the data set {path!r}", e) from None


def pack_tokens(texts: Iterable[str], encode: Callable[[str], list[int]], n_tokens: int, eos: int | None = None,
                progress: bool = True, allow_short: bool = False) -> torch.Tensor:
    """Tokenize documents and concatenate them (with ``eos`` between) until ``n_tokens`` ids are collected.

    If the documents run out first: raise, or with ``allow_short`` return the ids collected so far."""
    from tqdm.auto import tqdm

    out = torch.empty(n_tokens, dtype=torch.long)
    filled = 0
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="tokenizing", disable=not progress)
    for text in texts:
        ids = list(encode(text)) + ([eos] if eos is not None else [])
        take = min(len(ids), n_tokens - filled)
        out[filled: filled + take] = torch.tensor(ids[:take], dtype=torch.long)
        filled += take
        bar.update(take)
        if filled == n_tokens:
            break
    bar.close()
    if filled < n_tokens:
        if allow_short:
            return out[:filled]
        raise ValueError(f"the corpus ran out after {filled:,} of the {n_tokens:,} tokens asked for")
    return out


# ---------------------------------------------------------------------------------------------------
# Batching


def train_val_split(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(len(ids) * (1 - val_fraction))
    return ids[:n], ids[n:]


def random_windows(data: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows: inputs ``x`` and next-token targets ``y`` (both ``(B, T)``)."""
    if len(data) <= block_size:
        raise ValueError(f"the data ({len(data)} tokens) is shorter than one block ({block_size} + 1)")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size)
    x = data[starts[:, None] + offsets]
    y = data[starts[:, None] + offsets + 1]
    return x.to(device), y.to(device)


# ---------------------------------------------------------------------------------------------------
# Procedural tasks


def sort_task(n: int, length: int = 6, num_digits: int = 3, generator: torch.Generator | None = None):
    """minGPT's sort task. Each row is ``digits ++ sorted(digits)``; the model sees ``row[:-1]`` and
    predicts ``row[1:]``, scored only on the sorted half (other targets are -1, ignored by the loss).

    Returns ``x, y`` of shape ``(n, 2 * length - 1)``.
    """
    digits = torch.randint(num_digits, (n, length), generator=generator)
    row = torch.cat([digits, digits.sort(dim=1).values], dim=1)
    x, y = row[:, :-1].clone(), row[:, 1:].clone()
    y[:, : length - 1] = -1
    return x, y


SHAPE_COLORS = {
    "red": (0.9, 0.15, 0.15), "green": (0.15, 0.75, 0.25), "blue": (0.2, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.1), "purple": (0.65, 0.25, 0.8), "cyan": (0.1, 0.8, 0.85),
}
SHAPE_KINDS = ("circle", "square", "triangle")
SHAPE_SIZES = ("small", "large")


def shapes(n: int, image_size: int = 32, generator: torch.Generator | None = None):
    """Captioned images of one coloured shape on a dark background, values in [-1, 1].

    Returns ``images (n, 3, S, S)``, ``captions`` (e.g. "a large red circle") and ``labels``, a dict of
    integer tensors ``color``, ``kind``, ``size`` for class-conditional models.
    """
    g = generator
    color = torch.randint(len(SHAPE_COLORS), (n,), generator=g)
    kind = torch.randint(len(SHAPE_KINDS), (n,), generator=g)
    big = torch.randint(2, (n,), generator=g)
    radius = torch.where(big.bool(), 0.32, 0.18) * image_size * (0.9 + 0.2 * torch.rand(n, generator=g))
    margin = radius + 1
    cx = margin + torch.rand(n, generator=g) * (image_size - 2 * margin)
    cy = margin + torch.rand(n, generator=g) * (image_size - 2 * margin)
    ys, xs = torch.meshgrid(torch.arange(image_size) + 0.5, torch.arange(image_size) + 0.5, indexing="ij")
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    r = radius[:, None, None]
    circle = dx**2 + dy**2 <= r**2
    square = (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r)
    triangle = (dy <= 0.8 * r) & (dy >= -r + 2 * dx.abs())  # apex up, base at +0.8 r
    mask = torch.stack([circle, square, triangle], 1)[torch.arange(n), kind].float()
    rgb = torch.tensor(list(SHAPE_COLORS.values()))[color]  # (n, 3)
    background = torch.full((n, 3, 1, 1), 0.08)
    images = background * (1 - mask[:, None]) + rgb[:, :, None, None] * mask[:, None]
    names = list(SHAPE_COLORS)
    captions = [f"a {SHAPE_SIZES[b]} {names[c]} {SHAPE_KINDS[k]}" for c, k, b in zip(color.tolist(), kind.tolist(), big.tolist())]
    return images * 2 - 1, captions, {"color": color, "kind": kind, "size": big}
