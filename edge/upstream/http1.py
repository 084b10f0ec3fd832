"""A lean HTTP/1.1 client for the upstream: keep-alive connections in one pool per worker.

Why not aiohttp's client: measured on this project's bench machine, one pooled POST with
aiohttp's `ClientSession.request` cost about 190 µs of CPU against 38 µs for the same exchange
written to the socket and parsed by httptools; that was more than every edge feature together
(bench/instructions.py shows the rest). The gateway sends only GET and POST, with headers and
URLs it built itself from validated configuration, and reads either a whole (bounded) body or
a stream; that much HTTP/1.1 is small, and the parsing stays in a well-kept library: httptools
(llhttp, strict), which the server side already uses. The client's independent check is
tests/unit/test_http1_h11.py: a differential test against h11 on generated answers, well-formed
and broken, which must come out the same or be refused by this client.

What a `Connection` does: one request at a time, written in one `write`; the response parsed
as it arrives. Collecting a whole body (`send` with a limit, then `wait`) resolves one future
when the message completes; a stream (`send` with limit 0) resolves at the head and then hands
out what arrived with `readany`, pausing the socket while more than `HIGH_WATER` bytes wait
unread. A connection goes back to the pool (`done`) only when its response was read to the end,
the upstream allows keep-alive, its socket is not paused and nobody is still waiting on it;
anything else (an error, a cancelled exchange, a stream closed early, bytes nobody asked for)
closes it, aborting a connection whose exchange did not end. What httptools must hold before
it can call back (a head, chunk lines, trailers) is bounded by `MAX_WITHOUT_BODY` bytes fed
without body bytes, interim (1xx) answers by `MAX_INTERIM`; trailers never become headers.
The body's framing is llhttp's, and any answer it could be read two ways fails closed
(InvalidResponse, a 502 for the client): Content-Length or Transfer-Encoding repeated, the two
together, a transfer coding other than chunked or in HTTP/1.0, a framing field as a trailer.
A body that ends with the connection is whole only when neither field was sent and the
connection was closed, not reset; a chunked or Content-Length body cut short is Disconnected.

`Pool`: one provider's connections (edge.upstream.client keeps one pool per provider, so one
provider's streams cannot take another's connections): idle ones per origin, last in, first
out, at most `limit` open in all. A request past the limit is refused at once (`PoolBusy`):
waiting for room would hold a client for nothing when the pool is full of long streams.
Idle connections are closed after `keepalive_s`.
Connecting resolves the host (one lookup at a time per host, kept `DNS_TTL_S`, dropped when
every address failed) and races its addresses `STAGGER_S` apart (less when there are many, so
that the last still starts within the connect timeout), the families alternating from the
resolver's first (happy eyeballs; uvloop's `create_connection` has no
`happy_eyeballs_delay`); an address that failed goes to the back of the order for
`DNS_TTL_S`. A connection the upstream closed as it was accepted is a failed
attempt, and a request written to a closed transport fails as `Disconnected`. A reused
connection that the upstream had closed fails as `Disconnected`; the caller (edge.upstream.
client) sends a GET once more, never a POST (it may have been acted on): the router fails
over instead.

`Budget`: the bytes of whole answers one worker holds at once (UPSTREAM_BUFFER_BYTES). A
collected answer takes its bytes as they come (all of a Content-Length at its head), and gives
them back when the answer is dropped; an answer that would pass the budget fails as
`BufferFull`.

Errors: `ConnectFailed` (could not connect), `PoolBusy` (the provider's pool is full: nothing
was sent), `Disconnected` (closed before the response was complete), `InvalidResponse` (not
HTTP, or headers past the bounds), `ResponseTooLarge`, `BufferFull`, and the built-in
`TimeoutError`. Each is a fresh object (no traceback shared between requests).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import time
from typing import Any

import httptools

HIGH_WATER = 64 * 1024  # a stream's unread bytes past which the socket is paused
MAX_HEADER_BYTES = 64 * 1024  # a response head's names and values, in all
MAX_HEADERS = 128
_NO_BODY = frozenset((204, 304))
# The fields that frame a body: one of each at most, never both, never as trailers.
_FRAMING = frozenset(("content-length", "transfer-encoding"))
_FRAMING_BYTES = frozenset((b"content-length", b"transfer-encoding"))
STAGGER_S = 0.25  # happy eyeballs: the head start each address gets before the next
DNS_TTL_S = 300.0  # resolved addresses kept this long
# What httptools may hold fed without body bytes: a head's names and values (MAX_HEADER_BYTES)
# with their colons, CRLFs and status line, and an interim (1xx) head before it.
MAX_WITHOUT_BODY = 2 * MAX_HEADER_BYTES + MAX_HEADERS * 4 + 1024
MAX_INTERIM = 8  # interim (1xx) answers before the real one


class UpstreamError(Exception):
    """An exchange with the upstream failed; `kind` names it for metrics and logs."""

    kind = "invalid"


class ConnectFailed(UpstreamError):
    kind = "connect"


class PoolBusy(UpstreamError):
    """The provider's pool holds its most connections: nothing was sent."""

    kind = "busy"


