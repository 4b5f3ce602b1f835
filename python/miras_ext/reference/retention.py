"""Retention links phi: the weights a memory reads and differentiates are phi(Z) of its state Z
(docs/math.md, Eqs. 3.3-3.8). Identity for retention "none" and "l2"."""

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
        total = z.abs().pow(q).sum(dim=dims, keepdim=True) + spec.norm_floor
        return z * total.pow(-(q - 2.0) / q)
    if r == "kl":  # Eq. 3.6: c * row softmax of the logits
        return spec.kl_scale(shape) * torch.softmax(z, dim=-1)
    if r == "elastic_net":  # Eq. 3.7: soft threshold
        return torch.sign(z) * torch.relu(z.abs() - spec.shrinkage)
    if r == "sigmoid":  # Eq. 3.8: Bregman divergence of the binary entropy
        return torch.sigmoid(z)
    raise ValueError(f"retention: unknown retention {r!r}")
