"""Causal depthwise convolution (kernel conv_size, SiLU) with a decoding state and packed sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def positions_in_sequence(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T] position of each packed token inside its own sequence."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


def sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T] index of the sequence each packed token belongs to."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=total)


class ShortConv(nn.Module):
    """y_t = silu(sum_{j < K} w_j (.) x_{t-j} + b), per channel; x_{t-j} is zero before the sequence start.

    The decoding state is the last K - 1 inputs, [B, K - 1, C] (oldest first). With cu_seqlens (packed
    sequences, B = 1) a token never sees an input of another sequence.
    """

    def __init__(self, channels: int, kernel: int = 4):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, kernel))  # weight[:, j] multiplies x_{t-j}
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.uniform_(self.weight, -kernel ** -0.5, kernel ** -0.5)
        with torch.no_grad():
            self.weight[:, 0] += 1.0  # start near the identity: the current token dominates

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, c = x.shape
        k = self.kernel
        keep = None
        if cu_seqlens is not None:
            if state is not None:
                raise ValueError("cu_seqlens: packed sequences start fresh; a convolution state is not accepted")
            keep = positions_in_sequence(cu_seqlens, t)  # [T]
        if state is None:
            state = x.new_zeros(b, k - 1, c)
        xx = torch.cat([state.to(x.dtype), x], dim=1)  # [B, K - 1 + T, C]
        y = x.new_zeros(b, t, c) + self.bias
        for j in range(k):
            term = xx[:, k - 1 - j: k - 1 - j + t] * self.weight[:, j]
            if keep is not None and j > 0:
                term = term * (keep >= j).to(x.dtype)[None, :, None]
            y = y + term
        return F.silu(y), xx[:, xx.shape[1] - (k - 1):]
