"""The hand-derived formulas the chunked reference and the kernels use, checked against torch autograd.

* bias.output_grad (Eqs. 2.9-2.16) against autograd of bias.loss (Eqs. 2.1-2.8), rows on both sides of every
  threshold;
* memory.token_gradients (Eqs. 5.3-5.5: per-token rank-one factors) against torch.func.grad of the loss of
  each token at the shared weights, including the gradient at the retained state (Eq. 5.2);
* retention.link (Eqs. 3.1, 3.6-3.9): the properties each link must have.
"""

from __future__ import annotations

import math

import pytest
import torch

from miras_ext.reference import bias as biases
from miras_ext.reference import memory, retention
from miras_ext.spec import BIASES, MemorySpec

DT = torch.float64
TOL = 1e-12


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------------------------------------
# bias.output_grad == d bias.loss / dy

ROWS, DV = 24, 7  # Dv odd


def residuals(seed: int):
    """y, v [2, ROWS/2, DV] whose residual rows have norms spread over two orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(2, ROWS // 2, DV, generator=gen, dtype=DT)
    r = torch.randn(2, ROWS // 2, DV, generator=gen, dtype=DT)
    r = r * torch.logspace(-1, 1, ROWS // 2, dtype=DT)[None, :, None]
    return v + r, v, gen


def away_from(x: torch.Tensor, threshold: torch.Tensor) -> bool:
    """No value within 0.1% of its threshold (autograd and the closed form may pick different sides there)."""
    return bool(((x - threshold).abs() > 1e-3 * threshold).all())


def row_delta(y, v, gen):
    """One threshold per row: rows alternate between ||r|| = 0.6 delta (inside) and ||r|| = 1.7 delta."""
    n = (y - v).norm(dim=-1)
    factor = torch.where(torch.arange(n.shape[-1]) % 2 == 0, 0.6, 1.7).to(DT)
    return n / factor


def autograd_grad(y, v, bias, delta, p, eps):
    y = y.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(biases.loss(y, v, bias, delta, p, eps).sum(), y)
    return g


CASES = [
    ("dot", None, 2.0), ("l2", None, 2.0),
    ("lp", None, 1.0), ("lp", None, 1.5), ("lp", None, 3.0), ("lp", None, 4.0), ("l1", None, 3.0),
    ("huber", "row", 2.0), ("huber", "channel", 2.0), ("huber_norm", "row", 2.0), ("yaad", "row", 2.0),
    ("value_shift", "row", 2.0),
]


def test_cases_cover_every_bias():
    assert {c[0] for c in CASES} == set(BIASES)


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
@pytest.mark.parametrize("bias,delta_kind,p", CASES, ids=[f"{b}-{d}-p{p}" for b, d, p in CASES])
def test_output_grad(bias, delta_kind, p, eps):
    y, v, gen = residuals(CASES.index((bias, delta_kind, p)))
    r = y - v
    delta = None
    if delta_kind == "row":
        delta = row_delta(y, v, gen)
        norm = r.norm(dim=-1)
        if bias == "huber":  # per coordinate against the row's threshold
            assert away_from(r.abs(), delta[..., None])
            inside = r.abs() <= delta[..., None]
        else:
            assert away_from(norm, delta)
            inside = norm <= delta
        assert inside.any() and not inside.all()
    elif delta_kind == "channel":
        delta = r.abs() * torch.where(torch.rand(r.shape, generator=gen, dtype=DT) < 0.5, 0.6, 1.7)
        inside = r.abs() <= delta
        assert away_from(r.abs(), delta) and inside.any() and not inside.all()
    got = biases.output_grad(y, v, bias, delta, p, eps)
    want = autograd_grad(y, v, bias, delta, p, eps)
    assert got.shape == y.shape
    assert rel(got, want) < TOL, f"{bias}: rel error {rel(got, want):.3e}"


def test_output_grad_huber_broadcast_delta():
    """A per-row delta [...] and the same delta repeated per channel [..., Dv] are the same loss and gradient."""
    y, v, gen = residuals(5)
    delta = row_delta(y, v, gen)
    per_channel = delta[..., None].expand_as(y).contiguous()
    assert torch.equal(biases.output_grad(y, v, "huber", delta), biases.output_grad(y, v, "huber", per_channel))
    assert torch.equal(biases.loss(y, v, "huber", delta), biases.loss(y, v, "huber", per_channel))


# ----------------------------------------------------------------------------------------------------------
# memory.token_gradients == per-token autograd at shared weights

N, H, NTOK = 2, 2, 5
MEMORIES = [
    ("vector", dict(memory="vector"), 5, 5),
    ("matrix", dict(memory="matrix"), 5, 3),
] + [
    (f"mlp{layers}-{act}-{'res' if res else 'plain'}",
     dict(memory="mlp", layers=layers, expansion=2, activation=act, residual_norm=res), 5, 5 if res else 3)
    for layers in (1, 2, 3) for act in ("gelu", "silu") for res in (True, False)
]
TOKEN_BIASES = [("l2", 2.0), ("dot", 2.0), ("lp", 3.0), ("huber", 2.0), ("yaad", 2.0)]


def inputs(spec: MemorySpec, dk: int, dv: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(N, H, *s, generator=gen, dtype=DT) / math.sqrt(s[-1]) for s in spec.weight_shapes(dk, dv)]
    k = torch.randn(N, H, NTOK, dk, generator=gen, dtype=DT)
    v = torch.randn(N, H, NTOK, dv, generator=gen, dtype=DT)
    delta = 0.3 + 2 * torch.rand(N, H, NTOK, generator=gen, dtype=DT) if spec.uses_threshold else None
    return weights, k, v, delta, gen


def per_token_autograd(spec, weights, k, v, delta, token, retained=None):
    """func.grad of the token's loss at the shared weights (or at the retained weights g * W)."""
    def loss(ws):
        return biases.loss(memory.apply(spec, ws, k[:, :, token]), v[:, :, token], spec.bias,
                           None if delta is None else delta[:, :, token], spec.p, spec.eps).sum()
    if retained is not None:  # gradient evaluated AT the retained state, not differentiated through it
        g = retained[:, :, token]
        if spec.memory == "vector":
            weights = [g[..., None] * w for w in weights]
        else:  # per head [N, H], or per value row [N, H, Dv] scaling W's rows
            weights = [(g[..., None] if g.dim() == 3 else g[..., None, None]) * w for w in weights]
    return torch.func.grad(loss)(weights)


