"""miras_ext.memory_forward (the memory_chunk_fwd / memory_chunk_bwd operators) against reference.chunked:
outputs, final states and gradients; varlen, decoding, T = 0, input errors, opcheck, torch.compile and the
presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import miras_ext
from miras_ext import MemorySpec, MemoryState, memory_forward, memory_step
from miras_ext.ops import autograd as op_autograd
from miras_ext.ops import presets as op_presets
from miras_ext import spec_presets
from miras_ext.reference import chunked
from ..reference.helpers import one_thread  # noqa: F401  (autouse fixture)
from ..reference.helpers import cotangent_loss, forward_and_grads, make_inputs, rel, state_rel

TOL = 1e-9

# (spec, make_inputs keywords, chunk size, T): a few specs across the axes the host code branches on.
SPECS = [
    pytest.param(MemorySpec(memory="matrix", bias="l2", retention="l2"), {"dv": 3}, 4, 11, id="matrix-l2"),
    pytest.param(MemorySpec(memory="matrix", bias="dot", retention="none"), {"dv": 3}, 3, 7, id="matrix-dot"),
    pytest.param(MemorySpec(memory="matrix", bias="l2", retention="l2", lag_token=True), {"per_channel": True}, 4,
                 10, id="matrix-lag-perch"),
    pytest.param(MemorySpec(memory="matrix", bias="huber", retention="l2", grad_at_retained=True,
                            algorithm="momentum"), {"dv": 3}, 4, 9, id="matrix-gar-momentum-huber"),
    pytest.param(MemorySpec(memory="mlp", expansion=2, bias="lp", p=3.0, retention="lq"), {"per_channel": True}, 4,
                 9, id="moneta-perch"),
    pytest.param(MemorySpec(memory="mlp", expansion=2, bias="l2", retention="kl", algorithm="momentum",
                            lag_token=True), {}, 3, 8, id="mlp-kl-momentum-lag"),
    pytest.param(MemorySpec(memory="matrix", bias="yaad", retention="sigmoid"), {}, 4, 7, id="matrix-yaad-sigmoid"),
]


def _compare(ours, ref):
    o, state, grads = ours
    o_ref, state_ref, grads_ref = ref
    assert rel(o, o_ref) < TOL
    assert state_rel(state, state_ref) < TOL
    for name, g_ref in grads_ref.items():
        g = grads[name]
        if g_ref is None:
            assert g is None or g.abs().max() == 0, name
        else:
            assert g is not None, name
            assert rel(g, g_ref) < TOL, name


@pytest.mark.parametrize("spec, kw, b, T", SPECS)
def test_forward_backward_match_reference(spec, kw, b, T):
    inp = make_inputs(spec, B=2, T=T, H=2, **kw)
    _compare(forward_and_grads(memory_forward, inp, chunk_size=b), forward_and_grads(chunked, inp, chunk_size=b))


def test_per_head_initial_state_broadcasts_gradient():
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2")
    inp = make_inputs(spec, B=3, T=6, H=2, dv=3, init="random", init_batch=False)
    _compare(forward_and_grads(memory_forward, inp, chunk_size=4), forward_and_grads(chunked, inp, chunk_size=4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_run_in_float32(dtype):
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2")
    inp = make_inputs(spec, B=2, T=9, H=2, dv=3)
    low = inp.cast(dtype)
    o, state = low.call(memory_forward, chunk_size=4, output_final_state=True)
    assert o.dtype == dtype and state.memory[0].dtype == torch.float32
    o_ref, state_ref = low.call(chunked, chunk_size=4, output_final_state=True)
    assert rel(o.float(), o_ref.float()) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert state_rel(state, state_ref) < 1e-5


def test_resume_mid_chunk_and_decode():
    """Prefill 5 tokens (ends mid-chunk), then decode one token at a time: the same as one call."""
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2", lag_token=True)
    inp = make_inputs(spec, B=2, T=9, H=2, dv=3)
    o_all, s_all = inp.call(memory_forward, chunk_size=4, output_final_state=True)
    o_pre, state = inp.slice_t(0, 5).call(memory_forward, chunk_size=4, output_final_state=True)
    outs = [o_pre]
    for t in range(5, 9):
        g = {n: None if x is None else x[:, t] for n, x in inp.gates.items()}
        o_t, state = memory_step(inp.q[:, t], inp.k[:, t], inp.v[:, t], spec, g["lr"], g["alpha"], state=state,
                                 chunk_size=4)
        assert o_t.shape == (2, 2, 3)
        outs.append(o_t.unsqueeze(1))
    assert rel(torch.cat(outs, 1), o_all) < TOL
    assert state_rel(state, s_all) < TOL


def test_varlen_matches_reference():
    """Packed sequences of lengths 5, 0, 7, 1 from states at different positions within their chunks."""
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2", lag_token=True)
    lengths = [5, 0, 7, 1]
    inp = make_inputs(spec, B=1, T=sum(lengths), H=3, dv=3, init="random", n_states=len(lengths))
    cu = torch.tensor([0, 5, 5, 12, 13], dtype=torch.int32)
    z = inp.initial_state
    anchor = tuple(x * 0.5 for x in z)
    position = torch.tensor([0, 3, 6, 1])
    inp.initial_state = None

    def run(fn):
        leaves = [inp.q, inp.k, inp.v, inp.gates["lr"], inp.gates["alpha"], *z, *anchor]
        leaves = [x.detach().requires_grad_() for x in leaves]
        q, k, v, lr, alpha, zz, aa = leaves[:5] + [tuple(leaves[5:6]), tuple(leaves[6:7])]
        o, st = fn(q, k, v, spec, lr, alpha, initial_state=MemoryState(zz, (), aa, position), chunk_size=4,
                   cu_seqlens=cu, output_final_state=True)
        grads = torch.autograd.grad(cotangent_loss(o, st), leaves)
        return o, st, dict(enumerate(grads))

    ours, ref = run(memory_forward), run(chunked)
    _compare(ours, ref)
    assert ours[1].position.tolist() == [5, 3, 13, 2]


def test_empty_sequence():
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2")
    inp = make_inputs(spec, B=2, T=0, H=2, dv=3, init="random")
    o, state = inp.call(memory_forward, chunk_size=4, output_final_state=True)
    assert o.shape == (2, 0, 2, 3)
    assert torch.equal(state.memory[0], inp.initial_state[0]) and torch.equal(state.position, torch.zeros(2).long())
    inp = inp.requires_grad_()
    o, state = inp.call(memory_forward, chunk_size=4, output_final_state=True)
    (g,) = torch.autograd.grad(state.memory[0].sum() + o.sum(), [inp.initial_state[0]])
    assert torch.equal(g, torch.ones_like(g))


def _bad_calls():
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2")
    inp = make_inputs(spec, B=2, T=5, H=2, dv=3)
    q, k, v, lr, alpha = inp.q, inp.k, inp.v, inp.gates["lr"], inp.gates["alpha"]
    mlp = MemorySpec(memory="mlp")
    mid = MemoryState((torch.zeros(2, 2, 3, 4, dtype=torch.float64),), (), (torch.zeros(2, 2, 3, 4, dtype=torch.float64),),
                      torch.tensor([0, 1]))
    return {
        "rank": ((q[0], k, v, spec, lr, alpha), {}),
        "missing-alpha": ((q, k, v, spec, lr, None), {}),
        "extra-delta": ((q, k, v, spec, lr, alpha, None, lr), {}),
        "lr-negative": ((q, k, v, spec, -lr, alpha), {}),
        "alpha-zero": ((q, k, v, spec, lr, alpha * 0), {}),
        "mlp-no-state": ((q, k, v, mlp, lr, alpha), {}),
        "chunk": ((q, k, v, spec, lr, alpha), {"chunk_size": 0}),
        "scale": ((q, k, v, spec, lr, alpha), {"scale": -1.0}),
        "phases": ((q, k, v, spec, lr, alpha), {"initial_state": mid, "chunk_size": 4}),
        "cu-B": ((q, k, v, spec, lr, alpha), {"cu_seqlens": torch.tensor([0, 5])}),
        "cu-offsets": ((q[:1], k[:1], v[:1], spec, lr[:1], alpha[:1]), {"cu_seqlens": torch.tensor([0, 6])}),
        "spec": ((q, k, v, "l2", lr, alpha), {}),
        "chunk-2**64": ((q, k, v, spec, lr, alpha), {"chunk_size": 2**64}),
        "meta": ((q.to("meta"), k.to("meta"), v.to("meta"), spec, lr.to("meta"), alpha.to("meta")), {}),
        "state-chunk": ((q, k, v, spec, lr, alpha), {"initial_state": mid._replace(position=torch.tensor([4, 4]),
                                                                                   chunk_size=2), "chunk_size": 4}),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_raise_like_reference(case):
    args, kwargs = _bad_calls()[case]
    with pytest.raises(ValueError) as ref:
        chunked(*args, **kwargs)
    with pytest.raises(ValueError) as ours:
        memory_forward(*args, **kwargs)
    assert str(ours.value) == str(ref.value)


def test_memory_step_refuses_another_chunk_size():
    """memory_step(chunk_size=64) on a state made at chunk 4 would be 15% off the single call."""
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2")
    inp = make_inputs(spec, B=1, T=9, H=2, dv=3)
    _, state = inp.slice_t(0, 8).call(memory_forward, chunk_size=4, output_final_state=True)
    step = lambda cs: memory_step(inp.q[:, 8], inp.k[:, 8], inp.v[:, 8], spec, inp.gates["lr"][:, 8],  # noqa: E731
                                  inp.gates["alpha"][:, 8], state=state, chunk_size=cs)
    with pytest.raises(ValueError, match=r"^initial_state: made with chunk_size=4, continued with chunk_size=64"):
        step(64)
    o_t, _ = step(4)
    o, _ = inp.call(memory_forward, chunk_size=4)
    assert rel(o_t, o[:, 8]) < TOL


def _op_args(spec: MemorySpec, save: bool, T: int = 6, requires_grad: bool = False):
    inp = make_inputs(spec, B=2, T=T, H=2, dv=3 if spec.memory == "matrix" else 4, init="random")
    n = 2
    z = tuple(x.clone() for x in inp.initial_state)
    mom = tuple(torch.zeros_like(x) for x in z) if spec.algorithm == "momentum" else ()
    args = [inp.q, inp.k, inp.v, inp.gates["lr"], inp.gates["alpha"], inp.gates["momentum"], inp.gates["delta"],
            list(z), list(mom), [x.clone() for x in z], torch.full((n,), 1, dtype=torch.int64), None, spec.encode(),
            1.0, 4, save]
    if requires_grad:
        for i in (0, 1, 2, 3, 4):
            args[i] = args[i].detach().requires_grad_()
        args[7] = [x.detach().requires_grad_() for x in args[7]]
    return args


def test_checkpoint_layout_and_fake_shapes():
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2", lag_token=True)
    args = _op_args(spec, True, T=6)
    o, mem, mom, anc, pos, ck = torch.ops.miras_ext.memory_chunk_fwd(*args)
    rows = op_autograd.checkpoint_rows(2, 6, 4, True, False)
    assert [tuple(c.shape) for c in ck] == [(rows, 2, 3, 4)] * 2
    # position 1, chunk 4, lag: runs [0, 3) (continues the anchor), [3, 4) (fresh), [4, 6) (lag chunk).
    assert torch.equal(ck[0][:2], args[7][0])  # run 0 starts from the initial memory, rows r * N + n
    assert torch.equal(ck[1][:2], args[9][0])  # ... and the initial anchor (it does not start a chunk)
    assert torch.equal(ck[0][2:4], ck[1][2:4])  # run 1 starts a chunk: anchor = memory
    assert ck[0][6:].abs().max() == 0
    assert pos.tolist() == [7, 7]
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = torch.ops.miras_ext.memory_chunk_fwd(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else
                                                      [mode.from_tensor(x) for x in a] if isinstance(a, list) else a
                                                      for a in args])
    real = (o, *mem, *mom, *anc, pos, *ck)
    flat = (fake[0], *fake[1], *fake[2], *fake[3], fake[4], *fake[5])
    assert [(x.shape, x.dtype) for x in flat] == [(x.shape, x.dtype) for x in real]


@pytest.mark.parametrize("spec", [MemorySpec(memory="matrix", bias="l2", retention="l2"),
                                  MemorySpec(memory="mlp", expansion=2, bias="l2", retention="l2",
                                             algorithm="momentum")], ids=["matrix", "mlp-momentum"])
def test_opcheck(spec):
    torch.library.opcheck(torch.ops.miras_ext.memory_chunk_fwd.default, _op_args(spec, True, requires_grad=True))
    torch.library.opcheck(torch.ops.miras_ext.memory_chunk_fwd.default, _op_args(spec, False))


@pytest.mark.parametrize("spec", [MemorySpec(), MemorySpec(**spec_presets.MONETA), MemorySpec(**spec_presets.MEMORA),
                                  MemorySpec(**spec_presets.TITANS, expansion=2, simplex_scale=0.5),
                                  MemorySpec(**spec_presets.GATED_DELTA, minibatch=True)])
def test_decode_inverts_encode(spec):
    assert MemorySpec.decode(spec.encode()) == spec
    assert MemorySpec.decode(spec.encode()).encode() == spec.encode()


def test_parse_spec_errors_name_the_field():
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2")
    args = _op_args(spec, False)
    text = spec.encode()
    bad = {
        "memory": text.replace("memory=matrix", "memory=tensor"),
        "lag_token": text.replace(",lag_token=0", ""),
        "colour": text + ",colour=1",
        "p": text.replace("p=2.0", "p=0.5"),
        "eps": text.replace("eps=1e-06", "eps=x"),
        "residual_norm": text.replace("residual_norm=1", "residual_norm=2"),
    }
    for field, s in bad.items():
        args[12] = s
        with pytest.raises(ValueError, match=field):
            torch.ops.miras_ext.memory_chunk_fwd(*args)


def test_torch_compile_fullgraph():
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2")
    inp = make_inputs(spec, B=2, T=7, H=2, dv=3).requires_grad_()

    def f(q, k, v, lr, alpha):
        o, state = memory_forward(q, k, v, spec, lr, alpha, chunk_size=4, output_final_state=True)
        return o.square().sum() + state.memory[0].sum()

    args = [inp.q, inp.k, inp.v, inp.gates["lr"], inp.gates["alpha"]]
    eager = f(*args)
    g_eager = torch.autograd.grad(eager, args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    g_compiled = torch.autograd.grad(compiled, args)
    assert rel(compiled, eager) < TOL
    for a, b in zip(g_compiled, g_eager):
        assert rel(a, b) < TOL


def test_torch_compile_one_function_several_specs():
    # The spec is an argument: its second value makes dynamo trace the int fields as symbols, which must not
    # reach the op's `spec` string (a graph break under fullgraph).
    def f(q, k, v, lr, alpha, init, spec):
        return memory_forward(q, k, v, spec, lr, alpha, chunk_size=4, initial_state=init)[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    specs = [MemorySpec(memory="matrix", bias="l2", retention="l2"),
             MemorySpec(memory="mlp", expansion=2, bias="l2", retention="l2"),
             MemorySpec(memory="mlp", expansion=4, bias="l2", retention="l2")]
    for spec in specs:
        inp = make_inputs(spec, B=1, T=6, H=2, dv=4, dk=4)
        init = tuple(0.3 * torch.randn(2, *s, dtype=inp.q.dtype) for s in spec.weight_shapes(4, 4))
        args = (inp.q, inp.k, inp.v, inp.gates["lr"], inp.gates["alpha"], init, spec)
        assert rel(compiled(*args), f(*args)) < TOL


PRESETS = [
    (miras_ext.moneta_forward, ("lr", "alpha"), spec_presets.MONETA),
    (miras_ext.yaad_forward, ("lr", "alpha", "delta"), spec_presets.YAAD),
    (miras_ext.memora_forward, ("lr", "alpha"), spec_presets.MEMORA),
    (miras_ext.titans_forward, ("lr", "alpha", "momentum"), spec_presets.TITANS),
    (miras_ext.gated_delta_forward, ("lr", "alpha"), spec_presets.GATED_DELTA),
    (miras_ext.delta_forward, ("lr",), spec_presets.DELTA),
    (miras_ext.linear_attention_forward, ("lr",), spec_presets.LINEAR_ATTENTION),
]


@pytest.mark.parametrize("fn, gates, fields", PRESETS, ids=[p[0].__name__ for p in PRESETS])
def test_presets_pass_their_spec(fn, gates, fields, monkeypatch):
    seen = {}

    def record(q, k, v, spec, lr, alpha=None, momentum=None, delta=None, **kwargs):
        seen.update(spec=spec, gates=(lr, alpha, momentum, delta), kwargs=kwargs)
        return "called"

    monkeypatch.setattr(op_presets, "memory_forward", record)
    x = torch.zeros(1, 2, 1, 4)
    g = {name: torch.full((1, 2, 1), i + 1.0) for i, name in enumerate(gates)}
    assert fn(x, x, x, *g.values(), chunk_size=8, expansion=3) == "called"
    spec = seen["spec"]
    for name, value in fields.items():
        assert getattr(spec, name) == value, name
    assert seen["kwargs"] == {"chunk_size": 8}
    assert spec.expansion == 3
    assert [a is not None for a in seen["gates"]] == [n in gates for n in ("lr", "alpha", "momentum", "delta")]
    with pytest.raises(TypeError):
        fn(x, x, x, *g.values(), chunks=3)


def test_matrix_presets_run():
    torch.manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(1, 6, 2, 4, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(1, 6, 2, 3, dtype=torch.float64)
    lr = torch.rand(1, 6, 2, dtype=torch.float64)
    o, _ = miras_ext.linear_attention_forward(q, k, v, lr, chunk_size=4)
    o_ref, _ = chunked(q, k, v, MemorySpec(**spec_presets.LINEAR_ATTENTION), lr, chunk_size=4)
    assert rel(o, o_ref) < TOL
    o, _ = miras_ext.delta_forward(q, k, v, lr, chunk_size=1)
    o_ref, _ = chunked(q, k, v, MemorySpec(**spec_presets.DELTA), lr, chunk_size=1)
    assert rel(o, o_ref) < TOL
