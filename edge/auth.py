"""API-key authentication that is safe by construction.

Theory of operation
-------------------
Keys come from API_KEYS (plaintext), API_KEY_HASHES (SHA-256 hex) and API_KEYS_FILE (TOML). At
load every key becomes its SHA-256 digest and only digests are kept: plaintext is dropped from
the Config before workers are forked. A presented key is always hashed first and the digest of
the presented value is looked up, so presenting a stored digest authenticates only if it is
itself the SHA-256 of a stored digest, i.e. never (the reference crate compared the raw value
against the digest list, so a leaked digest worked as a password).

The lookup is a dict probe keyed by SHA-256(presented), then `hmac.compare_digest` against the
stored digest. CPython compares bytes in a dict probe only when their (randomised, 64-bit) hashes
already match, so the probe's timing says nothing useful about stored digests; the final
equality check is constant-time.

Each key has an identity: its configured `name`, or `key-` plus a short id derived from its
digest through a separate, personalised hash (so the id reveals nothing of the digest either).
Logs, metrics and the rate limiter see only that identity.

Reloads are visible: the master logs how many keys every load gave and, on a reload, which
identities were added, removed or changed (`changes`); a keys file that changed while it was
read, or does not end with a newline, is refused (edge.config.read_toml), so a file cut short
by an edit in progress cannot silently drop keys. A keys file that group or others may read
and that holds plaintext keys is reported in `warnings`, logged at start and on every reload.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import hashlib
import hmac
import math
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from edge.budgets.periods import PERIODS
from edge.config import SHA256_HEX_RE, Config, ConfigError, is_header_safe, read_toml
from edge.errors import Forbidden, Unauthorized

MAX_KEY_LENGTH = 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_FILE_FIELDS = frozenset(
    {"name", "key", "sha256", "rpm", "burst", "tpm", "models", "expires_at", "budget_usd",
     "budget_period", "max_parallel"}
)  # fmt: skip
MAX_PATTERNS = 256  # `models` entries per key
MAX_PATTERN = 256  # characters of one (a model name is at most 256)
MAX_PARALLEL = 1_000_000  # a key's `max_parallel` (KEY_MAX_PARALLEL has the same bound)
MAX_NAMES_LOGGED = 50  # identities listed per kind of change in a reload's log line


@dataclass(frozen=True, slots=True)
class KeyEntry:
    identity: str
    rpm: float | None = None
    burst: int | None = None
    tpm: int | None = None  # tokens per minute; 0 turns the token limit off for this key
    # The key's SHA-256 (what the store is indexed by): the response cache's scope, which must
    # follow the key itself, not a name a keys file may give another key later.
    digest: bytes = field(default=b"", repr=False)
    # The model names the key may use, shell-style patterns (`models` in the keys file); None:
    # every model. `allowed` is them compiled into one expression.
    models: tuple[str, ...] | None = None
    allowed: re.Pattern[str] | None = field(default=None, repr=False, compare=False)
    # After this (seconds since the epoch, UTC) the key is refused as if unknown.
    expires_at: float | None = None
    # Spend allowed per period (edge.budgets), USD; None: no budget. The period: "day",
    # "week" or "month" (None in the file's entry: KEY_BUDGET_PERIOD, set by KeyStore.load).
    budget_usd: float | None = None
    budget_period: str | None = None
    # Requests in flight at once, host-wide (edge.ratelimit.parallel); None: KEY_MAX_PARALLEL.
    max_parallel: int | None = None

    def may_use(self, model: str) -> bool:
        """Whether the key may use `model` (its `models` patterns, when it has any)."""
        return self.allowed is None or self.allowed.match(model) is not None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def model_patterns(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One expression matching a model name that any of the shell-style `patterns` matches
    (fnmatch's rules, case-sensitive: `*`, `?`, `[...]`)."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def digest_of(key: str | bytes) -> bytes:
    if isinstance(key, str):
        key = key.encode("utf-8", "surrogateescape")
    return hashlib.sha256(key).digest()


def short_id(digest: bytes) -> str:
    return "key-" + hashlib.blake2b(digest, digest_size=6, person=b"edge-key-id").hexdigest()


class KeyStore:
    """Digest → KeyEntry. Holds no plaintext key. `warnings`: lines for the log about how the
    keys are stored (never a key)."""

    __slots__ = ("_entries", "warnings")

    def __init__(self, entries: dict[bytes, KeyEntry], warnings: tuple[str, ...] = ()) -> None:
        self._entries = {digest: (digest, entry) for digest, entry in entries.items()}
        self.warnings = warnings

    def __len__(self) -> int:
        return len(self._entries)

    def _by_identity(self) -> dict[str, set[tuple[bytes, KeyEntry]]]:
        found: dict[str, set[tuple[bytes, KeyEntry]]] = {}
        for digest, entry in self._entries.values():
            found.setdefault(entry.identity, set()).add((digest, entry))
        return found

    def changes(self, previous: KeyStore) -> dict[str, list[str]]:
        """What a reload from `previous` to this store changed, by identity (never a key):
        `added` and `removed` identities, and `changed` ones (same identity, another key or
        other limits)."""
        old, new = previous._by_identity(), self._by_identity()
        return {
            "added": sorted(new.keys() - old.keys()),
            "removed": sorted(old.keys() - new.keys()),
            "changed": sorted(name for name in new.keys() & old.keys() if new[name] != old[name]),
        }

    def check_models(self, served: list[str] | None) -> None:
        """Refuse a key whose `models` pattern matches none of the `served` model names
        (PROVIDERS_FILE's; None: any name may be served, as with "*", UPSTREAM_URL or the
        mock, and nothing can be checked): a typo would otherwise lock the key out quietly."""
        if served is None:
            return
        for _, entry in self._entries.values():
            for pattern in entry.models or ():
                if not any(fnmatch.fnmatchcase(name, pattern) for name in served):
                    raise ConfigError(
                        "API_KEYS_FILE",
                        f"key {entry.identity!r}: 'models' pattern {pattern[:64]!r} matches no "
                        "model in PROVIDERS_FILE",
                    )

    def entries(self) -> list[KeyEntry]:
        return [entry for _, entry in self._entries.values()]

    def any_token_limit(self) -> bool:
        """Whether some key has a token limit of its own (`tpm` in API_KEYS_FILE)."""
        return any(entry.tpm for _, entry in self._entries.values())

    def lookup(self, presented: str) -> KeyEntry | None:
        if not presented or len(presented) > MAX_KEY_LENGTH:
            return None
        # ASGI header values are latin-1 decoded bytes; hash exactly the bytes sent.
        digest = hashlib.sha256(presented.encode("latin-1", "replace")).digest()
        found = self._entries.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]

    @classmethod
    def load(cls, config: Config) -> KeyStore:
        entries: dict[bytes, KeyEntry] = {}

        def add(variable: str, digest: bytes, entry: KeyEntry) -> None:
            if digest in entries:
                raise ConfigError(variable, f"duplicate key ({entry.identity})")
            entries[digest] = entry

        for key in config.api_keys:
            digest = digest_of(key)
            add("API_KEYS", digest, KeyEntry(short_id(digest), digest=digest))
        for hexdigest in config.api_key_hashes:
            digest = bytes.fromhex(hexdigest)
            add("API_KEY_HASHES", digest, KeyEntry(short_id(digest), digest=digest))
        warnings: tuple[str, ...] = ()
        if config.api_keys_file is not None:
            # A systemd credential is readable by the service's user only, whatever its mode
            # bits say (they may show the mask of the ACL systemd grants that user).
            credentials = config.credentials_directory
            credential = credentials is not None and config.api_keys_file.parent == credentials
            from_file, warnings = _read_keys_file(config.api_keys_file, warn=not credential)
            for digest, entry in from_file:
                add("API_KEYS_FILE", digest, entry)
        entries = {digest: _with_defaults(entry, config) for digest, entry in entries.items()}
        if config.auth_enabled and not entries:
            raise ConfigError(
                "AUTH_ENABLED",
                "authentication is on but no keys are configured: set API_KEYS, API_KEY_HASHES "
                "or API_KEYS_FILE, or set AUTH_ENABLED=false to run open deliberately",
            )
        return cls(entries, warnings)


def _read_keys_file(
    path: Path, warn: bool = True
) -> tuple[list[tuple[bytes, KeyEntry]], tuple[str, ...]]:
    """The file's keys, and the warnings about it (see `_exposure_warning`) unless `warn` is
    false."""
    variable = "API_KEYS_FILE"
    document, info = read_toml(variable, path)
    unknown = set(document) - {"keys"}
    if unknown:
        raise ConfigError(variable, f"unknown top-level table(s): {', '.join(sorted(unknown))}")
    items = document.get("keys", [])
    if not isinstance(items, list):
        raise ConfigError(variable, "expected [[keys]] entries")
    result = []
    names: set[str] = set()
    for index, item in enumerate(items, start=1):
        where = f"[[keys]] entry {index}"
        if not isinstance(item, dict):
            raise ConfigError(variable, f"{where} is not a table")
        extra = set(item) - _FILE_FIELDS
        if extra:
            named = item.get("name")
            if isinstance(named, str) and _NAME_RE.match(named):
                where = f"{where} (key {named!r})"
            raise ConfigError(variable, f"{where} has unknown field(s): {', '.join(sorted(extra))}")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(variable, f"{where}: 'name' must be 1-64 of A-Z a-z 0-9 _ . : -")
        if name in names:
            raise ConfigError(variable, f"{where}: duplicate name {name!r}")
        names.add(name)
        where = f"key {name!r}"
        has_key, has_hash = "key" in item, "sha256" in item
        if has_key == has_hash:
            raise ConfigError(variable, f"{where} needs exactly one of 'key' or 'sha256'")
        if has_key:
            key = item["key"]
            if not isinstance(key, str) or not key or not is_header_safe(key):
                raise ConfigError(variable, f"{where}: 'key' must be a non-empty ASCII string")
            digest = digest_of(key)
        else:
            hexdigest = item["sha256"]
            if not isinstance(hexdigest, str) or not SHA256_HEX_RE.match(hexdigest):
                raise ConfigError(variable, f"{where}: 'sha256' must be 64 hex characters")
            digest = bytes.fromhex(hexdigest)
        rpm = item.get("rpm")
        if rpm is not None and (
            isinstance(rpm, bool) or not isinstance(rpm, int | float) or not 0 < rpm <= 1e9
        ):
            raise ConfigError(variable, f"{where}: 'rpm' must be a number above 0")
        burst = item.get("burst")
        if burst is not None and (
            isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= 10**9
        ):
            raise ConfigError(variable, f"{where}: 'burst' must be a whole number of at least 1")
        tpm = item.get("tpm")
        if tpm is not None and (
            isinstance(tpm, bool) or not isinstance(tpm, int) or not 0 <= tpm <= 10**12
        ):
            raise ConfigError(variable, f"{where}: 'tpm' must be a whole number of at least 0")
        rate = None if rpm is None else float(rpm)
        models = _models(item.get("models"), where, variable) if "models" in item else None
        expires = _expires_at(item["expires_at"], where, variable) if "expires_at" in item else None
        allowed = None if models is None else model_patterns(models)
        budget = _budget(item, where, variable)
        period = item.get("budget_period")
        if period is not None and period not in PERIODS:
            raise ConfigError(
                variable, f"{where}: 'budget_period' must be one of {', '.join(PERIODS)}"
            )
        entry = KeyEntry(name, rate, burst, tpm, digest, models, allowed, expires, budget, period)
        if "max_parallel" in item:
            parallel = _max_parallel(item["max_parallel"], where, variable)
            entry = dataclasses.replace(entry, max_parallel=parallel)
        result.append((digest, entry))
    if not warn:
        return result, ()
    plaintext = sum(1 for item in items if "key" in item)
    warning = _exposure_warning(path, stat.S_IMODE(info.st_mode), plaintext, len(items))
    return result, (warning,) if warning else ()


def _with_defaults(entry: KeyEntry, config: Config) -> KeyEntry:
    """`entry` with the environment's defaults (KEY_*) for what it does not set itself."""
    budget = entry.budget_usd
    if budget is None and config.key_budget_usd > 0:
        budget = config.key_budget_usd
    period = entry.budget_period or config.key_budget_period
    if budget == entry.budget_usd and period == entry.budget_period:
        return entry
    return dataclasses.replace(entry, budget_usd=budget, budget_period=period)


