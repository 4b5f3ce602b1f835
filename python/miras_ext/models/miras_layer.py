"""The Miras layer (paper Section 5.4; docs/models.md): q, k, v projections each followed by a causal
depthwise convolution with SiLU, l2-normalised q and k, data-dependent gates from low-rank projections,
the memory op, a per-head RMSNorm of the read-out gated by a linear gate, and an output projection."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from ..ops.memory import memory_forward
from ..state import MemoryState
from .config import MirasConfig
from .conv import ShortConv
from .norm import RMSNorm


class MirasCache(NamedTuple):
    """A Miras layer's decoding state: the memory's MemoryState and the q, k, v convolution states."""

    memory: MemoryState
    conv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class LowRankGate(nn.Module):
    """x -> R^rank -> R^out (the bias of the second projection sets the gate's initial value)."""

    def __init__(self, dim: int, rank: int, out: int, bias_init: float | torch.Tensor = 0.0):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, out, bias=True)
        self.bias_init = bias_init

    def reset_bias(self) -> None:
        with torch.no_grad():
            if isinstance(self.bias_init, torch.Tensor):
                self.up.bias.copy_(self.bias_init.to(self.up.bias.device))
            else:
                self.up.bias.fill_(self.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class MirasLayer(nn.Module):
    """One multi-head Miras memory mixer; every head has its own memory on its head_dim slice."""

    def __init__(self, config: MirasConfig):
        super().__init__()
        c, spec = config, config.memory
        self.config, self.spec = c, spec
        h, d = c.n_heads, c.head_dim
        self.q = nn.Linear(c.dim, c.dim, bias=False)
        self.k = nn.Linear(c.dim, c.dim, bias=False)
        self.v = nn.Linear(c.dim, c.dim, bias=False)
        self.conv_q, self.conv_k, self.conv_v = (ShortConv(c.dim, c.conv_size) for _ in range(3))
        gate_out = h * d if c.per_channel_gates else h
        # Learning rate (eta).
        self.lr_proj = LowRankGate(c.dim, c.gate_rank, gate_out, 0.0) if c.lr_gate == "sigmoid" else None
        # Retention (alpha) and Mamba2's dt.
        self.alpha_proj = self.dt_proj = self.A_log = None
        if spec.has_retention_gate:
            if c.alpha_gate == "sigmoid":
                self.alpha_proj = LowRankGate(c.dim, c.gate_rank, gate_out, 4.0)
            elif c.alpha_gate == "fixed":  # RetNet: gamma_h = 1 - 2^(-5 - h)
                self.register_buffer("gamma", 1 - 2.0 ** (-5.0 - torch.arange(h, dtype=torch.float64)),
                                     persistent=False)
            else:  # Mamba2: dt = softplus(. + dt_bias), dt_bias so that dt0 is log-uniform in [1e-3, 1e-1]
                dt0 = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), h, dtype=torch.float64))
                self.dt_proj = LowRankGate(c.dim, c.gate_rank, h, torch.log(torch.expm1(dt0)).float())
                self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, h)))
        self.momentum_proj = (LowRankGate(c.dim, c.gate_rank, gate_out, 0.0) if spec.algorithm == "momentum"
                              else None)
        self.delta_proj = None
        if spec.uses_threshold:
            delta_out = h * d if (c.per_channel_gates and spec.bias == "huber") else h
            self.delta_proj = LowRankGate(c.dim, c.gate_rank, delta_out, _inverse_softplus(c.delta_init))
        # Learnable initial memory state per head, broadcast over the batch by the op (Section 1).
        shapes = spec.weight_shapes(d, d)
        init = []
        for i, shape in enumerate(shapes):
            w = torch.zeros(h, *shape)
            zero_last = c.memory_init == "zero_last" and i == len(shapes) - 1
            if spec.memory == "mlp" and not zero_last:
                nn.init.normal_(w, std=shape[-1] ** -0.5)
            init.append(nn.Parameter(w))
        self.initial_state = nn.ParameterList(init)
        self.norm = RMSNorm(d, c.norm_eps)
        self.g = nn.Linear(c.dim, c.dim, bias=False)
        self.o = nn.Linear(c.dim, c.dim, bias=False)

    def reset_gates(self) -> None:
        for m in (self.lr_proj, self.alpha_proj, self.dt_proj, self.momentum_proj, self.delta_proj):
            if m is not None:
                m.reset_bias()

    def gates(self, x: torch.Tensor):
        """lr, alpha, momentum, delta for x [B, T, dim], each [B, T, H] or [B, T, H, Dv], or None."""
        c, spec = self.config, self.spec
        b, t, _ = x.shape
        h, d = c.n_heads, c.head_dim
        shape = (b, t, h, d) if c.per_channel_gates else (b, t, h)
        dt = F.softplus(self.dt_proj(x)) if self.dt_proj is not None else None
        if c.lr_gate == "sigmoid":
            lr = c.lr_max * torch.sigmoid(self.lr_proj(x)).view(shape)
        elif c.lr_gate == "one":
            lr = x.new_ones(shape)
        else:
            lr = dt
        alpha = None
        if spec.has_retention_gate:
            if c.alpha_gate == "sigmoid":
                alpha = torch.sigmoid(self.alpha_proj(x)).view(shape)
            elif c.alpha_gate == "fixed":
                alpha = self.gamma.to(x.dtype).expand(b, t, h).contiguous()
            else:
                alpha = torch.exp(-torch.exp(self.A_log.to(x.dtype)) * dt)
            alpha = alpha.clamp(min=1e-6)  # the op needs alpha in (0, 1]
        momentum = None
        if self.momentum_proj is not None:
            momentum = torch.sigmoid(self.momentum_proj(x)).view(shape).clamp(max=1 - 1e-6)  # in [0, 1)
        delta = None
        if self.delta_proj is not None:
            raw = self.delta_proj(x)
            delta = F.softplus(raw).view(b, t, h, -1).squeeze(-1) if raw.shape[-1] == h else \
                F.softplus(raw).view(b, t, h, d)
            delta = delta.clamp(min=1e-6)
        return lr, alpha, momentum, delta

    def forward(self, x: torch.Tensor, cache: MirasCache | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, MirasCache | None]:
        c = self.config
        b, t, _ = x.shape
        h, d = c.n_heads, c.head_dim
        conv = cache.conv if cache is not None else (None, None, None)
        q, sq = self.conv_q(self.q(x), conv[0], cu_seqlens)
        k, sk = self.conv_k(self.k(x), conv[1], cu_seqlens)
        v, sv = self.conv_v(self.v(x), conv[2], cu_seqlens)
        q = F.normalize(q.view(b, t, h, d), dim=-1)
        k = F.normalize(k.view(b, t, h, d), dim=-1)
        v = v.view(b, t, h, d)
        lr, alpha, momentum, delta = self.gates(x)
        run = memory_forward if c.backend == "op" else reference.chunked
        initial = cache.memory if cache is not None else tuple(self.initial_state)
        o, state = run(q, k, v, self.spec, lr, alpha, momentum, delta, initial_state=initial,
                       output_final_state=use_cache, chunk_size=c.chunk_size, cu_seqlens=cu_seqlens)
        o = self.norm(o).reshape(b, t, h * d)
        gate = self.g(x)
        o = o * (F.silu(gate) if c.output_gate == "silu" else torch.sigmoid(gate))
        return self.o(o), (MirasCache(state, (sq, sk, sv)) if use_cache else None)
