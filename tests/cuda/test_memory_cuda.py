"""The CUDA memory op (torch.ops.miras_ext.memory_chunk_fwd / memory_chunk_bwd on CUDA tensors) against the
CPU op on the same inputs: output, final state and every gradient (q, k, v, each gate, the initial state),
for matrix and MLP memory, every bias and retention, per-head and per-channel gates, momentum, the lag token,
cu_seqlens, T not a multiple of the chunk, head dims 32/64/128 with chunks 16/32/64, decoding, opcheck,
torch.compile and input errors.

Every test is marked `cuda` (and lives in a folder named cuda): tests/conftest.py skips them without a GPU
or without a CUDA build of miras_ext.

The truth is the CPU op in float64 on the *same* values the device call sees: inputs (and the random
cotangents) are rounded to the tested dtype once, and both calls start from those numbers. A tensor passes
when ||got - want|| / ||want|| is at most max(floor, SLACK = 4 x the CPU op's own error at the same
precision on the same inputs): the floor states the precision, the second term the conditioning of the
inputs, which no implementation can beat. Floors:

- float64: 1e-9. Both sides compute in float64; what differs is the order of sums (parallel reductions,
  atomics), about 1e-16 per operation, far below.
- float32: 1e-4. Float32 inputs are computed in float32 (6e-8 per operation); on well-conditioned inputs
  the CPU op in float32 lands at 1e-7 to 1e-5 here (matrix memory, MLP with l2 / lq retention). TF32
  matrix units (10-bit mantissa, ~5e-4 per product) fail this on purpose: float32 in, float32 arithmetic.
  Some inputs are worse conditioned whatever computes them: the KL retention with the residual norm
  (Memora) puts the CPU op's float32 result 1e-4 to 2e-3 from float64, Yaad over hundreds of tokens 1e-2;
  there the second term decides, and ILL_CONDITIONED rejects inputs on which a comparison says nothing.
- bfloat16 and float16: 5e-2. The results (o, and the gradients of q, k, v and of bf16 gates) are
  rounded to bf16, 2^-9 = 2e-3 relative per element by itself (the CPU op lands at 1.6e-3 to 2.8e-3 here);
  a kernel may also round float32 intermediates to bf16 operands for the tensor cores (each product then
  carries up to 2^-8, summed over a chunk and carried through the state), so 3e-2, about 15 times the
  rounding of the result. The kernels do (docs/cuda.md), and a gradient passes through about ten rounded
  products in a row in the backward: 5e-2 (the emulated kernels measure 3.7e-2 on Yaad,
  tests/cuda_emu/test_memory_emulated.py). The operands are bfloat16 for float16 inputs too (float32's
  range: Yaad's gradients pass float16's 65504), so float16 gets the same bound.

Self-check of these tests without a GPU (the CPU op stands in for the CUDA one; it validates the test code
and the low-precision tolerances, not the CUDA kernels):

    MIRAS_CUDA_TEST_DEVICE=cpu .venv/bin/python -m pytest --noconftest tests/cuda -q
"""

from __future__ import annotations

import os

import pytest
import torch

from miras_ext import MemorySpec, MemoryState, memory_forward, memory_step
from miras_ext import spec_presets

from ..reference.helpers import one_thread  # noqa: F401  (autouse fixture: the CPU side on one thread)
from ..reference.helpers import Inputs, make_inputs, rel

pytestmark = pytest.mark.cuda

DEVICE = torch.device(os.environ.get("MIRAS_CUDA_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
CPU = torch.device("cpu")

TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
# A device result may be this many times further from the float64 truth than the CPU op at the same precision.
SLACK = 4.0
# Inputs on which the CPU op's own float32 / bf16 error exceeds this say nothing about the device op.
ILL_CONDITIONED = 3e-2
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float64, torch.float32, torch.bfloat16)]


# ---------------------------------------------------------------------------------------------------------
# Helpers: place inputs on a device in a dtype, run forward + backward, compare.


def _poison() -> None:
    """Fill freed blocks of the CUDA caching allocator with NaN, so that an output element the op never
    writes (torch.empty reuses those blocks) shows up as NaN instead of a stale plausible value. Small
    requests (<= 1 MiB) are carved from 2 MiB segments, large ones from their own pool: poison both."""
    if not ON_CUDA:
        return
    blocks = [torch.full((1 << 18,), float("nan"), device=DEVICE) for _ in range(2)]  # 2 x 1 MiB: one segment
    blocks.append(torch.full((1 << 24,), float("nan"), device=DEVICE))                 # 64 MiB
    del blocks


