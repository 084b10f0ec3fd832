"""The HTTP edge held to its limits with raw sockets against real gunicorn (2 workers).

Request line, header block (sent whole and trickled), header count, body size (declared and
chunked), the request-smuggling corpus, slowloris heads, slow bodies and the per-worker
concurrency cap; and what real clients send: h2c upgrades (curl --http2), HTTP/1.0, HEAD,
compressed bodies, whole bodies written before the answer is read. Every refusal must come as
the documented status, on a connection the server then closes, with no second response behind
it; and the server must stay healthy throughout.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import select
import shutil
import socket
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import Gunicorn, Upstream, wait_until

from edge.server.protocol import LINGER_MAX_BYTES, LINGER_SECONDS

KEY = "sk-http-edge-test-key"
MAX_BODY = 4096
MAX_LINE = 4096
MAX_HEADER_BYTES = 8192
MAX_HEADERS = 32
HEAD_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
KEEPALIVE = 2
SLACK = 3.0  # scheduling slack on top of a deadline: enough to prove "no hang", not a speed bound

CHAT = b'{"model":"m","messages":[{"role":"user","content":"hello"}]}'
POST_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\n"
    b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
)
STATUS_LINE = re.compile(rb"HTTP/1\.[01] \d{3} ")


@pytest.fixture(scope="module")
def edge():
    server = Gunicorn(
        API_KEYS=KEY,
        RATE_LIMIT_ENABLED="false",
        MAX_REQUEST_SIZE=str(MAX_BODY),
        HTTP_MAX_REQUEST_LINE=str(MAX_LINE),
        HTTP_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
        HTTP_MAX_HEADERS=str(MAX_HEADERS),
        HTTP_HEADER_TIMEOUT_SECONDS=str(HEAD_TIMEOUT),
        HTTP_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT),
        KEEPALIVE_TIMEOUT_SECONDS=str(KEEPALIVE),
        SERVER_TIMEOUT_SECONDS="2",
    )
    yield server
    server.stop()


# ------------------------------------------------------------------ raw-socket helpers


def connect(server: Gunicorn, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes, or until `timeout`: (data, closed)."""
    deadline = time.monotonic() + timeout
    chunks = []
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
    return b"".join(chunks), False


def exchange(server: Gunicorn, request: bytes, timeout: float = 10.0) -> tuple[bytes, bool]:
    with connect(server) as sock:
        # The server may refuse before it has read everything; its answer is read below.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        return read_until_closed(sock, timeout)


def trickle(sock: socket.socket, data: bytes, piece: int, pause: float) -> tuple[int, bytes, bool]:
    """Send `data` `piece` bytes at a time, `pause` apart, stopping as soon as the server
    answers or closes. Returns (bytes sent, what the server sent, whether it closed)."""
    sent = 0
    while sent < len(data):
        try:
            sock.sendall(data[sent : sent + piece])
        except (BrokenPipeError, ConnectionResetError):
            break
        sent = min(len(data), sent + piece)
        readable, _, _ = select.select([sock], [], [], pause)
        if readable:
            break
    response, closed = read_until_closed(sock, timeout=10)
    return sent, response, closed


