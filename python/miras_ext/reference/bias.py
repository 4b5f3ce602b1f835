"""Attentional biases: the inner losses of docs/math.md, Section 2.

Each bias is a loss l(y, v) of the memory's prediction y = M(W, k) and the value v, summed over the last
(value) axis. Two things are defined here, on purpose separately:

* ``loss``: the loss exactly as written in docs/math.md (Eqs. 2.1-2.8). The recurrent reference takes the
  memory gradient of this with torch autograd, so it is an oracle independent of any hand-derived formula.
* ``output_grad``: dl/dy by the hand-derived formulas (Eqs. 2.9-2.16) that the chunked reference and the
  compiled kernels use. Tests check it against autograd of ``loss``.

Shapes: y, v [..., Dv]; delta None, [...] (one threshold per row) or [..., Dv] (per channel, "huber" only).
"""

from __future__ import annotations

import torch

from ..spec import BIASES


def effective_p(bias: str, p: float) -> float:
    """l1 is l_p with p = 1 (Eq. 2.4); every other bias ignores p."""
    return 1.0 if bias == "l1" else p


def _row(delta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # A per-row threshold broadcast against [..., Dv].
    return delta.unsqueeze(-1) if delta.dim() == y.dim() - 1 else delta


def loss(y: torch.Tensor, v: torch.Tensor, bias: str, delta: torch.Tensor | None = None,
         p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """The inner loss of each row, shape [...] (Eqs. 2.1-2.8)."""
    r = y - v
    if bias == "dot":  # Eq. 2.1
        return -(y * v).sum(-1)
    if bias == "l2":  # Eq. 2.2
        return 0.5 * (r * r).sum(-1)
    if bias in ("lp", "l1"):  # Eqs. 2.3, 2.4
        pe = effective_p(bias, p)
        return ((r * r + eps) ** (pe / 2)).sum(-1) / pe
    d = _row(delta, y)
    if bias == "huber":  # Eq. 2.5
        a = r.abs()
        return torch.where(a <= d, 0.5 * r * r, d * (a - 0.5 * d)).sum(-1)
    sq = (r * r).sum(-1, keepdim=True)
    if bias == "huber_norm":  # Eq. 2.6
        n = sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
        return torch.where(sq <= d * d, 0.5 * sq, d * (n - 0.5 * d)).squeeze(-1)
    if bias == "yaad":  # Eq. 2.7
        l1 = (r * r + eps).sqrt().sum(-1, keepdim=True)
        return torch.where(sq <= d * d, 0.5 * sq, d * l1).squeeze(-1)
    if bias == "value_shift":  # Eq. 2.8
        return (0.5 * sq + d * (sq + eps).sqrt() + 0.5 * d * d).squeeze(-1)
    raise ValueError(f"bias: unknown attentional bias {bias!r}; expected one of {BIASES}")


def output_grad(y: torch.Tensor, v: torch.Tensor, bias: str, delta: torch.Tensor | None = None,
                p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """dl/dy by the closed forms of Eqs. 2.9-2.16, shape [..., Dv]."""
    if bias == "dot":  # Eq. 2.9
        return -v
    r = y - v
    if bias == "l2":  # Eq. 2.10
        return r
    if bias in ("lp", "l1"):  # Eqs. 2.11, 2.12
        pe = effective_p(bias, p)
        return r * (r * r + eps) ** (pe / 2 - 1)
    d = _row(delta, y)
    if bias == "huber":  # Eq. 2.13
        return torch.maximum(torch.minimum(r, d), -d)
    sq = (r * r).sum(-1, keepdim=True)
    inside = sq <= d * d
    if bias == "huber_norm":  # Eq. 2.14
        return torch.where(inside, r, d * r * torch.rsqrt(sq.clamp_min(torch.finfo(sq.dtype).tiny)))
    if bias == "yaad":  # Eq. 2.15
        return torch.where(inside, r, d * r * torch.rsqrt(r * r + eps))
    if bias == "value_shift":  # Eq. 2.16
        return r + d * r * torch.rsqrt(sq + eps)
    raise ValueError(f"bias: unknown attentional bias {bias!r}; expected one of {BIASES}")
