"""Non-finite values (miras_ext.nonfinite): a NaN or infinity in q, k or v at token t, or a float32 overflow
there, never changes an output before t, in the op and in reference.chunked, padded and packed; outputs from t
on are non-finite where the recurrence makes them so, and the other sequences of the call are unaffected."""

from __future__ import annotations

import math

import pytest
import torch

from miras_ext import MemorySpec, memory_forward
from miras_ext.reference import chunked
from ..reference.helpers import one_thread  # noqa: F401  (autouse fixture)
from ..reference.helpers import make_inputs, rel

FNS = pytest.mark.parametrize("fn", [memory_forward, chunked], ids=["op", "reference"])
SPECS = pytest.mark.parametrize("spec", [
    MemorySpec(memory="matrix", bias="l2", retention="l2"),
    MemorySpec(memory="matrix", bias="huber", retention="l2", algorithm="momentum", lag_token=True),
    MemorySpec(memory="mlp", expansion=2, bias="lp", p=3.0, retention="lq"),
], ids=["matrix", "matrix-momentum-lag", "moneta"])
BAD = pytest.mark.parametrize("name,value", [("k", float("nan")), ("k", float("inf")), ("v", float("nan")),
                                             ("v", float("-inf"))], ids=["nan-k", "inf-k", "nan-v", "-inf-v"])


def _poisoned(inp, name: str, value: float, b: int, t: int):
    x = getattr(inp, name).clone()
    x[b, t, 0, 1] = value
    setattr(inp, name, x)
    return inp


@FNS
@SPECS
@BAD
def test_a_bad_token_spoils_no_earlier_output(fn, spec, name, value):
    """B = 2, chunk 16, the bad token at t = 10 of sequence 1 (inside the first chunk)."""
    clean = make_inputs(spec, B=2, T=40, H=2, dk=4)
    o_clean, st_clean = clean.call(fn, chunk_size=16, output_final_state=True)
    o, state = _poisoned(clean.cast(torch.float64), name, value, 1, 10).call(fn, chunk_size=16,
                                                                              output_final_state=True)
    assert torch.isfinite(o[:, :10]).all()
    assert rel(o[:, :10], o_clean[:, :10]) < 1e-12
    # The Huber gradient clips the residual at delta: an infinite value is a finite write (Eq. 2.5).
    clipped = spec.bias == "huber" and name == "v" and math.isinf(value)
    assert torch.isfinite(o[1, 10:]).all() == clipped
    # Sequence 0 never saw the bad token: redone alone, it is the clean result.
    assert rel(o[0], o_clean[0]) < 1e-12
    assert rel(state.memory[0][0], st_clean.memory[0][0]) < 1e-12


@FNS
@SPECS
def test_nan_q_spoils_only_its_own_read(fn, spec):
    clean = make_inputs(spec, B=1, T=20, H=2, dk=4)
    o_clean, _ = clean.call(fn, chunk_size=8)
    o, _ = _poisoned(clean.cast(torch.float64), "q", float("nan"), 0, 5).call(fn, chunk_size=8)
    bad = ~torch.isfinite(o).all(-1).all(-1)[0]
    assert bad.tolist() == [t == 5 for t in range(20)]
    keep = [t for t in range(20) if t != 5]
    assert rel(o[:, keep], o_clean[:, keep]) < 1e-12


@FNS
def test_packed_sequences_are_contained_one_by_one(fn):
    """cu_seqlens [0, 7, 20, 33]: a NaN at global token 12 (sequence 1, its token 5)."""
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2")
    cu = torch.tensor([0, 7, 20, 33])
    clean = make_inputs(spec, B=1, T=33, H=2, dk=4, init="random", n_states=3)
    o_clean, st_clean = clean.call(fn, chunk_size=4, cu_seqlens=cu, output_final_state=True)
    o, state = _poisoned(clean.cast(torch.float64), "v", float("nan"), 0, 12).call(
        fn, chunk_size=4, cu_seqlens=cu, output_final_state=True)
    good = [t for t in range(33) if not 12 <= t < 20]
    assert rel(o[:, good], o_clean[:, good]) < 1e-12
    assert not torch.isfinite(o[:, 12:20]).all()
    for i in (0, 2):
        assert rel(state.memory[0][i], st_clean.memory[0][i]) < 1e-12
    assert torch.equal(state.position, st_clean.position)


def test_gradients_through_a_contained_call():
    """Sequence 0 is clean, sequence 1 has a NaN key at t = 7: the gradients of sequence 0's loss are those
    of the clean call. (Sequence 1's gradients are NaN before t = 7 too: the backward multiplies the zero
    cotangents of its later outputs by them.)"""
    spec = MemorySpec(memory="mlp", expansion=2, bias="l2", retention="l2")
    clean = make_inputs(spec, B=2, T=12, H=1, dk=4)
    weights = torch.randn(12, 1, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = []
    for inp in (clean, _poisoned(clean.cast(torch.float64), "k", float("nan"), 1, 7)):
        for fn in (memory_forward, chunked):
            x = inp.cast(torch.float64).requires_grad_()
            o, _ = x.call(fn, chunk_size=4)
            grads.append([g[0] for g in torch.autograd.grad((weights * o[0]).sum(), [x.q, x.k, x.v, x.gates["lr"],
                                                                       *x.initial_state])])
    for other in grads[1:]:
        for g, g_clean in zip(other, grads[0]):
            assert rel(g, g_clean) < 1e-9


@FNS
@pytest.mark.parametrize("spec", [
    MemorySpec(memory="mlp", expansion=2, bias="lp", p=3.0, retention="lq", norm_order=4.0),
    MemorySpec(memory="matrix", bias="lp", p=3.0, retention="l2"),
], ids=["moneta", "matrix-lp"])
def test_a_float32_overflow_spoils_no_earlier_output(fn, spec):
    """v = 1e30 is finite, but the l_p gradient |r|^(p-1) overflows float32 at t = 10: the outputs before t
    are those of the prefix, and the float64 call, where nothing overflows, stays finite throughout."""
    clean = make_inputs(spec, B=1, T=20, H=1, dk=8, alpha=(0.9, 1.0))
    big = clean.cast(torch.float64)
    big.v = big.v.clone()
    big.v[0, 10] = 1e30
    o, _ = big.cast(torch.float32).call(fn, chunk_size=16)
    o_prefix, _ = big.cast(torch.float32).slice_t(0, 10).call(fn, chunk_size=16)
    assert torch.isfinite(o[:, :10]).all() and not torch.isfinite(o[:, 10:]).all()
    assert rel(o[:, :10], o_prefix) < 1e-5
    assert torch.isfinite(big.call(fn, chunk_size=16)[0]).all()
