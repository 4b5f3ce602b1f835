"""Random inputs for a MemorySpec and small comparison helpers, shared by the tests of the reference.

Imports only miras_ext.spec / state / reference, so the tests run against a source tree or an installed
build alike.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Callable

import pytest
import torch

from miras_ext.spec import MemorySpec
from miras_ext.state import MemoryState

GATE_NAMES = ("lr", "alpha", "momentum", "delta")


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one intra-op thread. The tensors here are tiny; on a small shared machine torch's
    thread pool makes ops like softmax and layer_norm ~100x slower (milliseconds each) than one thread.
    Imported by each test module, so it applies to this suite only."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are empty or zero)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    den = b.norm().item()
    num = (a - b).norm().item()
    if den == 0.0:
        return num
    return num / den


def state_rel(a: MemoryState, b: MemoryState, check_position: bool = True) -> float:
    """Largest rel over every tensor of two final states (memory, momentum, anchor); asserts the tuple
    lengths and the positions agree."""
    worst = 0.0
    for field in ("memory", "momentum", "anchor"):
        xs, ys = getattr(a, field), getattr(b, field)
        assert len(xs) == len(ys), (field, len(xs), len(ys))
        for x, y in zip(xs, ys):
            worst = max(worst, rel(x, y))
    if check_position:
        assert torch.equal(a.position, b.position), (a.position, b.position)
    return worst


@dataclasses.dataclass
class Inputs:
    """One call's arguments: q, k, v, the gates (None where the spec has none) and the initial state."""

    spec: MemorySpec
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gates: dict
    initial_state: tuple | None

    def leaves(self) -> dict[str, torch.Tensor]:
        """Every tensor input by name (gates and initial-state layers included), for gradients."""
        out = {"q": self.q, "k": self.k, "v": self.v}
        out.update({n: g for n, g in self.gates.items() if g is not None})
        if self.initial_state is not None:
            out.update({f"initial_state[{i}]": x for i, x in enumerate(self.initial_state)})
        return out

    def requires_grad_(self) -> "Inputs":
        for x in self.leaves().values():
            x.requires_grad_(True)
        return self

    def cast(self, dtype: torch.dtype) -> "Inputs":
        """The same inputs in another dtype (detached copies)."""
        c = lambda x: None if x is None else x.detach().to(dtype)  # noqa: E731
        return Inputs(self.spec, c(self.q), c(self.k), c(self.v), {n: c(g) for n, g in self.gates.items()},
                      None if self.initial_state is None else tuple(c(x) for x in self.initial_state))

    def slice_t(self, start: int, end: int) -> "Inputs":
        """Tokens [start, end) of every per-token input; the initial state is kept."""
        s = lambda x: None if x is None else x[:, start:end]  # noqa: E731
        return Inputs(self.spec, s(self.q), s(self.k), s(self.v), {n: s(g) for n, g in self.gates.items()},
                      self.initial_state)

    def call(self, fn: Callable, **kwargs):
        """fn(q, k, v, spec, lr, alpha, momentum, delta, initial_state=..., **kwargs)."""
        kwargs.setdefault("initial_state", self.initial_state)
        return fn(self.q, self.k, self.v, self.spec, self.gates["lr"], self.gates["alpha"],
                  self.gates["momentum"], self.gates["delta"], **kwargs)


def _uniform(shape, low: float, high: float, gen: torch.Generator, dtype) -> torch.Tensor:
    return (low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)


