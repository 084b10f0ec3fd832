"""edge.server.protocol in-process, the way uvicorn tests its own protocols: a mock transport
records what is written, and a mock loop runs the tasks on a real event loop but holds every
timer on a virtual clock that a test advances, so deadlines are tested without sleeping.

The last tests pin the uvicorn internals the protocol subclasses: if an upgrade moves them,
they fail with a message saying what moved, rather than the edge silently losing a limit.
"""

from __future__ import annotations

import asyncio
import heapq
import importlib.metadata
import inspect
import itertools
import re
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import pytest
import uvicorn
from uvicorn.protocols.http import httptools_impl
from uvicorn.server import ServerState

from edge.server.protocol import (
    LINGER_MAX_BYTES,
    LINGER_SECONDS,
    EdgeHttpToolsProtocol,
    EdgeLimits,
    protocol_class,
)

LIMITS = EdgeLimits(
    max_request_line=256,
    max_header_bytes=1024,
    max_headers=10,
    header_timeout=10.0,
    body_timeout=30.0,
    max_concurrency=4,
    send_timeout=20.0,
)
KEEPALIVE = 5.0
CHAT = b'{"model":"m"}'


# ------------------------------------------------------------------ mocks


class MockTransport:
    def __init__(self) -> None:
        self.buffer = b""
        self.writes = 0  # write calls: one per send() on a real socket
        self.closed = False
        self.eof_written = False
        self.reading = True
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed and not self.eof_written, "write after close or half-close"
        self.buffer += data
        self.writes += 1

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def take(self) -> bytes:
        data, self.buffer = self.buffer, b""
        return data


class MockTimer:
    def __init__(self, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class MockLoop:
    """Tasks run on the real loop; timers wait for `advance()` on a virtual clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, MockTimer]] = []
        self._order = itertools.count()
        self.armed: list[str] = []  # the name of every timer callback armed, in order

    def create_task(self, coro: Awaitable[Any], **kwargs: Any) -> asyncio.Task[Any]:
        return asyncio.get_running_loop().create_task(coro, **kwargs)  # type: ignore[arg-type]

    def call_soon(self, callback: Callable[..., None], *args: Any) -> asyncio.Handle:
        return asyncio.get_running_loop().call_soon(callback, *args)

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> MockTimer:
        return self.call_at(self.now + delay, callback, *args)

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> MockTimer:
        timer = MockTimer(callback, args)
        self.armed.append(getattr(callback, "__name__", ""))
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def time(self) -> float:
        return self.now

    def pending(self) -> int:
        return sum(not timer.cancelled for _, _, timer in self._timers)

    async def advance(self, seconds: float) -> None:
        until = self.now + seconds
        while self._timers and self._timers[0][0] <= until:
            when, _, timer = heapq.heappop(self._timers)
            self.now = when
            if not timer.cancelled:
                timer.callback(*timer.args)
            await settle()
        self.now = until
        await settle()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


# ------------------------------------------------------------------ test apps


class App:
    """Answers 200 with the body it read, as JSON-ish bytes, with a Content-Length."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        answer = b"got %d" % len(body)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(answer))],
            }
        )
        await send({"type": "http.response.body", "body": answer})


