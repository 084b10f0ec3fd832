"""What gunicorn.conf.py calls: load settings in the master, and the server hooks.

The master reads and validates the Config once (`load`), loads the keys, names the per-instance
shared-memory table and Prometheus directory, and keeps the result here; forked workers inherit
it, so `edge.server.worker.worker_app()` builds the app from exactly what the master
validated. A HUP re-runs gunicorn.conf.py: a config that no longer validates is then
refused and logged, and the previous one stays in force (a typo in a keys file must not take
a running service down).
"""

from __future__ import annotations

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
from edge.ratelimit.shm import table_name
from edge.upstream.providers import load_for as load_providers

log = logging.getLogger("edge.server")

SHM_PREFIX = "llm-edge-proxy"


@dataclasses.dataclass(frozen=True)
class Settings:
    config: Config
    keys: KeyStore
    table_name: str
    metrics_dir: Path
    owns_metrics_dir: bool
    providers: Any = None  # edge.upstream.providers.Providers, or None (the mock answers)
    breaker_table: str = ""


_current: Settings | None = None
_master_table: Any = None  # the master's (closed) SharedTable, kept to unlink it on exit
_breakers_created = False


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
    metrics_dir, owns = _metrics_dir(environ, config, pid)
    _current = Settings(
        config=config,
        keys=keys,
        table_name=table_name(table_prefix(config), pid),
        metrics_dir=metrics_dir,
        owns_metrics_dir=owns,
        providers=providers,
        breaker_table=table_name(breaker_prefix(config), pid),
    )
    return _current


def breaker_prefix(config: Config) -> str:
    return f"{SHM_PREFIX}.{config.instance}.breakers"


def _metrics_dir(environ: MutableMapping[str, str], config: Config, pid: int) -> tuple[Path, bool]:
    """The Prometheus multiprocess directory, exported before prometheus_client is imported.

    An operator's PROMETHEUS_MULTIPROC_DIR is honoured; else `$RUNTIME_DIRECTORY/metrics`
    (systemd), else a private directory in the temp dir named for this instance and master.
    """
    if _current is not None:  # a HUP reload keeps the directory and what it holds
        return _current.metrics_dir, _current.owns_metrics_dir
    preset = environ.get("PROMETHEUS_MULTIPROC_DIR")
    if preset:
        path, owns = Path(preset), False
    elif environ.get("RUNTIME_DIRECTORY"):
        path, owns = Path(environ["RUNTIME_DIRECTORY"].split(":")[0]) / "metrics", True
    else:
        path = Path(tempfile.gettempdir()) / f"{SHM_PREFIX}.{config.instance}.{pid}.metrics"
        owns = True
    environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path, owns


def on_starting(server: Any) -> None:
    settings = current()
    config = settings.config
    _prepare_metrics_dir(settings.metrics_dir, **_worker_owner(server))
    if config.rate_limit_enabled:
        from edge.ratelimit import SharedTable, remove_stale

        global _master_table
        remove_stale(table_prefix(config))
        # The master keeps only the name: workers attach with descriptors of their own.
        _master_table = SharedTable.create(
            settings.table_name, config.rate_limit_slots, **_worker_owner(server)
        )
        _master_table.close()
    from edge.ratelimit import remove_stale
    from edge.upstream.breaker import SharedBreakers

    global _breakers_created
    remove_stale(breaker_prefix(config))
    # Created whatever the providers are now: a HUP may add a PROVIDERS_FILE later.
    SharedBreakers.create(settings.breaker_table, **_worker_owner(server))
    _breakers_created = True
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
    if not config.auth_enabled:
        log.warning("AUTH_ENABLED=false: the gateway accepts requests without an API key")
    if not config.rate_limit_enabled:
        log.warning("RATE_LIMIT_ENABLED=false: requests are not rate limited")


def _worker_owner(server: Any) -> dict[str, int]:
    """uid/gid for objects the workers must open, when gunicorn's `user`/`group` make them run
    as someone other than the master (a root master); empty otherwise."""
    cfg = getattr(server, "cfg", None)
    uid, gid = getattr(cfg, "uid", os.geteuid()), getattr(cfg, "gid", os.getegid())
    if (uid, gid) == (os.geteuid(), os.getegid()):
        return {}
    return {"uid": uid, "gid": gid}


def _prepare_metrics_dir(path: Path, uid: int | None = None, gid: int | None = None) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    """Fold a dead worker's live gauges out; its counters stay in its files and keep counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, str(current().metrics_dir))


def on_exit(server: Any) -> None:
    settings = current()
    if _master_table is not None:
        _master_table.unlink()
    if _breakers_created:
        from edge.upstream.breaker import unlink

        unlink(settings.breaker_table)
    if settings.owns_metrics_dir:
        shutil.rmtree(settings.metrics_dir, ignore_errors=True)


def logconfig() -> dict[str, Any]:
    from edge.observability.logs import logconfig_dict

    return logconfig_dict(current().config)
