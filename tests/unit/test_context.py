"""Request id and trace context (edge.observability.context): what is adopted from the client
and what is passed upstream."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.observability.context import RequestContext, sane_client, sane_request_id

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SAFE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# What may go upstream in tracestate: printable ASCII (and the list's spaces), bounded.
PRINTABLE = re.compile(r"[\x20-\x7e]{1,512}")


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\x00", " ", "\t"])
def test_a_request_id_with_a_trailing_control_or_space_is_replaced(suffix):
    assert sane_request_id("abc" + suffix) != "abc" + suffix
    assert SAFE_ID.fullmatch(sane_request_id("abc" + suffix))


@settings(max_examples=300)
@given(st.text(max_size=140))
def test_only_a_whole_safe_request_id_is_kept(value):
    result = sane_request_id(value)
    assert SAFE_ID.fullmatch(result)
    assert (result == value) == bool(SAFE_ID.fullmatch(value))


def tracestate_out(value: str | None) -> str | None:
    ctx = RequestContext("rid", None)
    ctx.set_trace(TRACEPARENT, value, start_new=False)
    assert ctx.traceparent_out is not None
    return ctx.tracestate


@pytest.mark.parametrize(
    "value",
    [
        "congo=t61\x00rcWkgMzE", "congo=abc\n", "congo=abc\r\nx-evil: 1", "congo=a\x7fb",
        "congo=a\x1bb", "congo=caf\u00e9", "Congo=upper-key", "congo", "=v", "congo=a=b",
        "rojo=1,rojo=2", ",".join(f"k{i}=v" for i in range(33)), "k=" + "v" * 600,
    ],
)  # fmt: skip
def test_an_invalid_tracestate_is_dropped_not_forwarded(value):
    assert tracestate_out(value) is None


@pytest.mark.parametrize(
    ("value", "forwarded"),
    [
        ("congo=t61rcWkgMzE", "congo=t61rcWkgMzE"),
        ("rojo=00f067aa0ba902b7, congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        ("fw529a3039@dt=00f067aa0ba902b7,,a=b c", "fw529a3039@dt=00f067aa0ba902b7,a=b c"),
    ],
)
def test_a_valid_tracestate_is_forwarded(value, forwarded):
    assert tracestate_out(value) == forwarded


@settings(max_examples=500)
@given(st.text(max_size=80) | st.from_regex(r"[a-z]{1,5}=[ -~]{0,10}(,[a-z]{1,5}=[ -~]{0,10})*"))
def test_whatever_goes_upstream_is_printable_and_bounded(value):
    result = tracestate_out(value)
    assert result is None or PRINTABLE.fullmatch(result)


@pytest.mark.parametrize(
    ("given", "kept"),
    [("10.0.0.7", "10.0.0.7"), ("::1", "::1"), ("2001:DB8::1", "2001:db8::1"),
     ("fe80::1%eth0", "fe80::1%eth0"), (None, None)],
)  # fmt: skip
def test_a_client_address_is_kept_as_an_ip_address(given, kept):
    assert sane_client(given) == kept


@given(st.text(max_size=300))
def test_anything_else_a_forwarding_header_says_is_no_client_address(value):
    """uvicorn passes a trusted proxy's X-Forwarded-For on unchecked: only an IP address is
    kept (for the access line and the per-address rate-limit buckets)."""
    import ipaddress

    try:
        ipaddress.ip_address(value)
        valid = len(value) <= 64
    except ValueError:
        valid = False
    assert (sane_client(value) is not None) == valid
    kept = sane_client(value)
    assert kept is None or (kept.isascii() and kept.isprintable() and len(kept) <= 64)
