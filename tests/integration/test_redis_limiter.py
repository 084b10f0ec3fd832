"""The Redis limiter against a real redis-server: the script's bucket equals bucket.py's, the
script survives SCRIPT FLUSH, keys carry digests and TTLs, and failures are bounded, backed
off and recovered from without a restart."""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import RedisServer, free_port

from edge.ratelimit import bucket
from edge.ratelimit.redis import (
    BUCKET_SCRIPT,
    REDIS_BACKOFF,
    REDIS_TIMEOUT,
    REDIS_UNAVAILABLE,
    SCRIPT_SHA,
    RedisRateLimiter,
    connect,
)

TIMEOUT_S = 0.05


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    instance = RedisServer()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def client(server: RedisServer) -> Iterator[redis.Redis]:
    sync = redis.Redis.from_url(server.url)
    try:
        yield sync
    finally:
        sync.close()


def limiter_for(
    url: str, policy: str = "allow", prefix: str = "test:", timeout_s: float = TIMEOUT_S
) -> RedisRateLimiter:
    return RedisRateLimiter(
        lambda: connect(url, None, timeout_s), prefix=prefix, timeout_s=timeout_s,
        failure_policy=policy,
    )  # fmt: skip


@pytest.fixture
def loaded(client: redis.Redis) -> None:
    """The script is in Redis's cache, for tests that EVALSHA it themselves (whatever ran
    before: another test may have flushed it, or not loaded it yet)."""
    client.script_load(BUCKET_SCRIPT)


def test_script_sha_matches_what_redis_computes(client: redis.Redis) -> None:
    assert client.script_load(BUCKET_SCRIPT) == SCRIPT_SHA


steps = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=5.0, allow_nan=False),  # seconds since last step
        st.integers(min_value=0, max_value=12),  # cost
    ),
    min_size=1,
    max_size=30,
)


@pytest.mark.usefixtures("loaded")
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=steps,
    rpm=st.floats(min_value=0.5, max_value=6000.0),
    burst=st.integers(min_value=1, max_value=10),
)
def test_script_runs_the_same_bucket_as_bucket_py(
    client: redis.Redis, steps: list[tuple[float, int]], rpm: float, burst: int
) -> None:
    """Same (time, cost) sequence through bucket.decide and through the script with an
    injected clock: the same admissions, remaining tokens and waits (to float noise)."""
    key = "prop:bucket"
    client.delete(key)
    rate = rpm / 60.0
    tokens, updated = math.nan, math.nan  # absent: a full bucket
    now = 1_700_000_000.0
    for dt, cost in steps:
        now += dt
        allowed, tokens, updated, retry, reset = bucket.decide(
            tokens, updated, now, rate, burst, cost
        )
        # The injected clock stands still between steps, Redis's expiry does not: PERSIST in
        # the same transaction, so the next step reads what this one stored (PTTL first).
        sent = time.monotonic()
        pipe = client.pipeline(transaction=True)
        pipe.evalsha(SCRIPT_SHA, 1, key, repr(rate), burst, cost, "take", repr(now))
        pipe.pttl(key)
        pipe.persist(key)
        pipe.exists(key)
        reply, ttl, _, kept = pipe.execute()
        elapsed_ms = (time.monotonic() - sent) * 1000
        got_allowed, got_remaining, got_retry, got_reset = reply
        assert bool(got_allowed) == allowed
        # floor of a level the two compute in a different order: allow one ulp's difference
        assert abs(int(got_remaining) - math.floor(tokens)) <= (
            1 if abs(tokens - round(tokens)) < 1e-6 else 0
        )
        assert float(got_retry) == pytest.approx(retry, rel=1e-6, abs=1e-6)
        assert float(got_reset) == pytest.approx(reset, rel=1e-6, abs=1e-6)
        if reset > 0 and ttl in (-2, 0):
            # The TTL runs in real time (ceil(reset ms) + 1): a bucket a few ms from full may
            # be gone (-2) or going (0) by the PTTL on a loaded machine, but only once that
            # much time has passed.
            assert elapsed_ms >= reset * 1000, (elapsed_ms, reset)
            if not kept:  # expired before the PERSIST: the next step starts from a full bucket
                tokens, updated = math.nan, math.nan
        elif reset > 0:
            assert 0 < ttl <= math.ceil(reset * 1000) + 1
        else:
            assert ttl == -2  # full again: nothing stored


@pytest.mark.usefixtures("loaded")
def test_adjust_refunds_and_charges_within_bounds(client: redis.Redis) -> None:
    key = "prop:adjust"
    client.delete(key)
    now = repr(1_700_000_000.0)
    client.evalsha(SCRIPT_SHA, 1, key, "0.001", 100, 80, "take", now)  # 20 left
    assert int(client.evalsha(SCRIPT_SHA, 1, key, "0.001", 100, 30, "adjust", now)[1]) == 50
    assert int(client.evalsha(SCRIPT_SHA, 1, key, "0.001", 100, -70, "adjust", now)[1]) == 0
    assert int(client.evalsha(SCRIPT_SHA, 1, key, "0.001", 100, 500, "adjust", now)[1]) == 100
    assert client.exists(key) == 0  # full: forgotten


def test_decisions_keys_and_script_flush(server: RedisServer, client: redis.Redis) -> None:
    asyncio.run(asyncio.wait_for(_decisions_keys_and_script_flush(server, client), 60))


