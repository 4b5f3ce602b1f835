"""The arguments of a run (TrainArgs), and the parsed arguments of `miras train` and `miras compare` as the
TrainArgs of a run: one translation shared by both commands. No torch here: `miras --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

DEFAULT_LEN = dict(mqar=32, sniah=256, lm=256)
DEFAULT_LR = dict(mqar=1e-2, sniah=1e-2, lm=3e-3)


class UsageError(ValueError):
    """A bad argument: reported as one line by the CLI."""


@dataclass
class TrainArgs:
    preset: str = "moneta-matrix"
    size: str = "tiny"
    overrides: dict = field(default_factory=dict)     # MirasConfig fields
    match_params: int | None = None                   # widen the SwiGLU to reach this many parameters
    task: str = "mqar"
    pairs: int = 4
    mqar_vocab: int = 16                              # keys and values each drawn from this many
    seq_len: int = 32
    needles: list = field(default_factory=lambda: ["passkey", "number", "word"])
    haystack: str = "noise"
    data: list | None = None
    hf_dataset: str | None = None
    tokenizer: str = "bytes"
    max_bytes: int = 4_000_000
    steps: int = 150
    batch_size: int = 32                              # global, in sequences per optimizer step
    grad_accum: int = 1
    lr: float = 1e-2
    min_lr_ratio: float = 0.1
    warmup: int = 15
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 0                               # 0: only at the end
    log_every: int = 10
    out: str = "runs/train"
    resume: bool = False
    overwrite: bool = False                           # replace a run already in `out`
    stop_at: int | None = None                        # stop (and save) at this step, as if interrupted
    device: str = "auto"
    threads: int = 0
    fsdp: bool = False
    plot: bool = True
    quiet: bool = False


def train_args_from(ns, preset_name: str, out: str, **extra):
    """The TrainArgs of one run of `miras train` or of one cell of `miras compare`, from their parsed
    arguments `ns`; `extra` overrides fields (a cell's length and pairs)."""
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
