"""Table 1 of the Miras paper: every published model, written here as its own recurrence, is a MemorySpec.

Each test spells out the model's published token-by-token update with explicit formulas (no reference
helpers) and checks that reference.recurrent and reference.chunked reproduce its outputs and final state.
Shapes follow the project: matrix memory W [Dv, Dk] per batch and head, o_t = M(W_t, scale * q_t) read after
writing token t. Mini-batch models (TTT, Titans) take every gradient of a chunk at the chunk's first state.
"""

from __future__ import annotations

import math

import pytest
import torch

from miras_ext import reference
from miras_ext.spec import MemorySpec

DT = torch.float64
B, T, H, DK, DV = 2, 13, 3, 5, 3
TOL = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., :, None] * b[..., None, :]


def mv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (w @ x[..., None])[..., 0]


def uniform(gen: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=DT)


def qkv(seed: int, dk: int = DK, dv: int = DV, normalize_k: bool = False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, dk, generator=gen, dtype=DT)
    k = torch.randn(B, T, H, dk, generator=gen, dtype=DT)
    v = torch.randn(B, T, H, dv, generator=gen, dtype=DT)
    if normalize_k:
        k = k / k.norm(dim=-1, keepdim=True)
    else:
        k = k / math.sqrt(dk)
    return q, k, v, gen


def run_both(spec, q, k, v, lr, alpha=None, momentum=None, delta=None, *, chunk_sizes=(1,), **kw):
    """(name, o, final state) for reference.recurrent and reference.chunked at every chunk size."""
    results = []
    for cs in chunk_sizes:
        for name, fn in (("recurrent", reference.recurrent), ("chunked", reference.chunked)):
            o, state = fn(q, k, v, spec, lr, alpha, momentum, delta, output_final_state=True, chunk_size=cs, **kw)
            results.append((f"{name}(chunk_size={cs})", o, state))
    return results


def check(results, o_expected, memory_expected, momentum_expected=()):
    assert all(torch.isfinite(x).all() for x in (o_expected, *memory_expected))
    for name, o, state in results:
        assert o.shape == o_expected.shape, name
        assert o.dtype == DT, name
        err = rel(o, o_expected)
        assert err < TOL, f"{name}: output rel error {err:.3e}"
        assert len(state.memory) == len(memory_expected), name
        for i, (z, z_expected) in enumerate(zip(state.memory, memory_expected)):
            err = rel(z, z_expected)
            assert err < TOL, f"{name}: final state[{i}] rel error {err:.3e}"
        assert len(state.momentum) == len(momentum_expected), name
        for i, (s, s_expected) in enumerate(zip(state.momentum, momentum_expected)):
            err = rel(s, s_expected)
            assert err < TOL, f"{name}: final momentum[{i}] rel error {err:.3e}"
        assert state.position.tolist() == [T] * B, name


# ----------------------------------------------------------------------------------------------------------
# Linear recurrences with the dot-product bias: the gradient does not depend on the state, so the mini-batch
# (chunked) algorithm is exact at every chunk size.

DOT_CHUNKS = (1, 4, 16)


def test_linear_attention():
    """Linear attention: S_t = S_{t-1} + v_t k_t^T, o_t = S_t q_t."""
    q, k, v, _ = qkv(1)
    scale = 0.7
    s = torch.zeros(B, H, DV, DK, dtype=DT)
    outs = []
    for t in range(T):
        s = s + outer(v[:, t], k[:, t])
        outs.append(mv(s, scale * q[:, t]))
    o = torch.stack(outs, 1)
    spec = MemorySpec(memory="matrix", bias="dot", retention="none")
    lr = torch.ones(B, T, H, dtype=DT)
    check(run_both(spec, q, k, v, lr, chunk_sizes=DOT_CHUNKS, scale=scale), o, (s,))


def test_retnet():
    """RetNet: S_t = gamma_h S_{t-1} + v_t k_t^T with a constant decay per head."""
    q, k, v, _ = qkv(2)
    gamma = torch.tensor([0.9, 0.97, 0.5], dtype=DT)
    s = torch.zeros(B, H, DV, DK, dtype=DT)
    outs = []
    for t in range(T):
        s = gamma[None, :, None, None] * s + outer(v[:, t], k[:, t])
        outs.append(mv(s, q[:, t]))
    o = torch.stack(outs, 1)
    spec = MemorySpec(memory="matrix", bias="dot", retention="l2")
    alpha = gamma.expand(B, T, H).clone()
    lr = torch.ones(B, T, H, dtype=DT)
    check(run_both(spec, q, k, v, lr, alpha, chunk_sizes=DOT_CHUNKS), o, (s,))


