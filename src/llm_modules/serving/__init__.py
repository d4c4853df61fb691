"""An OpenAI-compatible HTTP server, so existing OpenAI clients drive a combined model unchanged.

`GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream: true` as server-sent
events) and `GET /health`, on FastAPI + uvicorn. Requests are validated and tokenized on the event loop; each
prompt (each of its `n` choices) becomes a request of the batching engine (`engine.py`), whose one thread decodes up
to `max_batch_size` of them together and queues the rest, so the server keeps answering `/health` and streaming while
it generates. A generation stops soon after its client is gone, streamed or not. One log line per request (logger
`llm_modules.serving`). A plain Hugging Face causal LM dir can be served as well. The request bodies and the error
body are in `protocol.py`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import secrets
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import STOP_STRINGS, tokenize_prompt
from ..generation import (
    AnswerTextPieces,
    ContextLengthError,
    chat_prompt_ids,
    check_generation_length,
    context_length,
    control_token_ids,
    decode_answer,
    load_model_and_tokenizer,
)
from ..modeling import LLMModulesForCausalLM
from . import chat_page
from .engine import BatchingEngine, Generation, GenerationRequest
from .logprobs import LogprobFormat
from .protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingRequest,
    check_supported,
    validation_error,
)
from .request_log import RequestLog
from .sampling import TokenLogprob
from .stop_scanner import StopScanner
from .templates import TemplateError, fold_system_turns, template_has_system_role

MAX_STOP_SEQUENCES = 4  # as the OpenAI API
MAX_CHOICES = 128  # most `n` choices per prompt, as the OpenAI API
DISCONNECT_POLL_S = 0.2  # how often a non-streaming request checks that its client is still there
log = logging.getLogger(__name__)

# ---- generation -------------------------------------------------------------------------------------------------


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]  # the request's stop sequences: cut from the text, as the OpenAI API does
    ignore_eos: bool = False  # generate max_new_tokens whatever the model ends with (load tests)
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no logprobs; else how many most likely tokens each position lists
    echo: bool = False  # the prompt precedes the completion (text, and logprobs when asked)


@dataclass
class Job:
    """One choice's generation: what to generate, its cancel switch, how many tokens it has made so far and why it
    ended ("stop", "length", "cancelled"; None while it runs)."""

    prompt_ids: list[int]
    sampling: Sampling
    prompt_text: str = ""  # what `echo` writes before the completion
    cancelled: threading.Event = field(default_factory=threading.Event)
    new_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per new token, when `sampling.logprobs` asks
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with echo and logprobs: one per prompt token


class ModelServer:
    """The served model: prompts -> token ids, request checks, and generation by a `BatchingEngine`.

    `max_batch_size` requests decode together (each holds its KV caches); more queue, first come first served.
    `close()` stops the engine's thread; the next request starts it again.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        *,
        max_batch_size: int = 8,
        max_new_tokens_limit: int = 2048,
        system_prompt: str | None = None,
    ):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.combined = isinstance(model, LLMModulesForCausalLM)
        # A combined model answers in the training layout and closes its answers with <|end_of_solution|>.
        self.stop_strings = list(STOP_STRINGS) if self.combined else []
        self.system_prompt = system_prompt
        self.max_new_tokens_limit = max_new_tokens_limit
        self.context_length = context_length(model)
        self.control_ids = control_token_ids(tokenizer, model)
        self.engine = BatchingEngine(model, tokenizer, max_batch_size=max_batch_size, skip_ids=self.control_ids)
        self.logprob_format = LogprobFormat(tokenizer)
        # A chat template that refuses (or drops) system messages gets them at the start of the first user turn.
        self.fold_system = (
            not self.combined and bool(tokenizer.chat_template) and not template_has_system_role(tokenizer)
        )
        if self.fold_system:
            log.warning("the chat template has no system role: system messages (and --system) go at the start of "
                        "the first user turn, as llama.cpp's server does")

    @property
    def generating(self) -> int:
        """Requests decoding (or being prefilled) now."""
        return self.engine.running

    @property
    def queued(self) -> int:
        """Requests waiting for a row of the batch."""
        return self.engine.queued

    def close(self) -> None:
        self.engine.close()

    # -- prompts and checks (event loop) --

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        for i, message in enumerate(messages):
            if message.role in ("tool", "function"):
                raise APIError(400, f"messages.{i}.role: {message.role!r} messages are not supported (this server "
                               "has no tool or function calling)", f"messages.{i}.role")
            if message.content is None and message.role != "assistant":
                raise APIError(400, f"messages.{i}.content: only assistant messages may have no content",
                               f"messages.{i}.content")
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        system = self.system_prompt
        if self.fold_system:
            turns, system = fold_system_turns(turns, system), None
        try:
            return chat_prompt_ids(self.model, self.tokenizer, turns, system)
        except TemplateError as error:  # the template's own rule (raise_exception), e.g. roles must alternate
            raise APIError(400, f"messages: the model's chat template refused them: {error}", "messages") from error

    def completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """The token ids of each prompt of a completion request; ids must be in the vocabulary."""
        if isinstance(prompt, str):
            prompts = [tokenize_prompt(self.tokenizer, prompt)["input_ids"]]
        elif not prompt:
            raise APIError(400, "prompt: an empty list", "prompt")
        elif isinstance(prompt[0], str):
            prompts = tokenize_prompt(self.tokenizer, prompt)["input_ids"]
        elif isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = prompt
        vocabulary = len(self.tokenizer)
        for i, ids in enumerate(prompts):
            where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            if not ids:
                raise APIError(400, f"prompt: {where} has no tokens", "prompt")
            if bad := [t for t in ids if not 0 <= t < vocabulary]:
                raise APIError(400, f"prompt: token id {bad[0]} in {where} is not in the vocabulary "
                               f"(0 to {vocabulary - 1})", "prompt")
        return prompts

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {self.name!r}",
                           "model", "model_not_found")

    def sampling(self, request: SamplingRequest, prompt_length: int, max_tokens: int | None,
                 option: str = "max_tokens") -> Sampling:
        """The request's generation settings, checked against the context and the server's limits; `option` names
        the field that `max_tokens` came from."""
        if request.n is not None and not 1 <= request.n <= MAX_CHOICES:
            raise APIError(400, f"n must be from 1 to {MAX_CHOICES}, got {request.n}", "n")
        echo = bool(getattr(request, "echo", False))
        max_tokens = self._max_tokens(request, prompt_length, max_tokens, option, echo)
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stop) > MAX_STOP_SEQUENCES or not all(stop):
            raise APIError(400, f"stop: up to {MAX_STOP_SEQUENCES} non-empty strings (got {stop!r})", "stop")
        temperature = 1.0 if request.temperature is None else request.temperature
        top_p = 1.0 if request.top_p is None else request.top_p
        if top_p == 0:  # the smallest nucleus: the most likely token alone
            temperature, top_p = 0.0, 1.0
        if isinstance(request, ChatCompletionRequest):
            logprobs = (request.top_logprobs or 0) if request.logprobs else None
        else:
            logprobs = request.logprobs
        return Sampling(
            max_tokens, temperature, top_p, request.seed, stop, bool(request.ignore_eos),
            logit_bias=self._logit_bias(request.logit_bias), presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0, logprobs=logprobs, echo=echo,
        )

    def _max_tokens(self, request: SamplingRequest, prompt_length: int, max_tokens: int | None, option: str,
                    echo: bool) -> int:
        """The checked number of tokens to generate: 0 only with `echo` (lm-evaluation-harness scores a prompt so)."""
        prompt_param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
        if max_tokens == 0 and echo:
            if prompt_length > self.context_length:
                raise APIError(400, f"This model's maximum context length is {self.context_length} tokens, but the "
                               f"prompt is {prompt_length} tokens: shorten the prompt", prompt_param,
                               "context_length_exceeded")
            return 0
        if max_tokens is not None and max_tokens < 1:
            at_least = " (0 only with echo: true, to score the prompt)" if prompt_param == "prompt" else ""
            raise APIError(400, f"{option} must be at least 1{at_least}, got {max_tokens}", option)
        if max_tokens is not None and max_tokens > self.max_new_tokens_limit:
            raise APIError(400, f"{option} is {max_tokens}, but this server allows at most "
                           f"{self.max_new_tokens_limit} (--max-new-tokens-limit)", option)
        try:
            return check_generation_length(
                self.model, prompt_length, max_tokens, up_to=self.max_new_tokens_limit, option=option
            )
        except ContextLengthError as error:
            raise APIError(400, str(error), prompt_param if error.prompt_too_long else option,
                           "context_length_exceeded") from error

    def _logit_bias(self, bias: dict[str, Any] | None) -> dict[int, float]:
        """OpenAI's logit_bias (token id strings -> -100..100) as token ids -> values; a 400 naming it otherwise."""
        checked, vocabulary = {}, len(self.tokenizer)
        for key, value in (bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise APIError(400, f"logit_bias: {key!r} is not a token id (an integer as a string)",
                               "logit_bias") from None
            if not 0 <= token < vocabulary:
                raise APIError(400, f"logit_bias: token id {token} is not in the vocabulary (0 to {vocabulary - 1})",
                               "logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise APIError(400, f"logit_bias: the bias of {key} must be a number, got {json.dumps(value)}",
                               "logit_bias")
            if not -100 <= value <= 100:
                raise APIError(400, f"logit_bias: the bias of {key} must be from -100 to 100, got {value}",
                               "logit_bias")
            checked[token] = float(value)
        return checked

    # -- generation (the engine's thread; call these on the event loop) --

    def start(self, job: Job) -> Generation:
        """Queue `job` on the engine; its `Generation` yields the new token ids on this event loop. A temperature of
        0 is greedy; sampling uses the job's seed (a random one when None) in its own generator, so a seed gives the
        same text whatever else runs. The model's own stop strings end it unless `ignore_eos`."""
        sampling = job.sampling
        # max_tokens 0 (echo) scores the prompt: the engine's prefill does that, with logprobs or not.
        scores_prompt = sampling.echo and (sampling.logprobs is not None or sampling.max_new_tokens == 0)
        request = GenerationRequest(
            job.prompt_ids, sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            seed=sampling.seed,
            stop=(sampling.stop if sampling.ignore_eos else self.stop_strings + sampling.stop),
            ignore_eos=sampling.ignore_eos, cancelled=job.cancelled, logit_bias=sampling.logit_bias,
            presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
            logprobs=sampling.logprobs, prompt_logprobs=(sampling.logprobs or 0) if scores_prompt else None,
        )
        return self.engine.submit(request, loop=asyncio.get_running_loop())

    def submit(self, job: Job) -> asyncio.Task:
        """`start` the job and collect it: the task's result is its new token ids (also counted in `job`)."""
        generation = self.start(job)

        async def collect() -> list[int]:
            async for ids in generation:
                job.new_tokens += len(ids)
            job.finish_reason = generation.finish_reason
            job.logprobs, job.prompt_logprobs = generation.logprobs, generation.prompt_logprobs
            return generation.token_ids

        return asyncio.ensure_future(collect())

    @staticmethod
    def finish_reason(job: Job, scanner: StopScanner) -> str:
        """The OpenAI finish reason: "stop" when EOS, the model's stop string or one of the request's ended it."""
        return "stop" if job.finish_reason == "stop" or scanner.stopped else "length"

    def decode(self, ids: list[int]) -> str:
        return decode_answer(self.tokenizer, ids, self.control_ids)

    def text_pieces(self) -> AnswerTextPieces:
        """Incremental text of new token ids, the same text as `decode`."""
        return AnswerTextPieces(self.tokenizer, self.control_ids)


# ---- the app ----------------------------------------------------------------------------------------------------


def create_app(server: ModelServer, api_key: str | None = None, allowed_origins: list[str] | None = None) -> FastAPI:
    """The FastAPI app serving `server`; with `api_key`, the `/v1` routes need `Authorization: Bearer KEY`.
    `allowed_origins` (e.g. `["https://page.example"]`, or `["*"]`) lets browser pages from those origins call it
    (CORS, Starlette's `CORSMiddleware`; preflights need no key); none: no CORS headers, as before.
    Logs one line per request to the `llm_modules.serving` logger at INFO (`RequestLog`)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(server.close)  # after the current step; what still runs ends "cancelled"

    app = FastAPI(title="llm-modules", description="OpenAI-compatible API", lifespan=lifespan)
    if allowed_origins:
        # Added before RequestLog, so that RequestLog (the outer one) logs preflights too.
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(RequestLog)
    app.include_router(chat_page.router)  # the chat page at /

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"{error.detail}: {request.method} {request.url.path}"
        return await api_error(request, APIError(error.status_code, message, code=str(error.status_code)))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return await api_error(request, APIError(500, f"{type(error).__name__}: {error}", kind="server_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(
                401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
            )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.name, "generating": server.generating, "queued": server.queued}

    def model_card() -> dict[str, Any]:
        return {"id": server.name, "object": "model", "created": 0, "owned_by": "llm-modules",
                "max_model_len": server.context_length}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str) -> dict[str, Any]:
        server.check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        check_supported(body)
        prompt_ids = await asyncio.to_thread(server.chat_prompt, body.messages)
        if body.max_completion_tokens is not None:
            return await respond(server, request, body, [prompt_ids], body.max_completion_tokens,
                                 "max_completion_tokens", chat=True)
        return await respond(server, request, body, [prompt_ids], body.max_tokens, "max_tokens", chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        check_supported(body)
        prompts = await asyncio.to_thread(server.completion_prompts, body.prompt)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.echo and not all(isinstance(text, str) for text in texts):  # token ids: echo their text
            texts = [server.tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]
        return await respond(server, request, body, prompts, body.max_tokens, "max_tokens", chat=False,
                             prompt_texts=texts if body.echo else None)

    return app


async def respond(
    server: ModelServer, request: Request, body: SamplingRequest, prompts: list[list[int]], max_tokens: int | None,
    option: str, chat: bool, prompt_texts: list[str] | None = None,
) -> dict[str, Any] | StreamingResponse:
    """The completion of one checked request, `n` choices per prompt (prompt by prompt, `index` in that order): a
    JSON body, or a stream of server-sent events. `option` names the field `max_tokens` came from; `prompt_texts`
    (one per prompt) are echoed before the completions when given."""
    request.state.prompt_tokens = sum(len(ids) for ids in prompts)  # for the log line
    jobs = []
    for p, ids in enumerate(prompts):
        sampling = server.sampling(body, len(ids), max_tokens, option)
        for choice in range(body.n or 1):
            # Each choice of a seeded request draws from its own seed: the first from the seed, so n=1 is unchanged.
            seed = None if sampling.seed is None else _nth_seed(sampling.seed, choice)
            jobs.append(Job(ids, Sampling(**{**sampling.__dict__, "seed": seed}),
                            prompt_text=prompt_texts[p] if prompt_texts else ""))
    completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = stream_events(server, request, jobs, completion_id, chat, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    tasks = [server.submit(job) for job in jobs]
    watcher = asyncio.create_task(cancel_when_gone(request, jobs))
    try:
        results = await asyncio.gather(*tasks)
    finally:
        watcher.cancel()
        stop(jobs)
        request.state.completion_tokens = sum(job.new_tokens for job in jobs)
    return {
        "id": completion_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": server.name,
        "choices": [choice_body(server, i, job, ids, chat) for i, (job, ids) in enumerate(zip(jobs, results))],
        "usage": usage(request.state.prompt_tokens, request.state.completion_tokens),
    }


def choice_body(server: ModelServer, index: int, job: Job, new_ids: list[int], chat: bool) -> dict[str, Any]:
    """One choice of a non-streaming answer, with its logprobs when the request asked for them."""
    scanner = StopScanner(job.sampling.stop)
    text = scanner.feed(server.decode(new_ids)) + scanner.flush()
    choice: dict[str, Any] = {"index": index, "finish_reason": server.finish_reason(job, scanner), "logprobs": None}
    asked = job.sampling.logprobs is not None
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
        if asked:
            choice["logprobs"] = server.logprob_format.chat(job.logprobs)
        return choice
    choice["text"] = job.prompt_text + text
    if asked:
        entries, tokens = job.logprobs, new_ids
        if job.sampling.echo:
            entries, tokens = job.prompt_logprobs + entries, job.prompt_ids + tokens
        choice["logprobs"] = server.logprob_format.completion(entries, tokens, 0)
    return choice


class StreamLogprobs:
    """A streamed choice's logprobs not sent yet, for its next chunk (the stop scanner may hold text back, so a
    chunk can carry the logprobs of several tokens); None when the request did not ask for logprobs."""

    def __init__(self, server: ModelServer, job: Job, generation: Generation, chat: bool):
        self.format, self.job, self.generation, self.chat = server.logprob_format, job, generation, chat
        self.sent = self.offset = 0  # entries sent; characters of the token texts sent (completions' text_offset)

    def prompt(self) -> dict[str, Any] | None:
        """The echoed prompt's logprobs (completions)."""
        if self.job.sampling.logprobs is None:
            return None
        self.offset = self.format.length(self.job.prompt_ids)
        return self.format.completion(self.generation.prompt_logprobs or [], self.job.prompt_ids, 0)

    def take(self) -> dict[str, Any] | None:
        if self.job.sampling.logprobs is None:
            return None
        # The engine thread may be a token ahead: take the entries whose tokens are recorded too.
        end = min(len(self.generation.logprobs), len(self.generation.token_ids))
        entries, tokens = self.generation.logprobs[self.sent:end], self.generation.token_ids[self.sent:end]
        self.sent = end
        if self.chat:
            return self.format.chat(entries)
        formatted = self.format.completion(entries, tokens, self.offset)
        self.offset += self.format.length(tokens)
        return formatted


