"""Invalid configurations raise ValueError naming the field; the reference backend matches the op."""

import pytest
import torch

from miras_ext import MemorySpec
from miras_ext.models import MirasConfig, MirasForCausalLM, preset

from .helpers import tiny_model, tokens


@pytest.mark.parametrize("kwargs, field", [
    (dict(dim=64, n_heads=3), "n_heads"),
    (dict(n_layers=2, mixers=("miras",)), "mixers"),
    (dict(n_layers=2, mixers=("miras", "mamba")), "mixers"),
    (dict(memory=dict(bias="l3")), "bias"),
    (dict(memory=dict(retention="kl2")), "retention"),
    (dict(memory=dict(bias="lp", p=0.5)), "p"),
    (dict(memory=dict(memory="vector")), "memory"),
    (dict(lr_gate="exp"), "lr_gate"),
    (dict(alpha_gate="tanh"), "alpha_gate"),
    (dict(lr_gate="dt", alpha_gate="sigmoid", per_channel_gates=False), "lr_gate"),
    (dict(alpha_gate="fixed", per_channel_gates=True), "per_channel_gates"),
    (dict(memory=dict(memory="mlp", layers=3)), "memory"),            # per-channel MLP gates need <= 2 layers
    (dict(backend="cuda"), "backend"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(lr_max=-1.0), "lr_max"),
    (dict(swa_window=0), "swa_window"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(output_gate="relu"), "output_gate"),
    (dict(memory_init="zeros"), "memory_init"),
])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        MirasConfig(**kwargs)


def test_invalid_preset_and_size():
    with pytest.raises(ValueError, match="^name:"):
        preset("mamba3")
    with pytest.raises(ValueError, match="^size:"):
        preset("moneta", "7B")
    with pytest.raises(ValueError, match="^p:"):
        preset("moneta", memory=MemorySpec(bias="lp", p=0.9))


def test_config_dict_round_trip():
    cfg = preset("yaad-h", "tiny")
    assert MirasConfig.from_dict(cfg.to_dict()) == cfg


def test_vector_memory_runs_on_the_reference_backend():
    cfg = MirasConfig(memory=MemorySpec(memory="vector", bias="l2", retention="l2"), backend="reference",
                      chunk_size=4)
    out = MirasForCausalLM(cfg)(tokens(1, 7))
    assert out.logits.shape == (1, 7, 256)


@pytest.mark.parametrize("name", ["moneta", "memora-h"])
def test_reference_backend_matches_the_op(name):
    op = tiny_model(name)
    ref = tiny_model(name, backend="reference")
    ref.load_state_dict(op.state_dict())
    ids = tokens(2, 19)
    out_op, out_ref = op(ids, labels=ids), ref(ids, labels=ids)
    torch.testing.assert_close(out_op.logits, out_ref.logits, rtol=0, atol=1e-10)
    out_op.loss.backward()
    out_ref.loss.backward()
    for (n, a), b in zip(op.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-10, msg=n)
