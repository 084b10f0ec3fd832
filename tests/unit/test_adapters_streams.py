"""The stream translators (edge.adapters.stream_to_openai, stream_to_anthropic), checked by the
official SDKs: generated streams, cut at random points, are translated and then read by the
other API's own SDK (its Stream class, its SSE decoder, its accumulator), and what the SDK
builds must hold the generated text, tool calls, stop reason and usage."""

from __future__ import annotations

import itertools
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from edge.adapters.answers import FINISH_REASONS, STOP_REASONS
from edge.adapters.stream_to_anthropic import ChunksToEvents
from edge.adapters.stream_to_openai import EventsToChunks

REQUEST = httpx2.Request("POST", "http://upstream.invalid/")

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
nonempty = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
arguments = st.dictionaries(text, json_value, max_size=4)
names = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
counts = st.integers(0, 100_000)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def pieces(draw: Any, value: str) -> list[str]:
    """`value` cut into pieces at drawn points (joined, they are `value` again)."""
    cuts = draw(st.lists(st.integers(0, len(value)), max_size=4))
    points = sorted({0, len(value), *cuts})
    return [value[a:b] for a, b in itertools.pairwise(points) if b > a]


def feed_all(translator: Any, blocks: list[bytes]) -> bytes:
    return b"".join(translator.feed(block) for block in blocks)


# --- Anthropic events → OpenAI chunks ---------------------------------------------------------


def sse(kind: str, data: dict[str, Any], eol: bytes = b"\n") -> bytes:
    return b"event: " + kind.encode() + eol + b"data: " + orjson.dumps(data) + eol + eol


@st.composite
def anthropic_streams(draw: Any) -> dict[str, Any]:
    """An Anthropic event stream of text, tool_use and thinking blocks, with pings between,
    and what an OpenAI client should make of it."""
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    usage_in = {
        "input_tokens": draw(counts),
        "cache_read_input_tokens": draw(counts),
        "cache_creation_input_tokens": draw(counts),
        "output_tokens": 1,
    }
    message = {
        "id": "msg_" + draw(names),
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage_in,
    }
    events = [sse("message_start", {"type": "message_start", "message": message}, eol)]
    texts: list[str] = []
    calls: list[tuple[str, str, str]] = []
    kinds = draw(st.lists(st.sampled_from(["text", "tool_use", "thinking"]), max_size=5))
    for index, kind in enumerate(kinds):
        if draw(st.booleans()):
            events.append(sse("ping", {"type": "ping"}, eol))
        if kind == "text":
            block: dict[str, Any] = {"type": "text", "text": ""}
            value = draw(text)
            deltas = [{"type": "text_delta", "text": piece} for piece in pieces(draw, value)]
            texts.append(value)
        elif kind == "tool_use":
            tool_id, name = "toolu_" + draw(names), draw(names)
            block = {"type": "tool_use", "id": tool_id, "name": name, "input": {}}
            args = orjson.dumps(draw(arguments)).decode()
            deltas = [{"type": "input_json_delta", "partial_json": ""}]  # as Anthropic sends
            deltas += [{"type": "input_json_delta", "partial_json": p} for p in pieces(draw, args)]
            calls.append((tool_id, name, args))
        else:
            block = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": draw(text)}]
            deltas.append({"type": "signature_delta", "signature": "c2ln"})
        events.append(
            sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
                eol,
            )
        )
        for delta in deltas:
            data = {"type": "content_block_delta", "index": index, "delta": delta}
            events.append(sse("content_block_delta", data, eol))
        events.append(
            sse("content_block_stop", {"type": "content_block_stop", "index": index}, eol)
        )
    stop = draw(st.sampled_from(sorted(FINISH_REASONS)))
    output = draw(counts)
    delta = {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}}
    events.append(sse("message_delta", {**delta, "usage": {"output_tokens": output}}, eol))
    events.append(sse("message_stop", {"type": "message_stop"}, eol))
    stream = b"".join(events)
    return {
        "blocks": split(stream, draw(st.lists(st.integers(0, len(stream)), max_size=12))),
        "text": "".join(texts),
        "calls": calls,
        "finish": FINISH_REASONS[stop],
        "prompt": usage_in["input_tokens"]
        + usage_in["cache_read_input_tokens"]
        + usage_in["cache_creation_input_tokens"],
        "cached": usage_in["cache_read_input_tokens"],
        "completion": output,
    }


