"""PROVIDERS_FILE parsing and the router's sans-I/O parts (rename, order, backoff)."""

from __future__ import annotations

import json
import random
from collections import Counter

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config import ConfigError
from edge.routing import providers as pv
from edge.routing.breaker import LocalBreakers
from edge.routing.router import Router, _rename_scan, backoff, rename_model, retry_after_s

GOOD = """
[providers.primary]
base_url = "http://10.0.0.5:8000/v1/"
api_key = "sk-primary-secret"
timeout_seconds = 30
[providers.backup]
base_url = "https://api.example.com/v1"
api_key_file = "key.txt"
[providers.claude]
base_url = "https://api.anthropic.com/v1"
kind = "anthropic"
[[models]]
name = "gpt-4o-mini"
targets = [
  { provider = "primary", model = "qwen2.5-7b-instruct", weight = 3 },
  { provider = "backup", weight = 1 },
]
[[models]]
name = "*"
targets = [{ provider = "backup" }, { provider = "claude" }]
[routing]
strategy = "priority"
[routing.circuit_breaker]
failure_threshold = 4
timeout_seconds = 12
[routing.fallback]
max_retries = 1
"""


def load(tmp_path, text: str) -> pv.Providers:
    (tmp_path / "key.txt").write_text("sk-backup-secret\n")
    path = tmp_path / "providers.toml"
    path.write_text(text)
    return pv.load_file(path)


def test_good_file(tmp_path):
    loaded = load(tmp_path, GOOD)
    primary = loaded.providers["primary"]
    assert primary.base_url == "http://10.0.0.5:8000/v1"
    assert primary.auth_headers() == {"authorization": "Bearer sk-primary-secret"}
    assert loaded.providers["backup"].api_key == "sk-backup-secret"
    assert loaded.providers["claude"].kind == "anthropic"
    assert [t.model for t in loaded.targets("gpt-4o-mini")] == ["qwen2.5-7b-instruct", None]
    assert loaded.targets("anything-else")[0].provider.name == "backup"
    assert loaded.routing.strategy == "priority"
    assert loaded.routing.breaker.failure_threshold == 4
    assert loaded.routing.max_retries == 1
    assert loaded.model_names() == ["gpt-4o-mini"]
    assert "sk-" not in repr(loaded)
    assert (
        "sk-" not in orjson.dumps({k: p.describe() for k, p in loaded.providers.items()}).decode()
    )


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (("http://10.0.0.5:8000/v1/", "ftp://x"), "base_url"),
        (("http://10.0.0.5:8000/v1/", "http://user:pw@h/v1"), "credentials"),
        (('provider = "backup", weight = 1', 'provider = "nope"'), "provider"),
        (("weight = 3", "weight = 0"), "weight"),
        (('strategy = "priority"', 'strategy = "random"'), "strategy"),
        (("failure_threshold = 4", "failure_threshold = 0"), "failure_threshold"),
        (('kind = "anthropic"', 'kind = "gemini"'), "kind"),
        (("timeout_seconds = 30", "timeout_seconds = -1"), "timeout_seconds"),
        (("[routing]", "[routing]\nfoo = 1"), "unknown"),
        (('api_key_file = "key.txt"', 'api_key_file = "missing.txt"'), "api_key_file"),
        (('name = "*"', 'name = "gpt-4o-mini"'), "twice"),
        (('name = "*"', 'name = "*"\ncache = "no"'), "'cache' must be true or false"),
        (('name = "*"', 'name = "*"\ncache_ttl_seconds = 0'), "cache_ttl_seconds"),
        (('name = "*"', 'name = "*"\ncache_ttl_seconds = "1h"'), "cache_ttl_seconds"),
    ],
)
def test_bad_file_names_the_problem_not_the_secret(tmp_path, change, needle):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, GOOD.replace(*change))
    assert info.value.variable == "PROVIDERS_FILE"
    assert needle in str(info.value)
    assert "sk-primary-secret" not in str(info.value)


def test_models_cache_settings(tmp_path):
    text = GOOD.replace('name = "gpt-4o-mini"', 'name = "gpt-4o-mini"\ncache = false')
    text = text.replace('name = "*"', 'name = "*"\ncache_ttl_seconds = 60')
    loaded = load(tmp_path, text)
    assert loaded.cache_rule("gpt-4o-mini") == pv.CacheRule(False, None)
    assert loaded.cache_rule("anything-else") == pv.CacheRule(True, 60.0)  # the "*" entry's
    assert load(tmp_path, GOOD).cache_rule("gpt-4o-mini") is None  # the configured defaults


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path, "[providers\n")


def test_rename_touches_only_the_top_level_model():
    body = b'{"model" :"gpt-4o-mini","messages":[{"role":"user","model":"x"}],"z":"model"}'
    out = rename_model(body, "qwen/2.5")
    assert out == b'{"model" :"qwen/2.5","messages":[{"role":"user","model":"x"}],"z":"model"}'
    dup = b'{"model":"a","x":1,"model":"b"}'
    assert orjson.loads(rename_model(dup, "c")) == {"model": "c", "x": 1}
    assert rename_model(b'{"mod\\u0065l":"a"}', "c") == b'{"mod\\u0065l":"c"}'
    assert (
        rename_model(b'{"a":"\\"model\\"","model":"m"}', "n") == b'{"a":"\\"model\\"","model":"n"}'
    )


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
        b'{"messages":[{"content":"say \\"model\\": no"}],\n "model" :\t"gpt-4o-mini" }',
        b'{"messages":[{"model":"inner"}],"model":"gpt-4o-mini"}',
        b'{"model":"a","model":"b"}',
        b'{"mod\\u0065l":"a","x":{"model":"keep"}}',
        b'{"x":"\\u00e9","model":"a\\"b"}',
    ],
)
def test_fast_rename_agrees_with_the_full_scan(body):
    fast, full = rename_model(body, "new/name"), _rename_scan(body, "new/name")
    assert fast == full
    assert orjson.loads(fast)["model"] == "new/name"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
