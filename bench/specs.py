"""Every preset's spec on the CPU: the compiled op (miras_ext.memory_forward) against miras_ext.reference.chunked,
forward and forward+backward, tokens/s. Run through bench/ops.py:

    OMP_NUM_THREADS=1 .venv/bin/python bench/ops.py --specs            # B=4, T=1024, H=4, D=64, chunk 64
    OMP_NUM_THREADS=1 .venv/bin/python bench/ops.py --specs --quick    # T=128, one repetition
    OMP_NUM_THREADS=1 .venv/bin/python bench/ops.py --specs --only moneta,yaad --cases op

Inputs: q, k l2-normalised, v normal, per-channel lr = 0.2 sigmoid(N) and alpha = 1 - 0.1 sigmoid(N)
[B, T, H, Dv] (Titans: momentum 0.9 per channel too, and lr scaled by 1 - 0.9; Yaad: delta = 1 per head, its
bias needs one per head), a learnable initial state [H, *shape] from N(0, 1/fan_in) for every spec, float32.
fwd runs under no_grad; fwd+bwd calls backward() of a fixed cotangent with gradients to q, k, v, the gates and
the initial state. A spec whose output is non-finite on these inputs stops the bench with a message instead of
being timed.
Timing: after a warm-up call, `reps` rounds call the cases in turn; the median is reported. tokens/s = B T /
median seconds. The last line printed is `JSON {...}`.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

B, T, H, D, CHUNK = 4, 1024, 4, 64, 64
CASES = ("op", "reference")
MODES = ("fwd", "fwd+bwd")


def presets() -> dict:
    from miras_ext import spec_presets as m
    return {"moneta": m.MONETA, "yaad": m.YAAD, "memora": m.MEMORA, "titans": m.TITANS,
            "gated-delta": m.GATED_DELTA, "delta": m.DELTA, "linear-attention": m.LINEAR_ATTENTION}


class SpecCase:
    def __init__(self, preset: str, case: str, t_len: int, seed: int = 0):
        import miras_ext
        self.spec = miras_ext.MemorySpec(**presets()[preset])
        self.fn = miras_ext.memory_forward if case == "op" else miras_ext.reference.chunked
        gen = torch.Generator().manual_seed(seed)
        rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
        q, k = (F.normalize(rnd(B, t_len, H, D), dim=-1) for _ in range(2))
        v = rnd(B, t_len, H, D)
        per_channel = (B, t_len, H, D)
        sp = self.spec
        momentum = 0.9 if sp.algorithm == "momentum" else None
        # Momentum sums a step over about 1 / (1 - m) tokens: lr is scaled by (1 - m) so that its steady-state
        # step is GD's. At lr 0.2 sigmoid with m = 0.9 Titans' float32 memory overflows (64% of outputs inf).
        lr_scale = 0.2 * (1.0 - momentum if momentum is not None else 1.0)
        self.gates = {"lr": lr_scale * torch.sigmoid(rnd(*per_channel)),
                      "alpha": 1.0 - 0.1 * torch.sigmoid(rnd(*per_channel)) if sp.has_retention_gate else None,
                      "momentum": torch.full(per_channel, momentum) if momentum is not None else None,
                      "delta": torch.ones(B, t_len, H) if sp.uses_threshold else None}
        init = [rnd(H, *s) / math.sqrt(s[-1]) for s in self.spec.weight_shapes(D, D)]
        self.inputs = [q, k, v]
        self.init = init
        gates = [g for g in self.gates.values() if g is not None]
        self.leaves = [t.requires_grad_() for t in (q, k, v, *init, *gates)]
        self.cot = rnd(B, t_len, H, D)

    def _call(self):
        q, k, v = self.inputs
        g = self.gates
        return self.fn(q, k, v, self.spec, g["lr"], g["alpha"], g["momentum"], g["delta"],
                       initial_state=tuple(self.init), chunk_size=CHUNK)[0]

    def check_finite(self, name: str) -> None:
        """Refuses to time a diverged memory: the op's non-finite containment (miras_ext.nonfinite) then re-runs
        sequences to find the first bad token, and the timing would measure that instead of the op."""
        with torch.no_grad():
            o = self._call()
        if not torch.isfinite(o).all():
            share = 1.0 - torch.isfinite(o).float().mean().item()
            raise SystemExit(f"bench --specs: {name}'s output is non-finite ({share:.0%} of entries) with these "
                             "inputs; choose gates under which its memory stays finite")

    def run(self, mode: str) -> None:
        if mode == "fwd":
            with torch.no_grad():
                self._call()
            return
        for t in self.leaves:
            t.grad = None
        self._call().backward(self.cot)


def run(args) -> dict:
    """Measures and prints the table; returns the JSON record."""
    torch.set_num_threads(args.threads)
    t_len = 128 if args.quick else (args.seq_lens[0] if args.seq_lens else T)
    reps = args.reps or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else 1
    names = [n.strip() for n in args.only.split(",")] if args.only else list(presets())
    cases = [c.strip() for c in args.cases.split(",") if c.strip() in CASES] or list(CASES)
    load = [os.getloadavg()[0]]
    times: dict = {}
    for name in names:
        for mode in MODES:
            built = {c: SpecCase(name, c, t_len) for c in cases}
            if mode == MODES[0]:
                for case in built.values():
                    case.check_finite(name)
            for _ in range(warmup):
                for case in built.values():
                    case.run(mode)
            ts = {c: [] for c in built}
            for _ in range(reps):
                for c, case in built.items():
                    t0 = time.perf_counter()
                    case.run(mode)
                    ts[c].append(time.perf_counter() - t0)
            for c in built:
                times[(name, c, mode)] = statistics.median(ts[c])
            print(f"  {name} {mode}: " + ", ".join(f"{c} {times[(name, c, mode)]:.3f}s" for c in built),
                  file=sys.stderr, flush=True)
    load.append(os.getloadavg()[0])

    tokens = B * t_len
    rows = []
    for name in names:
        row = {"spec": name}
        for mode in MODES:
            for c in cases:
                row[f"{c} {mode} tok/s"] = tokens / times[(name, c, mode)]
            if "op" in cases and "reference" in cases:
                row[f"op/ref {mode}"] = times[(name, "reference", mode)] / times[(name, "op", mode)]
        rows.append(row)
    print(f"miras_ext bench --specs: B={B} T={t_len} H={H} Dk=Dv={D} chunk={CHUNK} float32, {args.threads} "
          f"thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}; median of {reps} "
          f"after {warmup} warm-up; load {load[0]:.2f}/{load[1]:.2f} on {os.cpu_count()} CPUs")
    keys = [k for k in rows[0] if k != "spec"]
    width = max(len(k) for k in keys) + 2
    head = f"{'spec':<17}" + "".join(f"{k:>{width}}" for k in keys)
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['spec']:<17}" + "".join(f"{r[k]:>{width}.3g}" for k in keys))
    return {"config": {"B": B, "T": t_len, "H": H, "Dk": D, "Dv": D, "chunk": CHUNK, "dtype": "float32",
                       "threads": args.threads, "reps": reps, "warmup": warmup, "gates": "per channel",
                       "torch": torch.__version__, "cpus": os.cpu_count()},
            "loadavg_1min_before_after": load, "specs": {n: presets()[n] for n in names}, "rows": rows}
