"""LLM Modules: frozen large causal LMs (the sources) -> Enhanced Cross-Attention bridges -> small causal LM -> new head.

The data path reads in one pass in `LLMModulesForCausalLM.forward`: config -> sources -> bridges -> small model ->
head. The bridge lives in `bridge.py`, the caches in `cache.py` (their public names are importable from here too);
composing from pretrained models, saving and reloading in `checkpoints.py`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .bridge import (
    DepthConnection,
    EnhancedCrossAttention,
    LLMModulesBridge,
    capture_hook,
    cross_attention_mask,
    depth_hook,
    forward_hooks,
    transformer_blocks,
)
from .cache import LLMModulesCache
from .checkpoints import CheckpointMixin
from .configuration import LLMModulesConfig
from .llama_cpp_source import LlamaCppSource

# The bridge and cache classes moved to bridge.py and cache.py; importing them from here keeps working.
__all__ = [
    "DepthConnection",
    "EnhancedCrossAttention",
    "LLMModulesBridge",
    "LLMModulesCache",
    "LLMModulesForCausalLM",
    "cross_attention_mask",
    "extend_causal_tables",
]


def extend_causal_tables(model: nn.Module, length: int) -> None:
    """Grow fixed `[1, 1, N, N]` boolean causal tables (GPT-Neo's eager attention) to cover `length` positions.

    With zeroed positions the small model is not limited by its position table, but some architectures also size a
    causal mask buffer by it. The window of a local-attention table is read from its last row, so global and
    sliding-window tables both keep their shape of mask.
    """
    for module in model.modules():
        table = getattr(module, "bias", None)
        if not (isinstance(table, torch.Tensor) and table.dtype == torch.bool and table.dim() == 4):
            continue
        size = table.shape[-1]
        if size >= length:
            continue
        window = int(table[0, 0, -1].sum())
        new_size = max(length, 2 * size)
        grown = torch.ones(new_size, new_size, dtype=torch.bool, device=table.device).tril()
        if window < size:
            grown = grown ^ grown.tril(-window)
        module.bias = grown[None, None]


class LLMModulesPreTrainedModel(PreTrainedModel):
    config_class = LLMModulesConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Only the bridge and the new head are ours; the sub-models init themselves (or come pretrained).
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class LLMModulesForCausalLM(CheckpointMixin, LLMModulesPreTrainedModel, GenerationMixin):
    """Frozen large LMs (base transformers, no LM head) -> bridges -> small LM (token embeddings bypassed) -> new head.

    One frozen source is the paper's model. With several (`config.num_sources`, sharing one tokenizer), each source
    has its own bridge and the bridges' outputs are summed into the small model's input (`source_fusion="separate"`),
    or one bridge reads the sources' hidden states concatenated along the width (`"concat"`). For one source both are
    the paper's single bridge.

    `LLMModulesForCausalLM(config)` builds random weights from the config alone; `from_large_and_small` composes
    pretrained models; `save_pretrained` stores only what trains and `from_pretrained` reloads the frozen models
    from the ids or paths recorded in the config (these four live in checkpoints.py). `sources` and `bridges` are
    `nn.ModuleList`s (weights under `sources.<i>.` and `bridges.<i>.`); `large` and `bridge` are the first of each.
    """

    def __init__(
        self,
        config: LLMModulesConfig,
        large_model: PreTrainedModel | list[PreTrainedModel] | None = None,
        small_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        given = large_model if isinstance(large_model, (list, tuple)) else [large_model] * config.num_sources
        if len(given) != config.num_sources:
            raise ValueError(f"{len(given)} frozen models given for a config of {config.num_sources} sources")
        self.sources = nn.ModuleList(
            model if model is not None else AutoModel.from_config(c) for model, c in zip(given, config.large_configs)
        )
        read = {source for source, _, _ in config.depth_connection_list}
        if any(isinstance(self.sources[i], LlamaCppSource) for i in read):
            raise ValueError("depth connections read the frozen model's inner layers; large_quantization='gguf' "
                             "(llama.cpp) gives its last hidden states only")
        self.bridges = nn.ModuleList(LLMModulesBridge(config, width) for width in config.bridge_widths)
        self.depth = nn.ModuleList(
            DepthConnection(config.large_configs[i].hidden_size, config.small_hidden_size, config.cross_attention_heads)
            for i, _, _ in config.depth_connection_list
        )
        self.small = small_model if small_model is not None else AutoModel.from_config(config.small_config)
        self.lm_head = nn.Linear(config.small_hidden_size, config.vocab_size, bias=False)
        self.tokenizer = None  # the large model's tokenizer, when known; saved with the model
        self.post_init()
        self._record_sources_block_classes()
        self._freeze()

    def _record_sources_block_classes(self) -> None:
        """Add the sources' `_no_split_modules` (their decoder layer classes) and `_skip_keys_device_placement` to
        the model's. `post_init` collects them from the direct children only, and the sources sit one level down, in
        the `sources` ModuleList (no such attributes), so only the small model's blocks were listed. accelerate's
        FSDP2 transformer-based wrap and `device_map` read this set: without the sources' layer class every frozen
        decoder layer fell into the root FSDP2 unit, all-gathered whole in each forward and kept for the backward
        (2 ranks at small size: 1.30 GiB peak per rank against 0.70 planned, docs/training-at-scale.md)."""
        for source in self.sources:
            self._no_split_modules.update(getattr(source, "_no_split_modules", None) or ())
            self._skip_keys_device_placement.update(getattr(source, "_skip_keys_device_placement", None) or ())

    @property
    def large(self) -> PreTrainedModel:
        """The first frozen source (the anchor: its tokenizer and embeddings are the model's)."""
        return self.sources[0]

    @property
    def bridge(self) -> LLMModulesBridge:
        """The first bridge (the only one with one source or `source_fusion="concat"`)."""
        return self.bridges[0]

    def _freeze(self) -> None:
        self.sources.requires_grad_(False)
        self.sources.eval()
        # The small model reads the bridge output, never its own token embeddings: free them (GPT-Neo-125M: 38.6M
        # parameters, 147 MiB in fp32, which the paper's code even trains; freeing them keeps the real-size training
        # step under 10 GiB, docs/performance.md). An empty table stays in their place, so the module tree and
        # `get_input_embeddings()` are what transformers expects.
        unused = self.small.get_input_embeddings()
        empty = nn.Embedding(0, unused.embedding_dim, device=unused.weight.device, dtype=unused.weight.dtype)
        self.small.set_input_embeddings(empty)
        self.small.get_input_embeddings().requires_grad_(False)

    def train(self, mode: bool = True) -> "LLMModulesForCausalLM":
        super().train(mode)
        self.sources.eval()  # frozen means no dropout either, whatever Trainer asks of the whole model
        return self

    def get_input_embeddings(self) -> nn.Module | None:
        """The anchor source's token embeddings (None when llama.cpp runs it: they are not in torch)."""
        embeddings = getattr(self.large, "get_input_embeddings", None)
        return embeddings() if embeddings is not None else None

    def new_cache(self) -> LLMModulesCache:
        """An empty cache for this model; a source or small model that keeps its own KV cache (llama.cpp) gives its
        part."""
        return LLMModulesCache(self.config, [getattr(source, "new_cache", lambda: None)() for source in self.sources],
                               getattr(self.small, "new_cache", lambda: None)())

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    # ---- forward --------------------------------------------------------------------------------------------

    def source_hidden_states(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        caches: list[Cache] | None = None,
    ) -> list[torch.Tensor]:
        """Last hidden states `[batch, seq, D_i]` of each frozen source, in order (base transformers only: no LM head
        is ever computed). `caches`: one KV cache per source, or None."""
        return self._run_sources(input_ids, attention_mask, position_ids, caches)[0]

    def read_layers(self) -> list[list[int]]:
        """The one place that decides which hidden layers each source returns besides its last: the blocks that depth
        connections read. Only those are captured (by hooks), never `output_hidden_states`, which keeps all."""
        layers: list[set[int]] = [set() for _ in range(self.config.num_sources)]
        for source, source_layer, _ in self.config.depth_connection_list:
            layers[source].add(source_layer)
        return [sorted(chosen) for chosen in layers]

    def _run_sources(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        caches: list[Cache] | None,
    ) -> tuple[list[torch.Tensor], list[dict[int, torch.Tensor]]]:
        """Each source's last hidden states, and the outputs `{block: [batch, seq, D_i]}` of the blocks it is read at."""
        states, taps = [], []
        with torch.no_grad():
            for i, (source, layers) in enumerate(zip(self.sources, self.read_layers())):
                tapped: dict[int, torch.Tensor] = {}
                blocks = transformer_blocks(source) if layers else []
                hooks = [(blocks[layer], capture_hook(tapped, layer)) for layer in layers]
                cache = caches[i] if caches is not None else None
                with forward_hooks(hooks):
                    out = source(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        position_ids=position_ids,
                        cache=cache,
                        use_cache=cache is not None,
                    )
                states.append(out.last_hidden_state)
                taps.append(tapped)
        return states, taps

    def large_hidden_states(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Last hidden states `[batch, seq, D_L]` of the one frozen source (what the feature cache stores).

        Raises ValueError with several sources: use `source_hidden_states`.
        """
        if self.config.num_sources != 1:
            raise ValueError(f"large_hidden_states reads one source; this model has {self.config.num_sources}")
        return self.source_hidden_states(input_ids, attention_mask, position_ids, [cache] if cache is not None else None)[0]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        large_hidden_states: torch.Tensor | list[torch.Tensor] | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        r"""
        input_ids: token ids of the LARGE model's tokenizer, `[batch, seq]`.
        attention_mask: 2D padding mask over past and current tokens, `[batch, past + seq]`.
        position_ids: positions of the current tokens (defaults to the count of real tokens before each one).
        cache: an `LLMModulesCache` (created on demand when `use_cache`).
        labels: next-token targets, shifted inside like Hugging Face causal LMs; -100 is ignored. In training mode
            only the labelled positions go through the new head and `logits` is None, which saves the
            `[batch, seq, vocab]` tensor over the large vocabulary.
        logits_to_keep: compute logits for the last N positions only (0 = all), as `generate` asks for.
        large_hidden_states: precomputed last hidden states of the frozen model (the feature cache), a list of
            one per source, or with several sources one tensor `[batch, seq, D_1 + ... + D_N]` of theirs side by
            side, as the feature cache stores them; skips the sources.
        num_items_in_batch: labelled tokens in the whole accumulated batch, as `transformers.Trainer` passes it: the
            loss is then this batch's summed cross-entropy over that count, so accumulation equals one big batch.
        """
        if input_ids is None and large_hidden_states is None:
            raise ValueError("Pass input_ids (or large_hidden_states from the feature cache).")
        if input_ids is not None:
            reference = input_ids
        else:
            reference = large_hidden_states[0] if isinstance(large_hidden_states, (list, tuple)) else large_hidden_states
        batch, length = reference.shape[:2]
        if use_cache is None:
            use_cache = not self.training and labels is None
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None and not isinstance(cache, LLMModulesCache):
            raise TypeError(f"cache must be an LLMModulesCache, got {type(cache).__name__}")
        past = cache.get_seq_length() if cache is not None else 0

        # Always a full 2D mask: without one, all-zero small-model positions read as packed sequences.
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=reference.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]

        # Sources -> bridges: each bridge reads its source (or, "concat", all of them side by side); the bridges'
        # outputs are summed into the small model's input, which for one source is the paper's bridge output.
        if large_hidden_states is None:
            states, taps = self._run_sources(
                input_ids, attention_mask, position_ids, cache.sources if cache is not None else None
            )
        elif self.config.depth_connection_list:
            raise ValueError("large_hidden_states (the feature cache) holds last hidden states only; depth connections "
                             "need the sources' inner layers: pass input_ids")
        else:
            taps = []
            widths = [c.hidden_size for c in self.config.large_configs]
            if isinstance(large_hidden_states, (list, tuple)):
                states = list(large_hidden_states)
            elif large_hidden_states.shape[-1] != sum(widths):
                raise ValueError(f"large_hidden_states is {large_hidden_states.shape[-1]} wide; the sources' last hidden "
                                 f"states are {' + '.join(map(str, widths))} wide")
            else:
                states = list(large_hidden_states.split(widths, dim=-1))
            if len(states) != self.config.num_sources:
                raise ValueError(f"large_hidden_states holds {len(states)} sources; the model has {self.config.num_sources}")
        # The bridge's compute dtype: its norms' (its linear layers may be int8 at inference, `quantize_trained_parts`).
        bridge_dtype = next(p.dtype for p in self.bridge.parameters() if p.is_floating_point())
        states = [state.to(bridge_dtype) for state in states]
        if self.config.source_fusion == "concat":
            states = [torch.cat(states, dim=-1)]
        inputs_embeds = torch.stack([
            bridge(state, attention_mask, cache.bridges[i] if cache is not None else None)
            for i, (bridge, state) in enumerate(zip(self.bridges, states))
        ]).sum(0)

        if self.config.small_position_embeddings == "zero":
            small_positions = torch.zeros_like(position_ids)
        else:
            limit = getattr(self.config.small_config, "max_position_embeddings", None)
            if limit is not None and int(position_ids.max()) >= limit:
                raise ValueError(
                    f"sequence reaches position {int(position_ids.max())} but the small model has {limit} positions "
                    "and small_position_embeddings='keep'; use small_position_embeddings='zero' for longer inputs"
                )
            small_positions = position_ids
        if self.config.small_position_embeddings == "zero":
            extend_causal_tables(self.small, past + length)
        # Depth connections: hooks on the small model's blocks rewrite each chosen block's output, so the pretrained
        # small model runs unchanged (no wrapper renames its weights) and any architecture with a block list works.
        depth_mask = small_blocks = None
        if self.depth:
            depth_mask = cross_attention_mask(attention_mask, length, past + length, self.config.causal_cross_attention)
            small_blocks = transformer_blocks(self.small)
        injections = [
            (small_blocks[small_layer], depth_hook(self.depth[j], taps[source][source_layer], depth_mask, cache.depth[j] if cache is not None else None))
            for j, (source, source_layer, small_layer) in enumerate(self.config.depth_connection_list)
        ]
        with forward_hooks(injections):
            small_out = self.small(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=small_positions,
                cache=cache.small if cache is not None else None,
                use_cache=cache is not None,
            )
        hidden = small_out.last_hidden_state

        loss = None
        logits = None
        if labels is not None:
            loss = self.loss_from_hidden(hidden, labels, num_items_in_batch)
        if labels is None or not self.training:
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            logits = self.lm_head(kept)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    def loss_from_hidden(
        self, hidden: torch.Tensor, labels: torch.LongTensor, num_items_in_batch: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token cross-entropy, running the new head only where a label is set: the mean over this batch's
        labelled tokens, or their sum over `num_items_in_batch` when given."""
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != -100
        if not bool(keep.any()):
            # No labelled token: a zero that still depends on the parameters, so DDP and AMP see a graph.
            return hidden.sum() * 0.0
        logits = self.lm_head(hidden[:, :-1][keep]).float()
        if num_items_in_batch is None:
            return F.cross_entropy(logits, targets[keep])
        return F.cross_entropy(logits, targets[keep], reduction="sum") / num_items_in_batch

    # ---- generation -----------------------------------------------------------------------------------------

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        # transformers would build DynamicCache(config=self.config), which cannot hold three models' caches.
        # Private hook, pinned by the transformers range in pyproject.toml and covered by tests/test_modeling.py.
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        model_kwargs["cache"] = self.new_cache()

    def trained_parts(self) -> list[nn.Module]:
        """The modules that train: the bridges, the depth connections, the small model and the head."""
        return [self.bridges, self.depth, self.small, self.lm_head]

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes: the bridges, the small model (without its unused token embeddings) and the head."""
        frozen_embeddings = {id(p) for p in self.small.get_input_embeddings().parameters()}
        return {
            name: param.detach()
            for name, param in self.named_parameters()
            if not name.startswith("sources.") and id(param) not in frozen_embeddings
        }

    def parameter_summary(self) -> dict[str, int]:
        """Parameter counts: frozen (large model), trainable and its parts (bridge, small model, head)."""
        def count(params) -> int:
            return sum(p.numel() for p in params)

        return {
            "frozen_large": count(self.sources.parameters()),
            "bridge": count(self.bridges.parameters()) + count(self.depth.parameters()),  # depth connections too
            "small_model": count(p for p in self.small.parameters() if p.requires_grad),
            "lm_head": count(self.lm_head.parameters()),
            "trainable": count(p for p in self.parameters() if p.requires_grad),
            "unused_small_embeddings": count(self.small.get_input_embeddings().parameters()),
        }


# `AutoModelForCausalLM.from_pretrained(dir)` then works on saved combined models too.
AutoConfig.register(LLMModulesConfig.model_type, LLMModulesConfig, exist_ok=True)
AutoModelForCausalLM.register(LLMModulesConfig, LLMModulesForCausalLM, exist_ok=True)
