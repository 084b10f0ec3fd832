"""The adapter between the router and the transport (edge.routing.adapter): what reaches the
client and the router when the client or the upstream sends what the translators cannot take.
Hostile inputs found by a review: nesting past orjson's depth, answers that are no answers,
streams cut short or carrying events of the wrong types."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from edge.errors import ANTHROPIC, OPENAI, BadGateway, BadRequest
from edge.routing.adapter import Translation
from edge.routing.exchange import Call
from edge.upstream.client import UpstreamResponse


def nested(depth: int) -> object:
    value: object = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def deep(depth: int) -> str:
    """JSON text nested `depth` levels (orjson reads 1024, writes 254: built by hand)."""
    return '{"a":' * depth + "{}" + "}" * depth


def openai_call(**extra) -> Call:
    data = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    return Call(OPENAI, "POST", "/chat/completions", b"", data, "m")


def anthropic_call(**extra) -> Call:
    data = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    data.update(extra)
    return Call(ANTHROPIC, "POST", "/messages", b"", data, "m")


def test_a_request_nested_past_the_writer_is_a_400_not_a_500():
    tool = {"type": "function", "function": {"name": "f", "parameters": nested(300)}}
    with pytest.raises(BadRequest):
        Translation(openai_call(tools=[tool]), "anthropic", 100)
    call = {"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": deep(260)}}  # fmt: skip
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]
    data = {"model": "m", "messages": history}
    too_deep = Call(OPENAI, "POST", "/chat/completions", b"", data, "m")
    with pytest.raises(BadRequest):  # the arguments string parsed and nested once more
        Translation(too_deep, "anthropic", 100)


def answer(body: object, status: int = 200) -> UpstreamResponse:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return UpstreamResponse(status, raw, "application/json", {})


@pytest.mark.parametrize(
    "body",
    [
        {},  # no content
        {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
        ('{"type":"message","content":[],"id":' + deep(300) + "}").encode(),  # past the writer
        {"type": "message", "content": [], "model": ["not", "a", "string"], "usage": "x"},
    ],
)
def test_an_anthropic_success_that_is_no_answer_is_the_providers_failure(body):
    translation = Translation(openai_call(), "anthropic", 100)
    try:
        result = translation.answer(answer(body))
    except BadGateway:
        return
    # Whatever got through is a valid OpenAI answer, never a 500 later.
    assert isinstance(result.data, dict) and "choices" in result.data
    orjson.loads(result.body)


def test_an_openai_answer_without_choices_is_the_providers_failure():
    translation = Translation(anthropic_call(), "openai", 100)
    for body in ({}, {"error": {"message": "x"}}, {"choices": "no"}):
        with pytest.raises(BadGateway):
            translation.answer(answer(body))


def test_a_huge_answer_is_not_translated():
    translation = Translation(openai_call(), "anthropic", 100)
    huge = {"type": "message", "content": [{"type": "text", "text": "x" * (9 << 20)}]}
    with pytest.raises(BadGateway):
        translation.answer(answer(huge))


async def _source(blocks):
    for block in blocks:
        yield block


def run(translation: Translation, blocks: list[bytes]) -> tuple[bytes, list[bool]]:
    broken: list[bool] = []

    async def collect() -> bytes:
        out = []
        async for piece in translation.events(_source(blocks), lambda: broken.append(True)):
            out.append(piece)
        return b"".join(out)

    return asyncio.run(collect()), broken


def event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"


START = event("message_start", {"type": "message_start", "message": {
    "id": "msg_1", "model": "m", "usage": {"input_tokens": 3}}})  # fmt: skip
TEXT = event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "Hi"}})  # fmt: skip


def test_a_stream_cut_short_ends_with_an_error_and_is_the_providers_failure():
    out, broken = run(Translation(openai_call(stream=True), "anthropic", 100), [START, TEXT])
    assert b'"Hi"' in out and b"upstream_invalid" in out and b"[DONE]" not in out
    assert broken == [True]
    chunk = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    out, broken = run(Translation(anthropic_call(stream=True), "openai", 100), [chunk])
    assert b"event: error" in out and b"message_stop" not in out and broken == [True]


def test_a_whole_stream_is_not_a_failure():
    stop = [
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 1}}),
        event("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    out, broken = run(Translation(openai_call(stream=True), "anthropic", 100), [START, TEXT, *stop])
    assert out.endswith(b"data: [DONE]\n\n") and broken == []


@pytest.mark.parametrize(
    "bad",
    [
        event("content_block_start", {"type": "content_block_start", "index": [0],
                                      "content_block": {"type": "tool_use", "id": "t",
                                                        "name": "f"}}),
        b'event: message_start\ndata: {"type":"message_start","message":{"id":'
        + deep(300).encode()
        + b"}}\n\n",
    ],
)  # fmt: skip
def test_an_event_the_translator_cannot_take_ends_the_stream_cleanly(bad):
    out, broken = run(Translation(openai_call(stream=True), "anthropic", 100), [START, bad, TEXT])
    assert out.rstrip().endswith(b"}") and b"upstream_invalid" in out
    assert broken == [True]
