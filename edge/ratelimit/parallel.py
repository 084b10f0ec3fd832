"""Requests in flight per key, host-wide: a key's `max_parallel` (`KEY_MAX_PARALLEL` for keys
that set none).

Theory of operation
-------------------
The count lives in a table of 24-byte slots in host-wide shared memory (edge.shm: created by
the gunicorn master before fork, attached by each worker after, locked with the
kernel-released ``flock``). A slot is one *holding*: a 16-byte digest of the key's identity
(never the key), the pid of the worker holding some of its requests, and how many. A count of
0 is a free slot, whatever the rest says. A key has one holding per worker that has any of its
requests in flight, all in the key's window of consecutive slots (edge.shm.Slots), so its
requests in flight are the sum of its holdings there. The window's digests are read in one
``unpack_from`` and the key's found with the tuple's ``count`` and ``index`` (C speed): the
window is twice the workers' slots (``window_for``, 32 to 256), so every worker can hold a
place of a key while other keys' windows overlap it.

``take`` and ``release`` are one read-modify-write each under the lock, never across an
``await``:

- ``take``: the key's holdings are summed. Below the cap, this worker's holding goes up by one
  (or a new one is written in a free slot of the window: digest and pid first, the count of 1
  after, so a worker killed between the two leaves a free slot): HELD. At the cap or above
  (a HUP may lower it), the holdings of workers that are no longer alive are dropped first
  (their pids checked with ``kill(pid, 0)``: only here, so the common path makes no syscall
  but the lock's), and if that is still the cap, it is refused with the number in flight.
  No free slot in the window, even after dropping dead workers' holdings there: NO_SLOT; the
  lock not had within the timeout: NO_LOCK. Both leave the decision to the failure policy,
  and nothing is held.
- ``release``: this worker's holding of the key goes down by one, and is freed at 0. A release
  of nothing held does nothing: a count never goes below 0 (and never wraps, being unsigned).
  When the lock cannot be had the release is owed, and paid at this process's next lock.

A worker that dies holding requests (SIGKILL included) leaves holdings with its pid. The master
clears them in ``child_exit`` (``reclaim``: every slot of that pid, and of any other pid no
longer alive), and, should the master not get the lock then, the first ``take`` that the dead
holdings would refuse drops them itself. So a killed worker never costs a key its cap for
longer than that.

Holdings are only ever written by their own worker (and freed by whoever finds the worker dead),
so a count can be wrong only if a worker is killed between its two writes of a new holding
(then the slot is free: a request uncounted until it ends) or by corruption of the segment.

The arithmetic (``take``, ``release``, ``reclaim``) is sans I/O: it works on the buffer it is
given (the mapping, or a bytearray in tests and in `LocalParallel`) with the liveness test
passed in; the lock, the clock of the lock's cool-off and owed releases are `SharedParallel`'s.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from typing import Any, Final

from edge.ratelimit.base import slot_digest
from edge.shm import DIGEST_SIZE, Segment, Slots, pid_alive

# What `take` returns: HELD, or the number of the key's requests in flight when refused at its
# cap (>= 0), or why the table could not count it (the failure policy decides; nothing held).
HELD: Final = -1
NO_LOCK: Final = -2
NO_SLOT: Final = -3

DEFAULT_SLOTS: Final = 16_384  # 24 bytes each: 384 KiB
MIN_WINDOW: Final = 32  # slots a key's holdings may use (`window_for`)
MAX_WINDOW: Final = 256
MAX_CAP: Final = 1_000_000
LOCK_TIMEOUT_S: Final = 0.05
LOCK_COOLOFF_S: Final = 1.0  # after a lock timeout, only non-blocking tries for this long

SLOT_SIZE: Final = 24
HEADER_SIZE: Final = 16
_MAGIC = b"EDGEPAR1"
_HEADER = struct.Struct("<8sII")  # magic, slot count, window
_SLOT = struct.Struct("<16sII")  # digest, pid, count
_HOLDER = struct.Struct("<II")  # pid, count: at DIGEST_SIZE into a slot
_COUNT = struct.Struct("<I")  # at _COUNT_AT into a slot
_COUNT_AT = DIGEST_SIZE + 4
_FREE = bytes(SLOT_SIZE)
_NO_DIGEST = bytes(DIGEST_SIZE)  # a free slot's, as a release leaves it
assert _SLOT.size == SLOT_SIZE and _HEADER.size == HEADER_SIZE


def window_for(workers: int) -> int:
    """The window for `workers` workers: a key has one holding per worker holding any of its
    requests, and other keys' windows overlap its own, so twice that, within bounds."""
    return min(MAX_WINDOW, max(MIN_WINDOW, 2 * workers))


