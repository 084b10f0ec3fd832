"""Requests in flight per key (`max_parallel`): the slot arithmetic on a bytearray with the
liveness of pids passed in (examples, then Hypothesis over interleavings of simulated workers
that take, release, die and are reclaimed), then the shared-memory table with real processes,
a SIGKILLed holder and a held lock."""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
from collections.abc import Iterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from support import FakeClock

from edge.ratelimit import parallel as pl
from edge.ratelimit.base import slot_digest
from edge.ratelimit.parallel import (
    HELD,
    NO_LOCK,
    NO_SLOT,
    SLOT_SIZE,
    Layout,
    LocalParallel,
    SharedParallel,
    reclaim_dead,
)
from edge.shm import Segment, segment_name, unlink

FORK = multiprocessing.get_context("fork")
WAIT_S = 10.0  # upper bound for anything we wait on; never reached when things work


def digest(name: str) -> bytes:
    return slot_digest(b"key:" + name.encode())


def table(slots: int = 64, window: int = 8) -> tuple[bytearray, Layout]:
    buffer = bytearray(pl.size_for(slots))
    pl.format_buffer(buffer, slots, window)
    return buffer, Layout(buffer)


def everyone(pid: int) -> bool:
    return True


# --- the arithmetic, sans I/O --------------------------------------------------------


def test_a_key_is_admitted_up_to_its_cap_then_refused_with_the_count():
    buffer, layout = table()
    key = digest("team")
    assert [pl.take(buffer, layout, key, 100, 3, everyone) for _ in range(3)] == [HELD] * 3
    assert pl.take(buffer, layout, key, 100, 3, everyone) == 3
    assert pl.in_flight(buffer, layout, key) == 3
    assert pl.release(buffer, layout, key, 100) == 1
    assert pl.take(buffer, layout, key, 100, 3, everyone) == HELD


def test_the_cap_is_the_keys_across_workers_and_other_keys_are_apart():
    buffer, layout = table()
    key, other = digest("team"), digest("other")
    assert pl.take(buffer, layout, key, 100, 2, everyone) == HELD
    assert pl.take(buffer, layout, key, 200, 2, everyone) == HELD
    assert pl.take(buffer, layout, key, 300, 2, everyone) == 2  # a third worker: refused
    assert pl.take(buffer, layout, other, 300, 2, everyone) == HELD
    # One holding per worker: its second request counts in the same slot.
    assert pl.release(buffer, layout, key, 200) == 1
    assert pl.take(buffer, layout, key, 100, 2, everyone) == HELD
    assert pl.in_flight(buffer, layout, key) == 2
    holdings = [
        struct.unpack_from("<16sII", buffer, layout.slots.base + i * SLOT_SIZE)
        for i in range(layout.slots.slot_count)
    ]
    assert [(pid, count) for found, pid, count in holdings if found == key] == [(100, 2)]


def test_a_lower_cap_after_a_reload_refuses_until_the_key_is_below_it():
    buffer, layout = table()
    key = digest("team")
    for _ in range(4):
        assert pl.take(buffer, layout, key, 100, 4, everyone) == HELD
    assert pl.take(buffer, layout, key, 100, 2, everyone) == 4
    for _ in range(3):
        pl.release(buffer, layout, key, 100)
    assert pl.take(buffer, layout, key, 100, 2, everyone) == HELD


def test_a_release_of_nothing_held_does_nothing():
    buffer, layout = table()
    key = digest("team")
    before = bytes(buffer)
    assert pl.release(buffer, layout, key, 100) == 0
    assert pl.take(buffer, layout, key, 200, 5, everyone) == HELD
    assert pl.release(buffer, layout, key, 100) == 0  # another worker's holding is not ours
    assert pl.release(buffer, layout, key, 200) == 1
    assert pl.release(buffer, layout, key, 200) == 0
    assert bytes(buffer) == before  # a released holding leaves a free slot: all zeros


