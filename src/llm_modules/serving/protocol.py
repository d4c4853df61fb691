"""The OpenAI request bodies this server accepts (pydantic models, strict types) and its error body.

Every field here either works as the OpenAI API specifies, or is parsed only so that `ModelServer` can refuse its
unsupported values with a 400 naming it; a field not declared here is refused with a 400 too (as the OpenAI API
answers "Unrecognized request argument"), so no field is accepted and ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    # "5" is not an integer and 1 is not a boolean; an undeclared field is an error (`validation_error`).
    model_config = ConfigDict(strict=True, extra="forbid")


def one_of_forms(field: str, forms: str):
    """A validator that answers a value matching none of a union's members with one message listing the `forms`
    (pydantic would report only why the value is not the first member, e.g. "Input should be a valid string")."""

    def check(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("form", f"expected {forms}") from None

    return field_validator(field, mode="wrap")(check)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    # "developer" is the newer name of "system"; "tool" and "function" are parsed only to be refused clearly.
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None  # None: an assistant message with no content
    name: str | None = None  # accepted, not shown to the model: the training layout has no names
    # Parsed only to be refused clearly (`ModelServer.chat_prompt`): this server has no tool calling.
    tool_calls: list[Any] | None = None
    function_call: Any | None = None
    tool_call_id: str | None = None
    _content_form = one_of_forms(
        "content", 'a string, a list of text parts ({"type": "text", "text": ...}; no other kinds), or null'
    )

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # 0: greedy, as the smallest nucleus holds one token
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    n: int | None = None  # choices per prompt, 1 to MAX_CHOICES (`ModelServer.sampling`)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None  # vLLM's extension: generate max_tokens whatever the model ends with (load tests)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None  # token id (a string) -> -100..100; checked by `ModelServer.sampling`
    user: str | None = None  # the end user's id: metadata, written to no log and not shown to the model


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # newer clients send this instead of max_tokens
    tools: list[Any] | None = None  # refused when not empty: no tool calling
    functions: list[Any] | None = None  # the older name of tools
    tool_choice: Any | None = None  # only "none"
    function_call: Any | None = None  # the older name of tool_choice: only "none"
    parallel_tool_calls: bool | None = None  # refused: no tool calling
    response_format: dict[str, Any] | None = None  # only {"type": "text"}
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)  # needs logprobs: true


class CompletionRequest(SamplingRequest):
    # The OpenAI forms: a text, several texts (one choice each), token ids, or several lists of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    _prompt_form = one_of_forms("prompt", "a string, a list of strings, a list of token ids or a list of lists of them")
    echo: bool | None = None  # the prompt's text (and with logprobs, its tokens' logprobs) before the completion
    logprobs: int | None = Field(None, ge=0, le=5)  # the OpenAI API's limit
    best_of: int | None = None  # only equal to n: the server returns every choice it generates
    suffix: str | None = None  # only empty: no fill-in-the-middle


class APIError(Exception):
    """An error answered with the OpenAI error body `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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
    if problem["type"] == "extra_forbidden":
        return APIError(400, f"{param}: unrecognized request argument (this server does not support it)", param)
    got = "" if problem["type"] == "missing" else f" (got {json.dumps(problem.get('input'), default=str)[:80]})"
    return APIError(400, f"{param or 'request body'}: {problem['msg']}{got}", param)


def check_supported(body: SamplingRequest) -> None:
    """Refuse, with a 400 naming the field, the values of the fields parsed only to be refused (tools, response
    formats, `best_of` other than `n`, ...): this server never accepts a field and ignores it."""
    refusals = []
    if body.stream_options is not None and not body.stream:
        refusals.append(("stream_options", "allowed only with stream: true"))
    if isinstance(body, ChatCompletionRequest):
        for name in ("tools", "functions"):
            if getattr(body, name):
                refusals.append((name, "tool and function calling are not supported by this server"))
        for name in ("tool_choice", "function_call"):
            if getattr(body, name) not in (None, "none"):
                refusals.append((name, 'only "none": tool and function calling are not supported by this server'))
        if body.parallel_tool_calls is not None:
            refusals.append(("parallel_tool_calls", "tool calling is not supported by this server"))
        if body.response_format not in (None, {"type": "text"}):
            refusals.append(("response_format", 'only {"type": "text"}: this server has no JSON mode or schemas'))
        if body.top_logprobs is not None and not body.logprobs:
            refusals.append(("top_logprobs", "needs logprobs: true"))
        for i, message in enumerate(body.messages):
            for name in ("tool_calls", "function_call"):
                if getattr(message, name):
                    refusals.append((f"messages.{i}.{name}", "tool and function calls are not supported"))
    else:
        if body.best_of is not None and body.best_of != (body.n or 1):
            refusals.append(("best_of", f"only equal to n ({body.n or 1}): every generated choice is returned, "
                                        f"got {body.best_of}"))
        if body.suffix:
            refusals.append(("suffix", "not supported: this server has no fill-in-the-middle"))
    if refusals:
        param, why = refusals[0]
        raise APIError(400, f"{param}: {why}", param)
