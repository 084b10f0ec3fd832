"""What gunicorn.conf.py calls: load settings in the master, and the server hooks.

The master reads and validates the Config once (`load`), loads the keys, names the per-instance
shared-memory table and Prometheus directory, and keeps the result here; forked workers inherit
it, so `edge.server.worker.worker_app()` builds the app from exactly what the master
validated. A HUP re-runs gunicorn.conf.py: a config that no longer validates is then
refused and logged, and the previous one stays in force (a typo in a keys file must not take
a running service down).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from edge.auth import MAX_NAMES_LOGGED, KeyStore
from edge.config import Config, ConfigError
from edge.observability import metric_files
from edge.routing.providers import load_for as load_providers
from edge.shm import pid_alive, remove_stale, segment_name

log = logging.getLogger("edge.server")

SHM_PREFIX = "llm-edge-proxy"
# The master's own lock in the metrics directory (not metric_files.LOCK_NAME, which scrapes and
# folds take): held for the master's whole life, so a second master cannot use the directory.
MASTER_LOCK_NAME = ".master.lock"


@dataclasses.dataclass(frozen=True)
class Settings:
    config: Config
    keys: KeyStore
    table_name: str
    metrics_dir: Path
    owns_metrics_dir: bool
    metrics_dir_source: str = "PROMETHEUS_MULTIPROC_DIR"  # what named it, for error messages
    providers: Any = None  # edge.routing.providers.Providers, or None (the mock answers)
    breaker_table: str = ""
    flights_table: str = ""  # the response cache's requests in flight; "" with the cache off
    ledger_table: str = ""  # the spend per key (edge.budgets.shared); "" with auth off
    ledger_slots: int = 0  # the slots it was made with (a reload may not outgrow them)
    parallel_table: str = ""  # each key's requests in flight (edge.ratelimit.parallel)


_current: Settings | None = None
_segments: list[str] = []  # the shared-memory segments this master created, to unlink on exit
_removable_dir: Path | None = None  # a metrics directory this master created or verified
_master_pid: int | None = None  # the process whose exit cleans up (not a forked worker)
_lock_fd: int | None = None  # the master's lock on the metrics directory, kept until it exits
_removable_cache_dir: Path | None = None  # a private cache directory this master made
_removable_state_dir: Path | None = None  # a private state directory this master made


def current() -> Settings:
    if _current is None:
        raise RuntimeError("gunicorn.conf.py has not loaded the settings in this process")
    return _current


def table_prefix(config: Config) -> str:
    return f"{SHM_PREFIX}.{config.instance}"


def load(environ: MutableMapping[str, str] | None = None) -> Settings:
    """Read, validate and remember the settings; on a bad value exit with one clear line."""
    global _current
    environ = os.environ if environ is None else environ
    try:
        config = Config.from_env(environ)
        keys = KeyStore.load(config)
        providers = load_providers(config)
        # A key's `models` pattern must match a configured model, when the file names them all.
        served = providers.model_names() if providers.from_file else None
        keys.check_models(None if served is None or "*" in providers.models else served)
    except ConfigError as exc:
        if _current is not None:
            log.error(
                "reload refused, keeping the running configuration", extra={"error": str(exc)}
            )
            return _current
        print(f"llm-edge-proxy: configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if _current is not None:  # a reload (at start, on_starting logs: logging is set up there)
        problem = _budgets_problem(config, keys, _current)
        if problem:
            log.error("reload refused, keeping the running configuration", extra={"error": problem})
            return _current
        _log_keys(keys, _current.keys)
    # Only digests are kept past this point: drop the plaintext keys before any fork.
    config = dataclasses.replace(config, api_keys=())
    pid = os.getpid()
    metrics_dir, owns, source = _metrics_dir(environ, config)
    # The workers (which inherit this Config) write and read the directories chosen here.
    config = dataclasses.replace(
        config,
        prometheus_multiproc_dir=metrics_dir,
        cache_dir=_cache_dir(config),
        state_dir=_state_dir(config),
    )
    _current = Settings(
        config=config,
        keys=keys,
        # Chosen once: a reload keeps the table (and so its name) the workers attach to.
        table_name=_current.table_name if _current else segment_name(table_prefix(config), pid),
        metrics_dir=metrics_dir,
        owns_metrics_dir=owns,
        metrics_dir_source=source,
        providers=providers,
        breaker_table=(
            _current.breaker_table if _current else segment_name(breaker_prefix(config), pid)
        ),
        flights_table=_current.flights_table if _current else "",
        ledger_table=_current.ledger_table if _current else "",
        ledger_slots=_current.ledger_slots if _current else 0,
        parallel_table=(
            _current.parallel_table if _current else segment_name(parallel_prefix(config), pid)
        ),
    )
    return _current


def _cache_dir(config: Config) -> Path | None:
    """The response cache's local store: CACHE_DIR, else systemd's CACHE_DIRECTORY, else a new
    private directory removed when the master exits (so then not kept across restarts). A
    reload keeps the one chosen at start."""
    global _removable_cache_dir
    if config.cache_backend == "off":
        return None
    if _current is not None and _current.config.cache_dir is not None:
        return _current.config.cache_dir
    if config.cache_dir is not None:
        return config.cache_dir
    if config.cache_directory is not None:
        return config.cache_directory
    path = Path(tempfile.mkdtemp(prefix=f"{SHM_PREFIX}.{config.instance}.", suffix=".cache"))
    _removable_cache_dir = path
    _register_cleanup()
    return path


def _state_dir(config: Config) -> Path | None:
    """The usage store's directory: STATE_DIR, else systemd's STATE_DIRECTORY, else a new
    private directory removed when the master exits. A reload keeps the one chosen at start."""
    global _removable_state_dir
    if _current is not None and _current.config.state_dir is not None:
        return _current.config.state_dir
    if config.state_dir is not None:
        return config.state_dir
    if config.state_directory is not None:
        return config.state_directory
    path = Path(tempfile.mkdtemp(prefix=f"{SHM_PREFIX}.{config.instance}.", suffix=".state"))
    _removable_state_dir = path
    _register_cleanup()
    return path


def _log_keys(keys: KeyStore, previous: KeyStore | None) -> None:
    """How many keys are in force and, on a reload, which identities it added, removed or
    changed (a reload that drops keys is visible); then the keys' warnings. Never a key."""
    extra: dict[str, Any] = {"keys": len(keys)}
    message = "API keys loaded"
    if previous is not None:
        changes = keys.changes(previous)
        added, removed, changed = (len(changes[kind]) for kind in ("added", "removed", "changed"))
        message = f"API keys reloaded: {added} added, {removed} removed, {changed} changed"
        for kind, names in changes.items():
            extra[kind] = names[:MAX_NAMES_LOGGED] + (
                ["…"] if len(names) > MAX_NAMES_LOGGED else []
            )
    log.info(message, extra=extra)
    for warning in keys.warnings:
        log.warning(warning)


