"""An OpenAI chat completion chunk stream, rebuilt as it comes in Anthropic's event grammar.

Theory of operation. Anthropic's stream is a grammar, not a bag of deltas:

    message_start
    (content_block_start (content_block_delta)* content_block_stop)*   one block at a time
    message_delta                                                      stop_reason, usage
    message_stop

OpenAI's chunks say less: text and tool call fragments, keyed by a tool call's index, then a
chunk with the finish reason, then (asked for upstream with `stream_options.include_usage`) a
chunk with the usage and no choices, then `[DONE]`. So `ChunksToEvents.feed` keeps one block
open at a time: text opens a text block; a tool call's first fragment (once its name is known)
closes the open block and opens a tool_use block, and its `arguments` fragments become
`input_json_delta`s. The finish reason closes the open block; `message_delta` and
`message_stop` wait for `[DONE]`, since the usage chunk comes after the finish chunk.

Departures, all for upstreams that break OpenAI's own habits: an `arguments` fragment of a
tool call whose block was closed already (the upstream interleaved two calls) goes out as a
delta of that earlier block, which the anthropic SDK accumulates by index; a tool call whose
name never came is shown at the end with an empty name rather than lost; and an upstream that
reports no usage leaves `output_tokens` at 0 (and `usage` None, so the gateway settles to its
estimate). `message_start` says `input_tokens` as given to the constructor (OpenAI reports them
only at the end); `message_delta` carries the exact count, which the SDK takes over.

An OpenAI error event becomes Anthropic's `event: error`, and the stream ends there. `end()`
closes a stream whose upstream finished but ended without `[DONE]`.
"""

from __future__ import annotations

from typing import Any

import orjson

from edge.adapters.answers import anthropic_usage, stop_reason
from edge.adapters.errors import anthropic_error_event
from edge.adapters.frames import INVALID, data_of, invalid, parse
from edge.errors import ANTHROPIC
from edge.upstream.sse import EventSplitter

# A text delta, the commonest event, written as `event` would write it, without a dict.
_TEXT_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"text_delta","text":'
)


def event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class _Call:
    """A tool call seen before its name: held until it can open its block."""

    __slots__ = ("arguments", "id", "name")

    def __init__(self) -> None:
        self.id: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []


