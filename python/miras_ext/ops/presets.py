"""The named models of docs/math.md Table 1 (Section 6) as functions: each is memory_forward with a fixed
spec (spec_presets.py); keyword arguments that are MemorySpec fields override the preset's choices, the rest
go to memory_forward."""

from __future__ import annotations

import dataclasses

from ..spec import MemorySpec
from ..spec_presets import DELTA, GATED_DELTA, LINEAR_ATTENTION, MEMORA, MONETA, TITANS, YAAD
from .memory import memory_forward

__all__ = ["delta_forward", "gated_delta_forward", "linear_attention_forward", "memora_forward", "moneta_forward",
           "titans_forward", "yaad_forward"]

_CALL_KEYWORDS = ("scale", "initial_state", "output_final_state", "chunk_size", "cu_seqlens")
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(MemorySpec))


def _preset(name: str, defaults: dict, q, k, v, lr, alpha, momentum, delta, kwargs: dict):
    unknown = [key for key in kwargs if key not in _SPEC_FIELDS and key not in _CALL_KEYWORDS]
    if unknown:
        raise TypeError(f"{name}: unexpected keyword arguments {unknown}; expected MemorySpec fields or {_CALL_KEYWORDS}")
    spec = MemorySpec(**{**defaults, **{key: x for key, x in kwargs.items() if key in _SPEC_FIELDS}})
    call = {key: x for key, x in kwargs.items() if key in _CALL_KEYWORDS}
    return memory_forward(q, k, v, spec, lr, alpha, momentum, delta, **call)


def moneta_forward(q, k, v, lr, alpha, **kwargs):
    """Moneta (paper Eq. 24; docs/math.md Section 7): a 2-layer residual MLP memory x + LN(f(x)), the l_p
    bias with p = 3 and the l_q retention with q = 4 (``MONETA``). Gates may be per head or per channel.

    kwargs: MemorySpec fields overriding the preset (e.g. ``p=2.5``, ``expansion=2``) and memory_forward's
    keywords (``initial_state`` is required: MLP weights, [H, Dk*E, Dk] and [H, Dv, Dk*E] or with a leading N).

    Example:
        >>> import torch, miras_ext
        >>> B, T, H, D, E = 2, 6, 2, 4, 2
        >>> q, k, v = (torch.randn(B, T, H, D) for _ in range(3))            # [B, T, H, D]
        >>> lr, alpha = torch.rand(B, T, H, D) * 0.1, torch.ones(B, T, H, D)   # per channel [B, T, H, Dv]
        >>> w = (torch.randn(H, E * D, D) * 0.3, torch.randn(H, D, E * D) * 0.3)
        >>> o, _ = miras_ext.moneta_forward(q, k, v, lr, alpha, expansion=E, initial_state=w, chunk_size=4)
        >>> o.shape                                                          # [B, T, H, Dv]
        torch.Size([2, 6, 2, 4])
    """
    return _preset("moneta_forward", MONETA, q, k, v, lr, alpha, None, None, kwargs)


def yaad_forward(q, k, v, lr, alpha, delta, **kwargs):
    """Yaad (paper Eq. 26): a 2-layer residual MLP memory, the Yaad (Huber-like) bias (Eq. 2.7) with a
    threshold delta > 0 per head and token, and the l2 retention (``YAAD``).

    Example:
        >>> import torch, miras_ext
        >>> B, T, H, D, E = 1, 5, 2, 4, 2
        >>> q, k, v = (torch.randn(B, T, H, D) for _ in range(3))            # [B, T, H, D]
        >>> lr, alpha = torch.rand(B, T, H) * 0.1, torch.ones(B, T, H)       # [B, T, H]
        >>> delta = torch.ones(B, T, H)                                      # [B, T, H]
        >>> w = (torch.randn(H, E * D, D) * 0.3, torch.randn(H, D, E * D) * 0.3)
        >>> o, _ = miras_ext.yaad_forward(q, k, v, lr, alpha, delta, expansion=E, initial_state=w)
        >>> o.shape
        torch.Size([1, 5, 2, 4])
    """
    return _preset("yaad_forward", YAAD, q, k, v, lr, alpha, None, delta, kwargs)


def memora_forward(q, k, v, lr, alpha, **kwargs):
    """Memora (paper Eq. 27): a 2-layer residual MLP memory, the l2 bias, the KL retention (weights
    c softmax(Z) per row, Eq. 3.6) and the lag token (Eq. 5.6) (``MEMORA``).

    Example:
        >>> import torch, miras_ext
        >>> B, T, H, D, E = 1, 7, 1, 4, 2
        >>> q, k, v = (torch.randn(B, T, H, D) for _ in range(3))            # [B, T, H, D]
        >>> lr, alpha = torch.rand(B, T, H) * 0.1, torch.ones(B, T, H)       # [B, T, H]
        >>> z = (torch.randn(H, E * D, D), torch.randn(H, D, E * D))          # logits [H, out, in]
        >>> o, state = miras_ext.memora_forward(q, k, v, lr, alpha, expansion=E, initial_state=z,
        ...                                     chunk_size=4, output_final_state=True)
        >>> o.shape, state.memory[1].shape                                   # [B, T, H, Dv], [N, H, Dv, E*D]
        (torch.Size([1, 7, 1, 4]), torch.Size([1, 1, 4, 8]))
    """
    return _preset("memora_forward", MEMORA, q, k, v, lr, alpha, None, None, kwargs)


