"""The gunicorn worker class: uvicorn's, configured from our Config.

gunicorn's own `limit_request_*` settings never reach an ASGI worker, and uvicorn reads only a
few gunicorn settings, so everything uvicorn should enforce is passed here explicitly, and the
limits uvicorn lacks are enforced by the protocol class from `edge.server.protocol`.

Parser: httptools (llhttp, strict mode) rather than h11. On the smuggling corpus of
tests/integration/test_http_edge.py httptools refuses every shape with 400 and a closed
connection (h11, tried by hand when this was chosen, answered 200 to CL+TE, bare LF and
obs-fold), and it is several times faster per request. Its
missing limits (request line, header block, header count, deadlines) are added by
EdgeHttpToolsProtocol.
"""

from __future__ import annotations

import math
import os
import signal
from typing import Any

from gunicorn.workers.gasgi import ASGIWorker
from uvicorn_worker import UvicornWorker

from edge.server import master
from edge.server.h2 import guard
from edge.server.protocol import EdgeLimits, protocol_class


class EdgeUvicornWorker(UvicornWorker):
    sockets: list[Any]  # gunicorn's listeners, set by the arbiter before the worker runs

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = master.current().config
        limits = EdgeLimits.from_config(config)
        self.CONFIG_KWARGS = {
            "loop": "uvloop",
            "http": protocol_class(limits),
            "ws": "none",
            "lifespan": "on",
            "access_log": False,  # edge.access writes one JSON line per request instead
            "server_header": False,
            "date_header": True,
            "proxy_headers": True,
        }
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        # uvloop closes a listening socket's descriptor itself when its server closes, and then
        # calls the socket object's close(): on gunicorn's wrapper (gunicorn.sock.BaseSocket)
        # that second close fails with EBADF, logged at INFO as "Error while closing socket" by
        # every worker on every reload and stop. uvicorn is handed the socket.socket objects
        # the wrappers hold instead, whose close() after uvloop's closes nothing twice.
        self.sockets = [getattr(sock, "sock", sock) for sock in self.sockets]
        super().run()

    async def callback_notify(self) -> None:
        # uvicorn calls this every `timeout` seconds (half gunicorn's, 15 s) for the heartbeat.
        # gunicorn's own workers leave when their master is gone; uvicorn's never look, so a
        # master killed alone left its workers serving, holding the port and the metrics
        # directory's lock, unseen by any master. Such a worker now drains and exits as on
        # a TERM (uvicorn's own handler: requests in flight finish, within its grace).
        if os.getppid() != self.ppid:
            self.log.warning("worker %s: master %s is gone; exiting", self.pid, self.ppid)
            os.kill(self.pid, signal.SIGTERM)
            return
        self.notify()


class EdgeH2Worker(ASGIWorker):
    """gunicorn's own ASGI worker, used when HTTP2_ENABLED=true: it negotiates h2 over TLS
    (ALPN) and still serves HTTP/1.1. edge.server.protocol is not used; what gunicorn enforces
    itself, and what `edge.server.h2.guard` adds around the app, is in edge.server.h2."""

    asgi: Any  # the app, set by gunicorn's load_wsgi

    def init_process(self) -> None:
        # gunicorn bounds a body pause, a shut flow-control window and a full socket by its
        # `timeout` (whole seconds), which the master also uses as the heartbeat deadline. Set
        # here, after the fork, it is the send deadline of this worker only; the master keeps
        # gunicorn.conf.py's. (This worker notifies the master every second whatever it is.)
        config = master.current().config
        self.cfg.set("timeout", max(1, math.ceil(config.send_timeout_s)))
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.asgi = guard(self.asgi, EdgeLimits.from_config(master.current().config))


def worker_app() -> Any:
    """The ASGI app of one worker, built after fork from the master's settings."""
    from edge.app import create_app
    from edge.runtime import HostTables

    settings = master.current()
    tables = HostTables(
        settings.table_name,
        settings.breaker_table,
        settings.flights_table,
        ledger=settings.ledger_table,
        parallel=settings.parallel_table,
    )
    return create_app(settings.config, settings.keys, settings.providers, tables)