def openai_sdk(body: bytes) -> list[ChatCompletionChunk]:
    """The chunks the openai SDK's own Stream makes of a response body (it raises APIError on
    an error event)."""
    client = openai.OpenAI(api_key="x", base_url="http://upstream.invalid/")
    try:
        response = httpx2.Response(200, content=body, request=REQUEST)
        return list(openai.Stream(cast_to=ChatCompletionChunk, response=response, client=client))
    finally:
        client.close()


@settings(max_examples=150, deadline=None)
@given(anthropic_streams(), st.booleans())
def test_anthropic_events_give_an_openai_stream_the_sdk_accumulates(case, include_usage):
    translator = EventsToChunks(include_usage=include_usage, created=1_700_000_000)
    body = feed_all(translator, case["blocks"])
    assert translator.done
    assert body.endswith(b"data: [DONE]\n\n")
    chunks = openai_sdk(body)
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    # The snapshot, not get_final_completion(), which refuses a `length` finish by raising.
    choice = state.current_completion_snapshot.choices[0]
    assert (choice.message.content or "") == case["text"]
    calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    assert calls == case["calls"]
    assert choice.finish_reason == case["finish"]
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    expected = {
        "prompt_tokens": case["prompt"],
        "completion_tokens": case["completion"],
        "total_tokens": case["prompt"] + case["completion"],
    }
    if case["cached"]:
        expected["prompt_tokens_details"] = {"cached_tokens": case["cached"]}
    assert translator.usage == expected  # the gateway sees it, whether the client asked or not
    if include_usage:  # OpenAI's shape: the last chunk, with no choices
        assert usage_chunks == [chunks[-1]]
        assert chunks[-1].choices == []
        assert chunks[-1].usage.model_dump(exclude_none=True) == expected
    else:
        assert usage_chunks == []


@settings(max_examples=50, deadline=None)
@given(
    anthropic_streams(), st.integers(0, 10**6), st.sampled_from(["overloaded_error", "api_error"])
)
def test_an_anthropic_error_event_is_raised_by_the_openai_sdk(case, cut, kind):
    whole = b"".join(case["blocks"])
    events = [e + b"\n\n" for e in whole.replace(b"\r\n", b"\n").split(b"\n\n") if e]
    kept = events[: 1 + cut % len(events)]
    if kept[-1].startswith(b"event: message_stop"):
        kept.pop()
    error = {"type": "error", "error": {"type": kind, "message": "Overloaded, try later"}}
    translator = EventsToChunks()
    body = feed_all(
        translator, [*kept, sse("error", error), sse("message_stop", {"type": "message_stop"})]
    )
    assert translator.done
    assert b"[DONE]" not in body  # the stream ends at the error
    with pytest.raises(openai.APIError, match="Overloaded, try later") as raised:
        openai_sdk(body)
    assert raised.value.body["code"] == kind
    assert raised.value.body["type"] == (
        "overloaded_error" if kind == "overloaded_error" else "server_error"
    )


def test_pings_and_thinking_are_dropped_and_a_non_json_event_ends_the_stream():
    translator = EventsToChunks()
    assert translator.feed(sse("ping", {"type": "ping"})) == b""
    assert translator.usage is None
    assert translator.feed(b": a comment\n\n") == b""
    out = translator.feed(b"event: content_block_delta\ndata: {not json\n\n")
    assert translator.done
    assert b"upstream_invalid" in out
    assert translator.feed(sse("message_stop", {"type": "message_stop"})) == b""


