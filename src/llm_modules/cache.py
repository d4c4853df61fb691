"""`LLMModulesCache`: the KV caches of every frozen source, every bridge and the small model as one `Cache`."""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .configuration import LLMModulesConfig


class LLMModulesCache(Cache):
    """The caches of a combined model as one `Cache`.

    `layers` is the union of each frozen source's layers, one layer per cross-attention layer of each bridge (its
    keys and values over all past positions), one layer per depth connection and the small model's layers, so `get_seq_length` (read from the first
    source), beam reordering, batch expansion and `crop` work unchanged. `sources` (one `DynamicCache` per source),
    `bridges` (a list of layers per bridge), `depth` (one layer per depth connection) and `small` are views over the same layer objects; `large` and `bridge`
    are the first source's and the first bridge's.
    """

    def __init__(self, config: LLMModulesConfig, source_caches: list[Cache | None] | None = None,
                 small_cache: Cache | None = None):
        """`source_caches`: a cache per source to use instead of a new `DynamicCache` (None: a new one), and
        `small_cache` the small model's, for a model that keeps its keys and values itself
        (`llama_cpp_source.LlamaCppCache`)."""
        given = source_caches if source_caches is not None else [None] * config.num_sources
        self.sources = [
            cache if cache is not None else DynamicCache(config=c) for cache, c in zip(given, config.large_configs)
        ]
        self.bridges = [
            [DynamicLayer() for _ in range(config.num_cross_attention_layers)] for _ in config.bridge_widths
        ]
        self.depth = [DynamicLayer() for _ in config.depth_connection_list]
        self.small = small_cache if small_cache is not None else DynamicCache(config=config.small_config)
        self.large, self.bridge = self.sources[0], self.bridges[0]
        super().__init__(
            layers=[
                *(layer for source in self.sources for layer in source.layers),
                *(layer for bridge in self.bridges for layer in bridge),
                *self.depth,
                *self.small.layers,
            ]
        )
