"""Parameter counts of the presets, counted on the meta device (no memory, instant)."""

from __future__ import annotations

import torch

from .model import MirasForCausalLM
from .presets import PRESETS, SIZES, preset


def count_parameters(name: str, size: str, **overrides) -> int:
    """Parameters of preset `name` at `size` (tied embeddings counted once)."""
    with torch.device("meta"):
        model = MirasForCausalLM(preset(name, size, **overrides))
    return model.num_parameters()


def parameter_table() -> dict[str, dict[str, int]]:
    return {name: {size: count_parameters(name, size) for size in SIZES} for name in PRESETS}