def status_of(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert match, response[:200]
    return int(match.group(1))


def header(response: bytes, name: str) -> str | None:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def envelope(response: bytes) -> dict:
    """The OpenAI error envelope of a single raw response (content-length framed)."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert (header(response, "content-type") or "").startswith("application/json"), head
    length = int(header(response, "content-length") or -1)
    assert len(body) >= length >= 0, response
    error = json.loads(body[:length])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


def assert_refused(response: bytes, closed: bool, status: int) -> dict:
    """One response of `status`, with the envelope, on a connection the server closed."""
    assert status_of(response) == status, response[:300]
    assert len(STATUS_LINE.findall(response)) == 1, response
    assert closed, "the server kept the connection open after refusing the request"
    assert (header(response, "connection") or "").lower() == "close"
    return envelope(response)


def post(body: bytes, *extra: bytes) -> bytes:
    return (
        POST_HEAD
        + b"".join(extra)
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )


def ready(server: Gunicorn) -> None:
    response = httpx.get(server.url + "/health/ready", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


# ------------------------------------------------------------------ request line and headers


def test_long_request_line_is_414_and_closed(edge):
    line = b"GET /health?pad=" + b"a" * (MAX_LINE + 100) + b" HTTP/1.1\r\nHost: edge\r\n\r\n"
    error = assert_refused(*exchange(edge, line), 414)
    assert error["code"] == "request_line_too_long"


def test_request_line_just_under_the_limit_is_served(edge):
    target = b"/health?pad=" + b"a" * (MAX_LINE - 200)
    response, _ = exchange(
        edge, b"GET " + target + b" HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n"
    )
    assert status_of(response) == 200


def test_long_request_line_trickled_is_414_before_it_ends(edge):
    line = b"GET /health?pad=" + b"a" * (MAX_LINE * 4) + b" HTTP/1.1\r\nHost: edge\r\n\r\n"
    with connect(edge) as sock:
        sent, response, closed = trickle(sock, line, 512, 0.01)
    assert_refused(response, closed, 414)
    assert sent < len(line), "the server read the whole request line before refusing it"


def test_oversized_header_block_sent_whole_is_431_and_closed(edge):
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(12))  # ~12 KiB
    request = b"GET /health HTTP/1.1\r\nHost: edge\r\n" + pad + b"\r\n"
    error = assert_refused(*exchange(edge, request), 431)
    assert error["code"] == "request_header_fields_too_large"


def test_one_huge_header_sent_whole_is_431(edge):
    request = b"GET /health HTTP/1.1\r\nHost: edge\r\nX-Huge: " + b"h" * 200_000 + b"\r\n\r\n"
    assert_refused(*exchange(edge, request), 431)


@pytest.mark.parametrize("shape", ["many-headers", "one-header"])
def test_oversized_header_block_trickled_is_431_before_it_ends(edge, shape):
    """1 KiB per send: the server cuts it as soon as it passes the limit, not at the end."""
    if shape == "many-headers":
        pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 2000) for i in range(MAX_HEADERS - 4))
    else:  # a single header whose value never completes within the limit
        pad = b"X-Huge: " + b"h" * (MAX_HEADER_BYTES * 8) + b"\r\n"
    request = b"GET /health HTTP/1.1\r\nHost: edge\r\n" + pad + b"\r\n"
    assert len(request) > MAX_HEADER_BYTES * 6
    with connect(edge) as sock:
        sent, response, closed = trickle(sock, request, 1024, 0.03)
    assert_refused(response, closed, 431)
    # Cut as soon as it passed the limit, long before the end (the margin only absorbs the
    # time the refusal takes to reach this client, a few sends at most on a quiet machine).
    assert MAX_HEADER_BYTES < sent < len(request) - 16 * 1024, sent


@pytest.mark.parametrize("trickled", [False, True], ids=["whole", "trickled"])
def test_header_block_under_the_limit_is_served(edge, trickled):
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 500) for i in range(12))  # ~6.2 KiB
    request = b"GET /health HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n" + pad + b"\r\n"
    assert len(request) < MAX_HEADER_BYTES - 1024
    with connect(edge) as sock:
        if trickled:
            _, response, _ = trickle(sock, request, 1024, 0.02)
        else:
            sock.sendall(request)
            response, _ = read_until_closed(sock)
    assert status_of(response) == 200, response[:300]


def test_too_many_headers_is_431_and_closed(edge):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(MAX_HEADERS + 10))
    request = b"GET /health HTTP/1.1\r\nHost: edge\r\n" + fields + b"\r\n"
    error = assert_refused(*exchange(edge, request), 431)
    assert error["code"] == "request_header_fields_too_large"


def test_header_count_at_the_limit_is_served(edge):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(MAX_HEADERS - 2))  # + Host + Connection
    request = b"GET /health HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n" + fields + b"\r\n"
    response, _ = exchange(edge, request)
    assert status_of(response) == 200, response[:300]


# ------------------------------------------------------------------ request body size


def test_content_length_over_the_limit_is_413_before_the_body(edge):
    with connect(edge) as sock:
        sock.sendall(POST_HEAD + b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        response, closed = read_until_closed(sock, timeout=BODY_TIMEOUT + SLACK)
    assert status_of(response) == 413
    assert envelope(response)["code"] == "request_too_large"
    assert closed
    assert len(STATUS_LINE.findall(response)) == 1


def test_huge_content_length_is_413_before_the_body(edge):
    with connect(edge) as sock:
        sock.sendall(POST_HEAD + b"Content-Length: 99999999999\r\n\r\n")
        sock.settimeout(5)
        first = sock.recv(65536)  # before a single body byte was sent
    assert status_of(first) == 413


def test_chunked_body_growing_past_the_limit_is_413_while_still_sending(edge):
    chunks = 40  # 40 x 512 bytes = 20 KiB, five times the limit
    with connect(edge) as sock:
        sock.sendall(POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        sent = 0
        for index in range(chunks):
            piece = (b'{"model":"' if index == 0 else b"").ljust(512, b"x")
            try:
                sock.sendall(b"200\r\n" + piece + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                break
        response, closed = read_until_closed(sock)
    assert status_of(response) == 413, response[:300]
    assert envelope(response)["code"] == "request_too_large"
    assert closed
    assert sent < chunks, "the 413 only came after the client had sent everything"
    # Refused at the first byte past the limit: about MAX_BODY / 512 chunks, plus the time the
    # refusal takes to reach this client.
    assert MAX_BODY // 512 <= sent <= MAX_BODY // 512 + 12, sent


def test_body_exactly_at_the_limit_is_accepted(edge):
    prefix = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"pad":"'
    body = prefix + b"x" * (MAX_BODY - len(prefix) - 2) + b'"}'
    assert len(body) == MAX_BODY
    response, _ = exchange(edge, post(body))
    assert status_of(response) == 200, response[:300]
    chunked = (
        POST_HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )  # fmt: skip
    response, _ = exchange(edge, chunked)
    assert status_of(response) == 200, response[:300]
    response, _ = exchange(edge, post(body + b" "))
    assert status_of(response) == 413


# ------------------------------------------------------------------ request smuggling corpus

SMUGGLED = b"GET /health/live HTTP/1.1\r\nHost: edge\r\n\r\n"

SMUGGLING = {
    "cl-and-te": POST_HEAD + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-and-cl": POST_HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "te-xchunked": POST_HEAD + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te-chunked-gzip": POST_HEAD + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": POST_HEAD + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te-identity": POST_HEAD + b"Transfer-Encoding: identity\r\n\r\n" + CHAT,
    "te-twice": POST_HEAD
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "cl-duplicate-same": POST_HEAD
    + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(CHAT), len(CHAT))
    + CHAT,
    "cl-duplicate-different": POST_HEAD
    + b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n" % len(CHAT)
    + CHAT,
    "cl-comma-list": POST_HEAD + b"Content-Length: %d, %d\r\n\r\n" % (len(CHAT), len(CHAT)) + CHAT,
    "cl-negative": POST_HEAD + b"Content-Length: -1\r\n\r\n" + CHAT,
    "cl-non-numeric": POST_HEAD + b"Content-Length: abc\r\n\r\n" + CHAT,
    "cl-plus-sign": POST_HEAD + b"Content-Length: +%d\r\n\r\n" % len(CHAT) + CHAT,
    "bare-lf": (POST_HEAD + b"Content-Length: %d\r\n\r\n" % len(CHAT)).replace(b"\r\n", b"\n")
    + CHAT,
    "bare-lf-one-line": b"GET /health HTTP/1.1\nHost: edge\r\n\r\n",
    "bare-cr": b"GET /health HTTP/1.1\rHost: edge\r\r",
    "obs-fold": b"GET /health HTTP/1.1\r\nHost: edge\r\nX-Folded: a\r\n b\r\n\r\n",
    "obs-fold-te": POST_HEAD
    + b"Transfer-Encoding: identity\r\n chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "nul-in-header-value": b"GET /health HTTP/1.1\r\nHost: edge\r\nX-Nul: a\x00b\r\n\r\n",
    "space-in-header-name": b"GET /health HTTP/1.1\r\nHost: edge\r\nX Bad: v\r\n\r\n",
    "chunk-size-bare-lf": POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": POST_HEAD
    + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
    "cl-te-smuggled-second-request": POST_HEAD
    + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % (5 + len(SMUGGLED))
    + b"0\r\n\r\n"
    + SMUGGLED,
    "te-cl-smuggled-second-request": POST_HEAD
    + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n"
    + SMUGGLED,
}


@pytest.mark.parametrize("request_bytes", list(SMUGGLING.values()), ids=list(SMUGGLING))
def test_smuggling_shapes_are_400_closed_and_answered_once(edge, request_bytes):
    response, closed = exchange(edge, request_bytes, timeout=10)
    error = assert_refused(response, closed, 400)
    assert error["type"] == "invalid_request_error"
    assert b"alive" not in response  # nothing of a smuggled /health/live answer


def test_a_valid_pipeline_still_gets_both_answers(edge):
    """The control for the corpus: two honest pipelined requests get two responses."""
    request = (
        b"GET /health/live HTTP/1.1\r\nHost: edge\r\n\r\n"
        b"GET /health HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n"
    )
    response, closed = exchange(edge, request)
    assert closed
    assert [int(s[-4:-1]) for s in STATUS_LINE.findall(response)] == [200, 200]


# ------------------------------------------------------------------ slow clients


@contextlib.contextmanager
def sockets(count: int, server: Gunicorn) -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            opened.append(connect(server))
        yield opened
    finally:
        for sock in opened:
            sock.close()


def still_open(sock: socket.socket) -> bool:
    """Nothing received and not closed: the server is still waiting on this client."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)  # data or EOF: answered or closed already
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)
    return False


