"""miras_ext: the Miras associative-memory sequence models for PyTorch.

- ``MemorySpec``: what a memory computes (architecture, attentional bias, retention, algorithm).
- ``reference``: the pure-PyTorch definitions, ``reference.recurrent`` and ``reference.chunked``.
- ``MemoryState``: the state a call returns and accepts to continue a sequence.
- compiled operators (``bias_grad``) and ``build_info()``.
"""

import torch  # noqa: F401  (loads libtorch, which the compiled module links against)

from ._build import build_info, check_torch

check_torch()

from . import _C  # noqa: E402,F401  (registers the torch.ops.miras_ext operators)
from . import reference  # noqa: E402
from .ops import bias_grad  # noqa: E402
from .spec import MemorySpec  # noqa: E402
from .state import MemoryState  # noqa: E402

__all__ = ["MemorySpec", "MemoryState", "bias_grad", "build_info", "reference"]
