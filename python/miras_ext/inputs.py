"""Validation of a memory call's arguments, shared by the reference and the compiled ops.

Every problem is a ValueError that names the argument and says what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .spec import MemorySpec
from .state import MemoryState

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
GATES = ("lr", "alpha", "momentum", "delta")
# The operators take chunk_size as a C++ int64 and add T to it; any length a call can have fits below this.
MAX_CHUNK = 2**31 - 1


@dataclass
class Call:
    """A validated call: q, k, v as given (the compiled op converts them itself, the references with
    compute_dtype), gates in the compute dtype as [N, T, H] or [N, T, H, D], and the initial state expanded
    to one entry per sequence."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gates: dict[str, torch.Tensor | None]
    state: MemoryState
    out_dtype: torch.dtype
    per_channel: bool
    chunk_size: int


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation dtype: float64 stays, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(name: str, x, rank: int, dims: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {dims}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name}: expected rank {rank} with shape {dims}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype in {FLOAT_DTYPES}, got {x.dtype}")
    return x


class NonFiniteError(ValueError):
    """A gate holds NaN or infinity: what a model whose training diverged passes on to its memory."""


def _check_range(name: str, x: torch.Tensor, low: float, high: float, low_open: bool, high_open: bool) -> None:
    # Value checks read the data; under torch.compile they would break the graph, so only eager calls run them.
    if x.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = (m.item() for m in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise NonFiniteError(f"{name}: values must be finite, got min {lo:.4g}, max {hi:.4g}")
    bad_low = lo <= low if low_open else lo < low
    bad_high = hi >= high if high_open else hi > high
    if bad_low or bad_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}: values must lie in {interval}, got min {lo:.4g}, max {hi:.4g}")


_GATE_RANGES = {
    "lr": (0.0, float("inf"), False, True),
    "alpha": (0.0, 1.0, True, False),
    "momentum": (0.0, 1.0, False, True),
    "delta": (0.0, float("inf"), True, True),
}


def _needed(spec: MemorySpec) -> dict[str, str | None]:
    """For each gate, None when it is required, else why it must be absent."""
    return {
        "lr": None,
        "alpha": None if spec.has_retention_gate else "retention 'none' has no retention gate",
        "momentum": None if spec.algorithm == "momentum" else "algorithm 'gd' has no momentum gate",
        "delta": None if spec.uses_threshold else f"bias {spec.bias!r} has no threshold gate",
    }


def _check_gates(gates: dict, spec: MemorySpec, q: torch.Tensor, dv: int) -> tuple[dict, bool]:
    b, t, h, _ = q.shape
    out, per_channel = {}, None
    for name, why_absent in _needed(spec).items():
        g = gates[name]
        if why_absent is not None:
            if g is not None:
                raise ValueError(f"{name}: {why_absent}; pass {name}=None")
            out[name] = None
            continue
        if g is None:
            raise ValueError(f"{name}: required for bias={spec.bias!r}, retention={spec.retention!r}, "
                             f"algorithm={spec.algorithm!r}; expected [B, T, H] or [B, T, H, Dv]")
        if not isinstance(g, torch.Tensor) or g.dim() not in (3, 4):
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"{name}: expected shape [B, T, H] = {[b, t, h]} or [B, T, H, Dv] = {[b, t, h, dv]}, "
                             f"got {shape}")
        if tuple(g.shape[:3]) != (b, t, h) or (g.dim() == 4 and g.shape[3] != dv):
            raise ValueError(f"{name}: expected shape [B, T, H] = {[b, t, h]} or [B, T, H, Dv] = {[b, t, h, dv]}, "
                             f"got {list(g.shape)}")
        if not g.is_floating_point():
            raise ValueError(f"{name}: expected a floating dtype, got {g.dtype}")
        if g.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (that of q), got {g.device}")
        _check_range(name, g.detach(), *_GATE_RANGES[name])
        if name == "delta":
            if g.dim() == 4 and spec.bias != "huber":
                raise ValueError(f"delta: bias {spec.bias!r} compares the residual's norm with one threshold per "
                                 "head; a per-channel delta [B, T, H, Dv] needs bias 'huber' (Eq. 2.5)")
        elif per_channel is None:
            per_channel = g.dim() == 4
        elif per_channel != (g.dim() == 4):
            raise ValueError(f"{name}: gates lr, alpha and momentum must all be per head [B, T, H] or all per "
                             "channel [B, T, H, Dv]")
        out[name] = g
    return out, bool(per_channel)


