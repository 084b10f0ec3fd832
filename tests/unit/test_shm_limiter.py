"""The shared-memory limiter with real POSIX shm, real processes and real signals."""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import resource
import signal
import stat
import time
import uuid
from collections.abc import Iterator

import posix_ipc
import pytest
from support import FakeClock

from edge.ratelimit import (
    LOCK_TIMEOUT,
    TABLE_FULL,
    SharedTable,
    ShmRateLimiter,
    TableFormatError,
)
from edge.ratelimit.table import size_for
from edge.shm import remove_stale
from edge.shm import segment_name as table_name

FORK = multiprocessing.get_context("fork")
TINY_RPM = 1e-6  # refill is negligible for the length of a test
WAIT_S = 10.0  # upper bound for anything we wait on; never reached when things work


@pytest.fixture
def name() -> Iterator[str]:
    """A unique shm name, unlinked afterwards whatever the test did."""
    shm_name = f"llm-edge-proxy-test.{uuid.uuid4().hex[:12]}.{os.getpid()}"
    yield shm_name
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory("/" + shm_name)


@pytest.fixture
def created(name: str) -> Iterator[SharedTable]:
    owner = SharedTable.create(name, slots=256)
    yield owner
    owner.close()
    owner.unlink()


@pytest.fixture
def attached(created: SharedTable) -> Iterator[SharedTable]:
    shared = SharedTable.attach(created.name)
    yield shared
    shared.close()


def shm_path(name: str) -> str:
    return os.path.join("/dev/shm", name)


def start(target, *args) -> multiprocessing.Process:
    proc = FORK.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def stop(proc: multiprocessing.Process) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(WAIT_S)


# --- children (run in forked processes) ---------------------------------------------


def hold_lock_child(name: str, conn) -> None:
    """Attach, take the lock, report it, then block until told to go or killed."""
    faulthandler.disable()  # let SIGABRT kill us outright, as under the uvicorn worker
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    shared = SharedTable.attach(name)
    conn.send(shared.acquire(WAIT_S))
    conn.recv()
    shared.release()
    conn.send("released")
    conn.recv()


def hammer_child(name: str, key: bytes, burst: int, attempts: int, barrier, conn) -> None:
    limiter = ShmRateLimiter(SharedTable.attach(name), lock_timeout_s=WAIT_S)
    barrier.wait(WAIT_S)
    admitted = failures = 0
    for _ in range(attempts):
        decision = limiter.check(key, TINY_RPM, burst)
        admitted += decision.allowed
        failures += decision.failure is not None
    limiter.close()
    conn.send((admitted, failures))


def use_inherited_child(shared: SharedTable, conn) -> None:
    try:
        shared.acquire(0.01)
    except RuntimeError as exc:
        conn.send(str(exc))
    else:
        conn.send("no error")


# --- lifecycle ----------------------------------------------------------------------


def test_create_makes_a_0600_object_of_the_right_size(created: SharedTable):
    st = os.stat(shm_path(created.name))
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == size_for(256)
    assert created.table.slot_count == 256


def test_create_is_0600_whatever_the_umask(name: str):
    old = os.umask(0o277)
    try:
        owner = SharedTable.create(name, slots=8)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(shm_path(name)).st_mode) == 0o600
    owner.close()


def test_unlink_removes_the_object(name: str):
    owner = SharedTable.create(name, slots=8)
    owner.close()
    assert os.path.exists(shm_path(name))
    owner.unlink()
    assert not os.path.exists(shm_path(name))
    owner.unlink()  # idempotent


def test_create_replaces_a_stale_object_of_the_same_name(name: str):
    stale = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, 0o600, 4096)
    os.write(stale.fd, b"junk" * 100)
    stale.close_fd()
    owner = SharedTable.create(name, slots=8)
    limiter = ShmRateLimiter(SharedTable.attach(name), clock=FakeClock())
    assert [limiter.check(b"k", 60, 2).allowed for _ in range(3)] == [True, True, False]
    assert os.stat(shm_path(name)).st_size == size_for(8)
    limiter.close()
    owner.close()


