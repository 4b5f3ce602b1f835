"""`miras` end to end on tiny runs: the loss falls, resume is exact, generation, bad arguments."""

import json
import subprocess
import sys

import pytest

from miras_ext.cli import main
from miras_ext.cli.trainer import read_metrics

FAST = ["--preset", "yaad", "--pairs", "2", "--seq-len", "16", "--mqar-vocab", "8", "--batch-size", "8",
        "--lr", "1e-2", "--eval-batches", "2", "--no-plot", "--quiet"]


def test_training_reduces_loss(tmp_path, capsys):
    assert main(["train", *FAST, "--steps", "12", "--eval-every", "0", "--out", str(tmp_path)]) == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    evals = [r for r in rows if "eval/loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.5
    train = [r["loss"] for r in rows if "loss" in r]
    assert len(train) == 12 and train[-1] < train[0]
    out = capsys.readouterr().out
    assert "before ->" in out and "checkpoint" in out
    ckpt = tmp_path / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.json", "trainer.pt", "manifest.json"}
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["preset"] == "yaad" and meta["task"]["pairs"] == 2


def test_resume_is_exact(tmp_path):
    common = [*FAST, "--steps", "6", "--eval-every", "3"]
    assert main(["train", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "b"), "--stop-at", "3"]) == 0
    assert max(r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")) == 3
    assert main(["train", *common, "--out", str(tmp_path / "b"), "--resume"]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s",)} for r in rows]  # noqa: E731
    a = strip(read_metrics(tmp_path / "a" / "metrics.jsonl"))
    b = strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert a == b    # every loss, learning rate, gradient norm and evaluation, bit for bit


def test_generate_and_eval_from_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *FAST, "--steps", "2", "--eval-every", "0", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "ab", "--max-new-tokens", "6", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert main(["eval", str(run / "checkpoint"), "--lengths", "16", "32", "--batches", "1",
                 "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "seq_len 16" in out and "seq_len 32" in out
    assert set(json.loads((tmp_path / "e.json").read_text())["results"]) == {"16", "32"}


@pytest.mark.parametrize("argv, words", [
    (["train", "--preset", "nope"], "invalid choice: 'nope'"),
    (["train", "--task", "bogus"], "invalid choice: 'bogus'"),
    (["train", "--task", "lm", "--data", "/no/such/file.txt"], "/no/such/file.txt"),
    (["train", "--pairs", "8", "--seq-len", "6"], "seq_len"),
    (["train", "--steps", "0"], "steps"),
    (["train", "--set", "dim=-3"], "dim"),
    (["eval", "/no/such/run"], "does not exist"),
    (["generate", "/no/such/run"], "does not exist"),
    (["compare", "--task", "mqar", "--lengths", "8", "--pairs", "4"], "seq_len"),
    (["compare", "--params", "0"], "params: expected a positive"),
    (["compare", "--params", "100000", "--no-match-params"], "params: --params N"),
])
def test_bad_arguments(argv, words, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)] if argv[0] in ("train", "compare") else argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err


def test_subprocess_bad_argument():
    r = subprocess.run([sys.executable, "-m", "miras_ext.cli", "train", "--preset", "nope"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "--resume" in capsys.readouterr().out


def test_divergence_is_one_line_and_compare_goes_on(tmp_path, capsys):
    """A run whose gradients overflow stops with one line naming the step (no traceback, no NaN weights
    passed to the memory op), and `miras compare` records it as diverged and trains the other presets."""
    wild = ["--lr", "1e30", "--warmup", "0", "--clip", "1e30"]
    assert main(["train", *FAST, *wild, "--steps", "20", "--eval-every", "0", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lower --lr" in err[0]
    args = [a for a in FAST if a != "--preset" and a != "yaad"]
    assert main(["compare", "--presets", "yaad", "transformer", *args, *wild, "--steps", "20",
                 "--eval-every", "0", "--out", str(tmp_path / "c")]) == 0
    rows = json.loads((tmp_path / "c" / "compare.json").read_text())["rows"]
    assert [("diverged" in r) for r in rows].count(True) >= 1
    assert "diverged" in capsys.readouterr().out


def test_compare_matches_the_given_parameter_count(tmp_path):
    """--params N matches every preset to N, not to the largest of this invocation's presets (the tiny
    presets count 83K-147K): the SwiGLU width moves in steps of 8 units, 3 x dim x layers x 8 = 3072
    parameters at the tiny size, so each count is within half a step of N."""
    args = [a for a in FAST if a not in ("--preset", "yaad")]
    assert main(["compare", "--presets", "transformer", "gated-deltanet", *args, "--steps", "1", "--eval-every", "0",
                 "--params", "200000", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert len(rows) == 2 and all(abs(r["parameters"] - 200000) <= 1536 for r in rows), rows
