"""The Miras recurrence token by token (docs/math.md, Eqs. 3.1-3.8, 4.1-4.2 and 5.1-5.2).

The memory gradient of the attentional bias comes from torch autograd (torch.func.grad) of the loss as
written in reference/bias.py, not from a hand-derived formula, so this is an independent oracle. With
chunk_size 1 (the default) it is the exact recurrence; with chunk_size b it takes each token's gradient at
the anchor of its chunk (Eq. 5.1), which defines what the chunkwise algorithm computes, one token at a time.
The delta rule (MemorySpec.exact_chunks) is exact at every chunk size: its gradient is always at the
previous state.
"""

from __future__ import annotations

import torch

from ..inputs import check_call
from ..spec import MemorySpec
from ..state import MemoryState
from . import bias as biases
from .algorithm import step
from .memory import apply, gate_view
from .retention import link
from .sequences import run


def recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MemorySpec, lr: torch.Tensor,
              alpha: torch.Tensor | None = None, momentum: torch.Tensor | None = None,
              delta: torch.Tensor | None = None, *, scale: float = 1.0, initial_state=None,
              output_final_state: bool = False, chunk_size: int = 1, cu_seqlens: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, MemoryState | None]:
    """Write each token into the memory, then read it at the query (Eq. 4.3).

    Args:
        q, k: [B, T, H, Dk] queries and keys. v: [B, T, H, Dv] values.
        spec: the MemorySpec (architecture, bias, retention, algorithm).
        lr: learning rate eta >= 0, [B, T, H] or [B, T, H, Dv] (per channel).
        alpha: retention in (0, 1], same layout as lr; None for retention "none".
        momentum: momentum coefficient in [0, 1), same layout as lr; algorithm "momentum" only.
        delta: threshold > 0 of the Huber-type biases, [B, T, H] ([B, T, H, Dv] for bias "huber").
        scale: multiplies q before the read.
        initial_state: None (zeros; required for MLP memory), a tuple of weight tensors, one per layer,
            each [N, H, *shape] or [H, *shape] (see MemorySpec.weight_shapes), or a MemoryState.
        output_final_state: return the MemoryState after the last token.
        chunk_size: gradients are taken at the state where the token's chunk began (Eq. 5.1); 1 is exact.
        cu_seqlens: [N + 1] offsets of N sequences packed along T (B must be 1).

    Returns:
        o [B, T, H, Dv] and the final MemoryState (None unless output_final_state).
    """
    call = check_call(q, k, v, lr, alpha, momentum, delta, spec, scale, initial_state, chunk_size, cu_seqlens)
    shapes = spec.weight_shapes(q.shape[-1], v.shape[-1])

    def loss(weights, k_t, v_t, delta_t):
        return biases.loss(apply(spec, weights, k_t), v_t, spec.bias, delta_t, spec.p, spec.eps).sum()

    inner_grad = torch.func.grad(loss)

    def dense(q, k, v, gates, state):
        if q.shape[1] == 0:
            return q.new_zeros(*q.shape[:3], v.shape[-1]), state
        z, s, anchor = list(state.memory), list(state.momentum), list(state.anchor)
        outs = []
        for t in range(q.shape[1]):
            g = {n: None if x is None else x[:, t] for n, x in gates.items()}
            view = lambda name, i: gate_view(spec, i, g[name], call.per_channel)  # noqa: E731
            phase = torch.remainder(state.position + t, chunk_size)
            fresh = (phase == 0) | (spec.lag_token & (phase == 1))  # Eq. 5.6
            for i in range(len(z)):
                starts = fresh.view(-1, *[1] * (z[i].dim() - 1))
                anchor[i] = torch.where(starts, z[i], anchor[i])
                if spec.grad_at_retained:  # Eqs. 3.2, 5.2
                    anchor[i] = view("alpha", i) * anchor[i]
            # The delta rule is exact at every chunk size (Eqs. 5.13-5.19): its gradient is at the previous
            # state (times alpha_t, Eq. 3.2), whatever the anchor, which is still carried for the schedule.
            at = [view("alpha", i) * z[i] if spec.grad_at_retained else z[i] for i in range(len(z))] \
                if spec.exact_chunks else anchor
            w = [link(spec, at[i], shapes[i]) for i in range(len(z))]
            grads = inner_grad(w, k[:, t], v[:, t], g["delta"])
            for i in range(len(z)):
                kept = view("alpha", i) * z[i] if g["alpha"] is not None else z[i]
                z[i], s_i = step(kept, view("lr", i) * grads[i], s[i] if s else None,
                                 view("momentum", i) if s else None)
                if s:
                    s[i] = s_i
            outs.append(apply(spec, [link(spec, z[i], shapes[i]) for i in range(len(z))], scale * q[:, t]))
        o = torch.stack(outs, dim=1)
        return o, MemoryState(tuple(z), tuple(s), tuple(anchor), state.position + q.shape[1])

    return run(dense, call, cu_seqlens, output_final_state)
