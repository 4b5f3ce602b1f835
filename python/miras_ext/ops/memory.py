"""The chunkwise Miras memory as compiled operators (docs/math.md, Section 5), and one wrapper per Table 1
preset (spec_presets.py).

``memory_forward`` has exactly the signature and semantics of ``reference.chunked``; it runs the
``torch.ops.miras_ext.memory_chunk_fwd`` operator, whose backward (``memory_chunk_bwd``) recomputes every run
of tokens from checkpoints of the state at the run's start. Both operators have fake (meta) registrations,
so ``torch.compile(fullgraph=True)`` traces through them.

Decoding needs no operator of its own: it is ``memory_forward`` with T = 1 on the previous final state
(``memory_step`` adds and removes the T axis), and continues the current chunk exactly as one call over
the whole sequence would.
"""

from __future__ import annotations

import dataclasses

import torch

from ..inputs import check_call, chunk_phase
from ..nonfinite import causal
from ..spec import MemorySpec
from ..spec_presets import DELTA, GATED_DELTA, LINEAR_ATTENTION, MEMORA, MONETA, TITANS, YAAD
from ..state import MemoryState

__all__ = [
    "delta_forward",
    "gated_delta_forward",
    "linear_attention_forward",
    "memora_forward",
    "memory_forward",
    "memory_step",
    "moneta_forward",
    "titans_forward",
    "yaad_forward",
]


def _lag_token(spec: str) -> bool:
    return "lag_token=1" in spec.split(",")


def checkpoint_rows(n: int, t: int, chunk_size: int, lag_token: bool, varlen: bool) -> int:
    """S_max, the rows of every checkpoint tensor [S_max, H, *shape] (layout documented in csrc/ops.cpp):
    a bound on the (run, sequence) pairs of a call that depends on shapes and options only."""
    chunks = (t + chunk_size - 1) // chunk_size
    factor = 2 if lag_token and chunk_size > 1 else 1
    return (chunks + 2 * n if varlen else n * (chunks + 1)) * factor


@causal
def memory_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MemorySpec, lr: torch.Tensor,
                   alpha: torch.Tensor | None = None, momentum: torch.Tensor | None = None,
                   delta: torch.Tensor | None = None, *, scale: float = 1.0, initial_state=None,
                   output_final_state: bool = False, chunk_size: int = 64, cu_seqlens: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, MemoryState | None]:
    """The chunkwise Miras memory: write each token, read it at the query (Eqs. 4.1-4.3, 5.1-5.11).

    Args:
        q, k: [B, T, H, Dk] queries and keys. v: [B, T, H, Dv] values. float64 runs in float64; float32,
            bfloat16 and float16 run in float32 and o is returned in the input dtype.
        spec: the MemorySpec (architecture, bias, retention, algorithm).
        lr: learning rate eta >= 0, [B, T, H] or [B, T, H, Dv] (per channel).
        alpha: retention in (0, 1], same layout as lr; None for retention "none".
        momentum: momentum coefficient in [0, 1), same layout as lr; algorithm "momentum" only.
        delta: threshold > 0 of the Huber-type biases, [B, T, H] ([B, T, H, Dv] for bias "huber").
        scale: multiplies q before the read.
        initial_state: None (zeros; required for MLP memory), a tuple of weight tensors, one per layer,
            each [N, H, *shape] or [H, *shape] (MemorySpec.weight_shapes; a per-head tensor is broadcast
            over the batch and its gradient summed), or a MemoryState to continue from.
        output_final_state: return the MemoryState after the last token.
        chunk_size: tokens per chunk b >= 1; chunks are aligned to each sequence's start (Eq. 5.6).
        cu_seqlens: [N + 1] offsets of N sequences packed along T (B must be 1).

    Returns:
        o [B, T, H, Dv] and the final MemoryState (None unless output_final_state); states are in the
        compute dtype, [N, H, *shape].

    Non-finite values (NaN or infinite k or v, or an inner gradient that overflows): the outputs from the
    first bad token on are non-finite, those before it are the outputs of the finite prefix
    (miras_ext.nonfinite). The gates must be finite.

    Raises:
        ValueError naming the argument, the same as reference.chunked.

    Example:
        >>> import torch, miras_ext
        >>> spec = miras_ext.MemorySpec(memory="matrix", bias="l2", retention="l2")
        >>> q, k = torch.randn(2, 10, 3, 8), torch.randn(2, 10, 3, 8)      # [B, T, H, Dk]
        >>> v = torch.randn(2, 10, 3, 8)                                    # [B, T, H, Dv]
        >>> lr, alpha = torch.rand(2, 10, 3) * 0.1, torch.ones(2, 10, 3)    # [B, T, H]
        >>> o, state = miras_ext.memory_forward(q, k, v, spec, lr, alpha, chunk_size=4, output_final_state=True)
        >>> o.shape, state.memory[0].shape, state.position.tolist()         # [N, H, Dv, Dk] per weight
        (torch.Size([2, 10, 3, 8]), torch.Size([2, 3, 8, 8]), [10, 10])
    """
    call = check_call(q, k, v, lr, alpha, momentum, delta, spec, scale, initial_state, chunk_size, cu_seqlens)
    st, g = call.state, call.gates
    if cu_seqlens is None and q.shape[1] > 0 and q.shape[0] > 0 and not torch.compiler.is_compiling():
        chunk_phase(st.position, chunk_size)
    tensors = [q, k, v, *(x for x in g.values() if x is not None), *st.memory, *st.momentum, *st.anchor]
    save = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    o, memory, mom, anchor, position, _ = torch.ops.miras_ext.memory_chunk_fwd(
        q, k, v, g["lr"], g["alpha"], g["momentum"], g["delta"], list(st.memory), list(st.momentum),
        list(st.anchor), st.position, cu_seqlens, spec.encode(), float(scale), chunk_size, save)
    state = MemoryState(tuple(memory), tuple(mom), tuple(anchor), position, chunk_size) if output_final_state else None
    return o, state


