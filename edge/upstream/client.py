"""The transport: one connection pool per worker (edge.upstream.http1), whole answers and
SSE relay. It knows nothing of routing: the router (edge.routing.router) hands it a provider,
a path, a body and the headers to add, and gets an answer or a stream back.

What goes upstream is an allow-list, not a deny-list: the provider's key (edge.routing.
providers), the request id, the trace context, and only the headers the router passes on
(`extra`: for /v1/messages the client's `anthropic-version` and `anthropic-beta`, checked by
that endpoint). The client's Authorization, x-api-key and cookies therefore cannot reach the
upstream. Upstream URLs come from configuration only.

What an exchange came to (the time spent waiting on the upstream, a failure's kind, a refused
key's status) goes into the `UpstreamOutcome` the caller hands in (edge.routing.outcome),
never into the request context.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from edge.config import Config
from edge.errors import ApiError, BadGateway, GatewayTimeout, ServiceUnavailable
from edge.observability.context import RequestContext
from edge.upstream.http1 import (
    Budget,
    BufferFull,
    Connection,
    Disconnected,
    Origin,
    Pool,
    PoolBusy,
    ResponseTooLarge,
    UpstreamError,
    request_head,
)
from edge.upstream.sse import EventSplitter, EventTooLarge

if TYPE_CHECKING:  # filled here, owned by Layer 2
    from edge.routing.outcome import UpstreamOutcome

log = logging.getLogger("edge.upstream")

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# Upstream response headers passed back to the client (lower-case).
PASS_HEADERS = ("retry-after", "retry-after-ms", "openai-processing-ms", "openai-version")
# Upstream statuses that refuse the gateway's own credentials: never the client's fault.
REFUSED = frozenset((401, 403))
# Renders the SSE event that ends a stream broken mid-way: (error kind, message) -> bytes.
ErrorEvent = Callable[[str, str], bytes]
_METHODS = {"GET": b"GET", "POST": b"POST", "DELETE": b"DELETE"}


class UpstreamResponse:
    """A complete (non-streamed) upstream answer. `data` is its parsed JSON, once someone
    parsed it (the router, to judge it; the mock, which built it). An answer read from the
    upstream holds its size of the worker's buffer budget until it is released, at the latest
    when it is dropped."""

    __slots__ = ("_budget", "_held", "body", "content_type", "data", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str],
        data: Any = None,
        budget: tuple[Budget, int] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.data = data
        self._budget: Budget | None = None if budget is None else budget[0]
        self._held = 0 if budget is None else budget[1]

    def release(self) -> None:
        """Give the answer's bytes back to the worker's buffer budget (once)."""
        if self._held and self._budget is not None:
            self._budget.give(self._held)
            self._held = 0

    __del__ = release


class StreamResponse:
    """A live upstream event stream: `readany` what arrived (each read bounded by the
    upstream timeout), `close` to end it (the connection goes back to the pool only when the
    stream was read to its end)."""

    __slots__ = ("_conn", "_read_timeout_s", "aborted", "content_type", "status")

    def __init__(self, conn: Connection, read_timeout_s: float) -> None:
        self._conn: Connection | None = conn
        self._read_timeout_s = read_timeout_s
        self.status = conn.status
        self.content_type = conn.headers.get("content-type", "application/octet-stream")
        self.aborted = False  # the client hung up: how the stream ends is no provider's verdict

    async def readany(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise Disconnected("The stream was closed.")
        return await conn.readany(self._read_timeout_s)

    def close(self) -> None:
        """Done with the stream: its connection goes back to the pool if it was read to the
        end (once: after that the connection may serve another request)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.done()

    def abort(self) -> None:
        """End the stream now, never reusing its connection (a read waiting on it raises
        Disconnected): for a client hanging up while the relay may still be reading."""
        self.aborted = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class Upstream:
    """The worker's upstream connections: one pool per provider (edge.upstream.http1.Pool, at
    most UPSTREAM_POOL_SIZE connections each, so one provider's streams cannot starve
    another's), and one budget for the whole answers they hold (UPSTREAM_BUFFER_BYTES).

    `call` and `open_stream` go to a `provider` (edge.routing.providers.Provider: its base URL
    and key) within `timeout_s` (SERVER_TIMEOUT_SECONDS unless the router gives an attempt
    less). `ctx` gives the headers (request id, trace context); what the exchange came to goes
    into `outcome`.
    """

    def __init__(self, config: Config) -> None:
        self._timeout_s = config.timeout_s
        self._connect_timeout_s = config.upstream_connect_timeout_s
        self._pool_size = config.upstream_pool_size
        self.budget = Budget(config.upstream_buffer_bytes)
        # Each provider's pool, origin and fixed headers (content type, identity coding, its
        # key), made at its first request: providers are re-read on HUP only.
        self._providers: dict[Any, tuple[Pool, Origin, dict[str, str]]] = {}
        self._closed = True

    def _target(
        self, provider: Any, timeout_s: float | None, extra: dict[str, str] | None
    ) -> tuple[Pool, Origin, dict[str, str], float]:
        """Pool, origin, headers (a fresh dict: the caller adds to it) and timeout of one
        attempt."""
        found = self._providers.get(provider)
        if found is None:
            fixed = {"content-type": "application/json", "accept-encoding": "identity"}
            fixed.update(provider.auth_headers())
            pool = Pool(self._pool_size, budget=self.budget)
            found = self._providers[provider] = (pool, Origin(provider.base_url), fixed)
        pool, origin, fixed = found
        headers = {**fixed, **extra} if extra else fixed.copy()
        return pool, origin, headers, self._timeout_s if timeout_s is None else timeout_s

    @property
    def ready(self) -> bool:
        return not self._closed

    async def start(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for pool, _, _ in self._providers.values():
            await pool.close()

    def _headers(
        self, ctx: RequestContext, stream: bool, headers: dict[str, str]
    ) -> dict[str, str]:
        headers["x-request-id"] = ctx.request_id
        if ctx.traceparent_out:
            headers["traceparent"] = ctx.traceparent_out
            if ctx.tracestate:
                headers["tracestate"] = ctx.tracestate
        if stream:
            headers["accept"] = "text/event-stream"
        return headers

    async def _send(
        self,
        pool: Pool,
        origin: Origin,
        head: bytes,
        body: bytes | None,
        deadline: float,
        limit: int,
        outcome: UpstreamOutcome,
    ) -> Connection:
        """A connection with the request written and its answer (whole, or the head of a
        stream: `limit` 0) in by `deadline` (loop time): TimeoutError past it. Connecting is
        bounded by UPSTREAM_CONNECT_TIMEOUT_SECONDS too (ConnectFailed); a full pool refuses
        at once (PoolBusy). Once the request is written the outcome says so (the upstream may
        work, and bill, from then on), and an error status says it did not. A GET that finds
        its reused connection closed by the upstream before any answer is sent once more on
        another (idempotent: it cannot have been acted on twice)."""
        if self._closed:
            raise PoolBusy("The upstream connections are closed (the worker is stopping).")
        loop = asyncio.get_running_loop()
        data = head + body if body else head
        for retry in (False, True):
            # The retry goes to a new connection: the other idle ones are likely stale too.
            conn = None if retry else pool.idle_connection(origin.key())
            if conn is None:
                left = deadline - loop.time()
                if self._connect_timeout_s < left:
                    conn = await pool.acquire(origin, self._connect_timeout_s, retry)
                else:  # the attempt's own deadline comes first: 504, as for the answer
                    async with asyncio.timeout_at(deadline):
                        conn = await pool.acquire(origin, left + 1.0, retry)
            try:
                conn.send(data, limit)
                if not retry:
                    outcome.sent()
                await conn.wait(deadline)
                if conn.status >= 400:
                    outcome.declined()
            except Disconnected:
                conn.close()
                stale = conn.reused and not conn.received and head[:4] == b"GET "
                if retry or not stale or deadline - loop.time() < 0.001:
                    raise
                continue
            except BaseException:
                conn.close()
                raise
            return conn
        raise AssertionError("unreachable")  # pragma: no cover

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None,
        ctx: RequestContext,
        outcome: UpstreamOutcome,
        provider: Any,
        timeout_s: float | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> UpstreamResponse:
        """One upstream exchange read in full within SERVER_TIMEOUT_SECONDS.

        Timeouts become 504 and connection failures or unreadable responses 502, each with
        the OpenAI envelope; upstream HTTP errors are returned as they came, except 401 and 403
        (see `_refused`).
        """
        started = time.perf_counter()
        pool, origin, headers, seconds = self._target(provider, timeout_s, extra_headers)
        size = len(body) if body else 0
        headers = self._headers(ctx, False, headers)
        head = request_head(origin, _METHODS[method], path, headers, size)
        try:
            deadline = asyncio.get_running_loop().time() + seconds
            conn = await self._send(pool, origin, head, body, deadline, MAX_RESPONSE_BYTES, outcome)
            try:
                if conn.status in REFUSED:
                    raise _refused(outcome, conn.status)
                return _response(conn, pool.budget)
            finally:
                conn.done()
        except (TimeoutError, UpstreamError) as exc:
            raise _failure(outcome, exc, seconds) from None
        finally:
            outcome.waited(time.perf_counter() - started)

    async def open_stream(
        self,
        path: str,
        body: bytes,
        ctx: RequestContext,
        outcome: UpstreamOutcome,
        provider: Any,
        timeout_s: float | None = None,
        extra_headers: dict[str, str] | None = None,
        raw: bool = False,
        method: str = "POST",
    ) -> StreamResponse | UpstreamResponse:
        """Send a streaming request and wait (bounded) for the response head.

        Returns the live response when the upstream answered 200 with an event stream (`raw`:
        with any body, audio say, relayed by `relay_raw`), else the complete answer (an
        upstream error for a stream request is plain JSON).
        """
        started = time.perf_counter()
        pool, origin, headers, seconds = self._target(provider, timeout_s, extra_headers)
        headers = self._headers(ctx, not raw, headers)
        head = request_head(origin, _METHODS[method], path, headers, len(body))
        try:
            deadline = asyncio.get_running_loop().time() + seconds
            conn = await self._send(pool, origin, head, body, deadline, 0, outcome)
            content_type = conn.headers.get("content-type", "")
            if conn.status == 200 and (raw or content_type.startswith("text/event-stream")):
                return StreamResponse(conn, self._timeout_s)
            try:
                if conn.status in REFUSED:
                    raise _refused(outcome, conn.status)
                # Not a stream (an error, most often): the rest read whole, as `call` reads it.
                conn.collect(MAX_RESPONSE_BYTES)
                await conn.wait(deadline)
                return _response(conn, pool.budget)
            finally:
                conn.done()
        except (TimeoutError, UpstreamError) as exc:
            raise _failure(outcome, exc, seconds) from None
        finally:
            outcome.waited(time.perf_counter() - started)


def _failure(outcome: UpstreamOutcome, exc: Exception, seconds: float) -> ApiError:
    """What a failed exchange becomes: 504 for a timeout, 503 when the gateway is at one of
    its own limits (the provider's pool full, the buffer budget spent), 502 for anything
    else (an answer past MAX_RESPONSE_BYTES included)."""
    _forget_traceback(exc)
    if isinstance(exc, ResponseTooLarge):
        return BadGateway("The upstream response is too large.")
    if isinstance(exc, TimeoutError):
        return _timeout(outcome, seconds)
    if isinstance(exc, PoolBusy | BufferFull):
        outcome.failed(exc.kind)
        log.warning("upstream request refused here", extra={"error_kind": exc.kind})
        return ServiceUnavailable(
            "The gateway is at its limit of upstream connections or buffered answers; "
            "retry shortly.",
            code="gateway_busy",
            headers={"retry-after": "1"},
        )
    return _unreachable(outcome, exc)


async def relay(
    resp: StreamResponse,
    outcome: UpstreamOutcome,
    error_event: ErrorEvent,
    first: bytes = b"",
    on_chunk: Callable[[bytes], None] | None = None,
    on_end: Callable[[bool], None] | None = None,
) -> AsyncGenerator[bytes, None]:
    """Yield the upstream's SSE events as they complete; never buffer a whole stream.

    Each upstream read is cut at its last event boundary (edge.upstream.sse): the whole events
    it completed go out at once, as one block, byte for byte; an incomplete event waits for its
    end, bounded by MAX_EVENT_BYTES. So a client only ever sees whole events, and events that
    arrived in separate reads are never merged. `first` is what was read already (the router
    waits for a stream's first bytes before it gives up failing over). `on_chunk` sees each
    block as it goes out.

    Backpressure: the next upstream read happens only after the previous block was handed to
    the server, whose send waits while the client's socket is full. A client that hangs up
    aborts the stream (`StreamResponse.abort`, called from the response side: edge.pipeline's
    ResponseStream), which ends a pending read at once, so no orphaned upstream work remains.
    An upstream failure
    mid-stream (a broken connection, a stall, an end or an oversized event mid-event) drops the
    incomplete event and ends the stream with an SSE error event (`error_event`: in the client
    API's own shape), on an event boundary, instead of a hang. `on_end` learns how the stream
    ended: True when whole, False on such a failure (for the provider's breaker); a client
    hanging up is neither, and it is not called. The time spent waiting on reads and a
    failure's kind go into the request's `outcome`.
    """
    splitter = EventSplitter()
    clock = time.perf_counter
    try:
        while True:
            if first:
                chunk, first = first, b""
            else:
                started = clock()
                chunk = await resp.readany()
                outcome.waited(clock() - started)  # waiting on the upstream: not our overhead
                if not chunk:
                    break
            events = splitter.feed(chunk)
            if not events:
                continue
            block = events[0] if len(events) == 1 else b"".join(events)
            if on_chunk is not None:
                on_chunk(block)
            yield block
        if not splitter.pending:
            if on_end is not None:
                on_end(True)
        else:
            message = "The upstream's event stream ended in the middle of an event."
            yield _stream_failed(
                outcome,
                error_event,
                on_end,
                "invalid",
                "ended mid-event",
                splitter.pending,
                message,
            )
    except (UpstreamError, TimeoutError) as exc:
        _forget_traceback(exc)
        if not resp.aborted:
            yield _stream_failed(
                outcome,
                error_event,
                on_end,
                error_kind(exc),
                type(exc).__name__,
                splitter.pending,
            )
    except EventTooLarge:
        message = f"The upstream sent an event larger than {splitter.max_event_bytes} bytes."
        yield _stream_failed(
            outcome, error_event, on_end, "invalid", "EventTooLarge", splitter.pending, message
        )
    finally:
        resp.close()


class StreamBroken(Exception):
    """A raw byte stream failed mid-way (`relay_raw`). Raised into the server, which then ends
    the response without its last chunk: a body of bytes has no error event to end with, and
    a client must not take a cut answer (audio, say) for a whole one."""


async def relay_raw(
    resp: StreamResponse,
    outcome: UpstreamOutcome,
    first: bytes = b"",
    on_end: Callable[[bool], None] | None = None,
) -> AsyncGenerator[bytes, None]:
    """Yield a raw answer's bytes as they arrive (Call.raw: binary audio), each read at once,
    with the same backpressure, abort and `on_end` as `relay`. A failure mid-way raises
    StreamBroken (see there) once it is recorded and logged."""
    clock = time.perf_counter
    try:
        if first:
            yield first
        while True:
            started = clock()
            chunk = await resp.readany()
            outcome.waited(clock() - started)
            if not chunk:
                break
            yield chunk
        if on_end is not None:
            on_end(True)
    except (UpstreamError, TimeoutError) as exc:
        _forget_traceback(exc)
        if resp.aborted:
            return
        kind = error_kind(exc)
        outcome.failed(kind)
        if on_end is not None:
            on_end(False)
        log.warning(
            "upstream stream failed", extra={"error_kind": kind, "error": type(exc).__name__}
        )
        raise StreamBroken(f"The upstream's answer broke off mid-way ({kind}).") from None
    finally:
        resp.close()


def _stream_failed(
    outcome: UpstreamOutcome,
    error_event: ErrorEvent,
    on_end: Callable[[bool], None] | None,
    kind: str,
    error: str,
    dropped: int,
    message: str | None = None,
) -> bytes:
    """Record and log a stream that failed mid-way; the SSE error event that ends it."""
    outcome.failed(kind)
    if on_end is not None:
        on_end(False)
    log.warning(
        "upstream stream failed",
        extra={"error_kind": kind, "error": error, "dropped_bytes": dropped},
    )
    if message is None:
        message = (
            "The upstream stopped responding mid-stream."
            if kind == "timeout"
            else "The upstream connection failed mid-stream."
        )
    return error_event(kind, message)


def _forget_traceback(exc: BaseException) -> None:
    """Drop the traceback of a caught exception, so that it keeps no frame alive."""
    exc.__traceback__ = None


def _response(conn: Connection, budget: Budget) -> UpstreamResponse:
    """The collected answer, holding its share of the buffer budget."""
    headers = conn.headers
    passed = {name: headers[name] for name in PASS_HEADERS if name in headers}
    content_type = headers.get("content-type", "application/json")
    held = conn.hand_over()
    return UpstreamResponse(conn.status, conn.body(), content_type, passed, None, (budget, held))


def _refused(outcome: UpstreamOutcome, status: int) -> BadGateway:
    """An upstream 401/403 means the gateway's upstream key is wrong or lacks a permission.

    The client's own key was fine, so it gets 502, not the upstream's 401 (which an SDK turns
    into an AuthenticationError about the client's key). The upstream's body is neither passed
    on nor logged: providers quote part of the presented key in it.
    """
    outcome.failed("auth", status)
    log.error(
        "upstream refused the gateway's credentials (check UPSTREAM_API_KEY)",
        extra={"error_kind": "auth", "upstream_status": status},
    )
    return BadGateway(
        f"The upstream refused the gateway's credentials (HTTP {status}). "
        "This is a gateway configuration problem, not a problem with your API key.",
        code="upstream_auth_failed",
    )


def _timeout(outcome: UpstreamOutcome, seconds: float) -> GatewayTimeout:
    outcome.failed("timeout")
    log.warning("upstream timed out", extra={"error_kind": "timeout"})
    return GatewayTimeout(f"The upstream did not answer within {seconds:g} seconds.")


def error_kind(exc: BaseException) -> str:
    """A bounded name for an upstream failure, for metrics and logs (besides these, `auth`:
    the upstream refused the gateway's credentials)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, UpstreamError):
        return exc.kind
    return "invalid"


def _unreachable(outcome: UpstreamOutcome, exc: BaseException) -> BadGateway:
    kind = error_kind(exc)
    outcome.failed(kind)
    log.warning("upstream request failed", extra={"error_kind": kind, "error": type(exc).__name__})
    if kind == "connect":
        return BadGateway("The upstream could not be reached.")
    return BadGateway("The upstream closed the connection or sent an invalid response.")
