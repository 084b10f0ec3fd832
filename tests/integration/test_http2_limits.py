"""HTTP/2 held to the HTTP/1.1 limits (HTTP2_ENABLED: gunicorn's worker plus edge.server.h2).

Each test asserts what README.md's limits and docs/architecture.md's "HTTP/2 through gunicorn's
worker" section say happens, with a real h2 client: the `h2` library on a TLS socket where
frames must be exactly as the test wants them (a head left unfinished, a body trickled or
stalled, a flow-control window kept shut), httpx for ordinary requests, h2load for many streams.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame
from support import Gunicorn, Upstream, running, self_signed_certificate, wait_until

KEY = "sk-h2-limits"
KEEPALIVE = 2
BODY_TIMEOUT = 2
SEND_TIMEOUT = 2
MAX_BODY = 2048
MAX_HEADERS = 20
MAX_HEADER_BYTES = 4096
MAX_LINE = 1024
CAP = 2  # MAX_CONCURRENT_REQUESTS, one worker
SLACK = 3.0  # scheduling slack on top of a deadline: enough to prove "no hang", not a speed bound
WINDOW = 65535  # the initial h2 flow-control window (gunicorn's default, and the client's)

AUTH = [("authorization", f"Bearer {KEY}")]
JSON = [*AUTH, ("content-type", "application/json")]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def head(path: str, method: str = "POST") -> list[tuple[str, str]]:
    """A request's pseudo-header fields."""
    return [(":method", method), (":path", path), (":scheme", "https"), (":authority", "127.0.0.1")]


def chat(model: str, **extra: Any) -> bytes:
    return json.dumps({**CHAT, "model": model, **extra}).encode()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def upstream():
    server = Upstream("--pace", "0.2")
    yield server
    server.stop(timeout=3)  # `hang` handlers never finish: don't wait out aiohttp's shutdown


@pytest.fixture(scope="module")
def server(certificate, upstream):
    cert, key = certificate
    server = Gunicorn(
        API_KEYS=KEY, TLS_CERT_FILE=cert, TLS_KEY_FILE=key, HTTP2_ENABLED="true",
        UPSTREAM_URL=upstream.url + "/v1", RATE_LIMIT_ENABLED="false", WORKERS="1",
        MAX_CONCURRENT_REQUESTS=str(CAP), MAX_REQUEST_SIZE=str(MAX_BODY),
        KEEPALIVE_TIMEOUT_SECONDS=str(KEEPALIVE), HTTP_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT),
        HTTP_SEND_TIMEOUT_SECONDS=str(SEND_TIMEOUT), HTTP_MAX_HEADERS=str(MAX_HEADERS),
        HTTP_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES), HTTP_MAX_REQUEST_LINE=str(MAX_LINE),
        SERVER_TIMEOUT_SECONDS="20",
    )  # fmt: skip
    yield server
    server.stop()


# ------------------------------------------------------------------ a raw h2 client


