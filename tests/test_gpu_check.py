"""bench/gpu_check.sh without a GPU: its --plan fits a first call in 420 s and a rerun in 240 s, the device
call it prints is the one its header and docs/performance.md give, and its step runner (state, results table,
$OUT files, rerun skipping) works on a step that needs no GPU (facts)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["facts", "wheels", "build", "smoke", "bench", "tests", "sanitizers"]
RUN_TIMEOUT_MAX = 600  # the device tool's limit on one command


def run_script(*args, env=None, timeout=120):
    full = {k: v for k, v in os.environ.items() if not k.startswith("MIRAS_GPU_") and k != "OUT"}
    full.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def parse_plans(text: str) -> list[dict]:
    plans = []
    for line in text.splitlines():
        if line.startswith("gpu_check plan: "):
            plans.append({"title": line, "deadline": int(re.search(r"deadline (\d+) s$", line).group(1)),
                          "steps": {}})
        elif m := re.match(r"  (\w+) +(\d+) +(\d+)  ", line):
            plans[-1]["steps"][m.group(1)] = (int(m.group(2)), int(m.group(3)))
        elif m := re.match(r"  total (\d+) of (\d+) s: (.*)$", line):
            plans[-1]["total"], plans[-1]["verdict"] = int(m.group(1)), m.group(3)
        elif line.startswith("  call: "):
            plans[-1]["call"] = line[len("  call: "):]
    return plans


def test_plan_fits_a_first_call_in_420_s_and_a_rerun_in_240_s():
    out = run_script("--plan")
    assert out.returncode == 0, out.stderr
    first, rerun = parse_plans(out.stdout)
    assert first["deadline"] == 420 and rerun["deadline"] == 240
    assert list(first["steps"]) == STEPS
    assert list(rerun["steps"]) == [s for s in STEPS if s not in ("facts", "build")]
    for plan, limit in ((first, 420), (rerun, 240)):
        assert plan["verdict"] == "fits" and plan["total"] <= limit, plan
        assert sum(b for b, _ in plan["steps"].values()) < plan["total"] <= limit  # the final reserve
        for step, (budget, floor) in plan["steps"].items():
            assert budget >= floor > 0, (step, budget, floor)
        timeout_s = int(re.search(r"timeout_s=(\d+)\)", plan["call"]).group(1))
        assert plan["deadline"] < timeout_s <= RUN_TIMEOUT_MAX, plan["call"]
    assert first["steps"]["build"][0] >= 120 and first["steps"]["bench"][0] >= 60  # the priorities of a lease


def test_plan_scales_with_the_deadline_and_drops_what_does_not_fit():
    short = parse_plans(run_script("--plan", env={"MIRAS_GPU_CHECK_S": "200"}).stdout)[0]
    assert short["total"] <= 200 and short["verdict"].startswith("does not fit; dropped: sanitizers")
    assert all(b >= f for b, f in short["steps"].values())
    some = parse_plans(run_script("--plan", env={"MIRAS_GPU_STEPS": "build,bench"}).stdout)[0]
    assert list(some["steps"]) == ["build", "bench"] and some["verdict"] == "fits"


def test_the_documented_calls_are_the_planned_ones():
    first, rerun = parse_plans(run_script("--plan").stdout)
    header = SCRIPT.read_text().split("set -uo pipefail")[0]
    docs = (ROOT / "docs" / "performance.md").read_text()
    for plan in (first, rerun):
        assert plan["call"] in header, plan["call"]
        assert plan["call"] in docs, plan["call"]
    # docs/performance.md's table of the plan: | step | first call | rerun | what |
    for step in STEPS:
        row = re.search(rf"^\| {step} \| ([0-9-]+) \| ([0-9-]+) \|", docs, re.M)
        assert row, step
        planned = [str(p["steps"][step][0]) if step in p["steps"] else "-" for p in (first, rerun)]
        assert list(row.groups()) == planned, (step, row.groups(), planned)


def test_unknown_argument_is_refused():
    out = run_script("--bogus")
    assert out.returncode == 2 and "usage" in out.stderr


def test_a_step_writes_the_results_to_out_and_a_rerun_skips_it(tmp_path):
    out_dir, state, results = tmp_path / "out", tmp_path / "state", tmp_path / "results"
    out_dir.mkdir()
    env = {"OUT": str(out_dir), "MIRAS_GPU_STATE": str(state), "MIRAS_GPU_RESULTS": str(results),
           "MIRAS_GPU_STEPS": "facts", "MIRAS_PYTHON": sys.executable}
    first = run_script(env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["logs.tar.gz", "results.json", "results.md"]
    record = json.loads((out_dir / "results.json").read_text())
    assert [(s["step"], s["status"]) for s in record["steps"]] == [("facts", "ok")]
    assert any(f.startswith("python: ") and "Python.h" in f for f in record["facts"])
    assert any(f.startswith("openmp: ") for f in record["facts"])
    with tarfile.open(out_dir / "logs.tar.gz") as tar:
        assert {"results/facts.log", "results/results.md"} <= set(tar.getnames())
    # The table prints last, then the verdict.
    tail = first.stdout.strip().splitlines()
    assert tail[-1].startswith("gpu_check: every step passed") and tail[-2].startswith("| facts | ok |")

    again = run_script(env={**env, "MIRAS_GPU_RERUN": "1"})
    assert again.returncode == 0, again.stdout + again.stderr
    assert "=== facts: skipped, succeeded on an earlier call" in again.stdout
    assert "| facts | ok (call 1) |" in (out_dir / "results.md").read_text()


def test_the_sanitizer_cases_run_and_compare_on_the_cpu():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "sanitizer_case.py"), "--device", "cpu", "--cases",
                          "sanitizer", "--check-cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 of 6 cases ran; 0 far from the CPU op" in out.stdout
