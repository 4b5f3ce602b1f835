"""One bar chart of several `miras compare` runs (a comparison split over processes with `--params N`):
recall per preset, one bar per (length, pairs) cell. A preset that appears in several runs keeps the row of
the first run that names it (order the runs: the preset's final run first).

    .venv/bin/python bench/plot_compare.py runs/M/compare.json runs/A/compare.json --out docs/results-mqar-T64.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="compare.json files")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    cells: dict[tuple, dict[str, float]] = {}
    for path in args.runs:
        for r in json.load(open(path))["rows"]:
            if "diverged" in r:
                continue
            cells.setdefault((r["seq_len"], r["pairs"]), {}).setdefault(r["preset"], r["accuracy"])
    presets = list(dict.fromkeys(p for cell in cells.values() for p in cell))
    keys = sorted(cells, key=lambda c: (c[0], c[1] or 0))
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, key in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(presets))]
        ax.bar(xs, [cells[key].get(p, 0.0) for p in presets], width,
               label=f"T={key[0]}" + (f", {key[1]} pairs" if key[1] else ""))
    ax.set_xticks(range(len(presets)), presets, rotation=30, ha="right")
    ax.set(ylabel="recall", ylim=(0, 1), title=args.title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}: {len(presets)} presets x {len(keys)} cells")


if __name__ == "__main__":
    main()
