"""S-NIAH, single needle in a haystack (RULER, Hsieh et al. 2024), generated at the byte level.

A sequence of exactly `seq_len` bytes: BOS, a haystack with one needle at a random depth, then the question
and the answer. Labels are -100 except on the answer's bytes; a sequence counts as correct when every
answer byte is predicted (teacher forcing, argmax). Needles (RULER's single-needle variants):

  passkey  "The pass key is 71432. Remember it. "        question "What is the pass key? The pass key is "
  number   "The special number for apple is 5029731. "   question "What is the special number for apple? ..."
  word     "The special word for apple is river. "       question "What is the special word for apple? ..."

Haystacks: "noise" (RULER's repeated "The grass is green. The sky is blue. ..."), or "text" (windows of the
default text corpus, the standard library's sources).
"""

from __future__ import annotations

import torch

from .base import BOS, BYTE_VOCAB, IGNORE, Task, generator

NEEDLES = ("passkey", "number", "word")
HAYSTACKS = ("noise", "text")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = ("apple river stone cloud tiger maple ocean candle silver forest violin garden rocket pepper "
         "island mirror falcon winter copper lemon harbor meadow planet saddle thunder velvet walnut zebra "
         "anchor bamboo cactus dragon ember feather glacier hammer igloo jungle kettle lantern marble nectar "
         "orchid pebble quartz raven spruce tunnel umber vapor willow yarrow").split()


def needle_text(kind: str, g: torch.Generator) -> tuple[str, str, str]:
    """(needle, question, answer) for a needle kind."""
    pick = lambda seq: seq[int(torch.randint(0, len(seq), (1,), generator=g))]  # noqa: E731
    if kind == "passkey":
        value = str(int(torch.randint(10000, 100000, (1,), generator=g)))
        return f"The pass key is {value}. Remember it. ", "What is the pass key? The pass key is ", value
    key = pick(WORDS)
    if kind == "number":
        value = str(int(torch.randint(1_000_000, 10_000_000, (1,), generator=g)))
    else:
        value = pick([w for w in WORDS if w != key])
    return (f"The special {kind} for {key} is {value}. ",
            f"What is the special {kind} for {key}? The special {kind} for {key} is ", value)


class SNIAH(Task):
    name = "sniah"

    def __init__(self, seq_len: int = 256, needles: tuple[str, ...] = NEEDLES, haystack: str = "noise",
                 seed: int = 0):
        needles = tuple(needles)
        for n in needles:
            if n not in NEEDLES:
                raise ValueError(f"needle: expected names from {NEEDLES}, got {n!r}")
        if haystack not in HAYSTACKS:
            raise ValueError(f"haystack: expected one of {HAYSTACKS}, got {haystack!r}")
        longest = 1 + 96 + 80 + 8 + 16
        if seq_len < longest:
            raise ValueError(f"seq_len: S-NIAH needs seq_len >= {longest} bytes (needle, question, answer and "
                             f"some haystack), got {seq_len}")
        self.seq_len, self.needles, self.haystack, self.seed = seq_len, needles, haystack, seed
        self.vocab_size = BYTE_VOCAB
        self._corpus = None

    def describe(self) -> dict:
        return dict(task=self.name, seq_len=self.seq_len, needles=list(self.needles), haystack=self.haystack,
                    seed=self.seed)

    def with_length(self, seq_len: int, needles: tuple[str, ...] | None = None) -> "SNIAH":
        new = SNIAH(seq_len, needles or self.needles, self.haystack, self.seed)
        new._corpus = self._corpus
        return new

    def _hay(self, n: int, g: torch.Generator) -> bytes:
        if self.haystack == "noise":
            start = int(torch.randint(0, len(NOISE), (1,), generator=g))
            reps = (start + n) // len(NOISE) + 1
            return (NOISE * reps).encode()[start:start + n]
        if self._corpus is None:
            from .text import default_corpus_texts
            self._corpus = "\n".join(default_corpus_texts(1_000_000)).encode("utf-8", errors="replace")
        start = int(torch.randint(0, len(self._corpus) - n, (1,), generator=g))
        return self._corpus[start:start + n]

    def batch(self, step: int, size: int, split: str = "train", seq_len: int | None = None,
              needles: tuple[str, ...] | None = None):
        t = seq_len or self.seq_len
        needles = needles or self.needles
        g = generator(self.seed, {"train": 0, "val": 1}[split], step, t, *map(NEEDLES.index, needles))
        ids = torch.empty(size, t, dtype=torch.long)
        labels = torch.full((size, t), IGNORE, dtype=torch.long)
        for b in range(size):
            kind = needles[int(torch.randint(0, len(needles), (1,), generator=g))]
            needle, question, answer = (s.encode() for s in needle_text(kind, g))
            tail = question + answer
            hay = self._hay(t - 1 - len(needle) - len(tail), g)
            depth = int(torch.randint(0, len(hay) + 1, (1,), generator=g))
            seq = [BOS] + list(hay[:depth] + needle + hay[depth:] + tail)
            ids[b] = torch.tensor(seq)
            labels[b, t - len(answer):] = ids[b, t - len(answer):]
        return ids, labels
