"""Conditioning of the residual-LayerNorm MLP memory's exact token recurrence (docs/math.md Section 8, point 15).

One head, D = 16, a 2-layer GELU MLP (expansion 4) read as x + LN(f(x)) (Eq. 1.4), written token by token
(chunk size 1) with retention alpha and step eta, in float64 with autograd through the whole recurrence (the
inner gradients by autograd of the loss as written, not the op's formulas). Per candidate it prints the
largest |dL/dk| of a random linear function of the outputs (how far the outer gradient grows with T), the
final memory's size ||W2_T|| / ||W2_0|| (a memory that decays to nothing only reads its residual path) and
the self-recall error ||M(k_t) - v_t|| / ||v_t|| over the last 50 tokens (1 is no recall).

Candidates: the bias ("yaad": Eq. 2.7 with smoothing `smooth`, "l2", "lp": p = 3 with the l_q link of Eq.
3.5), the LayerNorm epsilon, the l_q floor, and retention toward the initial state instead of toward zero
(W_t - W_0 = alpha (W_{t-1} - W_0) - eta G_t).

    .venv/bin/python bench/inner_stability.py                 # the grid of docs/math.md Section 8, point 15
    .venv/bin/python bench/inner_stability.py --seq-len 256 --bias l2 --ln-eps 1e-5 1e-2 --lr 5e-3
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

D, E = 16, 4


def run(t_len: int, bias: str, lr: float, alpha: float, ln_eps: float, smooth: float, floor: float,
        to_initial: bool, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    k = F.normalize(randn(t_len, D), dim=-1).requires_grad_()
    v = randn(t_len, D)
    z0 = [(randn(E * D, D) / D ** 0.5).requires_grad_(), (randn(D, E * D) / (E * D) ** 0.5).requires_grad_()]

    def weights(z):
        if bias != "lp":
            return z
        return [a / ((a.abs() ** 4).sum() + floor) ** 0.5 for a in z]  # Eq. 3.5, q = 4

    def read(w, x):
        return x + F.layer_norm(w[1] @ F.gelu(w[0] @ x), (D,), eps=ln_eps)

    def loss(w, kt, vt):
        r = read(w, kt) - vt
        if bias == "l2":
            return 0.5 * r.square().sum()
        if bias == "lp":
            return ((r.square() + 1e-6) ** 1.5).sum() / 3
        n = r.norm()  # yaad, delta = 1
        return torch.where(n <= 1.0, 0.5 * n * n, torch.sqrt(r.square() + smooth).sum())

    z, outs, err = list(z0), [], 0.0
    for t in range(t_len):
        w = weights(z)
        grads = torch.autograd.grad(loss(w, k[t], v[t]), w, create_graph=True)
        z = [(z0[i] + alpha * (z[i] - z0[i]) if to_initial else alpha * z[i]) - lr * grads[i] for i in range(2)]
        o = read(weights(z), k[t])
        outs.append(o)
        if t >= t_len - 50:
            err += float((o.detach() - v[t]).norm() / v[t].norm()) / min(50, t_len)
    o = torch.stack(outs)
    (gk,) = torch.autograd.grad((o * randn(*o.shape)).sum(), (k,))
    return dict(max_grad_k=float(gk.abs().max()), memory_ratio=float(z[1].detach().norm() / z0[1].detach().norm()),
                self_recall_error=err)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--bias", nargs="+", default=["yaad", "l2", "lp"], choices=["yaad", "l2", "lp"])
    p.add_argument("--lr", nargs="+", type=float, default=[5e-3, 2e-2])
    p.add_argument("--alpha", type=float, default=0.982)
    p.add_argument("--ln-eps", nargs="+", type=float, default=[1e-5, 1e-2])
    p.add_argument("--smooth", nargs="+", type=float, default=[1e-6, 1e-1], help="yaad: eps of sqrt(r^2 + eps)")
    p.add_argument("--floor", nargs="+", type=float, default=[1e-12, 1.0], help="lp: the l_q floor (Eq. 3.5)")
    p.add_argument("--retain-to", nargs="+", default=["zero", "initial"], choices=["zero", "initial"])
    args = p.parse_args(argv)
    rows = []
    print(f"{'bias':<6}{'eta':>8}{'ln_eps':>8}{'smooth':>8}{'floor':>8} {'retain to':<10}{'max|dL/dk|':>12}"
          f"{'||W_T||/||W_0||':>17}{'recall err':>12}")
    for bias, lr, ln_eps, target in itertools.product(args.bias, args.lr, args.ln_eps, args.retain_to):
        for smooth, floor in itertools.product(args.smooth if bias == "yaad" else [0.0],
                                               args.floor if bias == "lp" else [0.0]):
            r = run(args.seq_len, bias, lr, args.alpha, ln_eps, smooth, floor, target == "initial")
            rows.append(dict(bias=bias, lr=lr, ln_eps=ln_eps, smooth=smooth, floor=floor, retain_to=target, **r))
            print(f"{bias:<6}{lr:>8.3g}{ln_eps:>8.0e}{smooth:>8.0e}{floor:>8.0e} {target:<10}{r['max_grad_k']:>12.3g}"
                  f"{r['memory_ratio']:>17.3g}{r['self_recall_error']:>12.3f}", flush=True)
    print(json.dumps({"bench": "inner_stability", "T": args.seq_len, "alpha": args.alpha, "rows": rows}))


if __name__ == "__main__":
    main()
