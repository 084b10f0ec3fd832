"""The breaker state machine with an injected clock, and its shared-memory table."""

from __future__ import annotations

import os
import uuid

import pytest

from edge.routing import breaker as cb
from edge.routing.providers import BreakerPolicy
from edge.shm import unlink

POLICY = BreakerPolicy(failure_threshold=3, timeout_s=10.0, success_threshold=2, half_open_max=2)


def test_opens_after_threshold_consecutive_failures_only():
    s = cb.BreakerState()
    cb.on_failure(s, POLICY, 0.0)
    cb.on_failure(s, POLICY, 0.1)
    cb.on_success(s, POLICY, 0.2)  # a success resets the run
    cb.on_failure(s, POLICY, 0.3)
    cb.on_failure(s, POLICY, 0.4)
    assert s.state == cb.CLOSED and cb.allow(s, POLICY, 0.5)
    cb.on_failure(s, POLICY, 1.0)
    assert s.state == cb.OPEN
    assert not cb.allow(s, POLICY, 1.0)
    assert not cb.allow(s, POLICY, 10.99)
    assert not cb.available(s, POLICY, 10.99)


def test_half_open_admits_a_bounded_number_of_probes_then_closes():
    s = cb.BreakerState()
    for _ in range(3):
        cb.on_failure(s, POLICY, 0.0)
    assert cb.available(s, POLICY, 10.0)
    assert cb.allow(s, POLICY, 10.0) and s.state == cb.HALF_OPEN
    assert cb.allow(s, POLICY, 10.1)
    assert not cb.allow(s, POLICY, 10.2)  # two probes in flight: the third waits
    cb.on_success(s, POLICY, 10.3)
    assert s.state == cb.HALF_OPEN and cb.allow(s, POLICY, 10.4)
    cb.on_success(s, POLICY, 10.5)
    assert s.state == cb.CLOSED and s.failures == 0


def test_a_failed_probe_reopens_for_a_full_timeout():
    s = cb.BreakerState()
    for _ in range(3):
        cb.on_failure(s, POLICY, 0.0)
    assert cb.allow(s, POLICY, 10.0)
    cb.on_failure(s, POLICY, 10.5)
    assert s.state == cb.OPEN
    assert not cb.allow(s, POLICY, 20.0)
    assert cb.allow(s, POLICY, 20.5)


def test_probes_that_never_report_back_are_given_up_after_a_timeout():
    s = cb.BreakerState()
    for _ in range(3):
        cb.on_failure(s, POLICY, 0.0)
    assert cb.allow(s, POLICY, 10.0) and cb.allow(s, POLICY, 10.0)
    assert not cb.allow(s, POLICY, 19.9)  # the probing workers died
    assert cb.allow(s, POLICY, 20.0)


def test_a_probe_without_a_verdict_gives_its_place_back_at_once():
    s = cb.BreakerState()
    for _ in range(3):
        cb.on_failure(s, POLICY, 0.0)
    assert cb.allow(s, POLICY, 10.0) and cb.allow(s, POLICY, 10.0)
    assert not cb.allow(s, POLICY, 10.1)
    probe = s.opened_at  # what the router hands a request that claimed a place
    cb.release(s, probe)  # one probe's client hung up
    assert s.state == cb.HALF_OPEN and cb.allow(s, POLICY, 10.1)  # not after a timeout
    closed = cb.BreakerState()
    cb.release(closed, None)
    assert closed == cb.BreakerState()  # nothing to give back outside half-open


def test_only_a_place_claimed_in_this_half_open_period_is_given_back_or_counts():
    s = cb.BreakerState()
    for _ in range(3):
        cb.on_failure(s, POLICY, 0.0)
    assert cb.allow(s, POLICY, 10.0) and cb.allow(s, POLICY, 10.0)  # both places taken
    cb.release(s, None)  # a request admitted before the breaker opened: claimed nothing
    cb.release(s, s.opened_at - 5.0)  # a place from an earlier half-open period
    assert s.probes == 2 and not cb.allow(s, POLICY, 10.1)
    cb.on_success(s, POLICY, 10.2, probe=False)  # a late answer from before the opening
    cb.on_failure(s, POLICY, 10.3, probe=False)
    assert s.state == cb.HALF_OPEN and s.probes == 2 and s.successes == 0


