"""Fake (meta) and autograd registrations of torch.ops.miras_ext.memory_chunk_fwd / memory_chunk_bwd (schemas
in csrc/ops.cpp): what torch.compile traces and what backward() calls."""

from __future__ import annotations

import torch

from ..spec import MemorySpec


def checkpoint_rows(n: int, t: int, chunk_size: int, lag_token: bool, varlen: bool) -> int:
    """S_max, the rows of every checkpoint tensor [S_max, H, *shape] (layout documented in csrc/ops.cpp):
    a bound on the (run, sequence) pairs of a call that depends on shapes and options only."""
    chunks = (t + chunk_size - 1) // chunk_size
    factor = 2 if lag_token and chunk_size > 1 else 1
    return (chunks + 2 * n if varlen else n * (chunks + 1)) * factor


@torch.library.register_fake("miras_ext::memory_chunk_fwd")
def _memory_chunk_fwd_fake(q, k, v, lr, alpha, momentum, delta, memory, momentum_state, anchor, position,
                           cu_seqlens, spec, scale, chunk_size, save_checkpoints):
    b, t, h, _ = q.shape
    o = q.new_empty((b, t, h, v.shape[-1]))
    like = lambda xs: [x.new_empty(x.shape) for x in xs]  # noqa: E731  (contiguous, like the CPU op)
    checkpoints = []
    if save_checkpoints:
        rows = checkpoint_rows(position.shape[0], t, chunk_size, MemorySpec.decode(spec).lag_token,
                               cu_seqlens is not None)
        checkpoints = [x.new_empty((rows, *x.shape[1:])) for x in (*memory, *momentum_state, *anchor)]
    return o, like(memory), like(momentum_state), like(anchor), position.new_empty(position.shape), checkpoints


@torch.library.register_fake("miras_ext::memory_chunk_bwd")
def _memory_chunk_bwd_fake(grad_o, grad_memory, grad_momentum, grad_anchor, q, k, v, lr, alpha, momentum, delta,
                           checkpoints, position, cu_seqlens, spec, scale, chunk_size):
    n = position.shape[0]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    gate = lambda x: x.new_empty(x.shape) if x is not None else q.new_empty(0, dtype=compute)  # noqa: E731
    layers = len(checkpoints) // (3 if MemorySpec.decode(spec).algorithm == "momentum" else 2)
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
