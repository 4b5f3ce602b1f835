"""miras_ext::bias_grad against the pure-PyTorch reference (miras_ext.reference.bias)."""

import pytest
import torch

from miras_ext.testing import bias_grad
from miras_ext.reference import bias as ref

BIASES = ("dot", "l2", "lp", "l1", "huber", "huber_norm", "yaad", "value_shift")
THRESHOLD = ("huber", "huber_norm", "yaad", "value_shift")
P = 3.0  # "lp" with p != 2 exercises the power; "l1" ignores it


def make_inputs(bias, dv, dtype=torch.float64, device="cpu", per_channel=False, seed=0):
    """Rows [4, 5, dv] with residuals clearly inside the threshold in half the rows, outside in the rest.

    Thresholds sit a factor 2 away from the residual, so finite differences never cross a branch.
    """
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(4, 5, dv, generator=gen, dtype=torch.float64)
    v = torch.randn(4, 5, dv, generator=gen, dtype=torch.float64)
    r = y - v
    outside = torch.arange(5) % 2 == 0  # per row
    if per_channel:
        scale = torch.where(torch.rand(r.shape, generator=gen) < 0.5, 0.5, 2.0)
        delta = r.abs() * scale
    elif bias in THRESHOLD:
        base = r.norm(dim=-1) if bias != "huber" else r.abs().amax(dim=-1)
        delta = base * torch.where(outside, 0.5, 2.0)
        if bias == "huber":  # a mix of coordinates on both sides, none near |r| = delta
            delta = r.abs().median(dim=-1).values
            near = ((r.abs() / delta.unsqueeze(-1)) - 1).abs() < 1e-3
            r = torch.where(near, r * 1.5, r)
            y = v + r
    else:
        delta = None
    cast = {"dtype": dtype, "device": device}
    return y.to(**cast), v.to(**cast), (None if delta is None else delta.to(**cast))


def rel_err(a, b):
    return float((a - b).double().norm() / b.double().norm().clamp_min(1e-300))


CASES = [(b, dv, False) for b in BIASES for dv in (7, 33)] + [("huber", 7, True), ("huber", 33, True)]
IDS = [f"{b}-dv{dv}{'-per_channel' if pc else ''}" for b, dv, pc in CASES]


@pytest.mark.parametrize("bias,dv,per_channel", CASES, ids=IDS)
def test_forward_matches_autograd_of_loss_and_closed_form(bias, dv, per_channel):
    y, v, delta = make_inputs(bias, dv, per_channel=per_channel)
    g = bias_grad(y, v, bias, delta, p=P)
    yr = y.clone().requires_grad_()
    (expected,) = torch.autograd.grad(ref.loss(yr, v, bias, delta, p=P).sum(), yr)
    assert rel_err(g, expected) < 1e-10
    assert rel_err(g, ref.output_grad(y, v, bias, delta, p=P)) < 1e-10


@pytest.mark.parametrize("bias,dv,per_channel", CASES, ids=IDS)
def test_gradcheck(bias, dv, per_channel):
    y, v, delta = make_inputs(bias, dv, per_channel=per_channel)
    inputs = [y.requires_grad_(), v.requires_grad_()]
    if delta is not None:
        inputs.append(delta.requires_grad_())

    def f(y, v, *delta):
        return bias_grad(y, v, bias, delta[0] if delta else None, p=P)

    assert torch.autograd.gradcheck(f, inputs)


def test_double_backward_is_refused():
    y, v, _ = make_inputs("l2", 7)
    y.requires_grad_()
    (gy,) = torch.autograd.grad(bias_grad(y, v, "l2").sum(), y, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        gy.sum().backward()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("bias", BIASES)
def test_low_precision_inputs(bias, dtype, tol):
    y, v, delta = make_inputs(bias, 33)
    yl, vl = y.to(dtype), v.to(dtype)
    dl = None if delta is None else delta.to(dtype)
    g = bias_grad(yl, vl, bias, dl, p=P)
    assert g.dtype == dtype
    # The op computes in float32 from the rounded inputs; compare with float64 on the same rounded inputs.
    expected = ref.output_grad(yl.double(), vl.double(), bias, None if dl is None else dl.double(), p=P)
    assert rel_err(g, expected) < tol


@pytest.mark.parametrize("bias,dv,per_channel", CASES[::2] + CASES[-1:], ids=IDS[::2] + IDS[-1:])
def test_opcheck(bias, dv, per_channel):
    y, v, delta = make_inputs(bias, dv, per_channel=per_channel)
    y.requires_grad_()
    torch.library.opcheck(torch.ops.miras_ext.bias_grad, (y, v, delta, bias, P, 1e-6))
    u = torch.randn_like(y)
    torch.library.opcheck(torch.ops.miras_ext.bias_grad_backward, (u, y.detach(), v, delta, bias, P, 1e-6))


def test_torch_compile_fullgraph_matches_eager():
    def f(y, v, delta):
        return bias_grad(y * 2, v, "huber_norm", delta).sum(-1)

    y, v, delta = make_inputs("huber_norm", 7)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(y, v, delta), f(y, v, delta))


def test_non_contiguous_inputs():
    y, v, delta = make_inputs("value_shift", 7)
    yt, vt = y.transpose(0, 1), v.transpose(0, 1)
    g = bias_grad(yt, vt, "value_shift", delta.t())
    torch.testing.assert_close(g, ref.output_grad(yt, vt, "value_shift", delta.t()))


BAD = [
    ("bias", lambda y, v, d: bias_grad(y, v, "l3")),
    ("v", lambda y, v, d: bias_grad(y, v[..., :3], "l2")),
    ("v", lambda y, v, d: bias_grad(y, v.float(), "l2")),
    ("delta", lambda y, v, d: bias_grad(y, v, "huber_norm")),
    ("delta", lambda y, v, d: bias_grad(y, v, "yaad", torch.ones_like(y))),
    ("delta", lambda y, v, d: bias_grad(y, v, "huber", d[..., :2])),
    ("delta", lambda y, v, d: bias_grad(y, v, "huber", d.float())),
    ("p", lambda y, v, d: bias_grad(y, v, "lp", p=0.5)),
    ("eps", lambda y, v, d: bias_grad(y, v, "l1", eps=0.0)),
    ("y", lambda y, v, d: bias_grad(y.long(), v.long(), "l2")),
]


@pytest.mark.parametrize("argument,call", BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_inputs_raise_value_error_naming_the_argument(argument, call):
    y, v, delta = make_inputs("huber", 7)
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        call(y, v, delta)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias,dv,per_channel", CASES, ids=IDS)
def test_cuda_matches_cpu(bias, dv, per_channel, dtype, tol):
    y, v, delta = make_inputs(bias, dv, dtype=dtype, per_channel=per_channel)
    u = torch.randn_like(y)
    on = [t.cuda() if t is not None else None for t in (u, y, v, delta)]
    g_cpu = bias_grad(y, v, bias, delta, p=P)
    g_gpu = bias_grad(*on[1:3], bias, on[3], p=P)
    assert rel_err(g_gpu.cpu(), g_cpu) < tol
    back_cpu = torch.ops.miras_ext.bias_grad_backward(u, y, v, delta, bias, P, 1e-6)
    back_gpu = torch.ops.miras_ext.bias_grad_backward(*on, bias, P, 1e-6)
    for c, g in zip(back_cpu, back_gpu):
        if c.numel():
            assert rel_err(g.cpu(), c) < tol
