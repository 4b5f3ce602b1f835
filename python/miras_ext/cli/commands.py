"""Argument parsing and the subcommands of `miras`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ..models import PRESETS, SIZES
from ..tasks import HAYSTACKS, NEEDLES, TASKS, DataError
from .arguments import train_args_from

COMPARE_PRESETS = ["moneta", "yaad", "memora", "transformer", "gated-deltanet", "titans"]


class CLIError(Exception):
    """Ends the command with a one-line message and exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise CLIError(f"{self.prog}: {message} (see {self.prog} --help)")


def _kv(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        v = json.loads(v)
    except json.JSONDecodeError:
        pass
    return k, v


def _task_args(p, compare: bool = False):
    g = p.add_argument_group("task")
    g.add_argument("--task", choices=TASKS, default="mqar",
                   help="mqar: multi-query associative recall; sniah: needle in a haystack; lm: text (default mqar)")
    g.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: mqar 32, sniah 256, lm 256)")
    g.add_argument("--pairs", type=int, default=4, help="mqar: key-value pairs per sequence (default 4)")
    g.add_argument("--mqar-vocab", type=int, default=16, metavar="N",
                   help="mqar: keys and values are each drawn from N symbols (default 16; chance is 1/N)")
    g.add_argument("--needles", nargs="+", choices=NEEDLES, default=list(NEEDLES),
                   help="sniah: needle kinds, mixed in training and scored separately (default all)")
    g.add_argument("--haystack", choices=HAYSTACKS, default="noise", help="sniah: haystack (default noise)")
    g.add_argument("--data", nargs="+", metavar="PATH",
                   help="lm: text files or folders (default: this Python's standard-library sources)")
    g.add_argument("--hf-dataset", metavar="NAME[:CONFIG]",
                   help="lm: a Hugging Face dataset (needs the `datasets` package and the network)")
    g.add_argument("--tokenizer", default="bytes",
                   help="lm: 'bytes' (256 byte tokens + BOS, PAD) or a transformers tokenizer name")
    g.add_argument("--max-bytes", type=int, default=4_000_000, help="lm: characters of text to read (default 4M)")


def _device_args(g):
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")


