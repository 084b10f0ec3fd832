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

from typing import Any

from gunicorn.workers.gasgi import ASGIWorker
from uvicorn_worker import UvicornWorker

from edge.server import master
from edge.server.protocol import EdgeLimits, protocol_class


class EdgeUvicornWorker(UvicornWorker):
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


class EdgeH2Worker(ASGIWorker):
    """gunicorn's own ASGI worker, used when HTTP2_ENABLED=true: it negotiates h2 over TLS
    (ALPN) and still serves HTTP/1.1. gunicorn applies its limit_request_* settings here
    (mapped from ours in gunicorn.conf.py), and worker_connections caps connections; the head
    and body deadlines of edge.server.protocol are uvicorn-specific and do not apply."""


def worker_app() -> Any:
    """The ASGI app of one worker, built after fork from the master's settings."""
    from edge.app import create_app

    settings = master.current()
    config = settings.config
    limiter_factory = None
    if config.rate_limit_enabled and config.rate_limit_backend == "redis":
        limiter_factory = redis_limiter_factory(config)
    elif config.rate_limit_enabled:
        name = settings.table_name

        def limiter_factory() -> Any:
            from edge.ratelimit import SharedTable, ShmRateLimiter

            return ShmRateLimiter(
                SharedTable.attach(name),
                lock_timeout_s=config.rate_limit_lock_timeout_s,
                failure_policy=config.rate_limit_failure_policy,
            )

    breakers = settings.breaker_table

    def breakers_factory() -> Any:
        from edge.upstream.breaker import SharedBreakers

        return SharedBreakers.attach(breakers)

    return create_app(config, settings.keys, limiter_factory, settings.providers, breakers_factory)


def redis_limiter_factory(config: Any) -> Any:
    """Builds the Redis limiter in the worker at lifespan startup (its pool opens there)."""

    def factory() -> Any:
        from edge.ratelimit.redis import RedisRateLimiter, connect

        assert config.redis_url is not None
        return RedisRateLimiter(
            lambda: connect(
                config.redis_url, config.redis_password, config.rate_limit_redis_timeout_s
            ),
            prefix=config.redis_key_prefix,
            timeout_s=config.rate_limit_redis_timeout_s,
            failure_policy=config.rate_limit_failure_policy,
        )

    return factory
