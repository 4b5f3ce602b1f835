"""csrc/cuda/memory/memory_kernels.cuh run through the CPU emulator (drivers/memory_driver.cpp) against the CPU
op: o, the final state and the checkpoints of memory_forward_kernel, and every gradient of
memory_backward_kernel (q, k, v, lr, alpha, momentum, delta, initial memory / momentum / anchor), compared with
torch.ops.miras_ext.memory_chunk_fwd / memory_chunk_bwd in float64.

Cases: a pairwise covering array over memory (matrix, MLP), bias (every one, huber with per-row and
per-channel delta), retention (every one), algorithm, per-head / per-channel gates, grad_at_retained,
lag_token and the call's layout (a padded batch from chunk starts, one from positions inside a chunk, packed
sequences with an empty one, a decoding step), with Dk = 5, Dv = 7 (or 5), T = 11 and chunk 4; the MLP's
activation, residual norm, expansion and the q scale rotate with the case. Nonzero initial states, anchors
and final-state gradients throughout. Each case runs under the "ordered" schedule, a few also "reverse" and
"shuffled:1"; a few in float32, float16 and bfloat16 (inputs rounded to the dtype first, so that the float64
CPU op sees the same values).

Error measure: ||a - b|| / ||b|| per output (absolute where b is zero); NaN anywhere fails, since the driver
starts outputs and workspace as NaN, and so does a write past the end of a buffer or into a checkpoint row no
run uses (the driver checks NaN guards). Tolerances: 1e-9 in float64; below, 1e-4 (float32), 1e-2 (float16),
3e-2 (bfloat16) or 3 times the error of the CPU op itself in that precision, whichever is larger.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import miras_ext  # noqa: F401  (registers torch.ops.miras_ext)
from miras_ext.spec import MemorySpec

from ..reference.helpers import one_thread  # noqa: F401  (autouse: one intra-op thread for the tiny CPU ops)
from . import emu_build

# 16-bit inputs: chunk products take their operands rounded to bfloat16 on tensor cores (block_gemm.cuh;
# float16 inputs too, for float32's range), and a gradient passes through up to about ten such products in
# a row (two layers, four products each, then the second-order pass): about ten bfloat16 unit roundoffs,
# 2^-8 each (the measured worst cases are 3.7e-2 on Yaad and 4.6e-2 on a float16 Yaad fuzz case).
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 5e-2, "bfloat16": 5e-2}
CHUNK = 4
H = 2


# ---------------------------------------------------------------------------------------------------------
# Cases.

@dataclasses.dataclass(frozen=True)
class Layout:
    """The shape of one call: B sequences of T tokens (cu None) or N sequences packed into one row."""

    B: int
    T: int
    position: tuple[int, ...]
    cu: tuple[int, ...] | None = None


LAYOUTS = {
    "plain": Layout(2, 11, (0, 0)),
    "offset": Layout(2, 11, (6, 2)),  # phase 2: the first run continues the given anchor
    "varlen": Layout(1, 12, (0, 3, 6, 1), (0, 5, 5, 11, 12)),  # lengths 5, 0, 6, 1
    "decode": Layout(2, 1, (5, 9)),  # one token at phase 1 (a fresh run with lag_token)
    "long": Layout(1, 70, (3,)),  # with chunk 66: runs of 63 and 7 tokens
    "chunks64": Layout(1, 80, (0,)),  # with chunk 64: a full chunk and 16 tokens
    "chunks16": Layout(1, 20, (5,)),  # with chunk 16: 11 tokens, then 9
    "chunks16b": Layout(1, 32, (7,)),
}


@dataclasses.dataclass(frozen=True)
class Case:
    spec: MemorySpec
    layout: str = "plain"
    dk: int = 5
    dv: int = 7
    per_channel: bool = False
    delta_per_channel: bool = False
    dtype: str = "float64"
    chunk: int = CHUNK
    scale: float = 1.0
    seed: int = 0
    tiny_alpha: float | None = None  # alpha of every fourth token (2, 6, 10, ...), below the factored floor

    @property
    def id(self) -> str:
        s = self.spec
        parts = [s.memory if s.memory != "mlp" else f"mlp{s.layers}x{s.expansion}-{s.activation}"
                 + ("-res" if s.residual_norm else ""),
                 s.bias + ("-ch" if self.delta_per_channel else ""), f"ret={s.retention}", s.algorithm,
                 "perch" if self.per_channel else "perhead", self.layout, f"dk{self.dk}dv{self.dv}"]
        if s.grad_at_retained:
            parts.append("gar")
        if s.norm_mean:
            parts.append("norm-mean")
        if s.lag_token:
            parts.append("lag")
        if s.minibatch:
            parts.append("minibatch")
        if self.tiny_alpha is not None:
            parts.append("tiny-alpha")
        if self.chunk != CHUNK:
            parts.append(f"chunk{self.chunk}")
        if self.scale != 1.0:
            parts.append(f"scale{self.scale}")
        return "-".join(parts + [self.dtype])


FACTORS = {
    "memory": ("matrix", "mlp"),
    "bias": ("dot", "l2", "lp", "l1", "huber", "huber-ch", "huber_norm", "yaad", "value_shift"),
    "retention": ("none", "l2", "lq", "kl", "elastic_net", "sigmoid"),
    "algorithm": ("gd", "momentum"),
    "per_channel": (False, True),
    "grad_at_retained": (False, True),
    "lag_token": (False, True),
    "layout": ("plain", "offset", "varlen", "decode"),
}


def _valid(c: dict) -> bool:
    return not c["grad_at_retained"] or (c["retention"] == "l2" and c["memory"] == "matrix")


@functools.lru_cache(maxsize=None)
def _covering(factors: tuple, valid) -> tuple:
    names = [name for name, _ in factors]
    full = [dict(zip(names, vals)) for vals in itertools.product(*(vals for _, vals in factors))]
    full = [c for c in full if valid(c)]
    pair_ids: dict = {}
    masks = []  # the pairs of each combination as the bits of an int
    for c in full:
        m = 0
        for a, b in itertools.combinations(names, 2):
            m |= 1 << pair_ids.setdefault((a, c[a], b, c[b]), len(pair_ids))
        masks.append(m)
    todo, out = (1 << len(pair_ids)) - 1, []
    while todo:
        gains = [(m & todo).bit_count() for m in masks]
        top = max(gains)
        best = [i for i, g in enumerate(gains) if g == top]
        pick = best[(len(out) * 37) % len(best)]
        out.append(full[pick])
        todo &= ~masks[pick]
    return tuple(out)


def covering_combos(factors: dict, valid) -> list[dict]:
    """Greedy pairwise covering array (as tests/reference/helpers.py pairwise_combos, for any factors): every
    valid pair of values of two factors occurs in some combination."""
    return [dict(c) for c in _covering(tuple(factors.items()), valid)]


def combo_case(c: dict, i: int) -> Case:
    """The Case of a combination; the MLP's activation, residual norm and expansion and the q scale rotate
    with the index. Dk = 5; Dv = 7 where the memory allows Dk != Dv, else 5."""
    kw = dict(memory=c["memory"], bias=c["bias"].removesuffix("-ch"), retention=c["retention"],
              algorithm=c["algorithm"], grad_at_retained=c["grad_at_retained"], lag_token=c["lag_token"])
    if kw["bias"] == "lp":
        kw["p"] = 3.0
    square = False
    if c["memory"] == "mlp":
        kw.update(layers=2, activation=("gelu", "silu")[i % 2], residual_norm=(i // 2) % 2 == 0,
                  expansion=(2, 4)[(i // 4) % 2])
        square = kw["residual_norm"] or c["per_channel"]
    return Case(MemorySpec(**kw), c["layout"], dk=5, dv=5 if square else 7, per_channel=c["per_channel"],
                delta_per_channel=c["bias"] == "huber-ch", scale=(1.0, 0.7, 1.0)[i % 3], seed=i)


PAIRWISE = [combo_case(c, i) for i, c in enumerate(covering_combos(FACTORS, _valid))]

EXTRA = [
    # Gated DeltaNet's recurrence (chunk 1), a 3-layer MLP, a run of exactly one chunk.
    Case(MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True), chunk=1, seed=101),
    # The exact delta rule at chunk 4 (Eqs. 5.13-5.19) with per-channel gates, and its mini-batch approximation.
    Case(MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True), layout="offset",
         per_channel=True, seed=102),
    Case(MemorySpec(memory="matrix", bias="l2", retention="none"), layout="varlen", seed=103),
    Case(MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True, minibatch=True), seed=104),
    Case(MemorySpec(memory="mlp", layers=3, expansion=2, residual_norm=False, bias="l2", retention="l2",
                    algorithm="momentum"), dk=5, dv=7, seed=102),
    Case(MemorySpec(memory="matrix", bias="huber", retention="kl"), chunk=11, delta_per_channel=True, seed=103),
    # Rows wider than a warp, and more weights than threads in a block.
    Case(MemorySpec(memory="mlp", layers=2, expansion=4, bias="huber_norm", retention="kl", lag_token=True), dk=9,
         dv=9, per_channel=True, layout="offset", seed=104),
    Case(MemorySpec(memory="matrix", bias="value_shift", retention="lq", algorithm="momentum"), dk=37, dv=33,
         layout="varlen", seed=105),
    # Runs whose running product of alpha falls below the factored form's floor (1e-6 in float64, 1e-3 in
    # float32) take the token loop; the other runs of the same call stay factored.
    Case(MemorySpec(memory="mlp", layers=2, expansion=2, bias="l2", retention="l2"), dk=5, dv=5, per_channel=True,
         layout="offset", tiny_alpha=1e-210, seed=106),
    # Chunk products larger than one 64 x 64 tile (runs of 63 tokens, a hidden layer of 80), on both paths.
    Case(MemorySpec(memory="mlp", layers=2, expansion=4, bias="huber", retention="l2"), dk=20, dv=20, layout="long",
         chunk=66, seed=107),
    Case(MemorySpec(memory="mlp", layers=2, expansion=4, bias="l2", retention="lq", algorithm="momentum"), dk=20,
         dv=20, layout="long", chunk=66, seed=108),
    Case(MemorySpec(memory="mlp", layers=2, expansion=4, bias="lp", p=3.0, retention="lq", norm_floor=0.5,
                    norm_mean=True), dk=20, dv=20, layout="long", chunk=66, per_channel=True, seed=109),
]

# Other dtypes on rounded inputs (float32 accumulation).
LOW_PRECISION = [
    Case(MemorySpec(memory="matrix", bias="l2", retention="l2"), dtype="float32", seed=201),
    Case(MemorySpec(memory="matrix", bias="huber_norm", retention="elastic_net", algorithm="momentum"),
         layout="varlen", per_channel=True, dtype="float32", seed=202),
    Case(MemorySpec(memory="mlp", layers=2, expansion=4, bias="lp", p=3.0, retention="lq"), dk=5, dv=5,
         per_channel=True, dtype="float32", seed=203),  # Moneta
    Case(MemorySpec(memory="mlp", layers=2, expansion=2, bias="l2", retention="kl", lag_token=True), dk=5, dv=5,
         layout="offset", dtype="float32", seed=204),  # Memora
    Case(MemorySpec(memory="mlp", layers=2, expansion=2, activation="silu", residual_norm=False, bias="l2",
                    retention="l2", algorithm="momentum"), dk=5, dv=7, dtype="float32", seed=205),  # Titans
    Case(MemorySpec(memory="matrix", bias="dot", retention="sigmoid", grad_at_retained=False), layout="decode",
         dtype="float32", seed=206),
    Case(MemorySpec(memory="mlp", layers=2, expansion=2, bias="yaad", retention="l2"), dk=5, dv=5,
         dtype="bfloat16", seed=207),  # Yaad
    Case(MemorySpec(memory="matrix", bias="value_shift", retention="l2", grad_at_retained=True), layout="offset",
         dtype="float16", seed=208),
    Case(MemorySpec(memory="matrix", bias="l2", retention="l2"), tiny_alpha=1e-25, dtype="float32", seed=209),
    # The sizes: head dim 64 with chunk 64, and an MLP of head dim 32 (hidden 128) with chunk 16.
    Case(MemorySpec(memory="matrix", bias="l2", retention="l2"), layout="chunks64", dk=64, dv=64, chunk=64,
         dtype="bfloat16", seed=210),
    Case(MemorySpec(memory="mlp", layers=2, expansion=4, bias="l2", retention="kl"), layout="chunks16", dk=32, dv=32,
         chunk=16, dtype="float32", seed=211),
    Case(MemorySpec(memory="mlp", layers=2, expansion=4, bias="yaad", retention="l2"), layout="chunks16", dk=32,
         dv=32, chunk=16, dtype="bfloat16", seed=212),
    # The exact delta rule's chunk products on tensor cores (factored runs, Eqs. 5.14-5.19): Dk != Dv, and a
    # run longer than Dk with per-channel gates.
    Case(MemorySpec(memory="matrix", bias="l2", retention="l2", grad_at_retained=True), layout="chunks16", dk=32,
         dv=16, chunk=16, dtype="bfloat16", seed=213),
    Case(MemorySpec(memory="matrix", bias="l2", retention="none"), layout="chunks16b", dk=8, dv=24, chunk=16,
         per_channel=True, dtype="float16", seed=214),
    # Second-order gradients past float16's 65504: tensor-core operands in float16 made them inf.
    Case(MemorySpec(memory="mlp", layers=2, expansion=2, bias="yaad", retention="l2"), layout="chunks16b", dk=8,
         dv=8, chunk=16, dtype="float16", seed=941933),
]

CASES = PAIRWISE + EXTRA + LOW_PRECISION
# Cases that also run under the reverse and a shuffled order of threads between barriers.
# Both paths of the kernels: the factored products (on tensor cores for bfloat16) and the token loop, also
# mixed in one call (tiny alpha).
REORDERED = [c for c in PAIRWISE if c.layout in ("varlen", "offset")][:3] + \
            [c for c in PAIRWISE if c.spec.memory == "mlp" and c.spec.algorithm == "momentum"][:1] + \
            [c for c in CASES if c.tiny_alpha is not None or c.dtype in ("bfloat16", "float16")] + LOW_PRECISION[3:4]


# ---------------------------------------------------------------------------------------------------------
# Inputs, the CPU op, the driver.

def round_to(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return x.to(getattr(torch, dtype)).double()


def make_inputs(case: Case) -> dict:
    """float64 inputs of the op (already rounded to what the kernel reads: q, k, v, grad_o to the dtype, gates
    and states to float32 below float64)."""
    spec, lay = case.spec, LAYOUTS[case.layout]
    gen = torch.Generator().manual_seed(1000 + case.seed)
    randn = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64)  # noqa: E731
    uniform = lambda s, lo, hi: lo + (hi - lo) * torch.rand(s, generator=gen, dtype=torch.float64)  # noqa: E731
    B, T, dk, dv = lay.B, lay.T, case.dk, case.dv
    N = len(lay.position)
    gshape = (B, T, H, dv) if case.per_channel else (B, T, H)
    x = {
        "q": torch.nn.functional.normalize(randn(B, T, H, dk), dim=-1),
        "k": torch.nn.functional.normalize(randn(B, T, H, dk), dim=-1),
        "v": randn(B, T, H, dv),
        "lr": uniform(gshape, 0.1, 0.5),
        "alpha": uniform(gshape, 0.6, 1.0) if spec.has_retention_gate else None,
        "momentum": uniform(gshape, 0.0, 0.9) if spec.algorithm == "momentum" else None,
        "delta": None,
    }
    if case.tiny_alpha is not None:
        x["alpha"][:, 2::4] = case.tiny_alpha
    if spec.bias == "huber":
        x["delta"] = uniform((B, T, H, dv) if case.delta_per_channel else (B, T, H), 0.2, 1.4)
    elif spec.uses_threshold:
        x["delta"] = uniform((B, T, H), 0.4, 1.6) * math.sqrt(dv)
    shapes = spec.weight_shapes(dk, dv)
    nmom = len(shapes) if spec.algorithm == "momentum" else 0
    x["memory"] = [randn(N, H, *s) * 0.3 for s in shapes]
    x["momentum_state"] = [randn(N, H, *s) * 0.1 for s in shapes[:nmom]]
    x["anchor"] = [randn(N, H, *s) * 0.3 for s in shapes]
    x["grad_o"] = randn(B, T, H, dv)
    x["grad_memory"] = [randn(N, H, *s) for s in shapes]
    x["grad_momentum"] = [randn(N, H, *s) for s in shapes[:nmom]]
    x["grad_anchor"] = [randn(N, H, *s) for s in shapes]
    if case.dtype != "float64":
        for name in ("q", "k", "v", "grad_o"):
            x[name] = round_to(x[name], case.dtype)
        for name, val in x.items():
            if name not in ("q", "k", "v", "grad_o") and val is not None:
                x[name] = [round_to(t, "float32") for t in val] if isinstance(val, list) else round_to(val, "float32")
    x["position"] = torch.tensor(lay.position, dtype=torch.int64)
    x["cu_seqlens"] = None if lay.cu is None else torch.tensor(lay.cu, dtype=torch.int64)
    return x


def cpu_op(case: Case, x: dict) -> dict:
    """Every output of memory_chunk_fwd (with checkpoints) and memory_chunk_bwd, by the driver's names."""
    spec = case.spec.encode()
    o, mem, mom, anc, _, ck = torch.ops.miras_ext.memory_chunk_fwd(
        x["q"], x["k"], x["v"], x["lr"], x["alpha"], x["momentum"], x["delta"], x["memory"], x["momentum_state"],
        x["anchor"], x["position"], x["cu_seqlens"], spec, case.scale, case.chunk, True)
    g = torch.ops.miras_ext.memory_chunk_bwd(
        x["grad_o"], x["grad_memory"], x["grad_momentum"], x["grad_anchor"], x["q"], x["k"], x["v"], x["lr"],
        x["alpha"], x["momentum"], x["delta"], ck, x["position"], x["cu_seqlens"], spec, case.scale, case.chunk)
    L, M = len(mem), len(mom)
    out = {"o": o}
    for prefix, final, cks in (("memory", mem, ck[:L]), ("momentum", mom, ck[L:L + M]), ("anchor", anc, ck[L + M:])):
        for l, (t, c) in enumerate(zip(final, cks)):
            out[f"{prefix}{l}"] = t
            out[f"ck_{prefix}{l}"] = c
    for name, t in zip(("dq", "dk", "dv", "dlr"), g[:4]):
        out[name] = t
    for name, gate, t in (("dalpha", "alpha", g[4]), ("dmom", "momentum", g[5]), ("ddelta", "delta", g[6])):
        if x[gate] is not None:
            out[name] = t
    for prefix, ts in (("gmemory", g[7]), ("gmomentum", g[8]), ("ganchor", g[9])):
        for l, t in enumerate(ts):
            out[f"{prefix}{l}"] = t
    return out


