"""Prometheus metrics in multiprocess mode.

`PROMETHEUS_MULTIPROC_DIR` is set by gunicorn.conf.py before anything imports prometheus_client,
so each worker's values go to files in that directory and `/metrics` (any worker) sums them.
This module imports prometheus_client lazily, inside `Metrics.__init__`, so importing `edge`
never fixes the value mode too early.

Labels are bounded by construction: routes are the templates of the matched routes (or
"unmatched"; see edge.endpoints.routes), methods are the standard ones (anything else: "other"),
statuses are numbers, models are capped at MAX_MODEL_LABELS per worker with the rest counted as
"other", `key` is a key's identity from the key store (a name from the keys file, or the short
id of an API_KEYS/API_KEY_HASHES key: edge.auth.short_id) or "none". No key, digest, raw path
or invented method is ever a label.

Theory of operation of the hot path. prometheus_client's multiprocess value takes a lock and
calls `getpid()` on every `inc`/`observe` (to notice a fork), and a histogram observation walks
its buckets in Python: about 2-3 µs a call, some 14 calls a request. A worker is one thread on
one event loop, so neither the lock nor the per-call fork check buys anything. Here each label
child is resolved once into `_Slot`s: a slot is one (value, timestamp) pair at a fixed offset of
the worker's own prometheus_client mmap file, and an increment is one slice assignment into the
mmap. The file format is prometheus_client's own (written through its `MmapedDict`), so scrapes,
`mark_process_dead` and anything reading the files with `MmapedDict` see the same bytes as
before, at once: counts stay exact across workers. The fork check happens once, in an
`os.register_at_fork` hook that re-resolves every slot in the child.

This relies on prometheus_client internals (`MmapedValue._file/_key/_value`, `MmapedDict._m`
and `._positions`, `Histogram._sum/_buckets/_upper_bounds`); pyproject.toml pins the versions
tested and tests/unit/test_metrics_fast_path.py fails loudly if they move.
"""

from __future__ import annotations

import functools
import glob
import os
import platform
import struct
import weakref
from bisect import bisect_left
from typing import Any, Literal

from edge import __version__

MAX_MODEL_LABELS = 32
# Resolved (model, key) children of the token families kept for the hot path; past this the
# cache starts again (the label values stay bounded by configuration, the cache by this).
MAX_TOKEN_CHILDREN = 4096
NO_KEY = "none"  # the `key` label of a request without a key (auth off, a public route)
# The `method` label's values besides "other": gunicorn's ASGI worker (HTTP2_ENABLED=true)
# passes any token through as a method.
METHOD_LABELS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
)  # fmt: skip
SIZE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)


_pack_into = struct.Struct("dd").pack_into  # (value, timestamp), prometheus_client's layout


class _Slot:
    """One value of this worker's mmap file, written in place: no lock, no getpid.

    `mv` is prometheus_client's MmapedValue for the value; its `_value` is kept current, so
    the public API (`.get()`, a later `.inc()`) agrees with what was written.
    """

    __slots__ = ("_file", "_mv", "_pos")

    def __init__(self, mv: Any) -> None:
        self._mv = mv
        self._file = mv._file
        self._file.read_value(mv._key)  # creates the entry if it is new
        self._pos = self._file._positions[mv._key]

    def inc(self, amount: float = 1.0) -> None:
        mv = self._mv
        value = mv._value = mv._value + amount
        # One 16-byte store straight into the map, as MmapedDict.write_value's slice
        # assignment does (never a torn 0 for a reader), without building a bytes object.
        # `_m` is looked up each time: the dict remaps its file when it grows.
        _pack_into(self._file._m, self._pos, value, 0.0)

    def dec(self, amount: float = 1.0) -> None:
        mv = self._mv
        value = mv._value = mv._value - amount
        _pack_into(self._file._m, self._pos, value, 0.0)


