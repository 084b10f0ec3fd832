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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from edge import cost, usage
from edge.cache.answers import SERVED
from edge.errors import ANTHROPIC, UPSTREAM, ApiError, BadRequest
from edge.observability.context import RequestContext
from edge.ratelimit.tokens import Prompt, Reservation, ask_for_usage
from edge.routing.exchange import Answer, Call, Events
from edge.server.disconnect import Receive, close_on_hang_up, unless_client_leaves

if TYPE_CHECKING:  # the pipeline runs on the worker's Runtime
    from edge.runtime import Runtime

JSON = "application/json"
SSE = "text/event-stream"
BUDGET_HELD = "edge.budget_held"  # ASGI scope: the RequestContext of a request holding a budget


async def run(
    runtime: Runtime, req: Any, resp: Any, call: Call, prompt: Prompt | None = None
) -> None:
    """Answer `call` into `resp`. `prompt` says where the request's prompt and output caps
    are, for the token limit; None: no token limit applies (moderations, the model list)."""
    span = req.context.edge.span
    if span is not None:  # a sampled request: what its spans say of the call
        span.request(call)
    cache = runtime.cache
    if cache is None or call.data is None or not cache.applies(call):
        await _exchange(runtime, req, resp, call, prompt, None)
        return
    ctx: RequestContext = req.context.edge
    had_controls = "cache" in call.data
    lookup = await unless_client_leaves(
        req, cache.lookup(ctx, call, req.get_header("cache-control"))
    )
    ctx.cache = lookup.result
    resp.set_header("x-cache", lookup.header)
    if lookup.entry is not None:
        _send_hit(resp, ctx, cache, lookup.entry)
        return
    if had_controls:  # the body's cache controls never go upstream
        call.body = reserialise(call.data)
    relayed = False
    try:
        relayed = await _exchange(runtime, req, resp, call, prompt, lookup)
    finally:
        if relayed and isinstance(resp.stream, ResponseStream):
            # A stream is stored as its client reads it: its leadership ends with it.
            resp.stream.on_close.append(lambda _: cache.done(lookup))
        else:  # a whole answer was stored (or not) already, whatever its client does
            cache.done(lookup)


async def _exchange(
    runtime: Runtime, req: Any, resp: Any, call: Call, prompt: Prompt | None, lookup: Any
) -> bool:
    """The exchange of a request the cache did not answer (`lookup`: its cache lookup, None
    when the cache does not apply), settled and sent. True: a stream's events are being
    relayed."""
    ctx: RequestContext = req.context.edge
    reservation = None
    hide_usage = False
    entry = ctx.key
    if (
        entry is not None
        and entry.budget_usd is not None
        and call.model is not None  # listing models or files costs nothing
        and runtime.accounts is not None
    ):
        accounts = runtime.accounts  # the reservation is settled when the answer ends
        if accounts.asynchronous:
            capped = await accounts.hold_async(ctx, call, prompt)
        else:
            capped = accounts.hold(ctx, call, prompt)
        req.scope[BUDGET_HELD] = ctx  # settled by EdgeApp if its answer never ends
        if ctx.budget is not None and ctx.budget[3] and call.data is not None:
            # Forwarded as parsed and priced (a field sent twice as the gateway read it), with
            # the output cap the budget reserved for when it set none.
            call.body = reserialise(call.data)
            if capped and lookup is not None:
                lookup.store = False  # an answer cut at the cap is not everyone's answer
    if prompt is not None and call.data is not None:
        call.prompt = prompt
        if runtime.tokens is not None:
            size = len(call.body or b"")
            reservation = await runtime.tokens.reserve(ctx, resp, size, call.data, prompt)
        if reservation is not None:
            hide_usage = call.stream and prompt.asks_usage and ask_for_usage(call.data)
            # Forwarded as parsed: a key the client sent twice is resolved the way the gateway
            # read it, so the upstream cannot read a larger cap than was estimated.
            call.body = reserialise(call.data)
            call.charge = reservation.take_more
        elif (
            call.stream
            and prompt.asks_usage
            and runtime.router.providers.priced_model(call.model or "")
        ):
            # A priced model's stream is costed from its usage: asked for, and hidden from a
            # client that did not ask, as under a token limit.
            hide_usage = ask_for_usage(call.data)
            if hide_usage:
                call.body = reserialise(call.data)
    if ctx.budget is not None and ctx.budget[3]:
        call.charge = _charging(call.charge, runtime.accounts, ctx)
    if call.stream:
        call.on_event = usage.watcher(ctx)
        if ctx.span is not None:
            call.on_event = ctx.span.watching(call.on_event)
    try:
        result = await unless_client_leaves(req, runtime.router.exchange(ctx, call))
    except ApiError:
        if reservation is not None:  # tokens back only for what provably did no work
            await reservation.settle(_working(ctx, 0) * reservation.estimate)
        raise
    if isinstance(result, Events):
        recorder = None
        if lookup is not None and lookup.store:
            recorder = runtime.cache.recorder(lookup, ctx)
        _send_events(req, resp, ctx, result, reservation, hide_usage, recorder)
        return True
    sent_in_pieces = _send_answer(resp, ctx, result, call)  # usage recorded on ctx
    if lookup is not None and lookup.store and result.status == 200:
        fresh = [result.body]
        runtime.cache.store(lookup, runtime.cache.new_entry(result.content_type, False, fresh, ctx))
    if not sent_in_pieces:
        result.release()
    if reservation is not None:
        await reservation.settle(_used(reservation, ctx, 200 <= result.status < 300))
    return False