def memory_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, spec: MemorySpec, lr_t: torch.Tensor,
                alpha_t: torch.Tensor | None = None, momentum_t: torch.Tensor | None = None,
                delta_t: torch.Tensor | None = None, *, state=None, scale: float = 1.0, chunk_size: int = 64
                ) -> tuple[torch.Tensor, MemoryState]:
    """One decoding step: memory_forward with T = 1 on `state`, returning the next state.

    q_t, k_t: [B, H, Dk]; v_t: [B, H, Dv]; gates [B, H] or [B, H, Dv] (delta as in memory_forward without
    the T axis). state: the MemoryState of the previous call (or an initial state as in memory_forward);
    chunk_size must be the one the state was produced with, so that the step continues its chunk (a
    MemoryState records it; another one is a ValueError).
    Returns o_t [B, H, Dv] and the MemoryState after the token.

    Example:
        >>> import torch, miras_ext
        >>> spec = miras_ext.MemorySpec(memory="matrix", bias="l2", retention="none")
        >>> q, k, v = (torch.randn(1, 5, 2, 4) for _ in range(3))           # [B, T, H, D]
        >>> lr = torch.full((1, 5, 2), 0.5)                                 # [B, T, H]
        >>> _, state = miras_ext.memory_forward(q[:, :4], k[:, :4], v[:, :4], spec, lr[:, :4],
        ...                                     chunk_size=2, output_final_state=True)
        >>> o_t, state = miras_ext.memory_step(q[:, 4], k[:, 4], v[:, 4], spec, lr[:, 4], state=state, chunk_size=2)
        >>> o_t.shape, state.position.tolist()                              # [B, H, Dv]
        (torch.Size([1, 2, 4]), [5])
    """
    t = lambda x: None if x is None else x.unsqueeze(1)  # noqa: E731
    o, new = memory_forward(t(q_t), t(k_t), t(v_t), spec, t(lr_t), t(alpha_t), t(momentum_t), t(delta_t),
                            scale=scale, initial_state=state, output_final_state=True, chunk_size=chunk_size)
    return o.squeeze(1), new


# ---------------------------------------------------------------------------------------------------------
# Operator registrations.


@torch.library.register_fake("miras_ext::memory_chunk_fwd")
def _memory_chunk_fwd_fake(q, k, v, lr, alpha, momentum, delta, memory, momentum_state, anchor, position,
                           cu_seqlens, spec, scale, chunk_size, save_checkpoints):
    b, t, h, _ = q.shape
    o = q.new_empty((b, t, h, v.shape[-1]))
    like = lambda xs: [x.new_empty(x.shape) for x in xs]  # noqa: E731  (contiguous, like the CPU op)
    checkpoints = []
    if save_checkpoints:
        rows = checkpoint_rows(position.shape[0], t, chunk_size, _lag_token(spec), cu_seqlens is not None)
        checkpoints = [x.new_empty((rows, *x.shape[1:])) for x in (*memory, *momentum_state, *anchor)]
    return o, like(memory), like(momentum_state), like(anchor), position.new_empty(position.shape), checkpoints


