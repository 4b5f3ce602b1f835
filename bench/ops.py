"""CPU benchmark of the MLP memory: miras_ext.memory_forward (the compiled op), miras_ext.reference.chunked
and titans-pytorch's NeuralMemory, forward and forward+backward. See docs/performance.md.

    .venv/bin/python bench/ops.py                    # T = 512, 2048, 8192
    .venv/bin/python bench/ops.py --quick            # smoke run, small T, few repetitions
    .venv/bin/python bench/ops.py --install-titans   # pip-install bench/requirements.txt first (keeps torch)
    .venv/bin/python bench/ops.py --specs            # every preset's spec, op vs reference (bench/specs.py)

Timing: every (case, mode) of one T is built once; after `--warmup` calls each, `--reps` rounds call the
cases in turn (alternating, so drift hits every case alike) and the median is reported. "fwd" runs under
torch.no_grad(); "fwd+bwd" runs the forward with autograd and backward() of a fixed random cotangent, gradients
to every input (q, k, v, lr, alpha, the learnable initial state; titans: its input and parameters).

Peak memory: one fresh subprocess per (case, mode, T). It builds the inputs,
resets the kernel's resident-set high-water mark (`echo 5 > /proc/self/clear_refs`), records VmRSS, runs
the call (after a warm-up call at T = 64 and with MALLOC_MMAP_THRESHOLD_ fixed) and reports VmHWM - VmRSS: the extra resident memory of one call above its inputs and
the loaded libraries. Without /proc (not Linux) it falls back to a ru_maxrss delta, a lower bound.

The last line printed is `JSON {...}` with every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
B, H, D, CHUNK = 2, 4, 64, 64
EXPANSION = 4
CASES = ("op", "reference", "titans")
MODES = ("fwd", "fwd+bwd")


# ---------------------------------------------------------------------------------------------- FLOPs

def flops(t_len: int, b: int = B, h: int = H, d: int = D, n: int = CHUNK, e: int = EXPANSION) -> dict:
    """Floating-point operations the chunk algorithm (docs/math.md, Section 5) necessarily performs for the
    2-layer MLP memory with per-channel gates, Dk = Dv = d, hidden e*d. A multiply-add is 2 FLOPs. Counted:
    the matrix products and the masked coefficient products; not counted: elementwise work (GELU and its
    derivative, LayerNorm, the l2 residual, the decay/coefficient matrices, cumprods). See
    docs/performance.md for the derivation."""
    hd = e * d
    full, rest = divmod(t_len, n)

    def chunk(m: int) -> int:
        anchor = 2 * m * d * hd * 2          # u1 = W1 k, u2 = W2 s(u1)          (Eq. 5.3)
        backprop = 2 * m * d * hd            # delta1 = (W2^T delta2) . s'(u1)   (Eq. 5.4)
        read_w0 = 2 * m * d * hd * 2         # Z_{l,0} a_t, both layers          (Eq. 5.10)
        # n x n part of Eq. 5.10 with per-channel gates (Eq. 3.4). Layer 1 (gate on its d input columns):
        # sum_i C[t,j,i] a_{j,i} a_{t,i} (3 FLOPs per t, j, i), then that n x n matrix times delta_1 [n, hd].
        read_l1 = 3 * m * m * d + 2 * m * m * hd
        # Layer 2 (gate on its d output rows): a_t . a_j over hd, then sum_j C[t,j,o] (.) [t,j] delta_{2,j,o}.
        read_l2 = 2 * m * m * hd + 3 * m * m * d
        state = 2 * m * d * hd * 2           # Z_n = A_n Z_0 - sum_i C[n,i] delta_i a_i^T, both layers (Eq. 5.8)
        return anchor + backprop + read_w0 + read_l1 + read_l2 + state

    fwd = b * h * (full * chunk(n) + (chunk(rest) if rest else 0))
    return {"fwd": fwd, "fwd+bwd": 3 * fwd}


# --------------------------------------------------------------------------------------------- cases

def spec():
    from miras_ext import MemorySpec
    return MemorySpec(memory="mlp", layers=2, expansion=EXPANSION, bias="l2", retention="l2")


def titans_available() -> str | None:
    """None when titans_pytorch imports, else the reason."""
    try:
        import titans_pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"titans-pytorch not installed ({type(exc).__name__}: {exc}); run bench/ops.py --install-titans"
    return None


def op_available() -> str | None:
    import miras_ext
    if not hasattr(miras_ext, "memory_forward"):
        return "not built yet (miras_ext has no memory_forward)"
    return None


class Case:
    """One benchmarked call at one sequence length: `run(mode)` performs it once."""

    def __init__(self, name: str, t_len: int, seed: int = 0):
        self.name, self.t_len = name, t_len
        gen = torch.Generator().manual_seed(seed)
        rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
        if name == "titans":
            from titans_pytorch import NeuralMemory
            torch.manual_seed(seed)
            self.module = NeuralMemory(**TITANS_KWARGS)
            self.x = rnd(B, t_len, H * D).requires_grad_()
            self.cot = rnd(B, t_len, H * D)
            return
        import miras_ext
        self.fn = miras_ext.memory_forward if name == "op" else miras_ext.reference.chunked
        self.spec = spec()
        q, k, v = (F.normalize(rnd(B, t_len, H, D), dim=-1) for _ in range(3))
        lr = 0.2 * torch.sigmoid(rnd(B, t_len, H, D))               # per-channel learning rate in (0, 0.2)
        alpha = 1.0 - 0.1 * torch.sigmoid(rnd(B, t_len, H, D))      # per-channel retention in (0.9, 1)
        init = [rnd(H, *s) / math.sqrt(s[-1]) for s in self.spec.weight_shapes(D, D)]
        self.leaves = [t.requires_grad_() for t in (q, k, v, lr, alpha, *init)]
        self.cot = rnd(B, t_len, H, D)

    def _call(self):
        if self.name == "titans":
            return self.module(self.x)[0]
        q, k, v, lr, alpha, *init = self.leaves
        return self.fn(q, k, v, self.spec, lr, alpha, initial_state=tuple(init), output_final_state=False,
                       chunk_size=CHUNK)[0]

    def run(self, mode: str) -> None:
        if mode == "fwd":
            with torch.no_grad():
                self._call()
            return
        if self.name == "titans":
            self.module.zero_grad(set_to_none=True)
            self.x.grad = None
        else:
            for t in self.leaves:
                t.grad = None
        self._call().backward(self.cot)


# The closest NeuralMemory comes to MemorySpec(mlp, layers=2, expansion=4, l2 bias, l2 retention, gd) with
# 4 heads of 64 and chunk 64 (titans_pytorch/neural_memory.py, 0.5.x). What still differs is printed by
# TITANS_DIFFERENCES and written in docs/performance.md.
TITANS_KWARGS = dict(
    dim=H * D,                 # model width 256 = heads * dim_head; its own projections map 256 -> 4 x 64
    dim_head=D,
    heads=H,
    chunk_size=CHUNK,          # store and retrieve chunk 64: gradients of a chunk taken at its anchor
    momentum=False,            # plain gradient descent (no momentum scan)
    per_head_learned_parameters=True,   # learnable initial memory weights [H, ...], like our initial_state
    mem_model_norm_add_residual=True,   # x + LN(f(x)), like residual_norm=True
    default_model_kwargs=dict(depth=2, expansion_factor=4.0),   # MemoryMLP 64 -> 256 -> 64, GELU
)
TITANS_DIFFERENCES = [
    "includes its own layers: pre-RMSNorm (store and retrieve), q/k/v projections Linear(256, 256), "
    "learning-rate projection, decay projection, per-head retrieve gate and output projection Linear(256, 256); "
    "input is x [B, T, 256] instead of q, k, v",
    "learning rate per token and head (sigmoid, max 1), not per channel; decay one scalar per chunk and head "
    "(from the chunk's mean input), not per token and channel",
    "loss mean((M(k) - v)^2) over the 64 features (= 2/64 x our 1/2||r||^2, a constant absorbed by lr)",
    "the LayerNorm of the residual read-out has a learnable gain that is a memory parameter (inner-loop trained); "
    "ours has no affine",
    "reads at chunk granularity: a token reads the weights after the last completed chunk (no intra-chunk dual-form "
    "read, no n x n products), so it does less work per token than Eq. 5.10",
    "per-chunk gradients via torch.func vmap(grad) and one weight set per chunk materialised for the read",
]


# ------------------------------------------------------------------------------------------- measure

def matmul_gflops(size: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_child(name: str, mode: str, t_len: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    Case(name, CHUNK).run(mode)  # warm-up at one chunk: libraries and one-time caches, not this call's buffers
    case = Case(name, t_len)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        case.run(mode)
        peak = _status_kib("VmHWM")
        method = "VmHWM - VmRSS after clear_refs"
    except OSError:
        import resource
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        case.run(mode)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss delta (lower bound)"
    return {"peak_mib": (peak - base) / 1024, "method": method}


def measure_memory(name: str, mode: str, t_len: int, threads: int) -> float | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory", name, mode, str(t_len),
           "--threads", str(threads)]
    # A fixed mmap threshold: large buffers are mmapped and unmapped on free, so freed memory is not reused
    # from glibc's heap out of sight of the high-water mark.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("MEM "):
            return json.loads(line[4:])["peak_mib"]
    print(f"  memory {name} {mode} T={t_len} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return None


def bench_len(t_len: int, names: list[str], reps: int, warmup: int, memory: bool, threads: int) -> dict:
    cases, errors = {}, {}
    for name in names:
        try:
            cases[name] = Case(name, t_len)
        except Exception as exc:  # noqa: BLE001
            errors[name] = f"{type(exc).__name__}: {exc}"
    out = {}
    for mode in MODES:
        live = {}
        for name, case in cases.items():
            try:
                for _ in range(warmup):
                    case.run(mode)
                live[name] = case
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        times = {name: [] for name in live}
        for _ in range(reps):
            for name, case in live.items():
                t0 = time.perf_counter()
                case.run(mode)
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            out[(name, mode)] = {"median_s": statistics.median(ts), "min_s": min(ts), "runs": len(ts)}
        print(f"  T={t_len} {mode}: " + ", ".join(f"{n} {statistics.median(ts):.4f}s" for n, ts in times.items()),
              file=sys.stderr, flush=True)
    del cases
    if memory:
        for (name, mode), row in out.items():
            row["peak_mib"] = measure_memory(name, mode, t_len, threads)
    return {"rows": out, "errors": errors}


def install_titans() -> None:
    """pip-install bench/requirements.txt with the installed torch pinned, so it is never replaced."""
    pin = HERE / ".torch-pin.txt"
    pin.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    try:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-r", str(HERE / "requirements.txt"),
                               "-c", str(pin)])
    finally:
        pin.unlink()


# -------------------------------------------------------------------------------------------- report

def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default 512 2048 8192")
    ap.add_argument("--quick", action="store_true", help="smoke run: T = 128 256, 2 repetitions, no warm-up")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per case first (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="default 2 (--specs: 1)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--install-titans", action="store_true", help="pip install -r bench/requirements.txt first")
    ap.add_argument("--specs", action="store_true", help="every preset's spec instead (bench/specs.py)")
    ap.add_argument("--only", default=None, help="--specs: comma-separated presets (default all)")
    ap.add_argument("--_memory", nargs=3, metavar=("CASE", "MODE", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.specs:
        import specs
        args.threads = args.threads or 1
        if args.cases == ",".join(CASES):
            args.cases = ",".join(specs.CASES)
        print("JSON " + json.dumps(specs.run(args), default=str))
        return
    args.threads = args.threads or 2

    if args._memory:
        name, mode, t_len = args._memory
        print("MEM " + json.dumps(memory_child(name, mode, int(t_len), args.threads)))
        return
    if args.install_titans:
        install_titans()

    torch.set_num_threads(args.threads)
    seq_lens = args.seq_lens or ([128, 256] if args.quick else [512, 2048, 8192])
    reps = args.reps or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]

    import miras_ext
    skipped = {}
    if "op" in wanted and (why := op_available()):
        skipped["op"] = why
    if "titans" in wanted and (why := titans_available()):
        skipped["titans"] = why
    names = [c for c in CASES if c in wanted and c not in skipped]

    load = [os.getloadavg()[0]]
    rate = [matmul_gflops()]
    results, errors = {}, {}
    for t_len in seq_lens:
        r = bench_len(t_len, names, reps, warmup, not args.no_memory, args.threads)
        results[t_len] = r["rows"]
        for name, err in r["errors"].items():
            errors.setdefault(name, f"T={t_len}: {err}")
    rate.append(matmul_gflops())
    load.append(os.getloadavg()[0])
    gflops_machine = max(rate)  # the best of the runs before and after the cases

    # rows
    rows = []
    for t_len in seq_lens:
        fl = flops(t_len)
        for name in CASES:
            if name not in wanted:
                continue
            for mode in MODES:
                row = {"case": name, "T": t_len, "mode": mode}
                got = results[t_len].get((name, mode))
                if got is None:
                    row["note"] = skipped.get(name) or errors.get(name, "failed")
                else:
                    row.update(got)
                    if name != "titans":
                        row["counted_gflop"] = fl[mode] / 1e9
                        row["gflops"] = fl[mode] / got["median_s"] / 1e9
                        row["efficiency"] = row["gflops"] / gflops_machine
                rows.append(row)

    def get(name, t_len, mode, key="median_s"):
        row = results.get(t_len, {}).get((name, mode))
        return None if row is None else row.get(key)

    ratios = {"speedup_op_over_reference": {}, "speedup_op_over_titans": {}, "speedup_reference_over_titans": {},
              "time_ratio_8192_over_2048": {}, "peak_ratio_8192_over_2048": {}, "peak_op_over_reference": {},
              "peak_op_over_titans": {}}
    for t_len in seq_lens:
        for mode in MODES:
            key = f"T={t_len} {mode}"
            ratios["speedup_op_over_reference"][key] = ratio(get("reference", t_len, mode), get("op", t_len, mode))
            ratios["speedup_op_over_titans"][key] = ratio(get("titans", t_len, mode), get("op", t_len, mode))
            ratios["speedup_reference_over_titans"][key] = ratio(get("titans", t_len, mode),
                                                                 get("reference", t_len, mode))
            ratios["peak_op_over_reference"][key] = ratio(get("op", t_len, mode, "peak_mib"),
                                                          get("reference", t_len, mode, "peak_mib"))
            ratios["peak_op_over_titans"][key] = ratio(get("op", t_len, mode, "peak_mib"),
                                                       get("titans", t_len, mode, "peak_mib"))
    if 2048 in seq_lens and 8192 in seq_lens:
        for name in names:
            for mode in MODES:
                ratios["time_ratio_8192_over_2048"][f"{name} {mode}"] = ratio(get(name, 8192, mode),
                                                                              get(name, 2048, mode))
                ratios["peak_ratio_8192_over_2048"][f"{name} {mode}"] = ratio(get(name, 8192, mode, "peak_mib"),
                                                                              get(name, 2048, mode, "peak_mib"))

    # print
    def fmt(x, f):
        width = int(f.split(".")[0]) if f[0].isdigit() else 0
        return format("-" if x is None else format(x, f.lstrip("0123456789")), f">{width}")
    print(f"miras_ext bench: B={B} H={H} Dk=Dv={D} chunk={CHUNK} float32, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"spec: {spec()}, per-channel lr and alpha [B,T,H,Dv], learnable initial state [H, *shape]")
    print(f"machine float32 matmul 2048^3: {gflops_machine:.1f} GFLOP/s (runs: "
          + ", ".join(f"{r:.1f}" for r in rate) + ")")
    print(f"1-minute load average before/after: {load[0]:.2f}/{load[1]:.2f} on {os.cpu_count()} CPUs "
          "(above the thread count means other processes shared the CPUs)")
    print(f"timing: median of {reps} alternating runs after {warmup} warm-up; peak = extra resident MiB of one call "
          "(fresh subprocess)")
    print()
    head = f"{'case':<10} {'T':>6} {'mode':<8} {'median s':>10} {'min s':>10} {'peak MiB':>9} {'GFLOP':>8} " \
           f"{'GFLOP/s':>8} {'eff':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "note" in r:
            print(f"{r['case']:<10} {r['T']:>6} {r['mode']:<8} {r['note']}")
            continue
        print(f"{r['case']:<10} {r['T']:>6} {r['mode']:<8} {r['median_s']:>10.4f} {r['min_s']:>10.4f} "
              f"{fmt(r.get('peak_mib'), '9.1f')} {fmt(r.get('counted_gflop'), '8.2f')} "
              f"{fmt(r.get('gflops'), '8.2f')} {fmt(r.get('efficiency'), '7.2%') if r['case'] != 'titans' else '    n/a'}")
    print()
    print("ratios (None: a case is missing):")
    for kind, vals in ratios.items():
        if vals:
            print(f"  {kind}: " + ", ".join(f"{k} {fmt(v, '.3g')}" for k, v in vals.items()))
    if "titans" in names:
        print("titans-pytorch NeuralMemory(" + ", ".join(f"{k}={v!r}" for k, v in TITANS_KWARGS.items()) + ")")
        print("  differs from our spec:")
        for d in TITANS_DIFFERENCES:
            print("   - " + d)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print("efficiency = counted FLOPs (docs/performance.md; reference/op only) / median time / machine matmul rate")

    record = {
        "config": {"B": B, "H": H, "Dk": D, "Dv": D, "chunk": CHUNK, "dtype": "float32", "threads": args.threads,
                   "seq_lens": seq_lens, "reps": reps, "warmup": warmup, "spec": dataclasses.asdict(spec()),
                   "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count()},
        "matmul_gflops": gflops_machine, "loadavg_1min_before_after": load, "matmul_gflops_runs": rate,
        "flops": {str(t): flops(t) for t in seq_lens},
        "rows": rows, "ratios": ratios, "skipped": skipped,
        "titans": {"kwargs": {k: v for k, v in TITANS_KWARGS.items()}, "differences": TITANS_DIFFERENCES,
                   "version": _version("titans-pytorch")} if "titans" in names else None,
        "miras_ext_build": _safe(lambda: miras_ext.build_info()),
    }
    print("JSON " + json.dumps(record, default=str))


def _version(dist: str):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def _safe(f):
    try:
        return f()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    main()
