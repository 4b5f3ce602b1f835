"""Named configurations: the Miras models, their hybrids and the baselines of paper Table 1 expressed as
MemorySpecs + gate kinds (docs/math.md Section 6), at a tiny size for tests and at the sizes of paper
Table 5. See docs/models.md for the choices."""

from __future__ import annotations

from ..spec_presets import DELTA, GATED_DELTA, LINEAR_ATTENTION, MEMORA, MONETA, TITANS, YAAD
from ..spec import MemorySpec
from .config import MirasConfig

# Miras models: channel-wise gates, lr = lr_max sigmoid, alpha = sigmoid (bias +4), chunks of 8 tokens.
# Recall needs the inner recurrence, not one mini-batch step per chunk: Titans on MQAR (T 64, 4 pairs, 1200 x 32)
# recalls 100.0% at chunk 8 and 40.2% at 64 (docs/models.md). lr_max 1e-2 puts Memora's inner
# step (5e-3 at init) below the inverse curvature of the residual-LayerNorm memory (~1/180 at head dim 32;
# docs/math.md Section 8, point 15).
_MIRAS_GATES = dict(per_channel_gates=True, lr_gate="sigmoid", alpha_gate="sigmoid", chunk_size=8)
_HEAD = dict(per_channel_gates=False)

MODELS: dict[str, dict] = {
    # Moneta's l_q normaliser averages |A|^q over each tensor instead of summing (norm_mean, docs/math.md
    # Section 8, point 16); its memory starts empty and its lr_max is 1e-2 (docs/models.md, "The Miras presets
    # on MQAR", has the runs that chose each).
    "moneta": dict(memory=MemorySpec(**(MONETA | dict(norm_mean=True))), lr_max=1e-2, memory_init="zero_last",
                   **_MIRAS_GATES),
    # Yaad's bias and retention on Titans' memory (a SiLU MLP, no residual LayerNorm) with Titans' lr_max 0.1,
    # starting empty: MQAR recall 99.9% / 99.8% (seeds 0 / 1) against 34.8% on the paper's residual-LayerNorm
    # memory, barely above guessing among the context's values (docs/models.md, "The Miras presets on MQAR").
    "yaad": dict(memory=MemorySpec(**(YAAD | dict(activation="silu", residual_norm=False))), lr_max=0.1,
                 memory_init="zero_last", **_MIRAS_GATES),
    # Memora's last layer starts at zero logits (uniform softmax rows, so x + LN(f(x)) reads x): MQAR recall
    # 32.7% against 11.6% from N(0, 1/fan_in) logits (docs/models.md, "The Miras presets on MQAR").
    "memora": dict(memory=MemorySpec(**MEMORA), lr_max=1e-2, memory_init="zero_last", **_MIRAS_GATES),
    # Moneta's bias (l_3) and retention (l_4) on a matrix memory: MQAR recall 100% against the MLP memory's
    # 59.9% (docs/models.md, "The Miras presets on MQAR"); lr_max 1 as the delta rules.
    "moneta-matrix": dict(memory=MemorySpec(memory="matrix", bias="lp", p=3.0, retention="lq",
                                                      norm_order=4.0, norm_floor=1.0), lr_max=1.0, **_MIRAS_GATES),
    "transformer": dict(mixer="attention"),
    # o_t = sum_i v_i (k_i . q_t): lr = 1, no retention.
    "linear-attention": dict(memory=MemorySpec(**LINEAR_ATTENTION), lr_gate="one", **_HEAD),
    # RetNet: a fixed decay gamma_h = 1 - 2^(-5 - h) per head, lr = 1.
    "retnet": dict(memory=MemorySpec(memory="matrix", bias="dot", retention="l2"), lr_gate="one",
                   alpha_gate="fixed", **_HEAD),
    # Mamba2 (SSD) as decayed linear attention: dt = softplus(.), alpha = exp(-exp(A_log) dt), lr = dt.
    "mamba2": dict(memory=MemorySpec(memory="matrix", bias="dot", retention="l2"), lr_gate="dt",
                   alpha_gate="decay", **_HEAD),
    # DeltaNet: beta = sigmoid per head; Gated DeltaNet adds Mamba2's decay, gradient at the retained state.
    "deltanet": dict(memory=MemorySpec(**DELTA), lr_gate="sigmoid", lr_max=1.0, **_HEAD),
    "gated-deltanet": dict(memory=MemorySpec(**GATED_DELTA), lr_gate="sigmoid", lr_max=1.0, alpha_gate="decay",
                           **_HEAD),
    # TTT: f(x) = x + LN(f(x)), mini-batch 16, eta = base_lr sigmoid per head (base lr 1.0 linear, 0.1 MLP).
    "ttt-linear": dict(memory=MemorySpec(memory="mlp", layers=1, residual_norm=True, bias="l2", retention="none"),
                       lr_max=1.0, chunk_size=16, **_HEAD),
    "ttt-mlp": dict(memory=MemorySpec(memory="mlp", layers=2, activation="gelu", residual_norm=True, bias="l2",
                                      retention="none"), lr_max=0.1, chunk_size=16, **_HEAD),
    # Titans (LMM): SiLU MLP memory, l2 retention alpha = 1 - a, momentum; data-dependent gates per head. Its
    # memory starts empty (last layer zero, reads 0 as the matrix memories) and, as the Miras presets, it runs
    # chunks of 8: MQAR recall 100.0% against 40.2% at chunk 64 (docs/models.md, "The Miras presets on MQAR").
    "titans": dict(memory=MemorySpec(**TITANS), lr_max=0.1, memory_init="zero_last", chunk_size=8, **_HEAD),
}
HYBRIDS = {"moneta-h": "moneta", "yaad-h": "yaad", "memora-h": "memora"}
PRESETS = ("moneta", "yaad", "memora", "moneta-matrix", "moneta-h", "yaad-h", "memora-h", "transformer", "linear-attention",
           "retnet", "mamba2", "deltanet", "gated-deltanet", "ttt-linear", "ttt-mlp", "titans")

