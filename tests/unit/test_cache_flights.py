"""The host-wide table of in-flight cache fills: the slot arithmetic with an injected clock,
then the shared-memory table with real processes, dead pids and a held lock."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import struct
import time
from collections.abc import Iterator

import posix_ipc
import pytest
from support import FakeClock

from edge.cache import flights as fl
from edge.cache.flights import FOLLOWER, LEADER, UNTRACKED, Flights
from edge.shm import segment_name, unlink

FORK = multiprocessing.get_context("fork")
WAIT_S = 10.0  # upper bound for anything we wait on; never reached when things work


def key(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def dead_pid() -> int:
    """The pid of a child that has exited and been reaped: no process has it now."""
    proc = FORK.Process(target=os._exit, args=(0,))
    proc.start()
    proc.join(WAIT_S)
    assert proc.exitcode == 0 and proc.pid is not None
    return proc.pid


@pytest.fixture
def name() -> Iterator[str]:
    table = segment_name(f"llm-edge-proxy.unit{os.getpid()}.flights", os.getpid())
    Flights.create(table, slots=64)
    yield table
    unlink(table)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table(name: str, clock: FakeClock) -> Iterator[Flights]:
    flights = Flights.attach(name, clock=clock)
    yield flights
    flights.close()


# --- the slot arithmetic, sans I/O --------------------------------------------------


def always(pid: int) -> bool:
    return True


def test_place_follows_a_live_claim_and_takes_over_a_stale_one():
    mine, other = b"a" * 16, b"b" * 16
    window = [(other, 7, 11, 100.0), (mine, 8, 12, 100.0), (bytes(16), 0, 0, 0.0)]
    assert fl.place(window, mine, 100.5, 600.0, always) == (FOLLOWER, 1)
    # aged out: the key's own slot is reused (never a second slot for one key)
    assert fl.place(window, mine, 700.0, 600.0, always) == (LEADER, 1)
    # its process is gone
    assert fl.place(window, mine, 100.5, 600.0, lambda pid: pid != 8) == (LEADER, 1)
    # a new key takes the free slot before anyone's stale one
    assert fl.place(window, b"c" * 16, 700.0, 600.0, always) == (LEADER, 2)


def test_place_in_a_full_window_takes_a_stale_claim_or_gives_up():
    window = [(bytes([n]) * 16, 100 + n, n + 1, 50.0) for n in range(4)]
    new = b"z" * 16
    assert fl.place(window, new, 60.0, 600.0, always) == (UNTRACKED, -1)
    assert fl.place(window, new, 60.0, 600.0, lambda pid: pid != 102) == (LEADER, 2)


@pytest.mark.parametrize("claimed_at", [float("nan"), 1e300, 1_000.0 + fl.CLOCK_SLACK_S + 0.5])
def test_a_corrupt_date_is_stale(claimed_at: float):
    assert not fl.live((b"k" * 16, 1, 5, claimed_at), 1_000.0, 600.0, always)
    assert fl.live((b"k" * 16, 1, 5, 1_000.5), 1_000.0, 600.0, always)  # within the slack


# --- the shared table ---------------------------------------------------------------


def test_leader_follower_release(table: Flights):
    k = key("one")
    verdict, token = table.claim(k)
    assert verdict == LEADER and token != 0
    assert table.leading(k)
    # A second request in the same process follows the first.
    assert table.claim(k) == (FOLLOWER, 0)
    table.release(k, token)
    assert not table.leading(k)
    again, token2 = table.claim(k)
    assert again == LEADER and token2 not in (0, token)
    table.release(k, token2)


def test_release_with_another_token_leaves_the_claim(table: Flights):
    k = key("mismatch")
    _, token = table.claim(k)
    table.release(k, token ^ 1)
    table.release(k, 0)
    table.release(key("never claimed"), token)
    assert table.leading(k) and table.claim(k) == (FOLLOWER, 0)
    table.release(k, token)
    assert not table.leading(k)


def test_two_attachments_share_the_claims(name: str, table: Flights, clock: FakeClock):
    other = Flights.attach(name, clock=clock)
    try:
        k = key("shared")
        _, token = table.claim(k)
        assert other.leading(k) and other.claim(k) == (FOLLOWER, 0)
        other.release(k, 12345)  # not its claim
        assert other.leading(k)
        table.release(k, token)
        assert other.claim(k)[0] == LEADER
    finally:
        other.close()


def test_an_aged_claim_is_taken_over_and_the_old_leader_cannot_free_it(
    name: str, table: Flights, clock: FakeClock
):
    other = Flights.attach(name, clock=clock, max_age_s=600.0)
    try:
        k = key("aged")
        _, old = table.claim(k)
        clock.now += 599.9
        assert other.claim(k) == (FOLLOWER, 0)
        clock.now += 0.1
        assert not other.leading(k)
        verdict, new = other.claim(k)
        assert verdict == LEADER and new != old
        table.release(k, old)  # the first leader finishing late: not its claim any more
        assert table.leading(k) and table.claim(k) == (FOLLOWER, 0)
        other.release(k, new)
        assert not table.leading(k)
    finally:
        other.close()


def claim_and_exit(name: str, k: bytes) -> None:
    flights = Flights.attach(name)
    verdict, _ = flights.claim(k)
    os._exit(0 if verdict == LEADER else 1)  # never releases: as a worker killed mid-request


def test_a_dead_process_claim_is_taken_over(table: Flights):
    k = key("dead")
    child = FORK.Process(target=claim_and_exit, args=(table._segment.name, k))
    child.start()
    child.join(WAIT_S)
    assert child.exitcode == 0  # it led, then died without releasing
    assert not table.leading(k)
    verdict, token = table.claim(k)
    assert verdict == LEADER and token != 0


def test_a_slot_written_with_a_dead_pid_is_not_live(table: Flights, clock: FakeClock):
    k = key("planted")
    digest = k[:16]
    offset = table._slots.home(digest)
    struct.pack_into("<16sI4xQd", table._mm, offset, digest, dead_pid(), 99, clock.now)
    assert table._slots.find(table._mm, digest, offset) == offset
    assert not table.leading(k)
    assert table.claim(k)[0] == LEADER
    assert table._slots.find(table._mm, digest, offset) == offset  # the same slot, reused


def test_a_full_window_is_untracked_until_a_slot_frees():
    name = segment_name(f"llm-edge-proxy.unit{os.getpid()}.flights", os.getpid())
    Flights.create(name, slots=fl.WINDOW)  # one window: every key lands in it
    table = Flights.attach(name)
    try:
        tokens = {}
        for n in range(fl.WINDOW):
            verdict, tokens[n] = table.claim(key(f"k{n}"))
            assert verdict == LEADER
        late = key("late")
        assert table.claim(late) == (UNTRACKED, 0)
        assert not table.leading(late)
        table.release(key("k3"), tokens[3])
        assert table.claim(late)[0] == LEADER
    finally:
        table.close()
        unlink(name)


def claim_at_once(name: str, k: bytes, barrier, conn) -> None:
    flights = Flights.attach(name, lock_timeout_s=WAIT_S)
    barrier.wait(WAIT_S)
    conn.send(flights.claim(k)[0])
    conn.recv()  # stay alive (a dead leader's claim would be taken over) until told


def test_processes_claiming_at_once_have_exactly_one_leader(name: str):
    k = key("stampede")
    count = 8
    barrier = FORK.Barrier(count)
    pipes = [FORK.Pipe() for _ in range(count)]
    children = [
        FORK.Process(target=claim_at_once, args=(name, k, barrier, child), daemon=True)
        for _, child in pipes
    ]
    for child in children:
        child.start()
    try:
        verdicts = []
        for parent, _ in pipes:
            assert parent.poll(WAIT_S)
            verdicts.append(parent.recv())
        assert sorted(verdicts) == [LEADER] + [FOLLOWER] * (count - 1)
        for parent, _ in pipes:
            parent.send("go")
    finally:
        for child in children:
            child.join(WAIT_S)
            if child.is_alive():
                child.kill()
                child.join(WAIT_S)


def hold_lock(name: str, conn) -> None:
    flights = Flights.attach(name)
    conn.send(flights._segment.acquire(WAIT_S))
    conn.recv()  # holds the lock until told (or killed)
    flights._segment.release()
    conn.send("released")
    conn.recv()


def test_a_held_lock_gives_untracked_within_the_timeout_instead_of_blocking(
    name: str, table: Flights
):
    k = key("locked")
    _, token = table.claim(k)
    parent, child_end = FORK.Pipe()
    holder = FORK.Process(target=hold_lock, args=(name, child_end), daemon=True)
    holder.start()
    try:
        assert parent.poll(WAIT_S) and parent.recv() is True
        started = time.monotonic()
        assert table.claim(key("other")) == (UNTRACKED, 0)
        table.release(k, token)  # gives up, does not raise: the claim stays
        assert time.monotonic() - started < WAIT_S  # returned: never blocked on the holder
        assert table.leading(k)  # read without the lock
        parent.send("release")
        assert parent.poll(WAIT_S) and parent.recv() == "released"
        assert table.claim(k) == (FOLLOWER, 0)
        table.release(k, token)
        assert not table.leading(k)
        parent.send("exit")
    finally:
        holder.join(WAIT_S)
        if holder.is_alive():
            holder.kill()
            holder.join(WAIT_S)


def test_a_closed_table_is_untracked_and_release_is_quiet(name: str):
    flights = Flights.attach(name)
    k = key("closed")
    _, token = flights.claim(k)
    flights.close()
    assert flights.claim(k) == (UNTRACKED, 0)
    flights.release(k, token)
    assert not flights.leading(k)


def test_a_short_key_is_refused(table: Flights):
    with pytest.raises(ValueError, match="digest"):
        table.claim(b"short")


def test_attach_refuses_a_foreign_or_truncated_object(name: str):
    shm = posix_ipc.SharedMemory("/" + name)
    os.pwrite(shm.fd, b"NOTMINE!", 0)
    shm.close_fd()
    with pytest.raises(ValueError, match="not a flights table"):
        Flights.attach(name)
    short = segment_name(f"llm-edge-proxy.unit{os.getpid()}.flights", os.getpid())
    obj = posix_ipc.SharedMemory("/" + short, posix_ipc.O_CREX, 0o600, 64)
    os.pwrite(obj.fd, struct.pack("<8sI4x", b"EDGEFLT1", 4096), 0)
    obj.close_fd()
    try:
        with pytest.raises(ValueError, match="truncated"):
            Flights.attach(short)
    finally:
        unlink(short)


def test_create_refuses_an_empty_table():
    with pytest.raises(ValueError, match="at least one slot"):
        Flights.create(segment_name("llm-edge-proxy.unit-never", os.getpid()), slots=0)
