"""The trained bridge from a frozen source's hidden states into the small model: `EnhancedCrossAttention` layers
stacked by `LLMModulesBridge` (docs/design.md, step 2), the causal, padding-aware mask they share, and the depth
connections (`DepthConnection`, applied by forward hooks registered for one call)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer

from .configuration import LLMModulesConfig


def cross_attention_mask(
    attention_mask: torch.Tensor | None, query_length: int, key_length: int, causal: bool
) -> torch.Tensor | None:
    """Boolean mask `[batch, 1, query, key]` (True = attend) for queries at the last `query_length` positions.

    Query i sees keys <= i that are not padding. A padding query sees only itself, so no row is empty (an empty
    row gives NaN) and no padding row reads the future. Returns None when nothing needs masking.
    """
    past = key_length - query_length
    if attention_mask is None or bool(attention_mask.all()):
        if not causal or query_length == 1:
            return None
        attention_mask = None
    key_pos = torch.arange(key_length, device=attention_mask.device if attention_mask is not None else None)
    query_pos = key_pos[past:, None]
    allowed = key_pos[None, :] <= query_pos
    if not causal:
        allowed = torch.ones_like(allowed)
    if attention_mask is not None:
        valid = attention_mask[:, None, :].bool()
        allowed = (allowed & valid) | (key_pos[None, :] == query_pos)
    else:
        allowed = allowed[None]
    return allowed[:, None]


class EnhancedCrossAttention(nn.Module):
    """Small-width states attend to large-width memory, then an adapter and a sigmoid gate blend in the result.

    Queries come from the small-width states `[.., small_dim]`, keys and values from the large model's projected
    states `[.., large_dim]`. Output: `g * a + (1 - g) * states` with `g = sigmoid(W [states; a])`.
    """

    def __init__(self, large_dim: int, small_dim: int, num_heads: int, adapter_dim: int, dropout: float, gate: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = small_dim // num_heads
        self.dropout = dropout
        self.query_norm = nn.LayerNorm(small_dim)
        self.memory_norm = nn.LayerNorm(large_dim)
        self.q_proj = nn.Linear(small_dim, small_dim)
        self.k_proj = nn.Linear(large_dim, small_dim)
        self.v_proj = nn.Linear(large_dim, small_dim)
        self.o_proj = nn.Linear(small_dim, small_dim)
        self.adapter_down = nn.Linear(small_dim, adapter_dim)
        self.adapter_up = nn.Linear(adapter_dim, small_dim)
        self.adapter_norm = nn.LayerNorm(small_dim)
        self.adapter_dropout = nn.Dropout(dropout)
        self.gate = nn.Linear(2 * small_dim, small_dim) if gate else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        memory: torch.Tensor,
        states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache_layer: DynamicLayer | None = None,
    ) -> torch.Tensor:
        query = self._heads(self.q_proj(self.query_norm(states)))
        memory = self.memory_norm(memory)
        key, value = self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))
        if cache_layer is not None:
            key, value = cache_layer.update(key, value)
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0
        )
        attended = self.o_proj(attended.transpose(1, 2).reshape(states.shape))
        adapter = self.adapter_up(F.gelu(self.adapter_down(attended)))
        attended = attended + self.adapter_norm(self.adapter_dropout(adapter))
        if self.gate is None:
            return states + attended
        gate = torch.sigmoid(self.gate(torch.cat([states, attended], dim=-1)))
        # The blend itself is the new state; the paper's code adds `states` once more and the norm grows per layer.
        return gate * attended + (1 - gate) * states


class LLMModulesBridge(nn.Module):
    """Large hidden states `[.., D_L]` -> small-model input embeddings `[.., D_S]` (docs/design.md, step 2).

    `large_dim` is the width of the source it reads (default: the anchor's, `config.large_hidden_size`); with
    several sources each has a bridge of its own width, or one bridge reads their concatenation.
    """

    def __init__(self, config: LLMModulesConfig, large_dim: int | None = None):
        super().__init__()
        large, small = large_dim or config.large_hidden_size, config.small_hidden_size
        middle = (large + small) // 2
        self.causal = config.causal_cross_attention
        self.pre_proj = nn.Linear(large, large)
        self.proj = nn.Linear(large, small)
        self.intermediate = nn.Sequential(
            nn.Linear(large, middle), nn.LayerNorm(middle), nn.GELU(), nn.Linear(middle, small), nn.LayerNorm(small)
        )
        self.layers = nn.ModuleList(
            EnhancedCrossAttention(
                large, small, config.cross_attention_heads, config.adapter_dim, config.dropout, config.gate
            )
            for _ in range(config.num_cross_attention_layers)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache_layers: list[DynamicLayer] | None = None,
    ) -> torch.Tensor:
        pre = self.pre_proj(hidden_states)
        states = self.intermediate(pre)
        past = cache_layers[0].get_seq_length() if cache_layers else 0
        query_length = hidden_states.shape[1]
        mask = cross_attention_mask(attention_mask, query_length, past + query_length, self.causal)
        for i, layer in enumerate(self.layers):
            states = layer(pre, states, mask, cache_layers[i] if cache_layers else None)
        return states + self.proj(pre)


class DepthConnection(nn.Module):
    """Gated cross-attention from one source layer's hidden states `[.., D_L]` into one small-model layer's output
    `[.., D_S]`: `states + tanh(gate) * attention(states, memory)`.

    The gate is a zero-initialised vector, so a freshly composed model computes exactly what it did without the
    connection; training opens it channel by channel.
    """

    def __init__(self, large_dim: int, small_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = small_dim // num_heads
        self.query_norm = nn.LayerNorm(small_dim)
        self.memory_norm = nn.LayerNorm(large_dim)
        self.q_proj = nn.Linear(small_dim, small_dim)
        self.k_proj = nn.Linear(large_dim, small_dim)
        self.v_proj = nn.Linear(large_dim, small_dim)
        self.o_proj = nn.Linear(small_dim, small_dim)
        self.gate = nn.Parameter(torch.zeros(small_dim))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        memory: torch.Tensor,
        states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache_layer: DynamicLayer | None = None,
    ) -> torch.Tensor:
        query = self._heads(self.q_proj(self.query_norm(states)))
        memory = self.memory_norm(memory.to(states.dtype))
        key, value = self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))
        if cache_layer is not None:
            key, value = cache_layer.update(key, value)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        attended = self.o_proj(attended.transpose(1, 2).reshape(states.shape))
        return states + torch.tanh(self.gate) * attended


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a base transformer (`layers` of Llama/Qwen2, `h` of GPT-2/GPT-Neo, ...): the
    `nn.ModuleList` with one entry per hidden layer. Raises ValueError when there is none."""
    count = model.config.num_hidden_layers
    for module in model.children():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"{type(model).__name__} has no list of {count} blocks to connect at depth")


@contextmanager
def forward_hooks(hooks: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Forward hooks registered for the duration of one call only, so their closures carry that call's inputs and
    nothing is left on the modules (a pretrained model keeps its module tree and weight names)."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def capture_hook(store: dict[int, torch.Tensor], layer: int) -> Callable:
    """Forward hook keeping a block's output hidden states in `store[layer]`."""
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store[layer] = block_output(output)

    return hook


def depth_hook(
    connection: DepthConnection, memory: torch.Tensor, mask: torch.Tensor | None, cache_layer: DynamicLayer | None
) -> Callable:
    """Forward hook applying `connection` (reading `memory` `[batch, seq, D_L]`) to a small-model block's output."""
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = connection(memory, block_output(output), mask, cache_layer)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook
