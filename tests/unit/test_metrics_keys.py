"""The `key` label of the token and cost families, and what a cache hit saved (#25, metrics).

Label values come from the key store only (a request's identity, or "none"); the children the
hot path resolves are cached per (model, key) within a bound; a hit's tokens and their USD
value are counted apart from what upstreams billed. Scraped in multiprocess mode, through
prometheus_client's own collector, as gunicorn's workers are.
"""

from __future__ import annotations

from pathlib import Path

import falcon.testing
import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from edge import cost
from edge.app import create_app
from edge.auth import digest_of, short_id
from edge.config import Config
from edge.observability import metrics as metrics_module
from edge.observability.metrics import Metrics
from edge.routing.providers import MOCK, Provider, Providers, Routing, Target, parse

PRICE = cost.Price(input=2.0, output=8.0)


@pytest.fixture
def multiprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    yield tmp_path
    values.close_all_multiprocess_files()


def scrape(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    text, _ = metrics.render()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def tokens(model: str, kind: str, key: str) -> tuple:
    return (("key", key), ("kind", kind), ("model", model))


def test_tokens_are_counted_per_model_and_key(multiprocess):
    metrics = Metrics(multiprocess)
    metrics.observe_tokens("m", 5, 7, identity="team-a")
    metrics.observe_tokens("m", 5, 7, identity="team-a")
    metrics.observe_tokens("m", 1, 2, identity="key-0123456789ab")
    metrics.observe_tokens("m", 3, 4)  # no key: auth off, or a public route
    got = scrape(metrics)
    assert got[("edge_tokens_total", tokens("m", "prompt", "team-a"))] == 10
    assert got[("edge_tokens_total", tokens("m", "completion", "team-a"))] == 14
    assert got[("edge_tokens_total", tokens("m", "completion", "key-0123456789ab"))] == 2
    assert got[("edge_tokens_total", tokens("m", "prompt", "none"))] == 3
    assert sum(v for (name, _), v in got.items() if name == "edge_tokens_total") == 34


def test_the_children_are_resolved_once_per_model_and_key():
    metrics = Metrics()
    metrics.observe_tokens("m", 1, 1, identity="team-a")
    first = metrics._token_counters[("m", "team-a")]
    metrics.observe_tokens("m", 1, 1, identity="team-a")
    assert metrics._token_counters[("m", "team-a")] is first
    metrics.observe_tokens("m", 1, 1, identity="team-b")
    assert metrics._token_counters[("m", "team-b")] is not first
    assert set(metrics._token_counters) == {("m", "team-a"), ("m", "team-b")}


def test_the_child_cache_is_bounded_and_counts_stay_exact(multiprocess, monkeypatch):
    monkeypatch.setattr(metrics_module, "MAX_TOKEN_CHILDREN", 4)
    metrics = Metrics(multiprocess, cache=True, cost=True)
    metrics.hit_price = lambda model: PRICE
    for _ in range(3):
        for index in range(10):
            metrics.observe_tokens("m", 1, 2, identity=f"k{index}")
            metrics.observe_tokens("m", 1, 2, cached=True, identity=f"k{index}")
            assert len(metrics._token_counters) <= 4 and len(metrics._saved_counters) <= 4
    got = scrape(metrics)
    for index in range(10):
        assert got[("edge_tokens_total", tokens("m", "prompt", f"k{index}"))] == 3
        assert got[("edge_tokens_total", tokens("m", "completion", f"k{index}"))] == 6
        assert got[("edge_cache_saved_tokens_total", tokens("m", "completion", f"k{index}"))] == 6
        saved = got[("edge_cache_saved_usd_total", (("key", f"k{index}"),))]
        assert saved == pytest.approx(3 * PRICE.cost(1, 2))


def test_a_hit_is_counted_apart_with_what_it_would_have_cost(multiprocess):
    metrics = Metrics(multiprocess, cache=True, cost=True)
    asked: list[str] = []

    def hit_price(model: str) -> cost.Price | None:
        asked.append(model)
        return PRICE if model == "priced" else None

    metrics.hit_price = hit_price
    metrics.observe_tokens("priced", 1000, 500, cached=True, identity="team-a")
    metrics.observe_tokens("unpriced", 1000, 500, cached=True, identity="team-a")
    got = scrape(metrics)
    assert got[("edge_cache_saved_tokens_total", tokens("priced", "prompt", "team-a"))] == 1000
    assert got[("edge_cache_saved_tokens_total", tokens("unpriced", "prompt", "team-a"))] == 1000
    expected = (1000 * 2.0 + 500 * 8.0) / 1e6
    assert got[("edge_cache_saved_usd_total", (("key", "team-a"),))] == pytest.approx(expected)
    # Nothing of a hit is in what upstreams billed, tokens or USD.
    assert not [name for name, _ in got if name in ("edge_tokens_total", "edge_cost_usd_total")]
    assert asked == ["priced", "unpriced"]  # the request's model, for the price only


def test_the_saving_family_exists_only_with_the_cache_and_prices():
    assert Metrics(cache=True, cost=True).cache_saved_usd is not None
    for cache, priced in ((True, False), (False, True), (False, False)):
        metrics = Metrics(cache=cache, cost=priced)
        assert metrics.cache_saved_usd is None
        if cache:  # the tokens still count, without a price to count them at
            metrics.hit_price = lambda model: PRICE
            metrics.observe_tokens("m", 1, 1, cached=True, identity="team-a")
            assert b"edge_cache_saved_usd" not in metrics.render()[0]


def test_a_hit_is_priced_at_its_models_first_priced_target():
    loaded = parse(
        {
            "providers": {name: {"base_url": "http://127.0.0.1:9/v1"} for name in "abc"},
            "models": [
                {
                    "name": "m",
                    "targets": [
                        {"provider": "a"},
                        {"provider": "b", "input_per_mtok": 1, "output_per_mtok": 2},
                        {"provider": "c", "input_per_mtok": 5, "output_per_mtok": 9},
                    ],
                },
                {"name": "free", "targets": [{"provider": "a"}]},
                {"name": "*", "price": {"input_per_mtok": 3}, "targets": [{"provider": "c"}]},
            ],
        }
    )
    assert loaded.hit_price("m") == cost.Price(1.0, 2.0)
    assert loaded.hit_price("free") is None
    assert loaded.hit_price("anything-else") == cost.Price(3.0, 0.0)  # the "*" entry's


def priced_mock() -> Providers:
    """The built-in mock with a price: the priced families and `hit_price` without an
    upstream (the mock's own answers are never billed: edge.routing.router)."""
    provider = Provider(MOCK, "", kind=MOCK)
    target = Target(provider, None, 1, "mock/*", PRICE)
    routing = Routing(fallback_enabled=False, max_retries=0, breakers_enabled=False)
    return Providers({MOCK: provider}, {"*": (target,)}, routing, False)


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "the same question"}]}


