"""MirasForCausalLM.forward's input checks (models/lm_inputs.py): every bad token id, label or offset is a
ValueError naming the argument, instead of an IndexError in the embedding, a cross-entropy message about
batch sizes, a reshape error at T = 0 or "repeats can not be negative"."""

from __future__ import annotations

import pytest
import torch

from .helpers import tiny_model, tokens

VOCAB = 256  # the tiny preset's vocabulary


def _cases():
    ids = tokens(2, 8)
    return [
        pytest.param(dict(input_ids=ids.clone().index_fill_(1, torch.tensor([3]), VOCAB)), r"^input_ids: token ids "
                     rf"must lie in \[0, vocab_size = {VOCAB}\), got 2 outside \(min {VOCAB}, max {VOCAB}\)",
                     id="id-equal-to-vocab"),
        pytest.param(dict(input_ids=ids - 300), r"^input_ids: token ids must lie in", id="negative-ids"),
        pytest.param(dict(input_ids=ids.float()), r"^input_ids: expected integer token ids.*got torch.float32",
                     id="float-ids"),
        pytest.param(dict(input_ids=ids.tolist()), r"^input_ids: expected a tensor", id="list-ids"),
        pytest.param(dict(input_ids=ids[0]), r"^input_ids: expected \[B, T\]", id="1-d-ids"),
        pytest.param(dict(input_ids=ids[:, :0]), r"^input_ids: expected at least one token", id="T=0"),
        pytest.param(dict(input_ids=ids, labels=ids[:, 1:]), r"^labels: expected the shape of input_ids \[2, 8\]",
                     id="labels-shape"),
        pytest.param(dict(input_ids=ids, labels=ids.float()), r"^labels: expected integer", id="float-labels"),
        pytest.param(dict(input_ids=ids, labels=ids + VOCAB), r"^labels: token ids must lie in .* or -100",
                     id="labels-range"),
        pytest.param(dict(input_ids=ids[:1], cu_seqlens=torch.tensor([0, 5, 3, 8])),
                     r"^cu_seqlens: expected non-decreasing offsets from 0 to T=8", id="cu-not-monotone"),
        pytest.param(dict(input_ids=ids[:1], cu_seqlens=torch.tensor([0, 5])), r"^cu_seqlens: expected non-decreasing",
                     id="cu-short"),
        pytest.param(dict(input_ids=ids[:1], cu_seqlens=torch.tensor([0.0, 8.0])), r"^cu_seqlens: expected dtype",
                     id="cu-float"),
        pytest.param(dict(input_ids=ids, cu_seqlens=torch.tensor([0, 8])), r"^cu_seqlens: packed sequences need B = 1",
                     id="cu-B"),
    ]


@pytest.mark.parametrize("kwargs,match", _cases())
def test_bad_inputs_name_the_argument(kwargs, match):
    model = tiny_model("moneta")
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_valid_inputs_pass():
    model = tiny_model("moneta")
    ids = tokens(1, 8).int()
    labels = ids.long().clone()
    labels[0, :2] = -100
    out = model(ids, labels=labels, cu_seqlens=torch.tensor([0, 3, 3, 8], dtype=torch.int32))
    assert out.logits.shape == (1, 8, VOCAB) and torch.isfinite(out.loss)
