"""GET /metrics: a scrape of every worker's metric files (or a 404 when metrics are off)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import falcon

from edge.errors import ServiceUnavailable
from edge.observability import metric_files

log = logging.getLogger("edge.resources")


SCRAPE_LOCK_TIMEOUT_S = 2.0


class MetricsResource:
    """GET /metrics. Under gunicorn the scrape reads the multiprocess files under a shared lock,
    so the master's fold of a dead worker's files (exclusive) is never seen half done
    (edge/observability/metric_files.py). Waiting for the lock yields to the event loop."""

    def __init__(self, metrics: Any) -> None:
        self._metrics = metrics

    async def on_get(self, req: Any, resp: Any) -> None:
        path = self._metrics.directory
        if path is None:
            resp.data, resp.content_type = self._metrics.render()
            return
        try:
            fd = metric_files.open_lock(path)
        except OSError:
            log.error("cannot open the metrics lock file", extra={"directory": path})
            raise ServiceUnavailable("Metrics are unavailable: see the service log.") from None
        try:
            deadline = time.monotonic() + SCRAPE_LOCK_TIMEOUT_S
            while not metric_files.try_lock(fd, exclusive=False):
                if time.monotonic() >= deadline:
                    raise ServiceUnavailable("Metrics are being compacted; retry the scrape.")
                await asyncio.sleep(0.002)
            resp.data, resp.content_type = self._metrics.render()
        finally:
            os.close(fd)  # releases the lock

    on_head = on_get


class SwitchedOff:
    """A route turned off by configuration (/metrics with ENABLE_METRICS=false): 404 for GET."""

    async def on_get(self, req: Any, resp: Any) -> None:
        raise falcon.HTTPRouteNotFound()

    on_head = on_get
