"""Running a dense [N, T, H, D] memory function over a padded batch or over packed sequences."""

from __future__ import annotations

from typing import Callable

import torch

from ..inputs import Call, compute_dtype
from ..state import MemoryState, concat, select

Dense = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict, MemoryState], tuple[torch.Tensor, MemoryState]]


def run(dense: Dense, call: Call, cu_seqlens: torch.Tensor | None, output_final_state: bool
        ) -> tuple[torch.Tensor, MemoryState | None]:
    """o [B, T, H, Dv] in the input dtype, and the final state (or None). With cu_seqlens every sequence
    starts from its own initial state and nothing crosses a sequence boundary."""
    q, k, v = (x.to(compute_dtype(call.out_dtype)) for x in (call.q, call.k, call.v))
    if cu_seqlens is None:
        o, state = dense(q, k, v, call.gates, call.state)
    else:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
            gates = {n: None if g is None else g[:, s:e] for n, g in call.gates.items()}
            o, st = dense(q[:, s:e], k[:, s:e], v[:, s:e], gates, select(call.state, i))
            outs.append(o)
            states.append(st)
        o, state = torch.cat(outs, dim=1), concat(states)
    return o.to(call.out_dtype), (state._replace(chunk_size=call.chunk_size) if output_final_state else None)
