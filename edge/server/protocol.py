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
  opening) → 408 if anything was sent, else a silent close;
- body not complete within `body_timeout` seconds of the head → 408, closed, and the app sees
  the client as disconnected;
- more than `max_concurrency` requests in flight in this worker → 503 in the OpenAI envelope
  with `Retry-After: 1`;
- while the worker drains (gunicorn HUP/TERM/TTOU), idle keep-alive connections are not cut
  under a client that may be sending on them: each one may carry one more request, answered
  with `Connection: close`; otherwise it closes at its keep-alive deadline as usual.

Parse errors (smuggling shapes such as Content-Length with Transfer-Encoding, duplicate
Content-Length, bare LF, obs-fold, NUL in a header) are refused by llhttp in strict mode: 400
and the connection closed, so no second response can follow on the socket.
"""

from __future__ import annotations

import asyncio
import http
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edge.config import Config
from edge.endpoints.routes import HEALTH, kind_of_target
from edge.errors import OVERLOADED, envelope
from edge.observability.context import CANCEL_ON_DISCONNECT, CLIENT_GONE, new_request_id

_OVERLOADED_BODY = envelope(
    "The server is at its concurrency limit; retry shortly.", OVERLOADED, None, "overloaded"
)


@dataclass(frozen=True)
class EdgeLimits:
    max_request_line: int
    max_header_bytes: int
    max_headers: int
    header_timeout: float
    body_timeout: float
    max_concurrency: int

    @classmethod
    def from_config(cls, config: Config) -> EdgeLimits:
        return cls(
            max_request_line=config.max_request_line,
            max_header_bytes=config.max_header_bytes,
            max_headers=config.max_headers,
            header_timeout=config.header_timeout_s,
            body_timeout=config.body_timeout_s,
            max_concurrency=config.max_concurrency,
        )


class _Refuse(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _overloaded(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_OVERLOADED_BODY)).encode()),
                (b"retry-after", b"1"),
                (b"x-request-id", new_request_id().encode()),
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
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._draining = False

    # -------------------------------------------------------------- connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # the first request must arrive in time too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A handler waiting on the upstream for this request has nobody left to answer:
            # end its wait now (edge.endpoints.openai turns this into a logged 499).
            task = cycle.scope.get(CANCEL_ON_DISCONNECT)
            if task is not None:
                cycle.scope[CLIENT_GONE] = True
                task.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
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
        except httptools.HttpParserUpgrade:
            self._ignore_upgrade()
            return
        except httptools.HttpParserError:
            self._refuse(400, "Invalid HTTP request received.")
            return
        if self._head_started:
            # Counted per read, after parsing: a read that completes a head is not counted,
            # so a body in the same read never is. (A read holding the end of one pipelined
            # request's body and the start of the next head is counted whole.)
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, "Request header block too large.")
        elif (
            self._head_timer is None
            and self.timeout_keep_alive_task is None
            and (self.cycle is None or self.cycle.response_complete)
        ):
            # Bytes that start no request (the blank lines a parser skips) cancelled the
            # keep-alive deadline above; without a new deadline they would hold the
            # connection open for ever.
            self._arm_head_timer()

    def _ignore_upgrade(self) -> None:
        """Answer a request carrying an Upgrade we do not speak (e.g. `Upgrade: h2c`) over
        HTTP/1.1, as RFC 9110 7.8 allows, then close: the parser stops at an upgrade, so
        nothing after this request can be read on the connection. One with a body still to
        come cannot be read either, and is refused."""
        cycle = self.cycle
        if cycle is None or cycle.more_body:
            self._refuse(400, "Requests with a body cannot ask for a protocol upgrade.")
            return
        cycle.keep_alive = False
        self._refused = True  # read nothing more; the response closes the connection
        self._cancel_timers()

    # -------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True
        self._head_bytes = 0
        self._header_count = 0
        self._header_size = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_request_line:
            raise _Refuse(414, "Request line too long.")

    def on_header(self, name: bytes, value: bytes) -> None:
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
        self._head_started = False
        self._cancel_head_timer()
        if not any(name == b"host" for name, _ in self.headers) and (
            self.parser.get_http_version() == "1.1"
        ):
            raise _Refuse(400, "HTTP/1.1 requests must carry a Host header.")
        app = self.app
        # Health checks are exempt from the cap: a saturated worker is busy, not dead.
        if len(self.tasks) >= self.limits.max_concurrency and kind_of_target(self.url) != HEALTH:
            self.app = _overloaded
        try:
            super().on_headers_complete()
        finally:
            self.app = app
        cycle = self.cycle
        if cycle is None:
            return
        if self._draining:
            cycle.keep_alive = False
        if cycle.more_body:
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        super().on_message_complete()

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

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_started:
            self._refuse(408, "Request head not received in time.")
        elif self.cycle is None or self.cycle.response_complete:  # idle: sent no request
            self._refused = True
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        started = cycle.response_started
        cycle.disconnected = True  # the app's receive() now reports http.disconnect
        cycle.message_event.set()
        if started:
            self._refused = True
            self.transport.close()
        else:
            self._refuse(408, "Request body not received in time.")

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` and close: nothing more is read or answered on this connection."""
        self._refused = True
        self._cancel_timers()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The app may already be handling this request: it now sees a disconnect, and
            # whatever it sends is dropped, so this refusal stays the only response.
            cycle.disconnected = True
            cycle.message_event.set()
        if self.transport.is_closing():
            return
        body = envelope(message, "invalid_request_error", None, _CODES.get(status))
        phrase = http.HTTPStatus(status).phrase.encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: application/json\r\n")
        head.append(b"x-request-id: " + new_request_id().encode() + b"\r\n")
        head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()


_CODES = {
    400: "bad_request",
    408: "request_timeout",
    414: "request_line_too_long",
    431: "request_header_fields_too_large",
}
