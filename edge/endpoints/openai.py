"""Route handlers: the OpenAI endpoints, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import falcon
import orjson

from edge.endpoints.body import (
    check_content_type,
    parse_json_object,
    read_body,
    validate_chat,
    validate_completion,
)
from edge.errors import ApiError, BadGateway, ServiceUnavailable, envelope
from edge.observability import metric_files
from edge.observability.context import RequestContext
from edge.ratelimit.tokens import CHAT, COMPLETION, Prompt, Reservation, ask_for_usage
from edge.server.disconnect import unless_client_leaves
from edge.upstream import mock
from edge.upstream.client import UpstreamResponse, relay
from edge.upstream.router import Router
from edge.upstream.stream import ResponseStream
from edge.upstream.usage_events import watch_usage

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime

log = logging.getLogger("edge.resources")

JSON = "application/json"
SSE = "text/event-stream"
_HEALTHY = orjson.dumps({"status": "ok"})
_ALIVE = orjson.dumps({"status": "alive"})
_READY = orjson.dumps({"status": "ready"})


class Completions:
    """POST /v1/chat/completions (chat=True) and POST /v1/completions (chat=False)."""

    def __init__(self, runtime: Runtime, chat: bool) -> None:
        self._runtime = runtime
        self._chat = chat
        self._path = "/chat/completions" if chat else "/completions"
        self._validate = validate_chat if chat else validate_completion

    async def on_post(self, req: Any, resp: Any) -> None:
        runtime = self._runtime
        body, data, ctx = await read_request(req, runtime, self._validate)
        model, stream = ctx.model, ctx.stream
        where = CHAT if self._chat else COMPLETION
        reservation = await reserve_tokens(runtime, ctx, resp, data, where)
        hide_usage = False
        if reservation is not None:
            hide_usage = stream and ask_for_usage(data)
            body = orjson.dumps(data)  # as estimated: see reserve_tokens
        async with refunded_on_error(reservation):
            if runtime.router is None:
                await self._mock(req, resp, data, ctx, reservation, hide_usage)
                return
            route, path = runtime.router, self._path
            await forward(req, resp, ctx, route, path, body, model, stream, reservation, hide_usage)

    async def _mock(
        self,
        req: Any,
        resp: Any,
        data: dict[str, Any],
        ctx: RequestContext,
        reservation: Reservation | None,
        hide_usage: bool,
    ) -> None:
        chat = self._chat
        if ctx.stream:
            prompt, completion, source = mock.stream(data, ctx.model, ctx.request_id, chat)
            ctx.prompt_tokens, ctx.completion_tokens = prompt, completion
            resp.content_type = SSE
            resp.set_header("cache-control", "no-cache")
            source = settled_stream(source, reservation, ctx, hide_usage)
            resp.stream = ResponseStream(source)
            return
        build = mock.chat if chat else mock.completion
        resp.data, ctx.prompt_tokens, ctx.completion_tokens = build(data, ctx.model, ctx.request_id)
        resp.content_type = JSON
        await settle_answer(reservation, ctx, 200)


async def read_request(
    req: Any, runtime: Runtime, validate: Callable[[dict[str, Any]], tuple[str | None, bool]]
) -> tuple[bytes, dict[str, Any], RequestContext]:
    """A POST's JSON body, read within MAX_REQUEST_SIZE and validated; what it asks for (model,
    stream) goes on the request context, and its size into the metrics."""
    check_content_type(req.content_type)
    body = await read_body(req, runtime.config.max_request_size)
    data = parse_json_object(body)
    ctx: RequestContext = req.context.edge
    ctx.model, ctx.stream = validate(data)
    if runtime.metrics is not None:
        runtime.metrics.observe_request_size(ctx.route.template, len(body))
    return body, data, ctx


async def reserve_tokens(
    runtime: Runtime, ctx: RequestContext, resp: Any, data: dict[str, Any], where: Prompt
) -> Reservation | None:
    """The request's token reservation (TPM), or None when no token limit applies.

    With a reservation, the caller forwards `data` re-serialised, as the estimate read it: the
    default output cap written in when the client set none, and a key the client sent twice
    resolved the way the gateway parsed it, so the upstream cannot read a larger cap.
    """
    if runtime.tokens is None:
        return None
    return await runtime.tokens.reserve(ctx, resp, data, where)


@contextlib.asynccontextmanager
async def refunded_on_error(reservation: Reservation | None) -> AsyncIterator[None]:
    """Give the whole reservation back when the request ends in an error answer before any
    generation (unknown model, every provider failing, a refused body); a client that hung up
    (499) keeps it, as an abandoned stream does."""
    try:
        yield
    except ApiError as exc:
        if reservation is not None and exc.status != 499:
            await reservation.settle(0)
        raise


async def settle_answer(reservation: Reservation | None, ctx: RequestContext, status: int) -> None:
    """Settle a token reservation on a complete answer: its usage when it is a success that
    reports one, nothing at all when the upstream answered an error (nothing was generated)."""
    if reservation is None:
        return
    if not 200 <= status < 300:
        await reservation.settle(0)
    elif ctx.prompt_tokens is not None or ctx.completion_tokens is not None:
        await reservation.settle((ctx.prompt_tokens or 0) + (ctx.completion_tokens or 0))


def settled_stream(
    source: AsyncIterator[bytes],
    reservation: Reservation | None,
    ctx: RequestContext,
    hide_usage: bool = False,
) -> AsyncIterator[bytes]:
    """`source`, settling the token reservation on the usage the stream reported. A usage chunk
    requested for the gateway's sake (`hide_usage`) is removed on the way. A stream that does
    not end (the client left, the upstream broke) keeps its reservation."""
    if reservation is None:
        return source
    if hide_usage:
        return watch_usage(source, reservation.settle_usage, True)
    return _settle_at_end(source, reservation, ctx)


async def answered_by_mock(resp: Any, reservation: Reservation | None, ctx: RequestContext) -> None:
    """The mock answered (`resp.stream`, an async iterator, or `resp.data`): settle the token
    reservation on the counts it reported, at the end of the stream or now."""
    if resp.stream is not None:
        resp.stream = ResponseStream(settled_stream(resp.stream, reservation, ctx))
    else:
        await settle_answer(reservation, ctx, 200)


async def _settle_at_end(
    source: AsyncIterator[bytes], reservation: Reservation, ctx: RequestContext
) -> AsyncIterator[bytes]:
    try:
        async for block in source:
            yield block
        await settle_answer(reservation, ctx, 200)  # the counts the relay's usage watcher saw
    finally:
        await source.aclose()  # type: ignore[attr-defined]  # closing this closes the relay


async def forward(
    req: Any,
    resp: Any,
    ctx: RequestContext,
    router: Router,
    path: str,
    body: bytes,
    model: str | None,
    stream: bool,
    reservation: Reservation | None = None,
    hide_usage: bool = False,
    kind: str = "openai",
    extra_headers: dict[str, str] | None = None,
    error_shape: Callable[[ApiError], bytes] | None = None,
) -> None:
    """Route `body` to the model's providers (failover before the first byte) and answer.

    `error_shape` renders an upstream error that had no JSON error body of its own (another
    API's envelope, e.g. Anthropic's on /v1/messages). A token `reservation` is settled on
    the answer's usage (a stream's usage event; hidden from the client when `hide_usage`).
    """
    result = await unless_client_leaves(
        req, router.forward(ctx, "POST", path, body, model, stream, kind, extra_headers)
    )
    if isinstance(result, UpstreamResponse):
        _send_upstream(resp, ctx, result)
        if error_shape is not None and resp.data is not result.body:
            error = ApiError(f"The upstream answered HTTP {result.status}.", status=resp.status)
            resp.data = error_shape(error)
        await settle_answer(reservation, ctx, result.status)
        return
    ctx.upstream_status = result.status
    resp.content_type = SSE
    resp.set_header("cache-control", "no-cache")
    resp.set_header("x-accel-buffering", "no")
    source = relay(result.resp, ctx, req.receive, _usage_watcher(ctx), result.first)
    resp.stream = stream = ResponseStream(settled_stream(source, reservation, ctx, hide_usage))
    # A generator closed before it started runs no `finally`: release the upstream here too.
    stream.on_close.append(lambda _: result.resp.close())


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

    Only blocks that mention usage are parsed, and only their `data:` line holding it. The
    relay hands over whole events only (edge.upstream.sse), so a usage event is never split.
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

    def __init__(self, runtime: Runtime) -> None:
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
        result = await unless_client_leaves(req, router.upstream.call("GET", "/models", None, ctx))
        _send_upstream(resp, ctx, result)

    on_head = on_get  # Falcon sends the head (with the GET's Content-Length) and no body


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llm-edge-proxy"}


class Health:
    """GET /health (overall), /health/live (the process answers), /health/ready (can serve)."""

    def __init__(self, runtime: Runtime) -> None:
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

    # HEAD answers as GET without a body (monitors use it): Falcon drops the body.
    on_head = on_get
    on_head_live = on_get_live
    on_head_ready = on_get_ready

    def _ready_or_503(self) -> None:
        if not self._runtime.ready:
            raise ServiceUnavailable("Not ready: the upstream session is not open.")
        router = self._runtime.router
        if router is not None and not router.can_serve():
            raise ServiceUnavailable("Not ready: no provider can serve any model.")


SCRAPE_LOCK_TIMEOUT_S = 2.0


class MetricsResource:
    """GET /metrics. Under gunicorn the scrape reads the multiprocess files under a shared lock,
    so the master's fold of a dead worker's files (exclusive) is never seen half done
    (edge/observability/metric_files.py). Waiting for the lock yields to the event loop."""

    def __init__(self, metrics: Any) -> None:
        self._metrics = metrics

    async def on_get(self, req: Any, resp: Any) -> None:
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not path:
            resp.data, resp.content_type = self._metrics.render()
            return
        try:
            fd = metric_files.open_lock(path)
        except OSError:
            log.error("cannot open the metrics lock file", extra={"directory": path})
            raise ServiceUnavailable("Metrics are unavailable: see the service log.") from None
        try:
            deadline = time.monotonic() + SCRAPE_LOCK_TIMEOUT_S
            while not metric_files.try_lock(fd, exclusive=False):
                if time.monotonic() >= deadline:
                    raise ServiceUnavailable("Metrics are being compacted; retry the scrape.")
                await asyncio.sleep(0.002)
            resp.data, resp.content_type = self._metrics.render()
        finally:
            os.close(fd)  # releases the lock

    on_head = on_get


class SwitchedOff:
    """A route turned off by configuration (/metrics with ENABLE_METRICS=false): 404 for GET."""

    async def on_get(self, req: Any, resp: Any) -> None:
        raise falcon.HTTPRouteNotFound()

    on_head = on_get
