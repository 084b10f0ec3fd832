"""Providers and model routes: PROVIDERS_FILE (TOML), the one-provider UPSTREAM_URL case, or
neither: the built-in mock (edge.routing.mock) as the one provider of every model.

Loaded and validated in the gunicorn master (and again on HUP: a file that no longer validates
is refused and the running one stays). A problem raises ConfigError("PROVIDERS_FILE", ...)
naming the table and field, never a key's value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.config import (
    Config,
    ConfigError,
    is_header_safe,
    load_toml,
    parse_base_url,
    read_key_file,
)
from edge.cost import FIELDS as PRICE_FIELDS
from edge.cost import Price, parse_price

VARIABLE = "PROVIDERS_FILE"
KINDS = ("openai", "anthropic")  # the wire format a provider speaks (edge.errors OPENAI, ...)
MOCK = "mock"  # the kind of the built-in mock: it speaks every API; never in a file
STRATEGIES = ("weighted", "priority", "least-busy")
WILDCARD = "*"
MAX_PROVIDERS = 64
MAX_MODELS = 4096
MAX_TARGETS = 16
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_PROVIDER_FIELDS = frozenset(
    {"base_url", "api_key", "api_key_file", "timeout_seconds", "max_retries", "kind"}
)
_TARGET_FIELDS = frozenset({"provider", "model", "weight", *PRICE_FIELDS})
_MODEL_FIELDS = frozenset(
    {"name", "targets", "cache", "cache_ttl_seconds", "max_tokens_default", "price"}
)


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float | None = None
    kind: str = "openai"

    def auth_headers(self) -> dict[str, str]:
        if not self.api_key:
            return {}
        if self.kind == "anthropic":
            return {"x-api-key": self.api_key}
        return {"authorization": f"Bearer {self.api_key}"}

    def describe(self) -> dict[str, Any]:
        """What /health may show (it is public by default): no key, no URL, no file path."""
        return {"kind": self.kind}


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    model: str | None  # the upstream's name for the model; None: the client's, unchanged
    weight: int = 1
    # The target's own breaker (edge.routing.breaker): the provider and the upstream model it
    # names (the [[models]] entry's name when it renames nothing, "*" included), so it is
    # bounded by configuration, never by the model names clients send.
    breaker: str = ""
    price: Price | None = None  # USD per million tokens (edge.cost); None: no cost known


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_threshold: int = 5
    timeout_s: float = 30.0
    success_threshold: int = 3
    half_open_max: int = 2  # probe requests in flight at once while half-open


@dataclass(frozen=True, slots=True)
class Routing:
    strategy: str = "weighted"
    breaker: BreakerPolicy = BreakerPolicy()
    fallback_enabled: bool = True
    max_retries: int = 2
    breakers_enabled: bool = True
    # The provider that serves the stateful endpoints (/v1/files, /v1/batches, a stored
    # response): an object made at one provider exists only there, so they are pinned to one.
    stateful_provider: str | None = None


@dataclass(frozen=True, slots=True)
class CacheRule:
    """A [[models]] entry's cache settings (edge.cache): off, or another TTL."""

    enabled: bool = True
    ttl_s: float | None = None  # None: CACHE_TTL_SECONDS