class Disconnected(UpstreamError):
    kind = "disconnect"


class InvalidResponse(UpstreamError):
    kind = "invalid"


class ResponseTooLarge(UpstreamError):
    kind = "invalid"


class BufferFull(UpstreamError):
    """The worker holds UPSTREAM_BUFFER_BYTES of whole answers already: this one is dropped."""

    kind = "overloaded"


class Budget:
    """The bytes of whole answers one worker may hold at once (see the module docstring);
    `Connection._hold` takes from it, the answer holding them gives them back."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def give(self, size: int) -> None:
        self.held -= size


UNLIMITED = Budget(1 << 62)  # a pool made without a budget (tests)


class _Unsolicited(Exception):
    """A second message began after the one asked for: stop parsing, close the connection."""


class _Placeholder(asyncio.Protocol):
    """A connection attempt's protocol until it wins the race: notes a connection the upstream
    closed, or spoke on unasked, before `Connection` took it over (a failed attempt)."""

    lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def data_received(self, data: bytes) -> None:
        self.lost = True

    def eof_received(self) -> None:
        self.lost = True


class Origin:
    """Where a base URL's requests go: one pool key, and the bytes every request repeats."""

    __slots__ = ("host", "host_line", "port", "prefix", "tls")

    def __init__(self, base_url: str) -> None:
        # The URL was validated by edge.config.parse_base_url: scheme://authority[/path].
        scheme, _, rest = base_url.partition("://")
        authority, slash, path = rest.partition("/")
        self.tls = scheme == "https"
        default_port = 443 if self.tls else 80
        if authority.startswith("["):
            host, _, after = authority[1:].partition("]")
            port = after[1:] if after.startswith(":") else ""
        else:
            host, _, port = authority.partition(":")
        self.host = host
        self.port = int(port, 10) if port else default_port
        self.prefix = (slash + path).rstrip("/").encode("ascii")
        self.host_line = b"host: " + authority.encode("ascii") + b"\r\n"

    def key(self) -> tuple[str, int, bool]:
        return (self.host, self.port, self.tls)