def breaker_prefix(config: Config) -> str:
    return f"{SHM_PREFIX}.{config.instance}.breakers"


def _metrics_dir(environ: MutableMapping[str, str], config: Config) -> tuple[Path, bool, str]:
    """The Prometheus multiprocess directory, exported before prometheus_client is imported.

    An operator's PROMETHEUS_MULTIPROC_DIR is honoured (and left in place on exit); else
    `$RUNTIME_DIRECTORY/metrics.<INSTANCE_NAME>` (systemd); else a new private directory with an
    unpredictable name (`tempfile.mkdtemp`, mode 0700). The last two are removed when the master
    exits, a failed start included. Returns (path, removed on exit, what named it). The path is
    written to `environ` (prometheus_client reads it there, once, when it is first imported).
    """
    global _removable_dir
    if _current is not None:  # a HUP reload keeps the directory and what it holds
        return _current.metrics_dir, _current.owns_metrics_dir, _current.metrics_dir_source
    if config.prometheus_multiproc_dir is not None:
        path, owns, source = config.prometheus_multiproc_dir, False, "PROMETHEUS_MULTIPROC_DIR"
    elif config.runtime_directory is not None:
        # One per instance: two units sharing a RuntimeDirectory must not fold or wipe each
        # other's files.
        path = config.runtime_directory / f"metrics.{config.instance}"
        owns, source = True, "RUNTIME_DIRECTORY"
    else:
        path = Path(tempfile.mkdtemp(prefix=f"{SHM_PREFIX}.{config.instance}.", suffix=".metrics"))
        owns, source = True, "the temporary directory"
        _removable_dir = path  # created just now, by us
        _register_cleanup()
    environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path, owns, source


