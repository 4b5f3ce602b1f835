"""Causal language modelling on text: the default offline corpus (this interpreter's standard-library .py
sources, docstrings included), local text files or folders, or a Hugging Face dataset (needs `datasets` and
the network). Byte-level tokens by default (0..255, BOS = 256, PAD = 257); `tokenizer="bpe:N"` trains a
byte-level BPE of N tokens on the training text (HF `tokenizers`, offline; a checkpoint keeps it as
tokenizer.json); `tokenizer=NAME` uses any tokenizer transformers.AutoTokenizer can load.

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


SPECIALS = ("<bos>", "<pad>")  # the specials of the byte and BPE vocabularies, after the byte tokens


def byte_chars() -> list[str]:
    """The character byte-level BPE (GPT-2's ByteLevel, as in HF `tokenizers`) writes for each byte 0..255:
    printable Latin-1 bytes stand for themselves, the others for code points from 256 on."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)}
    out, extra = [], 0
    for b in range(256):
        out.append(chr(b) if b in keep else chr(256 + extra))
        extra += b not in keep
    return out


def _byte_level(model):
    """A tokenizers.Tokenizer over `model` with the byte-level pre-tokenizer and decoder and our specials."""
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, pre_tokenizers
    tok = Fast(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE with vocab_size tokens (bytes, specials, merges) trained on texts, offline."""
    try:
        from tokenizers import models, pre_tokenizers, trainers
    except ImportError:
        raise DataError("tokenizer: bpe:N needs the `tokenizers` package (pip install tokenizers)") from None
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


class Tokenizer:
    """Bytes (default: ids 0..255, then BOS, PAD); "bpe:N", a byte-level BPE of N tokens trained with HF
    `tokenizers` on `texts` (the training text); a tokenizer.json file (how a checkpoint keeps its BPE); or a
    transformers tokenizer by name."""

    def __init__(self, name: str = "bytes", texts: list[str] | None = None):
        self.name, self.tok, self.bpe = name, None, None
        if name == "bytes":
            self.vocab_size, self.bos = BYTE_VOCAB, BOS
            return
        if name.startswith("bpe:"):
            size = name[4:]
            if not size.isdigit() or int(size) < BYTE_VOCAB:
                raise DataError(f"tokenizer: expected bpe:N with N >= {BYTE_VOCAB} (bytes and specials), got {name!r}")
            if texts is None:
                raise DataError(f"tokenizer: {name} is trained on a training text; none was given")
            self.bpe = train_bpe(texts, int(size))
        elif name.endswith(".json") and Path(name).is_file():
            from tokenizers import Tokenizer as Fast
            self.bpe = Fast.from_file(name)
        if self.bpe is not None:
            self.vocab_size, self.bos = self.bpe.get_vocab_size(), self.bpe.token_to_id(SPECIALS[0])
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
        if self.bpe is not None:
            return self.bpe.encode(text, add_special_tokens=False).ids
        if self.tok is None:
            return list(text.encode("utf-8"))
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.bpe is not None:
            return self.bpe.decode(ids)
        if self.tok is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self.tok.decode(ids)

    def hf(self):
        """The same tokenizer as a transformers tokenizer (for the Hugging Face wrapper and lm-eval); BOS
        also ends a document (documents are joined as BOS text BOS text ...)."""
        if self.tok is not None:
            return self.tok
        from transformers import PreTrainedTokenizerFast
        if self.bpe is None:  # bytes: a BPE without merges whose vocabulary is the byte characters
            from tokenizers import models
            vocab = {c: b for b, c in enumerate(byte_chars())} | {s: BOS + i for i, s in enumerate(SPECIALS)}
            fast = _byte_level(models.BPE(vocab=vocab, merges=[]))
            fast.add_special_tokens(list(SPECIALS))
        else:
            fast = self.bpe
        return PreTrainedTokenizerFast(tokenizer_object=fast, bos_token=SPECIALS[0], eos_token=SPECIALS[0],
                                       pad_token=SPECIALS[1])


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
        self.tokenizer = Tokenizer(tokenizer, train)
        self.vocab_size = self.tokenizer.vocab_size
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