def test_a_dead_workers_holdings_are_dropped_when_they_would_refuse():
    buffer, layout = table()
    key = digest("team")
    alive = {100, 200}
    assert pl.take(buffer, layout, key, 100, 2, alive.__contains__) == HELD
    assert pl.take(buffer, layout, key, 200, 2, alive.__contains__) == HELD
    alive.discard(100)  # killed mid-request
    assert pl.take(buffer, layout, key, 200, 2, alive.__contains__) == HELD
    assert pl.in_flight(buffer, layout, key) == 2  # 200's two; 100's dropped
    assert pl.take(buffer, layout, key, 300, 2, alive.__contains__) == 2  # 200 is alive


def test_liveness_is_asked_only_when_the_cap_is_reached():
    buffer, layout = table()
    key = digest("team")
    asked: list[int] = []

    def alive(pid: int) -> bool:
        asked.append(pid)
        return True

    assert pl.take(buffer, layout, key, 100, 2, alive) == HELD
    assert pl.take(buffer, layout, key, 200, 2, alive) == HELD
    assert asked == []
    assert pl.take(buffer, layout, key, 300, 2, alive) == 2
    assert sorted(asked) == [100, 200]


def test_a_slot_torn_between_its_two_writes_is_free():
    """A worker killed after writing digest and pid but before the count leaves count 0."""
    buffer, layout = table(slots=8, window=8)
    key = digest("team")
    home = layout.slots.home(key)
    for index in range(8):
        struct.pack_into("<16sII", buffer, home + index * SLOT_SIZE, digest(f"k{index}"), 7, 1)
    struct.pack_into("<16sII", buffer, home + 5 * SLOT_SIZE, key, 999, 0)  # torn
    assert pl.take(buffer, layout, key, 100, 2, everyone) == HELD
    assert struct.unpack_from("<16sII", buffer, home + 5 * SLOT_SIZE) == (key, 100, 1)
    assert pl.in_flight(buffer, layout, key) == 1


def test_a_full_window_reuses_a_dead_workers_slot_else_is_no_slot():
    buffer, layout = table(slots=4, window=4)
    alive = {1, 2, 3, 4, 100}
    for pid in (1, 2, 3, 4):
        assert pl.take(buffer, layout, digest(f"k{pid}"), pid, 5, alive.__contains__) == HELD
    key = digest("team")
    assert pl.take(buffer, layout, key, 100, 5, alive.__contains__) == NO_SLOT
    alive.discard(3)
    assert pl.take(buffer, layout, key, 100, 5, alive.__contains__) == HELD
    assert pl.in_flight(buffer, layout, digest("k3")) == 0


def test_reclaim_frees_a_dead_workers_holdings_of_every_key():
    buffer, layout = table()
    for name in ("a", "b", "c"):
        for _ in range(2):
            assert pl.take(buffer, layout, digest(name), 100, 9, everyone) == HELD
        assert pl.take(buffer, layout, digest(name), 200, 9, everyone) == HELD
    assert pl.reclaim(buffer, layout, lambda pid: pid == 100) == 6
    assert [pl.in_flight(buffer, layout, digest(n)) for n in "abc"] == [1, 1, 1]
    assert pl.reclaim(buffer, layout, lambda pid: pid == 100) == 0


def test_a_buffer_that_is_not_a_table_is_refused():
    with pytest.raises(ValueError):
        Layout(bytearray(8))
    with pytest.raises(ValueError):
        Layout(bytearray(pl.size_for(16)))  # no header
    buffer, _ = table(slots=16)
    with pytest.raises(ValueError):
        Layout(buffer[: pl.size_for(8)])  # cut short


def test_the_window_follows_the_workers_within_bounds():
    assert pl.window_for(1) == pl.MIN_WINDOW
    assert pl.window_for(40) == 80
    assert pl.window_for(512) == pl.MAX_WINDOW


def test_the_process_local_table_counts_the_same():
    local = LocalParallel()
    key = local.digest("team")
    assert key == digest("team") and local.digest("team") is key  # memoised
    assert [local.take(key, 2) for _ in range(3)] == [HELD, HELD, 2]
    local.release(key)
    assert local.in_flight(key) == 1


# --- interleavings of simulated workers (Hypothesis) ---------------------------------

KEYS = ("a", "b", "c")


