"""Spend per key in Redis (or Valkey), with `RATE_LIMIT_BACKEND=redis`: one record per key and
period, shared by every host, so a budget holds across hosts.

A record is the hash `<prefix>u:<digest of the identity>:<kind>:<period start>` with the fields
`name` (the identity: a key name, or `key-…`), `spent` (nano-USD), `requests`, `prompt`,
`completion` and `end`, kept 400 days (`llm-edge-proxy usage` reads them). Like the rate
limiter's, Redis key names hold digests only.
Admission is one script call (`ADMIT`: below the budget, take the reservation), the end of a
request another (`SETTLE`), each bounded by the Redis timeout; a failure is reported to the
caller (None / False), whose failure policy decides. The connections are edge.ratelimit.redis's.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any, Final

from edge.budgets.ledger import Row
from edge.budgets.periods import PERIODS
from edge.ratelimit.redis import Connections, close_pool

KEEP_S: Final = 400 * 86_400

# KEYS[1]: the record. ARGV: budget, reservation, seconds to keep, the period's end, the name.
ADMIT: Final = """
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
if spent >= tonumber(ARGV[1]) then return {0, tostring(spent)} end
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2])
redis.call('HSET', KEYS[1], 'end', ARGV[4], 'name', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, tostring(spent)}
"""
# ARGV: spent change, requests, prompt, completion, seconds to keep, the period's end, the name.
SETTLE: Final = """
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'requests', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'prompt', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'completion', ARGV[4])
redis.call('HSET', KEYS[1], 'end', ARGV[6], 'name', ARGV[7])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (ADMIT, SETTLE)}


def record_key(prefix: str, name: str, kind: str, start: int) -> str:
    digest = hashlib.blake2b(name.encode(), digest_size=16, person=b"edge-usage").hexdigest()
    return f"{prefix}u:{digest}:{kind}:{start}"


class RedisLedger:
    """The ledger's two operations against Redis (awaited: `asynchronous`)."""

    asynchronous: Final = True

    def __init__(
        self,
        client_factory: Callable[[], Any],
        prefix: str = "llm-edge-proxy:",
        timeout_s: float = 0.05,
    ) -> None:
        self._client_factory = client_factory
        self._client: Any = None
        self._connections: Connections | None = None
        self._prefix = prefix
        self._timeout_s = timeout_s

    async def start(self) -> None:
        if self._client is None:
            self._client = self._client_factory()
            self._connections = Connections(self._client.connection_pool)

    async def admit(
        self, name: str, kind: str, start: int, end: int, budget: int, reserve: int
    ) -> tuple[bool, int] | None:
        key = record_key(self._prefix, name, kind, start)
        reply = await self._run(ADMIT, key, budget, reserve, KEEP_S, end, name)
        if reply is None:
            return None
        admitted, spent = reply
        return bool(int(admitted)), int(float(spent))

    async def settle(
        self,
        name: str,
        kind: str,
        start: int,
        end: int,
        spent: int,
        prompt: int,
        completion: int,
        requests: int = 1,
    ) -> bool:
        key = record_key(self._prefix, name, kind, start)
        reply = await self._run(SETTLE, key, spent, requests, max(prompt, 0),
                                max(completion, 0), KEEP_S, end, name)  # fmt: skip
        return reply is not None

    async def _run(self, script: str, key: str, *args: Any) -> Any:
        from redis.exceptions import NoScriptError

        connections = self._connections
        if connections is None:
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                try:
                    return await connections.call("EVALSHA", _SHA[script], 1, key, *args)
                except NoScriptError:
                    return await connections.call("EVAL", script, 1, key, *args)
        except Exception:
            return None

    def snapshot(self, now: float, every_s: float) -> None:
        return None

    async def aclose(self) -> None:
        client, self._client = self._client, None
        connections, self._connections = self._connections, None
        await close_pool(client, connections)


def read_rows(client: Any, prefix: str) -> list[Row]:
    """Every record (a synchronous redis-py client: `llm-edge-proxy usage`)."""
    rows = []
    for raw in client.scan_iter(match=f"{prefix}u:*", count=1000):
        key = raw.decode() if isinstance(raw, bytes) else raw
        parts = key[len(prefix) + 2 :].split(":")
        if len(parts) != 3:
            continue
        _, kind, start = parts
        fields = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in client.hgetall(key).items()
        }
        name = fields.get("name", "")
        if not name or kind not in PERIODS or not start.isdigit():
            continue

        def number(field: str, fields: dict[str, str] = fields) -> int:
            try:
                return int(float(fields.get(field, 0)))
            except ValueError:
                return 0

        rows.append(
            Row(name, kind, int(start), number("end"), number("spent"), number("requests"),
                number("prompt"), number("completion"))
        )  # fmt: skip
    return rows
