"""Hugging Face integration (miras_ext.models.hf): config and model registered with the Auto classes,
save_pretrained / from_pretrained bit-exact, transformers' generate() through the Miras cache."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from miras_ext.models import MirasForCausalLM, generate, preset  # noqa: E402
from miras_ext.models.hf import MirasHFConfig, MirasHFForCausalLM, map_cache  # noqa: E402

from .helpers import TINY, tokens  # noqa: E402


def hf_model(name: str, dtype=torch.float64, seed: int = 0, **overrides) -> MirasHFForCausalLM:
    torch.manual_seed(seed)
    return MirasHFForCausalLM.from_preset(name, "tiny", **{**TINY, **overrides}).to(dtype).eval()


def test_config_fields_and_auto_config(tmp_path):
    config = MirasHFConfig.from_preset("yaad-h", "tiny", chunk_size=8, eos_token_id=3)
    assert config.to_miras_config() == preset("yaad-h", "tiny", chunk_size=8)
    assert config.hidden_size == 64 and config.num_hidden_layers == 2 and config.eos_token_id == 3
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is MirasHFConfig
    assert loaded.to_miras_config() == config.to_miras_config() and loaded.eos_token_id == 3
    # Every MirasConfig field is a config.json field.
    assert set(preset("moneta").to_dict()) <= set(loaded.to_dict())


def test_config_validates():
    with pytest.raises(ValueError, match="n_heads"):
        MirasHFConfig(dim=64, n_heads=3)
    with pytest.raises(ValueError, match="mixers"):
        MirasHFConfig(n_layers=2, mixers=["miras", "nope"])


def test_state_dict_matches_miras_model():
    torch.manual_seed(0)
    ref = MirasForCausalLM(preset("moneta-h", "tiny"))
    torch.manual_seed(0)
    model = MirasHFForCausalLM.from_preset("moneta-h", "tiny")
    a, b = ref.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    wrapped = MirasHFForCausalLM.from_miras(ref)
    assert wrapped.miras is ref and wrapped.embed is ref.embed


@pytest.mark.parametrize("name,overrides", [("moneta", {}), ("yaad-h", {}), ("retnet", {}), ("mamba2", {}),
                                            ("titans", {"tie_embeddings": False})])
def test_save_load_bit_exact(tmp_path, name, overrides):
    model = hf_model(name, **overrides)
    ids = tokens(2, 20)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MirasHFForCausalLM
    assert loaded.dtype == torch.float64
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for (ka, ba), (kb, bb) in zip(model.named_buffers(), loaded.named_buffers()):  # non-persistent too
        assert ka == kb and torch.equal(ba, bb), ka
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    assert (loaded.get_output_embeddings() is None) == (overrides.get("tie_embeddings", True))


def test_forward_loss_and_cache_match_miras():
    model = hf_model("moneta-h")
    ids = tokens(2, 20)
    with torch.no_grad():
        ref = model.miras(ids, labels=ids)
        out = model(ids, labels=ids, use_cache=False)
        assert torch.equal(out.loss, ref.loss) and torch.equal(out.logits, ref.logits) and out.cache is None
        first = model(ids[:, :12], use_cache=True)
        step = model(ids[:, 12:13], cache=first.cache)
    torch.testing.assert_close(step.logits[:, -1], ref.logits[:, 12])
    with pytest.raises(ValueError, match="padding"):
        model(ids, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0))


@pytest.mark.parametrize("name", ["moneta", "yaad-h"])
def test_generate_greedy_equals_miras_generate(name):
    model = hf_model(name)
    prompt = tokens(2, 6, seed=3)
    expected = generate(model.miras, prompt, 20, greedy=True)  # 26 tokens: past the window (8) and chunks (8)
    out = model.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(out, expected)


def test_generate_beam_search_and_reorder():
    model = hf_model("yaad-h")
    prompt = tokens(1, 6, seed=4)
    out = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
    assert out.shape == (1, 12) and torch.equal(out[:, :6], prompt)
    with torch.no_grad():
        cache = model(tokens(3, 10), use_cache=True).cache
    order = torch.tensor([2, 0, 0])
    moved = model._reorder_cache(cache, order)
    flat = lambda c: [t for t in _tensors(c)]  # noqa: E731
    for a, b in zip(flat(cache), flat(moved)):
        assert torch.equal(a[order], b)


def _tensors(obj):
    found = []
    map_cache(lambda t: found.append(t) or t, obj)
    return found


def test_missing_keys_take_fresh_initialisation(tmp_path):
    from safetensors.torch import load_file, save_file
    model = hf_model("moneta", dtype=torch.float32)
    with torch.no_grad():
        model.norm.weight.fill_(3.0)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["norm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = MirasHFForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.norm.weight, torch.ones(64))  # RMSNorm's initial value, not garbage
    assert torch.equal(loaded.embed.weight, model.embed.weight)
