"""The limits gunicorn's ASGI worker lacks (HTTP2_ENABLED), enforced around the app.

With HTTP2_ENABLED, gunicorn's own worker (EdgeH2Worker) serves h2 and HTTP/1.1, and
edge.server.protocol is not used. gunicorn enforces, on its own knobs (gunicorn.conf.py, and
`timeout`, which EdgeH2Worker sets in the worker process):

- a connection with no stream open is closed after `keepalive` (KEEPALIVE_TIMEOUT_SECONDS),
  partial header block or not: a stalled h2 head is cut then, and never reaches the app;
- a body pause, a stream whose flow-control window the client keeps shut, and a socket it stops
  reading are all bounded by `timeout` (HTTP_SEND_TIMEOUT_SECONDS): the pause ends the body (the
  app sees `http.disconnect`), the shut window resets the stream (CANCEL), the full socket
  closes the connection;
- a request body the app has not read yet is held to one stream window (64 KiB) at most;
- at most 100 streams open on a connection (SETTINGS_MAX_CONCURRENT_STREAMS; a client opening
  more loses the connection), and its `limit_request_*` and HPACK header list size, set at twice
  ours in gunicorn.conf.py as a backstop: past them a stream is reset, or the connection
  closed, with no HTTP answer.

`guard` adds, per request (an h2 stream or an HTTP/1.1 request alike), what edge.server.protocol
does for the uvicorn worker, with the same answers in the OpenAI envelope:

- request target longer than `max_request_line` → 414; more than `max_headers` fields, or a
  header block larger than `max_header_bytes` (counted as edge.server.protocol counts it) → 431;
- more than `max_concurrency` requests in flight in this worker → 503 with `Retry-After: 1`
  (health checks exempt);
- body not complete within `body_timeout` of the request's start (when gunicorn handed it to
  the app, its head complete), or cut short by gunicorn's own pause limit above → 408 if no
  answer has started, and the app sees `http.disconnect` (what it sends then is dropped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gunicorn.http2.errors import HTTP2Error

from edge.endpoints.routes import HEALTH, kind_of_path
from edge.errors import protocol_refusal
from edge.observability.context import new_request_id
from edge.server.protocol import EdgeLimits

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

_DISCONNECT = {"type": "http.disconnect"}


def guard(app: App, limits: EdgeLimits) -> App:
    """`app` behind the limits of this module's docstring (one guard per worker process)."""
    in_flight = 0
    loop_time: Callable[[], float] | None = None

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal in_flight, loop_time
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        refusal = _refusal(scope, limits)
        if (
            refusal is None
            and in_flight >= limits.max_concurrency
            and kind_of_path(scope["path"]) != HEALTH
        ):
            refusal = 503, "The server is at its concurrency limit; retry shortly."
        if refusal is not None:
            await _answer(scope, send, *refusal)
            return
        if loop_time is None:
            loop_time = asyncio.get_running_loop().time
        request = _Request(scope, receive, send, loop_time() + limits.body_timeout)
        in_flight += 1
        try:
            await app(scope, request.receive, request.send)
        finally:
            in_flight -= 1

    return guarded


def _refusal(scope: Scope, limits: EdgeLimits) -> tuple[int, str] | None:
    query = scope["query_string"]
    if len(scope["raw_path"]) + (len(query) + 1 if query else 0) > limits.max_request_line:
        return 414, "Request line too long."
    headers = scope["headers"]
    if len(headers) > limits.max_headers:
        return 431, "Too many request headers."
    if sum(len(name) + len(value) + 4 for name, value in headers) > limits.max_header_bytes:
        return 431, "Request header block too large."
    return None


class _Request:
    """One request's ASGI channels, with the body deadline and the refusal that ends it."""

    __slots__ = ("_deadline", "_receive", "_send", "body_done", "refused", "scope", "started")

    def __init__(self, scope: Scope, receive: Receive, send: Send, deadline: float) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self._deadline = deadline
        self.body_done = False  # the last body event was received
        self.started = False  # a response head was sent
        self.refused = False  # answered 408 here: the app's own answer is dropped

    async def receive(self) -> Message:
        if self.body_done:  # the app listening for a hang-up: no deadline
            return await self._receive()
        if self.refused:
            return dict(_DISCONNECT)
        try:
            async with asyncio.timeout_at(self._deadline):
                event = await self._receive()
        except TimeoutError:
            event = dict(_DISCONNECT)
        if event["type"] == "http.request":
            if not event.get("more_body", False):
                self.body_done = True
            return event
        # The body did not arrive in time: our deadline, or gunicorn's own limit on a pause
        # (its `timeout`), which also reports a client gone as `http.disconnect`. A 408 to a
        # client that is gone fails quietly.
        if not self.started:
            self.refused = True
            await _answer(self.scope, self._send, 408, "Request body not received in time.")
        return event

    async def send(self, message: Message) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


async def _answer(scope: Scope, send: Send, status: int, message: str) -> None:
    """`status` with `message` in the OpenAI envelope; nothing if the client is gone."""
    body = protocol_refusal(status, message).body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", new_request_id().encode()),
    ]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    elif scope.get("http_version") != "2":
        # As edge.server.protocol: a refused HTTP/1.1 request ends its connection (h2 has no
        # such header: the stream ends, the connection carries on).
        headers.append((b"connection", b"close"))
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    except (OSError, HTTP2Error):  # gunicorn's ClientDisconnected is an OSError
        pass