async def _decisions_keys_and_script_flush(server: RedisServer, client: redis.Redis) -> None:
    limiter = limiter_for(server.url, prefix="flush:")
    await limiter.start()
    try:
        identity = b"key:sk-secret-identity"
        decisions = [await limiter.check_async(identity, 6.0, 3) for _ in range(4)]
        assert [(d.allowed, d.failure) for d in decisions] == [(True, None)] * 3 + [(False, None)]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0]
        assert decisions[3].retry_after == pytest.approx(10.0, abs=0.1)
        keys = [k.decode() for k in client.keys("flush:*")]
        assert keys == [limiter.key_for(identity)]
        assert "secret" not in keys[0] and "sk-" not in keys[0]
        assert 0 < client.pttl(keys[0]) <= 30_000 + 1
        # A repeated refusal is answered by the worker itself: Redis is not asked again.
        calls = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        again = await limiter.check_async(identity, 6.0, 3)
        assert not again.allowed and again.retry_after == pytest.approx(10.0, abs=0.2)
        assert client.info("commandstats")["cmdstat_evalsha"]["calls"] == calls
        client.script_flush()
        assert client.script_exists(SCRIPT_SHA) == [False]
        other = await limiter.check_async(b"key:other", 6.0, 3)
        assert other.failure is None and other.allowed and other.remaining == 2
        assert client.script_exists(SCRIPT_SHA) == [True]  # reloaded by that same decision
    finally:
        await limiter.aclose()


def test_connection_refused_is_decided_by_policy_and_backs_off() -> None:
    asyncio.run(asyncio.wait_for(_connection_refused_is_decided_by_policy_and_backs_off(), 60))


async def _connection_refused_is_decided_by_policy_and_backs_off() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    for policy in ("allow", "deny"):
        # A refusal comes at once, but on a loaded machine this loop may not see it within
        # 50 ms, and then the decision is rightly a timeout: give it a second to be seen.
        limiter = limiter_for(url, policy, timeout_s=1.0)
        await limiter.start()
        try:
            started = time.monotonic()
            decisions = [await limiter.check_async(b"x", 60.0, 5) for _ in range(50)]
            assert time.monotonic() - started < 50 * TIMEOUT_S
            assert all(d.allowed == (policy == "allow") for d in decisions)
            reasons = [d.failure for d in decisions]
            assert reasons[0] == REDIS_UNAVAILABLE
            # Backing off: the next decisions do not even try Redis.
            assert reasons.count(REDIS_BACKOFF) >= 45
        finally:
            await limiter.aclose()


def test_frozen_redis_is_bounded_trickled_and_recovered() -> None:
    asyncio.run(asyncio.wait_for(_frozen_redis_is_bounded_trickled_and_recovered(), 60))


async def _frozen_redis_is_bounded_trickled_and_recovered() -> None:
    """SIGSTOP: every decision ends within the timeout; while backing off, only one probe at
    a time goes to Redis; after SIGCONT decisions succeed again without a restart."""
    frozen = RedisServer()
    limiter = limiter_for(frozen.url, "deny")
    await limiter.start()
    try:
        assert (await limiter.check_async(b"f", 60.0, 100)).failure is None  # pool is open
        frozen.signal(signal.SIGSTOP)
        latencies: list[float] = []
        reasons: list[str | None] = []

        async def one() -> None:
            started = time.monotonic()
            decision = await limiter.check_async(b"f", 60.0, 100)
            latencies.append(time.monotonic() - started)
            reasons.append(decision.failure)
            assert not decision.allowed  # deny policy

        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # 1.5 s of traffic, 20 concurrent at a time
            await asyncio.gather(*(one() for _ in range(20)))
            await asyncio.sleep(0.01)
        assert max(latencies) < TIMEOUT_S + 0.1, max(latencies)
        tried = reasons.count(REDIS_TIMEOUT)
        assert tried >= 1
        # The first wave (20 in flight when Redis stopped) waits out its timeout; after it,
        # backoff doubles from 50 ms: over 1.5 s about 6 single probes, not thousands.
        assert tried <= 20 + 10, (tried, len(reasons))
        assert len(reasons) >= 200
        assert reasons.count(REDIS_BACKOFF) == len(reasons) - tried
        frozen.signal(signal.SIGCONT)

        async def recovered() -> bool:
            return (await limiter.check_async(b"f", 60.0, 100)).failure is None

        deadline = time.monotonic() + 5.0
        while not await recovered():
            assert time.monotonic() < deadline, "no recovery within 5 s"
            await asyncio.sleep(0.05)
    finally:
        frozen.signal(signal.SIGCONT)
        await limiter.aclose()
        frozen.stop()


def test_killed_and_restarted_redis_is_used_again() -> None:
    asyncio.run(asyncio.wait_for(_killed_and_restarted_redis_is_used_again(), 60))


async def _killed_and_restarted_redis_is_used_again() -> None:
    server = RedisServer()
    limiter = limiter_for(server.url, "allow")
    await limiter.start()
    try:
        assert (await limiter.check_async(b"r", 6.0, 1)).allowed
        # Many idle connections, all of which the restart will break.
        await asyncio.gather(*(limiter.check_async(b"many", 6000.0, 1000) for _ in range(40)))
        server.kill()
        failed = await limiter.check_async(b"r", 6.0, 1)
        assert failed.allowed and failed.failure is not None  # policy: allow
        server.restart()  # same port, empty (no persistence): the bucket starts full

        async def enforced() -> bool:
            first = await limiter.check_async(b"r", 6.0, 1)
            if first.failure is not None:
                return False
            second = await limiter.check_async(b"r", 6.0, 1)
            return second.failure is None and not second.allowed

        deadline = time.monotonic() + 5.0
        while not await enforced():
            assert time.monotonic() < deadline, "limits not enforced again within 5 s"
            await asyncio.sleep(0.05)
    finally:
        await limiter.aclose()
        server.stop()