def _register_cleanup() -> None:
    """Clean up at interpreter exit too: a failed start (a port already in use makes gunicorn
    `sys.exit` inside `Arbiter.start`) runs no gunicorn hook. Workers inherit the handler
    through fork and exit through `sys.exit`, hence the pid check."""
    global _master_pid
    if _master_pid is None:
        atexit.register(_cleanup_at_exit)
    _master_pid = os.getpid()


def _cleanup_at_exit() -> None:
    if os.getpid() == _master_pid:
        _cleanup()


def _cleanup() -> None:
    """Unlink the tables and remove the metrics directory this master made; idempotent."""
    global _removable_dir
    from edge.shm import unlink

    global _removable_cache_dir, _removable_state_dir
    while _segments:
        unlink(_segments.pop())
    if _removable_cache_dir is not None:
        shutil.rmtree(_removable_cache_dir, ignore_errors=True)
        _removable_cache_dir = None
    if _removable_state_dir is not None:
        shutil.rmtree(_removable_state_dir, ignore_errors=True)
        _removable_state_dir = None
    if _removable_dir is not None:
        shutil.rmtree(_removable_dir, ignore_errors=True)
        _removable_dir = None


def on_starting(server: Any) -> None:
    settings = current()
    config = settings.config
    _register_cleanup()
    try:
        _prepare_metrics_dir(settings, **_worker_owner(server))
    except metric_files.MetricsDirError as exc:
        print(
            f"llm-edge-proxy: metrics directory ({settings.metrics_dir_source}): {exc}",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(2) from None
    global _current
    owner = _worker_owner(server)
    if config.rate_limit_enabled:  # also with the Redis backend: a HUP may switch to shm
        from edge.ratelimit import SharedTable

        def table(name: str) -> None:
            SharedTable.create(name, config.rate_limit_slots, **owner).close()

        name = _create_segment(settings.table_name, table_prefix(config), table)
        settings = _current = dataclasses.replace(settings, table_name=name)
    from edge.routing.breaker import SharedBreakers

    # Created whatever the providers are now: a HUP may add a PROVIDERS_FILE later.
    name = _create_segment(
        settings.breaker_table,
        breaker_prefix(config),
        lambda name: SharedBreakers.create(name, **owner),
    )
    settings = _current = dataclasses.replace(settings, breaker_table=name)
    from edge.ratelimit.parallel import SharedParallel, window_for

    # Created whatever the keys are now: a HUP may give keys a max_parallel later.
    window = window_for(config.default_workers())
    name = _create_segment(
        settings.parallel_table,
        parallel_prefix(config),
        lambda name: SharedParallel.create(name, window=window, **owner),
    )
    settings = _current = dataclasses.replace(settings, parallel_table=name)
    if config.cache_backend != "off":
        settings = _current = _prepare_cache(settings, owner)
    if config.auth_enabled:
        settings = _current = _prepare_budgets(settings, owner)
    if config.providers_file is not None:
        log.info(
            "routing to the providers of PROVIDERS_FILE",
            extra={"providers": sorted(settings.providers.providers)},
        )
    elif config.upstream_url is None:
        log.warning(
            "no upstream configured (UPSTREAM_URL is unset): answering from the built-in mock "
            "provider"
        )
    else:
        log.info("forwarding to the configured upstream", extra={"upstream": config.upstream_url})
    if config.rate_limit_enabled and config.rate_limit_backend == "redis":
        log.info(
            "rate limits are kept in Redis",
            extra={
                "redis": redis_location(config.redis_url),
                "policy": config.rate_limit_failure_policy,
            },
        )
    _raise_file_limit(config)
    _log_keys(settings.keys, None)
    if not config.auth_enabled:
        log.warning("AUTH_ENABLED=false: the gateway accepts requests without an API key")
    if not config.rate_limit_enabled:
        log.warning("RATE_LIMIT_ENABLED=false: requests are not rate limited")


def _prepare_cache(settings: Settings, owner: dict[str, int]) -> Settings:
    """The cache's flights table, and its local store checked (a corrupt one is emptied, with
    a log line) and handed to the workers' user; an unusable directory refuses the start."""
    from edge.cache import local
    from edge.cache.flights import Flights

    config = settings.config
    assert config.cache_dir is not None
    try:
        local.prepare(str(config.cache_dir), config.cache_max_bytes, **owner)
    except (OSError, ValueError) as exc:
        print(f"llm-edge-proxy: cache directory: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    name = _create_segment(
        settings.flights_table or segment_name(flights_prefix(config), os.getpid()),
        flights_prefix(config),
        lambda name: Flights.create(name, **owner),
    )
    log.info(
        "response cache on",
        extra={"backend": config.cache_backend, "scope": config.cache_scope},
    )
    return dataclasses.replace(settings, flights_table=name)


def _budgets_problem(config: Config, keys: KeyStore, running: Settings) -> str | None:
    """Why a reload's keys cannot be accounted for as the running service was set up: budgets
    that appear with no state directory to keep their spend in, or more keys than the ledger
    made at start has room for (a restart makes a larger one)."""
    from edge.budgets import ledger

    if not running.ledger_table:
        return None  # Redis keeps the figures, or auth was off at start
    if _removable_state_dir is not None and any(
        entry.budget_usd is not None for entry in keys.entries()
    ):
        return (
            "API_KEYS_FILE: keys have budgets but the service started without a state directory "
            "(STATE_DIR): restart it with one"
        )
    if ledger.slots_for(len(keys)) > running.ledger_slots:
        return (
            f"API_KEYS_FILE: {len(keys)} keys are more than the usage ledger made at start has "
            "room for: restart the service to grow it"
        )
    return None


def _prepare_budgets(settings: Settings, owner: dict[str, int]) -> Settings:
    """The host's ledger of spend per key (sized from the number of keys), and the state
    store checked: its directory must be safe (as the cache's), an unusable store refuses the
    start (budgets must not silently start from zero). With Redis, spend is kept there."""
    from edge.budgets import ledger
    from edge.budgets.shared import SharedLedger

    config = settings.config
    budgets = [e for e in settings.keys.entries() if e.budget_usd is not None]
    name, slots = "", 0
    if not (config.rate_limit_enabled and config.rate_limit_backend == "redis"):
        if budgets and _removable_state_dir is not None:
            print(
                "llm-edge-proxy: keys have budgets but no state directory is set: set STATE_DIR "
                "(systemd: StateDirectory= sets STATE_DIRECTORY), or their spend would be lost "
                "at every restart",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(2)
        _prepare_store(config, owner)
        slots = max(ledger.slots_for(len(settings.keys)), settings.ledger_slots)
        name = _create_segment(
            settings.ledger_table or segment_name(ledger_prefix(config), os.getpid()),
            ledger_prefix(config),
            lambda name: SharedLedger.create(name, slots, **owner).close(),
        )
    if budgets and not (settings.providers and settings.providers.priced):
        log.warning(
            "keys have budgets but no target in PROVIDERS_FILE has prices: nothing is spent "
            "against them"
        )
    return dataclasses.replace(settings, ledger_table=name, ledger_slots=slots)


def _prepare_store(config: Config, owner: dict[str, int]) -> None:
    """Vet the state directory, open the instance's store once (made if missing), and hand
    the directory and the store's files (never following a link) to the workers' user."""
    from edge.budgets.store import Store, StoreError, file_name
    from edge.cache.local import vet_directory

    assert config.state_dir is not None
    path = str(config.state_dir).rstrip("/") or "/"
    uid, gid = owner.get("uid", -1), owner.get("gid", -1)
    try:
        owners = (os.geteuid(),) if uid == -1 else (os.geteuid(), uid)
        vet_directory(path, owners, "state directory")
        Store.open(path, config.instance).close()
        if owner:
            store = os.path.join(path, file_name(config.instance))
            for name in (path, store, *(os.path.join(store, f) for f in ("data.mdb", "lock.mdb"))):
                os.chown(name, uid, gid, follow_symlinks=False)
    except (StoreError, OSError) as exc:
        print(
            f"llm-edge-proxy: state directory: {exc} (a damaged usage store can be moved aside; "
            "its spend is then lost)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(2) from None


def ledger_prefix(config: Config) -> str:
    return f"{SHM_PREFIX}.{config.instance}.ledger"


def parallel_prefix(config: Config) -> str:
    return f"{SHM_PREFIX}.{config.instance}.parallel"


def flights_prefix(config: Config) -> str:
    return f"{SHM_PREFIX}.{config.instance}.flights"


def _create_segment(name: str, prefix: str, create: Any) -> str:
    """Create one of the master's shared-memory segments (edge.shm) under `name`, after removing
    those a crashed master of this instance left; return the name it has. The master keeps only
    the name: workers attach with descriptors of their own. The name is unpredictable; should it
    still be taken by an object we may not remove, another is chosen (workers read the name from
    the settings after fork)."""
    remove_stale(prefix)
    for attempt in range(3):
        try:
            create(name)
        except FileExistsError as exc:
            log.warning("shared-memory name taken; choosing another", extra={"error": str(exc)})
            if attempt == 2:
                print(f"llm-edge-proxy: shared memory: {exc}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            name = segment_name(prefix, os.getpid())
            continue
        _segments.append(name)
        break
    return name


def _raise_file_limit(config: Config) -> None:
    """Raise the soft limit on open files to the hard one, for the master and the workers it
    forks: each request in flight holds a client connection and, upstream, another (a shell's
    soft limit is often 1024, under the 2 x MAX_CONCURRENT_REQUESTS a worker may need). Say so
    when even the hard limit is below that (systemd: LimitNOFILE=)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    needed = 2 * config.max_concurrency + 64
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "the open-file limit is below what MAX_CONCURRENT_REQUESTS needs: raise it "
            "(systemd: LimitNOFILE=) or lower MAX_CONCURRENT_REQUESTS",
            extra={"limit": soft, "needed": needed},
        )


def _worker_owner(server: Any) -> dict[str, int]:
    """uid/gid for objects the workers must open, when gunicorn's `user`/`group` make them run
    as someone other than the master (a root master); empty otherwise."""
    cfg = getattr(server, "cfg", None)
    uid, gid = getattr(cfg, "uid", os.geteuid()), getattr(cfg, "gid", os.getegid())
    if (uid, gid) == (os.geteuid(), os.getegid()):
        return {}
    return {"uid": uid, "gid": gid}


def _prepare_metrics_dir(
    settings: Settings, uid: int | None = None, gid: int | None = None
) -> None:
    """Create or check the directory, lock it, then empty it. A directory we did not just
    create must be a real directory (not a symlink), owned by us or the workers' user, and
    writable by no one else: otherwise a local user could have planted it, or links in it. The
    lock comes before anything in the directory is touched: a directory another master uses
    is refused without wiping its files, and is not removed at our exit either."""
    global _removable_dir
    path = settings.metrics_dir
    fresh = path == _removable_dir  # our own mkdtemp, created just now
    if not fresh:  # create it if missing, then check
        try:
            path.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass  # checked below
        except OSError as exc:
            raise metric_files.MetricsDirError(f"cannot create {path}: {exc.strerror}") from None
        allowed = {os.geteuid(), os.geteuid() if uid is None else uid}
        metric_files.check_private_dir(path, allowed)
    _lock_metrics_dir(settings)
    if not fresh and settings.owns_metrics_dir:
        _removable_dir = path
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    metric_files.prepare(path, uid, gid)


def _lock_metrics_dir(settings: Settings) -> None:
    """Take the master's exclusive lock on its metrics directory, or refuse the start.

    Two instances sharing the directory (the same INSTANCE_NAME under one RuntimeDirectory, or
    the same PROMETHEUS_MULTIPROC_DIR) would wipe each other's live files at start and remove
    the directory at stop. So the master holds a `flock` on MASTER_LOCK_NAME for its whole
    life: the descriptor is kept in `_lock_fd` (a HUP reload keeps it; only `on_starting`
    takes it) and closed only by the process ending. Forked workers inherit the descriptor and
    so hold the lock as well: it is free once the master and all its workers are gone, after a
    stop, a failed start or a SIGKILL alike, but not while workers of a killed master still run
    (they still write to the directory). The file holds the master's pid, for the message; it
    is never removed (a lock file unlinked while another process has it open locks nothing)."""
    global _lock_fd
    if _lock_fd is not None:
        return
    path = settings.metrics_dir
    lock_path = path / MASTER_LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise metric_files.MetricsDirError(f"cannot open {lock_path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise metric_files.MetricsDirError(f"{lock_path} is not a regular file")
        try:
            locked = metric_files.try_lock(fd, exclusive=True)
        except OSError as exc:
            raise metric_files.MetricsDirError(f"cannot lock {lock_path}: {exc.strerror}") from None
        if not locked:
            raise metric_files.MetricsDirError(_in_use(settings, fd))
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    _lock_fd = fd


def _in_use(settings: Settings, fd: int) -> str:
    """The refusal when another master holds the lock: the directory, our INSTANCE_NAME, the
    holder's pid (read, never written: the file is the other instance's)."""
    path, instance = settings.metrics_dir, settings.config.instance
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    pid = int(text) if text.isdigit() else None
    if pid is None:
        holder = "another master"
    elif pid_alive(pid):
        holder = f"another master (pid {pid})"
    else:
        holder = f"the workers of a master that was killed (pid {pid}; stop them)"
    fix = "give each instance its own INSTANCE_NAME"
    if settings.metrics_dir_source == "PROMETHEUS_MULTIPROC_DIR":
        fix = "give each instance its own PROMETHEUS_MULTIPROC_DIR"
    return (
        f"{path} is in use by {holder}; refusing to start INSTANCE_NAME={instance} on it "
        f"(one metrics directory per instance: {fix})"
    )


def child_exit(server: Any, worker: Any) -> None:
    """Give back a dead worker's requests in flight (`reclaim_parallel`). Drop its live gauges,
    and fold its counters and histograms (and those of any earlier worker whose fold was
    skipped) into the archive files, so the directory stays at one set of files per live worker
    plus the archives however many workers come and go."""
    from prometheus_client import multiprocess

    reclaim_parallel(worker.pid)
    path = current().metrics_dir
    multiprocess.mark_process_dead(worker.pid, str(path))
    live = [os.getpid(), *getattr(server, "WORKERS", {})]
    try:
        removed = metric_files.fold(path, live)
    except Exception:
        log.exception("could not fold a dead worker's metric files; they stay and still count")
        return
    if removed is None:
        log.warning("metrics directory busy: a dead worker's files are folded at the next exit")


def reclaim_parallel(pid: int) -> None:
    """Free the holdings of worker `pid` (exited) in the table of requests in flight per key,
    and of any other worker gone; a worker killed mid-request (SIGKILL included) holds none of
    its key's places after this. Should the lock not be had, the first request they would
    refuse frees them (edge.ratelimit.parallel)."""
    name = current().parallel_table
    if not name or name not in _segments:
        return
    from edge.ratelimit.parallel import reclaim_dead

    try:
        freed = reclaim_dead(name, pid)
    except (OSError, ValueError):
        log.exception("could not free a dead worker's requests in flight")
        return
    if freed > 0:
        log.info(
            "a worker ended with requests in flight: their keys' places are given back",
            extra={"pid": pid, "requests": freed},
        )
    elif freed < 0:
        log.warning(
            "the table of requests in flight was busy: a dead worker's places are given back "
            "when they are next needed",
            extra={"pid": pid},
        )


def on_exit(server: Any) -> None:
    _flush_ledger()
    _cleanup()


def _flush_ledger() -> None:
    """The ledger's last figures into the state store, once the workers are gone."""
    settings = _current
    if settings is None or not settings.ledger_table or settings.config.state_dir is None:
        return
    from edge.budgets.accounts import write_rows
    from edge.budgets.shared import SharedLedger
    from edge.budgets.store import Store

    try:
        ledger = SharedLedger.attach(settings.ledger_table)
        try:
            snapshot = ledger.snapshot(0.0, 0.0)
        finally:
            ledger.close()
        store = Store.open(str(settings.config.state_dir), settings.config.instance)
        try:
            write_rows(store, snapshot)
        finally:
            store.close()
    except Exception:
        log.exception("could not write the last usage figures into the state store")


def logconfig() -> dict[str, Any]:
    from edge.observability.logs import logconfig_dict

    return logconfig_dict(current().config)


def redis_location(url: str | None) -> str:
    """The Redis URL without its credentials, for logs."""
    from urllib.parse import urlsplit

    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
