"""The bill of a compared system: what it costs to train and to serve, measured rather than estimated.

- `decode_seconds_per_token`: greedy decoding with the KV cache at batch 1, timed at a fixed context.
- `weights_read_per_token` / `weights_per_token`: what one token's forward pass reads (bytes) or uses (elements).
- `train_multiply_adds`: training compute from those weight counts (Kaplan et al. 2020's approximation).
- `PeakRSS`: this process's peak resident memory inside a block; `disk_bytes`: the bytes a user must ship.

They work on plain Hugging Face causal LMs, PEFT models and `LLMModulesForCausalLM` alike; the harness
(`compare/__init__.py`) writes them into each system's results row.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import threading
import time
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from ..modeling import LLMModulesForCausalLM

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


# ---- serving -------------------------------------------------------------------------------------------------


def decode_seconds_per_token(model: nn.Module, tokenizer: Any, context: int = 256, new_tokens: int = 32,
                             repeats: int = 2) -> float:
    """Seconds per greedily decoded token at batch 1 after a prompt of `context` tokens, KV cache on.

    The prompt is `context` ordinary token ids (no special ids, none past the model's vocabulary) drawn with a fixed
    seed, so every call and every system of one tokenizer sees the same prompt. `generate` runs once for
    `new_tokens` tokens and once for 1 token (the prefill and its first token); each is timed as the best of
    `repeats` runs, and the result is `(t_full - t_prefill) / (new_tokens - 1)`. EOS cannot end a run early
    (`min_new_tokens`). The model runs in whatever dtype and device it is on, under `torch.no_grad()`.

    Raises ValueError if `context < 1`, `new_tokens < 2` or `repeats < 1`.
    """
    if context < 1 or new_tokens < 2 or repeats < 1:
        raise ValueError(f"need context >= 1, new_tokens >= 2 and repeats >= 1; got {context}, {new_tokens}, {repeats}")
    device = next(model.parameters()).device
    vocab = min(len(tokenizer), model.config.vocab_size)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    ordinary = torch.arange(vocab)[~torch.isin(torch.arange(vocab), special)]
    draw = torch.randint(len(ordinary), (1, context), generator=torch.Generator().manual_seed(0))
    input_ids = ordinary[draw].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def best_time(tokens: int) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # kernels may still be queued when generate returns
            times.append(time.perf_counter() - start)
        return min(times)

    # no_grad, not inference_mode: generating past GPT-Neo's causal table grows it (`extend_causal_tables`), and a
    # table made under inference_mode would break any later training step of the model.
    with torch.no_grad():
        full, prefill = best_time(new_tokens), best_time(1)
    return (full - prefill) / (new_tokens - 1)


def _used_tensors(model: nn.Module, exclude: Iterable[nn.Module]) -> list[tuple[torch.Tensor, int]]:
    """(tensor, elements one token's forward reads of it) for every distinct weight of `model`: see
    `weights_read_per_token` for the rule."""
    skipped = {id(m) for part in exclude for m in part.modules()}
    if isinstance(model, LLMModulesForCausalLM):
        # The small model reads the bridge's output, never its own token embeddings.
        skipped |= {id(m) for m in model.small.get_input_embeddings().modules()}
    full: dict[int, torch.Tensor] = {}
    gathered: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if id(module) in skipped:
            continue
        derived = module._non_persistent_buffers_set
        persistent = [b for name, b in module.named_buffers(recurse=False) if name not in derived]
        owner = gathered if isinstance(module, nn.Embedding) else full
        for tensor in [*module.parameters(recurse=False), *persistent]:
            owner[id(tensor)] = tensor
    # A table tied to an output layer is read whole by that layer; its lookup row is part of that read.
    rows = [(t, t.numel() // t.shape[0] if t.shape[0] else 0) for k, t in gathered.items() if k not in full]
    return [(t, t.numel()) for t in full.values()] + rows


def weights_read_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads at batch 1 (each tensor at its own element size).

    Rule: every parameter and persistent buffer (one saved with the model, such as a quantized layer's bias) of every
    module in the model is read whole, except that an `nn.Embedding` is a lookup and reads one row. A table tied
    to an output layer (tied input/output embeddings) counts once, whole: the LM head reads all of it. Non-persistent
    buffers (rotary frequencies, causal-mask tables) are derived, not weights, and are left out, as are packed
    quantized kernels that hold their weights outside parameters and buffers. For `LLMModulesForCausalLM` the small
    model's own token embeddings are excluded (the bridge bypasses them; its frozen sources are held without an LM
    head, so none is counted). A PEFT LoRA model counts the base weights plus its unmerged adapters; merge first
    (`merge_and_unload`) to bill the served, merged model.
    """
    return sum(tensor.element_size() * elements for tensor, elements in _used_tensors(model, ()))


def weights_per_token(module: nn.Module, exclude: Iterable[nn.Module] = ()) -> int:
    """Weights (elements) one token's forward uses in `module`, by the rule of `weights_read_per_token`, leaving out
    the submodules in `exclude`. Works on meta-device models (only shapes are read)."""
    return sum(elements for _, elements in _used_tensors(module, exclude))


def disk_bytes(*paths: str | os.PathLike) -> int:
    """Total size in bytes of the given files and of every file under the given dirs (symlinks followed); a file
    reached twice (overlapping paths, links to one blob) counts once. Raises FileNotFoundError for a missing path."""
    files: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(path)
        found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files.update(p.resolve() for p in found)
    return sum(p.stat().st_size for p in files)


# ---- training ------------------------------------------------------------------------------------------------


class PeakRSS:
    """`with PeakRSS() as peak: ...` then `peak.peak_bytes`: this process's peak resident memory (bytes) in the block.

    On Linux, writing "5" to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM) to the current RSS, and
    VmHWM is read on exit: every peak is seen, however short (`method == "vmhwm"`). Where that file is not writable,
    a thread samples the RSS every 50 ms (`method == "sampled"`): peaks shorter than that can be missed.

    On entry, garbage is collected and glibc's free heap pages are handed back to the kernel (`malloc_trim`), so
    memory an earlier block freed but the allocator kept does not count as this block's: `start_bytes` is the RSS
    the block starts from (what the process holds anyway: the interpreter, the libraries, whatever is still alive).
    """

    interval = 0.05  # seconds between samples of the fallback

    def __init__(self) -> None:
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None
        self.method: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        _release_free_heap()
        self.start_bytes = psutil.Process().memory_info().rss
        try:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
            self.method = "vmhwm"
        except OSError:
            self.method = "sampled"
            process = psutil.Process()
            self.peak_bytes = process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
            self._thread.start()
        return self

    def _sample(self, process: psutil.Process) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.method == "vmhwm":
            with open(_STATUS) as f:
                line = next(line for line in f if line.startswith("VmHWM:"))
            self.peak_bytes = int(line.split()[1]) * 1024  # reported in kB
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)


def _release_free_heap() -> None:
    """glibc's `malloc_trim(0)`: return free heap pages to the kernel (a no-op where there is no glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def train_multiply_adds(tokens_per_epoch: int, epochs: float, trained: int, frozen_backprop: int = 0,
                        frozen_forward: int = 0, frozen_forward_once: int = 0) -> int:
    """Multiply-adds of a training run, from the weights (elements, `weights_per_token`) each token uses:

        MACs = tokens_per_epoch * (epochs * (3*trained + 2*frozen_backprop + frozen_forward) + frozen_forward_once)

    A forward pass costs one multiply-add per weight used per token (2N FLOPs per token, Kaplan et al. 2020);
    attention scores are left out (their share is small for rows of under ~300 tokens, as compare's are). The
    backward pass costs twice the forward for trained weights (gradients for inputs and weights), once for frozen
    weights gradients flow through (`frozen_backprop`: inputs only, e.g. the base model under LoRA). Frozen weights
    gradients never reach cost their forward only: every epoch (`frozen_forward`, e.g. a distillation teacher) or
    once per token when their outputs are cached (`frozen_forward_once`, the combined model's large model through
    the feature cache).
    Validation passes are not counted. `epochs` may be fractional (a run stopped mid-epoch).

    Raises ValueError for a negative argument or non-finite `epochs`.
    """
    counts = (tokens_per_epoch, epochs, trained, frozen_backprop, frozen_forward, frozen_forward_once)
    if min(counts) < 0 or not math.isfinite(epochs):
        raise ValueError(f"token, epoch and weight counts must be finite and >= 0; got {counts}")
    # Exact arithmetic: real runs reach ~1e17, past where a float holds every integer.
    per_token = Fraction(epochs) * (3 * trained + 2 * frozen_backprop + frozen_forward) + frozen_forward_once
    return round(tokens_per_epoch * per_token)
