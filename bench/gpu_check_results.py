"""The results table of bench/gpu_check.sh, written after every step so that a stopped call still returns it.

    python3 bench/gpu_check_results.py publish STATE/steps.tsv RESULTS --card C --mode M --deadline S ...
    python3 bench/gpu_check_results.py bench-summary RESULTS/bench.json    # the bench step's one-line finding

steps.tsv holds one row per step: name, status, seconds, timeout, sources fingerprint, one-line finding, the
number of the call that ran it (a rerun keeps the rows of the steps it skipped). publish writes
RESULTS/results.md (the steps table, then bench.md's table and ratios when the bench step wrote them) and
RESULTS/results.json (the same rows, the facts step's lines and bench.json's record). Needs no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

FIELDS = ("step", "status", "seconds", "timeout_s", "fingerprint", "found", "call")


def read_steps(path: Path, order: list[str]) -> list[dict]:
    rows = [dict(zip(FIELDS, line.split("\t"))) for line in path.read_text().splitlines() if line.strip()]
    rank = {name: i for i, name in enumerate(order)}
    return sorted(rows, key=lambda r: rank.get(r["step"], len(rank)))


def bench_summary(record: dict) -> str:
    """GDN and the MLP preset at priority 1: median ms fwd / fwd+bwd per implementation, FLA over ours."""
    cells: dict[tuple, dict] = {}
    for r in record.get("rows", []):
        key = (r["group"], r["impl"], r["model"], r["B"], r["T"])
        cells.setdefault(key, {})[r["mode"]] = (f"{r['median_s'] * 1e3:.2f}" if r.get("median_s") is not None
                                                else (r.get("note") or "-").split(":")[0])
    parts = []
    for (group, impl, model, b, t), modes in cells.items():
        fwd, both = modes.get("fwd", "-"), modes.get("fwd+bwd", "-")
        times = f"{fwd} / {both} ms" if fwd[:1].isdigit() or both[:1].isdigit() else fwd
        parts.append(f"{impl} {model if group != 'gated-delta' else 'GDN'} B{b} T{t}: {times}")
    ratio = {k: v for k, v in record.get("ratios", {}).get("gated_delta_fla_time_over_miras", {}).items()
             if v is not None}
    if ratio:
        parts.append("FLA time / ours: " + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()))
    mapping = record.get("mapping_check", {})
    if "rel_err_vs_fla" in mapping:
        parts.append("vs FLA rel err: " + ", ".join(f"{k} {v:.1e}" for k, v in mapping["rel_err_vs_fla"].items()))
    return "fwd / fwd+bwd: " + "; ".join(parts)


def table(rows: list[dict], current_call: str) -> list[str]:
    out = ["| step | status | seconds | timeout | found |", "|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] if r.get("call") in (None, current_call) else f"{r['status']} (call {r['call']})"
        out.append(f"| {r['step']} | {status} | {r['seconds']} | {r['timeout_s']} | {r['found'].replace('|', '/')} |")
    return out


def bench_section(results: Path) -> list[str]:
    """bench.md from its table to the end of its ratios (the title and the FLOP note stay in bench.md)."""
    path = results / "bench.md"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    start = next((i for i, x in enumerate(lines) if x.startswith("|")), len(lines))
    end = next((i for i in range(len(lines) - 1, start, -1) if lines[i].startswith("- ")), len(lines) - 1)
    return ["", "Benchmark (bench.md; bf16, H=16, D=64, chunk 64):", "", *lines[start:end + 1]]


def publish(args) -> int:
    rows = read_steps(args.steps, args.order.split(","))
    facts_log = args.results / "facts.log"
    facts = [x[len("fact: "):] for x in facts_log.read_text().splitlines() if x.startswith("fact: ")] \
        if facts_log.exists() else []
    bench = args.results / "bench.json"
    failed = [r["step"] for r in rows if not r["status"].startswith("ok")]
    lines = [f"# GPU check: {args.card}, {time.strftime('%Y-%m-%d', time.gmtime())}", "",
             f"bash bench/gpu_check.sh, {args.mode}: {args.elapsed} s of a {args.deadline} s deadline; "
             f"sources {args.sources}; "
             + (f"not ok: {', '.join(failed)}" if failed else "every step ok"), "",
             *table(rows, str(args.call)), *bench_section(args.results)]
    (args.results / "results.md").write_text("\n".join(lines) + "\n")
    record = {"card": args.card, "mode": args.mode, "deadline_s": args.deadline, "elapsed_s": args.elapsed,
              "steps": rows, "facts": facts, "bench": json.loads(bench.read_text()) if bench.exists() else None}
    (args.results / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("publish")
    p.add_argument("steps", type=Path)
    p.add_argument("results", type=Path)
    p.add_argument("--card", default="unknown GPU")
    p.add_argument("--mode", default="first call")
    p.add_argument("--deadline", type=int, default=0)
    p.add_argument("--elapsed", type=int, default=0)
    p.add_argument("--order", default="", help="the steps' order, comma-separated")
    p.add_argument("--sources", default="-", help="the sources' fingerprint")
    p.add_argument("--call", type=int, default=1, help="this call's number (earlier calls' rows are marked)")
    b = sub.add_parser("bench-summary")
    b.add_argument("bench_json", type=Path)
    args = ap.parse_args(argv)
    if args.command == "publish":
        return publish(args)
    print(bench_summary(json.loads(args.bench_json.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