def collect_until_closed(socks: list[socket.socket], deadline: float) -> dict[int, bytes]:
    """Read every socket until the server closes it; {index: bytes} of those closed by
    `deadline` (a socket missing from the result was not closed in time)."""
    pending = {sock.fileno(): index for index, sock in enumerate(socks)}
    by_fd = {sock.fileno(): sock for sock in socks}
    data: dict[int, list[bytes]] = {index: [] for index in pending.values()}
    closed: dict[int, bytes] = {}
    while pending and (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select(list(pending), [], [], min(left, 0.5))
        for fd in readable:
            index = pending[fd]
            try:
                chunk = by_fd[fd].recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                data[index].append(chunk)
            else:
                closed[index] = b"".join(data[index])
                del pending[fd]
    return closed


def test_slowloris_does_not_hold_up_new_clients_and_is_cut_at_the_deadline(edge):
    partial_count, silent_count = 220, 5
    started = time.monotonic()  # no connection's head deadline runs out before this + timeout
    with sockets(partial_count, edge) as partial, sockets(silent_count, edge) as silent:
        for sock in partial:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        opened = time.monotonic()

        # A new, normal client is served while all of them hang on.
        assert httpx.get(edge.url + "/health/ready", timeout=5).status_code == 200
        chat = httpx.post(
            edge.url + "/v1/chat/completions", content=CHAT, timeout=5,
            headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
        )  # fmt: skip
        assert chat.status_code == 200
        # A connection closed by now was cut early only if no deadline can have passed yet:
        # on a loaded machine the two requests above may outlast HEAD_TIMEOUT themselves.
        cut = sum(not still_open(sock) for sock in partial + silent)
        early = time.monotonic() - started < HEAD_TIMEOUT
        assert not (cut and early), f"{cut} cut before the deadline"

        closed = collect_until_closed(partial + silent, opened + HEAD_TIMEOUT + SLACK)
        cut_at = time.monotonic() - opened
    missing = [i for i in range(partial_count + silent_count) if i not in closed]
    assert not missing, f"{len(missing)} stalled connections still open after {cut_at:.1f}s"
    for index in range(partial_count):
        assert status_of(closed[index]) == 408, closed[index][:200]
        assert envelope(closed[index])["code"] == "request_timeout"
    for index in range(partial_count, partial_count + silent_count):
        assert closed[index] == b""  # sent nothing: closed without an answer
    ready(edge)


def test_head_trickled_one_byte_at_a_time_is_cut_with_408(edge):
    head = b"GET /health HTTP/1.1\r\nHost: edge\r\nX-Slow: " + b"s" * 100 + b"\r\n\r\n"
    with connect(edge) as sock:
        started = time.monotonic()
        sent, response, closed = trickle(sock, head, 1, 0.5)
        elapsed = time.monotonic() - started
    assert status_of(response) == 408, response[:200]
    assert closed
    assert sent < len(head)
    assert HEAD_TIMEOUT - 0.5 <= elapsed <= HEAD_TIMEOUT + SLACK, elapsed


def test_slow_body_is_cut_with_408_and_the_server_stays_healthy(edge):
    with connect(edge) as sock:
        sock.sendall(POST_HEAD + b"Content-Length: 100\r\n\r\n" + b'{"model":"')
        started = time.monotonic()
        response, closed = read_until_closed(sock, timeout=BODY_TIMEOUT + SLACK)
        elapsed = time.monotonic() - started
    assert closed, "a stalled body was not cut"
    assert elapsed <= BODY_TIMEOUT + SLACK
    if response:  # README: 408 and closed
        assert status_of(response) == 408, response[:200]
        assert envelope(response)["code"] == "request_timeout"
    ready(edge)


def test_slow_chunked_body_is_cut(edge):
    with connect(edge) as sock:
        sock.sendall(POST_HEAD + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mod\r\n')
        response, closed = read_until_closed(sock, timeout=BODY_TIMEOUT + SLACK)
    assert closed
    assert status_of(response) == 408


def test_idle_keepalive_connection_cannot_be_held_open_with_crlf(edge):
    with connect(edge) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: edge\r\n\r\n")
        sock.settimeout(5)
        assert status_of(sock.recv(65536)) == 200
        deadline = time.monotonic() + KEEPALIVE + HEAD_TIMEOUT + SLACK
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            readable, _, _ = select.select([sock], [], [], 0.5)
            if readable:
                try:
                    closed = sock.recv(65536) == b"" or closed
                except ConnectionResetError:
                    closed = True
    assert closed, "the connection was still open past the keep-alive and head deadlines"


def test_idle_keepalive_connection_is_closed(edge):
    with connect(edge) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: edge\r\n\r\n")
        sock.settimeout(5)
        assert status_of(sock.recv(65536)) == 200
        _, closed = read_until_closed(sock, timeout=KEEPALIVE + SLACK)
    assert closed


def test_unsupported_upgrade_is_ignored_not_refused(edge):
    request = (
        b"GET /health HTTP/1.1\r\nHost: edge\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
    )
    response, _ = exchange(edge, request, timeout=KEEPALIVE + SLACK)
    assert status_of(response) == 200, response[:200]


def test_websocket_upgrade_is_refused_with_one_400(edge):
    request = (
        b"GET /health HTTP/1.1\r\nHost: edge\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    response, closed = exchange(edge, request)
    assert status_of(response) in (400, 200)  # never a 101
    assert len(STATUS_LINE.findall(response)) == 1
    assert closed


# ------------------------------------------------------------------ concurrency cap


@pytest.fixture(scope="module")
def hanging_upstream():
    server = Upstream("--pace", "0.2")
    yield server
    server.stop(timeout=3)  # `hang` handlers never finish: don't wait out aiohttp's shutdown


@pytest.fixture(scope="module")
def capped(hanging_upstream):
    server = Gunicorn(
        API_KEYS=KEY,
        RATE_LIMIT_ENABLED="false",
        WORKERS="1",
        MAX_CONCURRENT_REQUESTS="2",
        UPSTREAM_URL=hanging_upstream.url + "/v1",
        SERVER_TIMEOUT_SECONDS="10",
        HTTP_HEADER_TIMEOUT_SECONDS=str(HEAD_TIMEOUT),
        HTTP_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT),
    )
    yield server
    server.stop()


def chat_request(model: str, stream: bool = False) -> bytes:
    body = json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    return POST_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body


def third_request(server: Gunicorn) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=15,
    )


def served_again(server: Gunicorn) -> bool:
    return third_request(server).status_code == 200


@contextlib.contextmanager
def held(server: Gunicorn, request: bytes, count: int = 2) -> Iterator[list[socket.socket]]:
    """`count` requests sent and left in flight; closed (client hang-up) on exit."""
    with sockets(count, server) as socks:
        for sock in socks:
            sock.sendall(request)
        yield socks


def assert_overloaded(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "overloaded_error"
    assert error["message"]


def test_concurrency_cap_is_503_with_retry_after_then_recovers(capped):
    assert served_again(capped)
    with held(capped, chat_request("hang")):
        overloaded = wait_until(lambda: (r := third_request(capped)).status_code == 503 and r)
        assert_overloaded(overloaded)
        assert_overloaded(third_request(capped))  # still full: both held requests are waiting
    # The held requests are released (the clients hung up; their upstream deadline ends them at
    # the latest): requests are served again.
    wait_until(lambda: served_again(capped), timeout=10 + SLACK + 2)


def test_hung_up_non_stream_requests_free_their_slots_promptly(capped):
    try:
        with held(capped, chat_request("hang")):
            wait_until(lambda: third_request(capped).status_code == 503)
        wait_until(lambda: served_again(capped), timeout=SLACK)
    finally:
        wait_until(lambda: served_again(capped), timeout=10 + SLACK + 2)


def test_hung_up_streams_free_their_slots_promptly(capped, hanging_upstream):
    cancelled = hanging_upstream.stats()["streams_cancelled"]
    with held(capped, chat_request("paced-50", stream=True)) as socks:
        for sock in socks:  # both streams are under way
            sock.settimeout(5)
            assert status_of(sock.recv(65536)) == 200
        assert_overloaded(third_request(capped))
    wait_until(lambda: served_again(capped), timeout=SLACK)  # paced-50 would take 10 s
    wait_until(lambda: hanging_upstream.stats()["streams_cancelled"] >= cancelled + 2, timeout=5)


def test_stalled_heads_take_no_request_slot(capped):
    with sockets(20, capped) as socks:
        for sock in socks:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        assert served_again(capped)
        assert served_again(capped)


def test_stalled_bodies_hold_slots_only_until_the_body_deadline(capped):
    body_head = POST_HEAD + b"Content-Length: 100\r\n\r\n" + b'{"model":"'
    with held(capped, body_head) as socks:
        overloaded = wait_until(lambda: (r := third_request(capped)).status_code == 503 and r)
        assert_overloaded(overloaded)
        closed = collect_until_closed(socks, time.monotonic() + BODY_TIMEOUT + SLACK)
        assert sorted(closed) == [0, 1]
        assert all(status_of(data) == 408 for data in closed.values())
    wait_until(lambda: served_again(capped), timeout=SLACK)


# ------------------------------------------------------------------ what real clients send

H2C = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)
LIVE_AND_CLOSE = b"GET /health/live HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n"


def statuses(response: bytes) -> list[int]:
    return [int(line[-4:-1]) for line in STATUS_LINE.findall(response)]


def test_h2c_upgrade_post_is_served_with_its_body(edge):
    """What the JDK's HttpClient and `curl --http2` send on plain http: the upgrade is ignored
    (no 101), the body is read, and the connection carries on to the next request."""
    request = POST_HEAD + H2C + b"Content-Length: %d\r\n\r\n" % len(CHAT) + CHAT + LIVE_AND_CLOSE
    response, closed = exchange(edge, request)
    assert statuses(response) == [200, 200], response[:400]
    assert b'"object":"chat.completion"' in response
    assert b'"status":"alive"' in response
    assert closed


def test_h2c_upgrade_chunked_post_is_served_with_its_body(edge):
    request = (
        POST_HEAD + H2C + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT)
    )  # fmt: skip
    response, _ = exchange(edge, request)
    assert statuses(response) == [200], response[:400]
    assert b'"object":"chat.completion"' in response


