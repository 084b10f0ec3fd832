"""`Runtime`: what one worker holds, and `Runtime.build`, the one place it is all made.

Everything a worker uses is built here from the one `Config` (and what the master validated:
the keys, the providers, the names of the host-wide tables): the metrics, the rate limiter
(shared memory, Redis, or process-local), the token limiter, the breakers, the router and its
transport. The gunicorn worker builds it after the fork (edge.server.worker), so shared memory
is attached with the worker's own descriptors; what needs the event loop (the upstream pool,
the Redis connections) opens at ASGI lifespan startup and closes at shutdown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from edge.auth import KeyStore
from edge.config import Config
from edge.observability.logs import flush_access_log
from edge.routing.breaker import LocalBreakers, SharedBreakers
from edge.routing.providers import Providers, load_for
from edge.routing.router import Router
from edge.upstream.client import Upstream

log = logging.getLogger("edge.cache")


class HostTables(NamedTuple):
    """The names of the host-wide shared-memory tables the master created (edge.shm)."""

    rate_limit: str
    breakers: str
    flights: str = ""  # the cache's requests in flight (edge.cache.flights); "" without cache
    ledger: str = ""  # the spend per key (edge.budgets.shared); "" with the Redis backend
    parallel: str = ""  # each key's requests in flight (edge.ratelimit.parallel)


class Runtime:
    """What one worker holds open, shared by the middleware and the endpoints."""

    def __init__(
        self,
        config: Config,
        keys: KeyStore,
        router: Router,
        metrics: Any = None,
        limiter: Any = None,
        tokens: Any = None,
        owns_limiter: bool = False,
        cache: Any = None,
        tracing: Any = None,
        accounts: Any = None,
        parallel: Any = None,
    ) -> None:
        self.config = config
        self.keys = keys
        self.router = router
        self.upstream = router.upstream  # the transport's pool; None with the built-in mock only
        self.metrics = metrics  # edge.observability.metrics.Metrics, unless ENABLE_METRICS=false
        self.limiter = limiter  # edge.ratelimit backend, unless RATE_LIMIT_ENABLED=false
        self.tokens = tokens  # edge.ratelimit.tokens.TokenLimiter where a token limit applies
        self._owns_limiter = owns_limiter  # shared memory or Redis: closed at shutdown
        self.cache = cache  # edge.cache.answers.ResponseCache, unless CACHE_BACKEND=off
        self.tracing = tracing  # edge.observability.tracing.Tracing, when spans are exported
        self.accounts = accounts  # edge.budgets.accounts.Accounts, when keys are checked
        # Each key's requests in flight (edge.ratelimit.parallel): host-wide, or this process's.
        if parallel is None:
            from edge.ratelimit.parallel import LocalParallel

            parallel = LocalParallel()
        self.parallel = parallel
        self.started = False

    @classmethod
    def build(
        cls,
        config: Config,
        keys: KeyStore | None = None,
        providers: Providers | None = None,
        tables: HostTables | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Runtime:
        """Every object of one worker. `keys` and `providers` are those the master validated
        (loaded here when None: a test, a single process). `tables` names the host-wide
        tables to attach; without them the rate limiter and the breakers are process-local,
        the limiter's clock being `clock` (tests pass a fake one), and each key's requests
        in flight are counted in this process."""
        if keys is None:
            keys = KeyStore.load(config)
        if providers is None:
            providers = load_for(config)
        metrics = None
        if config.enable_metrics:
            from edge.observability.metrics import Metrics

            metrics = Metrics(
                config.prometheus_multiproc_dir,
                cache=config.cache_backend != "off",
                tracing=config.export_traces,
                cost=providers.priced,
            )
        limiter, owns = _limiter(config, tables, clock)
        tokens = None
        if limiter is not None and (config.rate_limit_tpm > 0 or keys.any_token_limit()):
            # Only where a token limit applies: otherwise every request would ask it for nothing.
            from edge.ratelimit.tokens import TokenLimiter

            tokens = TokenLimiter(config, limiter, metrics)
        breakers: Any = (
            LocalBreakers() if tables is None else SharedBreakers.attach(tables.breakers)
        )
        upstream = None if providers.mock else Upstream(config)
        router = Router(
            providers, upstream, breakers, config.timeout_s, metrics, config.anthropic_max_tokens
        )
        cache = None
        if config.cache_backend != "off":
            cache = _cache(config, providers, tables, metrics)
        if metrics is not None:
            metrics.breaker_source = router.breaker_numbers
            metrics.model_label = _model_labels(providers)
            if cache is not None:
                metrics.cache_source = cache.stats
                if providers.priced:  # what a hit saved, at its model's first priced target
                    metrics.hit_price = providers.hit_price
        tracing = None
        if config.export_traces:
            from edge.observability.tracing import Tracing

            tracing = Tracing(config, metrics)
        accounts = None
        if config.auth_enabled:
            accounts = _accounts(config, providers, tables, metrics)
        parallel = None
        if tables is not None and tables.parallel:  # also with RATE_LIMIT_BACKEND=redis
            from edge.ratelimit.parallel import SharedParallel

            parallel = SharedParallel.attach(tables.parallel, config.rate_limit_lock_timeout_s)
        return cls(
            config, keys, router, metrics, limiter, tokens, owns, cache, tracing, accounts,
            parallel,
        )  # fmt: skip

    @property
    def ready(self) -> bool:
        if not self.started:
            return False
        return self.upstream is None or self.upstream.ready

    async def process_startup(self, scope: Any, event: Any) -> None:
        start = getattr(self.limiter, "start", None)
        if start is not None:  # the Redis pool: opened here, on the worker's loop
            await start()
        if self.upstream is not None:
            await self.upstream.start()
        if self.cache is not None:
            await self.cache.start()
        if self.tracing is not None:
            self.tracing.start()
        if self.accounts is not None:
            await self.accounts.start()
        self.started = True

    async def process_shutdown(self, scope: Any, event: Any) -> None:
        self.started = False
        if self.upstream is not None:
            await self.upstream.close()
        if self._owns_limiter and self.limiter is not None:
            aclose = getattr(self.limiter, "aclose", None)
            if aclose is not None:
                await aclose()
            self.limiter.close()
            self.limiter = None
        if self.cache is not None:
            await self.cache.aclose()
        self.router.breakers.close()
        if self.accounts is not None:  # the spend of the requests drained above
            await self.accounts.aclose()
        self.parallel.close()
        if self.tracing is not None:  # the spans of the requests drained above
            await self.tracing.aclose()
        flush_access_log()  # uvicorn has drained the connections: every access line is out


def _limiter(
    config: Config, tables: HostTables | None, clock: Callable[[], float]
) -> tuple[Any, bool]:
    """(the rate limiter, whether it is shared and so closed at shutdown)."""
    if not config.rate_limit_enabled:
        return None, False
    if config.rate_limit_backend == "redis":
        from edge.ratelimit.redis import RedisRateLimiter

        limiter = RedisRateLimiter(
            _redis(config),
            prefix=config.redis_key_prefix,
            timeout_s=config.rate_limit_redis_timeout_s,
            failure_policy=config.rate_limit_failure_policy,
        )
        return limiter, True
    if tables is not None:
        from edge.ratelimit import SharedTable, ShmRateLimiter

        shared = ShmRateLimiter(
            SharedTable.attach(tables.rate_limit),
            lock_timeout_s=config.rate_limit_lock_timeout_s,
            failure_policy=config.rate_limit_failure_policy,
        )
        return shared, True
    from edge.ratelimit.local import LocalRateLimiter

    local = LocalRateLimiter(
        config.rate_limit_slots, failure_policy=config.rate_limit_failure_policy, clock=clock
    )
    return local, False


def _cache(config: Config, providers: Providers, tables: HostTables | None, metrics: Any) -> Any:
    """The response cache: the host's local store (the directory the master prepared, else a
    private one of this process), the flights table, and Redis behind them if so configured."""
    from edge.cache.answers import LocalFlights, ResponseCache
    from edge.cache.local import LocalStore

    if config.cache_dir is not None:
        path = str(config.cache_dir)
    else:  # no master chose one (a test, a single process)
        import tempfile

        path = tempfile.mkdtemp(prefix="llm-edge-proxy.", suffix=".cache")
    try:
        store = LocalStore.open(path, config.cache_max_bytes)
    except OSError as exc:  # not even a fresh store (the disk full, say): serve uncached
        log.error(
            "the response cache's store cannot be opened: this worker serves without it",
            extra={"directory": path, "error": str(exc)},
        )
        return None
    flights: Any = LocalFlights()
    if tables is not None and tables.flights:
        from edge.cache.flights import Flights

        flights = Flights.attach(tables.flights, config.rate_limit_lock_timeout_s)
    remote = None
    if config.cache_backend == "redis":
        from edge.cache.remote import RedisTier

        remote = RedisTier(
            _redis(config),
            prefix=config.redis_key_prefix,
            timeout_s=config.rate_limit_redis_timeout_s,
        )
    return ResponseCache(config, providers, store, flights, remote, metrics)


def _accounts(config: Config, providers: Providers, tables: HostTables | None, metrics: Any) -> Any:
    """Spend per key: in Redis with the Redis rate limiter, else in the host's ledger (a
    process-local one without a master) flushed to the state store."""
    from edge.budgets.accounts import Accounts

    if config.rate_limit_enabled and config.rate_limit_backend == "redis":
        from edge.budgets.redis import RedisLedger

        ledger: Any = RedisLedger(
            _redis(config),
            prefix=config.redis_key_prefix,
            timeout_s=config.rate_limit_redis_timeout_s,
        )
        return Accounts(config, providers, ledger, None, metrics)
    from edge.budgets.shared import LocalLedger, SharedLedger
    from edge.budgets.store import Store

    store = None
    if config.state_dir is not None:
        try:
            store = Store.open(str(config.state_dir), config.instance)
        except OSError as exc:  # the master opened it: a disk gone since, say
            log.error(
                "the usage store cannot be opened: spend is counted but not kept",
                extra={"error": str(exc)},
            )
    load = None if store is None else store.get
    if tables is not None and tables.ledger:
        ledger = SharedLedger.attach(tables.ledger, config.rate_limit_lock_timeout_s, load)
    else:
        ledger = LocalLedger(load=load)
    return Accounts(config, providers, ledger, store, metrics)


def _redis(config: Config) -> Callable[[], Any]:
    """A factory of the worker's redis.asyncio client for REDIS_URL (the rate limiter's and
    the cache's each make their own, at lifespan startup)."""
    from edge.ratelimit.redis import connect

    url = config.redis_url
    assert url is not None  # Config.from_env requires it where a backend is redis
    return lambda: connect(url, config.redis_password, config.rate_limit_redis_timeout_s)


def _model_labels(providers: Providers) -> Callable[[str], str] | None:
    """The `model` label of the token metrics: a name this gateway serves (a PROVIDERS_FILE
    entry, a mock model), anything else `other`, so clients cannot fill the label set with
    names of their own. None with UPSTREAM_URL: the upstream decides which names exist (usage
    comes only with its answers), and the first MAX_MODEL_LABELS per worker are kept."""
    if providers.mock:
        from edge.routing.mock import MOCK_MODELS

        names = frozenset(MOCK_MODELS)
    elif providers.from_file:
        names = frozenset(providers.model_names())
    else:
        return None
    return lambda model: model if model in names else "other"
