"""Python entry points of the torch.ops.miras_ext memory operators: memory.py (memory_forward, memory_step),
presets.py (one function per Table 1 model), autograd.py (the operators' fake and autograd registrations)."""

from .memory import memory_forward, memory_step
from .presets import (delta_forward, gated_delta_forward, linear_attention_forward, memora_forward, moneta_forward,
                      titans_forward, yaad_forward)

__all__ = ["delta_forward", "gated_delta_forward", "linear_attention_forward", "memora_forward",
           "memory_forward", "memory_step", "moneta_forward", "titans_forward", "yaad_forward"]
