"""The Llama-style pre-norm block and the causal language model."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .cache import Cache
from .config import MirasConfig
from .lm_inputs import check_lm_inputs
from .miras_layer import MirasLayer
from .norm import RMSNorm, SwiGLU


class Block(nn.Module):
    """x + mixer(RMSNorm(x)), then + SwiGLU(RMSNorm(x))."""

    def __init__(self, config: MirasConfig, mixer: str):
        super().__init__()
        self.kind = mixer
        self.mixer_norm = RMSNorm(config.dim, config.norm_eps)
        if mixer == "miras":
            self.mixer = MirasLayer(config)
        else:
            self.mixer = Attention(config.dim, config.n_heads, config.rope_theta,
                                   config.window if mixer == "swa" else None)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.hidden)

    def forward(self, x, cache=None, offset: int = 0, use_cache: bool = False, cu_seqlens=None):
        h = self.mixer_norm(x)
        if self.kind == "miras":
            y, new = self.mixer(h, cache, use_cache, cu_seqlens)
        else:
            y, new = self.mixer(h, cache, offset, use_cache, cu_seqlens)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), new


class CausalLMOutput(NamedTuple):
    logits: torch.Tensor            # [B, T, vocab]
    loss: torch.Tensor | None       # mean next-token cross entropy over labels != -100
    cache: Cache | None


class MirasForCausalLM(nn.Module):
    """Embeddings, blocks, final RMSNorm and the (tied) head.

    forward(input_ids [B, T], labels=None, cache=None, use_cache=False, cu_seqlens=None):
      labels: [B, T] token ids aligned with input_ids (shifted inside: position t predicts labels[t + 1]);
        -100 marks padding and is ignored. With cu_seqlens no token predicts across a sequence boundary.
      cache / use_cache: chunked prefill then decoding; pass the returned cache back with the next tokens.
      cu_seqlens: [N + 1] offsets of N sequences packed along T (B = 1); no information crosses a boundary.
    """

    def __init__(self, config: MirasConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, m) for m in config.mixers)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        # A second pass: modules() lists a MirasLayer before its gate Linears, so setting the gate biases in
        # the first pass would be undone by the zeroing above (every gate then started at sigmoid(0)).
        for m in self.modules():
            if isinstance(m, MirasLayer):
                m.reset_gates()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache: Cache | None = None,
                use_cache: bool = False, cu_seqlens: torch.Tensor | None = None) -> CausalLMOutput:
        check_lm_inputs(input_ids, labels, cu_seqlens, self.config.vocab_size)
        if cu_seqlens is not None and (cache is not None or use_cache):
            raise ValueError("cu_seqlens: packed sequences are for training and scoring; decode with a padded "
                             "batch of equal-length prompts (cache with cu_seqlens is not supported)")
        if use_cache and cache is None:
            cache = Cache.empty(len(self.blocks))
        offset = cache.seen if cache is not None else 0
        x = self.embed(input_ids)
        new_layers = []
        for i, block in enumerate(self.blocks):
            x, entry = block(x, cache.layers[i] if cache is not None else None, offset, use_cache, cu_seqlens)
            new_layers.append(entry)
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
        loss = None
        if labels is not None:
            target = labels[:, 1:].clone()
            if cu_seqlens is not None:
                ends = cu_seqlens[1:-1].long() - 1  # the last token of a sequence predicts nothing
                ends = ends[(ends >= 0) & (ends < target.shape[1])]
                target[0, ends] = -100
            scores = logits[:, :-1].reshape(-1, logits.shape[-1])
            if scores.dtype in (torch.float16, torch.bfloat16):
                scores = scores.float()
            loss = F.cross_entropy(scores, target.reshape(-1), ignore_index=-100)
        new_cache = Cache(new_layers, offset + input_ids.shape[1]) if use_cache else None
        return CausalLMOutput(logits, loss, new_cache)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        from .generate import generate
        return generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, greedy, generator)
