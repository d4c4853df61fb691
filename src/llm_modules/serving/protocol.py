"""The OpenAI request bodies this server accepts (pydantic models, strict types) and its error body."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    # "5" is not an integer and 1 is not a boolean. Other OpenAI fields (user, logprobs, ...) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


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
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    n: int | None = None  # choices per prompt, 1 to MAX_CHOICES (`ModelServer.sampling`)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None  # vLLM's extension: generate max_tokens whatever the model ends with (load tests)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # newer clients send this instead of max_tokens
    tools: list[Any] | None = None  # refused when not empty: no tool calling
    functions: list[Any] | None = None  # the older name of tools


class CompletionRequest(SamplingRequest):
    # The OpenAI forms: a text, several texts (one choice each), token ids, or several lists of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    _prompt_form = one_of_forms("prompt", "a string, a list of strings, a list of token ids or a list of lists of them")


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
    got = "" if problem["type"] == "missing" else f" (got {json.dumps(problem.get('input'), default=str)[:80]})"
    return APIError(400, f"{param or 'request body'}: {problem['msg']}{got}", param)