def _charging(
    tokens: Callable[[], Awaitable[None]] | None, accounts: Any, ctx: RequestContext
) -> Callable[[], Awaitable[None]]:
    """`Call.charge` for a request holding a budget: another reservation of the budget (and
    another token estimate, under a token limit) for each attempt a failover may add."""

    async def charge() -> None:
        if tokens is not None:
            await tokens()
        await accounts.take_more(ctx)

    return charge


def _send_hit(resp: Any, ctx: RequestContext, cache: Any, found: Any) -> None:
    """A stored answer, its bytes exactly as first sent: a whole body, or a stream's events
    replayed as they were relayed, each block whole, at once."""
    if found.prompt_tokens or found.completion_tokens:
        ctx.prompt_tokens, ctx.completion_tokens = found.prompt_tokens, found.completion_tokens
    resp.status = found.status
    resp.content_type = found.content_type
    resp.set_header("age", str(cache.age(found)))
    resp.set_header("x-edge-cost-usd", cost.header_value(0.0))  # no provider was paid
    if not found.stream:
        resp.data = found.blocks[0]
        return
    resp.set_header("cache-control", "no-cache")
    resp.set_header("x-accel-buffering", "no")
    resp.stream = ResponseStream(_replay(found.blocks))


async def _replay(blocks: list[bytes]) -> AsyncGenerator[bytes, None]:
    for block in blocks:
        yield block


MAX_RESERIALISED_DEPTH = 254  # orjson.dumps's own limit (its loads takes 1024)


def reserialise(data: dict[str, Any]) -> bytes:
    """`data` as JSON bytes, or 400 for a body nested deeper than orjson writes."""
    try:
        return orjson.dumps(data)
    except TypeError:  # orjson: "Recursion limit reached"
        raise BadRequest(
            f"The request body is nested too deeply: at most {MAX_RESERIALISED_DEPTH} levels "
            "when the gateway re-writes it (under a token limit, or to take out cache controls)."
        ) from None


def request_cost(ctx: RequestContext) -> float | None:
    """What the request cost (edge.cost): its usage at the answering target's prices; 0 for
    an answer from the response cache."""
    outcome = ctx.upstream
    return cost.of_request(
        None if outcome is None else outcome.price,
        ctx.prompt_tokens,
        ctx.completion_tokens,
        ctx.cached_tokens,
        ctx.cache in SERVED,
    )


