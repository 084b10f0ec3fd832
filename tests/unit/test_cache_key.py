"""The cache's key and controls (edge.cache.key), sans I/O."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.cache.answers import terminal
from edge.cache.key import BYPASS, cache_key, controls
from edge.errors import BadRequest

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
BODIES = st.dictionaries(st.text(max_size=8), JSON, max_size=6)


def key(data, scope="key:a", route="openai/chat/completions", namespace=""):
    return cache_key(scope, route, namespace, data)


@given(BODIES)
def test_the_key_is_the_canonical_body_whatever_its_spelling(data):
    """Key order and whitespace are not the request: the same object, written any way, has
    one key."""
    reordered = orjson.loads(orjson.dumps(dict(reversed(list(data.items())))))
    assert key(data) == key(reordered)


@given(BODIES, st.text(min_size=1, max_size=8), JSON)
def test_any_field_changed_or_added_changes_the_key(data, name, value):
    """No allow-list of fields: a field no one has heard of still makes another key."""
    changed = {**data, name: value}
    if changed != data:
        assert key(changed) != key(data)


@given(BODIES)
def test_scope_route_and_namespace_each_change_the_key(data):
    base = key(data)
    assert key(data, scope="key:b") != base
    assert key(data, scope="") != base
    assert key(data, route="openai/completions") != base
    assert key(data, namespace="n") != base
    # The parts are length-prefixed: moving a character from one part to the next is another key.
    assert key(data, scope="ab", route="c") != key(data, scope="a", route="bc")


def test_a_body_deeper_than_orjson_writes_has_no_key():
    deep = orjson.loads("[" * 300 + "]" * 300)
    assert key({"x": deep}) is None


@pytest.mark.parametrize(
    ("header", "lookup", "store", "max_age"),
    [
        (None, True, True, None),
        ("no-cache", False, True, None),
        ("No-Store", False, False, None),
        ("max-age=30", True, True, 30.0),
        ("max-age=abc, no-cache", False, True, None),  # a malformed value is ignored
        ('max-age="5"', True, True, 5.0),
        ("private, max-age=5, max-age=2", True, True, 2.0),
        ("something-new", True, True, None),
    ],
)
def test_cache_control_header(header, lookup, store, max_age):
    found = controls(header, {"model": "m"})
    assert (found.lookup, found.store, found.max_age_s) == (lookup, store, max_age)


def test_body_controls_are_read_and_removed():
    data = {"model": "m", "cache": {"no-cache": True, "ttl": 60, "namespace": "n", "s-maxage": 9}}
    found = controls(None, data)
    assert "cache" not in data
    assert (found.lookup, found.store, found.ttl_s, found.namespace, found.max_age_s) == (
        False,
        True,
        60.0,
        "n",
        9.0,
    )
    data = {"model": "m", "cache": {"no-store": True}}
    assert controls(None, data).store is False and "cache" not in data


@pytest.mark.parametrize(
    "value",
    ["yes", 1, [], {"no-cache": "true"}, {"ttl": "60"}, {"ttl": 0}, {"ttl": -1},
     {"s-maxage": True}, {"namespace": 5}, {"namespace": "x" * 300}, {"ttl": float("nan")}],
)  # fmt: skip
def test_malformed_body_controls_are_400_naming_cache(value):
    with pytest.raises(BadRequest) as caught:
        controls(None, {"model": "m", "cache": value})
    assert caught.value.param == "cache"


@pytest.mark.parametrize(
    "data",
    [
        {"model": "m", "previous_response_id": "resp_1"},
        {"model": "m", "conversation": "conv_1"},
        {"model": "m", "store": True},
        {"model": "m", "background": True},
    ],
)
def test_requests_the_upstream_keeps_state_for_bypass_the_cache(data):
    assert controls(None, data) == BYPASS


@pytest.mark.parametrize(
    ("block", "whole"),
    [
        (b"data: {}\n\ndata: [DONE]\n\n", True),
        (b"data:[DONE]\r\n\r\n", True),
        (b'event: message_stop\ndata: {"type":"message_stop"}\n\n', True),
        (b'event: response.completed\ndata: {"type":"response.completed"}\n\n', True),
        (b'data: {"type": "response.completed", "response": {}}\n\n', True),
        (b'data: {"choices":[{"delta":{"content":"data: [DONE]"}}]}\n\n', False),
        (b'data: [DONE]\n\ndata: {"choices":[]}\n\n', False),  # not the last event
        (b'data: {"delta": "response.completed"}\n\n', False),
        (b"", False),
    ],
)
def test_terminal_event_is_the_last_event_only(block, whole):
    assert terminal(block) is whole
