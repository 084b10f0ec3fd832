"""The response cache as the request pipeline sees it: look a request up, wait for an identical
one in flight, store a fresh answer.

Theory of operation
-------------------
The pipeline (edge.pipeline) asks `ResponseCache.lookup` before any token is reserved, since a
hit costs none. The lookup reads the request's controls and key (edge.cache.key), then:

1. the local store (edge.cache.local: LMDB, one per host, every worker maps it; a read takes
   no lock), then, with CACHE_BACKEND=redis, Redis (edge.cache.remote; an answer found there is
   copied into the local store). An entry is served while it is fresh (`expires`) and younger
   than the request's `max-age`;
2. on a miss, the host-wide table of requests in flight (edge.cache.flights): the first
   request for a key leads and goes upstream; an identical request arriving meanwhile, in any
   worker, follows: it polls the local store (a lock-free read, every few milliseconds, backing
   off to 50 ms) until the leader's answer is there, or the leader is gone (finished without a
   storable answer, or its worker died), or the request's deadline (SERVER_TIMEOUT_SECONDS)
   passed; then it goes upstream itself. A follower of a stream waits for the whole stream and
   replays it (it does not follow the leader's events as they arrive);
3. after the exchange the pipeline calls `store` with a complete 200 answer, or the stream's
   events when it reached its terminal event, and `done`, which ends the leadership.

Only what a client may be given again is stored: a 200 read to its end, or a stream that
reached its terminal event (`[DONE]`, `message_stop`, `response.completed`), each at most
CACHE_MAX_ENTRY_BYTES; never an error, a stream cut short, nor a request the Responses API
keeps state for (edge.cache.key).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from edge.cache import entry as entries
from edge.cache import key as keys
from edge.cache.flights import FOLLOWER, LEADER
from edge.errors import GatewayTimeout
from edge.routing.outcome import UpstreamOutcome

if TYPE_CHECKING:
    from edge.config import Config
    from edge.observability.context import RequestContext
    from edge.routing.exchange import Call
    from edge.routing.providers import Providers

log = logging.getLogger("edge.cache")

# The upstream paths whose answers are cached (moderations are not: cheap, and policy-bound).
CACHED_PATHS = frozenset(
    ("/chat/completions", "/completions", "/embeddings", "/responses", "/messages")
)
HIT, MISS, BYPASS, COALESCED, ERROR = "hit", "miss", "bypass", "coalesced", "error"
SERVED = frozenset((HIT, COALESCED))  # results answered from the cache
SSE = "text/event-stream"
POLL_FIRST_S = 0.002
FOLLOW_STREAM_S = 5.0  # the longest a stream follows a leader (nginx's proxy_cache_lock_timeout)
MAX_TOKENS = (1 << 63) - 1
POLL_MAX_S = 0.05
# The SSE events after which a stream is whole: chat and completions, Anthropic's Messages,
# the Responses API.
_TERMINAL = frozenset((b"data:[DONE]", b"event:message_stop", b"event:response.completed"))
_TERMINAL_TYPE = re.compile(rb'"type"\s*:\s*"(?:message_stop|response\.completed)"')


@dataclass(slots=True)
class Lookup:
    """One request's dealings with the cache."""

    result: str  # HIT, MISS, BYPASS, COALESCED or ERROR (a miss the store or Redis failed)
    key: bytes | None = None
    entry: entries.Entry | None = None  # the stored answer, on HIT or COALESCED
    tier: str = "none"  # where a hit came from: "local" or "redis"
    store: bool = False  # whether a fresh answer may be stored
    ttl_s: float = 0.0
    token: int = 0  # this request's leadership in the flights table (0: none)
    stored: bool = False  # its answer was handed to the store

    @property
    def header(self) -> str:
        """The x-cache header: hit (a coalesced answer too), miss or bypass."""
        if self.result in SERVED:
            return "hit"
        return "bypass" if self.result == BYPASS else "miss"


