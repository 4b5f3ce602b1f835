"""Gradients of reference.chunked against reference.recurrent (whose inner gradients come from autograd of the
loss as written), and torch.autograd.gradcheck of both on tiny shapes.

A random cotangent is pulled back through the output and every tensor of the final state (memory, momentum,
anchor); gradients w.r.t. q, k, v, every gate and the initial state are compared.
"""

from __future__ import annotations

import pytest
import torch

from miras_ext.reference import chunked, recurrent
from miras_ext.spec import MemorySpec

from .helpers import one_thread  # noqa: F401  (autouse fixture)
from .helpers import (GATE_NAMES, combo_id, combo_spec, forward_and_grads, kink_margin, make_inputs,
                      pairwise_combos, rel)

TOL = 1e-9
COMBOS = pairwise_combos()


def gradients(fn, inp, **kwargs) -> dict[str, torch.Tensor]:
    """d cotangent_loss / d every input of `inp`, by name."""
    return forward_and_grads(fn, inp, **kwargs)[2]


def assert_same_gradients(inp, chunk_size: int, tol: float = TOL) -> None:
    ga = gradients(chunked, inp, chunk_size=chunk_size)
    gb = gradients(recurrent, inp, chunk_size=chunk_size)
    assert ga.keys() == gb.keys()
    errors = {}
    for name in ga:
        assert ga[name] is not None and gb[name] is not None, name
        assert ga[name].shape == gb[name].shape, name
        assert torch.isfinite(ga[name]).all(), name
        assert gb[name].norm() > 0, f"{name}: zero gradient, the comparison would be vacuous"
        errors[name] = rel(ga[name], gb[name])
    bad = {n: f"{e:.2e}" for n, e in errors.items() if not e < tol}
    assert not bad, bad


@pytest.mark.parametrize("combo", COMBOS, ids=[combo_id(c) for c in COMBOS])
@pytest.mark.parametrize("chunk_size", [1, 3], ids=["b1", "b3"])
def test_chunked_gradients_equal_recurrent(combo, chunk_size):
    """T = 7 = 3 + 3 + 1 with b = 3, and the exact recurrence (b = 1). Every case starts from a random initial
    state (so that it has a gradient); every other case passes it as [H, *shape], broadcast over the batch
    (its gradient is then the sum over the batch)."""
    index = COMBOS.index(combo)
    spec, kw = combo_spec(combo, index)
    inp = make_inputs(spec, B=2, T=7, H=2, init="random", init_batch=index % 2 == 0, **kw)
    assert_same_gradients(inp, chunk_size=chunk_size)


@pytest.mark.parametrize("spec,kw", [
    pytest.param(MemorySpec(memory="mlp", bias="lp", p=3.0, retention="lq"), {}, id="moneta"),
    pytest.param(MemorySpec(memory="mlp", bias="yaad", retention="l2", algorithm="momentum", lag_token=True),
                 {"per_channel": True}, id="yaad-momentum-perch-lag"),
    pytest.param(MemorySpec(memory="matrix", bias="huber", retention="l2", grad_at_retained=True,
                            algorithm="momentum"), {"dv": 3, "per_channel": True, "delta_per_channel": True},
                 id="matrix-huber-gar-momentum-perch"),
    pytest.param(MemorySpec(memory="vector", bias="value_shift", retention="sigmoid"), {}, id="vector-sigmoid"),
])
def test_exact_gradients_equal_recurrent(spec, kw):
    """chunk_size 1: the chunked algorithm's hand-derived backward against autograd of the exact recurrence."""
    inp = make_inputs(spec, B=2, T=5, H=2, init="random", **kw)
    assert_same_gradients(inp, chunk_size=1)


