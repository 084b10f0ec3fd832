"""The cache's Redis tier against a real redis-server (and a listener that never answers):
values round-trip exactly with their TTL, failures are misses that are bounded, backed off and
recovered from, and writes are fire-and-forget with a bound on those in flight."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable, Iterator

import pytest
import redis
from support import FakeClock, RedisServer

from edge.cache.remote import RedisTier
from edge.ratelimit.redis import (
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    REDIS_BACKOFF,
    REDIS_TIMEOUT,
    REDIS_UNAVAILABLE,
    Backoff,
    connect,
)

TIMEOUT_S = 1.0  # generous: a loaded machine must not turn a working Redis into a miss
WAIT_S = 10.0  # upper bound for anything we poll for; never reached when things work


def key(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def tier_for(url: str, timeout_s: float = TIMEOUT_S, **options) -> RedisTier:
    return RedisTier(lambda: connect(url, None, timeout_s), "test:", timeout_s, **options)


async def poll(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"{what} not within {WAIT_S} s"
        await asyncio.sleep(0.01)


async def landed(tier: RedisTier, k: bytes, value: bytes) -> None:
    """Poll until the fire-and-forget write of `value` can be read back."""

    async def hit() -> bool:
        got, reason = await tier.get(k)
        assert reason is None
        return got == value

    await poll(hit, "the write")


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


@pytest.fixture
def silent() -> Iterator[str]:
    """A Redis URL whose server accepts connections (the kernel does, from the backlog) and
    never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


# --- the backoff, sans I/O ----------------------------------------------------------


def test_backoff_doubles_to_its_cap_with_jitter_and_one_probe_at_a_time():
    clock = FakeClock()
    backoff = Backoff(clock)
    assert not backoff.backing_off
    interval = BACKOFF_MIN_S
    for _ in range(8):
        backoff.failed()
        assert backoff.retry_at is not None
        assert clock.now + interval * 0.5 <= backoff.retry_at <= clock.now + interval
        interval = min(interval * 2, BACKOFF_MAX_S)
    assert interval == BACKOFF_MAX_S
    assert not backoff.try_probe()  # the interval is not over
    clock.now += BACKOFF_MAX_S
    assert backoff.try_probe()
    assert not backoff.try_probe()  # one probe at a time
    backoff.end_probe()
    assert backoff.try_probe()
    backoff.end_probe()
    backoff.succeeded()
    assert not backoff.backing_off
    backoff.failed()  # the first failure after a success starts from the minimum again
    assert backoff.retry_at is not None and backoff.retry_at <= clock.now + BACKOFF_MIN_S


def test_before_start_reads_miss_and_writes_are_dropped():
    async def scenario() -> None:
        tier = tier_for("redis://127.0.0.1:1/0")
        assert await tier.get(key("k")) == (None, REDIS_UNAVAILABLE)
        assert tier.put(key("k"), b"v", 60) is False

    asyncio.run(scenario())


# --- a real redis-server ------------------------------------------------------------


def test_round_trip_exact_bytes_with_ttl(server: RedisServer, client: redis.Redis) -> None:
    asyncio.run(asyncio.wait_for(_round_trip_exact_bytes_with_ttl(server, client), 60))


async def _round_trip_exact_bytes_with_ttl(server: RedisServer, client: redis.Redis) -> None:
    tier = tier_for(server.url)
    await tier.start()
    try:
        values = {
            key("empty"): b"",  # a hit, not a miss
            key("binary"): bytes(range(256)) + b"\r\n$-1\r\n*0\r\n",
            key("big"): os.urandom(2 * 1024 * 1024),
        }
        for k, value in values.items():
            assert tier.put(k, value, 30.0)
        for k, value in values.items():
            await landed(tier, k, value)
        for k in values:
            name = "test:c:" + k.hex()
            assert tier.key_for(k) == name
            assert 0 < client.pttl(name) <= 30_000
        assert client.get("test:c:" + key("big").hex()) == values[key("big")]
        for ttl in (0.0, -1.0, float("nan")):
            assert tier.put(key("never"), b"x", ttl) is False
        assert tier.put(key("forever"), b"x", float("inf"))
        await landed(tier, key("forever"), b"x")
        assert client.pttl("test:c:" + key("forever").hex()) > 30_000
        assert tier.put(key("view"), memoryview(b"abc"), 30.0)
        await landed(tier, key("view"), b"abc")
    finally:
        await tier.aclose()


