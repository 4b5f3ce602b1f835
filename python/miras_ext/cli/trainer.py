"""The training loop of `miras train` (its arguments in cli/arguments.py, its model and task in cli/building.py,
optimiser and schedule in cli/optim.py, evaluation in cli/evaluation.py, checkpoints in cli/checkpoint_io.py,
DDP/FSDP in cli/distributed.py): AdamW with warmup + cosine decay, gradient clipping and accumulation,
bfloat16 autocast on GPU, periodic evaluation, checkpoints with exact resume, metrics as JSON lines, and
DistributedDataParallel / FSDP2 under torchrun.

Exact resume: a batch is a pure function of (task seed, step) (miras_ext.tasks), the learning rate a pure
function of the step, and a checkpoint holds the weights (safetensors), the optimizer state and the RNG
state; a run resumed from step s therefore takes the same steps as one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..inputs import NonFiniteError
from ..models import MirasForCausalLM
from ..tasks import IGNORE, Task, TextLM
from . import checkpoint
from .arguments import TrainArgs, UsageError
from .building import count, make_config, make_task
from .checkpoint_io import TOKENIZER, save_checkpoint
from .distributed import dist_env, full_state_dict, init_distributed, wrap
from .evaluation import evaluate
from .optim import decay_groups, lr_at
from .progress import Progress


class Diverged(RuntimeError):
    """Training produced a non-finite loss or gradient."""


def set_threads(n: int) -> None:
    """torch's CPU thread count (0: leave torch's choice)."""
    if n:
        torch.set_num_threads(n)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", dist_env()[2]) if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device: {name} requested but torch has no CUDA device here")
    return torch.device(name)


class Trainer:
    def __init__(self, a: TrainArgs, task: Task | None = None):
        self.a = a
        set_threads(a.threads)
        if a.steps < 1:
            raise UsageError(f"steps: expected >= 1, got {a.steps}")
        self.device = pick_device(a.device)
        init_distributed(self.device)
        self.rank, self.world, _ = dist_env()
        if a.batch_size % (self.world * a.grad_accum):
            raise UsageError(f"batch-size: {a.batch_size} is not divisible by world size x grad-accum = "
                             f"{self.world} x {a.grad_accum}")
        self.micro = a.batch_size // (self.world * a.grad_accum)
        self.out = Path(a.out)
        saved = checkpoint.newest(self.out) if a.resume else None
        if saved is not None and (saved / TOKENIZER).exists():  # continue with the BPE the run trained
            a = replace(a, tokenizer=str(saved / TOKENIZER))
        try:
            self.task = task or make_task(a)
        except ValueError as e:
            raise UsageError(str(e)) from None
        try:
            self.config = make_config(a, self.task.vocab_size)
        except ValueError as e:
            raise UsageError(str(e)) from None
        torch.manual_seed(a.seed)
        self.model = MirasForCausalLM(self.config).to(self.device)
        self.n_params = self.model.num_parameters()
        self.wrapped = wrap(self.model, a.fsdp, self.device)
        self.optimizer = torch.optim.AdamW(decay_groups(self.model, a.weight_decay), lr=a.lr, betas=tuple(a.betas),
                                           weight_decay=a.weight_decay)
        self.autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.device.type == "cuda"
                         else nullcontext)
        self.step, self.tokens, self.elapsed = 0, 0, 0.0

    # -- pieces the tests drive directly
    def global_batch(self, step: int):
        return self.task.batch(step, self.a.batch_size, "train")

    def accumulate(self, step: int) -> float:
        """Forward and backward of this rank's share of step's global batch, in grad_accum micro-batches, each
        loss weighted by its share of the global batch's labelled tokens: after DDP's mean over ranks the
        gradient is that of the mean loss over the whole global batch. Returns the global mean loss."""
        ids, labels = self.global_batch(step)
        n_global = max(int((labels[:, 1:] != IGNORE).sum()), 1)
        lo = self.rank * self.micro * self.a.grad_accum
        total = torch.zeros((), dtype=torch.float64)
        for m in range(self.a.grad_accum):
            sl = slice(lo + m * self.micro, lo + (m + 1) * self.micro)
            x, y = ids[sl].to(self.device), labels[sl].to(self.device)
            n = int((y[:, 1:] != IGNORE).sum())
            last = m == self.a.grad_accum - 1
            sync = nullcontext() if last or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
            with sync:
                with self.autocast():
                    loss = self.wrapped(x, labels=y).loss
                if n == 0:
                    loss = loss.nan_to_num(0.0) * 0
                (loss * (n * self.world / n_global)).backward()
            total += float(loss.detach()) * n / n_global
        if self.world > 1:
            dist.all_reduce(total)
        return float(total)

    def train_step(self) -> dict:
        lr = lr_at(self.step, self.a)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        try:
            loss = self.accumulate(self.step)
        except NonFiniteError as e:  # the forward overflowed inside a layer (e.g. a memory's inner loop)
            raise Diverged(f"the forward pass became non-finite at step {self.step + 1} ({e}); lower --lr") from e
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.a.clip)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if not math.isfinite(float(norm)):
            # An update with it would make every parameter NaN; stop with the step that diverged.
            raise Diverged(f"the gradient norm became {float(norm)} at step {self.step + 1}; lower --lr")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.elapsed += dt
        self.step += 1
        n_tok = self.a.batch_size * self.task.seq_len
        self.tokens += n_tok
        return dict(step=self.step, loss=loss, lr=lr, grad_norm=float(norm), tokens=self.tokens,
                    tokens_per_s=n_tok / dt)

    def evaluate(self, seq_len: int | None = None) -> dict:
        return evaluate(self.model, self.task, self.a.eval_batches, min(self.a.batch_size, 32), self.device, seq_len,
                        self.autocast)

    def meta(self) -> dict:
        args = asdict(self.a)
        return dict(model=self.config.to_dict(), preset=self.a.preset, size=self.a.size, task=self.task.describe(),
                    train=args, parameters=self.n_params)

    def save(self) -> None:
        save_checkpoint(self.out, self.wrapped, self.optimizer, self.step, self.meta(),
                        dict(tokens=self.tokens, elapsed=self.elapsed),
                        self.task.tokenizer.bpe if isinstance(self.task, TextLM) else None)

    def load(self) -> None:
        if self.rank == 0:
            checkpoint.recover(self.out)
        if self.world > 1:
            dist.barrier()   # rank 0 has finished an interrupted swap
        ckpt = self.out / checkpoint.CURRENT
        if not ckpt.is_dir():
            raise UsageError(f"resume: {self.out} holds no checkpoint")
        checkpoint.verify(ckpt)
        meta = checkpoint.load_json(ckpt / "config.json")
        if meta["model"] != self.config.to_dict():
            raise UsageError(f"resume: the checkpoint in {ckpt} is of another model configuration")
        state = checkpoint.load_tensors(ckpt / "model.safetensors")
        if self.a.fsdp and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
            name = "trainer.pt" if self.rank == 0 else f"trainer-rank{self.rank}.pt"
        else:
            self.model.load_state_dict(state)
            name = "trainer.pt"
        tr = checkpoint.load_pickle(ckpt / name)
        self.optimizer.load_state_dict(tr["optimizer"])
        torch.set_rng_state(tr["rng"])
        self.step, self.tokens, self.elapsed = tr["step"], tr["tokens"], tr["elapsed"]

    def log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def run(self, prog: Progress | None = None) -> dict:
        """Train to a.steps (or a.stop_at); returns the first and last evaluations. prog: how to show
        progress (default: per a.quiet and a.log_every)."""
        a = self.a
        if not (a.resume or a.overwrite) and checkpoint.has_run(self.out):
            raise UsageError(f"out: {self.out} already holds a run; pass --resume to continue it or --overwrite "
                             "to replace it")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if a.overwrite and not a.resume:
                checkpoint.clear_run(self.out)
        metrics = self.out / "metrics.jsonl"
        if a.resume:
            self.load()
            if self.rank == 0 and metrics.exists():   # drop what was logged after the checkpoint
                keep = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= self.step]
                metrics.write_text("".join(line + "\n" for line in keep))
        prog = prog or Progress(a.steps, a.log_every, a.quiet)
        prog.quiet = prog.quiet or self.rank != 0
        prog.line(f"{a.preset} ({a.size}, {self.n_params:,} parameters) on {self.task.describe()}; "
                  f"{a.steps} steps x {a.batch_size} sequences on {self.device}"
                  f"{f' x {self.world} processes' + (' (FSDP2)' if a.fsdp else ' (DDP)') if self.world > 1 else ''}"
                  + (f"; resumed at step {self.step}" if a.resume else ""))
        first = None
        if self.step == 0:
            first = self.evaluate()
            self.log(dict(step=0, **{f"eval/{k}": v for k, v in first.items()}))
            prog.line(f"step     0  eval " + fmt(first))
        last = first
        stop = min(a.stop_at or a.steps, a.steps)
        prog.start(self.step)
        while self.step < stop:
            rec = self.train_step()
            self.log(rec)
            prog.update(self.step, rec["loss"], rec["lr"], rec["tokens_per_s"])
            if not math.isfinite(rec["loss"]):
                raise Diverged(f"the loss became {rec['loss']} at step {self.step}; lower --lr")
            if (a.eval_every and self.step % a.eval_every == 0) or self.step == a.steps:
                last = self.evaluate()
                self.log(dict(step=self.step, **{f"eval/{k}": v for k, v in last.items()}))
                prog.line(f"step {self.step:>5}  eval " + fmt(last))
            if a.save_every and self.step % a.save_every == 0 and self.step < stop:
                self.save()
        self.save()
        if a.plot and self.rank == 0:
            from .plots import loss_curve
            loss_curve(metrics, self.out / "loss.png", f"{a.preset} on {a.task}")
        return dict(first=first, last=last, step=self.step, tokens=self.tokens, elapsed=self.elapsed,
                    parameters=self.n_params)


def fmt(ev: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" if "loss" in k or "bits" in k else f"{k} {v:.1%}" for k, v in ev.items())


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