def test_the_app_labels_tokens_and_savings_by_key(monkeypatch):
    """Through the app, an API_KEYS key: a miss, then a hit saved at the model's price."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    plain = "sk-plain-keys-test"
    config = Config.from_env(
        {"API_KEYS": plain, "CACHE_BACKEND": "local", "RATE_LIMIT_ENABLED": "false"}
    )
    client = falcon.testing.TestClient(create_app(config, providers=priced_mock()))
    headers = {"authorization": f"Bearer {plain}"}
    miss = client.simulate_post("/v1/chat/completions", json=CHAT, headers=headers)
    assert miss.headers["x-cache"] == "miss"
    usage = miss.json["usage"]
    hit = client.simulate_post("/v1/chat/completions", json=CHAT, headers=headers)
    assert hit.headers["x-cache"] == "hit" and float(hit.headers["x-edge-cost-usd"]) == 0
    got = scrape(client.app.runtime.metrics)
    key = short_id(digest_of(plain))
    assert got[("edge_tokens_total", tokens("gpt-4o", "prompt", key))] == usage["prompt_tokens"]
    saved = ("edge_cache_saved_tokens_total", tokens("gpt-4o", "completion", key))
    assert got[saved] == usage["completion_tokens"]
    would_have_cost = PRICE.cost(usage["prompt_tokens"], usage["completion_tokens"])
    assert got[("edge_cache_saved_usd_total", (("key", key),))] == pytest.approx(would_have_cost)
    assert not [name for name, _ in got if name == "edge_cost_usd_total"]  # the hit cost 0
    keys = {dict(labels).get("key") for _, labels in got} - {None}
    assert keys == {key}
