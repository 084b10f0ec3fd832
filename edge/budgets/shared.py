"""The ledger (edge.budgets.ledger) in host-wide shared memory, and the process-local one used
without gunicorn.

Lifecycle as every host-wide table (edge.shm): the master creates the segment before forking,
each worker attaches after, the lock is the kernel-released `flock`, held only for one
synchronous read-modify-write of a slot. Taking it is bounded (`Segment.acquire`): when it
cannot be had, or a key finds no slot, the caller is told (None) and applies the failure
policy.

A key's row for a period it has not met since the service started is read from the state
store (`load`, outside the lock) before it is created, so spend outlives restarts. A row of an
older period is replaced by the new period's, and its last figures are queued for the store
(`take_retired`): they are final.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from edge.budgets import ledger
from edge.budgets.ledger import FULL, Ledger, Row
from edge.shm import Segment

Loader = Callable[[str, int], Row | None]


def digest_of(identity: str) -> bytes:
    return hashlib.blake2b(identity.encode(), digest_size=16, person=b"edge-budget").digest()


class _Access:
    """The operations, over `self.ledger` and a lock (`_acquire`/`_release`)."""

    ledger: Ledger
    load: Loader | None
    retired: list[Row]
    _digests: dict[str, bytes]

    def _acquire(self) -> bool:
        return True

    def _release(self) -> None:
        return None

    def _digest(self, name: str) -> bytes:
        digest = self._digests.get(name)
        if digest is None:
            if len(self._digests) > 65_536:
                self._digests.clear()
            digest = self._digests[name] = digest_of(name)
        return digest

    def _update(self, name: str, period: int, change: Callable[[Row], Row | None]) -> Row | None:
        """Apply `change` to `name`'s row for `period` under the lock, creating it (from the
        store) when missing; `change` returns the row to write, or None to write nothing. The
        row it saw; None when the lock or a slot could not be had, or the slot holds a later
        period (a request that began before the boundary: its figures are dropped)."""
        digest = self._digest(name)
        baseline: Row | None = None
        loaded = self.load is None  # nothing to read the baseline from
        while True:
            if not self._acquire():
                return None
            try:
                offset, row = self.ledger.find(digest)
                if offset == FULL or (row is not None and row.period > period):
                    return None
                if row is None or row.period < period:
                    if not loaded:
                        row = None  # read the store outside the lock, then look again
                    else:
                        if row is not None:
                            self.retired.append(row)
                        row = baseline or Row(name, period)
                        self.ledger.write(offset, digest, row)
                if row is not None:
                    written = change(row)
                    if written is not None:
                        self.ledger.write(offset, digest, written)
                    return row
            finally:
                self._release()
            assert self.load is not None
            baseline = self.load(name, period)
            loaded = True

    def admit(self, name: str, period: int, budget: int, reserve: int) -> tuple[bool, int] | None:
        """(admitted, spent before it) for a request of `name` against `budget`, `reserve`
        taken when admitted; None: the ledger could not be consulted."""
        admitted = False

        def change(row: Row) -> Row | None:
            nonlocal admitted
            admitted, written = ledger.admit(row, budget, reserve)
            return written if admitted else None

        row = self._update(name, period, change)
        return None if row is None else (admitted, row.spent)

    def settle(
        self,
        name: str,
        period: int,
        charge: int,
        release: int,
        prompt: int,
        completion: int,
    ) -> bool:
        """Record a request's end (edge.budgets.ledger.settle); False when it could not be."""
        row = self._update(
            name, period, lambda row: ledger.settle(row, charge, release, prompt, completion)
        )
        return row is not None

    def get(self, name: str, period: int) -> Row | None:
        if not self._acquire():
            return None
        try:
            _, row = self.ledger.find(self._digest(name))
        finally:
            self._release()
        return row if row is not None and row.period == period else None

    def snapshot(self, now: float, every_s: float) -> bytes | None:
        """A copy of the table to flush, when this process is the one to flush now
        (`Ledger.claim_flush`); else None."""
        if not self._acquire():
            return None
        try:
            if not self.ledger.claim_flush(now, every_s):
                return None
            return self._copy()
        finally:
            self._release()

    def _copy(self) -> bytes:
        raise NotImplementedError

    def take_retired(self) -> list[Row]:
        rows, self.retired = self.retired, []
        return rows


class LocalLedger(_Access):
    """A process's own ledger (no gunicorn: tests, a single process)."""

    def __init__(self, slots: int = ledger.DEFAULT_SLOTS, load: Loader | None = None) -> None:
        self._buffer = bytearray(ledger.size_for(slots))
        ledger.format_buffer(self._buffer, slots)
        self.ledger = Ledger(self._buffer)
        self.load = load
        self.retired = []
        self._digests = {}

    def _copy(self) -> bytes:
        return bytes(self._buffer)

    def close(self) -> None:
        return None


class SharedLedger(Segment, _Access):
    """A process's attachment to the host's ledger."""

    __slots__ = ("_digests", "_lock_timeout_s", "ledger", "load", "retired")

    @classmethod
    def create(  # type: ignore[override]
        cls,
        name: str,
        slots: int = ledger.DEFAULT_SLOTS,
        *,
        uid: int | None = None,
        gid: int | None = None,
    ) -> SharedLedger:
        created = super().create(
            name, ledger.size_for(slots), lambda mm: ledger.format_buffer(mm, slots), uid, gid
        )
        assert isinstance(created, SharedLedger)
        created._setup(None, 0.05)
        return created

    @classmethod
    def attach(  # type: ignore[override]
        cls, name: str, lock_timeout_s: float = 0.05, load: Loader | None = None
    ) -> SharedLedger:
        attached = super().attach(name, "budget ledger")
        assert isinstance(attached, SharedLedger)
        try:
            attached._setup(load, lock_timeout_s)
        except BaseException:
            Segment.close(attached)
            raise
        return attached

    def _setup(self, load: Loader | None, lock_timeout_s: float) -> None:
        self.ledger = Ledger(self.mm)
        self.load = load
        self.retired = []
        self._digests = {}
        self._lock_timeout_s = lock_timeout_s

    def _acquire(self) -> bool:
        return self.acquire(self._lock_timeout_s)

    def _release(self) -> None:
        self.release()

    def _copy(self) -> bytes:
        return bytes(self.mm)

    def close(self) -> None:
        if self.closed:
            return
        self.ledger = None  # type: ignore[assignment]
        super().close()
