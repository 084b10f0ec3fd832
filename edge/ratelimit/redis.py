"""The bucket in Redis (or Valkey), for limits that hold across hosts.

Theory of operation
-------------------
Every decision is one ``EVALSHA`` of ``BUCKET_SCRIPT``, which runs the same token bucket as
``edge.ratelimit.bucket`` inside Redis, against Redis's own clock (``TIME``), so the hosts'
clocks never matter and two hosts never race on a read-modify-write. One round trip per
decision; the script is loaded by that same round trip when Redis answers ``NOSCRIPT``
(after a restart or ``SCRIPT FLUSH``: ``EVAL`` both runs and caches it).

A key is ``<prefix>b:<hex of slot_digest(identity)>``: a digest of the identity (itself
derived from the key, never the key), and it expires (``PEXPIRE``) when the bucket would be
full again. A full bucket and an absent key are the same thing, so idle identities cost
nothing and a lost key costs at most one burst.

Redis being slow, down, restarting or loading is expected. Each decision waits at most
``timeout_s``; when it fails, the failure policy decides (``Decision.failure`` names why).
After a failure the limiter backs off: for a growing, jittered interval (``BACKOFF_MIN_S``
doubling to ``BACKOFF_MAX_S``) decisions go straight to the policy without touching Redis,
and when the interval is over only one decision at a time probes Redis. The first success
ends the backoff. So a recovering Redis sees a trickle per worker, not every request.

One local shortcut (a "first tier"): a worker remembers a refusal until its ``retry_after``
has passed and refuses the same identity again without asking Redis. That is exact for the
request bucket (a refused bucket only refills, so nothing can make the request fit sooner;
only a token-limit refund can, and settling one forgets the refusal in this worker), and it
keeps a refused flood, the heaviest load a limiter sees, off Redis.

The client is redis-py's asyncio API (hiredis parser when installed), one pool per worker,
opened at lifespan startup in the worker, after the fork.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Final

from edge.ratelimit.base import ALLOW, Decision, DigestCache, check_policy, failure_decision

log = logging.getLogger("edge.ratelimit")

REDIS_TIMEOUT: Final = "redis_timeout"
REDIS_UNAVAILABLE: Final = "redis_unavailable"
REDIS_LOADING: Final = "redis_loading"
REDIS_ERROR: Final = "redis_error"
REDIS_BACKOFF: Final = "redis_backoff"

BACKOFF_MIN_S: Final = 0.05
BACKOFF_MAX_S: Final = 2.0
MAX_WAIT_S: Final = 86_400.0

# ARGV: rate_per_s, burst, cost, mode ("take" | "adjust"), [now, tests only].
# "take": admit when cost tokens are there, and take them (nothing on refusal).
# "adjust": give back `cost` tokens (take when negative): at most burst, below zero a debt
# (edge.ratelimit.bucket).
# Returns {allowed (0/1), remaining (floor), retry_after_s, reset_after_s} (floats as strings:
# a Lua number in a reply is truncated to an integer).
BUCKET_SCRIPT: Final = """
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 5: TIME + writes
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local mode = ARGV[4]
local now
if ARGV[5] then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local huge = math.huge
local state = redis.call('HMGET', KEYS[1], 't', 'u')
local tokens = tonumber(state[1])
local updated = tonumber(state[2])
local level, as_of
if tokens == nil or updated == nil or not (tokens >= -1e12 and tokens < huge)
    or not (updated > -huge and updated < huge) then
  level, as_of = burst, now
else
  local elapsed = now - updated
  if elapsed < 0 then
    if elapsed < -1.0 then
      level, as_of = burst, now
    else
      level, as_of = math.min(tokens, burst), updated
    end
  else
    level, as_of = math.min(tokens + elapsed * rate, burst), now
  end
end
local function until_level(target)
  if level >= target then return 0 end
  if rate <= 0 then return huge end
  return (target - level) / rate
end
local allowed, retry = 1, 0
if mode == 'adjust' then
  level = math.max(-1e12, math.min(burst, level + cost))  -- below zero: a debt
elseif cost <= level then
  level = level - cost
else
  allowed = 0
  if cost <= burst then retry = until_level(cost) else retry = huge end
end
local reset = until_level(burst)
if reset <= 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 't', string.format('%.17g', level),
             'u', string.format('%.17g', as_of))
  redis.call('PEXPIRE', KEYS[1], math.min(math.ceil(reset * 1000) + 1, 315360000000))
end
return {allowed, math.max(0, math.floor(level)), string.format('%.17g', math.min(retry, 86400)),
        string.format('%.17g', math.min(reset, 86400))}