def test_mamba2():
    """Mamba2 (SSD): h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t, with B = k, C = q, x = v."""
    q, k, v, gen = qkv(3)
    dt = torch.nn.functional.softplus(torch.randn(B, T, H, generator=gen, dtype=DT))
    a_log = -torch.exp(torch.randn(H, generator=gen, dtype=DT))
    s = torch.zeros(B, H, DV, DK, dtype=DT)
    outs = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * a_log)
        s = decay[..., None, None] * s + dt[:, t, :, None, None] * outer(v[:, t], k[:, t])
        outs.append(mv(s, q[:, t]))
    o = torch.stack(outs, 1)
    spec = MemorySpec(memory="matrix", bias="dot", retention="l2")
    check(run_both(spec, q, k, v, dt, torch.exp(dt * a_log), chunk_sizes=DOT_CHUNKS), o, (s,))


# ----------------------------------------------------------------------------------------------------------
# Delta rules (l2 bias, matrix memory): exact at every chunk size (docs/math.md Eqs. 5.13-5.19).

DELTA_CHUNKS = (1, 3, 16)


def test_deltanet():
    """DeltaNet: S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T (S [Dv, Dk])."""
    q, k, v, gen = qkv(4, normalize_k=True)
    beta = uniform(gen, (B, T, H), 0.1, 1.0)
    eye = torch.eye(DK, dtype=DT)
    s = torch.zeros(B, H, DV, DK, dtype=DT)
    outs = []
    for t in range(T):
        bt = beta[:, t, :, None, None]
        s = s @ (eye - bt * outer(k[:, t], k[:, t])) + bt * outer(v[:, t], k[:, t])
        outs.append(mv(s, q[:, t]))
    o = torch.stack(outs, 1)
    spec = MemorySpec(memory="matrix", bias="l2", retention="none")
    check(run_both(spec, q, k, v, beta, chunk_sizes=DELTA_CHUNKS), o, (s,))


def gated_deltanet_inputs():
    q, k, v, gen = qkv(5, normalize_k=True)
    alpha = uniform(gen, (B, T, H), 0.5, 1.0)
    beta = uniform(gen, (B, T, H), 0.2, 1.0)
    s0 = 0.5 * torch.randn(H, DV, DK, generator=gen, dtype=DT)
    return q, k, v, alpha, beta, s0


def test_gated_deltanet():
    """Gated DeltaNet: S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, i.e. the gradient step
    taken at the retained state alpha_t S_{t-1} (grad_at_retained). Without it the model is a different one
    (gradient at S_{t-1}), and the reference must not reproduce Gated DeltaNet then."""
    q, k, v, alpha, beta, s0 = gated_deltanet_inputs()
    eye = torch.eye(DK, dtype=DT)
    s = s0.expand(B, H, DV, DK)
    outs = []
    for t in range(T):
        a, bt = alpha[:, t, :, None, None], beta[:, t, :, None, None]
        s = a * s @ (eye - bt * outer(k[:, t], k[:, t])) + bt * outer(v[:, t], k[:, t])
        outs.append(mv(s, q[:, t]))
    o = torch.stack(outs, 1)
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True)
    check(run_both(spec, q, k, v, beta, alpha, initial_state=(s0,), chunk_sizes=DELTA_CHUNKS), o, (s,))

    plain = MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=False)
    for name, o_plain, _ in run_both(plain, q, k, v, beta, alpha, initial_state=(s0,)):
        assert rel(o_plain, o) > 1e-3, f"{name}: gradient at S_{{t-1}} should not give Gated DeltaNet"


def test_gated_deltanet_minibatch():
    """Mini-batch Gated DeltaNet (docs/math.md Eq. 5.2, `minibatch=True`): token t of a chunk starting at t' takes
    its gradient at (prod_{t'<=j<=t} alpha_j) S_{t'-1}; with b = 1 this is Gated DeltaNet."""
    q, k, v, alpha, beta, s0 = gated_deltanet_inputs()
    b = 4
    s = s0.expand(B, H, DV, DK)
    anchor = s
    outs = []
    for t in range(T):
        if t % b == 0:
            anchor = s
        a, bt = alpha[:, t, :, None, None], beta[:, t, :, None, None]
        anchor = a * anchor
        s = a * s - bt * outer(mv(anchor, k[:, t]) - v[:, t], k[:, t])
        outs.append(mv(s, q[:, t]))
    o = torch.stack(outs, 1)
    spec = MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True, minibatch=True)
    check(run_both(spec, q, k, v, beta, alpha, initial_state=(s0,), chunk_sizes=(b,)), o, (s,))


