"""The benchmark's floor: the least a Falcon ASGI forwarder can do under the same server.

POST /v1/chat/completions is read and sent to FLOOR_UPSTREAM_URL + /chat/completions with the
same kind of pooled aiohttp session as edge (one per worker, opened at lifespan startup); the
status, body and content type come back as they are. No auth, limits, metrics or logs. Run by
bench/run.py as `gunicorn -c bench/floor_gunicorn.conf.py` (same worker class settings as edge).
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import falcon
import falcon.asgi
from uvicorn_worker import UvicornWorker

UPSTREAM = os.environ.get("FLOOR_UPSTREAM_URL", "http://127.0.0.1:9000/v1").rstrip("/")


class FloorWorker(UvicornWorker):
    CONFIG_KWARGS = {  # the same uvicorn settings as edge.server.worker
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        "date_header": True,
    }


class Forward:
    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self.url = UPSTREAM + "/chat/completions"
        self.headers = {"content-type": "application/json", "accept-encoding": "identity"}

    async def process_startup(self, scope: Any, event: Any) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=256, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def process_shutdown(self, scope: Any, event: Any) -> None:
        if self.session is not None:
            await self.session.close()

    async def on_post(self, req: Any, resp: Any) -> None:
        body = await req.stream.read()
        async with self.session.post(self.url, data=body, headers=self.headers) as up:
            resp.data = await up.read()
            resp.status = up.status
            resp.content_type = up.headers.get("content-type", "application/json")

    async def on_get_ready(self, req: Any, resp: Any) -> None:
        resp.data = b'{"status":"ready"}'
        resp.content_type = "application/json"


def create_app() -> falcon.asgi.App:
    forward = Forward()
    app = falcon.asgi.App(middleware=[forward])
    app.add_route("/v1/chat/completions", forward)
    app.add_route("/health/ready", forward, suffix="ready")
    return app


app = create_app()