class _LockedSlot:
    """Single-process mode (no PROMETHEUS_MULTIPROC_DIR: tests, plain uvicorn): the public API."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def inc(self, amount: float = 1.0) -> None:
        self._value.inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._value.inc(-amount)


def _slot(value: Any) -> _Slot | _LockedSlot:
    return _Slot(value) if getattr(value, "_multiprocess", False) else _LockedSlot(value)


class _HistogramSlots:
    """A histogram child as slots of one mmap file: an observation is two writes (the sum and
    one bucket), done here directly rather than through two `_Slot.inc` calls."""

    __slots__ = ("_bounds", "_bucket_mvs", "_bucket_pos", "_file", "_sum_mv", "_sum_pos")

    def __init__(self, child: Any) -> None:
        self._bounds = list(child._upper_bounds)  # ascending, +Inf last
        buckets = [_Slot(bucket) for bucket in child._buckets]
        total = _Slot(child._sum)
        if len(self._bounds) != len(buckets) or any(b._file is not total._file for b in buckets):
            raise RuntimeError("prometheus_client Histogram internals changed")
        self._file = total._file
        self._sum_mv, self._sum_pos = total._mv, total._pos
        self._bucket_mvs = [bucket._mv for bucket in buckets]
        self._bucket_pos = [bucket._pos for bucket in buckets]

    def observe(self, amount: float) -> None:
        m = self._file._m  # looked up each time: the dict remaps its file when it grows
        mv = self._sum_mv
        value = mv._value = mv._value + amount
        _pack_into(m, self._sum_pos, value, 0.0)
        # The first bucket whose upper bound is >= amount, as Histogram.observe picks it.
        index = bisect_left(self._bounds, amount)
        mv = self._bucket_mvs[index]
        value = mv._value = mv._value + 1.0
        _pack_into(m, self._bucket_pos[index], value, 0.0)


class _LockedHistogram:
    """Single-process mode: the public API."""

    __slots__ = ("observe",)

    def __init__(self, child: Any) -> None:
        self.observe = child.observe


def _fast(family: Any, labels: tuple[str, ...]) -> Any:
    """The slots of one label child of a Counter, Gauge or Histogram."""
    child = family.labels(*labels) if labels else family
    if hasattr(child, "_upper_bounds"):
        if getattr(child._sum, "_multiprocess", False):
            return _HistogramSlots(child)
        return _LockedHistogram(child)
    return _slot(child._value)


class _RouteSlots:
    """Everything a finished request on one route writes, resolved once per route: its
    duration, overhead and request-size histograms, and its request counter per (method,
    status), so the hot path does one lookup per route instead of one per metric."""

    __slots__ = ("counts", "duration", "overhead", "size")

    def __init__(self, duration: Any, overhead: Any, size: Any) -> None:
        self.duration = duration
        self.overhead = overhead
        self.size = size
        self.counts: dict[tuple[str, int], Any] = {}


class Metrics:
    """The metric families of one worker, with label children cached for the hot path.

    `directory` is the multiprocess directory (PROMETHEUS_MULTIPROC_DIR, chosen by the master)
    that a scrape sums; None in a single process (tests, plain uvicorn)."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        cache: bool = False,
        tracing: bool = False,
        cost: bool = False,
    ) -> None:
        """`cache`: the response cache is on, and its families exist (a gauge's file appears
        in the multiprocess directory as soon as the family does); `tracing`: spans are
        exported, and their counter exists; `cost`: some target has prices, and the cost
        counter exists."""
        self.directory = None if directory is None else os.fspath(directory)
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # A private registry: several apps in one test process must not collide. In
        # multiprocess mode the values live in files whatever registry holds the families.
        self.registry = registry = CollectorRegistry()

        def counter(name: str, meaning: str, *labels: str) -> Any:
            return Counter(name, meaning, labels, namespace="edge", registry=registry)

        def histogram(
            name: str, meaning: str, *labels: str, buckets: tuple[float, ...] = LATENCY_BUCKETS
        ) -> Any:
            return Histogram(
                name, meaning, labels, namespace="edge", buckets=buckets, registry=registry
            )

        def gauge(
            name: str,
            meaning: str,
            mode: Literal["livesum", "mostrecent", "max"],
            *labels: str,
        ) -> Any:
            return Gauge(
                name, meaning, labels, namespace="edge", multiprocess_mode=mode, registry=registry
            )

        self.requests = counter(
            "requests", "HTTP requests answered, by route template, method and status.",
            "route", "method", "status",
        )  # fmt: skip
        self.duration = histogram(
            "request_duration_seconds", "Time from request head to last response byte.", "route"
        )
        self.overhead = histogram(
            "overhead_seconds", "The proxy's own time: total minus time waiting on the upstream.",
            "route", buckets=OVERHEAD_BUCKETS,
        )  # fmt: skip
        self.request_size = histogram(
            "request_size_bytes", "Request body sizes of proxied requests.", "route",
            buckets=SIZE_BUCKETS,
        )  # fmt: skip
        self._in_flight_family = gauge(
            "requests_in_flight", "Requests being handled now, all workers.", "livesum"
        )
        self.auth_failures = counter(
            "auth_failures", "Requests refused by authentication, by reason.", "reason"
        )
        self._rate_limited_family = counter("rate_limited", "Requests refused by the rate limiter.")
        self.limiter_events = counter(
            "rate_limiter_failures",
            "Limiter decisions taken by the failure policy (lock timeout, table full, redis_*; "
            "parallel_*: the count of requests in flight per key).",
            "event", "policy",
        )  # fmt: skip
        self._parallel_limited_family = counter(
            "parallel_limited",
            "Requests refused because their key had its max_parallel requests in flight.",
        )
        self.upstream_requests = counter(
            "upstream_requests", "Upstream exchanges by outcome (2xx, 4xx, 5xx, error).",
            "outcome",
        )  # fmt: skip
        self.upstream_errors = counter(
            "upstream_errors",
            "Upstream failures by kind (timeout, connect, disconnect, invalid, auth, 5xx; busy "
            "and overloaded: the gateway's own connection and buffer limits).",
            "kind",
        )  # fmt: skip
        self._upstream_duration_family = histogram(
            "upstream_duration_seconds", "Time waiting on the upstream per exchange."
        )
        self._ttft_family = histogram(
            "stream_time_to_first_token_seconds", "Time from request to the first streamed chunk."
        )
        self._stream_duration_family = histogram(
            "stream_duration_seconds", "Time from request to the end of a streamed response."
        )
        # `key` (here and below): the key's name from the keys file, or the short id of an
        # API_KEYS/API_KEY_HASHES key (edge.auth.short_id): bounded by configuration, never by
        # client input; NO_KEY for a request without a key (auth off, a public route).
        self.tokens = counter(
            "tokens", "Tokens reported in the upstream's usage, by model, kind and key.",
            "model", "kind", "key",
        )  # fmt: skip
        if cost:
            self.cost = counter(
                "cost_usd",
                "USD of the usage providers reported, at PROVIDERS_FILE's prices, by key.",
                "key",
            )
        self.cache_source: Any = None  # callable: (bytes, entries) of the store, set by the app
        self.cache_saved_usd: Any = None  # with the cache on and some target priced
        if cache:
            # The response cache (edge.cache): a hit's tokens are counted here, not in `tokens`
            # (which is what the upstream reported, and billed).
            self.cache_saved_tokens = counter(
                "cache_saved_tokens",
                "Tokens of answers served from the cache, by model, kind and key.",
                "model", "kind", "key",
            )  # fmt: skip
            if cost:
                # What a hit would have cost (`hit_price`); the hit itself costs 0 and adds
                # nothing to `cost`.
                self.cache_saved_usd = counter(
                    "cache_saved_usd",
                    "USD not paid for answers served from the cache (their stored usage at the "
                    "model's first priced target's prices), by key.",
                    "key",
                )
            self.cache_lookups = counter(
                "cache_lookups",
                "Cache lookups by route and result (hit, miss, bypass, coalesced, error) and the "
                "tier of a hit (local, redis; none otherwise).",
                "route", "result", "tier",
            )  # fmt: skip
            self.cache_evictions = counter(
                "cache_evictions", "Entries evicted from the local store to stay within its size."
            )
            # Host-wide values (one store per host): written by the worker answering a scrape.
            self.cache_store_bytes = gauge(
                "cache_store_bytes", "Bytes of the entries in the host's local store.", "mostrecent"
            )
            self.cache_store_entries = gauge(
                "cache_store_entries", "Entries in the host's local store.", "mostrecent"
            )
        if tracing:  # OTLP export (edge.observability.tracing)
            self.trace_spans_family = counter(
                "trace_spans",
                "Spans of sampled requests by result: exported, failed (the collector refused "
                "or could not be reached in time) or dropped (the worker's queue was full).",
                "result",
            )
        # Per provider: label values are configured provider names only (PROVIDERS_FILE, or
        # "default" for UPSTREAM_URL), never anything a client sent.
        self.provider_requests = counter(
            "provider_requests", "Upstream attempts per provider by outcome.",
            "provider", "outcome",
        )  # fmt: skip
        self.provider_retries = counter(
            "provider_retries", "Retries sent to a provider after another attempt failed.",
            "provider",
        )  # fmt: skip
        self.provider_failovers = counter(
            "provider_failovers", "Failed attempts at a provider that moved the request on.",
            "provider",
        )  # fmt: skip
        self.provider_panics = counter(
            "provider_panics",
            "Attempts sent to a provider although its breakers were open: no target of the "
            "model was available (panic routing).",
            "provider",
        )  # fmt: skip
        self.provider_ttfb = histogram(
            "provider_time_to_first_byte_seconds",
            "Time from sending to a provider to its answer (stream: its first event).",
            "provider",
        )  # fmt: skip
        # The breaker state is host-wide (shared memory), not per worker: the worker answering
        # a scrape writes every provider's current state just before rendering, and
        # "mostrecent" reports that newest write (a sum or max over workers' stale copies
        # would be wrong).
        self.breaker_state = gauge(
            "provider_breaker_state", "Breaker per provider: 0 closed, 1 open, 2 half-open.",
            "mostrecent", "provider",
        )  # fmt: skip
        self.breaker_source: Any = None  # callable: {provider: state number}, set by the app
        # callable: the `model` label for a request's model, set by the app where the set of
        # served names is known (PROVIDERS_FILE, the mock); None: the first MAX_MODEL_LABELS
        self.model_label: Any = None
        # callable: model -> the edge.cost.Price a cache hit of it is saved at (None: not
        # priced), set by the app when `cache_saved_usd` exists (edge.routing.providers)
        self.hit_price: Any = None
        build = gauge(
            "build_info", "Build information (value is always 1).", "max", "version", "python"
        )
        build.labels(__version__, platform.python_version()).set(1)
        self._children: dict[tuple[Any, ...], Any] = {}
        # Caches over `_children` for the hot path (cleared with it after a fork).
        self._routes: dict[str, _RouteSlots] = {}
        self._upstream_by_status: dict[int, tuple[Any, ...]] = {}
        # (model label, key) -> (prompt, completion) children of `tokens`, and of
        # `cache_saved_tokens` with the key's `cache_saved_usd` child (None without it)
        self._token_counters: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._saved_counters: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._attempts: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._models: set[str] = set()
        self._bind()
        # The fork check, once per process instead of once per increment: a child re-resolves
        # every slot into its own files (prometheus_client's own check runs in `_bind`).
        ref = weakref.ref(self)

        def rebind() -> None:
            metrics = ref()
            if metrics is not None:
                metrics._bind()

        os.register_at_fork(after_in_child=rebind)

    def _bind(self) -> None:
        """(Re)resolve the label-free slots; label children are resolved on first use."""
        self._children.clear()
        self._routes.clear()
        self._upstream_by_status.clear()
        self._token_counters.clear()
        self._saved_counters.clear()
        self._attempts.clear()
        # Any public read runs prometheus_client's pid check, which reopens the files after a
        # fork; the slots below then point into this process's files.
        self._in_flight_family._value.get()
        self.in_flight = _fast(self._in_flight_family, ())
        self.rate_limited = _fast(self._rate_limited_family, ())
        self.parallel_limited = _fast(self._parallel_limited_family, ())
        self.upstream_duration = _fast(self._upstream_duration_family, ())
        self.ttft = _fast(self._ttft_family, ())
        self.stream_duration = _fast(self._stream_duration_family, ())

    def _child(self, family: Any, *labels: str) -> Any:
        key = (id(family), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _fast(family, labels)
        return child

    def _route(self, route: str) -> _RouteSlots:
        slots = self._routes.get(route)
        if slots is None:
            slots = self._routes[route] = _RouteSlots(
                self._child(self.duration, route),
                self._child(self.overhead, route),
                self._child(self.request_size, route),
            )
        return slots

    def observe_request(
        self, route: str, method: str, status: int, total_s: float, overhead_s: float
    ) -> None:
        slots = self._routes.get(route) or self._route(route)
        counter = slots.counts.get((method, status))
        if counter is None:
            label = method if method in METHOD_LABELS else "other"
            counter = slots.counts[(method, status)] = self._child(
                self.requests, route, label, str(status)
            )
            if len(slots.counts) > 4096:  # invented methods (h2) must not grow it for ever
                slots.counts.clear()
        counter.inc()
        slots.duration.observe(total_s)
        slots.overhead.observe(overhead_s)

    def observe_request_size(self, route: str, size: int) -> None:
        (self._routes.get(route) or self._route(route)).size.observe(size)

    def observe_upstream(self, status: int | None, seconds: float, error: str | None) -> None:
        if error is not None:
            self._child(self.upstream_requests, "error").inc()
            self._child(self.upstream_errors, error).inc()
        elif status is not None:
            counters = self._upstream_by_status.get(status)
            if counters is None:
                counters = self._upstream_by_status[status] = self._upstream_counters(status)
            for counter in counters:
                counter.inc()
        self.upstream_duration.observe(seconds)

    def _upstream_counters(self, status: int) -> tuple[Any, ...]:
        outcome = self._child(self.upstream_requests, f"{status // 100}xx")
        if status >= 500:
            return outcome, self._child(self.upstream_errors, "5xx")
        return (outcome,)

    def observe_tokens(
        self,
        model: str | None,
        prompt: int | None,
        completion: int | None,
        cached: bool = False,
        identity: str | None = None,
    ) -> None:
        """Tokens of an answer to the key `identity` (None: no key): reported by the upstream,
        or (`cached`) served from the cache, with what they would have cost then."""
        if model is None:
            return
        key = identity or NO_KEY
        if self.model_label is not None:
            label = self.model_label(model)
        elif model in self._models:
            label = model
        elif len(self._models) >= MAX_MODEL_LABELS:
            label = "other"
        else:
            self._models.add(model)
            label = model
        if cached:
            self._observe_saved(model, label, key, prompt, completion)
            return
        counters = self._token_counters.get((label, key))
        if counters is None:
            counters = self._token_children(label, key)
        if prompt:
            counters[0].inc(prompt)
        if completion:
            counters[1].inc(completion)

    def _token_children(self, label: str, key: str) -> tuple[Any, Any]:
        if len(self._token_counters) >= MAX_TOKEN_CHILDREN:
            self._token_counters.clear()
        counters = self._token_counters[(label, key)] = (
            self._child(self.tokens, label, "prompt", key),
            self._child(self.tokens, label, "completion", key),
        )
        return counters

    def _observe_saved(
        self, model: str, label: str, key: str, prompt: int | None, completion: int | None
    ) -> None:
        """A cache hit: its tokens, and their price at the model's `hit_price` (looked up by
        the request's model, a value and never a label)."""
        counters = self._saved_counters.get((label, key))
        if counters is None:
            if len(self._saved_counters) >= MAX_TOKEN_CHILDREN:
                self._saved_counters.clear()
            usd = None
            if self.cache_saved_usd is not None and self.hit_price is not None:
                usd = self._child(self.cache_saved_usd, key)
            counters = self._saved_counters[(label, key)] = (
                self._child(self.cache_saved_tokens, label, "prompt", key),
                self._child(self.cache_saved_tokens, label, "completion", key),
                usd,
            )
        if prompt:
            counters[0].inc(prompt)
        if completion:
            counters[1].inc(completion)
        if counters[2] is not None:
            price = self.hit_price(model)
            if price is not None:
                saved = price.cost(prompt or 0, completion or 0)
                if saved > 0:
                    counters[2].inc(saved)

    def provider_attempt(self, provider: str, outcome: str, ttfb_s: float | None) -> None:
        key = (provider, outcome)
        slots = self._attempts.get(key)
        if slots is None:
            slots = self._attempts[key] = (
                self._child(self.provider_requests, provider, outcome),
                self._child(self.provider_ttfb, provider),
            )
        slots[0].inc()
        if ttfb_s is not None:
            slots[1].observe(ttfb_s)

    def provider_event(self, what: str, provider: str) -> None:
        """`what`: retries, failovers or panics."""
        family = {
            "retries": self.provider_retries,
            "failovers": self.provider_failovers,
            "panics": self.provider_panics,
        }[what]
        self._child(family, provider).inc()

    def observe_cost(self, identity: str | None, usd: float) -> None:
        self._child(self.cost, identity or NO_KEY).inc(usd)

    def trace_spans(self, result: str, count: int) -> None:
        self._child(self.trace_spans_family, result).inc(count)

    def cache_lookup(self, route: str, result: str, tier: str) -> None:
        self._child(self.cache_lookups, route, result, tier).inc()

    def auth_failure(self, reason: str) -> None:
        self._child(self.auth_failures, reason).inc()

    def limiter_failure(self, event: str, policy: str) -> None:
        self._child(self.limiter_events, event, policy).inc()

    def render(self) -> tuple[bytes, str]:
        """A scrape. Under gunicorn: a fresh registry summing every worker's files, dead
        workers' included; in a single process (tests, plain uvicorn): this registry."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self.breaker_source is not None:
            for provider, state in self.breaker_source().items():
                # Once per scrape, not per request: the public API (it writes the timestamp
                # `mostrecent` needs; the fast-path slots write values only).
                self.breaker_state.labels(provider).set(state)
        if self.cache_source is not None:
            size, entries = self.cache_source()
            self.cache_store_bytes.set(size)
            self.cache_store_entries.set(entries)
        if self.directory is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        _non_empty_files_collector()(registry, path=self.directory)
        return generate_latest(registry), CONTENT_TYPE_LATEST


@functools.cache
def _non_empty_files_collector() -> Any:
    from prometheus_client.multiprocess import MultiProcessCollector

    class NonEmptyFilesCollector(MultiProcessCollector):
        """MultiProcessCollector that skips empty files: a worker that is starting has created
        its file but not sized it yet, and prometheus_client fails to read such a file. An
        empty file holds no values, so skipping it loses nothing."""

        def collect(self) -> Any:
            files = []
            for path in glob.glob(os.path.join(self._path, "*.db")):
                try:
                    if os.path.getsize(path) > 0:
                        files.append(path)
                except OSError:  # removed since it was listed
                    continue
            return self.merge(files, accumulate=True)

    return NonEmptyFilesCollector
