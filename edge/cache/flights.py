"""Host-wide table of in-flight cache fills, so identical requests are coalesced (as nginx's
``proxy_cache_lock``): of N workers that miss the cache on the same key at once, one (the
leader) goes upstream and the others (followers) wait for its answer to appear in the cache.

Theory of operation
-------------------
A claim is one 40-byte slot of a shared-memory segment (edge.shm: created by the gunicorn
master before fork, attached by each worker after, locked with the kernel-released ``flock``):
the first 16 bytes of the key (already a SHA-256), the claimant's pid, a random nonzero token
and the time it was claimed (``CLOCK_MONOTONIC``, which on Linux is one clock for every process
of the host, so claims are comparable across workers). A key's slot is one of a window of
``WINDOW`` slots (edge.shm.Slots).

``claim`` is one read-modify-write under the lock, never across an ``await``:

- the key's slot holds a live claim: FOLLOWER (the same process included: a second request in
  the leader's own worker waits like the others);
- otherwise the caller becomes the LEADER, writing its claim over the key's own slot (released
  or stale), else a free slot, else another key's stale claim;
- no slot to write (every slot of the window is another key's live claim) or the lock not had
  within ``lock_timeout_s`` (a holder stopped, not dead: the kernel drops a dead one's lock):
  UNTRACKED, and the caller goes upstream itself, uncoalesced.

A claim is live while its pid is a live process (so a worker killed mid-request, SIGKILL
included, leaves nothing behind) and it is younger than ``max_age_s`` (a stream may take
minutes; a claim that old is taken to be a leak and taken over). ``release`` frees a claim
only while it holds the caller's token, so a leader whose claim went stale and was taken over
never frees its successor's. When ``release`` cannot have the lock it gives up, and the claim
stays live until its process ends or it ages out: a follower must bound its own wait whatever
``leading`` says.

The intended protocol: the leader stores the answer in the cache, then releases; a follower
polls the cache and ``leading`` (an unlocked read of the slot: a torn read may answer either
way, the next poll corrects it), and when the leader is gone without an answer in the cache,
it claims again (and may lead) or goes upstream itself.

The slot arithmetic (``place``, ``live``) is sans I/O: the window as tuples, a clock value and
a liveness test passed in.
"""

from __future__ import annotations

import os
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from typing import Final

from edge.shm import DIGEST_SIZE, Segment, Slots, pid_alive

LEADER: Final = 0
FOLLOWER: Final = 1
UNTRACKED: Final = 2

DEFAULT_SLOTS: Final = 4096  # 40 bytes each: 160 KiB
WINDOW: Final = 8  # slots a key may live in (edge.shm.Slots)
LOCK_TIMEOUT_S: Final = 0.05
MAX_AGE_S: Final = 600.0
CLOCK_SLACK_S: Final = 1.0  # a claim dated later than this ahead of now is corrupt: stale

# digest(16) pid(I) pad(4) token(Q) claimed_at(d)
_SLOT_FORMAT = "16sI4xQd"
_SLOT = struct.Struct("<" + _SLOT_FORMAT)
_TOKEN = struct.Struct("<24xQ")
SLOT_SIZE: Final = 40
_FREE = bytes(SLOT_SIZE)
_MAGIC = b"EDGEFLT1"
_HEADER = struct.Struct("<8sI4x")
HEADER_SIZE: Final = 16
assert _SLOT.size == SLOT_SIZE and _HEADER.size == HEADER_SIZE

Claim = tuple[bytes, int, int, float]  # digest, pid, token (0: free), claimed_at


def live(
    claim: Claim, now: float, max_age_s: float, alive: Callable[[int], bool] = pid_alive
) -> bool:
    """Whether `claim` still stands: a token, an age in [-CLOCK_SLACK_S, max_age_s) (a NaN or
    a date far ahead, torn or corrupt, is stale) and a live process."""
    _, pid, token, claimed_at = claim
    age = now - claimed_at
    return token != 0 and -CLOCK_SLACK_S <= age < max_age_s and alive(pid)


def place(
    window: Sequence[Claim],
    digest: bytes,
    now: float,
    max_age_s: float,
    alive: Callable[[int], bool] = pid_alive,
) -> tuple[int, int]:
    """What a claim of `digest` finds in its window: (FOLLOWER, index of the live claim),
    (LEADER, index of the slot to write) or (UNTRACKED, -1) when every slot is another key's
    live claim. The slot written is the key's own (stale or released) if it has one, so a key
    is never in two slots; else the first free one, else the first stale one."""
    for index, claim in enumerate(window):
        if claim[0] == digest:
            return (FOLLOWER if live(claim, now, max_age_s, alive) else LEADER), index
    for index, claim in enumerate(window):
        if claim[2] == 0:
            return LEADER, index
    for index, claim in enumerate(window):
        if not live(claim, now, max_age_s, alive):
            return LEADER, index
    return UNTRACKED, -1


