"""The memory learning algorithm: gradient descent (docs/math.md, Eq. 4.1) or gradient descent with momentum
(Eq. 4.2), one token at a time, and the same steps summed over a chunk as coefficients of the tokens'
gradients (Eqs. 5.8, 5.9)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .retention import decay


def step(kept: torch.Tensor, update: torch.Tensor, momentum_state: torch.Tensor | None,
         momentum: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token's step of one weight tensor: Z_t = kept - update (Eq. 4.1), or with momentum
    S_t = momentum S_{t-1} - update and Z_t = kept + S_t (Eq. 4.2). `kept` is the retained state
    (alpha_t Z_{t-1}), `update` eta_t times the inner gradient; returns (Z_t, S_t or None)."""
    if momentum_state is None:
        return kept - update, None
    s = momentum * momentum_state - update
    return kept + s, s


class Coefficients(NamedTuple):
    """A chunk's steps as linear coefficients over its n tokens, [N, H, n, n] (per channel [.., n, n, Dv]):
    Z_t = retained_t Z_0 + carry_t S_0 - sum_i coef[t, i] G_i and S_n = mkeep_n S_0 - sum_i mcoef[n, i] G_i,
    G_i the gradient of token i. The momentum fields are None under gradient descent."""
    retained: torch.Tensor
    coef: torch.Tensor
    carry: torch.Tensor | None
    mkeep: torch.Tensor | None
    mcoef: torch.Tensor | None


def coefficients(lr: torch.Tensor, alpha: torch.Tensor | None, momentum: torch.Tensor | None,
                 per_channel: bool) -> Coefficients:
    """Eq. 5.8 (momentum None) or Eq. 5.9 for a chunk's gates, [N, H, n] or [N, H, n, Dv] (per channel)."""
    alpha_decay, retained = decay(alpha, lr, per_channel)  # D^alpha and A_t (Eq. 5.7)
    lr_cols = lr.unsqueeze(2)  # scales column i (the token written)
    if momentum is None:  # Eq. 5.8
        return Coefficients(retained, alpha_decay * lr_cols, None, None, None)
    # Eq. 5.9: momentum folds a second decay into the coefficients.
    mdecay, mkeep = decay(momentum, lr, per_channel)
    if per_channel:
        combined = torch.einsum("nhtjd,nhjid->nhtid", alpha_decay, mdecay)
        carry = torch.einsum("nhtjd,nhjd->nhtd", alpha_decay, mkeep)
    else:
        combined = alpha_decay @ mdecay
        carry = (alpha_decay @ mkeep.unsqueeze(-1)).squeeze(-1)
    return Coefficients(retained, combined * lr_cols, carry, mkeep, mdecay * lr_cols)
