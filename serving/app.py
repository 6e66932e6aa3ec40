"""The FastAPI app: OpenAI-compatible routes over an engine (local) or engine replicas (Ray).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (200 once
the engines are loaded, 503 before), GET /metrics (Prometheus text). With an API key, every
/v1 route needs `Authorization: Bearer KEY` (401 otherwise); /health and /metrics stay open.
Every error is OpenAI's error object (`protocol.APIError`); bodies over the limit get 413.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.prompts import EOC_TOKEN

from . import protocol
from .chat import affinity_key, chat_to_prompt
from .engine import Event, GenerateRequest, SamplingParams
from .media import MediaImage, MediaLimits, MediaReader
from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("serving.app")


class Backend(Protocol):
    """What the app needs of the inference side (serving.engine.Engine, or Ray replicas)."""

    @property
    def ready(self) -> bool: ...

    @property
    def load_error(self) -> str | None: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[Event]: ...


@dataclass(frozen=True)
class AppSettings:
    """The HTTP side's settings; ValueError naming the setting for one that cannot work."""

    model_id: str
    api_key: str | None = None
    allowed_media_dir: Path | None = None
    max_body_bytes: int = 16 << 20  # also the largest file a file:// URL may name
    max_request_pixels: int = 64 << 20  # decoded pixels of one request's images
    # what ends a chat demonstration: the export's (serving.server.end_of_chunk)
    end_of_chunk: str = EOC_TOKEN

    def __post_init__(self) -> None:
        if self.api_key is not None:
            check_api_key(self.api_key)
        for name in ("max_body_bytes", "max_request_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def media_limits(self) -> MediaLimits:
        return MediaLimits(self.allowed_media_dir, self.max_body_bytes, self.max_request_pixels)


def check_api_key(key: str) -> None:
    """ValueError unless `key` can be sent in `Authorization: Bearer KEY`: non-empty printable
    ASCII without surrounding whitespace (an HTTP client cannot send other bytes as they are,
    and the header's value is stripped, so any other key could never match)."""
    if not key:
        raise ValueError("the API key is empty (it would turn authentication off)")
    if not (key.isascii() and key.isprintable()):
        raise ValueError("the API key must be printable ASCII (it travels in an HTTP header)")
    if key != key.strip():
        raise ValueError("the API key must not start or end with whitespace")


# API field names of the engine's logical ones, per endpoint
_PARAMS = {
    "chat": {"prompt": "messages", "images": "messages"},
    "completion": {"prompt": "prompt", "images": "images"},
}


def create_app(
    backend: Backend,
    settings: AppSettings,
    *,
    startup: Callable[[], Any] | None = None,
    shutdown: Callable[[], Any] | None = None,
    engine_stats: Callable[[], dict[str, Any] | None] | None = None,
) -> FastAPI:
    """The server's ASGI app. `startup`/`shutdown` run in its lifespan (e.g. load the engine
    in the background); `engine_stats` adds the local engine's counters to /metrics."""
    metrics = Metrics(engine_stats)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if startup is not None:
            startup()
        yield
        if shutdown is not None:
            shutdown()

    app = FastAPI(
        title="flamingo-export", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(APIError(500, "internal server error").body(), status_code=500)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                code="invalid_api_key",
            )

    def require_ready() -> None:
        if not backend.ready:
            raise APIError(503, backend.load_error or "the model is still loading")

    @app.get("/health")
    async def health() -> JSONResponse:
        if backend.ready:
            return JSONResponse({"status": "ok", "model": settings.model_id})
        error = backend.load_error
        body = {"status": "error" if error else "loading", "error": error}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(protocol.models_list(settings.model_id, created))

    media_limits = settings.media_limits()

    # Parsing, image decoding and hashing run on a worker thread: a large body or image never
    # stalls the event loop (Pillow and json release it only partly, but other requests go on).
    # The engine tokenizes on a worker thread too.
    def read_chat(body: bytes) -> tuple[Any, GenerateRequest]:
        req = protocol.parse_request(protocol.ChatCompletionRequest, protocol.parse_json(body))
        reader = MediaReader(media_limits)
        prompt, images = chat_to_prompt(req.messages, reader.load, settings.end_of_chunk)
        return req, request_of(req, prompt, images, settings.end_of_chunk)

    def read_completion(body: bytes) -> tuple[Any, GenerateRequest]:
        req = protocol.parse_request(protocol.CompletionRequest, protocol.parse_json(body))
        reader = MediaReader(media_limits)
        images = [reader.load(url, f"images[{i}]") for i, url in enumerate(req.images)]
        return req, request_of(req, req.prompt, images)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req, gen_req = await run_in_threadpool(read_chat, await request.body())
        return await generate("chat", req, gen_req)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req, gen_req = await run_in_threadpool(read_completion, await request.body())
        return await generate("completion", req, gen_req)

    async def generate(kind: str, req: Any, gen_req: GenerateRequest) -> Response:
        require_ready()
        start = time.perf_counter()
        events = backend.generate(gen_req).__aiter__()
        first = await events.__anext__()
        if first["type"] == "error":
            await events.aclose()
            param = _PARAMS[kind].get(first.get("param") or "", first.get("param"))
            raise APIError(first["status"], first["message"], param=param)
        ids = protocol.ResponseIds(kind, settings.model_id)  # type: ignore[arg-type]
        headers = {"x-flamingo-replica": str(first.get("replica", ""))}
        tracker = _Tracker(metrics, start)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _sse(events, ids, req.n, include_usage, tracker)
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        texts = [""] * req.n
        reasons: list[str | None] = [None] * req.n
        usage: dict[str, Any] = {}
        try:
            async for event in events:
                tracker.see(event)
                kind_ = event["type"]
                if kind_ == "text":
                    texts[event["choice"]] += event["text"]
                elif kind_ == "finish":
                    reasons[event["choice"]] = event["finish_reason"]
                elif kind_ == "usage":
                    usage = _usage(event)
                elif kind_ == "error":
                    raise APIError(event["status"], event["message"], param=event.get("param"))
        finally:
            tracker.close()
            await events.aclose()
        return JSONResponse(protocol.response(ids, texts, reasons, usage), headers=headers)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)
    return app