class Flights:
    """One process's attachment to the table of in-flight fills (see the module docstring)."""

    __slots__ = ("_clock", "_lock_timeout_s", "_max_age_s", "_mm", "_pid", "_segment", "_slots",
                 "_window")  # fmt: skip

    def __init__(
        self,
        segment: Segment,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        max_age_s: float = MAX_AGE_S,
    ) -> None:
        self._segment = segment
        self._mm = segment.mm
        slot_count = _HEADER.unpack_from(self._mm, 0)[1]
        self._slots = Slots(HEADER_SIZE, slot_count, SLOT_SIZE, min(WINDOW, slot_count))
        self._window = struct.Struct("<" + _SLOT_FORMAT * self._slots.window)
        self._lock_timeout_s = lock_timeout_s
        self._clock = clock
        self._max_age_s = max_age_s
        self._pid = os.getpid()  # a Segment refuses to lock in a forked child anyway

    @staticmethod
    def create(name: str, slots: int = DEFAULT_SLOTS, uid: int | None = None,
               gid: int | None = None) -> None:  # fmt: skip
        """Create and format the segment (mode 0600), replacing a stale one; the master."""
        if slots < 1:
            raise ValueError(f"a flights table needs at least one slot, got {slots}")

        def fill(mm: object) -> None:
            _HEADER.pack_into(mm, 0, _MAGIC, slots)  # type: ignore[arg-type]

        Segment.create(name, HEADER_SIZE + slots * SLOT_SIZE, fill, uid, gid).close()

    @classmethod
    def attach(
        cls,
        name: str,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        max_age_s: float = MAX_AGE_S,
    ) -> Flights:
        """Attach the master's table in this process (a worker, after fork). ValueError when
        the object is not a flights table (or is shorter than its header says)."""
        segment = Segment.attach(name, "flights table")
        mm = segment.mm
        if len(mm) < HEADER_SIZE or _HEADER.unpack_from(mm, 0)[0] != _MAGIC:
            segment.close()
            raise ValueError(f"shared memory {name!r} is not a flights table")
        slot_count, size = _HEADER.unpack_from(mm, 0)[1], len(mm)
        if slot_count < 1 or size < HEADER_SIZE + slot_count * SLOT_SIZE:
            segment.close()
            raise ValueError(f"flights table {name!r} is truncated ({size} bytes)")
        return cls(segment, lock_timeout_s, clock, max_age_s)

    def claim(self, key: bytes) -> tuple[int, int]:
        """(LEADER, token), (FOLLOWER, 0) or (UNTRACKED, 0); see the module docstring. The
        leader passes `token` to `release` when its answer is stored (or given up)."""
        digest = _digest(key)
        if self._segment.closed:
            return UNTRACKED, 0
        home = self._slots.home(digest)
        if not self._segment.acquire(self._lock_timeout_s):
            return UNTRACKED, 0
        try:
            now = self._clock()
            verdict, index = place(self._read_window(home), digest, now, self._max_age_s)
            if verdict != LEADER:
                return verdict, 0
            token = _token()
            _SLOT.pack_into(self._mm, home + index * SLOT_SIZE, digest, self._pid, token, now)
            return LEADER, token
        finally:
            self._segment.release()

    def release(self, key: bytes, token: int) -> None:
        """Free the key's claim if it still holds `token`; otherwise (taken over, or a token
        of 0) nothing. Never raises but for a key shorter than 16 bytes or a use in a forked
        child (both bugs): a lock timeout or a closed table leave the claim to go stale."""
        digest = _digest(key)
        if token == 0 or self._segment.closed:
            return
        home = self._slots.home(digest)
        if not self._segment.acquire(self._lock_timeout_s):
            return
        try:
            offset = self._slots.find(self._mm, digest, home)
            if offset >= 0 and _TOKEN.unpack_from(self._mm, offset)[0] == token:
                self._mm[offset : offset + SLOT_SIZE] = _FREE
        finally:
            self._segment.release()

    def leading(self, key: bytes) -> bool:
        """Whether a live leader holds `key`: an unlocked read, for a follower's polls."""
        digest = _digest(key)
        if self._segment.closed:
            return False
        offset = self._slots.find(self._mm, digest, self._slots.home(digest))
        if offset < 0:
            return False
        claim = _SLOT.unpack_from(self._mm, offset)
        return live(claim, self._clock(), self._max_age_s)

    def _read_window(self, home: int) -> list[Claim]:
        fields = self._window.unpack_from(self._mm, home)
        return [fields[at : at + 4] for at in range(0, len(fields), 4)]

    def close(self) -> None:
        self._segment.close()


def _digest(key: bytes) -> bytes:
    if len(key) < DIGEST_SIZE:
        raise ValueError(f"a flights key is a digest of at least {DIGEST_SIZE} bytes")
    return key[:DIGEST_SIZE]


def _token() -> int:
    while True:
        token = secrets.randbits(64)
        if token:
            return token
