"""The benchmark's floor: the least a Falcon ASGI forwarder can do under the same server.

POST /v1/chat/completions is read and sent to FLOOR_UPSTREAM_URL + /chat/completions with a
pooled aiohttp session (one per worker, opened at lifespan startup; edge used the same until
it got its own leaner client); the status, body and content type come back as they are, and an
event stream is relayed read by read. No auth, limits, metrics or logs. Run by
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
        up = await self.session.post(self.url, data=body, headers=self.headers)
        resp.status = up.status
        resp.content_type = up.headers.get("content-type", "application/json")
        if resp.content_type.startswith("text/event-stream"):
            resp.stream = relay(up)
            return
        try:
            resp.data = await up.read()
        finally:
            up.release()

    async def on_get_ready(self, req: Any, resp: Any) -> None:
        resp.data = b'{"status":"ready"}'
        resp.content_type = "application/json"


async def relay(up: aiohttp.ClientResponse) -> Any:
    try:
        async for chunk in up.content.iter_any():
            yield chunk
    finally:
        up.release()


def create_app() -> falcon.asgi.App:
    forward = Forward()
    app = falcon.asgi.App(middleware=[forward])
    app.add_route("/v1/chat/completions", forward)
    app.add_route("/health/ready", forward, suffix="ready")
    return app


app = create_app()