class Workers(RuleBasedStateMachine):
    """Workers (pids) take and release requests of a few keys in a small table whose windows
    overlap; workers die holding requests, new ones start, the master reclaims the dead.

    The model is what each live worker holds. Whatever the interleaving: a key's requests in
    flight in the table, counting live workers' holdings, are the model's; a take is admitted
    only below the cap and refused only at it; NO_SLOT only when every slot of the window is a
    live worker's holding; no count is ever negative (they are unsigned: a wrap would show as
    a huge count)."""

    @initialize(slots=st.integers(4, 12), window=st.integers(2, 4))
    def start(self, slots: int, window: int) -> None:
        self.buffer, self.layout = table(slots, window)
        self.alive: set[int] = {1, 2}
        self.next_pid = 3
        self.held: dict[tuple[int, str], int] = {}  # (pid, key) -> requests in flight

    def live(self, pid: int) -> bool:
        return pid in self.alive

    def model(self, key: str) -> int:
        return sum(n for (pid, name), n in self.held.items() if name == key)

    def table_count(self, key: str, live_only: bool = True) -> int:
        found = digest(key)
        total = 0
        for index in range(self.layout.slots.slot_count):
            at = self.layout.slots.base + index * SLOT_SIZE
            slot_digest_, pid, count = struct.unpack_from("<16sII", self.buffer, at)
            if slot_digest_ == found and count and (self.live(pid) or not live_only):
                total += count
        return total

    @rule(data=st.data(), key=st.sampled_from(KEYS), cap=st.integers(1, 4))
    def take(self, data: st.DataObject, key: str, cap: int) -> None:
        pid = data.draw(st.sampled_from(sorted(self.alive)))
        before = self.model(key)
        got = pl.take(self.buffer, self.layout, digest(key), pid, cap, self.live)
        if got == HELD:
            assert before < cap
            self.held[pid, key] = self.held.get((pid, key), 0) + 1
        elif got == NO_SLOT:
            home = self.layout.slots.home(digest(key))
            for index in range(self.layout.window):
                found, holder, count = struct.unpack_from(
                    "<16sII", self.buffer, home + index * SLOT_SIZE
                )
                assert count and self.live(holder) and (found, holder) != (digest(key), pid)
        else:
            assert got >= cap and got == before

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        pid, key = data.draw(st.sampled_from(sorted(self.held)))
        assert pl.release(self.buffer, self.layout, digest(key), pid) == 1
        self.held[pid, key] -= 1
        if not self.held[pid, key]:
            del self.held[pid, key]

    @rule(data=st.data(), key=st.sampled_from(KEYS))
    def release_nothing_held(self, data: st.DataObject, key: str) -> None:
        pid = data.draw(st.sampled_from(sorted(self.alive)))
        if (pid, key) not in self.held:
            assert pl.release(self.buffer, self.layout, digest(key), pid) == 0

    @precondition(lambda self: len(self.alive) > 1)
    @rule(data=st.data())
    def kill(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(self.alive)))
        self.alive.discard(pid)
        self.held = {(p, k): n for (p, k), n in self.held.items() if p != pid}
        self.dead = pid

    @rule()
    def spawn(self) -> None:
        self.alive.add(self.next_pid)
        self.next_pid += 1

    @rule()
    def master_reclaims(self) -> None:
        pl.reclaim(self.buffer, self.layout, lambda pid: not self.live(pid))
        for key in KEYS:
            assert self.table_count(key, live_only=False) == self.model(key)

    @invariant()
    def counts_match_the_live_workers(self) -> None:
        for key in KEYS:
            assert self.table_count(key) == self.model(key)
        counts = [
            struct.unpack_from("<I", self.buffer, self.layout.slots.base + i * SLOT_SIZE + 20)[0]
            for i in range(self.layout.slots.slot_count)
        ]
        assert all(0 <= count <= 4 * 8 for count in counts)  # never wrapped below zero


Workers.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
test_interleavings = Workers.TestCase


# --- the shared-memory table, real processes -----------------------------------------


@pytest.fixture
def name() -> Iterator[str]:
    made = segment_name(f"llm-edge-proxy.unit{os.getpid()}.parallel", os.getpid())
    SharedParallel.create(made, slots=64, window=8)
    yield made
    unlink(made)


@pytest.fixture
def shared(name: str) -> Iterator[SharedParallel]:
    attached = SharedParallel.attach(name)
    yield attached
    attached.close()


