"""Argument validation: every bad input is a ValueError that names the argument (miras_ext.inputs).

Each case is run through both references (they share the checks) unless it is a MemorySpec error."""

from __future__ import annotations

import pytest
import torch

from miras_ext.reference import chunked, recurrent
from miras_ext.spec import MemorySpec
from miras_ext.state import MemoryState

from .helpers import make_inputs
from .helpers import one_thread  # noqa: F401  (autouse fixture)

FNS = pytest.mark.parametrize("fn", [chunked, recurrent], ids=["chunked", "recurrent"])

MATRIX = MemorySpec(memory="matrix", bias="l2", retention="l2")  # lr, alpha
FULL = MemorySpec(memory="matrix", bias="huber", retention="l2", algorithm="momentum")  # every gate
MLP = MemorySpec(memory="mlp", bias="l2", retention="l2")


def _base(spec=FULL, **kw):
    return make_inputs(spec, **{"B": 2, "T": 5, "H": 2, "dk": 4, "dv": 3 if spec.memory == "matrix" else 4, **kw})


def _call(fn, inp, **kwargs):
    kwargs.setdefault("chunk_size", 2)
    return inp.call(fn, **kwargs)


def _with(inp, **changes):
    """A copy of `inp` with some of q, k, v or gates replaced."""
    new = inp.cast(inp.q.dtype)
    for name, value in changes.items():
        if name in ("q", "k", "v"):
            setattr(new, name, value)
        else:
            new.gates[name] = value
    return new


# ---------------------------------------------------------------------------------------------------------
# q, k, v

def _qkv_cases():
    inp = _base()
    q, k, v = inp.q, inp.k, inp.v
    return [
        pytest.param({"q": q[0]}, "q", id="q-rank3"),
        pytest.param({"q": q.unsqueeze(0)}, "q", id="q-rank5"),
        pytest.param({"q": q.to(torch.int64)}, "q", id="q-integer"),
        pytest.param({"q": q.tolist()}, "q", id="q-not-a-tensor"),
        pytest.param({"k": k[..., :3]}, "k", id="k-Dk-mismatch"),
        pytest.param({"k": k[:, :4]}, "k", id="k-T-mismatch"),
        pytest.param({"k": k[0]}, "k", id="k-rank3"),
        pytest.param({"v": v[:1]}, "v", id="v-B-mismatch"),
        pytest.param({"v": v[:, :, :1]}, "v", id="v-H-mismatch"),
        pytest.param({"v": v[..., 0]}, "v", id="v-rank3"),
        pytest.param({"k": k.float()}, "k", id="k-float32-with-q-float64"),
        pytest.param({"v": v.float()}, "v", id="v-float32-with-q-float64"),
    ]


