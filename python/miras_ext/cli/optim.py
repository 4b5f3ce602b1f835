"""The optimiser's parameter groups and the learning-rate schedule of a run."""

from __future__ import annotations

import math

from torch import nn

from ..models.miras_layer import LowRankGate
from .arguments import TrainArgs


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weights of linear layers and the embedding; none on norms, biases, gates (their
    low-rank projections, A_log), convolutions and the initial memory states (docs/math.md Sec. 8 pt 14)."""
    decay, rest = [], []
    gate_params = {id(p) for m in model.modules() if isinstance(m, LowRankGate) for p in m.parameters()}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_matrix = isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight"
            (decay if is_matrix and id(p) not in gate_params else rest).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


def lr_at(step: int, a: TrainArgs) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    span = max(a.steps - a.warmup, 1)
    progress = min((step - a.warmup) / span, 1.0)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
