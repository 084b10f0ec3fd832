"""Token limits, sans I/O: the estimate, reported usage, settling into debt, the usage chunk."""

from __future__ import annotations

import asyncio
import itertools
import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import usage
from edge.errors import BadRequest
from edge.observability.context import RequestContext
from edge.pipeline import settled_stream
from edge.ratelimit import bucket
from edge.ratelimit.local import LocalRateLimiter
from edge.ratelimit.tokens import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    FILE_PART_TOKENS,
    IMAGE_PART_TOKENS,
    MESSAGES,
    RESPONSES,
    Prompt,
    Reservation,
    ask_for_usage,
    check_counts,
    estimate_tokens,
    output_cap,
)
from edge.usage import hide_usage_event, usage_event

ROUTES = {"chat": CHAT, "completions": COMPLETION, "responses": RESPONSES, "messages": MESSAGES}


def estimate(data: dict, where: Prompt, default_max: int = 1024) -> int:
    """The estimate of `data` sent as compact JSON (what most clients send)."""
    return estimate_tokens(len(orjson.dumps(data)), data, where, default_max)


def test_the_input_is_the_whole_body_over_four_and_the_output_its_routes_largest_cap():
    data = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    size = len(orjson.dumps(data))
    assert estimate(data, CHAT) == math.ceil(size / 4) + 50
    data["max_completion_tokens"] = 20  # chat obeys both: the larger one counts
    assert estimate(data, CHAT) == math.ceil(len(orjson.dumps(data)) / 4) + 50
    data = {"prompt": "abcdefgh", "max_tokens": 1, "n": 3}
    assert estimate(data, COMPLETION, 9) == math.ceil(len(orjson.dumps(data)) / 4) + 3
    best_of = {"prompt": "x", "max_tokens": 2, "best_of": 4, "n": 2}
    assert estimate(best_of, COMPLETION, 9) == math.ceil(len(orjson.dumps(best_of)) / 4) + 2 * 4
    # Embeddings generate nothing; a prompt of token ids counts one token per id.
    ids = {"input": list(range(100))}
    assert estimate(ids, EMBEDDINGS) >= 100 + math.ceil(len(orjson.dumps(ids)) / 4)


@pytest.mark.parametrize("route", sorted(ROUTES))
@given(
    caps=st.fixed_dictionaries(
        {},
        optional={
            "max_tokens": st.integers(0, 10**6),
            "max_completion_tokens": st.integers(0, 10**6),
            "max_output_tokens": st.integers(0, 10**6),
        },
    )
)
def test_a_cap_the_routes_api_ignores_never_lowers_the_estimate(route, caps):
    """Every combination of the three cap fields: the output part is the largest of those the
    route's API obeys, else the default; a 0 in a field the upstream ignores counts for
    nothing."""
    where = ROUTES[route]
    data = {"model": "m", **caps}
    obeyed = [caps[name] for name in where.caps if name in caps]
    expected = max(obeyed) if obeyed else 700
    assert output_cap(data, where) == (max(obeyed) if obeyed else None)
    assert estimate(data, where, 700) == math.ceil(len(orjson.dumps(data)) / 4) + expected


_text = st.text(max_size=300)
_schema = st.recursive(
    st.one_of(st.text(max_size=40), st.integers(-(2**53), 2**53), st.booleans(), st.none()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=20), inner, max_size=4)
    ),
    max_leaves=20,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer"])},
    optional={
        "content": st.one_of(
            _text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _text}))
        ),
        "name": st.text(max_size=20),
        "tool_call_id": st.text(max_size=20),
    },
)
_tool = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": st.text(max_size=30), "description": _text, "parameters": _schema}
        ),
    }
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[dict, list[str]]:
    """A request body of text, tools and schemas, and every string a provider bills."""
    data = {"model": "m", "messages": draw(st.lists(_message, min_size=1, max_size=6))}
    if draw(st.booleans()):
        data["tools"] = draw(st.lists(_tool, max_size=4))
    if draw(st.booleans()):
        data["response_format"] = {"type": "json_schema", "json_schema": {"schema": draw(_schema)}}
    if draw(st.booleans()):
        data["instructions"] = draw(_text)
    if draw(st.booleans()):
        data["text"] = {"format": {"type": "json_schema", "schema": draw(_schema)}}
    strings: list[str] = []
    pending: list = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            strings.append(item)
        elif isinstance(item, dict):
            strings.extend(item)  # keys are billed too (schemas' property names)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return data, strings


