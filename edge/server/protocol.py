"""The HTTP/1.1 connection protocol: uvicorn's httptools protocol plus the limits it lacks.

uvicorn (with httptools) bounds neither the request line, nor the header block, nor the number
of headers, and has no deadline for a client to finish sending its head or its body; gunicorn's
`limit_request_*` settings never reach it. This subclass adds, per connection:

- request line longer than `max_request_line` bytes → 414, connection closed;
- header block larger than `max_header_bytes` (counted as the bytes received while the head is
  incomplete, so a trickled head is cut as soon as it passes the limit and no more than one
  read's worth is ever buffered beyond it) → 431, closed;
- more than `max_headers` header fields → 431, closed;
- head not complete within `header_timeout` seconds of its first byte (or of the connection
  opening; or, for a head begun while an earlier answer is still under way, of the end of
  that answer) → 408 if anything was sent, else a silent close;
- body not complete within `body_timeout` seconds of the start of its request's turn (at once,
  or after the requests pipelined before it) → 408, closed, and the app sees the client as
  disconnected;
- a refusal never writes into an answer still owed: a new head refused behind one is not
  answered, the owed answers are given and the connection then closes;
- more than `max_concurrency` requests in flight in this worker → 503 in the OpenAI envelope
  with `Retry-After: 1`;
- while the worker drains (gunicorn HUP/TERM/TTOU), idle keep-alive connections are not cut
  under a client that may be sending on them: each one may carry one more request, answered
  with `Connection: close`; otherwise it closes at its keep-alive deadline as usual.

HTTP behaviour real clients rely on:

- a request asking for a protocol upgrade we do not speak (`Upgrade: h2c` from `curl --http2`
  and the JDK's HttpClient on plain http; a WebSocket handshake, as no WebSocket protocol is
  configured) is served over HTTP/1.1 with its body, as RFC 9110 7.8 allows: llhttp would skip
  the body of such a request and stop parsing after it, so the head is parsed again without its
  `Upgrade` by a fresh parser, which then reads the body and the requests after it as usual;
- an HTTP/1.0 client gets a response of unknown length close-delimited (no chunked coding,
  which HTTP/1.0 lacks, `Connection: close`, the connection closed after the body);
- an early answer (413, 431, …) closed while the client is still sending is closed the way
  nginx's `lingering_close` does: the response is flushed, the write side half-closed, and
  what the client still sends is read and discarded for at most `LINGER_SECONDS` and
  `LINGER_MAX_BYTES`, so a client that writes its whole body before it reads gets the answer
  instead of a TCP reset. A lingering connection counts against `max_concurrency`.

Parse errors (smuggling shapes such as Content-Length with Transfer-Encoding, duplicate
Content-Length, bare LF, obs-fold, NUL in a header) are refused by llhttp in strict mode: 400
and the connection closed, so no second response can follow on the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from edge.config import Config
from edge.endpoints.routes import HEALTH, kind_of_target
from edge.errors import protocol_refusal
from edge.observability.context import new_request_id, sane_client
from edge.observability.logs import log_refusal
from edge.server.disconnect import PROTOCOL_WATCHES, client_gone

# HTTP/2 frames for an h2c preface (RFC 9113): an empty SETTINGS (the server's preface), and
# GOAWAY's error code HTTP_1_1_REQUIRED.
_H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_HTTP_1_1_REQUIRED = 0xD

_OVERLOADED_BODY = protocol_refusal(
    503, "The server is at its concurrency limit; retry shortly."
).body()


LINGER_SECONDS = 5.0
"""Longest a connection closed under a client still sending is drained (nginx: lingering_time)."""
LINGER_MAX_BYTES = 16 * 1024 * 1024
"""Most bytes read and discarded from such a client before the connection is closed anyway."""


@dataclass(frozen=True)
class EdgeLimits:
    max_request_line: int
    max_header_bytes: int
    max_headers: int
    header_timeout: float
    body_timeout: float
    max_concurrency: int
    send_timeout: float = 30.0

    @classmethod
    def from_config(cls, config: Config) -> EdgeLimits:
        return cls(
            max_request_line=config.max_request_line,
            max_header_bytes=config.max_header_bytes,
            max_headers=config.max_headers,
            header_timeout=config.header_timeout_s,
            body_timeout=config.body_timeout_s,
            max_concurrency=config.max_concurrency,
            send_timeout=config.send_timeout_s,
        )


class _Refuse(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _overloaded(scope: Any, receive: Any, send: Any) -> None:
    request_id = new_request_id()
    client = scope.get("client")
    log_refusal(
        request_id, scope.get("method"), scope.get("path"), 503,
        sane_client(client[0] if client else None), "overloaded",
    )  # fmt: skip
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_OVERLOADED_BODY)).encode()),
                (b"retry-after", b"1"),
                (b"x-request-id", request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _OVERLOADED_BODY})


def protocol_class(limits: EdgeLimits) -> type[HttpToolsProtocol]:
    """An HttpToolsProtocol subclass enforcing `limits` (uvicorn takes a class for `http`)."""
    return type("EdgeHttpToolsProtocol", (EdgeHttpToolsProtocol,), {"limits": limits})


class EdgeHttpToolsProtocol(HttpToolsProtocol):
    limits: EdgeLimits  # set by protocol_class()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_started = False  # between a head's first byte and its end
        self._head_bytes = 0
        self._header_count = 0
        self._header_size = 0
        self._head = _Deadline(self.loop, self.limits.header_timeout, self._head_timed_out)
        self._body = _Deadline(self.loop, self.limits.body_timeout, self._body_timed_out)
        self._send_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._draining = False
        self._upgrade_head: bytes | None = None  # a head to parse again without its Upgrade
        self._lingering: asyncio.Event | None = None  # set when the linger ends
        self._linger_bytes = 0
        self._linger_allowed = True
        self._stopped_mid_request = False  # a refusal left a request partly read
        self._lost = False

    # -------------------------------------------------------------- connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # Every close, ours and uvicorn's, goes through _close(): see _LingeringTransport.
        self._edge_transport = _LingeringTransport(transport, self)
        super().connection_made(self._edge_transport)  # type: ignore[arg-type]
        self._head.start()  # the first request must arrive in time too

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_timers()
        if self._lingering is not None:
            self._lingering.set()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            client_gone(cycle.scope)  # see edge.server.disconnect
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_MAX_BYTES:
                self._lingering.set()
            return
        if self._refused:
            return
        self._unset_keepalive_if_required()
        while True:  # a loop, not recursion: a read may hold many pipelined upgrade requests
            try:
                self.parser.feed_data(data)
            except _Refuse as refusal:
                self._refuse(refusal.status, refusal.message)
                return
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, _Refuse):
                    self._refuse(cause.status, cause.message)
                else:
                    self._refuse(400, "Invalid HTTP request received.")
                return
            except httptools.HttpParserUpgrade as upgrade:
                head = self._restart_without_upgrade()
                if head is None:
                    return
                data = head + data[upgrade.args[0] :]
                continue
            except httptools.HttpParserError:
                if self.parser.get_method() == b"PRI":  # HTTP/2's preface: h2c prior knowledge
                    self._refuse_h2c()
                else:
                    self._refuse(400, "Invalid HTTP request received.")
                return
            break
        if self._head_started:
            # Counted per read, after parsing: a read that completes a head is not counted,
            # so a body in the same read never is. (A read holding the end of one pipelined
            # request's body and the start of the next head is counted whole.)
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, "Request header block too large.")
        elif (
            not self._head.running
            and self.timeout_keep_alive_task is None
            and (self.cycle is None or self.cycle.response_complete)
        ):
            # Bytes that start no request (the blank lines a parser skips) cancelled the
            # keep-alive deadline above; without a new deadline they would hold the
            # connection open for ever.
            self._head.start()

    # asyncio's Protocol.eof_received may return True (keep the transport open: a linger);
    # uvicorn's annotation says None, which its own never returns but this one does.
    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self._lingering is not None:
            self._lingering.set()  # the client has sent everything: the linger is over
            return True  # _linger closes the transport
        # Otherwise a FIN is taken as the client going away, as nginx does for proxied requests
        # (499): the transport closes, and the request's upstream work is cancelled at once.
        # TCP cannot tell a client that half-closed but still reads (`nc -N`) from one that
        # left; keeping such connections open would let every hung-up client hold its request
        # slot and upstream call until SERVER_TIMEOUT_SECONDS.
        return super().eof_received()

    def _restart_without_upgrade(self) -> bytes | None:
        """llhttp stops at a request asking for an upgrade (and has skipped its body): a fresh
        parser, and the head to feed it again without `Upgrade`, followed by the bytes that came
        after it (its body and any pipelined requests). See on_headers_complete. None when
        refused instead."""
        head = self._upgrade_head
        self._upgrade_head = None
        if head is None:  # CONNECT, or a head whose upgrade could not be undone
            self._refuse(400, "Protocol upgrades and CONNECT are not supported.")
            return None
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(AttributeError):  # as uvicorn configures its parser
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        return head

    # -------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True
        self._head_bytes = 0
        self._header_count = 0
        self._header_size = 0
        if not self._head.running and not self._answer_owed():
            self._head.start()
        # Else an earlier request's answer is still owed (a long stream, requests pipelined
        # behind it): reading is paused or the client waits for it, so this head's deadline
        # starts when that answer is done (on_response_complete), not now.

    def _answer_owed(self) -> bool:
        """An earlier request on this connection is not fully answered yet."""
        cycle = self.cycle
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._head_started and not self._refused and not self.transport.is_closing():
            # A head began while this answer was under way: not an idle connection (uvicorn
            # may just have armed its keep-alive timer) but a request, whose head deadline
            # starts now if it has not yet.
            self._unset_keepalive_if_required()
            if not self._head.running:
                self._head.start()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_request_line:
            raise _Refuse(414, "Request line too long.")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Checked field by field, not once the head is whole: llhttp reports a chunked body's
        # trailers here too (with no on_headers_complete after them), and a head of tiny
        # fields in one large read would otherwise hold tens of thousands before the refusal.
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            raise _Refuse(431, "Too many request headers.")
        # A head that arrives in a single read is never counted in data_received: its size
        # is bounded here, field by field.
        self._header_size += len(name) + len(value) + 4
        if self._header_size > self.limits.max_header_bytes:
            raise _Refuse(431, "Request header block too large.")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade():
            # Served as if it had not asked (RFC 9110 7.8): no cycle for this parse; the head
            # is parsed again by _restart_without_upgrade once llhttp stops after it.
            self._upgrade_head = self._head_without_upgrade()
            return
        version = self.parser.get_http_version()
        if version not in ("1.1", "1.0"):  # llhttp takes 0.9 (no version) and 2.0 too
            raise _Refuse(505, f"HTTP/{version} is not served here: use HTTP/1.1.")
        # uvicorn stores the names lower-cased
        if version == "1.1" and all(n != b"host" for n, _ in self.headers):
            raise _Refuse(400, "HTTP/1.1 requests must carry a Host header.")
        self._head_started = False
        self._head.cancel()
        app = self.app
        # Health checks are exempt from the cap: a saturated worker is busy, not dead.
        if len(self.tasks) >= self.limits.max_concurrency and kind_of_target(self.url) != HEALTH:
            self.app = _overloaded
        # connection_lost tells the app (edge.server.disconnect), instead of a watcher task
        # speed: saves 6.5 % of a request's instructions (bench/instructions.py, 2026-12-07)
        scope: Any = self.scope  # a dict: uvicorn's TypedDict has no key of ours
        scope[PROTOCOL_WATCHES] = True
        try:
            super().on_headers_complete()
        finally:
            self.app = app
        cycle = self.cycle
        if cycle is None:
            return
        if cycle.scope["http_version"] == "1.0":
            cycle.__class__ = _Http10Cycle
        if self._draining:
            cycle.keep_alive = False

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """A request's turn starts (at once, or after the requests pipelined before it): its
        body deadline starts with it. A request queued behind another is not read meanwhile
        (uvicorn pauses reading), so a deadline started at its head could run out during the
        previous response and write a 408 into the middle of it."""
        super()._start_asgi_task(cycle, app)
        if cycle.more_body and not self._body.running:
            self._body.start()
        self._edge_transport.hold_next_write()  # the head, see _LingeringTransport

    def on_body(self, body: bytes) -> None:
        if self._upgrade_head is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._upgrade_head is not None:
            return  # the upgrade request is served from its second parse
        self._body.cancel()
        super().on_message_complete()

    def _head_without_upgrade(self) -> bytes | None:
        """The head just parsed, rebuilt without `Upgrade` and the `upgrade` token of
        `Connection`, or None when that would not stop llhttp from upgrading (CONNECT)."""
        method = self.parser.get_method()
        if method == b"CONNECT":
            return None
        lines = [b"%s %s HTTP/%s\r\n" % (method, self.url, self.parser.get_http_version().encode())]
        for name, value in self.headers:
            if name == b"upgrade":
                continue
            if name == b"connection":
                tokens = [t.strip() for t in value.split(b",")]
                value = b", ".join(t for t in tokens if t and t.lower() != b"upgrade")
                if not value:
                    continue
            lines.append(name + b": " + value + b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    # -------------------------------------------------------------- draining

    def shutdown(self) -> None:
        """Drain: the request in flight is answered with `Connection: close`. An idle
        connection is not cut under a client that may already be sending on it: one more
        request is answered (with `Connection: close`), else the keep-alive or head deadline
        closes it as usual."""
        self._draining = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.keep_alive = False
        # A response already under way promised keep-alive in its head: closing right after it
        # would race the client's next request, so the connection goes idle as usual instead.

    # -------------------------------------------------------------- timers and refusals

    def _cancel_timers(self) -> None:
        self._head.cancel()
        self._body.cancel()
        self._cancel_send_timer()

    # A client that stops reading: the socket's buffer fills, the transport pauses writing, and
    # the response (a relayed stream above all) waits for it. Without a deadline that wait holds
    # a request slot and an upstream connection for as long as the client keeps its window shut.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None and not self._lost:
            self._send_timer = self.loop.call_later(self.limits.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_send_timer()

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        """The client accepted no bytes for HTTP_SEND_TIMEOUT_SECONDS: drop the connection, so
        its request ends (edge.server.disconnect) and the upstream call with it."""
        self._send_timer = None
        if not self._lost and self.flow.write_paused:
            self.transport.abort()

    def _head_timed_out(self) -> None:
        if self.transport.is_closing():
            return
        self._linger_allowed = False  # a client this slow is not waited for any longer
        if self._head_started:
            self._refuse(408, "Request head not received in time.")
        elif self.cycle is None or self.cycle.response_complete:  # idle: sent no request
            self._refused = True
            self.transport.close()

    def _body_timed_out(self) -> None:
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        self._linger_allowed = False
        started = cycle.response_started
        cycle.disconnected = True  # the app's receive() now reports http.disconnect
        cycle.message_event.set()
        if started:
            self._refused = True
            self.transport.close()
        else:
            self._refuse(408, "Request body not received in time.")

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` and close: nothing more is read or answered on this connection.

        A refused new head with earlier answers still owed on the connection (a long stream,
        requests pipelined before it) is not answered: a status line now would be read as an
        earlier request's answer, or land inside one. Those answers are given, then the
        connection closes. A request refused in its own body once its answer has begun ends
        the connection at once.
        """
        self._refused = True
        self._stopped_mid_request = True
        cycle = self.cycle
        own_body = not self._head_started and cycle is not None and cycle.more_body
        if not own_body and self._answer_owed():
            self._head.cancel()  # the send deadline stays: the answers owed must still move
            last = self.pipeline[0][0] if self.pipeline else cycle
            last.keep_alive = False  # close once the answers owed are given
            return
        self._cancel_timers()
        if cycle is not None and not cycle.response_complete:
            # The app may already be handling this request: it now sees a disconnect, and
            # whatever it sends is dropped, so this refusal stays the only response.
            cycle.disconnected = True
            cycle.message_event.set()
        if self.transport.is_closing():
            return
        if own_body and cycle.response_started:
            self.transport.close()  # its answer is under way: no status line can follow
            return
        body = protocol_refusal(status, message).body()
        phrase = http.HTTPStatus(status).phrase.encode()
        request_id = self._log_refusal(status, message)
        head = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: application/json\r\n")
        head.append(b"x-request-id: " + request_id.encode() + b"\r\n")
        head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def _refuse_h2c(self) -> None:
        """A client that speaks HTTP/2 without TLS (`curl --http2-prior-knowledge`): HTTP/2 is
        served over TLS only (HTTP2_ENABLED), so it gets HTTP/2's own refusal, which it can
        read (an HTTP/1.1 status line would be garbage to it): the server's SETTINGS, then
        GOAWAY with HTTP_1_1_REQUIRED and a reason (curl then retries over HTTP/1.1)."""
        self._refused = True
        self._cancel_timers()
        self._log_refusal(505, "HTTP/2 without TLS (h2c prior knowledge)")
        reason = b"HTTP/2 is served over TLS only here: use HTTP/1.1, or https with h2."
        goaway = (0).to_bytes(4, "big") + _HTTP_1_1_REQUIRED.to_bytes(4, "big") + reason
        frames = _H2_SETTINGS + len(goaway).to_bytes(3, "big") + b"\x07\x00\x00\x00\x00\x00"
        self.transport.write(frames + goaway)
        self.transport.close()

    def _log_refusal(self, status: int, reason: str) -> str:
        """The access line of a request refused here (see log_refusal); its request id."""
        request_id = new_request_id()
        try:
            method: str | None = self.parser.get_method().decode("latin-1") or None
        except Exception:  # not parsed as far as the method
            method = None
        url = getattr(self, "url", b"")  # uvicorn sets it when a message begins
        path = url.decode("latin-1", "replace") if url else None
        peer = self.client
        log_refusal(
            request_id, method, path, status, sane_client(peer[0] if peer else None), reason
        )
        return request_id

    # -------------------------------------------------------------- closing

    def _close(self, transport: asyncio.Transport) -> None:
        """Close the connection (every close comes here, see _LingeringTransport): at once,
        unless the client may still be sending its request, in which case linger."""
        if (
            self._lingering is not None
            or self._lost
            or transport.is_closing()
            or not self._linger_allowed
            or not self._client_may_be_sending()
            or not transport.can_write_eof()  # TLS: no half-close, so no linger either
        ):
            transport.close()
            return
        try:
            transport.write_eof()  # sent once the response is flushed
        except (OSError, RuntimeError):
            transport.close()
            return
        self._lingering = done = asyncio.Event()
        self._refused = True  # nothing more is parsed or answered
        self._cancel_timers()
        self._unset_keepalive_if_required()
        transport.resume_reading()  # flow control may have paused it
        # A task, so that a lingering connection counts against max_concurrency (len(tasks))
        # and a graceful shutdown waits for it, at most LINGER_SECONDS.
        task = self.loop.create_task(self._linger(transport, done))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _client_may_be_sending(self) -> bool:
        """A head or a body is still (or may still be) on its way."""
        cycle = self.cycle
        return (
            self._head_started
            or self._stopped_mid_request
            or (cycle is not None and cycle.more_body)
        )

    async def _linger(self, transport: asyncio.Transport, done: asyncio.Event) -> None:
        deadline = self.loop.call_later(LINGER_SECONDS, done.set)
        try:
            await done.wait()
        finally:
            deadline.cancel()
            transport.close()