def _array(name: str, t: torch.Tensor) -> bytes:
    data = np.ascontiguousarray(t.detach().double().numpy(), dtype="<f8")
    return f"array {name} {data.size}\n".encode() + data.tobytes()


def case_file(case: Case, x: dict) -> bytes:
    """The driver's input: the KernelSpec fields as the CUDA host fills them from the MemorySpec and the
    tensors, the call's sizes and the raw arrays."""
    spec, lay = case.spec, LAYOUTS[case.layout]
    shapes = spec.weight_shapes(case.dk, case.dv)
    delta = x["delta"]
    fields = {
        "dtype": case.dtype,
        "layers": len(shapes),
        "dims": " ".join(str(d) for d in [shapes[0][1]] + [s[0] for s in shapes]),
        "gelu": int(spec.activation == "gelu"),
        "residual": int(spec.memory == "mlp" and spec.residual_norm),
        "bias": "lp" if spec.bias == "l1" else spec.bias,
        "delta_layout": "none" if delta is None else ("per_channel" if delta.dim() == 4 else "per_row"),
        "p": repr(1.0 if spec.bias == "l1" else float(spec.p)),
        "eps": repr(float(spec.eps)),
        "retention": spec.retention,
        "norm_order": repr(float(spec.norm_order)),
        "norm_floor": repr(float(spec.norm_floor)),
        "norm_mean": int(spec.norm_mean),
        "ln_eps": repr(float(spec.ln_eps)),
        "shrinkage": repr(float(spec.shrinkage)),
        "simplex_scale": repr(-1.0 if spec.simplex_scale is None else float(spec.simplex_scale)),
        "has_alpha": int(spec.has_retention_gate),
        "momentum": int(spec.algorithm == "momentum"),
        "per_channel": int(x["lr"].dim() == 4),
        "retained": int(spec.grad_at_retained),
        "exact": int(spec.exact_chunks),
        "scale": repr(float(case.scale)),
        "B": lay.B, "T": lay.T, "H": H, "N": len(lay.position), "chunk": case.chunk, "lag": int(spec.lag_token),
        "position": " ".join(map(str, lay.position)),
        "cu_seqlens": "" if lay.cu is None else " ".join(map(str, lay.cu)),
    }
    text = "miras_memory_case 1\n" + "".join(f"{k} {v}\n" for k, v in fields.items())
    blob = [text.encode()]
    for name in ("q", "k", "v", "lr", "alpha", "momentum", "delta", "grad_o"):
        if x[name] is not None:
            blob.append(_array(name, x[name]))
    for prefix, key in (("memory", "memory"), ("momentum", "momentum_state"), ("anchor", "anchor"),
                        ("gmemory", "grad_memory"), ("gmomentum", "grad_momentum"), ("ganchor", "grad_anchor")):
        blob += [_array(f"{prefix}{l}", t) for l, t in enumerate(x[key])]
    return b"".join(blob) + b"end\n"


