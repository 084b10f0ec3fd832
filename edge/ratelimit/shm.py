"""The rate-limit table in host-wide shared memory (edge.shm), and the limiter over it.

Lifecycle: the gunicorn master calls ``SharedTable.create`` before forking (and may
``close()`` its own mapping straight away), each worker calls ``SharedTable.attach``
after fork, and the master calls ``unlink()`` on exit. The segment, its naming and its
kernel-released lock are edge.shm's; the layout is edge.ratelimit.table's.

The lock is only ever held for one synchronous ``Table.decide`` (a few µs), never across
an ``await``. Taking it is bounded: see ``Segment.acquire``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edge.ratelimit.base import (
    ALLOW,
    LOCK_TIMEOUT,
    TABLE_FULL,
    Decision,
    DigestCache,
    check_policy,
    failure_decision,
)
from edge.ratelimit.table import (
    DEFAULT_PROBE_WINDOW,
    HEADER_SIZE,
    Table,
    TableFormatError,
    format_buffer,
    size_for,
)
from edge.shm import Segment

DEFAULT_LOCK_TIMEOUT_S = 0.05
LOCK_COOLOFF_S = 1.0  # after a lock timeout, only non-blocking tries for this long


class SharedTable(Segment):
    """A process's own attachment to the rate-limit table: a Segment and the Table in it."""

    __slots__ = ("table",)
    table: Table

    @classmethod
    def create(  # type: ignore[override]
        cls,
        name: str,
        slots: int,
        *,
        probe_window: int = DEFAULT_PROBE_WINDOW,
        uid: int | None = None,
        gid: int | None = None,
    ) -> SharedTable:
        """Create and format the table (see `Segment.create`)."""
        created = super().create(
            name, size_for(slots), lambda mm: format_buffer(mm, slots, probe_window), uid, gid
        )
        assert isinstance(created, SharedTable)
        created.table = Table(created.mm)
        return created

    @classmethod
    def attach(cls, name: str, what: str = "rate-limit table") -> SharedTable:
        """Open the existing table with this process's own descriptor and map it."""
        attached = super().attach(name, what)
        assert isinstance(attached, SharedTable)
        try:
            if attached.size < HEADER_SIZE:
                raise TableFormatError(
                    f"shared memory {name!r} ({attached.size} bytes) is not a rate-limit table"
                )
            attached.table = Table(attached.mm)
        except BaseException:
            Segment.close(attached)
            raise
        return attached

    def close(self) -> None:
        """Drop this process's mapping and descriptor (releasing the lock if held)."""
        if self.closed:
            return
        table = getattr(self, "table", None)
        if table is not None:
            table.close()  # the mmap cannot be closed while the table's view of it exists
        super().close()


class ShmRateLimiter:
    """RateLimiter over a SharedTable attached in this process."""

    asynchronous = False  # decisions are plain calls (see RateLimiter)

    __slots__ = (
        "_clock",
        "_cooloff_until",
        "_digest",
        "_lock_timeout_s",
        "_policy",
        "_shared",
        "_table",
    )

    def __init__(
        self,
        table: SharedTable,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        failure_policy: str = ALLOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_policy(failure_policy)
        if not 0.0 <= lock_timeout_s < 60.0:
            raise ValueError(f"lock_timeout_s must be in [0, 60), got {lock_timeout_s!r}")
        self._shared = table
        self._table = table.table
        self._lock_timeout_s = lock_timeout_s
        self._policy = failure_policy
        self._clock = clock
        self._digest = DigestCache()
        self._cooloff_until = 0.0

    def check(self, identity: bytes, rpm: float, burst: int, cost: int = 1) -> Decision:
        digest = self._digest(identity)
        shared = self._shared
        # After a timeout, wait no more for a while: a holder that hangs (stopped, not dead)
        # must not stall this worker's event loop for the full timeout on every request. One
        # non-blocking try is still made, so a freed lock is used again at once.
        cooling = self._cooloff_until and self._clock() < self._cooloff_until
        if not shared.acquire(0.0 if cooling else self._lock_timeout_s):
            if not cooling:
                self._cooloff_until = self._clock() + LOCK_COOLOFF_S
            return failure_decision(LOCK_TIMEOUT, self._policy, burst)
        self._cooloff_until = 0.0
        try:
            # Read the clock under the lock so writes to a slot carry non-decreasing times.
            decision = self._table.decide(digest, self._clock(), rpm / 60.0, burst, cost)
        finally:
            shared.release()
        if decision is None:
            return failure_decision(TABLE_FULL, self._policy, burst)
        return decision

    def adjust(self, identity: bytes, rpm: float, burst: int, refund: float) -> None:
        """Settle a reservation: give back ``refund`` tokens (take when negative). Best
        effort: when the lock cannot be had at once the correction is dropped."""
        shared = self._shared
        if not shared.acquire(0.0 if self._cooloff_until else self._lock_timeout_s):
            return
        try:
            self._table.adjust(self._digest(identity), self._clock(), rpm / 60.0, burst, refund)
        finally:
            shared.release()

    def close(self) -> None:
        self._shared.close()