def size_for(slots: int) -> int:
    return HEADER_SIZE + slots * SLOT_SIZE


def format_buffer(buffer: Any, slots: int, window: int = MIN_WINDOW) -> None:
    """Write the header of an empty table of `slots` slots (the buffer is zeroed)."""
    if slots < 1 or window < 1:
        raise ValueError(f"a parallel table needs at least one slot, got {slots}")
    _HEADER.pack_into(buffer, 0, _MAGIC, slots, min(window, slots))


class Layout:
    """Where a key's window is (edge.shm.Slots) and how its digests are read in one
    `unpack_from`. Sans I/O."""

    __slots__ = ("digests", "slots", "window")

    def __init__(self, buffer: Any) -> None:
        """The layout of the table in `buffer`; ValueError when it is not one (or is cut
        short)."""
        if len(buffer) < HEADER_SIZE:
            raise ValueError("not a parallel table")
        magic, slot_count, window = _HEADER.unpack_from(buffer, 0)
        if magic != _MAGIC or not 1 <= window <= slot_count or len(buffer) < size_for(slot_count):
            raise ValueError("not a parallel table, or a truncated one")
        self.slots = Slots(HEADER_SIZE, slot_count, SLOT_SIZE, window)
        self.window = window
        gap = SLOT_SIZE - DIGEST_SIZE
        self.digests = struct.Struct("<" + f"{DIGEST_SIZE}s{gap}x" * window)


# --------------------------------------------------------------------- the arithmetic, sans I/O


def take(
    buffer: Any,
    layout: Layout,
    digest: bytes,
    pid: int,
    cap: int,
    alive: Callable[[int], bool] = pid_alive,
) -> int:
    """One more request of `digest` in flight for worker `pid`, if the key has fewer than
    `cap`: HELD, else the number in flight (refused), or NO_SLOT (see the module docstring)."""
    home = layout.slots.home(digest)
    digests = layout.digests.unpack_from(buffer, home)
    total = 0
    mine = -1
    others: list[int] = []
    index = -1
    for _ in range(digests.count(digest)):
        index = digests.index(digest, index + 1)
        at = home + index * SLOT_SIZE
        holder, count = _HOLDER.unpack_from(buffer, at + DIGEST_SIZE)
        if count:
            total += count
            if holder == pid and mine < 0:
                mine = at
            else:
                others.append(at)
    if total >= cap:
        for at in others:
            holder, count = _HOLDER.unpack_from(buffer, at + DIGEST_SIZE)
            if holder != pid and not alive(holder):
                buffer[at : at + SLOT_SIZE] = _FREE
                total -= count
        if total >= cap:
            return total
    if mine >= 0:
        count = _COUNT.unpack_from(buffer, mine + _COUNT_AT)[0]
        _COUNT.pack_into(buffer, mine + _COUNT_AT, count + 1)
        return HELD
    at = _free_slot(buffer, home, digests)
    if at < 0:
        at = _dead_slot(buffer, home, layout.window, pid, alive)
        if at < 0:
            return NO_SLOT
    _SLOT.pack_into(buffer, at, digest, pid, 0)  # a count of 0: still free if we die here
    _COUNT.pack_into(buffer, at + _COUNT_AT, 1)
    return HELD