# ----------------------------------------------------------------------------------------------------------
# Deep memories trained by mini-batch GD: TTT-Linear, TTT-MLP, Titans. The published models write their
# memory with explicit formulas; the per-token gradient is autograd of the explicit loss.

LN_EPS = 1e-5


def layer_norm(u: torch.Tensor) -> torch.Tensor:
    mu = u.mean(-1, keepdim=True)
    var = ((u - mu) ** 2).mean(-1, keepdim=True)
    return (u - mu) / torch.sqrt(var + LN_EPS)


def gelu(u: torch.Tensor) -> torch.Tensor:
    return 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))


def silu(u: torch.Tensor) -> torch.Tensor:
    return u * torch.sigmoid(u)


def ttt_linear_f(ws, x):
    """TTT-Linear: f(x) = x + LN(W x)."""
    return x + layer_norm(mv(ws[0], x))


def ttt_mlp_f(ws, x):
    """TTT-MLP: f(x) = x + LN(W_2 gelu(W_1 x))."""
    return x + layer_norm(mv(ws[1], gelu(mv(ws[0], x))))


def titans_f(ws, x):
    """Titans' 2-layer memory without the residual: M(x) = W_2 silu(W_1 x)."""
    return mv(ws[1], silu(mv(ws[0], x)))


def grads_of_l2(f, ws, k_t, v_t):
    """Per (batch, head) gradient of 1/2 ||f(k_t; W) - v_t||^2 at W (the sum over B, H separates them)."""
    leaves = [w.detach().clone().requires_grad_(True) for w in ws]
    loss = 0.5 * ((f(leaves, k_t) - v_t) ** 2).sum()
    return [g.detach() for g in torch.autograd.grad(loss, leaves)]


def ttt_expected(f, ws0, q, k, v, eta, b):
    """TTT mini-batch GD: for t in the mini-batch starting at t', W_t = W_{t'-1} - sum_{t'<=s<=t} eta_s
    grad l(W_{t'-1}; k_s, v_s); o_t = f(q_t; W_t). Initial weights [H, ...] (shared) or [B, H, ...]."""
    ws = [w if w.dim() == 4 else w.expand(B, *w.shape) for w in ws0]
    anchor = ws
    outs = []
    for t in range(T):
        if t % b == 0:
            anchor = ws
        g = grads_of_l2(f, anchor, k[:, t], v[:, t])
        ws = [w - eta[:, t, :, None, None] * gi for w, gi in zip(ws, g)]
        outs.append(f(ws, q[:, t]))
    return torch.stack(outs, 1), ws


@pytest.mark.parametrize("b", [1, 4])
def test_ttt_linear(b):
    d = 4
    q, k, v, gen = qkv(6, d, d)
    eta = uniform(gen, (B, T, H), 0.1, 0.6)
    w0 = 0.5 * torch.randn(H, d, d, generator=gen, dtype=DT)
    o, ws = ttt_expected(ttt_linear_f, [w0], q, k, v, eta, b)
    if b > 1:  # the mini-batch must matter for this test to say anything about chunking
        assert rel(ttt_expected(ttt_linear_f, [w0], q, k, v, eta, 1)[0], o) > 1e-4
    spec = MemorySpec(memory="mlp", layers=1, residual_norm=True, bias="l2", retention="none")
    check(run_both(spec, q, k, v, eta, initial_state=(w0,), chunk_sizes=(b,)), o, ws)


@pytest.mark.parametrize("b", [1, 4])
def test_ttt_mlp(b):
    d, e = 4, 4
    q, k, v, gen = qkv(7, d, d)
    eta = uniform(gen, (B, T, H), 0.1, 0.6)
    w1 = torch.randn(B, H, e * d, d, generator=gen, dtype=DT) / math.sqrt(d)
    w2 = torch.randn(B, H, d, e * d, generator=gen, dtype=DT) / math.sqrt(e * d)
    o, ws = ttt_expected(ttt_mlp_f, [w1, w2], q, k, v, eta, b)  # initial weights per batch and head
    if b > 1:
        assert rel(ttt_expected(ttt_mlp_f, [w1, w2], q, k, v, eta, 1)[0], o) > 1e-4
    spec = MemorySpec(memory="mlp", layers=2, expansion=e, activation="gelu", residual_norm=True,
                      bias="l2", retention="none")
    check(run_both(spec, q, k, v, eta, initial_state=(w1, w2), chunk_sizes=(b,)), o, ws)


