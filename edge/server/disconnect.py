"""The client went away: how it is noticed, and what it ends.

Theory of operation. A request whose client hangs up must not keep its upstream work (a
pending answer, a relayed stream) or its concurrency slot until SERVER_TIMEOUT_SECONDS. Two
moments need it, and this module owns both:

- While a handler awaits the upstream (`unless_client_leaves`). The handler's task is put in
  the ASGI scope under CANCEL_ON_DISCONNECT. Under the uvicorn worker, edge.server.protocol
  marks every scope it makes (PROTOCOL_WATCHES) and calls `client_gone(scope)` from
  `connection_lost`: that costs nothing per request. gunicorn's own ASGI worker (used when
  HTTP2_ENABLED=true, for h2 and HTTP/1.1 alike) has no such hook, so there a watcher awaits the
  ASGI `receive` channel, which reports `http.disconnect` once the peer resets the stream or
  closes the connection, and calls `client_gone` then. Either way the awaiting task is
  cancelled, and the cancellation becomes ClientClosedRequest: the request is still finished,
  logged and counted (status 499).
- While a stream is relayed (`close_on_hang_up`). Falcon does not watch the connection while it
  iterates `resp.stream`, so the relay watches `receive` itself and closes the upstream response
  at once; this works under both workers.

`EdgeRequest` gives handlers the ASGI `receive` callable these watchers need (Falcon keeps it
private).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import falcon.asgi

from edge.errors import ClientClosedRequest

T = TypeVar("T")
Receive = Callable[[], Awaitable[Mapping[str, Any]]]

CANCEL_ON_DISCONNECT = "edge.cancel_on_disconnect"  # the task to cancel on a hang-up
CLIENT_GONE = "edge.client_gone"  # set once the client has hung up
PROTOCOL_WATCHES = "edge.protocol_watches"  # our protocol calls client_gone itself


class EdgeRequest(falcon.asgi.Request):
    """Falcon's request plus the ASGI `receive` callable, to notice a client hanging up."""

    __slots__ = ()

    @property
    def receive(self) -> Receive:
        return self._receive


def client_gone(scope: Any) -> None:
    """The connection of `scope`'s request is gone: end whatever its handler awaits."""
    task = scope.get(CANCEL_ON_DISCONNECT)
    if task is not None:
        scope[CLIENT_GONE] = True
        task.cancel()


async def unless_client_leaves(req: EdgeRequest, awaitable: Awaitable[T]) -> T:
    """Await an upstream exchange, ending it at once (499) if the client hangs up meanwhile."""
    scope = req.scope
    task = asyncio.current_task()
    scope[CANCEL_ON_DISCONNECT] = task
    watcher = None
    if not scope.get(PROTOCOL_WATCHES):
        watcher = asyncio.ensure_future(_wait_gone(req.receive, lambda: client_gone(scope)))
    try:
        return await awaitable
    except asyncio.CancelledError:
        if not scope.get(CLIENT_GONE) or task is None:
            raise
        task.uncancel()
        raise ClientClosedRequest("The client closed the connection.") from None
    finally:
        del scope[CANCEL_ON_DISCONNECT]
        if watcher is not None:
            watcher.cancel()


def close_on_hang_up(receive: Receive, close: Callable[[], None]) -> asyncio.Future[None]:
    """Call `close` as soon as the client hangs up; cancel the returned future when done."""
    return asyncio.ensure_future(_wait_gone(receive, close))


async def _wait_gone(receive: Receive, then: Callable[[], None]) -> None:
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            then()
            return
