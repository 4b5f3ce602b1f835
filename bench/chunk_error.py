"""How far the chunkwise algorithm is from the exact recurrence (docs/math.md, Section 8, point 8).

With chunk size b every token of a chunk takes its gradient at the chunk's anchor (Eq. 5.1); b = 1 is the
exact recurrence (tested to rounding). This measures ||o_b - o_1|| / ||o_1|| for the Miras models and two
baselines on random inputs, for several chunk sizes and learning-rate scales, and prints a table and one
JSON line.

    .venv/bin/python bench/chunk_error.py
"""

from __future__ import annotations

import argparse
import json

import torch

import miras_ext
from miras_ext import MemorySpec

MODELS = {
    "moneta": MemorySpec(memory="mlp", bias="lp", p=3.0, retention="lq", norm_order=4.0),
    "yaad": MemorySpec(memory="mlp", bias="yaad", retention="l2"),
    "memora": MemorySpec(memory="mlp", bias="l2", retention="kl", lag_token=True),
    "titans": MemorySpec(memory="mlp", bias="l2", retention="l2", algorithm="momentum", residual_norm=False,
                         activation="silu"),
    # The delta rule is exact at every chunk size (Eqs. 5.13-5.19); minibatch=True measures its approximation.
    "gated-delta": MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True, minibatch=True),
}


def inputs(spec: MemorySpec, B: int, T: int, H: int, D: int, lr_max: float, gen: torch.Generator) -> dict:
    unit = lambda: torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen, dtype=torch.float64), dim=-1)  # noqa: E731
    gate = lambda lo, hi: lo + (hi - lo) * torch.rand(B, T, H, D, generator=gen, dtype=torch.float64)  # noqa: E731
    x = {"q": unit(), "k": unit(), "v": torch.randn(B, T, H, D, generator=gen, dtype=torch.float64),
         "lr": gate(0.0, lr_max), "alpha": gate(0.9, 1.0),
         "momentum": gate(0.0, 0.9) if spec.algorithm == "momentum" else None,
         "delta": (0.5 + torch.rand(B, T, H, generator=gen, dtype=torch.float64)) * D ** 0.5
         if spec.uses_threshold else None}
    x["initial_state"] = tuple(torch.randn(H, *s, generator=gen, dtype=torch.float64) / s[-1] ** 0.5
                               for s in spec.weight_shapes(D, D)) if spec.memory == "mlp" else None
    return x


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--lr-max", type=float, nargs="+", default=[0.01, 0.1, 0.5])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    B, H, D = 2, 2, 16
    rows = []
    for name, spec in MODELS.items():
        for lr_max in args.lr_max:
            x = inputs(spec, B, args.seq_len, H, D, lr_max, torch.Generator().manual_seed(args.seed))
            call = lambda b: miras_ext.memory_forward(x["q"], x["k"], x["v"], spec, x["lr"], x["alpha"],  # noqa: E731
                                                      x["momentum"], x["delta"], chunk_size=b,
                                                      initial_state=x["initial_state"])[0]
            exact = call(1)
            errors = {b: ((call(b) - exact).norm() / exact.norm()).item() for b in args.chunk_sizes}
            rows.append({"model": name, "lr_max": lr_max, "errors": errors})

    print(f"rel. error ||o_b - o_exact|| / ||o_exact||, T = {args.seq_len}, B = {B}, H = {H}, D = {D}, "
          f"per-channel lr ~ U(0, lr_max), alpha ~ U(0.9, 1), float64")
    print(f"{'model':<12} {'lr_max':>7} " + " ".join(f"{'b=' + str(b):>10}" for b in args.chunk_sizes))
    for r in rows:
        print(f"{r['model']:<12} {r['lr_max']:>7g} " + " ".join(f"{r['errors'][b]:>10.2e}" for b in args.chunk_sizes))
    print("JSON " + json.dumps({"seq_len": args.seq_len, "B": B, "H": H, "D": D, "rows": rows}))


if __name__ == "__main__":
    main()
