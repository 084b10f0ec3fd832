"""Prices and a request's cost (edge.cost), the prices in PROVIDERS_FILE, and the cache reads
edge.usage tells apart: sans I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge import cost, usage
from edge.config import ConfigError
from edge.observability.context import RequestContext
from edge.routing.providers import parse


def test_a_cost_prices_input_cache_reads_and_output_apart():
    price = cost.Price(input=2.5, output=10.0, cached_input=1.25)
    assert price.cost(1_000_000, 0) == 2.5
    assert price.cost(1000, 500, cached=400) == (600 * 2.5 + 400 * 1.25 + 500 * 10.0) / 1e6
    assert cost.Price(input=3.0).cost(100, 0, cached=100) == 300 / 1e6  # reads at input price
    assert price.cost(10, 0, cached=50) == 10 * 1.25 / 1e6  # never more reads than inputs


@given(
    st.integers(-(10**9), 10**9), st.integers(-(10**9), 10**9), st.integers(-(10**9), 10**9),
    st.floats(0, 1e3), st.floats(0, 1e3),
)  # fmt: skip
def test_a_cost_is_never_negative_and_grows_with_usage(prompt, completion, cached, i, o):
    price = cost.Price(i, o, i / 2)
    spent = price.cost(prompt, completion, cached)
    assert spent >= 0
    assert price.cost(prompt + 1, completion, cached) >= spent


def test_negative_usage_never_costs_less_than_nothing():
    assert cost.Price(2.0, 3.0).cost(-1_000_000, -5, cached=-3) == 0.0


def test_of_request():
    price = cost.Price(1.0, 2.0)
    assert cost.of_request(price, 10, 5, None, from_cache=True) == 0.0
    assert cost.of_request(None, 10, 5, None, from_cache=False) is None
    assert cost.of_request(price, None, None, None, from_cache=False) is None
    assert cost.of_request(price, 10, 5, None, from_cache=False) == 20 / 1e6
    assert cost.header_value(20 / 1e6) == "0.00002000"


def providers(price: dict, target: dict | None = None) -> dict:
    return {
        "providers": {"a": {"base_url": "http://127.0.0.1:9/v1"}},
        "models": [{"name": "m", "price": price, "targets": [{"provider": "a", **(target or {})}]}],
    }


def test_a_models_price_is_its_targets_default_field_by_field():
    loaded = parse(providers({"input_per_mtok": 2, "output_per_mtok": 8}, {"output_per_mtok": 4}))
    assert loaded.models["m"][0].price == cost.Price(2.0, 4.0, None)
    assert parse(providers({})).models["m"][0].price is None


@pytest.mark.parametrize(
    ("price", "target"),
    [
        ({"input_per_mtok": -1}, None),
        ({"input_per_mtok": "2.5"}, None),
        ({"input_per_mtok": True}, None),
        ({"input_per_mtok": float("inf")}, None),
        ({"inputs": 1}, None),
        ({}, {"output_per_mtok": -0.5}),
        ({}, {"cached_input_per_mtok": 1e12}),
    ],
)
def test_a_bad_price_is_refused_naming_the_field(price, target):
    with pytest.raises(ConfigError) as refused:
        parse(providers(price, target))
    assert refused.value.variable == "PROVIDERS_FILE" and "(m)" in str(refused.value)


@pytest.mark.parametrize(
    ("reported", "prompt", "cached"),
    [
        ({"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 40}}, 100, 40),
        ({"input_tokens": 100, "input_tokens_details": {"cached_tokens": 30}}, 100, 30),
        ({"input_tokens": 10, "cache_read_input_tokens": 50, "cache_creation_input_tokens": 5},
         65, 50),
        ({"prompt_tokens": 100}, 100, None),
        # a compatible server adding Anthropic's cache fields beside OpenAI's: counted once
        ({"prompt_tokens": 1100, "prompt_tokens_details": {"cached_tokens": 1000},
          "cache_read_input_tokens": 1000}, 1100, 1000),
        ({"input_tokens": 10, "cache_read_input_tokens": 50, "prompt_tokens_details": {}},
         60, 50),
        ({"prompt_tokens": 2**64, "completion_tokens": 2**64}, None, None),  # not believed
    ],
)  # fmt: skip
def test_cache_reads_are_told_apart(reported, prompt, cached):
    ctx = RequestContext("r", None)
    usage.record(ctx, reported)
    assert (ctx.prompt_tokens, ctx.cached_tokens) == (prompt, cached)
