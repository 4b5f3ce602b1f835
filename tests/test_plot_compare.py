"""bench/plot_compare.py draws the runs of a comparison split over processes: each preset once (its first
run's row), one bar per (length, pairs) cell, diverged rows left out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "plot_compare.py"


def test_plot_compare_merges_the_runs(tmp_path):
    pytest.importorskip("matplotlib")
    rows_a = [dict(preset="moneta", seq_len=64, pairs=4, accuracy=1.0),
              dict(preset="yaad", seq_len=64, pairs=8, accuracy=0.5),
              dict(preset="titans", seq_len=64, pairs=4, diverged="step 3")]
    rows_b = [dict(preset="moneta", seq_len=64, pairs=4, accuracy=0.2),
              dict(preset="gdn", seq_len=64, pairs=4, accuracy=0.9)]
    paths = []
    for name, rows in (("a", rows_a), ("b", rows_b)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(dict(task="mqar", rows=rows)))
    out = tmp_path / "plot.png"
    r = subprocess.run([sys.executable, str(SCRIPT), *map(str, paths), "--out", str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "3 presets x 2 cells" in r.stdout and out.stat().st_size > 1000
