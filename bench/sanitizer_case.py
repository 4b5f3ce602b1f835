"""One small forward + backward per CUDA kernel path of miras_ext, for compute-sanitizer (memcheck, initcheck,
synccheck, racecheck) and as the GPU check's smoke test:

    compute-sanitizer --tool memcheck --kernel-name kns=miras --error-exitcode 1 python3 bench/sanitizer_case.py
    python3 bench/sanitizer_case.py --cases sanitizer      # the six cases the GPU check's sanitizer step runs
    python3 bench/sanitizer_case.py --check-cpu            # every case, and its results against the CPU op's
    python3 bench/sanitizer_case.py --list                 # the cases
    python3 bench/sanitizer_case.py --device cpu           # the same calls on the CPU op (a smoke test, no GPU)

The cases span what selects a kernel or a branch inside one: dtype (the forward and backward kernels are
instantiated per dtype: float32, float64, float16, bfloat16), matrix and MLP memory, the identity and the
nonlinear links (l_q, KL, sigmoid, elastic net), momentum, per-head and per-channel gates, the lag token, head
dims 32/64/128, T not a multiple of the chunk, a retention product below the floor (the token-loop path),
cu_seqlens, decoding (T = 1) and the bias_grad operator. Each is tiny (a few chunks, two heads): instrumented kernels run
10-100 times slower. Every case synchronises, so an asynchronous fault is reported at its case. Exits 1 if a
case raised (or, with --check-cpu, if a result is further from the CPU op's than TOL allows).

--check-cpu runs each case again on the CPU op from the same inputs (drawn on the CPU, then moved) and prints
the largest ||cuda - cpu|| / ||cpu|| over the output, the final state and every gradient, against a bound like
the tests' (TOL, SLACK); the tests (tests/cuda/test_memory_cuda.py) compare more carefully, in float64 on the
same rounded inputs.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

CASES = {
    # name: (spec fields, dtype, D, per_channel, chunk, T, extra)
    "matrix-gated-delta-f32": (dict(memory="matrix", bias="l2", retention="l2", grad_at_retained=True),
                               torch.float32, 64, False, 16, 37, {}),
    "matrix-momentum-lag-huber-bf16": (dict(memory="matrix", bias="huber", retention="l2", algorithm="momentum",
                                            lag_token=True), torch.bfloat16, 64, True, 16, 37, {}),
    "matrix-lq-f64": (dict(memory="matrix", bias="lp", p=3.0, retention="lq"), torch.float64, 32, False, 16, 21, {}),
    "matrix-d128-f32": (dict(memory="matrix", bias="l2", retention="sigmoid"), torch.float32, 128, True, 64, 70, {}),
    "mlp-yaad-bf16": (dict(memory="mlp", bias="yaad", retention="l2"), torch.bfloat16, 64, False, 64, 70, {}),
    "mlp-moneta-perch-f32": (dict(memory="mlp", bias="lp", p=3.0, retention="lq"), torch.float32, 32, True, 16, 37, {}),
    "mlp-memora-f32": (dict(memory="mlp", bias="l2", retention="kl", lag_token=True), torch.float32, 32, False, 16,
                       37, {}),
    "mlp-titans-perch-bf16": (dict(memory="mlp", activation="silu", residual_norm=False, bias="l2", retention="l2",
                                   algorithm="momentum"), torch.bfloat16, 64, True, 32, 45, {}),
    "mlp-d128-f64": (dict(memory="mlp", bias="l2", retention="l2"), torch.float64, 128, True, 16, 20, {}),
    "matrix-f16": (dict(memory="matrix", bias="huber_norm", retention="l2"), torch.float16, 64, False, 32, 70, {}),
    "mlp-f16": (dict(memory="mlp", bias="value_shift", retention="elastic_net"), torch.float16, 32, True, 16, 37, {}),
    "mlp-below-floor-f32": (dict(memory="mlp", bias="l2", retention="l2"), torch.float32, 32, False, 64, 80,
                            {"alpha_low": 50}),
    "varlen-matrix-f32": (dict(memory="matrix", bias="l2", retention="l2"), torch.float32, 64, False, 16, 0,
                          {"lengths": [5, 0, 37, 16]}),
    "varlen-mlp-bf16": (dict(memory="mlp", bias="l2", retention="kl", lag_token=True, algorithm="momentum"),
                        torch.bfloat16, 32, False, 16, 0, {"lengths": [9, 1, 20]}),
    "decode-matrix-bf16": (dict(memory="matrix", bias="l2", retention="l2", grad_at_retained=True), torch.bfloat16,
                           64, False, 16, 21, {"decode": 3}),
    "decode-mlp-f32": (dict(memory="mlp", bias="yaad", retention="l2", algorithm="momentum"), torch.float32, 32, True,
                       16, 21, {"decode": 3}),
}
BIAS_CASES = {"bias-grad-f32": torch.float32, "bias-grad-bf16": torch.bfloat16}
# Six cases for the sanitizer step of bench/gpu_check.sh, which runs three tools on them within a minute:
# matrix and MLP memory, fp32 and bf16 (tensor cores), momentum with the lag token and per-channel gates,
# cu_seqlens, decoding and bias_grad.
SANITIZER_CASES = ("matrix-gated-delta-f32", "matrix-momentum-lag-huber-bf16", "mlp-yaad-bf16", "varlen-mlp-bf16",
                   "decode-mlp-f32", "bias-grad-bf16")
# --check-cpu: a result passes within max(TOL of its dtype, SLACK x the CPU op's own distance from float64 on
# the same case), the bound of tests/cuda/test_memory_cuda.py (ill-conditioned cases such as Yaad at eps 1e-6
# are far from float64 whatever computes them).
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 5e-2}
SLACK = 4.0


def _gates(spec, shape, device, gen):
    def u(lo, hi):
        return (lo + (hi - lo) * torch.rand(shape, generator=gen)).to(device)

    lr = u(0.0, 0.3)
    alpha = u(0.9, 1.0) if spec.has_retention_gate else None
    momentum = u(0.0, 0.5) if spec.algorithm == "momentum" else None
    delta = None
    if spec.uses_threshold:  # per channel for "huber" with per-channel gates, else one per head and token
        delta = u(0.5, 1.5) if spec.bias == "huber" else u(0.5, 1.5)[..., 0] if len(shape) == 4 else u(0.5, 1.5)
    return lr, alpha, momentum, delta


def run_memory_case(name: str, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """The case's results in dtype: output, final state, every gradient, then each decoded output and state."""
    import miras_ext
    from miras_ext import MemorySpec

    fields, _, d, per_channel, chunk, t_len, extra = CASES[name]
    spec = MemorySpec(**fields)
    gen = torch.Generator().manual_seed(0)
    lengths = extra.get("lengths")
    b, h = (1, 2) if lengths else (2, 2)
    t_len = sum(lengths) if lengths else t_len
    n = len(lengths) if lengths else b

    def randn(*shape):
        return torch.randn(shape, generator=gen).to(device)

    q, k = (F.normalize(randn(b, t_len, h, d), dim=-1).to(dtype).requires_grad_() for _ in range(2))
    v = randn(b, t_len, h, d).to(dtype).requires_grad_()
    gshape = (b, t_len, h, d) if per_channel else (b, t_len, h)
    gates = list(_gates(spec, gshape, device, gen))
    if extra.get("alpha_low"):  # a retention product below the floor: the token-loop path of those runs
        gates[1][:, :extra["alpha_low"]] = 1e-5
    gates = [g.requires_grad_() if g is not None else None for g in gates]
    init = [(0.3 * randn(n, h, *s) / s[-1] ** 0.5).requires_grad_() for s in spec.weight_shapes(d, d)]
    cu = None
    if lengths:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    o, state = miras_ext.memory_forward(q, k, v, spec, *gates, initial_state=tuple(init), output_final_state=True,
                                        chunk_size=chunk, cu_seqlens=cu, scale=d ** -0.5)
    loss = (o.float() * randn(*o.shape)).sum() + sum((m * randn(*m.shape)).sum() for m in state.memory)
    leaves = [x for x in (q, k, v, *gates, *init) if x is not None]
    grads = torch.autograd.grad(loss, leaves)
    results = [o, *state.memory, *grads]
    for _ in range(extra.get("decode", 0)):
        t = torch.randint(0, t_len, (1,), generator=gen).item()
        with torch.no_grad():
            step_gates = [None if g is None else g[:, t] for g in gates]
            o_t, state = miras_ext.memory_step(q[:, t], k[:, t], v[:, t], spec, *step_gates, state=state,
                                               chunk_size=chunk, scale=d ** -0.5)
        results += [o_t, *state.memory]
    return results


