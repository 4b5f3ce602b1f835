"""The decoding cache of a whole model: one entry per layer and the number of tokens seen."""

from __future__ import annotations

from dataclasses import dataclass, field

from .attention import KVCache
from .miras_layer import MirasCache


@dataclass
class Cache:
    """Per layer a MirasCache (MemoryState + q, k, v convolution states; constant size) or a KVCache
    (attention: grows with the context; sliding-window layers keep the last `window` tokens), None before
    the first call. `seen` counts the tokens written so far (the RoPE offset of the next token)."""

    layers: list[MirasCache | KVCache | None] = field(default_factory=list)
    seen: int = 0

    @classmethod
    def empty(cls, n_layers: int) -> "Cache":
        return cls([None] * n_layers, 0)

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        total = 0
        for entry in self.layers:
            if isinstance(entry, KVCache):
                total += sum(x.numel() * x.element_size() for x in entry)
            elif isinstance(entry, MirasCache):
                total += sum(x.numel() * x.element_size() for x in entry.conv)
                m = entry.memory
                total += sum(x.numel() * x.element_size() for x in (*m.memory, *m.momentum, *m.anchor))
        return total