def _budget(item: dict[str, object], where: str, variable: str) -> float | None:
    """A key's `budget_usd`: a number of USD from 0 to 1e9 (0 admits no priced request)."""
    value = item.get("budget_usd")
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= 1e9
    ):
        raise ConfigError(variable, f"{where}: 'budget_usd' must be a number of USD from 0")
    return float(value)


def _models(value: object, where: str, variable: str) -> tuple[str, ...]:
    """A key's `models`: a list of 1 to MAX_PATTERNS shell-style patterns."""
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_PATTERNS
        or not all(isinstance(p, str) and 1 <= len(p) <= MAX_PATTERN for p in value)
    ):
        raise ConfigError(
            variable,
            f"{where}: 'models' must be a list of 1 to {MAX_PATTERNS} model names or patterns "
            f"(each 1 to {MAX_PATTERN} characters)",
        )
    return tuple(value)


def _max_parallel(value: object, where: str, variable: str) -> int:
    """A key's `max_parallel`: a whole number of requests in flight, 1 to MAX_PARALLEL."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PARALLEL:
        raise ConfigError(
            variable, f"{where}: 'max_parallel' must be a whole number from 1 to {MAX_PARALLEL}"
        )
    return value


def _expires_at(value: object, where: str, variable: str) -> float:
    """A key's `expires_at`: a TOML date-time with its offset (`2027-01-01T00:00:00Z`), or a
    date (midnight UTC), as seconds since the epoch."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ConfigError(
                variable,
                f"{where}: 'expires_at' needs its UTC offset (e.g. 2027-01-01T00:00:00Z)",
            )
        return value.timestamp()
    if isinstance(value, datetime.date):
        return datetime.datetime(
            value.year, value.month, value.day, tzinfo=datetime.UTC
        ).timestamp()
    raise ConfigError(
        variable, f"{where}: 'expires_at' must be a date-time such as 2027-01-01T00:00:00Z"
    )


