"""`Runtime`: what one worker holds open, shared by the middleware and the endpoints."""

from __future__ import annotations

from typing import Any

from edge.config import Config
from edge.observability.logs import flush_access_log
from edge.ratelimit import RateLimiter
from edge.upstream.client import Upstream


class Runtime:
    """What one worker holds open: the upstream session, the limiter, the metrics."""

    def __init__(
        self, config: Config, metrics: Any, limiter_factory: Any, upstream: Upstream | None
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.upstream = upstream
        self.limiter: RateLimiter | None = None
        self.tokens: Any = None  # edge.ratelimit.tokens.TokenLimiter when rate limiting is on
        self._limiter_factory = limiter_factory
        self.started = False
        self.router: Any = None  # edge.routing.router.Router; None: the built-in mock answers
        self.breakers_factory: Any = None  # attaches the host-wide breaker table after fork

    @property
    def ready(self) -> bool:
        if not self.started:
            return False
        return self.upstream is None or self.upstream.ready

    async def process_startup(self, scope: Any, event: Any) -> None:
        if self._limiter_factory is not None and self.limiter is None:
            self.limiter = self._limiter_factory()
            start = getattr(self.limiter, "start", None)
            if start is not None:  # the Redis pool: opened here, in the worker, after fork
                await start()
        if self.breakers_factory is not None and self.router is not None:
            self.router.breakers = self.breakers_factory()
        if self.upstream is not None:
            await self.upstream.start()
        self.started = True

    async def process_shutdown(self, scope: Any, event: Any) -> None:
        self.started = False
        if self.upstream is not None:
            await self.upstream.close()
        if self.limiter is not None and self._limiter_factory is not None:
            aclose = getattr(self.limiter, "aclose", None)
            if aclose is not None:
                await aclose()
            self.limiter.close()
            self.limiter = None
        if self.breakers_factory is not None and self.router is not None:
            self.router.breakers.close()
        flush_access_log()  # uvicorn has drained the connections: every access line is out