@torch.library.register_fake("miras_ext::memory_chunk_bwd")
def _memory_chunk_bwd_fake(grad_o, grad_memory, grad_momentum, grad_anchor, q, k, v, lr, alpha, momentum, delta,
                           checkpoints, position, cu_seqlens, spec, scale, chunk_size):
    n = position.shape[0]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    gate = lambda x: x.new_empty(x.shape) if x is not None else q.new_empty(0, dtype=compute)  # noqa: E731
    layers = len(checkpoints) // (3 if "algorithm=momentum" in spec.split(",") else 2)
    states = [c.new_empty((n, *c.shape[1:])) for c in checkpoints]
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), gate(lr), gate(alpha), gate(momentum),
            gate(delta), states[:layers], states[layers:len(states) - layers], states[len(states) - layers:])


def _setup_context(ctx, inputs, output):
    (q, k, v, lr, alpha, momentum, delta, memory, momentum_state, anchor, position, cu_seqlens, spec, scale,
     chunk_size, save_checkpoints) = inputs
    checkpoints = output[5]
    # Checkpoints and positions carry no gradient; unused outputs must not be materialised as zeros (the
    # checkpoints alone are O(T / chunk * state)).
    ctx.mark_non_differentiable(output[4], *checkpoints)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, lr, alpha, momentum, delta, position, cu_seqlens, *checkpoints)
    ctx.options = (spec, scale, chunk_size)
    ctx.layers = (len(memory), len(momentum_state))
    ctx.saved_checkpoints = save_checkpoints


def _state_grads(grads, checkpoints, n: int) -> list:
    """The op's final-state gradient list: [] when nothing flows back, else zeros in place of None."""
    if grads is None or all(g is None for g in grads):
        return []
    return [g if g is not None else c.new_zeros((n, *c.shape[1:])) for g, c in zip(grads, checkpoints)]


def _backward(ctx, grad_o, grad_memory, grad_momentum, grad_anchor, grad_position, grad_checkpoints):
    if not ctx.saved_checkpoints:
        raise RuntimeError("miras_ext::memory_chunk_fwd: backward needs save_checkpoints=True in the forward "
                           "(memory_forward sets it when an input requires grad)")
    q, k, v, lr, alpha, momentum, delta, position, cu_seqlens, *checkpoints = ctx.saved_tensors
    layers, mlayers = ctx.layers
    n = position.shape[0]
    if grad_o is None:
        grad_o = q.new_zeros((*q.shape[:3], v.shape[-1]))
    ck_mem, ck_mom, ck_anc = checkpoints[:layers], checkpoints[layers:layers + mlayers], checkpoints[layers + mlayers:]
    gq, gk, gv, glr, galpha, gmom, gdelta, gmem, gmom_state, ganc = torch.ops.miras_ext.memory_chunk_bwd(
        grad_o, _state_grads(grad_memory, ck_mem, n), _state_grads(grad_momentum, ck_mom, n),
        _state_grads(grad_anchor, ck_anc, n), q, k, v, lr, alpha, momentum, delta, checkpoints, position,
        cu_seqlens, *ctx.options)
    present = lambda gate, grad: grad if gate is not None else None  # noqa: E731
    return (gq, gk, gv, glr, present(alpha, galpha), present(momentum, gmom), present(delta, gdelta), list(gmem),
            list(gmom_state), list(ganc), None, None, None, None, None, None)


torch.library.register_autograd("miras_ext::memory_chunk_fwd", _backward, setup_context=_setup_context)


def _backward_backward(ctx, *grads):
    raise NotImplementedError("miras_ext.memory_forward: second derivatives (double backward) are not implemented")


torch.library.register_autograd("miras_ext::memory_chunk_bwd", _backward_backward)


# ---------------------------------------------------------------------------------------------------------
# Presets: the named models of docs/math.md, Table 1 (Section 6). Each is memory_forward with a fixed spec;
# keyword arguments that are MemorySpec fields override the preset's choices, the rest go to memory_forward.

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
