"""Shared helpers of the model tests: tiny configurations, short sequences."""

from __future__ import annotations

import torch

from miras_ext.models import MirasForCausalLM, preset

# chunk 8 and window 8 so that 20-30-token sequences cross chunk and window boundaries.
TINY = dict(chunk_size=8, swa_window=8)


def tiny_model(name: str, dtype=torch.float64, seed: int = 0, **overrides) -> MirasForCausalLM:
    torch.manual_seed(seed)
    model = MirasForCausalLM(preset(name, "tiny", **{**TINY, **overrides}))
    return model.to(dtype).eval()


def tokens(b: int, t: int, seed: int = 1, vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


def decode_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a chunked prefill of `prefill` tokens, then one token per call on the cache."""
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        logits, cache = [out.logits], out.cache
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.cache
    return torch.cat(logits, dim=1)
