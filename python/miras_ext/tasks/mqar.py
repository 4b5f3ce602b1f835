"""MQAR, multi-query associative recall (Zoology, Arora et al. 2023), generated.

A sequence of `seq_len` tokens: `pairs` key-value pairs k1 v1 ... kN vN, then filler with the N keys asked
again in random order at random places: ... k3 _ ... k1 _ ... The label after a queried key is its value and
-100 everywhere else, so the loss and the accuracy count only recall. The answer is never an input token
(as in Zoology's MQAR): were it shown after its query, a model could answer the later queries without recall,
by elimination (the context value that no query has repeated yet), which scores 56% at 4 pairs. Keys are
drawn without replacement from bytes [0, n_keys), values from [128, 128 + n_values); filler is PAD. Chance
accuracy is 1 / n_values; a model that only guesses among the context values scores about 1 / pairs.
"""

from __future__ import annotations

import torch

from .base import BYTE_VOCAB, IGNORE, PAD, Task, generator


class MQAR(Task):
    name = "mqar"

    def __init__(self, pairs: int = 8, seq_len: int = 64, seed: int = 0, n_keys: int = 128, n_values: int = 128):
        if not isinstance(pairs, int) or pairs < 1:
            raise ValueError(f"pairs: expected an integer >= 1, got {pairs!r}")
        for name, n in (("n_keys", n_keys), ("n_values", n_values)):
            if not isinstance(n, int) or not 1 <= n <= 128:
                raise ValueError(f"{name}: expected an integer in [1, 128], got {n!r}")
        if pairs > n_keys:
            raise ValueError(f"pairs: at most {n_keys} distinct keys, got {pairs}")
        if seq_len < 4 * pairs:
            raise ValueError(f"seq_len: MQAR with {pairs} pairs needs seq_len >= 4 * pairs = {4 * pairs} "
                             f"(the pairs, then a query and its answer per key), got {seq_len}")
        self.pairs, self.seq_len, self.seed, self.n_keys, self.n_values = pairs, seq_len, seed, n_keys, n_values
        self.vocab_size = BYTE_VOCAB

    def describe(self) -> dict:
        return dict(task=self.name, pairs=self.pairs, seq_len=self.seq_len, seed=self.seed, n_keys=self.n_keys,
                    n_values=self.n_values)

    def with_length(self, seq_len: int, pairs: int | None = None) -> "MQAR":
        return MQAR(pairs or self.pairs, seq_len, self.seed, self.n_keys, self.n_values)

    def batch(self, step: int, size: int, split: str = "train", seq_len: int | None = None):
        n, t = self.pairs, seq_len or self.seq_len
        g = generator(self.seed, {"train": 0, "val": 1}[split], step, n, t)
        keys = torch.rand(size, self.n_keys, generator=g).argsort(-1)[:, :n]           # distinct per row
        values = 128 + torch.randint(0, self.n_values, (size, n), generator=g)
        ids = torch.full((size, t), PAD, dtype=torch.long)
        labels = torch.full((size, t), IGNORE, dtype=torch.long)
        ids[:, 0:2 * n:2], ids[:, 1:2 * n:2] = keys, values
        # Query slots: N of the (t - 2N) // 2 two-token slots after the context, in order; keys permuted.
        slots = (t - 2 * n) // 2
        chosen = torch.rand(size, slots, generator=g).argsort(-1)[:, :n].sort(-1).values
        pos = 2 * n + 2 * chosen                                                         # [B, N]
        order = torch.rand(size, n, generator=g).argsort(-1)
        qk, qv = keys.gather(1, order), values.gather(1, order)
        ids.scatter_(1, pos, qk)
        labels.scatter_(1, pos + 1, qv)
        return ids, labels
