"""`miras compare`: the same task, tokens and (about) parameter count for a grid of presets."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .arguments import DEFAULT_LEN, UsageError, train_args_from
from .building import count, make_config, make_task
from .checkpoint import has_run
from .progress import Progress, duration
from .trainer import Diverged, Trainer


def run_compare(ns) -> int:
    out = Path(ns.out or f"runs/compare-{ns.task}")
    out.mkdir(parents=True, exist_ok=True)
    lengths = ns.lengths or [ns.seq_len or DEFAULT_LEN[ns.task]]
    pairs_grid = (ns.pairs_grid or [ns.pairs]) if ns.task == "mqar" else [None]
    cells = [(L, P) for L in lengths for P in pairs_grid]
    # Validate every cell before training anything (e.g. a length below 4 x pairs).
    for L, P in cells:
        make_task(train_args_from(ns, ns.presets[0], str(out), seq_len=L, **({"pairs": P} if P else {})))
    target = None
    if ns.params is not None:
        if ns.no_match_params:
            raise UsageError("params: --params N matches every preset to N parameters; it cannot go with "
                             "--no-match-params")
        if ns.params <= 0:
            raise UsageError(f"params: expected a positive parameter count, got {ns.params}")
        target = ns.params
    elif not ns.no_match_params:
        probe = train_args_from(ns, ns.presets[0], str(out), seq_len=max(lengths))
        vocab = make_task(probe).vocab_size
        target = max(count(make_config(train_args_from(ns, p, str(out), seq_len=max(lengths)), vocab))
                     for p in ns.presets)
    runs = [(name, L, P, f"{name}-L{L}" + (f"-P{P}" if P else "")) for name in ns.presets for L, P in cells]
    taken = [tag for *_, tag in runs if has_run(out / tag)]
    if taken and not ns.overwrite:
        raise UsageError(f"out: {out} already holds runs of a comparison ({', '.join(taken[:3])}"
                         f"{', ...' if len(taken) > 3 else ''}); pass --overwrite to replace them")
    rows, started = [], time.time()
    for i, (name, L, P, tag) in enumerate(runs):
        a = train_args_from(ns, name, str(out / tag), seq_len=L, match_params=target,
                             **({"pairs": P} if P else {}))
        prog = Progress(a.steps, a.log_every, ns.quiet, prefix=f"[{i + 1}/{len(runs)}] {tag}  ", details=False)
        t0 = time.time()
        tr = Trainer(a)
        try:
            res = tr.run(prog)
        except Diverged as e:  # one model's divergence is a result of the comparison, not its end
            rows.append(dict(preset=name, seq_len=L, pairs=P, parameters=tr.n_params, diverged=str(e),
                             seconds=round(time.time() - t0, 1)))
            prog.line(f"  {tag:<28} params {tr.n_params:>8,}  diverged: {e}", always=True)
            continue
        ev = res["last"]
        row = dict(preset=name, seq_len=L, pairs=P, parameters=res["parameters"], tokens=res["tokens"],
                   seconds=round(time.time() - t0, 1), **ev)
        rows.append(row)
        left = (time.time() - started) / (i + 1) * (len(runs) - i - 1)
        prog.line(f"  {tag:<28} params {row['parameters']:>8,}  loss {ev['loss']:.3f}  accuracy {ev['accuracy']:.1%}"
                  + "".join(f"  {k[9:]} {v:.0%}" for k, v in ev.items() if k.startswith("accuracy/"))
                  + f"  ({row['seconds']:.0f} s; {len(runs) - i - 1} to go, about {duration(left)})", always=True)
    (out / "compare.json").write_text(json.dumps(dict(task=ns.task, steps=ns.steps, batch_size=ns.batch_size,
                                                      rows=rows), indent=1) + "\n")
    print()
    print(table(rows, ns.task))
    if not ns.no_plot:
        from .plots import accuracy_vs_length
        series = {}
        for r in (r for r in rows if "diverged" not in r):
            key = r["preset"] + (f" ({r['pairs']} pairs)" if r["pairs"] and len(pairs_grid) > 1 else "")
            series.setdefault(key, {})[r["seq_len"]] = r["loss"] if ns.task == "lm" else r["accuracy"]
        accuracy_vs_length(series, out / "compare.png", f"{ns.task}, {ns.steps} steps x {ns.batch_size}",
                           "validation loss" if ns.task == "lm" else "accuracy")
        print(f"\nplot: {out / 'compare.png'}  table: {out / 'compare.json'}")
    return 0


def table(rows: list[dict], task: str) -> str:
    """A Markdown table: one row per preset, one column per (length, pairs) cell (and needle for sniah)."""
    metric = "loss" if task == "lm" else "accuracy"
    cols = []
    for r in rows:
        keys = [k for k in r if k.startswith("accuracy/")] if task == "sniah" else [metric]
        keys = keys or [metric]  # a diverged run has no per-needle accuracies
        for k in keys:
            c = (r["seq_len"], r["pairs"], k)
            if c not in cols:
                cols.append(c)
    head = ["preset", "params"] + [f"T={L}" + (f" N={P}" if P else "") + (f" {k[9:]}" if "/" in k else "")
                                   for L, P, k in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    for p in presets:
        mine = {(r["seq_len"], r["pairs"]): r for r in rows if r["preset"] == p}
        cells = []
        for L, P, k in cols:
            cell = mine.get((L, P), {})
            v = cell.get(k)
            cells.append("diverged" if "diverged" in cell else
                         "-" if v is None else (f"{v:.3f}" if k == "loss" else f"{v:.1%}"))
        params = next(r["parameters"] for r in rows if r["preset"] == p)
        lines.append("| " + " | ".join([p, f"{params:,}"] + cells) + " |")
    return "\n".join(lines)
