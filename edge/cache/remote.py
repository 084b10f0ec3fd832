"""The Redis (or Valkey) tier of the response cache, behind each host's local store: a local
miss asks Redis, so an entry one host wrote is a hit on every other.

Theory of operation
-------------------
An entry is one string key, ``<prefix>c:<hex of the cache key>`` (the cache key is already a
digest; the rate limiter's keys are ``<prefix>b:``), holding the stored bytes as they are,
written with ``SET key value PX ttl_ms`` so Redis expires it. Reads are one ``GET``.

Redis being slow, down, restarting or loading is a miss, never an error: ``get`` waits at most
``timeout_s`` and answers ``(None, reason)``, the reasons being those of the Redis rate limiter
(edge.ratelimit.redis). After a failure the tier backs off as that limiter does (its ``Backoff``):
for a jittered interval, 50 ms doubling to 2 s, reads are misses without touching Redis
(``redis_backoff``); when the interval is over one read at a time probes Redis, and the first
success, read or write, ends the backoff.

Writes never delay a response: ``put`` schedules the ``SET`` as a task and returns. At most
``max_pending_writes`` are in flight per worker; more are dropped, as are writes while backing
off (only reads probe). Each is bounded by ``timeout_s`` too, so ``timeout_s`` must cover
sending the largest value; a failed write feeds the backoff like a failed read.

Commands go through ``Connections`` (raw RESP on redis-py connections, as the limiter's), with
room for ``max_pending_writes`` writes plus ``_READ_CONNECTIONS`` reads, so a burst of writes
never makes a read wait for a connection. The client is opened in the worker, after the fork
(``start``, at lifespan startup). Values and keys are never logged: only failure reasons.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Final

from edge.ratelimit.redis import (
    REDIS_BACKOFF,
    REDIS_ERROR,
    REDIS_TIMEOUT,
    REDIS_UNAVAILABLE,
    Backoff,
    Connections,
    _reason,
    close_pool,
)

log = logging.getLogger("edge.cache")

KEY_INFIX: Final = "c:"
_READ_CONNECTIONS: Final = 32
_MAX_TTL_S: Final = 315_360_000.0  # ten years: PX of an infinite TTL would overflow


class RedisTier:
    """The cache's Redis tier in one worker (see the module docstring).

    `connect` returns a redis.asyncio client (edge.ratelimit.redis.connect); it is called in
    `start`. `on_write_error`, if given, is called with the reason of each write that failed
    after `put` had accepted it (for a metric); `put` itself reports the writes it drops.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        prefix: str,
        timeout_s: float,
        max_pending_writes: int = 64,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_write_error: Callable[[str], object] | None = None,
    ) -> None:
        if max_pending_writes < 0:
            raise ValueError(f"max_pending_writes must be >= 0, got {max_pending_writes}")
        self._connect = connect
        self._prefix = prefix + KEY_INFIX
        self._timeout_s = timeout_s
        self._max_pending = max_pending_writes
        self._on_write_error = on_write_error
        self._client: Any = None
        self._connections: Connections | None = None
        self._backoff = Backoff(clock)
        self._writes: set[asyncio.Task[None]] = set()

    def key_for(self, key: bytes) -> str:
        return self._prefix + key.hex()

    @property
    def pending_writes(self) -> int:
        return len(self._writes)

    async def start(self, warm_timeout_s: float = 2.0) -> None:
        """Open the client in the worker, after the fork, and connect one connection (PING)
        with more patience than a read has. Redis being away now is not fatal: reads are
        misses until it answers."""
        if self._client is None:
            self._client = self._connect()
            self._connections = Connections(
                self._client.connection_pool, self._max_pending + _READ_CONNECTIONS
            )
        connections = self._connections
        assert connections is not None
        try:
            async with asyncio.timeout(warm_timeout_s):
                await connections.call("PING")
        except Exception as exc:
            log.warning(
                "Redis is not reachable at startup; the cache's Redis tier misses until it is",
                extra={"reason": REDIS_TIMEOUT if isinstance(exc, TimeoutError) else _reason(exc)},
            )

    async def get(self, key: bytes) -> tuple[bytes | None, str | None]:
        """(value, None) on a hit, (None, None) on a miss, (None, reason) when Redis could not
        answer within `timeout_s` or is being backed off from."""
        connections = self._connections
        if connections is None:
            return None, REDIS_UNAVAILABLE  # not started, or closed
        backoff = self._backoff
        probe = False
        if backoff.backing_off:
            if not backoff.try_probe():
                return None, REDIS_BACKOFF
            probe = True
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await connections.call("GET", self.key_for(key))
        except TimeoutError:
            backoff.failed()
            return None, REDIS_TIMEOUT
        except Exception as exc:
            backoff.failed()
            return None, _reason(exc)
        finally:
            if probe:
                backoff.end_probe()
        backoff.succeeded()
        if reply is None or type(reply) is bytes:
            return reply, None
        # Only a client made to decode replies answers otherwise: Redis itself is fine.
        return None, REDIS_ERROR

    def put(self, key: bytes, value: bytes, ttl_s: float) -> bool:
        """Schedule `SET key value PX ttl` and return at once: True when scheduled, False when
        dropped (not started, backing off, `max_pending_writes` in flight, or a TTL that
        is not positive). The TTL is rounded up to whole milliseconds, at most ten years.
        Must be called on the worker's event loop."""
        connections = self._connections
        if connections is None or self._backoff.backing_off:
            return False
        if len(self._writes) >= self._max_pending:
            return False
        if not ttl_s > 0:  # NaN included
            return False
        ttl_ms = math.ceil(min(ttl_s, _MAX_TTL_S) * 1000)
        if type(value) is not bytes:  # pack_command would write str() of a bytearray
            value = bytes(value)
        task = asyncio.get_running_loop().create_task(
            self._write(connections, self.key_for(key), value, ttl_ms)
        )
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return True

    async def _write(self, connections: Connections, key: str, value: bytes, ttl_ms: int) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await connections.call("SET", key, value, "PX", ttl_ms)
        except TimeoutError:
            self._write_failed(REDIS_TIMEOUT)
        except Exception as exc:
            self._write_failed(_reason(exc))
        else:
            self._backoff.succeeded()

    def _write_failed(self, reason: str) -> None:
        self._backoff.failed()
        if self._on_write_error is not None:
            self._on_write_error(reason)

    async def aclose(self) -> None:
        """Cancel the writes still in flight (they are lost) and close the connections."""
        writes = list(self._writes)
        for task in writes:
            task.cancel()
        if writes:
            await asyncio.gather(*writes, return_exceptions=True)
        client, self._client = self._client, None
        connections, self._connections = self._connections, None
        await close_pool(client, connections)
