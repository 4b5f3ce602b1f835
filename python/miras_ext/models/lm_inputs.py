"""Validation of MirasForCausalLM.forward's token ids, labels and sequence offsets.

Without it a bad id is an IndexError inside the embedding (on a GPU, a device-side assert), and a label of
the wrong shape a cross-entropy message about batch sizes that names neither argument.
"""

from __future__ import annotations

import torch

from ..inputs import check_cu_seqlens

IGNORE_INDEX = -100  # a label that is not scored (the padding of cross-entropy)


def _ids_range(name: str, x: torch.Tensor, vocab_size: int, ignore: bool) -> None:
    # Reading the values breaks a torch.compile graph, so compiled calls skip it (as the memory op's checks do).
    if x.numel() == 0 or torch.compiler.is_compiling():
        return
    valid = (x >= 0) & (x < vocab_size)
    if ignore:
        valid |= x == IGNORE_INDEX
    if not bool(valid.all()):
        bad = x[~valid]
        extra = f" or {IGNORE_INDEX} (ignored)" if ignore else ""
        raise ValueError(f"{name}: token ids must lie in [0, vocab_size = {vocab_size}){extra}, got "
                         f"{bad.numel()} outside (min {int(bad.min())}, max {int(bad.max())})")


def _ids(name: str, x, shape: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor {shape} of token ids, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: expected integer token ids (torch.long or torch.int32), got {x.dtype}")
    return x


def check_lm_inputs(input_ids, labels, cu_seqlens, vocab_size: int) -> None:
    """input_ids [B, T >= 1] in [0, vocab_size); labels like input_ids (or IGNORE_INDEX); cu_seqlens
    non-decreasing offsets from 0 to T with B = 1. ValueError naming the argument otherwise."""
    _ids("input_ids", input_ids, "[B, T]")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [B, T], got shape {list(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected at least one token per sequence, got shape {list(input_ids.shape)}")
    _ids_range("input_ids", input_ids, vocab_size, ignore=False)
    if labels is not None:
        _ids("labels", labels, "[B, T]")
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels: expected the shape of input_ids {list(input_ids.shape)} (aligned token ids, "
                             f"shifted inside), got {list(labels.shape)}")
        _ids_range("labels", labels, vocab_size, ignore=True)
    if cu_seqlens is not None:
        if input_ids.shape[0] != 1:
            raise ValueError(f"cu_seqlens: packed sequences need B = 1, got B = {input_ids.shape[0]}")
        check_cu_seqlens(cu_seqlens, input_ids.shape[1])
