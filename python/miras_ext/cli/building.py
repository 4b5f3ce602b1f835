"""What a run trains: its task and its model config, from its TrainArgs."""

from __future__ import annotations

import torch

from ..models import MirasConfig, MirasForCausalLM, preset
from ..tasks import MQAR, SNIAH, Task, TextLM
from .arguments import TrainArgs, UsageError


def make_task(a: TrainArgs) -> Task:
    if a.task == "mqar":
        return MQAR(a.pairs, a.seq_len, a.seed, a.mqar_vocab, a.mqar_vocab)
    if a.task == "sniah":
        return SNIAH(a.seq_len, tuple(a.needles), a.haystack, a.seed)
    if a.task == "lm":
        return TextLM(a.seq_len, a.data, a.hf_dataset, a.tokenizer, a.max_bytes, a.seed)
    raise UsageError(f"task: expected one of ('mqar', 'sniah', 'lm'), got {a.task!r}")


def make_config(a: TrainArgs, vocab_size: int) -> MirasConfig:
    over = dict(a.overrides)
    over.setdefault("vocab_size", vocab_size)
    over.setdefault("max_seq_len", max(a.seq_len, 64))
    try:
        cfg = preset(a.preset, a.size, **over)
    except TypeError as e:
        raise UsageError(f"set: {e}") from None
    if a.match_params:
        cfg = match_parameters(cfg, a.match_params)
    return cfg


def count(cfg: MirasConfig) -> int:
    with torch.device("meta"):
        return MirasForCausalLM(cfg).num_parameters()


def match_parameters(cfg: MirasConfig, target: int) -> MirasConfig:
    """The config with the SwiGLU hidden size (a multiple of 8) whose parameter count is closest to target."""
    per_unit = 3 * cfg.dim * cfg.n_layers
    base = count(cfg.replace(mlp_hidden=8))
    hidden = max(8, 8 * round((target - base) / per_unit / 8) + 8)
    return cfg.replace(mlp_hidden=hidden)