class ChunksToEvents:
    """One OpenAI stream's translator (see the module docstring)."""

    __slots__ = (
        "_blocks",
        "_calls",
        "_finish",
        "_input_tokens",
        "_last_call",
        "_open",
        "_open_text",
        "_pending",
        "_refused",
        "_splitter",
        "_started",
        "_usage",
        "done",
    )

    def __init__(self, *, input_tokens: int = 0) -> None:
        self._input_tokens = input_tokens
        self._splitter = EventSplitter()
        self._started = False
        self._blocks = 0  # blocks opened so far: the next block's index
        self._open: int | None = None  # the open block's index
        self._open_text = False  # the open block is text
        self._calls: dict[Any, int] = {}  # OpenAI tool call index → its block's index
        self._pending: dict[Any, _Call] = {}
        self._last_call: Any = None
        self._finish: tuple[str, str | None] | None = None
        self._usage: dict[str, Any] | None = None
        self._refused = False  # the text is a refusal (OpenAI's `refusal` deltas)
        self.done = False

    @property
    def usage(self) -> dict[str, Any] | None:
        """OpenAI's usage object as the upstream reported it, None before it did."""
        return self._usage

    def feed(self, data: bytes) -> bytes:
        """The Anthropic events the chunks completed by `data` translate to."""
        out: list[bytes] = []
        for raw in self._splitter.feed(data):
            if self.done:
                break
            payload = data_of(raw)
            if payload is None:
                continue
            if payload.strip() == b"[DONE]":
                out.append(self._close())
                continue
            item = parse(payload)
            if item is INVALID:
                out.append(invalid(ANTHROPIC))
                self.done = True
            elif isinstance(item, dict):
                if isinstance(item.get("error"), dict):
                    out.append(anthropic_error_event(item))
                    self.done = True
                else:
                    self._chunk(item, out)
        return b"".join(out)

    def end(self) -> bytes:
        """The closing events of a stream whose upstream finished (a finish reason seen) and
        ended without `[DONE]`; b"" otherwise."""
        if self.done or self._finish is None:
            return b""
        return self._close()

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        if not self._started:
            self._started = True
            out.append(self._message_start(chunk.get("id"), chunk.get("model")))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice, out)

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if not text and delta.get("refusal"):
                text = delta["refusal"]
                self._refused = True
            if isinstance(text, str) and text:
                if not self._open_text:
                    self._stop(out)
                    out.append(self._start({"type": "text", "text": ""}))
                    self._open_text = True
                out.append(_TEXT_DELTA % self._open + orjson.dumps(text) + b"}}\n\n")
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    self._tool_call(call, out)
        if choice.get("finish_reason") is not None:
            reason, sequence = stop_reason(choice)
            if reason == "end_turn" and self._refused:
                reason = "refusal"  # as for a whole answer with a refusal
            self._finish = (reason, sequence)
            self._stop(out)

    def _tool_call(self, call: dict[str, Any], out: list[bytes]) -> None:
        key = call.get("index")
        if not isinstance(key, int) or isinstance(key, bool):  # some servers leave it out
            key = len(self._calls) + len(self._pending) if call.get("id") else self._last_call
        self._last_call = key
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        arguments = function.get("arguments")
        fragment = arguments if isinstance(arguments, str) else ""
        block = self._calls.get(key)
        if block is not None:
            if fragment:
                out.append(
                    self._event_delta(block, {"type": "input_json_delta", "partial_json": fragment})
                )
            return
        pending = self._pending.setdefault(key, _Call())
        if isinstance(call.get("id"), str):
            pending.id = call["id"]
        if isinstance(function.get("name"), str) and function["name"]:
            pending.name = function["name"]
        if fragment:
            pending.arguments.append(fragment)
        if pending.name is not None:
            del self._pending[key]
            self._open_call(key, pending, out)

    def _open_call(self, key: Any, call: _Call, out: list[bytes]) -> None:
        """Open a tool call's block, with the arguments that came before its name."""
        self._stop(out)
        tool = {
            "type": "tool_use",
            "id": call.id or f"call_{key}",
            "name": call.name or "",
            "input": {},
        }
        out.append(self._start(tool))
        self._calls[key] = self._blocks - 1
        if call.arguments:
            joined = "".join(call.arguments)
            out.append(
                self._event_delta(self._open, {"type": "input_json_delta", "partial_json": joined})
            )

    def _message_start(self, id_: Any, model: Any) -> bytes:
        message = {
            "id": id_ if isinstance(id_, str) else "msg_unknown",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._input_tokens, "output_tokens": 0},
        }
        return event("message_start", {"type": "message_start", "message": message})

    def _start(self, block: dict[str, Any]) -> bytes:
        self._open = self._blocks
        self._blocks += 1
        return event(
            "content_block_start",
            {"type": "content_block_start", "index": self._open, "content_block": block},
        )

    def _event_delta(self, index: int | None, delta: dict[str, Any]) -> bytes:
        return event(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        )

    def _stop(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(
                event("content_block_stop", {"type": "content_block_stop", "index": self._open})
            )
            self._open = None
            self._open_text = False

    def _close(self) -> bytes:
        out: list[bytes] = []
        if not self._started:
            self._started = True
            out.append(self._message_start(None, None))
        for key, call in self._pending.items():  # never named: shown, not lost
            self._open_call(key, call, out)
        self._pending.clear()
        self._stop(out)
        reason, sequence = self._finish or ("end_turn", None)
        usage = anthropic_usage(self._usage) if self._usage is not None else {"output_tokens": 0}
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        out.append(
            event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
        )
        out.append(event("message_stop", {"type": "message_stop"}))
        self.done = True
        return b"".join(out)
