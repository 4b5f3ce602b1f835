"""MirasConfig: every static choice of a Miras language model, validated once (docs/models.md)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

from ..spec import MemorySpec

MIXERS = ("miras", "attention", "swa")
LR_GATES = ("sigmoid", "one", "dt")          # lr_max * sigmoid | constant 1 | dt = softplus (Mamba2)
ALPHA_GATES = ("sigmoid", "fixed", "decay")  # sigmoid (bias +4) | RetNet gamma per head | exp(-exp(A_log) dt)
OUTPUT_GATES = ("silu", "sigmoid")
BACKENDS = ("op", "reference")
MEMORY_INITS = ("normal", "zero_last")      # MLP memory's initial state: every layer N(0, 1/fan_in) | last layer 0


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")


def _positive_float(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")


@dataclass
class MirasConfig:
    """A causal language model of Llama-style blocks whose mixers are Miras memories and/or attention.

    vocab_size, dim, n_layers, n_heads: sizes; head dim = dim // n_heads (Dk = Dv, Eq. 1.4 needs it).
    mixers:            one entry per layer, "miras" | "attention" (full causal, RoPE) | "swa" (sliding
                       window, RoPE); None means every layer "miras".
    memory:            the MemorySpec of the Miras layers (docs/math.md Sections 1-4).
    lr_gate:           "sigmoid" (lr_max * sigmoid, Section 8 point 3), "one" (constant 1: linear attention,
                       RetNet) or "dt" (dt = softplus(. + dt_bias), Mamba2; needs alpha_gate "decay").
    alpha_gate:        "sigmoid" (bias +4, alpha ~ 0.98), "fixed" (RetNet gamma_h = 1 - 2^(-5 - h), a buffer)
                       or "decay" (exp(-exp(A_log) * dt), Mamba2 / Gated DeltaNet). Unused for retention "none".
    memory_init:       the MLP memory's learnable initial state: "normal" (every layer N(0, 1/fan_in)) or
                       "zero_last" (the last layer's tensor zero: the memory reads nothing stored until its
                       first write, x for the residual memory since LN(0) = 0, 0 for a plain MLP, as a matrix
                       memory starts; docs/models.md, "The Miras presets on MQAR"). Matrix and vector memory
                       always start at zero.
    per_channel_gates: lr, alpha, momentum per channel [B, T, H, Dv] (Eq. 3.4) instead of per head.
    gate_rank:         rank r of the gate projections x -> R^r -> R^{H (Dv)}.
    lr_max:            eta_max of the sigmoid learning rate.
    delta_init:        the Huber threshold delta = softplus(.) at init (bias "yaad", "huber", "huber_norm").
    conv_size:         kernel of the causal depthwise convolutions after q, k, v (SiLU after).
    chunk_size:        tokens per chunk of the memory op (Eq. 5.6); 1 is the exact recurrence.
    output_gate:       o = RMSNorm_head(o) * silu(W_g x) ("silu") or * sigmoid(W_g x).
    swa_window:        keys a sliding-window query sees (itself included); None: 2048 when max_seq_len >= 4096,
                       else max(64, max_seq_len // 4) (docs/math.md Section 8 point 13).
    mlp_hidden:        SwiGLU hidden size; None: 8/3 dim rounded up to a multiple of 256 (32 below dim 512).
    norm_eps, rope_theta, tie_embeddings, max_seq_len, initializer_range: as in Llama.
    backend:           "op" (torch.ops.miras_ext, the compiled memory op) or "reference"
                       (miras_ext.reference.chunked, pure PyTorch; slow, for checking only).
    """

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    mixers: tuple[str, ...] | None = None
    memory: MemorySpec = field(default_factory=lambda: MemorySpec(memory="mlp", bias="lp", p=3.0, retention="lq",
                                                                   norm_order=4.0))
    memory_init: str = "normal"
    lr_gate: str = "sigmoid"
    alpha_gate: str = "sigmoid"
    per_channel_gates: bool = True
    gate_rank: int = 32
    lr_max: float = 0.1
    delta_init: float = 1.0
    conv_size: int = 4
    chunk_size: int = 64
    output_gate: str = "silu"
    swa_window: int | None = None
    mlp_hidden: int | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    initializer_range: float = 0.02
    backend: str = "op"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "gate_rank", "conv_size", "chunk_size",
                     "max_seq_len"):
            _positive_int(name, getattr(self, name))
        for name in ("lr_max", "delta_init", "norm_eps", "rope_theta", "initializer_range"):
            _positive_float(name, getattr(self, name))
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.mixers is None:
            self.mixers = ("miras",) * self.n_layers
        if isinstance(self.mixers, str) or not isinstance(self.mixers, (tuple, list)):
            raise ValueError(f"mixers: expected a list of {self.n_layers} names from {MIXERS}, got {self.mixers!r}")
        self.mixers = tuple(self.mixers)
        if len(self.mixers) != self.n_layers:
            raise ValueError(f"mixers: expected one entry per layer (n_layers={self.n_layers}), "
                             f"got {len(self.mixers)}")
        for i, m in enumerate(self.mixers):
            if m not in MIXERS:
                raise ValueError(f"mixers: layer {i}: expected one of {MIXERS}, got {m!r}")
        if isinstance(self.memory, dict):
            self.memory = MemorySpec(**self.memory)  # validated by MemorySpec (p >= 1, known names, ...)
        if not isinstance(self.memory, MemorySpec):
            raise ValueError(f"memory: expected a MemorySpec or a dict of its fields, got {type(self.memory).__name__}")
        for name, value, allowed in (("lr_gate", self.lr_gate, LR_GATES), ("alpha_gate", self.alpha_gate, ALPHA_GATES),
                                     ("output_gate", self.output_gate, OUTPUT_GATES),
                                     ("backend", self.backend, BACKENDS),
                                     ("memory_init", self.memory_init, MEMORY_INITS)):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        if self.lr_gate == "dt" and (self.alpha_gate != "decay" or not self.memory.has_retention_gate):
            raise ValueError("lr_gate: 'dt' (Mamba2, lr = dt) shares dt with alpha_gate 'decay' and needs a "
                             f"retention gate, got alpha_gate={self.alpha_gate!r}, retention={self.memory.retention!r}")
        if self.per_channel_gates and (self.lr_gate == "dt" or self.alpha_gate in ("fixed", "decay")):
            raise ValueError("per_channel_gates: lr_gate 'dt' and alpha_gate 'fixed'/'decay' are per head; "
                             "set per_channel_gates=False")
        if self.memory.memory == "vector" and self.backend == "op":
            raise ValueError("memory: vector memory runs only in the pure-PyTorch reference; "
                             "set backend='reference' or use memory='matrix'/'mlp'")
        if "miras" in self.mixers:
            try:
                self.memory.check_dims(self.head_dim, self.head_dim, self.per_channel_gates)
            except ValueError as e:
                raise ValueError(f"memory: {e}") from None
        if self.swa_window is not None:
            _positive_int("swa_window", self.swa_window)
        if self.mlp_hidden is not None:
            _positive_int("mlp_hidden", self.mlp_hidden)
        for name in ("per_channel_gates", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def window(self) -> int:
        """The sliding window in tokens (swa_window, or the Section 8 point 13 default)."""
        if self.swa_window is not None:
            return self.swa_window
        return 2048 if self.max_seq_len >= 4096 else max(64, self.max_seq_len // 4)

    @property
    def hidden(self) -> int:
        """SwiGLU hidden size."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        multiple = 256 if self.dim >= 512 else 32
        return -(-(8 * self.dim // 3) // multiple) * multiple

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["memory"] = dataclasses.asdict(self.memory)
        out["mixers"] = list(self.mixers)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "MirasConfig":
        d = dict(d)
        if isinstance(d.get("memory"), dict):
            d["memory"] = MemorySpec(**d["memory"])
        return cls(**d)

    def replace(self, **changes) -> "MirasConfig":
        return dataclasses.replace(self, **changes)
