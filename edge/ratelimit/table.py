"""Fixed-size hash table of token buckets laid out in a flat buffer, sans I/O.

Theory of operation
-------------------
The buffer (a ``bytearray`` in tests, a shared ``mmap`` in production) holds a header
followed by ``slot_count`` fixed-size slots; every field is little-endian via ``struct``,
so the layout does not depend on the platform::

    header (64 bytes)  magic "EDGE-RL\\0", version, layout id, header size, slot size,
                       slot count, probe window, crc32 of the preceding fields, padding
    slot   (48 bytes)  digest   16 bytes  identity digest (callers pass a hash, e.g.
                                          ``blake2b(identity, digest_size=16)``; no raw
                                          key ever reaches the table)
                       tokens   f64       bucket level as of ``updated``
                       updated  f64       monotonic seconds
                       full_at  f64       monotonic time the bucket is full again
                       check    u32       crc32 of the 40 bytes above
                       (4 bytes padding)

An identity lives in one slot within a window of ``probe_window`` consecutive slots
starting at ``hash(digest) mod (slot_count - probe_window + 1)`` (windows never wrap; the
probing is edge.shm's ``Slots``, shared with the other host-wide tables).
Lookup compares the digests of the whole window in one ``unpack_from``. A slot whose
check value does not match its contents is *free*: that covers never-used (all zero)
slots as well as slots torn by a process killed mid-write or otherwise scribbled on. A
torn slot that still carries our digest is reused as a fresh, full bucket, so corruption
costs at most one burst and never locks anyone out.

When the window has neither our digest nor a free slot, an *idle* entry is evicted: one
whose ``full_at`` has passed. Its bucket is full, and a full bucket is exactly what a
newcomer starts with, so forgetting it loses nothing; among several, the one idle the
longest goes. ``full_at`` is stored because each identity may have its own rate and
burst, which the table is not told about. If no entry is idle the outcome is
``table_full``: the table never grows and never raises for lack of room.

The table does no locking: the caller serialises ``decide`` calls (see ``shm.py``).
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Final

from edge.ratelimit import bucket
from edge.ratelimit.base import DIGEST_SIZE, Decision
from edge.shm import Slots

MAGIC: Final = b"EDGE-RL\x00"
VERSION: Final = 1
HEADER_SIZE: Final = 64
DEFAULT_PROBE_WINDOW: Final = 16
MAX_SLOT_COUNT: Final = 2**32 - 1

_HEADER = struct.Struct("<8s6I")  # magic, version, layout id, header size, slot size, slots, window
_HEADER_CHECK = struct.Struct("<I")
_SLOT = struct.Struct(f"<{DIGEST_SIZE}sdddI4x")
_SLOT_BODY = struct.Struct(f"<{DIGEST_SIZE}sddd")  # the bytes covered by the check value
_SLOT_BODY_SIZE: Final = _SLOT_BODY.size
SLOT_SIZE: Final = _SLOT.size
LAYOUT_ID: Final = zlib.crc32(f"{_HEADER.format}|{_SLOT.format}|{HEADER_SIZE}".encode())

_FRESH: Final = math.nan  # stored-state placeholder that bucket.decide treats as "start full"


class TableFormatError(ValueError):
    """The buffer does not hold a table this code can use."""


def size_for(slot_count: int) -> int:
    """Bytes needed for a table of ``slot_count`` slots."""
    return HEADER_SIZE + slot_count * SLOT_SIZE


def format_buffer(buf: object, slot_count: int, probe_window: int = DEFAULT_PROBE_WINDOW) -> None:
    """Write a header into ``buf`` and clear every slot."""
    if not 1 <= slot_count <= MAX_SLOT_COUNT:
        raise ValueError(f"slot_count must be in 1..{MAX_SLOT_COUNT}, got {slot_count}")
    if probe_window < 1:
        raise ValueError(f"probe_window must be >= 1, got {probe_window}")
    window = min(probe_window, slot_count)
    with memoryview(buf) as mv:  # type: ignore[arg-type]
        needed = size_for(slot_count)
        if mv.readonly or mv.nbytes < needed:
            raise ValueError(f"need a writable buffer of at least {needed} bytes, got {mv.nbytes}")
        mv[HEADER_SIZE:needed] = bytes(needed - HEADER_SIZE)
        mv[:HEADER_SIZE] = bytes(HEADER_SIZE)
        _HEADER.pack_into(
            mv, 0, MAGIC, VERSION, LAYOUT_ID, HEADER_SIZE, SLOT_SIZE, slot_count, window
        )
        _HEADER_CHECK.pack_into(mv, _HEADER.size, zlib.crc32(mv[: _HEADER.size]))


class Table:
    """A formatted table over a writable buffer. Not thread- or process-safe by itself."""

    __slots__ = ("_mv", "_slots", "probe_window", "slot_count")

    def __init__(self, buf: object) -> None:
        mv = memoryview(buf).cast("B")  # type: ignore[arg-type]
        try:
            self.slot_count, self.probe_window = _read_header(mv)
        except BaseException:
            mv.release()
            raise
        self._mv = mv
        self._slots = Slots(HEADER_SIZE, self.slot_count, SLOT_SIZE, self.probe_window)

    def close(self) -> None:
        """Release the buffer (an mmap cannot be closed while a view of it exists)."""
        self._mv.release()

    def decide(
        self, digest: bytes, now: float, rate_per_s: float, burst: int, cost: int
    ) -> Decision | None:
        """Run the bucket for ``digest`` at ``now`` and store the result.

        Returns None when no slot can be had (the table is full): the caller applies its
        failure policy, which the table knows nothing of.
        """
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"digest must be {DIGEST_SIZE} bytes, got {len(digest)}")
        mv = self._mv
        offset = self._slots.home(digest)
        stored, tokens, updated, _, check = _SLOT.unpack_from(mv, offset)
        if stored != digest:  # usually an entry sits in its home slot; else search the window
            offset = self._locate(digest, offset, now)
            if offset < 0:
                return None
            stored, tokens, updated, _, check = _SLOT.unpack_from(mv, offset)
        if stored != digest or zlib.crc32(mv[offset : offset + _SLOT_BODY_SIZE]) != check:
            tokens = updated = _FRESH  # a new entry, or ours was torn: start full
        allowed, tokens, updated, retry_after, reset_after = bucket.decide(
            tokens, updated, now, rate_per_s, burst, cost
        )
        if reset_after < bucket.MAX_WAIT_S:
            full_at = updated + reset_after
        else:  # capped: recompute, or a slow bucket would look idle (evictable) too early
            full_at = bucket.full_at(tokens, updated, rate_per_s, burst)
        self._write(offset, digest, tokens, updated, full_at)
        return Decision(allowed, burst, max(0, int(tokens)), retry_after, reset_after)

    def adjust(
        self, digest: bytes, now: float, rate_per_s: float, burst: int, refund: float
    ) -> bool:
        """Give back ``refund`` tokens to ``digest``'s bucket (take when negative).

        False when the entry is gone (evicted, torn, or never stored) and there was no slot
        to record it in: an absent entry is a full bucket, so a lost refund costs nothing
        and a lost extra charge at most what it would have taken.
        """
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"digest must be {DIGEST_SIZE} bytes, got {len(digest)}")
        mv = self._mv
        offset = self._slots.home(digest)
        stored, tokens, updated, _, check = _SLOT.unpack_from(mv, offset)
        if stored != digest:
            offset = self._locate(digest, offset, now)
            if offset < 0:
                return False
            stored, tokens, updated, _, check = _SLOT.unpack_from(mv, offset)
        if stored != digest or zlib.crc32(mv[offset : offset + _SLOT_BODY_SIZE]) != check:
            tokens = updated = _FRESH
        tokens, updated = bucket.adjust(tokens, updated, now, rate_per_s, burst, refund)
        self._write(
            offset, digest, tokens, updated, bucket.full_at(tokens, updated, rate_per_s, burst)
        )
        return True

    def _locate(self, digest: bytes, base: int, now: float) -> int:
        """Offset of ``digest``'s slot in the window at ``base``, else of one to claim, else -1."""
        found = self._slots.find(self._mv, digest, base)
        return found if found >= 0 else self._claim(base, now)

    def _claim(self, base: int, now: float) -> int:
        """Offset of a free slot in the window, else of the longest-idle one, else -1."""
        mv = self._mv
        victim, victim_full_at = -1, math.inf
        for offset in self._slots.offsets(base):
            _, _, _, full_at, check = _SLOT.unpack_from(mv, offset)
            if zlib.crc32(mv[offset : offset + _SLOT_BODY_SIZE]) != check:
                return offset  # never used, or torn: free
            if full_at <= now and full_at < victim_full_at:
                victim, victim_full_at = offset, full_at
        return victim

    def _write(
        self, offset: int, digest: bytes, tokens: float, updated: float, full_at: float
    ) -> None:
        check = zlib.crc32(_SLOT_BODY.pack(digest, tokens, updated, full_at))
        _SLOT.pack_into(self._mv, offset, digest, tokens, updated, full_at, check)