async def refuse_early(scope: Any, receive: Any, send: Any) -> None:
    """413 with Connection: close, before reading any of the body (as edge.endpoints does)."""
    body = b'{"error":{}}'
    headers = [(b"content-length", b"%d" % len(body)), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def stream(scope: Any, receive: Any, send: Any) -> None:
    """A response of unknown length in three pieces (no Content-Length)."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for piece in (b"data: 1\n\n", b"data: 2\n\n"):
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


OPENED: list[Connection] = []


class Connection:
    def __init__(self, app: Any, state: ServerState | None = None) -> None:
        OPENED.append(self)
        self.loop = MockLoop()
        self.transport = MockTransport()
        self.state = state or ServerState()
        config = uvicorn.Config(
            app=app,
            http=protocol_class(LIMITS),
            ws="none",
            lifespan="off",
            timeout_keep_alive=int(KEEPALIVE),
            log_level="warning",
            access_log=False,  # as edge.server.worker runs it
            proxy_headers=False,
        )
        config.load()
        self.protocol: EdgeHttpToolsProtocol = config.http_protocol_class(  # type: ignore[assignment]
            config=config, server_state=self.state, app_state={}, _loop=self.loop
        )
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]

    async def send(self, data: bytes) -> None:
        self.protocol.data_received(data)
        await settle()

    async def send_in(self, data: bytes, reads: int) -> None:
        """`data` in `reads` reads of (nearly) equal size."""
        size = -(-len(data) // reads)
        for at in range(0, len(data), size):
            await self.send(data[at : at + size])

    @property
    def closed(self) -> bool:
        return self.transport.closed


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        try:
            await test()
        finally:
            for conn in OPENED:  # end lingers and app tasks before the loop goes
                if not conn.protocol._lost:
                    conn.protocol.connection_lost(None)
            OPENED.clear()
            await settle()

    asyncio.run(main())


def status_lines(data: bytes) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def post(body: bytes, *extra: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
        + b"".join(extra)
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


CHUNKED = b"Transfer-Encoding: chunked\r\n"
GET = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
H2C = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)


# ------------------------------------------------------------------ limits


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 2000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-N: 1\r\n" * 11 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n" + CHUNKED + b"\r\n", 400),
    ],
    ids=["request-line", "header-bytes", "header-count", "no-host", "cl-and-te"],
)
def test_refusals(request_bytes, status):
    async def test() -> None:
        app = App()
        conn = Connection(app)
        await conn.send(request_bytes)
        written = conn.transport.take()
        assert status_lines(written) == [status], written
        assert b"connection: close" in written
        assert conn.transport.eof_written  # half-closed: a client still sending is drained
        assert app.bodies == []  # the app never saw it
        await conn.send(GET)  # nothing more is parsed or answered
        assert conn.transport.take() == b""

    run(test)


@pytest.mark.parametrize("pipelined", [1, 3])
def test_a_head_in_one_read_with_a_large_body_is_not_refused_for_the_body(pipelined):
    """The header-size bound counts the fields, never a body that came in the same read."""

    async def test() -> None:
        app = App()
        conn = Connection(app)
        fields = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 80) for i in range(8))  # ~700 bytes
        await conn.send(post(b"x" * 5000, fields) * pipelined)
        assert status_lines(conn.transport.take()) == [200] * pipelined
        assert app.bodies == [b"x" * 5000] * pipelined

    run(test)


@pytest.mark.parametrize("reads", [1, 3])
def test_trailers_count_against_the_header_limit(reads):
    """llhttp reports a chunked body's trailer fields like header fields (and no headers-complete
    after them): they are held to max_headers too, not kept for as long as the client sends."""

    async def test() -> None:
        app = App()
        conn = Connection(app)
        await conn.send(
            post(b"", CHUNKED).replace(b"Content-Length: 0\r\n", b"") + b"1\r\nx\r\n0\r\n"
        )
        await conn.send_in(b"a:\r\n" * 1000, reads)  # trailer fields
        assert status_lines(conn.transport.take()) == [431]
        assert len(conn.protocol.headers) <= LIMITS.max_headers + 2  # the head's 2, then 10 more
        assert app.bodies == []

    run(test)


@pytest.mark.parametrize("reads", [1, 2, 5])
def test_header_fields_over_the_limit_are_refused_however_they_arrive(reads):
    """Fewer fields than max_headers, more bytes than max_header_bytes, in one or more reads."""

    async def test() -> None:
        app = App()
        conn = Connection(app)
        head = b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-A: " + b"a" * 1100 + b"\r\n\r\n"
        await conn.send_in(head, reads)
        assert status_lines(conn.transport.take()) == [431]
        assert app.bodies == []

    run(test)


def test_a_response_head_and_body_go_out_in_one_write():
    """One send per answer the app has whole: the head waits for the body's first bytes."""

    async def test() -> None:
        conn = Connection(App())
        await conn.send(post(CHAT) + GET)
        written = conn.transport.take()
        assert status_lines(written) == [200, 200], written
        assert conn.transport.writes == 2  # one per response, not head and body apart

    run(test)


def test_a_stream_head_goes_out_before_its_first_chunk_is_ready():
    """A held head is never held for the app: it goes out at the loop's next iteration."""
    release = asyncio.Event()

    async def slow_stream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await release.wait()
        await send({"type": "http.response.body", "body": b"data: 1\n\n"})

    async def test() -> None:
        conn = Connection(slow_stream)
        await conn.send(GET)
        assert status_lines(conn.transport.take()) == [200]  # the head, on its own
        release.set()
        await settle()
        assert conn.transport.take() == b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"

    run(test)