def _place(inp: Inputs, dtype: torch.dtype, device: torch.device) -> Inputs:
    """Detached copies of every tensor of `inp` in `dtype` on `device`."""
    c = lambda x: None if x is None else x.detach().to(device=device, dtype=dtype)  # noqa: E731
    return Inputs(inp.spec, c(inp.q), c(inp.k), c(inp.v), {n: c(g) for n, g in inp.gates.items()},
                  None if inp.initial_state is None else tuple(c(x) for x in inp.initial_state))


def _rounded(inp: Inputs, dtype: torch.dtype) -> Inputs:
    """`inp` rounded to `dtype` and back to float64 on the CPU: the values both sides of a comparison see."""
    return _place(_place(inp, dtype, CPU), torch.float64, CPU)


def _cotangent_loss(o: torch.Tensor, state: MemoryState | None, round_to: torch.dtype, seed: int = 1):
    """<c, o> + <c_i, every tensor of the final state> with fixed random c, drawn on the CPU in float64 and
    rounded to `round_to`, so that the float64 reference and a low-precision device run pull back the same
    numbers (a bf16 value is exact in float32 and float64)."""
    gen = torch.Generator().manual_seed(seed)

    def cot(x):
        r = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(round_to)
        return r.to(device=x.device, dtype=x.dtype)

    total = (cot(o) * o).sum()
    if state is not None:
        for x in (*state.memory, *state.momentum, *state.anchor):
            total = total + (cot(x) * x).sum()
    return total


def _run(inp: Inputs, dtype: torch.dtype, device: torch.device, round_to: torch.dtype | None = None,
         index_device: torch.device | None = None, **kwargs):
    """memory_forward on `inp` in `dtype` on `device`: (o, final state, {input name: gradient}), gradients of
    _cotangent_loss to every input tensor. kwargs go to memory_forward; a cu_seqlens tensor is moved to
    `index_device` (default `device`: the op also takes it on the CPU)."""
    x = _place(inp, dtype, device).requires_grad_()
    if kwargs.get("cu_seqlens") is not None:
        kwargs["cu_seqlens"] = kwargs["cu_seqlens"].to(index_device or device)
    if device.type == "cuda":
        _poison()
    o, state = x.call(memory_forward, output_final_state=True, **kwargs)
    leaves = x.leaves()
    grads = torch.autograd.grad(_cotangent_loss(o, state, round_to or dtype), list(leaves.values()), allow_unused=True)
    return o, state, dict(zip(leaves, grads))


def _check_placement(got, inp_dtype: torch.dtype) -> None:
    o, state, grads = got
    compute = torch.float64 if inp_dtype == torch.float64 else torch.float32
    assert o.device.type == DEVICE.type and o.dtype == inp_dtype
    for x in (*state.memory, *state.momentum, *state.anchor):
        assert x.device.type == DEVICE.type and x.dtype == compute
    assert state.position.device.type == DEVICE.type and state.position.dtype == torch.int64
    for name, g in grads.items():
        assert g is None or g.device.type == DEVICE.type, name


def _errors(got, want) -> dict[str, float]:
    """rel(got, want) for the output, every final-state tensor and every gradient (a missing gradient counts
    as zeros); asserts that the positions and the tensor counts agree."""
    (o1, s1, g1), (o2, s2, g2) = got, want
    errors = {"o": rel(o1.cpu(), o2.cpu())}
    for field in ("memory", "momentum", "anchor"):
        xs, ys = getattr(s1, field), getattr(s2, field)
        assert len(xs) == len(ys), field
        errors.update({f"state.{field}[{i}]": rel(x.cpu(), y.cpu()) for i, (x, y) in enumerate(zip(xs, ys))})
    assert torch.equal(s1.position.cpu(), s2.position.cpu()), (s1.position, s2.position)
    assert g1.keys() == g2.keys()
    for name in g2:
        a, b = g1[name], g2[name]
        if a is None and b is None:
            continue
        a = torch.zeros(b.shape) if a is None else a.cpu()
        errors[f"grad {name}"] = rel(a, torch.zeros(a.shape) if b is None else b.cpu())
    return errors


def _assert_close(got, want, floor: float, own: dict[str, float] | None = None) -> None:
    """Every tensor of `got` within its tolerance of `want`: max(floor, SLACK x own[tensor]), `own` being the
    CPU op's error at the same precision (None: the floor alone). NaN fails."""
    errors = _errors(got, want)
    tols = {k: max(floor, SLACK * own[k]) if own else floor for k in errors}
    bad = {k: f"{e:.2e} > {tols[k]:.2e}" for k, e in errors.items() if not e <= tols[k]}
    assert not bad, f"relative errors over tolerance: {bad}"


