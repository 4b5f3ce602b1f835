"""miras_ext: compiled ops for the Miras associative-memory sequence models."""

import torch  # noqa: F401  (loads libtorch, which the compiled module links against)

from ._build import build_info, check_torch

check_torch()

from . import _C  # noqa: E402,F401  (registers the torch.ops.miras_ext operators)
from .ops import bias_grad  # noqa: E402

__all__ = ["bias_grad", "build_info"]
