"""Miras language models: layers, blocks, the causal LM, presets, the decoding cache and generate().

    >>> import torch
    >>> from miras_ext.models import MirasForCausalLM, preset
    >>> model = MirasForCausalLM(preset("moneta", "tiny"))
    >>> out = model(torch.randint(0, 256, (2, 16)), labels=torch.randint(0, 256, (2, 16)))
    >>> out.logits.shape
    torch.Size([2, 16, 256])
"""

from .attention import Attention, KVCache
from .cache import Cache
from .config import MirasConfig
from .conv import ShortConv
from .params import count_parameters, parameter_table
from .generate import generate, sample_next
from .miras_layer import LowRankGate, MirasCache, MirasLayer
from .model import Block, CausalLMOutput, MirasForCausalLM
from .norm import RMSNorm, SwiGLU
from .presets import PRESETS, SIZES, preset

__all__ = ["Attention", "Block", "Cache", "CausalLMOutput", "KVCache", "LowRankGate", "MirasCache", "MirasConfig",
           "MirasForCausalLM", "MirasLayer", "PRESETS", "RMSNorm", "SIZES", "ShortConv", "SwiGLU",
           "count_parameters", "generate", "parameter_table", "preset", "sample_next"]
