"""One validated `Config`, read from the environment once.

Every setting is defined once, in `SETTINGS`: its variable, the Config field it fills, its
parser (with bounds), its default and a one-line meaning. `Config.from_env(environ)` is the
only place that reads environment variables; the README's configuration table
(`markdown_table()`) and `systemd/env.example` follow from the same table, and
tests/unit/test_config.py fails when they drift.

Every value is parsed strictly: a malformed value raises `ConfigError` naming the variable and
what is wrong, and is never replaced by a default. Defaults go through the same parsers, so
they obey the same bounds. Secret values (keys) are never echoed in an error.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edge.budgets.periods import DEFAULT_PERIOD, PERIODS
from edge.ratelimit.base import FAILURE_POLICIES

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
RATE_LIMIT_BACKENDS = ("shm", "redis")
CACHE_BACKENDS = ("off", "local", "redis")
CACHE_SCOPES = ("key", "shared")
OTEL_PROTOCOLS = ("http/protobuf", "grpc", "http/json")  # the spec's; only the first is served
OTEL_SAMPLERS = (
    "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio",
    "always_on", "always_off", "traceidratio",
)  # fmt: skip
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
# A header value as OTEL_EXPORTER_OTLP_HEADERS may write it (the W3C baggage value characters
# and the space the OpenTelemetry SDK also accepts): printable ASCII but " , ; and backslash.
_HEADER_TEXT_RE = re.compile(r"[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
REDIS_SCHEMES = ("redis", "rediss", "unix")
_REDIS_PREFIX_RE = re.compile(r"[!-~]{0,128}")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_INSTANCE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_INTEGER_RE = re.compile(r"-?[0-9]+")
SHA256_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# systemd credentials (LoadCredential=): used when $CREDENTIALS_DIRECTORY holds them and the
# matching *_FILE variable is unset; a relative *_FILE path is also resolved in that directory.
API_KEYS_CREDENTIAL = "api-keys.toml"
UPSTREAM_KEY_CREDENTIAL = "upstream-api-key"
_MAX_SECRET_FILE = 65536


def environment(overrides: Mapping[str, str] = {}) -> dict[str, str]:
    """This process's environment with `overrides` over it (`llm-edge-proxy usage
    --env-file`): what `Config.from_env` is then given."""
    return {**os.environ, **overrides}


class ConfigError(ValueError):
    """A configuration value is malformed. `str(err)` is one line naming the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


# ---------------------------------------------------------------- parsers
# A parser takes (variable name, stripped non-empty text) and returns the value or raises
# ConfigError naming the variable.

Parser = Callable[[str, str], Any]


def _check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ConfigError(name, f"must be at least {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be at most {maximum:g}, got {value:g}")


def boolean(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(name, f"expected true or false, got {value!r}")


def integer(minimum: int | None = None, maximum: int | None = None) -> Parser:
    def parse(name: str, value: str) -> int:
        if not _INTEGER_RE.fullmatch(value):
            raise ConfigError(name, f"expected a whole number, got {value!r}")
        parsed = int(value, 10)
        _check_range(name, parsed, minimum, maximum)
        return parsed

    return parse


def number(
    minimum: float | None = None, maximum: float | None = None, scale: float = 1.0
) -> Parser:
    """A finite decimal number within bounds (checked before `scale` converts the unit)."""

    def parse(name: str, value: str) -> float:
        try:
            parsed = float(value)
        except ValueError:
            raise ConfigError(name, f"expected a number, got {value!r}") from None
        if not math.isfinite(parsed):
            raise ConfigError(name, f"expected a finite number, got {value!r}")
        _check_range(name, parsed, minimum, maximum)
        return parsed * scale

    return parse


def choice(*choices: str) -> Parser:
    def parse(name: str, value: str) -> str:
        if value.lower() not in choices:
            raise ConfigError(name, f"expected one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return parse


def address(name: str, value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(name, f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError(name, f"port must be a whole number, got {value!r}")
    port = int(port_text, 10)
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


# An upstream base URL, by RFC 3986 but narrowed to what a gateway should forward to: scheme,
# host, optional port of ASCII digits, optional path. No userinfo, query or fragment; no
# whitespace, controls or non-ASCII anywhere (re.ASCII keeps \d and the classes to ASCII).
_URL_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/]*)(?P<path>.*)", re.ASCII | re.DOTALL
)
_HOSTNAME_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?",
    re.ASCII,
)
_PORT_RE = re.compile(r"[0-9]{1,5}", re.ASCII)
_PATH_RE = re.compile(r"(?:/(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})*)*", re.ASCII)


def parse_base_url(name: str, value: str) -> str:
    """Validate an http(s) base URL strictly; return it without a trailing slash.

    Raises ConfigError naming `name`; the value itself is not echoed (it may hold credentials).
    """
    if not value.isascii() or not value.isprintable() or any(c.isspace() for c in value):
        raise ConfigError(name, "must be plain ASCII without whitespace or control characters")
    match = _URL_RE.fullmatch(value)
    if match is None or match["scheme"].lower() not in ("http", "https"):
        raise ConfigError(name, "expected an http:// or https:// base URL with a host")
    authority, path = match["authority"], match["path"]
    if "?" in path or "#" in path or "?" in authority or "#" in authority:
        raise ConfigError(name, "must not have a query string or fragment")
    if "@" in authority:
        raise ConfigError(name, "must not carry credentials; use UPSTREAM_API_KEY")
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket:
            raise ConfigError(name, "has an unterminated IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(name, "has a malformed IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise ConfigError(name, "has characters after the IPv6 address")
        port = rest[1:] if rest else None
    else:
        host, colon, port_text = authority.partition(":")
        port = port_text if colon else None
        if not host:
            raise ConfigError(name, "expected an http:// or https:// base URL with a host")
        if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
            raise ConfigError(name, "has a malformed host name")
    if port is not None and (not _PORT_RE.fullmatch(port) or not 1 <= int(port, 10) <= 65535):
        raise ConfigError(name, "port must be 1-65535, written in ASCII digits")
    if not _PATH_RE.fullmatch(path):
        raise ConfigError(name, "path has characters a URL path cannot carry unencoded")
    return f"{match['scheme'].lower()}://{authority}{path}".rstrip("/")


def secret(name: str, value: str) -> str:
    if not is_header_safe(value):
        raise ConfigError(name, "contains characters not allowed in an HTTP header")
    return value


def secrets(name: str, value: str) -> tuple[str, ...]:
    keys = tuple(part.strip() for part in value.split(","))
    for index, key in enumerate(keys, start=1):
        if not key:
            raise ConfigError(name, f"entry {index} is empty (stray comma?)")
        if not is_header_safe(key) or " " in key:
            raise ConfigError(name, f"entry {index} has characters a header cannot carry")
    return keys


def digests(name: str, value: str) -> tuple[str, ...]:
    parsed = tuple(part.strip().lower() for part in value.split(","))
    for index, digest in enumerate(parsed, start=1):
        if not SHA256_HEX_RE.match(digest):
            raise ConfigError(name, f"entry {index} is not a 64-character SHA-256 hex digest")
    return parsed


def readable_file(name: str, value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise ConfigError(name, f"{value!r} is not a readable file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(name, f"cannot read {value!r}: {exc.strerror}") from None
    return path


def file_name(name: str, value: str) -> Path:
    """A path, checked where it is used (`_credential_file`, the metrics directory's checks)."""
    return Path(value)


def first_path(name: str, value: str) -> Path:
    """The first of a colon-separated list of paths (systemd sets several for several
    directives)."""
    return Path(value.split(":")[0])


def redis_url(name: str, value: str) -> str:
    """redis://, rediss:// or unix://; the value is never echoed (it may hold a password)."""
    parts = urlsplit(value)
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(name, "expected a redis://, rediss:// or unix:// URL")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(name, "a unix:// URL needs a socket path")
    elif not parts.hostname:
        raise ConfigError(name, "expected a host in the URL")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ConfigError(name, "has a malformed port") from None
    return value


def first_line_secret(name: str, value: str) -> str:
    """The first line of the file `value`, trimmed; the contents are never echoed."""
    try:
        with open(value, encoding="utf-8") as handle:
            secret = handle.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(name, f"cannot read {value!r}: {reason}") from None
    if not secret:
        raise ConfigError(name, f"{value!r} is empty")
    return secret


def redis_prefix(name: str, value: str) -> str:
    if not _REDIS_PREFIX_RE.fullmatch(value):
        raise ConfigError(name, "use at most 128 printable ASCII characters, no spaces")
    return value


def url_paths(name: str, value: str) -> tuple[str, ...]:
    paths = tuple(part.strip() for part in value.split(",") if part.strip())
    for path in paths:
        if not path.startswith("/"):
            raise ConfigError(name, f"paths must start with '/', got {path!r}")
    return paths


def instance(name: str, value: str) -> str:
    if not _INSTANCE_RE.fullmatch(value):
        raise ConfigError(name, "use 1-64 letters, digits, '-' or '_'")
    return value


def key_values(headers: bool) -> Parser:
    """A W3C-baggage-style list, `key1=value1,key2=value2`, values percent-decoded and trimmed
    (the OTLP spec's format for OTEL_EXPORTER_OTLP_HEADERS and OTEL_RESOURCE_ATTRIBUTES), as
    valid UTF-8. `headers`: the keys must be header names, the values as written only hold what
    the format allows (printable ASCII but `"`, `,`, `;` and backslash: percent-encode those) and
    decode to a header-safe value. The OpenTelemetry exporter reads the variable again and logs
    an entry it cannot parse whole, so one this accepts must be one it parses. Values are never
    echoed (a header may carry a collector's key)."""

    def parse(name: str, value: str) -> tuple[tuple[str, str], ...]:
        pairs = []
        for index, part in enumerate(value.split(","), start=1):
            if not part.strip():
                continue
            key, equals, text = part.partition("=")
            key = key.strip()
            if not equals or not key:
                raise ConfigError(name, f"entry {index} is not key=value")
            decoded = unquote(text.strip(), errors="strict").strip()
            try:
                (key + decoded).encode("utf-8")
            except UnicodeEncodeError:  # bytes that were not UTF-8 in the environment
                raise ConfigError(name, f"entry {index} is not valid UTF-8") from None
            if headers and not (
                _HEADER_NAME_RE.fullmatch(key)
                and _HEADER_TEXT_RE.fullmatch(text.strip())
                and is_header_safe(decoded)
            ):
                raise ConfigError(
                    name,
                    f'entry {index} is not a valid HTTP header (percent-encode any ", ;, \\ '
                    "or control character in its value)",
                )
            pairs.append((key.lower() if headers else key, decoded))
        return tuple(pairs)

    def strict(name: str, value: str) -> tuple[tuple[str, str], ...]:
        try:
            return parse(name, value)
        except UnicodeDecodeError:
            raise ConfigError(name, "holds a percent-escape that is not UTF-8") from None

    return strict


def printable(name: str, value: str) -> str:
    """Text without control characters, as valid UTF-8."""
    if not value.isprintable():
        raise ConfigError(name, "must not hold control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(name, "is not valid UTF-8") from None
    return value


def is_header_safe(value: str) -> bool:
    """Printable ASCII: what an HTTP header value (and so an API key) can carry."""
    return value.isascii() and value.isprintable()


# ---------------------------------------------------------------- the settings


@dataclass(frozen=True, slots=True)
class Setting:
    """One environment variable. `default` is text, parsed like a set value; None: unset, and
    the field takes `unset` (or what `Config.from_env` derives, described by `shown`)."""

    variable: str
    field: str | tuple[str, ...]  # a tuple when one variable fills several fields
    parse: Parser
    default: str | None
    meaning: str
    unset: Any = None
    shown: str | None = None  # the README's Default column when not the default itself

    @property
    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        return "unset" if self.default is None else f"`{self.default}`"


S = Setting
# fmt: off
SETTINGS: tuple[Setting, ...] = (
    # Server
    S("SERVER_ADDRESS", ("host", "port"), address, "0.0.0.0:8080",
      "`HOST:PORT` to bind (IPv6 as `[::1]:8080`)"),
    S("WORKERS", "workers", integer(1, 512), None, "Worker processes", unset=0,
      shown="`WEB_CONCURRENCY`, else one per CPU"),
    S("WEB_CONCURRENCY", "web_concurrency", integer(1, 512), None,
      "Fallback for `WORKERS` (the common PaaS name)", unset=0),
    S("SERVER_TIMEOUT_SECONDS", "timeout_s", number(0.001, 86_400), "30",
      "Upstream deadline: time to a complete answer, or to the first byte of a stream and then "
      "between chunks; exceeded → 504 (or an SSE error event mid-stream)"),
    S("MAX_REQUEST_SIZE", "max_request_size", integer(1), "10485760",
      "Largest request body in bytes; larger → 413 before it is read"),
    S("KEEPALIVE_TIMEOUT_SECONDS", "keepalive_s", integer(1, 3600), "5",
      "Idle keep-alive connections are closed after this"),
    S("GRACEFUL_TIMEOUT_SECONDS", "graceful_timeout_s", integer(1, 3600), "30",
      "Time draining workers (reload, TTOU, stop) get to finish in-flight requests and streams; "
      "under systemd keep it below the unit's TimeoutStopSec (45 s as shipped), or raise both"),
    # HTTP edge limits (enforced in edge.server.protocol)
    S("HTTP_MAX_REQUEST_LINE", "max_request_line", integer(256, 1 << 20), "8192",
      "Longest request line in bytes; longer → 414"),
    S("HTTP_MAX_HEADER_BYTES", "max_header_bytes", integer(1024, 1 << 24), "32768",
      "Largest header block in bytes, sent whole or trickled; larger → 431"),
    S("HTTP_MAX_HEADERS", "max_headers", integer(8, 10_000), "100",
      "Most header fields; more → 431"),
    S("HTTP_HEADER_TIMEOUT_SECONDS", "header_timeout_s", number(0.1, 3600), "10",
      "Time a client gets to send a complete request head (one begun during an earlier answer: "
      "from that answer's end); then 408 and close"),
    S("HTTP_BODY_TIMEOUT_SECONDS", "body_timeout_s", number(0.1, 86_400), "30",
      "Time a client gets to send a complete body after its head (a pipelined request: once its "
      "turn comes); then 408 and close"),
    S("HTTP_SEND_TIMEOUT_SECONDS", "send_timeout_s", number(0.1, 86_400), "30",
      "Time a client may leave its socket full (accepting no response bytes); then the "
      "connection is dropped and its upstream request ends"),
    S("MAX_CONCURRENT_REQUESTS", "max_concurrency", integer(1, 1_000_000), "4096",
      "Requests in flight per worker (streams included); beyond → 503 with `Retry-After: 1`"),
    S("INSTANCE_NAME", "instance", instance, None,
      "Names this instance's shared-memory table and metrics directory; give each instance on "
      "a host its own (a master whose metrics directory another running master holds refuses "
      "to start)", shown="`port<PORT>`"),
    # Upstream (unset: the built-in mock provider answers)
    S("UPSTREAM_URL", "upstream_url", parse_base_url, None,
      "OpenAI-compatible base URL, e.g. `https://api.openai.com/v1`. Unset: the built-in mock "
      "provider answers"),
    S("UPSTREAM_API_KEY", "upstream_api_key", secret, None,
      "Sent upstream as `Authorization: Bearer …`; the client's key never is"),
    S("UPSTREAM_API_KEY_FILE", "upstream_api_key_file", file_name, None,
      "File holding the upstream key (trimmed; one printable ASCII line), instead of "
      "`UPSTREAM_API_KEY` (setting both is an error); re-read on HUP. A relative path is taken "
      "in `$CREDENTIALS_DIRECTORY`. Unset, and `$CREDENTIALS_DIRECTORY/upstream-api-key` exists "
      "(systemd `LoadCredential=`): that file (empty: no key)"),
    S("UPSTREAM_CONNECT_TIMEOUT_SECONDS", "upstream_connect_timeout_s", number(0.001, 3600), "5",
      "Connecting to the upstream, waiting for a free pooled connection included; exceeded → 502"),
    S("UPSTREAM_POOL_SIZE", "upstream_pool_size", integer(1, 65_536), "4096",
      "Upstream connections per provider per worker (a stream holds one for its whole length); "
      "a request to a provider whose connections are all in use fails over at once, or gets "
      "503 with `Retry-After: 1`"),
    S("UPSTREAM_BUFFER_BYTES", "upstream_buffer_bytes", integer(1 << 20, 1 << 40), "134217728",
      "Bytes of whole (non-streamed) upstream answers one worker holds at once; an answer "
      "past it is dropped with 503 and `Retry-After: 1` (each held answer costs about twice "
      "its size in memory)"),
    S("PROVIDERS_FILE", "providers_file", readable_file, None,
      "TOML file of providers, models and routing (see [Providers and routing]"
      "(#providers-and-routing)); re-read on HUP, a file that no longer validates is refused "
      "and the running one stays. Overrides `UPSTREAM_URL`"),
    S("ANTHROPIC_MAX_TOKENS_DEFAULT", "anthropic_max_tokens", integer(1, 1_000_000), "4096",
      "`max_tokens` sent to an Anthropic provider for an OpenAI request that sets none (Anthropic "
      "requires it); a model entry's `max_tokens_default` overrides it"),
    # Authentication (behaviour in edge.auth)
    S("AUTH_ENABLED", "auth_enabled", boolean, "true",
      "Require an API key on the API routes (`/v1/…`) and on paths that match no route. With "
      "no keys configured the service refuses to start"),
    S("API_KEYS", "api_keys", secrets, None,
      "Comma-separated plaintext client keys (hashed at start; only digests are kept)", unset=()),
    S("API_KEY_HASHES", "api_key_hashes", digests, None,
      "Comma-separated SHA-256 hex digests of client keys", unset=()),
    S("API_KEYS_FILE", "api_keys_file", file_name, None,
      "TOML file of named keys with optional per-key limits; re-read on HUP. A relative path is "
      "taken in `$CREDENTIALS_DIRECTORY`; unset, `$CREDENTIALS_DIRECTORY/api-keys.toml` is used "
      "if it exists"),
    S("AUTH_HEALTH_CHECK", "auth_health_check", boolean, "false",
      "Require a key on `/health*` too"),
    S("AUTH_METRICS", "auth_metrics", boolean, "false", "Require a key on `/metrics` too"),
    S("PUBLIC_PATHS", "public_paths", url_paths, None,
      "Comma-separated extra routes that never need a key, written as route templates (e.g. "
      "`/v1/models`); an entry that is no route has no effect (a warning at start)", unset=()),
    # Rate limiting (behaviour in edge.ratelimit)
    S("RATE_LIMIT_ENABLED", "rate_limit_enabled", boolean, "true",
      "Per-key token buckets shared by all workers"),
    S("RATE_LIMIT_RPM", "rate_limit_rpm", number(0.001, 1e9), "1000",
      "Sustained requests per minute per key (refill `RPM/60` per second)"),
    S("RATE_LIMIT_BURST", "rate_limit_burst", integer(1, 10**9), "100",
      "Bucket capacity: requests a key may make at once"),
    S("RATE_LIMIT_TABLE_SLOTS", "rate_limit_slots", integer(16, 16_777_216), "8192",
      "Buckets the shared table holds (48 bytes each)"),
    S("RATE_LIMIT_LOCK_TIMEOUT_MS", "rate_limit_lock_timeout_s", number(0.1, 10_000, 1e-3), "50",
      "Longest wait for the table lock before the failure policy applies"),
    S("RATE_LIMIT_FAILURE_POLICY", "rate_limit_failure_policy", choice(*FAILURE_POLICIES),
      "allow",
      "`allow` (fail open) or `deny` (fail closed, 429) when the lock times out, the table is "
      "full or Redis does not answer in time"),
    S("RATE_LIMIT_BACKEND", "rate_limit_backend", choice(*RATE_LIMIT_BACKENDS), "shm",
      "Where buckets live: `shm` (this host's shared memory) or `redis` (shared by every host "
      "using the same Redis/Valkey)"),
    S("REDIS_URL", "redis_url", redis_url, None,
      "`redis://[user:pass@]host:port/db`, `rediss://…` (TLS) or `unix:///path/redis.sock?db=N`; "
      "required with `RATE_LIMIT_BACKEND=redis`. Never logged (only scheme, host and port)"),
    S("REDIS_PASSWORD_FILE", "redis_password", first_line_secret, None,
      "File whose first line is the Redis password; keeps it out of the environment (a URL that "
      "also carries one is refused)"),
    S("RATE_LIMIT_REDIS_TIMEOUT_MS", "rate_limit_redis_timeout_s", number(1, 10_000, 1e-3), "50",
      "Longest a decision waits for Redis (connecting included) before the failure policy "
      "applies"),
    S("REDIS_KEY_PREFIX", "redis_key_prefix", redis_prefix, "llm-edge-proxy:",
      "Prefix of every Redis key; give each deployment sharing a Redis its own"),
    S("RATE_LIMIT_TPM", "rate_limit_tpm", integer(0, 10**12), "0",
      "Tokens per minute per key (0: no token limit); per-key `tpm` in the keys file overrides "
      "it"),
    S("RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS", "rate_limit_tpm_default_max_tokens",
      integer(1, 10**9), "1024",
      "Output tokens reserved for a request that sets no output cap its API obeys (a "
      "reservation, not a limit: the request is settled to the usage the upstream reports, "
      "into debt if it used more)"),
    # Budgets and usage per key (behaviour in edge.budgets)
    S("KEY_BUDGET_USD", "key_budget_usd", number(0, 1e9), "0",
      "Spend in USD allowed per period to keys that set no `budget_usd` in the keys file (0: "
      "no budget). Spend is priced from `PROVIDERS_FILE`'s prices"),
    S("KEY_BUDGET_PERIOD", "key_budget_period", choice(*PERIODS), DEFAULT_PERIOD,
      "The budget period of keys that set no `budget_period`: `day`, `week` (from Monday) or "
      "`month`, calendar periods in UTC"),
    S("STATE_DIR", "state_dir", file_name, None,
      "Directory of the usage store, `usage.<INSTANCE_NAME>.lmdb` (each key's spend, tokens "
      "and requests per period, read by `llm-edge-proxy usage`). Default: `$STATE_DIRECTORY` "
      "(systemd `StateDirectory=`), else a new private directory in the temp dir, removed at "
      "exit; keys with budgets then stop the start. Like the cache's, a directory the service "
      "did not create must be its own and not writable by others. Unused with "
      "`RATE_LIMIT_BACKEND=redis`, which keeps usage in Redis",
      shown="see meaning"),
    S("KEY_MAX_PARALLEL", "key_max_parallel", integer(0, 1_000_000), "0",
      "Requests a key may have in flight at once, host-wide, when it sets no `max_parallel` in "
      "the keys file (`API_KEYS` and `API_KEY_HASHES` keys too); beyond → 429 "
      "`too_many_parallel_requests`. 0: no cap"),
    # Response cache (behaviour in edge.cache)
    S("CACHE_BACKEND", "cache_backend", choice(*CACHE_BACKENDS), "off",
      "`off`, `local` (one store per host, shared by every worker, kept across reloads and "
      "restarts) or `redis` (the local store in front of `REDIS_URL`'s Redis, shared by every "
      "host)"),
    S("CACHE_DIR", "cache_dir", file_name, None,
      "Directory of the local store. Default: `$CACHE_DIRECTORY` (systemd `CacheDirectory=`), "
      "else a new private directory in the temp dir, removed at exit. Like the metrics "
      "directory, one the service did not create must be its own and not writable by others",
      shown="see meaning"),
    S("CACHE_TTL_SECONDS", "cache_ttl_s", number(1, 365 * 86_400), "3600",
      "How long a stored answer is served (a model's `cache_ttl_seconds` overrides it; a "
      "request's `cache.ttl` may only shorten it)"),
    S("CACHE_MAX_BYTES", "cache_max_bytes", integer(1 << 20, 1 << 44), "1073741824",
      "The local store's size on disk; the oldest entries are evicted to stay within it"),
    S("CACHE_MAX_ENTRY_BYTES", "cache_max_entry_bytes", integer(1024, 1 << 30), "1048576",
      "Larger answers (a stream: all its events) are not stored"),
    S("CACHE_SCOPE", "cache_scope", choice(*CACHE_SCOPES), "key",
      "`key`: an answer is served only to the key that caused it (to the client address with "
      "auth off); `shared`: to every key"),
    # Observability
    S("LOG_LEVEL", "log_level", choice(*LOG_LEVELS), "info",
      "`debug`, `info`, `warning`, `error`, `critical`"),
    S("ACCESS_LOG_FLUSH_MS", "access_log_flush_ms", integer(1, 60_000), "50",
      "Longest time an access line waits in its worker's buffer (also written at 64 KiB and at "
      "shutdown); a SIGKILLed worker loses at most this much"),
    S("ENABLE_TRACING", "enable_tracing", boolean, "true",
      "Start a W3C trace id when the client sent no `traceparent`"),
    S("ENABLE_METRICS", "enable_metrics", boolean, "true", "Serve `/metrics` and record metrics"),
    # OpenTelemetry trace export (edge.observability.tracing): the standard OTEL_* variables
    S("OTEL_EXPORTER_OTLP_ENDPOINT", "otel_endpoint", parse_base_url, None,
      "OTLP/HTTP collector base URL (`/v1/traces` is appended). Spans are exported when this or "
      "the next one is set and `ENABLE_TRACING` is true; the collector is reached directly "
      "(`HTTP(S)_PROXY` is not used)"),
    S("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "otel_traces_endpoint", parse_base_url, None,
      "The traces endpoint, used as given (overrides the one above)"),
    S("OTEL_EXPORTER_OTLP_HEADERS", "otel_headers", key_values(True), None,
      "Headers sent to the collector, `key=value,…` (values percent-encoded); never logged",
      unset=()),
    S("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "otel_traces_headers", key_values(True), None,
      "Headers for the traces endpoint, instead of the ones above", unset=()),
    S("OTEL_EXPORTER_OTLP_PROTOCOL", "otel_protocol", choice(*OTEL_PROTOCOLS), "http/protobuf",
      "`http/protobuf` (the only one supported: `grpc` and `http/json` stop the start)"),
    S("OTEL_EXPORTER_OTLP_TIMEOUT", "otel_timeout_s", number(1, 600_000, 0.001), "10000",
      "Milliseconds one export may take, retries included (off the request path)"),
    S("OTEL_SERVICE_NAME", "otel_service_name", printable, None,
      "The `service.name` resource attribute (wins over one in `OTEL_RESOURCE_ATTRIBUTES`)",
      shown="`llm-edge-proxy`"),
    S("OTEL_RESOURCE_ATTRIBUTES", "otel_resource_attributes", key_values(False), None,
      "More resource attributes, `key=value,…` (e.g. `deployment.environment=prod`)",
      unset=()),
    S("OTEL_TRACES_SAMPLER", "otel_sampler", choice(*OTEL_SAMPLERS), "parentbased_always_on",
      "`parentbased_always_on`, `parentbased_always_off`, `parentbased_traceidratio`, "
      "`always_on`, `always_off` or `traceidratio`. An unsampled request builds no span"),
    S("OTEL_TRACES_SAMPLER_ARG", "otel_sampler_arg", number(0, 1), "1.0",
      "The ratio of the `*traceidratio` samplers, 0 to 1"),
    S("OTEL_BSP_SCHEDULE_DELAY", "otel_bsp_delay_s", number(1, 3_600_000, 0.001), "5000",
      "Milliseconds between two exports of a worker's queued spans"),
    S("OTEL_BSP_EXPORT_TIMEOUT", "otel_bsp_export_timeout_s", number(1, 600_000, 0.001),
      "30000", "Milliseconds a worker waits at shutdown (or reload) to export what it queued; "
      "at most half of `GRACEFUL_TIMEOUT_SECONDS`"),
    S("OTEL_BSP_MAX_QUEUE_SIZE", "otel_bsp_max_queue", integer(1, 1_000_000), "2048",
      "Spans a worker holds for export; beyond it they are dropped and counted "
      "(`edge_trace_spans_total{result=\"dropped\"}`)"),
    S("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "otel_bsp_max_batch", integer(1, 1_000_000), "512",
      "Spans per export request (at most `OTEL_BSP_MAX_QUEUE_SIZE`)"),
    S("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "otel_capture_content", boolean,
      "false", "Put prompts and completions on the spans (`gen_ai.input.messages`, "
      "`gen_ai.output.messages`). Off: no message text is exported"),
    S("OTEL_SDK_DISABLED", "otel_sdk_disabled", boolean, "false",
      "`true`: export nothing, whatever else is set"),
    S("OTEL_TRACES_EXPORTER", "otel_traces_exporter", choice("otlp", "none"), "otlp",
      "`otlp`, or `none` to export nothing"),
    # TLS and HTTP/2 (HTTP/2 needs TLS: ALPN offers h2 and http/1.1)
    S("TLS_CERT_FILE", "tls_cert_file", readable_file, None,
      "PEM certificate (chain): terminate TLS in gunicorn. Needs `TLS_KEY_FILE`; unreadable or "
      "mismatched files stop the start"),
    S("TLS_KEY_FILE", "tls_key_file", readable_file, None,
      "PEM private key for `TLS_CERT_FILE`"),
    S("HTTP2_ENABLED", "http2_enabled", boolean, "false",
      "Serve HTTP/2 over TLS (ALPN `h2`, HTTP/1.1 still offered); requires TLS"),
    # Directories
    S("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir", file_name, None,
      "Where workers write metric files. Default: `$RUNTIME_DIRECTORY/metrics.<INSTANCE_NAME>` "
      "under systemd, else a new private directory in the temp dir with an unpredictable name "
      "(`tempfile.mkdtemp`, mode 0700). A directory the service did not just create must be a "
      "real directory (not a symlink), owned by the service's user, and not writable by group "
      "or others; otherwise the start stops with one line naming the problem",
      shown="see meaning"),
    S("RUNTIME_DIRECTORY", "runtime_directory", first_path, None,
      "Set by systemd (`RuntimeDirectory=`), not by hand: the metrics directory goes there"),
    S("CACHE_DIRECTORY", "cache_directory", first_path, None,
      "Set by systemd (`CacheDirectory=`), not by hand: the cache's local store goes there "
      "unless `CACHE_DIR` says otherwise"),
    S("STATE_DIRECTORY", "state_directory", first_path, None,
      "Set by systemd (`StateDirectory=`), not by hand: the usage store goes there unless "
      "`STATE_DIR` says otherwise"),
    S("CREDENTIALS_DIRECTORY", "credentials_directory", file_name, None,
      "Set by systemd (`LoadCredential=`), not by hand: where the credentials "
      "`upstream-api-key` and `api-keys.toml` are read from when `UPSTREAM_API_KEY_FILE` / "
      "`API_KEYS_FILE` are unset, and where relative paths in them are taken"),
)
# fmt: on
del S


@dataclass(frozen=True, slots=True)
class Config:
    """The validated settings; built by `from_env` only (defaults live in SETTINGS)."""

    # Server
    host: str
    port: int
    workers: int  # 0: not set; see default_workers()
    web_concurrency: int
    timeout_s: float
    max_request_size: int
    keepalive_s: int
    graceful_timeout_s: int
    max_request_line: int
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_timeout_s: float
    send_timeout_s: float
    max_concurrency: int
    instance: str
    # Upstream (None: the built-in mock provider answers)
    upstream_url: str | None
    upstream_api_key: str | None = field(repr=False)
    upstream_api_key_file: Path | None
    upstream_connect_timeout_s: float
    upstream_pool_size: int
    upstream_buffer_bytes: int
    # Providers and model routing (edge.routing.providers); overrides UPSTREAM_URL when set
    providers_file: Path | None
    anthropic_max_tokens: int
    # Authentication
    auth_enabled: bool
    api_keys: tuple[str, ...] = field(repr=False)
    api_key_hashes: tuple[str, ...]
    api_keys_file: Path | None
    auth_health_check: bool
    auth_metrics: bool
    public_paths: tuple[str, ...]
    # Rate limiting
    rate_limit_enabled: bool
    rate_limit_rpm: float
    rate_limit_burst: int
    rate_limit_slots: int
    rate_limit_lock_timeout_s: float
    rate_limit_failure_policy: str
    rate_limit_backend: str
    redis_url: str | None = field(repr=False)  # may carry a password
    redis_password: str | None = field(repr=False)  # from REDIS_PASSWORD_FILE
    rate_limit_redis_timeout_s: float
    redis_key_prefix: str
    rate_limit_tpm: int  # 0: no token limit unless a key sets its own `tpm`
    rate_limit_tpm_default_max_tokens: int
    # Budgets and usage per key (edge.budgets)
    key_budget_usd: float  # 0: no budget
    key_budget_period: str
    state_dir: Path | None  # the master sets the one it chose (edge.server.master)
    key_max_parallel: int  # 0: no cap unless a key sets its own `max_parallel`
    # Response cache (edge.cache)
    cache_backend: str
    cache_dir: Path | None  # the master sets the one it chose (edge.server.master)
    cache_ttl_s: float
    cache_max_bytes: int
    cache_max_entry_bytes: int
    cache_scope: str
    # Observability
    log_level: str
    access_log_flush_ms: int
    enable_tracing: bool
    enable_metrics: bool
    # OpenTelemetry trace export (edge.observability.tracing)
    otel_endpoint: str | None
    otel_traces_endpoint: str | None
    otel_headers: tuple[tuple[str, str], ...] = field(repr=False)
    otel_traces_headers: tuple[tuple[str, str], ...] = field(repr=False)
    otel_protocol: str
    otel_timeout_s: float
    otel_service_name: str | None
    otel_resource_attributes: tuple[tuple[str, str], ...]
    otel_sampler: str
    otel_sampler_arg: float
    otel_bsp_delay_s: float
    otel_bsp_export_timeout_s: float
    otel_bsp_max_queue: int
    otel_bsp_max_batch: int
    otel_capture_content: bool
    otel_sdk_disabled: bool
    otel_traces_exporter: str
    # TLS and HTTP/2
    tls_cert_file: Path | None
    tls_key_file: Path | None
    http2_enabled: bool
    # Directories
    prometheus_multiproc_dir: Path | None  # the master sets the one it chose (edge.server.master)
    runtime_directory: Path | None
    cache_directory: Path | None
    state_directory: Path | None
    credentials_directory: Path | None

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def export_traces(self) -> bool:
        """Spans are exported over OTLP (edge.observability.tracing)."""
        return (
            self.enable_tracing
            and not self.otel_sdk_disabled
            and self.otel_traces_exporter == "otlp"
            and (self.otel_endpoint or self.otel_traces_endpoint) is not None
        )

    @property
    def otel_traces_url(self) -> str | None:
        """Where spans go: the traces endpoint as given, else the base endpoint's
        `/v1/traces`."""
        if self.otel_traces_endpoint is not None:
            return self.otel_traces_endpoint
        return None if self.otel_endpoint is None else self.otel_endpoint + "/v1/traces"

    @property
    def bind(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            text = (environ.get(setting.variable) or "").strip() or setting.default
            value = setting.unset if text is None else setting.parse(setting.variable, text)
            if isinstance(setting.field, tuple):
                values.update(zip(setting.field, value, strict=True))
            else:
                values[setting.field] = value
        # What one setting alone cannot say.
        if values["instance"] is None:
            values["instance"] = f"port{values['port']}"
        credentials = values["credentials_directory"]
        values["api_keys_file"] = _credential_file(
            "API_KEYS_FILE", values["api_keys_file"], API_KEYS_CREDENTIAL, credentials
        )
        key_file = _credential_file(
            "UPSTREAM_API_KEY_FILE",
            values["upstream_api_key_file"],
            UPSTREAM_KEY_CREDENTIAL,
            credentials,
        )
        explicit = values["upstream_api_key_file"] is not None
        if key_file is not None and not explicit and not key_file.read_bytes()[:65536].strip():
            key_file = None  # an empty credential: no key from it (UPSTREAM_API_KEY may set one)
        if key_file is not None:
            if values["upstream_api_key"] is not None:
                raise ConfigError(
                    "UPSTREAM_API_KEY_FILE",
                    "set either UPSTREAM_API_KEY or UPSTREAM_API_KEY_FILE (or the "
                    f"{UPSTREAM_KEY_CREDENTIAL} credential), not both",
                )
            values["upstream_api_key"] = read_key_file("UPSTREAM_API_KEY_FILE", key_file, explicit)
            if values["upstream_api_key"] is None:
                key_file = None  # an empty credential: no upstream key, deliberately
        values["upstream_api_key_file"] = key_file
        _check_tls(values["tls_cert_file"], values["tls_key_file"])
        for backend in ("rate_limit_backend", "cache_backend"):
            if values[backend] == "redis" and values["redis_url"] is None:
                raise ConfigError("REDIS_URL", f"{backend.upper()}=redis needs REDIS_URL")
        if values["redis_password"] is not None and urlsplit(values["redis_url"] or "").password:
            raise ConfigError(
                "REDIS_PASSWORD_FILE", "REDIS_URL carries a password too: give it in one place"
            )
        _check_otel(values)
        if values["http2_enabled"] and values["tls_cert_file"] is None:
            raise ConfigError(
                "HTTP2_ENABLED", "HTTP/2 is served over TLS: set TLS_CERT_FILE and TLS_KEY_FILE"
            )
        return cls(**values)

    def default_workers(self) -> int:
        """Worker processes: WORKERS, else WEB_CONCURRENCY, else one per CPU.

        Async workers each multiplex thousands of connections, so the classic `2 * cores + 1`
        for sync workers only adds memory and context switches here.
        """
        if self.workers or self.web_concurrency:
            return self.workers or self.web_concurrency
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def _credential_file(
    name: str, path: Path | None, credential: str, directory: Path | None
) -> Path | None:
    """The file `name` names, or the systemd credential `credential` when `name` is unset.

    With $CREDENTIALS_DIRECTORY set, a relative path in `name` is resolved there.
    """
    if path is None:
        if directory is None or not (directory / credential).is_file():
            return None
        return directory / credential
    if directory is not None and not path.is_absolute():
        path = directory / path
    return readable_file(name, str(path))


def read_key_file(name: str, path: Path, explicit: bool) -> str | None:
    """One printable ASCII line, trimmed; never echoed in an error. Empty: None, unless the
    operator named the file explicitly (then it is a mistake)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise ConfigError(name, f"cannot read {str(path)!r}: {exc.strerror}") from None
    if len(data) > _MAX_SECRET_FILE:
        raise ConfigError(name, f"{str(path)!r} is larger than {_MAX_SECRET_FILE} bytes")
    try:
        key = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(name, f"{str(path)!r} holds non-ASCII bytes") from None
    if not key:
        if explicit:
            raise ConfigError(name, f"{str(path)!r} is empty")
        return None
    if not is_header_safe(key) or " " in key:
        raise ConfigError(
            name, f"{str(path)!r} holds characters an HTTP header cannot carry (one line?)"
        )
    return key


def load_toml(variable: str, path: Path) -> dict[str, Any]:
    """A TOML file a setting names (the keys file, the providers file), parsed; see
    `read_toml`."""
    return read_toml(variable, path)[0]


def read_toml(variable: str, path: Path) -> tuple[dict[str, Any], os.stat_result]:
    """A TOML file a setting names, parsed, and its status (from the descriptor it was read
    through). A file that cannot be read or parsed is a ConfigError naming `variable` (the
    line and column, never the value there).

    A file caught in the middle of an edit is refused rather than half applied: such a file
    is often still valid TOML, only shorter, and would silently drop keys or providers. So a
    file whose size or modification time changed while it was read, or that does not end with
    a newline (a complete file written by an editor or a tool does; one cut short by a write
    in progress usually does not), is a ConfigError too. Replacing the file by renaming a new
    one over it never shows a reader a partial file.
    """
    shown = repr(str(path))
    try:
        with path.open("rb") as handle:
            before = os.fstat(handle.fileno())
            data = handle.read()
            after = os.fstat(handle.fileno())
    except OSError as exc:
        raise ConfigError(variable, f"cannot read {shown}: {exc.strerror}") from None
    if _version(before) != _version(after) or len(data) != after.st_size:
        raise ConfigError(
            variable,
            f"{shown} changed while it was read (written in place?); nothing was taken from "
            "it. Write the new file beside it and rename it over the old one",
        )
    if not data.endswith(b"\n"):
        problem = "is empty" if not data else "does not end with a newline"
        raise ConfigError(
            variable,
            f"{shown} {problem}, as a file cut short by a write in progress would; nothing "
            "was taken from it. End it with a newline (a comment line, if it is meant to hold "
            "nothing), and replace it by renaming a new file over it",
        )
    try:
        return tomllib.loads(data.decode("utf-8")), after
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(variable, f"{shown} is not valid TOML: {exc}") from None


def _version(info: os.stat_result) -> tuple[int, int, int]:
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _check_otel(values: dict[str, Any]) -> None:
    """What the OTEL_* settings cannot say one by one."""
    if values["otel_bsp_max_batch"] > values["otel_bsp_max_queue"]:
        raise ConfigError(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "must be at most OTEL_BSP_MAX_QUEUE_SIZE"
        )
    if values["otel_protocol"] != "http/protobuf":
        raise ConfigError(
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            f"{values['otel_protocol']} is not supported here: use http/protobuf (the "
            "collector's port 4318)",
        )


def _check_tls(cert: Path | None, key: Path | None) -> None:
    """Both files or neither, and the key must match the certificate."""
    if cert is None and key is None:
        return
    if cert is None or key is None:
        missing = "TLS_CERT_FILE" if cert is None else "TLS_KEY_FILE"
        raise ConfigError(missing, "set both TLS_CERT_FILE and TLS_KEY_FILE, or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(
            "TLS_KEY_FILE",
            f"{str(key)!r} and {str(cert)!r} are not a usable certificate and key ({exc.reason})",
        ) from None


def markdown_table() -> str:
    """The README's configuration table, generated from SETTINGS."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    rows += [f"| `{s.variable}` | {s.default_text} | {s.meaning} |" for s in SETTINGS]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m edge.config: print the README table
    print(markdown_table(), end="")
