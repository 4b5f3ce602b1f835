"""Packed variable-length batches (cu_seqlens) equal the padded batch, sequence by sequence."""

import pytest
import torch

from miras_ext.models.conv import ShortConv

from .helpers import tiny_model, tokens

LENGTHS = [5, 13, 9]


@pytest.mark.parametrize("name", ["moneta", "yaad-h", "memora", "transformer", "mamba2", "titans"])
def test_packed_equals_padded(name):
    model = tiny_model(name)
    seqs = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(LENGTHS)]
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist())
    padded = torch.zeros(len(seqs), max(LENGTHS), dtype=torch.long)
    labels = torch.full_like(padded, -100)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
        labels[i, :len(s)] = s
    with torch.no_grad():
        packed = model(torch.cat(seqs)[None], labels=torch.cat(seqs)[None], cu_seqlens=cu)
        ref = model(padded, labels=labels)
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(packed.logits[0, cu[i]:cu[i + 1]], ref.logits[i, :n], rtol=0, atol=1e-10)
    torch.testing.assert_close(packed.loss, ref.loss, rtol=0, atol=1e-10)  # no prediction across boundaries


def test_conv_does_not_leak_across_sequences():
    conv = ShortConv(6, 4).double()
    x = torch.randn(1, 10, 6, dtype=torch.float64)
    cu = torch.tensor([0, 2, 7, 10])
    y, _ = conv(x, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(y[:, s:e], conv(x[:, s:e])[0], rtol=0, atol=0)


def test_conv_state_continues():
    conv = ShortConv(6, 4).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    full, _ = conv(x)
    a, state = conv(x[:, :2])
    b, state = conv(x[:, 2:3], state)
    c, _ = conv(x[:, 3:], state)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=0, atol=1e-15)


def test_cache_with_cu_seqlens_is_refused():
    model = tiny_model("moneta")
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(tokens(1, 6), cu_seqlens=torch.tensor([0, 3, 6]), use_cache=True)