def _working(ctx: RequestContext, mock: int) -> int:
    """Attempts the upstream may bill for this request (the built-in mock: `mock`)."""
    outcome = ctx.upstream
    return mock if outcome is None else outcome.working


def _reported(ctx: RequestContext) -> int | None:
    if ctx.prompt_tokens is None and ctx.completion_tokens is None:
        return None
    return (ctx.prompt_tokens or 0) + (ctx.completion_tokens or 0)


def _used(reservation: Reservation, ctx: RequestContext, answered: bool) -> int:
    """What the request is settled to (edge.ratelimit.tokens): a success's reported usage
    (else its estimate), plus an estimate for each other attempt the upstream may bill; an
    error answer only those."""
    estimate = reservation.estimate
    if not answered:
        return _working(ctx, 0) * estimate
    reported = _reported(ctx)
    return (estimate if reported is None else reported) + (_working(ctx, 1) - 1) * estimate


def _send_answer(resp: Any, ctx: RequestContext, answer: Answer, call: Call) -> bool:
    """Pass a whole answer on: status, body, content type, retry headers. A success (judged a
    JSON object by the router, unless the call is `raw`) gives its usage to the request when
    it is the request's own (`Call.metered`); an error passes on only the fields of its error
    envelope (`_error_envelope`).

    An answer over SEND_PIECE_BYTES is sent in pieces, each when the client took the last, so
    it holds its share of the buffer budget until its last byte is out: True then (the stream
    releases it), False when the caller may release it now."""
    status = answer.status
    body = answer.body
    data = answer.data
    if data is None and _parsable(answer, call):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
    resp.status = status if 200 <= status <= 599 else 502
    if 200 <= status < 300:
        if isinstance(data, dict):  # a raw answer may be anything (audio, text)
            if call.metered:
                usage.record(ctx, data.get("usage"))
                ctx.cost_usd = usd = request_cost(ctx)
                if usd is not None:
                    resp.set_header("x-edge-cost-usd", cost.header_value(usd))
            if ctx.span is not None:
                ctx.span.answer(data)
        resp.content_type = answer.content_type
    else:
        body = _error_envelope(data, resp.status, call.api)
        resp.content_type = JSON
    for name, value in answer.headers.items():
        resp.set_header(name, value)
    if len(body) <= SEND_PIECE_BYTES:
        resp.data = body
        return False
    resp.content_length = len(body)
    events = Events(_pieces(body), release=answer.release)
    resp.stream = ResponseStream(aiter(events), events)
    return True


SEND_PIECE_BYTES = 1 << 20


def _parsable(answer: Answer, call: Call) -> bool:
    """Whether to parse an answer the router did not: an error (for its envelope), or a raw
    success that says it is JSON and is small (a file's content may be 64 MiB of JSONL)."""
    if not call.raw or not 200 <= answer.status < 300:
        return True
    media = answer.content_type.partition(";")[0].strip().lower()
    return media == JSON and len(answer.body) <= SEND_PIECE_BYTES


MAX_ERROR_MESSAGE = 4096  # characters of an upstream error's message passed on


def _error_envelope(data: Any, status: int, shape: str) -> bytes:
    """An upstream error answer as the client sees it: the upstream's status and only the
    fields of its error envelope, `message`, `type`, `param` and `code` (Anthropic's: `type`
    and `message`), each a string (a number for `code`); anything else an upstream puts in an
    error (internal host names, stack traces, request echoes) is dropped. An answer without an
    envelope gets one saying the upstream's status."""
    error = data.get("error") if isinstance(data, dict) else None
    fields = error if isinstance(error, dict) else {}

    def text(name: str) -> str | None:
        value = fields.get(name)
        return value[:MAX_ERROR_MESSAGE] if isinstance(value, str) else None

    message = text("message") or f"The upstream answered HTTP {status}."
    kind = text("type")
    if shape == ANTHROPIC and kind:
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    code = fields.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        code = str(code)
    passed = ApiError(message, status=status, param=text("param"), type_=kind or UPSTREAM)
    passed.code = code if isinstance(code, str) else None
    return passed.body(shape)


