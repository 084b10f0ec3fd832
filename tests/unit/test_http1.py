"""edge.upstream.http1 against scripted upstreams on loopback sockets: keep-alive reuse and
its limits, bodies of every framing, malformed and oversized answers, the pool's bound and
the buffer budget, idle expiry, stream backpressure and read timeouts, cancellation, the
order addresses are tried in."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from edge.upstream.http1 import (
    HIGH_WATER,
    Budget,
    BufferFull,
    ConnectFailed,
    Disconnected,
    InvalidResponse,
    Origin,
    Pool,
    PoolBusy,
    ResponseTooLarge,
    request_head,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request (head and Content-Length body); b"" when the client closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


class Upstream:
    """A scripted server: `answer(request_number)` gives the bytes to write per request
    (None: write nothing and keep the connection; b"CLOSE": close it)."""

    def __init__(self, answer: Callable[[int], bytes | None]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while request := await read_request(reader):
                self.requests.append(request)
                data = self.answer(len(self.requests))
                if data == b"CLOSE":
                    break
                if data is not None:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def serve(answer: Callable[[int], bytes | None]) -> tuple[Upstream, Origin, asyncio.Server]:
    upstream = Upstream(answer)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return upstream, Origin(f"http://127.0.0.1:{port}/v1"), server


async def exchange(
    pool: Pool, origin: Origin, limit: int = 1 << 20, body: bytes = b"{}", patience: float = 2.0
):
    conn = await pool.acquire(origin, patience)
    head = request_head(origin, b"POST", "/chat/completions", {"x-a": "1"}, len(body))
    try:
        conn.send(head + body, limit)
        await conn.wait(asyncio.get_running_loop().time() + patience)
        return conn.status, dict(conn.headers), conn.body()
    finally:
        conn.done()


async def until(predicate: Callable[[], bool], seconds: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_the_request_is_written_whole_and_the_connection_reused():
    async def main() -> None:
        upstream, origin, server = await serve(lambda n: OK)
        pool = Pool(4)
        for _ in range(3):
            status, headers, body = await exchange(pool, origin)
            assert (status, body, headers["content-type"]) == (200, b"{}", "application/json")
        assert upstream.connections == 1 and pool.open_connections == 1
        port = origin.port
        assert upstream.requests[0] == (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
            b"x-a: 1\r\ncontent-length: 2\r\n\r\n{}" % port
        )
        await pool.close()
        server.close()

    run(main())


def test_a_get_without_body_sends_no_content_length():
    origin = Origin("https://api.example.com")
    assert (origin.host, origin.port, origin.tls, origin.prefix) == (
        "api.example.com",
        443,
        True,
        b"",
    )
    head = request_head(origin, b"GET", "/models", {}, 0)
    assert head == b"GET /models HTTP/1.1\r\nhost: api.example.com\r\n\r\n"
    v6 = Origin("http://[::1]:8081/base/")
    assert (v6.host, v6.port, v6.prefix, v6.host_line) == (
        "::1",
        8081,
        b"/base",
        b"host: [::1]:8081\r\n",
    )


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
def test_a_connection_the_upstream_will_close_is_not_reused(answer):
    async def main() -> None:
        upstream, origin, server = await serve(lambda n: answer)
        pool = Pool(4)
        for _ in range(2):
            assert (await exchange(pool, origin))[2] == b"{}"
        assert upstream.connections == 2
        await until(lambda: pool.open_connections == 0)
        await pool.close()
        server.close()

    run(main())


def test_chunked_and_close_delimited_bodies_are_read_whole():
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end"

    async def main() -> None:
        upstream, origin, server = await serve(lambda n: chunked if n == 1 else until_close)
        pool = Pool(4)
        assert (await exchange(pool, origin))[2] == b"abcde"
        # the body that ends with the connection: complete when the server closes
        conn = await pool.acquire(origin, 2.0)
        conn.send(request_head(origin, b"GET", "/x", {}, 0), 1 << 20)
        loop = asyncio.get_running_loop()
        waiter = asyncio.ensure_future(conn.wait(loop.time() + 2.0))
        await until(lambda: len(upstream.requests) == 2)
        upstream.writers[-1].close()  # the server ends the body by closing
        await waiter
        assert conn.body() == b"to the end"
        conn.done()
        await pool.close()
        server.close()

    run(main())


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", Disconnected),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", Disconnected),
        (b"HTTP/1.1 200 OK\r\nContent-Len", Disconnected),
        (b"this is not HTTP at all\r\n\r\n", InvalidResponse),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", InvalidResponse),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", InvalidResponse),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n", InvalidResponse),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", InvalidResponse),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n", ResponseTooLarge),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + b"a" * 1024,
            ResponseTooLarge,
        ),
    ],
)
def test_broken_malformed_and_oversized_answers_fail_and_close(answer, error):
    async def main() -> None:
        upstream, origin, server = await serve(lambda n: answer)
        pool = Pool(4)
        conn = await pool.acquire(origin, 2.0)
        conn.send(request_head(origin, b"GET", "/x", {}, 0), 1000)
        waiting = asyncio.ensure_future(conn.wait(asyncio.get_running_loop().time() + 2.0))
        await until(lambda: bool(upstream.requests))
        upstream.writers[0].close()  # a truncated answer ends with the connection
        with pytest.raises(error):
            await waiting
        conn.done()
        assert conn.closed and pool.open_connections == 0
        await pool.close()
        server.close()

    run(main())


def test_an_interim_100_answer_is_skipped():
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" + OK

    async def main() -> None:
        _, origin, server = await serve(lambda n: answer)
        pool = Pool(2)
        assert (await exchange(pool, origin))[:1] == (200,)
        assert (await exchange(pool, origin))[2] == b"{}"
        await pool.close()
        server.close()

    run(main())


def test_bytes_nobody_asked_for_close_the_connection():
    async def main() -> None:
        upstream, origin, server = await serve(lambda n: OK + b"HTTP/1.1 200 OK\r\n")
        pool = Pool(2)
        assert (await exchange(pool, origin))[2] == b"{}"
        await until(lambda: pool.open_connections == 0)
        assert (await exchange(pool, origin))[2] == b"{}"
        assert upstream.connections == 2
        await pool.close()
        server.close()

    run(main())


def test_an_idle_connection_the_upstream_closed_is_not_handed_out():
    async def main() -> None:
        upstream, origin, server = await serve(lambda n: OK)
        pool = Pool(2)
        await exchange(pool, origin)
        upstream.writers[0].close()  # the upstream's keep-alive timeout
        await until(lambda: pool.open_connections == 0)
        assert (await exchange(pool, origin))[0] == 200
        assert upstream.connections == 2
        await pool.close()
        server.close()

    run(main())


def test_idle_connections_are_closed_after_the_keepalive_time():
    async def main() -> None:
        upstream, origin, server = await serve(lambda n: OK)
        pool = Pool(2, keepalive_s=0.2)
        await exchange(pool, origin)
        assert pool.open_connections == 1
        await until(lambda: pool.open_connections == 0)
        assert upstream.writers[0].is_closing() or upstream.connections == 1
        await pool.close()
        server.close()

    run(main())


def test_a_full_pool_refuses_at_once_and_a_closed_connection_makes_room():
    """One provider's pool: at its bound a request is refused at once (PoolBusy, nothing
    sent), never queued behind connections that long streams may hold for minutes."""

    async def main() -> None:
        upstream, origin, server = await serve(lambda n: None)  # answers nothing: held
        pool = Pool(2)
        held = [await pool.acquire(origin, 2.0) for _ in range(2)]
        for conn in held:
            conn.send(request_head(origin, b"GET", "/x", {}, 0), 1000)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(PoolBusy):
            await pool.acquire(origin, 2.0)
        assert loop.time() - started < 0.5  # at once, not after the connect timeout
        assert pool.open_connections == 2 and upstream.connections == 2
        held[0].close()
        third = await pool.acquire(origin, 2.0)  # the room a closed connection left
        assert pool.open_connections == 2
        for conn in (held[1], third):
            conn.close()
        await pool.close()
        server.close()

    run(main())


def test_the_buffer_budget_bounds_the_whole_answers_held_and_comes_back():
    """Whole answers take their bytes from the worker's budget (a Content-Length at once,
    a chunked body as it comes), and give them back with the answer; past the budget the
    answer fails as BufferFull and holds nothing."""
    big = b"x" * 3000
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n" + big
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"".join(b"%x\r\n%s\r\n" % (500, big[:500]) for _ in range(6)) + b"0\r\n\r\n"

    async def main() -> None:
        for answer in (sized, chunked):
            _, origin, server = await serve(lambda n, answer=answer: answer)
            budget = Budget(5000)
            pool = Pool(4, budget=budget)
            conn = await pool.acquire(origin, 2.0)
            conn.send(request_head(origin, b"GET", "/x", {}, 0), 1 << 20)
            await conn.wait(asyncio.get_running_loop().time() + 2.0)
            held = conn.hand_over()
            assert held == 3000 and budget.held == 3000
            conn.done()
            assert budget.held == 3000  # handed over: the answer's to give back
            second = await pool.acquire(origin, 2.0)
            second.send(request_head(origin, b"GET", "/x", {}, 0), 1 << 20)
            with pytest.raises(BufferFull):
                await second.wait(asyncio.get_running_loop().time() + 2.0)
            assert budget.held == 3000  # the refused answer holds nothing
            budget.give(held)
            assert budget.held == 0
            await pool.close()
            server.close()

    run(main())


def test_a_refused_connection_is_connect_failed():
    async def main() -> None:
        _, origin, server = await serve(lambda n: OK)
        server.close()
        await server.wait_closed()
        pool = Pool(2)
        with pytest.raises(ConnectFailed):
            await pool.acquire(origin, 2.0)
        assert pool.open_connections == 0
        await pool.close()

    run(main())


def test_a_stream_pauses_the_socket_and_times_out_reads():
    big = b"x" * (4 * HIGH_WATER)
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )

    async def main() -> None:
        _, origin, server = await serve(lambda n: head + b"%x\r\n%s\r\n" % (len(big), big))
        pool = Pool(2)
        conn = await pool.acquire(origin, 2.0)
        conn.send(request_head(origin, b"POST", "/s", {}, 0), 0)
        await conn.wait(asyncio.get_running_loop().time() + 2.0)
        assert conn.status == 200
        await until(lambda: conn._buffered > HIGH_WATER)
        await asyncio.sleep(0.1)
        # not read: the socket was paused; what waits is bounded by one read past the mark
        assert conn._paused and conn._buffered < HIGH_WATER + 300_000
        got = 0
        while got < len(big):
            got += len(await conn.readany(2.0))
        assert got == len(big)
        with pytest.raises(TimeoutError):  # the stream stalls: the read's bound ends it
            await conn.readany(0.05)
        conn.done()
        assert conn.closed and pool.open_connections == 0
        await pool.close()
        server.close()

    run(main())


def test_a_cancelled_exchange_closes_its_connection():
    async def main() -> None:
        upstream, origin, server = await serve(lambda n: None)  # never answers
        pool = Pool(2)
        conn = await pool.acquire(origin, 2.0)
        conn.send(request_head(origin, b"GET", "/x", {}, 0), 1000)
        waiting = asyncio.ensure_future(conn.wait(None))
        await until(lambda: len(upstream.requests) == 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        conn.done()
        assert conn.closed and pool.open_connections == 0
        await until(lambda: upstream.writers[0].is_closing())
        await pool.close()
        server.close()

    run(main())


def test_a_deadline_ends_the_wait_with_timeout_error():
    async def main() -> None:
        _, origin, server = await serve(lambda n: None)
        pool = Pool(2)
        conn = await pool.acquire(origin, 2.0)
        conn.send(request_head(origin, b"GET", "/x", {}, 0), 1000)
        with pytest.raises(TimeoutError):
            await conn.wait(asyncio.get_running_loop().time() + 0.05)
        conn.done()
        assert pool.open_connections == 0
        await pool.close()
        server.close()

    run(main())


def test_https_origins_are_verified(tmp_path):
    import ssl
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        upstream = Upstream(lambda n: OK)
        server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0, ssl=served)
        origin = Origin(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        pool = Pool(2, tls=trusting)
        # Both ends of the TLS handshake run on this one loop: on a loaded machine that can
        # take longer than the 2 s the other tests give a plain connection.
        assert (await exchange(pool, origin, patience=20.0))[2] == b"{}"
        assert (await exchange(pool, origin, patience=20.0))[2] == b"{}"
        assert upstream.connections == 1  # kept alive over TLS too
        await pool.close()
        system = Pool(2)  # the system's CAs do not know this certificate: refused
        with pytest.raises(ConnectFailed):
            await system.acquire(origin, 2.0)
        await system.close()
        server.close()

    run(main())


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


class FakeTransport:
    def __init__(self) -> None:
        self.paused = self.closed = False
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed


def test_a_stream_left_unread_and_paused_is_never_reused():
    big = b"x" * (2 * HIGH_WATER)
    whole = STREAM_HEAD + b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)

    async def main() -> None:
        from edge.upstream.http1 import Connection

        pool = Pool(2)
        conn = Connection(pool, ("h", 80, False))
        transport = FakeTransport()
        conn.connection_made(transport)
        pool._all.add(conn)
        conn.send(b"POST /s HTTP/1.1\r\n\r\n", 0)
        conn.data_received(whole)  # the end arrives in the same read as 128 KiB unread
        assert conn._complete and transport.paused
        conn.done()  # the stream closed unread: a paused socket must not serve again
        assert conn.closed and transport.closed and pool.open_connections == 0
        await pool.close()

    run(main())


def test_closing_a_connection_someone_reads_fails_the_read_and_never_pools_it():
    async def main() -> None:
        _, origin, server = await serve(lambda n: STREAM_HEAD)
        pool = Pool(2)
        conn = await pool.acquire(origin, 2.0)
        conn.send(request_head(origin, b"POST", "/s", {}, 0), 0)
        await conn.wait(asyncio.get_running_loop().time() + 2.0)
        reading = asyncio.ensure_future(conn.readany(5.0))
        await asyncio.sleep(0.01)
        conn._complete = conn._keep_alive = True  # as if the end arrived in the same pass
        conn.done()  # somebody still waits in readany: closed, not pooled
        with pytest.raises(Disconnected):
            await reading
        assert conn.closed and pool.idle_connection(origin.key()) is None
        await pool.close()
        server.close()

    run(main())


@pytest.mark.parametrize(
    "endless",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: ",  # a header value that never ends
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-Trailer: ",
    ],
)
def test_a_header_or_trailer_line_without_end_is_cut_off_at_the_bound(endless):
    async def main() -> None:
        upstream, origin, server = await serve(lambda n: endless)
        pool = Pool(2)
        conn = await pool.acquire(origin, 2.0)
        conn.send(request_head(origin, b"GET", "/x", {}, 0), 0 if b"chunked" in endless else 1000)
        await until(lambda: bool(upstream.writers))
        with pytest.raises(InvalidResponse):
            for _ in range(64):  # 4 MiB at most; the bound is 64 KiB
                upstream.writers[0].write(b"a" * 65536)
                await upstream.writers[0].drain()
                await asyncio.sleep(0)
                if conn.closed:
                    break
            await conn.wait(asyncio.get_running_loop().time() + 2.0)
            while await conn.readany(2.0):
                pass
        assert conn.closed
        await pool.close()
        server.close()

    run(main())


def test_trailers_are_not_headers_and_tiny_chunks_make_one_body():
    body = b"".join(b"1\r\n%c\r\n" % c for c in b"hello world" * 100)
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
        + b"0\r\nRetry-After: 999\r\n\r\n"
    )

    async def main() -> None:
        _, origin, server = await serve(lambda n: answer)
        pool = Pool(2)
        _, headers, got = await exchange(pool, origin)
        assert got == b"hello world" * 100
        assert "retry-after" not in headers
        await pool.close()
        server.close()

    run(main())


def test_a_body_to_the_end_of_the_connection_cut_by_a_reset_is_an_error():
    import socket
    import struct

    def answer(n: int) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial"  # to the end

    async def main() -> None:
        upstream, origin, server = await serve(answer)
        pool = Pool(2)
        conn = await pool.acquire(origin, 2.0)
        conn.send(request_head(origin, b"GET", "/x", {}, 0), 1000)
        waiting = asyncio.ensure_future(conn.wait(asyncio.get_running_loop().time() + 2.0))
        await until(lambda: conn.received)
        sock = upstream.writers[0].get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        upstream.writers[0].transport.abort()  # RST, not FIN
        with pytest.raises(Disconnected):
            await waiting
        conn.done()
        await pool.close()
        server.close()

    run(main())


def test_an_unreachable_first_address_does_not_use_up_the_connect_timeout():
    import socket

    async def main() -> None:
        _, origin, server = await serve(lambda n: OK)
        pool = Pool(2)
        black_hole = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.255.255.1", origin.port))
        good = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", origin.port))

        async def resolve(host: str, port: int) -> list:
            return [black_hole, good]

        pool._resolve = resolve  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await exchange(pool, origin))[0] == 200
        assert loop.time() - started < 2.0  # the connect timeout given is 2 s
        await pool.close()
        server.close()

    run(main())


def test_many_dead_addresses_ahead_of_a_live_one_and_the_order_learns():
    """The head start each address gets fits the connect timeout (so the live one, last of
    25, still gets its turn), and the addresses that failed go last the next time."""
    import socket

    async def main() -> None:
        _, origin, server = await serve(lambda n: OK)
        pool = Pool(4)
        dead = [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"10.255.255.{i}", origin.port))
            for i in range(1, 25)
        ]
        good = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", origin.port))
        looked_up = 0

        async def resolve(host: str, port: int) -> list:
            nonlocal looked_up
            looked_up += 1
            return [*dead, good]

        pool._resolve = resolve  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        started = loop.time()
        conn = await pool.acquire(origin, 3.0)  # 25 addresses x 0.25 s would take 6 s
        assert loop.time() - started < 3.0
        conn.close()
        started = loop.time()
        conn = await pool.acquire(origin, 3.0)  # the dead ones that failed go last now
        assert loop.time() - started < 1.0
        conn.close()
        await pool.close()
        server.close()

    run(main())


def test_a_get_on_a_reused_connection_the_upstream_dropped_is_sent_again():
    from edge.config import Config
    from edge.observability.context import RequestContext
    from edge.routing.outcome import UpstreamOutcome
    from edge.routing.providers import Providers
    from edge.upstream.client import Upstream as Client

    async def main() -> None:
        # the second request finds its (reused) connection closed without an answer
        upstream, origin, server = await serve(lambda n: b"CLOSE" if n in (2, 5) else OK)
        config = Config.from_env({"UPSTREAM_URL": f"http://127.0.0.1:{origin.port}/v1"})
        provider = Providers.single(config).default
        client = Client(config)
        await client.start()
        ctx = RequestContext("rid", None)
        first = await client.call("GET", "/models", None, ctx, UpstreamOutcome(), provider)
        again = await client.call("GET", "/models", None, ctx, UpstreamOutcome(), provider)
        assert (first.status, again.status, upstream.connections) == (200, 200, 2)
        # a POST may have been acted on: never sent twice
        await client.call("POST", "/chat/completions", b"{}", ctx, UpstreamOutcome(), provider)
        outcome = UpstreamOutcome()
        with pytest.raises(Exception) as refused:
            await client.call("POST", "/chat/completions", b"{}", ctx, outcome, provider)
        assert getattr(refused.value, "status", None) == 502
        assert outcome.error == "disconnect" and len(upstream.requests) == 5
        await client.close()
        server.close()

    run(main())


def test_an_upstream_that_accepts_and_closes_at_once_is_an_upstream_error():
    """Under uvloop, as the workers run: the placeholder sees the close before the connection
    is handed over, and the attempt fails as an upstream error (never a RuntimeError)."""
    import uvloop

    from edge.upstream.http1 import UpstreamError

    async def main() -> None:
        async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(slam, "127.0.0.1", 0)
        origin = Origin(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        pool = Pool(4)
        for _ in range(20):
            try:
                async with asyncio.timeout(5):
                    conn = await pool.acquire(origin, 2.0)
                    await asyncio.sleep(0.005)  # a busy worker: the close lands first
                    conn.send(request_head(origin, b"GET", "/x", {}, 0), 1000)
                    await conn.wait(asyncio.get_running_loop().time() + 2.0)
            except UpstreamError:
                pass
            else:
                raise AssertionError("answered by a server that only closes")
        assert pool.open_connections == 0
        await pool.close()
        server.close()

    uvloop.run(main())


def test_one_lookup_per_host_for_a_burst_and_families_alternate_from_the_first():
    import socket

    async def main() -> None:
        _, origin, server = await serve(lambda n: OK)
        loop = asyncio.get_running_loop()
        lookups = []
        real = loop.getaddrinfo

        async def counted(*args, **kwargs):
            lookups.append(args[0])
            await asyncio.sleep(0.05)
            return await real(*args, **kwargs)

        loop.getaddrinfo = counted  # type: ignore[method-assign]
        pool = Pool(50)
        await asyncio.gather(*(pool.acquire(origin, 2.0) for _ in range(20)))
        assert lookups == ["127.0.0.1"] and pool.open_connections == 20
        await pool.close()
        server.close()

        v4 = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 80))
        v4b = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.2", 80))
        v6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 80, 0, 0))

        async def fixed(*args, **kwargs):
            return [v4, v4b, v6]

        loop.getaddrinfo = fixed  # type: ignore[method-assign]
        assert await Pool(1)._resolve("example.test", 80) == [v4, v6, v4b]

    run(main())


def test_the_rest_of_a_streamed_exchange_is_collected_whole_within_the_bound():
    answer = b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"

    async def main() -> None:
        upstream, origin, server = await serve(lambda n: answer)
        pool = Pool(2)
        for limit, rest in ((100, b"2\r\nde\r\n0\r\n\r\n"), (4, b"2\r\nde\r\n0\r\n\r\n")):
            conn = await pool.acquire(origin, 2.0)
            conn.send(request_head(origin, b"POST", "/s", {}, 0), 0)  # asked as a stream
            await conn.wait(asyncio.get_running_loop().time() + 2.0)
            await until(lambda c=conn: c._buffered == 3)
            conn.collect(limit)
            upstream.writers[-1].write(rest)
            if limit == 4:
                with pytest.raises(ResponseTooLarge):
                    await conn.wait(asyncio.get_running_loop().time() + 2.0)
                assert conn.closed
            else:
                await conn.wait(asyncio.get_running_loop().time() + 2.0)
                assert (conn.status, conn.body()) == (500, b"abcde")
            conn.done()
        with pytest.raises(ResponseTooLarge):  # already past the bound when asked
            conn = await pool.acquire(origin, 2.0)
            conn.send(request_head(origin, b"POST", "/s", {}, 0), 0)
            await conn.wait(asyncio.get_running_loop().time() + 2.0)
            await until(lambda c=conn: c._buffered == 3)
            conn.collect(2)
        conn.close()
        await pool.close()
        server.close()

    run(main())