def read_outputs(path: Path) -> dict[str, np.ndarray]:
    data, out, at = path.read_bytes(), {}, 0
    while True:
        nl = data.index(b"\n", at)
        words = data[at:nl].decode().split()
        at = nl + 1
        if words == ["end"]:
            return out
        assert words[0] == "array", words
        count = int(words[2])
        out[words[1]] = np.frombuffer(data, dtype="<f8", count=count, offset=at)
        at += 8 * count


def run_driver(emu_bins, case: Case, x: dict, schedule: str, tmp_path: Path) -> dict[str, np.ndarray]:
    case_path, out_path = tmp_path / "case.bin", tmp_path / "out.bin"
    case_path.write_bytes(case_file(case, x))
    res = emu_build.run(emu_bins["memory"], str(case_path), str(out_path), schedule, timeout=300)
    assert res.returncode == 0, f"memory_driver {schedule} failed (exit {res.returncode}):\n{res.stdout}{res.stderr}"
    return read_outputs(out_path)


def errors(got: dict, ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """||a - b|| / ||b|| per output (||a - b|| where b is zero, inf with NaN); checkpoints over the rows `got`
    has (the driver returns those the schedule uses)."""
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    out = {}
    for name, b in ref.items():
        b = b.detach().double().reshape(-1).numpy()
        a = got[name]
        a = a.detach().double().reshape(-1).numpy() if isinstance(a, torch.Tensor) else a
        if name.startswith("ck_"):
            b = b[:a.size]
        assert a.size == b.size, (name, a.size, b.size)
        if not np.all(np.isfinite(a)):
            out[name] = math.inf
            continue
        den = np.linalg.norm(b)
        out[name] = float(np.linalg.norm(a - b) / (den if den > 0 else 1.0))
    return out


def tolerances(case: Case, x: dict, ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """TOLERANCE of the dtype per output; below float64 at least 3 times the error of the CPU op itself run
    in that precision (float32 states and gates), for outputs that the rounding of the case amplifies."""
    tol = TOLERANCE[case.dtype]
    if case.dtype == "float64":
        return dict.fromkeys(ref, tol)
    def cast(val, dtype):
        if isinstance(val, list):
            return [t.to(dtype) for t in val]
        return val.to(dtype) if isinstance(val, torch.Tensor) and val.is_floating_point() else val

    xl = {name: cast(val, getattr(torch, case.dtype) if name in ("q", "k", "v", "grad_o") else torch.float32)
          for name, val in x.items()}
    own = errors(cpu_op(case, xl), ref)
    return {name: max(tol, 3 * e) for name, e in own.items()}


def report(case: Case, schedule: str, errs: dict[str, float], tols: dict[str, float]) -> str:
    rows = [f"{'FAIL' if e > tols[n] else 'ok  '} {n:12s} {e:.3e} (tol {tols[n]:.1e})" for n, e in errs.items()]
    return f"{case.id} [{schedule}]\n" + "\n".join(rows)


def check(emu_bins, case: Case, schedule: str, tmp_path: Path) -> None:
    x = make_inputs(case)
    ref = cpu_op(case, x)
    errs = errors(run_driver(emu_bins, case, x, schedule, tmp_path), ref)
    tols = tolerances(case, x, ref)
    assert all(e <= tols[n] for n, e in errs.items()), report(case, schedule, errs, tols)


# ---------------------------------------------------------------------------------------------------------
# Tests.

def test_cases_cover_every_pair_and_option():
    names = list(FACTORS)

    def pairs(combos):
        return {(a, c[a], b, c[b]) for c in combos for a, b in itertools.combinations(names, 2)}

    full = [dict(zip(names, vals)) for vals in itertools.product(*FACTORS.values())]
    assert pairs(covering_combos(FACTORS, _valid)) == pairs(c for c in full if _valid(c))
    mlp = [c.spec for c in CASES if c.spec.memory == "mlp"]
    assert {s.activation for s in mlp} == {"gelu", "silu"} and {s.residual_norm for s in mlp} == {False, True}
    assert {s.expansion for s in mlp} == {2, 4} and {c.dtype for c in CASES} == set(TOLERANCE)
    assert any(c.dk != c.dv for c in CASES if c.spec.memory == "mlp")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_memory_kernels_match_cpu_op(emu_bins, case, tmp_path):
    check(emu_bins, case, "ordered", tmp_path)


@pytest.mark.parametrize("schedule", ["reverse", "shuffled:1"])
@pytest.mark.parametrize("case", REORDERED, ids=lambda c: c.id)
def test_memory_kernels_match_cpu_op_in_other_orders(emu_bins, case, schedule, tmp_path):
    check(emu_bins, case, schedule, tmp_path)


def test_harness_detects_a_wrong_input(emu_bins, tmp_path):
    """The comparison is not vacuous: the driver given lr * (1 + 1e-6), or a final-state gradient changed
    in one entry, fails the float64 tolerance on exactly the outputs that depend on it."""
    case = PAIRWISE[0]
    x = make_inputs(case)
    ref = cpu_op(case, x)
    tol = TOLERANCE["float64"]
    errs = errors(run_driver(emu_bins, case, {**x, "lr": x["lr"] * (1 + 1e-6)}, "ordered", tmp_path), ref)
    assert errs["o"] > tol and errs["memory0"] > tol and errs["dq"] > tol, errs
    bumped = [t.clone() for t in x["grad_memory"]]
    bumped[0].view(-1)[3] += 1.0
    errs = errors(run_driver(emu_bins, case, {**x, "grad_memory": bumped}, "ordered", tmp_path), ref)
    forward = [n for n in errs if not n.startswith(("d", "g"))]
    assert all(errs[n] <= tol for n in forward), errs
    assert errs["gmemory0"] > tol and errs["dk"] > tol, errs