def test_late_success_while_open_changes_nothing():
    s = cb.BreakerState()
    for _ in range(3):
        cb.on_failure(s, POLICY, 0.0)
    cb.on_success(s, POLICY, 1.0)
    assert s.state == cb.OPEN


def test_cooldown_never_shortens_and_is_capped():
    s = cb.BreakerState()
    cb.cool_down(s, 100.0, 30)
    cb.cool_down(s, 101.0, 2)  # a shorter new retry-after (LiteLLM #40130)
    assert s.cooldown_until == 130.0
    cb.cool_down(s, 101.0, 3600)
    assert s.cooldown_until == 101.0 + cb.MAX_COOLDOWN_S


@pytest.fixture
def table_name():
    name = f"llm-edge-proxy.unit{os.getpid()}.breakers.{uuid.uuid4().hex[:8]}"
    cb.SharedBreakers.create(name, slots=8)
    yield name
    unlink(name)


@pytest.mark.parametrize(
    "corrupt",
    [{"state": 3}, {"cooldown_until": 1e300}, {"opened_at": float("nan")}, {"probe_at": 1e9}],
)
def test_a_corrupt_slot_reads_as_a_fresh_breaker(table_name, corrupt):
    now = [100.0]
    table = cb.SharedBreakers.attach(table_name, clock=lambda: now[0])
    try:
        table.update("primary", lambda s, t: cb.on_failure(s, POLICY, t))
        offset = table._slot("primary")
        state = table._read(offset)
        for name, value in corrupt.items():
            setattr(state, name, value)
        table._write(offset, table._mm[offset : offset + 16], state)
        assert table.peek("primary") == cb.BreakerState()
        assert table.update("primary", lambda s, t: cb.allow(s, POLICY, t)) is True
    finally:
        table.close()


def test_shared_table_is_one_state_for_every_attachment(table_name):
    now = [0.0]
    first = cb.SharedBreakers.attach(table_name, clock=lambda: now[0])
    second = cb.SharedBreakers.attach(table_name, clock=lambda: now[0])
    try:
        for _ in range(3):
            first.update("primary", lambda s, t: cb.on_failure(s, POLICY, t))
        assert second.peek("primary").state == cb.OPEN
        assert second.peek("backup").state == cb.CLOSED  # its own slot
        now[0] = 11.0
        assert second.update("primary", lambda s, t: cb.allow(s, POLICY, t)) is True
        assert first.peek("primary").state == cb.HALF_OPEN
    finally:
        first.close()
        second.close()


def test_shared_table_across_fork(table_name):
    parent = cb.SharedBreakers.attach(table_name)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                child = cb.SharedBreakers.attach(table_name)
                for _ in range(3):
                    child.update("dead", lambda s, t: cb.on_failure(s, POLICY, t))
                child.close()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert parent.peek("dead").state == cb.OPEN
    finally:
        parent.close()


def test_full_table_falls_back_to_a_local_breaker(table_name):
    shared = cb.SharedBreakers.attach(table_name)
    try:
        for index in range(10):  # 8 slots
            shared.update(f"p{index}", lambda s, t: cb.on_failure(s, POLICY, t))
        assert all(shared.peek(f"p{index}").failures == 1 for index in range(10))
    finally:
        shared.close()


def test_attach_refuses_a_foreign_object(table_name):
    import mmap

    import posix_ipc

    shm = posix_ipc.SharedMemory("/" + table_name)
    with mmap.mmap(shm.fd, shm.size) as mm:
        mm[:8] = b"NOTMINE!"
    shm.close_fd()
    with pytest.raises(ValueError):
        cb.SharedBreakers.attach(table_name)
