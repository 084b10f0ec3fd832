"""`[routing] stateful_provider` in PROVIDERS_FILE: it must name a provider of kind openai."""

from __future__ import annotations

import pytest

from edge.config import ConfigError
from edge.routing.providers import parse


def document(**routing: object) -> dict:
    return {
        "providers": {
            "primary": {"base_url": "http://127.0.0.1:9/v1"},
            "claude": {"base_url": "http://127.0.0.1:9/v1", "kind": "anthropic"},
        },
        "models": [{"name": "m", "targets": [{"provider": "primary"}]}],
        "routing": routing,
    }


def test_names_an_openai_provider() -> None:
    providers = parse(document(stateful_provider="primary"))
    assert providers.stateful is providers.providers["primary"]


def test_absent_means_none() -> None:
    assert parse(document()).stateful is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("missing", "must name a [providers.<name>] table"),
        ("claude", "must be a provider of kind openai"),
        ("", "must be a provider's name"),
        (3, "must be a provider's name"),
    ],
)
def test_refused_naming_the_field(value: object, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(document(stateful_provider=value))
    assert raised.value.variable == "PROVIDERS_FILE"
    assert "stateful_provider" in raised.value.problem
    assert says in raised.value.problem