def test_attach_sees_the_creators_state(created: SharedTable, attached: SharedTable):
    clock = FakeClock()
    ShmRateLimiter(created, clock=clock).check(b"key", 60, 2, cost=2)
    assert not ShmRateLimiter(attached, clock=clock).check(b"key", 60, 2).allowed


def test_attach_missing_object_is_a_clear_error(name: str):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SharedTable.attach(name)


def test_attach_foreign_object_is_a_clear_error(name: str):
    other = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, 0o600, 4096)
    other.close_fd()
    with pytest.raises(TableFormatError, match="not a rate-limit table"):
        SharedTable.attach(name)


def test_attach_too_small_object_is_a_clear_error(name: str):
    other = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, 0o600, 16)
    other.close_fd()
    with pytest.raises(TableFormatError, match="16 bytes"):
        SharedTable.attach(name)


@pytest.mark.parametrize("bad", ["", "/", "a/b", ".."])
def test_invalid_names_are_rejected(bad: str):
    with pytest.raises(ValueError, match="invalid shared-memory name"):
        SharedTable.attach(bad)


def test_remove_stale_removes_dead_masters_objects_only():
    prefix = f"llm-edge-proxy-test.{uuid.uuid4().hex[:12]}"
    dead = start(os._exit, 0)
    dead.join(WAIT_S)
    assert dead.exitcode == 0  # reaped: its pid names no process now
    dead_name, live_name = table_name(prefix, dead.pid), table_name(prefix, os.getpid())
    unrelated = f"{prefix}x.{dead.pid}"
    owners = [SharedTable.create(n, slots=4) for n in (dead_name, live_name, unrelated)]
    try:
        assert remove_stale(prefix) == [dead_name]
        assert not os.path.exists(shm_path(dead_name))
        assert os.path.exists(shm_path(live_name))
        assert os.path.exists(shm_path(unrelated))
    finally:
        for owner in owners:
            owner.close()
            owner.unlink()


# --- limiter semantics --------------------------------------------------------------


def test_limiter_admits_burst_then_reports_retry(attached: SharedTable):
    clock = FakeClock()
    limiter = ShmRateLimiter(attached, clock=clock)
    decisions = [limiter.check(b"id", 120, 3) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[3].retry_after == pytest.approx(0.5)
    assert decisions[3].reset_after == pytest.approx(1.5)
    clock.now += 0.5
    assert limiter.check(b"id", 120, 3).allowed


def test_identities_are_hashed_into_separate_buckets(attached: SharedTable):
    limiter = ShmRateLimiter(attached, clock=FakeClock())
    assert limiter.check(b"alice", 60, 1).allowed
    assert not limiter.check(b"alice", 60, 1).allowed
    assert limiter.check(b"bob", 60, 1).allowed
    with open(shm_path(attached.name), "rb") as f:
        raw_table = f.read()
    assert b"alice" not in raw_table and b"bob" not in raw_table


@pytest.mark.parametrize(("policy", "allowed"), [("allow", True), ("deny", False)])
def test_table_full_follows_the_policy(name: str, policy: str, allowed: bool):
    owner = SharedTable.create(name, slots=1, probe_window=1)
    clock = FakeClock()
    limiter = ShmRateLimiter(owner, failure_policy=policy, clock=clock)
    assert limiter.check(b"first", 60, 5).failure is None  # refilling until +1 s
    decision = limiter.check(b"second", 60, 5)
    assert (decision.allowed, decision.failure, decision.limit) == (allowed, TABLE_FULL, 5)
    clock.now += 1.0  # "first" is full again, hence evictable
    assert limiter.check(b"second", 60, 5).failure is None
    owner.close()


def test_invalid_limiter_settings_are_rejected(attached: SharedTable):
    with pytest.raises(ValueError, match="failure_policy"):
        ShmRateLimiter(attached, failure_policy="maybe")
    with pytest.raises(ValueError, match="lock_timeout_s"):
        ShmRateLimiter(attached, lock_timeout_s=-1.0)


def test_an_inherited_attachment_refuses_to_lock(attached: SharedTable):
    parent, child = FORK.Pipe()
    proc = start(use_inherited_child, attached, child)
    try:
        assert parent.poll(WAIT_S)
        assert "attach" in parent.recv()
    finally:
        stop(proc)


# --- processes ----------------------------------------------------------------------


def test_concurrent_processes_admit_exactly_one_burst(created: SharedTable):
    processes, attempts, burst = 6, 40, 50
    barrier = FORK.Barrier(processes)
    pipes = [FORK.Pipe() for _ in range(processes)]
    procs = [
        start(hammer_child, created.name, b"shared-identity", burst, attempts, barrier, child)
        for _, child in pipes
    ]
    try:
        results = []
        for parent, _ in pipes:
            assert parent.poll(WAIT_S * 3), "a child did not report"
            results.append(parent.recv())
        for proc in procs:
            proc.join(WAIT_S)
    finally:
        for proc in procs:
            stop(proc)
    assert sum(failures for _, failures in results) == 0
    assert sum(admitted for admitted, _ in results) == burst
    assert all(proc.exitcode == 0 for proc in procs)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGABRT])
