"""The upstream client: one pooled aiohttp session per worker, JSON pass-through and SSE relay.

Only headers built here go upstream (an allow-list, not a deny-list): the configured upstream
key, the request id and the trace context. The client's Authorization, x-api-key and cookies
therefore cannot reach the upstream. Upstream URLs come from configuration only.

What an exchange came to (the time spent waiting on the upstream, a failure's kind, a refused
key's status) goes into the `UpstreamOutcome` the caller hands in (edge.upstream.outcome),
never into the request context.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from edge.config import Config
from edge.errors import UPSTREAM, BadGateway, GatewayTimeout, envelope
from edge.observability.context import RequestContext
from edge.server.disconnect import close_on_hang_up
from edge.upstream.outcome import UpstreamOutcome
from edge.upstream.sse import EventSplitter, EventTooLarge

log = logging.getLogger("edge.upstream")

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# Upstream response headers passed back to the client (lower-case).
PASS_HEADERS = ("retry-after", "retry-after-ms", "openai-processing-ms", "openai-version")
# Upstream statuses that refuse the gateway's own credentials: never the client's fault.
REFUSED = frozenset((401, 403))
# Renders the SSE event that ends a stream broken mid-way: (error kind, message) -> bytes.
ErrorEvent = Callable[[str, str], bytes]


class UpstreamResponse:
    """A complete (non-streamed) upstream answer."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, status: int, body: bytes, content_type: str, headers: dict[str, str]):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


