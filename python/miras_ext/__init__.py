"""miras_ext: the Miras associative-memory sequence models for PyTorch.

- ``MemorySpec``: what a memory computes (architecture, attentional bias, retention, algorithm).
- ``reference``: the pure-PyTorch definitions, ``reference.recurrent`` and ``reference.chunked``.
- ``MemoryState``: the state a call returns and accepts to continue a sequence.
- compiled operators: ``memory_forward`` (same signature as ``reference.chunked``), ``memory_step`` (one
  decoding step), the presets of docs/math.md Table 1 (``moneta_forward``, ``yaad_forward``,
  ``memora_forward``, ``titans_forward``, ``gated_delta_forward``, ``delta_forward``,
  ``linear_attention_forward``); and ``build_info()``.
- ``testing``: ``bias_grad``, the attentional biases' gradients as an op of their own, for tests and benches.
"""

import torch  # noqa: F401  (loads libtorch, which the compiled module links against)

from ._build import build_info, check_torch

check_torch()

from . import _C  # noqa: E402,F401  (registers the torch.ops.miras_ext operators)
from . import reference  # noqa: E402
from .ops import (delta_forward, gated_delta_forward, linear_attention_forward,  # noqa: E402
                  memora_forward, memory_forward, memory_step, moneta_forward, titans_forward, yaad_forward)
from .spec import MemorySpec  # noqa: E402
from .state import MemoryState  # noqa: E402
from . import models  # noqa: E402  (language models: miras_ext.models)

__all__ = ["MemorySpec", "MemoryState", "build_info", "delta_forward", "gated_delta_forward",
           "linear_attention_forward", "memora_forward", "memory_forward", "memory_step", "moneta_forward",
           "reference", "titans_forward", "yaad_forward"]