def request_head(
    origin: Origin, method: bytes, path: str, headers: dict[str, str], size: int
) -> bytes:
    """The request line and headers. Every name and value was built by the gateway from
    validated parts (edge.config, edge.observability.context), so none holds CR or LF."""
    lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    return b"".join(
        (
            method,
            b" ",
            origin.prefix,
            path.encode("ascii"),
            b" HTTP/1.1\r\n",
            origin.host_line,
            lines.encode("ascii"),
            b"content-length: %d\r\n\r\n" % size if size or method == b"POST" else b"\r\n",
        )
    )


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Connection(asyncio.Protocol):
    """One keep-alive connection to an origin (see the module docstring)."""

    def __init__(self, pool: Pool, key: tuple[str, int, bool]) -> None:
        self.key = key
        self.held = 0  # bytes of the collected answer taken from the pool's budget
        self.closed = False
        self.idle_since = 0.0
        self.reused = False  # served an exchange before this one
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._transport: Any = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._busy = False
        self._reset(0)

    def _reset(self, limit: int) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.content_length: int | None = None
        self.received = False  # any byte of this exchange's answer
        self._limit = limit  # > 0: collect the whole body up to this; 0: a stream
        self._chunks: list[bytes] = []
        self._whole: bytearray | None = None  # a collected body past its first piece
        self._buffered = 0
        self._without_body = 0  # bytes fed since the last body bytes (head, chunk lines, trailers)
        self._header_bytes = 0
        self._header_count = 0
        self._interim = 0
        self._head_done = False
        self._complete = False
        self._keep_alive = False
        self._close_delimited = False
        self._paused = False
        self._error: UpstreamError | None = None

    # ---------------------------------------------------------------- the caller's side

    def send(self, data: bytes, limit: int) -> None:
        """Write a whole request; its response is collected up to `limit` bytes, or streamed
        when `limit` is 0. On a transport already closing, `wait` raises Disconnected."""
        self._reset(limit)
        self._busy = True
        transport = self._transport
        if transport is None or transport.is_closing():
            self._fail(Disconnected("The upstream closed the connection."))
            return
        try:
            transport.write(data)
        except RuntimeError:  # uvloop: a handle closed under us
            self._fail(Disconnected("The upstream closed the connection."))

    async def wait(self, deadline: float | None) -> None:
        """Until the whole message (collecting) or its head (streaming) is in, or `deadline`
        (loop time) passes: TimeoutError. An upstream failure raises its UpstreamError."""
        ready = self._complete if self._limit else self._head_done
        if not ready and self._error is None:
            await self._woken(deadline)
        if self._error is not None:
            raise self._error

    async def _woken(self, deadline: float | None) -> None:
        """Until a parser callback, an error or a close wakes this connection, or `deadline`
        (loop time) passes: TimeoutError."""
        waiter = self._waiter = self._loop.create_future()
        timer = None if deadline is None else self._loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def collect(self, limit: int) -> None:
        """Read the rest of a streamed exchange's answer whole (then `wait`, `body`), up to
        `limit` bytes in all: ResponseTooLarge past it, as for an answer collected from the
        start."""
        if (self.content_length or 0) > limit or self._buffered > limit:
            raise ResponseTooLarge("The upstream response is too large.")
        self._hold(max(self.content_length or 0, self._buffered) - self.held)
        self._limit = limit
        if len(self._chunks) > 1:
            self._whole = bytearray(b"".join(self._chunks))
            self._chunks = []
        self._resume()

    def body(self) -> bytes:
        if self._whole is not None:
            return bytes(self._whole)
        return self._chunks[0] if self._chunks else b""

    def hand_over(self) -> int:
        """The budget bytes the collected answer holds, now the caller's to give back (with
        the answer: edge.upstream.client.UpstreamResponse.release)."""
        held, self.held = self.held, 0
        return held

    def _hold(self, size: int) -> None:
        budget = self._pool.budget
        if budget.held + size > budget.limit:
            raise BufferFull("The worker holds its most of buffered upstream answers.")
        budget.held += size
        self.held += size

    async def readany(self, timeout: float | None) -> bytes:
        """What arrived since the last read (waiting up to `timeout` for something); b"" at
        the end of the body."""
        deadline = None
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            if deadline is None and timeout is not None:
                deadline = self._loop.time() + timeout
            await self._woken(deadline)
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._buffered = 0
        self._resume()
        return data

    @property
    def reusable(self) -> bool:
        return (
            self._complete
            and self._keep_alive
            and self._error is None
            and not self._paused  # a paused socket would starve the next exchange
            and self._waiter is None  # nobody is still reading this exchange
            and not self.closed
        )

    def done(self) -> None:
        """The caller is finished with this exchange: back to the pool if it may be reused."""
        if self.held:
            self._give_back()
        if self.reusable:
            self._busy = False
            self._chunks = []
            self._whole = None
            self.reused = True
            self._pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        """Close for good. A pending read raises Disconnected. A connection that did not end
        its exchange is aborted (nothing left to flush: an unread request body stays behind)."""
        if self.closed:
            return
        self.closed = True
        self._busy = False
        self._give_back()
        waiter = self._waiter
        if self._error is None and (
            not self._complete or (waiter is not None and not waiter.done())
        ):
            self._error = Disconnected("The connection was closed.")
        self._wake()
        if self._transport is not None:
            if self._complete:
                self._transport.close()
            else:
                self._transport.abort()
        self._pool.forget(self)

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if not self._busy or self._complete:  # bytes nobody asked for: never reuse this one
            self.close()
            return
        self.received = True
        fed = self._buffered
        try:
            self._parser.feed_data(data)
        except Exception as exc:
            cause = exc.__context__
            if self._complete:
                # The answer asked for is whole; what follows it (_Unsolicited, or bytes
                # llhttp refuses after an answer that ends the connection) is not read, and
                # this connection is not reused.
                self.close()
            else:
                self._fail(
                    cause
                    if isinstance(cause, UpstreamError)
                    else InvalidResponse("The upstream sent an invalid HTTP response.")
                )
            return
        # httptools holds a header line until it ends: bound what it may hold (a head, chunk
        # lines, trailers) by the bytes fed without any body bytes coming out of them.
        if self._buffered == fed and not self._complete:
            self._without_body += len(data)
            if self._without_body > MAX_WITHOUT_BODY:
                self._fail(InvalidResponse("The upstream's response headers are too large."))
        else:
            self._without_body = 0

    def eof_received(self) -> None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        if self._busy and not self._complete and self._error is None:
            if self._head_done and self._close_delimited and exc is None:
                self._complete = True  # the body ended with the connection, as announced
            else:
                self._error = Disconnected("The upstream closed the connection.")
        self.closed = True
        self._wake()
        self._pool.forget(self)

    # ---------------------------------------------------------------- httptools callbacks

    def on_message_begin(self) -> None:
        if self._complete:
            raise _Unsolicited()
        self.headers = {}  # a real head after an interim (1xx) one starts afresh
        self._header_bytes = 0
        self._header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:  # a trailer field: not part of the answer's head
            if name.lower() in _FRAMING_BYTES:  # framing cannot come after the body
                raise InvalidResponse("The upstream sent a framing field as a trailer.")
            return
        self._header_bytes += len(name) + len(value)
        self._header_count += 1
        if self._header_bytes > MAX_HEADER_BYTES or self._header_count > MAX_HEADERS:
            raise InvalidResponse("The upstream's response headers are too large.")
        key = name.decode("latin-1").lower()
        if key not in self.headers:  # the first of a repeated header is the one kept
            # llhttp drops the whitespace before a value, not after it (RFC 9112 section 5)
            text = value.decode("latin-1")
            self.headers[key] = text.rstrip(" \t") if text[-1:] in (" ", "\t") else text
        elif key in _FRAMING:
            # A second Content-Length or Transfer-Encoding: the dict keeps the first, llhttp
            # may go by the last (it does for Transfer-Encoding): fail closed.
            raise InvalidResponse("The upstream's response framing is ambiguous.")

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        headers = self.headers
        coding = headers.get("transfer-encoding")
        if coding is not None:
            # Only chunked: the gateway offers no other transfer coding (it sends no TE) and
            # could not decode one, which llhttp would read to the end of the connection.
            # HTTP/1.0 has no Transfer-Encoding: "treat the message as if the framing is
            # faulty" (RFC 9112 section 6.1).
            if coding.lower() != "chunked" or parser.get_http_version() == "1.0":
                raise InvalidResponse("The upstream's transfer coding is not chunked HTTP/1.1.")
            if "content-length" in headers:  # llhttp refuses this too: not left to it alone
                raise InvalidResponse("The upstream's response framing is ambiguous.")
        if status < 200:  # 1xx: an interim answer; the real head follows
            if status == 101:
                raise InvalidResponse("The upstream switched protocols.")
            if status < 100:  # llhttp takes any three digits
                raise InvalidResponse("The upstream sent an invalid status code.")
            return
        self.status = status
        self._keep_alive = parser.should_keep_alive()
        length = headers.get("content-length")
        if length is not None:
            self.content_length = int(length)  # llhttp accepted it: digits only
            if self._limit:
                if self.content_length > self._limit:
                    raise ResponseTooLarge("The upstream response is too large.")
                self._hold(self.content_length)  # all of it at once: the budget is known
        elif coding is None and status not in _NO_BODY:
            # Neither: the body runs to the end of the connection. llhttp must read it so too:
            # it keeps alive no connection whose message ends with it, so keep-alive here
            # would mean that llhttp found a length the headers did not show.
            if self._keep_alive:
                raise InvalidResponse("The upstream's response framing is ambiguous.")
            self._close_delimited = True
        self._head_done = True
        if not self._limit:
            self._wake()

    def on_body(self, body: bytes) -> None:
        self._buffered += len(body)
        if self._limit:
            if self._buffered > self._limit:
                raise ResponseTooLarge("The upstream response is too large.")
            if self._buffered > self.held:
                self._hold(self._buffered - self.held)
            if self._whole is not None:  # one buffer, not a bytes object per piece
                self._whole += body
            elif self._chunks:
                self._whole = bytearray(self._chunks.pop())
                self._whole += body
            else:
                self._chunks.append(body)
            return
        self._chunks.append(body)
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self._head_done:  # the end of an interim (1xx) answer
            self._interim += 1
            if self._interim > MAX_INTERIM:
                raise InvalidResponse("The upstream sent too many interim answers.")
            return
        self._complete = True
        self._wake()

    # ---------------------------------------------------------------- internals

    def _resume(self) -> None:
        """Read the socket again after the buffered bytes were taken."""
        if self._paused and not self.closed:
            self._paused = False
            self._transport.resume_reading()

    def _give_back(self) -> None:
        if self.held:
            self._pool.budget.give(self.held)
            self.held = 0

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Pool:
    """One provider's upstream connections (see the module docstring)."""

    def __init__(
        self,
        limit: int,
        keepalive_s: float = 30.0,
        tls: ssl.SSLContext | None = None,
        budget: Budget = UNLIMITED,
    ) -> None:
        """`tls` verifies https origins; the default is the system's CAs with host name
        checks (`ssl.create_default_context`), made at the first https connection. `budget`
        bounds the bytes of whole answers held (shared by the worker's pools)."""
        self._limit = limit
        self._keepalive_s = keepalive_s
        self._idle: dict[tuple[str, int, bool], list[Connection]] = {}
        self._all: set[Connection] = set()
        self._ssl = tls
        self.budget = budget
        self._addresses: dict[tuple[str, int], tuple[float, list[Any]]] = {}
        self._resolving: dict[tuple[str, int], asyncio.Future[list[Any]]] = {}
        self._failed: dict[Any, float] = {}  # address -> when it last failed to connect
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False

    @property
    def open_connections(self) -> int:
        return len(self._all)

    def idle_connection(self, key: tuple[str, int, bool]) -> Connection | None:
        idle = self._idle.get(key)
        if idle:
            oldest_allowed = time.monotonic() - self._keepalive_s
            while idle:
                conn = idle.pop()
                if conn.idle_since >= oldest_allowed and not conn.closed:
                    return conn
                conn.close()
        return None

    async def acquire(
        self, origin: Origin, connect_timeout_s: float, fresh: bool = False
    ) -> Connection:
        """An idle connection to `origin` (unless `fresh`), else a new one while fewer than
        `limit` are open (PoolBusy at once when not), connected within `connect_timeout_s`
        (else ConnectFailed, as for a refusal, a name that does not resolve or a TLS
        failure)."""
        key = origin.key()
        conn = None if fresh else self.idle_connection(key)
        if conn is not None:
            return conn
        if self.closed:
            raise ConnectFailed("The upstream pool is closed.")
        if len(self._all) >= self._limit:
            raise PoolBusy(f"All {self._limit} connections to the upstream are in use.")
        try:
            async with asyncio.timeout(connect_timeout_s):
                return await self._connect(origin, key, connect_timeout_s)
        except TimeoutError:
            raise ConnectFailed(
                f"No connection to the upstream within {connect_timeout_s:g} s."
            ) from None

    async def _connect(
        self, origin: Origin, key: tuple[str, int, bool], timeout_s: float
    ) -> Connection:
        conn = Connection(self, key)
        self._all.add(conn)  # counts against the limit while it connects
        tls: Any = None
        if origin.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            await self._open(conn, origin, tls, timeout_s)
        except (OSError, ssl.SSLError, UnicodeError) as exc:
            conn.close()
            raise ConnectFailed(f"Could not connect: {type(exc).__name__}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    async def _open(self, conn: Connection, origin: Origin, tls: Any, timeout_s: float) -> None:
        """Connect to the first address that answers: each address gets a head start alone
        before the next is tried alongside it (happy eyeballs, RFC 8305, simplified), so an
        unreachable first address (broken IPv6) does not use up the connect timeout. The head
        start is `STAGGER_S`, less when the addresses are so many that the last would otherwise
        start after the timeout; addresses that failed lately go last. Each attempt has a
        placeholder protocol; the winner's transport is handed to `conn`."""
        loop = asyncio.get_running_loop()
        addresses = self._ordered(await self._resolve(origin.host, origin.port))
        stagger = min(STAGGER_S, timeout_s / (len(addresses) + 1))
        started: dict[asyncio.Future[Any], Any] = {}
        pending: set[asyncio.Future[Any]] = set()
        failure: BaseException | None = None
        try:
            for index, (family, _, proto, _, address) in enumerate(addresses):
                attempt = loop.create_connection(
                    _Placeholder,
                    address[0],
                    address[1],
                    family=family,
                    proto=proto,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
                future = asyncio.ensure_future(attempt)
                started[future] = address
                pending.add(future)
                last = index == len(addresses) - 1
                while pending:
                    finished, pending = await asyncio.wait(
                        pending,
                        timeout=None if last else stagger,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if not finished:
                        break  # the next address joins the race
                    winner = None
                    for task in finished:
                        if task.exception() is not None:
                            failure = task.exception()
                            self._note_failed(started[task])
                            continue
                        transport, placeholder = task.result()
                        if placeholder.lost or transport.is_closing():
                            transport.close()  # accepted, then closed at once: a failure
                            failure = ConnectionResetError("closed as it connected")
                            self._note_failed(started[task])
                        elif winner is None:
                            winner = transport
                        else:
                            transport.close()  # a later finisher of the same race
                    if winner is None and not last:
                        break  # a failure: the next address starts now, not after the stagger
                    if winner is not None:
                        self._failed.pop(winner.get_extra_info("peername"), None)
                        if conn.closed:  # the pool closed while this connected
                            winner.close()
                            raise ConnectFailed("The upstream pool is closed.")
                        winner.set_protocol(conn)
                        conn.connection_made(winner)
                        return
            self._addresses.pop((origin.host, origin.port), None)  # resolve afresh next time
            raise failure or OSError("The upstream's name resolved to no address.")
        finally:
            for task in pending:
                if task.done() and not task.cancelled() and task.exception() is None:
                    task.result()[0].close()  # won as the caller gave up
                else:
                    task.cancel()  # a cancelled attempt closes the socket it was opening

    def _ordered(self, addresses: list[Any]) -> list[Any]:
        """The resolver's order, with the addresses that failed to connect lately moved to the
        back (those that failed longest ago first among them)."""
        if not self._failed:
            return addresses
        since = time.monotonic() - DNS_TTL_S
        failed = self._failed
        good = [info for info in addresses if failed.get(info[4], 0.0) < since]
        bad = [info for info in addresses if failed.get(info[4], 0.0) >= since]
        bad.sort(key=lambda info: failed[info[4]])
        return good + bad

    def _note_failed(self, address: Any) -> None:
        if len(self._failed) >= 1024:
            self._failed.clear()
        self._failed[address] = time.monotonic()

    async def _resolve(self, host: str, port: int) -> list[Any]:
        """The host's addresses, kept `DNS_TTL_S`; one lookup at a time per host (a burst of
        new connections waits for it rather than queueing its own). The families alternate,
        starting with the one the system's resolver put first (RFC 8305 section 4)."""
        key = (host, port)
        found = self._addresses.get(key)
        if found is not None and time.monotonic() - found[0] < DNS_TTL_S:
            return found[1]
        pending = self._resolving.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(host, port))
            self._resolving[key] = pending
            pending.add_done_callback(lambda _: self._resolving.pop(key, None))
        return await asyncio.shield(pending)

    async def _lookup(self, host: str, port: int) -> list[Any]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if infos:
            first = [info for info in infos if info[0] == infos[0][0]]
            other = [info for info in infos if info[0] != infos[0][0]]
            infos = [i for pair in itertools.zip_longest(first, other) for i in pair if i]
        if len(self._addresses) >= 256:
            self._addresses.clear()
        self._addresses[(host, port)] = (time.monotonic(), infos)
        return infos

    def release(self, conn: Connection) -> None:
        if self.closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive_s, self._expire)

    def forget(self, conn: Connection) -> None:
        """A connection closed: it no longer counts."""
        if conn in self._all:
            self._all.discard(conn)
            idle = self._idle.get(conn.key)
            if idle and conn in idle:
                idle.remove(conn)

    async def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._all):
            conn.close()
        self._idle.clear()

    # ---------------------------------------------------------------- internals

    def _expire(self) -> None:
        self._sweep = None
        oldest_allowed = time.monotonic() - self._keepalive_s
        remaining = False
        for idle in list(self._idle.values()):
            for conn in [c for c in idle if c.idle_since < oldest_allowed]:
                conn.close()
            remaining = remaining or bool(idle)
        if remaining and not self.closed:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive_s, self._expire)
