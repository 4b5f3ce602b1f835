"""The chunkwise Miras memory as a compiled operator (docs/math.md, Section 5).

``memory_forward`` has exactly the signature and semantics of ``reference.chunked``; it runs the
``torch.ops.miras_ext.memory_chunk_fwd`` operator, whose backward (``memory_chunk_bwd``, ops/autograd.py)
recomputes every run of tokens from checkpoints of the state at the run's start. Both operators have fake
(meta) registrations, so ``torch.compile(fullgraph=True)`` traces through them.

Decoding needs no operator of its own: it is ``memory_forward`` with T = 1 on the previous final state
(``memory_step`` adds and removes the T axis), and continues the current chunk exactly as one call over
the whole sequence would.
"""

from __future__ import annotations

import torch

from . import autograd  # noqa: F401  (registers the operators' fakes and autograd)
from ..inputs import check_call, chunk_phase
from ..nonfinite import causal
from ..spec import MemorySpec
from ..state import MemoryState

__all__ = ["memory_forward", "memory_step"]


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