ESCAPED_MODEL_KEY = '"mod\\u0065l"'  # JSON text for the key "model", spelled with an escape


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.sampled_from(["model", "x", "messages", ESCAPED_MODEL_KEY]), json_values),
        max_size=6,
    ),
    last=st.text(max_size=8),
    spaced=st.booleans(),
)
def test_every_top_level_model_string_is_renamed_whatever_the_other_values(pairs, last, spaced):
    """Duplicate "model" keys whose values are objects or arrays used to put the scan out of
    step with the nesting, so a later top-level "model" went upstream un-renamed."""
    comma, colon = (", ", ": ") if spaced else (",", ":")
    members = [
        (key if key == ESCAPED_MODEL_KEY else json.dumps(key))
        + colon
        + json.dumps(value, separators=(comma, colon))
        for key, value in [*pairs, ("model", last)]
    ]
    body = ("{" + comma.join(members) + "}").encode()
    out = rename_model(body, "new/name")
    as_pairs = lambda text: json.loads(text, object_pairs_hook=lambda items: items)  # noqa: E731
    seen, sent = as_pairs(out), as_pairs(body)
    assert [value for key, value in seen if key == "model"] == [
        "new/name" if isinstance(value, str) else value for key, value in sent if key == "model"
    ]
    assert [pair for pair in seen if pair[0] != "model"] == [
        pair for pair in sent if pair[0] != "model"
    ]  # nothing else touched


def test_retry_after_headers():
    assert retry_after_s({"retry-after": "7"}) == 7.0
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "7"}) == 1.5
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_s({}) is None


def test_backoff_is_jittered_and_capped():
    rng = random.Random(1)
    first = [backoff(1, rng) for _ in range(200)]
    assert min(first) >= 0.4 and max(first) <= 0.6
    assert all(4.0 <= backoff(10, rng) <= 6.0 for _ in range(50))


def test_weighted_order_follows_weights(tmp_path):
    loaded = load(tmp_path, GOOD.replace('strategy = "priority"', 'strategy = "weighted"'))
    router = Router(loaded, None, LocalBreakers(), 30.0)  # type: ignore[arg-type]
    targets = router.targets("gpt-4o-mini", "openai")
    firsts = Counter(router.order(targets)[0].provider.name for _ in range(4000))
    assert 0.70 <= firsts["primary"] / 4000 <= 0.80


def test_targets_filter_by_kind_and_unknown_model_is_404(tmp_path):
    loaded = load(tmp_path, GOOD)
    router = Router(loaded, None, LocalBreakers(), 30.0)  # type: ignore[arg-type]
    assert [t.provider.name for t in router.targets("x", "anthropic")] == ["claude"]
    no_wildcard = pv.Providers(loaded.providers, {"m": loaded.models["gpt-4o-mini"]})
    router = Router(no_wildcard, None, LocalBreakers(), 30.0)  # type: ignore[arg-type]
    with pytest.raises(Exception) as info:
        router.targets("other", "openai")
    assert info.value.status == 404 and info.value.code == "model_not_found"


def test_ready_only_while_some_provider_can_serve_and_health_lists_breakers(tmp_path):
    import asyncio
    import socket

    import falcon.testing

    from edge.app import create_app
    from edge.config import Config
    from edge.errors import BadGateway
    from edge.observability.context import RequestContext
    from edge.routing import breaker as cb
    from edge.routing.exchange import Call

    with socket.socket() as sock:  # a port nothing listens on: every connection refused
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    text = GOOD.replace("http://10.0.0.5:8000/v1/", closed)
    text = text.replace("https://api.example.com/v1", closed)
    text = text.replace("https://api.anthropic.com/v1", closed)
    load(tmp_path, text)
    config = Config.from_env(
        {"AUTH_ENABLED": "false", "PROVIDERS_FILE": str(tmp_path / "providers.toml")}
    )
    app = create_app(config)
    router = app.runtime.router
    policy = router.providers.routing.breaker

    async def run() -> None:
        async with falcon.testing.ASGIConductor(app) as client:
            assert (await client.simulate_get("/health/ready")).status_code == 200
            health = (await client.simulate_get("/health")).json
            assert set(health["providers"]) == {"primary", "backup", "claude"}
            assert "sk-" not in str(health)
            for name in ("primary", "backup"):
                for _ in range(policy.failure_threshold):
                    router.breakers.update(name, lambda s, t: cb.on_failure(s, policy, t))
            assert (await client.simulate_get("/health/ready")).status_code == 200  # claude
            for _ in range(policy.failure_threshold):
                router.breakers.update("claude", lambda s, t: cb.on_failure(s, policy, t))
            assert (await client.simulate_get("/health/ready")).status_code == 503
            # Every target open: the request is sent anyway (panic routing), not refused; it
            # fails here only because nothing listens.
            call = Call("openai", "POST", "/chat/completions", b"{}", None, "gpt-4o-mini")
            ctx = RequestContext("panic", None)
            with pytest.raises(BadGateway):
                await router.exchange(ctx, call)
            assert ctx.upstream is not None and ctx.upstream.attempts == 2
            assert ctx.upstream.error == "connect"

    asyncio.run(run())
