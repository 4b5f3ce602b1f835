"""The retention gate: the links phi, whose value phi(Z) of the state Z is what a memory reads and
differentiates (docs/math.md, Eqs. 3.3-3.8; identity for retention "none" and "l2"), and alpha's decay over
a chunk (Eq. 5.7)."""

from __future__ import annotations

import torch

from ..spec import MemorySpec


def link(spec: MemorySpec, z: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """phi(Z) for one weight tensor; z [..., *shape], the per-head shape last."""
    r = spec.retention
    if r in ("none", "l2"):  # Eq. 3.1
        return z
    if r == "lq":  # Eq. 3.5: W = A / ||A||_q^(q-2), one norm per weight tensor and head
        q = spec.norm_order
        dims = tuple(range(-len(shape), 0))
        powers = z.abs().pow(q)
        total = (powers.mean(dim=dims, keepdim=True) if spec.norm_mean else powers.sum(dim=dims, keepdim=True))
        total = total + spec.norm_floor
        return z * total.pow(-(q - 2.0) / q)
    if r == "kl":  # Eq. 3.6: c * row softmax of the logits
        return spec.kl_scale(shape) * torch.softmax(z, dim=-1)
    if r == "elastic_net":  # Eq. 3.7: soft threshold
        return torch.sign(z) * torch.relu(z.abs() - spec.shrinkage)
    if r == "sigmoid":  # Eq. 3.8: Bregman divergence of the binary entropy
        return torch.sigmoid(z)
    raise ValueError(f"retention: unknown retention {r!r}")


def decay(gate: torch.Tensor | None, like: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5.7 for a gate over the chunk's token axis (2), alpha's or (reference/algorithm.py) momentum's: D[t, i] = prod_{i < j <= t} gate_j for i <= t,
    else 0, as [.., n, n] or [.., n, n, D], and the running product prod_{j <= t} gate_j. A missing gate
    is 1.

    Products, not exponentials of cumulative logs: a momentum gate may be exactly 0, and the gradient
    there must still be exact."""
    g = torch.ones_like(like) if gate is None else gate
    n = g.shape[2]
    lower = torch.ones(n, n, dtype=torch.bool, device=g.device).tril()
    below = lower.tril(-1)
    if per_channel:
        lower, below, rows = lower.unsqueeze(-1), below.unsqueeze(-1), g.unsqueeze(3)
    else:
        rows = g.unsqueeze(-1)
    # L[t, i] = g_t for i < t, else 1; the running product of L over t is D on and below the diagonal.
    steps = torch.where(below, rows, torch.ones_like(rows))
    return torch.cumprod(steps, dim=2) * lower, torch.cumprod(g, dim=2)
