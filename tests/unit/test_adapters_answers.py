"""Whole answers (edge.adapters.answers) both ways, read back by the other API's SDK types, and
the count_tokens estimate (edge.adapters.count_tokens)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from anthropic.types import Message
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion

from edge import usage as edge_usage
from edge.adapters.answers import (
    FINISH_REASONS,
    STOP_REASONS,
    completion_to_message,
    message_to_completion,
)
from edge.adapters.count_tokens import count_tokens
from edge.errors import BadGateway
from edge.ratelimit.tokens import IMAGE_PART_TOKENS, MESSAGES, estimate_input

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
names = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
inputs = st.dictionaries(
    text, st.integers(-(2**63), 2**64 - 1) | text | st.lists(st.booleans(), max_size=2), max_size=3
)
counts = st.integers(0, 10**6)


def accounted(usage: dict[str, Any]) -> tuple[int | None, int | None]:
    """What the gateway's token accounting (edge.usage.record) reads from a usage object."""
    ctx = SimpleNamespace(prompt_tokens=None, completion_tokens=None)
    edge_usage.record(ctx, usage)  # type: ignore[arg-type]
    return ctx.prompt_tokens, ctx.completion_tokens


@st.composite
def anthropic_messages(draw: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for kind in draw(st.lists(st.sampled_from(["text", "tool_use", "thinking"]), max_size=4)):
        if kind == "text":
            content.append({"type": "text", "text": draw(text)})
        elif kind == "tool_use":
            tool = {"type": "tool_use", "id": "toolu_" + draw(names), "name": draw(names)}
            content.append({**tool, "input": draw(inputs)})
        else:
            content.append({"type": "thinking", "thinking": draw(text), "signature": "c2ln"})
    usage = {"input_tokens": draw(counts), "output_tokens": draw(counts)}
    for name in ("cache_read_input_tokens", "cache_creation_input_tokens"):
        if draw(st.booleans()):
            usage[name] = draw(counts)
    return {
        "id": "msg_" + draw(names),
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": content,
        "stop_reason": draw(st.sampled_from(sorted(FINISH_REASONS))),
        "stop_sequence": None,
        "usage": usage,
    }


@settings(max_examples=200, deadline=None)
@given(anthropic_messages())
def test_an_anthropic_message_is_an_openai_completion(message):
    out = ChatCompletion.model_validate(message_to_completion(message, created=1))
    choice = out.choices[0]
    texts = [block["text"] for block in message["content"] if block["type"] == "text"]
    assert choice.message.content == ("".join(texts) if texts else None)
    uses = [block for block in message["content"] if block["type"] == "tool_use"]
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in calls] == [
        (u["id"], u["name"], u["input"]) for u in uses
    ]
    assert choice.finish_reason == FINISH_REASONS[message["stop_reason"]]
    usage = message["usage"]
    cached = usage.get("cache_read_input_tokens", 0)
    prompt = usage["input_tokens"] + cached + usage.get("cache_creation_input_tokens", 0)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        prompt,
        usage["output_tokens"],
    )
    assert out.usage.total_tokens == prompt + usage["output_tokens"]
    details = out.usage.prompt_tokens_details
    assert (details.cached_tokens if details else 0) == cached
    # The gateway's accounting reads the same totals from the client's answer as from the
    # upstream's (edge.usage.record adds Anthropic's cache fields itself).
    assert accounted(out.usage.model_dump(exclude_none=True)) == accounted(usage)