def test_an_absent_key_is_a_plain_miss(server: RedisServer) -> None:
    async def scenario() -> None:
        tier = tier_for(server.url)
        await tier.start()
        try:
            assert await tier.get(key("absent")) == (None, None)
        finally:
            await tier.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_killed_redis_is_a_miss_then_backed_off_then_used_again() -> None:
    asyncio.run(asyncio.wait_for(_killed_redis_is_a_miss_then_backed_off_then_used_again(), 60))


async def _killed_redis_is_a_miss_then_backed_off_then_used_again() -> None:
    own = RedisServer()
    clock = FakeClock()  # frozen unless the test moves it: the backoff lasts as long as needed
    tier = tier_for(own.url, clock=clock)
    await tier.start()
    try:
        k = key("survivor")
        assert tier.put(k, b"before", 60.0)
        await landed(tier, k, b"before")
        own.kill()
        async with asyncio.timeout(5):  # it returns; timeout_s bounds it, this bounds the test
            value, reason = await tier.get(k)
        assert value is None and reason in (REDIS_UNAVAILABLE, REDIS_TIMEOUT)
        assert await tier.get(k) == (None, REDIS_BACKOFF)  # Redis not even tried
        assert tier.put(k, b"skipped", 60.0) is False
        own.restart()  # same port, empty (no persistence)

        async def answers() -> bool:
            clock.now += BACKOFF_MAX_S  # each poll is a probe
            return await tier.get(k) == (None, None)

        await poll(answers, "recovery")
        assert tier.put(k, b"after", 60.0)
        await landed(tier, k, b"after")
    finally:
        await tier.aclose()
        own.stop()


def test_a_server_that_never_answers_is_a_timeout_and_probed_once(silent: str) -> None:
    asyncio.run(asyncio.wait_for(_a_server_that_never_answers(silent), 60))


async def _a_server_that_never_answers(url: str) -> None:
    clock = FakeClock()
    errors: list[str] = []
    tier = tier_for(url, timeout_s=0.2, clock=clock, on_write_error=errors.append)
    await tier.start(warm_timeout_s=0.2)
    try:
        async with asyncio.timeout(5):
            assert await tier.get(key("k")) == (None, REDIS_TIMEOUT)
        assert await tier.get(key("k")) == (None, REDIS_BACKOFF)
        clock.now += BACKOFF_MAX_S
        async with asyncio.timeout(5):
            results = await asyncio.gather(*(tier.get(key(f"k{n}")) for n in range(5)))
        assert sorted(results, key=str) == [(None, REDIS_BACKOFF)] * 4 + [(None, REDIS_TIMEOUT)]
    finally:
        await tier.aclose()
    # A write that times out feeds the backoff too, and is reported.
    writer = tier_for(url, timeout_s=0.2, clock=clock, on_write_error=errors.append)
    await writer.start(warm_timeout_s=0.2)  # a failed warm-up does not start a backoff
    try:
        assert writer.put(key("w"), b"v", 60.0)

        async def reported() -> bool:
            return bool(errors)

        await poll(reported, "the write's failure")
        assert errors == [REDIS_TIMEOUT]
        assert await writer.get(key("k")) == (None, REDIS_BACKOFF)
        assert writer.put(key("w"), b"v", 60.0) is False
    finally:
        await writer.aclose()


def test_writes_beyond_the_bound_are_dropped_and_aclose_cancels_the_rest(silent: str) -> None:
    asyncio.run(asyncio.wait_for(_writes_beyond_the_bound(silent), 60))


async def _writes_beyond_the_bound(url: str) -> None:
    tier = tier_for(url, timeout_s=30.0, max_pending_writes=4)  # writes stall, never time out
    await tier.start(warm_timeout_s=0.2)  # a failed warm-up is not a failure of the tier
    accepted = [tier.put(key(f"w{n}"), b"v" * 1000, 60.0) for n in range(6)]
    assert accepted == [True] * 4 + [False] * 2
    await asyncio.sleep(0.1)  # let them connect and send: stalled on the server now
    assert tier.pending_writes == 4
    assert tier.put(key("later"), b"v", 60.0) is False
    async with asyncio.timeout(5):  # far under the writes' own 30 s: they were cancelled
        await tier.aclose()
    assert tier.pending_writes == 0
    assert await tier.get(key("w0")) == (None, REDIS_UNAVAILABLE)  # closed
