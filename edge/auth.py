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
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from edge.config import SHA256_HEX_RE, Config, ConfigError, is_header_safe, load_toml
from edge.errors import Unauthorized

MAX_KEY_LENGTH = 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_FILE_FIELDS = frozenset({"name", "key", "sha256", "rpm", "burst", "tpm"})


@dataclass(frozen=True, slots=True)
class KeyEntry:
    identity: str
    rpm: float | None = None
    burst: int | None = None
    tpm: int | None = None  # tokens per minute; 0 turns the token limit off for this key


def digest_of(key: str | bytes) -> bytes:
    if isinstance(key, str):
        key = key.encode("utf-8", "surrogateescape")
    return hashlib.sha256(key).digest()


def short_id(digest: bytes) -> str:
    return "key-" + hashlib.blake2b(digest, digest_size=6, person=b"edge-key-id").hexdigest()


class KeyStore:
    """Digest → KeyEntry. Holds no plaintext key."""

    __slots__ = ("_entries",)

    def __init__(self, entries: dict[bytes, KeyEntry]) -> None:
        self._entries = {digest: (digest, entry) for digest, entry in entries.items()}

    def __len__(self) -> int:
        return len(self._entries)

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
            add("API_KEYS", digest, KeyEntry(short_id(digest)))
        for hexdigest in config.api_key_hashes:
            digest = bytes.fromhex(hexdigest)
            add("API_KEY_HASHES", digest, KeyEntry(short_id(digest)))
        if config.api_keys_file is not None:
            for digest, entry in _read_keys_file(config.api_keys_file):
                add("API_KEYS_FILE", digest, entry)
        if config.auth_enabled and not entries:
            raise ConfigError(
                "AUTH_ENABLED",
                "authentication is on but no keys are configured: set API_KEYS, API_KEY_HASHES "
                "or API_KEYS_FILE, or set AUTH_ENABLED=false to run open deliberately",
            )
        return cls(entries)


def _read_keys_file(path: Path) -> list[tuple[bytes, KeyEntry]]:
    variable = "API_KEYS_FILE"
    document = load_toml(variable, path)
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
        result.append((digest, KeyEntry(name, None if rpm is None else float(rpm), burst, tpm)))
    return result


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


def unauthorized(missing: bool) -> Unauthorized:
    message = (
        "Missing API key. Send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'."
        if missing
        else "Invalid API key."
    )
    return Unauthorized(message, headers={"www-authenticate": "Bearer"})