def titans_forward(q, k, v, lr, alpha, momentum, **kwargs):
    """Titans' long-term memory (Eq. 4.2): a 2-layer SiLU MLP memory without the residual norm, the l2
    bias, the l2 retention (alpha = 1 - a) and momentum (m = eta, lr = theta) (``TITANS``).

    Example:
        >>> import torch, miras_ext
        >>> B, T, H, D, E = 2, 5, 2, 4, 2
        >>> q, k, v = (torch.randn(B, T, H, D) for _ in range(3))            # [B, T, H, D]
        >>> lr, alpha, m = torch.rand(B, T, H) * 0.1, torch.ones(B, T, H), torch.full((B, T, H), 0.9)
        >>> w = (torch.randn(H, E * D, D) * 0.3, torch.randn(H, D, E * D) * 0.3)
        >>> o, state = miras_ext.titans_forward(q, k, v, lr, alpha, m, expansion=E, initial_state=w,
        ...                                     output_final_state=True)
        >>> o.shape, len(state.momentum), state.momentum[0].shape            # S per weight tensor [N, H, *shape]
        (torch.Size([2, 5, 2, 4]), 2, torch.Size([2, 2, 8, 4]))
    """
    return _preset("titans_forward", TITANS, q, k, v, lr, alpha, momentum, None, kwargs)


def gated_delta_forward(q, k, v, lr, alpha, **kwargs):
    """Gated DeltaNet: matrix memory, the l2 bias, the l2 retention with the gradient at the retained state
    (Eq. 3.2) (``GATED_DELTA``); lr is beta. Every chunk size computes the published recurrence exactly
    (docs/math.md Eqs. 5.13-5.19); ``minibatch=True`` selects the paper's mini-batch approximation (Eq. 5.1).

    Example:
        >>> import torch, miras_ext
        >>> B, T, H, Dk, Dv = 2, 6, 2, 4, 3
        >>> q, k, v = torch.randn(B, T, H, Dk), torch.randn(B, T, H, Dk), torch.randn(B, T, H, Dv)
        >>> beta, alpha = torch.rand(B, T, H), torch.rand(B, T, H) * 0.5 + 0.5   # [B, T, H]
        >>> o, state = miras_ext.gated_delta_forward(q, k, v, beta, alpha, chunk_size=4, output_final_state=True)
        >>> o.shape, state.memory[0].shape                                   # [B, T, H, Dv], [N, H, Dv, Dk]
        (torch.Size([2, 6, 2, 3]), torch.Size([2, 2, 3, 4]))
    """
    return _preset("gated_delta_forward", GATED_DELTA, q, k, v, lr, alpha, None, None, kwargs)


def delta_forward(q, k, v, lr, **kwargs):
    """DeltaNet: matrix memory, the l2 bias, no retention (``DELTA``); lr is beta. Exact at every chunk size
    (docs/math.md Eqs. 5.13-5.19) unless ``minibatch=True``.

    Example:
        >>> import torch, miras_ext
        >>> B, T, H, Dk, Dv = 1, 6, 2, 4, 3
        >>> q, k, v = torch.randn(B, T, H, Dk), torch.randn(B, T, H, Dk), torch.randn(B, T, H, Dv)
        >>> o, _ = miras_ext.delta_forward(q, k, v, torch.rand(B, T, H), chunk_size=4)   # beta [B, T, H]
        >>> o.shape
        torch.Size([1, 6, 2, 3])
    """
    return _preset("delta_forward", DELTA, q, k, v, lr, None, None, None, kwargs)


def linear_attention_forward(q, k, v, lr, **kwargs):
    """Linear attention: matrix memory, the dot bias, no retention (``LINEAR_ATTENTION``): o_t = sum_{i<=t}
    lr_i v_i (k_i . q_t). Exact at every chunk size (the dot gradient does not depend on the memory).

    Example:
        >>> import torch, miras_ext
        >>> B, T, H, Dk, Dv = 1, 6, 2, 4, 3
        >>> q, k, v = torch.randn(B, T, H, Dk), torch.randn(B, T, H, Dk), torch.randn(B, T, H, Dv)
        >>> o, _ = miras_ext.linear_attention_forward(q, k, v, torch.ones(B, T, H))     # lr [B, T, H]
        >>> ref = torch.stack([torch.einsum("bihd,bhd,bihe->bhe", k[:, :t + 1], q[:, t], v[:, :t + 1])
        ...                    for t in range(T)], dim=1)
        >>> torch.allclose(o, ref, atol=1e-5)
        True
    """
    return _preset("linear_attention_forward", LINEAR_ATTENTION, q, k, v, lr, None, None, None, kwargs)