def make_inputs(spec: MemorySpec, *, B: int = 2, T: int = 11, H: int = 2, dk: int = 4, dv: int | None = None,
                per_channel: bool = False, delta_per_channel: bool = False, dtype: torch.dtype = torch.float64,
                seed: int = 0, init: str | None = None, init_batch: bool = True, n_states: int | None = None,
                lr: tuple[float, float] = (0.0, 0.5), alpha: tuple[float, float] = (0.6, 1.0),
                momentum: tuple[float, float] = (0.0, 0.9), init_scale: float = 0.3) -> Inputs:
    """Random inputs for `spec`.

    q, k: l2-normalised along Dk; v standard normal. Gates in their valid ranges: lr in [0, 0.5], alpha in
    [0.6, 1], momentum in [0, 0.9], delta > 0 on the scale of the residuals at the start (per element for
    "huber", of the residual norm otherwise), so that some tokens fall on each side of the threshold.

    init: None picks "random" for MLP memory (which needs initial weights) and for the linked retentions
    l_q / KL (whose link is singular or saturates at a zero state), else "zeros" (initial_state None).
    "random" draws N(0, 1) * init_scale weights of shape [N, H, *shape] (init_batch) or [H, *shape].
    n_states: N of the initial state (default B; the number of sequences with cu_seqlens).
    """
    dv = dk if dv is None else dv
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(shape, generator=gen, dtype=torch.float64)  # noqa: E731

    q = torch.nn.functional.normalize(randn(B, T, H, dk), dim=-1)
    k = torch.nn.functional.normalize(randn(B, T, H, dk), dim=-1)
    v = randn(B, T, H, dv)
    gshape = (B, T, H, dv) if per_channel else (B, T, H)
    gates = {"lr": _uniform(gshape, *lr, gen, torch.float64)}
    gates["alpha"] = _uniform(gshape, *alpha, gen, torch.float64) if spec.has_retention_gate else None
    gates["momentum"] = _uniform(gshape, *momentum, gen, torch.float64) if spec.algorithm == "momentum" else None
    if spec.uses_threshold:
        if spec.bias == "huber":
            # |r_i| is about |v_i| ~ |N(0, 1)| at the start: median 0.67.
            dshape = (B, T, H, dv) if delta_per_channel else (B, T, H)
            gates["delta"] = _uniform(dshape, 0.2, 1.4, gen, torch.float64)
        else:
            # ||r|| is about ||v|| ~ sqrt(Dv) at the start.
            gates["delta"] = _uniform((B, T, H), 0.4, 1.6, gen, torch.float64) * math.sqrt(dv)
    else:
        gates["delta"] = None

    if init is None:
        init = "random" if spec.memory == "mlp" or spec.retention in ("lq", "kl") else "zeros"
    initial_state = None
    if init == "random":
        n = B if n_states is None else n_states
        lead = (n, H) if init_batch else (H,)
        initial_state = tuple(randn(*lead, *s) * init_scale for s in spec.weight_shapes(dk, dv))
    c = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return Inputs(spec, c(q), c(k), c(v), {n: c(g) for n, g in gates.items()},
                  None if initial_state is None else tuple(c(x) for x in initial_state))


def spec_id(spec: MemorySpec) -> str:
    """A short readable id: the fields that differ from MemorySpec()'s defaults."""
    default = MemorySpec()
    parts = [f"{f.name}={getattr(spec, f.name)}" for f in dataclasses.fields(spec)
             if getattr(spec, f.name) != getattr(default, f.name)]
    return ",".join(parts) or "default"