def test_broadcast_initial_state_gradient_is_the_batch_sum():
    """An initial state [H, *shape] is shared by the batch: its gradient is the sum of the per-sequence
    gradients of the same state passed as [B, H, *shape]."""
    spec = MemorySpec(memory="mlp", bias="l2", retention="kl", algorithm="momentum")
    shared = make_inputs(spec, B=3, T=6, H=2, init="random", init_batch=False)
    batched = shared.cast(torch.float64)
    batched.initial_state = tuple(x.expand(3, *x.shape).clone() for x in shared.initial_state)
    for fn in (chunked, recurrent):
        g_shared = gradients(fn, shared, chunk_size=4)
        g_batched = gradients(fn, batched, chunk_size=4)
        for i in range(len(shared.initial_state)):
            name = f"initial_state[{i}]"
            assert g_shared[name].shape == shared.initial_state[i].shape
            assert rel(g_shared[name], g_batched[name].sum(0)) < 1e-12
            assert rel(g_batched[name][0], g_batched[name][1]) > 1e-3  # the batch entries really differ


def test_momentum_gate_gradient_at_zero():
    """momentum = 0 is a valid gate value ([0, 1)); d out / d momentum there is S_{t-1}, not 0."""
    spec = MemorySpec(memory="matrix", bias="l2", retention="none", algorithm="momentum")
    inp = make_inputs(spec, B=1, T=3, H=1, dk=2, momentum=(0.0, 0.0))
    ga = gradients(chunked, inp, chunk_size=1)["momentum"]
    gb = gradients(recurrent, inp, chunk_size=1)["momentum"]
    assert gb.norm() > 0
    assert rel(ga, gb) < TOL


# ---------------------------------------------------------------------------------------------------------
# gradcheck on tiny shapes (finite differences against the analytic backward of each reference).

GRADCHECK_SPECS = [
    pytest.param(MemorySpec(memory="mlp", expansion=1, bias="lp", p=3.0, retention="lq", norm_order=4.0), {},
                 id="moneta"),
    pytest.param(MemorySpec(memory="mlp", expansion=1, bias="lp", p=3.0, retention="lq", norm_floor=0.5,
                            norm_mean=True), {}, id="moneta-norm-mean"),
    pytest.param(MemorySpec(memory="mlp", expansion=1, bias="yaad", retention="l2"), {}, id="yaad"),
    pytest.param(MemorySpec(memory="mlp", expansion=1, bias="l2", retention="kl", lag_token=True), {},
                 id="memora-lag"),
    pytest.param(MemorySpec(memory="mlp", expansion=1, activation="silu", bias="l2", retention="l2",
                            algorithm="momentum"), {}, id="titans"),
    pytest.param(MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True), {"dv": 2},
                 id="matrix-gated-delta"),
    pytest.param(MemorySpec(memory="matrix", bias="huber", retention="l2", algorithm="momentum"),
                 {"dv": 2, "per_channel": True, "delta_per_channel": True}, id="matrix-huber-momentum-perch"),
    pytest.param(MemorySpec(memory="vector", bias="huber_norm", retention="sigmoid"), {"per_channel": True},
                 id="vector-huber-norm-sigmoid-perch"),
]


@pytest.mark.parametrize("spec,kw", GRADCHECK_SPECS)
@pytest.mark.parametrize("fn,chunk_size", [(chunked, 2), (recurrent, 2), (chunked, 1)],
                         ids=["chunked-b2", "recurrent-b2", "chunked-b1"])
def test_gradcheck(spec, kw, fn, chunk_size):
    dk = 2
    inp = make_inputs(spec, B=1, T=3, H=1, dk=dk, init="random", init_scale=0.5, seed=11,
                      lr=(0.1, 0.5), alpha=(0.6, 0.95), momentum=(0.1, 0.9), **kw)
    # finite differences (step 1e-6) must not straddle a Huber-type kink
    assert kink_margin(inp, chunk_size) > 1e-3
    leaves = inp.requires_grad_().leaves()
    names = list(leaves)

    def f(*tensors):
        x = dict(zip(names, tensors))
        gates = {n: x.get(n) for n in GATE_NAMES}
        init = tuple(x[n] for n in names if n.startswith("initial_state"))
        o, state = fn(x["q"], x["k"], x["v"], spec, gates["lr"], gates["alpha"], gates["momentum"], gates["delta"],
                      initial_state=init, output_final_state=True, chunk_size=chunk_size)
        return (o, *state.memory, *state.momentum, *state.anchor)

    assert torch.autograd.gradcheck(f, tuple(leaves.values()), eps=1e-6, atol=1e-7, rtol=1e-5)
