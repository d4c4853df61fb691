"""Memory plan per rank for training a combined model under DDP, FSDP2 and ZeRO-3 (`llm-modules bench memory`).

Counts come from the combined model built on the meta device (no weights: real configs of 7B-14B sources are
planned on any machine); the rules are the frameworks' own:

- frozen weights: DDP replicates the sources (every rank holds all of them); FSDP2 shards them in units of their
  own (llm_modules.distributed: each decoder layer one unit, the embeddings another), so a rank holds 1/N of them
  plus the units being all-gathered, at most two (the one running and the one prefetched); ZeRO-3 partitions them
  the same way (its prefetch bucket is about one such layer).
- trained weights, gradients and AdamW states: `trained_bytes` per parameter for the weights (float32 master weights
  under bf16 mixed precision: the Trainer's autocast keeps float32 parameters; accelerate's FSDP2 upcasts trained
  parameters to float32; DeepSpeed bf16 keeps a bf16 copy besides its float32 master), float32 gradients (DDP keeps
  a second copy in its communication buckets), two float32 moments. DDP holds all of it on every rank; FSDP2 and
  ZeRO-3 1/N, plus the trained unit being all-gathered and its unsharded gradient (the largest trained unit: the
  new head over the large vocabulary, or one block).
- activations, per rank (they do not shrink with the number of ranks: each rank runs its own examples): the small
  model's blocks and the bridge keep `34 * tokens * width` bytes per block for backward in 16-bit activations (Korthikanti
  et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", with fused/SDPA attention, no
  `5 a s / h` term), scaled by `activation_bytes / 2`; the logits of the labelled tokens over the large vocabulary
  (16-bit logits, their float32 copy in the loss and its gradient); the frozen forward keeps only its last hidden
  states and one layer's working set (it runs under `no_grad`).
- load peak, in host (CPU) memory per process: its own figure, not part of the total (it comes before training, and
  on GPUs it is host memory, not GPU memory). Every rank composes the whole pair from its checkpoints in host memory
  (accelerate's `fsdp_cpu_ram_efficient_loading`, where only rank 0 reads the weights, is not supported here yet):
  the frozen weights in their dtype, the trained ones in float32; a machine needs that times its processes. On GPUs
  sharding moves the units to the GPU; on a CPU run (`cpu=True`) the shards (1/N of everything, under FSDP2 and
  ZeRO-3) are made in the same memory while the whole model is still held (accelerate's `fsdp2_prepare_model` keeps
  the full state dict until every unit is sharded). The whole model is freed once preparing ends. DDP's constructor
  (N > 1) broadcasts rank 0's weights to every rank, all of them, frozen too: torch's `_broadcast_coalesced` copies
  them into flat 250 MiB buckets and keeps two in flight (torch/csrc/distributed/c10d/comm.cpp), so a rank holds up to
  500 MiB (or the whole model, if smaller) more while it runs; its reducer also allocates the gradient buckets (the
  trained parameters in float32) there. Both are host memory only on a CPU run; on GPUs they are device memory (the
  buckets are in the DDP gradients already), so the host load peak is the whole model.
These are planning estimates: allocator slack, the CUDA context (about 0.5 GiB) and communication buffers are not in
them. `check` tables put them next to measured peaks (tests/README: benchmarks/memory_check.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

GIB = 2**30
# torch DDP's parameter broadcast at construction: 250 MiB buckets, two in flight (see the docstring).
DDP_BROADCAST_IN_FLIGHT = 2 * 250 * 2**20
STRATEGIES = ("ddp", "fsdp2", "zero3")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def qwen2_config(size: str):
    """Qwen2.5-7B or -14B, from their published sizes (no hub)."""
    from transformers import AutoConfig

    sizes = {
        "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
        "14b": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                    intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False),
        "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    }
    return AutoConfig.for_model("qwen2", max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, **sizes[size])


def smollm2_360m_config():
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                                num_key_value_heads=5, intermediate_size=2560, vocab_size=49152,
                                tie_word_embeddings=True, max_position_embeddings=8192)


# The pairs of the README table: the real configs.
PAIRS = {
    "qwen2.5-7b+smollm2-360m": lambda: (qwen2_config("7b"), smollm2_360m_config()),
    "qwen2.5-7b+qwen2.5-0.5b": lambda: (qwen2_config("7b"), qwen2_config("0.5b")),
    "qwen2.5-14b+smollm2-360m": lambda: (qwen2_config("14b"), smollm2_360m_config()),
    "qwen2.5-14b+qwen2.5-0.5b": lambda: (qwen2_config("14b"), qwen2_config("0.5b")),
}


@dataclass
class ModelCounts:
    """What the plan needs of a combined model, counted on the meta device."""

    frozen: int  # parameters of the frozen sources
    largest_frozen_unit: int  # the largest FSDP2 unit of frozen tensors (a decoder layer, or the embeddings)
    largest_frozen_layer: int  # the largest decoder layer of a source (the unit prefetched next to the running one)
    trained: int
    largest_trained_unit: int  # the largest FSDP2 unit of trained tensors (the head, or a block)
    small_width: int
    small_layers: int
    bridge_layers: int
    large_width: int  # summed over sources
    large_intermediate: int
    vocab: int


def count(config) -> ModelCounts:
    """Counts of the combined model of `config` (an `LLMModulesConfig`), built on the meta device."""
    from ..modeling import LLMModulesForCausalLM

    with torch.device("meta"):
        model = LLMModulesForCausalLM(config)

    def size(module) -> int:
        return sum(p.numel() for p in module.parameters())

    frozen_layers = [size(layer) for source in model.sources for layer in _blocks(source)]
    frozen_units = [size(source.get_input_embeddings()) for source in model.sources] + frozen_layers
    trained_blocks = [size(layer) for layer in _blocks(model.small)]
    return ModelCounts(
        frozen=size(model.sources),
        largest_frozen_unit=max(frozen_units),
        largest_frozen_layer=max(frozen_layers, default=0),
        trained=sum(p.numel() for p in model.parameters() if p.requires_grad),
        largest_trained_unit=max([size(model.lm_head), *trained_blocks]),
        small_width=config.small_hidden_size,
        small_layers=len(trained_blocks),
        bridge_layers=config.num_cross_attention_layers * len(config.bridge_widths),
        large_width=sum(c.hidden_size for c in config.large_configs),
        large_intermediate=max(getattr(c, "intermediate_size", 4 * c.hidden_size) for c in config.large_configs),
        vocab=config.vocab_size,
    )


def _blocks(model) -> list[torch.nn.Module]:
    for name in ("layers", "h", "blocks"):
        found = getattr(model, name, None)
        if isinstance(found, torch.nn.ModuleList):
            return list(found)
    return []


def plan(counts: ModelCounts, strategy: str, ranks: int, *, seq_len: int = 2048, batch_size: int = 1,
         frozen_dtype: str = "bfloat16", mixed_precision: bool = True, cpu: bool = False) -> dict[str, float]:
    """Bytes per rank, by part, for one configuration. `mixed_precision`: bf16 compute over float32 trained weights
    (GPUs); False: everything float32 (what a CPU run does). `cpu`: the run is on CPU, so the shards are made in the
    host memory that holds the loaded pair (only the load peak changes)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    n = ranks
    fb = DTYPE_BYTES[frozen_dtype]
    act_bytes = 2 if mixed_precision else 4
    tokens = seq_len * batch_size
    c = counts
    if strategy == "ddp":
        frozen = c.frozen * fb
        trained = c.trained * 4
        grads = c.trained * 4 * (2 if n > 1 else 1)  # .grad, and DDP's buckets when there is a DDP
        optimizer = c.trained * 8
    else:
        # The unit running and the next one prefetched: the embeddings and layer 0, or two layers.
        gathered_frozen = (c.largest_frozen_unit + c.largest_frozen_layer) * fb if n > 1 else 0
        frozen = c.frozen * fb / n + gathered_frozen
        master = 4 + (2 if strategy == "zero3" and mixed_precision else 0)  # DeepSpeed keeps a 16-bit copy too
        unit = c.largest_trained_unit * (act_bytes + 4) if n > 1 else 0  # gathered weights and unsharded gradient
        trained = c.trained * master / n + unit
        grads = c.trained * 4 / n
        optimizer = c.trained * 8 / n
    per_block = 34 * tokens * c.small_width * act_bytes / 2
    activations = (
        per_block * (c.small_layers + c.bridge_layers)
        + tokens * c.vocab * (act_bytes + 4 + 4)  # logits, their float32 copy in the loss, its gradient
        + tokens * c.large_width * fb * 2  # the sources' last hidden states and the bridge's first projection input
        + tokens * (4 * c.large_width + 3 * c.large_intermediate) * fb  # one frozen layer's working set (no_grad)
    )
    parts = {"frozen": frozen, "trained": trained, "gradients": grads, "optimizer": optimizer,
             "activations": activations}
    parts["total"] = sum(parts.values())
    whole = c.frozen * fb + c.trained * 4
    if not cpu or n == 1:  # on GPUs what preparing adds is device memory, below the training total
        extra = 0
    elif strategy == "ddp":  # the constructor's broadcast buckets and the reducer's gradient buckets
        extra = min(whole, DDP_BROADCAST_IN_FLIGHT) + c.trained * 4
    else:  # the shards, made while the whole model is held
        extra = whole / n
    parts["load_peak"] = whole + extra  # host; not in the total
    return parts


