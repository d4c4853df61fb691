"""`LLMModulesConfig`: one config for the frozen large model, the bridge and the small model."""

from __future__ import annotations

import warnings
from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# The paper's pair at real size (docs/design.md has the method), so `LLMModulesConfig()` alone describes Qwen2-1.5B + GPT-Neo-125M
# and real-size benchmarks can be built offline from the config with random weights.
QWEN2_1_5B = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 131072,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
GPT_NEO_125M = {
    "vocab_size": 50257,
    "hidden_size": 768,
    "num_layers": 12,
    "num_heads": 12,
    "attention_types": [[["global", "local"], 6]],
    "window_size": 256,
    "max_position_embeddings": 2048,
    "intermediate_size": None,  # GPT-Neo reads None as 4 x hidden
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}


class LLMModulesConfig(PreTrainedConfig):
    r"""
    Configuration of an [`LLMModulesForCausalLM`]: a frozen large causal LM whose last hidden states feed, through
    trainable Enhanced Cross-Attention layers, a small causal LM with a new head over the large tokenizer.

    Args:
        large_config (`dict` or `PreTrainedConfig`): config of the frozen large model (default: Qwen2-1.5B).
        small_config (`dict` or `PreTrainedConfig`): config of the small model (default: GPT-Neo-125M).
        large_model_name_or_path (`str`): hub id or local dir the frozen weights are loaded from on reload.
        small_model_name_or_path (`str`): hub id or local dir the small model started from (provenance).
        num_cross_attention_layers (`int`, defaults to 2): Enhanced Cross-Attention layers in the bridge.
        cross_attention_heads (`int`, defaults to 8): attention heads of each cross-attention layer; must divide
            the small model's width.
        adapter_dim (`int`, defaults to 256): bottleneck width of the adapter after each cross-attention.
        dropout (`float`, defaults to 0.1): dropout in the bridge.
        gate (`bool`, defaults to `True`): blend attended and original states with a learned sigmoid gate.
        causal_cross_attention (`bool`, defaults to `True`): position i reads large-model states at positions
            <= i only. `False` reproduces the paper's code, where the next token leaks into training: ablations only.
        small_position_embeddings (`"zero"` or `"keep"`): `"zero"` (the paper) feeds the small model position 0
            everywhere, so order comes from the large model through the bridge and sequences may be longer than the
            small model's position table (a learned table then adds one trained vector, row 0, as a bias);
            `"keep"` feeds real positions and limits sequences to the small model's `max_position_embeddings`.
        small_init (`"pretrained"` or `"scratch"`): start the small model from its pretrained weights, or from
            random weights as the paper's code does.
    """

    model_type = "llm_modules"
    sub_configs_defaults = {
        "large_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", init_kwargs=QWEN2_1_5B),
        "small_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt_neo", init_kwargs=GPT_NEO_125M),
    }

    large_config: dict | PreTrainedConfig | None = None
    small_config: dict | PreTrainedConfig | None = None
    large_model_name_or_path: str | None = None
    small_model_name_or_path: str | None = None
    num_cross_attention_layers: int = 2
    cross_attention_heads: int = 8
    adapter_dim: int = 256
    dropout: float = 0.1
    gate: bool = True
    causal_cross_attention: bool = True
    small_position_embeddings: Literal["zero", "keep"] = "zero"
    small_init: Literal["pretrained", "scratch"] = "pretrained"
    vocab_size: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # The base class sets `attn_implementation` (None when not given) on every sub-config; a loaded model shares
        # its config object with us, so keep the implementation it was loaded with unless one is asked for.
        loaded = {
            key: getattr(self, key)._attn_implementation
            for key in self.sub_configs_defaults
            if isinstance(getattr(self, key), PreTrainedConfig)
        }
        super().__post_init__(**kwargs)
        if kwargs.get("attn_implementation") is None:
            for key, implementation in loaded.items():
                getattr(self, key)._attn_implementation_internal = implementation
        # The output vocabulary is the large tokenizer's; generate() reads the special ids from this config.
        if self.vocab_size is None:
            self.vocab_size = self.large_config.vocab_size
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(self.large_config, name, None))
        if self.small_position_embeddings not in ("zero", "keep"):
            raise ValueError(f"small_position_embeddings must be 'zero' or 'keep', got {self.small_position_embeddings!r}")
        if self.small_init not in ("pretrained", "scratch"):
            raise ValueError(f"small_init must be 'pretrained' or 'scratch', got {self.small_init!r}")
        if self.small_config.hidden_size % self.cross_attention_heads:
            raise ValueError(
                f"cross_attention_heads={self.cross_attention_heads} must divide the small model's hidden_size "
                f"({self.small_config.hidden_size})"
            )
        if not self.causal_cross_attention:
            warnings.warn(
                "causal_cross_attention=False lets position i attend to large-model states of later tokens: the "
                "training loss is optimistic and generation behaves differently. Use it only for ablations.",
                stacklevel=2,
            )

    @property
    def large_hidden_size(self) -> int:
        return self.large_config.hidden_size

    @property
    def small_hidden_size(self) -> int:
        return self.small_config.hidden_size
