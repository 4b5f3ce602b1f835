"""GPU benchmark of the miras_ext memory op (torch.ops.miras_ext.memory_chunk_fwd/bwd on CUDA), forward and
forward+backward, bfloat16, against:

- FLA's chunk_gated_delta_rule (flash-linear-attention, Triton) for the matrix memory with the l2 bias and the
  l2 retention (gated_delta_forward: the gated delta rule), same q, k, v, beta = lr, g = log(alpha), scale;
  ours as called by default ("miras") and, where MemorySpec has an explicit flag for the mini-batch
  approximation (MINIBATCH_FIELD), with it ("miras-minibatch"; without a flag those rows are skipped);
- torch's scaled_dot_product_attention on the flash backend (causal), same B, T, H, D;
- reference.chunked on the GPU (the pure-PyTorch chunkwise algorithm; short T only, it is slow and large);
- for the MLP memories of the Moneta, Yaad and Memora presets (per-channel gates, hidden 4 D, learnable
  initial weights, as in miras_ext.models).

    python3 bench/gpu_bench.py --dry-run                 # the plan (cases, shapes, counted FLOPs); no GPU needed
    python3 bench/gpu_bench.py --budget-s 120            # everything that fits in 120 s, by priority
    python3 bench/gpu_bench.py --max-priority 1 --budget-s 43 --deadline-s 87   # bench/gpu_check.sh's call
    python3 bench/gpu_bench.py --quick                   # small shapes, few repetitions
    python3 bench/gpu_bench.py --device cpu              # tiny shapes on the CPU op: a smoke test of this script
    python3 bench/gpu_bench.py --out-dir bench/results/x # also writes bench.md and bench.json there

Shapes: H = 16 heads of D = 64, chunk 64, a fixed number of tokens per batch (--tokens, default 32768), so
B = tokens / T: T = 2048 (B = 16), 4096 (B = 8: the gated-delta target shape), 8192 (B = 4), 32768 (B = 1).
reference.chunked runs at --ref-len (2048) with B = --ref-batch (1).

Timing: CUDA events around each call, after --warmup untimed calls; the number of timed calls adapts to the
call's duration (about --case-s seconds each, between 3 and --reps; 1 when one call takes longer); the table
gives the median and the minimum. "fwd" runs under torch.no_grad(); "fwd+bwd" runs the forward with autograd
and backward() of a fixed random cotangent, gradients to every input (q, k, v, the gates, the initial weights). Peak memory: torch.cuda.max_memory_allocated during the timed calls, above what was
allocated before them. The op's Python-side input checks (gate ranges, one device sync) are in its time.

Budget: cases run in priority order (1: gated delta vs FLA at T = 4096, B = 8, and the first preset vs SDPA
flash at the same shape; 2: MLP presets and SDPA at the longest T; 3: MLP presets vs reference.chunked; 4: the
rest of the T sweep), up to --max-priority. Once --budget-s seconds have passed, the remaining cases are skipped
and listed as such (a case already running finishes). FLA's first calls of a case (one forward, one
forward+backward: Triton compiles and autotunes there, tens of seconds the first time in a process) are timed
apart, reported, and not counted in the budget; --deadline-s bounds everything, those calls included.

Counted FLOPs (a multiply-add is 2; elementwise work is not counted, so rates are lower bounds):
- MLP memory, 2 layers, d = D, hidden h = 4d, per-channel gates, chunk n (docs/performance.md, bench/ops.py):
  F_fwd = B H sum over chunks of (14 n h d + 4 n^2 h + 6 n^2 d); F_fwd+bwd = 3 F_fwd. With nonlinear links
  (Moneta l_q, Memora KL) the materialised per-token weights are elementwise work, not counted.
- matrix memory (ours, chunk form of docs/math.md Section 5): F_fwd = B H sum over chunks of (6 n d^2 + 4 n^2 d)
  (anchor prediction, W_0 read, end-of-chunk state: 2 n d^2 each; q k^T and its product with the residual
  gradients: 2 n^2 d each); F_fwd+bwd = 3 F_fwd. FLA runs a different algorithm (WY form): time only.
- causal attention: F_fwd = 2 B H T^2 D (QK^T and PV over the causal half); F_fwd+bwd = 3.5 F_fwd.
TFLOP/s are given as a fraction of the bf16 matrix rate measured here (an 8192^3 torch.matmul) and of the
card's datasheet dense bf16 peak (H100 SXM / H200: 989.4 TFLOP/s).

The same function? In its mini-batch form our gated delta memory takes each chunk's gradients at the chunk's
start (docs/math.md Section 5); FLA computes the exact token-by-token recurrence, which that form equals only
at chunk_size 1. The "mapping" line compares ours with FLA on a small case at chunk_size 1, at the benchmarked
chunk as called by default, and with the mini-batch flag where there is one; it runs after the timed cases.

The last line printed is `JSON {...}` with every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
MODES = ("fwd", "fwd+bwd")
PRESETS = ("moneta", "yaad", "memora")
LR_MAX = {"moneta": 0.1, "yaad": 1e-3, "memora": 1e-3}  # miras_ext.models.presets
EXPANSION = 4
DATASHEET_BF16_TFLOPS = [("H200", 989.4), ("GH200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5),
                         ("H100", 989.4), ("H800", 989.4), ("A100", 312.0), ("L40S", 362.1)]


def _ops_flops():
    """bench/ops.py's MLP FLOP count (loaded by path: bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("miras_bench_ops", HERE / "ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.flops


