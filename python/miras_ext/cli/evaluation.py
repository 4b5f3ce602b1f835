"""Validation of a model on a task's fixed validation batches."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from ..tasks import IGNORE, MQAR, SNIAH, Task, TextLM, answer_accuracy


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batches: int, batch_size: int, device, seq_len: int | None = None,
             autocast=nullcontext) -> dict:
    """Validation loss and teacher-forced accuracy on the labelled tokens (per needle kind for S-NIAH; bits
    per byte for byte-level LM); the validation batches are fixed (split "val", steps 0..batches-1)."""
    was = model.training
    model.eval()
    groups = [(n, dict(needles=(n,))) for n in task.needles] if isinstance(task, SNIAH) else [(None, {})]
    out, loss_sum, tok_sum, right_all, lab_all = {}, 0.0, 0, 0, 0
    for name, kw in groups:
        right = labelled = seq_ok = seqs = 0
        for i in range(batches):
            ids, labels = task.batch(i, batch_size, "val", seq_len=seq_len, **kw)
            ids, labels = ids.to(device), labels.to(device)
            with autocast():
                res = model(ids, labels=labels)
            n = int((labels[:, 1:] != IGNORE).sum())
            loss_sum += float(res.loss) * n
            tok_sum += n
            r, l, s, b = answer_accuracy(res.logits.float(), labels)
            right, labelled, seq_ok, seqs = right + r, labelled + l, seq_ok + s, seqs + b
        right_all, lab_all = right_all + right, lab_all + labelled
        if name is not None:
            out[f"accuracy/{name}"] = seq_ok / seqs      # the whole answer right
    out["loss"] = loss_sum / max(tok_sum, 1)
    out["accuracy"] = (sum(out[f"accuracy/{n}"] for n, _ in groups) / len(groups) if isinstance(task, SNIAH)
                       else right_all / max(lab_all, 1))
    if isinstance(task, TextLM) and task.tokenizer.name == "bytes":
        out["bits_per_byte"] = out["loss"] / math.log(2)
    model.train(was)
    return out


def chance(task: Task) -> str:
    if isinstance(task, MQAR):  # a model that stores no pair can still pick one of the context's values
        return f"chance {1 / task.n_values:.1%}; about {1 / task.pairs:.0%} guessing among the context's values"
    return ""
