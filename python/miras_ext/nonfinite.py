"""Non-finite keys and values: outputs before the bad token stay those of the finite prefix.

A NaN or infinity in k_t or v_t makes the memory non-finite from token t on, and with it every output from
t on: that is the recurrence (Eqs. 4.1-4.3). The chunkwise forms compute a chunk's outputs with products over
all of its tokens, the later ones masked by a zero coefficient (Eqs. 5.8-5.10); 0 * NaN is NaN, so left
alone a non-finite token would also spoil the outputs before it in its chunk (a NaN travelling backwards in
time). memory_forward and reference.chunked therefore cut a call at the first token whose k or v is not
finite, run the part before it and continue from that part's state, which is exact (a call continues the
chunk schedule of its initial state, Eq. 5.6). q_t is read only at t and needs no care; the gates are
checked to be finite (inputs.NonFiniteError).

Finite inputs whose inner gradients overflow the float32 compute dtype (e.g. |v| ~ 1e30 with the l_p bias)
become non-finite inside the op and are not cut: pass float64 for such magnitudes.

Eager calls only: under torch.compile the data-dependent cut would break the graph, so it is skipped.
"""

from __future__ import annotations

from typing import Callable

import torch


def first_nonfinite(k: torch.Tensor, v: torch.Tensor) -> int | None:
    """The first token index t at which k or v ([B, T, H, D]) holds a NaN or infinity in any sequence and
    head, or None."""
    if torch.compiler.is_compiling() or k.numel() == 0:
        return None
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # [B, T, H]
    if not bool(bad.any()):
        return None
    return int(bad.any(2).any(0).nonzero()[0, 0])


def cut_call(fn: Callable, cut: int, q, k, v, spec, gates: tuple, *, scale: float, initial_state,
             output_final_state: bool, chunk_size: int, cu_seqlens):
    """fn (memory_forward or reference.chunked) over tokens [0, cut), then over [cut, T) from that state;
    with cu_seqlens every packed sequence is cut at the same global index (sequences wholly on one side
    get an empty part, which leaves their state as it is)."""
    head = lambda x: None if x is None else x[:, :cut]  # noqa: E731
    tail = lambda x: None if x is None else x[:, cut:]  # noqa: E731
    cu_head = None if cu_seqlens is None else cu_seqlens.clamp(max=cut)
    cu_tail = None if cu_seqlens is None else cu_seqlens.clamp(min=cut) - cut
    o_head, state = fn(head(q), head(k), head(v), spec, *map(head, gates), scale=scale, initial_state=initial_state,
                       output_final_state=True, chunk_size=chunk_size, cu_seqlens=cu_head)
    o_tail, state = fn(tail(q), tail(k), tail(v), spec, *map(tail, gates), scale=scale, initial_state=state,
                       output_final_state=output_final_state, chunk_size=chunk_size, cu_seqlens=cu_tail)
    return torch.cat([o_head, o_tail], dim=1), state