def test_h2c_upgrade_get_is_served_and_the_connection_kept(edge):
    request = b"GET /health HTTP/1.1\r\nHost: edge\r\n" + H2C + b"\r\n" + LIVE_AND_CLOSE
    response, closed = exchange(edge, request)
    assert statuses(response) == [200, 200], response[:400]
    assert b"101" not in response.split(b"\r\n", 1)[0]
    assert closed


def test_h2c_upgrade_oversized_post_is_still_413(edge):
    body = b"x" * (MAX_BODY + 1)
    response, closed = exchange(edge, post(body, H2C))
    assert_refused(response, closed, 413)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_http2_on_plain_http_posts_its_body(edge):
    result = subprocess.run(
        ["curl", "--http2", "-sS", "-v", "-i", "--max-time", "10",
         "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json",
         "--data-binary", CHAT.decode(), edge.url + "/v1/chat/completions"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "Upgrade: h2c" in result.stderr  # curl did ask for the upgrade
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP/1.1 200"), result.stdout[:300]
    payload = result.stdout.partition("\n\n")[2]  # text mode reads CRLF as LF
    assert json.loads(payload)["object"] == "chat.completion"


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed")
def test_jdk_http_client_on_plain_http_posts_its_body(edge):
    """java.net.http.HttpClient prefers HTTP/2 and asks for h2c on a POST with its body."""
    client = Path(__file__).parent / "clients" / "H2cPost.java"
    url = edge.url + "/v1/chat/completions"
    result = subprocess.run(
        ["java", str(client), url, KEY, CHAT.decode()],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    version_status, _, body = result.stdout.partition("\n")
    assert version_status == "HTTP_1_1 200", result.stdout[:300]
    assert json.loads(body)["object"] == "chat.completion"


def http10(body: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.0\r\nAuthorization: Bearer " + KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )  # fmt: skip


def test_http10_stream_is_close_delimited_not_chunked(edge):
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"one two"}]}'
    response, closed = exchange(edge, http10(body))
    head, _, payload = response.partition(b"\r\n\r\n")
    assert status_of(response) == 200, head
    assert header(response, "content-type") == "text/event-stream"
    assert header(response, "transfer-encoding") is None, head
    assert header(response, "content-length") is None, head
    assert header(response, "connection") == "close"
    assert closed  # the end of the body is the end of the connection
    assert payload.startswith(b"data: {")  # no chunk-size line before the first event
    assert payload.endswith(b"data: [DONE]\n\n")  # and no "0" chunk after the last
    assert b"\r\n" not in payload


def test_http10_non_streamed_response_keeps_content_length(edge):
    response, closed = exchange(edge, http10(CHAT))
    _, _, payload = response.partition(b"\r\n\r\n")
    assert status_of(response) == 200
    assert header(response, "transfer-encoding") is None
    assert int(header(response, "content-length") or -1) == len(payload)
    assert json.loads(payload)["object"] == "chat.completion"
    assert closed


GET_ROUTES = [
    "/health", "/health/live", "/health/ready", "/metrics", "/v1/models", "/v1/models/gpt-4o-mini",
]  # fmt: skip


def fetch(server: Gunicorn, method: str, path: str, *extra: bytes) -> bytes:
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n".encode()
        + b"".join(extra) + b"\r\n"
    )  # fmt: skip
    response, closed = exchange(server, request)
    assert closed
    return response


