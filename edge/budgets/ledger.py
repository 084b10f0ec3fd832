"""The host's table of what each key spent in its current budget period, laid out in a flat
buffer (sans I/O: a ``bytearray`` in tests, the shared ``mmap`` in production).

Theory of operation
-------------------
One slot per key and period, every field little-endian::

    header (40 bytes)   magic "EDGEBUD1", slot count, window, flush claimed at (f64, seconds
                        since the epoch), generation (u64, bumped by every write), the
                        generation the last flush copied
    slot   (136 bytes)  digest      16 bytes   blake2b of the key's identity (never the key)
                        name        64 bytes   the identity (a keys-file name, or `key-…`),
                                               UTF-8, zero-padded: what the state store and
                                               `llm-edge-proxy usage` show
                        period      i64        the period's start (edge.budgets.periods)
                        spent       i64        nano-USD: settled costs plus the estimates of
                                               requests in flight
                        requests, prompt, completion   i64 counts
                        version     i64        bumped by every write of this slot: the store
                                               keeps a record only for a newer version
                        check       u32        crc32 of the 128 bytes above

Money is whole nano-dollars (1e-9 USD) so that sums are exact: a budget that pays for exactly
five requests admits five, whatever the order of the additions.

A key lives in one slot of a window (edge.shm.Slots). A slot whose check value does not match
is free (never used, or torn by a process killed mid-write). A window with no slot for the key
and none free: the caller is told (`FULL`) and applies its failure policy; keys are bounded by
configuration, and the table is sized well above them.

The caller serialises every call (edge.budgets.shared holds the kernel-released lock).
"""

from __future__ import annotations

import struct
import zlib
from typing import Final, NamedTuple

from edge.shm import DIGEST_SIZE, Slots

MAGIC: Final = b"EDGEBUD1"
NAME_SIZE: Final = 64
_HEADER = struct.Struct("<8sIIdQQ")
HEADER_SIZE: Final = 40
_BODY = struct.Struct(f"<{DIGEST_SIZE}s{NAME_SIZE}sqqqqqq")
_CHECK = struct.Struct("<I4x")
SLOT_SIZE: Final = _BODY.size + _CHECK.size
_FLUSH_AT = struct.Struct("<d")
_GENERATION = struct.Struct("<Q")
_FLUSH_OFFSET: Final = 16
_GENERATION_OFFSET: Final = 24
_FLUSHED_OFFSET: Final = 32
DEFAULT_SLOTS: Final = 4096  # 136 bytes each: 544 KiB
WINDOW: Final = 16
FULL: Final = -1
assert _HEADER.size == HEADER_SIZE and SLOT_SIZE == 136


class Row(NamedTuple):
    """One key's record for one period (money in nano-USD)."""

    name: str
    period: int
    spent: int = 0
    requests: int = 0
    prompt: int = 0
    completion: int = 0
    version: int = 0


class LedgerFormatError(ValueError):
    """The buffer does not hold a ledger this code can use."""


def size_for(slot_count: int) -> int:
    return HEADER_SIZE + slot_count * SLOT_SIZE


def format_buffer(buf: object, slot_count: int = DEFAULT_SLOTS, window: int = WINDOW) -> None:
    """Write the header into `buf` and clear every slot."""
    memoryview(buf)[: size_for(slot_count)] = bytes(size_for(slot_count))  # type: ignore[arg-type]
    _HEADER.pack_into(buf, 0, MAGIC, slot_count, window, 0.0, 0, 0)  # type: ignore[arg-type]


def to_nano(usd: float) -> int:
    return round(usd * 1e9)


def to_usd(nano: int) -> float:
    return nano / 1e9