def _nth_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of a request seeded `seed`, in the range `torch.Generator.manual_seed` takes."""
    return seed + choice if seed + choice < 2**64 else seed - choice


async def cancel_when_gone(request: Request, jobs: list[Job]) -> None:
    """Cancel `jobs` once the client has disconnected. Neither uvicorn nor FastAPI cancels a handler whose client is
    gone (only a stream notices, when it next writes), so a non-streaming request watches for it."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    for job in jobs:
        job.cancelled.set()


def stop(jobs: list[Job]) -> None:
    """Stop the jobs still generating and drop those still queued (the engine frees their rows at its next step)."""
    for job in jobs:
        job.cancelled.set()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def stream_events(
    server: ModelServer, request: Request, jobs: list[Job], completion_id: str, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in the OpenAI chunk format, ending with `data: [DONE]`: the jobs generate at once (as the
    engine's batch allows), and their choices are streamed one after the other. An echoed prompt is a choice's
    first chunk; logprobs ride on the chunks of their tokens' text."""
    created = int(time.time())

    def chunk(choices: list[dict], **extra: Any) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": server.name, "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    def piece(index: int, text: str | None = None, finish_reason: str | None = None, role: bool = False,
              logprobs: dict | None = None) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            return chunk([{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}])
        return chunk([{"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}])

    generations = [server.start(job) for job in jobs]  # all generate at once (as the batch allows)
    try:
        for index, (job, generation) in enumerate(zip(jobs, generations)):
            scanner, pieces = StopScanner(job.sampling.stop), server.text_pieces()
            logprobs, echoed = StreamLogprobs(server, job, generation, chat), not job.sampling.echo
            if chat:
                yield piece(index, role=True)
            async for ids in generation:
                if not echoed:  # after the prefill, which scored the prompt
                    yield piece(index, job.prompt_text, logprobs=logprobs.prompt())
                    echoed = True
                job.new_tokens += len(ids)
                if text := scanner.feed(pieces.feed(ids)):
                    yield piece(index, text, logprobs=logprobs.take())
            job.finish_reason = generation.finish_reason
            if not echoed:
                yield piece(index, job.prompt_text, logprobs=logprobs.prompt())
            if text := scanner.feed(pieces.finish()) + scanner.flush():
                yield piece(index, text, logprobs=logprobs.take())
            yield piece(index, finish_reason=server.finish_reason(job, scanner), logprobs=logprobs.take())
        if include_usage:
            yield chunk([], usage=usage(request.state.prompt_tokens, sum(job.new_tokens for job in jobs)))
    except Exception as error:  # headers are sent: report in the stream, as the OpenAI API does
        yield f"data: {json.dumps(APIError(500, f'{type(error).__name__}: {error}', kind='server_error').body())}\n\n"
    finally:
        stop(jobs)  # a client that closes the stream stops its generation
        request.state.completion_tokens = sum(job.new_tokens for job in jobs)
    yield "data: [DONE]\n\n"


# ---- loading and running ----------------------------------------------------------------------------------------


def load_model(
    model: str | Path, *, large_model: str | list[str] | None = None, device: str | None = None, large_dtype: str | None = None,
    large_quantization: str | None = None, trained_quantization: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved combined model (or a plain Hugging Face causal LM: a dir, a hub id or a .gguf file) and its tokenizer,
    on `device`, its frozen part in `large_dtype` / `large_quantization`, its trained parts in `trained_quantization`
    (`generation.load_model_and_tokenizer`)."""
    return load_model_and_tokenizer(
        str(model), large_model=large_model, device=device, large_dtype=large_dtype,
        large_quantization=large_quantization, trained_quantization=trained_quantization,
    )


def serve(
    server: ModelServer, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, quiet: bool = False,
    allowed_origins: list[str] | None = None,
) -> None:
    """Run the server until stopped. It logs one line per request (`RequestLog`) to stderr, as uvicorn logs;
    `quiet` leaves only warnings and errors. Uvicorn's own access log is off: it would log each request twice.
    `allowed_origins`: the browser origins allowed to call it (CORS; `create_app`).

    Raises `KeyboardInterrupt` after a graceful shutdown on Ctrl-C (SIGINT), so the command exits 130 as every other
    interrupted command does (uvicorn returns normally); SIGTERM returns normally."""
    logging_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    level = "WARNING" if quiet else "INFO"
    logging_config["loggers"][log.name] = {"handlers": ["default"], "level": level, "propagate": False}
    config = uvicorn.Config(create_app(server, api_key, allowed_origins), host=host, port=port,
                            log_config=logging_config, log_level=level.lower(), access_log=False)
    runner = _InterruptibleServer(config)
    runner.run()
    if runner.interrupted:
        raise KeyboardInterrupt


class _InterruptibleServer(uvicorn.Server):
    """uvicorn's server, remembering whether Ctrl-C stopped it."""

    interrupted = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.interrupted = self.interrupted or sig == signal.SIGINT
        super().handle_exit(sig, frame)