@FNS
@pytest.mark.parametrize("changes,name", _qkv_cases())
def test_bad_q_k_v(fn, changes, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        _call(fn, _with(_base(), **changes))


def _meta_works() -> bool:
    try:
        torch.empty(2, device="meta")
        return True
    except Exception:  # pragma: no cover
        return False


@FNS
@pytest.mark.skipif(not _meta_works(), reason="no meta device")
@pytest.mark.parametrize("name", ["k", "v", "lr", "alpha", "momentum", "delta", "initial_state"])
def test_tensor_on_another_device(fn, name):
    """q on the CPU, one other tensor on the meta device (a second device that always exists)."""
    inp = _base(init="random")
    if name == "initial_state":
        inp.initial_state = tuple(x.to("meta") for x in inp.initial_state)
        match = r"^initial_state\[0\]: expected device"
    else:
        x = getattr(inp, name) if name in ("k", "v") else inp.gates[name]
        inp = _with(inp, **{name: x.to("meta")})
        inp.initial_state = _base(init="random").initial_state
        match = rf"^{name}: expected device"
    with pytest.raises(ValueError, match=match):
        _call(fn, inp)


# ---------------------------------------------------------------------------------------------------------
# gates

def _gate_cases():
    inp = _base()
    g = inp.gates
    return [
        pytest.param({"lr": g["lr"][0]}, "lr", id="lr-rank2"),
        pytest.param({"lr": g["lr"][..., None, None]}, "lr", id="lr-rank5"),
        pytest.param({"lr": g["lr"][:, :4]}, "lr", id="lr-T-mismatch"),
        pytest.param({"alpha": g["alpha"].unsqueeze(-1).expand(2, 5, 2, 4)}, "alpha", id="alpha-per-channel-Dk"),
        pytest.param({"lr": 0.1}, "lr", id="lr-float-not-tensor"),
        pytest.param({"lr": (g["lr"] * 10).long()}, "lr", id="lr-integer"),
        pytest.param({"lr": g["lr"] - 0.6}, "lr", id="lr-negative"),
        pytest.param({"lr": g["lr"].masked_fill(g["lr"] > 0.2, float("nan"))}, "lr", id="lr-nan"),
        pytest.param({"alpha": torch.zeros_like(g["alpha"])}, "alpha", id="alpha-0"),
        pytest.param({"alpha": g["alpha"] + 0.5}, "alpha", id="alpha-1.5"),
        pytest.param({"momentum": torch.ones_like(g["momentum"])}, "momentum", id="momentum-1"),
        pytest.param({"momentum": g["momentum"] - 1.0}, "momentum", id="momentum-negative"),
        pytest.param({"delta": torch.zeros_like(g["delta"])}, "delta", id="delta-0"),
        pytest.param({"delta": -g["delta"]}, "delta", id="delta-negative"),
        pytest.param({"alpha": g["alpha"].unsqueeze(-1).expand(2, 5, 2, 3)}, "alpha",
                     id="alpha-per-channel-with-lr-per-head"),
        pytest.param({"lr": None}, "lr", id="lr-missing"),
        pytest.param({"alpha": None}, "alpha", id="alpha-missing"),
        pytest.param({"momentum": None}, "momentum", id="momentum-missing"),
        pytest.param({"delta": None}, "delta", id="delta-missing"),
    ]


@FNS
@pytest.mark.parametrize("changes,name", _gate_cases())
def test_bad_gates(fn, changes, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        _call(fn, _with(_base(), **changes))


@FNS
@pytest.mark.parametrize("spec,name", [
    pytest.param(MemorySpec(memory="matrix", bias="huber", retention="none", algorithm="momentum"), "alpha",
                 id="alpha-with-retention-none"),
    pytest.param(MemorySpec(memory="matrix", bias="huber", retention="l2"), "momentum", id="momentum-with-gd"),
    pytest.param(MemorySpec(memory="matrix", bias="l2", retention="l2", algorithm="momentum"), "delta",
                 id="delta-with-l2-bias"),
])
def test_gate_that_the_spec_does_not_use(fn, spec, name):
    inp = _base()  # FULL's inputs: every gate present
    with pytest.raises(ValueError, match=rf"^{name}: .*pass {name}=None"):
        fn(inp.q, inp.k, inp.v, spec, inp.gates["lr"], inp.gates["alpha"], inp.gates["momentum"], inp.gates["delta"],
           chunk_size=2)


@FNS
@pytest.mark.parametrize("bias", ["huber_norm", "yaad", "value_shift"])
def test_per_channel_delta_needs_the_elementwise_huber(fn, bias):
    spec = MemorySpec(memory="matrix", bias=bias, retention="l2", algorithm="momentum")
    inp = _base(spec)
    inp.gates["delta"] = inp.gates["delta"].unsqueeze(-1).expand(2, 5, 2, 3).clone()
    with pytest.raises(ValueError, match=r"^delta:.*huber"):
        _call(fn, inp)
    # ...while "huber" accepts it
    _call(fn, _base(FULL, delta_per_channel=True))


# ---------------------------------------------------------------------------------------------------------
# spec and dimensions

@pytest.mark.parametrize("kwargs,name", [
    pytest.param({"p": 0.5}, "p", id="p-0.5"),
    pytest.param({"p": float("inf")}, "p", id="p-inf"),
    pytest.param({"bias": "l3"}, "bias", id="unknown-bias"),
    pytest.param({"retention": "l3"}, "retention", id="unknown-retention"),
    pytest.param({"memory": "tensor"}, "memory", id="unknown-memory"),
    pytest.param({"algorithm": "adam"}, "algorithm", id="unknown-algorithm"),
    pytest.param({"activation": "relu"}, "activation", id="unknown-activation"),
    pytest.param({"layers": 0}, "layers", id="layers-0"),
    pytest.param({"expansion": 1.5}, "expansion", id="expansion-float"),
    pytest.param({"eps": 0.0}, "eps", id="eps-0"),
    pytest.param({"norm_order": 0.5}, "norm_order", id="norm-order-0.5"),
    pytest.param({"simplex_scale": 0.0}, "simplex_scale", id="simplex-scale-0"),
    pytest.param({"shrinkage": -1.0}, "shrinkage", id="shrinkage-negative"),
    pytest.param({"memory": "mlp", "grad_at_retained": True}, "grad_at_retained", id="grad-at-retained-mlp"),
    pytest.param({"retention": "kl", "grad_at_retained": True}, "grad_at_retained", id="grad-at-retained-kl"),
])
def test_bad_spec(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        MemorySpec(**kwargs)


@FNS
def test_spec_must_be_a_memory_spec(fn):
    inp = _base(MATRIX)
    with pytest.raises(ValueError, match=r"^spec:"):
        fn(inp.q, inp.k, inp.v, {"memory": "matrix"}, inp.gates["lr"], inp.gates["alpha"])


@FNS
@pytest.mark.parametrize("chunk_size", [0, -1, 2.0, "4", None, True, 2**31, 2**64],
                         ids=["0", "-1", "float", "str", "None", "bool", "2**31", "2**64"])
def test_bad_chunk_size(fn, chunk_size):
    with pytest.raises(ValueError, match=r"^chunk_size:"):
        _call(fn, _base(), chunk_size=chunk_size)


@FNS
def test_meta_tensors_are_refused(fn):
    """Meta tensors have shapes but no values, and the checks read values (gate ranges, non-finite k, v)."""
    inp = _base(init="random")
    meta = lambda x: None if x is None else x.to("meta")  # noqa: E731
    inp = _with(inp, q=meta(inp.q), k=meta(inp.k), v=meta(inp.v), **{n: meta(g) for n, g in inp.gates.items()})
    inp.initial_state = tuple(meta(x) for x in inp.initial_state)
    with pytest.raises(ValueError, match=r"^q: expected a tensor with data, got one on the meta device"):
        _call(fn, inp)


@FNS
@pytest.mark.parametrize("scale", [0.0, -1.0, "1"], ids=["0", "negative", "str"])
def test_bad_scale(fn, scale):
    with pytest.raises(ValueError, match=r"^scale:"):
        _call(fn, _base(), scale=scale)


@FNS
@pytest.mark.parametrize("spec,dk,dv,per_channel,match", [
    pytest.param(MemorySpec(memory="vector", retention="l2"), 4, 3, False, r"^v:.*Dv == Dk", id="vector-dk-ne-dv"),
    pytest.param(MemorySpec(memory="mlp", retention="l2"), 4, 3, False, r"^v:.*Dv == Dk",
                 id="mlp-residual-dk-ne-dv"),
    pytest.param(MemorySpec(memory="mlp", retention="l2", residual_norm=False), 4, 3, True, r"per-channel gates",
                 id="mlp-per-channel-dk-ne-dv"),
    pytest.param(MemorySpec(memory="mlp", retention="l2", layers=3), 4, 4, True, r"per-channel gates",
                 id="mlp-per-channel-3-layers"),
])
def test_dimensions_the_memory_cannot_take(fn, spec, dk, dv, per_channel, match):
    inp = make_inputs(spec, B=1, T=3, H=1, dk=dk, dv=dv, per_channel=per_channel, init="random")
    with pytest.raises(ValueError, match=match):
        _call(fn, inp)


# ---------------------------------------------------------------------------------------------------------
# initial_state

@FNS
def test_mlp_needs_an_initial_state(fn):
    inp = _base(MLP)
    with pytest.raises(ValueError, match=r"^initial_state:"):
        _call(fn, inp, initial_state=None)


def _state_cases():
    spec = MLP
    shapes = spec.weight_shapes(4, 4)
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    good = tuple(z(2, 2, *s) for s in shapes)
    return [
        pytest.param(good[:1], r"^initial_state:", id="too-few-tensors"),
        pytest.param(good + good[:1], r"^initial_state:", id="too-many-tensors"),
        pytest.param(good[0], r"^initial_state", id="a-tensor-not-a-tuple"),
        pytest.param((z(2, 2, *shapes[0][::-1]), good[1]), r"^initial_state\[0\]:", id="layer-transposed"),
        pytest.param((good[0], z(3, 2, *shapes[1])), r"^initial_state\[1\]:", id="batch-3-for-B-2"),
        pytest.param((good[0], z(2, 3, *shapes[1])), r"^initial_state\[1\]:", id="wrong-H"),
        pytest.param((good[0], z(*shapes[1])), r"^initial_state\[1\]:", id="missing-N-and-H-axes"),
        pytest.param((good[0].long(), good[1]), r"^initial_state\[0\]:", id="integer-dtype"),
        pytest.param((good[0], good[1].tolist()), r"^initial_state\[1\]:", id="a-list-not-a-tensor"),
        pytest.param(MemoryState(good, (), good, torch.zeros(2, dtype=torch.int32)),
                     r"^initial_state\.position:", id="state-position-int32"),
        pytest.param(MemoryState(good, (), good, torch.zeros(3, dtype=torch.int64)),
                     r"^initial_state\.position:", id="state-position-wrong-length"),
        pytest.param(MemoryState(good, good, good, torch.zeros(2, dtype=torch.int64)),
                     r"^initial_state\.momentum:", id="state-momentum-with-gd"),
        pytest.param(MemoryState(good, (), good[:1], torch.zeros(2, dtype=torch.int64)),
                     r"^initial_state\.anchor:", id="state-anchor-too-few"),
        pytest.param(MemoryState(good, (), (good[0], z(2, 2, 3)), torch.zeros(2, dtype=torch.int64)),
                     r"^initial_state\.anchor\[1\]:", id="state-anchor-wrong-shape"),
    ]


@FNS
@pytest.mark.parametrize("state,match", _state_cases())
def test_bad_initial_state(fn, state, match):
    inp = _base(MLP)
    with pytest.raises(ValueError, match=match):
        _call(fn, inp, initial_state=state)


@FNS
def test_momentum_state_missing(fn):
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2", algorithm="momentum")
    inp = _base(spec, init="random")
    state = MemoryState(inp.initial_state, (), inp.initial_state, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^initial_state\.momentum:"):
        _call(fn, inp, initial_state=state)


@FNS
def test_a_state_continues_only_at_its_own_chunk_size(fn):
    """A returned state records its chunk size: its anchor and chunk phase belong to that chunking, so
    another chunk_size would silently compute a different function (15% off at 4 vs 64)."""
    inp = _base(MATRIX, T=6)
    _, state = _call(fn, inp.slice_t(0, 5), chunk_size=4, output_final_state=True)
    assert state.chunk_size == 4
    with pytest.raises(ValueError, match=r"^initial_state: made with chunk_size=4, continued with chunk_size=64"):
        _call(fn, inp.slice_t(5, 6), chunk_size=64, initial_state=state)
    _call(fn, inp.slice_t(5, 6), chunk_size=4, initial_state=state)
    _call(fn, inp.slice_t(5, 6), chunk_size=64, initial_state=state._replace(chunk_size=None))  # built by hand


# ---------------------------------------------------------------------------------------------------------
# cu_seqlens

@FNS
@pytest.mark.parametrize("cu", [
    pytest.param(torch.tensor([1, 5]), id="not-from-0"),
    pytest.param(torch.tensor([0, 4]), id="not-to-T"),
    pytest.param(torch.tensor([0, 6]), id="past-T"),
    pytest.param(torch.tensor([0, 3, 2, 5]), id="decreasing"),
    pytest.param(torch.tensor([5]), id="one-offset"),
    pytest.param(torch.tensor([[0, 5]]), id="2-d"),
    pytest.param(torch.tensor([0.0, 5.0]), id="float"),
    pytest.param([0, 5], id="list"),
])
def test_malformed_cu_seqlens(fn, cu):
    inp = _base(B=1)
    with pytest.raises(ValueError, match=r"^cu_seqlens:"):
        _call(fn, inp, cu_seqlens=cu)


@FNS
def test_cu_seqlens_needs_batch_1(fn):
    with pytest.raises(ValueError, match=r"cu_seqlens.*B must be 1"):
        _call(fn, _base(B=2), cu_seqlens=torch.tensor([0, 2, 5]))


@FNS
def test_cu_seqlens_initial_state_has_one_entry_per_sequence(fn):
    inp = _base(MLP, B=1, init="random", n_states=2)  # 2 states for 3 sequences
    with pytest.raises(ValueError, match=r"^initial_state\[0\]:"):
        _call(fn, inp, cu_seqlens=torch.tensor([0, 2, 3, 5]))
    _call(fn, inp, cu_seqlens=torch.tensor([0, 2, 5]))  # 2 for 2 is fine


# ---------------------------------------------------------------------------------------------------------
# the happy path of the same helpers, so that the cases above fail for the reason they name

@FNS
@pytest.mark.parametrize("spec", [FULL, MATRIX, MLP], ids=["full", "matrix", "mlp"])
def test_valid_inputs_are_accepted(fn, spec):
    inp = _base(spec)
    o, _ = _call(fn, inp)
    assert o.shape == (2, 5, 2, inp.v.shape[-1])
    _call(fn, _base(spec, per_channel=True))
    _call(fn, inp, chunk_size=7, scale=0.5)
    if inp.initial_state is not None:  # [H, *shape] broadcast
        _call(fn, inp, initial_state=tuple(x[0] for x in inp.initial_state))
    else:
        _call(fn, inp, initial_state=_base(spec, init="random").initial_state)