@settings(max_examples=200, deadline=None)
@given(body=bodies(), route=st.sampled_from(sorted(ROUTES)))
def test_the_estimate_is_never_below_a_quarter_of_the_bytes_of_every_billed_field(body, route):
    data, strings = body
    billed = sum(len(s.encode("utf-8", "surrogatepass")) for s in strings)
    for option in (0, orjson.OPT_INDENT_2):  # compact, or spread out: the estimate holds
        raw = orjson.dumps(data, option=option)
        assert estimate_tokens(len(raw), data, ROUTES[route], 0) >= billed / 4


def test_image_and_file_parts_count_a_fixed_amount_never_their_url_or_bytes():
    huge = "data:image/png;base64," + "A" * 400_000
    for part in (
        {"type": "image_url", "image_url": {"url": huge}},  # OpenAI chat
        {"type": "input_image", "image_url": huge},  # Responses
        {"type": "image", "source": {"type": "base64", "data": huge[30:]}},  # Anthropic
    ):
        big = {"messages": [{"role": "user", "content": [part]}]}
        assert estimate(big, CHAT, 0) < IMAGE_PART_TOKENS + 100
        assert estimate(big, CHAT, 0) >= IMAGE_PART_TOKENS
    short = {"type": "image_url", "image_url": {"url": "https://x.example/i.png"}}
    small = {"messages": [{"role": "user", "content": [short, short]}]}
    assert estimate(small, CHAT, 0) >= 2 * IMAGE_PART_TOKENS  # never the URL's length
    document = {"type": "document", "source": {"type": "base64", "data": "B" * 400_000}}
    doc = {"messages": [{"role": "user", "content": [document]}]}
    assert FILE_PART_TOKENS <= estimate(doc, MESSAGES, 0) < FILE_PART_TOKENS + 100
    # A document of plain text is billed as its text: counted by its bytes, however large.
    words = "w " * 500_000
    for source in (
        {"type": "text", "media_type": "text/plain", "data": words},
        {"type": "content", "content": [{"type": "text", "text": words}]},
    ):
        part = {"type": "document", "source": source}
        text = {"messages": [{"role": "user", "content": [part]}]}
        assert estimate(text, MESSAGES, 0) >= 1_000_000 / 4


def test_a_batched_completion_reserves_an_output_for_every_prompt():
    for prompts in (["a", "b", "c"], [[1, 2], [3], [4, 5]]):
        data = {"prompt": prompts, "max_tokens": 100, "n": 2}
        assert estimate(data, COMPLETION, 0) >= 3 * 2 * 100
    ids = {"prompt": [1, 2, 3], "max_tokens": 100}  # one prompt given as token ids
    assert estimate(ids, COMPLETION, 0) < 2 * 100


def test_cap_and_count_fields_must_be_whole_numbers_and_nothing_is_written_in():
    for name, value in [("max_tokens", "100000"), ("max_tokens", 1e5), ("max_tokens", -1),
                        ("max_completion_tokens", True), ("n", "2"), ("best_of", 2.0),
                        ("max_output_tokens", -5), ("n", [])]:  # fmt: skip
        with pytest.raises(BadRequest) as caught:
            check_counts({name: value})
        assert caught.value.param == name
    # null is "not set" in every API (LangChain and others send it): the default is reserved.
    unset = {"messages": [], "max_tokens": None, "max_completion_tokens": None, "n": None}
    check_counts(unset)
    assert estimate(unset, CHAT, 1024) - estimate(unset, CHAT, 0) == 1024  # one choice
    data = {"messages": []}
    check_counts(data)
    estimate(data, CHAT)
    assert data == {"messages": []}  # the default is a reservation, not a cap sent upstream


def test_anthropic_prompt_cache_tokens_count_as_input():
    ctx = RequestContext("r", None)
    usage.record(ctx, {"input_tokens": 5, "cache_creation_input_tokens": 180_000,
                       "cache_read_input_tokens": 20, "output_tokens": 7})  # fmt: skip
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (180_025, 7)
    ctx = RequestContext("r", None)  # OpenAI's prompt_tokens already include its cached tokens
    usage.record(ctx, {"prompt_tokens": 50, "prompt_tokens_details": {"cached_tokens": 40},
                       "completion_tokens": 1})  # fmt: skip
    assert ctx.prompt_tokens == 50


def test_ask_for_usage_keeps_other_options():
    data = {"stream_options": {"x": 1}}
    assert ask_for_usage(data) is True
    assert data["stream_options"] == {"x": 1, "include_usage": True}
    assert ask_for_usage(data) is False  # already asked