@pytest.mark.parametrize("b", [1, 4])
def test_titans(b):
    """Titans (LMM): S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; k_t, v_t), M_t = (1 - a_t) M_{t-1} + S_t, the
    gradient at the state M_{t'} where t's mini-batch began (t' = t with b = 1)."""
    e = 4
    q, k, v, gen = qkv(8)
    theta = uniform(gen, (B, T, H), 0.05, 0.4)
    a = uniform(gen, (B, T, H), 0.0, 0.2)
    eta = uniform(gen, (B, T, H), 0.0, 0.9)
    w1 = torch.randn(H, e * DK, DK, generator=gen, dtype=DT) / math.sqrt(DK)
    w2 = torch.randn(H, DV, e * DK, generator=gen, dtype=DT) / math.sqrt(e * DK)

    def expected(b):
        ms = [w.expand(B, *w.shape) for w in (w1, w2)]
        ss = [torch.zeros_like(m) for m in ms]
        anchor = ms
        outs = []
        for t in range(T):
            if t % b == 0:
                anchor = ms
            g = grads_of_l2(titans_f, anchor, k[:, t], v[:, t])
            view = lambda x: x[:, t, :, None, None]  # noqa: E731
            ss = [view(eta) * s - view(theta) * gi for s, gi in zip(ss, g)]
            ms = [(1 - view(a)) * m + s for m, s in zip(ms, ss)]
            outs.append(titans_f(ms, q[:, t]))
        return torch.stack(outs, 1), ms, ss

    o, ms, ss = expected(b)
    if b > 1:
        assert rel(expected(1)[0], o) > 1e-4
    spec = MemorySpec(memory="mlp", layers=2, expansion=e, activation="silu", residual_norm=False,
                      bias="l2", retention="l2", algorithm="momentum")
    results = run_both(spec, q, k, v, theta, 1 - a, eta, initial_state=(w1, w2), chunk_sizes=(b,))
    check(results, o, ms, ss)


# ----------------------------------------------------------------------------------------------------------
# Moneta, Yaad, Memora (Section 5.3) for matrix memory, with per-head or channel-wise (per value row) gates.
# "minibatch": the project's chunk convention (docs/math.md Eq. 5.1, 5.6), each token's gradient at the
# weights where its chunk began; Memora's chunks start with a lag token (Eq. 30-32).

SMOOTH_EPS = 1e-12  # spec.eps: |x| ~ sqrt(x^2 + eps), negligible at this size
NORM_EPS = 1e-12  # the project's guard of the l_q normaliser, sum |A|^q + 1e-12


def gates(gen, per_channel: bool, lo: float, hi: float) -> torch.Tensor:
    return uniform(gen, (B, T, H, DV) if per_channel else (B, T, H), lo, hi)


def rows(g: torch.Tensor, t: int) -> torch.Tensor:
    """Gate of token t shaped to scale [B, H, Dv, Dk]: per head, or per value row (output channel)."""
    return g[:, t, :, :, None] if g.dim() == 4 else g[:, t, :, None, None]


def moneta_expected(q, k, v, eta, alpha, b, smoothed=True):
    """Moneta (Eq. 24), p = 3, q = 4: A_t = alpha_t A_{t-1} - eta_t sign(r)|r|^(p-1) k^T with r = W k - v at
    the chunk's anchor, W = A / ||A||_4^2. smoothed: |r| ~ sqrt(r^2 + eps) and the normaliser's 1e-12 as the
    project defines them; else the literal formulas (W = 0 for A = 0)."""
    p, qn = 3.0, 4.0

    def weights(a):
        if smoothed:
            return a / ((a.abs() ** qn).sum((-2, -1), keepdim=True) + NORM_EPS) ** ((qn - 2) / qn)
        norm = (a.abs() ** qn).sum((-2, -1), keepdim=True) ** (1 / qn)
        return torch.where(norm > 0, a / norm.clamp_min(1e-300) ** (qn - 2), torch.zeros_like(a))

    acc = torch.zeros(B, H, DV, DK, dtype=DT)
    anchor = acc
    outs = []
    for t in range(T):
        if t % b == 0:
            anchor = acc
        r = mv(weights(anchor), k[:, t]) - v[:, t]
        if smoothed:
            g = r * (r * r + SMOOTH_EPS) ** ((p - 2) / 2)
        else:
            g = torch.sign(r) * r.abs() ** (p - 1)
        acc = rows(alpha, t) * acc - rows(eta, t) * outer(g, k[:, t])
        outs.append(mv(weights(acc), q[:, t]))
    return torch.stack(outs, 1), acc


