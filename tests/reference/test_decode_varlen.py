"""Continuing from a final state (prefill then token-by-token decoding), packed sequences (cu_seqlens), empty
inputs and the position checks of reference.chunked."""

from __future__ import annotations

import pytest
import torch

from miras_ext.reference import chunked, recurrent
from miras_ext.spec import MemorySpec
from miras_ext.state import MemoryState

from .helpers import one_thread  # noqa: F401  (autouse fixture)
from .helpers import cotangent_loss, make_inputs, rel, state_rel

TOL = 1e-10
B_CHUNK = 4

SPECS = [
    pytest.param(MemorySpec(memory="matrix", bias="l2", retention="l2"), {"dv": 3}, id="matrix"),
    pytest.param(MemorySpec(memory="matrix", bias="huber", retention="l2", grad_at_retained=True,
                            algorithm="momentum", lag_token=True),
                 {"dv": 3, "per_channel": True, "delta_per_channel": True}, id="matrix-gar-momentum-lag-perch"),
    pytest.param(MemorySpec(memory="mlp", bias="l2", retention="kl", algorithm="momentum", lag_token=True), {},
                 id="mlp-kl-momentum-lag"),
    pytest.param(MemorySpec(memory="mlp", bias="lp", p=3.0, retention="lq"), {"per_channel": True},
                 id="moneta-perch"),
    pytest.param(MemorySpec(memory="vector", bias="yaad", retention="sigmoid", algorithm="momentum"), {},
                 id="vector-yaad-sigmoid-momentum"),
]


def _cat_states(a: MemoryState, b: MemoryState) -> MemoryState:
    cat = lambda x, y: tuple(torch.cat([u, w]) for u, w in zip(x, y))  # noqa: E731
    return MemoryState(cat(a.memory, b.memory), cat(a.momentum, b.momentum), cat(a.anchor, b.anchor),
                       torch.cat([a.position, b.position]))


def _continue(fn, inp, pieces: list[int], chunk_size: int):
    """Run `inp` in consecutive pieces of the given lengths, each from the previous final state."""
    outs, state, start = [], inp.initial_state, 0
    for n in pieces:
        o, state = inp.slice_t(start, start + n).call(fn, initial_state=state, chunk_size=chunk_size,
                                                      output_final_state=True)
        outs.append(o)
        start += n
    assert start == inp.q.shape[1]
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("spec,kw", SPECS)
@pytest.mark.parametrize("fn", [chunked, recurrent], ids=["chunked", "recurrent"])
def test_prefill_then_decode_equals_one_call(spec, kw, fn):
    """5 tokens of prefill (not a multiple of b = 4), then 6 calls with T = 1, each from the last state."""
    inp = make_inputs(spec, B=2, T=11, H=2, **kw)
    o_ref, s_ref = inp.call(fn, chunk_size=B_CHUNK, output_final_state=True)
    o, s = _continue(fn, inp, [5] + [1] * 6, B_CHUNK)
    assert rel(o, o_ref) < TOL
    assert state_rel(s, s_ref) < TOL
    assert s.position.tolist() == [11, 11]


@pytest.mark.parametrize("spec,kw", SPECS)
@pytest.mark.parametrize("pieces", [[5, 6], [3, 1, 7], [1] * 11], ids=["5+6", "3+1+7", "1x11"])
def test_prefill_in_pieces_equals_one_call(spec, kw, pieces):
    inp = make_inputs(spec, B=2, T=11, H=2, **kw)
    o_ref, s_ref = inp.call(chunked, chunk_size=B_CHUNK, output_final_state=True)
    o, s = _continue(chunked, inp, pieces, B_CHUNK)
    assert rel(o, o_ref) < TOL
    assert state_rel(s, s_ref) < TOL


def test_decode_gradients_equal_one_call():
    """Gradients flow through the states handed from call to call exactly as through one call."""
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True, algorithm="momentum",
                      lag_token=True)
    base = make_inputs(spec, B=2, T=7, H=2, dv=3, init="random")
    grads = []
    for pieces in ([7], [3, 1, 1, 2]):
        inp = base.cast(torch.float64).requires_grad_()
        o, s = _continue(chunked, inp, pieces, B_CHUNK)
        leaves = inp.leaves()
        grads.append(torch.autograd.grad(cotangent_loss(o, s), list(leaves.values())))
    for name, a, b in zip(leaves, *grads):
        assert rel(a, b) < TOL, name


# ---------------------------------------------------------------------------------------------------------
# cu_seqlens: packed sequences against a loop over them.

LENGTHS = [3, 0, 6, 5]  # an empty sequence, and lengths not multiples of b