"""
SCRIPT_SHA: Final = hashlib.sha1(BUCKET_SCRIPT.encode()).hexdigest()


def connect(url: str, password: str | None, timeout_s: float, max_connections: int = 64) -> Any:
    """A redis.asyncio client with its own pool; no retries (the failure policy decides)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    options: dict[str, Any] = {
        # No socket timeout of redis-py's own: it would wrap every send in asyncio.wait_for (a
        # task per command). Each decision is bounded by asyncio.timeout in RedisRateLimiter.
        "socket_timeout": None,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": max_connections,
        "health_check_interval": 0,
    }
    if password is not None:
        options["password"] = password
    return aioredis.Redis.from_url(url, **options)


class Backoff:
    """After a failure, skip Redis for a jittered interval (BACKOFF_MIN_S doubling to
    BACKOFF_MAX_S), then let one call at a time probe it; a success ends it. Sans I/O: the
    clock is passed in. The rule of RedisRateLimiter and of the cache's Redis tier
    (edge.cache.remote)."""

    __slots__ = ("_clock", "_interval_s", "_probing", "retry_at")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._interval_s = 0.0
        self._probing = False
        self.retry_at: float | None = None  # None: healthy

    @property
    def backing_off(self) -> bool:
        return self.retry_at is not None

    def try_probe(self) -> bool:
        """While backing off: whether this call may go to Redis now (the interval is over and
        no other call is probing). If so it is the probe until `end_probe`."""
        if self._probing or self.retry_at is None or self._clock() < self.retry_at:
            return False
        self._probing = True
        return True

    def end_probe(self) -> None:
        self._probing = False

    def succeeded(self) -> None:
        self.retry_at = None
        self._interval_s = 0.0

    def failed(self) -> None:
        interval = self._interval_s * 2 if self._interval_s else BACKOFF_MIN_S
        self._interval_s = min(interval, BACKOFF_MAX_S)
        # Jitter: the workers of every host must not come back at the same instant.
        self.retry_at = self._clock() + self._interval_s * random.uniform(0.5, 1.0)


class RedisRateLimiter:
    """RateLimiter whose buckets live in Redis. Its decisions are awaited (``check_async``)."""

    asynchronous: Final = True

    def __init__(
        self,
        client_factory: Callable[[], Any],
        prefix: str = "llm-edge-proxy:",
        timeout_s: float = 0.05,
        failure_policy: str = ALLOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_policy(failure_policy)
        self._client_factory = client_factory
        self._client: Any = None
        self._connections: Connections | None = None
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._policy = failure_policy
        self._clock = clock
        self._digest = DigestCache()
        self._keys: dict[bytes, str] = {}
        self._refused: dict[bytes, tuple[float, float, float]] = {}  # see check_async
        self._backoff = Backoff(clock)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, warm_timeout_s: float = 2.0) -> None:
        """Open the pool in the worker, after the fork, and warm it: connect and load the
        script, with more patience than a decision has, so the first requests do not pay for
        the connection. Redis being away now is not fatal: decisions retry on their own."""
        if self._client is None:
            self._client = self._client_factory()
            self._connections = Connections(self._client.connection_pool)
        connections = self._connections
        assert connections is not None
        try:
            async with asyncio.timeout(warm_timeout_s):
                await connections.call("SCRIPT", "LOAD", BUCKET_SCRIPT)
        except Exception as exc:
            log.warning(
                "Redis is not reachable at startup; the failure policy decides until it is",
                extra={"reason": _reason(exc)},
            )

    def key_for(self, identity: bytes) -> str:
        key = self._keys.get(identity)
        if key is None:
            if len(self._keys) >= 65_536:
                self._keys.clear()
            key = self._keys[identity] = self._prefix + "b:" + self._digest(identity).hex()
        return key

    def check(self, identity: bytes, rpm: float, burst: int, cost: int = 1) -> Decision:
        raise TypeError("RedisRateLimiter decisions are awaited: use check_async()")

    async def check_async(self, identity: bytes, rpm: float, burst: int, cost: int = 1) -> Decision:
        refused = self._refused.get(identity)
        if refused is not None:
            # A local first tier for refusals only: until `retry_at` the bucket cannot hold
            # `cost` tokens (it only refills), so asking Redis again would change nothing.
            now = self._clock()
            retry_at, reset_at, refused_cost = refused
            if now < retry_at and cost >= refused_cost:
                return Decision(False, burst, 0, retry_at - now, max(0.0, reset_at - now))
            del self._refused[identity]
        reply = await self._run(identity, rpm / 60.0, burst, cost, "take")
        if isinstance(reply, str):
            return failure_decision(reply, self._policy, burst)
        allowed, remaining, retry_after, reset_after = reply
        decision = Decision(
            bool(allowed), burst, max(0, int(remaining)), float(retry_after), float(reset_after)
        )
        if not allowed:
            if len(self._refused) >= 65_536:
                self._refused.clear()
            now = self._clock()
            self._refused[identity] = (now + decision.retry_after, now + decision.reset_after, cost)
        return decision

    async def adjust_async(self, identity: bytes, rpm: float, burst: int, refund: float) -> None:
        """Settle a reservation (give back ``refund`` tokens, take when negative). Best effort."""
        self._refused.pop(identity, None)  # a refund may make a refused cost fit sooner
        if refund:
            await self._run(identity, rpm / 60.0, burst, refund, "adjust")

    def adjust(self, identity: bytes, rpm: float, burst: int, refund: float) -> None:
        """Schedule ``adjust_async`` on the running loop (for callers that cannot await)."""
        task = asyncio.get_running_loop().create_task(
            self.adjust_async(identity, rpm, burst, refund)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self, identity: bytes, rate_per_s: float, burst: int, cost: float, mode: str
    ) -> Any:
        """The script's reply, or the failure reason (a str) when Redis could not answer."""
        backoff = self._backoff
        if backoff.retry_at is not None and not backoff.try_probe():
            return REDIS_BACKOFF  # one probe at a time while backing off
        key = self.key_for(identity)
        args = (repr(rate_per_s), burst, _number(cost), mode)
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._eval(key, args)
        except TimeoutError:
            return self._failed(REDIS_TIMEOUT)
        except Exception as exc:
            return self._failed(_reason(exc))
        finally:
            backoff.end_probe()
        if backoff.retry_at is not None:
            backoff.succeeded()
        return reply

    async def _eval(self, key: str, args: tuple[Any, ...]) -> Any:
        from redis.exceptions import NoScriptError

        connections = self._connections
        if connections is None:
            raise ConnectionError("the Redis pool is not open")
        try:
            return await connections.call("EVALSHA", SCRIPT_SHA, 1, key, *args)
        except NoScriptError:
            # Redis restarted or SCRIPT FLUSH: EVAL runs the script and caches it again.
            return await connections.call("EVAL", BUCKET_SCRIPT, 1, key, *args)

    def _failed(self, reason: str) -> str:
        self._backoff.failed()
        return reason

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        client, self._client = self._client, None
        connections, self._connections = self._connections, None
        await close_pool(client, connections)

    def close(self) -> None:
        """Nothing synchronous to release; the pool closes in ``aclose``."""


