"""Route handlers: the OpenAI endpoints, health and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson

from edge.endpoints.body import (
    check_content_type,
    parse_json_object,
    read_body,
    validate_chat,
    validate_completion,
)
from edge.errors import ApiError, BadGateway, ClientClosedRequest, ServiceUnavailable, envelope
from edge.observability.context import CANCEL_ON_DISCONNECT, CLIENT_GONE, RequestContext
from edge.upstream import mock
from edge.upstream.client import UpstreamResponse, relay
from edge.upstream.router import Router, prefixed
from edge.upstream.stream import ResponseStream

log = logging.getLogger("edge.resources")
T = TypeVar("T")

JSON = "application/json"
SSE = "text/event-stream"
_HEALTHY = orjson.dumps({"status": "ok"})
_ALIVE = orjson.dumps({"status": "alive"})
_READY = orjson.dumps({"status": "ready"})


class Completions:
    """POST /v1/chat/completions (chat=True) and POST /v1/completions (chat=False)."""

    def __init__(self, runtime: Any, chat: bool) -> None:
        self._runtime = runtime
        self._chat = chat
        self._path = "/chat/completions" if chat else "/completions"
        self._validate = validate_chat if chat else validate_completion
        self._max_body = runtime.config.max_request_size

    async def on_post(self, req: Any, resp: Any) -> None:
        check_content_type(req.content_type)
        body = await read_body(req, self._max_body)
        data = parse_json_object(body)
        model, stream = self._validate(data)
        ctx: RequestContext = req.context.edge
        ctx.model = model
        ctx.stream = stream
        runtime = self._runtime
        if runtime.metrics is not None:
            runtime.metrics.observe_request_size(req.path, len(body))
        if runtime.router is None:
            self._mock(req, resp, data, ctx)
            return
        await forward(req, resp, ctx, runtime.router, self._path, body, model, stream)

    def _mock(self, req: Any, resp: Any, data: dict[str, Any], ctx: RequestContext) -> None:
        chat = self._chat
        if ctx.stream:
            ctx.prompt_tokens, ctx.completion_tokens = mock.stream_usage(data, chat)
            resp.content_type = SSE
            resp.set_header("cache-control", "no-cache")
            resp.stream = ResponseStream(mock.stream(data, ctx.model, ctx.request_id, chat))
            return
        build = mock.chat if chat else mock.completion
        resp.data, ctx.prompt_tokens, ctx.completion_tokens = build(data, ctx.model, ctx.request_id)
        resp.content_type = JSON


async def _unless_client_leaves(req: Any, awaitable: Awaitable[T]) -> T:
    """Await an upstream exchange, ending it at once if the client hangs up meanwhile.

    edge.server.protocol cancels the task registered here when the connection drops (see
    CANCEL_ON_DISCONNECT); the cancellation becomes ClientClosedRequest, so the request is
    still finished, logged and counted like any other. Without this, a hung-up request would
    keep its upstream call and its concurrency slot until SERVER_TIMEOUT_SECONDS.
    """
    scope = req.scope
    task = asyncio.current_task()
    scope[CANCEL_ON_DISCONNECT] = task
    try:
        return await awaitable
    except asyncio.CancelledError:
        if not scope.get(CLIENT_GONE) or task is None:
            raise
        task.uncancel()
        raise ClientClosedRequest("The client closed the connection.") from None
    finally:
        del scope[CANCEL_ON_DISCONNECT]


async def forward(
    req: Any,
    resp: Any,
    ctx: RequestContext,
    router: Router,
    path: str,
    body: bytes,
    model: str | None,
    stream: bool,
    kind: str = "openai",
    extra_headers: dict[str, str] | None = None,
    error_shape: Callable[[ApiError], bytes] | None = None,
) -> None:
    """Route `body` to the model's providers (failover before the first byte) and answer.

    `error_shape` renders an upstream error that had no JSON error body of its own (another
    API's envelope, e.g. Anthropic's on /v1/messages).
    """
    result = await _unless_client_leaves(
        req, router.forward(ctx, "POST", path, body, model, stream, kind, extra_headers)
    )
    if isinstance(result, UpstreamResponse):
        _send_upstream(resp, ctx, result)
        if error_shape is not None and resp.data is not result.body:
            error = ApiError(f"The upstream answered HTTP {result.status}.", status=resp.status)
            resp.data = error_shape(error)
        return
    ctx.upstream_status = result.status
    resp.content_type = SSE
    resp.set_header("cache-control", "no-cache")
    resp.set_header("x-accel-buffering", "no")
    watch = _usage_watcher(ctx)
    watch(result.first)
    resp.stream = ResponseStream(
        prefixed(result.first, relay(result.resp, ctx, req.receive, watch))
    )


def _send_upstream(resp: Any, ctx: RequestContext, result: UpstreamResponse) -> None:
    """Pass an upstream answer through: status, body, content type, retry headers.

    A success must be a JSON object (its `usage` feeds the token metrics); anything else is
    502. An error passes through when it is JSON, and is wrapped in the envelope otherwise.
    """
    ctx.upstream_status = status = result.status
    body = result.body
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if 200 <= status < 300:
        if not isinstance(data, dict):
            ctx.upstream_error = "invalid"
            raise BadGateway("The upstream sent a response that is not a JSON object.")
        _record_usage(ctx, data.get("usage"))
        resp.content_type = result.content_type
    elif isinstance(data, dict) and isinstance(data.get("error"), dict):
        resp.content_type = result.content_type
    else:
        body = envelope(f"The upstream answered HTTP {status}.", "upstream_error", None, None)
        resp.content_type = JSON
    resp.status = status if 200 <= status <= 599 else 502
    resp.data = body
    for name, value in result.headers.items():
        resp.set_header(name, value)


def _record_usage(ctx: RequestContext, usage: Any) -> None:
    """Token counts from `usage`: OpenAI's prompt/completion_tokens, or the input/output_tokens
    of the Responses and Anthropic Messages APIs. A count absent here keeps its earlier value
    (Anthropic streams input tokens first and output tokens at the end)."""
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(prompt, int) and not isinstance(prompt, bool):
            ctx.prompt_tokens = prompt
        if isinstance(completion, int) and not isinstance(completion, bool):
            ctx.completion_tokens = completion


def _usage_watcher(ctx: RequestContext) -> Any:
    """Pick `usage` out of a relayed stream (sent when stream_options.include_usage is set).

    Only chunks that mention usage are parsed, and only their `data:` line holding it; an
    event split across two reads is missed, which costs a log field, never the stream.
    """

    def on_chunk(chunk: bytes) -> None:
        # Every data line that mentions usage (several events may share one read: Anthropic's
        # message_start and message_delta, the Responses API's created and completed).
        at = chunk.find(b'"usage"')
        while at >= 0:
            start = chunk.rfind(b"data:", 0, at)
            end = chunk.find(b"\n", at)
            end = end if end >= 0 else len(chunk)
            if start >= 0:
                _usage_from_line(ctx, chunk[start + 5 : end])
            at = chunk.find(b'"usage"', end)

    return on_chunk


def _usage_from_line(ctx: RequestContext, line: bytes) -> None:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return
    if isinstance(event, dict):
        _record_usage(ctx, event.get("usage"))
        for holder in ("response", "message"):  # Responses API, Anthropic message_start
            inner = event.get(holder)
            if isinstance(inner, dict):
                _record_usage(ctx, inner.get("usage"))


class Models:
    """GET /v1/models: the configured model names with PROVIDERS_FILE, else the upstream's."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime

    async def on_get(self, req: Any, resp: Any) -> None:
        router = self._runtime.router
        if router is None:
            resp.data = mock.models()
            resp.content_type = JSON
            return
        if router.providers.from_file:
            names = router.providers.model_names()
            resp.data = orjson.dumps({"object": "list", "data": [model_object(n) for n in names]})
            resp.content_type = JSON
            return
        ctx = req.context.edge
        result = await _unless_client_leaves(req, router.upstream.call("GET", "/models", None, ctx))
        _send_upstream(resp, ctx, result)


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llm-edge-proxy"}


class Health:
    """GET /health (overall), /health/live (the process answers), /health/ready (can serve)."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime

    async def on_get(self, req: Any, resp: Any) -> None:
        self._ready_or_503()
        router = self._runtime.router
        if router is not None and router.providers.from_file:
            resp.data = orjson.dumps({"status": "ok", "providers": router.states()})
        else:
            resp.data = _HEALTHY
        resp.content_type = JSON

    async def on_get_live(self, req: Any, resp: Any) -> None:
        resp.data = _ALIVE
        resp.content_type = JSON

    async def on_get_ready(self, req: Any, resp: Any) -> None:
        self._ready_or_503()
        resp.data = _READY
        resp.content_type = JSON

    def _ready_or_503(self) -> None:
        if not self._runtime.ready:
            raise ServiceUnavailable("Not ready: the upstream session is not open.")
        router = self._runtime.router
        if router is not None and not router.can_serve():
            raise ServiceUnavailable("Not ready: no provider can serve any model.")


class MetricsResource:
    def __init__(self, metrics: Any) -> None:
        self._metrics = metrics

    async def on_get(self, req: Any, resp: Any) -> None:
        resp.data, resp.content_type = self._metrics.render()