def request_of(
    req: Any, prompt: str, images: list[MediaImage], end_of_chunk: str = EOC_TOKEN
) -> GenerateRequest:
    """The engine's request of a parsed API request (`end_of_chunk`: the export's end of a
    demonstration, for the affinity key)."""
    params = SamplingParams(
        max_tokens=req.max_new_tokens(),
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        n=req.n,
        num_beams=req.num_beams,
        stop=tuple(req.stops()),
        ignore_eos=req.ignore_eos,
    )
    key = affinity_key(prompt, [m.data for m in images], end_of_chunk)
    return GenerateRequest(prompt, [m.image for m in images], params, key)


class _Tracker:
    """Queue depth, time to first token, latency and token counts of one request."""

    def __init__(self, metrics: Metrics, start: float) -> None:
        self.metrics = metrics
        self.start = start
        self.waiting = True
        self.first_text = False
        metrics.queue_depth.inc()

    def see(self, event: Event) -> None:
        kind = event["type"]
        if kind == "started" and self.waiting:
            self.waiting = False
            self.metrics.queue_depth.dec()
        elif kind == "text" and not self.first_text:
            self.first_text = True
            self.metrics.ttft.observe(time.perf_counter() - self.start)
        elif kind == "usage":
            self.metrics.usage(
                event["prompt_tokens"], event["cached_tokens"], event["completion_tokens"]
            )
            self.metrics.latency.observe(time.perf_counter() - self.start)

    def close(self) -> None:
        if self.waiting:
            self.waiting = False
            self.metrics.queue_depth.dec()


def _usage(event: Event) -> dict[str, Any]:
    return protocol.usage(
        event["prompt_tokens"], event["completion_tokens"], event["cached_tokens"]
    )


async def _sse(
    events: AsyncIterator[Event],
    ids: protocol.ResponseIds,
    n: int,
    include_usage: bool,
    tracker: _Tracker,
) -> AsyncIterator[bytes]:
    """OpenAI's stream: a role chunk per choice, text deltas, finish chunks, [the usage chunk],
    `data: [DONE]`. Closing it (client gone) closes `events`, which cancels the rows."""
    try:
        if ids.kind == "chat":
            for i in range(n):
                yield _data(protocol.chunk(ids, i, role=True))
        async for event in events:
            tracker.see(event)
            kind = event["type"]
            if kind == "text":
                yield _data(protocol.chunk(ids, event["choice"], text=event["text"]))
            elif kind == "finish":
                yield _data(protocol.chunk(ids, event["choice"], reason=event["finish_reason"]))
            elif kind == "usage" and include_usage:
                yield _data(protocol.usage_chunk(ids, _usage(event)))
            elif kind == "error":
                yield _data(APIError(event["status"], event["message"]).body())
                return
        yield b"data: [DONE]\n\n"
    finally:
        tracker.close()
        await events.aclose()  # type: ignore[attr-defined]


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for a request body over `max_bytes` (declared Content-Length or counted)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watch)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        mb = self.max_bytes / (1 << 20)
        body = json.dumps(
            APIError(413, f"request body over the limit of {mb:g} MB (--max-body-mb)").body()
        ).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


class CountRequests:
    """flamingo_requests_total by endpoint, flamingo_request_errors_total by status."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        self.metrics.requests.labels(path if path in self.ENDPOINTS else "other").inc()

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.errors.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, watch)
