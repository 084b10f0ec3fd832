"""The host's table of what each key spent per budget period, laid out in a flat buffer (sans
I/O: a ``bytearray`` in tests, the shared ``mmap`` in production).

Theory of operation
-------------------
One slot per key, period kind and period, every field little-endian::

    header (40 bytes)   magic "EDGEBUD2", slot count, window, flush claimed at (f64, seconds
                        since the epoch), generation (u64, bumped by every write), the
                        generation the last flush copied
    slot   (152 bytes)  digest      16 bytes   blake2b of (identity, kind, start): never the key
                        name        64 bytes   the identity (a keys-file name, or `key-…`),
                                               UTF-8, zero-padded: what the state store and
                                               `llm-edge-proxy usage` show
                        kind        i64        0 day, 1 week, 2 month (edge.budgets.periods)
                        start, end  i64        the period (seconds since the epoch, UTC)
                        spent       i64        nano-USD: settled costs plus the reservations of
                                               requests in flight
                        requests, prompt, completion   i64 counts
                        version     i64        bumped by every write of this slot: the store
                                               keeps a record only for a newer version
                        check       u32        crc32 of the 144 bytes above

A period is a slot of its own, so the next period's requests never disturb the last one's: a
request that began before midnight settles into the day it was admitted in, and a key whose
`budget_period` changes on a reload starts that kind of period from its stored record. A slot
whose period ended more than `RETAIN_S` ago (flushed many times since) is evicted when its
window has no other room; a window of live periods only is `FULL`, and the caller applies its
failure policy (the table is sized from the number of keys: `slots_for`).

Money is whole nano-dollars (1e-9 USD) so that sums are exact: a budget that pays for exactly
five requests admits five, whatever the order of the additions. Sums saturate at ±`LIMIT`.

A slot whose check value does not match is free (never used, or torn by a process killed
mid-write); the key's figures are then read again from the state store (at most the last
second is lost). The caller serialises every call (edge.budgets.shared holds the lock).
"""

from __future__ import annotations

import struct
import zlib
from typing import Final, NamedTuple

from edge.budgets.periods import PERIODS
from edge.shm import DIGEST_SIZE, Slots

MAGIC: Final = b"EDGEBUD2"
NAME_SIZE: Final = 64
_HEADER = struct.Struct("<8sIIdQQ")
HEADER_SIZE: Final = 40
_BODY = struct.Struct(f"<{DIGEST_SIZE}s{NAME_SIZE}sqqqqqqqq")
_BODY_SIZE: Final = _BODY.size
_CHECK = struct.Struct("<I4x")
_SLOT = struct.Struct(f"<{DIGEST_SIZE}s{NAME_SIZE}sqqqqqqqqI4x")
SLOT_SIZE: Final = _BODY.size + _CHECK.size
_NO_DIGEST: Final = bytes(DIGEST_SIZE)
_FLUSH_AT = struct.Struct("<d")
_GENERATION = struct.Struct("<Q")
_FLUSH_OFFSET: Final = 16
_GENERATION_OFFSET: Final = 24
_FLUSHED_OFFSET: Final = 32
MIN_SLOTS: Final = 4096  # 152 bytes each: 608 KiB
WINDOW: Final = 16
FULL: Final = -1
RETAIN_S: Final = 3600  # an ended period's slot is kept this long (its last requests settle)
LIMIT: Final = 2**62  # nano-USD: about 4.6e9 USD
assert _HEADER.size == HEADER_SIZE and SLOT_SIZE == _SLOT.size == 152

# A slot as read: digest, name, kind, start, end, spent, requests, prompt, completion, version,
# check.
Fields = tuple[bytes, bytes, int, int, int, int, int, int, int, int, int]
# Where a Row's numbers sit in Fields.
KIND: Final = 2
START: Final = 3
END: Final = 4
SPENT: Final = 5
REQUESTS: Final = 6
PROMPT: Final = 7
COMPLETION: Final = 8
VERSION: Final = 9


class Row(NamedTuple):
    """One key's record for one period (money in nano-USD)."""

    name: str
    kind: str
    start: int
    end: int = 0
    spent: int = 0
    requests: int = 0
    prompt: int = 0
    completion: int = 0
    version: int = 0


class LedgerFormatError(ValueError):
    """The buffer does not hold a ledger this code can use."""


