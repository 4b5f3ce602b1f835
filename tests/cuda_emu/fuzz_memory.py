"""The emulated memory kernels against the CPU op beyond the fixed test cases (not a test; docs/cuda.md).

    .venv/bin/python -m tests.cuda_emu.fuzz_memory cases              # worst error of every case of the tests
    .venv/bin/python -m tests.cuda_emu.fuzz_memory random SEED COUNT [DTYPE]

`random` draws COUNT specs, sizes, call layouts and thread orders. In float64 a case passes within
max(1e-9, 1000 x the CPU op's own change when k moves by 1e-15), so that chaotic specs do not count as
failures; in lower precisions within the tests' tolerances (test_memory_emulated.tolerances).
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import torch

from miras_ext import MemorySpec

from . import emu_build
from . import test_memory_emulated as t
from .conftest import DRIVERS


def run_case(bins, case: t.Case, schedule: str = "ordered") -> tuple[dict, dict, dict]:
    x = t.make_inputs(case)
    ref = t.cpu_op(case, x)
    with tempfile.TemporaryDirectory() as d:
        errs = t.errors(t.run_driver(bins, case, x, schedule, Path(d)), ref)
    return x, ref, errs


def fixed_cases(bins) -> None:
    worst64 = 0.0
    for case in t.CASES:
        _, _, errs = run_case(bins, case)
        name = max(errs, key=errs.get)
        if case.dtype == "float64":
            worst64 = max(worst64, errs[name])
        else:
            print(f"{case.dtype:9} {case.id:70} {errs[name]:.1e} ({name})")
    print(f"float64   worst of {sum(c.dtype == 'float64' for c in t.CASES)} cases: {worst64:.1e}")


def random_case(rng: random.Random, dtype: str) -> t.Case | None:
    mem = rng.choice(["matrix", "mlp"])
    bias = rng.choice(["dot", "l2", "lp", "l1", "huber", "huber_norm", "yaad", "value_shift"])
    retention = rng.choice(["none", "l2", "lq", "kl", "elastic_net", "sigmoid"])
    kw = dict(memory=mem, bias=bias, retention=retention, algorithm=rng.choice(["gd", "momentum"]),
              grad_at_retained=mem == "matrix" and retention == "l2" and rng.random() < 0.3,
              lag_token=rng.random() < 0.3)
    if bias == "lp":
        kw["p"] = rng.choice([1.5, 3.0])
    if mem == "mlp":
        kw.update(layers=rng.choice([2, 2, 3]), expansion=rng.choice([1, 2, 3]),
                  activation=rng.choice(["gelu", "silu"]), residual_norm=rng.random() < 0.5)
    try:
        spec = MemorySpec(**kw)
    except ValueError:
        return None
    dk = rng.randint(1, 12) if dtype == "float64" else rng.choice([8, 16, 24, 32])
    dv = dk if mem == "mlp" and spec.residual_norm or dtype != "float64" else rng.randint(1, 12)
    per_channel = (rng.random() < 0.4 and not spec.grad_at_retained
                   and not (mem == "mlp" and (dk != dv or spec.layers > 2)))
    chunk = rng.randint(1, 9) if dtype == "float64" else rng.choice([8, 16, 32])
    T = rng.randint(1, 23) if dtype == "float64" else rng.randint(chunk, 2 * chunk + 5)
    if rng.random() < 0.5:
        B = rng.randint(1, 3)
        t.LAYOUTS["random"] = t.Layout(B, T, (rng.randint(0, 9),) * B)
    else:
        N = rng.randint(1, 4)
        cuts = sorted(rng.randint(0, T) for _ in range(N - 1))
        t.LAYOUTS["random"] = t.Layout(1, T, tuple(rng.randint(0, 9) for _ in range(N)), (0, *cuts, T))
    return t.Case(spec, layout="random", dk=dk, dv=dv, per_channel=per_channel, chunk=chunk, dtype=dtype,
                  delta_per_channel=bias == "huber" and rng.random() < 0.5, seed=rng.randint(0, 10**6))


def random_cases(bins, seed: int, count: int, dtype: str) -> None:
    rng = random.Random(seed)
    failures = runs = 0
    for _ in range(count):
        case = random_case(rng, dtype)
        if case is None:
            continue
        schedule = rng.choice(["ordered", "reverse", "shuffled:3"])
        try:
            x, ref, errs = run_case(bins, case, schedule)
        except ValueError as e:  # a combination the op refuses
            print("skip:", e)
            continue
        if dtype == "float64":
            moved = dict(x, k=x["k"] * (1 + 1e-15))
            own = t.errors(t.cpu_op(case, moved), ref)
            tol = {k: max(1e-9, 1000 * own.get(k, 0.0)) for k in errs}
        else:
            tol = t.tolerances(case, x, ref)
        bad = {k: f"{v:.1e} > {tol[k]:.1e}" for k, v in errs.items() if not v <= tol[k]}
        runs += 1
        failures += bool(bad)
        print("FAIL" if bad else "ok  ", case.id, t.LAYOUTS["random"], schedule, f"max {max(errs.values()):.1e}",
              bad or "")
    print(f"{runs} cases, {failures} failures")


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    bins = emu_build.build_all(DRIVERS)
    if argv[:1] == ["cases"]:
        fixed_cases(bins)
    elif argv[:1] == ["random"] and len(argv) in (3, 4):
        random_cases(bins, int(argv[1]), int(argv[2]), argv[3] if len(argv) == 4 else "float64")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
