"""The rate limits' response headers (edge.ratelimit.headers)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.ratelimit import headers
from edge.ratelimit.base import Decision


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.0201, "21ms"), (0.999, "999ms"), (1.0, "1s"), (1.2, "2s"), (59, "59s"),
     (360, "6m0s"), (3723, "1h2m3s"), (-1.0, "0ms")],
)  # fmt: skip
def test_durations_are_written_as_openai_writes_them(seconds, text):
    assert headers.format_duration(seconds) == text


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_retry_after_is_whole_seconds_1_to_60_and_never_shorter_than_the_wait(seconds):
    sent: dict[str, str] = {}
    retry_ms = headers.retry_after(seconds, sent)
    assert 1 <= int(sent["retry-after"]) <= 60
    assert 1 <= retry_ms == int(sent["retry-after-ms"]) <= 60_000
    assert int(sent["retry-after"]) >= min(60, seconds)
    assert retry_ms >= min(60_000, seconds * 1000)


def test_admitted_headers_per_unit():
    decision = Decision(True, 100, 99, 0.0, 0.6)
    assert headers.admitted(decision, "requests") == {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "99",
        "x-ratelimit-reset-requests": "600ms",
    }
    assert set(headers.admitted(decision, "tokens")) == {
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    }
