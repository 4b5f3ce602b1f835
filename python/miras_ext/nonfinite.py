"""Non-finite values: a NaN or infinity at token t never changes an output before t.

A NaN or infinity in k_t or v_t, or an inner gradient that overflows at token t (e.g. |v_t| ~ 1e30 under
the l_p bias in float32), makes the memory non-finite from t on, and with it the outputs from t on: that is
the recurrence (Eqs. 4.1-4.3). The chunkwise forms compute the outputs of a run of tokens that share an
anchor (Eq. 5.6) with products over all of the run's tokens, the later ones masked by a zero coefficient
(Eqs. 5.8-5.10); 0 * NaN is NaN, so the outputs of the whole run can become non-finite, including those
before t. Runs before it are not affected: they never see its tokens.

`causal` wraps memory_forward and reference.chunked: when an output is non-finite, each sequence is redone
alone: the runs before the first non-finite output as one call, then token by token (T = 1 calls, each an
exact continuation of the state) up to the first non-finite output, which is then that token's own; the
rest continues from there as one call (as plain as the first when the state has become non-finite, else
contained again). The outputs before the first bad token are then those of the finite prefix. Other calls
pay one sum over the output. Eager calls only: under torch.compile the data-dependent branch is skipped.
"""

from __future__ import annotations

import functools

import torch

from .inputs import check_call
from .state import MemoryState, concat, select


def _finite(xs) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in xs)


def _run_start(position: int, t: int, chunk_size: int, lag_token: bool) -> int:
    """The first token of the run (tokens sharing an anchor, Eq. 5.6) that holds token t of a call whose
    sequence starts at `position`."""
    while t > 0:
        phase = (position + t) % chunk_size
        if phase == 0 or (lag_token and phase == 1):
            return t
        t -= 1
    return 0


def _contain_one(plain, q, k, v, spec, gates, state: MemoryState, kw: dict):
    """One sequence (B = 1, no cu_seqlens) from `state`, its outputs before each bad token kept finite."""
    def call(lo: int, hi: int, st: MemoryState):
        part = lambda x: None if x is None else x[:, lo:hi]  # noqa: E731
        return plain(part(q), part(k), part(v), spec, *map(part, gates), initial_state=st, output_final_state=True,
                     **kw)

    length, t, parts = q.shape[1], 0, []
    if length == 0:  # an empty sequence of a packed call
        return call(0, 0, state)
    while t < length:
        o, end = call(t, length, state)
        bad = (~torch.isfinite(o).flatten(2).all(-1))[0]
        if not bool(bad.any()):
            parts.append(o)
            state, t = end, length
            break
        s = t + _run_start(int(state.position[0]), int(bad.nonzero()[0, 0]), kw["chunk_size"], spec.lag_token)
        if s > t:
            o, state = call(t, s, state)
            parts.append(o)
        t = s
        while t < length:  # token by token up to the first non-finite output
            o, state = call(t, t + 1, state)
            parts.append(o)
            t += 1
            if not bool(torch.isfinite(o).all()):
                break
        if not _finite((*state.memory, *state.momentum, *state.anchor)):  # nothing after t can be finite
            if t < length:
                o, state = call(t, length, state)
                parts.append(o)
            break
    return torch.cat(parts, dim=1), state


def causal(plain):
    """`plain` (memory_forward's or reference.chunked's computation, same signature) with non-finite
    values contained as the module docstring says."""
    @functools.wraps(plain)
    def forward(q, k, v, spec, lr, alpha=None, momentum=None, delta=None, *, scale: float = 1.0, initial_state=None,
                output_final_state: bool = False, chunk_size: int = 64, cu_seqlens=None):
        gates = (lr, alpha, momentum, delta)
        kw = dict(scale=scale, chunk_size=chunk_size)
        o, state = plain(q, k, v, spec, *gates, initial_state=initial_state, output_final_state=output_final_state,
                         cu_seqlens=cu_seqlens, **kw)
        # One reduction: a NaN or infinity anywhere makes the sum non-finite (a sum that merely overflows costs a
        # needless second look); float16 outputs are summed in float32, where they cannot overflow.
        total = o.sum(dtype=torch.float64 if o.dtype == torch.float64 else torch.float32)
        if torch.compiler.is_compiling() or bool(torch.isfinite(total)):
            return o, state
        start = check_call(q, k, v, *gates, spec, scale, initial_state, chunk_size, cu_seqlens).state
        if cu_seqlens is None:
            pieces = [(slice(b, b + 1), slice(None)) for b in range(q.shape[0])]
        else:
            offsets = cu_seqlens.tolist()
            pieces = [(slice(None), slice(a, b)) for a, b in zip(offsets, offsets[1:])]
        outs, states = [], []
        for i, (rows, span) in enumerate(pieces):
            part = lambda x: None if x is None else x[rows, span]  # noqa: E731
            o_i, st_i = _contain_one(plain, part(q), part(k), part(v), spec, tuple(map(part, gates)),
                                     select(start, i), kw)
            outs.append(o_i)
            states.append(st_i)
        o = torch.cat(outs, dim=0 if cu_seqlens is None else 1)
        return o, (concat(states)._replace(chunk_size=chunk_size) if output_final_state else None)

    return forward
