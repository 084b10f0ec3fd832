"""A process-local RateLimiter over a bytearray table: for a single process (app tests, plain
uvicorn). Under gunicorn the shared-memory limiter is used instead, so limits hold host-wide."""

from __future__ import annotations

import time
from collections.abc import Callable

from edge.ratelimit.base import ALLOW, TABLE_FULL, Decision, DigestCache, failure_decision
from edge.ratelimit.table import Table, format_buffer, size_for


class LocalRateLimiter:
    asynchronous = False  # decisions are plain calls (see RateLimiter)

    __slots__ = ("_clock", "_digest", "_policy", "_table")

    def __init__(
        self,
        slots: int,
        failure_policy: str = ALLOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        buffer = bytearray(size_for(slots))
        format_buffer(buffer, slots)
        self._table = Table(buffer)
        self._policy = failure_policy
        self._clock = clock
        self._digest = DigestCache()

    def check(self, identity: bytes, rpm: float, burst: int, cost: int = 1) -> Decision:
        decision = self._table.decide(
            self._digest(identity), self._clock(), rpm / 60.0, burst, cost
        )
        if decision is None:
            return failure_decision(TABLE_FULL, self._policy, burst)
        return decision

    def adjust(self, identity: bytes, rpm: float, burst: int, refund: float) -> None:
        self._table.adjust(self._digest(identity), self._clock(), rpm / 60.0, burst, refund)

    def close(self) -> None:
        self._table.close()
