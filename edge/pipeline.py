"""One request's way through Layer 2, once its endpoint has read and validated the body.

    endpoint (edge.endpoints): the body read and validated, a `Call` built
      → [the response cache plugs in here: the lookup, and the coalescing of identical calls,
         before any token is reserved, since a hit costs none]
      → token limit: reserve the estimate (edge.ratelimit.tokens)
      → router (edge.routing.router): targets, breakers, failover before the first byte; the
        adapters that translate between the client's API and a provider of another kind plug
        in between the router and the transport (edge.upstream.client)
      ← one exchange: a whole answer, or whole events that report their verdict when they end
      → settle the reservation to the usage reported (edge.usage); the response written

`run` is that path; the endpoints call nothing else of Layer 2 but `Router.targets` (which
model a GET /v1/models/{id} names).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import orjson

from edge import usage
from edge.errors import UPSTREAM, ApiError
from edge.observability.context import RequestContext
from edge.ratelimit.tokens import Prompt, Reservation, ask_for_usage
from edge.routing.exchange import Answer, Call, Events
from edge.server.disconnect import Receive, close_on_hang_up, unless_client_leaves

if TYPE_CHECKING:  # the pipeline runs on the worker's Runtime
    from edge.runtime import Runtime

JSON = "application/json"
SSE = "text/event-stream"


async def run(
    runtime: Runtime, req: Any, resp: Any, call: Call, prompt: Prompt | None = None
) -> None:
    """Answer `call` into `resp`. `prompt` says where the request's prompt is, for the token
    limit; None: no token limit applies (moderations, the model list)."""
    ctx: RequestContext = req.context.edge
    reservation = None
    hide_usage = False
    if prompt is not None and runtime.tokens is not None and call.data is not None:
        reservation = await runtime.tokens.reserve(ctx, resp, call.data, prompt)
        if reservation is not None:
            hide_usage = call.stream and prompt.asks_usage and ask_for_usage(call.data)
            # Forwarded as estimated: the default output cap written in when the client set
            # none, and a key the client sent twice resolved the way the gateway parsed it, so
            # the upstream cannot read a larger cap.
            call.body = orjson.dumps(call.data)
    if call.stream:
        call.on_event = usage.watcher(ctx)
    try:
        result = await unless_client_leaves(req, runtime.router.exchange(ctx, call))
        if isinstance(result, Events):
            _send_events(req, resp, ctx, result, reservation, hide_usage)
        else:
            _send_answer(resp, ctx, result, call.api)
            await settle_answer(reservation, ctx, result.status)
    except ApiError as exc:
        await refund_on_error(reservation, exc)
        raise


def _send_answer(resp: Any, ctx: RequestContext, answer: Answer, shape: str) -> None:
    """Pass a whole answer on: status, body, content type, retry headers. A success (judged a
    JSON object by the router) gives its usage to the request; an error passes through when it
    is a JSON error, and is wrapped in the client API's error shape otherwise."""
    status = answer.status
    body = answer.body
    data = answer.data
    if data is None:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
    resp.status = status if 200 <= status <= 599 else 502
    if 200 <= status < 300:
        usage.record(ctx, data.get("usage"))
        resp.content_type = answer.content_type
    elif isinstance(data, dict) and isinstance(data.get("error"), dict):
        resp.content_type = answer.content_type
    else:
        error = ApiError(
            f"The upstream answered HTTP {status}.", status=resp.status, type_=UPSTREAM
        )
        body = error.body(shape)
        resp.content_type = JSON
    resp.data = body
    for name, value in answer.headers.items():
        resp.set_header(name, value)


def _send_events(
    req: Any,
    resp: Any,
    ctx: RequestContext,
    events: Events,
    reservation: Reservation | None,
    hide_usage: bool,
) -> None:
    """Relay a stream: its events go out as they come, the reservation is settled at its end,
    and a client that hangs up aborts it (ResponseStream)."""
    if events.usage is not None:
        usage.record(ctx, events.usage)
    resp.content_type = SSE
    resp.set_header("cache-control", "no-cache")
    resp.set_header("x-accel-buffering", "no")
    source = settled_stream(events, reservation, ctx, hide_usage)
    resp.stream = ResponseStream(source, events, req.receive)


async def refund_on_error(reservation: Reservation | None, exc: ApiError) -> None:
    """Give the whole reservation back when the request ends in an error answer before any
    generation (unknown model, every provider failing, a refused body); a client that hung up
    (499) keeps it, as an abandoned stream does."""
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
    events: Events, reservation: Reservation | None, ctx: RequestContext, hide_usage: bool
) -> AsyncIterator[bytes]:
    """The stream's events, settling the token reservation on the usage the stream reported.
    A usage chunk requested for the gateway's sake (`hide_usage`) is removed on the way. A
    stream that does not end (the client left, the upstream broke) keeps its reservation."""
    source = aiter(events)
    if reservation is None:
        return source
    if hide_usage:
        return usage.watch_usage(source, reservation.settle_usage, True)
    return _settle_at_end(source, reservation, ctx)


async def _settle_at_end(
    source: Any, reservation: Reservation, ctx: RequestContext
) -> AsyncIterator[bytes]:
    try:
        async for block in source:
            yield block
        await settle_answer(reservation, ctx, 200)  # the counts the usage watcher saw
    finally:
        await source.aclose()


class ResponseStream:
    """What `resp.stream` holds for a streamed answer.

    Falcon iterates it and then awaits its `close()` whatever happened (normal end, an error
    while sending), so the upstream response is released and the access-log line and stream
    metrics (`on_close`: edge.middleware) are written exactly once, when the last byte has gone
    out, not when the handler returned.

    Falcon does not watch the connection while it iterates, so the stream does: from its first
    event on, a client that hangs up (seen on the ASGI `receive` channel, under either worker:
    edge.server.disconnect) aborts the exchange's events at once, so no upstream work is left
    running for nobody.
    """

    __slots__ = (
        "_closed",
        "_events",
        "_receive",
        "_source",
        "_watcher",
        "first_chunk_at",
        "on_close",
    )

    def __init__(
        self,
        source: AsyncIterator[bytes],
        events: Any = None,
        receive: Receive | None = None,
    ) -> None:
        """`events` (edge.routing.exchange.Events) is aborted when the client hangs up
        (watched on `receive`) and closed with the stream."""
        self._source = source
        self._events = events
        self._receive = receive
        self._watcher: asyncio.Future[None] | None = None
        self._closed = False
        self.first_chunk_at: float | None = None
        self.on_close: list[Callable[[ResponseStream], None]] = []

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> bytes:
        if self.first_chunk_at is None and self._watcher is None and self._receive is not None:
            self._watcher = close_on_hang_up(self._receive, self._events.abort)
        chunk = await self._source.__anext__()
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter()
        return chunk

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        try:
            await self._source.aclose()  # type: ignore[attr-defined]
            if self._events is not None:
                await self._events.aclose()
        finally:
            for callback in self.on_close:
                callback(self)