def memory_table(pair_configs: dict[str, Any], ranks: list[int], strategies=STRATEGIES, **options) -> list[dict]:
    """Rows {pair, strategy, ranks, part: GiB...} for every pair (name -> LLMModulesConfig), strategy and rank count."""
    rows = []
    for name, config in pair_configs.items():
        counts = count(config)
        for strategy in strategies:
            for n in ranks:
                parts = plan(counts, strategy, n, **options)
                rows.append({"pair": name, "strategy": strategy, "ranks": n,
                             "frozen_params": counts.frozen, "trained_params": counts.trained,
                             **{k: v / GIB for k, v in parts.items()}})
    return rows


def format_memory(rows: list[dict]) -> str:
    lines = []
    for pair in dict.fromkeys(r["pair"] for r in rows):
        first = next(r for r in rows if r["pair"] == pair)
        lines.append(f"{pair}: frozen {first['frozen_params'] / 1e9:.2f}B, trained {first['trained_params'] / 1e6:.0f}M "
                     "parameters; GiB per rank")
        lines.append("| strategy | ranks | frozen | trained | gradients | optimizer | activations | total | load peak (host) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in (r for r in rows if r["pair"] == pair):
            lines.append(f"| {r['strategy']} | {r['ranks']} | {r['frozen']:.2f} | {r['trained']:.2f} | "
                         f"{r['gradients']:.2f} | {r['optimizer']:.2f} | {r['activations']:.2f} | {r['total']:.2f} | "
                         f"{r['load_peak']:.2f} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def pair_config(large, small):
    from ..configuration import LLMModulesConfig

    return LLMModulesConfig(large_config=large, small_config=small)
