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
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from edge.auth import KeyStore
from edge.config import Config, ConfigError
from edge.observability import metric_files
from edge.routing.providers import load_for as load_providers
from edge.shm import remove_stale, segment_name

log = logging.getLogger("edge.server")

SHM_PREFIX = "llm-edge-proxy"


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


_current: Settings | None = None
_segments: list[str] = []  # the shared-memory segments this master created, to unlink on exit
_removable_dir: Path | None = None  # a metrics directory this master created or verified
_master_pid: int | None = None  # the process whose exit cleans up (not a forked worker)


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
    except ConfigError as exc:
        if _current is not None:
            log.error(
                "reload refused, keeping the running configuration", extra={"error": str(exc)}
            )
            return _current
        print(f"llm-edge-proxy: configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    # Only digests are kept past this point: drop the plaintext keys before any fork.
    config = dataclasses.replace(config, api_keys=())
    pid = os.getpid()
    metrics_dir, owns, source = _metrics_dir(environ, config)
    # The workers (which inherit this Config) write and read the directory chosen here.
    config = dataclasses.replace(config, prometheus_multiproc_dir=metrics_dir)
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
    )
    return _current


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

    while _segments:
        unlink(_segments.pop())
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
    if not config.auth_enabled:
        log.warning("AUTH_ENABLED=false: the gateway accepts requests without an API key")
    if not config.rate_limit_enabled:
        log.warning("RATE_LIMIT_ENABLED=false: requests are not rate limited")


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
    """Create or check the directory, then empty it. A directory we did not just create must
    be a real directory (not a symlink), owned by us or the workers' user, and writable by no
    one else: otherwise a local user could have planted it, or links in it."""
    global _removable_dir
    path = settings.metrics_dir
    if path != _removable_dir:  # not our fresh mkdtemp: create it if missing, then check
        try:
            path.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass  # checked below
        except OSError as exc:
            raise metric_files.MetricsDirError(f"cannot create {path}: {exc.strerror}") from None
        allowed = {os.geteuid(), os.geteuid() if uid is None else uid}
        metric_files.check_private_dir(path, allowed)
        if settings.owns_metrics_dir:
            _removable_dir = path
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    metric_files.prepare(path, uid, gid)


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges, and fold its counters and histograms (and those of any
    earlier worker whose fold was skipped) into the archive files, so the directory stays at
    one set of files per live worker plus the archives however many workers come and go."""
    from prometheus_client import multiprocess

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


def on_exit(server: Any) -> None:
    _cleanup()


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
