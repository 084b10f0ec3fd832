"""The ledger (edge.budgets.ledger) in host-wide shared memory, and the process-local one used
without gunicorn.

Lifecycle as every host-wide table (edge.shm): the master creates the segment before forking,
each worker attaches after, the lock is the kernel-released `flock`, held only for one
synchronous read-modify-write of a slot. Taking it is bounded (`Segment.acquire`): when it
cannot be had, or a key finds no slot, the caller is told (None / False) and applies the
failure policy.

A key's row for a period it has not met since the service started is read from the state
store (`load`, outside the lock) before it is created, so spend outlives restarts.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from edge.budgets import ledger
from edge.budgets.ledger import (
    COMPLETION,
    FULL,
    PROMPT,
    REQUESTS,
    SPENT,
    VERSION,
    Fields,
    Ledger,
    Row,
    clamp,
    encode_name,
    kind_number,
    row_of,
)
from edge.shm import Segment

Loader = Callable[[str, str, int], Row | None]
Slot = tuple[bytes, bytes, int]  # digest, the name as stored, kind number


def digest_of(identity: str, kind: str, start: int) -> bytes:
    """The slot digest of `identity`'s `kind` period starting at `start`."""
    text = f"{identity}\0{kind}\0{start}".encode()
    return hashlib.blake2b(text, digest_size=16, person=b"edge-budget").digest()


class _Access:
    """The operations, over `self.ledger` and a lock (`_acquire`/`_release`). The hot path
    works on a slot's raw fields (edge.budgets.ledger.Fields), not on Rows."""

    ledger: Ledger
    load: Loader | None
    _slots: dict[tuple[str, str, int], Slot]
    _offsets: dict[bytes, int]  # digest -> where its slot was last found
    clock: Callable[[], float] = time.time

    def _acquire(self) -> bool:
        return True

    def _release(self) -> None:
        return None

    def _slot(self, name: str, kind: str, start: int) -> Slot:
        """(digest, the name as stored, kind number) of a key's period, memoised."""
        key = (name, kind, start)
        found = self._slots.get(key)
        if found is None:
            if len(self._slots) > 65_536:
                self._slots.clear()
                self._offsets.clear()
            found = self._slots[key] = (
                digest_of(name, kind, start),
                encode_name(name),
                kind_number(kind),
            )
        return found

    def _open(self, name: str, kind: str, start: int, end: int) -> tuple[Slot, int, Fields] | None:
        """Take the lock and find the key's slot for the period, made (from the store's
        record, read outside the lock the first time) when missing; None, and no lock held,
        when it cannot be had."""
        slot = self._slot(name, kind, start)
        digest = slot[0]
        if not self._acquire():
            return None
        offset, fields = self.ledger.find(digest, self._offsets.get(digest, 0), self.clock())
        if fields is not None:  # the common case
            self._offsets[digest] = offset
            return slot, offset, fields
        if offset == FULL:
            self._release()
            return None
        baseline: Row | None = None
        if self.load is not None:
            self._release()
            baseline = self.load(name, kind, start)
            if not self._acquire():
                return None
            offset, fields = self.ledger.find(digest, 0, self.clock())
            if fields is not None:  # another process made it meanwhile
                self._offsets[digest] = offset
                return slot, offset, fields
            if offset == FULL:
                self._release()
                return None
        numbers = (0, 0, 0, 0, 0) if baseline is None else baseline[4:]
        try:
            self.ledger.put(offset, digest, slot[1], slot[2], start, end, *numbers)
        except BaseException:
            self._release()
            raise
        self._offsets[digest] = offset
        return slot, offset, (digest, slot[1], slot[2], start, end, *numbers, 0)

    def admit(
        self, name: str, kind: str, start: int, end: int, budget: int, reserve: int
    ) -> tuple[bool, int] | None:
        """(admitted, spent before it) for a request of `name` against `budget` (nano-USD):
        admitted while the spend, reservations included, is below the budget, and then
        `reserve` is taken; None when the ledger could not be consulted."""
        found = self._open(name, kind, start, end)
        if found is None:
            return None
        (digest, stored, number), offset, fields = found
        try:
            spent = fields[SPENT]
            if spent >= budget:
                return False, spent
            self.ledger.put(offset, digest, stored, number, start, end, clamp(spent + reserve),
                            fields[REQUESTS], fields[PROMPT], fields[COMPLETION],
                            fields[VERSION] + 1)  # fmt: skip
            return True, spent
        finally:
            self._release()

    def settle(
        self,
        name: str,
        kind: str,
        start: int,
        end: int,
        spent: int,
        prompt: int,
        completion: int,
        requests: int = 1,
    ) -> bool:
        """Record the end of `requests` requests: `spent` added (their cost less what they
        had reserved: no floor, a request may cost more than its estimate), their tokens
        counted. False when it could not be."""
        found = self._open(name, kind, start, end)
        if found is None:
            return False
        (digest, stored, number), offset, fields = found
        try:
            self.ledger.put(
                offset, digest, stored, number, start, end, clamp(fields[SPENT] + spent),
                fields[REQUESTS] + requests, fields[PROMPT] + (prompt if prompt > 0 else 0),
                fields[COMPLETION] + (completion if completion > 0 else 0), fields[VERSION] + 1,
            )  # fmt: skip
            return True
        finally:
            self._release()

    def get(self, name: str, kind: str, start: int) -> Row | None:
        if not self._acquire():
            return None
        try:
            _, fields = self.ledger.find(self._slot(name, kind, start)[0])
        finally:
            self._release()
        return None if fields is None else row_of(fields)

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


class LocalLedger(_Access):
    """A process's own ledger (no gunicorn: tests, a single process)."""

    def __init__(
        self,
        slots: int = ledger.MIN_SLOTS,
        load: Loader | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._buffer = bytearray(ledger.size_for(slots))
        ledger.format_buffer(self._buffer, slots)
        self.ledger = Ledger(self._buffer)
        self.load = load
        self.clock = clock
        self._slots = {}
        self._offsets = {}

    def _copy(self) -> bytes:
        return bytes(self._buffer)

    def close(self) -> None:
        return None


class SharedLedger(Segment, _Access):
    """A process's attachment to the host's ledger."""

    __slots__ = ("_lock_timeout_s", "_offsets", "_slots", "clock", "ledger", "load")

    @classmethod
    def create(  # type: ignore[override]
        cls,
        name: str,
        slots: int = ledger.MIN_SLOTS,
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
        self.clock = time.time
        self._slots = {}
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
