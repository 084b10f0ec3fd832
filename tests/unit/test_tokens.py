"""Token limits, sans I/O: the estimate, reported usage, settling, the usage chunk."""

from __future__ import annotations

import asyncio
import itertools
import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.ratelimit import bucket
from edge.ratelimit.local import LocalRateLimiter
from edge.ratelimit.tokens import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    MESSAGES,
    RESPONSES,
    Reservation,
    ask_for_usage,
    estimate_tokens,
    used_tokens,
)
from edge.usage import usage_event, watch_usage


def test_estimate_is_prompt_bytes_over_four_plus_the_output_cap():
    data = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    assert estimate_tokens(data, CHAT, 1024) == math.ceil((4 + 400) / 4) + 50
    data["max_completion_tokens"] = 20  # the newer name wins
    assert estimate_tokens(data, CHAT, 1024) == 101 + 20
    assert estimate_tokens({"messages": [{"content": "abcd"}]}, CHAT, 7) == 1 + 7  # default cap
    assert estimate_tokens({"prompt": "abcdefgh", "max_tokens": 1, "n": 3}, COMPLETION, 9) == 2 + 3
    assert estimate_tokens({"prompt": [1, 2, 3], "max_tokens": 0}, COMPLETION, 9) == 3  # token ids
    assert estimate_tokens({"prompt": "x", "max_output_tokens": 4}, COMPLETION, 9) == 1 + 4
    # Other APIs: their own prompt fields; embeddings generate nothing.
    responses = {"input": "abcd" * 3, "instructions": "abcd", "max_output_tokens": 5}
    assert estimate_tokens(responses, RESPONSES, 9) == 4 + 5
    messages = {"system": "abcd", "messages": [{"content": "abcd"}], "max_tokens": 2}
    assert estimate_tokens(messages, MESSAGES, 9) == 2 + 2
    assert estimate_tokens({"input": ["abcd", "abcdabcd"], "max_tokens": 7}, EMBEDDINGS, 9) == 3
    best_of = {"prompt": "x", "max_tokens": 2, "best_of": 4, "n": 2}
    assert estimate_tokens(best_of, COMPLETION, 9) == 1 + 2 * 4  # the larger of n and best_of


def test_the_request_is_held_to_its_estimate():
    from edge.errors import BadRequest
    from edge.ratelimit.tokens import hold_to_estimate

    for name, value in [("max_tokens", "100000"), ("max_tokens", 1e5), ("max_tokens", -1),
                        ("max_completion_tokens", True), ("n", "2"), ("best_of", 2.0)]:  # fmt: skip
        with pytest.raises(BadRequest) as caught:
            hold_to_estimate({name: value}, CHAT, 50)
        assert caught.value.param == name
    for where, cap in ((CHAT, "max_completion_tokens"), (COMPLETION, "max_tokens"),
                       (RESPONSES, "max_output_tokens"), (MESSAGES, "max_tokens")):  # fmt: skip
        data: dict = {}
        hold_to_estimate(data, where, 50)
        assert data == {cap: 50}  # no cap: the default is written in, and sent upstream
    data = {"max_tokens": 7}
    hold_to_estimate(data, CHAT, 50)
    assert data == {"max_tokens": 7}  # the client's own cap stays
    data = {}
    hold_to_estimate(data, EMBEDDINGS, 50)
    assert data == {}


def test_used_tokens():
    assert used_tokens({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}) == 8
    assert used_tokens({"input_tokens": 2, "output_tokens": 2}) == 4
    assert used_tokens({"total_tokens": 9}) == 9
    assert used_tokens({"prompt_tokens": True, "completion_tokens": 1}) is None
    assert used_tokens(None) is None


def test_ask_for_usage_keeps_other_options():
    data = {"stream_options": {"x": 1}}
    assert ask_for_usage(data) is True
    assert data["stream_options"] == {"x": 1, "include_usage": True}
    assert ask_for_usage(data) is False  # already asked


@given(
    level=st.floats(0, 100), refund=st.floats(-1000, 1000), dt=st.floats(0, 100),
)  # fmt: skip
def test_adjust_stays_within_the_bucket(level: float, refund: float, dt: float):
    tokens, updated = bucket.adjust(level, 0.0, dt, 1.0, 100, refund)
    expected = min(100.0, max(0.0, min(100.0, level + dt) + refund))
    assert tokens == pytest.approx(expected)
    assert updated == dt


def test_reservation_settles_once_on_a_shared_table():
    limiter = LocalRateLimiter(64, clock=lambda: 1000.0)
    assert limiter.check(b"t", 60.0, 60, 50).remaining == 10
    reservation = Reservation(limiter, b"t", 60, 50)
    asyncio.run(reservation.settle_usage({"total_tokens": 20}))
    assert limiter.check(b"t", 60.0, 60, 0).remaining == 40
    asyncio.run(reservation.settle(0))  # a second settle is ignored
    assert limiter.check(b"t", 60.0, 60, 0).remaining == 40


USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n'
CHUNK = b'data: {"choices":[{"delta":{"content":"usage"}}],"usage":null}\n\n'


def test_usage_event():
    assert usage_event(USAGE) == {"prompt_tokens": 3, "completion_tokens": 5}
    assert usage_event(CHUNK) is None  # has choices (and mentions "usage" in its text)
    assert usage_event(b"data: [DONE]\n\n") is None
    assert usage_event(b'data: {"usage": \n\n') is None


@pytest.mark.parametrize("hide", [True, False])
@given(cuts=st.lists(st.integers(0, 200), max_size=6))
def test_watch_usage_on_any_split(hide: bool, cuts: list[int]):
    stream = CHUNK + b": comment\n\n" + CHUNK.replace(b"\n\n", b"\r\n\r\n") + USAGE
    stream += b"data: [DONE]\n\n"
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    pieces = [stream[a:b] for a, b in itertools.pairwise(points) if b > a]
    seen = []

    async def source():
        for piece in pieces:
            yield piece

    async def on_usage(usage):
        seen.append(usage)

    async def run():
        return b"".join([c async for c in watch_usage(source(), on_usage, hide)])

    out = asyncio.run(run())
    assert seen == [orjson.loads(USAGE[6:])["usage"]]
    assert out == (stream.replace(USAGE, b"") if hide else stream)