def check_cu_seqlens(cu_seqlens, length: int) -> int:
    """The number of sequences N that offsets cu_seqlens [N + 1] pack into `length` tokens."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens: expected a 1-D integer tensor [N + 1] of sequence offsets")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected dtype int32 or int64, got {cu_seqlens.dtype}")
    if torch.compiler.is_compiling():  # the offsets' values are data; eager calls check them
        return cu_seqlens.numel() - 1
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != length or any(a > b for a, b in zip(c, c[1:])):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to T={length}, got {c}")
    return len(c) - 1


def _expand(name: str, x, n: int, h: int, shape: tuple[int, ...], dtype, device) -> torch.Tensor:
    want = f"[N, H, *{list(shape)}] = {[n, h, *shape]} or [H, *{list(shape)}]"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor {want}, got {type(x).__name__}")
    if tuple(x.shape) == (h, *shape):
        x = x.unsqueeze(0)
    if tuple(x.shape[1:]) != (h, *shape) or x.shape[0] not in (1, n):
        raise ValueError(f"{name}: expected shape {want}, got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name}: expected device {device} (that of q), got {x.device}")
    return x.to(dtype).expand(n, *x.shape[1:])


def _initial_state(initial_state, spec: MemorySpec, n: int, h: int, dk: int, dv: int, dtype, device,
                   chunk_size: int) -> MemoryState:
    shapes = spec.weight_shapes(dk, dv)
    nmom = len(shapes) if spec.algorithm == "momentum" else 0
    if initial_state is None:
        if spec.memory == "mlp":
            raise ValueError("initial_state: MLP memory needs initial weights; all-zero weights have zero "
                             "gradients and never learn (docs/math.md, Section 1)")
        memory = tuple(torch.zeros(n, h, *s, dtype=dtype, device=device) for s in shapes)
        position = torch.zeros(n, dtype=torch.int64, device=device)
        return MemoryState(memory, tuple(torch.zeros_like(m) for m in memory[:nmom]), memory, position)
    if isinstance(initial_state, MemoryState):
        made = initial_state.chunk_size
        if made is not None and made != chunk_size:
            raise ValueError(f"initial_state: made with chunk_size={made}, continued with chunk_size={chunk_size}; "
                             f"its anchor and chunk phase belong to chunks of {made}, so pass chunk_size={made}")
        fields = [("memory", initial_state.memory, len(shapes)), ("momentum", initial_state.momentum, nmom),
                  ("anchor", initial_state.anchor, len(shapes))]
        parts = []
        for field, tensors, count in fields:
            if not isinstance(tensors, (tuple, list)) or len(tensors) != count:
                raise ValueError(f"initial_state.{field}: expected {count} tensors, one per weight tensor "
                                 f"{shapes}, got {len(tensors) if isinstance(tensors, (tuple, list)) else tensors}")
            parts.append(tuple(_expand(f"initial_state.{field}[{i}]", x, n, h, shapes[i], dtype, device)
                               for i, x in enumerate(tensors)))
        pos = initial_state.position
        if not isinstance(pos, torch.Tensor) or pos.dtype != torch.int64 or tuple(pos.shape) != (n,):
            raise ValueError(f"initial_state.position: expected an int64 tensor of shape [{n}]")
        return MemoryState(*parts, pos.to(device))
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != len(shapes):
        raise ValueError(f"initial_state: expected a MemoryState or a tuple of {len(shapes)} tensors with "
                         f"per-head shapes {shapes}")
    memory = tuple(_expand(f"initial_state[{i}]", x, n, h, shapes[i], dtype, device)
                   for i, x in enumerate(initial_state))
    position = torch.zeros(n, dtype=torch.int64, device=device)
    return MemoryState(memory, tuple(torch.zeros_like(m) for m in memory[:nmom]), memory, position)


def chunk_phase(position: torch.Tensor, chunk_size: int) -> int:
    """The offset within its chunk that every sequence of a padded batch shares (Eq. 5.6); the chunked
    algorithm runs one chunk schedule for the whole batch."""
    phases = torch.remainder(position, chunk_size)
    if (phases != phases[0]).any():
        raise ValueError("initial_state.position: every sequence of a batch must be at the same offset "
                         f"within its chunk of {chunk_size}, got positions {position.tolist()}")
    return int(phases[0])


def check_call(q, k, v, lr, alpha, momentum, delta, spec: MemorySpec, scale: float, initial_state,
               chunk_size: int, cu_seqlens) -> Call:
    """Validate every argument of a memory call (shapes as in the reference's docstrings)."""
    if not isinstance(spec, MemorySpec):
        raise ValueError(f"spec: expected a MemorySpec, got {type(spec).__name__}")
    q = _check_tensor("q", q, 4, "[B, T, H, Dk]")
    k = _check_tensor("k", k, 4, "[B, T, H, Dk]")
    v = _check_tensor("v", v, 4, "[B, T, H, Dv]")
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {list(q.shape)}, got {list(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: expected [B, T, H] = {list(q.shape[:3])} like q, got {list(v.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (that of q), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (that of q), got {x.device}")
    if q.is_meta:
        raise ValueError("q: expected a tensor with data, got one on the meta device (the gates' ranges and the "
                         "non-finite cut read the values)")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size: expected an integer in [1, {MAX_CHUNK}], got {chunk_size!r}")
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale: expected a float > 0, got {scale!r}")
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    gates, per_channel = _check_gates({"lr": lr, "alpha": alpha, "momentum": momentum, "delta": delta}, spec, q, dv)
    spec.check_dims(dk, dv, per_channel)
    if cu_seqlens is not None and b != 1:
        raise ValueError(f"q: with cu_seqlens the sequences are packed along T and B must be 1, got B={b}")
    n = b if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q.shape[1])
    dtype = compute_dtype(q.dtype)
    state = _initial_state(initial_state, spec, n, h, dk, dv, dtype, q.device, chunk_size)
    gates = {name: None if g is None else g.to(dtype) for name, g in gates.items()}
    return Call(q, k, v, gates, state, q.dtype, per_channel, chunk_size)
