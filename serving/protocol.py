"""The HTTP API's contract: request fields, response objects, stream chunks, error objects.

OpenAI's Chat Completions and (legacy) Completions formats, the fields this server accepts and
what it does with them (docs/serving.md). Unknown fields are refused (400 naming the field);
known OpenAI fields this server cannot honour are accepted only at their neutral value.
Extension fields, as vLLM accepts extra fields: `num_beams`, `top_k`, `ignore_eos`, and for
`/v1/completions` `images` (image URLs, one per `<image>` marker, in order).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runtime.schema import parse_json as strict_json

MAX_STOP = 4  # OpenAI's limit on `stop` sequences
MAX_N = 16


class APIError(Exception):
    """An error answered as OpenAI's error object: status, message, the offending field."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # any string: one export per server
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    user: str | None = None  # accepted, unused
    # OpenAI fields accepted at their neutral value only (checked below)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: Any = None
    # extensions (vLLM-style extra fields)
    num_beams: int | None = Field(default=None, ge=1, le=16)
    top_k: int | None = Field(default=None, ge=0)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _neutral(self) -> _Sampling:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise _FieldError(name, f"'{name}' is not supported (only 0)")
        if self.logprobs not in (None, False):
            raise _FieldError("logprobs", "'logprobs' is not supported")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise _FieldError("stop", f"at most {MAX_STOP} stop sequences")
        if self.stop is not None and any(s == "" for s in _as_list(self.stop)):
            raise _FieldError("stop", "stop sequences must not be empty")
        if self.stream_options is not None and not self.stream:
            raise _FieldError("stream_options", "'stream_options' needs 'stream': true")
        return self

    def stops(self) -> list[str]:
        return _as_list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[Any] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_max(self) -> ChatCompletionRequest:
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise _FieldError(
                "max_completion_tokens", "give max_tokens or max_completion_tokens, not both"
            )
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str
    images: list[str] = Field(default_factory=list)  # extension: image URLs, marker order
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _neutral_completion(self) -> CompletionRequest:
        if self.echo:
            raise _FieldError("echo", "'echo' is not supported")
        if self.suffix:
            raise _FieldError("suffix", "'suffix' is not supported")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class _FieldError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def _as_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def parse_json(body: bytes) -> Any:
    """The request body as strict JSON (runtime.schema.parse_json: no NaN/Infinity, nesting
    too deep and integers past the digit limit refused), or a 400 saying where it is
    malformed."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 JSON") from None
    try:
        return strict_json(text, "the request body")
    except ValueError as e:
        raise APIError(400, str(e)) from None


def parse_request(model: type[_Sampling], data: Any) -> Any:
    """Validate `data` into `model`; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        ctx = err.get("ctx") or {}
        cause = ctx.get("error")
        if isinstance(cause, _FieldError):
            raise APIError(400, cause.message, param=cause.param) from None
        param = field_path(err["loc"])
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unsupported parameter '{param}'", param=param) from None
        if err["type"] == "missing":
            raise APIError(400, f"'{param}' is required", param=param) from None
        got = type(err.get("input")).__name__
        raise APIError(400, f"'{param}': {err['msg']} (got {got})", param=param) from None


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'; union-branch labels dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "list"):
            continue  # pydantic's name of a union member, not a field
        else:
            out += ("." if out else "") + part
    return out


# ------------------------------------------------------------------ responses


@dataclass
class ResponseIds:
    """id/created/model shared by a response and all its stream chunks."""

    kind: Literal["chat", "completion"]
    model: str
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def head(self, chunk: bool) -> dict[str, Any]:
        obj = self.object + (".chunk" if chunk and self.kind == "chat" else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def response(
    ids: ResponseIds, texts: list[str], reasons: list[str | None], usage_obj: dict[str, Any]
) -> dict[str, Any]:
    """The whole (non-streamed) chat.completion or text_completion object."""
    choices = []
    for i, (text, reason) in enumerate(zip(texts, reasons)):
        if ids.kind == "chat":
            body: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
        else:
            body = {"text": text}
        choices.append({"index": i, **body, "finish_reason": reason, "logprobs": None})
    return {**ids.head(False), "choices": choices, "usage": usage_obj}


def chunk(
    ids: ResponseIds,
    index: int,
    text: str | None = None,
    reason: str | None = None,
    role: bool = False,
) -> dict[str, Any]:
    """One stream chunk of one choice: a role announcement, a text delta, or its finish."""
    if ids.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
            delta["content"] = ""
        if text:
            delta["content"] = text
        body: dict[str, Any] = {"delta": delta}
    else:
        body = {"text": text or ""}
    choice = {"index": index, **body, "finish_reason": reason, "logprobs": None}
    return {**ids.head(True), "choices": [choice]}


def usage_chunk(ids: ResponseIds, usage_obj: dict[str, Any]) -> dict[str, Any]:
    """The final chunk `stream_options.include_usage` asks for: no choices, the usage."""
    return {**ids.head(True), "choices": [], "usage": usage_obj}


def models_list(model_id: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "flamingo-export"}
        ],
    }