@given(
    level=st.floats(0, 100), refund=st.floats(-1000, 1000), dt=st.floats(0, 100),
)  # fmt: skip
def test_adjust_refunds_up_to_full_and_charges_into_debt(level: float, refund: float, dt: float):
    tokens, updated = bucket.adjust(level, 0.0, dt, 1.0, 100, refund)
    expected = min(100.0, min(100.0, level + dt) + refund)  # below zero: a debt
    assert tokens == pytest.approx(expected)
    assert updated == dt


def test_a_reservation_settles_once_and_an_overrun_is_a_debt():
    now = [1000.0]
    limiter = LocalRateLimiter(64, clock=lambda: now[0])
    assert limiter.check(b"t", 60.0, 60, 50).remaining == 10
    reservation = Reservation(limiter, b"t", 60, 50)
    asyncio.run(reservation.settle(20))
    assert limiter.check(b"t", 60.0, 60, 0).remaining == 40
    asyncio.run(reservation.settle(0))  # a second settle is ignored
    assert limiter.check(b"t", 60.0, 60, 0).remaining == 40
    # The last 40 reserved, 130 used: a debt of 90.
    assert limiter.check(b"t", 60.0, 60, 40).allowed
    asyncio.run(Reservation(limiter, b"t", 60, 40).settle(130))
    refused = limiter.check(b"t", 60.0, 60, 1)
    assert not refused.allowed and refused.remaining == 0
    assert refused.retry_after == pytest.approx(91.0)  # 1 token/s pays back 90, then 1 more
    now[0] += 91.0
    assert limiter.check(b"t", 60.0, 60, 1).allowed


def test_another_attempt_takes_another_estimate_and_settling_counts_them():
    limiter = LocalRateLimiter(64, clock=lambda: 1000.0)
    assert limiter.check(b"t", 60.0, 60, 10).allowed  # 50 left
    reservation = Reservation(limiter, b"t", 60, 10)
    asyncio.run(reservation.take_more())  # a failover after a timed-out attempt
    assert limiter.check(b"t", 60.0, 60, 0).remaining == 40
    asyncio.run(reservation.settle(10))  # one of the two may be billed: one estimate back
    assert limiter.check(b"t", 60.0, 60, 0).remaining == 50


USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n'
CHUNK = b'data: {"choices":[{"delta":{"content":"usage"}}],"usage":null}\n\n'


def test_usage_event():
    assert usage_event(USAGE) == {"prompt_tokens": 3, "completion_tokens": 5}
    assert usage_event(CHUNK) is None  # has choices (and mentions "usage" in its text)
    assert usage_event(b"data: [DONE]\n\n") is None
    assert usage_event(b'data: {"usage": \n\n') is None


@given(cuts=st.lists(st.integers(0, 200), max_size=6))
def test_the_usage_event_is_hidden_on_any_split(cuts: list[int]):
    stream = CHUNK + b": comment\n\n" + CHUNK.replace(b"\n\n", b"\r\n\r\n") + USAGE
    stream += b"data: [DONE]\n\n"
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    pieces = [stream[a:b] for a, b in itertools.pairwise(points) if b > a]

    async def source():
        for piece in pieces:
            yield piece

    async def run():
        return b"".join([c async for c in hide_usage_event(source())])

    assert asyncio.run(run()) == stream.replace(USAGE, b"")


class _Stream:
    """A relayed stream's events: `count` content chunks, nothing else (no usage)."""

    def __init__(self, count: int) -> None:
        self.count = count

    async def __aiter__(self):
        for _ in range(self.count):
            yield b'data: {"choices":[{"index":0,"delta":{"content":"word"}}]}\n\n'


@pytest.mark.parametrize("left_after", [None, 0, 50, 499])
def test_a_stream_without_its_usage_is_settled_to_at_least_what_it_relayed(left_after):
    """A client that hangs up just before the usage chunk (or a stream that never reports
    one) is settled to its input plus a token a chunk relayed, when that is more than the
    reservation: 500 chunks read under a reservation of 20 + 100 cost 520."""
    now = [1000.0]
    limiter = LocalRateLimiter(64, clock=lambda: now[0])
    assert limiter.check(b"t", 6000.0, 6000, 120).allowed
    reservation = Reservation(limiter, b"t", 6000, 120, prompt=20)
    ctx = RequestContext("r", None)

    async def client() -> None:
        stream = settled_stream(_Stream(500), reservation, ctx, False)
        if left_after is None:
            async for _ in stream:
                pass
        else:
            for _ in range(left_after):
                await anext(stream)
            await stream.aclose()

    asyncio.run(client())
    read = 500 if left_after is None else left_after
    assert 6000 - limiter.check(b"t", 6000.0, 6000, 0).remaining == max(120, 20 + read)
