"""`LLMModulesConfig`: one config for the frozen large model, the bridge and the small model."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from transformers import AutoConfig, PreTrainedConfig

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.20 (vLLM 0.32's range): sub-configs are built in `__post_init__` below
    SubConfigSpec = None

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
# Version of the saved format (config.json + model.safetensors). 0: one source, its bridge's weights under `bridge.`
# (configs of that format have no `format_version`); 1: any number of sources, bridges under `bridges.<i>.`.
FORMAT_VERSION = 1

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

# The sub-configs and the model type and values each defaults to.
SUB_CONFIG_DEFAULTS = {"large_config": ("qwen2", QWEN2_1_5B), "small_config": ("gpt_neo", GPT_NEO_125M)}


class LLMModulesConfig(PreTrainedConfig):
    r"""
    Configuration of an [`LLMModulesForCausalLM`]: a frozen large causal LM whose last hidden states feed, through
    trainable Enhanced Cross-Attention layers, a small causal LM with a new head over the large tokenizer.

    Args:
        large_config (`dict` or `PreTrainedConfig`): config of the frozen large model (default: Qwen2-1.5B); with
            several sources, of the first one (the anchor: its tokenizer is the model's).
        additional_large_configs (`list` of `dict` or `PreTrainedConfig`, *optional*): configs of the other frozen
            sources, in order; absent (None) with one source, so one-source configs are unchanged. All sources share
            the anchor's tokenizer. `large_configs` lists all of them.
        small_config (`dict` or `PreTrainedConfig`): config of the small model (default: GPT-Neo-125M).
        large_model_name_or_path (`str` or `list` of `str`): hub id or local dir the frozen weights are loaded from on
            reload; a string for one source, a list (one per source, in order) for several.
        source_fusion (`"separate"` or `"concat"`): with several sources, one bridge per source whose outputs are
            summed (`"separate"`), or one bridge over the sources' hidden states concatenated along the width.
        depth_connections (`list`, *optional*): extra gated cross-attentions at depth, as `[source_layer, small_layer]`
            pairs: the output of block `source_layer` of the source is read by the output of block `small_layer` of
            the small model (0-based). With several sources, a list of pairs per source (saved that way for one source
            too). Each gate starts at zero.
        num_depth_connections (`int`, *optional*): shorthand for `depth_connections`: k pairs per source spaced evenly
            over both depths (pair j reads block `(j + 1) * L // (k + 1)` of each). Not with `depth_connections`.
        format_version (`int`): version of the saved format; configs saved without it are version 0.
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
        head_init (`"random"` or `"small"`): how `from_large_and_small` starts the new LM head. `"random"` (the
            paper): every row random. `"small"`: the row of each token whose string the small model's tokenizer also
            has starts as the small model's output embedding of that token (`head_init.init_head_from_small`), the
            rest random, so the small model's own next-token knowledge is read out from the first step. Needs
            `small_init="pretrained"`.
        system_prompt (`str`, *optional*): the system prompt every training row shared (set by training; None when
            rows differed). Generation, chat and the server use it when a conversation has no system message and no
            `--system` is given, so a model answers in the layout it learned by default.
    """

    model_type = "llm_modules"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "large_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", init_kwargs=QWEN2_1_5B),
            "small_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt_neo", init_kwargs=GPT_NEO_125M),
        }
    else:
        # Only the vLLM plugin (llm_modules.vllm) runs on these versions: it reads this config, nothing else of ours.
        sub_configs = {"large_config": AutoConfig, "small_config": AutoConfig}

    large_config: dict | PreTrainedConfig | None = None
    small_config: dict | PreTrainedConfig | None = None
    additional_large_configs: list | None = None
    large_model_name_or_path: str | list[str] | None = None
    source_fusion: Literal["separate", "concat"] = "separate"
    depth_connections: list | None = None
    num_depth_connections: int | None = None
    format_version: int = FORMAT_VERSION
    small_model_name_or_path: str | None = None
    num_cross_attention_layers: int = 2
    cross_attention_heads: int = 8
    adapter_dim: int = 256
    dropout: float = 0.1
    gate: bool = True
    causal_cross_attention: bool = True
    small_position_embeddings: Literal["zero", "keep"] = "zero"
    small_init: Literal["pretrained", "scratch"] = "pretrained"
    head_init: Literal["random", "small"] = "random"
    vocab_size: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    system_prompt: str | None = None

    def __post_init__(self, **kwargs):
        # The base class sets `attn_implementation` (None when not given) on every sub-config; a loaded model shares
        # its config object with us, so keep the implementation it was loaded with unless one is asked for.
        loaded = {
            key: getattr(self, key)._attn_implementation
            for key in SUB_CONFIG_DEFAULTS
            if isinstance(getattr(self, key), PreTrainedConfig)
        }
        if SubConfigSpec is None:
            for key, (model_type, defaults) in SUB_CONFIG_DEFAULTS.items():
                value = getattr(self, key)
                if not isinstance(value, PreTrainedConfig):
                    value = dict(defaults) if value is None else dict(value)
                    setattr(self, key, AutoConfig.for_model(value.pop("model_type", model_type), **value))
        super().__post_init__(**kwargs)
        if self.additional_large_configs is not None:
            self.additional_large_configs = [
                c if isinstance(c, PreTrainedConfig) else AutoConfig.for_model(**c) for c in self.additional_large_configs
            ] or None
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
        if self.head_init not in ("random", "small"):
            raise ValueError(f"head_init must be 'random' or 'small', got {self.head_init!r}")
        if self.head_init == "small" and self.small_init != "pretrained":
            raise ValueError("head_init='small' copies the pretrained small model's output embeddings: it needs "
                             "small_init='pretrained'")
        if self.source_fusion not in ("separate", "concat"):
            raise ValueError(f"source_fusion must be 'separate' or 'concat', got {self.source_fusion!r}")
        paths = self.large_model_name_or_path
        if isinstance(paths, (list, tuple)) and len(paths) != self.num_sources:
            raise ValueError(f"large_model_name_or_path names {len(paths)} sources but the config has {self.num_sources}")
        self.depth_connections = self._depth_pairs()
        self.num_depth_connections = None  # expanded into depth_connections, which is what is saved
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

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "LLMModulesConfig":
        # Configs saved before `format_version` existed are format 0 (one source); a new config is the current one.
        if "format_version" not in config_dict:
            config_dict = {**config_dict, "format_version": 0}
        return super().from_dict(config_dict, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        if self.additional_large_configs is not None:
            output["additional_large_configs"] = [c.to_dict() for c in self.additional_large_configs]
        return output

    def _depth_pairs(self) -> list[list[list[int]]] | None:
        """`depth_connections` as one list of `[source_layer, small_layer]` per source (None when there are none),
        from either option; raises ValueError on a layer out of range."""
        k, pairs = self.num_depth_connections, self.depth_connections
        if k is not None and pairs is not None:
            raise ValueError("give depth_connections or num_depth_connections, not both")
        small_depth = self.small_config.num_hidden_layers
        if k is not None:
            if k < 1:
                raise ValueError(f"num_depth_connections must be >= 1, got {k}")
            pairs = [
                [[(j + 1) * c.num_hidden_layers // (k + 1), (j + 1) * small_depth // (k + 1)] for j in range(k)]
                for c in self.large_configs
            ]
        if not pairs:
            return None
        if self.num_sources == 1 and all(len(p) == 2 and isinstance(p[0], int) for p in pairs):
            pairs = [pairs]  # one source: a plain list of pairs
        if len(pairs) != self.num_sources:
            raise ValueError(f"depth_connections has {len(pairs)} lists of pairs for {self.num_sources} sources")
        for per_source, c in zip(pairs, self.large_configs):
            for source_layer, small_layer in per_source:
                if not (0 <= source_layer < c.num_hidden_layers and 0 <= small_layer < small_depth):
                    raise ValueError(
                        f"depth connection ({source_layer}, {small_layer}) is out of range: the source has "
                        f"{c.num_hidden_layers} layers, the small model {small_depth}"
                    )
        return [[[int(a), int(b)] for a, b in per_source] for per_source in pairs]

    @property
    def depth_connection_list(self) -> list[tuple[int, int, int]]:
        """Every depth connection as `(source, source_layer, small_layer)`, in the order of the modules `depth.<j>`."""
        return [(i, a, b) for i, per_source in enumerate(self.depth_connections or []) for a, b in per_source]

    @property
    def large_configs(self) -> list[PreTrainedConfig]:
        """Configs of all frozen sources, the anchor (`large_config`) first."""
        return [self.large_config, *(self.additional_large_configs or [])]

    @property
    def num_sources(self) -> int:
        return 1 + len(self.additional_large_configs or [])

    @property
    def large_model_names_or_paths(self) -> list[str | None]:
        """`large_model_name_or_path` as a list, one entry per source."""
        paths = self.large_model_name_or_path
        return list(paths) if isinstance(paths, (list, tuple)) else [paths] * self.num_sources

    @property
    def bridge_widths(self) -> list[int]:
        """Input width of each bridge: one per source (`"separate"`), or one over all sources (`"concat"`)."""
        widths = [c.hidden_size for c in self.large_configs]
        return [sum(widths)] if self.source_fusion == "concat" else widths

    @property
    def large_hidden_size(self) -> int:
        return self.large_config.hidden_size

    @property
    def small_hidden_size(self) -> int:
        return self.small_config.hidden_size