def _compare(inp: Inputs, dtype: torch.dtype, index_device: torch.device | None = None, **kwargs):
    """The device op in `dtype` against the CPU op in float64 on the same rounded inputs; tolerances from the
    floor of `dtype` and the CPU op's own error in `dtype` (the conditioning of these inputs)."""
    got = _run(inp, dtype, DEVICE, index_device=index_device, **kwargs)
    want = _run(_rounded(inp, dtype), torch.float64, CPU, round_to=dtype, **kwargs)
    _check_placement(got, dtype)
    own = None
    if dtype != torch.float64:
        own = _errors(_run(inp, dtype, CPU, **kwargs), want)
        worst = max(own.values())
        assert worst < ILL_CONDITIONED, f"the CPU op itself is off by {worst:.2e} in {dtype}: make these inputs " \
                                        f"better conditioned, the comparison says nothing ({own})"
    _assert_close(got, want, TOL[dtype], own)
    return got, want


# ---------------------------------------------------------------------------------------------------------
# Specs: every bias and every retention at least once, matrix and MLP, per-head and per-channel gates,
# momentum, the lag token, grad_at_retained, both activations, with and without the residual norm.

MLP2 = dict(memory="mlp", expansion=2)
# The l1-type biases (l1, yaad outside its threshold, value_shift) differentiate sqrt(r_j^2 + eps) (docs/math.md
# Eqs. 2.15, 2.18): with the default eps = 1e-6 their curvature reaches 1 / sqrt(eps) = 1e3 (times delta for
# Yaad) at small residual elements, and the CPU op's own float32 gradients are then 1e-2 to 2e-1 away from
# float64 (Yaad with the residual norm, D = 64). eps = 1e-2 keeps the same code paths and makes the comparison
# measure the implementation, not the conditioning.
SMOOTH = 1e-2
CASES = [
    ("matrix-dot-none", MemorySpec(memory="matrix", bias="dot", retention="none"), dict(dv=6)),
    ("gated-delta", MemorySpec(**spec_presets.GATED_DELTA), dict(dv=6)),
    ("matrix-lp-lq-perch", MemorySpec(memory="matrix", bias="lp", p=3.0, retention="lq"), dict(per_channel=True)),
    ("matrix-l1-elastic-momentum", MemorySpec(memory="matrix", bias="l1", eps=SMOOTH, retention="elastic_net",
                                              algorithm="momentum"), dict(dv=6)),
    ("matrix-huber-sigmoid-perch", MemorySpec(memory="matrix", bias="huber", retention="sigmoid"),
     dict(per_channel=True, delta_per_channel=True)),
    ("matrix-hubernorm-momentum-lag", MemorySpec(memory="matrix", bias="huber_norm", retention="l2",
                                                 algorithm="momentum", lag_token=True), dict(dv=6)),
    ("moneta-perch", MemorySpec(**{**spec_presets.MONETA, **MLP2}), dict(per_channel=True)),
    ("yaad", MemorySpec(**{**spec_presets.YAAD, **MLP2, "eps": SMOOTH}), {}),
    ("memora", MemorySpec(**{**spec_presets.MEMORA, **MLP2}), {}),
    ("titans-perch", MemorySpec(**{**spec_presets.TITANS, **MLP2}), dict(per_channel=True)),
    ("mlp-valueshift-elastic-silu", MemorySpec(**MLP2, bias="value_shift", eps=SMOOTH, retention="elastic_net",
                                               activation="silu"), {}),
    ("mlp-l1-sigmoid-noresidual-perch", MemorySpec(**MLP2, bias="l1", eps=SMOOTH, retention="sigmoid",
                                                   residual_norm=False), dict(per_channel=True)),
    ("mlp-3layers-lq-momentum", MemorySpec(**MLP2, layers=3, bias="l2", retention="lq", algorithm="momentum"), {}),
]