def factor_gradient(spec, deltas, ins, layer, token):
    d, a = deltas[layer][:, :, token], ins[layer][:, :, token]
    return d * a if spec.memory == "vector" else d[..., :, None] * a[..., None, :]


def check_token_gradients(spec, weights, k, v, delta, retained=None):
    deltas, ins = memory.token_gradients(spec, weights, k, v, delta, retained)
    assert len(deltas) == len(ins) == spec.num_layers
    for token in range(NTOK):
        want = per_token_autograd(spec, weights, k, v, delta, token, retained)
        for layer in range(spec.num_layers):
            got = factor_gradient(spec, deltas, ins, layer, token)
            assert got.shape == weights[layer].shape
            err = rel(got, want[layer])
            assert err < TOL, f"token {token}, layer {layer}: rel error {err:.3e}"


@pytest.mark.parametrize("bias,p", TOKEN_BIASES, ids=[b for b, _ in TOKEN_BIASES])
@pytest.mark.parametrize("name,fields,dk,dv", MEMORIES, ids=[m[0] for m in MEMORIES])
def test_token_gradients(name, fields, dk, dv, bias, p):
    spec = MemorySpec(bias=bias, p=p, retention="none", **fields)
    weights, k, v, delta, _ = inputs(spec, dk, dv, seed=len(name) * 7 + len(bias))
    check_token_gradients(spec, weights, k, v, delta)


@pytest.mark.parametrize("per_channel", [False, True], ids=["head", "channel"])
@pytest.mark.parametrize("bias", ["l2", "huber", "lp"])
def test_token_gradients_retained_matrix(bias, per_channel):
    """Gated DeltaNet's gradient at the retained state diag(g) W (Eq. 5.2), per head or per value row."""
    spec = MemorySpec(memory="matrix", bias=bias, p=3.0, retention="l2", grad_at_retained=True)
    weights, k, v, delta, gen = inputs(spec, 5, 3, seed=41)
    shape = (N, H, NTOK, 3) if per_channel else (N, H, NTOK)
    retained = 0.2 + 0.8 * torch.rand(*shape, generator=gen, dtype=DT)
    check_token_gradients(spec, weights, k, v, delta, retained)
    # the retained scaling must matter (else this test says nothing)
    plain = memory.token_gradients(spec, weights, k, v, delta)[0][0]
    assert rel(memory.token_gradients(spec, weights, k, v, delta, retained)[0][0], plain) > 1e-3


def test_token_gradients_retained_vector():
    spec = MemorySpec(memory="vector", bias="l2", retention="l2", grad_at_retained=True)
    weights, k, v, delta, gen = inputs(spec, 5, 5, seed=43)
    retained = 0.2 + 0.8 * torch.rand(N, H, NTOK, generator=gen, dtype=DT)
    check_token_gradients(spec, weights, k, v, delta, retained)