@pytest.mark.parametrize("per_channel", [False, True], ids=["head", "channel"])
@pytest.mark.parametrize("b", [1, 4], ids=["exact", "minibatch"])
def test_moneta(b, per_channel):
    q, k, v, gen = qkv(9)
    eta = gates(gen, per_channel, 0.2, 1.0)
    alpha = gates(gen, per_channel, 0.7, 1.0)
    o, acc = moneta_expected(q, k, v, eta, alpha, b)
    literal, _ = moneta_expected(q, k, v, eta, alpha, b, smoothed=False)
    assert rel(o, literal) < 1e-6  # the smoothing is negligible
    spec = MemorySpec(memory="matrix", bias="lp", p=3.0, eps=SMOOTH_EPS, retention="lq", norm_order=4.0)
    check(run_both(spec, q, k, v, eta, alpha, chunk_sizes=(b,)), o, (acc,))


@pytest.mark.parametrize("per_channel", [False, True], ids=["head", "channel"])
@pytest.mark.parametrize("b", [1, 4], ids=["exact", "minibatch"])
def test_yaad(b, per_channel):
    """Yaad (Eq. 26): W_t = alpha_t W_{t-1} - eta_t (r k^T if ||r|| <= delta_t else delta_t sign(r) k^T),
    r = W k - v at the chunk's anchor; sign(r) ~ r / sqrt(r^2 + eps) with eps = 1e-12."""
    q, k, v, gen = qkv(10)
    eta = gates(gen, per_channel, 0.1, 0.6)
    alpha = gates(gen, per_channel, 0.7, 1.0)
    delta = uniform(gen, (B, T, H), 0.4, 2.5)
    w = torch.zeros(B, H, DV, DK, dtype=DT)
    anchor = w
    outs, inside = [], []
    for t in range(T):
        if t % b == 0:
            anchor = w
        r = mv(anchor, k[:, t]) - v[:, t]
        d = delta[:, t, :, None]
        small = r.norm(dim=-1, keepdim=True) <= d
        inside.append(small)
        g = torch.where(small, r, d * r / torch.sqrt(r * r + SMOOTH_EPS))
        w = rows(alpha, t) * w - rows(eta, t) * outer(g, k[:, t])
        outs.append(mv(w, q[:, t]))
    o = torch.stack(outs, 1)
    inside = torch.stack(inside)
    assert inside.any() and not inside.all(), "both branches of Eq. 26 must be exercised"
    spec = MemorySpec(memory="matrix", bias="yaad", eps=SMOOTH_EPS, retention="l2")
    check(run_both(spec, q, k, v, eta, alpha, delta=delta, chunk_sizes=(b,)), o, (w,))


@pytest.mark.parametrize("per_channel", [False, True], ids=["head", "channel"])
@pytest.mark.parametrize("b", [1, 4], ids=["exact", "minibatch"])
def test_memora(b, per_channel):
    """Memora (Eq. 27): W_t = c Softmax_rows(alpha_t log(W_{t-1}/c) - eta_t r k^T), r = W k - v at the anchor,
    c = sqrt(Dk), W_0 uniform (logits 0). Softmax is shift invariant per row, so the project's state is the
    logits Z with W = c softmax(Z); compared through W. With b > 1 each chunk starts with a lag token
    (Eq. 30): that token's step is exact, the rest of the chunk takes gradients at its result M_1."""
    q, k, v, gen = qkv(11)
    eta = gates(gen, per_channel, 0.2, 1.0)
    alpha = gates(gen, per_channel, 0.6, 1.0)
    c = math.sqrt(DK)
    w = torch.full((B, H, DV, DK), c / DK, dtype=DT)
    anchor = w
    outs = []
    for t in range(T):
        if t % b in (0, 1):
            anchor = w
        r = mv(anchor, k[:, t]) - v[:, t]
        w = c * torch.softmax(rows(alpha, t) * torch.log(w / c) - rows(eta, t) * outer(r, k[:, t]), dim=-1)
        outs.append(mv(w, q[:, t]))
    o = torch.stack(outs, 1)
    spec = MemorySpec(memory="matrix", bias="l2", retention="kl", lag_token=b > 1)
    results = run_both(spec, q, k, v, eta, alpha, chunk_sizes=(b,))
    check([(n, o_, s._replace(memory=(c * torch.softmax(s.memory[0], -1),))) for n, o_, s in results], o, (w,))