@dataclass(frozen=True, slots=True)
class Providers:
    providers: dict[str, Provider]
    models: dict[str, tuple[Target, ...]]
    routing: Routing = Routing()
    from_file: bool = True
    cache: dict[str, CacheRule] = field(default_factory=dict)  # by [[models]] name
    # [[models]] max_tokens_default by name: an OpenAI call translated for an Anthropic target
    max_tokens: dict[str, int] = field(default_factory=dict)

    def priced_model(self, model: str) -> bool:
        """Whether one of `model`'s targets has prices (its streams must report usage)."""
        return any(target.price is not None for target in self.targets(model) or ())

    def price_ceiling(self, model: str) -> Price | None:
        """The highest input and output prices among `model`'s targets (any may answer it:
        what a budget reserves for it); None when none has prices."""
        prices = [t.price for t in self.targets(model) or () if t.price is not None]
        if not prices:
            return None
        return Price(max(p.input for p in prices), max(p.output for p in prices))

    def hit_price(self, model: str) -> Price | None:
        """The price a response-cache hit of `model` is saved at (edge_cache_saved_usd_total):
        that of the first of its targets, in the file's order, that has prices (the target a
        miss would have reached depends on the strategy, weights and breakers at the time);
        None when none has."""
        for target in self.targets(model) or ():
            if target.price is not None:
                return target.price
        return None

    @property
    def priced(self) -> bool:
        """Whether some target has prices (edge.cost): the cost metric exists then."""
        return any(t.price is not None for targets in self.models.values() for t in targets)

    def max_tokens_default(self, model: str) -> int | None:
        """The `max_tokens_default` of the entry that routes `model` (its own, else "*"'s)."""
        if model in self.models:
            return self.max_tokens.get(model)
        return self.max_tokens.get(WILDCARD)

    def cache_rule(self, model: str) -> CacheRule | None:
        """The cache settings of the entry that routes `model` (its own, else "*"'s)."""
        if model in self.models:
            return self.cache.get(model)
        return self.cache.get(WILDCARD)

    def targets(self, model: str) -> tuple[Target, ...] | None:
        found = self.models.get(model)
        if found is None:
            found = self.models.get(WILDCARD)
        return found

    def model_names(self) -> list[str]:
        return [name for name in self.models if name != WILDCARD]

    @property
    def default(self) -> Provider:
        """The provider of an exchange no model routes (GET /v1/models without a file)."""
        return next(iter(self.providers.values()))

    @property
    def stateful(self) -> Provider | None:
        """The provider of the stateful endpoints (`[routing] stateful_provider`), if any."""
        name = self.routing.stateful_provider
        return None if name is None else self.providers[name]

    @property
    def mock(self) -> bool:
        """Whether the built-in mock answers (no PROVIDERS_FILE, no UPSTREAM_URL)."""
        return self.default.kind == MOCK

    @classmethod
    def builtin_mock(cls) -> Providers:
        """No upstream configured: the built-in mock serves every model."""
        provider = Provider(MOCK, "", kind=MOCK)
        routing = Routing(fallback_enabled=False, max_retries=0, breakers_enabled=False)
        target = Target(provider, None, 1, "mock/*")
        return cls({MOCK: provider}, {WILDCARD: (target,)}, routing, False)

    @classmethod
    def single(cls, config: Config) -> Providers:
        """UPSTREAM_URL / UPSTREAM_API_KEY: one provider serving every model, no breaker."""
        assert config.upstream_url is not None
        provider = Provider("default", config.upstream_url, config.upstream_api_key)
        return cls(
            {"default": provider},
            {WILDCARD: (Target(provider, None, 1, "default/*"),)},
            Routing(fallback_enabled=False, max_retries=0, breakers_enabled=False),
            from_file=False,
        )


def load_for(config: Config) -> Providers:
    """The providers of this config: the file, else UPSTREAM_URL, else the built-in mock."""
    if config.providers_file is not None:
        return load_file(config.providers_file)
    if config.upstream_url is not None:
        return Providers.single(config)
    return Providers.builtin_mock()


def load_file(path: Path) -> Providers:
    return parse(load_toml(VARIABLE, path), base_dir=path.parent)


def _fail(problem: str) -> ConfigError:
    return ConfigError(VARIABLE, problem)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(f"{where} must be a table")
    return value


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(f"{where} must be a number")
    if not low <= value <= high:
        raise _fail(f"{where} must be between {low:g} and {high:g}")
    return float(value)


