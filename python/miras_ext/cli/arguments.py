"""The parsed arguments of `miras train` and `miras compare` as the TrainArgs of a run: one translation
shared by both commands."""

from __future__ import annotations

from dataclasses import fields

DEFAULT_LEN = dict(mqar=32, sniah=256, lm=256)
DEFAULT_LR = dict(mqar=1e-2, sniah=1e-2, lm=3e-3)


def train_args_from(ns, preset_name: str, out: str, **extra):
    """The TrainArgs of one run of `miras train` or of one cell of `miras compare`, from their parsed
    arguments `ns`; `extra` overrides fields (a cell's length and pairs)."""
    from .trainer import TrainArgs  # torch and the models load when a run starts, not for `miras --help`
    seq_len = ns.seq_len or DEFAULT_LEN[ns.task]
    warmup = ns.warmup if ns.warmup is not None else max(1, ns.steps // 10)
    kw = dict(preset=preset_name, size=ns.size, overrides=dict(ns.overrides), task=ns.task, pairs=ns.pairs, mqar_vocab=ns.mqar_vocab,
              seq_len=seq_len, needles=list(ns.needles), haystack=ns.haystack, data=ns.data,
              hf_dataset=ns.hf_dataset, tokenizer=ns.tokenizer, max_bytes=ns.max_bytes, steps=ns.steps,
              batch_size=ns.batch_size, grad_accum=ns.grad_accum, lr=ns.lr or DEFAULT_LR[ns.task], warmup=warmup,
              weight_decay=ns.weight_decay, clip=ns.clip, seed=ns.seed, eval_every=ns.eval_every,
              eval_batches=ns.eval_batches, log_every=ns.log_every, out=out, device=ns.device,
              threads=ns.threads, plot=not ns.no_plot, quiet=ns.quiet)
    for name in ("save_every", "resume", "stop_at", "fsdp", "match_params", "overwrite"):
        if hasattr(ns, name):
            kw[name] = getattr(ns, name)
    kw.update(extra)
    known = {f.name for f in fields(TrainArgs)}
    return TrainArgs(**{k: v for k, v in kw.items() if k in known})
