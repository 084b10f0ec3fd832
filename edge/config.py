"""One validated `Config`, read from the environment once.

`Config.from_env(environ)` is the only place that reads environment variables. Every value is
parsed strictly: a malformed value raises `ConfigError` naming the variable and what is wrong,
and is never replaced by a default. Secret values (keys) are never echoed in an error.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
FAILURE_POLICIES = ("allow", "deny")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SHA256_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")


class ConfigError(ValueError):
    """A configuration value is malformed. `str(err)` is one line naming the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Config:
    # Server
    host: str = "0.0.0.0"
    port: int = 8080
    timeout_s: float = 30.0
    max_request_size: int = 10_485_760
    workers: int = 0  # 0: not set by WORKERS/WEB_CONCURRENCY; see default_workers()
    instance: str = "default"
    keepalive_s: int = 5
    graceful_timeout_s: int = 30
    # HTTP edge limits (enforced in edge.server.protocol)
    max_request_line: int = 8192
    max_header_bytes: int = 32768
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_concurrency: int = 1000
    # Authentication (behaviour in edge.auth)
    auth_enabled: bool = True
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    api_key_hashes: tuple[str, ...] = ()
    api_keys_file: Path | None = None
    auth_health_check: bool = False
    auth_metrics: bool = False
    public_paths: tuple[str, ...] = ()
    # Rate limiting (behaviour in edge.limiting)
    rate_limit_enabled: bool = True
    rate_limit_rpm: float = 1000.0
    rate_limit_burst: int = 100
    rate_limit_slots: int = 8192
    rate_limit_lock_timeout_s: float = 0.05
    rate_limit_failure_policy: str = "allow"
    # Observability
    log_level: str = "info"
    access_log_flush_ms: int = 50
    enable_tracing: bool = True
    enable_metrics: bool = True
    # Upstream (None: the built-in mock provider answers)
    upstream_url: str | None = None
    upstream_api_key: str | None = field(default=None, repr=False)
    upstream_connect_timeout_s: float = 5.0
    upstream_pool_size: int = 256
    # TLS and HTTP/2 (HTTP/2 needs TLS: ALPN offers h2 and http/1.1)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    http2_enabled: bool = False

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def bind(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        env = _Env(os.environ if environ is None else environ)
        host, port = env.address("SERVER_ADDRESS", "0.0.0.0:8080")
        workers = env.integer("WORKERS", 0, minimum=1, maximum=512, optional=True)
        if workers == 0:
            workers = env.integer("WEB_CONCURRENCY", 0, minimum=1, maximum=512, optional=True)
        upstream_url = env.url("UPSTREAM_URL")
        tls_cert, tls_key = env.tls_pair("TLS_CERT_FILE", "TLS_KEY_FILE")
        http2 = env.boolean("HTTP2_ENABLED", False)
        if http2 and tls_cert is None:
            raise ConfigError(
                "HTTP2_ENABLED", "HTTP/2 is served over TLS: set TLS_CERT_FILE and TLS_KEY_FILE"
            )
        return cls(
            host=host,
            port=port,
            timeout_s=env.number("SERVER_TIMEOUT_SECONDS", 30.0, minimum=0.001, maximum=86_400),
            max_request_size=env.integer("MAX_REQUEST_SIZE", 10_485_760, minimum=1),
            workers=workers,
            instance=env.instance("INSTANCE_NAME", f"port{port}"),
            keepalive_s=env.integer("KEEPALIVE_TIMEOUT_SECONDS", 5, minimum=1, maximum=3600),
            graceful_timeout_s=env.integer("GRACEFUL_TIMEOUT_SECONDS", 30, minimum=1, maximum=3600),
            max_request_line=env.integer(
                "HTTP_MAX_REQUEST_LINE", 8192, minimum=256, maximum=1 << 20
            ),
            max_header_bytes=env.integer(
                "HTTP_MAX_HEADER_BYTES", 32768, minimum=1024, maximum=1 << 24
            ),
            max_headers=env.integer("HTTP_MAX_HEADERS", 100, minimum=8, maximum=10_000),
            header_timeout_s=env.number(
                "HTTP_HEADER_TIMEOUT_SECONDS", 10.0, minimum=0.1, maximum=3600
            ),
            body_timeout_s=env.number(
                "HTTP_BODY_TIMEOUT_SECONDS", 30.0, minimum=0.1, maximum=86_400
            ),
            max_concurrency=env.integer(
                "MAX_CONCURRENT_REQUESTS", 1000, minimum=1, maximum=1_000_000
            ),
            auth_enabled=env.boolean("AUTH_ENABLED", True),
            api_keys=env.secrets("API_KEYS"),
            api_key_hashes=env.digests("API_KEY_HASHES"),
            api_keys_file=env.path("API_KEYS_FILE"),
            auth_health_check=env.boolean("AUTH_HEALTH_CHECK", False),
            auth_metrics=env.boolean("AUTH_METRICS", False),
            public_paths=env.paths("PUBLIC_PATHS"),
            rate_limit_enabled=env.boolean("RATE_LIMIT_ENABLED", True),
            rate_limit_rpm=env.number("RATE_LIMIT_RPM", 1000.0, minimum=0.001, maximum=1e9),
            rate_limit_burst=env.integer("RATE_LIMIT_BURST", 100, minimum=1, maximum=10**9),
            rate_limit_slots=env.integer(
                "RATE_LIMIT_TABLE_SLOTS", 8192, minimum=16, maximum=16_777_216
            ),
            rate_limit_lock_timeout_s=env.number(
                "RATE_LIMIT_LOCK_TIMEOUT_MS", 50.0, minimum=0.1, maximum=10_000
            )
            / 1000.0,
            rate_limit_failure_policy=env.choice(
                "RATE_LIMIT_FAILURE_POLICY", "allow", FAILURE_POLICIES
            ),
            log_level=env.choice("LOG_LEVEL", "info", LOG_LEVELS),
            access_log_flush_ms=env.integer("ACCESS_LOG_FLUSH_MS", 50, minimum=1, maximum=60_000),
            enable_tracing=env.boolean("ENABLE_TRACING", True),
            enable_metrics=env.boolean("ENABLE_METRICS", True),
            upstream_url=upstream_url,
            upstream_api_key=env.secret("UPSTREAM_API_KEY"),
            upstream_connect_timeout_s=env.number(
                "UPSTREAM_CONNECT_TIMEOUT_SECONDS", 5.0, minimum=0.001, maximum=3600
            ),
            upstream_pool_size=env.integer("UPSTREAM_POOL_SIZE", 256, minimum=1, maximum=65_536),
            tls_cert_file=tls_cert,
            tls_key_file=tls_key,
            http2_enabled=http2,
        )

    def default_workers(self) -> int:
        """Worker processes: WORKERS, else WEB_CONCURRENCY, else one per CPU.

        Async workers each multiplex thousands of connections, so the classic `2 * cores + 1`
        for sync workers only adds memory and context switches here.
        """
        if self.workers:
            return self.workers
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


class _Env:
    """Strict parsers over an environment mapping; an empty value counts as unset."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(name, f"expected true or false, got {value!r}")

    def integer(
        self,
        name: str,
        default: int,
        minimum: int | None = None,
        maximum: int | None = None,
        optional: bool = False,
    ) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            parsed = int(value, 10)
        except ValueError:
            raise ConfigError(name, f"expected a whole number, got {value!r}") from None
        _check_range(name, parsed, minimum, maximum)
        return parsed

    def number(
        self, name: str, default: float, minimum: float | None = None, maximum: float | None = None
    ) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            parsed = float(value)
        except ValueError:
            raise ConfigError(name, f"expected a number, got {value!r}") from None
        if not math.isfinite(parsed):
            raise ConfigError(name, f"expected a finite number, got {value!r}")
        _check_range(name, parsed, minimum, maximum)
        return parsed

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if value.lower() not in choices:
            raise ConfigError(name, f"expected one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    def address(self, name: str, default: str) -> tuple[str, int]:
        value = self.raw(name) or default
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ConfigError(name, f"expected HOST:PORT, got {value!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(port_text, 10)
        except ValueError:
            raise ConfigError(name, f"port must be a whole number, got {value!r}") from None
        if not 0 <= port <= 65535:
            raise ConfigError(name, f"port must be 0-65535, got {value!r}")
        if host != "localhost":
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(
                    name, f"host must be an IP address or localhost, got {value!r}"
                ) from None
        return host, port

    def url(self, name: str) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(name, "expected an http:// or https:// base URL with a host")
        if parts.username or parts.password:
            raise ConfigError(name, "must not carry credentials; use UPSTREAM_API_KEY")
        if parts.query or parts.fragment:
            raise ConfigError(name, "must not have a query string or fragment")
        try:
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            raise ConfigError(name, "has a malformed port") from None
        return value.rstrip("/")

    def secret(self, name: str) -> str | None:
        value = self.raw(name)
        if value is not None and not is_header_safe(value):
            raise ConfigError(name, "contains characters not allowed in an HTTP header")
        return value

    def secrets(self, name: str) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return ()
        keys = tuple(part.strip() for part in value.split(","))
        for index, key in enumerate(keys, start=1):
            if not key:
                raise ConfigError(name, f"entry {index} is empty (stray comma?)")
            if not is_header_safe(key) or " " in key:
                raise ConfigError(name, f"entry {index} has characters a header cannot carry")
        return keys

    def digests(self, name: str) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return ()
        digests = tuple(part.strip().lower() for part in value.split(","))
        for index, digest in enumerate(digests, start=1):
            if not SHA256_HEX_RE.match(digest):
                raise ConfigError(name, f"entry {index} is not a 64-character SHA-256 hex digest")
        return digests

    def path(self, name: str) -> Path | None:
        value = self.raw(name)
        if value is None:
            return None
        path = Path(value)
        if not path.is_file():
            raise ConfigError(name, f"{value!r} is not a readable file")
        return path

    def tls_pair(self, cert_name: str, key_name: str) -> tuple[Path | None, Path | None]:
        """Both files or neither; each readable, and the key must match the certificate."""
        cert, key = self.raw(cert_name), self.raw(key_name)
        if cert is None and key is None:
            return None, None
        if cert is None or key is None:
            missing = cert_name if cert is None else key_name
            raise ConfigError(missing, f"set both {cert_name} and {key_name}, or neither")
        for name, value in ((cert_name, cert), (key_name, key)):
            try:
                with open(value, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(name, f"cannot read {value!r}: {exc.strerror}") from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise ConfigError(
                key_name,
                f"{key!r} and {cert!r} are not a usable certificate and key ({exc.reason})",
            ) from None
        return Path(cert), Path(key)

    def paths(self, name: str) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return ()
        paths = tuple(part.strip() for part in value.split(",") if part.strip())
        for path in paths:
            if not path.startswith("/"):
                raise ConfigError(name, f"paths must start with '/', got {path!r}")
        return paths

    def instance(self, name: str, default: str) -> str:
        value = self.raw(name) or default
        if not _INSTANCE_RE.match(value):
            raise ConfigError(name, "use 1-64 letters, digits, '-' or '_'")
        return value


def _check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ConfigError(name, f"must be at least {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be at most {maximum:g}, got {value:g}")


def is_header_safe(value: str) -> bool:
    """Printable ASCII: what an HTTP header value (and so an API key) can carry."""
    return value.isascii() and value.isprintable()
