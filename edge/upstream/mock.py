"""The built-in deterministic mock provider, answering when no UPSTREAM_URL is configured.

Same request, same text: the reply is derived from the request alone, so tests and first-time
users see stable output. Token counts are whitespace-separated words: rough, but filled in.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

MOCK_MODELS = ("mock-gpt", "gpt-4o-mini", "gpt-4o")
_REPLY = "This is a mock response from llm-edge-proxy: no upstream is configured."


def _words(value: Any) -> int:
    """A rough token count: the words of a prompt, or of the messages' text content.

    Iterative, so a request nested as deep as the JSON parser allows cannot exhaust the
    interpreter's recursion limit.
    """
    count = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            count += len(item.split())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):  # a message, or a content part
            pending.append(item.get("content"))
            pending.append(item.get("text"))
    return count


def _reply(prompt_words: int) -> str:
    return f"{_REPLY} Your prompt had {prompt_words} words."


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def models() -> bytes:
    created = 1_700_000_000
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "llm-edge-proxy"}
                for name in MOCK_MODELS
            ],
        }
    )


def chat(data: dict[str, Any], model: str, request_id: str) -> tuple[bytes, int, int]:
    """(body, prompt_tokens, completion_tokens) of a chat.completion."""
    prompt = _words(data.get("messages"))
    text = _reply(prompt)
    completion = len(text.split())
    body = orjson.dumps(
        {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(prompt, completion),
        }
    )
    return body, prompt, completion


def completion(data: dict[str, Any], model: str, request_id: str) -> tuple[bytes, int, int]:
    """(body, prompt_tokens, completion_tokens) of a text_completion."""
    prompt = _words(data.get("prompt"))
    text = _reply(prompt)
    completion_tokens = len(text.split())
    body = orjson.dumps(
        {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
            "usage": _usage(prompt, completion_tokens),
        }
    )
    return body, prompt, completion_tokens


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def stream(
    data: dict[str, Any], model: str, request_id: str, chat_api: bool
) -> AsyncIterator[bytes]:
    """SSE events: one chunk per word, a final chunk with finish_reason, then [DONE].

    `stream_options.include_usage` adds the usage chunk, as OpenAI does.
    """
    prompt = _words(data.get("messages") if chat_api else data.get("prompt"))
    words = _reply(prompt).split(" ")
    created = int(time.time())
    if chat_api:
        base = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
    else:
        base = {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": created,
            "model": model,
        }

    def chunk(piece: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat_api:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if piece is not None:
                delta["content"] = piece
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice]}

    for index, word in enumerate(words):
        yield _sse(chunk(word if index == 0 else " " + word, None, first=index == 0))
    yield _sse(chunk(None, "stop"))
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        yield _sse({**base, "choices": [], "usage": _usage(prompt, len(words))})
    yield b"data: [DONE]\n\n"


def stream_usage(data: dict[str, Any], chat_api: bool) -> tuple[int, int]:
    """The token counts `stream` reports, for metrics and the access log."""
    prompt = _words(data.get("messages") if chat_api else data.get("prompt"))
    return prompt, len(_reply(prompt).split(" "))
