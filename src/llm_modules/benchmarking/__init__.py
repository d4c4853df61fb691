"""Speed and memory of the combined model, measured side by side in one run (`llm-modules bench decode|train`).

The models are built from configs with random weights: compute cost does not depend on the values, so the paper's
pair at real size (`LLMModulesConfig()`) is measured offline. Every number is measured next to the ones it is
compared with, in the same process; on a CPU shared with other programs, `clock="cpu"` (this process's CPU time)
leaves out the time spent waiting for a core.

- `bench_decode`: seconds per generated token with the three caches, with `use_cache=False` (the paper's scheme:
  both models re-run over the whole sequence for every token), and for the large and the small model alone with
  Hugging Face `generate` and their KV caches (their sum is the floor); prefill against the large base model;
  batched generation.
- `bench_train`: one optimizer step with and without the frozen-feature cache (precomputed large hidden states),
  its peak memory and the share of the step spent in the frozen model.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from ..configuration import LLMModulesConfig
from ..modeling import LLMModulesForCausalLM

GIB = 2**30


# ---- measuring ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds on the wall clock (`"wall"`, after the device finished its work) or this process's CPU time (`"cpu"`).

    CPU time leaves out the time the process waits while other programs hold the cores, so on a shared machine it
    measures the work itself; with one thread (`torch.set_num_threads(1)`) it equals wall time on an idle machine.
    """

    def __init__(self, device: torch.device, kind: str = "wall"):
        if kind not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {kind!r}")
        if kind == "cpu" and device.type != "cpu":
            raise ValueError(f"the cpu clock measures CPU work only; time {device} with the wall clock")
        self.device, self.kind = device, kind
        self._read = time.perf_counter if kind == "wall" else time.process_time

    def now(self) -> float:
        _sync(self.device)
        return self._read()

    def time(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """Run `fn()` once; returns its result and the seconds it took."""
        start = self.now()
        result = fn()
        return result, self.now() - start


class TokenClock(BaseStreamer):
    """A `generate` streamer that only reads the clock: once for the prompt, then once per generated token.

    Per-token times then come from one `generate` call, with nothing added to the decoding loop but a clock read.
    """

    def __init__(self, clock: Clock):
        self.clock = clock
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(self.clock.now())

    def end(self) -> None:
        pass


class PeakMemory:
    """High-water mark of memory inside a `with` block, in bytes (`peak`), or None where it cannot be read.

    On a GPU: the allocator's peak. On Linux CPUs: the process's peak resident set (VmHWM), reset on entry through
    /proc/self/clear_refs, so it includes the weights, the optimizer state and everything else the process holds.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # 5 = reset the peak resident set size
            except OSError:
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.peak = int(line.split()[1]) * 1024


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`None`/"auto": float32 on CPU, bfloat16 on a GPU (the benchmarks' settings); else the named dtype."""
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# ---- models -------------------------------------------------------------------------------------------------


def build_models(
    config: LLMModulesConfig, device: torch.device, dtype: torch.dtype, large_dtype: torch.dtype, baselines: bool,
    large_quantization: str | None = None,
) -> dict[str, torch.nn.Module]:
    """The combined model with random weights; with `baselines`, also the large and the small causal LM alone.

    The combined model runs the large causal LM's own base transformer, so the large weights are held once.
    `large_quantization` ("int8", "fp16"; CPU) quantizes the frozen model (and the large model alone) after it is built.
    """
    models: dict[str, torch.nn.Module] = {}
    large_base = None
    if baselines:
        models["large_alone"] = AutoModelForCausalLM.from_config(config.large_config, dtype=large_dtype)
        models["small_alone"] = AutoModelForCausalLM.from_config(config.small_config, dtype=dtype)
        large_base = models["large_alone"].base_model
    combined = LLMModulesForCausalLM(config, large_model=large_base)
    combined.large.to(dtype=large_dtype)
    for part in (combined.bridge, combined.small, combined.lm_head):
        part.to(dtype=dtype)
    models["combined"] = combined
    for model in models.values():
        model.to(device).eval()
    if large_quantization is not None:
        from ..quantization import quantize_frozen_model

        quantize_frozen_model(models["large_alone"] if baselines else combined.large, large_quantization)
    return models


def _random_ids(batch: int, length: int, vocab_size: int, device: torch.device, generator: torch.Generator):
    # Skip the lowest ids, where tiny test vocabularies keep their special tokens.
    low = min(10, vocab_size - 1)
    return torch.randint(low, vocab_size, (batch, length), generator=generator).to(device)


# ---- decoding -----------------------------------------------------------------------------------------------


def _generate(
    model, input_ids: torch.Tensor, new_tokens: int, timer: Clock, **kwargs: Any
) -> tuple[torch.Tensor, list[float]]:
    """Greedy `generate` of exactly `new_tokens` tokens; returns them and the clock (prompt, then each token)."""
    token_clock = TokenClock(timer)
    eos = model.generation_config.eos_token_id
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # random weights may pick EOS early; every run decodes the same count
        do_sample=False,
        pad_token_id=eos[0] if isinstance(eos, list) else eos,
        streamer=token_clock,
        **kwargs,
    )
    return output[:, input_ids.shape[1]:], token_clock.times


