"""Hugging Face integration: MirasHFConfig / MirasHFForCausalLM, registered with AutoConfig and
AutoModelForCausalLM (model_type "miras"); save_pretrained / from_pretrained (safetensors) and
transformers' generate() through the Miras decoding cache. Needs the `hf` extra (transformers >= 5);
the rest of miras_ext.models never imports transformers.

    >>> from miras_ext.models.hf import MirasHFForCausalLM
    >>> model = MirasHFForCausalLM.from_preset("moneta-h", "tiny")
    >>> model.save_pretrained("ckpt")                       # config.json + model.safetensors
    >>> from transformers import AutoModelForCausalLM        # (after importing miras_ext.models.hf)
    >>> model = AutoModelForCausalLM.from_pretrained("ckpt")
    >>> model.generate(input_ids, max_new_tokens=32, do_sample=False)

The wrapper holds exactly the modules of a MirasForCausalLM (embed, blocks, norm, head), so its state dict
has the same keys and tensors as MirasForCausalLM(config.to_miras_config()).state_dict().
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import Cache
from .config import MirasConfig
from .model import Block, MirasForCausalLM
from .presets import preset

__all__ = ["MirasHFConfig", "MirasHFForCausalLM", "map_cache"]

_MIRAS_FIELDS = tuple(f.name for f in dataclasses.fields(MirasConfig))
_DEFAULTS = MirasConfig()


@strict
class MirasHFConfig(PretrainedConfig):
    """The fields of MirasConfig (docs/models.md), serialised to config.json: `memory` is the MemorySpec as a
    dict, `mixers` a list of per-layer names. Construction validates through MirasConfig (ValueError) and
    writes back the resolved values (mixers filled in, memory complete). The usual Hugging Face names
    (hidden_size, num_hidden_layers, num_attention_heads, max_position_embeddings, rms_norm_eps,
    tie_word_embeddings) are aliases of dim, n_layers, n_heads, max_seq_len, norm_eps, tie_embeddings."""

    model_type = "miras"
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps",
                     "tie_word_embeddings": "tie_embeddings"}

    vocab_size: int = _DEFAULTS.vocab_size
    dim: int = _DEFAULTS.dim
    n_layers: int = _DEFAULTS.n_layers
    n_heads: int = _DEFAULTS.n_heads
    mixers: list[str] | None = None
    memory: dict[str, Any] | None = None
    memory_init: str = _DEFAULTS.memory_init
    lr_gate: str = _DEFAULTS.lr_gate
    alpha_gate: str = _DEFAULTS.alpha_gate
    per_channel_gates: bool = _DEFAULTS.per_channel_gates
    gate_rank: int = _DEFAULTS.gate_rank
    lr_max: float | int = _DEFAULTS.lr_max
    delta_init: float | int = _DEFAULTS.delta_init
    conv_size: int = _DEFAULTS.conv_size
    chunk_size: int = _DEFAULTS.chunk_size
    output_gate: str = _DEFAULTS.output_gate
    swa_window: int | None = _DEFAULTS.swa_window
    mlp_hidden: int | None = _DEFAULTS.mlp_hidden
    norm_eps: float | int = _DEFAULTS.norm_eps
    rope_theta: float | int = _DEFAULTS.rope_theta
    tie_embeddings: bool = _DEFAULTS.tie_embeddings
    max_seq_len: int = _DEFAULTS.max_seq_len
    initializer_range: float | int = _DEFAULTS.initializer_range
    backend: str = _DEFAULTS.backend
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # applies aliases passed as keywords (hidden_size=...)
        resolved = self.to_miras_config().to_dict()  # validates: ValueError with MirasConfig's message
        for name in _MIRAS_FIELDS:
            setattr(self, name, resolved[name])

    def to_miras_config(self) -> MirasConfig:
        """The MirasConfig these fields describe (memory None: MirasConfig's default MemorySpec)."""
        d = {name: getattr(self, name) for name in _MIRAS_FIELDS}
        if d["memory"] is None:
            del d["memory"]
        return MirasConfig.from_dict(d)

    @classmethod
    def from_miras_config(cls, config: MirasConfig, **kwargs) -> "MirasHFConfig":
        """kwargs: further PretrainedConfig fields (eos_token_id=..., ...)."""
        return cls(**config.to_dict(), **kwargs)

    @classmethod
    def from_preset(cls, name: str, size: str = "tiny", **overrides) -> "MirasHFConfig":
        """miras_ext.models.preset(name, size, **overrides) as a MirasHFConfig; overrides that are not
        MirasConfig fields (eos_token_id, ...) go to the PretrainedConfig."""
        hf = {k: overrides.pop(k) for k in list(overrides) if k not in _MIRAS_FIELDS}
        return cls.from_miras_config(preset(name, size, **overrides), **hf)


def map_cache(fn, obj):
    """obj (a Cache and everything inside: MirasCache, MemoryState, KVCache, tuples) with fn applied to
    every tensor; the structure is rebuilt, the input is not modified."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Cache):
        return Cache([map_cache(fn, layer) for layer in obj.layers], obj.seen)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(map_cache(fn, x) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_cache(fn, x) for x in obj)
    return obj


class MirasHFForCausalLM(PreTrainedModel, GenerationMixin):
    """MirasForCausalLM as a transformers PreTrainedModel.

    forward(input_ids, attention_mask=None, cache=None, labels=None, use_cache=None, return_dict=None,
            cu_seqlens=None) -> CausalLMOutputWithPast(loss, logits, cache)
      cache: the miras_ext.models.Cache returned by the previous call (not a transformers Cache); generate()
        threads it through the decoding loop. use_cache defaults to config.use_cache outside training.
      attention_mask: accepted for generate(); must be all ones (equal-length prompts; the Miras memory has
        no padding mask). labels: as MirasForCausalLM (shifted inside, -100 ignored).
    """

    config: MirasHFConfig
    config_class = MirasHFConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _is_stateful = True                  # recurrent state: no assisted decoding (it cannot rewind)
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    def __init__(self, config: MirasHFConfig, miras: MirasForCausalLM | None = None):
        super().__init__(config)
        miras = MirasForCausalLM(config.to_miras_config()) if miras is None else miras
        # The modules of the Miras model become this model's own children (same objects, same names):
        # state dicts match key for key. The Miras model itself is kept unregistered, to call its forward.
        for name, module in miras.named_children():
            setattr(self, name, module)
        self.head = miras.head
        object.__setattr__(self, "_miras", miras)
        self._skip_init = True  # MirasForCausalLM.__init__ initialised every tensor already
        self.post_init()
        self._skip_init = False

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, size: str = "tiny", **overrides) -> "MirasHFForCausalLM":
        """A freshly initialised model of a named preset (miras_ext.models.preset) at a named size."""
        return cls(MirasHFConfig.from_preset(name, size, **overrides))

    @classmethod
    def from_miras(cls, model: MirasForCausalLM, **config_kwargs) -> "MirasHFForCausalLM":
        """Wrap an existing MirasForCausalLM; its modules are shared, not copied."""
        return cls(MirasHFConfig.from_miras_config(model.config, **config_kwargs), miras=model)

    @property
    def miras(self) -> MirasForCausalLM:
        """The wrapped MirasForCausalLM (sharing this model's parameters)."""
        return self._miras

    # ---- initialisation (HF's meta-device loading) --------------------------------------------------------

    def _init_weights(self, module):
        # As MirasForCausalLM.reset_parameters for the generic layers (used by e.g. resize_token_embeddings).
        from transformers import initialization as init
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)

    @torch.no_grad()
    def initialize_weights(self):
        """Called by post_init (nothing to do: MirasForCausalLM initialised the model) and by from_pretrained
        after loading: tensors the checkpoint did not fill (non-persistent buffers such as RetNet's gamma,
        missing keys) take the values of a freshly initialised Miras block or model."""
        if self._skip_init:
            return
        buffers = {name for name, _ in self.named_non_persistent_buffers()}
        pending = {name: t for name, t in (*self.named_parameters(), *self.named_buffers())
                   if t.device.type != "meta" and (name in buffers or not getattr(t, "_is_hf_initialized", False))}
        if not pending:
            return
        mc = self._miras.config
        with torch.device("cpu"):
            if pending.keys() <= buffers and all(n.startswith("blocks.") for n in pending):
                # Deterministic buffers only: rebuild just the blocks that hold them.
                fresh = {}
                for i in sorted({int(n.split(".")[1]) for n in pending}):
                    block = Block(mc, mc.mixers[i])
                    fresh.update({f"blocks.{i}.{k}": v for k, v in block.named_buffers()})
            else:
                model = MirasForCausalLM(mc)
                fresh = dict(model.named_parameters()) | dict(model.named_buffers())
        for name, t in pending.items():
            t.copy_(fresh[name].to(dtype=t.dtype))
            t._is_hf_initialized = True

    # ---- embeddings (for resize_token_embeddings & co.) ---------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value
        self._miras.embed = value

    def get_output_embeddings(self):
        return self.head  # None with tied embeddings (the head is embed.weight itself)

    def set_output_embeddings(self, value) -> None:
        self.head = value
        self._miras.head = value

    # ---- forward and generation ---------------------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, cu_seqlens: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast | tuple:
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds: not supported by Miras models; pass input_ids")
        if input_ids is None:
            raise ValueError("input_ids: required")
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError(f"cache: expected a miras_ext.models.Cache (from a previous call), "
                             f"got {type(cache).__name__}")
        if attention_mask is not None and cache is None and not bool(attention_mask.all()):
            raise ValueError("attention_mask: padding is not supported (the Miras memory has no padding mask); "
                             "use equal-length prompts, or packed sequences with cu_seqlens for scoring")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and cu_seqlens is None
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self._miras(input_ids, labels=labels, cache=cache, use_cache=use_cache, cu_seqlens=cu_seqlens)
        if not return_dict:
            items = (out.logits,) + ((out.cache,) if use_cache else ())
            return ((out.loss,) + items) if out.loss is not None else items
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, cache=out.cache)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not create a transformers DynamicCache: forward builds the Miras Cache itself on the
        # first call (use_cache=True) and returns it as `cache`, which generate passes back on every step.
        return False

    def _reorder_cache(self, cache: Cache, beam_idx: torch.LongTensor) -> Cache:
        """Beam search: keep the cache rows of the selected beams (every cache tensor is batch-first)."""
        return map_cache(lambda t: t.index_select(0, beam_idx.to(t.device)), cache)


AutoConfig.register(MirasHFConfig.model_type, MirasHFConfig, exist_ok=True)
AutoModelForCausalLM.register(MirasHFConfig, MirasHFForCausalLM, exist_ok=True)
