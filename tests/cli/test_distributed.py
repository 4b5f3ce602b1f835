"""DDP on CPU (gloo, 2 processes): the gradients of one step equal those of a single process on the same
global batch; gradient accumulation likewise; checkpoints saved and resumed by two processes (DDP, FSDP2)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from miras_ext.cli import checkpoint
from miras_ext.cli.arguments import TrainArgs
from miras_ext.cli.trainer import Trainer

ARGS = dict(preset="yaad", task="mqar", pairs=2, seq_len=16, mqar_vocab=8, batch_size=4, steps=1, quiet=True,
            plot=False)


def grads(tr: Trainer) -> dict:
    return {n: p.grad.detach().clone() for n, p in tr.model.named_parameters()}


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        tr = Trainer(TrainArgs(**ARGS, out=out))
        loss = tr.accumulate(0)
        if rank == 0:
            torch.save(dict(loss=loss, grads=grads(tr)), os.path.join(out, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_match_single_process(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")
    single = Trainer(TrainArgs(**ARGS, out=str(tmp_path / "one")))
    loss = single.accumulate(0)
    ref = grads(single)
    assert abs(ddp["loss"] - loss) < 1e-6
    for name, g in ref.items():
        torch.testing.assert_close(ddp["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
    accum = Trainer(TrainArgs(**{**ARGS, "grad_accum": 2}, out=str(tmp_path / "acc")))
    assert abs(accum.accumulate(0) - loss) < 1e-6
    for name, g in grads(accum).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-7, msg=name)


def save_worker(rank: int, world: int, port: int, out: str, fsdp: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        Trainer(TrainArgs(**{**ARGS, "steps": 2, "eval_every": 0, "eval_batches": 1}, out=out, fsdp=fsdp)).run()
        Trainer(TrainArgs(**{**ARGS, "steps": 3, "eval_every": 0, "eval_batches": 1}, out=out, fsdp=fsdp,
                          resume=True)).run()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_distributed_save_and_resume(tmp_path, fsdp):
    """Two processes save (rank 0 the weights, each FSDP rank its optimizer shard) into one sealed checkpoint,
    and resume from it."""
    mp.spawn(save_worker, args=(2, free_port(), str(tmp_path), fsdp), nprocs=2, join=True)
    manifest = checkpoint.verify(tmp_path / "checkpoint")
    assert manifest["step"] == 3
    assert ("trainer-rank1.pt" in manifest["files"]) == fsdp
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