def matrix_flops(t_len: int, b: int, h: int, d: int, n: int) -> dict:
    """Counted FLOPs of our chunked matrix memory (module docstring)."""
    full, rest = divmod(t_len, n)
    chunk = lambda m: 6 * m * d * d + 4 * m * m * d  # noqa: E731
    fwd = b * h * (full * chunk(n) + (chunk(rest) if rest else 0))
    return {"fwd": fwd, "fwd+bwd": 3 * fwd}


def attention_flops(t_len: int, b: int, h: int, d: int) -> dict:
    fwd = 2 * b * h * t_len * t_len * d
    return {"fwd": fwd, "fwd+bwd": 3.5 * fwd}


@dataclasses.dataclass
class Case:
    priority: int
    group: str     # "gated-delta", "mlp", "mlp-vs-reference", "attention"
    impl: str      # "miras", "miras-minibatch", "fla", "sdpa-flash", "reference"
    model: str     # "gated-delta", "moneta", "yaad", "memora", "attention"
    b: int
    t: int
    h: int
    d: int
    chunk: int

    @property
    def name(self) -> str:
        return f"{self.group}/{self.impl}/{self.model}/T={self.t}"

    def flops(self, mlp_flops) -> dict | None:
        if self.impl in ("miras", "reference") and self.model in PRESETS:
            return mlp_flops(self.t, b=self.b, h=self.h, d=self.d, n=self.chunk, e=EXPANSION)
        # The count is the mini-batch chunk form's: the explicit flag's rows, and the default's while no flag
        # exists (then the default is that form).
        if self.model == "gated-delta" and (self.impl == "miras-minibatch" or
                                            (self.impl == "miras" and minibatch_kwargs() is None)):
            return matrix_flops(self.t, self.b, self.h, self.d, self.chunk)
        if self.impl == "sdpa-flash":
            return attention_flops(self.t, self.b, self.h, self.d)
        return None