def test_message_delta_usage_overrides_the_counts_of_message_start():
    translator = EventsToChunks()
    start = {"id": "m", "model": "c", "usage": {"input_tokens": 5, "output_tokens": 1}}
    translator.feed(sse("message_start", {"type": "message_start", "message": start}))
    assert translator.usage == {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
    translator.feed(
        sse("message_delta", {**delta, "usage": {"input_tokens": 7, "output_tokens": 9}})
    )
    assert translator.usage == {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}


# --- OpenAI chunks → Anthropic events ---------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    data = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x"}
    return b"data: " + orjson.dumps({**data, "choices": choices, **extra}) + b"\n\n"


@st.composite
def openai_streams(draw: Any) -> dict[str, Any]:
    """An OpenAI chunk stream of text and tool calls, and the Anthropic message it means."""
    chunks = [chunk({"role": "assistant", "content": ""})]
    content: list[dict[str, Any]] = []  # the blocks an Anthropic client should end up with
    calls = 0
    for kind in draw(st.lists(st.sampled_from(["text", "tool"]), max_size=5)):
        if kind == "text":
            value = draw(nonempty)
            chunks += [chunk({"content": piece}) for piece in pieces(draw, value)]
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += value
            else:
                content.append({"type": "text", "text": value})
            continue
        tool_id, name, args = f"call_{calls}", draw(names), draw(arguments)
        fragments = pieces(draw, orjson.dumps(args).decode())
        first = {"index": calls, "id": tool_id, "type": "function", "function": {"name": name}}
        if draw(st.booleans()):  # the name arrives in a later fragment (held until then)
            first["function"] = {"arguments": ""}
            chunks.append(chunk({"tool_calls": [first]}))
            first = {"index": calls, "function": {"name": name}}
        first["function"]["arguments"] = fragments[0] if draw(st.booleans()) else ""
        if first["function"]["arguments"]:
            fragments = fragments[1:]
        chunks.append(chunk({"tool_calls": [first]}))
        for fragment in fragments:
            call = {"index": calls, "function": {"arguments": fragment}}
            chunks.append(chunk({"tool_calls": [call]}))
        content.append({"type": "tool_use", "id": tool_id, "name": name, "input": args})
        calls += 1
    finish = draw(st.sampled_from(sorted(STOP_REASONS)))
    chunks.append(chunk({}, finish))
    prompt, completion = draw(counts), draw(counts)
    cached = draw(st.integers(0, prompt))
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    chunks.append(chunk(None, usage=usage))
    chunks.append(b"data: [DONE]\n\n")
    stream = b"".join(chunks)
    return {
        "blocks": split(stream, draw(st.lists(st.integers(0, len(stream)), max_size=12))),
        "content": content,
        "stop": STOP_REASONS[finish],
        "usage": usage,
        "input": prompt - cached,
        "cached": cached,
        "output": completion,
    }


def anthropic_sdk(body: bytes) -> list[Any]:
    """The events the anthropic SDK's own Stream makes of a response body (it raises on an
    error event)."""
    client = anthropic.Anthropic(api_key="x", base_url="http://upstream.invalid/")
    try:
        response = httpx2.Response(200, content=body, request=REQUEST)
        stream = anthropic.Stream(cast_to=RawMessageStreamEvent, response=response, client=client)
        return list(stream)
    finally:
        client.close()


def check_grammar(events: list[Any]) -> None:
    """Anthropic's stream grammar, strictly: message_start, blocks one at a time with indexes
    0, 1, 2, ... each started, given deltas of its own type and stopped, then message_delta and
    message_stop, and nothing after."""
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    open_block = None
    expected_index = 0
    for event in events[1:-2]:
        if event.type == "content_block_start":
            assert open_block is None and event.index == expected_index
            open_block = event
            expected_index += 1
        elif event.type == "content_block_delta":
            assert open_block is not None and event.index == open_block.index
            wanted = "text_delta" if open_block.content_block.type == "text" else "input_json_delta"
            assert event.delta.type == wanted
        else:
            assert event.type == "content_block_stop"
            assert open_block is not None and event.index == open_block.index
            open_block = None
    assert open_block is None


@settings(max_examples=150, deadline=None)
@given(openai_streams(), st.integers(0, 500))
def test_openai_chunks_give_an_anthropic_stream_the_sdk_accumulates(case, estimate):
    translator = ChunksToEvents(input_tokens=estimate)
    body = feed_all(translator, case["blocks"])
    assert translator.done
    events = anthropic_sdk(body)
    check_grammar(events)
    assert events[0].message.usage.input_tokens == estimate  # not known yet: the estimate
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for event in events:
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None
    got = [block.model_dump(exclude_none=True) for block in snapshot.content]
    for block in got:
        block.pop("citations", None)
    assert got == case["content"]
    assert snapshot.stop_reason == case["stop"]
    assert snapshot.usage.input_tokens == case["input"]  # exact, from message_delta
    assert snapshot.usage.output_tokens == case["output"]
    assert (snapshot.usage.cache_read_input_tokens or 0) == case["cached"]
    assert translator.usage == case["usage"]


def test_an_openai_error_event_is_raised_by_the_anthropic_sdk():
    translator = ChunksToEvents()
    body = translator.feed(chunk({"role": "assistant", "content": "Hel"}))
    error = {"error": {"message": "Rate limit reached", "type": "rate_limit_error", "code": None}}
    body += translator.feed(b"data: " + orjson.dumps(error) + b"\n\n")
    assert translator.done
    assert translator.feed(b"data: [DONE]\n\n") == b""
    with pytest.raises(anthropic.APIStatusError) as raised:
        anthropic_sdk(body)
    assert raised.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Rate limit reached"},
    }


