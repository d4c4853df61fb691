"""An OpenAI-compatible HTTP server, so existing OpenAI clients drive a combined model unchanged.

`GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream: true` as server-sent
events) and `GET /health`, on FastAPI + uvicorn. Requests are validated and tokenized on the event loop; `generate`
runs in a pool of `max_concurrency` worker threads whose queue holds the requests beyond that, so the server keeps
answering `/health` and streaming while it generates. A plain Hugging Face causal LM dir can be served as well.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from transformers import (
    AsyncTextIteratorStreamer,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from .configuration import LLMModulesConfig
from .data import STOP_STRINGS, render_prompt
from .modeling import LLMModulesForCausalLM, extend_causal_tables

MAX_STOP_SEQUENCES = 4  # as the OpenAI API

# ---- requests ---------------------------------------------------------------------------------------------------


class Strict(BaseModel):
    # "5" is not an integer and 1 is not a boolean. Other OpenAI fields (user, logprobs, ...) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]  # "developer" is the newer name of "system"
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    n: int | None = Field(None, ge=1, le=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # newer clients send this instead of max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]


class APIError(Exception):
    """An error answered with the OpenAI error body `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- generation -------------------------------------------------------------------------------------------------


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]  # the request's stop sequences: cut from the text, as the OpenAI API does


class SeededSampling(LogitsProcessor):
    """Draw the next token with this request's own `torch.Generator` and leave only that token possible.

    `generate(do_sample=True)` draws from torch's global generator, which concurrent requests share, so a request's
    `seed` would not reproduce its text while others run. Placed last, with `do_sample=False`: the greedy step
    then picks the drawn token.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generator is None:
            self.generator = torch.Generator(scores.device).manual_seed(self.seed)
        token = torch.multinomial(scores.float().softmax(-1), 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter(-1, token, 0.0)


class Cancelled(StoppingCriteria):
    """Stops generating once the client has gone (a closed stream)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class StopScanner:
    """Cuts text at the first stop sequence; fed piece by piece, it holds back a tail that could still start one.

    Streaming and non-streaming answers go through it, so both give the same text.
    """

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        hits = [i for i in (self.text.find(stop, self.sent) for stop in self.stops) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            held = max(
                (k for stop in self.stops for k in range(1, len(stop)) if self.text.endswith(stop[:k])), default=0
            )
            end = len(self.text) - held
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        out = "" if self.stopped else self.text[self.sent:]
        self.sent = len(self.text)
        return out


class ModelServer:
    """The served model: prompts -> token ids, request checks, and `generate` in a pool of worker threads."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        *,
        max_concurrency: int = 4,
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
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="generate")
        self.generating = self.queued = 0
        self._counts = threading.Lock()

    # -- prompts and checks (event loop) --

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        if self.combined or not self.tokenizer.chat_template:
            return self.tokenizer(render_prompt(turns, system=self.system_prompt))["input_ids"]
        if self.system_prompt is not None and not any(t["role"] == "system" for t in turns):
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds its own BOS

    def completion_prompt(self, prompt: str | list[str]) -> list[int]:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request (got a list of {len(prompt)})", "prompt")
            prompt = prompt[0]
        return self.tokenizer(prompt)["input_ids"]

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {self.name!r}",
                           "model", "model_not_found")

    def sampling(self, request: SamplingRequest, prompt_length: int, max_tokens: int | None) -> Sampling:
        """The request's generation settings, checked against the context and the server's limits."""
        room = self.context_length - prompt_length
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.context_length} tokens. However, your "
                           f"prompt is {prompt_length} tokens, which leaves no room for the completion.",
                           "messages" if isinstance(request, ChatCompletionRequest) else "prompt",
                           "context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(self.max_new_tokens_limit, room)
        elif max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        elif max_tokens > self.max_new_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}, but this server allows at most "
                           f"{self.max_new_tokens_limit} (--max-new-tokens-limit)", "max_tokens")
        elif max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.context_length} tokens. However, you "
                           f"requested {prompt_length + max_tokens} tokens ({prompt_length} in the prompt, "
                           f"{max_tokens} in the completion). Please reduce the prompt or the completion.",
                           "max_tokens", "context_length_exceeded")
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stop) > MAX_STOP_SEQUENCES or not all(stop):
            raise APIError(400, f"stop: up to {MAX_STOP_SEQUENCES} non-empty strings (got {stop!r})", "stop")
        if self.combined and self.model.config.small_position_embeddings == "zero":
            # generate() grows the small model's causal tables in place when a sequence outgrows them; grown here
            # first, on the event loop, no two worker threads can race to replace a table another one is using.
            extend_causal_tables(self.model.small, prompt_length + max_tokens)
        temperature = 1.0 if request.temperature is None else request.temperature
        top_p = 1.0 if request.top_p is None else request.top_p
        return Sampling(max_tokens, temperature, top_p, request.seed, stop)

    # -- generation (worker threads) --

    def generate(
        self, prompt_ids: list[int], sampling: Sampling, streamer=None, cancelled: threading.Event | None = None
    ) -> list[int]:
        """The new token ids for one prompt (blocking); `streamer` gets the text as it comes, `cancelled` stops it."""
        processors = LogitsProcessorList()
        if sampling.temperature > 0:
            if sampling.temperature != 1:
                processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_p < 1:
                processors.append(TopPLogitsWarper(sampling.top_p))
            processors.append(SeededSampling(sampling.seed if sampling.seed is not None else secrets.randbits(63)))
        stops = self.stop_strings + sampling.stop
        config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=False, stop_strings=stops or None)
        inputs = torch.tensor([prompt_ids], device=self.model.device)
        with torch.inference_mode():
            output = self.model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([Cancelled(cancelled or threading.Event())]),
                tokenizer=self.tokenizer,
                streamer=streamer,
            )
        return output[0, len(prompt_ids):].tolist()

    def submit(self, prompt_ids: list[int], sampling: Sampling, streamer=None, cancelled=None) -> asyncio.Future:
        """Queue `generate` on the worker pool; the future's result is the new token ids."""

        def run() -> list[int]:
            with self._counts:
                self.queued -= 1
                self.generating += 1
            try:
                return self.generate(prompt_ids, sampling, streamer, cancelled)
            finally:
                with self._counts:
                    self.generating -= 1

        with self._counts:
            self.queued += 1
        future = self.pool.submit(run)

        def unqueue_if_cancelled(done) -> None:
            if done.cancelled():  # never started, so run() never took it off the queue
                with self._counts:
                    self.queued -= 1

        future.add_done_callback(unqueue_if_cancelled)
        return asyncio.wrap_future(future)

    def finish_reason(self, new_ids: list[int], text: str, sampling: Sampling, scanner: StopScanner) -> str:
        stopped = (
            scanner.stopped or (new_ids and new_ids[-1] in self.eos_ids) or any(s in text for s in self.stop_strings)
        )
        return "length" if len(new_ids) >= sampling.max_new_tokens and not stopped else "stop"

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def context_length(model: PreTrainedModel) -> int:
    """Most tokens (prompt + completion) a sequence may hold."""
    config = model.config
    if isinstance(config, LLMModulesConfig):
        # With zeroed small-model positions only the large model limits the length (DESIGN.md).
        configs = [config.large_config] + ([config.small_config] if config.small_position_embeddings == "keep" else [])
    else:
        configs = [config]
    limits = [getattr(c, "max_position_embeddings", None) for c in configs]
    if None in limits:
        raise ValueError(f"cannot tell the context length of {type(model).__name__}: no max_position_embeddings")
    return min(limits)


# ---- the app ----------------------------------------------------------------------------------------------------


def create_app(server: ModelServer, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `server`; with `api_key`, the `/v1` routes need `Authorization: Bearer KEY`."""
    app = FastAPI(title="llm-modules", description="OpenAI-compatible API")

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
    async def chat_completions(request: ChatCompletionRequest):
        server.check_model(request.model)
        prompt_ids = await asyncio.to_thread(server.chat_prompt, request.messages)
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        return await respond(server, request, prompt_ids, max_tokens, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: CompletionRequest):
        server.check_model(request.model)
        prompt_ids = await asyncio.to_thread(server.completion_prompt, request.prompt)
        return await respond(server, request, prompt_ids, request.max_tokens, chat=False)

    return app


def validation_error(error: RequestValidationError) -> APIError:
    """The first problem FastAPI found in the body, as a 400 naming the field, what it expected and what it got."""
    problem = error.errors()[0]
    if problem["type"] == "json_invalid":
        return APIError(400, f"Invalid JSON body: {problem.get('ctx', {}).get('error', problem['msg'])}")
    if isinstance(problem.get("input"), bytes):  # FastAPI reads JSON only when the content type allows it
        return APIError(400, "The body must be a JSON object sent with 'Content-Type: application/json'")
    # Drop "body" and pydantic's union-member tags ("str", "list[str]") from the location.
    path = [
        str(p) for p in problem["loc"][1:]
        if isinstance(p, int) or ("[" not in p and p not in ("str", "int", "float", "bool"))
    ]
    param = ".".join(path) or None
    got = "" if problem["type"] == "missing" else f" (got {json.dumps(problem.get('input'), default=str)[:80]})"
    return APIError(400, f"{param or 'request body'}: {problem['msg']}{got}", param)


async def respond(
    server: ModelServer, request: SamplingRequest, prompt_ids: list[int], max_tokens: int | None, chat: bool
) -> dict[str, Any] | StreamingResponse:
    """The completion of one checked request: a JSON body, or a stream of server-sent events."""
    sampling = server.sampling(request, len(prompt_ids), max_tokens)
    completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        events = stream_events(server, prompt_ids, sampling, completion_id, chat, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    cancelled = threading.Event()
    try:
        new_ids = await server.submit(prompt_ids, sampling, cancelled=cancelled)
    finally:
        cancelled.set()  # the client may have gone while we waited
    scanner = StopScanner(sampling.stop)
    raw = server.decode(new_ids)
    text = scanner.feed(raw) + scanner.flush()
    finish_reason = server.finish_reason(new_ids, raw, sampling, scanner)
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": completion_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": server.name,
        "choices": [choice],
        "usage": usage(len(prompt_ids), len(new_ids)),
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def stream_events(
    server: ModelServer, prompt_ids: list[int], sampling: Sampling, completion_id: str, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in the OpenAI chunk format, ending with `data: [DONE]`."""
    created = int(time.time())

    def chunk(choices: list[dict], **extra: Any) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": server.name, "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    def piece(text: str | None = None, finish_reason: str | None = None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            return chunk([{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}])
        return chunk([{"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}])

    streamer = AsyncTextIteratorStreamer(server.tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancelled = threading.Event()
    future = server.submit(prompt_ids, sampling, streamer, cancelled)
    # If generate() fails, the streamer never hears the end: close its queue when the worker is done either way.
    future.add_done_callback(lambda _: streamer.text_queue.put_nowait(streamer.stop_signal))
    scanner = StopScanner(sampling.stop)
    try:
        if chat:
            yield piece(role=True)
        async for text in streamer:
            text = scanner.feed(text)
            if text:
                yield piece(text)
        new_ids = await future
        if text := scanner.flush():
            yield piece(text)
        yield piece(finish_reason=server.finish_reason(new_ids, scanner.text, sampling, scanner))
        if include_usage:
            yield chunk([], usage=usage(len(prompt_ids), len(new_ids)))
    except Exception as error:  # headers are sent: report in the stream, as the OpenAI API does
        yield f"data: {json.dumps(APIError(500, f'{type(error).__name__}: {error}', kind='server_error').body())}\n\n"
    finally:
        cancelled.set()  # a client that closes the stream stops its generation
        future.cancel()
    yield "data: [DONE]\n\n"


# ---- loading and running ----------------------------------------------------------------------------------------


def load_model(
    model_dir: str | Path, *, large_model: str | None = None, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved combined model (or a plain Hugging Face causal LM dir) and its tokenizer, on `device`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") == LLMModulesConfig.model_type:
        model = LLMModulesForCausalLM.from_pretrained(model_dir, large_model_name_or_path=large_model, dtype=dtype)
        tokenizer = model.tokenizer
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir}: no tokenizer saved there")
    return model.to(device), tokenizer


def serve(server: ModelServer, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> None:
    """Run the server until interrupted."""
    uvicorn.run(create_app(server, api_key), host=host, port=port, log_level="info")
