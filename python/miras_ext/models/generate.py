"""Sampling: chunked prefill of the prompt, then one token per model call on the cache."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, greedy: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: argmax when greedy (or temperature 0), else a sample from
    softmax(logits / temperature) restricted to the top_k tokens and to the smallest set whose
    probability reaches top_p (nucleus)."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    if not temperature > 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature!r}")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k: expected an integer >= 1, got {top_k!r}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected a value in (0, 1], got {top_p!r}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= top_p        # tokens after the nucleus is complete
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """input_ids [B, T] (equal-length prompts) -> [B, T + max_new_tokens]."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens!r}")
    out = model(input_ids, use_cache=True)
    tokens = [input_ids]
    cache, logits = out.cache, out.logits[:, -1]
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, greedy, generator)
        tokens.append(nxt[:, None])
        if i + 1 < max_new_tokens:
            out = model(nxt[:, None], cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
    return torch.cat(tokens, dim=1)