# ----------------------------------------------------------------------------------------------------------
# retention.link

SHAPE = (3, 5)


def state(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(N, H, *shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("name", ["none", "l2"])
def test_link_identity(name):
    z = state(1)
    assert torch.equal(retention.link(MemorySpec(retention=name), z, SHAPE), z)


def test_link_lq_order_two_is_identity():
    z = state(2)
    assert rel(retention.link(MemorySpec(retention="lq", norm_order=2.0), z, SHAPE), z) < 1e-15


@pytest.mark.parametrize("q", [3.0, 4.0])
def test_link_lq_norm_mean_is_a_scaled_sum(q):
    """norm_mean averages |A|^q over the n entries of the tensor: N = sum / n + floor, so
    W_mean(A; floor) = n^g W_sum(A; n floor) with g = (q - 2) / q, a constant per tensor size; the average
    does not change when the tensor is tiled (the sum does)."""
    z, n, g = state(4), SHAPE[0] * SHAPE[1], (q - 2) / q
    mean = MemorySpec(retention="lq", norm_order=q, norm_floor=0.3, norm_mean=True)
    summed = MemorySpec(retention="lq", norm_order=q, norm_floor=0.3 * n)
    assert rel(retention.link(mean, z, SHAPE), n ** g * retention.link(summed, z, SHAPE)) < 1e-14
    tiled = z.repeat(1, 1, 2, 1)
    w = retention.link(mean, tiled, (2 * SHAPE[0], SHAPE[1]))
    assert rel(w, retention.link(mean, z, SHAPE).repeat(1, 1, 2, 1)) < 1e-14


@pytest.mark.parametrize("q", [1.5, 3.0, 4.0])
def test_link_lq_normalises_each_head(q):
    """W = A / ||A||_q^(q-2) with the norm over one head's weight tensor: W(cA) = c^(3-q) W(A) for that head
    only, and ||W||_q = ||A||_q^(3-q)."""
    spec = MemorySpec(retention="lq", norm_order=q)
    z = state(3)
    w = retention.link(spec, z, SHAPE)
    norm = (z.abs() ** q).sum((-2, -1), keepdim=True) ** (1 / q)
    assert rel(w, z / norm ** (q - 2)) < 1e-13
    c = 10.0
    z2 = z.clone()
    z2[1, 0] *= c
    w2 = retention.link(spec, z2, SHAPE)
    assert rel(w2[1, 0], c ** (3 - q) * w[1, 0]) < 1e-13
    mask = torch.ones(N, H, dtype=torch.bool)
    mask[1, 0] = False
    assert torch.equal(w2[mask], w[mask])
    assert torch.equal(retention.link(spec, torch.zeros_like(z), SHAPE), torch.zeros_like(z))


@pytest.mark.parametrize("scale", [None, 2.5])
@pytest.mark.parametrize("shape", [(3, 5), (10, 5), (3, 10)])
def test_link_kl(shape, scale):
    """c * row softmax: positive, rows sum to c (sqrt(fan_in) by default), invariant to a constant per row."""
    spec = MemorySpec(retention="kl", simplex_scale=scale)
    c = math.sqrt(shape[-1]) if scale is None else scale
    z = 3 * state(4, shape)
    w = retention.link(spec, z, shape)
    assert (w > 0).all()
    assert rel(w.sum(-1), torch.full(shape[:-1], c, dtype=DT).expand(N, H, *shape[:-1])) < 1e-14
    shift = 5 * torch.randn(N, H, shape[0], 1, generator=torch.Generator().manual_seed(9), dtype=DT)
    assert rel(retention.link(spec, z + shift, shape), w) < 1e-13
    assert rel(w, c * torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)) < 1e-14


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_link_soft_threshold(gamma):
    spec = MemorySpec(retention="elastic_net", shrinkage=gamma)
    z = state(5)
    z[0, 0, 0, :3] = torch.tensor([gamma, -gamma, 0.0], dtype=DT)  # exactly at the threshold
    w = retention.link(spec, z, SHAPE)
    small = z.abs() <= gamma
    assert small.any() and not small.all()
    assert (w[small] == 0).all()
    assert torch.equal(w[~small], z[~small] - gamma * torch.sign(z[~small]))
    if gamma == 0:
        assert torch.equal(w, z)


def test_link_sigmoid():
    z = state(6)
    w = retention.link(MemorySpec(retention="sigmoid"), z, SHAPE)
    assert ((w > 0) & (w < 1)).all()
    assert rel(w, 1 / (1 + torch.exp(-z))) < 1e-15
