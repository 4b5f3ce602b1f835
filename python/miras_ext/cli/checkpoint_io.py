"""Saving a run's checkpoint (weights, config, optimizer and RNG state) into the folder protocol of
cli/checkpoint.py, and loading a checkpoint's model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..models import MirasConfig, MirasForCausalLM
from . import checkpoint
from .distributed import dist_env, full_state_dict, unwrap

TOKENIZER = "tokenizer.json"  # a trained BPE, kept in the checkpoint


def save_checkpoint(run: Path, model, optimizer, step: int, meta: dict, extra: dict, bpe=None) -> None:
    """Write run/checkpoint.new (rank 0 the weights, config and a trained BPE `bpe` as tokenizer.json, every
    FSDP rank its optimizer shard) and swap it in for run/checkpoint (cli/checkpoint.py)."""
    from safetensors.torch import save_file
    rank, world, _ = dist_env()
    state = full_state_dict(model)
    opt_state = optimizer.state_dict()
    tmp = run / checkpoint.STAGING
    if rank == 0:
        checkpoint.staging(run)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
        if bpe is not None:
            bpe.save(str(tmp / TOKENIZER))
    if world > 1:
        dist.barrier()
    if rank == 0 or any(type(p).__name__ == "DTensor" for p in unwrap(model).parameters()):
        name = "trainer.pt" if world == 1 or rank == 0 else f"trainer-rank{rank}.pt"
        torch.save(dict(step=step, optimizer=opt_state, rng=torch.get_rng_state(), **extra), tmp / name)
    if world > 1:
        dist.barrier()
    if rank == 0:
        checkpoint.commit(run, step)
    if world > 1:
        dist.barrier()


def load_model(path: str | Path, device="cpu") -> tuple[MirasForCausalLM, dict]:
    """The model of a checkpoint (a run folder or its checkpoint/ folder) and the checkpoint's config.json,
    after checking every file against the checkpoint's manifest."""
    ckpt = checkpoint.find_checkpoint(path)
    checkpoint.verify(ckpt)
    meta = checkpoint.load_json(ckpt / "config.json")
    if (ckpt / TOKENIZER).exists():  # the run's trained BPE: load it rather than train it again
        meta["train"]["tokenizer"] = str(ckpt / TOKENIZER)
    model = MirasForCausalLM(MirasConfig.from_dict(meta["model"]))
    model.load_state_dict(checkpoint.load_tensors(ckpt / "model.safetensors", device))
    return model.to(device), meta