def run_bias_case(name: str, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """bias_grad's output and input gradients for every bias, in dtype."""
    from miras_ext.testing import bias_grad

    gen = torch.Generator().manual_seed(1)
    results = []
    for bias in ("l2", "lp", "l1", "huber", "huber_norm", "yaad", "value_shift", "dot"):
        y, v = (torch.randn(3, 37, 64, generator=gen).to(device, dtype).requires_grad_() for _ in range(2))
        delta = None
        if bias in ("huber", "huber_norm", "yaad", "value_shift"):
            delta = (0.5 + torch.rand(3, 37, generator=gen)).to(device, dtype).requires_grad_()
        g = bias_grad(y, v, bias, delta, p=3.0)
        results += [g, *torch.autograd.grad((g.float() * torch.randn(g.shape, generator=gen).to(device)).sum(),
                                            [x for x in (y, v, delta) if x is not None])]
    return results


def case_dtype(name: str) -> torch.dtype:
    return BIAS_CASES[name] if name in BIAS_CASES else CASES[name][1]


def run_case(name: str, device: torch.device, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Runs the case (in its own dtype unless given), synchronises, and checks that every result is finite."""
    results = (run_bias_case if name in BIAS_CASES else run_memory_case)(name, device, dtype or case_dtype(name))
    if device.type == "cuda":
        torch.cuda.synchronize()
    bad = [i for i, x in enumerate(results) if not torch.isfinite(x).all()]
    if bad:
        raise FloatingPointError(f"{name}: non-finite values in results {bad}")
    return results


def max_rel_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest ||got - want|| / ||want|| over the results (in float64, on the CPU)."""
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        a, b = a.detach().cpu().double(), b.detach().double()
        worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-300)).item())
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    ap.add_argument("--cases", default="all",
                    help="comma-separated case names, 'all' (default) or 'sanitizer' (the GPU check's six)")
    ap.add_argument("--check-cpu", action="store_true", help="compare each case's results with the CPU op's")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test of the script")
    args = ap.parse_args(argv)
    names = [*CASES, *BIAS_CASES]
    if args.list:
        print("\n".join(names))
        return 0
    if args.cases == "sanitizer":
        names = list(SANITIZER_CASES)
    elif args.cases != "all":
        unknown = set(args.cases.split(",")) - set(names)
        if unknown:
            ap.error(f"unknown cases {sorted(unknown)}; --list shows them")
        names = args.cases.split(",")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitizer_case: no CUDA device", file=sys.stderr)
        return 2
    import miras_ext
    print(f"sanitizer_case: {len(names)} cases on {device}; build {miras_ext.build_info()}", flush=True)
    failed, far = [], []
    for name in names:
        t0 = time.perf_counter()
        try:
            results = run_case(name, device)
            note = ""
            if args.check_cpu:
                cpu = torch.device("cpu")
                want = run_case(name, cpu)
                # As the tests do: a device result may be SLACK times further from float64 than the CPU op.
                own = 0.0 if case_dtype(name) == torch.float64 else max_rel_diff(want, run_case(name, cpu, torch.float64))
                bound = max(TOL[case_dtype(name)], SLACK * own)
                diff = max_rel_diff(results, want)
                note = f", max rel diff from the CPU op {diff:.2e} (bound {bound:.1e})"
                if not diff <= bound:
                    far.append(name)
            print(f"  {'FAR ' if name in far else 'ok  '}  {name} ({time.perf_counter() - t0:.1f} s{note})", flush=True)
        except Exception as exc:  # noqa: BLE001  (report every case, fail at the end)
            failed.append(name)
            print(f"  FAIL  {name}: {type(exc).__name__}: {exc}", flush=True)
    line = f"sanitizer_case: {len(names) - len(failed)} of {len(names)} cases ran"
    if failed:
        line += f"; failed: {', '.join(failed)}"
    if args.check_cpu:
        line += f"; {len(far)} far from the CPU op" + (f": {', '.join(far)}" if far else "")
    print(line, flush=True)
    return 1 if failed or far else 0


if __name__ == "__main__":
    sys.exit(main())
