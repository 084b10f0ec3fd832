"""What a request asks of the cache, and the key its answer is stored under (sans I/O).

Theory of operation
-------------------
A request's cache key is a SHA-256 of: the scope (the key's identity under CACHE_SCOPE=key,
nothing under `shared`), the route, the namespace the request names (LiteLLM's
`cache.namespace`), and the whole body in canonical form: parsed, keys sorted at every level,
no whitespace (orjson's OPT_SORT_KEYS). Only the cache controls themselves (the body's `cache`
object) are left out, so two requests differing in any other field, one no one has heard of
yet included, never share an answer (LiteLLM #25673: keys built from an allow-list of fields).
`stream` is part of the body, so a stream is replayed as a stream and a whole answer as a whole
answer.

Controls come from two places, honoured the same way:

- the `Cache-Control` request header: `no-cache` (skip the lookup, store the fresh answer),
  `no-store` (neither read nor write), `max-age=N` (only entries younger than N seconds);
  unknown directives are ignored, as HTTP asks;
- LiteLLM's body object `"cache": {"no-cache": bool, "no-store": bool, "ttl": seconds,
  "s-maxage": seconds, "namespace": str}`. It is removed before the body goes upstream (the
  official APIs reject unknown fields); a wrong type is 400 naming `cache`.

A request the Responses API keeps state for (`previous_response_id`, `conversation`, `store:
true`, `background: true`) depends on state the body does not show, or makes state a replay
would not: it is never looked up nor stored.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import orjson

from edge.errors import BadRequest

KEY_VERSION = b"edge-cache/1\x00"
MAX_NAMESPACE = 256
MAX_TTL_S = 365 * 86_400.0
MAX_CANONICAL_DEPTH = 254  # orjson.dumps's own limit: deeper bodies are not cached
_STATEFUL = ("previous_response_id", "conversation")


@dataclass(slots=True)
class Controls:
    """What one request asks of the cache."""

    lookup: bool = True  # read the cache (no `no-cache`, no `no-store`)
    store: bool = True  # write the fresh answer (no `no-store`)
    max_age_s: float | None = None  # accept only entries younger than this
    ttl_s: float | None = None  # store for this long instead of the configured TTL
    namespace: str = ""


BYPASS = Controls(lookup=False, store=False)


def controls(header: str | None, data: dict[str, Any]) -> Controls:
    """The request's controls: the `Cache-Control` header and the body's `cache` object,
    which this removes from `data` (the caller re-writes the body when it was there)."""
    found = Controls()
    if header:
        _header_controls(header, found)
    if "cache" in data:
        _body_controls(data.pop("cache"), found)
    if _stateful(data):
        return BYPASS
    return found


def _header_controls(header: str, found: Controls) -> None:
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        name = name.strip().lower()
        if name == "no-store":
            found.lookup = found.store = False
        elif name == "no-cache":
            found.lookup = False
        elif name == "max-age":
            age = value.strip().strip('"')
            if age.isascii() and age.isdigit():  # anything else is ignored, as HTTP asks
                _younger(found, float(int(age)))


def _body_controls(value: Any, found: Controls) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise BadRequest("'cache' must be an object of cache controls.", param="cache")
    if _flag(value, "no-store"):
        found.lookup = found.store = False
    if _flag(value, "no-cache"):
        found.lookup = False
    ttl = _seconds(value, "ttl")
    if ttl is not None:
        if ttl <= 0:
            raise BadRequest("'cache.ttl' must be a number of seconds > 0.", param="cache")
        found.ttl_s = min(ttl, MAX_TTL_S)
    age = _seconds(value, "s-maxage")
    if age is not None:
        _younger(found, age)
    namespace = value.get("namespace")
    if namespace is not None:
        if not isinstance(namespace, str) or len(namespace) > MAX_NAMESPACE:
            raise BadRequest(
                f"'cache.namespace' must be a string of at most {MAX_NAMESPACE} characters.",
                param="cache",
            )
        found.namespace = namespace


def _flag(value: dict[str, Any], name: str) -> bool:
    flag = value.get(name)
    if flag is None:
        return False
    if not isinstance(flag, bool):
        raise BadRequest(f"'cache.{name}' must be a boolean.", param="cache")
    return flag


def _seconds(value: dict[str, Any], name: str) -> float | None:
    seconds = value.get(name)
    if seconds is None:
        return None
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        raise BadRequest(f"'cache.{name}' must be a number of seconds >= 0.", param="cache")
    return float(seconds)


def _younger(found: Controls, age: float) -> None:
    found.max_age_s = age if found.max_age_s is None else min(found.max_age_s, age)


def _stateful(data: dict[str, Any]) -> bool:
    """A Responses request whose answer depends on, or makes, state the upstream keeps."""
    if any(data.get(name) is not None for name in _STATEFUL):
        return True
    return data.get("store") is True or data.get("background") is True


def cache_key(scope: str, route: str, namespace: str, data: dict[str, Any]) -> bytes | None:
    """The 32-byte key of a request's answer (see the module docstring); None when the body
    cannot be written canonically (nested deeper than MAX_CANONICAL_DEPTH)."""
    try:
        canonical = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    digest = hashlib.sha256(KEY_VERSION)
    for part in (scope, route, namespace):
        encoded = part.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(4, "little"))
        digest.update(encoded)
    digest.update(canonical)
    return digest.digest()
