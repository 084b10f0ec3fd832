"""GET /health (overall), /health/live (the process answers), /health/ready (can serve)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from edge.errors import ServiceUnavailable

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime
from edge.pipeline import JSON

_HEALTHY = orjson.dumps({"status": "ok"})
_ALIVE = orjson.dumps({"status": "alive"})
_READY = orjson.dumps({"status": "ready"})


class Health:
    """GET /health (overall), /health/live (the process answers), /health/ready (can serve)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def on_get(self, req: Any, resp: Any) -> None:
        self._ready_or_503()
        router = self._runtime.router
        if router.providers.from_file:
            resp.data = orjson.dumps({"status": "ok", "providers": router.states()})
        else:
            resp.data = _HEALTHY
        resp.content_type = JSON

    async def on_get_live(self, req: Any, resp: Any) -> None:
        resp.data = _ALIVE
        resp.content_type = JSON

    async def on_get_ready(self, req: Any, resp: Any) -> None:
        self._ready_or_503()
        resp.data = _READY
        resp.content_type = JSON

    # HEAD answers as GET without a body (monitors use it): Falcon drops the body.
    on_head = on_get
    on_head_live = on_get_live
    on_head_ready = on_get_ready

    def _ready_or_503(self) -> None:
        if not self._runtime.ready:
            raise ServiceUnavailable("Not ready: the upstream session is not open.")
        if not self._runtime.router.can_serve():
            raise ServiceUnavailable("Not ready: no provider can serve any model.")
