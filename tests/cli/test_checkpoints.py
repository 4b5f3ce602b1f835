"""Checkpoints of `miras train` (cli/checkpoint.py): an existing run is not overwritten unless asked, a kill
at any point of a save leaves a complete checkpoint that --resume continues bit-exactly, and truncated or
corrupted files are one-line errors naming the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miras_ext.cli import checkpoint, main
from miras_ext.cli.trainer import read_metrics

from .test_cli import FAST

RUN = [*FAST, "--eval-every", "3", "--threads", "1"]


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run / "metrics.jsonl")]


def _step(folder: Path) -> int:
    return json.loads((folder / checkpoint.MANIFEST).read_text())["step"]


def _newest_step(run: Path) -> int:
    """The step of the newest complete checkpoint of a run being written (-1 if none, or if the folder
    was renamed while it was read)."""
    found = checkpoint.newest(run)
    try:
        return -1 if found is None else _step(found)
    except OSError:
        return -1


def test_an_existing_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *RUN, "--steps", "3", "--out", str(run)]) == 0
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", *RUN, "--steps", "1", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == before and _step(run / "checkpoint") == 3
    assert main(["train", *RUN, "--steps", "1", "--out", str(run), "--overwrite"]) == 0
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 1 and _step(run / "checkpoint") == 1


def test_compare_refuses_an_existing_comparison(tmp_path, capsys):
    args = ["compare", "--presets", "yaad", *[a for a in RUN if a not in ("--preset", "yaad", "--quiet")],
            "--steps", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[1/1] yaad-L16-P2" in out and "ETA" in out      # progress lines while each run trains
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


class Crash(BaseException):
    """A kill in the middle of a save (nothing in miras catches a BaseException)."""


# Where a save is killed: the renames of commit() are (1) manifest.json.tmp -> manifest.json,
# (2) checkpoint -> checkpoint.old, (3) checkpoint.new -> checkpoint; then checkpoint.old is deleted.
CRASHES = [("rename", 1, 2), ("rename", 2, 4), ("rename", 3, 4), ("rmtree", 1, 4)]


@pytest.mark.parametrize("what,nth,resumed_at", CRASHES,
                         ids=["before-manifest", "before-old", "before-new", "before-cleanup"])
def test_a_kill_during_a_save_resumes_from_the_newest_complete_checkpoint(tmp_path, monkeypatch, what, nth,
                                                                          resumed_at, capsys):
    common = [*RUN, "--steps", "6"]
    assert main(["train", *common, "--out", str(tmp_path / "a")]) == 0
    run = tmp_path / "b"
    assert main(["train", *common, "--out", str(run), "--stop-at", "2"]) == 0
    calls = []
    real = Path.rename if what == "rename" else checkpoint.shutil.rmtree

    def crashing(*args, **kwargs):
        calls.append(args)
        if len(calls) == nth:
            raise Crash
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Path, "rename", crashing) if what == "rename" else m.setattr(checkpoint.shutil, "rmtree", crashing)
        with pytest.raises(Crash):
            main(["train", *common, "--out", str(run), "--resume", "--stop-at", "4"])
    assert checkpoint.newest(run) is not None and _step(checkpoint.newest(run)) == resumed_at
    capsys.readouterr()
    assert main(["train", *[a for a in common if a != "--quiet"], "--out", str(run), "--resume"]) == 0
    assert f"resumed at step {resumed_at}" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
    assert _metrics(run) == _metrics(tmp_path / "a")   # every loss, gradient norm and evaluation, bit for bit


def test_sigkill_mid_training_then_resume_is_bit_exact(tmp_path):
    """A real SIGKILL of `miras train` (with a checkpoint every 2 steps), then --resume: the same metrics
    as the run that was never interrupted."""
    common = [*RUN, "--steps", "40", "--save-every", "2"]
    assert main(["train", *common, "--out", str(tmp_path / "a")]) == 0
    run = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "miras_ext.cli", "train", *common, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _newest_step(run) < 6:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert main(["train", *common, "--out", str(run), "--resume"]) == 0
    assert _metrics(run) == _metrics(tmp_path / "a")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained")
    assert main(["train", *RUN, "--steps", "2", "--out", str(run)]) == 0
    return run


def _damaged(trained: Path, tmp_path: Path, name: str, how: str) -> Path:
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    path = run / "checkpoint" / name
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[:len(data) // 2]
    else:  # flip one bit near the end: inside the tensor data of model.safetensors
        data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    return run


@pytest.mark.parametrize("name,how,words", [
    ("model.safetensors", "truncate", "is truncated"),
    ("config.json", "truncate", "is truncated"),
    ("trainer.pt", "truncate", "is truncated"),
    ("manifest.json", "truncate", "is not a valid manifest"),
    ("model.safetensors", "flip", "is corrupted"),
    ("trainer.pt", "flip", "is corrupted"),
])
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_damaged_files_are_one_line_errors_naming_the_file(trained, tmp_path, capsys, name, how, words, command):
    run = _damaged(trained, tmp_path, name, how)
    capsys.readouterr()
    argv = (["eval", str(run), "--batches", "1"] if command == "eval" else
            ["train", *RUN, "--steps", "4", "--out", str(run), "--resume"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and str(run / "checkpoint" / name) in err, err


def test_generate_says_when_the_model_is_not_a_text_model(trained, capsys):
    assert main(["generate", str(trained), "--prompt", "ab", "--max-new-tokens", "2", "--threads", "1"]) == 0
    assert "is a model of the mqar task, not a text model" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--bogus"], ["eval", "x", "--bogus"], ["generate"],
                                  ["train", "--steps", "0"], ["eval", "x", "--threads", "-1"]])
def test_subcommand_errors_point_at_the_subcommand_help(argv, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"(see miras {argv[0]} --help)" in err, err
