"""The chunked Miras memory in one screen: the algorithm of docs/math.md (Sections 1-5) with nothing else.

Each token writes into the memory by one step of gradient descent on the attentional bias and is then read
at its query (Eq. 4.3). Within a chunk every gradient is taken at the chunk's first state, the anchor
(Eq. 5.1): the gradients of a chunk are independent of each other and computed at once. Matrix and MLP
memory, the biases l2, l_p and Huber, l2 retention, GD or momentum, one gate value per head and token.
Self-contained on purpose (torch only); tests/reference/test_minimal.py checks it against
reference.chunked. It states the algorithm and is not a fast path: the state update loops over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def memory(weights: list[torch.Tensor], x: torch.Tensor, residual: bool) -> torch.Tensor:
    """(1) Memory architecture: W x, or the MLP W_L s(... s(W_1 x)) with x + LayerNorm(.) (Eqs. 1.2-1.4)."""
    h = x
    for i, w in enumerate(weights):
        h = w @ h
        if i < len(weights) - 1:
            h = F.gelu(h)
    return x + F.layer_norm(h, h.shape[-1:]) if residual else h


def bias_loss(y: torch.Tensor, v: torch.Tensor, bias: str, p: float, delta: float) -> torch.Tensor:
    """(2) Attentional bias: the inner loss of one token (Eqs. 2.2, 2.3, 2.5)."""
    r = y - v
    if bias == "l2":
        return 0.5 * (r * r).sum()
    if bias == "lp":
        return ((r * r + 1e-6) ** (p / 2)).sum() / p
    if bias == "huber":
        return torch.where(r.abs() <= delta, 0.5 * r * r, delta * (r.abs() - 0.5 * delta)).sum()
    raise ValueError(f"bias: expected 'l2', 'lp' or 'huber', got {bias!r}")


def minimal(q, k, v, lr, alpha, weights, momentum=None, *, bias="l2", p=3.0, delta=1.0, residual=False,
            chunk_size=64):
    """q, k [B, T, H, Dk], v [B, T, H, Dv]; lr, alpha and momentum [B, T, H]; weights the initial memory,
    one [B, H, out, in] per layer. Returns o [B, T, H, Dv] and the final weights."""
    def loss(ws, k_t, v_t):
        return bias_loss(memory(ws, k_t, residual), v_t, bias, p, delta)

    # dl/dW of every token of a chunk at one shared W; vmap over batch, head and token.
    grad = torch.func.grad(loss)
    token_grads = torch.func.vmap(torch.func.vmap(torch.func.vmap(grad, (None, 0, 0))))
    read = torch.func.vmap(torch.func.vmap(lambda ws, x: memory(ws, x, residual)))
    z = list(weights)
    s = [torch.zeros_like(w) for w in z]
    outs = []
    T = q.shape[1]
    for start in range(0, T, chunk_size):
        chunk = slice(start, min(start + chunk_size, T))
        g = token_grads(z, k[:, chunk].transpose(1, 2), v[:, chunk].transpose(1, 2))  # at the anchor (Eq. 5.1)
        for j, t in enumerate(range(chunk.start, chunk.stop)):
            gate = lambda x: x[:, t, :, None, None]  # noqa: E731  one value per head, over a weight
            for i in range(len(z)):
                step = gate(lr) * g[i][:, :, j]
                kept = gate(alpha) * z[i]  # (3) retention: l2, keep alpha_t of the state (Eq. 3.1)
                if momentum is None:  # (4) learning algorithm: GD (Eq. 4.1) ...
                    z[i] = kept - step
                else:  # ... or momentum (Eq. 4.2)
                    s[i] = gate(momentum) * s[i] - step
                    z[i] = kept + s[i]
            outs.append(read(z, q[:, t]))  # the read at the query (Eq. 4.3)
    return torch.stack(outs, dim=1), z
