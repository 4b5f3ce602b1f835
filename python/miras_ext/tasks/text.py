"""Causal language modelling on text: the default offline corpus (this interpreter's standard-library .py
sources, docstrings included), local text files or folders, or a Hugging Face dataset (needs `datasets` and
the network). Byte-level tokens by default (0..255, BOS = 256, PAD = 257); `tokenizer=NAME` uses any
tokenizer transformers.AutoTokenizer can load.

Batches are windows of seq_len tokens at offsets drawn from a generator seeded by (seed, split, step), so a
batch is a pure function of its step. Files are split into train and validation by name (every 20th file,
in sorted order, is validation); a single source document is split 95/5 by position instead.
"""

from __future__ import annotations

import math
import os
import sysconfig
from pathlib import Path

import torch

from .base import BOS, BYTE_VOCAB, Task, generator

DEFAULT_MAX_BYTES = 4_000_000


class DataError(ValueError):
    """A data source that cannot be read (missing path, no network, missing package)."""


def stdlib_files() -> list[Path]:
    """The standard library's .py files of the running interpreter, sorted (tests and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    if not out:
        raise DataError(f"no .py files under the standard library folder {root}")
    return out


def local_files(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"data: {p} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not found:
                raise DataError(f"data: the folder {p} holds no files")
            out.extend(found)
        else:
            out.append(p)
    return out


def read_texts(files: list[Path], max_bytes: int) -> list[str]:
    texts, total = [], 0
    for f in files:
        try:
            t = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"data: cannot read {f}: {e.strerror}") from None
        texts.append(t)
        total += len(t)
        if total >= max_bytes:
            break
    return texts


def hf_texts(name: str, max_bytes: int) -> tuple[list[str], list[str]]:
    try:
        import datasets
    except ImportError:
        raise DataError("hf-dataset: the `datasets` package is not installed (pip install datasets)") from None
    dataset, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset, config or None, split="train", streaming=True)
        texts, total = [], 0
        for row in ds:
            t = row.get("text") or next((v for v in row.values() if isinstance(v, str)), "")
            texts.append(t)
            total += len(t)
            if total >= max_bytes:
                break
    except Exception as e:  # network, unknown name, ...: one line
        raise DataError(f"hf-dataset: cannot load {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                        ) from None
    cut = max(1, len(texts) // 20)
    return texts[cut:], texts[:cut]


class Tokenizer:
    """Bytes (default) or a transformers tokenizer by name."""

    def __init__(self, name: str = "bytes"):
        self.name = name
        if name == "bytes":
            self.tok, self.vocab_size, self.bos = None, BYTE_VOCAB, BOS
            return
        try:
            from transformers import AutoTokenizer
            self.tok = AutoTokenizer.from_pretrained(name)
        except Exception as e:
            raise DataError(f"tokenizer: cannot load {name!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        self.vocab_size = len(self.tok)
        self.bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        if self.tok is None:
            return list(text.encode("utf-8"))
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.tok is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self.tok.decode(ids)


def stream(texts: list[str], tok: Tokenizer) -> torch.Tensor:
    ids = []
    for t in texts:
        if tok.bos is not None:
            ids.append(tok.bos)
        ids.extend(tok.encode(t))
    return torch.tensor(ids, dtype=torch.long)


def default_corpus_texts(max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
    return read_texts(stdlib_files(), max_bytes)


class TextLM(Task):
    name = "lm"

    def __init__(self, seq_len: int = 256, data: list[str] | None = None, hf_dataset: str | None = None,
                 tokenizer: str = "bytes", max_bytes: int = DEFAULT_MAX_BYTES, seed: int = 0):
        if seq_len < 2:
            raise ValueError(f"seq_len: expected >= 2, got {seq_len}")
        self.seq_len, self.data, self.hf_dataset, self.seed = seq_len, data, hf_dataset, seed
        self.max_bytes = max_bytes
        self.tokenizer = Tokenizer(tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        if hf_dataset:
            train, val = hf_texts(hf_dataset, max_bytes)
            self.source = f"hf:{hf_dataset}"
        else:
            files = local_files(data) if data else stdlib_files()
            self.source = "stdlib" if not data else ",".join(data)
            if len(files) >= 20:
                train_f = [f for i, f in enumerate(files) if i % 20 != 19]
                val_f = [f for i, f in enumerate(files) if i % 20 == 19]
                train = read_texts(train_f, max_bytes * 19 // 20)
                val = read_texts(val_f, max(max_bytes // 20, 1))
            else:
                text = "\n".join(read_texts(files, max_bytes))
                cut = len(text) * 19 // 20
                train, val = [text[:cut]], [text[cut:]]
        self.train_ids, self.val_ids = stream(train, self.tokenizer), stream(val, self.tokenizer)
        for split, ids in (("train", self.train_ids), ("validation", self.val_ids)):
            if ids.numel() <= seq_len:
                raise DataError(f"data: the {split} text has {ids.numel()} tokens, fewer than seq_len + 1 = "
                                f"{seq_len + 1}; give more text or a shorter --seq-len")

    def describe(self) -> dict:
        return dict(task=self.name, seq_len=self.seq_len, source=self.source, tokenizer=self.tokenizer.name,
                    train_tokens=int(self.train_ids.numel()), val_tokens=int(self.val_ids.numel()),
                    seed=self.seed)

    def with_length(self, seq_len: int) -> "TextLM":
        new = object.__new__(TextLM)
        new.__dict__.update(self.__dict__)
        new.seq_len = seq_len
        return new

    def batch(self, step: int, size: int, split: str = "train", seq_len: int | None = None):
        t = seq_len or self.seq_len
        ids = self.train_ids if split == "train" else self.val_ids
        g = generator(self.seed, {"train": 0, "val": 1}[split], step, t)
        starts = torch.randint(0, ids.numel() - t + 1, (size,), generator=g)
        x = torch.stack([ids[s:s + t] for s in starts.tolist()])
        return x, x.clone()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


def bits_per_byte(loss: float, tokens: int, nbytes: int) -> float:
    return loss * tokens / max(nbytes, 1) / math.log(2)