async def _pieces(body: bytes) -> AsyncGenerator[bytes, None]:
    for start in range(0, len(body), SEND_PIECE_BYTES):
        yield body[start : start + SEND_PIECE_BYTES]


def _send_events(
    req: Any,
    resp: Any,
    ctx: RequestContext,
    events: Events,
    reservation: Reservation | None,
    hide_usage: bool,
    recorder: Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]] | None = None,
) -> None:
    """Relay a stream: its events go out as they come, the reservation is settled at its end,
    and a client that hangs up aborts it (ResponseStream). `recorder` (the cache's) sees the
    events as the client gets them."""
    if events.usage is not None:
        usage.record(ctx, events.usage)
    resp.content_type = events.content_type or SSE  # a raw stream's own (Call.raw: audio)
    resp.set_header("cache-control", "no-cache")
    resp.set_header("x-accel-buffering", "no")
    source = settled_stream(events, reservation, ctx, hide_usage, recorder)
    resp.stream = ResponseStream(source, events, req.receive)


def settled_stream(
    events: Events,
    reservation: Reservation | None,
    ctx: RequestContext,
    hide_usage: bool,
    recorder: Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]] | None = None,
) -> AsyncIterator[bytes]:
    """The stream's events, the usage chunk requested for the gateway's sake (`hide_usage`)
    removed, recorded for the cache, and the token reservation settled when the stream ends
    (`_settle_at_end`)."""
    source: Any = aiter(events)
    if hide_usage:
        source = usage.hide_usage_event(source)
    if recorder is not None:
        source = recorder(source)
    if reservation is None:
        return source if ctx.budget is None else _count_relayed(source, ctx)
    return _settle_at_end(source, reservation, ctx)


async def _count_relayed(source: Any, ctx: RequestContext) -> AsyncIterator[bytes]:
    """Relay `source`, counting its data lines into `ctx.relayed` (a budget's charge for a
    stream whose usage never arrives: edge.budgets.accounts)."""
    try:
        async for block in source:
            ctx.relayed += block.count(b"data:")
            yield block
    finally:
        await source.aclose()


async def _settle_at_end(
    source: Any, reservation: Reservation, ctx: RequestContext
) -> AsyncIterator[bytes]:
    """Relay `source`, then settle: a whole stream to its reported usage. One that did not end
    whole (the client left, the upstream broke), or reported none, keeps its reservation, or
    what it is seen to have used when that is larger: the input reported (else estimated) and
    at least an output token for each data line relayed (a client that hangs up just before
    the usage event read all the generation it is billed for)."""
    whole = False
    relayed = 0
    try:
        async for block in source:
            relayed += block.count(b"data:")
            yield block
        whole = ctx.upstream is None or ctx.upstream.error is None
    finally:
        ctx.relayed = relayed
        try:
            reported = _reported(ctx)
            if whole and reported is not None:
                first = reported
            else:
                seen = max(reservation.prompt, ctx.prompt_tokens or 0) + max(
                    relayed, ctx.completion_tokens or 0
                )
                first = max(reservation.estimate, seen)
            retried = max(1, _working(ctx, 1)) - 1
            await reservation.settle(first + retried * reservation.estimate)
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
        "ended",
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
        self.ended = False  # its source ran to its end (not cut short by either side)
        self.first_chunk_at: float | None = None
        self.on_close: list[Callable[[ResponseStream], None]] = []

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> bytes:
        if self.first_chunk_at is None and self._watcher is None and self._receive is not None:
            self._watcher = close_on_hang_up(self._receive, self._events.abort)
        try:
            chunk = await self._source.__anext__()
        except StopAsyncIteration:
            self.ended = True
            raise
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
