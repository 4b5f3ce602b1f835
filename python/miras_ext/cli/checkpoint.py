"""The checkpoint folder of a `miras train` run: written whole, swapped in atomically, verified on load.

OUT/checkpoint/ holds model.safetensors (the weights), config.json (model configuration, task, training
arguments), trainer.pt (step, optimizer and RNG state; trainer-rank{r}.pt per rank under FSDP) and
manifest.json, written last: the step and each file's size and sha256. A folder with a manifest whose files
have their sizes is complete; its checksums are verified whenever it is loaded.

A save fills OUT/checkpoint.new, then renames checkpoint -> checkpoint.old and checkpoint.new -> checkpoint,
then deletes checkpoint.old: a complete checkpoint exists at every instant, and a kill between two renames
leaves two folders. recover() (before every save and resume) keeps the newest complete one as
OUT/checkpoint and deletes the others; find_checkpoint() (eval, generate) reads the newest complete one
without changing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

CURRENT, STAGING, PREVIOUS = "checkpoint", "checkpoint.new", "checkpoint.old"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A missing, incomplete or corrupted checkpoint: one line naming the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, step: int) -> None:
    """Seal a fully written folder: every file's size and sha256, flushed to disk before the manifest."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name != MANIFEST:
            _fsync(p)
            files[p.name] = dict(bytes=p.stat().st_size, sha256=_sha256(p))
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(dict(step=step, files=files), indent=1) + "\n")
    _fsync(tmp)
    tmp.rename(folder / MANIFEST)
    _fsync(folder)


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: {folder} is incomplete ({MANIFEST} is missing: the save did not "
                              "finish)") from None
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "step" not in manifest:
        raise CheckpointError(f"checkpoint: {path} is not a valid manifest (truncated or edited)")
    return manifest


def _step_if_complete(folder: Path) -> int | None:
    """The step of a complete folder (manifest present, every file of its size), else None; reads no data."""
    try:
        manifest = read_manifest(folder)
    except CheckpointError:
        return None
    try:   # a folder renamed by a save running beside this read is not complete here
        sizes = {name: (folder / name).stat().st_size for name in manifest["files"]}
    except OSError:
        return None
    if any(sizes[name] != entry["bytes"] for name, entry in manifest["files"].items()):
        return None
    return int(manifest["step"])


def newest(run: Path) -> Path | None:
    """The complete folder among checkpoint, checkpoint.new and checkpoint.old with the highest step."""
    steps = {run / n: _step_if_complete(run / n) for n in (CURRENT, STAGING, PREVIOUS) if (run / n).is_dir()}
    complete = [p for p, s in steps.items() if s is not None]
    return max(complete, key=lambda p: steps[p]) if complete else None


def has_run(run: Path) -> bool:
    """Whether `run` already holds a training run (a checkpoint folder, complete or not, or metrics)."""
    return any((run / n).exists() for n in (CURRENT, STAGING, PREVIOUS, "metrics.jsonl"))


def clear_run(run: Path) -> None:
    """Delete what a run writes into its folder (checkpoint folders, metrics, plot), nothing else."""
    for name in (CURRENT, STAGING, PREVIOUS):
        if (run / name).exists():
            shutil.rmtree(run / name)
    for name in ("metrics.jsonl", "loss.png"):
        (run / name).unlink(missing_ok=True)


def recover(run: Path) -> Path | None:
    """Finish an interrupted swap: the newest complete folder becomes OUT/checkpoint, the others go.
    Returns OUT/checkpoint, or None (and changes nothing) when no folder is complete."""
    best = newest(run)
    current = run / CURRENT
    if best is None:   # nothing complete: leave every folder for verify() to name the damaged file
        return None
    if best != current:
        if current.exists():
            shutil.rmtree(current)     # older than best, or incomplete
        best.rename(current)
        _fsync(run)
    for name in (STAGING, PREVIOUS):
        if (run / name).exists():
            shutil.rmtree(run / name)
    return current


def staging(run: Path) -> Path:
    """An empty OUT/checkpoint.new to write the next checkpoint into."""
    recover(run)
    folder = run / STAGING
    if folder.exists():  # a partial one (recover() promotes a complete one)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def commit(run: Path, step: int) -> Path:
    """Seal OUT/checkpoint.new and swap it in for OUT/checkpoint."""
    new, current, previous = run / STAGING, run / CURRENT, run / PREVIOUS
    write_manifest(new, step)
    if current.exists():
        current.rename(previous)
    new.rename(current)
    _fsync(run)
    if previous.exists():
        shutil.rmtree(previous)
    return current


def verify(folder: Path) -> dict:
    """Check every file of a checkpoint folder against its manifest; returns the manifest."""
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint: {p} is missing")
        size = p.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint: {p} is truncated or overwritten ({size} bytes, {entry['bytes']} saved)")
        if _sha256(p) != entry["sha256"]:
            raise CheckpointError(f"checkpoint: {p} is corrupted (its sha256 differs from the one in {MANIFEST})")
    return manifest


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, given it or a run folder (then its newest complete checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint: {p} does not exist")
    if (p / MANIFEST).exists() or (p / "model.safetensors").exists():
        return p
    found = newest(p) or (p / CURRENT)   # an incomplete checkpoint/: verify() names what is wrong with it
    if not found.is_dir():
        raise CheckpointError(f"checkpoint: {p} holds no checkpoint ({CURRENT}/ with {MANIFEST})")
    return found


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint: {path} cannot be read as JSON ({e})") from None


def load_tensors(path: Path, device: str = "cpu") -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device=str(device))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint: {path} cannot be read as safetensors ({e})") from None


def load_pickle(path: Path) -> dict:
    import pickle

    import torch
    try:
        return torch.load(path, weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"checkpoint: {path} cannot be read by torch.load ({e})") from None
