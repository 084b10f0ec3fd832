"""Whole answers: an Anthropic message as an OpenAI chat completion, and the reverse.

The stop reasons and the usage are mapped here once, for the stream translators too.

Usage. OpenAI's `prompt_tokens` counts every input token, the cached ones included
(`prompt_tokens_details.cached_tokens` says how many of them were read from its cache);
Anthropic's `input_tokens` leaves out the tokens read from and written to its prompt cache,
reported beside it (`cache_read_input_tokens`, `cache_creation_input_tokens`). So
prompt_tokens = input + cache reads + cache writes, and back: input = prompt - cached. The token
limit then settles to the same total whichever side the client is on (edge.usage.record adds
Anthropic's cache fields the same way).

An upstream answer that cannot be translated faithfully (tool arguments that are not a JSON
object, for an Anthropic client) is a BadGateway: the upstream answered wrongly, not the client.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from edge.errors import BadGateway

# Anthropic stop_reason → OpenAI finish_reason
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",  # a server tool's long turn paused: not translated, so not expected
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# OpenAI finish_reason → Anthropic stop_reason ("stop" may be stop_sequence: `stop_reason`)
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _count(usage: dict[str, Any], name: str) -> int:
    value = usage.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def openai_usage(usage: Any) -> dict[str, Any]:
    """OpenAI's usage object for an Anthropic `usage` (see the module docstring)."""
    usage = usage if isinstance(usage, dict) else {}
    cached = _count(usage, "cache_read_input_tokens")
    prompt = _count(usage, "input_tokens") + cached + _count(usage, "cache_creation_input_tokens")
    completion = _count(usage, "output_tokens")
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def anthropic_usage(usage: Any) -> dict[str, int]:
    """Anthropic's usage object for an OpenAI `usage` (see the module docstring)."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = _count(details, "cached_tokens") if isinstance(details, dict) else 0
    prompt = _count(usage, "prompt_tokens")
    out = {
        "input_tokens": max(0, prompt - cached),
        "output_tokens": _count(usage, "completion_tokens"),
    }
    if cached:
        out["cache_read_input_tokens"] = min(cached, prompt)
    return out


def finish_reason(stop_reason: Any) -> str | None:
    return FINISH_REASONS.get(stop_reason, "stop") if stop_reason is not None else None


def stop_reason(choice: dict[str, Any]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for an OpenAI choice. vLLM's own `stop_reason` names the
    stop string that ended the answer, which is Anthropic's stop_sequence."""
    reason = STOP_REASONS.get(choice.get("finish_reason"), "end_turn")  # type: ignore[arg-type]
    matched = choice.get("stop_reason")
    if reason == "end_turn" and isinstance(matched, str):
        return "stop_sequence", matched
    return reason, None


def message_to_completion(message: dict[str, Any], *, created: int | None = None) -> dict[str, Any]:
    """The OpenAI chat completion for an Anthropic message answer. `created` defaults to now."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    content = message.get("content")
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
        # thinking, redacted_thinking: OpenAI's chat API has no place for them
    reply: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
    }
    if calls:
        reply["tool_calls"] = calls
    return {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": reply,
                "logprobs": None,
                "finish_reason": finish_reason(message.get("stop_reason")) or "stop",
            }
        ],
        "usage": openai_usage(message.get("usage")),
    }


def completion_to_message(completion: dict[str, Any]) -> dict[str, Any]:
    """The Anthropic message for an OpenAI chat completion answer (its first choice: the
    translated request asks for one). BadGateway for tool arguments that are not a JSON
    object."""
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    choice = choice if isinstance(choice, dict) else {}
    reply = choice.get("message")
    reply = reply if isinstance(reply, dict) else {}
    content: list[dict[str, Any]] = []
    text = reply.get("content")
    if isinstance(text, list):  # some servers answer in parts
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    refusal = reply.get("refusal")
    if not text and isinstance(refusal, str) and refusal:
        text = refusal
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    calls = reply.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": tool_input(function.get("arguments")),
            }
        )
    reason, sequence = stop_reason(choice)
    if reason == "end_turn" and isinstance(refusal, str) and refusal:
        reason = "refusal"
    return {
        "id": completion.get("id"),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model"),
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": anthropic_usage(completion.get("usage")),
    }


def tool_input(arguments: Any) -> dict[str, Any]:
    """Anthropic's `input` for an OpenAI tool call's `arguments` (a JSON string; empty: {})."""
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    try:
        value = orjson.loads(arguments) if isinstance(arguments, str) else None
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise BadGateway("The upstream answered a tool call whose arguments are not a JSON object.")
    return value