@dataclass
class Answer:
    """What the server sent on one stream."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None

    def error(self) -> dict[str, Any]:
        """The OpenAI error envelope of this answer."""
        assert self.headers["content-type"].startswith("application/json"), self.headers
        assert "x-request-id" in self.headers
        error = json.loads(bytes(self.body))["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"]
        return error


class H2:
    """One h2 connection over TLS, written frame by frame as a test wants; what the server sends
    is collected per stream (`answers`), and its GOAWAY and close noted."""

    def __init__(
        self, server: Gunicorn, *, acknowledge: bool = True, window: int | None = None
    ) -> None:
        assert server.tls_cert is not None
        context = ssl.create_default_context(cafile=server.tls_cert)
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        assert self.sock.selected_alpn_protocol() == "h2"
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        self.acknowledge = acknowledge  # give flow-control credit back for what arrives
        self.quiet = False  # write nothing of our own (not even a SETTINGS or PING ack)
        self.answers: dict[int, Answer] = {}
        self.goaway: int | None = None  # its error code
        self.closed = False
        self.conn.initiate_connection()
        settings = 1
        if window is not None:  # each stream's receive window, for the whole connection
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            settings += 1
        self._flush()
        # Once the server has acknowledged our SETTINGS, its own (sent before) are in and
        # acknowledged too: frames written from now on follow no frame of the h2 library's.
        acks: list[bool] = []
        self._on_settings_ack = lambda: acks.append(True)
        self.until(lambda: len(acks) == settings, timeout=10)

    def __enter__(self) -> H2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.quiet:
            with contextlib.suppress(OSError):
                self.sock.sendall(data)

    def request(
        self, path: str, headers: list[tuple[str, str]], body: bytes | None = None, *,
        method: str = "POST", end: bool = True,
    ) -> int:  # fmt: skip
        """Open a stream; `end=False` leaves the body to send_data."""
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream, head(path, method) + headers, end_stream=end and body is None
        )
        if body is not None:
            self.conn.send_data(stream, body, end_stream=end)
        self.answers[stream] = Answer()
        self._flush()
        return stream

    def send_data(self, stream: int, data: bytes, end: bool = False) -> None:
        self.conn.send_data(stream, data, end_stream=end)
        self._flush()

    def window(self, stream: int) -> int:
        """How much body the server lets this stream send now."""
        return min(self.conn.local_flow_control_window(stream), self.conn.max_outbound_frame_size)

    def raw(self, frame: bytes) -> None:
        """Bytes written as they are, outside the h2 state machine: nothing of ours follows."""
        self.quiet = True
        self.sock.sendall(frame)

    def header_block(self, headers: list[tuple[str, str]]) -> bytes:
        return self.conn.encoder.encode(headers)

    def pump(self, timeout: float) -> None:
        """Read what the server sends within `timeout` (one read) and take it in."""
        if self.closed:
            time.sleep(timeout)
            return
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        for event in self.conn.receive_data(data):
            self._take(event)
        self._flush()

    def _take(self, event: Any) -> None:
        answer = self.answers.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.SettingsAcknowledged):
            self._on_settings_ack()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event.error_code
        elif answer is None:
            return
        elif isinstance(event, h2.events.ResponseReceived):
            headers = dict(event.headers)
            answer.status = int(headers.pop(":status"))
            answer.headers = headers
        elif isinstance(event, h2.events.DataReceived):
            answer.body += event.data
            if self.acknowledge:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            answer.ended = True
        elif isinstance(event, h2.events.StreamReset):
            answer.reset = event.error_code

    def until(
        self, predicate: Callable[[], Any], timeout: float, tick: Callable[[], None] | None = None
    ) -> float:
        """Read until `predicate()` holds, calling `tick` between reads; the seconds it took.
        AssertionError after `timeout` seconds."""
        start = time.monotonic()
        while not predicate():
            elapsed = time.monotonic() - start
            assert elapsed < timeout, f"not within {timeout} s; answers: {self.answers}"
            if tick is not None:
                tick()
            self.pump(0.05)
        return time.monotonic() - start

    def until_closed(self, timeout: float, tick: Callable[[], None] | None = None) -> float:
        return self.until(lambda: self.closed, timeout, tick)

    def answer(self, stream: int, timeout: float = 10.0) -> Answer:
        self.until(lambda: self.answers[stream].done, timeout)
        return self.answers[stream]


def served(server: Gunicorn) -> bool:
    with httpx.Client(http2=True, verify=server.verify, timeout=10) as client:
        reply = client.post(server.url + "/v1/chat/completions", json=CHAT, headers=dict(AUTH))
        assert reply.http_version == "HTTP/2"
        return reply.status_code == 200


def assert_served_on(client: H2) -> None:
    """The connection carries on: a new request on it is answered."""
    body = chat("m")
    # What was sent on a stream the server had closed is credited back a little later.
    client.until(lambda: client.conn.outbound_flow_control_window >= len(body), 10)
    answer = client.answer(client.request("/v1/chat/completions", JSON, body))
    assert answer.status == 200, answer


# ------------------------------------------------------------------ slow heads


def test_a_connection_that_sends_nothing_is_closed_at_the_keepalive_deadline(server):
    context = ssl.create_default_context(cafile=server.tls_cert)
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=KEEPALIVE + SLACK)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        start = time.monotonic()
        while sock.recv(65536):  # the server's SETTINGS, then its GOAWAY
            pass
        elapsed = time.monotonic() - start
    assert KEEPALIVE * 0.9 <= elapsed < KEEPALIVE + SLACK


@pytest.mark.parametrize("trickled", [False, True], ids=["stalled", "trickled"])
def test_an_unfinished_head_is_cut_at_the_keepalive_deadline_and_takes_no_slot(server, trickled):
    """A HEADERS frame without END_HEADERS, then nothing (or one CONTINUATION byte every 0.2 s:
    trickling does not extend it). More such connections than the cap: none takes a slot."""
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(H2(server)) for _ in range(CAP + 1)]
        blocks = [client.header_block([*head("/v1/chat/completions"), *JSON]) for client in clients]
        for client, block in zip(clients, blocks, strict=True):
            client.raw(HeadersFrame(1, data=block[:4]).serialize())  # no END_HEADERS
        start = time.monotonic()
        assert served(server)
        assert served(server)
        trickler, rest = clients[-1], blocks[-1][4:]
        sent = 0

        def trickle() -> None:
            nonlocal sent
            if trickled and sent < len(rest) and time.monotonic() - start > (sent + 1) * 0.2:
                trickler.raw(ContinuationFrame(1, data=rest[sent : sent + 1]).serialize())
                sent += 1

        trickler.until_closed(KEEPALIVE + SLACK, trickle)
        for client in clients[:-1]:
            client.until_closed(KEEPALIVE + SLACK)
        assert time.monotonic() - start >= KEEPALIVE * 0.9
        assert all(client.goaway == h2.errors.ErrorCodes.NO_ERROR for client in clients)
        if trickled:
            assert 5 <= sent < len(rest)  # it was still sending when it was cut


# ------------------------------------------------------------------ slow bodies


def test_a_trickled_body_is_408_at_the_body_deadline_and_the_connection_carries_on(server):
    body = chat("m")
    with H2(server) as client:
        headers = [*JSON, ("content-length", str(len(body)))]
        stream = client.request("/v1/chat/completions", headers, end=False)
        start = time.monotonic()
        sent = [0]

        def trickle() -> None:  # one byte every 0.2 s: done in 12 s, were it let
            if time.monotonic() - start > sent[0] * 0.2 and sent[0] < len(body) - 1:
                client.send_data(stream, body[sent[0] : sent[0] + 1])
                sent[0] += 1

        elapsed = client.until(lambda: client.answers[stream].done, BODY_TIMEOUT + SLACK, trickle)
        answer = client.answers[stream]
        assert answer.status == 408, answer
        assert answer.error()["code"] == "request_timeout"
        assert elapsed >= BODY_TIMEOUT * 0.9
        assert 5 <= sent[0] < len(body) - 1
        assert_served_on(client)


def test_stalled_bodies_hold_slots_only_until_the_body_deadline(server):
    """Without a content-length; as many as the cap: a request meanwhile is 503."""
    with H2(server) as client:
        streams = [client.request("/v1/chat/completions", JSON, end=False) for _ in range(CAP)]
        for stream in streams:
            client.send_data(stream, b'{"model": ')
        start = time.monotonic()
        overloaded = client.answer(client.request("/v1/chat/completions", JSON, chat("m")))
        assert overloaded.status == 503, overloaded
        for stream in streams:
            answer = client.answer(stream, timeout=BODY_TIMEOUT + SLACK)
            assert answer.status == 408, answer
        assert time.monotonic() - start >= BODY_TIMEOUT * 0.9
        wait_until(lambda: served(server), timeout=SLACK)


def test_a_body_pausing_for_the_send_deadline_is_408_before_the_body_deadline(certificate):
    """gunicorn's `timeout` (HTTP_SEND_TIMEOUT_SECONDS) also bounds a pause between DATA frames,
    and the request is answered as at the body deadline."""
    cert, key = certificate
    with running(
        API_KEYS=KEY, TLS_CERT_FILE=cert, TLS_KEY_FILE=key, HTTP2_ENABLED="true", WORKERS="1",
        HTTP_SEND_TIMEOUT_SECONDS="1", HTTP_BODY_TIMEOUT_SECONDS="30",
    ) as paused, H2(paused) as client:  # fmt: skip
        stream = client.request("/v1/chat/completions", JSON, end=False)
        client.send_data(stream, b'{"model": ')
        answer = client.answer(stream, timeout=1 + SLACK)
        assert answer.status == 408, answer
        assert answer.error()["code"] == "request_timeout"


# ------------------------------------------------------------------ body size


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "no-length"])
def test_a_body_over_max_request_size_is_413_long_before_it_is_sent(server, declared):
    """The client sends as fast as flow control lets it: the 413 comes after at most the limit
    and two windows, never the 20 MB, and the connection carries on."""
    total = 20_000_000
    with H2(server) as client:
        headers = [*JSON, ("content-length", str(total))] if declared else JSON
        stream = client.request("/v1/chat/completions", headers, end=False)
        sent = [0]

        def send() -> None:
            while not client.answers[stream].done and (room := client.window(stream)) > 0:
                client.send_data(stream, b"x" * room)
                sent[0] += room

        client.until(lambda: client.answers[stream].done, 10, send)
        answer = client.answer(stream)
        assert answer.status == 413, answer
        assert answer.error()["code"] == "request_too_large"
        assert sent[0] <= MAX_BODY + 2 * WINDOW
        if declared:
            assert sent[0] <= WINDOW  # refused on its content-length alone
        assert_served_on(client)


# ------------------------------------------------------------------ header caps


def header_size(headers: list[tuple[str, str]]) -> int:
    """As edge.server.protocol counts a header block; h2's :authority arrives as Host."""
    fields = [*headers, ("host", "127.0.0.1")]
    return sum(len(name) + len(value) + 4 for name, value in fields)