def slots_for(keys: int) -> int:
    """Slots for a table of `keys` keys: room for each key's current and last period four
    times over (windows of WINDOW slots fill unevenly), at least MIN_SLOTS."""
    return max(MIN_SLOTS, 8 * keys)


def size_for(slot_count: int) -> int:
    return HEADER_SIZE + slot_count * SLOT_SIZE


def format_buffer(buf: object, slot_count: int = MIN_SLOTS, window: int = WINDOW) -> None:
    """Write the header into `buf` and clear every slot."""
    memoryview(buf)[: size_for(slot_count)] = bytes(size_for(slot_count))  # type: ignore[arg-type]
    _HEADER.pack_into(buf, 0, MAGIC, slot_count, window, 0.0, 0, 0)  # type: ignore[arg-type]


def to_nano(usd: float) -> int:
    nano = round(usd * 1e9)
    return LIMIT if nano > LIMIT else -LIMIT if nano < -LIMIT else nano


def to_usd(nano: int) -> float:
    return nano / 1e9


def clamp(value: int) -> int:
    return LIMIT if value > LIMIT else -LIMIT if value < -LIMIT else value


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

    def find(self, digest: bytes, hint: int = 0, now: float = 0.0) -> tuple[int, Fields | None]:
        """(offset, fields) of `digest`'s slot; (offset of a slot to use, None) when it has
        none: a free one, else one whose period ended RETAIN_S before `now`; (FULL, None) when
        its window has neither. `hint`: where the key was last found (tried first)."""
        if hint:
            fields = self._fields(hint)
            if fields is not None and fields[0] == digest:
                return hint, fields
        slots = self._slots
        home = slots.home(digest)
        offset = slots.find(self._buf, digest, home)
        if offset >= 0:
            return offset, self._fields(offset)  # None: torn, reused as free
        oldest = FULL
        oldest_end = now - RETAIN_S
        for offset in slots.offsets(home):
            fields = self._fields(offset)
            if fields is None:
                return offset, None
            if fields[END] < oldest_end:
                oldest, oldest_end = offset, fields[END]
        return oldest, None

    def _fields(self, offset: int) -> Fields | None:
        raw = self._buf[offset : offset + SLOT_SIZE]  # type: ignore[index]
        fields: Fields = _SLOT.unpack(raw)
        if fields[10] != zlib.crc32(raw[:_BODY_SIZE]) or fields[0] == _NO_DIGEST:
            return None
        return fields

    def put(
        self,
        offset: int,
        digest: bytes,
        name: bytes,
        kind: int,
        start: int,
        end: int,
        spent: int,
        requests: int,
        prompt: int,
        completion: int,
        version: int,
    ) -> None:
        """Write a slot (its check value computed) and count the write in the header."""
        body = _BODY.pack(
            digest, name, kind, start, end, spent, requests, prompt, completion, version
        )
        buf = self._buf
        buf[offset : offset + SLOT_SIZE] = body + _CHECK.pack(zlib.crc32(body))  # type: ignore[index]
        (generation,) = _GENERATION.unpack_from(buf, _GENERATION_OFFSET)  # type: ignore[arg-type]
        _GENERATION.pack_into(buf, _GENERATION_OFFSET, generation + 1)  # type: ignore[arg-type]

    def write(self, offset: int, digest: bytes, row: Row) -> None:
        self.put(offset, digest, encode_name(row.name), kind_number(row.kind), *row[2:])

    def rows(self) -> list[Row]:
        """Every valid row (the flush's snapshot)."""
        found = []
        for index in range(self._slots.slot_count):
            fields = self._fields(HEADER_SIZE + index * SLOT_SIZE)
            if fields is not None:
                found.append(row_of(fields))
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


def encode_name(name: str) -> bytes:
    """A name as a slot holds it (at most NAME_SIZE bytes of UTF-8)."""
    return name.encode("utf-8", "replace")[:NAME_SIZE]


def kind_number(kind: str) -> int:
    return PERIODS.index(kind)


def row_of(fields: Fields) -> Row:
    name = fields[1].rstrip(b"\0").decode("utf-8", "replace")
    kind = PERIODS[fields[KIND]] if 0 <= fields[KIND] < len(PERIODS) else "month"
    return Row(name, kind, *fields[START : VERSION + 1])  # type: ignore[arg-type]