def _take_and_wait(name: str, key: str, count: int, ready: object) -> None:
    attached = SharedParallel.attach(name)
    for _ in range(count):
        assert attached.take(attached.digest(key), 10) == HELD
    ready.set()  # type: ignore[attr-defined]
    signal.pause()


def _holding_worker(name: str, key: str, count: int) -> multiprocessing.process.BaseProcess:
    ready = FORK.Event()
    proc = FORK.Process(target=_take_and_wait, args=(name, key, count, ready), daemon=True)
    proc.start()
    assert ready.wait(WAIT_S)
    return proc


def test_a_workers_requests_count_for_the_others(name, shared):
    worker = _holding_worker(name, "team", 2)
    try:
        key = shared.digest("team")
        assert shared.in_flight(key) == 2
        assert shared.take(key, 3) == HELD
        assert shared.take(key, 3) == 3
    finally:
        worker.kill()
        worker.join(WAIT_S)


def test_a_sigkilled_worker_leaks_nothing(name, shared):
    key = shared.digest("team")
    worker = _holding_worker(name, "team", 3)
    assert shared.take(key, 3) == 3
    os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
    worker.join(WAIT_S)  # reaped: its pid is no process now
    # Without the master: the take its holdings would refuse drops them.
    assert [shared.take(key, 3) for _ in range(4)] == [HELD, HELD, HELD, 3]


def test_the_master_reclaims_a_dead_workers_holdings(name, shared):
    worker = _holding_worker(name, "team", 2)
    other = _holding_worker(name, "other", 1)
    try:
        os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
        worker.join(WAIT_S)
        assert reclaim_dead(name, worker.pid) == 2  # type: ignore[arg-type]
        assert shared.in_flight(shared.digest("team")) == 0
        assert shared.in_flight(shared.digest("other")) == 1  # a live worker's stay
    finally:
        other.kill()
        other.join(WAIT_S)


def _hold_the_lock(name: str, locked: object, done: object) -> None:
    segment = Segment.attach(name)
    segment.acquire(1.0)
    locked.set()  # type: ignore[attr-defined]
    done.wait(WAIT_S)  # type: ignore[attr-defined]
    segment.release()


def test_a_held_lock_is_no_lock_and_a_release_is_owed_until_the_next(name):
    clock = FakeClock()
    attached = SharedParallel.attach(name, lock_timeout_s=0.01, clock=clock)
    key = attached.digest("team")
    assert attached.take(key, 5) == HELD
    locked, done = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold_the_lock, args=(name, locked, done), daemon=True)
    holder.start()
    try:
        assert locked.wait(WAIT_S)
        assert attached.take(key, 5) == NO_LOCK
        attached.release(key)  # owed
        assert attached.in_flight(key) == 1
        clock.now += 0.5  # cooling off: one non-blocking try only
        assert attached.take(key, 5) == NO_LOCK
    finally:
        done.set()
        holder.join(WAIT_S)
    assert attached.take(key, 5) == HELD  # pays the owed release first
    assert attached.in_flight(key) == 1
    attached.close()
    assert attached.take(key, 5) == NO_LOCK  # closed (a worker shutting down)
    attached.release(key)  # and nothing raised


def _hammer(name: str, rounds: int, cap: int, over: object) -> None:
    attached = SharedParallel.attach(name)
    key = attached.digest("team")
    segment = attached._segment
    for _ in range(rounds):
        if attached.take(key, cap) == HELD:
            assert segment.acquire(1.0)
            if attached.in_flight(key) > cap:
                over.value += 1  # type: ignore[attr-defined]
            segment.release()
            attached.release(key)


def test_processes_racing_never_exceed_the_cap_and_end_at_zero(name, shared):
    over = FORK.Value("i", 0)
    procs = [FORK.Process(target=_hammer, args=(name, 400, 2, over)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(WAIT_S * 3)
        assert proc.exitcode == 0
    assert over.value == 0
    assert shared.in_flight(shared.digest("team")) == 0


def test_attach_refuses_what_is_not_a_parallel_table():
    other = segment_name(f"llm-edge-proxy.unit{os.getpid()}.other", os.getpid())
    Segment.create(other, 4096, lambda mm: None).close()
    try:
        with pytest.raises(ValueError, match="not a parallel table"):
            SharedParallel.attach(other)
    finally:
        unlink(other)