def test_header_caps_are_431_and_414_and_the_connection_carries_on(server):
    at_count = [*AUTH, *((f"x-h{i}", "v") for i in range(MAX_HEADERS - 2))]  # Host is one
    pad = MAX_HEADER_BYTES - header_size([*AUTH, ("x-pad", "")])
    at_size = [*AUTH, ("x-pad", "p" * pad)]
    assert header_size(at_size) == MAX_HEADER_BYTES
    cases = [
        ("/v1/models", at_count, 200),
        ("/v1/models", [*at_count, ("x-one-more", "v")], 431),
        ("/v1/models", at_size, 200),
        ("/v1/models", [*AUTH, ("x-pad", "p" * (pad + 1))], 431),
        ("/v1/models?q=" + "a" * (MAX_LINE - len("/v1/models?q=")), AUTH, 200),
        ("/v1/models?q=" + "a" * (MAX_LINE + 1 - len("/v1/models?q=")), AUTH, 414),
    ]
    with H2(server) as client:
        for path, headers, status in cases:
            answer = client.answer(client.request(path, headers, method="GET"))
            assert answer.status == status, (path[:20], len(headers), answer)
            if status != 200:
                assert answer.error()["type"] == "invalid_request_error"
        assert not client.closed and client.goaway is None


def test_past_twice_the_header_limits_gunicorn_refuses_unanswered(server):
    """gunicorn's own limits, set at twice ours: the stream is reset; past the HPACK header list
    size, the whole connection is closed."""
    with H2(server) as client:
        fields = [*AUTH, *((f"x-h{i}", "v") for i in range(2 * MAX_HEADERS))]
        answer = client.answer(client.request("/v1/models", fields, method="GET"))
        assert (answer.status, answer.reset) == (None, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        assert_served_on(client)
        huge = [*AUTH, *((f"x-big{i}", "b" * 7000) for i in range(10))]  # 70 KB decoded
        client.request("/v1/models", huge, method="GET")
        client.until_closed(10)
        assert client.goaway is not None


# ------------------------------------------------------------------ concurrency


def test_streams_beyond_the_cap_are_503_with_retry_after_and_the_connection_carries_on(
    server, upstream
):
    hanging = sum(1 for seen in upstream.log() if seen.get("model") == "hang")
    with H2(server) as client:
        held = [client.request("/v1/chat/completions", JSON, chat("hang")) for _ in range(CAP)]
        # Both in flight (at the upstream, which never answers): the worker is full.
        wait_until(
            lambda: sum(1 for s in upstream.log() if s.get("model") == "hang") == hanging + CAP
        )
        assert not served(server)
        more = [client.request("/v1/chat/completions", JSON, chat("m")) for _ in range(3)]
        for stream in more:
            answer = client.answer(stream)
            assert answer.status == 503, answer
            assert answer.headers["retry-after"] == "1"
            assert answer.error()["type"] == "overloaded_error"
        health = client.answer(client.request("/health", [], method="GET"))
        assert health.status == 200  # health checks are exempt
        assert not any(client.answers[stream].done for stream in held)
    # The client hung up: its held requests end at once (499), and their slots are free.
    wait_until(lambda: served(server), timeout=SLACK)


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_h2load_with_more_streams_than_the_cap(server, tmp_path):
    """4 connections of 2 streams each on a request taking 0.4 s (two paced chunks), with room
    for 2: every request is answered, 200 or 503, and no connection is lost."""
    body = tmp_path / "body.json"
    body.write_bytes(chat("paced-2", stream=True))
    result = subprocess.run(
        ["h2load", "-n", "40", "-c", "4", "-m", "2", "-d", str(body),
         "-H", f"authorization: Bearer {KEY}", "-H", "content-type: application/json",
         server.url + "/v1/chat/completions"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Application protocol: h2" in result.stdout, result.stdout
    counts = re.search(r"requests: 40 total, 40 started, 40 done, (\d+) succeeded, (\d+) failed, "
                       r"0 errored, 0 timeout", result.stdout)  # fmt: skip
    statuses = re.search(r"status codes: (\d+) 2xx, 0 3xx, 0 4xx, (\d+) 5xx", result.stdout)
    assert counts and statuses, result.stdout
    assert int(statuses[1]) >= CAP and int(statuses[2]) > 0, result.stdout
    assert int(statuses[1]) + int(statuses[2]) == 40
    wait_until(lambda: served(server), timeout=SLACK)


# ------------------------------------------------------------------ a client that stops reading


def test_a_stream_whose_window_stays_shut_is_reset_at_the_send_deadline(server, upstream):
    """A 64-byte window never widened: the server fills it and then may send nothing more. The
    stream is reset, and its upstream stream (50 events 0.2 s apart) closed."""
    cancelled = upstream.stats()["streams_cancelled"]
    with H2(server, acknowledge=False, window=64) as client:
        stream = client.request("/v1/chat/completions", JSON, chat("paced-50", stream=True))
        client.until(lambda: len(client.answers[stream].body) >= 64, 10)
        elapsed = client.until(lambda: client.answers[stream].done, SEND_TIMEOUT + SLACK)
        answer = client.answers[stream]
        assert answer.reset == h2.errors.ErrorCodes.CANCEL, answer
        assert elapsed >= SEND_TIMEOUT * 0.9
    wait_until(lambda: upstream.stats()["streams_cancelled"] > cancelled, timeout=5)
    wait_until(lambda: served(server), timeout=SLACK)


# ------------------------------------------------------------------ HTTP/1.1 on the h2 worker


@contextlib.contextmanager
def http11(server: Gunicorn) -> Iterator[ssl.SSLSocket]:
    assert server.tls_cert is not None
    context = ssl.create_default_context(cafile=server.tls_cert)
    context.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=BODY_TIMEOUT + SLACK)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"
        yield sock


def test_http11_on_the_h2_worker_a_later_head_is_cut_at_the_keepalive_deadline(server):
    """gunicorn's own HTTP/1.1 keep-alive timer runs while a connection waits for its next
    request, unfinished head or not. (It does not for a connection's first head.)"""
    with http11(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: edge\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: ed")
        start = time.monotonic()
        while sock.recv(65536):
            pass
        elapsed = time.monotonic() - start
    assert KEEPALIVE * 0.9 <= elapsed < KEEPALIVE + SLACK


def test_http11_on_the_h2_worker_gets_the_same_body_deadline(server):
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    with http11(server) as sock:
        sock.sendall(head + b'{"model": ')
        start = time.monotonic()
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        elapsed = time.monotonic() - start
    response = b"".join(chunks)
    assert response.startswith(b"HTTP/1.1 408 "), response
    assert b"\r\nconnection: close\r\n" in response.lower()
    assert b'"code":"request_timeout"' in response
    assert BODY_TIMEOUT * 0.9 <= elapsed < BODY_TIMEOUT + SLACK