class Connections:
    """redis-py connections (hiredis parser) of the client's pool, used straight: a decision
    takes an idle one, sends one command (packed by ``pack_command``), reads one reply and
    puts it back.

    Measured against ``Redis.evalsha`` through redis-py's pool, this saves about 40 % of the
    CPU a decision costs in the worker (the pool's lock, per-checkout health probe, retry
    wrapper and metrics recorder; see bench/bench_limiter.py --redis). A connection whose
    exchange was interrupted (a timeout cancels it, a socket error) may still have a reply
    coming, so it is closed, never reused; an error *reply* leaves it in step and it is kept.
    A socket error closes every idle connection too: they went to the same server.
    At most ``limit`` exchanges are in flight per worker; more wait (within the timeout).
    """

    __slots__ = ("_idle", "_pool", "_slots")

    def __init__(self, pool: Any, limit: int = 64) -> None:
        self._pool = pool
        self._idle: list[Any] = []
        self._slots = asyncio.Semaphore(limit)

    async def call(self, *args: Any) -> Any:
        from redis.exceptions import ResponseError

        async with self._slots:
            idle = self._idle
            conn = idle.pop() if idle else self._pool.make_connection()
            try:
                if not conn.is_connected:
                    await conn.connect()
                await conn.send_packed_command(pack_command(*args), check_health=False)
                reply = await conn.read_response()
            except ResponseError:
                idle.append(conn)  # a complete error reply: the connection is in step
                raise
            except BaseException as exc:
                await conn.disconnect(nowait=True)
                if not isinstance(exc, asyncio.CancelledError | TimeoutError):
                    # The server went away (a restart, say): the idle connections are as
                    # dead as this one, and each would cost a failed decision to find out.
                    await self.aclose()
                raise
            idle.append(conn)
            return reply

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect(nowait=True)


async def close_pool(client: Any, connections: Connections | None) -> None:
    """Close a worker's Redis connections (`connections`' idle ones), then its client."""
    if connections is not None:
        await connections.aclose()
    if client is not None:
        await client.aclose()


def pack_command(*args: str | int | bytes) -> bytes:
    """One command in RESP, as redis-py's ``pack_command`` writes it (tests compare the two),
    without its encoder's per-argument dispatch: a third of a decision's time under cProfile,
    about 10 of 60 µs of worker CPU measured."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _reason(exc: BaseException) -> str:
    from redis import exceptions as rex

    if isinstance(exc, rex.BusyLoadingError):
        return REDIS_LOADING
    if isinstance(exc, rex.TimeoutError):
        return REDIS_TIMEOUT
    if isinstance(exc, rex.ConnectionError | ConnectionError | OSError):
        return REDIS_UNAVAILABLE
    return REDIS_ERROR
