"""The part of a whole SSE event the stream translators read: its data.

Both APIs put the whole of an event's meaning in its JSON data (Anthropic repeats the event's
name as the data's `type`), so the `event:` line is not needed; comments, `id:` and `retry:`
lines carry nothing to translate. Events come whole from edge.upstream.sse's EventSplitter,
whatever the cuts between the upstream's reads or the relay's blocks.
"""

from __future__ import annotations

from typing import Any

import orjson

from edge.errors import stream_error_event

INVALID = object()  # an event whose data is not JSON


def data_of(event: bytes) -> bytes | None:
    """The data of one whole event (its `data:` lines joined by LF, as the SSE spec says), or
    None for an event with no data line."""
    if (
        event.startswith(b"data: ")
        and event.endswith(b"\n\n")
        and event.count(b"\n") == 2
        and b"\r" not in event
    ):
        return event[6:-2]  # the usual event: one data line, LF-terminated
    lines = [line for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[6:] if line[5:6] == b" " else line[5:] for line in lines)


def parse(data: bytes) -> Any:
    """An event's JSON data, or INVALID."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return INVALID


def invalid(shape: str) -> bytes:
    """The error event that ends a stream whose upstream sent an event that is not JSON."""
    return stream_error_event(
        "invalid", "The upstream sent a stream event that could not be translated.", shape
    )
