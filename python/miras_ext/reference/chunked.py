"""The chunkwise (mini-batch) Miras algorithm (docs/math.md, Section 5) in plain PyTorch tensor ops.

Inside a chunk every token's gradient is taken at one anchor state (Eq. 5.1), which makes the state a
linear function of rank-one gradient factors (Eqs. 5.7-5.9). Reads use the dual form (Eq. 5.10) when the
weights are the state itself; with a nonlinear retention link (and for vector memory) the state of every
token is materialised and read exactly (Eq. 5.11). With chunk_size 1 this is the recurrence of
reference/recurrent.py. The delta rule (MemorySpec.exact_chunks) is computed token by token here, the exact
recurrence at every chunk size; the compiled op computes it chunk by chunk (Eqs. 5.13-5.19). Decoding is
this function called with T = 1 on the previous final state.
"""

from __future__ import annotations

import torch

from ..inputs import check_call, chunk_phase
from ..nonfinite import causal
from ..spec import MemorySpec
from ..state import MemoryState
from .algorithm import coefficients
from .memory import activation, apply, gate_view, layer_norm, linear, token_gradients
from .retention import link
from .sequences import run


def segments(phase: int, length: int, chunk_size: int, lag_token: bool) -> list[tuple[int, int, bool]]:
    """(start, end, starts_a_chunk) for each run of tokens that shares one anchor (Eq. 5.6). `phase` is the
    position of the first token within its chunk; a run that does not start a chunk continues the anchor
    of the state it is given."""
    def boundary(j: int) -> bool:
        ph = (phase + j) % chunk_size
        return ph == 0 or (lag_token and ph == 1)

    starts = [0] + [j for j in range(1, length) if boundary(j)]
    return [(s, e, boundary(s)) for s, e in zip(starts, starts[1:] + [length])]


def _runs(spec: MemorySpec, phase: int, length: int, chunk_size: int) -> list[tuple[int, int, bool]]:
    """The runs the reference computes: the chunk schedule's segments (Eq. 5.6), split into single tokens
    for the exact delta rule (MemorySpec.exact_chunks), each marked fresh only where its segment starts:
    the anchor still follows the schedule, though nothing reads it."""
    runs = segments(phase, length, chunk_size, spec.lag_token)
    if not spec.exact_chunks:
        return runs
    return [(t, t + 1, fresh and t == s) for s, e, fresh in runs for t in range(s, e)]


