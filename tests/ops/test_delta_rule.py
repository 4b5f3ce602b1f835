"""The exact chunked delta rule (docs/math.md Eqs. 5.13-5.19): DeltaNet and Gated DeltaNet are the exact
recurrence at every chunk size.

The oracle is reference.recurrent at chunk 1, whose inner gradients come from autograd. Its anchor follows
the chunk-1 schedule, and a state's anchor is read by nothing in this family, so the comparisons across chunk
sizes leave the anchor out of the states and of the loss; at equal chunk sizes it is compared with the rest.
"""

from __future__ import annotations

import pytest
import torch

import miras_ext
from miras_ext import MemorySpec, MemoryState, memory_forward, memory_step, reference

from ..reference.helpers import one_thread  # noqa: F401  (autouse fixture)
from ..reference.helpers import forward_and_grads, make_inputs, rel, state_rel

SPECS = {
    "deltanet": MemorySpec(memory="matrix", bias="l2", retention="none"),
    "gated-deltanet": MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True),
    "delta-l2-retention": MemorySpec(memory="matrix", bias="l2", retention="l2"),  # Eq. 3.1's order
}
F64_TOL = 1e-10
F32_TOL = 1e-5


def without_anchor(fn):
    """fn with the anchor dropped from its final state: what the state of this family means."""
    def call(*args, **kwargs):
        o, state = fn(*args, **kwargs)
        return o, None if state is None else MemoryState(state.memory, state.momentum, (), state.position)
    return call


def assert_close(got, want, tol):
    (o1, s1, g1), (o2, s2, g2) = got, want
    assert rel(o1, o2) < tol, ("o", rel(o1, o2))
    assert state_rel(s1, s2) < tol, ("state", state_rel(s1, s2))
    assert g1.keys() == g2.keys()
    for name in g1:
        assert rel(g1[name], g2[name]) < tol, (name, rel(g1[name], g2[name]))


def exact(inp, **kwargs):
    return forward_and_grads(without_anchor(reference.recurrent), inp, chunk_size=1, **kwargs)


@pytest.mark.parametrize("per_channel", [False, True], ids=["perhead", "perch"])
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("chunk_size", [1, 16, 64])
def test_every_chunk_size_is_the_exact_recurrence(name, chunk_size, per_channel):
    """T = 37 (odd; not a multiple of 16 or 64; a single partial run at 64), Dk = 5 != Dv = 3, a random
    initial state broadcast over the batch, outputs, final memory and every gradient in float64."""
    inp = make_inputs(SPECS[name], B=2, T=37, H=2, dk=5, dv=3, per_channel=per_channel, init="random",
                      init_batch=False, lr=(0.0, 1.0))
    got = forward_and_grads(without_anchor(memory_forward), inp, chunk_size=chunk_size, scale=0.8)
    assert_close(got, exact(inp, scale=0.8), F64_TOL)


@pytest.mark.parametrize("name", list(SPECS))
def test_equals_the_reference_at_its_chunk_size_anchor_included(name):
    """Same chunk size, so the same anchor schedule: the anchor and its gradient are compared too."""
    inp = make_inputs(SPECS[name], B=2, T=21, H=2, dk=4, dv=6, init="random")
    assert_close(forward_and_grads(memory_forward, inp, chunk_size=8),
                 forward_and_grads(reference.chunked, inp, chunk_size=8), F64_TOL)
    assert_close(forward_and_grads(memory_forward, inp, chunk_size=8),
                 forward_and_grads(reference.recurrent, inp, chunk_size=8), F64_TOL)


@pytest.mark.parametrize("name", ["deltanet", "gated-deltanet"])
def test_float32_chunk_64(name):
    """float32 at chunk 64 (T = 200: three full chunks and a partial one, D = 16) against the float64
    recurrence."""
    inp = make_inputs(SPECS[name], B=2, T=200, H=2, dk=16, dv=16, init="random", lr=(0.0, 1.0))
    got = forward_and_grads(without_anchor(memory_forward), inp.cast(torch.float32), chunk_size=64)
    want = exact(inp)
    (o1, s1, g1), (o2, s2, g2) = got, want
    errors = {"o": rel(o1, o2), "memory": rel(s1.memory[0], s2.memory[0])}
    errors.update({n: rel(g1[n], g2[n]) for n in g2})
    assert max(errors.values()) < F32_TOL, errors


def test_tiny_alpha_is_exact():
    """A run whose retention product falls below the factored floor (Eq. 5.12) takes the unfactored
    coefficients; the alpha gradient stays exact (no division by the product)."""
    spec = SPECS["gated-deltanet"]
    inp = make_inputs(spec, B=1, T=24, H=2, dk=4, dv=4, init="random")
    inp.gates["alpha"][:, 5::6] = 1e-4
    assert_close(forward_and_grads(without_anchor(memory_forward), inp, chunk_size=16), exact(inp), F64_TOL)