def _train_args(p, steps: int, compare: bool = False):
    if not compare:
        g = p.add_argument_group("model")
        g.add_argument("--preset", choices=PRESETS, default="moneta-matrix",
                       help="model (default moneta-matrix: Moneta's bias and retention on a matrix memory, the "
                            "Moneta that recalls; docs/models.md)")
    else:
        g = p.add_argument_group("models")
        g.add_argument("--presets", nargs="+", choices=PRESETS, default=COMPARE_PRESETS, metavar="PRESET",
                       help=f"models to compare (default {' '.join(COMPARE_PRESETS)}); any of {', '.join(PRESETS)}")
    g.add_argument("--size", choices=tuple(SIZES), default="tiny", help="model size (default tiny)")
    g.add_argument("--set", type=_kv, action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="override a MirasConfig field, e.g. --set chunk_size=16 --set dim=128 (repeatable)")
    if not compare:
        g.add_argument("--match-params", type=int, default=None, metavar="N",
                       help="widen/narrow the SwiGLU so the model has about N parameters")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    o.add_argument("--batch-size", type=int, default=32, help="sequences per step, all processes (default 32)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    o.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-2 mqar/sniah, 3e-3 lm)")
    o.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10%% of --steps)")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    o.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (default 1.0)")
    o.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    r = p.add_argument_group("run")
    r.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (default 100; 0: at the end)")
    r.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation (default 8)")
    if not compare:
        r.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
        r.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
        r.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                       help="stop at STEP and save, as if interrupted (resume later with --resume)")
        r.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 (fully_shard) instead of DDP")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the run(s) already in --out (without it such an --out is refused)")
    r.add_argument("--log-every", type=int, default=10, help="progress line every N steps when not a terminal")
    r.add_argument("--out", default=None, help="run folder (default runs/<preset>-<task> or runs/compare-<task>)")
    _device_args(r)
    r.add_argument("--no-plot", action="store_true", help="write no PNG")
    r.add_argument("--quiet", action="store_true", help="print only the summary")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="miras", description="Train, evaluate, sample from and compare Miras models "
               "(Moneta, Yaad, Memora) and their baselines.", formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="Run `miras COMMAND --help` for the options of a command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    t = sub.add_parser("train", help="train a model on a task (default: tiny Moneta on MQAR)",
                       description="Train a model. With no arguments: a tiny Moneta on a matrix memory on MQAR (4 "
                       "key-value pairs, 32 tokens, 16 symbols) for 150 steps, about 10 s on a CPU: a smoke run, which "
                       "stays near chance (6.3%%); ./scripts/train is the recipe that recalls (100%%, docs/results.md). "
                       "Prints the recall accuracy before and after and the chance level. Writes "
                       "OUT/checkpoint/ (model.safetensors, config.json, trainer.pt, manifest.json), OUT/metrics.jsonl and "
                       "OUT/loss.png. Under torchrun the same command trains with DistributedDataParallel.")
    _train_args(t, 150)
    _task_args(t)

    e = sub.add_parser("eval", help="evaluate a checkpoint on its task, at several lengths",
                       description="Evaluate a checkpoint (a run folder or its checkpoint/) on the task it was "
                       "trained on: validation loss and accuracy on the answers, at each --lengths.")
    e.add_argument("checkpoint", help="run folder or checkpoint folder")
    e.add_argument("--lengths", nargs="+", type=int, help="sequence lengths (default: the training length)")
    e.add_argument("--pairs", type=int, help="mqar: key-value pairs (default: as trained)")
    e.add_argument("--batches", type=int, default=8, help="validation batches (default 8)")
    e.add_argument("--batch-size", type=int, default=32)
    _device_args(e)
    e.add_argument("--json", metavar="FILE", help="also write the results as JSON")

    g = sub.add_parser("generate", help="sample text from a checkpoint",
                       description="Sample a continuation of --prompt from a checkpoint (byte-level unless the run "
                       "used a tokenizer).")
    g.add_argument("checkpoint", help="run folder or checkpoint folder")
    g.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--greedy", action="store_true", help="argmax decoding")
    g.add_argument("--seed", type=int, default=0)
    _device_args(g)

    c = sub.add_parser("compare", help="train a grid of presets on a task; table and plot",
                       description="Train each --presets at the tiny size (same tokens; the SwiGLU width adjusted "
                       "so every model has about the parameters of the largest) for each --lengths (and, for mqar, "
                       "each --pairs-grid), evaluate, print a table and write OUT/compare.json and OUT/compare.png.")
    _train_args(c, 200, compare=True)
    _task_args(c, compare=True)
    c.add_argument("--lengths", nargs="+", type=int, help="training/eval lengths (default: --seq-len)")
    c.add_argument("--pairs-grid", nargs="+", type=int, help="mqar: numbers of pairs (default: --pairs)")
    c.add_argument("--no-match-params", action="store_true", help="keep each preset's own parameter count")
    c.add_argument("--params", type=int, metavar="N", help="match every preset to about N parameters instead of "
                   "the largest preset's count (so a comparison split over processes stays matched)")

    h = sub.add_parser("lm-eval", help="run lm-eval-harness tasks on a text checkpoint (the lm-eval extra)",
                       description="Evaluate a text checkpoint with lm-eval-harness through the Hugging Face "
                       "wrapper (pip install \"lm-eval[hf]\"): lm_eval's tasks, or your YAML tasks in "
                       "--include-path (a task over a local JSONL file needs no network).")
    h.add_argument("checkpoint", help="run folder or checkpoint folder")
    h.add_argument("--tasks", nargs="+", required=True, help="lm_eval task names")
    h.add_argument("--include-path", metavar="DIR", help="folder of extra task YAML files")
    h.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    h.add_argument("--batch-size", type=int, default=1)
    _device_args(h)
    h.add_argument("--json", metavar="FILE", help="also write lm_eval's results as JSON")

    b = sub.add_parser("bench", help="run bench/ops.py (memory op) or bench/decode.py (decode speed)",
                       description="Run a benchmark script of the repository, passing the remaining arguments: "
                       "`miras bench ops --quick`, `miras bench decode --contexts 1024 4096`.")
    b.add_argument("which", choices=("ops", "decode"))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script")
    return p