class Upstream:
    """The worker's one pooled session, shared by every provider.

    `call` and `open_stream` go to the UPSTREAM_URL provider unless given a `provider`
    (edge.upstream.providers.Provider) and, for a failover attempt, a shorter `timeout_s`.
    `ctx` gives the headers (request id, trace context); what the exchange came to goes into
    `outcome`.
    """

    def __init__(self, config: Config) -> None:
        self._base = config.upstream_url or ""
        self._timeout_s = config.timeout_s
        self._connect_timeout_s = config.upstream_connect_timeout_s
        self._pool_size = config.upstream_pool_size
        self._static_headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if config.upstream_api_key:
            self._static_headers["authorization"] = f"Bearer {config.upstream_api_key}"
        # Prebuilt per attempt budget (see `_timeouts_for`): no ClientTimeout per request.
        self._timeouts: dict[float, tuple[aiohttp.ClientTimeout, aiohttp.ClientTimeout]] = {}
        self._full = self._build_timeouts(self._timeout_s)
        # Each provider's fixed headers (content type, identity coding, its key), built once.
        self._provider_headers: dict[Any, dict[str, str]] = {}
        self.session: aiohttp.ClientSession | None = None

    def _build_timeouts(
        self, seconds: float
    ) -> tuple[aiohttp.ClientTimeout, aiohttp.ClientTimeout]:
        """(call, stream) timeouts for an attempt of `seconds`. Non-streamed exchanges:
        aiohttp's own total timeout covers connecting, sending and reading the whole response,
        so no second timer is needed per request."""
        connect = min(self._connect_timeout_s, seconds)
        call = aiohttp.ClientTimeout(total=seconds, connect=connect, sock_connect=connect)
        stream = aiohttp.ClientTimeout(
            total=None, connect=connect, sock_connect=connect, sock_read=self._timeout_s
        )
        return call, stream

    def _timeouts_for(
        self, seconds: float, provider: Any = None
    ) -> tuple[aiohttp.ClientTimeout, aiohttp.ClientTimeout]:
        """The timeouts of an attempt of `seconds`, built once per budget where they recur.

        A first attempt's budget is the router's whole deadline less the microseconds it took
        to get there: it gets the prebuilt SERVER_TIMEOUT_SECONDS pair (so its deadline may be
        up to 10 ms past the router's). A provider's own `timeout_s` recurs exactly and is kept
        (a few per worker); any other budget (a failover attempt's remainder) is built on the
        spot and not kept.
        """
        if 0.0 <= self._timeout_s - seconds < 0.01:
            return self._full
        if provider is None or seconds != provider.timeout_s:
            return self._build_timeouts(seconds)
        found = self._timeouts.get(seconds)
        if found is None:
            found = self._timeouts[seconds] = self._build_timeouts(seconds)
        return found

    def _target(
        self, provider: Any, timeout_s: float | None, extra: dict[str, str] | None
    ) -> tuple[str, dict[str, str], float]:
        """Base URL, headers (a fresh dict: the caller adds to it) and timeout of one attempt."""
        if provider is None:
            base, fixed = self._base, self._static_headers
        else:
            base = provider.base_url
            fixed = self._provider_headers.get(provider)
            if fixed is None:
                fixed = {"content-type": "application/json", "accept-encoding": "identity"}
                fixed.update(provider.auth_headers())
                if len(self._provider_headers) < 256:  # providers are re-read on HUP only
                    self._provider_headers[provider] = fixed
        headers = {**fixed, **extra} if extra else fixed.copy()
        return base, headers, self._timeout_s if timeout_s is None else timeout_s

    @property
    def ready(self) -> bool:
        return self.session is not None and not self.session.closed

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._pool_size, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self._connect_timeout_s, sock_connect=self._connect_timeout_s
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def _headers(
        self, ctx: RequestContext, stream: bool, headers: dict[str, str] | None = None
    ) -> dict[str, str]:
        headers = dict(self._static_headers) if headers is None else headers
        headers["x-request-id"] = ctx.request_id
        if ctx.traceparent_out:
            headers["traceparent"] = ctx.traceparent_out
            if ctx.tracestate:
                headers["tracestate"] = ctx.tracestate
        if stream:
            headers["accept"] = "text/event-stream"
        return headers

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None,
        ctx: RequestContext,
        outcome: UpstreamOutcome,
        provider: Any = None,
        timeout_s: float | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> UpstreamResponse:
        """One upstream exchange read in full within SERVER_TIMEOUT_SECONDS.

        Timeouts become 504 and connection failures or unreadable responses 502, each with
        the OpenAI envelope; upstream HTTP errors are returned as they came, except 401 and 403
        (see `_refused`).
        """
        assert self.session is not None
        started = time.perf_counter()
        base, headers, seconds = self._target(provider, timeout_s, extra_headers)
        timeout = self._timeouts_for(seconds, provider)[0]
        try:
            async with self.session.request(
                method,
                base + path,
                data=body,
                headers=self._headers(ctx, False, headers),
                allow_redirects=False,
                timeout=timeout,
            ) as resp:
                return await _answer(outcome, resp)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _failure(outcome, exc, seconds) from None
        finally:
            outcome.waited_s += time.perf_counter() - started

    async def open_stream(
        self,
        path: str,
        body: bytes,
        ctx: RequestContext,
        outcome: UpstreamOutcome,
        provider: Any = None,
        timeout_s: float | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse | UpstreamResponse:
        """Send a streaming request and wait (bounded) for the response head.

        Returns the live response when the upstream answered 200 with an event stream, else
        the complete answer (an upstream error for a stream request is plain JSON).
        """
        assert self.session is not None
        started = time.perf_counter()
        resp = None
        base, headers, seconds = self._target(provider, timeout_s, extra_headers)
        timeout = self._timeouts_for(seconds, provider)[1]
        try:
            async with asyncio.timeout(seconds):
                resp = await self.session.request(
                    "POST",
                    base + path,
                    data=body,
                    headers=self._headers(ctx, True, headers),
                    allow_redirects=False,
                    timeout=timeout,
                )
                content_type = resp.headers.get("content-type", "")
                if resp.status == 200 and content_type.startswith("text/event-stream"):
                    return resp
                try:
                    return await _answer(outcome, resp)
                finally:
                    resp.release()
        except (TimeoutError, aiohttp.ClientError) as exc:
            if resp is not None:
                resp.close()
            raise _failure(outcome, exc, seconds) from None
        finally:
            outcome.waited_s += time.perf_counter() - started


async def _answer(outcome: UpstreamOutcome, resp: aiohttp.ClientResponse) -> UpstreamResponse:
    """A complete upstream answer, read within its bound; 401/403 refused (see `_refused`)."""
    if resp.status in REFUSED:
        await _discard(resp)
        raise _refused(outcome, resp.status)
    return _response(resp, await _read_bounded(resp))


def _failure(
    outcome: UpstreamOutcome, exc: Exception, seconds: float
) -> BadGateway | GatewayTimeout:
    """What a failed exchange becomes: 504 for a timeout, 502 for anything else."""
    _forget_traceback(exc)
    if isinstance(exc, TimeoutError):
        return _timeout(outcome, seconds)
    return _unreachable(outcome, exc)


def openai_error_event(kind: str, message: str) -> bytes:
    """The SSE event that ends a broken OpenAI-style stream: the error envelope as data (the
    openai SDK raises it as an APIError)."""
    return b"data: " + envelope(message, UPSTREAM, None, f"upstream_{kind}") + b"\n\n"


async def relay(
    resp: aiohttp.ClientResponse,
    outcome: UpstreamOutcome,
    receive: Callable[[], Awaitable[dict[str, Any]]] | None,
    on_chunk: Callable[[bytes], None] | None = None,
    first: bytes = b"",
    error_event: ErrorEvent = openai_error_event,
    on_end: Callable[[bool], None] | None = None,
) -> AsyncIterator[bytes]:
    """Yield the upstream's SSE events as they complete; never buffer a whole stream.

    Each upstream read is cut at its last event boundary (edge.upstream.sse): the whole events
    it completed go out at once, as one block, byte for byte; an incomplete event waits for its
    end, bounded by MAX_EVENT_BYTES. So a client only ever sees whole events, and events that
    arrived in separate reads are never merged. `on_chunk` sees each block as it goes out.

    Backpressure: the next upstream read happens only after the previous block was handed to
    the server, whose send waits while the client's socket is full. A client disconnect
    (watched through ASGI `receive`) closes the upstream response at once, so no orphaned
    upstream work remains. An upstream failure mid-stream (a broken connection, a stall, an
    end or an oversized event mid-event) drops the incomplete event and ends the stream with
    an SSE error event (`error_event`: in the API's own shape), on an event boundary, instead
    of a hang. `on_end` learns how the stream ended: True when whole, False on such a failure
    (for the provider's breaker); a client hanging up is neither, and it is not called. The
    time spent waiting on reads and a failure's kind go into the request's `outcome`.
    """
    watcher = close_on_hang_up(receive, lambda: _close_for_hang_up(resp)) if receive else None
    content = resp.content
    splitter = EventSplitter()
    clock = time.perf_counter
    try:
        while True:
            if first:  # bytes the router already read (to fail over a stream that sends none)
                chunk, first = first, b""
            else:
                started = clock()
                chunk = await content.readany()
                outcome.waited_s += clock() - started  # waiting on the upstream: not our overhead
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
    except (aiohttp.ClientError, TimeoutError) as exc:
        _forget_traceback(exc)
        if watcher is None or not watcher.done():
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
        if watcher is not None:
            watcher.cancel()
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
    outcome.error = kind
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


def _close_for_hang_up(resp: aiohttp.ClientResponse) -> None:
    # An exception of our own for the pending read: left to itself, aiohttp hands every closed
    # response one shared exception object, whose traceback then grows with each hung-up
    # stream's frames and keeps them all alive.
    resp.content.set_exception(aiohttp.ClientConnectionError("client disconnected"))
    resp.close()


def _forget_traceback(exc: BaseException) -> None:
    """Drop the traceback of a caught aiohttp exception: aiohttp reuses some exception objects
    across requests, and a traceback left on one keeps every frame it passed through alive."""
    exc.__traceback__ = None


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    length = resp.content_length
    if length is not None:
        if length > MAX_RESPONSE_BYTES:
            raise BadGateway("The upstream response is too large.")
        return await resp.read()  # a declared length: read in one call, bounded by it
    chunks = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise BadGateway("The upstream response is too large.")
        chunks.append(chunk)
    return b"".join(chunks)


def _response(resp: aiohttp.ClientResponse, payload: bytes) -> UpstreamResponse:
    headers = {name: resp.headers[name] for name in PASS_HEADERS if name in resp.headers}
    return UpstreamResponse(
        resp.status, payload, resp.headers.get("content-type", "application/json"), headers
    )


async def _discard(resp: aiohttp.ClientResponse) -> None:
    """Read and drop a (bounded) body, so the connection can go back to the pool."""
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            resp.close()
            return


def _refused(outcome: UpstreamOutcome, status: int) -> BadGateway:
    """An upstream 401/403 means the gateway's upstream key is wrong or lacks a permission.

    The client's own key was fine, so it gets 502, not the upstream's 401 (which an SDK turns
    into an AuthenticationError about the client's key). The upstream's body is neither passed
    on nor logged: providers quote part of the presented key in it.
    """
    outcome.status = status
    outcome.error = "auth"
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
    outcome.error = "timeout"
    log.warning("upstream timed out", extra={"error_kind": "timeout"})
    return GatewayTimeout(f"The upstream did not answer within {seconds:g} seconds.")


def error_kind(exc: BaseException) -> str:
    """A bounded name for an upstream failure, for metrics and logs (besides these, `auth`:
    the upstream refused the gateway's credentials)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "disconnect"
    return "invalid"


def _unreachable(outcome: UpstreamOutcome, exc: aiohttp.ClientError) -> BadGateway:
    outcome.error = kind = error_kind(exc)
    log.warning("upstream request failed", extra={"error_kind": kind, "error": type(exc).__name__})
    if kind == "connect":
        return BadGateway("The upstream could not be reached.")
    return BadGateway("The upstream closed the connection or sent an invalid response.")