@pytest.mark.parametrize("path", GET_ROUTES)
def test_head_answers_like_get_without_a_body(edge, path):
    auth = b"Authorization: Bearer " + KEY.encode() + b"\r\n"
    got = fetch(edge, "GET", path, auth)
    head = fetch(edge, "HEAD", path, auth)
    assert status_of(head) == status_of(got) == 200, head
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1, head  # no body
    assert header(head, "content-type") == header(got, "content-type")
    assert header(head, "transfer-encoding") is None
    length = header(head, "content-length")
    assert length is not None and int(length) > 0
    if path != "/metrics":  # the metrics change between two scrapes
        assert length == header(got, "content-length")
    assert header(head, "x-request-id")


def test_head_on_a_keyed_route_needs_a_key_like_get(edge):
    head = fetch(edge, "HEAD", "/v1/models")
    got = fetch(edge, "GET", "/v1/models")
    assert status_of(head) == status_of(got) == 401
    assert head.endswith(b"\r\n\r\n")
    assert header(head, "content-length") == header(got, "content-length")
    assert header(head, "www-authenticate") == header(got, "www-authenticate")


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_on_get_routes_stay_405(edge, method):
    response = fetch(edge, method, "/health", b"Content-Length: 0\r\n")
    assert status_of(response) == 405
    assert envelope(response)["type"] == "invalid_request_error"


