"""Token-bucket arithmetic with an injected clock (no I/O)."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.ratelimit.bucket import CLOCK_SKEW_S, MAX_DEBT, MAX_WAIT_S, adjust, decide, full_at

FRESH = math.nan  # what a never-used slot looks like to the bucket
T0 = 1_000.0


class Outcome(NamedTuple):
    allowed: bool
    tokens: float
    updated: float
    retry_after_s: float
    reset_after_s: float


class Bucket:
    """Holds the stored state between calls, as a table slot would."""

    def __init__(
        self, rpm: float, burst: int, tokens: float = FRESH, updated: float = FRESH
    ) -> None:
        self.rate = rpm / 60.0
        self.burst = burst
        self.tokens = tokens
        self.updated = updated

    def take(self, now: float, cost: int = 1):
        out = Outcome(*decide(self.tokens, self.updated, now, self.rate, self.burst, cost))
        self.tokens, self.updated = out.tokens, out.updated
        return out

    def drain(self, now: float, limit: int = 10_000) -> int:
        """Admit single-token requests at one instant until one is rejected."""
        for admitted in range(limit):
            if not self.take(now).allowed:
                return admitted
        raise AssertionError("bucket never rejected")


def test_fresh_bucket_admits_exactly_burst_then_rejects():
    bucket = Bucket(rpm=60, burst=5)
    results = [bucket.take(T0) for _ in range(6)]
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert [math.floor(r.tokens) for r in results[:5]] == [4, 3, 2, 1, 0]
    assert results[5].retry_after_s == pytest.approx(1.0)
    assert results[5].reset_after_s == pytest.approx(5.0)


def test_allowed_reports_zero_retry_and_time_to_full():
    bucket = Bucket(rpm=120, burst=10)  # 2 tokens/s
    bucket.take(T0, cost=3)
    out = bucket.take(T0, cost=1)
    assert out.allowed
    assert out.retry_after_s == 0.0
    assert out.reset_after_s == pytest.approx(4 / 2)


def test_refill_timing_one_token_per_interval():
    bucket = Bucket(rpm=30, burst=2)  # one token every 2 s
    assert bucket.drain(T0) == 2
    assert not bucket.take(T0 + 1.999).allowed
    assert bucket.take(T0 + 2.0).allowed
    assert not bucket.take(T0 + 2.0).allowed
    assert bucket.take(T0 + 4.0).allowed


def test_retry_after_is_time_until_cost_is_available():
    bucket = Bucket(rpm=60, burst=10)
    bucket.take(T0, cost=10)
    out = bucket.take(T0 + 1.5, cost=4)
    assert not out.allowed
    assert out.retry_after_s == pytest.approx(2.5)
    assert bucket.take(T0 + 1.5 + 2.5, cost=4).allowed


def test_rejected_requests_cost_nothing():
    hammered = Bucket(rpm=60, burst=3)
    quiet = Bucket(rpm=60, burst=3)
    hammered.drain(T0)
    quiet.drain(T0)
    for i in range(1, 100):
        assert not hammered.take(T0 + i * 0.009).allowed  # 100 rejections within 0.9 s
    assert hammered.take(T0 + 1.0).allowed
    assert quiet.take(T0 + 1.0).allowed
    assert hammered.tokens == pytest.approx(quiet.tokens)


def test_long_idle_caps_at_burst():
    bucket = Bucket(rpm=600, burst=4)
    bucket.drain(T0)
    assert bucket.drain(T0 + 10_000_000.0) == 4


@pytest.mark.parametrize(
    ("tokens", "updated"),
    [
        (math.nan, T0),
        (math.inf, T0),
        (-math.inf, T0),
        (-1e13, T0),  # a debt no request could run up
        (1e300, T0),
        (2.0, math.nan),
        (2.0, math.inf),
        (2.0, -math.inf),
        (2.0, T0 + 1e9),  # far-future timestamp
        (0.0, T0 + 1e9),  # empty *and* far future: must not stall refill until then
    ],
)
def test_corrupt_state_costs_at_most_one_burst(tokens, updated):
    bucket = Bucket(rpm=6, burst=7, tokens=tokens, updated=updated)
    assert bucket.drain(T0) == 7
    assert bucket.drain(T0 + 1.0) == 0  # and it is a real bucket again afterwards


def test_small_backward_clock_step_is_not_a_reset():
    bucket = Bucket(rpm=60, burst=3)
    bucket.drain(T0)
    out = bucket.take(T0 - CLOCK_SKEW_S / 2)
    assert not out.allowed
    assert out.updated == T0  # the stored time never moves backwards
    assert bucket.take(T0 + 1.0).allowed  # refill resumes from T0


def test_cost_above_burst_is_never_admitted_and_costs_nothing():
    bucket = Bucket(rpm=60, burst=5)
    out = bucket.take(T0, cost=6)
    assert not out.allowed
    assert out.retry_after_s == MAX_WAIT_S
    assert bucket.drain(T0) == 5


def test_zero_rate_never_refills_and_reports_capped_waits():
    bucket = Bucket(rpm=0, burst=2)
    assert bucket.drain(T0) == 2
    out = bucket.take(T0 + 1e6)
    assert not out.allowed
    assert out.retry_after_s == MAX_WAIT_S
    assert out.reset_after_s == MAX_WAIT_S


def test_zero_cost_is_always_admitted():
    bucket = Bucket(rpm=60, burst=1)
    bucket.drain(T0)
    assert bucket.take(T0, cost=0).allowed


@pytest.mark.parametrize(
    ("rate", "burst", "cost"),
    [(-1.0, 5, 1), (math.nan, 5, 1), (math.inf, 5, 1), (1.0, 0, 1), (1.0, 5, -1)],
)
def test_invalid_parameters_raise(rate, burst, cost):
    with pytest.raises(ValueError, match="invalid bucket parameters"):
        decide(FRESH, FRESH, T0, rate, burst, cost)


def test_full_at_is_when_level_reaches_burst():
    assert full_at(2.0, T0, 0.5, 5) == pytest.approx(T0 + 6.0)
    assert full_at(5.0, T0, 0.5, 5) == T0
    assert full_at(1.0, T0, 0.0, 5) == math.inf


traces = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=30.0, allow_nan=False, allow_infinity=False),
        st.integers(min_value=0, max_value=12),
    ),
    max_size=200,
)


@given(
    rpm=st.floats(min_value=0.0, max_value=6000.0, allow_nan=False),
    burst=st.integers(min_value=1, max_value=10),
    trace=traces,
)
def test_admitted_cost_never_exceeds_burst_plus_refill(rpm, burst, trace):
    bucket = Bucket(rpm=rpm, burst=burst)
    now = start = T0
    admitted = 0
    for dt, cost in trace:
        now += dt
        out = bucket.take(now, cost)
        if out.allowed:
            admitted += cost
            assert out.retry_after_s == 0.0
        else:
            assert out.retry_after_s > 0.0
        assert 0.0 <= out.tokens <= burst
        assert 0.0 <= out.reset_after_s <= MAX_WAIT_S
        # Every prefix obeys the bound; the slack only absorbs float rounding.
        bound = burst + bucket.rate * (now - start)
        assert admitted <= bound + 1e-9 * max(1.0, bound)


def test_a_debt_is_paid_back_by_the_refill_before_anything_is_admitted():
    bucket = Bucket(rpm=60, burst=10)  # 1 token/s
    assert bucket.take(T0, cost=10).allowed  # reserved 10, empty now
    bucket.tokens, bucket.updated = adjust(bucket.tokens, bucket.updated, T0, 1.0, 10, -25)
    assert bucket.tokens == pytest.approx(-25.0)  # used 35: a debt of 25
    refused = bucket.take(T0, cost=1)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(26.0)
    assert not bucket.take(T0 + 25.5, cost=1).allowed  # still paying back
    assert bucket.take(T0 + 26.0, cost=1).allowed
    assert adjust(0.0, T0, T0, 1.0, 10, -2 * MAX_DEBT)[0] == -MAX_DEBT  # bounded