class Ledger:
    """The table in `buf` (see the module docstring)."""

    __slots__ = ("_buf", "_slots")

    def __init__(self, buf: object) -> None:
        try:
            magic, count, window, *_ = _HEADER.unpack_from(buf, 0)  # type: ignore[arg-type]
        except struct.error:
            raise LedgerFormatError("buffer too small for a ledger header") from None
        if magic != MAGIC:
            raise LedgerFormatError("not a budget ledger (bad magic)")
        if not 1 <= window <= count or len(memoryview(buf)) < size_for(count):  # type: ignore[arg-type]
            raise LedgerFormatError("ledger header does not match its buffer")
        self._buf = buf
        self._slots = Slots(HEADER_SIZE, count, SLOT_SIZE, window)

    # ---------------------------------------------------------------- slots

    def find(self, digest: bytes) -> tuple[int, Row | None]:
        """(offset, row) of `digest`'s slot; (offset of a free slot, None) when it has none;
        (FULL, None) when its window has neither."""
        slots = self._slots
        home = slots.home(digest)
        offset = slots.find(self._buf, digest, home)
        if offset >= 0:
            row = self._read(offset)
            if row is not None:
                return offset, row
            return offset, None  # torn: reused as free
        for offset in slots.offsets(home):
            if self._read(offset) is None:
                return offset, None
        return FULL, None

    def _read(self, offset: int) -> Row | None:
        body = memoryview(self._buf)[offset : offset + _BODY.size]  # type: ignore[arg-type]
        (check,) = _CHECK.unpack_from(self._buf, offset + _BODY.size)  # type: ignore[arg-type]
        if check != zlib.crc32(body) or not any(body[:DIGEST_SIZE]):
            return None
        _, name, *numbers = _BODY.unpack_from(self._buf, offset)  # type: ignore[arg-type]
        return Row(name.rstrip(b"\0").decode("utf-8", "replace"), *numbers)

    def write(self, offset: int, digest: bytes, row: Row) -> None:
        name = row.name.encode()[:NAME_SIZE]
        _BODY.pack_into(self._buf, offset, digest, name, *row[1:])  # type: ignore[arg-type]
        body = memoryview(self._buf)[offset : offset + _BODY.size]  # type: ignore[arg-type]
        _CHECK.pack_into(self._buf, offset + _BODY.size, zlib.crc32(body))  # type: ignore[arg-type]
        (generation,) = _GENERATION.unpack_from(self._buf, _GENERATION_OFFSET)  # type: ignore[arg-type]
        _GENERATION.pack_into(self._buf, _GENERATION_OFFSET, generation + 1)  # type: ignore[arg-type]

    def rows(self) -> list[Row]:
        """Every valid row (the flush's snapshot)."""
        found = []
        slots = self._slots
        for index in range(slots.slot_count):
            row = self._read(HEADER_SIZE + index * SLOT_SIZE)
            if row is not None:
                found.append(row)
        return found

    # ---------------------------------------------------------------- the flush's claim

    @property
    def generation(self) -> int:
        return int(_GENERATION.unpack_from(self._buf, _GENERATION_OFFSET)[0])  # type: ignore[arg-type]

    def claim_flush(self, now: float, every_s: float) -> bool:
        """Whether the caller is the one to flush now: something was written since the last
        flush, and none was claimed in the last `every_s`, whichever process asks (a claim
        dated in the future, torn or a clock set back, is taken over). `every_s` 0: always."""
        buf = self._buf
        (claimed,) = _FLUSH_AT.unpack_from(buf, _FLUSH_OFFSET)  # type: ignore[arg-type]
        (flushed,) = _GENERATION.unpack_from(buf, _FLUSHED_OFFSET)  # type: ignore[arg-type]
        generation = self.generation
        if every_s > 0 and (flushed == generation or 0 <= now - claimed < every_s):
            return False
        _FLUSH_AT.pack_into(buf, _FLUSH_OFFSET, now)  # type: ignore[arg-type]
        _GENERATION.pack_into(buf, _FLUSHED_OFFSET, generation)  # type: ignore[arg-type]
        return True


# ---------------------------------------------------------------- the arithmetic on a row


def admit(row: Row, budget: int, reserve: int) -> tuple[bool, Row]:
    """Whether a request is admitted against `budget` (its spend so far, requests in flight
    included, is below it), and the row with `reserve` taken when it is."""
    if row.spent >= budget:
        return False, row
    return True, row._replace(spent=row.spent + reserve, version=row.version + 1)


def settle(row: Row, charge: int, release: int, prompt: int, completion: int) -> Row:
    """The row once a request has ended: its `charge` spent, the `release` it had reserved
    given back (no floor: a request may cost more than its estimate), its tokens counted."""
    return row._replace(
        spent=row.spent + charge - release,
        requests=row.requests + 1,
        prompt=row.prompt + max(prompt, 0),
        completion=row.completion + max(completion, 0),
        version=row.version + 1,
    )
