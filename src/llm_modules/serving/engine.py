"""Continuous batching: one engine thread decodes every running request together, one token per request per step.

A request (`GenerationRequest`) waits in a first-come-first-served queue until the running batch has a free row
(`max_batch_size` rows bound the memory), is prefilled together with the other requests admitted at that moment (one
left-padded batch), and joins the running batch at the next step. It leaves the batch as soon as it ends (EOS, a stop
string, `max_new_tokens`, or cancellation: a closed connection frees its row at the next step). When nothing is
running, the engine waits a moment (a twentieth of a prefill's time, at most 0.1 s) for requests arriving together
to share one prefill.

Each step runs the model once over the last token of every row, with the cache of everything before: a
`DynamicCache` for a plain causal LM, or an `LLMModulesCache` for a combined model (the frozen model's KV cache, the
bridge's cross-attention keys and values over the frozen model's states, the small model's KV cache). Rows are
left-padded to one length; the 2D attention mask keeps the padding out of every part, and positions are counted per
row from the mask, so a row's logits are those it would have alone (up to the float rounding of batched kernels).

Each request samples with its own settings and its own `torch.Generator`: a greedy request gets the tokens
`generate` gives it, and a seeded one the same tokens whatever runs beside it. A request's logit bias and penalties
are its row's own processors (`sampling.py`); rows without them cost nothing more. A request may ask for the
log-probabilities of its tokens, and of its prompt's (the prefill then keeps every position's logits); one with
`max_new_tokens` 0 only scores its prompt.

Callers get a request's tokens through its `Generation`: iterate it in a thread, or `async for` it on the event loop
it was submitted with (`submit(request, loop=...)`).

transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`) needs a paged KV cache that
every attention layer reads through its paged-attention interface; the bridge's cross-attention and the three caches
of a combined model do not, so this engine keeps transformers' `Cache` classes and pads rows instead.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..modeling import LLMModulesForCausalLM, extend_causal_tables
from .sampling import TokenLogprob, prompt_logprobs, request_processors, token_logprob

log = logging.getLogger(__name__)

_END = object()  # the last item of a generation's event queue
# An idle engine waits this share of its last prefill's time (at most MAX_GATHER_S) for more requests to share the
# next prefill: clients answered in the same step send their next requests together, a few milliseconds apart.
GATHER_SHARE, MAX_GATHER_S = 0.05, 0.1


@dataclass
class GenerationRequest:
    """What to generate for one prompt.

    prompt_ids: the prompt's token ids (at least one).
    max_new_tokens: most tokens to generate (at least 1; 0 with `prompt_logprobs`: score the prompt only).
    temperature: 0 = greedy (argmax); above 0, sample from softmax(logits / temperature).
    top_p: nucleus sampling's probability mass (1 = off); only when sampling.
    seed: the seed of this request's own `torch.Generator` (None: a random one); only when sampling.
    stop: strings that end the generation once the generated text (without the engine's `skip_ids`) contains one;
        the tokens that made it are kept (cutting the text is the caller's business).
    ignore_eos: generate past EOS tokens, up to `max_new_tokens` (load tests); `stop` strings still end it.
    cancelled: set it from any thread to stop the request: a queued one never starts, a running one leaves the batch
        at the next step with finish reason "cancelled".
    logit_bias: token id -> value added to its logit at every step (OpenAI's logit_bias).
    presence_penalty, frequency_penalty: OpenAI's penalties on the generated tokens (`OpenAIPenaltyLogitsProcessor`).
    logprobs: None, or record each new token's log-probability and the `logprobs` most likely tokens'
        (`Generation.logprobs`).
    prompt_logprobs: None, or record each prompt token's, with the `prompt_logprobs` most likely
        (`Generation.prompt_logprobs`).
    """

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None


class Generation:
    """One request's progress: its new token ids as they come, and how it ended.

    Iterate it (the thread that submitted it, or any other) or `async for` it (when submitted with `loop`): each
    item is a list of new token ids, until the generation ends. Then `finish_reason` is "stop" (EOS or a stop
    string), "length" (`max_new_tokens`), "cancelled" or "error", and `token_ids` holds every new id (EOS included,
    as `generate` returns it). The error of a failed model call (e.g. out of memory) is raised by the iteration;
    the engine goes on with the next requests. `logprobs` (when the request asks) has one entry per new token, written
    before the token is delivered; `prompt_logprobs` one per prompt token (None for the first), before the first.
    """

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self.token_ids: list[int] = []  # written by the engine thread only
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self._loop = loop
        self._events: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    def cancel(self) -> None:
        """Stop generating (any thread); the iteration then ends with finish reason "cancelled"."""
        self.request.cancelled.set()

    def __iter__(self) -> Iterator[list[int]]:
        if self._loop is not None:
            raise TypeError("this generation was submitted with an event loop: use `async for`")
        while (item := self._events.get()) is not _END:
            yield item
        if self.error is not None:
            raise self.error

    async def __aiter__(self) -> AsyncIterator[list[int]]:
        if self._loop is None:
            raise TypeError("this generation was submitted without an event loop: iterate it in a thread")
        while (item := await self._events.get()) is not _END:
            yield item
        if self.error is not None:
            raise self.error

    def result(self) -> list[int]:
        """Block until the generation ends; its new token ids."""
        for _ in self:
            pass
        return self.token_ids

    async def wait(self) -> list[int]:
        """Wait (on its event loop) until the generation ends; its new token ids."""
        async for _ in self:
            pass
        return self.token_ids

    # -- the engine's side --

    def _put(self, item: Any) -> None:
        if self._loop is None:
            self._events.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.request.cancelled.set()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._put(_END)


@dataclass
class _Row:
    """A running request: its generation, its sampler and what its stop strings need."""

    generation: Generation
    warpers: LogitsProcessorList  # temperature and top-p; rows with the same `sampling` share one batched call
    processors: LogitsProcessorList | None  # logit bias and penalties, this row's alone; None: none asked
    sampling: tuple[float, float] | None  # (temperature, top_p); None = greedy
    generator: torch.Generator | None
    stop_window: int  # how many of the last tokens hold any stop string (0: no stop strings)


class BatchingEngine:
    """Continuous batching over one model (a combined `LLMModulesForCausalLM` or a plain causal LM), on one thread.

    model: in eval mode, on its device. Its `generation_config.eos_token_id` ends requests.
    tokenizer: decodes generated tokens to look for stop strings (needed only for requests with `stop`).
    max_batch_size: most requests decoding at once; later ones queue, first come first served.
    skip_ids: token ids left out of the text that stop strings are looked for in (e.g. control tokens).

    The thread starts with the first `submit` (or `start()`) and ends with `close()`; `with BatchingEngine(...)`
    closes it too. `running` and `queued` count the requests decoding (or being prefilled) and waiting.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        max_batch_size: int = 8,
        skip_ids: frozenset[int] = frozenset(),
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model, self.tokenizer, self.skip_ids = model, tokenizer, skip_ids
        self.combined = isinstance(model, LLMModulesForCausalLM)
        eos = model.generation_config.eos_token_id
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.max_batch_size = max_batch_size
        if max_batch_size > 1 and not self._caches_can_join():
            # Sliding-window (or other fixed-size) cache layers keep only recent positions, so rows of different
            # lengths cannot be padded into one batch: decode one request at a time instead.
            log.warning("%s has cache layers that cannot be left-padded: requests run one at a time",
                        type(model).__name__)
            self.max_batch_size = 1
        # GPT-Neo-style causal tables are sized by positions, and padded rows can be longer than any one sequence:
        # their smallest size, grown (`extend_causal_tables`) when the batch gets longer; None without tables.
        self._table_length = _causal_table_length(model)

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._waiting: deque[Generation] = deque()
        self._prefilling = 0
        self._prefill_s = 0.0  # how long the last prefill took
        self._closing = False
        self._thread: threading.Thread | None = None
        # The running batch (engine thread only): one row per request, left-padded to the mask's length.
        self._rows: list[_Row] = []
        self._cache: Cache | None = None
        self._mask: torch.Tensor | None = None  # [rows, length] 1 = token, 0 = padding
        self._last: torch.Tensor | None = None  # [rows] each row's newest token, the next step's input

    # -- the callers' side (any thread) --

    @property
    def running(self) -> int:
        """Requests decoding or being prefilled."""
        with self._lock:
            return len(self._rows) + self._prefilling

    @property
    def queued(self) -> int:
        """Requests waiting for a row."""
        with self._lock:
            return len(self._waiting)

    def start(self) -> BatchingEngine:
        """Start the engine's thread (`submit` does it when needed)."""
        with self._lock:
            self._start_thread()
        return self

    def _start_thread(self) -> None:  # holding the lock
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llm-modules-engine", daemon=True)
            self._thread.start()

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> Generation:
        """Queue `request`; its `Generation` delivers the tokens (to `loop`'s tasks when given, else to a thread).

        Raises ValueError for a request the engine cannot run (no prompt, `max_new_tokens` < 1, sampling settings
        out of range, stop strings without a tokenizer)."""
        if not request.prompt_ids:
            raise ValueError("prompt_ids is empty")
        if request.max_new_tokens < (0 if request.prompt_logprobs is not None else 1):
            raise ValueError(f"max_new_tokens must be at least 1 (0 to score a prompt), got {request.max_new_tokens}")
        if request.temperature < 0 or not 0 < request.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {request.temperature}, "
                             f"{request.top_p}")
        if request.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer")
        generation = Generation(request, loop)
        with self._wakeup:
            if self._closing:  # it would never run
                generation._finish("cancelled")
                return generation
            self._start_thread()
            self._waiting.append(generation)
            self._wakeup.notify()
        return generation

    def close(self) -> None:
        """Stop the thread after its current step; requests still queued or running, or submitted meanwhile, end
        "cancelled". A later `submit` starts a new thread."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._lock:
            self._closing, self._thread = False, None

    def __enter__(self) -> BatchingEngine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the engine thread --

    def _run(self) -> None:
        with torch.inference_mode():
            while (admitted := self._admit()) is not None:
                try:
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._step()
                except Exception as error:  # a bug, not a model error (those are handled per step): fail, go on
                    log.exception("the batching engine failed")
                    self._fail_batch(error)
        for row in self._rows:
            row.generation._finish("cancelled")
        self._rows = []

    def _admit(self) -> list[Generation] | None:
        """The queued requests that fit in the batch now (waiting while there is nothing to do); None when closing."""
        gathered = False
        with self._wakeup:
            while True:
                for generation in [g for g in self._waiting if g.request.cancelled.is_set()]:
                    self._waiting.remove(generation)  # its client left while it waited: it never starts
                    generation._finish("cancelled")
                if self._closing:
                    for generation in self._waiting:
                        generation._finish("cancelled")
                    self._waiting.clear()
                    return None
                free = self.max_batch_size - len(self._rows)
                if self._waiting and not self._rows and len(self._waiting) < free and not gathered:
                    deadline = time.monotonic() + min(MAX_GATHER_S, GATHER_SHARE * self._prefill_s)
                    while len(self._waiting) < free and (left := deadline - time.monotonic()) > 0:
                        self._wakeup.wait(left)
                    gathered = True
                    continue  # what waited may have been cancelled meanwhile, or the engine closed
                if self._waiting and free > 0:
                    admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                    self._prefilling = len(admitted)
                    return admitted
                if self._rows:
                    return []
                self._wakeup.wait()

    def _prefill(self, admitted: list[Generation]) -> None:
        """Run the admitted prompts as one left-padded batch with a fresh cache, sample each one's first token, and
        join them to the running batch."""
        prompts = [list(g.request.prompt_ids) for g in admitted]
        length = max(map(len, prompts))
        device = self.model.device
        ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        started = time.monotonic()
        scoring = any(g.request.prompt_logprobs is not None for g in admitted)
        try:
            logits = self._forward(ids, mask, positions, cache, 0 if scoring else 1)
            if scoring:
                self._score_prompts(admitted, prompts, logits)
            # Requests that only score their prompt end here; the others join the batch.
            keep = [i for i, g in enumerate(admitted) if g.request.max_new_tokens > 0]
            rows = [self._new_row(admitted[i], logits.device) for i in keep]
            tokens = self._sample(rows, logits[keep, -1].float()) if keep else None
            self._prefill_s = time.monotonic() - started
        except Exception as error:
            log.exception("prefill failed")
            with self._lock:
                self._prefilling = 0
            for generation in admitted:
                generation._finish("error", error)
            return
        for generation in admitted:
            if generation.request.max_new_tokens == 0:
                generation._finish("length")
        if not keep:
            with self._lock:
                self._prefilling = 0
            return
        if len(keep) < len(admitted):
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask = mask[index]
        self._join(rows, cache, mask, tokens)
        self._record(range(len(self._rows) - len(rows), len(self._rows)), tokens)

    @staticmethod
    def _score_prompts(admitted: list[Generation], prompts: list[list[int]], logits: torch.Tensor) -> None:
        """Give the requests that ask for it their prompt's log-probabilities; `logits` `[rows, length, vocab]` of
        the left-padded prompts."""
        length = logits.shape[1]
        for generation, prompt, row in zip(admitted, prompts, logits):
            if (k := generation.request.prompt_logprobs) is not None:
                generation.prompt_logprobs = prompt_logprobs(row[length - len(prompt):], prompt, k)

    def _step(self) -> None:
        """One token for every running row."""
        cancelled = {i: "cancelled" for i, row in enumerate(self._rows) if row.generation.request.cancelled.is_set()}
        if cancelled:
            self._remove(cancelled)
        if not self._rows:
            return
        mask = F.pad(self._mask, (0, 1), value=1)
        positions = mask.sum(-1, keepdim=True) - 1  # each row's count of real tokens before the new one
        try:
            logits = self._forward(self._last[:, None], mask, positions, self._cache)[:, -1].float()
            tokens = self._sample(self._rows, logits)
        except Exception as error:
            log.exception("decoding step failed")
            self._fail_batch(error)
            return
        self._mask, self._last = mask, tokens
        self._record(range(len(self._rows)), tokens)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Cache, keep: int = 1
    ) -> torch.Tensor:
        """The logits `[rows, keep, vocab]` (the model's dtype) of the last `keep` positions (0: all) of `ids`
        `[rows, new]`; `mask` covers cache + new."""
        if self._table_length is not None and self._table_length < mask.shape[1]:
            extend_causal_tables(self.model, mask.shape[1])
            self._table_length = _causal_table_length(self.model)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
            logits_to_keep=keep,
        )
        return out.logits

    def _new_cache(self) -> Cache:
        if self.combined:
            return self.model.new_cache()
        return DynamicCache(config=self.model.config)

    def _caches_can_join(self) -> bool:
        cache = self._new_cache()
        if not cache.layers:  # built as the model runs, one DynamicLayer per attention layer
            return cache.layer_class_to_replicate is DynamicLayer
        return all(type(layer) is DynamicLayer for layer in cache.layers)

    def _new_row(self, generation: Generation, device: torch.device) -> _Row:
        request = generation.request
        warpers, sampling, generator = LogitsProcessorList(), None, None
        if request.temperature > 0:
            sampling = (request.temperature, request.top_p)
            if request.temperature != 1:
                warpers.append(TemperatureLogitsWarper(request.temperature))
            if request.top_p < 1:
                warpers.append(TopPLogitsWarper(request.top_p))
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device).manual_seed(seed)
        # A token decodes to at least one byte, and a character is at most 4 bytes: 4 tokens per character (+1 for a
        # partial character at the start) always hold a stop string that the newest token completed.
        stop_window = 4 * max(map(len, request.stop)) + 1 if request.stop else 0
        processors = request_processors(request.logit_bias, request.presence_penalty, request.frequency_penalty)
        return _Row(generation, warpers, processors, sampling, generator, stop_window)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token `[rows]` from `logits` `[rows, vocab]` (float32): the row's own processors first
        (bias, penalties), then argmax for greedy rows; for sampling rows their warpers (one call per group of equal
        settings) and a draw from their own generator. The draw is written here because `generate`'s sampling draws
        every row from torch's global generator, so a row's tokens would depend on the rows beside it. Rows that ask
        for logprobs get them recorded (of the raw `logits`)."""
        scores = self._processed(rows, logits)
        tokens = scores.argmax(-1)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, row in enumerate(rows):
            if row.sampling is not None:
                groups.setdefault(row.sampling, []).append(i)
        for indices in groups.values():
            warped = rows[indices[0]].warpers(None, scores[indices])
            probabilities = warped.softmax(-1)
            for j, i in enumerate(indices):
                tokens[i] = torch.multinomial(probabilities[j : j + 1], 1, generator=rows[i].generator)[0, 0]
        for i, row in enumerate(rows):
            if (k := row.generation.request.logprobs) is not None:
                row.generation.logprobs.append(token_logprob(logits[i], int(tokens[i]), k))
        return tokens

    @staticmethod
    def _processed(rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """`logits` after each row's processors, which see the row's generated tokens (a copy; `logits` itself
        when no row has any)."""
        if all(row.processors is None for row in rows):
            return logits
        scores = logits.clone()
        for i, row in enumerate(rows):
            if row.processors is not None:
                generated = torch.tensor([row.generation.token_ids], dtype=torch.long, device=logits.device)
                scores[i] = row.processors(generated, logits[i : i + 1])[0]
        return scores

    def _join(self, rows: list[_Row], cache: Cache, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter side to the longer length.

        Written here because `DynamicCache` can select and repeat rows (`batch_select_indices`, ...) but not join
        two caches of different lengths. Padded positions get zero keys and values, which the mask hides.
        """
        if not self._rows:
            self._cache, self._mask, self._last = cache, mask, tokens
        else:
            old, new = self._mask.shape[1], mask.shape[1]
            length = max(old, new)
            for running, joining in zip(self._cache.layers, cache.layers, strict=True):
                running.keys = torch.cat([_left_pad(running.keys, length - old), _left_pad(joining.keys, length - new)])
                running.values = torch.cat(
                    [_left_pad(running.values, length - old), _left_pad(joining.values, length - new)]
                )
            self._mask = torch.cat([F.pad(self._mask, (length - old, 0)), F.pad(mask, (length - new, 0))])
            self._last = torch.cat([self._last, tokens])
        with self._lock:
            self._rows = self._rows + rows
            self._prefilling = 0

    def _record(self, indices: range, tokens: torch.Tensor) -> None:
        """Give rows `indices` their new tokens (`tokens`, in the same order), then remove the rows that ended."""
        ended = {}
        for i, token in zip(indices, tokens.tolist()):
            row = self._rows[i]
            generation = row.generation
            generation.token_ids.append(token)
            generation._put([token])
            request = generation.request
            if token in self.eos_ids and not request.ignore_eos:
                ended[i] = "stop"
            elif row.stop_window and self._stop_string_in_tail(row):
                ended[i] = "stop"
            elif len(generation.token_ids) >= request.max_new_tokens:
                ended[i] = "length"
        if ended:
            self._remove(ended)

    def _stop_string_in_tail(self, row: _Row) -> bool:
        """Whether the text of the row's last tokens contains a stop string.

        Decoding a short tail per step, rather than transformers' `StopStringCriteria`: that builds tables over
        the whole vocabulary for every set of stop strings (about a second for a 150k vocabulary), in the thread
        every request waits on."""
        tail: list[int] = []
        for token in reversed(row.generation.token_ids):
            if token not in self.skip_ids:
                tail.append(token)
                if len(tail) == row.stop_window:
                    break
        text = self.tokenizer.decode(tail[::-1], skip_special_tokens=False)
        return any(stop in text for stop in row.generation.request.stop)

    def _remove(self, ended: dict[int, str]) -> None:
        """Drop rows `ended` (index -> finish reason) from the batch, then tell their callers."""
        keep = [i for i in range(len(self._rows)) if i not in ended]
        if keep:
            index = torch.tensor(keep, device=self._mask.device)
            self._cache.batch_select_indices(index)
            self._mask, self._last = self._mask[index], self._last[index]
            self._trim()
        else:
            self._cache = self._mask = self._last = None
        rows = self._rows
        with self._lock:
            self._rows = [rows[i] for i in keep]
        for i, reason in ended.items():
            rows[i].generation._finish(reason)

    def _trim(self) -> None:
        """Drop the leading positions that are padding in every row (left when the longest rows left), so the batch
        stays as long as its longest row. Hand-written: `DynamicLayer.crop` removes positions at the end only."""
        start = int(self._mask.any(0).int().argmax())
        if start == 0:
            return
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
        self._mask = self._mask[:, start:]

    def _fail_batch(self, error: BaseException) -> None:
        rows = self._rows
        with self._lock:
            self._rows, self._prefilling = [], 0
        self._cache = self._mask = self._last = None
        for row in rows:
            row.generation._finish("error", error)


def _left_pad(states: torch.Tensor, count: int) -> torch.Tensor:
    """`[batch, heads, length, dim]` with `count` zero positions before the first."""
    return F.pad(states, (0, 0, count, 0)) if count else states


def _causal_table_length(model: torch.nn.Module) -> int | None:
    """The smallest boolean `[1, 1, N, N]` causal table of `model` (as `extend_causal_tables` grows), None if none."""
    sizes = [
        module.bias.shape[-1] for module in model.modules()
        if isinstance(getattr(module, "bias", None), torch.Tensor)
        and module.bias.dtype == torch.bool and module.bias.dim() == 4
    ]
    return min(sizes, default=None)