def cached_step_seconds(times: list[float]) -> float:
    """Seconds per decoding step after the prefill (the first token's time is the prefill)."""
    return (times[-1] - times[1]) / (len(times) - 2)


def recompute_step_seconds(times: list[float]) -> float:
    """Seconds per token when every token re-runs the whole sequence (all steps cost the same)."""
    return (times[-1] - times[0]) / (len(times) - 1)


def bench_decode(
    config: LLMModulesConfig | None = None,
    *,
    contexts: Sequence[int] = (64, 256, 512),
    new_tokens: int = 16,
    recompute_tokens: int = 2,
    prefill_context: int = 512,
    prefill_repeats: int = 2,
    batch_sizes: Sequence[int] = (1, 4, 16),
    batch_context: int = 16,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    large_dtype: str | None = None,
    large_quantization: str | None = None,
    seed: int = 0,
    clock: str = "wall",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Decode seconds per token, prefill and batched generation; all of it interleaved in one process.

    At each context: the combined model with its caches, the large and the small model alone with `generate` and
    their caches, then the combined model with `use_cache=False`. `new_tokens` tokens are generated on the cached
    paths, `recompute_tokens` on the recompute path (each of its tokens costs a full forward); the first
    `min(new_tokens, recompute_tokens)` tokens of the two combined paths must be the same. `clock`: "wall" or "cpu"
    (this process's CPU time, for a CPU shared with other programs; see `Clock`).
    """
    if new_tokens < 2 or recompute_tokens < 1:
        raise ValueError(f"need new_tokens >= 2 and recompute_tokens >= 1, got {new_tokens} and {recompute_tokens}")
    config = config if config is not None else LLMModulesConfig()
    device = torch.device(device)
    timer = Clock(device, clock)
    dtype_, large_dtype_ = resolve_dtype(dtype, device), resolve_dtype(large_dtype or dtype, device)
    torch.manual_seed(seed)
    log(f"building {config.large_config.model_type} + {config.small_config.model_type} with random weights ...")
    models, build_s = Clock(device).time(
        lambda: build_models(config, device, dtype_, large_dtype_, baselines=True, large_quantization=large_quantization)
    )
    log(f"built in {build_s:.0f} s")
    combined, large_alone, small_alone = models["combined"], models["large_alone"], models["small_alone"]
    generator = torch.Generator().manual_seed(seed)
    large_vocab, small_vocab = config.large_config.vocab_size, config.small_config.vocab_size

    # Warm-up: first calls pay one-time costs (allocator growth, lazy inits) that are not decoding.
    for model, vocab in ((combined, large_vocab), (large_alone, large_vocab), (small_alone, small_vocab)):
        _generate(model, _random_ids(1, 8, vocab, device, generator), 2, timer)

    rows = []
    for context in contexts:
        ids = _random_ids(1, context, large_vocab, device, generator)
        small_ids = _random_ids(1, context, small_vocab, device, generator)
        cached_tokens, cached_times = _generate(combined, ids, new_tokens, timer)
        _, large_times = _generate(large_alone, ids, new_tokens, timer)
        _, small_times = _generate(small_alone, small_ids, new_tokens, timer)
        recompute_tokens_, recompute_times = _generate(combined, ids, recompute_tokens, timer, use_cache=False)
        shared = min(new_tokens, recompute_tokens)
        row = {
            "context": context,
            "combined_cached_s": cached_step_seconds(cached_times),
            "combined_recompute_s": recompute_step_seconds(recompute_times),
            "large_alone_s": cached_step_seconds(large_times),
            "small_alone_s": cached_step_seconds(small_times),
            "combined_prefill_s": cached_times[1] - cached_times[0],
            "large_alone_prefill_s": large_times[1] - large_times[0],
            "cached_tokens": cached_tokens[0].tolist(),
            "recompute_tokens": recompute_tokens_[0].tolist(),
            "same_tokens": torch.equal(cached_tokens[:, :shared], recompute_tokens_[:, :shared]),
        }
        row["floor_s"] = row["large_alone_s"] + row["small_alone_s"]
        row["recompute_over_cached"] = row["combined_recompute_s"] / row["combined_cached_s"]
        row["cached_over_floor"] = row["combined_cached_s"] / row["floor_s"]
        rows.append(row)
        log(
            f"context {context}: cached {row['combined_cached_s']:.3f} s/token, recompute "
            f"{row['combined_recompute_s']:.2f}, floor {row['floor_s']:.3f}"
        )

    prefill = _bench_prefill(combined, prefill_context, prefill_repeats, timer, generator)
    log(f"prefill {prefill_context}: combined {prefill['combined_s']:.2f} s, large {prefill['large_base_s']:.2f} s")

    batched = []
    for prompts in batch_sizes:
        ids = _random_ids(prompts, batch_context, large_vocab, device, generator)
        _, times = _generate(combined, ids, new_tokens, timer)
        step = cached_step_seconds(times)
        batched.append({"prompts": prompts, "step_s": step, "per_token_s": step / prompts})
        log(f"batch {prompts}: {step:.3f} s per step")

    return {
        "benchmark": "decode",
        "machine": machine_info(device),
        "settings": {
            "large": config.large_config.model_type,
            "small": config.small_config.model_type,
            "dtype": str(dtype_).removeprefix("torch."),
            "large_dtype": large_quantization or str(large_dtype_).removeprefix("torch."),
            "new_tokens": new_tokens,
            "recompute_tokens": recompute_tokens,
            "batch_context": batch_context,
            "seed": seed,
            "clock": clock,
        },
        "decode": rows,
        "prefill": prefill,
        "batched": batched,
    }


def _bench_prefill(
    combined: LLMModulesForCausalLM, context: int, repeats: int, timer: Clock, generator: torch.Generator
) -> dict[str, Any]:
    """The combined prefill (filling its three caches, logits for the last token) against the large base model's.

    Alternated `repeats` times; the fastest of each is kept, the usual estimate on a machine shared with others.
    """
    ids = _random_ids(1, context, combined.config.large_config.vocab_size, timer.device, generator)
    mask = torch.ones_like(ids)
    def run_combined():
        return combined(ids, attention_mask=mask, logits_to_keep=1, use_cache=True)

    def run_large():
        return combined.large(input_ids=ids, attention_mask=mask, use_cache=True)

    combined_s, large_s = [], []
    with torch.no_grad():
        for _ in range(repeats):
            combined_s.append(timer.time(run_combined)[1])
            large_s.append(timer.time(run_large)[1])
    return {
        "context": context,
        "repeats": repeats,
        "combined_s": min(combined_s),
        "large_base_s": min(large_s),
        "ratio": min(combined_s) / min(large_s),
    }


# ---- training -----------------------------------------------------------------------------------------------


def bench_train(
    config: LLMModulesConfig | None = None,
    *,
    seq_lens: Sequence[int] = (256, 1024),
    batch_size: int = 1,
    steps: int = 1,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    large_dtype: str | None = None,
    seed: int = 0,
    clock: str = "wall",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One AdamW step (forward with labels, backward, update) with and without the frozen-feature cache.

    Without the cache the step runs the frozen model; with it, the step starts from precomputed large hidden states
    (what the feature cache stores). Per sequence length: the frozen forward alone, then the two steps, the fastest
    of `steps` each. Peak memory is the process's (CPU) or the allocator's (GPU) during the step, optimizer state
    included (a warm-up step creates it first, as in any step after the first). `clock` as in `bench_decode`.
    """
    if steps < 1:
        raise ValueError(f"need steps >= 1, got {steps}")
    config = config if config is not None else LLMModulesConfig()
    device = torch.device(device)
    timer = Clock(device, clock)
    dtype_, large_dtype_ = resolve_dtype(dtype, device), resolve_dtype(large_dtype or dtype, device)
    torch.manual_seed(seed)
    log(f"building {config.large_config.model_type} + {config.small_config.model_type} with random weights ...")
    model = build_models(config, device, dtype_, large_dtype_, baselines=False)["combined"]
    model.train()
    # The paper's optimizer (AdamW, 1e-4 for the bridge, 5e-5 for the small model and the head), fused as Trainer's
    # default `adamw_torch_fused` builds it: on one CPU thread the for-loop AdamW took ~2.6 s more per step at real
    # size, most of it allocating per-tensor temporaries, which also added ~1.2 GiB to the peak.
    bridge = list(model.bridge.parameters())
    bridge_ids = {id(p) for p in bridge}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in bridge_ids]
    optimizer = torch.optim.AdamW([{"params": bridge, "lr": 1e-4}, {"params": rest, "lr": 5e-5}], fused=True)
    generator = torch.Generator().manual_seed(seed)
    vocab = config.large_config.vocab_size

    def step(ids: torch.Tensor, hidden: torch.Tensor | None) -> float:
        loss = model(
            input_ids=None if hidden is not None else ids,
            attention_mask=torch.ones_like(ids),
            labels=ids,
            large_hidden_states=hidden,
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step(_random_ids(batch_size, 16, vocab, device, generator), None)  # warm-up: creates the optimizer state

    rows = []
    for seq in seq_lens:
        ids = _random_ids(batch_size, seq, vocab, device, generator)
        mask = torch.ones_like(ids)
        hidden, large_s = timer.time(lambda: model.large_hidden_states(ids, mask))
        row: dict[str, Any] = {"sequence": seq, "batch": batch_size, "large_forward_s": large_s}
        for name, features in (("no_cache", None), ("feature_cache", hidden)):
            best_s, peak = float("inf"), None
            for _ in range(steps):
                with PeakMemory(device) as memory:
                    _, seconds = timer.time(lambda: step(ids, features))
                best_s = min(best_s, seconds)
                peak = memory.peak if peak is None or memory.peak is None else max(peak, memory.peak)
            row[name] = {
                "step_s": best_s,
                "tokens_per_s": batch_size * seq / best_s,
                "peak_gib": peak / GIB if peak is not None else None,
            }
            log(f"sequence {seq}, {name}: {best_s:.2f} s per step")
        row["cache_over_no_cache"] = row["feature_cache"]["step_s"] / row["no_cache"]["step_s"]
        row["large_share"] = large_s / row["no_cache"]["step_s"]
        rows.append(row)

    return {
        "benchmark": "train",
        "machine": machine_info(device),
        "settings": {
            "large": config.large_config.model_type,
            "small": config.small_config.model_type,
            "dtype": str(dtype_).removeprefix("torch."),
            "large_dtype": str(large_dtype_).removeprefix("torch."),
            "batch": batch_size,
            "steps": steps,
            "optimizer": "AdamW, fused (bridge 1e-4, small model and head 5e-5)",
            "seed": seed,
            "clock": clock,
        },
        "parameters": model.parameter_summary(),
        "train": rows,
    }


# ---- reporting ----------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _machine_line(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} thread(s)"
    clock = "CPU time of this process" if s.get("clock") == "cpu" else "wall clock"
    return (
        f"{s['large']} + {s['small']}, random weights, {s['dtype']} (large model {s['large_dtype']}), {where}; "
        f"torch {m['torch']}, transformers {m['transformers']}; seconds on the {clock}"
    )


def format_decode(result: dict[str, Any]) -> str:
    """Markdown tables of a `bench_decode` result."""
    decode = _table(
        ["context", "combined, caches", "combined, recompute (paper)", "large alone", "small alone", "floor (sum)",
         "recompute / cached", "cached / floor", "same tokens"],
        [
            [str(r["context"]), f"{r['combined_cached_s']:.3f}", f"{r['combined_recompute_s']:.2f}",
             f"{r['large_alone_s']:.3f}", f"{r['small_alone_s']:.3f}", f"{r['floor_s']:.3f}",
             f"{r['recompute_over_cached']:.1f}x", f"{r['cached_over_floor']:.2f}x",
             "yes" if r["same_tokens"] else "NO"]
            for r in result["decode"]
        ],
    )
    p = result["prefill"]
    prefill = _table(
        ["prefill tokens", "combined (s)", "large base model (s)", "combined / large"],
        [[str(p["context"]), f"{p['combined_s']:.2f}", f"{p['large_base_s']:.2f}", f"{p['ratio']:.3f}x"]],
    )
    batched = _table(
        ["prompts", "seconds per step", "seconds per token"],
        [[str(b["prompts"]), f"{b['step_s']:.3f}", f"{b['per_token_s']:.3f}"] for b in result["batched"]],
    )
    return (
        f"{_machine_line(result)}\n\nDecode, seconds per generated token:\n\n{decode}\n\n"
        f"Prefill (fastest of {p['repeats']}):\n\n{prefill}\n\n"
        f"Batched generation (combined, caches, {result['settings']['batch_context']}-token prompts):\n\n{batched}\n"
    )


def format_train(result: dict[str, Any]) -> str:
    """Markdown table of a `bench_train` result."""
    def gib(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "n/a"

    steps = _table(
        ["sequence", "batch", "feature cache", "step (s)", "tokens/s", "peak memory (GiB)"],
        [
            [str(r["sequence"]), str(r["batch"]), label, f"{r[name]['step_s']:.2f}", f"{r[name]['tokens_per_s']:.1f}",
             gib(r[name]["peak_gib"])]
            for r in result["train"]
            for name, label in (("no_cache", "no"), ("feature_cache", "yes"))
        ],
    )
    summary = _table(
        ["sequence", "frozen forward (s)", "frozen share of the step", "step with cache / without"],
        [
            [str(r["sequence"]), f"{r['large_forward_s']:.2f}", f"{r['large_share']:.0%}",
             f"{r['cache_over_no_cache']:.2f}x"]
            for r in result["train"]
        ],
    )
    title = "Training step (forward, backward, fused AdamW update)"
    return f"{_machine_line(result)}\n\n{title}:\n\n{steps}\n\n{summary}\n"


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `result` as JSON; a temp file renamed into place, so no half-written file is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
