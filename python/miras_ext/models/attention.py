"""Causal self-attention with RoPE (Transformer++) and its sliding-window variant (the hybrids' SWA
layers), both through torch.nn.functional.scaled_dot_product_attention, with a KV cache."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .conv import positions_in_sequence, sequence_ids


class KVCache(NamedTuple):
    """Keys and values [B, H, L, D] after RoPE; a sliding-window layer keeps only the last `window`."""

    k: torch.Tensor
    v: torch.Tensor


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of x [B, T, H, D] at integer positions [T]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]            # [T, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    """Multi-head causal attention; window=None is full attention, else each query sees the last `window`
    keys (itself included). RoPE on q and k only here (docs/math.md Section 8 point 12)."""

    def __init__(self, dim: int, n_heads: int, rope_theta: float, window: int | None = None):
        super().__init__()
        self.n_heads, self.head_dim, self.theta, self.window = n_heads, dim // n_heads, rope_theta, window
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, offset: int = 0, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache | None]:
        b, t, _ = x.shape
        h, d = self.n_heads, self.head_dim
        q, k, v = (proj(x).view(b, t, h, d) for proj in (self.q, self.k, self.v))
        if cu_seqlens is not None:
            pos = positions_in_sequence(cu_seqlens, t)
        else:
            pos = torch.arange(offset, offset + t, device=x.device)
        q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))                     # [B, H, T, D]
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        length = k.shape[2]
        past = length - t
        mask = None
        if cu_seqlens is not None:
            seq = sequence_ids(cu_seqlens, t)
            qi = torch.arange(t, device=x.device)
            mask = (seq[:, None] == seq[None, :]) & (qi[None, :] <= qi[:, None])
            if self.window is not None:
                mask &= qi[:, None] - qi[None, :] < self.window
        elif past > 0 or self.window is not None:
            qi = torch.arange(past, length, device=x.device)[:, None]
            kj = torch.arange(length, device=x.device)[None, :]
            mask = kj <= qi
            if self.window is not None:
                mask &= qi - kj < self.window
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = self.o(o.transpose(1, 2).reshape(b, t, h * d))
        new = None
        if use_cache:
            if self.window is not None and length > self.window:
                k, v = k[:, :, length - self.window:], v[:, :, length - self.window:]
            new = KVCache(k, v)
        return o, new