# Compressed bodies: a server with room for a 50 MB gzip bomb's compressed form (48 KB) and an
# upstream that reports what it received.
ROOMY_MAX_BODY = 1024 * 1024


@pytest.fixture(scope="module")
def recording_upstream():
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def roomy(recording_upstream):
    server = Gunicorn(
        API_KEYS=KEY,
        RATE_LIMIT_ENABLED="false",
        MAX_REQUEST_SIZE=str(ROOMY_MAX_BODY),
        UPSTREAM_URL=recording_upstream.url + "/v1",
        WORKERS="1",
    )
    yield server
    server.stop()


def compressed(server: Gunicorn, coding: str, body: bytes, request_id: str = "") -> bytes:
    extra = f"x-request-id: {request_id}\r\n".encode() if request_id else b""
    response, _ = exchange(server, post(body, f"Content-Encoding: {coding}\r\n".encode(), extra))
    return response


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("coding", "pack"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", raw_deflate),
        ("identity", bytes),
    ],
    ids=["gzip", "x-gzip", "GZIP", "deflate-zlib", "deflate-raw", "identity"],
)
def test_compressed_body_is_decoded_and_forwarded_decoded(roomy, recording_upstream, coding, pack):
    request_id = f"coding-{coding}-{pack.__name__}".replace("_", "-")
    response = compressed(roomy, coding, pack(CHAT), request_id)
    assert status_of(response) == 200, response[:400]
    seen = recording_upstream.seen(request_id)
    assert seen["body_size"] == len(CHAT)  # the decoded body went upstream
    assert "content-encoding" not in seen["headers"]


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_gzip_bomb_is_413_without_inflating_it(roomy):
    bomb = gzip.compress(b"\0" * 50_000_000, compresslevel=9)
    assert len(bomb) < ROOMY_MAX_BODY < 50_000_000
    (worker,) = roomy.worker_pids()
    before = peak_rss_kib(worker)
    response = compressed(roomy, "gzip", bomb)
    assert status_of(response) == 413, response[:400]
    error = envelope(response)
    assert error["code"] == "request_too_large"
    assert "decoded" in error["message"] and "gzip" in error["message"]
    # At most the limit (1 MiB) and its working buffers were ever decoded, not 50 MB.
    assert peak_rss_kib(worker) - before < 20 * 1024


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_corrupt_compressed_body_is_400_naming_the_coding(roomy, coding):
    response = compressed(roomy, coding, b"\x1f\x8b\x08\x00 this is not " + coding.encode())
    assert status_of(response) == 400, response[:400]
    error = envelope(response)
    assert coding in error["message"] and "JSON" not in error["message"]
    assert error["param"] == "content-encoding"