def test_varlen_and_positions_mid_chunk():
    """cu_seqlens with an empty sequence, and initial positions inside a chunk."""
    spec = SPECS["gated-deltanet"]
    lengths = [9, 0, 30, 4]
    cu = torch.tensor([0, 9, 9, 39, 43])
    inp = make_inputs(spec, B=1, T=sum(lengths), H=2, dk=5, dv=3, init="random", n_states=len(lengths))
    got = forward_and_grads(without_anchor(memory_forward), inp, chunk_size=16, cu_seqlens=cu)
    assert_close(got, exact(inp, cu_seqlens=cu), F64_TOL)
    mid = make_inputs(spec, B=2, T=29, H=2, dk=5, dv=3, init="random")
    zero = mid.initial_state[0]
    start = MemoryState((zero,), (), (torch.zeros_like(zero),), torch.tensor([5, 21]))
    got = forward_and_grads(without_anchor(lambda *a, **k: memory_forward(*a, **{**k, "initial_state": start})),
                            mid, chunk_size=16)
    want = forward_and_grads(without_anchor(lambda *a, **k: reference.recurrent(*a, **{**k, "initial_state": start})),
                             mid, chunk_size=1)
    got[2].pop("initial_state[0]"), want[2].pop("initial_state[0]")
    assert_close(got, want, F64_TOL)


@pytest.mark.parametrize("name", ["deltanet", "gated-deltanet"])
def test_decode_continues_the_state(name):
    """Prefill 19 tokens at chunk 16, then decode one token per memory_step: the outputs and final memory
    of one call over all 27 tokens."""
    spec = SPECS[name]
    inp = make_inputs(spec, B=2, T=27, H=2, dk=5, dv=3, init="random")
    o_all, s_all = inp.call(memory_forward, chunk_size=16, output_final_state=True)
    o_pre, state = inp.slice_t(0, 19).call(memory_forward, chunk_size=16, output_final_state=True)
    outs = [o_pre]
    for t in range(19, 27):
        g = {n: None if x is None else x[:, t] for n, x in inp.gates.items()}
        o_t, state = memory_step(inp.q[:, t], inp.k[:, t], inp.v[:, t], spec, g["lr"], g["alpha"], state=state,
                                 chunk_size=16)
        outs.append(o_t.unsqueeze(1))
    assert rel(torch.cat(outs, 1), o_all) < F64_TOL
    assert state_rel(state, s_all) < F64_TOL
    o_ref, _ = inp.call(reference.recurrent, output_final_state=True)
    assert rel(o_all, o_ref) < F64_TOL


def test_gradcheck():
    spec = SPECS["gated-deltanet"]
    inp = make_inputs(spec, B=1, T=7, H=1, dk=3, dv=2, per_channel=True, init="random").requires_grad_()
    leaves = list(inp.leaves().values())

    def fn(q, k, v, lr, alpha, z0):
        o, state = memory_forward(q, k, v, spec, lr, alpha, initial_state=(z0,), chunk_size=4,
                                  output_final_state=True)
        return o, state.memory[0]

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8)


def test_opcheck():
    spec = SPECS["gated-deltanet"]
    inp = make_inputs(spec, B=2, T=9, H=2, dk=3, dv=4, per_channel=True, init="random").requires_grad_()
    z = inp.initial_state[0]
    args = (inp.q, inp.k, inp.v, inp.gates["lr"], inp.gates["alpha"], None, None, [z], [], [z.detach().clone()],
            torch.tensor([3, 3]), None, spec.encode(), 1.0, 4, True)
    torch.library.opcheck(torch.ops.miras_ext.memory_chunk_fwd.default, args)


def test_minibatch_field_selects_the_anchored_approximation():
    """minibatch=True is the paper's Section 5.4 form (Eq. 5.1): the op equals reference.chunked with the
    field, and both differ from the exact recurrence at chunk 16."""
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True, minibatch=True)
    assert "minibatch=1" in spec.encode().split(",") and not spec.exact_chunks and spec.delta_rule
    assert SPECS["gated-deltanet"].exact_chunks and not MemorySpec(memory="mlp").exact_chunks
    inp = make_inputs(spec, B=2, T=37, H=2, dk=5, dv=3, init="random", lr=(0.0, 1.0))
    got = forward_and_grads(memory_forward, inp, chunk_size=16)
    want = forward_and_grads(reference.chunked, inp, chunk_size=16)
    assert rel(got[0], want[0]) < 1e-9
    assert rel(got[0], exact(inp)[0]) > 1e-3


def test_presets_are_exact_at_their_default_chunk():
    inp = make_inputs(SPECS["gated-deltanet"], B=1, T=70, H=2, dk=8, dv=8, init="random", lr=(0.0, 1.0))
    o, _ = miras_ext.gated_delta_forward(inp.q, inp.k, inp.v, inp.gates["lr"], inp.gates["alpha"],
                                         initial_state=inp.initial_state)
    assert rel(o, inp.call(reference.recurrent)[0]) < F64_TOL
    o, _ = miras_ext.delta_forward(inp.q, inp.k, inp.v, inp.gates["lr"], initial_state=inp.initial_state)
    want, _ = reference.recurrent(inp.q, inp.k, inp.v, SPECS["deltanet"], inp.gates["lr"],
                                  initial_state=inp.initial_state)
    assert rel(o, want) < F64_TOL
