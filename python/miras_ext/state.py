"""The recurrent state of a memory (docs/math.md, Section 5, "Resuming")."""

from __future__ import annotations

from typing import NamedTuple

import torch


class MemoryState(NamedTuple):
    """Everything needed to continue a sequence, token by token or chunk by chunk.

    memory:   Z per weight tensor, [N, H, *shape] (the weights themselves for retention "none"/"l2"; the
              accumulator that phi maps to weights otherwise, Eq. 3.3).
    momentum: S per weight tensor (algorithm "momentum"), else ().
    anchor:   the state whose phi the current chunk's gradients are taken at (Eq. 5.1): Z at the chunk's
              first token; with grad_at_retained, Z there times the retention since (Eq. 5.2). The exact
              delta rule (MemorySpec.exact_chunks) carries it on the same schedule but never reads it.
    position: [N] int64, tokens written so far; with chunk_size it fixes where the next chunk starts.
    chunk_size: the chunk size of the call that returned the state (None for a state built by hand). The
              anchor and the chunk phase belong to that chunking, so a call continuing the state with another
              chunk_size is refused.

    N is the batch size, or the number of sequences with cu_seqlens.
    """

    memory: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...]
    anchor: tuple[torch.Tensor, ...]
    position: torch.Tensor
    chunk_size: int | None = None


def select(state: MemoryState, i: int) -> MemoryState:
    """The state of sequence i alone (N = 1)."""
    pick = lambda ts: tuple(t[i:i + 1] for t in ts)  # noqa: E731
    return state._replace(memory=pick(state.memory), momentum=pick(state.momentum), anchor=pick(state.anchor),
                          position=state.position[i:i + 1])


def concat(states: list[MemoryState]) -> MemoryState:
    """The states of several calls' sequences as one state, in order."""
    cat = lambda parts: tuple(torch.cat(p) for p in zip(*parts))  # noqa: E731
    return states[0]._replace(memory=cat([s.memory for s in states]), momentum=cat([s.momentum for s in states]),
                              anchor=cat([s.anchor for s in states]),
                              position=torch.cat([s.position for s in states]))
