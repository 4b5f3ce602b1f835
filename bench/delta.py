"""CPU benchmark of the exact chunked delta rule (docs/math.md Eqs. 5.13-5.19): Gated DeltaNet and DeltaNet
through miras_ext.memory_forward, forward and forward+backward, for three ways of computing them:

    exact-64   the default: the exact recurrence, chunk 64 (one triangular solve per chunk)
    approx-64  minibatch=True, chunk 64: the paper's anchored approximation (Eq. 5.1), a different model
    token-1    chunk 1: the exact recurrence as runs of one token (what chunk_size=1 computed before)

    OMP_NUM_THREADS=1 .venv/bin/python bench/delta.py                # B = 4, T = 1024 and 4096, H = 4, D = 64
    OMP_NUM_THREADS=1 .venv/bin/python bench/delta.py --quick        # smoke run

Timing: every (case, mode) of one T is built once; after `--warmup` calls each, `--reps` rounds call the
cases in turn (alternating, so drift hits every case alike) and the median is reported. "fwd" runs under
torch.no_grad(); "fwd+bwd" runs the forward with autograd and backward() of a fixed random cotangent, with
gradients to q, k, v, beta, alpha and a learnable initial state. float32, l2-normalised q and k, one thread.
The token-1 loop is timed with fewer repetitions at T = 4096 (`--token-reps`). The last line printed is
`JSON {...}` with every number.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import miras_ext
from miras_ext import MemorySpec

B, H, D = 4, 4, 64
MODELS = {
    "gated-deltanet": dict(memory="matrix", bias="l2", retention="l2", grad_at_retained=True),
    "deltanet": dict(memory="matrix", bias="l2", retention="none"),
}
CASES = {  # name: (minibatch, chunk_size)
    "exact-64": (False, 64),
    "approx-64": (True, 64),
    "token-1": (False, 1),
}
MODES = ("fwd", "fwd+bwd")


def inputs(model: str, t_len: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = {
        "q": torch.nn.functional.normalize(randn(B, t_len, H, D), dim=-1),
        "k": torch.nn.functional.normalize(randn(B, t_len, H, D), dim=-1),
        "v": randn(B, t_len, H, D),
        "lr": torch.rand(B, t_len, H, generator=gen) * 0.5 + 0.25,
        "alpha": torch.rand(B, t_len, H, generator=gen) * 0.1 + 0.9 if MODELS[model]["retention"] == "l2" else None,
        "init": randn(H, D, D) / D ** 0.5,
        "cot": randn(B, t_len, H, D),
    }
    return x


def make_call(model: str, case: str, mode: str, x: dict):
    minibatch, chunk = CASES[case]
    spec = MemorySpec(**MODELS[model], minibatch=minibatch)
    grad = mode == "fwd+bwd"
    leaves = {n: x[n].clone().requires_grad_(grad) for n in ("q", "k", "v", "lr", "init")}
    alpha = None if x["alpha"] is None else x["alpha"].clone().requires_grad_(grad)

    def call():
        with torch.set_grad_enabled(grad):
            o, _ = miras_ext.memory_forward(leaves["q"], leaves["k"], leaves["v"], spec, leaves["lr"], alpha,
                                            initial_state=(leaves["init"],), chunk_size=chunk)
            if grad:
                (o * x["cot"]).sum().backward()
        return o

    return call


def time_cases(calls: dict, warmup: int, reps: dict) -> dict:
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples = {key: [] for key in calls}
    for r in range(max(reps.values())):
        for key, fn in calls.items():
            if r < reps[key]:
                t0 = time.perf_counter()
                fn()
                samples[key].append(time.perf_counter() - t0)
    return {key: statistics.median(s) for key, s in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--token-reps", type=int, default=2, help="repetitions of token-1 at T > 1024")
    ap.add_argument("--quick", action="store_true", help="T = 256, 2 repetitions")
    args = ap.parse_args()
    for name in ("reps", "token_reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup: expected an integer >= 0, got {args.warmup}")
    if args.quick:
        args.lengths, args.reps, args.warmup = [256], 2, 1
    torch.manual_seed(0)

    results = []
    for t_len in args.lengths:
        for model in args.models:
            x = inputs(model, t_len)
            calls, reps = {}, {}
            for case in CASES:
                for mode in MODES:
                    calls[(case, mode)] = make_call(model, case, mode, x)
                    reps[(case, mode)] = args.token_reps if case == "token-1" and t_len > 1024 else args.reps
            times = time_cases(calls, args.warmup, reps)
            for mode in MODES:
                row = {"model": model, "T": t_len, "mode": mode}
                row.update({case: times[(case, mode)] for case in CASES})
                row["exact/approx"] = row["exact-64"] / row["approx-64"]
                row["token/exact"] = row["token-1"] / row["exact-64"]
                results.append(row)

    head = f"{'model':15s} {'T':>5s} {'mode':8s} " + " ".join(f"{c + ' ms':>13s}" for c in CASES) + \
        f" {'exact/approx':>12s} {'token/exact':>11s}"
    print(f"B={B} H={H} D={D} float32, threads={torch.get_num_threads()}, torch {torch.__version__}")
    print(head)
    for r in results:
        print(f"{r['model']:15s} {r['T']:5d} {r['mode']:8s} " +
              " ".join(f"{1e3 * r[c]:13.1f}" for c in CASES) + f" {r['exact/approx']:12.2f} {r['token/exact']:11.1f}")
    print("JSON " + json.dumps({"bench": "delta", "B": B, "H": H, "D": D, "threads": torch.get_num_threads(),
                                "torch": torch.__version__, "machine": platform.machine(), "results": results}))


if __name__ == "__main__":
    main()