class _Chunk:
    """One run of n tokens sharing an anchor: its coefficients and gradient factors."""

    def __init__(self, spec: MemorySpec, shapes, per_channel: bool, k, v, g, z, s, anchor):
        self.spec, self.shapes, self.per_channel = spec, shapes, per_channel
        self.z, self.s = z, s
        c = coefficients(g["lr"], g["alpha"], g["momentum"] if s else None, per_channel)
        self.retained, self.coef, self.carry, self.mkeep, self.mcoef = c.retained, c.coef, c.carry, c.mkeep, c.mcoef
        weights = [link(spec, anchor[i], shapes[i]) for i in range(len(anchor))]
        self.deltas, self.inputs = token_gradients(
            spec, weights, k, v, g["delta"], self.retained if spec.grad_at_retained else None)

    def view(self, i: int, gate: torch.Tensor) -> torch.Tensor:
        return gate_view(self.spec, i, gate, self.per_channel)

    def accumulate(self, i: int, coef: torch.Tensor) -> torch.Tensor:
        """sum_j coef[t, j] G_j for weight tensor i, [N, H, t, *shape] (Eq. 5.3 factors)."""
        d, a = self.deltas[i], self.inputs[i]
        if self.spec.memory == "vector":
            return torch.einsum("nhtjd,nhjd->nhtd" if self.per_channel else "nhtj,nhjd->nhtd", coef, d * a)
        # Scale one factor first so the sum over j is a single batched matrix product.
        if self.per_channel and self.spec.gate_axis(i) == 1:
            return torch.einsum("nhjo,nhtji->nhtoi", d, coef * a.unsqueeze(2))
        scaled = (coef if self.per_channel else coef.unsqueeze(-1)) * d.unsqueeze(2)
        return torch.einsum("nhtjo,nhji->nhtoi", scaled, a)

    def states(self, i: int, rows: slice) -> torch.Tensor:
        """Z_t of weight tensor i for the tokens in `rows` (Eqs. 5.8, 5.9), [N, H, t, *shape]."""
        z = self.view(i, self.retained[:, :, rows]) * self.z[i].unsqueeze(2)
        if self.s:
            z = z + self.view(i, self.carry[:, :, rows]) * self.s[i].unsqueeze(2)
        return z - self.accumulate(i, self.coef[:, :, rows])

    def end_momentum(self, i: int) -> torch.Tensor:
        last = slice(-1, None)
        s = self.view(i, self.mkeep[:, :, last]) * self.s[i].unsqueeze(2) - self.accumulate(i, self.mcoef[:, :, last])
        return s.squeeze(2)

    def _gated(self, i: int, gate: torch.Tensor, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(gate_t * W) a_t for every token t, W shared (the diagonal part of Eq. 5.10)."""
        if self.per_channel and self.spec.gate_axis(i) == 1:
            return linear(w, gate * a)
        return (gate if self.per_channel else gate.unsqueeze(-1)) * linear(w, a)

    def dual_linear(self, i: int, a: torch.Tensor) -> torch.Tensor:
        """W_t a_t for every token t without forming W_t (Eq. 5.10)."""
        out = self._gated(i, self.retained, self.z[i], a)
        if self.s:
            out = out + self._gated(i, self.carry, self.s[i], a)
        d, ai, c = self.deltas[i], self.inputs[i], self.coef
        if not self.per_channel:
            return out - (c * (a @ ai.mT)) @ d
        if self.spec.gate_axis(i) == 0:
            return out - torch.einsum("nhtjo,nhtj,nhjo->nhto", c, a @ ai.mT, d)
        return out - torch.einsum("nhtji,nhji,nhti->nhtj", c, ai, a) @ d

    def read(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.linked or spec.memory == "vector":  # Eq. 5.11
            weights = [link(spec, self.states(i, slice(None)), self.shapes[i]) for i in range(len(self.z))]
            return apply(spec, weights, x)
        h = x
        for i in range(len(self.z)):
            h = self.dual_linear(i, h)
            if i < len(self.z) - 1:
                h = activation(spec, h)
        return x + layer_norm(spec, h) if spec.memory == "mlp" and spec.residual_norm else h


@causal
def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MemorySpec, lr: torch.Tensor,
            alpha: torch.Tensor | None = None, momentum: torch.Tensor | None = None,
            delta: torch.Tensor | None = None, *, scale: float = 1.0, initial_state=None,
            output_final_state: bool = False, chunk_size: int = 64, cu_seqlens: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, MemoryState | None]:
    """The chunkwise algorithm; arguments and shapes as reference.recurrent, plus chunk_size >= 1.

    Chunks are aligned to each sequence's start (position 0 of its state); the final state carries the
    current chunk's anchor so that a later call, for example decoding one token at a time, continues
    exactly where one call over the whole sequence would be. A non-finite value at a token (in k, v or an
    inner gradient) changes no output before it (miras_ext.nonfinite).
    """
    call = check_call(q, k, v, lr, alpha, momentum, delta, spec, scale, initial_state, chunk_size, cu_seqlens)
    shapes = spec.weight_shapes(q.shape[-1], v.shape[-1])

    def dense(q, k, v, gates, state):
        t_len = q.shape[1]
        if t_len == 0 or q.shape[0] == 0:
            return q.new_zeros(*q.shape[:3], v.shape[-1]), state
        phase = chunk_phase(state.position, chunk_size)
        z, s, anchor = list(state.memory), list(state.momentum), list(state.anchor)
        outs = []
        for start, end, fresh in _runs(spec, phase, t_len, chunk_size):
            if fresh:
                anchor = list(z)
            part = lambda x: x[:, start:end].transpose(1, 2)  # noqa: E731  [N, H, n, ...]
            g = {name: None if x is None else part(x) for name, x in gates.items()}
            # The exact delta rule steps one token at a time from its state (its gradient point, Eq. 3.1 or,
            # with grad_at_retained, alpha_t times it through `retained`, Eq. 3.2).
            chunk = _Chunk(spec, shapes, call.per_channel, part(k), part(v), g, z, s,
                           z if spec.exact_chunks else anchor)
            outs.append(chunk.read(scale * part(q)).transpose(1, 2))
            last = slice(-1, None)
            z_next = [chunk.states(i, last).squeeze(2) for i in range(len(z))]
            if spec.grad_at_retained:  # the anchor keeps decaying with the state (Eq. 5.2)
                anchor = [chunk.view(i, chunk.retained[:, :, -1]) * anchor[i] for i in range(len(z))]
            s = [chunk.end_momentum(i) for i in range(len(s))]
            z = z_next
        return torch.cat(outs, dim=1), MemoryState(tuple(z), tuple(s), tuple(anchor), state.position + t_len)

    return run(dense, call, cu_seqlens, output_final_state)
