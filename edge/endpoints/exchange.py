"""One request's exchange, shared by every endpoint that forwards: read and validate the body,
reserve tokens (TPM), route to the providers or answer from the mock, pass the answer through or
relay the stream, settle the reservation on the usage reported."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import orjson

from edge.endpoints.body import (
    check_content_type,
    parse_json_object,
    read_body,
)
from edge.endpoints.stream import ResponseStream
from edge.errors import OPENAI, ApiError, BadGateway, envelope, stream_error_event
from edge.observability.context import RequestContext
from edge.ratelimit.tokens import Prompt, Reservation
from edge.routing.router import Router
from edge.server.disconnect import unless_client_leaves
from edge.upstream.client import UpstreamResponse, relay
from edge.usage import watch_usage

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime


JSON = "application/json"
SSE = "text/event-stream"


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


async def refund_on_error(reservation: Reservation | None, exc: ApiError) -> None:
    """Give the whole reservation back when the request ends in an error answer before any
    generation (unknown model, every provider failing, a refused body); a client that hung up
    (499) keeps it, as an abandoned stream does. Called from a handler's `except ApiError`
    (a `try` costs nothing on the way through, an `async with` two coroutine calls)."""
    if reservation is not None and exc.status != 499:
        await reservation.settle(0)


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
    error_shape: str = OPENAI,
) -> None:
    """Route `body` to the model's providers (failover before the first byte) and answer.

    `error_shape` (edge.errors: OPENAI, ANTHROPIC) is the shape of an upstream error that had
    no JSON error body of its own, and of the error event that ends a stream broken mid-way.
    A token `reservation` is settled on the answer's usage (a stream's usage event; hidden
    from the client when `hide_usage`). A stream's end is reported to the
    provider's breaker (`Router.stream_ended`).
    """
    result = await unless_client_leaves(
        req, router.forward(ctx, "POST", path, body, model, stream, kind, extra_headers)
    )
    if isinstance(result, UpstreamResponse):
        send_upstream(resp, ctx, result)
        if error_shape != OPENAI and resp.data is not result.body:
            error = ApiError(f"The upstream answered HTTP {result.status}.", status=resp.status)
            resp.data = error.body(error_shape)
        await settle_answer(reservation, ctx, result.status)
        return
    resp.content_type = SSE
    resp.set_header("cache-control", "no-cache")
    resp.set_header("x-accel-buffering", "no")
    outcome = ctx.upstream
    assert outcome is not None  # recorded by the router

    def error_event(kind: str, message: str) -> bytes:
        return stream_error_event(kind, message, error_shape)

    provider = outcome.provider

    def ended(ok: bool) -> None:  # the provider's breaker gets the stream's verdict
        if provider is not None and not (ok and result.probe_reported):
            router.stream_ended(provider, ok, result.probe)

    source = relay(
        result.resp, outcome, req.receive, _usage_watcher(ctx), result.first, error_event, ended
    )
    resp.stream = stream = ResponseStream(settled_stream(source, reservation, ctx, hide_usage))
    # A generator closed before it started runs no `finally`: release the upstream here too.
    stream.on_close.append(lambda _: result.resp.close())


def send_upstream(resp: Any, ctx: RequestContext, result: UpstreamResponse) -> None:
    """Pass an upstream answer through: status, body, content type, retry headers.

    A success must be a JSON object (its `usage` feeds the token metrics); anything else is
    502 (and the request's upstream outcome `invalid`). An error passes through when it is
    JSON, and is wrapped in the envelope otherwise.
    """
    status = result.status
    body = result.body
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if 200 <= status < 300:
        if not isinstance(data, dict):
            outcome = ctx.upstream
            assert outcome is not None  # recorded by the router
            outcome.error = "invalid"
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