def cotangent_loss(o: torch.Tensor, state: MemoryState | None, seed: int = 1) -> torch.Tensor:
    """<random, o> + <random, every tensor of the final state>: a scalar whose gradient pulls a random
    cotangent back through the output and the whole final state."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda x: torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)  # noqa: E731
    total = (rnd(o) * o).sum()
    if state is not None:
        for x in (*state.memory, *state.momentum, *state.anchor):
            total = total + (rnd(x) * x).sum()
    return total


def forward_and_grads(fn, inp: Inputs, **kwargs) -> tuple:
    """fn on float64 copies of `inp`: (o, final state, {input name: gradient of cotangent_loss})."""
    x = inp.cast(torch.float64).requires_grad_()
    o, state = x.call(fn, output_final_state=True, **kwargs)
    leaves = x.leaves()
    grads = torch.autograd.grad(cotangent_loss(o, state), list(leaves.values()), allow_unused=True)
    return o, state, dict(zip(leaves, grads))


# ---------------------------------------------------------------------------------------------------------
# Pairwise coverage of the spec choices.

FACTORS: dict[str, tuple] = {
    "memory": ("vector", "matrix", "mlp"),
    "bias": ("dot", "l2", "lp", "l1", "huber", "huber_norm", "yaad", "value_shift"),
    "retention": ("none", "l2", "lq", "kl", "elastic_net", "sigmoid"),
    "algorithm": ("gd", "momentum"),
    "per_channel": (False, True),
    "grad_at_retained": (False, True),
    "lag_token": (False, True),
}


def valid_combo(combo: dict) -> bool:
    return not combo.get("grad_at_retained") or (combo.get("retention") == "l2" and combo.get("memory") != "mlp")


@functools.lru_cache(maxsize=None)
def _pairwise() -> tuple:
    return tuple(_greedy_pairwise())


def pairwise_combos() -> list[dict]:
    """A deterministic greedy covering array: every valid pair of values of two FACTORS occurs in some
    combination (checked by tests), in about 50 combinations instead of the 1280 valid ones of the full product."""
    return [dict(c) for c in _pairwise()]


def _greedy_pairwise() -> list[dict]:

    names = list(FACTORS)
    full = [dict(zip(names, values)) for values in itertools.product(*FACTORS.values())]
    full = [c for c in full if valid_combo(c)]

    def pairs(c: dict) -> set:
        return {(a, c[a], b, c[b]) for a, b in itertools.combinations(names, 2)}

    covers = [pairs(c) for c in full]
    uncovered = set().union(*covers)
    chosen = []
    while uncovered:
        scores = [len(p & uncovered) for p in covers]
        top = max(scores)
        ties = [i for i, s in enumerate(scores) if s == top]
        # Rotate through the ties so that the values left free vary from one combination to the next.
        pick = ties[(len(chosen) * 37) % len(ties)]
        chosen.append(full[pick])
        uncovered -= covers[pick]
    return chosen


def combo_spec(combo: dict, index: int) -> tuple[MemorySpec, dict]:
    """The MemorySpec of a combination and make_inputs keywords. Secondary choices rotate with `index`:
    the MLP activation, the l_p exponent, and a per-channel delta for "huber"; matrix memory gets Dk != Dv."""
    kw = {k: v for k, v in combo.items() if k != "per_channel"}
    if combo["memory"] == "mlp":
        kw["activation"] = ("gelu", "silu")[index % 2]
        kw["expansion"] = 2
    if combo["bias"] == "lp":
        kw["p"] = (3.0, 1.5)[index % 2]
    spec = MemorySpec(**kw)
    inputs = {"per_channel": combo["per_channel"], "dk": 4, "dv": 3 if combo["memory"] == "matrix" else 4,
              "delta_per_channel": combo["bias"] == "huber" and index % 2 == 0, "seed": index}
    return spec, inputs


def combo_id(combo: dict) -> str:
    parts = [combo["memory"], combo["bias"], f"ret={combo['retention']}", combo["algorithm"]]
    if combo["per_channel"]:
        parts.append("perch")
    if combo["grad_at_retained"]:
        parts.append("gar")
    if combo["lag_token"]:
        parts.append("lag")
    return "-".join(parts)


def kink_margin(inp: Inputs, chunk_size: int) -> float:
    """Smallest | |r| / delta - 1 | over the tokens of `inp`, r the residual M(W, k_t) - v_t at the weights
    each token's gradient is taken at (its chunk's anchor), |r| per element for a per-channel "huber"
    delta and the norm of r otherwise; inf for a bias without threshold. Finite differences of a
    Huber-type loss are only meaningful where this is well above the step. Runs reference.recurrent on
    every prefix to get the anchors (no grad_at_retained)."""
    from miras_ext.reference import recurrent
    from miras_ext.reference.memory import apply
    from miras_ext.reference.retention import link

    spec, delta = inp.spec, inp.gates["delta"]
    if delta is None:
        return float("inf")
    assert not spec.grad_at_retained
    shapes = spec.weight_shapes(inp.k.shape[-1], inp.v.shape[-1])
    worst = float("inf")
    with torch.no_grad():
        for t in range(inp.q.shape[1]):
            _, state = inp.slice_t(0, t).call(recurrent, chunk_size=chunk_size, output_final_state=True)
            phase = t % chunk_size
            fresh = phase == 0 or (spec.lag_token and phase == 1)
            anchor = state.memory if fresh else state.anchor
            weights = [link(spec, a, s) for a, s in zip(anchor, shapes)]
            r = apply(spec, weights, inp.k[:, t].to(weights[0].dtype)) - inp.v[:, t]
            d = delta[:, t]
            size = r.abs() if (spec.bias == "huber") else r.norm(dim=-1)
            if spec.bias == "huber" and d.dim() == 2:
                d = d.unsqueeze(-1)
            worst = min(worst, (size / d - 1).abs().min().item())
    return worst