def release(buffer: Any, layout: Layout, digest: bytes, pid: int, n: int = 1) -> int:
    """`n` fewer requests of `digest` in flight for worker `pid`; how many it released (fewer
    than `n` when it held fewer: a count never goes below 0)."""
    home = layout.slots.home(digest)
    digests = layout.digests.unpack_from(buffer, home)
    index = -1
    for _ in range(digests.count(digest)):
        index = digests.index(digest, index + 1)
        at = home + index * SLOT_SIZE
        holder, count = _HOLDER.unpack_from(buffer, at + DIGEST_SIZE)
        if holder == pid and count:
            if count > n:
                _COUNT.pack_into(buffer, at + _COUNT_AT, count - n)
                return n
            buffer[at : at + SLOT_SIZE] = _FREE
            return count
    return 0


def reclaim(buffer: Any, layout: Layout, dead: Callable[[int], bool]) -> int:
    """Free every holding whose pid is `dead`; the number of requests they held."""
    freed = 0
    start = layout.slots.base
    region = bytes(buffer[start : start + layout.slots.slot_count * SLOT_SIZE])  # no view kept
    known: dict[int, bool] = {}
    for index, (holder, count) in enumerate(struct.iter_unpack("<16xII", region)):
        if not count:
            continue
        gone = known.get(holder)
        if gone is None:
            gone = known[holder] = dead(holder)
        if gone:
            at = start + index * SLOT_SIZE
            buffer[at : at + SLOT_SIZE] = _FREE
            freed += count
    return freed


def in_flight(buffer: Any, layout: Layout, digest: bytes) -> int:
    """The key's requests in flight, whoever holds them (an unlocked read, for tests and
    diagnostics: a torn read may be off)."""
    home = layout.slots.home(digest)
    digests = layout.digests.unpack_from(buffer, home)
    return sum(
        _COUNT.unpack_from(buffer, home + index * SLOT_SIZE + _COUNT_AT)[0]
        for index, found in enumerate(digests)
        if found == digest
    )


def _free_slot(buffer: Any, home: int, digests: tuple[bytes, ...]) -> int:
    """The first free slot of the window: one a release left (no digest), else one whose count
    alone is 0 (a worker killed between its two writes); -1 when none."""
    if _NO_DIGEST in digests:
        at = home + digests.index(_NO_DIGEST) * SLOT_SIZE
        if not _COUNT.unpack_from(buffer, at + _COUNT_AT)[0]:
            return at
    for index in range(len(digests)):
        at = home + index * SLOT_SIZE
        if not _COUNT.unpack_from(buffer, at + _COUNT_AT)[0]:
            return at
    return -1


def _dead_slot(buffer: Any, home: int, window: int, pid: int, alive: Callable[[int], bool]) -> int:
    """A slot of the window held by a worker that is gone (any key's), freed; else -1."""
    known: dict[int, bool] = {pid: True}
    for at in range(home, home + window * SLOT_SIZE, SLOT_SIZE):
        holder = _HOLDER.unpack_from(buffer, at + DIGEST_SIZE)[0]
        lives = known.get(holder)
        if lives is None:
            lives = known[holder] = alive(holder)
        if not lives:
            buffer[at : at + SLOT_SIZE] = _FREE
            return at
    return -1


# --------------------------------------------------------------------- the tables


class _Digests:
    """identity → slot digest, memoised (bounded: cleared at `size` entries)."""

    __slots__ = ("_digests", "_size")

    def __init__(self, size: int = 65_536) -> None:
        self._digests: dict[str, bytes] = {}
        self._size = size

    def __call__(self, identity: str) -> bytes:
        digest = self._digests.get(identity)
        if digest is None:
            if len(self._digests) >= self._size:
                self._digests.clear()
            digest = self._digests[identity] = slot_digest(b"key:" + identity.encode())
        return digest


class LocalParallel:
    """The same table in a bytearray of this process, without a lock: a single process (app
    tests, plain uvicorn). Under gunicorn `SharedParallel` counts host-wide."""

    __slots__ = ("_buffer", "_layout", "_pid", "digest")

    def __init__(self, slots: int = 1024, window: int = MIN_WINDOW) -> None:
        self._buffer = bytearray(size_for(slots))
        format_buffer(self._buffer, slots, window)
        self._layout = Layout(self._buffer)
        self._pid = os.getpid()
        self.digest = _Digests()

    def take(self, digest: bytes, cap: int) -> int:
        return take(self._buffer, self._layout, digest, self._pid, cap, _always)

    def release(self, digest: bytes) -> None:
        release(self._buffer, self._layout, digest, self._pid)

    def in_flight(self, digest: bytes) -> int:
        return in_flight(self._buffer, self._layout, digest)

    def close(self) -> None:
        pass


