"""The gunicorn worker class: uvicorn's, configured from our Config.

gunicorn's own `limit_request_*` settings never reach an ASGI worker, and uvicorn reads only a
few gunicorn settings, so everything uvicorn should enforce is passed here, explicitly.
"""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker

from edge import gunicorn_hooks


class EdgeUvicornWorker(UvicornWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = gunicorn_hooks.current().config
        self.CONFIG_KWARGS = {
            "loop": "uvloop",
            "http": "httptools",
            "lifespan": "on",
            "access_log": False,  # edge.access writes one JSON line per request instead
            "server_header": False,
            "date_header": True,
            "proxy_headers": True,
        }
        super().__init__(*args, **kwargs)
        del config
