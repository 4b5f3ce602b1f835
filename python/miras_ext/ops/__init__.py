"""Python entry points of the torch.ops.miras_ext operators, with their fake and autograd registrations."""

from .bias_grad import bias_grad
from .memory import (delta_forward, gated_delta_forward, linear_attention_forward, memora_forward, memory_forward,
                     memory_step, moneta_forward, titans_forward, yaad_forward)

__all__ = ["bias_grad", "delta_forward", "gated_delta_forward", "linear_attention_forward", "memora_forward",
           "memory_forward", "memory_step", "moneta_forward", "titans_forward", "yaad_forward"]
