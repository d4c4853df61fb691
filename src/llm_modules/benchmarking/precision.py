"""Decode speed of the combined model with its frozen model in each precision, side by side in one run
(`llm-modules bench decode --precisions float32 bfloat16 fp16 int8`).

For each precision the large model is loaded once (its base transformer shared by the combined model and by the
large model alone, so the weights are held once) and timed at every thread count and context: the combined model
with its three caches, the large model alone (base + its own LM head, in the same precision) and the small model
alone (float32, as the combined model runs its trained parts); the floor is large alone + small alone. Precisions
are measured one after another in one process, so a change of load on the machine between them shows up in the
ratios; use `clock="cpu"` with one thread on a shared machine.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from ..configuration import LLMModulesConfig
from ..modeling import LLMModulesForCausalLM
from ..quantization import LARGE_QUANTIZATIONS, quantize_frozen_model, quantize_trained_parts
from . import Clock, _generate, _random_ids, _table, cached_step_seconds, machine_info

PRECISIONS = ("float32", "bfloat16", "float16", *LARGE_QUANTIZATIONS, "gguf")
BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2, "float16": 2, "fp16": 2, "int8": 1}


class _SourceAlone(torch.nn.Module):
    """A llama.cpp source timed alone (`precision="gguf"`): its last hidden states token by token with its KV cache,
    no LM head (llama.cpp's whole token, head included, is what `benchmarks/decode_vs_llama_cpp.py` measures)."""

    def __init__(self, source: torch.nn.Module):
        super().__init__()
        self.source = source

    def timed_decode(self, prompt: torch.Tensor, new_tokens: int, timer: Clock) -> list[float]:
        cache, times = self.source.new_cache(), [timer.now()]
        self.source(input_ids=prompt, cache=cache)
        times.append(timer.now())
        for step in range(new_tokens - 1):
            self.source(input_ids=prompt[:, step:step + 1], cache=cache)
            times.append(timer.now())
        return times


def _load_precision(
    precision: str, config: LLMModulesConfig | None, large: str | None, small: str | None,
    trained_quantization: str | None = None,
) -> dict[str, torch.nn.Module]:
    """large alone, small alone and the combined model (sharing large alone's base) with the frozen model in
    `precision`: a torch dtype name, or a `large_quantization` applied to bfloat16 weights; the trained parts (and
    the small model alone) in float32, or quantized by `trained_quantization`."""
    from ..sources import gguf_for_source, load_causal_lm, load_config

    load_dtype = getattr(torch, precision) if precision in ("float32", "bfloat16", "float16") else torch.bfloat16
    if precision == "gguf":  # the frozen model in llama.cpp, on the GGUF file of `large`
        from ..llama_cpp_source import LlamaCppSource

        if large is None:
            raise ValueError("precision 'gguf' needs a real frozen model with a GGUF file (large=...)")
        gguf_file = gguf_for_source(large)
        frozen = LlamaCppSource(gguf_file, load_config(str(gguf_file)))
        large_alone = _SourceAlone(frozen)
    else:
        if large is not None:
            large_alone = load_causal_lm(large, dtype=load_dtype)
        else:
            large_alone = AutoModelForCausalLM.from_config(config.large_config, dtype=load_dtype)
        if precision in LARGE_QUANTIZATIONS:
            quantize_frozen_model(large_alone, precision)
        frozen = large_alone.base_model
    if large is not None:
        small_alone = load_causal_lm(small, dtype=torch.float32)
        small_base = load_causal_lm(small, dtype=torch.float32).base_model  # the combined model drops its embeddings
        # Positions as the real pair trains them (`compare`'s recipe); llama.cpp's small model needs them too.
        config = LLMModulesConfig(large_config=frozen.config, small_config=small_alone.config,
                                  small_position_embeddings="keep")
    else:
        small_alone = AutoModelForCausalLM.from_config(config.small_config, dtype=torch.float32)
        small_base = None
    combined = LLMModulesForCausalLM(config, large_model=frozen, small_model=small_base)
    for part in (combined.bridges, combined.depth, combined.small, combined.lm_head):
        part.float()
    if trained_quantization is not None:
        quantize_trained_parts(combined, trained_quantization)
        # The small model alone (a reference) has its own head in torch: int8 for "gguf" as for "int8".
        quantize_frozen_model(small_alone, "int8")
    return {"combined": combined.eval(), "large_alone": large_alone.eval(), "small_alone": small_alone.eval()}


def bench_precision(
    config: LLMModulesConfig | None = None,
    *,
    large: str | None = None,
    small: str | None = None,
    precisions: Sequence[str] = ("float32", "bfloat16", "fp16", "int8"),
    contexts: Sequence[int] = (64, 256, 512),
    threads: Sequence[int] = (1, 2),
    new_tokens: int = 16,
    seed: int = 0,
    clock: str = "wall",
    trained_quantization: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Seconds per generated token for each precision of the frozen model, thread count and context (CPU only).
    `trained_quantization` ("int8"): the trained parts and the small model alone quantized too (else float32).

    `large`/`small`: real checkpoints (dirs or .gguf files); without them the models are built from `config`
    (default: the paper's pair) with random weights. Returns a dict with `rows` (one per precision, threads and
    context: `combined_s`, `large_alone_s`, `small_alone_s`, `floor_s`, `combined_over_floor`,
    `combined_over_float32` when float32 was measured) and `loads` (seconds to load each precision).
    Raises ValueError for an unknown precision or `new_tokens` < 2.
    """
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or new_tokens < 2:
        raise ValueError(f"precisions must be among {PRECISIONS} and new_tokens >= 2; got {unknown or new_tokens}")
    if (large is None) != (small is None):
        raise ValueError("give both large and small (real checkpoints), or neither (random weights)")
    config = config if config is not None or large is not None else LLMModulesConfig()
    device = torch.device("cpu")
    timer = Clock(device, clock)
    torch.manual_seed(seed)
    rows, loads = [], {}
    for precision in precisions:
        log(f"loading the frozen model in {precision} ...")
        models, loads[precision] = Clock(device).time(lambda: _load_precision(precision, config, large, small,
                                                                                  trained_quantization))
        combined, large_alone, small_alone = models["combined"], models["large_alone"], models["small_alone"]
        large_vocab, small_vocab = combined.config.large_config.vocab_size, combined.config.small_config.vocab_size
        generator = torch.Generator().manual_seed(seed)  # the same prompts for every precision
        for thread_count in threads:
            torch.set_num_threads(thread_count)
            for model, vocab in ((combined, large_vocab), (large_alone, large_vocab), (small_alone, small_vocab)):
                _timed(model, _random_ids(1, 8, vocab, device, generator), 2, timer)  # warm-up
            for context in contexts:
                ids = _random_ids(1, context, large_vocab, device, generator)
                small_ids = _random_ids(1, context, small_vocab, device, generator)
                row = {"precision": precision, "threads": thread_count, "context": context}
                for name, model, prompt in (
                    ("combined", combined, ids), ("large_alone", large_alone, ids), ("small_alone", small_alone, small_ids)
                ):
                    row[f"{name}_s"] = cached_step_seconds(_timed(model, prompt, new_tokens, timer))
                row["floor_s"] = row["large_alone_s"] + row["small_alone_s"]
                row["combined_over_floor"] = row["combined_s"] / row["floor_s"]
                rows.append(row)
                log(
                    f"{precision}, {thread_count} thread(s), context {context}: combined {row['combined_s']:.3f} "
                    f"s/token, floor {row['floor_s']:.3f}"
                )
        del models, combined, large_alone, small_alone
        gc.collect()
    reference = {(r["threads"], r["context"]): r["combined_s"] for r in rows if r["precision"] == "float32"}
    for row in rows:
        if (row["threads"], row["context"]) in reference:
            row["combined_over_float32"] = row["combined_s"] / reference[(row["threads"], row["context"])]
    return {
        "benchmark": "decode_precision",
        "machine": machine_info(device),
        "settings": {
            "large": large or config.large_config.model_type,
            "small": small or config.small_config.model_type,
            "weights": "real" if large else "random",
            "trained_parts": trained_quantization or "float32",
            "new_tokens": new_tokens,
            "seed": seed,
            "clock": clock,
        },
        "loads_s": loads,
        "rows": rows,
    }


def _timed(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, timer: Clock) -> list[float]:
    if isinstance(model, _SourceAlone):
        return model.timed_decode(prompt, new_tokens, timer)
    return _generate(model, prompt, new_tokens, timer)[1]


def format_precision(result: dict[str, Any]) -> str:
    """Markdown table of a `bench_precision` result."""
    s, m = result["settings"], result["machine"]
    clock = "CPU time of this process" if s["clock"] == "cpu" else "wall clock"
    head = (
        f"{s['large']} + {s['small']} ({s['weights']} weights; trained parts {s['trained_parts']}), {m['cpu']}; "
        f"torch {m['torch']}, transformers {m['transformers']}; seconds per generated token on the {clock}"
    )
    table = _table(
        ["frozen model", "threads", "context", "combined, caches", "large alone", "small alone", "floor (sum)",
         "combined / floor", "combined / float32"],
        [
            [r["precision"], str(r["threads"]), str(r["context"]), f"{r['combined_s']:.3f}", f"{r['large_alone_s']:.3f}",
             f"{r['small_alone_s']:.3f}", f"{r['floor_s']:.3f}", f"{r['combined_over_floor']:.2f}x",
             f"{r['combined_over_float32']:.2f}x" if "combined_over_float32" in r else "n/a"]
            for r in result["rows"]
        ],
    )
    return f"{head}\n\n{table}\n"