def _packed(spec, kw, init_batch=True):
    n, total = len(LENGTHS), sum(LENGTHS)
    inp = make_inputs(spec, B=1, T=total, H=2, init="random", n_states=n, init_batch=init_batch, **kw)
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int64)
    return inp, cu


def _loop(fn, inp, cu, initial_state, chunk_size):
    """Each sequence on its own (B = 1), from its own initial state; outputs and final states concatenated."""
    outs, states = [], []
    bounds = cu.tolist()
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        if isinstance(initial_state, MemoryState):
            pick = lambda ts: tuple(t[i:i + 1] for t in ts)  # noqa: E731
            init = MemoryState(pick(initial_state.memory), pick(initial_state.momentum), pick(initial_state.anchor),
                               initial_state.position[i:i + 1])
        elif initial_state[0].dim() == 2 + len(inp.spec.weight_shapes(inp.k.shape[-1], inp.v.shape[-1])[0]):
            init = tuple(x[i:i + 1] for x in initial_state)  # [N, H, *shape]: sequence i's own
        else:
            init = initial_state  # [H, *shape]: shared
        o, st = inp.slice_t(s, e).call(fn, initial_state=init, chunk_size=chunk_size, output_final_state=True)
        outs.append(o)
        states.append(st)
    state = states[0]
    for st in states[1:]:
        state = _cat_states(state, st)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("spec,kw", SPECS)
@pytest.mark.parametrize("fn", [chunked, recurrent], ids=["chunked", "recurrent"])
def test_cu_seqlens_equals_a_loop_over_sequences(spec, kw, fn):
    inp, cu = _packed(spec, kw)
    o, s = inp.call(fn, cu_seqlens=cu, chunk_size=B_CHUNK, output_final_state=True)
    o_ref, s_ref = _loop(fn, inp, cu, inp.initial_state, B_CHUNK)
    assert o.shape == (1, sum(LENGTHS), 2, inp.v.shape[-1])
    assert rel(o, o_ref) < TOL
    assert state_rel(s, s_ref) < TOL
    assert s.position.tolist() == LENGTHS
    # the empty sequence hands its initial state back unchanged
    for x, x0 in zip(s.memory, inp.initial_state):
        assert torch.equal(x[1], x0[1].to(x.dtype))


@pytest.mark.parametrize("spec,kw", SPECS[:3])
def test_cu_seqlens_gradients_equal_a_loop(spec, kw):
    inp, cu = _packed(spec, kw)
    grads = []
    for packed in (True, False):
        x = inp.cast(torch.float64).requires_grad_()
        if packed:
            o, s = x.call(chunked, cu_seqlens=cu, chunk_size=B_CHUNK, output_final_state=True)
        else:
            o, s = _loop(chunked, x, cu, x.initial_state, B_CHUNK)
        leaves = x.leaves()
        grads.append(torch.autograd.grad(cotangent_loss(o, s), list(leaves.values())))
    for name, a, b in zip(leaves, *grads):
        assert b.norm() > 0, name
        assert rel(a, b) < TOL, name


def test_cu_seqlens_with_a_shared_initial_state_and_positions():
    """An initial state [H, *shape] is shared by every sequence; a MemoryState may hold a different position
    per sequence (each sequence continues its own chunking)."""
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2", algorithm="momentum", lag_token=True)
    inp, cu = _packed(spec, {"dv": 3}, init_batch=False)
    o, s = inp.call(chunked, cu_seqlens=cu, chunk_size=B_CHUNK, output_final_state=True)
    o_ref, s_ref = _loop(chunked, inp, cu, inp.initial_state, B_CHUNK)
    assert rel(o, o_ref) < TOL and state_rel(s, s_ref) < TOL

    n = len(LENGTHS)
    gen = torch.Generator().manual_seed(5)
    mem = tuple(torch.randn(n, *x.shape, generator=gen, dtype=torch.float64) * 0.3 for x in inp.initial_state)
    mom = tuple(torch.randn_like(x) * 0.1 for x in mem)
    anchor = tuple(x + 0.05 * torch.randn_like(x) for x in mem)
    state = MemoryState(mem, mom, anchor, torch.tensor([0, 1, 6, 3]))
    o, s = inp.call(chunked, cu_seqlens=cu, initial_state=state, chunk_size=B_CHUNK, output_final_state=True)
    o_ref, s_ref = _loop(chunked, inp, cu, state, B_CHUNK)
    o_rec, s_rec = inp.call(recurrent, cu_seqlens=cu, initial_state=state, chunk_size=B_CHUNK,
                            output_final_state=True)
    assert rel(o, o_ref) < TOL and state_rel(s, s_ref) < TOL
    assert rel(o, o_rec) < TOL and state_rel(s, s_rec) < TOL
    assert s.position.tolist() == [p + n for p, n in zip([0, 1, 6, 3], LENGTHS)]