@st.composite
def openai_completions(draw: Any) -> dict[str, Any]:
    calls = [
        {
            "id": "call_" + draw(names),
            "type": "function",
            "function": {"name": draw(names), "arguments": orjson.dumps(draw(inputs)).decode()},
        }
        for _ in range(draw(st.integers(0, 3)))
    ]
    reply: dict[str, Any] = {"role": "assistant", "content": draw(st.none() | text)}
    if calls:
        reply["tool_calls"] = calls
    prompt = draw(counts)
    cached = draw(st.integers(0, prompt))
    return {
        "id": "chatcmpl-" + draw(names),
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-x",
        "choices": [
            {
                "index": 0,
                "message": reply,
                "finish_reason": draw(st.sampled_from(sorted(STOP_REASONS))),
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": draw(counts),
            "total_tokens": 0,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


@settings(max_examples=200, deadline=None)
@given(openai_completions())
def test_an_openai_completion_is_an_anthropic_message(completion):
    out = Message.model_validate(completion_to_message(completion))
    reply = completion["choices"][0]["message"]
    blocks = [block.model_dump(exclude_none=True) for block in out.content]
    expected = [{"type": "text", "text": reply["content"]}] if reply["content"] else []
    expected += [
        {
            "type": "tool_use",
            "id": call["id"],
            "name": call["function"]["name"],
            "input": orjson.loads(call["function"]["arguments"]),
        }
        for call in reply.get("tool_calls", [])
    ]
    for block in blocks:
        block.pop("citations", None)
    assert blocks == expected
    assert out.stop_reason == STOP_REASONS[completion["choices"][0]["finish_reason"]]
    usage = completion["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert out.usage.input_tokens == usage["prompt_tokens"] - cached
    assert (out.usage.cache_read_input_tokens or 0) == cached
    assert out.usage.output_tokens == usage["completion_tokens"]
    assert accounted(out.usage.model_dump(exclude_none=True)) == accounted(usage)


@settings(max_examples=100, deadline=None)
@given(anthropic_messages())
def test_an_anthropic_message_comes_back_from_its_openai_form(message):
    back = completion_to_message(message_to_completion(message, created=1))
    texts = "".join(b["text"] for b in message["content"] if b["type"] == "text")
    expected = [{"type": "text", "text": texts}] if texts else []
    expected += [b for b in message["content"] if b["type"] == "tool_use"]
    assert back["content"] == expected  # text blocks joined, thinking dropped
    stop = message["stop_reason"]
    same = {
        "stop_sequence": "end_turn",
        "pause_turn": "end_turn",
        "model_context_window_exceeded": "max_tokens",
    }
    assert back["stop_reason"] == same.get(stop, stop)
    assert accounted(back["usage"]) == accounted(message["usage"])


@pytest.mark.parametrize("arguments", ["nope", "[1]", "1", '{"a": '])
def test_tool_arguments_that_are_no_json_object_are_a_bad_gateway(arguments):
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    completion = {"choices": [{"message": {"role": "assistant", "tool_calls": [call]}}]}
    with pytest.raises(BadGateway):
        completion_to_message(completion)
    call["function"]["arguments"] = ""
    assert completion_to_message(completion)["content"][0]["input"] == {}


def test_refusals_stop_sequences_and_parts():
    refused = {
        "choices": [{"message": {"content": None, "refusal": "No."}, "finish_reason": "stop"}]
    }
    out = completion_to_message(refused)
    assert (out["content"], out["stop_reason"]) == ([{"type": "text", "text": "No."}], "refusal")
    vllm = {
        "choices": [{"message": {"content": "a"}, "finish_reason": "stop", "stop_reason": "END"}]
    }
    assert completion_to_message(vllm)["stop_sequence"] == "END"
    parts = {
        "choices": [
            {"message": {"content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}}
        ]
    }
    assert completion_to_message(parts)["content"] == [{"type": "text", "text": "xy"}]
    assert completion_to_message({})["content"] == []  # nothing to read: an empty answer
    filtered = {"content": [], "stop_reason": "refusal", "usage": {}}
    assert (
        message_to_completion(filtered, created=1)["choices"][0]["finish_reason"]
        == "content_filter"
    )


def test_count_tokens_is_the_token_limiters_input_estimate():
    data = {
        "model": "m",
        "system": "Be brief.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture? " * 20},
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": "A" * 40_000,
                        },
                    },
                ],
            },
        ],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
    }
    body = orjson.dumps(data)
    counted = count_tokens(len(body), data)
    assert counted == {"input_tokens": estimate_input(len(body), data, MESSAGES)}
    # The image counts at its fixed amount, not by its 40,000 bytes.
    assert IMAGE_PART_TOKENS < counted["input_tokens"] < IMAGE_PART_TOKENS + 1000