def _always(pid: int) -> bool:
    return True


class SharedParallel:
    """One process's attachment to the host-wide table (see the module docstring)."""

    __slots__ = (
        "_clock",
        "_cooloff_until",
        "_layout",
        "_lock_timeout_s",
        "_mm",
        "_owed",
        "_pid",
        "_segment",
        "digest",
    )

    def __init__(
        self,
        segment: Segment,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._segment = segment
        self._mm = segment.mm
        self._layout = Layout(self._mm)
        self._lock_timeout_s = lock_timeout_s
        self._clock = clock
        self._cooloff_until = 0.0
        self._owed: dict[bytes, int] = {}  # releases the lock did not let through yet
        self._pid = os.getpid()  # a Segment refuses to lock in a forked child anyway
        self.digest = _Digests()

    @staticmethod
    def create(
        name: str,
        slots: int = DEFAULT_SLOTS,
        window: int = MIN_WINDOW,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        """Create and format the table (mode 0600), replacing a stale one; the master."""
        if slots < 1:
            raise ValueError(f"a parallel table needs at least one slot, got {slots}")
        fill = lambda mm: format_buffer(mm, slots, window)  # noqa: E731
        Segment.create(name, size_for(slots), fill, uid, gid).close()

    @classmethod
    def attach(
        cls,
        name: str,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> SharedParallel:
        """Attach the master's table in this process (a worker, after fork)."""
        segment = Segment.attach(name, "parallel table")
        try:
            return cls(segment, lock_timeout_s, clock)
        except ValueError:
            segment.close()
            raise ValueError(f"shared memory {name!r} is not a parallel table") from None

    def _lock(self) -> bool:
        # After a timeout, wait no more for a while (as the rate limiter): a holder that hangs
        # (stopped, not dead) must not stall the event loop for the whole timeout each time.
        cooling = self._cooloff_until and self._clock() < self._cooloff_until
        if not self._segment.acquire(0.0 if cooling else self._lock_timeout_s):
            if not cooling:
                self._cooloff_until = self._clock() + LOCK_COOLOFF_S
            return False
        self._cooloff_until = 0.0
        if self._owed:
            owed, self._owed = self._owed, {}
            for digest, n in owed.items():
                release(self._mm, self._layout, digest, self._pid, n)
        return True

    def take(self, digest: bytes, cap: int) -> int:
        """HELD (release it when the answer ends), the number in flight (refused), NO_LOCK or
        NO_SLOT (nothing held: the failure policy decides)."""
        if self._segment.closed or not self._lock():
            return NO_LOCK
        try:
            return take(self._mm, self._layout, digest, self._pid, cap)
        finally:
            self._segment.release()

    def release(self, digest: bytes) -> None:
        """One request of the key fewer; owed until the next lock when the lock is not had."""
        if self._segment.closed:
            return
        if not self._lock():
            self._owed[digest] = self._owed.get(digest, 0) + 1
            return
        try:
            release(self._mm, self._layout, digest, self._pid)
        finally:
            self._segment.release()

    def in_flight(self, digest: bytes) -> int:
        return in_flight(self._mm, self._layout, digest)

    def close(self) -> None:
        self._segment.close()


def reclaim_dead(name: str, pid: int, lock_timeout_s: float = 1.0) -> int:
    """Free the holdings of worker `pid`, which has exited, and of any other pid no longer
    alive: the master's `child_exit`. The number of requests they held; -1 when the lock was
    not had (the first `take` they would refuse drops them then)."""
    segment = Segment.attach(name, "parallel table")
    try:
        table = Layout(segment.mm)
        if not segment.acquire(lock_timeout_s):
            return -1
        try:
            return reclaim(segment.mm, table, lambda holder: holder == pid or not pid_alive(holder))
        finally:
            segment.release()
    finally:
        segment.close()