def test_truncated_gzip_body_is_400(roomy):
    response = compressed(roomy, "gzip", gzip.compress(CHAT)[:-6])
    assert status_of(response) == 400
    assert "gzip" in envelope(response)["message"]


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "gzip, gzip", "bogus"])
def test_other_content_codings_are_415_naming_them(roomy, coding):
    response = compressed(roomy, coding, CHAT)
    assert status_of(response) == 415, response[:400]
    error = envelope(response)
    assert coding in error["message"]
    assert error["param"] == "content-encoding"


# Early answers to a client still sending: the whole body is written before anything is read.
WHOLE_BODY = b"x" * (4 * 1024 * 1024)
EARLY = {
    "413-content-length": POST_HEAD + b"Content-Length: %d\r\n\r\n" % len(WHOLE_BODY),
    "431-header-block": POST_HEAD
    + b"X-Big: " + b"a" * MAX_HEADER_BYTES + b"\r\n"
    + b"Content-Length: %d\r\n\r\n" % len(WHOLE_BODY),
    "401-connection-close": b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\n"
    + b"Content-Type: application/json\r\nConnection: close\r\n"
    + b"Content-Length: %d\r\n\r\n" % len(WHOLE_BODY),
}  # fmt: skip


@pytest.mark.parametrize("case", list(EARLY))
def test_early_error_reaches_a_client_that_writes_its_whole_body_first(edge, case):
    status = int(case[:3])
    for attempt in range(20):
        with connect(edge) as sock:
            sock.sendall(EARLY[case] + WHOLE_BODY)  # no reset while the server drains it
            response, closed = read_until_closed(sock)
        assert response, f"attempt {attempt}: reset before the answer could be read"
        assert status_of(response) == status, (attempt, response[:300])
        envelope(response)
        assert closed