def test_lock_is_released_when_its_holder_is_killed(attached: SharedTable, sig: signal.Signals):
    limiter = ShmRateLimiter(attached, lock_timeout_s=0.02)
    parent, child = FORK.Pipe()
    proc = start(hold_lock_child, attached.name, child)
    try:
        assert parent.poll(WAIT_S) and parent.recv() is True
        assert limiter.check(b"victim", 60, 3).failure == LOCK_TIMEOUT  # the child really holds it
        os.kill(proc.pid, sig)
        proc.join(WAIT_S)
        assert proc.exitcode == -sig
    finally:
        stop(proc)
    deadline = time.monotonic() + WAIT_S
    decision = limiter.check(b"victim", 60, 3)
    while decision.failure is not None and time.monotonic() < deadline:
        decision = limiter.check(b"victim", 60, 3)
    assert decision.failure is None
    assert decision.allowed
    assert decision.remaining == 2


@pytest.mark.parametrize(("policy", "allowed"), [("allow", True), ("deny", False)])
def test_lock_timeout_is_bounded_and_follows_the_policy(
    attached: SharedTable, policy: str, allowed: bool
):
    timeout = 0.05
    limiter = ShmRateLimiter(attached, lock_timeout_s=timeout, failure_policy=policy)
    parent, child = FORK.Pipe()
    proc = start(hold_lock_child, attached.name, child)
    try:
        assert parent.poll(WAIT_S) and parent.recv() is True
        started = time.monotonic()
        decision = limiter.check(b"waiting", 60, 3)
        elapsed = time.monotonic() - started
        assert decision.failure == LOCK_TIMEOUT
        assert decision.allowed is allowed
        assert decision.retry_after == (0.0 if allowed else 1.0)
        assert timeout <= elapsed < timeout + 1.0
        # Cooling off: the next decisions try once without waiting, and follow the policy.
        started = time.monotonic()
        decision = limiter.check(b"waiting", 60, 3)
        assert decision.failure == LOCK_TIMEOUT
        assert time.monotonic() - started < timeout
        parent.send("release")
        assert parent.poll(WAIT_S) and parent.recv() == "released"
        decision = limiter.check(b"waiting", 60, 3)
        assert (decision.allowed, decision.failure, decision.remaining) == (True, None, 2)
    finally:
        stop(proc)


def test_create_with_bad_arguments_leaves_nothing_behind(name: str):
    with pytest.raises(ValueError, match="probe_window"):
        SharedTable.create(name, slots=8, probe_window=0)
    assert not os.path.exists(shm_path(name))