def test_cases_cover_every_bias_and_retention():
    from miras_ext.spec import BIASES, RETENTIONS
    assert {spec.bias for _, spec, _ in CASES} == set(BIASES)
    assert {spec.retention for _, spec, _ in CASES} == set(RETENTIONS)
    assert {spec.memory for _, spec, _ in CASES} == {"matrix", "mlp"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_matches_cpu_op(index, dtype):
    """B = 2, T = 37 (chunks 16 + 16 + 5), H = 2, Dk = 8; random initial state, per batch or per head."""
    _, spec, kw = CASES[index]
    inp = make_inputs(spec, B=2, T=37, H=2, dk=8, init="random", init_batch=index % 2 == 0, seed=index, **kw)
    _compare(inp, dtype, chunk_size=16, scale=0.8)


@pytest.mark.parametrize("index", [1, 7], ids=[CASES[1][0], CASES[7][0]])
def test_float16(index):
    _, spec, kw = CASES[index]
    inp = make_inputs(spec, B=2, T=37, H=2, dk=8, init="random", seed=index, **kw)
    _compare(inp, torch.float16, chunk_size=16)


HEAD_SPECS = [
    pytest.param(MemorySpec(**spec_presets.GATED_DELTA), {}, id="gated-delta"),
    pytest.param(MemorySpec(memory="mlp", bias="l2", retention="l2"), {"per_channel": True, "alpha": (0.98, 1.0)},
                 id="mlp-l2-perch"),
    pytest.param(MemorySpec(**{**spec_presets.YAAD, "eps": SMOOTH}), {}, id="yaad"),
]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float32"),
                                   pytest.param(torch.bfloat16, id="bfloat16")])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("spec, kw", HEAD_SPECS)
def test_head_dims_and_chunks(spec, kw, d, chunk_size, dtype):
    """The tile shapes the kernels specialise on: Dk = Dv in 32, 64, 128 (MLP hidden 4 Dk), chunks of 16, 32,
    64, T = 2 chunks + 5 tokens."""
    inp = make_inputs(spec, B=2, T=2 * chunk_size + 5, H=2, dk=d, init="random", seed=d + chunk_size, **kw)
    _compare(inp, dtype, chunk_size=chunk_size, scale=d ** -0.5)


@pytest.mark.parametrize("spec, kw", HEAD_SPECS[:2])
def test_many_chunks(spec, kw):
    """T = 517 (8 full chunks of 64 and 5 tokens), B = 2, H = 3, D = 64: the state carried chunk to chunk.
    (Not Yaad: over 517 tokens the CPU op's own float32 gradients drift 1e-2 from float64 on it.)"""
    inp = make_inputs(spec, B=2, T=517, H=3, dk=64, init="random", lr=(0.0, 0.2), **kw)
    _compare(inp, torch.float32, chunk_size=64, scale=0.125)


def test_per_head_initial_state_gradient_sums_over_the_batch():
    spec = MemorySpec(memory="mlp", expansion=2, bias="l2", retention="l2")
    inp = make_inputs(spec, B=5, T=20, H=2, dk=8, init="random", init_batch=False, per_channel=True)
    _compare(inp, torch.float32, chunk_size=16)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")])