class ResponseCache:
    """One worker's view of the cache: the local store, Redis behind it, the flights table."""

    def __init__(
        self,
        config: Config,
        providers: Providers,
        store: Any,
        flights: Any,
        remote: Any = None,
        metrics: Any = None,
        clock: Any = time.time,
    ) -> None:
        self._providers = providers
        self._store = store  # edge.cache.local.LocalStore
        self._flights = flights  # edge.cache.flights.Flights (or LocalFlights)
        self._remote = remote  # edge.cache.remote.RedisTier, with CACHE_BACKEND=redis
        self._scoped = config.cache_scope == "key"
        self._ttl_s = config.cache_ttl_s
        self._wait_s = config.timeout_s
        self.max_entry_bytes = config.cache_max_entry_bytes
        self._metrics = metrics
        self._routes: dict[int, str] = {}  # id of a model's targets (kept by the providers)
        self._clock = clock
        self._evictions_seen = 0
        self._writes: list[tuple[bytes, bytes]] = []  # for the local store, this loop turn
        self._flush_scheduled = False
        self._releases: list[tuple[bytes, int]] = []  # leaderships ending after those writes

    # ------------------------------------------------------------------ lookup

    def applies(self, call: Call) -> bool:
        return call.path in CACHED_PATHS and call.method == "POST"

    def _route(self, call: Call) -> str:
        """What besides the body decides the answer: the route, the headers passed upstream
        (Anthropic's version and beta), and where the model is routed (a reload that sends it
        to another provider or upstream model makes its answers another key's)."""
        targets = self._providers.targets(call.model or "")
        routed = self._routes.get(id(targets))
        if routed is None:
            where = [(t.provider.name, t.provider.kind, t.model) for t in targets or ()]
            routed = self._routes[id(targets)] = orjson.dumps(where).decode()
        route = f"{call.api} {call.path} {routed}"
        if call.headers:
            route += " " + orjson.dumps(call.headers, option=orjson.OPT_SORT_KEYS).decode()
        return route

    async def lookup(self, ctx: RequestContext, call: Call, header: str | None) -> Lookup:
        """The request's lookup (module docstring). Takes the body's `cache` controls out of
        `call.data` (the caller re-writes the body); 400 when they are malformed."""
        found = await self._lookup(ctx, call, header)
        if self._metrics is not None and ctx.route is not None:
            self._metrics.cache_lookup(ctx.route.template, found.result, found.tier)
        return found

    async def _lookup(self, ctx: RequestContext, call: Call, header: str | None) -> Lookup:
        data = call.data
        assert data is not None
        controls = keys.controls(header, data)
        rule = self._providers.cache_rule(call.model or "")
        if rule is not None and not rule.enabled:
            return Lookup(BYPASS)
        if not (controls.lookup or controls.store):
            return Lookup(BYPASS)
        scope = ""
        if self._scoped:  # the key itself (its digest), never a name another key may take
            entry = ctx.key
            scope = "addr:" + (ctx.client or "unknown") if entry is None else entry.digest.hex()
        key = keys.cache_key(scope, self._route(call), controls.namespace, data)
        if key is None:
            return Lookup(BYPASS)
        ttl = self._ttl_s if rule is None or rule.ttl_s is None else rule.ttl_s
        if controls.ttl_s is not None:
            ttl = min(ttl, controls.ttl_s)  # a client may shorten the operator's TTL, never extend
        if not controls.lookup:  # no-cache: a fresh answer, stored for the next
            return Lookup(BYPASS, key, store=True, ttl_s=ttl)
        found, tier, failed = await self._get(key, controls.max_age_s)
        if found is not None:
            return Lookup(HIT, key, found, tier)
        miss = Lookup(ERROR if failed else MISS, key, store=controls.store, ttl_s=ttl)
        if not controls.store:
            return miss
        role, token = self._flights.claim(key)
        if role == LEADER:
            miss.token = token
        elif role == FOLLOWER:
            started = time.monotonic()
            # A stream's leader stores it only once its own client has read all of it, which a
            # slow reader can make last: its followers wait a short while only.
            wait = min(self._wait_s, FOLLOW_STREAM_S) if call.stream else self._wait_s
            found = await self._follow(key, controls.max_age_s, started + wait)
            waited = time.monotonic() - started
            if found is not None:
                # The wait was on the upstream, through the leader: not the gateway's overhead.
                outcome = UpstreamOutcome()
                outcome.waited(waited)
                ctx.record_upstream(outcome)
                return Lookup(COALESCED, key, found, "local")
            # Upstream itself, within what is left of the request's deadline.
            if waited >= self._wait_s:
                raise GatewayTimeout("The upstream did not answer an identical request in time.")
            call.deadline = started + self._wait_s
        return miss

    async def _get(
        self, key: bytes, max_age_s: float | None
    ) -> tuple[entries.Entry | None, str, bool]:
        """(a servable entry, its tier, whether a tier failed)."""
        found = self._local(key, max_age_s)
        if found is not None:
            return found, "local", False
        if self._remote is None:
            return None, "none", False
        value, failure = await self._remote.get(key)
        if value is None:
            return None, "none", failure is not None
        found = self._servable(entries.decode(value), max_age_s)
        if found is None:
            return None, "none", False
        self._put_local(key, value)
        return found, "redis", False

    def _local(self, key: bytes, max_age_s: float | None) -> entries.Entry | None:
        try:
            value = self._store.get(key)
        except Exception:  # a store that broke under us is a miss, never an error
            log.exception("cache store read failed")
            return None
        if value is None:
            return None
        return self._servable(entries.decode(value), max_age_s)

    def _servable(
        self, found: entries.Entry | None, max_age_s: float | None
    ) -> entries.Entry | None:
        if found is None:
            return None
        now = self._clock()
        if found.expires <= now:
            return None
        if max_age_s is not None and now - found.created > max_age_s:
            return None
        return found

    async def _follow(
        self, key: bytes, max_age_s: float | None, deadline: float
    ) -> entries.Entry | None:
        """Wait for the leader's answer until `deadline` (module docstring, 2.); None: go
        upstream."""
        pause = POLL_FIRST_S
        flights = self._flights
        while time.monotonic() < deadline:
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, POLL_MAX_S)
            found = self._local(key, max_age_s)
            if found is not None:
                return found
            if not flights.leading(key):
                return self._local(key, max_age_s)  # stored just before the leader let go
        return None

    # ------------------------------------------------------------------ storing

    def store(self, lookup: Lookup, fresh: entries.Entry) -> None:
        """Store a complete answer under the lookup's key (if the lookup allows it and it
        fits). Never raises: an answer the entry format cannot hold (a content type that is not
        printable ASCII, say) is answered all the same, and not stored."""
        if not lookup.store or lookup.key is None:
            return
        if entries.body_size(fresh) > self.max_entry_bytes:
            return
        fresh.expires = fresh.created + lookup.ttl_s
        try:
            value = entries.encode(fresh)
        except (ValueError, OverflowError):
            log.warning("an answer the cache cannot hold was not stored")
            return
        self._put_local(lookup.key, value)
        lookup.stored = True
        if self._remote is not None:
            self._remote.put(lookup.key, value, lookup.ttl_s)

    def _put_local(self, key: bytes, value: bytes) -> None:
        """Queue a write to the local store: the writes of one turn of the event loop go in
        one LMDB write transaction (`_flush`, called soon), as a transaction costs most of a
        write and all workers queue for LMDB's one writer."""
        if not self._flush_scheduled:
            asyncio.get_running_loop().call_soon(self._flush)
            self._flush_scheduled = True
        self._writes.append((key, value))

    def _flush(self) -> None:
        """Write the queued answers, then end the leaderships that waited for them."""
        self._flush_scheduled = False
        writes, self._writes = self._writes, []
        releases, self._releases = self._releases, []
        store = self._store
        try:
            if writes:
                store.put_many(writes)
        except Exception:
            log.exception("cache store write failed")
        for key, token in releases:
            try:
                self._flights.release(key, token)
            except Exception:  # a bug; the claim goes stale with its age or its process
                log.exception("cache leadership release failed")
        evicted = store.evictions - self._evictions_seen
        if evicted:
            self._evictions_seen = store.evictions
            if self._metrics is not None:
                self._metrics.cache_evictions.inc(evicted)

    def recorder(
        self, lookup: Lookup, ctx: RequestContext
    ) -> Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]:
        """A wrapper of a stream's events, as the client gets them, that stores them once the
        stream has ended whole with its terminal event (not past CACHE_MAX_ENTRY_BYTES)."""

        async def recorded(source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            blocks: list[bytes] | None = []
            size = 0
            limit = self.max_entry_bytes
            async for block in source:
                if blocks is not None:
                    size += len(block)
                    if size > limit:
                        blocks = None  # too large to store: relayed all the same
                    else:
                        blocks.append(block)
                yield block
            # Here only when the source ended of itself (not a client hanging up).
            whole = ctx.upstream is None or ctx.upstream.error is None
            if blocks and whole and terminal(blocks[-1]):
                self.store(lookup, self.new_entry(SSE, True, blocks, ctx))

        return recorded

    def done(self, lookup: Lookup) -> None:
        """End the lookup's leadership (followers then read the store, or go upstream): once
        its answer is written, when it stored one."""
        token, lookup.token = lookup.token, 0
        if not token or lookup.key is None:
            return
        if lookup.stored and self._writes:
            self._releases.append((lookup.key, token))  # after the queued write (`_flush`)
        else:
            self._flights.release(lookup.key, token)

    def new_entry(
        self, content_type: str, stream: bool, blocks: list[bytes], ctx: RequestContext
    ) -> entries.Entry:
        return entries.Entry(
            created=self._clock(),
            expires=0.0,
            status=200,
            content_type=content_type,
            stream=stream,
            blocks=blocks,
            prompt_tokens=_count(ctx.prompt_tokens),
            completion_tokens=_count(ctx.completion_tokens),
        )

    def age(self, found: entries.Entry) -> int:
        return max(0, int(self._clock() - found.created))

    # ------------------------------------------------------------------ lifecycle, metrics

    async def start(self) -> None:
        if self._remote is not None:
            await self._remote.start()

    async def aclose(self) -> None:
        """Lifespan shutdown: Redis's writes in flight and connections. The store and the
        flights table stay open until the process ends (a test client runs the lifespan
        around every request; LMDB's committed writes are in the file, closed or not)."""
        self._flush()  # what this loop turn queued
        if self._remote is not None:
            await self._remote.aclose()

    def stats(self) -> tuple[int, int]:
        """(bytes, entries) of the host's local store."""
        return self._store.stats()


def _count(tokens: int | None) -> int:
    """A reported token count as stored: what an upstream reports is not to be trusted."""
    return 0 if tokens is None else max(0, min(tokens, MAX_TOKENS))


def terminal(block: bytes) -> bool:
    """Whether the last event of a block (the last block a stream relayed) is a terminal
    event: a line `data: [DONE]`, `event: message_stop` or `event: response.completed`, or a
    data line of one of those types (an upstream that writes no `event:` lines)."""
    end = block.rstrip()
    start = max(end.rfind(b"\n\n"), end.rfind(b"\r\n\r\n"))
    for line in end[start + 1 :].splitlines():
        line = line.strip()
        if line.replace(b": ", b":", 1) in _TERMINAL:
            return True
        if line.startswith(b"data:") and _TERMINAL_TYPE.search(line) is not None:
            return True
    return False


class LocalFlights:
    """The flights table of a single process (no gunicorn master: a test, `create_app` alone)."""

    def __init__(self) -> None:
        self._leaders: dict[bytes, int] = {}
        self._next = 0

    def claim(self, key: bytes) -> tuple[int, int]:
        if key in self._leaders:
            return FOLLOWER, 0
        self._next += 1
        self._leaders[key] = self._next
        return LEADER, self._next

    def release(self, key: bytes, token: int) -> None:
        if self._leaders.get(key) == token:
            del self._leaders[key]

    def leading(self, key: bytes) -> bool:
        return key in self._leaders

    def close(self) -> None:
        self._leaders.clear()
