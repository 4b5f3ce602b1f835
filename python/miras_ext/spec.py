"""The static choices of a Miras memory (docs/math.md, Section 1): architecture, attentional bias,
retention gate and learning algorithm. One frozen object, validated once, shared by the reference and the
compiled ops."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

BIASES = ("dot", "l2", "lp", "l1", "huber", "huber_norm", "yaad", "value_shift")
# Biases whose loss reads the threshold gate delta.
THRESHOLD_BIASES = ("huber", "huber_norm", "yaad", "value_shift")
MEMORIES = ("vector", "matrix", "mlp")
ACTIVATIONS = ("gelu", "silu")
RETENTIONS = ("none", "l2", "lq", "kl", "elastic_net", "sigmoid")
ALGORITHMS = ("gd", "momentum")
# Retentions whose weights are a nonlinear link phi of the accumulated state (Eq. 3.3).
LINKED_RETENTIONS = ("lq", "kl", "elastic_net", "sigmoid")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")


def _text(value) -> str:
    """A field's value as MemorySpec.encode() writes it."""
    if isinstance(value, bool):
        return str(int(value))
    if value is None:
        return "-1"
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class MemorySpec:
    """What a memory computes; every field is a docs/math.md choice.

    memory:            "vector" (w * k, Eq. 1.1), "matrix" (W k, Eq. 1.2) or "mlp" (Eq. 1.3).
    layers, expansion: MLP depth and hidden width (expansion * Dk); ignored for other memories.
    activation:        MLP nonlinearity, "gelu" (exact, erf) or "silu".
    residual_norm:     MLP read-out x + LayerNorm(f(x)) (Eq. 1.4, the paper's form); needs Dk == Dv.
    ln_eps:            epsilon of that LayerNorm (Eq. 1.4): it bounds the LayerNorm's gain 1 / sqrt(var + ln_eps)
                       when the memory's weights are small (docs/math.md Section 8, point 15).
    bias, p, eps:      attentional bias (Section 2); p for "lp", eps the smoothing of |x| and ||r||.
    retention:         retention gate (Section 3).
    norm_order:        q of the l_q retention (Eq. 3.5).
    norm_floor:        added to sum |A|^q in the l_q normaliser (Eq. 3.5): it bounds ||W|| when the
                       accumulator A is small (docs/math.md Section 8, point 15).
    norm_mean:         average |A|^q over the tensor's entries in that normaliser instead of summing, so the
                       bound on W does not shrink as the tensor grows (Eq. 3.5; Section 8, point 16).
    simplex_scale:     c of the KL retention (Eq. 3.6); None means sqrt(fan_in) per weight tensor.
    shrinkage:         soft-threshold gamma of the elastic-net retention (Eq. 3.7).
    grad_at_retained:  take the gradient at alpha_t * W_{t-1} (Gated DeltaNet) instead of W_{t-1} (Eq. 3.2).
    algorithm:         "gd" (Eq. 4.1) or "momentum" (Titans, Eq. 4.2).
    lag_token:         make the first token of every chunk its own chunk (Memora's lag token, Eq. 5.6).
    minibatch:         take the delta rule's gradients at the chunk's anchor (the paper's Section 5.4
                       approximation, Eq. 5.1) instead of computing the exact recurrence at every chunk size
                       (Eqs. 5.13-5.19). It only matters for the delta-rule family (`exact_chunks`); every
                       other memory always takes its gradients at the anchor.
    """

    memory: str = "matrix"
    layers: int = 2
    expansion: int = 4
    activation: str = "gelu"
    residual_norm: bool = True
    ln_eps: float = 1e-5
    bias: str = "l2"
    p: float = 2.0
    eps: float = 1e-6
    retention: str = "l2"
    norm_order: float = 4.0
    norm_floor: float = 1e-12
    norm_mean: bool = False
    simplex_scale: float | None = None
    shrinkage: float = 1e-3
    grad_at_retained: bool = False
    algorithm: str = "gd"
    lag_token: bool = False
    minibatch: bool = False

    def __post_init__(self) -> None:
        _choice("memory", self.memory, MEMORIES)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("bias", self.bias, BIASES)
        _choice("retention", self.retention, RETENTIONS)
        _choice("algorithm", self.algorithm, ALGORITHMS)
        if not isinstance(self.layers, int) or self.layers < 1:
            raise ValueError(f"layers: expected an integer >= 1, got {self.layers!r}")
        if not isinstance(self.expansion, int) or self.expansion < 1:
            raise ValueError(f"expansion: expected an integer >= 1, got {self.expansion!r}")
        if not (self.p >= 1.0 and math.isfinite(self.p)):
            raise ValueError(f"p: the l_p bias needs a finite p >= 1, got {self.p!r}")
        for name in ("eps", "ln_eps", "norm_floor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
        if not (self.norm_order >= 1.0 and math.isfinite(self.norm_order)):
            raise ValueError(f"norm_order: the l_q retention needs a finite q >= 1, got {self.norm_order!r}")
        if self.simplex_scale is not None and not self.simplex_scale > 0:
            raise ValueError(f"simplex_scale: expected None or > 0, got {self.simplex_scale!r}")
        if not self.shrinkage >= 0:
            raise ValueError(f"shrinkage: expected >= 0, got {self.shrinkage!r}")
        if self.grad_at_retained and (self.retention != "l2" or self.memory == "mlp"):
            raise ValueError("grad_at_retained: the gradient at the retained state is defined for the l2 "
                             f"retention of vector or matrix memory (Eq. 3.2), got retention={self.retention!r}, "
                             f"memory={self.memory!r}")
        # Encoded once, while the fields are plain Python values: torch.compile may trace the int fields of a
        # second spec as symbols, and a string built from symbols is a graph break; a str attribute is a
        # constant with an equality guard.
        object.__setattr__(self, "_encoded", ",".join(f"{f.name}={_text(getattr(self, f.name))}" for f in fields(self)))

    @property
    def linked(self) -> bool:
        """True when the weights are phi(Z) for a nonlinear link phi (Eq. 3.3)."""
        return self.retention in LINKED_RETENTIONS

    @property
    def delta_rule(self) -> bool:
        """Matrix memory, l2 bias, GD, retention none or l2: DeltaNet and Gated DeltaNet (Eqs. 3.1, 3.2),
        whose chunk has the closed form of Eqs. 5.13-5.19."""
        return (self.memory == "matrix" and self.bias == "l2" and self.algorithm == "gd"
                and self.retention in ("none", "l2"))

    @property
    def exact_chunks(self) -> bool:
        """True when every chunk size computes the exact recurrence (Eqs. 5.13-5.19) rather than the
        anchored mini-batch form (Eq. 5.1)."""
        return self.delta_rule and not self.minibatch

    @property
    def uses_threshold(self) -> bool:
        return self.bias in THRESHOLD_BIASES

    @property
    def has_retention_gate(self) -> bool:
        return self.retention != "none"

    @property
    def num_layers(self) -> int:
        """Number of weight tensors of the memory."""
        return self.layers if self.memory == "mlp" else 1

    def weight_shapes(self, dk: int, dv: int) -> list[tuple[int, ...]]:
        """Per-head shape of each weight tensor, [out, in], in the order they are applied (Eq. 1.3)."""
        if self.memory == "vector":
            return [(dk,)]
        if self.memory == "matrix":
            return [(dv, dk)]
        hidden = self.expansion * dk
        dims = [dk] + [hidden] * (self.layers - 1) + [dv]
        return [(dims[i + 1], dims[i]) for i in range(self.layers)]

    def check_dims(self, dk: int, dv: int, per_channel_gates: bool) -> None:
        if self.memory == "vector" and dk != dv:
            raise ValueError(f"v: vector memory maps each channel to itself and needs Dv == Dk, got Dk={dk}, Dv={dv}")
        if self.memory == "mlp" and self.residual_norm and dk != dv:
            raise ValueError(f"v: the residual MLP memory x + LN(f(x)) needs Dv == Dk, got Dk={dk}, Dv={dv}")
        if self.memory == "mlp" and per_channel_gates and (dk != dv or self.layers > 2):
            raise ValueError("lr: per-channel gates on MLP memory scale the first layer's input columns and the last "
                             f"layer's output rows (Eq. 3.4) and need Dk == Dv and layers <= 2; got Dk={dk}, "
                             f"Dv={dv}, layers={self.layers}")

    def gate_axis(self, index: int) -> int:
        """Axis of weight tensor `index` (relative to its per-head shape) that a per-channel gate scales
        (Eq. 3.4): the output rows of the last (or only) layer, the input columns of the first."""
        if self.memory == "vector":
            return 0
        return 0 if index == self.num_layers - 1 else 1

    def encode(self) -> str:
        """The spec as the compiled ops read it: `name=value` pairs joined by commas, every field, in
        declaration order; booleans as 0/1, simplex_scale None as -1."""
        return self._encoded

    @classmethod
    def decode(cls, text: str) -> MemorySpec:
        """The MemorySpec whose encode() is `text` (how the operators' fake registrations read their spec)."""
        defaults = {f.name: f.default for f in fields(cls)}

        def value(name: str, raw: str):
            kind = defaults[name]
            if name == "simplex_scale":
                return None if raw == "-1" else float(raw)
            if isinstance(kind, bool):
                return raw == "1"
            return type(kind)(raw)

        pairs = [item.split("=", 1) for item in text.split(",")]
        return cls(**{name: value(name, raw) for name, raw in pairs})

    def kl_scale(self, shape: tuple[int, ...]) -> float:
        """c of Eq. 3.6 for a weight tensor of this per-head shape: sqrt(fan_in) unless set."""
        return self.simplex_scale if self.simplex_scale is not None else math.sqrt(shape[-1])