def _check_paths(ns):
    for p in ns.data or []:
        if not Path(p).exists():
            raise CLIError(f"miras {ns.command}: --data {p}: no such file or folder")


def cmd_train(ns) -> int:
    from .trainer import Trainer
    _check_paths(ns)
    a = train_args_from(ns, ns.preset, ns.out or f"runs/{ns.preset}-{ns.task}")
    tr = Trainer(a)
    res = tr.run()
    if tr.rank == 0:
        print(summary(tr, res))
    return 0


def summary(tr, res) -> str:
    from .evaluation import chance
    a, first, last = tr.a, res["first"], res["last"]
    what = {"mqar": "recall accuracy on the queried values", "sniah": "needle retrieval (whole answer right)",
            "lm": "next-token accuracy"}[a.task]
    lines = [f"trained {a.preset} ({res['parameters']:,} parameters) for {res['step']} steps, "
             f"{res['tokens']:,} tokens, {res['elapsed']:.0f} s of training"]
    if first is not None and last is not None:
        extra = f" ({chance(tr.task)})" if chance(tr.task) else ""
        lines.append(f"{what}: {first['accuracy']:.1%} before -> {last['accuracy']:.1%} after{extra}")
        lines.append(f"validation loss: {first['loss']:.3f} -> {last['loss']:.3f}")
        for k in sorted(last):
            if k.startswith("accuracy/"):
                lines.append(f"  {k[9:]}: {first[k]:.1%} -> {last[k]:.1%}")
    elif last is not None:
        lines.append(f"{what}: {last['accuracy']:.1%}; validation loss {last['loss']:.3f}")
    lines.append(f"checkpoint: {tr.out / 'checkpoint'}  metrics: {tr.out / 'metrics.jsonl'}"
                 + (f"  plot: {tr.out / 'loss.png'}" if a.plot else ""))
    return "\n".join(lines)


def _task_from_meta(meta: dict, seq_len=None, pairs=None):
    from ..tasks import MQAR, SNIAH, TextLM
    t = dict(meta["task"])
    tr = meta["train"]
    if t["task"] == "mqar":
        return MQAR(pairs or t["pairs"], seq_len or t["seq_len"], t["seed"], t.get("n_keys", 128), t.get("n_values", 128))
    if t["task"] == "sniah":
        return SNIAH(seq_len or t["seq_len"], tuple(t["needles"]), t["haystack"], t["seed"])
    return TextLM(seq_len or t["seq_len"], tr.get("data"), tr.get("hf_dataset"), tr.get("tokenizer", "bytes"),
                  tr.get("max_bytes", 4_000_000), t["seed"])


def cmd_eval(ns) -> int:
    import torch
    from .checkpoint_io import load_model
    from .evaluation import evaluate
    from .trainer import fmt, pick_device, set_threads
    device = pick_device(ns.device)
    set_threads(ns.threads)
    model, meta = load_model(ns.checkpoint, device)
    results = {}
    for length in ns.lengths or [meta["task"]["seq_len"]]:
        task = _task_from_meta(meta, length, ns.pairs)
        torch.manual_seed(0)
        ev = evaluate(model, task, ns.batches, ns.batch_size, device)
        results[length] = ev
        print(f"{meta['preset']} {meta['task']['task']} seq_len {length}: " + fmt(ev))
    if ns.json:
        Path(ns.json).write_text(json.dumps(dict(checkpoint=str(ns.checkpoint), results=results), indent=1) + "\n")
    return 0