# Table 5 (blocks x dim, 16 heads); 1.3B is our choice (24 x 2048, 16 heads of 128), the GDN/FLA layout.
# vocab 32000 (Llama-2 tokenizer, the FLA baselines'), context 4096, SwiGLU 8/3 dim rounded up to 256.
SIZES: dict[str, dict] = {
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=2, mlp_hidden=128, max_seq_len=256),
    "170M": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=16, max_seq_len=4096),
    "340M": dict(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, max_seq_len=4096),
    "780M": dict(vocab_size=32000, dim=1536, n_layers=24, n_heads=16, max_seq_len=4096),
    "1.3B": dict(vocab_size=32000, dim=2048, n_layers=24, n_heads=16, max_seq_len=4096),
}


def preset(name: str, size: str = "tiny", **overrides) -> MirasConfig:
    """The MirasConfig of a named model at a named size; keyword arguments override any field.

    Pure models use one mixer everywhere; the hybrids (-h) alternate Miras and sliding-window attention
    layer by layer (Samba-style: Miras first); "transformer" is Transformer++ (attention with RoPE).
    """
    if name not in PRESETS:
        raise ValueError(f"name: expected one of {PRESETS}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size: expected one of {tuple(SIZES)}, got {size!r}")
    base = dict(MODELS[HYBRIDS.get(name, name)])
    kwargs = dict(SIZES[size])
    n = overrides.get("n_layers", kwargs["n_layers"])
    mixer = base.pop("mixer", "miras")
    if name in HYBRIDS:
        kwargs["mixers"] = tuple("miras" if i % 2 == 0 else "swa" for i in range(n))
    else:
        kwargs["mixers"] = (mixer,) * n
    kwargs.update(base)
    kwargs.update(overrides)
    return MirasConfig(**kwargs)
