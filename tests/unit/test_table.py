"""Slot layout over a plain bytearray, with an injected clock (no I/O)."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.ratelimit import Table, TableFormatError, slot_digest
from edge.ratelimit.table import HEADER_SIZE, SLOT_SIZE, format_buffer, size_for

T0 = 5_000.0
RPM = 60.0  # one token per second
RATE = RPM / 60.0
SLOT_LAYOUT = struct.Struct(
    "<16sdddI4x"
)  # digest, tokens, updated, full_at, crc32 of the first 40 bytes


def make_table(slots: int, probe_window: int = 8) -> tuple[Table, bytearray]:
    buf = bytearray(size_for(slots))
    format_buffer(buf, slots, probe_window)
    return Table(buf), buf


def digest(i: int) -> bytes:
    return slot_digest(f"identity-{i}".encode())


def drain(table: Table, key: bytes, now: float, burst: int) -> int:
    for admitted in range(burst + 100):
        decision = table.decide(key, now, RATE, burst, 1)
        assert decision.failure is None
        if not decision.allowed:
            return admitted
    raise AssertionError("never rejected")


def slot_digests(buf: bytearray, slots: int) -> list[bytes]:
    return [bytes(buf[HEADER_SIZE + i * SLOT_SIZE :][:16]) for i in range(slots)]


def slot_offset(buf: bytearray, slots: int, key: bytes) -> int:
    return HEADER_SIZE + slot_digests(buf, slots).index(key) * SLOT_SIZE


def write_slot(
    buf: bytearray, offset: int, key: bytes, tokens: float, updated: float, full_at: float
) -> None:
    """Write a slot with a *valid* check value, as a buggy but well-behaved writer would."""
    body = SLOT_LAYOUT.pack(key, tokens, updated, full_at, 0)[:40]
    SLOT_LAYOUT.pack_into(buf, offset, key, tokens, updated, full_at, zlib.crc32(body))


def test_layout_sizes():
    assert SLOT_SIZE == SLOT_LAYOUT.size == 48
    assert size_for(100) == HEADER_SIZE + 100 * 48


def test_decision_fields():
    table, _ = make_table(64)
    first = table.decide(digest(1), T0, RATE, 3, 1)
    assert (first.allowed, first.limit, first.remaining, first.retry_after, first.failure) == (
        True,
        3,
        2,
        0.0,
        None,
    )
    assert first.reset_after == pytest.approx(1.0)
    table.decide(digest(1), T0, RATE, 3, 2)
    rejected = table.decide(digest(1), T0, RATE, 3, 1)
    assert (rejected.allowed, rejected.remaining) == (False, 0)
    assert rejected.retry_after == pytest.approx(1.0)


def test_distinct_digests_get_distinct_buckets():
    table, _ = make_table(4, probe_window=4)  # a single window: every key competes for it
    assert drain(table, digest(1), T0, 3) == 3
    assert drain(table, digest(2), T0, 3) == 3
    assert drain(table, digest(3), T0, 5) == 5
    assert drain(table, digest(1), T0, 3) == 0  # still drained, not confused with the others


def test_state_persists_across_table_instances_over_the_same_buffer():
    table, buf = make_table(32)
    drain(table, digest(1), T0, 4)
    other = Table(buf)
    assert not other.decide(digest(1), T0 + 0.5, RATE, 4, 1).allowed
    assert other.decide(digest(1), T0 + 1.0, RATE, 4, 1).allowed


def test_full_window_without_idle_entries_reports_table_full_without_raising():
    table, buf = make_table(4, probe_window=4)
    for i in range(4):
        assert table.decide(digest(i), T0, RATE, 10, 1).allowed  # not full again until T0 + 1
    before = bytes(buf)
    decision = table.decide(digest(99), T0 + 0.5, RATE, 10, 1)
    assert decision is None  # full: the caller applies its policy
    assert bytes(buf) == before  # nothing was overwritten


def test_idle_entry_is_evicted_longest_idle_first():
    table, buf = make_table(4, probe_window=4)
    for i, cost in enumerate([1, 2, 3, 4]):  # full again at T0 + 1, 2, 3, 4
        assert table.decide(digest(i), T0, RATE, 10, cost).allowed
    assert table.decide(digest(99), T0 + 2.5, RATE, 10, 1).allowed  # keys 0 and 1 are idle
    digests = slot_digests(buf, 4)
    assert digest(99) in digests
    assert digest(0) not in digests  # idle since T0 + 1: the longest
    assert digest(1) in digests
    # key 1 (full, idle) may go next; keys 2 and 3 are still refilling and must stay
    assert table.decide(digest(100), T0 + 2.5, RATE, 10, 1).allowed
    assert set(slot_digests(buf, 4)) == {digest(99), digest(100), digest(2), digest(3)}
    assert table.decide(digest(101), T0 + 2.5, RATE, 10, 1) is None


def test_evicted_identity_comes_back_full():
    table, _ = make_table(1, probe_window=1)
    drain(table, digest(1), T0, 3)
    assert drain(table, digest(2), T0 + 3.0, 3) == 3  # key 1 was full again: evicted
    assert drain(table, digest(1), T0 + 6.0, 3) == 3


def test_more_keys_than_slots_all_served_when_idle():
    slots = 16
    table, _ = make_table(slots, probe_window=16)
    for i in range(200):  # each key comes once, 10 s apart: every older one is idle by then
        decision = table.decide(digest(i), T0 + 10.0 * i, RATE, 5, 1)
        assert decision.allowed and decision.failure is None


def test_slot_torn_for_our_key_resets_to_one_burst():
    table, buf = make_table(16)
    key = digest(7)
    drain(table, key, T0, 4)
    offset = slot_offset(buf, 16, key)
    buf[offset + 20] ^= 0xFF  # flip bits inside "tokens": check value no longer matches
    assert drain(table, key, T0, 4) == 4
    assert drain(table, key, T0, 4) == 0


@pytest.mark.parametrize(
    ("tokens", "updated", "full_at"),
    [
        (math.nan, T0, T0),
        (-1e13, T0, T0),  # a debt no request could run up (a small one is real)
        (math.inf, T0, math.inf),
        (0.0, T0 + 1e12, T0 + 1e12),  # would otherwise stall refill for 30 000 years
        (1e308, math.nan, math.nan),
    ],
)
def test_well_checked_but_absurd_values_cost_at_most_one_burst(tokens, updated, full_at):
    table, buf = make_table(16)
    key = digest(3)
    drain(table, key, T0, 4)
    write_slot(buf, slot_offset(buf, 16, key), key, tokens, updated, full_at)
    assert drain(table, key, T0, 4) == 4
    assert drain(table, key, T0, 4) == 0


@given(garbage=st.binary(min_size=SLOT_SIZE, max_size=SLOT_SIZE), keep_digest=st.booleans())
def test_garbage_slot_costs_at_most_one_burst_and_never_locks_out(garbage, keep_digest):
    table, buf = make_table(4, probe_window=4)
    key = digest(1)
    drain(table, key, T0, 3)
    offset = slot_offset(buf, 4, key)
    buf[offset : offset + SLOT_SIZE] = (key + garbage[16:]) if keep_digest else garbage
    assert drain(table, key, T0, 3) <= 3
    assert table.decide(key, T0 + 3.0, RATE, 3, 1).allowed  # refills: no lock-out


def test_whole_table_of_garbage_is_usable():
    slots = 64
    buf = bytearray(size_for(slots))
    format_buffer(buf, slots)
    buf[HEADER_SIZE:] = bytes((i * 37 + 11) % 256 for i in range(slots * SLOT_SIZE))
    table = Table(buf)
    for i in range(32):
        assert drain(table, digest(i), T0, 2) == 2


def test_digest_must_be_16_bytes():
    table, _ = make_table(8)
    with pytest.raises(ValueError, match="16 bytes"):
        table.decide(b"raw-api-key", T0, RATE, 3, 1)


def test_rejects_foreign_buffers():
    table_buf = bytearray(size_for(8))
    with pytest.raises(TableFormatError, match="magic"):
        Table(table_buf)  # never formatted
    with pytest.raises(TableFormatError, match="too small"):
        Table(bytearray(10))
    format_buffer(table_buf, 8)
    with pytest.raises(TableFormatError, match="writable"):
        Table(bytes(table_buf))
    with pytest.raises(TableFormatError, match="holds"):
        Table(table_buf[: size_for(7)])  # header promises more slots than the buffer has
    corrupt = bytearray(table_buf)
    corrupt[20] ^= 1  # slot size field
    with pytest.raises(TableFormatError, match="layout"):
        Table(corrupt)
    corrupt = bytearray(table_buf)
    corrupt[24] ^= 1  # slot count field
    with pytest.raises(TableFormatError, match="corrupt"):
        Table(corrupt)


def test_format_validates_arguments():
    with pytest.raises(ValueError, match="slot_count"):
        format_buffer(bytearray(size_for(1)), 0)
    with pytest.raises(ValueError, match="at least"):
        format_buffer(bytearray(size_for(1)), 2)
    with pytest.raises(ValueError, match="probe_window"):
        format_buffer(bytearray(size_for(1)), 1, probe_window=0)


def test_probe_window_is_clamped_to_slot_count():
    table, _ = make_table(3, probe_window=32)
    assert table.probe_window == 3
    for i in range(3):
        assert table.decide(digest(i), T0, RATE, 5, 1).allowed
