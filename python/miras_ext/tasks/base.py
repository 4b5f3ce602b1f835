"""What every task offers the trainer: deterministic batches indexed by step, and an evaluation."""

from __future__ import annotations

import torch

IGNORE = -100
# Byte-level vocabulary: 0..255 are bytes, then the specials.
BOS, PAD = 256, 257
BYTE_VOCAB = 258


def generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (task seed, split, step, ...)."""
    g = torch.Generator()
    h = 0
    for s in seeds:
        h = (h * 1_000_003 + int(s) + 1) % (2**63 - 1)
    g.manual_seed(h)
    return g


class Task:
    """A source of batches. batch(step, size) is a pure function of (seed, step): a resumed run, or a rank of a
    distributed run taking its slice of the global batch, sees exactly the batches of an uninterrupted run."""

    name = "task"
    vocab_size = BYTE_VOCAB
    seq_len = 0

    def batch(self, step: int, size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


@torch.no_grad()
def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int, int]:
    """Teacher-forced accuracy on the labelled positions. Position t predicts labels[t + 1] (the model's
    convention). Returns (correct tokens, labelled tokens, sequences with every label right, sequences)."""
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    mask = target != IGNORE
    right = (pred == target) & mask
    seq_ok = (right | ~mask).all(-1)
    return int(right.sum()), int(mask.sum()), int(seq_ok.sum()), int(labels.shape[0])
