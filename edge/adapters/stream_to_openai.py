"""An Anthropic Messages event stream, translated as it comes into OpenAI chat completion chunks.

Theory of operation. Feed `EventsToChunks.feed` the upstream's bytes as they arrive, cut
anywhere; it keeps an incomplete event until its end and returns the chunks the whole events
make (b"" when they make none):

    message_start               → the role chunk (`delta: {role, content: ""}`)
    content_block_start text    → nothing (its text, when it has some, as content)
    text_delta                  → `delta.content`
    content_block_start tool_use→ `delta.tool_calls[{index, id, type, function: {name,
                                  arguments: ""}}]`, the index counting tool blocks only
    input_json_delta            → `delta.tool_calls[{index, function: {arguments}}]`
    message_delta               → the finish chunk (`finish_reason`, edge.adapters.answers)
    message_stop                → the usage chunk (`choices: []`) when the client asked for it
                                  (`stream_options.include_usage`), then `data: [DONE]`
    error                       → OpenAI's error event (the envelope as data, which the openai
                                  SDK raises); the stream ends there
    ping, thinking and citation deltas, unknown events → nothing

`usage` is the usage seen so far in OpenAI's terms (prompt tokens include the cache's), for the
gateway's token accounting whether or not the client asked to see it. `done` says the stream
ended as a stream should (`[DONE]` or an error event written).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from edge.adapters.answers import finish_reason, openai_usage
from edge.adapters.errors import openai_error_event
from edge.adapters.frames import INVALID, data_of, invalid, parse
from edge.errors import OPENAI
from edge.upstream.sse import EventSplitter

DONE = b"data: [DONE]\n\n"
_CHOICE = b'[{"index":0,"delta":'
_CHUNK_END = b',"logprobs":null,"finish_reason":null}]}\n\n'
_USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


class EventsToChunks:
    """One Anthropic stream's translator (see the module docstring)."""

    __slots__ = (
        "_created",
        "_id",
        "_include_usage",
        "_model",
        "_prefix",
        "_splitter",
        "_tools",
        "_usage",
        "done",
    )

    def __init__(self, *, include_usage: bool = False, created: int | None = None) -> None:
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._splitter = EventSplitter()
        self._id: Any = None
        self._model: Any = None
        self._prefix: bytes | None = (
            None  # a chunk's bytes up to its delta, once id and model are known
        )
        self._tools: dict[Any, int] = {}  # Anthropic block index → OpenAI tool call index
        self._usage: dict[str, Any] | None = None  # Anthropic's counts, latest of each
        self.done = False

    @property
    def usage(self) -> dict[str, Any] | None:
        """OpenAI's usage object for what the stream reported so far, None before any."""
        return None if self._usage is None else openai_usage(self._usage)

    def feed(self, data: bytes) -> bytes:
        """The chunks the events completed by `data` translate to."""
        out: list[bytes] = []
        for event in self._splitter.feed(data):
            if self.done:
                break
            payload = data_of(event)
            if payload is None:
                continue
            item = parse(payload)
            if item is INVALID:
                out.append(invalid(OPENAI))
                self.done = True
            elif isinstance(item, dict):
                out.append(self._translate(item))
        return b"".join(out)

    def _translate(self, item: dict[str, Any]) -> bytes:
        kind = item.get("type")
        if kind == "content_block_delta":
            delta = item.get("delta")
            if not isinstance(delta, dict):
                return b""
            if delta.get("type") == "text_delta":
                text = delta.get("text")
                return self._chunk({"content": text}) if isinstance(text, str) and text else b""
            if delta.get("type") == "input_json_delta":
                tool = self._tools.get(item.get("index"))
                fragment = delta.get("partial_json")
                if tool is None or not isinstance(fragment, str) or not fragment:
                    return b""
                return self._chunk(
                    {"tool_calls": [{"index": tool, "function": {"arguments": fragment}}]}
                )
            return b""  # thinking, signature and citation deltas
        if kind == "content_block_start":
            return self._block_start(item)
        if kind == "message_start":
            message = item.get("message")
            message = message if isinstance(message, dict) else {}
            self._id = message.get("id")
            self._model = message.get("model")
            self._prefix = None
            self._count(message.get("usage"))
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "message_delta":
            self._count(item.get("usage"))
            delta = item.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            return self._chunk({}, finish_reason(reason) or "stop")
        if kind == "message_stop":
            self.done = True
            if self._include_usage:
                return self._usage_chunk() + DONE
            return DONE
        if kind == "error":
            self.done = True
            return openai_error_event(item)
        return b""  # ping, content_block_stop, and event types added later

    def _block_start(self, item: dict[str, Any]) -> bytes:
        block = item.get("content_block")
        if not isinstance(block, dict):
            return b""
        if block.get("type") == "text":
            text = block.get("text")
            return self._chunk({"content": text}) if isinstance(text, str) and text else b""
        if block.get("type") != "tool_use":
            return b""  # thinking
        index = self._tools[item.get("index")] = len(self._tools)
        given = block.get("input")
        arguments = orjson.dumps(given).decode() if isinstance(given, dict) and given else ""
        call = {
            "index": index,
            "id": block.get("id"),
            "type": "function",
            "function": {"name": block.get("name"), "arguments": arguments},
        }
        return self._chunk({"tool_calls": [call]})

    def _count(self, usage: Any) -> None:
        """Take the counts a usage object holds (message_delta's are cumulative totals)."""
        if not isinstance(usage, dict):
            return
        if self._usage is None:
            self._usage = {}
        for name in _USAGE_FIELDS:
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                self._usage[name] = value

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        if finish is None:  # most chunks: only the delta varies (written as _envelope would)
            if self._prefix is None:
                self._prefix = b"data: " + orjson.dumps(self._envelope([]))[:-3] + _CHOICE
            return self._prefix + orjson.dumps(delta) + _CHUNK_END
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps(self._envelope([choice])) + b"\n\n"

    def _usage_chunk(self) -> bytes:
        chunk = self._envelope([])
        chunk["usage"] = openai_usage(self._usage)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": choices,
        }
