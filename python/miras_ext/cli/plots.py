"""PNG plots (matplotlib, Agg backend): the training loss curve, accuracy against sequence length."""

from __future__ import annotations

import json
from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_curve(metrics: str | Path, out: str | Path, title: str = "") -> None:
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def accuracy_vs_length(results: dict[str, dict[int, float]], out: str | Path, title: str = "",
                       ylabel: str = "accuracy") -> None:
    """results: model -> {sequence length: value}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_len in results.items():
        xs = sorted(by_len)
        ax.plot(xs, [by_len[x] for x in xs], "o-", label=name)
    ax.set(xlabel="sequence length", ylabel=ylabel, title=title)
    ax.set_xscale("log", base=2)
    if results:  # every run of the comparison may have diverged
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