def cmd_generate(ns) -> int:
    import torch
    from ..tasks import Tokenizer
    from .checkpoint_io import load_model
    from .trainer import pick_device, set_threads
    device = pick_device(ns.device)
    set_threads(ns.threads)
    model, meta = load_model(ns.checkpoint, device)
    if meta["task"]["task"] != "lm":
        print(f"miras generate: warning: {ns.checkpoint} is a model of the {meta['task']['task']} task, not a text "
              "model: its tokens are that task's symbols, printed here as bytes", file=sys.stderr)
    tok = Tokenizer(meta["train"].get("tokenizer", "bytes"))
    ids = tok.encode(ns.prompt)
    if not ids:
        raise CLIError("miras generate: --prompt is empty")
    g = torch.Generator(device=device).manual_seed(ns.seed)
    out = model.eval().generate(torch.tensor([ids], device=device), ns.max_new_tokens, ns.temperature, ns.top_k,
                                ns.top_p, ns.greedy, g)
    print(tok.decode(out[0].tolist()))
    return 0


def cmd_lm_eval(ns) -> int:
    from .harness import evaluate
    from .trainer import pick_device, set_threads
    device = pick_device(ns.device)
    set_threads(ns.threads)
    res = evaluate(ns.checkpoint, ns.tasks, ns.include_path, ns.limit, str(device), ns.batch_size)
    for task, metrics in res["results"].items():
        print(f"{task}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    if ns.json:
        Path(ns.json).write_text(json.dumps(res["results"], indent=1, default=str) + "\n")
    return 0


def cmd_compare(ns) -> int:
    from .compare import run_compare
    _check_paths(ns)
    return run_compare(ns)


def _repo_root() -> Path | None:
    for base in (os.environ.get("MIRAS_ROOT"), os.getcwd(), *Path(__file__).resolve().parents):
        if base and (Path(base) / "bench" / "ops.py").exists():
            return Path(base)
    return None


def cmd_bench(ns) -> int:
    root = _repo_root()
    if root is None:
        raise CLIError("miras bench: bench/ not found; run from the repository root or set MIRAS_ROOT")
    script = root / "bench" / f"{ns.which}.py"
    return subprocess.call([sys.executable, str(script), *ns.rest])


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "compare": cmd_compare,
            "lm-eval": cmd_lm_eval, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .arguments import UsageError
    from .trainer import Diverged
    parser = build_parser()
    cmd = "miras"
    try:
        ns, extra = parser.parse_known_args(argv)
        if ns.command is None:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            parser.print_help()
            return 0
        cmd = f"miras {ns.command}"
        if extra:  # reported by the subcommand, whose --help lists its options
            raise CLIError(f"{cmd}: unrecognized arguments: {' '.join(extra)} (see {cmd} --help)")
        if getattr(ns, "seq_len", None) is not None and ns.seq_len < 2:
            raise CLIError(f"{cmd}: --seq-len must be >= 2, got {ns.seq_len} (see {cmd} --help)")
        if getattr(ns, "threads", 0) < 0:
            raise CLIError(f"{cmd}: --threads must be >= 0, got {ns.threads} (see {cmd} --help)")
        return COMMANDS[ns.command](ns)
    except CLIError as e:
        print(e, file=sys.stderr)
        return 2
    except (UsageError, DataError, ValueError, FileNotFoundError, ImportError, Diverged) as e:
        if os.environ.get("MIRAS_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "" if isinstance(e, (Diverged, CheckpointError, DataError, ImportError)) else f" (see {cmd} --help)"
        print(f"{cmd}: error: {msg}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("miras: interrupted", file=sys.stderr)
        return 130
