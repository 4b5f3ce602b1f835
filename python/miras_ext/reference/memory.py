"""Memory architectures (docs/math.md, Section 1): the read-out M(W, x) and, for the chunked form, the
per-token gradient of the attentional bias as rank-one factors (Eqs. 5.3-5.5).

Weights are a list, one tensor per layer in the order they are applied, each [..., out, in] ([..., D] for
vector memory). A weight tensor either has the leading dims of x (one set of weights per token) or lacks
x's token axis (weights shared by the tokens of a chunk).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..spec import MemorySpec
from . import bias as biases


def linear(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w x for w [..., out, in]; x [..., in] with w's leading dims, or [..., n, in] sharing w."""
    if w.dim() == x.dim() + 1:
        return (x.unsqueeze(-2) @ w.mT).squeeze(-2)
    return x @ w.mT


def activation(spec: MemorySpec, u: torch.Tensor) -> torch.Tensor:
    return F.gelu(u) if spec.activation == "gelu" else F.silu(u)


def _act_grad(spec: MemorySpec, u: torch.Tensor) -> torch.Tensor:
    if spec.activation == "gelu":  # d/du u Phi(u) = Phi(u) + u phi(u)
        return 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0))) + u * torch.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
    s = torch.sigmoid(u)
    return s * (1.0 + u * (1.0 - s))


def layer_norm(spec: MemorySpec, u: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(u, u.shape[-1:], eps=spec.ln_eps)


def _layer_norm_backward(spec: MemorySpec, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d/du of <g, LN(u)> for LayerNorm without affine (Eq. 5.5)."""
    mu = u.mean(-1, keepdim=True)
    rstd = torch.rsqrt(u.var(-1, unbiased=False, keepdim=True) + spec.ln_eps)
    xhat = (u - mu) * rstd
    return rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))


def apply(spec: MemorySpec, weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """M(W, x) (Eqs. 1.1-1.4)."""
    if spec.memory == "vector":
        w = weights[0]
        return (w.unsqueeze(-2) if x.dim() > w.dim() else w) * x
    h = x
    for i, w in enumerate(weights):
        h = linear(w, h)
        if i < len(weights) - 1:
            h = activation(spec, h)
    if spec.memory == "mlp" and spec.residual_norm:
        return x + layer_norm(spec, h)
    return h


def token_gradients(spec: MemorySpec, weights: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                    delta: torch.Tensor | None, retained: torch.Tensor | None = None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of the bias at shared weights for the n tokens of a chunk, as factors (Eq. 5.3).

    k [N, H, n, Dk], v [N, H, n, Dv]; weights shared over n. Returns (deltas, inputs): the gradient of token
    i for weight tensor l is deltas[l][..., i, :] (outer) inputs[l][..., i, :], or their elementwise product
    for vector memory. `retained` [N, H, n] or [N, H, n, Dv] scales the weights token by token (the gradient
    at the retained state, Eq. 5.2; vector and matrix memory only).
    """
    inputs, pre = [], []
    h = k
    for i, w in enumerate(weights):
        inputs.append(h)
        u = apply(spec, [w], h) if spec.memory == "vector" else linear(w, h)
        if retained is not None:
            u = u * (retained if retained.dim() == u.dim() else retained.unsqueeze(-1))
        pre.append(u)
        h = activation(spec, u) if i < len(weights) - 1 else u
    residual = spec.memory == "mlp" and spec.residual_norm
    y = k + layer_norm(spec, h) if residual else h
    d = biases.output_grad(y, v, spec.bias, delta, spec.p, spec.eps)
    if residual:
        d = _layer_norm_backward(spec, pre[-1], d)
    deltas = [d]
    for i in range(len(weights) - 1, 0, -1):
        d = (d @ weights[i]) * _act_grad(spec, pre[i - 1])  # Eq. 5.4
        deltas.insert(0, d)
    return deltas, inputs


def gate_view(spec: MemorySpec, index: int, g: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """A gate g [...] (per head) or [..., D] (per channel) shaped to scale weight tensor `index`
    [..., *shape] (Eq. 3.4)."""
    if spec.memory == "vector":
        return g if per_channel else g.unsqueeze(-1)
    if not per_channel:
        return g[..., None, None]
    return g.unsqueeze(-1) if spec.gate_axis(index) == 0 else g.unsqueeze(-2)