@pytest.mark.parametrize("spec", [
    pytest.param(MemorySpec(**{**spec_presets.MEMORA, **MLP2}, algorithm="momentum"), id="memora-momentum"),
    pytest.param(MemorySpec(**spec_presets.GATED_DELTA), id="gated-delta"),
])
def test_cu_seqlens(spec, dtype):
    """Packed sequences of lengths 5, 0, 37, 16, 1 (B = 1), chunk 16, one initial state per sequence;
    cu_seqlens on the device like every other input."""
    lengths = [5, 0, 37, 16, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inp = make_inputs(spec, B=1, T=sum(lengths), H=2, dk=8, init="random", n_states=len(lengths))
    _compare(inp, dtype, chunk_size=16, cu_seqlens=cu)


def test_cu_seqlens_on_the_cpu():
    """cu_seqlens (int64) may stay on the CPU while q is on the device."""
    spec = MemorySpec(memory="mlp", expansion=2, bias="huber", retention="l2")
    cu = torch.tensor([0, 20, 20, 53])
    inp = make_inputs(spec, B=1, T=53, H=2, dk=8, per_channel=True, delta_per_channel=True, init="random", n_states=3)
    _compare(inp, torch.float32, index_device=CPU, chunk_size=16, cu_seqlens=cu)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
@pytest.mark.parametrize("spec", [
    pytest.param(MemorySpec(memory="mlp", expansion=2, bias="huber", retention="l2"), id="mlp-l2"),
    pytest.param(MemorySpec(memory="mlp", expansion=2, bias="l2", retention="kl"), id="mlp-kl"),
    pytest.param(MemorySpec(memory="matrix", bias="l2", retention="l2"), id="matrix-l2"),
])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")])
def test_retention_below_the_floor(spec, per_channel, dtype):
    """Runs whose retention product leaves the factored form's range (docs/math.md Eq. 5.12: below 1e-6 in
    float64, 1e-3 in float32) take the token-loop path; both paths in one call."""
    inp = make_inputs(spec, B=1, T=80, H=2, dk=8, per_channel=per_channel, init="random")
    inp.gates["alpha"][:, :50] = 1e-5  # the first chunk's product reaches 1e-250
    _compare(inp, dtype, chunk_size=64)


def test_cu_seqlens_from_states_mid_chunk():
    """Varlen continuing MemoryStates at positions 0, 3, 6, 1 within chunks of 4 (runs that continue an anchor,
    fresh chunks, lag chunks), with gradients to the initial memory and anchor."""
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2", lag_token=True)
    lengths = [5, 0, 7, 1]
    inp = make_inputs(spec, B=1, T=sum(lengths), H=3, dk=8, dv=6, init="random", n_states=len(lengths))
    cu = torch.tensor([0, 5, 5, 12, 13], dtype=torch.int32)
    position = torch.tensor([0, 3, 6, 1])

    def run(source, dtype, device):
        x = _place(source, dtype, device)
        leaves = [x.q, x.k, x.v, x.gates["lr"], x.gates["alpha"], x.initial_state[0], x.initial_state[0] * 0.5]
        leaves = [t.detach().requires_grad_() for t in leaves]
        q, k, v, lr, alpha, z, anchor = leaves
        state = MemoryState((z,), (), (anchor,), position.to(device))
        o, st = memory_forward(q, k, v, spec, lr, alpha, initial_state=state, chunk_size=4, cu_seqlens=cu.to(device),
                               output_final_state=True)
        grads = torch.autograd.grad(_cotangent_loss(o, st, torch.float32), leaves)
        return o, st, dict(enumerate(grads))

    got, want = run(inp, torch.float32, DEVICE), run(_rounded(inp, torch.float32), torch.float64, CPU)
    _assert_close(got, want, TOL[torch.float32])
    assert got[1].position.tolist() == [5, 3, 13, 2]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")])
@pytest.mark.parametrize("spec, kw", [
    pytest.param(MemorySpec(**{**spec_presets.YAAD, **MLP2, "eps": SMOOTH}, algorithm="momentum"), {"per_channel": True},
                 id="yaad-momentum-perch"),
    pytest.param(MemorySpec(**spec_presets.GATED_DELTA), {"dv": 6}, id="gated-delta"),
    pytest.param(MemorySpec(**{**spec_presets.MEMORA, **MLP2}), {}, id="memora-lag"),
])
def test_decode_continues_a_prefill(spec, kw, dtype):
    """Prefill 21 tokens (ends mid-chunk) on the device, then memory_step token by token to 27: the outputs
    and the final state equal the CPU op's single call over the 27 tokens."""
    inp = make_inputs(spec, B=2, T=27, H=2, dk=8, init="random", **kw)

    def one_call(source, dtype, device):
        o, state = _place(source, dtype, device).call(memory_forward, chunk_size=16, output_final_state=True)
        return o, state, {}

    with torch.no_grad():
        x = _place(inp, dtype, DEVICE)
        o, state = x.slice_t(0, 21).call(memory_forward, chunk_size=16, output_final_state=True)
        outs = [o]
        for t in range(21, 27):
            g = {n: None if y is None else y[:, t] for n, y in x.gates.items()}
            o_t, state = memory_step(x.q[:, t], x.k[:, t], x.v[:, t], spec, g["lr"], g["alpha"], g["momentum"],
                                     g["delta"], state=state, chunk_size=16)
            assert o_t.device.type == DEVICE.type and o_t.shape == x.v[:, t].shape
            outs.append(o_t.unsqueeze(1))
        want = one_call(_rounded(inp, dtype), torch.float64, CPU)
        own = None if dtype == torch.float64 else _errors(one_call(inp, dtype, CPU), want)
    _assert_close((torch.cat(outs, 1), state, {}), want, TOL[dtype], own)
    assert state.position.cpu().tolist() == [27, 27]


def test_repeatable():
    """The same call twice gives the same result up to the order of float32 atomics (a race moves it more)."""
    spec = MemorySpec(**spec_presets.MONETA)
    inp = make_inputs(spec, B=2, T=150, H=4, dk=32, init="random", init_scale=0.05, per_channel=True)
    first = _run(inp, torch.float32, DEVICE, chunk_size=64)
    second = _run(inp, torch.float32, DEVICE, chunk_size=64)
    _assert_close(second, first, 1e-5)


# ---------------------------------------------------------------------------------------------------------
# The operator's contract on CUDA tensors: opcheck, torch.compile, errors.


def _op_args(spec: MemorySpec, save: bool, requires_grad: bool = False) -> list:
    inp = make_inputs(spec, B=2, T=6, H=2, dk=4, dv=3 if spec.memory == "matrix" else 4, init="random")
    inp = _place(inp, torch.float64, DEVICE)
    z = list(inp.initial_state)
    mom = [torch.zeros_like(x) for x in z] if spec.algorithm == "momentum" else []
    args = [inp.q, inp.k, inp.v, inp.gates["lr"], inp.gates["alpha"], inp.gates["momentum"], inp.gates["delta"],
            z, mom, [x.clone() for x in z], torch.full((2,), 1, dtype=torch.int64, device=DEVICE), None,
            spec.encode(), 1.0, 4, save]
    if requires_grad:
        for i in (0, 1, 2, 3, 4):
            args[i] = args[i].detach().requires_grad_()
        args[7] = [x.detach().requires_grad_() for x in args[7]]
    return args


@pytest.mark.parametrize("spec", [MemorySpec(memory="matrix", bias="l2", retention="l2"),
                                  MemorySpec(memory="mlp", expansion=2, bias="l2", retention="l2",
                                             algorithm="momentum")], ids=["matrix", "mlp-momentum"])
def test_opcheck(spec):
    op = torch.ops.miras_ext.memory_chunk_fwd.default
    torch.library.opcheck(op, _op_args(spec, True, requires_grad=True))
    torch.library.opcheck(op, _op_args(spec, False))


@pytest.mark.parametrize("spec", [MemorySpec(memory="matrix", bias="l2", retention="l2"),
                                  MemorySpec(memory="mlp", expansion=2, bias="yaad", retention="l2")],
                         ids=["matrix", "mlp-yaad"])
def test_torch_compile_fullgraph(spec):
    inp = _place(make_inputs(spec, B=2, T=7, H=2, dk=4, init="random"), torch.float64, DEVICE).requires_grad_()
    names = list(inp.leaves())

    def f(*xs):
        x = dict(zip(names, xs))
        init = tuple(x[n] for n in names if n.startswith("initial_state"))
        o, state = memory_forward(x["q"], x["k"], x["v"], spec, x["lr"], x["alpha"], None, x.get("delta"),
                                  initial_state=init, chunk_size=4, output_final_state=True)
        return o.square().sum() + state.memory[0].sum()

    args = list(inp.leaves().values())
    eager = f(*args)
    g_eager = torch.autograd.grad(eager, args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    g_compiled = torch.autograd.grad(compiled, args)
    assert compiled.device.type == DEVICE.type
    assert rel(compiled, eager) < TOL[torch.float64]
    for a, b in zip(g_compiled, g_eager):
        assert rel(a, b) < TOL[torch.float64]


def _mixed_device_calls():
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2")
    x = _place(make_inputs(spec, B=2, T=5, H=2, dk=4, dv=3, init="random"), torch.float32, DEVICE)
    init = x.initial_state
    cpu = lambda t: t.cpu()  # noqa: E731
    return {
        "lr": ((x.q, x.k, x.v, spec, cpu(x.gates["lr"]), x.gates["alpha"]), {}),
        "alpha": ((x.q, x.k, x.v, spec, x.gates["lr"], cpu(x.gates["alpha"])), {}),
        "k": ((x.q, cpu(x.k), x.v, spec, x.gates["lr"], x.gates["alpha"]), {}),
        "v": ((x.q, x.k, cpu(x.v), spec, x.gates["lr"], x.gates["alpha"]), {}),
        r"initial_state\[0\]": ((x.q, x.k, x.v, spec, x.gates["lr"], x.gates["alpha"]),
                                {"initial_state": (cpu(init[0]),)}),
    }


@pytest.mark.skipif(not ON_CUDA, reason="mixed devices need a CUDA device")
@pytest.mark.parametrize("name", ["lr", "alpha", "k", "v", r"initial_state\[0\]"],
                         ids=["lr", "alpha", "k", "v", "initial_state"])
def test_cpu_tensor_with_cuda_q_names_the_argument(name):
    args, kwargs = _mixed_device_calls()[name]
    with pytest.raises(ValueError, match=rf"^{name}: expected device cuda"):
        memory_forward(*args, **kwargs)