def _read_header(mv: memoryview) -> tuple[int, int]:
    """Validate the header; return ``(slot_count, probe_window)``."""
    if mv.readonly:
        raise TableFormatError("the table buffer must be writable")
    if mv.nbytes < HEADER_SIZE:
        raise TableFormatError(
            f"buffer of {mv.nbytes} bytes is too small for a rate-limit table header"
        )
    magic, version, layout, header_size, slot_size, slots, window = _HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise TableFormatError(f"not a rate-limit table (magic {magic!r}, expected {MAGIC!r})")
    if (
        version != VERSION
        or layout != LAYOUT_ID
        or header_size != HEADER_SIZE
        or slot_size != SLOT_SIZE
    ):
        raise TableFormatError(
            f"rate-limit table layout mismatch (version {version}, layout {layout:#x}); "
            f"this code expects version {VERSION}, layout {LAYOUT_ID:#x}"
        )
    (check,) = _HEADER_CHECK.unpack_from(mv, _HEADER.size)
    if zlib.crc32(mv[: _HEADER.size]) != check:
        raise TableFormatError("rate-limit table header is corrupt (check value mismatch)")
    if not (1 <= window <= slots) or size_for(slots) > mv.nbytes:
        raise TableFormatError(
            f"rate-limit table header claims {slots} slots (window {window}) "
            f"but the buffer holds {mv.nbytes} bytes"
        )
    return slots, window
