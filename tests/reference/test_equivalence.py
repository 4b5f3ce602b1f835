"""reference.chunked against reference.recurrent, forward and final state.

chunked(chunk_size=1) must be the exact recurrence, and chunked(chunk_size=b) must equal recurrent(chunk_size=b)
(every token's gradient taken at its chunk's anchor, Eq. 5.1), over a pairwise covering set of the spec choices
(memory x bias x retention x algorithm x per-channel gates x grad_at_retained x lag_token).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from miras_ext.reference import chunked, recurrent
from miras_ext.spec import MemorySpec

from .helpers import one_thread  # noqa: F401  (autouse fixture)
from .helpers import FACTORS, combo_id, combo_spec, make_inputs, pairwise_combos, rel, spec_id, state_rel, valid_combo

# float64 throughout: the two algorithms differ only by summation order, so ~1e-15; 1e-10 leaves room for
# the few ill-conditioned cases (l_q link, MLP with sigmoid link) that reach ~1e-12.
TOL = 1e-10
COMBOS = pairwise_combos()
IDS = [combo_id(c) for c in COMBOS]


def _compare(a, b, tol=TOL):
    (oa, sa), (ob, sb) = a, b
    assert oa.shape == ob.shape and oa.dtype == ob.dtype
    assert torch.isfinite(oa).all() and torch.isfinite(ob).all()
    err_o, err_s = rel(oa, ob), state_rel(sa, sb)
    assert err_o < tol, f"output rel {err_o:.3g}"
    assert err_s < tol, f"final state rel {err_s:.3g}"


def test_pairwise_combos_cover_every_pair():
    names = list(FACTORS)
    seen = {(a, c[a], b, c[b]) for c in COMBOS for a, b in itertools.combinations(names, 2)}
    for a, b in itertools.combinations(names, 2):
        for x, y in itertools.product(FACTORS[a], FACTORS[b]):
            if valid_combo({a: x, b: y}):
                assert (a, x, b, y) in seen, (a, x, b, y)
    assert all(valid_combo(c) for c in COMBOS)
    assert len(COMBOS) < 60


def test_thresholds_fall_on_both_sides():
    """make_inputs' delta: at the (zero) initial state the residual is -v; a fair share of it lies on each
    side of the threshold, so both branches of every Huber-type bias are exercised."""
    for bias in ("huber", "huber_norm", "yaad"):
        for per_channel in (False, True) if bias == "huber" else (False,):
            spec = MemorySpec(memory="matrix", bias=bias, retention="none")
            inp = make_inputs(spec, B=4, T=16, dk=4, dv=4, delta_per_channel=per_channel)
            d = inp.gates["delta"]
            if bias == "huber":
                inside = inp.v.abs() <= (d if per_channel else d.unsqueeze(-1))
            else:
                inside = inp.v.norm(dim=-1) <= d
            share = inside.double().mean().item()
            assert 0.2 < share < 0.8, (bias, per_channel, share)


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_chunk_size_1_is_the_exact_recurrence(combo):
    spec, kw = combo_spec(combo, COMBOS.index(combo))
    inp = make_inputs(spec, B=2, T=11, H=2, **kw)
    _compare(inp.call(chunked, chunk_size=1, output_final_state=True),
             inp.call(recurrent, output_final_state=True))


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_chunked_equals_recurrent_with_the_same_chunk_size(combo):
    spec, kw = combo_spec(combo, COMBOS.index(combo))
    inp = make_inputs(spec, B=2, T=11, H=2, **kw)
    # 11 = 4 + 4 + 3 tokens: two full chunks and a partial one; then T = 3 < b, a single partial chunk.
    _compare(inp.call(chunked, chunk_size=4, output_final_state=True),
             inp.call(recurrent, chunk_size=4, output_final_state=True))
    short = inp.slice_t(0, 3)
    _compare(short.call(chunked, chunk_size=4, output_final_state=True),
             short.call(recurrent, chunk_size=4, output_final_state=True))


# Choices the pairwise set leaves at their defaults, and other chunk sizes.
EXTRA = [
    pytest.param(MemorySpec(memory="mlp", layers=1, bias="l2", retention="l2"), {}, 4, id="mlp-1layer"),
    pytest.param(MemorySpec(memory="mlp", layers=3, expansion=2, activation="silu", bias="lp", p=3.0,
                            retention="lq"), {}, 4, id="mlp-3layers-silu"),
    pytest.param(MemorySpec(memory="mlp", layers=3, expansion=2, bias="huber_norm", retention="kl",
                            algorithm="momentum"), {}, 3, id="mlp-3layers-kl-momentum-b3"),
    pytest.param(MemorySpec(memory="mlp", residual_norm=False, bias="huber_norm", retention="l2"),
                 {"dk": 4, "dv": 3}, 4, id="mlp-no-residual-dk4-dv3"),
    pytest.param(MemorySpec(memory="mlp", bias="l2", retention="kl", simplex_scale=2.0, lag_token=True),
                 {"per_channel": True}, 4, id="mlp-kl-c2-perch-lag"),
    pytest.param(MemorySpec(memory="matrix", retention="elastic_net", shrinkage=0.05),
                 {"init": "random"}, 4, id="matrix-elastic-net-shrink0.05"),
    pytest.param(MemorySpec(memory="matrix", bias="lp", p=1.5, retention="lq", norm_order=3.0), {}, 4,
                 id="matrix-lp1.5-lq3"),
    pytest.param(MemorySpec(memory="matrix", bias="huber", retention="l2", algorithm="momentum"),
                 {"per_channel": True, "delta_per_channel": True}, 5, id="matrix-huber-perch-b5"),
    pytest.param(MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True, lag_token=True),
                 {"per_channel": True, "init": "random"}, 3, id="matrix-gar-lag-b3-random-init"),
    pytest.param(MemorySpec(memory="matrix", bias="l2", retention="l2", lag_token=True), {}, 64, id="b64>T"),
    pytest.param(MemorySpec(memory="mlp", bias="l2", retention="l2", algorithm="momentum"),
                 {"init": "random", "init_batch": False}, 4, id="mlp-initial-state-per-head-broadcast"),
    pytest.param(MemorySpec(memory="matrix", bias="dot", retention="sigmoid"),
                 {"init": "random", "init_batch": False, "H": 3, "B": 3}, 4, id="matrix-sigmoid-B3-H3"),
]


@pytest.mark.parametrize("spec,kw,b", EXTRA)
def test_more_specs_and_chunk_sizes(spec, kw, b):
    inp = make_inputs(spec, **{"B": 2, "T": 11, "H": 2, **kw})
    _compare(inp.call(chunked, chunk_size=1, output_final_state=True),
             inp.call(recurrent, output_final_state=True))
    _compare(inp.call(chunked, chunk_size=b, output_final_state=True),
             inp.call(recurrent, chunk_size=b, output_final_state=True))


@pytest.mark.parametrize("spec", [
    MemorySpec(memory="matrix", retention="l2", algorithm="momentum"),
    MemorySpec(memory="mlp", bias="yaad", retention="kl"),
    MemorySpec(memory="vector", bias="huber", retention="none"),
], ids=spec_id)
def test_gates_at_the_ends_of_their_ranges(spec):
    """lr = 0, alpha = 1 and momentum = 0 on some tokens (log-space decays must handle them)."""
    inp = make_inputs(spec, B=2, T=11, H=2, dk=4, dv=4)
    mask = torch.rand(inp.gates["lr"].shape, generator=torch.Generator().manual_seed(3)) < 0.3
    inp.gates["lr"] = inp.gates["lr"].masked_fill(mask, 0.0)
    if inp.gates["alpha"] is not None:
        inp.gates["alpha"] = inp.gates["alpha"].masked_fill(~mask, 1.0)
    if inp.gates["momentum"] is not None:
        inp.gates["momentum"] = inp.gates["momentum"].masked_fill(mask.roll(1, 1), 0.0)
    for b in (1, 4):
        _compare(inp.call(chunked, chunk_size=b, output_final_state=True),
                 inp.call(recurrent, chunk_size=b, output_final_state=True))


def test_lag_token_with_chunk_size_2_is_exact():
    """With chunk_size 2 the lag token makes every token its own chunk (Eq. 5.6): the exact recurrence."""
    spec = MemorySpec(memory="mlp", bias="l2", retention="kl", lag_token=True)
    inp = make_inputs(spec, T=9)
    exact = inp.call(recurrent, output_final_state=True)
    out, state = inp.call(chunked, chunk_size=2, output_final_state=True)
    assert rel(out, exact[0]) < TOL
    assert state_rel(state, exact[1], check_position=True) < TOL


@pytest.mark.parametrize("spec", [
    # The delta rule is exact at every chunk size unless minibatch asks for the approximation.
    MemorySpec(memory="matrix", bias="l2", retention="l2", minibatch=True),
    MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True, algorithm="momentum"),
    MemorySpec(memory="vector", bias="yaad", retention="kl"),
    MemorySpec(memory="mlp", bias="lp", p=3.0, retention="lq"),
    MemorySpec(memory="mlp", bias="l2", retention="kl", lag_token=True),
], ids=spec_id)
def test_chunking_is_an_approximation(spec):
    """For b > 1 the anchor gradients differ from the exact ones: both references must depart from the
    exact recurrence (otherwise the chunk_size argument would be ignored and the equalities above vacuous)."""
    inp = make_inputs(spec, T=11, lr=(0.3, 0.5))
    exact, _ = inp.call(recurrent)
    for b in (3, 4):
        approx, _ = inp.call(recurrent, chunk_size=b)
        dual, _ = inp.call(chunked, chunk_size=b)
        assert rel(approx, exact) > 1e-3, b
        assert rel(dual, exact) > 1e-3, b
        assert rel(dual, approx) < TOL


# Float32 against float64 on the same (float64-representable) inputs. Every state is bounded (|o| < 3) and
# T = 11 steps of well-conditioned updates accumulate a few hundred float32 roundings (u = 6e-8) at most,
# i.e. ~1e-5; measured 5e-8..2.5e-6 (the l_q link and the Yaad MLP are the worst). 2e-5 leaves ~10x headroom
# over the worst measured case, and a result computed in bfloat16 (u = 4e-3) instead would fail it.
F32_TOL = 2e-5
# Memora-like MLP (KL link, residual LayerNorm read-out): the softmax rows start near uniform, so the last
# layer's outputs are nearly equal (spread / mean ~ 2e-4) and LayerNorm(h) subtracts nearly equal float32
# numbers; u / 2e-4 ~ 3e-4 per read, amplified by the updates to a measured 1e-3 (output), 3.5e-3 (state).
# The same spec without the LayerNorm stays at 1e-7. This is the model's conditioning, not the reference's.
F32_TOL_KL_LN = 2e-2
DTYPE_SPECS = [
    pytest.param(MemorySpec(memory="matrix", bias="l2", retention="l2", algorithm="momentum"), F32_TOL,
                 id="matrix-momentum"),
    pytest.param(MemorySpec(memory="mlp", bias="lp", p=3.0, retention="lq"), F32_TOL, id="moneta"),
    pytest.param(MemorySpec(memory="mlp", bias="yaad", retention="l2"), F32_TOL, id="yaad"),
    pytest.param(MemorySpec(memory="mlp", bias="l2", retention="kl", residual_norm=False, lag_token=True), F32_TOL,
                 id="mlp-kl-no-layernorm-lag"),
    pytest.param(MemorySpec(memory="mlp", bias="l2", retention="kl", lag_token=True), F32_TOL_KL_LN,
                 id="memora-lag"),
    pytest.param(MemorySpec(memory="vector", bias="huber", retention="sigmoid"), F32_TOL, id="vector-huber-sigmoid"),
]


@pytest.mark.parametrize("spec,tol", DTYPE_SPECS)
@pytest.mark.parametrize("fn", [chunked, recurrent], ids=["chunked", "recurrent"])
def test_float32_agrees_with_float64(spec, tol, fn):
    inp64 = make_inputs(spec, dk=4, dv=4, per_channel=spec.memory == "matrix")
    inp32 = inp64.cast(torch.float32)
    o64, s64 = inp64.call(fn, chunk_size=4, output_final_state=True)
    o32, s32 = inp32.call(fn, chunk_size=4, output_final_state=True)
    assert o32.dtype == torch.float32
    assert all(x.dtype == torch.float32 for x in (*s32.memory, *s32.momentum, *s32.anchor))
    assert s32.position.dtype == torch.int64
    assert rel(o32, o64) < tol
    assert state_rel(s32, s64) < tol


@pytest.mark.parametrize("spec,tol", DTYPE_SPECS)
def test_bfloat16_inputs_give_bfloat16_output_and_float32_state(spec, tol):
    inp = make_inputs(spec, dk=4, dv=4)
    bf = inp.cast(torch.bfloat16)
    o, s = bf.call(chunked, chunk_size=4, output_final_state=True)
    assert o.dtype == torch.bfloat16
    assert all(x.dtype == torch.float32 for x in (*s.memory, *s.momentum, *s.anchor))
    assert s.position.dtype == torch.int64
    # The computation runs in float32 on the rounded inputs: the float64 result on the same rounded inputs,
    # rounded once to bfloat16 (u = 2^-9 = 2e-3 relative), plus float32 noise.
    o64, s64 = bf.cast(torch.float64).call(chunked, chunk_size=4, output_final_state=True)
    assert rel(o, o64) < max(1e-2, tol)
    assert state_rel(s, s64) < tol
    # recurrent follows the same dtype rules
    o_r, s_r = bf.call(recurrent, chunk_size=4, output_final_state=True)
    assert o_r.dtype == torch.bfloat16 and s_r.memory[0].dtype == torch.float32