def make_plan(args) -> list[Case]:
    h, d, n = args.heads, args.head_dim, args.chunk
    batch = lambda t: max(1, args.tokens // t)  # noqa: E731
    longest = max(args.seq_lens)
    cases: list[Case] = []

    def add(priority, group, impl, model, t, b=None):
        c = Case(priority, group, impl, model, batch(t) if b is None else b, t, h, d, n)
        if c.name not in {x.name for x in cases} and group in args.groups:
            cases.append(c)

    # 1: the gated delta rule against FLA at the target shape (ours as called by default, and with the explicit
    # mini-batch flag where MemorySpec has one), and one MLP preset against SDPA flash at the same B and T.
    # FLA last: its first calls (Triton's compile and autotune) are the one cost nobody has measured here.
    for impl in ("miras", "miras-minibatch"):
        add(1, "gated-delta", impl, "gated-delta", args.gdn_len)
    add(1, "mlp", "miras", args.presets[0], args.gdn_len)
    add(1, "attention", "sdpa-flash", "attention", args.gdn_len)
    add(1, "gated-delta", "fla", "gated-delta", args.gdn_len)
    # 2: the MLP presets and attention at the longest T (forward TFLOP/s, vs SDPA at T >= 16K).
    for model in args.presets:
        add(2, "mlp", "miras", model, longest)
    add(2, "attention", "sdpa-flash", "attention", longest)
    # 3: the MLP presets against reference.chunked at a short T.
    for model in args.presets:
        for impl in ("miras", "reference"):
            add(3, "mlp-vs-reference", impl, model, args.ref_len, b=args.ref_batch)
    # 4: the rest of the sweep.
    for t in sorted(args.seq_lens):
        for impl in ("miras", "fla"):
            add(4, "gated-delta", impl, "gated-delta", t)
        for model in args.presets:
            add(4, "mlp", "miras", model, t)
        add(4, "attention", "sdpa-flash", "attention", t)
    return sorted((c for c in cases if c.priority <= args.max_priority), key=lambda c: c.priority)


# ------------------------------------------------------------------------------------------------ inputs

# The MemorySpec field that selects the delta rule's mini-batch approximation explicitly (issue 11 makes the
# exact chunkwise form the default and keeps the approximation behind this field); while MemorySpec has no
# such field the default is the mini-batch form and the "miras-minibatch" rows are skipped.
MINIBATCH_FIELD = "minibatch"


def minibatch_kwargs() -> dict | None:
    """The keyword that asks gated_delta_forward for the mini-batch form, or None if MemorySpec has none."""
    from miras_ext import MemorySpec
    return {MINIBATCH_FIELD: True} if MINIBATCH_FIELD in {f.name for f in dataclasses.fields(MemorySpec)} else None


def _fla():
    """FLA's chunk_gated_delta_rule, or the reason it is unavailable."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as exc:  # noqa: BLE001
        return None, (f"flash-linear-attention not importable ({type(exc).__name__}: {exc}); install its wheels: "
                      "bash bench/fetch_wheels.sh here, then pip install --no-index --no-deps bench/wheels/*.whl")
    return chunk_gated_delta_rule, None


class Runner:
    """One case's inputs, built once; run(mode) performs one call."""

    def __init__(self, case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0):
        import miras_ext
        from miras_ext import spec_presets

        self.case = case
        gen = torch.Generator(device=device).manual_seed(seed)
        b, t, h, d = case.b, case.t, case.h, case.d
        randn = lambda *s, dt=dtype: torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dt)  # noqa: E731
        rand = lambda *s: torch.rand(s, generator=gen, device=device, dtype=torch.float32)  # noqa: E731
        scale = d ** -0.5

        if case.impl == "sdpa-flash":
            q, k, v = (randn(b, h, t, d) for _ in range(3))   # SDPA's layout [B, H, T, D]
            self.leaves = [x.requires_grad_() for x in (q, k, v)]
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def call():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(*self.leaves, is_causal=True)
        else:
            q, k = (F.normalize(randn(b, t, h, d, dt=torch.float32), dim=-1).to(dtype) for _ in range(2))
            v = randn(b, t, h, d)
            if case.model == "gated-delta":
                beta = torch.sigmoid(randn(b, t, h, dt=torch.float32)).to(dtype)      # [B, T, H]
                alpha = 0.9 + 0.1 * rand(b, t, h)                                     # retention in (0.9, 1)
                if case.impl == "fla":
                    fla, why = _fla()
                    if fla is None:
                        raise RuntimeError(why)
                    g = torch.log(alpha)                                              # log decay, float32
                    self.leaves = [x.requires_grad_() for x in (q, k, v, g, beta)]

                    def call():
                        qq, kk, vv, gg, bb = self.leaves
                        return fla(qq, kk, vv, gg, bb, scale=scale, output_final_state=False)[0]
                else:
                    self.leaves = [x.requires_grad_() for x in (q, k, v, beta, alpha)]
                    flag = {}
                    if case.impl == "miras-minibatch":
                        flag = minibatch_kwargs()
                        if flag is None:
                            raise RuntimeError(f"MemorySpec has no field {MINIBATCH_FIELD!r}")

                    def call():
                        qq, kk, vv, bb, aa = self.leaves
                        return miras_ext.gated_delta_forward(qq, kk, vv, bb, aa, scale=scale,
                                                              chunk_size=case.chunk, **flag)[0]
            else:
                spec = miras_ext.MemorySpec(**getattr(spec_presets, case.model.upper()), expansion=EXPANSION)
                lr = LR_MAX[case.model] * torch.sigmoid(randn(b, t, h, d, dt=torch.float32))  # per channel
                alpha = torch.sigmoid(randn(b, t, h, d, dt=torch.float32) + 4.0)            # about 0.98
                delta = (0.5 + rand(b, t, h)) * math.sqrt(d) if spec.uses_threshold else None
                init = [randn(h, *s, dt=torch.float32) / math.sqrt(s[-1]) for s in spec.weight_shapes(d, d)]
                gates = [lr, alpha] + ([delta] if delta is not None else [])
                self.leaves = [x.requires_grad_() for x in (q, k, v, *gates, *init)]
                n_gates = len(gates)
                fn = miras_ext.memory_forward if case.impl == "miras" else miras_ext.reference.chunked

                def call():
                    qq, kk, vv, *rest = self.leaves
                    g, w = rest[:n_gates], rest[n_gates:]
                    dd = g[2] if n_gates == 3 else None
                    return fn(qq, kk, vv, spec, g[0], g[1], None, dd, initial_state=tuple(w), scale=scale,
                              chunk_size=case.chunk)[0]
        self.call = call
        with torch.no_grad():
            self.cot = torch.randn_like(call(), dtype=torch.float32).to(dtype)

    def run(self, mode: str) -> None:
        if mode == "fwd":
            with torch.no_grad():
                self.call()
            return
        for x in self.leaves:
            x.grad = None
        self.call().backward(self.cot)