def _exposure_warning(path: Path, mode: int, plaintext: int, total: int) -> str | None:
    """One line when a keys file others may read holds plaintext keys: naming the file, its
    mode and how many entries are plaintext, never a key."""
    if not plaintext or not mode & (stat.S_IRGRP | stat.S_IROTH):
        return None
    readers = [
        who for bit, who in ((stat.S_IRGRP, "group"), (stat.S_IROTH, "others")) if mode & bit
    ]
    return (
        f"API_KEYS_FILE {str(path)!r} is readable by {' and '.join(readers)} (mode {mode:04o}) "
        f"and holds {plaintext} of its {total} keys in plaintext ('key ='): store their "
        "SHA-256 digests ('sha256 =') instead, or let only the service's user read the file"
    )


def presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    """The key from `x-api-key`, else from `Authorization: Bearer …`; None when absent."""
    if x_api_key is not None:
        return x_api_key.strip()
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()


def check_model(entry: KeyEntry | None, model: str | None) -> None:
    """403 `model_not_allowed`, naming the model, when the key may not use it (`models`)."""
    if entry is not None and model is not None and not entry.may_use(model):
        raise Forbidden(
            f"This key may not use the model '{model[:256]}'.",
            param="model",
            code="model_not_allowed",
        )


def unauthorized(missing: bool) -> Unauthorized:
    message = (
        "Missing API key. Send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'."
        if missing
        else "Invalid API key."
    )
    return Unauthorized(message, headers={"www-authenticate": "Bearer"})