def test_the_drain_is_bounded_in_time(edge):
    """A client that never stops sending after an early 413 is cut after LINGER_SECONDS."""
    with connect(edge) as sock:
        sock.sendall(POST_HEAD + b"Content-Length: 999999999\r\n\r\n")
        sock.settimeout(5)
        assert status_of(sock.recv(65536)) == 413
        started = time.monotonic()
        deadline = started + LINGER_SECONDS + SLACK + 5
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() < deadline:
                sock.sendall(b"x" * 1024)
                time.sleep(0.02)
        elapsed = time.monotonic() - started
    assert LINGER_SECONDS - 1 <= elapsed <= LINGER_SECONDS + SLACK, elapsed


def test_the_drain_is_bounded_in_bytes(edge):
    """A fast sender is cut after LINGER_MAX_BYTES, long before LINGER_SECONDS."""
    with connect(edge) as sock:
        sock.sendall(POST_HEAD + b"Content-Length: 999999999\r\n\r\n")
        sock.settimeout(5)
        assert status_of(sock.recv(65536)) == 413
        started = time.monotonic()
        sent = 0
        piece = b"x" * 65536
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 4 * LINGER_MAX_BYTES:
                sock.sendall(piece)
                sent += len(piece)
        elapsed = time.monotonic() - started
    assert LINGER_MAX_BYTES <= sent < 4 * LINGER_MAX_BYTES, sent
    assert elapsed < LINGER_SECONDS, elapsed


# ------------------------------------------------------------------ afterwards


def test_server_is_healthy_after_all_of_this(edge, capped):
    ready(edge)
    for server in (edge, capped):
        with connect(server) as sock:
            sock.sendall(b"GET /health/ready HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n")
            response, closed = read_until_closed(sock)
        assert status_of(response) == 200 and closed
        log = server.output()
        assert "Exception in ASGI application" not in log
        assert "unhandled error" not in log
        assert "Traceback" not in log


# Requests the protocol refuses before the app sees them: a clear answer, and an access line.


def access_lines(server: Gunicorn, request_id: str) -> list[dict]:
    lines = []
    for line in server.output().splitlines():
        if request_id in line and '"edge.access"' in line:
            lines.append(json.loads(line))
    return lines


@pytest.mark.parametrize(
    ("request_line", "version"),
    [(b"GET /health\r\n\r\n", "0.9"), (b"GET /health HTTP/2.0\r\nHost: edge\r\n\r\n", "2.0")],
)
def test_http_versions_other_than_1_x_are_505_never_a_500(edge, request_line, version):
    response, closed = exchange(edge, request_line)
    assert closed and status_of(response) == 505, response[:300]
    assert envelope(response)["code"] == "http_version_not_supported"
    request_id = header(response, "x-request-id")
    assert request_id
    (line,) = wait_until(lambda: access_lines(edge, request_id), timeout=10)
    assert line["status"] == 505 and f"HTTP/{version}" in line["refused"]
    assert line["method"] == "GET" and line["path"] == "/health"
    assert line["client"] == "127.0.0.1"


def test_an_h2c_prior_knowledge_client_gets_http2s_own_refusal(edge):
    """`curl --http2-prior-knowledge` on plain http: it reads HTTP/2 frames, so it gets the
    server's SETTINGS and a GOAWAY saying HTTP_1_1_REQUIRED, not an HTTP/1.1 status line it
    cannot read (an "empty reply" before); and the refusal is logged."""
    before = edge.output().count('"refused":"HTTP/2 without TLS')
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    response, closed = exchange(edge, preface)
    assert closed
    settings, goaway = response[:9], response[9:]
    assert settings == b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    length, kind = int.from_bytes(goaway[:3], "big"), goaway[3]
    assert kind == 0x07 and len(goaway) == 9 + length
    assert int.from_bytes(goaway[13:17], "big") == 0x0D  # HTTP_1_1_REQUIRED
    assert b"TLS" in goaway[17:]
    wait_until(
        lambda: edge.output().count('"refused":"HTTP/2 without TLS') == before + 1, timeout=10
    )


def test_a_refused_head_gets_an_access_line_with_the_reason(edge):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(MAX_HEADERS + 5))
    response, _ = exchange(edge, b"GET /health HTTP/1.1\r\nHost: edge\r\n" + fields + b"\r\n")
    assert status_of(response) == 431
    request_id = header(response, "x-request-id")
    (line,) = wait_until(lambda: access_lines(edge, request_id), timeout=10)
    assert line["status"] == 431 and line["refused"] == "Too many request headers."
