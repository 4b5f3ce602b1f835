"""The compiled memory op against the pure-PyTorch reference.

memory_forward (C++: csrc/cpu/memory) must equal reference.chunked for every combination of the spec's choices
(pairwise coverage), forward, final state and every gradient (q, k, v, each gate, the initial state, also one
broadcast over the batch); with chunk_size 1 it must equal the exact recurrence. Float64 throughout, so the
tolerances measure algebra, not rounding.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import miras_ext
from miras_ext import MemorySpec, reference

from ..reference.helpers import one_thread  # noqa: F401  (autouse fixture)
from ..reference.helpers import (combo_id, combo_spec, forward_and_grads, make_inputs, pairwise_combos, rel,
                                 state_rel)

TOL = 1e-9
# The compiled op implements matrix and MLP memory; vector memory is reference-only.
COMBOS = [c for c in pairwise_combos() if c["memory"] != "vector"]


def assert_same(got, want, tol=TOL):
    (o1, s1, g1), (o2, s2, g2) = got, want
    assert rel(o1, o2) < tol
    assert state_rel(s1, s2) < tol
    assert g1.keys() == g2.keys()
    for name in g1:
        a, b = g1[name], g2[name]
        if b is None:
            assert a is None or a.abs().max() == 0, name
        else:
            assert rel(a, b) < tol, (name, rel(a, b))


@pytest.mark.parametrize("index,combo", list(enumerate(COMBOS)), ids=[combo_id(c) for c in COMBOS])
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_matches_reference_chunked(index, combo, chunk_size):
    spec, kw = combo_spec(combo, index)
    inp = make_inputs(spec, T=11, init="random", init_batch=index % 2 == 0, **kw)
    assert_same(forward_and_grads(miras_ext.memory_forward, inp, chunk_size=chunk_size, scale=0.8),
                forward_and_grads(reference.chunked, inp, chunk_size=chunk_size, scale=0.8))


@pytest.mark.parametrize("spec", [
    MemorySpec(memory="mlp", bias="lp", p=3.0, retention="lq"),
    MemorySpec(memory="mlp", bias="yaad", retention="l2"),
    MemorySpec(memory="mlp", bias="l2", retention="kl", lag_token=True),
    MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True),
], ids=["moneta", "yaad", "memora", "gated-delta"])
def test_chunk_size_one_is_the_exact_recurrence(spec):
    inp = make_inputs(spec, T=7, dv=4, per_channel=spec.memory == "mlp", init="random")
    assert_same(forward_and_grads(miras_ext.memory_forward, inp, chunk_size=1), forward_and_grads(reference.recurrent, inp))


@pytest.mark.parametrize("T,chunk_size", [(1, 64), (13, 5), (64, 16), (70, 64)])
def test_odd_sizes(T, chunk_size):
    """T not a multiple of the chunk, Dk = 5 (not a power of two), Dk != Dv for matrix memory."""
    for spec, dv in ((MemorySpec(memory="matrix", bias="huber_norm", retention="l2", algorithm="momentum"), 3),
                     (MemorySpec(memory="mlp", expansion=3, bias="lp", p=3.0, retention="lq"), 5)):
        inp = make_inputs(spec, B=1, T=T, H=3, dk=5, dv=dv, init="random")
        assert_same(forward_and_grads(miras_ext.memory_forward, inp, chunk_size=chunk_size),
                    forward_and_grads(reference.chunked, inp, chunk_size=chunk_size))


def test_varlen_equals_a_loop_over_sequences():
    spec = MemorySpec(memory="mlp", bias="l2", retention="kl", lag_token=True, algorithm="momentum")
    lengths = [5, 0, 9, 3]
    inp = make_inputs(spec, B=1, T=sum(lengths), H=2, init="random", n_states=len(lengths))
    cu = torch.tensor([0, 5, 5, 14, 17])
    assert_same(forward_and_grads(miras_ext.memory_forward, inp, chunk_size=4, cu_seqlens=cu),
                forward_and_grads(reference.chunked, inp, chunk_size=4, cu_seqlens=cu))
    o, state = inp.call(miras_ext.memory_forward, chunk_size=4, cu_seqlens=cu, output_final_state=True)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one = inp.slice_t(s, e)
        one.initial_state = tuple(x[i:i + 1] for x in inp.initial_state)
        o_i, st_i = one.call(miras_ext.memory_forward, chunk_size=4, output_final_state=True)
        assert rel(o[:, s:e], o_i) < TOL
        assert rel(state.memory[0][i:i + 1], st_i.memory[0]) < TOL


def test_decoding_after_a_prefill_equals_one_call():
    spec = MemorySpec(memory="mlp", bias="yaad", retention="l2", algorithm="momentum")
    inp = make_inputs(spec, B=2, T=12, H=2, per_channel=True, init="random")
    full, _ = inp.call(miras_ext.memory_forward, chunk_size=4)
    outs = []
    o, state = inp.slice_t(0, 6).call(miras_ext.memory_forward, chunk_size=4, output_final_state=True)
    outs.append(o)
    for t in range(6, 12):
        step = inp.slice_t(t, t + 1)
        o, state = step.call(miras_ext.memory_forward, chunk_size=4, initial_state=state, output_final_state=True)
        outs.append(o)
    assert rel(torch.cat(outs, 1), full) < TOL


@pytest.mark.parametrize("spec", [
    MemorySpec(memory="mlp", expansion=1, bias="lp", p=3.0, retention="lq"),
    MemorySpec(memory="mlp", expansion=1, bias="l2", retention="kl", algorithm="momentum"),
    MemorySpec(memory="matrix", bias="huber", retention="l2", grad_at_retained=True),
], ids=["moneta", "memora-momentum", "huber-gated-delta"])
def test_gradcheck(spec):
    inp = make_inputs(spec, B=1, T=3, H=1, dk=2, per_channel=True, init="random").requires_grad_()
    names = list(inp.leaves())

    def f(*xs):
        x = dict(zip(names, xs))
        gates = {n: x.get(n) for n in ("lr", "alpha", "momentum", "delta")}
        init = tuple(x[n] for n in names if n.startswith("initial_state"))
        o, st = miras_ext.memory_forward(x["q"], x["k"], x["v"], spec, gates["lr"], gates["alpha"],
                                         gates["momentum"], gates["delta"], initial_state=init,
                                         output_final_state=True, chunk_size=2)
        return o, *st.memory

    assert torch.autograd.gradcheck(f, tuple(inp.leaves().values()))


def test_long_sequence_stays_finite():
    """T = 16384 with random gates: no NaN or Inf in the output, the state or the gradients.

    Float64: Moneta's link is homogeneous of degree -1 (W = A / ||A||_4^2), so the gradients grow by orders of
    magnitude backwards along the sequence (here up to 1e29 in float32), and the trajectory is chaotic (two
    correct builds' float64 states differ by chunk 200); whether float32 overflows is then chance. Float64
    checks that the algebra itself (underflowing retention products, the norm's epsilon) makes no 0/0 or
    inf * 0."""
    spec = MemorySpec(memory="mlp", bias="lp", p=3.0, retention="lq")
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 16384, 1, 8
    dt = torch.float64
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen, dtype=dt), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, D, generator=gen, dtype=dt)
    lr = torch.rand(B, T, H, D, generator=gen, dtype=dt).requires_grad_()
    alpha = torch.rand(B, T, H, D, generator=gen, dtype=dt).clamp_min(1e-3).requires_grad_()
    init = tuple((0.3 * torch.randn(H, *s, generator=gen, dtype=dt)).requires_grad_() for s in spec.weight_shapes(D, D))
    o, state = miras_ext.memory_forward(q, k, v, spec, lr, alpha, initial_state=init, output_final_state=True)
    (o.sum() + sum(m.sum() for m in state.memory)).backward()
    for x in (o, *state.memory, lr.grad, alpha.grad, *(i.grad for i in init)):
        assert torch.isfinite(x).all()


def test_reduced_precision_inputs():
    """bfloat16 and float16 inputs: float32 state and accumulation, output in the input dtype."""
    spec = MemorySpec(memory="mlp", bias="l2", retention="l2")
    inp = make_inputs(spec, B=1, T=9, H=2, dk=8, init="random", dtype=torch.float32)
    want, _ = inp.call(reference.chunked, chunk_size=4)
    for dtype in (torch.bfloat16, torch.float16):
        low = inp.cast(dtype)
        low.gates = {n: None if g is None else g.float() for n, g in low.gates.items()}
        low.initial_state = inp.initial_state
        o, state = low.call(miras_ext.memory_forward, chunk_size=4, output_final_state=True)
        assert o.dtype == dtype and state.memory[0].dtype == torch.float32
        # The inputs were rounded to 8 (bf16) or 11 (f16) mantissa bits; the output is within a few roundings.
        assert rel(o.float(), want) < (3e-2 if dtype == torch.bfloat16 else 5e-3)


def test_vector_memory_is_reference_only():
    spec = MemorySpec(memory="vector", retention="l2")
    inp = make_inputs(spec, B=1, T=3, H=1)
    with pytest.raises(ValueError, match="^memory:"):
        inp.call(miras_ext.memory_forward)


@pytest.mark.parametrize("tiny", [1e-4, 1e-8, 1e-12])
def test_gate_gradients_with_a_small_retention(tiny):
    """One alpha far below 1: the factored form's alpha gradient cancels terms of size 1 / A_t (docs/math.md
    Eq. 5.12), so such runs must take the unfactored path to keep float64 accuracy (with the earlier floor
    of 1e-200 the alpha gradient was 2e-4 off at 1e-12)."""
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2")
    inp = make_inputs(spec, B=1, T=8, H=2, init="random")
    inp.gates["alpha"][:, 2] = tiny
    assert_same(forward_and_grads(miras_ext.memory_forward, inp, chunk_size=4),
                forward_and_grads(reference.chunked, inp, chunk_size=4))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("retention", ["l2", "kl"])
def test_runs_whose_retention_underflows(per_channel, retention):
    """Retention products that leave the factored form's safe range (docs/math.md Eq. 5.12) take the
    coefficient-matrix path; both must agree with the reference, inside one call."""
    spec = MemorySpec(memory="mlp", expansion=2, bias="huber", retention=retention)
    inp = make_inputs(spec, B=1, T=80, H=2, per_channel=per_channel, init="random")
    inp.gates["alpha"][:, :50] = 1e-5  # the first chunk's A reaches 1e-250, under the float64 floor 1e-6
    assert_same(forward_and_grads(miras_ext.memory_forward, inp, chunk_size=64), forward_and_grads(reference.chunked, inp, chunk_size=64))


@pytest.mark.parametrize("spec", [
    MemorySpec(memory="mlp", bias="lp", p=3.0, retention="lq", ln_eps=1e-2, norm_floor=0.5),
    MemorySpec(memory="mlp", bias="lp", p=3.0, retention="lq", ln_eps=1e-2, norm_floor=0.5, norm_mean=True),
    MemorySpec(memory="matrix", bias="l2", retention="lq", norm_order=3.0, norm_floor=0.5, norm_mean=True,
               algorithm="momentum"),
    MemorySpec(memory="mlp", bias="yaad", eps=0.1, retention="l2", ln_eps=1e-2),
    MemorySpec(memory="mlp", bias="l2", retention="kl", lag_token=True, ln_eps=3e-3),
], ids=["moneta", "moneta-norm-mean", "lq3-norm-mean-momentum", "yaad", "memora"])
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_stabilising_fields(spec, chunk_size):
    """ln_eps, norm_floor and norm_mean (docs/math.md Section 8, points 15-16) reach every path and gradient
    of the op, and change the result (the floor is large enough here to matter: sum |A|^q is O(1) at this
    scale)."""
    inp = make_inputs(spec, T=11, per_channel=True, init="random")
    got = forward_and_grads(miras_ext.memory_forward, inp, chunk_size=chunk_size)
    assert_same(got, forward_and_grads(reference.chunked, inp, chunk_size=chunk_size))
    plain = dataclasses.replace(spec, ln_eps=1e-5, norm_floor=1e-12, norm_mean=False)
    plain_inp = make_inputs(plain, T=11, per_channel=True, init="random")
    assert rel(forward_and_grads(miras_ext.memory_forward, plain_inp, chunk_size=chunk_size)[0], got[0]) > 1e-6
