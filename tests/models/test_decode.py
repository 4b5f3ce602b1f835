"""Chunked prefill + token-by-token decoding equals one forward; generate(); cache sizes."""

import pytest
import torch

from miras_ext.models import PRESETS, MirasForCausalLM, generate, preset, sample_next
from miras_ext.models.attention import KVCache
from miras_ext.models.miras_layer import MirasCache

from .helpers import decode_logits, tiny_model, tokens


@pytest.mark.parametrize("name", PRESETS)
def test_prefill_then_decode_equals_forward_float64(name):
    # 13 prefill tokens (not a multiple of chunk 8) then 11 single steps: the state carries the chunk
    # schedule (docs/math.md Sec. 5, Resuming), so every token sees the same anchors in both runs and the
    # two computations are the same math up to summation order: float64 rounding, ~1e-13 observed.
    model = tiny_model(name)
    ids = tokens(2, 24)
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(decode_logits(model, ids, 13), full, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["moneta", "memora-h", "yaad", "titans"])
def test_prefill_then_decode_equals_forward_float32(name):
    # float32: the same chunk schedule, another summation order. The residual memory x + LN(f(x)) of the
    # Miras models is ill-conditioned at initialisation (f(x) is small and nearly constant across channels,
    # LayerNorm divides by its spread), so one float32 forward is itself up to ~4e-4 away from float64 for
    # Memora/Yaad (~1e-6 elsewhere). Decoding must be as close to the float32 forward as that forward is to
    # the float64 truth: within 4x that error (observed ratios 0.5-2), plus 1e-6.
    model = tiny_model(name)
    ids = tokens(2, 24)
    with torch.no_grad():
        truth = model(ids).logits
        model = model.float()
        full = model(ids).logits
    own_error = (full.double() - truth).abs().max().item()
    gap = (decode_logits(model, ids, 13) - full).abs().max().item()
    assert gap <= 4 * own_error + 1e-6, f"{name}: decode gap {gap:.2e}, float32 forward error {own_error:.2e}"


def test_prefill_in_several_chunks():
    model = tiny_model("yaad-h")
    ids = tokens(1, 30)
    with torch.no_grad():
        full = model(ids).logits
        a = model(ids[:, :5], use_cache=True)
        b = model(ids[:, 5:19], cache=a.cache, use_cache=True)
        c = model(ids[:, 19:], cache=b.cache)
    torch.testing.assert_close(torch.cat([a.logits, b.logits, c.logits], 1), full, rtol=0, atol=1e-9)


def test_cache_sizes():
    model = tiny_model("moneta-h", dtype=torch.float32)          # layer 0 Miras, layer 1 SWA (window 8)
    ids = tokens(1, 40)
    with torch.no_grad():
        out = model(ids[:, :20], use_cache=True)
        miras0, swa0 = out.cache.layers
        assert isinstance(miras0, MirasCache) and isinstance(swa0, KVCache)
        assert swa0.k.shape[2] == 8                               # the SWA cache keeps only the window
        size0 = out.cache.nbytes()
        for t in range(20, 40):
            out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
        assert out.cache.nbytes() == size0 and out.cache.seen == 40
        assert out.cache.layers[0].conv[0].shape == (1, 3, 64)    # last conv_size - 1 inputs
        assert out.cache.layers[0].memory.position.tolist() == [40]


def test_full_attention_cache_grows():
    model = tiny_model("transformer", dtype=torch.float32)
    with torch.no_grad():
        out = model(tokens(1, 10), use_cache=True)
        out = model(tokens(1, 1), cache=out.cache, use_cache=True)
    assert out.cache.layers[0].k.shape[2] == 11


def test_sliding_window_ignores_old_tokens():
    torch.manual_seed(0)
    model = MirasForCausalLM(preset("transformer", "tiny", n_layers=1, mixers=("swa",), swa_window=8)).double()
    a = tokens(1, 20)
    b = a.clone()
    b[0, 0] = (a[0, 0] + 1) % 256
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    assert (la[0, :8] - lb[0, :8]).abs().max() > 1e-6              # inside the window: changes
    torch.testing.assert_close(la[0, 8:], lb[0, 8:], rtol=0, atol=0)  # positions >= 8 never see token 0


@pytest.mark.parametrize("name", ["moneta", "yaad-h", "transformer"])
def test_greedy_generate_is_argmax_decoding(name):
    model = tiny_model(name, dtype=torch.float32)
    prompt = tokens(2, 11)
    out = model.generate(prompt, 6, greedy=True)
    assert out.shape == (2, 17) and torch.equal(out[:, :11], prompt)
    assert torch.equal(out, generate(model, prompt, 6, greedy=True))  # deterministic
    ids = prompt
    with torch.no_grad():
        for _ in range(6):                                        # argmax of a full forward, no cache
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_sampling_options():
    model = tiny_model("gated-deltanet", dtype=torch.float32)
    prompt = tokens(2, 5)
    run = lambda **kw: model.generate(prompt, 5, generator=torch.Generator().manual_seed(3), **kw)  # noqa: E731
    assert torch.equal(run(temperature=0.8, top_k=20, top_p=0.9), run(temperature=0.8, top_k=20, top_p=0.9))
    assert torch.equal(run(top_k=1), model.generate(prompt, 5, greedy=True))
    assert run(temperature=1.0).shape == (2, 10)


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).log_softmax(-1).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) <= {2, 3}
    p = logits.exp()[0]                                            # [0.032, 0.087, 0.237, 0.644]
    assert set(sample_next(logits, top_p=0.7, generator=g).tolist()) <= {2, 3}
    assert set(sample_next(logits, top_p=float(p[3]) * 0.99, generator=g).tolist()) == {3}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, top_p=1.5)
