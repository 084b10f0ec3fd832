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
from edge.budgets.ledger import FULL, Fields, Ledger, Row, encode_name, row_of
from edge.shm import Segment

Loader = Callable[[str, int], Row | None]


def digest_of(identity: str) -> bytes:
    return hashlib.blake2b(identity.encode(), digest_size=16, person=b"edge-budget").digest()


_LOAD = -2  # `_locate`: read the period's baseline from the store first


class _Access:
    """The operations, over `self.ledger` and a lock (`_acquire`/`_release`). The hot path
    works on a slot's raw fields (edge.budgets.ledger.Fields), not on Rows."""

    ledger: Ledger
    load: Loader | None
    retired: list[Row]
    _names: dict[str, tuple[bytes, bytes]]
    _offsets: dict[bytes, int]  # digest -> where its slot was last found

    def _acquire(self) -> bool:
        return True

    def _release(self) -> None:
        return None

    def _named(self, name: str) -> tuple[bytes, bytes]:
        """(digest, the name as stored) of `name`, memoised."""
        found = self._names.get(name)
        if found is None:
            if len(self._names) > 65_536:
                self._names.clear()
                self._offsets.clear()
            found = self._names[name] = (digest_of(name), encode_name(name))
        return found

    def _locate(
        self, digest: bytes, name: bytes, period: int, baseline: Row | None, loaded: bool
    ) -> tuple[int, Fields | None]:
        """Under the lock: the offset of the key's slot for `period` and its fields, the slot
        made (from `baseline`) when it holds none or an older period's row (which is retired);
        (_LOAD, None) when the store must be read first; (FULL, None) when there is no slot or
        it holds a later period (a request that began before the boundary: dropped)."""
        ledger = self.ledger
        offset, fields = ledger.find(digest, self._offsets.get(digest, 0))
        if offset == FULL or (fields is not None and fields[2] > period):
            return FULL, None
        if fields is not None and fields[2] == period:
            self._offsets[digest] = offset
            return offset, fields
        if not loaded:
            return _LOAD, None
        if fields is not None:
            self.retired.append(row_of(fields))
        numbers = (period, 0, 0, 0, 0, 0) if baseline is None else tuple(baseline[1:])
        ledger.put(offset, digest, name, *numbers)
        return offset, (digest, name, *numbers, 0)  # type: ignore[return-value]

    def _open(self, name: str, period: int) -> tuple[bytes, bytes, int, Fields] | None:
        """Take the lock and find the key's slot for `period` (reading its baseline from the
        store, outside the lock, the first time); None, and no lock held, when it cannot."""
        digest, stored = self._names.get(name) or self._named(name)
        if self._acquire():  # the common case: the key's slot holds this period
            offset, fields = self.ledger.find(digest, self._offsets.get(digest, 0))
            if fields is not None and fields[2] == period:
                return digest, stored, offset, fields  # the lock still held
            self._release()
        baseline: Row | None = None
        loaded = self.load is None  # nothing to read a baseline from
        while True:
            if not self._acquire():
                return None
            try:
                offset, fields = self._locate(digest, stored, period, baseline, loaded)
            except BaseException:
                self._release()
                raise
            if fields is not None:
                return digest, stored, offset, fields  # the lock still held
            self._release()
            if offset != _LOAD:
                return None
            assert self.load is not None
            baseline = self.load(name, period)
            loaded = True

    def admit(self, name: str, period: int, budget: int, reserve: int) -> tuple[bool, int] | None:
        """(admitted, spent before it) for a request of `name` against `budget` (nano-USD):
        admitted while the spend, reservations included, is below the budget, and then
        `reserve` is taken; None when the ledger could not be consulted."""
        found = self._open(name, period)
        if found is None:
            return None
        digest, stored, offset, fields = found
        try:
            spent = fields[3]
            if spent >= budget:
                return False, spent
            self.ledger.put(offset, digest, stored, period, spent + reserve, fields[4],
                            fields[5], fields[6], fields[7] + 1)  # fmt: skip
            return True, spent
        finally:
            self._release()

    def settle(
        self,
        name: str,
        period: int,
        charge: int,
        release: int,
        prompt: int,
        completion: int,
        requests: int = 1,
    ) -> bool:
        """Record the end of `requests` requests: their `charge` spent, the `release` they
        had reserved given back (no floor: a request may cost more than its estimate), their
        tokens counted. False when it could not be."""
        found = self._open(name, period)
        if found is None:
            return False
        digest, stored, offset, fields = found
        try:
            self.ledger.put(
                offset, digest, stored, period, fields[3] + charge - release,
                fields[4] + requests, fields[5] + (prompt if prompt > 0 else 0),
                fields[6] + (completion if completion > 0 else 0), fields[7] + 1,
            )  # fmt: skip
            return True
        finally:
            self._release()

    def get(self, name: str, period: int) -> Row | None:
        if not self._acquire():
            return None
        try:
            _, fields = self.ledger.find(self._named(name)[0])
        finally:
            self._release()
        return row_of(fields) if fields is not None and fields[2] == period else None

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
        self._names = {}
        self._offsets = {}

    def _copy(self) -> bytes:
        return bytes(self._buffer)

    def close(self) -> None:
        return None


class SharedLedger(Segment, _Access):
    """A process's attachment to the host's ledger."""

    __slots__ = ("_lock_timeout_s", "_names", "_offsets", "ledger", "load", "retired")

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
        self._names = {}
        self._offsets = {}
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