def test_a_held_head_is_dropped_when_the_connection_closes_first():
    """The client is gone before the held head's turn came: nothing is written after close."""
    errors: list[dict[str, Any]] = []
    opened: list[Connection] = []

    async def head_then_gone(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        opened[0].transport.closed = True  # the peer reset the connection meanwhile

    async def test() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        opened.append(Connection(head_then_gone))
        await opened[0].send(GET)
        assert opened[0].transport.buffer == b""
        assert errors == []  # no write was tried on the closed transport

    run(test)


def test_a_head_answer_without_body_bytes_is_still_sent():
    async def test() -> None:
        conn = Connection(App())
        await conn.send(b"HEAD /health HTTP/1.1\r\nHost: t\r\n\r\n")
        written = conn.transport.take()
        assert status_lines(written) == [200] and written.endswith(b"\r\n\r\n"), written

    run(test)


def test_trickled_head_is_cut_once_past_the_limit():
    async def test() -> None:
        conn = Connection(App())
        await conn.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
        line = b"X-A: " + b"a" * 200 + b"\r\n"  # fewer than max_headers lines pass the limit
        sent = 0
        while not conn.transport.buffer and sent < 4000:
            await conn.send(line[:100])  # each field in two reads: the head is incomplete
            await conn.send(line[100:])
            sent += len(line)
        written = conn.transport.take()
        assert status_lines(written) == [431] and b"too large" in written
        assert LIMITS.max_header_bytes - len(line) <= sent <= LIMITS.max_header_bytes + len(line)

    run(test)


def test_head_deadline_408_then_idle_silent_close():
    async def test() -> None:
        conn = Connection(App())
        await conn.send(b"GET / HTTP/1.1\r\nHo")
        await conn.loop.advance(LIMITS.header_timeout - 0.1)
        assert not conn.closed and conn.transport.buffer == b""
        await conn.loop.advance(0.2)
        assert status_lines(conn.transport.take()) == [408]
        assert conn.closed  # a timed-out client is not lingered for
        assert not conn.transport.eof_written

        idle = Connection(App())
        await idle.loop.advance(LIMITS.header_timeout + 0.1)
        assert idle.closed and idle.transport.buffer == b""

    run(test)


class SlowFirstStream(App):
    """The first request streams until `release` is set; later ones are App's."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        if self.calls > 1:
            await super().__call__(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await self.release.wait()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def test_a_pipelined_requests_body_deadline_starts_with_its_turn():
    """A request queued behind a long stream is not read meanwhile: its body deadline must not
    run out during the stream (a 408 written into the middle of it), only from its own start."""

    async def test() -> None:
        app = SlowFirstStream()
        conn = Connection(app)
        await conn.send(GET + post(b"x" * 100)[:-60])  # the second body is still incomplete
        await conn.loop.advance(LIMITS.body_timeout * 2)
        written = conn.transport.take()
        assert status_lines(written) == [200] and b"data: 1" in written, written
        assert not conn.closed
        app.release.set()
        await settle()
        assert b"data: [DONE]" in conn.transport.take()
        await conn.loop.advance(LIMITS.body_timeout - 1)  # counted from the second's start
        assert conn.transport.buffer == b"" and not conn.closed
        await conn.loop.advance(1.2)
        assert status_lines(conn.transport.take()) == [408]
        assert app.bodies == []

    run(test)


def test_deadlines_follow_each_request_on_a_keep_alive_connection():
    async def test() -> None:
        conn = Connection(App())
        for _ in range(20):  # back to back on one keep-alive connection, each body in 2 reads
            request = post(CHAT)
            await conn.send(request[:-3])
            await conn.send(request[-3:])
        assert status_lines(conn.transport.take()) == [200] * 20
        await conn.loop.advance(4)  # idle, within the keep-alive time
        await conn.send(b"GET / HTTP/1.1\r\nHo")  # a head starts at t=4: due at t=14
        await conn.loop.advance(LIMITS.header_timeout - 0.1)
        assert conn.transport.buffer == b"" and not conn.closed
        await conn.loop.advance(0.2)
        assert status_lines(conn.transport.take()) == [408]
        assert conn.closed

    run(test)


def test_a_head_behind_a_stream_gets_its_deadline_when_its_turn_comes():
    """A stream, a request pipelined behind it, and the start of a third head: no 408 may be
    written into the stream; the third head's deadline runs from when the answers before it
    are done (reading was paused until then)."""

    async def test() -> None:
        app = SlowFirstStream()
        conn = Connection(app)
        await conn.send(GET + GET + b"GET /health HTTP/1.1\r\nHo")
        await conn.loop.advance(LIMITS.header_timeout * 2)
        written = conn.transport.take()
        assert status_lines(written) == [200] and not conn.closed, written
        app.release.set()
        await settle()
        assert status_lines(conn.transport.take()) == [200]  # the stream's end, then B
        await conn.loop.advance(LIMITS.header_timeout - 0.1)
        assert conn.transport.buffer == b"" and not conn.closed
        await conn.loop.advance(0.2)
        assert status_lines(conn.transport.take()) == [408]
        assert conn.closed

    run(test)


def test_a_bad_head_behind_a_stream_is_not_answered_and_the_stream_finishes():
    async def test() -> None:
        app = SlowFirstStream()
        conn = Connection(app)
        await conn.send(GET)
        assert b"data: 1" in conn.transport.take()  # the stream is under way
        await conn.send(b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-N: 1\r\n" * 11 + b"\r\n")
        assert conn.transport.take() == b""  # no 431 inside the stream
        assert not conn.closed  # the stream owed is still given
        app.release.set()
        await settle()
        rest = conn.transport.take()
        assert rest.endswith(b"0\r\n\r\n") and status_lines(rest) == []  # whole, then
        assert conn.closed or conn.transport.eof_written  # closed (lingering for what is sent)

        stuck = Connection(SlowFirstStream())  # the same, to a client that stopped reading
        await stuck.send(GET)
        stuck.protocol.pause_writing()  # its window shut during the stream
        await stuck.send(b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-N: 1\r\n" * 11 + b"\r\n")
        await stuck.loop.advance(LIMITS.send_timeout + 0.1)
        assert stuck.transport.aborted  # the refusal did not take the send deadline away

        keep_alive = Connection(App())  # with nothing owed, the refusal is still answered
        await keep_alive.send(GET)
        assert status_lines(keep_alive.transport.take()) == [200]
        await keep_alive.send(b"GET / HTTP/1.1\r\n\r\n")  # no Host
        assert status_lines(keep_alive.transport.take()) == [400]
        garbage = Connection(App())
        await garbage.send(GET)
        garbage.transport.take()
        await garbage.send(b"\x01\x02 nonsense\r\n\r\n")
        assert status_lines(garbage.transport.take()) == [400]

    run(test)


def test_body_deadline_408_and_the_app_sees_a_disconnect():
    async def test() -> None:
        app = App()
        conn = Connection(app)
        await conn.send(post(b"x" * 100)[:-60])
        await conn.loop.advance(LIMITS.body_timeout + 0.1)
        assert status_lines(conn.transport.take()) == [408]
        assert conn.closed
        assert app.bodies == []

    run(test)


def test_keepalive_then_blank_lines_cannot_hold_the_connection():
    async def test() -> None:
        conn = Connection(App())
        await conn.send(GET)
        assert status_lines(conn.transport.take()) == [200]
        await conn.loop.advance(KEEPALIVE - 1)
        await conn.send(b"\r\n")  # cancels the keep-alive deadline; the head deadline follows
        await conn.loop.advance(LIMITS.header_timeout + 0.1)
        assert conn.closed

    run(test)


def test_concurrency_cap_is_503_but_health_is_exempt():
    async def test() -> None:
        state = ServerState()
        blockers = [
            asyncio.get_running_loop().create_future() for _ in range(LIMITS.max_concurrency)
        ]
        state.tasks.update(blockers)  # type: ignore[arg-type]
        conn = Connection(App(), state)
        await conn.send(post(CHAT))
        written = conn.transport.take()
        assert status_lines(written) == [503] and b"retry-after: 1" in written
        await conn.send(GET)
        assert status_lines(conn.transport.take()) == [200]
        for blocker in blockers:
            blocker.cancel()

    run(test)


def test_drain_answers_one_more_request_with_connection_close():
    async def test() -> None:
        conn = Connection(App())
        conn.protocol.shutdown()
        assert not conn.closed  # idle, but a request may already be on its way
        await conn.send(GET)
        written = conn.transport.take()
        assert status_lines(written) == [200] and b"connection: close" in written
        assert conn.closed

    run(test)


# ------------------------------------------------------------------ what real clients send


@pytest.mark.parametrize("method", [b"POST", b"PUT"])
def test_h2c_upgrade_request_is_served_with_its_body_and_the_connection_goes_on(method):
    async def test() -> None:
        app = App()
        conn = Connection(app)
        request = post(CHAT, H2C).replace(b"POST", method, 1)
        await conn.send(request + GET)
        written = conn.transport.take()
        assert status_lines(written) == [200, 200], written
        assert b"101" not in written
        assert app.bodies == [CHAT, b""]
        headers = dict(app.scopes[0]["headers"])
        assert b"upgrade" not in headers  # the app sees no upgrade
        assert headers[b"connection"] == b"HTTP2-Settings"
        assert headers[b"http2-settings"] == b"AAMAAABkAAQCAAAAAAIAAAAA"
        assert not conn.closed

    run(test)


def test_many_pipelined_upgrade_requests_in_one_read_are_all_served():
    async def test() -> None:
        app = App()
        conn = Connection(app)
        count = 1500  # deeper than the recursion limit, were each one parsed recursively
        await conn.send((b"GET /health HTTP/1.1\r\nHost: t\r\n" + H2C + b"\r\n") * count)
        for _ in range(count):
            if len(app.bodies) == count:
                break
            await settle()
        assert status_lines(conn.transport.take()) == [200] * count

    run(test)


SMUGGLED = b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n"
UPGRADE_SMUGGLING = {
    "cl-and-te": b"Content-Length: 4\r\n" + CHUNKED + b"\r\n0\r\n\r\n",
    "te-cl-second-request": CHUNKED + b"Content-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n"
    + SMUGGLED,
    "cl-duplicate-different": b"Content-Length: 13\r\nContent-Length: 5\r\n\r\n" + CHAT,
    "te-xchunked": b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
}  # fmt: skip


@pytest.mark.parametrize("rest", list(UPGRADE_SMUGGLING.values()), ids=list(UPGRADE_SMUGGLING))
def test_the_upgrade_reparse_keeps_the_parser_strict(rest):
    async def test() -> None:
        app = App()
        conn = Connection(app)
        await conn.send(b"POST / HTTP/1.1\r\nHost: t\r\n" + H2C + rest)
        assert status_lines(conn.transport.take()) == [400]
        assert app.bodies == []

    run(test)


def test_h2c_upgrade_with_the_body_in_later_reads():
    async def test() -> None:
        app = App()
        conn = Connection(app)
        request = post(b"y" * 300, H2C)
        for start in range(0, len(request), 7):  # head and body trickled
            await conn.send(request[start : start + 7])
        assert status_lines(conn.transport.take()) == [200]
        assert app.bodies == [b"y" * 300]

    run(test)


def test_websocket_upgrade_is_served_as_plain_http_and_connect_is_400():
    async def test() -> None:
        conn = Connection(App())
        await conn.send(
            b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert status_lines(conn.transport.take()) == [200]

        connect = Connection(App())
        await connect.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        assert status_lines(connect.transport.take()) == [400]

    run(test)


async def endless_stream(scope: Any, receive: Any, send: Any) -> None:
    """A stream that never ends by itself (a long generation)."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    while True:
        await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
        await asyncio.sleep(0)


def test_a_client_that_stops_reading_is_dropped_after_the_send_deadline():
    async def test() -> None:
        conn = Connection(endless_stream)
        await conn.send(post(CHAT))
        conn.protocol.pause_writing()  # the client's window is shut: the buffer filled
        await conn.loop.advance(LIMITS.send_timeout - 1)
        assert not conn.transport.aborted  # a slow reader is given its time
        conn.protocol.resume_writing()  # it read: the deadline starts over next time
        conn.protocol.pause_writing()
        await conn.loop.advance(LIMITS.send_timeout - 1)
        assert not conn.transport.aborted
        await conn.loop.advance(1.5)
        assert conn.transport.aborted  # no byte accepted for the whole deadline: dropped

    run(test)


def test_http10_stream_is_close_delimited():
    async def test() -> None:
        conn = Connection(stream)
        await conn.send(b"GET /s HTTP/1.0\r\n\r\n")
        head, _, body = conn.transport.take().partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head
        assert b"connection: close" in head
        assert body == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        assert conn.closed

        chunked = Connection(stream)  # the control: HTTP/1.1 gets chunked
        await chunked.send(b"GET /s HTTP/1.1\r\nHost: t\r\n\r\n")
        assert b"transfer-encoding: chunked" in chunked.transport.take()
        assert not chunked.closed

    run(test)


def test_http10_head_and_content_length_responses_are_unchanged():
    async def test() -> None:
        conn = Connection(App())
        await conn.send(b"GET / HTTP/1.0\r\n\r\n")
        written = conn.transport.take()
        assert b"content-length: 5" in written and written.endswith(b"got 0")
        assert conn.closed

        head = Connection(stream)
        await head.send(b"HEAD /s HTTP/1.0\r\n\r\n")
        assert head.transport.take().endswith(b"\r\n\r\n")

    run(test)


# ------------------------------------------------------------------ lingering close


async def lingering(app: Any = refuse_early) -> Connection:
    conn = Connection(app)
    await conn.send(post(b"z" * 100_000)[:2000])  # the head and the start of a large body
    written = conn.transport.take()
    assert status_lines(written) == [413], written
    assert conn.transport.eof_written and not conn.closed
    return conn


def test_early_answer_half_closes_and_drains_until_the_client_is_done():
    async def test() -> None:
        conn = await lingering()
        assert len(conn.state.tasks) == 1  # counts against the concurrency cap
        await conn.send(b"z" * 50_000)  # read and discarded, never answered
        assert conn.transport.buffer == b"" and not conn.closed
        conn.protocol.eof_received()  # the client has sent everything and half-closed
        await settle()
        assert conn.closed
        assert not conn.state.tasks

    run(test)


def test_the_drain_ends_after_linger_seconds():
    async def test() -> None:
        conn = await lingering()
        await conn.loop.advance(LINGER_SECONDS - 0.1)
        await conn.send(b"z" * 1000)
        assert not conn.closed
        await conn.loop.advance(0.2)
        assert conn.closed
        assert not conn.state.tasks

    run(test)


def test_the_drain_ends_after_linger_max_bytes():
    async def test() -> None:
        conn = await lingering()
        piece = b"z" * 65536
        for _ in range(LINGER_MAX_BYTES // len(piece)):
            await conn.send(piece)
        assert not conn.closed
        await conn.send(b"z")
        assert conn.closed

    run(test)


def test_a_client_that_hangs_up_ends_the_drain():
    async def test() -> None:
        conn = await lingering()
        conn.protocol.connection_lost(ConnectionResetError())
        await settle()
        assert not conn.state.tasks

    run(test)


def test_a_lingering_connection_takes_a_request_slot():
    async def test() -> None:
        state = ServerState()
        conns = []
        for _ in range(LIMITS.max_concurrency):
            conn = Connection(refuse_early, state)
            await conn.send(post(b"z" * 100_000)[:2000])
            conns.append(conn)
        assert len(state.tasks) == LIMITS.max_concurrency
        other = Connection(App(), state)
        await other.send(post(CHAT))
        assert status_lines(other.transport.take()) == [503]
        await conns[0].loop.advance(LINGER_SECONDS + 1)
        await other.send(post(CHAT))
        assert status_lines(other.transport.take()) == [200]
        for conn in conns[1:]:
            conn.protocol.connection_lost(None)
        await settle()

    run(test)


def test_a_complete_request_is_closed_at_once():
    async def test() -> None:
        conn = Connection(refuse_early)
        await conn.send(post(b"z" * 10))  # all of it arrived: nothing to drain
        assert status_lines(conn.transport.take()) == [413]
        assert conn.closed and not conn.transport.eof_written

    run(test)


# ------------------------------------------------------------------ the uvicorn internals relied on

TESTED_UVICORN = ("0.54",)


def test_uvicorn_is_a_tested_version():
    version = importlib.metadata.version("uvicorn")
    assert version.startswith(TESTED_UVICORN), (
        f"uvicorn {version} is not a version edge/server/protocol.py was tested with "
        f"{TESTED_UVICORN}: run tests/unit/test_protocol.py and the HTTP edge tests, then "
        "update TESTED_UVICORN and the pin in pyproject.toml"
    )


def test_the_httptools_protocol_internals_are_where_the_subclass_expects_them():
    base = httptools_impl.HttpToolsProtocol
    for name in (
        "data_received", "connection_made", "connection_lost", "eof_received", "shutdown",
        "on_message_begin", "on_url", "on_header", "on_headers_complete", "on_body",
        "on_message_complete", "_unset_keepalive_if_required", "pause_writing", "resume_writing",
        "_start_asgi_task", "on_response_complete",
    ):  # fmt: skip
        assert callable(getattr(base, name, None)), f"HttpToolsProtocol.{name} moved"
    init = inspect.getsource(base.__init__)
    for attribute in ("self.parser", "self.tasks", "self.app", "self.loop", "self.server_state",
                      "self.timeout_keep_alive_task", "self.cycle", "self.headers",
                      "self.pipeline"):  # fmt: skip
        assert attribute in init, f"HttpToolsProtocol no longer sets {attribute}"
    headers_complete = inspect.getsource(base.on_headers_complete)
    assert "RequestResponseCycle(" in headers_complete  # _Http10Cycle swaps its class
    assert "self.app" in headers_complete  # the 503 swap of self.app relies on this
    # Every request's task starts here, pipelined ones from on_response_complete: the body
    # deadline is armed there.
    assert "self._start_asgi_task(" in headers_complete
    assert "self._start_asgi_task(" in inspect.getsource(base.on_response_complete)
    assert "set_dangerous_leniencies" in init  # the re-parse configures its parser the same
    assert "self.flow.pause_writing()" in inspect.getsource(base.pause_writing)  # send deadline
    assert "write_paused" in inspect.getsource(base.__init__.__globals__["FlowControl"])


def test_the_cycle_internals_are_where_the_subclass_expects_them():
    cycle_init = inspect.getsource(httptools_impl.RequestResponseCycle.__init__)
    for attribute in (
        "self.response_started", "self.response_complete", "self.more_body", "self.keep_alive",
        "self.chunked_encoding", "self.disconnected", "self.message_event", "self.flow",
        "self.transport", "self.on_response", "self.scope",
    ):  # fmt: skip
        assert attribute in cycle_init, f"RequestResponseCycle no longer sets {attribute}"
    send = inspect.getsource(httptools_impl.RequestResponseCycle.send)
    assert "self.chunked_encoding is None" in send  # how chunked framing is chosen
    assert "self.transport.close()" in send  # how a close after a response happens


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"x-bad name", b"v"),
        (b"x-bad:name", b"v"),
        (b"x-ok", b"v\r\nx-injected: 1"),
        (b"x-ok", b"v\x00"),
        (b"x-ok", b"v\x7f"),
    ],
)
@pytest.mark.parametrize("position", ["first", "last"])
def test_a_head_with_a_bad_header_is_never_written(name, value, position):
    """The head's headers are checked together: a bad name or value anywhere sends no head."""

    async def bad_header(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
        headers.insert(0 if position == "first" else len(headers), (name, value))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    async def test() -> None:
        conn = Connection(bad_header)
        await conn.send(GET)
        written = conn.transport.take()
        assert b"x-injected" not in written and value not in written, written
        assert b"HTTP/1.1 200" not in written

    run(test)


def test_head_fields_are_written_as_uvicorn_writes_them():
    """Connection: close from the app ends the connection; a missing length means chunked."""

    async def closing(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"Content-Length", b"2"), (b"Connection", b"Keep-Alive, Close")]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    async def test() -> None:
        conn = Connection(closing)
        await conn.send(GET)
        written = conn.transport.take()
        assert written.startswith(b"HTTP/1.1 201 Created\r\n"), written
        assert b"\r\ncontent-length: 2\r\nconnection: Keep-Alive, Close\r\n\r\nok" in written
        assert conn.closed
        conn = Connection(stream)
        await conn.send(GET)
        written = conn.transport.take()
        assert b"transfer-encoding: chunked\r\n" in written and written.endswith(b"0\r\n\r\n")
        assert not conn.closed

    run(test)


def test_httptools_skips_an_upgrade_body_and_stops_after_the_head():
    """The behaviour the h2c re-parse works around: if it changes, the work-around is moot."""
    events: list[str] = []

    class Callbacks:
        def on_body(self, body: bytes) -> None:
            events.append("body")

        def on_message_complete(self) -> None:
            events.append("complete")

    parser = httptools.HttpRequestParser(Callbacks())
    request = post(CHAT, H2C)
    with pytest.raises(httptools.HttpParserUpgrade) as stopped:
        parser.feed_data(request)
    assert events == ["complete"]
    assert request[stopped.value.args[0] :] == CHAT
