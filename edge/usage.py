"""The usage chunk of an OpenAI stream, seen on whole SSE events.

With `stream_options.include_usage`, the last data event before `[DONE]` is a chunk with
`"choices": []` and the request's `usage`. The token limit needs that usage; when the gateway
asked for it on the client's behalf, the client must not see the extra chunk (clients that did
not ask can crash on its empty `choices`).

`usage_event(event)` is the per-event test, written for a splitter that hands over whole events
(edge/upstream/sse.py when merged). `watch_usage` is a minimal splitter around a byte stream for
use until then: it holds back only an incomplete trailing event, never a whole stream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

_MARK = b'"usage"'


def usage_event(event: bytes) -> dict[str, Any] | None:
    """The `usage` of a usage-only chunk (`choices` empty), else None. `event` is one whole SSE
    event; anything that is not a JSON data event is not one (and costs one substring test)."""
    if _MARK not in event:
        return None
    data = b"".join(
        line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
    )
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(chunk, dict) or chunk.get("choices") != []:
        return None
    usage = chunk.get("usage")
    return usage if isinstance(usage, dict) else None


def _event_end(buffer: bytes, start: int) -> tuple[int, int]:
    """(end of the first complete event at or after `start`, length of its terminator)."""
    best, size = -1, 0
    for terminator in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        at = buffer.find(terminator, start)
        if at >= 0 and (best < 0 or at < best):
            best, size = at, len(terminator)
    return best, size


async def watch_usage(
    source: AsyncGenerator[bytes, None],
    on_usage: Callable[[dict[str, Any]], Awaitable[None]],
    hide: bool,
) -> AsyncIterator[bytes]:
    """Relay `source` as whole events, calling `on_usage` with a usage-only chunk's usage and,
    when `hide`, dropping that event. Whatever is left at the end is passed on as it is.
    Closing this generator closes `source` (the relay, which releases the upstream)."""
    buffer = b""
    try:
        async for chunk in source:
            buffer = buffer + chunk if buffer else chunk
            out: list[bytes] = []
            start = 0
            while True:
                end, size = _event_end(buffer, start)
                if end < 0:
                    break
                event = buffer[start : end + size]
                start = end + size
                usage = usage_event(event)
                if usage is not None:
                    await on_usage(usage)
                    if hide:
                        continue
                out.append(event)
            buffer = buffer[start:]
            if out:
                yield b"".join(out)
        if buffer:
            yield buffer
    finally:
        await source.aclose()
