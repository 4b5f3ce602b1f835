"""Python entry points of the torch.ops.miras_ext memory operators, with their fake and autograd registrations."""

from .memory import (delta_forward, gated_delta_forward, linear_attention_forward, memora_forward, memory_forward,
                     memory_step, moneta_forward, titans_forward, yaad_forward)

__all__ = ["delta_forward", "gated_delta_forward", "linear_attention_forward", "memora_forward",
           "memory_forward", "memory_step", "moneta_forward", "titans_forward", "yaad_forward"]
