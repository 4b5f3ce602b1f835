"""The token loop of the CPU op (csrc/cpu/memory/token_loop.cpp; docs/math.md Eqs. 5.20-5.21): every linked
retention (l_q, KL, elastic net, sigmoid) and momentum, against reference.chunked in float64.

Output, final state and every gradient (q, k, v, lr, alpha, momentum, the initial state) to 1e-9, with gates
per head and per channel (both sides of Eq. 3.4: the first MLP layer's columns, the last layer's rows), odd
sizes (Dk = 5, expansion 3, T not a multiple of the chunk, a chunk of 5), cu_seqlens and decoding.
"""

from __future__ import annotations

import pytest
import torch

import miras_ext
from miras_ext import MemorySpec, reference

from ..reference.helpers import one_thread  # noqa: F401  (autouse fixture)
from ..reference.helpers import forward_and_grads, make_inputs, rel
from .test_memory_vs_reference import assert_same

SPECS = {
    "moneta": MemorySpec(memory="mlp", bias="lp", p=3.0, retention="lq", norm_order=4.0),
    # The orders with a multiplication fast path (pow_q: 4 above, 3) and one through std::pow.
    "lq-3": MemorySpec(memory="mlp", expansion=3, bias="l2", retention="lq", norm_order=3.0),
    "lq-2.5": MemorySpec(memory="matrix", bias="l2", retention="lq", norm_order=2.5),
    "moneta-norm-mean": MemorySpec(memory="mlp", bias="lp", p=3.0, retention="lq", norm_floor=0.5, norm_mean=True),
    "memora": MemorySpec(memory="mlp", bias="l2", retention="kl", lag_token=True),
    "elastic-net": MemorySpec(memory="mlp", bias="l2", retention="elastic_net", shrinkage=0.05),
    "sigmoid": MemorySpec(memory="matrix", bias="huber", retention="sigmoid"),
    "titans": MemorySpec(memory="mlp", activation="silu", residual_norm=False, bias="l2", retention="l2",
                         algorithm="momentum"),
    "kl-momentum": MemorySpec(memory="mlp", expansion=3, bias="l2", retention="kl", algorithm="momentum"),
    "matrix-momentum": MemorySpec(memory="matrix", bias="l2", retention="none", algorithm="momentum"),
}


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
@pytest.mark.parametrize("name", list(SPECS))
def test_matches_reference(name, per_channel):
    spec = SPECS[name]
    inp = make_inputs(spec, B=2, T=13, H=3, dk=5, per_channel=per_channel, init="random", init_batch=per_channel)
    assert_same(forward_and_grads(miras_ext.memory_forward, inp, chunk_size=5, scale=0.7),
                forward_and_grads(reference.chunked, inp, chunk_size=5, scale=0.7))


@pytest.mark.parametrize("name", ["moneta", "memora", "titans"])
def test_chunk_64_over_70_tokens(name):
    """One full chunk of 64 and a partial one: the loop's workspace at the preset's chunk size."""
    inp = make_inputs(SPECS[name], B=1, T=70, H=2, dk=6, per_channel=True, init="random", lr=(0.0, 0.05))
    assert_same(forward_and_grads(miras_ext.memory_forward, inp, chunk_size=64),
                forward_and_grads(reference.chunked, inp, chunk_size=64))


@pytest.mark.parametrize("name", ["moneta", "titans", "sigmoid"])
def test_varlen(name):
    lengths = [6, 0, 9, 2]
    inp = make_inputs(SPECS[name], B=1, T=sum(lengths), H=2, per_channel=True, init="random", n_states=len(lengths))
    cu = torch.tensor([0, 6, 6, 15, 17])
    assert_same(forward_and_grads(miras_ext.memory_forward, inp, chunk_size=4, cu_seqlens=cu),
                forward_and_grads(reference.chunked, inp, chunk_size=4, cu_seqlens=cu))


@pytest.mark.parametrize("name", ["moneta", "memora", "titans"])
def test_decoding_after_a_prefill_equals_one_call(name):
    inp = make_inputs(SPECS[name], B=2, T=11, H=2, per_channel=True, init="random")
    full, want = inp.call(miras_ext.memory_forward, chunk_size=4, output_final_state=True)
    outs = []
    o, state = inp.slice_t(0, 5).call(miras_ext.memory_forward, chunk_size=4, output_final_state=True)
    outs.append(o)
    for t in range(5, 11):
        o, state = inp.slice_t(t, t + 1).call(miras_ext.memory_forward, chunk_size=4, initial_state=state,
                                              output_final_state=True)
        outs.append(o)
    assert rel(torch.cat(outs, 1), full) < 1e-12
    for a, b in zip(state.memory, want.memory):
        assert rel(a, b) < 1e-12