# -------------------------------------------------------------------------------------------- measuring

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup: int, reps: int, case_s: float, deadline: float) -> dict:
    """Median / min seconds of fn() after up to `warmup` calls (at least one; no more once they took case_s);
    the number of timed calls is about case_s / (one call), between 3 and reps, or 1 when one call takes longer
    than case_s (a slow path must not eat the budget of the cases after it), fewer once the deadline has
    passed."""
    t0 = time.perf_counter()
    for i in range(max(1, warmup)):
        fn()
        _sync(device)
        if time.perf_counter() - t0 > case_s:
            break
    times = []

    def once():
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    times.append(once())
    want = max(1 if times[0] > case_s else 3, min(reps, int(case_s / max(times[0], 1e-6))))
    while len(times) < want and time.perf_counter() < deadline:
        times.append(once())
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20 if device.type == "cuda" else None
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": len(times), "peak_mib": peak}


def matmul_tflops(device, dtype, size: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    r = time_calls(lambda: a @ b, device, warmup=3, reps=10, case_s=1e9, deadline=float("inf"))
    return 2 * size ** 3 / r["median_s"] / 1e12


def datasheet_tflops(name: str) -> float | None:
    for key, value in DATASHEET_BF16_TFLOPS:
        if key in name:
            return value
    return None


def mapping_check(device, heads: int, head_dim: int, chunk: int) -> dict:
    """gated_delta_forward against FLA on one small bf16 case (T = 2 chunks; H and D as benchmarked, so FLA
    reuses the kernels it compiled): at chunk_size 1 (the exact recurrence), at the benchmarked chunk as called
    by default, and with the explicit mini-batch flag where there is one. Near bf16 rounding (below 3e-2): the
    same function."""
    import miras_ext
    fla, why = _fla()
    if fla is None:
        return {"skipped": why}
    gen = torch.Generator(device=device).manual_seed(1)
    b, t, h, d = 1, 2 * chunk, heads, head_dim
    q, k = (F.normalize(torch.randn(b, t, h, d, generator=gen, device=device), dim=-1).bfloat16() for _ in range(2))
    v = torch.randn(b, t, h, d, generator=gen, device=device).bfloat16()
    beta = torch.rand(b, t, h, generator=gen, device=device).bfloat16()
    alpha = 0.9 + 0.1 * torch.rand(b, t, h, generator=gen, device=device)
    calls = {"chunk_size=1": dict(chunk_size=1), f"chunk_size={chunk}": dict(chunk_size=chunk)}
    flag = minibatch_kwargs()
    if flag is not None:
        calls[f"chunk_size={chunk} " + ",".join(f"{n}={x}" for n, x in flag.items())] = dict(chunk_size=chunk, **flag)
    errors = {}
    with torch.no_grad():
        theirs = fla(q, k, v, torch.log(alpha), beta, scale=d ** -0.5)[0].float()
        for label, kw in calls.items():
            ours = miras_ext.gated_delta_forward(q, k, v, beta, alpha, scale=d ** -0.5, **kw)[0].float()
            errors[label] = ((ours - theirs).norm() / theirs.norm()).item()
    return {"rel_err_vs_fla": errors, "shape": [b, t, h, d],
            "same_function": {label: e < 3e-2 for label, e in errors.items()}}


# ------------------------------------------------------------------------------------------------ report

def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def table(rows) -> list[str]:
    head = ["group", "impl", "model", "B", "T", "mode", "median ms", "min ms", "reps", "counted TFLOP", "TFLOP/s",
            "% matmul", "% datasheet", "peak MiB", "note"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["group"], r["impl"], r["model"], str(r["B"]), str(r["T"]), r["mode"],
                 _fmt(r.get("median_s") and r["median_s"] * 1e3, ".3f"), _fmt(r.get("min_s") and r["min_s"] * 1e3, ".3f"),
                 _fmt(r.get("reps"), "d"), _fmt(r.get("counted_tflop"), ".4g"), _fmt(r.get("tflops"), ".1f"),
                 _fmt(r.get("frac_matmul") and 100 * r["frac_matmul"], ".1f"),
                 _fmt(r.get("frac_datasheet") and 100 * r["frac_datasheet"], ".1f"), _fmt(r.get("peak_mib"), ".0f"),
                 r.get("note") or (f"first calls {r['first_calls_s']:.1f} s" if r.get("first_calls_s") else "")]
        out.append("| " + " | ".join(cells) + " |")
    return out


def ratios(rows, args) -> dict:
    t = {(r["group"], r["impl"], r["model"], r["T"], r["mode"]): r.get("median_s") for r in rows}
    out = {"gated_delta_fla_time_over_miras": {}, "mlp_reference_time_over_miras": {},
           "mlp_sdpa_time_over_miras": {}, "mlp_forward_fraction_of_peak_at_longest_T": {}}
    div = lambda a, b: None if a is None or b is None or b == 0 else a / b  # noqa: E731
    for (group, impl, model, t_len, mode), s in t.items():
        key = f"T={t_len} {mode}"
        if group == "gated-delta" and impl.startswith("miras"):
            out["gated_delta_fla_time_over_miras"][f"{impl} {key}"] = div(t.get((group, "fla", model, t_len, mode)), s)
        if group == "mlp-vs-reference" and impl == "miras":
            out["mlp_reference_time_over_miras"][f"{model} {key}"] = div(t.get((group, "reference", model, t_len, mode)), s)
        if group == "mlp" and impl == "miras":
            out["mlp_sdpa_time_over_miras"][f"{model} {key}"] = div(t.get(("attention", "sdpa-flash", "attention",
                                                                           t_len, mode)), s)
    longest = max(args.seq_lens)
    for r in rows:
        if r["group"] == "mlp" and r["T"] == longest and r["mode"] == "fwd" and r.get("tflops") is not None:
            out["mlp_forward_fraction_of_peak_at_longest_T"][r["model"]] = {
                "T": longest, "tflops": r["tflops"], "of_measured_matmul": r.get("frac_matmul"),
                "of_datasheet": r.get("frac_datasheet")}
    return out


def report(rows, skipped, args, card, matmul, datasheet, mapping, clock) -> tuple[list[str], dict]:
    """The markdown report and the JSON record; written to --out-dir when given."""
    import miras_ext
    rat = ratios(rows, args)
    lines = [f"# GPU bench: {card}, {time.strftime('%Y-%m-%d')}", "",
             f"torch {torch.__version__}, triton {_version('triton')}, fla-core {_version('fla-core')}, "
             f"miras_ext {miras_ext.build_info()}", "",
             f"bf16, H={args.heads}, D={args.head_dim}, chunk {args.chunk}, {args.tokens} tokens per batch; "
             f"bf16 matmul measured {matmul:.1f} TFLOP/s, datasheet {_fmt(datasheet, '.1f') or 'unknown'}; "
             f"{clock.elapsed():.0f} s, of which {clock.excluded:.0f} s FLA's first calls outside the "
             f"{args.budget_s:.0f} s budget", "", *table(rows), "",
             "Ratios (time of the other / time of ours: above 1, ours is faster):"]
    for kind, vals in rat.items():
        if vals:
            lines.append(f"- {kind}: " + ", ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v or 'n/a'}"
                                                   for k, v in vals.items()))
    lines.append(f"- mapping check (ours vs FLA, one small case; below 3e-2: the same function): {mapping}")
    if skipped:
        lines.append(f"- skipped after the {args.budget_s:.0f} s budget: {len(skipped)} cases: {', '.join(skipped)}")
    lines += ["", "Counted FLOPs: MLP F_fwd = B H sum_chunks (14 n h d + 4 n^2 h + 6 n^2 d), h = 4 d; matrix "
              "F_fwd = B H sum_chunks (6 n d^2 + 4 n^2 d); attention F_fwd = 2 B H T^2 D; fwd+bwd = 3 F_fwd "
              "(attention 3.5 F_fwd). FLA: time only (another algorithm)."]
    record = {"card": card, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "triton": _version("triton"), "fla_core": _version("fla-core"), "miras_ext": miras_ext.build_info(),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "matmul_bf16_tflops": matmul, "datasheet_bf16_tflops": datasheet, "mapping_check": mapping,
              "rows": rows, "ratios": rat, "skipped_for_budget": skipped, "elapsed_s": clock.elapsed(),
              "fla_first_calls_s": clock.excluded}
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "bench.md").write_text("\n".join(lines) + "\n")
        (args.out_dir / "bench.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return lines, record


# -------------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU, no timing)")
    ap.add_argument("--quick", action="store_true", help="T = 2048 4096, 8192 tokens per batch, short cases")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu: tiny shapes, a smoke test")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="stop starting cases after this, FLA's first calls not counted (default 300)")
    ap.add_argument("--deadline-s", type=float,
                    help="no case or timed call starts after this many seconds, everything counted (default none)")
    ap.add_argument("--max-priority", type=int, default=4, help="run the cases of priority 1 .. this (default 4)")
    ap.add_argument("--seq-lens", type=int, nargs="+", help="default 2048 8192 32768 (cpu: 64 128)")
    ap.add_argument("--tokens", type=int, help="tokens per batch, B = tokens / T (default 32768; cpu 256)")
    ap.add_argument("--gdn-len", type=int, help="T of the gated-delta vs FLA target (default 4096; cpu 128)")
    ap.add_argument("--ref-len", type=int, help="T of the reference.chunked comparison (default 2048; cpu 64)")
    ap.add_argument("--ref-batch", type=int, default=1, help="B of the reference.chunked comparison (default 1)")
    ap.add_argument("--heads", type=int, help="H (default 16; cpu 2)")
    ap.add_argument("--head-dim", type=int, default=64, help="D = Dk = Dv (default 64)")
    ap.add_argument("--chunk", type=int, default=64, help="chunk size of our op (default 64)")
    ap.add_argument("--presets", default=",".join(PRESETS), help="MLP presets, default moneta,yaad,memora")
    ap.add_argument("--groups", default="gated-delta,mlp,mlp-vs-reference,attention",
                    help="case groups to run (default all four)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per case and mode (default 2)")
    ap.add_argument("--reps", type=int, default=20, help="at most this many timed calls (default 20)")
    ap.add_argument("--case-s", type=float, default=1.0, help="about this many seconds of timed calls per case")
    ap.add_argument("--out-dir", type=Path, help="also write bench.md and bench.json here")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    args.seq_lens = args.seq_lens or ([64, 128] if cpu else [2048, 4096] if args.quick else [2048, 8192, 32768])
    args.tokens = args.tokens or (256 if cpu else 8192 if args.quick else 32768)
    args.gdn_len = args.gdn_len or (128 if cpu else 4096)
    args.ref_len = args.ref_len or (64 if cpu else 2048)
    args.heads = args.heads or (2 if cpu else 16)
    if args.quick or cpu:
        args.warmup, args.reps, args.case_s = min(args.warmup, 1), min(args.reps, 3), min(args.case_s, 0.2)
    args.presets = [p for p in args.presets.split(",") if p]
    args.groups = [g for g in args.groups.split(",") if g]
    unknown = set(args.presets) - set(PRESETS)
    if unknown:
        ap.error(f"--presets: unknown {sorted(unknown)}; choose from {PRESETS}")
    return args


def describe_plan(plan, args, mlp_flops) -> list[str]:
    lines = [f"plan: {len(plan)} cases x {len(MODES)} modes, bf16, H={args.heads} D={args.head_dim} chunk={args.chunk}, "
             f"{args.tokens} tokens per batch, budget {args.budget_s:.0f} s, device {args.device}"]
    for c in plan:
        f = c.flops(mlp_flops)
        lines.append(f"  [{c.priority}] {c.group:<17} {c.impl:<15} {c.model:<11} B={c.b:<3} T={c.t:<6} "
                     + (f"counted fwd {f['fwd'] / 1e12:.3f} TFLOP" if f else "time only"))
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    mlp_flops = _ops_flops()
    plan = make_plan(args)
    _, fla_missing = _fla()
    if args.dry_run:
        print("\n".join(describe_plan(plan, args, mlp_flops)))
        print(f"fla: {'available' if fla_missing is None else fla_missing}")
        print(f"cuda available here: {torch.cuda.is_available()}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; use --dry-run for the plan or --device cpu for a smoke test",
              file=sys.stderr)
        return 2
    import miras_ext  # noqa: F401  (fails here, before any timing, when the package is not installed)
    clock = Clock(args.budget_s, args.deadline_s)
    dtype = torch.bfloat16
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print("\n".join(describe_plan(plan, args, mlp_flops)), flush=True)
    matmul = matmul_tflops(device, dtype, 8192 if device.type == "cuda" else 512)
    datasheet = datasheet_tflops(card) if device.type == "cuda" else None
    print(f"card: {card}; bf16 matmul measured {matmul:.1f} TFLOP/s; datasheet dense bf16 "
          f"{_fmt(datasheet, '.1f') or 'unknown'} TFLOP/s", flush=True)
    mapping = {"skipped": "runs after the timed cases"}

    rows, skipped = [], []
    for case in plan:
        base = {"group": case.group, "impl": case.impl, "model": case.model, "B": case.b, "T": case.t}
        if time.perf_counter() > clock.case_deadline():
            skipped.append(case.name)
            rows += [dict(base, mode=m, note="skipped: budget") for m in MODES]
            continue
        if case.impl == "fla" and fla_missing:
            rows += [dict(base, mode=m, note="skipped: fla not installed") for m in MODES]
            continue
        if case.impl == "miras-minibatch" and minibatch_kwargs() is None:
            rows += [dict(base, mode=m, note="skipped: MemorySpec has no mini-batch flag (the default is that form)")
                     for m in MODES]
            continue
        flops = case.flops(mlp_flops)
        first_calls = None
        try:
            t0 = time.perf_counter()
            runner = Runner(case, device, dtype)
            if case.impl == "fla":  # Triton compiles and autotunes in the first calls: outside the budget
                runner.run("fwd+bwd")
                _sync(device)
                first_calls = time.perf_counter() - t0
                clock.excluded += first_calls
                print(f"  {case.name}: first calls (compile, autotune) {first_calls:.1f} s, outside the budget",
                      flush=True)
        except Exception as exc:  # noqa: BLE001
            rows += [dict(base, mode=m, note=f"error: {type(exc).__name__}: {str(exc)[:160]}") for m in MODES]
            print(f"  {case.name}: {rows[-1]['note']}", flush=True)
            continue
        for mode in MODES:
            row = dict(base, mode=mode, first_calls_s=first_calls)
            try:
                if time.perf_counter() > clock.hard:
                    raise TimeoutError("past --deadline-s before the first timed call")
                row.update(time_calls(lambda: runner.run(mode), device, args.warmup, args.reps, args.case_s,
                                      clock.case_deadline()))
                if flops:
                    row["counted_tflop"] = flops[mode] / 1e12
                    row["tflops"] = flops[mode] / row["median_s"] / 1e12
                    row["frac_matmul"] = row["tflops"] / matmul
                    row["frac_datasheet"] = row["tflops"] / datasheet if datasheet else None
            except Exception as exc:  # noqa: BLE001  (out of memory, a missing kernel: record, go on)
                row["note"] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
            rows.append(row)
            print(f"  {case.name} {mode}: " + (f"{row['median_s'] * 1e3:.3f} ms median of {row['reps']}"
                                                if "median_s" in row else row["note"]), flush=True)
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.out_dir:  # the table so far, in case the run is stopped from outside
            report(rows, skipped, args, card, matmul, datasheet, mapping, clock)
    if "gated-delta" not in args.groups or device.type != "cuda":
        mapping = {"skipped": "needs CUDA and the gated-delta group"}
    elif time.perf_counter() > clock.hard:
        mapping = {"skipped": "past --deadline-s"}
    else:
        try:
            mapping = mapping_check(device, args.heads, args.head_dim, args.chunk)
        except Exception as exc:  # noqa: BLE001
            mapping = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    print(f"mapping check (gated_delta_forward vs FLA, one small case): {mapping}", flush=True)
    lines, record = report(rows, skipped, args, card, matmul, datasheet, mapping, clock)
    print()
    print("\n".join(lines))
    print("JSON " + json.dumps(record, default=str))
    return 0


class Clock:
    """The budget: seconds since the start, less the first calls of FLA's kernels (Triton's compile and
    autotune, once per process); no case starts once it is spent. The hard deadline counts everything."""

    def __init__(self, budget_s: float, deadline_s: float | None):
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.excluded = 0.0
        self.hard = self.start + (deadline_s if deadline_s is not None else math.inf)

    def case_deadline(self) -> float:
        return min(self.start + self.excluded + self.budget_s, self.hard)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _version(dist: str):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
