"""`LLMModulesForVllm`: a saved combined model as one vLLM model over the same token positions.

    input_ids [T] -> source decoder (vLLM's own Qwen2/Llama stack, paged KV cache) -> last hidden states [T, D_L]
      -> bridge: Enhanced Cross-Attention layers, each a causal paged-attention layer whose queries come from the
         bridge state and whose keys/values from the source states at the same positions (its own KV cache)
      -> small decoder (vLLM's stack, fed `inputs_embeds`, positions 0 under `small_position_embeddings="zero"`)
      -> new head [T, vocab of the large tokenizer]

vLLM flattens the batch: every tensor here is `[num_tokens, width]` over all scheduled sequences, and attention
metadata (which token belongs to which sequence, where its cache pages are) comes from vLLM's forward context.
Only the frozen source is read from the path recorded in config.json; the trained parts come from the saved dir.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import PPMissingLayer
from vllm.sequence import IntermediateTensors

from ..configuration import LLMModulesConfig
from .support import SUPPORTED_DECODERS, check_supported, padded_head_size, source_weights


def decoder_class(model_type: str) -> type[nn.Module]:
    """vLLM's base decoder stack (no LM head) for a Hugging Face `model_type` (`SUPPORTED_DECODERS`)."""
    module, name = SUPPORTED_DECODERS[model_type]
    return getattr(importlib.import_module(module), name)


class BridgeAttention(nn.Module):
    """One Enhanced Cross-Attention layer (bridge.EnhancedCrossAttention, same weight names) on vLLM's paged cache.

    Keys/values `[T, D_S]` come from the source states `memory` `[T, D_L]` and are cached per position like any
    decoder's, so position i reads positions <= i of its own sequence: the causal cross-attention. Heads whose
    size the attention backend lacks (SmolLM2's 576 / 8 = 72 on the CPU backend) are zero-padded: zeros add nothing
    to q.k and give zero output columns, which are cut off, so the result is exact.
    """

    def __init__(self, config: LLMModulesConfig, large_dim: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        small = config.small_hidden_size
        self.num_heads = config.cross_attention_heads
        self.head_dim = small // self.num_heads
        self.padded_dim = padded_head_size(self.head_dim)
        self.query_norm = nn.LayerNorm(small)
        self.memory_norm = nn.LayerNorm(large_dim)
        self.q_proj = nn.Linear(small, small)
        self.k_proj = nn.Linear(large_dim, small)
        self.v_proj = nn.Linear(large_dim, small)
        self.o_proj = nn.Linear(small, small)
        self.adapter_down = nn.Linear(small, config.adapter_dim)
        self.adapter_up = nn.Linear(config.adapter_dim, small)
        self.adapter_norm = nn.LayerNorm(small)
        self.gate = nn.Linear(2 * small, small) if config.gate else None
        self.attn = Attention(
            self.num_heads, self.padded_dim, scale=self.head_dim**-0.5, num_kv_heads=self.num_heads,
            cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn",
        )

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """`[T, H * head_dim]` -> `[T, H * padded_dim]`."""
        if self.padded_dim == self.head_dim:
            return x
        x = x.view(x.shape[0], self.num_heads, self.head_dim)
        return F.pad(x, (0, self.padded_dim - self.head_dim)).reshape(x.shape[0], -1)

    def forward(self, memory: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """memory `[T, D_L]` (the projected source states), states `[T, D_S]` -> new states `[T, D_S]`."""
        query = self.q_proj(self.query_norm(states))
        memory = self.memory_norm(memory)
        attended = self.attn(self._pad(query), self._pad(self.k_proj(memory)), self._pad(self.v_proj(memory)))
        if self.padded_dim != self.head_dim:
            attended = attended.view(-1, self.num_heads, self.padded_dim)[..., : self.head_dim]
        attended = self.o_proj(attended.reshape(states.shape))
        attended = attended + self.adapter_norm(self.adapter_up(F.gelu(self.adapter_down(attended))))
        if self.gate is None:
            return states + attended
        gate = torch.sigmoid(self.gate(torch.cat([states, attended], dim=-1)))
        return gate * attended + (1 - gate) * states


class Bridge(nn.Module):
    """Source states `[T, D_L]` -> small-model input embeddings `[T, D_S]` (bridge.LLMModulesBridge's math)."""

    def __init__(self, config: LLMModulesConfig, large_dim: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        small = config.small_hidden_size
        middle = (large_dim + small) // 2
        self.pre_proj = nn.Linear(large_dim, large_dim)
        self.proj = nn.Linear(large_dim, small)
        self.intermediate = nn.Sequential(
            nn.Linear(large_dim, middle), nn.LayerNorm(middle), nn.GELU(), nn.Linear(middle, small), nn.LayerNorm(small)
        )
        # Layer names carry one integer each (vLLM derives the cache index from it).
        self.layers = nn.ModuleList(
            BridgeAttention(config, large_dim, vllm_config, f"{prefix}.layers.{i}")
            for i in range(config.num_cross_attention_layers)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pre = self.pre_proj(hidden_states)
        states = self.intermediate(pre)
        for layer in self.layers:
            states = layer(pre, states)
        return states + self.proj(pre)


class LLMModulesForVllm(nn.Module):
    """vLLM's text-generation model interface (`forward`, `compute_logits`, `load_weights`) for a saved
    `LLMModulesForCausalLM` with one source and the paper's bridge (`support.check_supported` says what else)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: LLMModulesConfig = vllm_config.model_config.hf_config
        check_supported(config)
        self.config = config
        large, small = config.large_config, config.small_config
        # vLLM's decoder classes read their config from the VllmConfig: give each a copy holding its own.
        self.source = decoder_class(large.model_type)(vllm_config=vllm_config.with_hf_config(large), prefix="source")
        self.bridge = Bridge(config, large.hidden_size, vllm_config, "bridge")
        self.small = decoder_class(small.model_type)(vllm_config=vllm_config.with_hf_config(small), prefix="small")
        # The small model reads the bridge output, never its token embeddings (not saved either): free them.
        self.small.embed_tokens = PPMissingLayer()
        self.lm_head = ParallelLMHead(config.vocab_size, config.small_hidden_size, prefix="lm_head")
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.zero_small_positions = config.small_position_embeddings == "zero"

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.source.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """input_ids `[T]`, positions `[T]` -> the small model's last hidden states `[T, D_S]`."""
        hidden = self.source(input_ids, positions, None, inputs_embeds)
        embeds = self.bridge(hidden)
        small_positions = torch.zeros_like(positions) if self.zero_small_positions else positions
        return self.small(None, small_positions, None, embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The saved dir's trained tensors (`bridges.0.*`, `small.*`, `lm_head.weight`), then the frozen source's
        from the path recorded in the config. Returns the names of the parameters loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        small_weights = []
        for name, tensor in weights:
            if name.startswith("small."):
                small_weights.append((name.removeprefix("small."), tensor))
                continue
            name = name.replace("bridges.0.", "bridge.", 1)
            if name not in params:
                raise ValueError(f"the saved model holds {name!r}, which this vLLM model has no place for")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        loaded |= {f"small.{name}" for name in self.small.load_weights(small_weights)}
        path = Path(self.config.large_model_names_or_paths[0])
        loaded |= {f"source.{name}" for name in self.source.load_weights(source_weights(path))}
        return loaded