# ---------------------------------------------------------------------------------------------------------
# Empty inputs and positions.

@pytest.mark.parametrize("fn", [chunked, recurrent], ids=["chunked", "recurrent"])
@pytest.mark.parametrize("spec,kw", SPECS[:3])
def test_empty_input_returns_the_initial_state(spec, kw, fn):
    inp = make_inputs(spec, B=2, T=0, H=2, init="random", **kw)
    o, s = inp.call(fn, chunk_size=B_CHUNK, output_final_state=True)
    assert o.shape == (2, 0, 2, inp.v.shape[-1]) and o.dtype == inp.q.dtype
    for x, x0 in zip(s.memory, inp.initial_state):
        assert torch.equal(x, x0)
    assert s.position.tolist() == [0, 0]
    # from a MemoryState mid-chunk: handed back unchanged, position included
    _, mid = make_inputs(spec, B=2, T=3, H=2, init="random", **kw).call(fn, chunk_size=B_CHUNK,
                                                                         output_final_state=True)
    o, s = inp.call(fn, initial_state=mid, chunk_size=B_CHUNK, output_final_state=True)
    assert o.shape[1] == 0
    assert state_rel(s, mid) == 0.0


def test_empty_input_with_zero_initial_state():
    spec = MemorySpec(memory="matrix", bias="l2", retention="none", algorithm="momentum")
    inp = make_inputs(spec, B=3, T=0, H=2, dv=3)
    o, s = inp.call(chunked, output_final_state=True)
    assert o.shape == (3, 0, 2, 3)
    assert s.memory[0].shape == (3, 2, 3, 4) and not s.memory[0].any() and not s.momentum[0].any()
    assert s.position.tolist() == [0, 0, 0]


def _state_at(spec, kw, positions):
    """A MemoryState for B = len(positions) with the given positions (random weights)."""
    inp = make_inputs(spec, B=len(positions), T=0, H=2, init="random", **kw)
    _, s = inp.call(chunked, output_final_state=True)
    return s._replace(position=torch.tensor(positions), chunk_size=None)  # built by hand: any chunk size


def test_non_uniform_chunk_offsets_in_a_batch_raise():
    spec, kw = MemorySpec(memory="matrix", bias="l2", retention="l2"), {"dv": 3}
    state = _state_at(spec, kw, [1, 2])
    inp = make_inputs(spec, B=2, T=3, H=2, **kw)
    with pytest.raises(ValueError, match=r"initial_state\.position"):
        inp.call(chunked, initial_state=state, chunk_size=B_CHUNK)


def test_positions_at_the_same_chunk_offset_are_accepted():
    """Positions 1 and 5 are both at offset 1 of a chunk of 4: one batched call equals two separate ones."""
    spec, kw = MemorySpec(memory="matrix", bias="l2", retention="l2", lag_token=True), {"dv": 3}
    state = _state_at(spec, kw, [1, 5])
    inp = make_inputs(spec, B=2, T=6, H=2, **kw)
    o, s = inp.call(chunked, initial_state=state, chunk_size=B_CHUNK, output_final_state=True)
    for i in range(2):
        one = inp.cast(torch.float64)
        for name in ("q", "k", "v"):
            setattr(one, name, getattr(inp, name)[i:i + 1])
        one.gates = {n: None if g is None else g[i:i + 1] for n, g in inp.gates.items()}
        pick = lambda ts: tuple(t[i:i + 1] for t in ts)  # noqa: E731
        st = MemoryState(pick(state.memory), pick(state.momentum), pick(state.anchor), state.position[i:i + 1])
        o_i, s_i = one.call(chunked, initial_state=st, chunk_size=B_CHUNK, output_final_state=True)
        assert rel(o[i:i + 1], o_i) < TOL
        assert rel(s.memory[0][i:i + 1], s_i.memory[0]) < TOL
    assert s.position.tolist() == [7, 11]


@pytest.mark.parametrize("fn", [chunked, recurrent], ids=["chunked", "recurrent"])
def test_empty_batch(fn):
    """B = 0: an empty output and an empty state (as for T = 0), or a ValueError naming q."""
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2")
    inp = make_inputs(spec, B=0, T=3, H=2, dv=3)
    try:
        o, s = inp.call(fn, chunk_size=2, output_final_state=True)
    except ValueError as e:
        assert str(e).startswith("q:")
        return
    assert o.shape == (0, 3, 2, 3) and s.memory[0].shape == (0, 2, 3, 4) and s.position.shape == (0,)