def test_a_stream_ending_without_done_is_closed_by_end_once_finished():
    translator = ChunksToEvents()
    translator.feed(chunk({"content": "hi"}))
    assert translator.end() == b""  # not finished: the stream was cut short
    translator.feed(chunk({}, "length"))
    closing = translator.end()
    assert b"event: message_stop" in closing
    assert b'"stop_reason":"max_tokens"' in closing
    assert b'"usage":{"output_tokens":0}' in closing  # no usage reported: zero, usage None
    assert translator.usage is None and translator.done and translator.end() == b""


def test_a_vllm_stop_reason_naming_the_sequence_is_a_stop_sequence():
    translator = ChunksToEvents()
    data = {
        "id": "c",
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}],
    }
    body = translator.feed(b"data: " + orjson.dumps(data) + b"\n\ndata: [DONE]\n\n")
    events = anthropic_sdk(body)
    assert (events[-2].delta.stop_reason, events[-2].delta.stop_sequence) == (
        "stop_sequence",
        "END",
    )


def accumulated(body: bytes) -> Any:
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for event in anthropic_sdk(body):
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    return snapshot


def test_tool_calls_without_an_index_or_interleaved_still_arrive_whole():
    """Departures some servers take from OpenAI's habits: a call sent whole in one chunk with
    no index, and a fragment of a call whose block was closed already (it goes to that block,
    by its index, which is how the SDK accumulates)."""
    translator = ChunksToEvents()
    first = {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x":'}}
    second = {
        "index": 1,
        "id": "b",
        "type": "function",
        "function": {"name": "g", "arguments": "{}"},
    }
    late = {"index": 0, "function": {"arguments": "1}"}}
    body = translator.feed(
        chunk({"tool_calls": [first]})
        + chunk({"tool_calls": [second]})
        + chunk({"tool_calls": [late]})
        + chunk({}, "tool_calls")
        + b"data: [DONE]\n\n"
    )
    message = accumulated(body)
    assert [(b.id, b.name, b.input) for b in message.content] == [
        ("a", "f", {"x": 1}),
        ("b", "g", {}),
    ]
    assert message.stop_reason == "tool_use"


def test_a_refusal_is_text_with_the_refusal_stop_reason():
    translator = ChunksToEvents()
    body = translator.feed(chunk({"refusal": "I can't help with that."}) + chunk({}, "stop"))
    body += translator.feed(b"data: [DONE]\n\n")
    message = accumulated(body)
    assert message.content[0].text == "I can't help with that."
    assert message.stop_reason == "refusal"  # as for a whole answer
    translator = ChunksToEvents()
    body = translator.feed(chunk({"content": "Sure."}, "stop") + b"data: [DONE]\n\n")
    assert accumulated(body).stop_reason == "end_turn"