class _Deadline:
    """A deadline of the request under way: `start()` (re)arms its timer, `cancel()` stops it."""

    __slots__ = ("_loop", "_on_expiry", "_seconds", "_timer")

    def __init__(self, loop: Any, seconds: float, on_expiry: Any) -> None:
        self._loop = loop
        self._seconds = seconds
        self._on_expiry = on_expiry
        self._timer: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self._timer is not None

    def start(self) -> None:
        self.cancel()
        self._timer = self._loop.call_later(self._seconds, self._expired)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        self._on_expiry()


class _LingeringTransport:
    """The connection's transport as the protocol and uvicorn's cycle see it: `close()` goes
    through EdgeHttpToolsProtocol._close, and a lingering connection reports itself closing
    (so nothing more is written on it). Everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport, protocol: EdgeHttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._held: bytes | None = None
        self.write: Callable[[bytes], None] = transport.write  # switched by hold_next_write

    # A response's head and the start of its body go out in one send (one syscall, one TCP
    # segment instead of two): the first write of a request's turn (its head, written by
    # uvicorn's send) is held until the next write, which the app makes in the same step for
    # an answer it has whole, and is sent on its own at the loop's next iteration otherwise (a
    # stream whose first chunk is not there yet, a HEAD answer, a 100 Continue).
    # speed: saves 1 of 3 socket writes a request (strace), ~5 µs kernel CPU (2026-12-07)
    def hold_next_write(self) -> None:
        self.write = self._hold

    def _hold(self, data: bytes) -> None:
        self._held = data
        self.write = self._write_with_held
        self._protocol.loop.call_soon(self._release)

    def _write_with_held(self, data: bytes) -> None:
        held, self._held = self._held, None
        write = self.write = self._transport.write
        if held is not None:
            if len(data) <= _JOIN_MAX_BYTES:
                data = held + data
            else:  # a large body is not copied to save a syscall
                write(held)
        write(data)

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is None:  # joined with the body already; a later turn's hold stays armed
            return
        self.write = self._transport.write
        if not self._transport.is_closing():  # else the client is gone
            self._transport.write(held)

    def close(self) -> None:
        self._release()
        self._protocol._close(self._transport)

    def is_closing(self) -> bool:
        return self._protocol._lingering is not None or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_JOIN_MAX_BYTES = 64 * 1024


class _Http10Cycle(RequestResponseCycle):
    """uvicorn's request/response cycle for an HTTP/1.0 request: a response of unknown length
    is sent close-delimited (RFC 9112 6.3), as HTTP/1.0 has no chunked coding."""

    _close_delimited = False

    async def send(self, message: Any) -> None:
        if not self.response_started and message["type"] == "http.response.start":
            headers = message.get("headers", [])
            if (
                self.scope["method"] != "HEAD"
                and message["status"] not in (204, 304)
                and not any(
                    name.lower() in (b"content-length", b"transfer-encoding") for name, _ in headers
                )
            ):
                self._close_delimited = True
                self.keep_alive = False  # uvicorn adds `connection: close`
                self.chunked_encoding = False  # and no `transfer-encoding: chunked`
        elif self._close_delimited and message["type"] == "http.response.body":
            if self.flow.write_paused and not self.disconnected:
                await self.flow.drain()
            if self.disconnected or self.response_complete:
                return
            body = message.get("body", b"")
            if body:
                self.transport.write(body)
            if not message.get("more_body", False):
                self.response_complete = True
                self.message_event.set()
                self.transport.close()  # the end of the body
                self.on_response()
            return
        await super().send(message)