def _integer(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{where} must be a whole number")
    if not low <= value <= high:
        raise _fail(f"{where} must be between {low} and {high}")
    return value


def parse(document: dict[str, Any], base_dir: Path | None = None) -> Providers:
    unknown = set(document) - {"providers", "models", "routing"}
    if unknown:
        raise _fail(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
    raw_providers = _table(document.get("providers", {}), "[providers]")
    if not raw_providers:
        raise _fail("no [providers.<name>] table")
    if len(raw_providers) > MAX_PROVIDERS:
        raise _fail(f"at most {MAX_PROVIDERS} providers")
    providers = {
        name: _provider(name, _table(value, f"[providers.{name}]"), base_dir)
        for name, value in raw_providers.items()
    }
    raw_models = document.get("models", [])
    if not isinstance(raw_models, list) or not raw_models:
        raise _fail("needs at least one [[models]] entry")
    if len(raw_models) > MAX_MODELS:
        raise _fail(f"at most {MAX_MODELS} [[models]] entries")
    models: dict[str, tuple[Target, ...]] = {}
    cache: dict[str, CacheRule] = {}
    max_tokens: dict[str, int] = {}
    for index, raw in enumerate(raw_models):
        where = f"[[models]] #{index + 1}"
        raw = _table(raw, where)
        extra = set(raw) - _MODEL_FIELDS
        if extra:
            raise _fail(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        name = raw.get("name")
        if not isinstance(name, str) or not name or len(name) > 256:
            raise _fail(f"{where}: 'name' must be a non-empty string (at most 256 characters)")
        if name in models:
            raise _fail(f"{where}: model {name!r} is listed twice")
        try:
            price = parse_price(_table(raw.get("price", {}), f"{where} ({name}) price"),
                                f"{where} ({name}) price")  # fmt: skip
        except ValueError as exc:
            raise _fail(str(exc)) from None
        if set(raw.get("price", {})) - set(PRICE_FIELDS):
            raise _fail(f"{where} ({name}) price: use {', '.join(PRICE_FIELDS)}")
        models[name] = _targets(raw.get("targets"), f"{where} ({name})", providers, name, price)
        rule = _cache_rule(raw, f"{where} ({name})")
        if rule is not None:
            cache[name] = rule
        if "max_tokens_default" in raw:
            at = f"{where} ({name}) max_tokens_default"
            max_tokens[name] = _integer(raw["max_tokens_default"], at, 1, 1_000_000)
    routing = _routing(_table(document.get("routing", {}), "[routing]"))
    _check_stateful(routing.stateful_provider, providers)
    return Providers(providers, models, routing, cache=cache, max_tokens=max_tokens)


def _cache_rule(raw: dict[str, Any], where: str) -> CacheRule | None:
    """A [[models]] entry's `cache` (bool) and `cache_ttl_seconds`, when it sets either."""
    if "cache" not in raw and "cache_ttl_seconds" not in raw:
        return None
    enabled = raw.get("cache", True)
    if not isinstance(enabled, bool):
        raise _fail(f"{where}: 'cache' must be true or false")
    ttl = None
    if "cache_ttl_seconds" in raw:
        ttl = _number(raw["cache_ttl_seconds"], f"{where} cache_ttl_seconds", 1, 365 * 86_400)
    return CacheRule(enabled, ttl)


def _provider(name: str, raw: dict[str, Any], base_dir: Path | None) -> Provider:
    where = f"[providers.{name}]"
    if not _NAME_RE.match(name):
        raise _fail(f"provider name {name[:64]!r}: use 1-64 letters, digits, '.', '-' or '_'")
    extra = set(raw) - _PROVIDER_FIELDS
    if extra:
        raise _fail(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
    url = raw.get("base_url")
    if not isinstance(url, str):
        raise _fail(f"{where}: 'base_url' is required")
    if not url.strip():
        raise _fail(f"{where}: 'base_url' is empty")
    try:
        base_url = parse_base_url("base_url", url.strip())
    except ConfigError as exc:
        raise _fail(f"{where}: base_url {exc.problem}") from None
    if "api_key" in raw and "api_key_file" in raw:
        raise _fail(f"{where}: set api_key or api_key_file, not both")
    key = raw.get("api_key")
    if "api_key_file" in raw:
        file_value = raw["api_key_file"]
        if not isinstance(file_value, str) or not file_value:
            raise _fail(f"{where}: 'api_key_file' must be a path")
        key_path = Path(file_value)
        if not key_path.is_absolute() and base_dir is not None:
            key_path = base_dir / key_path
        try:
            key = read_key_file("api_key_file", key_path, explicit=True)
        except ConfigError as exc:
            raise _fail(f"{where}: api_key_file: {exc.problem}") from None
    if key is not None and (not isinstance(key, str) or not key or not is_header_safe(key)):
        raise _fail(f"{where}: the API key must be printable ASCII (value not shown)")
    timeout = raw.get("timeout_seconds")
    timeout_s = None
    if timeout is not None:
        timeout_s = _number(timeout, f"{where} timeout_seconds", 0.001, 86_400)
    if "max_retries" in raw:  # accepted for the reference's schema; routing.fallback decides
        _integer(raw["max_retries"], f"{where} max_retries", 0, 10)
    kind = raw.get("kind", "openai")
    if kind not in KINDS:
        raise _fail(f"{where}: 'kind' must be one of {', '.join(KINDS)}")
    return Provider(name, base_url, key, timeout_s, kind)


def _targets(
    raw: Any,
    where: str,
    providers: dict[str, Provider],
    entry: str,
    price: Price | None = None,
) -> tuple[Target, ...]:
    """A [[models]] entry's targets; `price` (its `price` table) for those that set none."""
    if not isinstance(raw, list) or not raw:
        raise _fail(f"{where}: 'targets' must be a non-empty array")
    if len(raw) > MAX_TARGETS:
        raise _fail(f"{where}: at most {MAX_TARGETS} targets")
    targets = []
    kinds = set()
    for index, item in enumerate(raw):
        at = f"{where} target #{index + 1}"
        item = _table(item, at)
        extra = set(item) - _TARGET_FIELDS
        if extra:
            raise _fail(f"{at}: unknown key(s) {', '.join(sorted(extra))}")
        provider = providers.get(item.get("provider"))  # type: ignore[arg-type]
        if provider is None:
            raise _fail(f"{at}: 'provider' must name a [providers.<name>] table")
        model = item.get("model")
        if model is not None and (not isinstance(model, str) or not model or len(model) > 256):
            raise _fail(f"{at}: 'model' must be a non-empty string")
        weight = _integer(item.get("weight", 1), f"{at} weight", 1, 1_000_000)
        kinds.add(provider.kind)
        try:
            priced = parse_price(item, at, price)
        except ValueError as exc:
            raise _fail(str(exc)) from None
        breaker = f"{provider.name}/{model or entry}"
        targets.append(Target(provider, model, weight, breaker, priced))
    return tuple(targets)


def _routing(raw: dict[str, Any]) -> Routing:
    extra = set(raw) - {"strategy", "circuit_breaker", "fallback", "stateful_provider"}
    if extra:
        raise _fail(f"[routing]: unknown key(s) {', '.join(sorted(extra))}")
    strategy = raw.get("strategy", "weighted")
    if strategy not in STRATEGIES:
        raise _fail(f"[routing] strategy must be one of {', '.join(STRATEGIES)}")
    cb = _table(raw.get("circuit_breaker", {}), "[routing.circuit_breaker]")
    extra = set(cb) - {"failure_threshold", "timeout_seconds", "success_threshold", "half_open_max"}
    if extra:
        raise _fail(f"[routing.circuit_breaker]: unknown key(s) {', '.join(sorted(extra))}")

    def cb_int(key: str, default: int) -> int:
        return _integer(cb.get(key, default), f"[routing.circuit_breaker] {key}", 1, 1000)

    policy = BreakerPolicy(
        failure_threshold=cb_int("failure_threshold", 5),
        timeout_s=_number(
            cb.get("timeout_seconds", 30), "[routing.circuit_breaker] timeout_seconds", 0.01, 3600
        ),
        success_threshold=cb_int("success_threshold", 3),
        half_open_max=cb_int("half_open_max", 2),
    )
    fb = _table(raw.get("fallback", {}), "[routing.fallback]")
    extra = set(fb) - {"enabled", "max_retries"}
    if extra:
        raise _fail(f"[routing.fallback]: unknown key(s) {', '.join(sorted(extra))}")
    enabled = fb.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail("[routing.fallback] enabled must be true or false")
    retries = _integer(fb.get("max_retries", 2), "[routing.fallback] max_retries", 0, 10)
    stateful = raw.get("stateful_provider")
    if stateful is not None and (not isinstance(stateful, str) or not stateful):
        raise _fail("[routing] stateful_provider must be a provider's name")
    return Routing(strategy, policy, enabled, retries, stateful_provider=stateful)


def _check_stateful(name: str | None, providers: dict[str, Provider]) -> None:
    """`[routing] stateful_provider` names a provider of kind openai: the stateful endpoints
    are OpenAI's and are passed through untranslated."""
    if name is None:
        return
    provider = providers.get(name)
    if provider is None:
        raise _fail(
            f"[routing] stateful_provider {name[:64]!r} must name a [providers.<name>] table"
        )
    if provider.kind != "openai":
        raise _fail(
            f"[routing] stateful_provider {name[:64]!r} must be a provider of kind openai "
            f"(it is {provider.kind})"
        )
