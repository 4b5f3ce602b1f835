"""The training loop of `miras train`: AdamW with warmup + cosine decay, gradient clipping and accumulation,
bfloat16 autocast on GPU, periodic evaluation, checkpoints with exact resume, metrics as JSON lines, and
DistributedDataParallel / FSDP2 under torchrun.

Exact resume: a batch is a pure function of (task seed, step) (miras_ext.tasks), the learning rate a pure
function of the step, and a checkpoint holds the weights (safetensors), the optimizer state and the RNG
state; a run resumed from step s therefore takes the same steps as one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..inputs import NonFiniteError
from ..models import MirasConfig, MirasForCausalLM, preset
from ..models.miras_layer import LowRankGate
from ..tasks import IGNORE, MQAR, SNIAH, Task, TextLM, answer_accuracy
from ..tasks.text import bits_per_byte
from . import checkpoint
from .progress import Progress


TOKENIZER = "tokenizer.json"  # a trained BPE, kept in the checkpoint


class Diverged(RuntimeError):
    """Training produced a non-finite loss or gradient."""


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


# ------------------------------------------------------------------------------------------ building

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


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weights of linear layers and the embedding; none on norms, biases, gates (their
    low-rank projections, A_log), convolutions and the initial memory states (docs/math.md Sec. 8 pt 14)."""
    decay, rest = [], []
    gate_params = {id(p) for m in model.modules() if isinstance(m, LowRankGate) for p in m.parameters()}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_matrix = isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight"
            (decay if is_matrix and id(p) not in gate_params else rest).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


def lr_at(step: int, a: TrainArgs) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    span = max(a.steps - a.warmup, 1)
    progress = min((step - a.warmup) / span, 1.0)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batches: int, batch_size: int, device, seq_len: int | None = None,
             autocast=nullcontext) -> dict:
    """Validation loss and teacher-forced accuracy on the labelled tokens (per needle kind for S-NIAH; bits
    per byte for byte-level LM); the validation batches are fixed (split "val", steps 0..batches-1)."""
    was = model.training
    model.eval()
    groups = [(n, dict(needles=(n,))) for n in task.needles] if isinstance(task, SNIAH) else [(None, {})]
    out, loss_sum, tok_sum, right_all, lab_all = {}, 0.0, 0, 0, 0
    for name, kw in groups:
        right = labelled = seq_ok = seqs = 0
        for i in range(batches):
            ids, labels = task.batch(i, batch_size, "val", seq_len=seq_len, **kw)
            ids, labels = ids.to(device), labels.to(device)
            with autocast():
                res = model(ids, labels=labels)
            n = int((labels[:, 1:] != IGNORE).sum())
            loss_sum += float(res.loss) * n
            tok_sum += n
            r, l, s, b = answer_accuracy(res.logits.float(), labels)
            right, labelled, seq_ok, seqs = right + r, labelled + l, seq_ok + s, seqs + b
        right_all, lab_all = right_all + right, lab_all + labelled
        if name is not None:
            out[f"accuracy/{name}"] = seq_ok / seqs      # the whole answer right
    out["loss"] = loss_sum / max(tok_sum, 1)
    out["accuracy"] = (sum(out[f"accuracy/{n}"] for n, _ in groups) / len(groups) if isinstance(task, SNIAH)
                       else right_all / max(lab_all, 1))
    if isinstance(task, TextLM) and task.tokenizer.name == "bytes":
        out["bits_per_byte"] = out["loss"] / math.log(2)
    model.train(was)
    return out


def chance(task: Task) -> str:
    if isinstance(task, MQAR):
        return f"chance {1 / task.n_values:.1%}"
    return ""


# ------------------------------------------------------------------------------------------ distributed

def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def wrap(model: nn.Module, fsdp: bool, device: torch.device) -> nn.Module:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


# ------------------------------------------------------------------------------------------ checkpoints

def full_state_dict(model: nn.Module) -> dict:
    inner = unwrap(model)
    if any(type(p).__name__ == "DTensor" for p in inner.parameters()):    # FSDP2: gather the shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return inner.state_dict()


def save_checkpoint(run: Path, model, optimizer, step: int, meta: dict, extra: dict, bpe=None) -> None:
    """Write run/checkpoint.new (rank 0 the weights, config and a trained BPE `bpe` as tokenizer.json, every
    FSDP rank its optimizer shard) and swap it in for run/checkpoint (cli/checkpoint.py)."""
    from safetensors.torch import save_file
    rank, world, _ = dist_env()
    state = full_state_dict(model)
    opt_state = optimizer.state_dict()
    tmp = run / checkpoint.STAGING
    if rank == 0:
        checkpoint.staging(run)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
        if bpe is not None:
            bpe.save(str(tmp / TOKENIZER))
    if world > 1:
        dist.barrier()
    if rank == 0 or any(type(p).__name__ == "DTensor" for p in unwrap(model).parameters()):
        name = "trainer.pt" if world == 1 or rank == 0 else f"trainer-rank{rank}.pt"
        torch.save(dict(step=step, optimizer=opt_state, rng=torch.get_rng_state(), **extra), tmp / name)
    if world > 1:
        dist.barrier()
    if rank == 0:
        checkpoint.commit(run, step)
    if world > 1:
        dist.barrier()


def load_model(path: str | Path, device="cpu") -> tuple[MirasForCausalLM, dict]:
    """The model of a checkpoint (a run folder or its checkpoint/ folder) and the checkpoint's config.json,
    after checking every file against the checkpoint's manifest."""
    ckpt = checkpoint.find_checkpoint(path)
    checkpoint.verify(ckpt)
    meta = checkpoint.load_json(ckpt / "config.json")
    if (ckpt / TOKENIZER).exists():  # the run's trained BPE: load it rather than train it again
        meta["train"]["tokenizer"] = str(ckpt / TOKENIZER)
    model = MirasForCausalLM(MirasConfig.from_dict(meta["model"]))
    model.load_state_dict(checkpoint.load_tensors(ckpt / "model.safetensors", device))
    return model.to(device), meta


# ------------------------------------------------------------------------------------------ training

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
