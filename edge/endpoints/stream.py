"""`ResponseStream`: what a resource puts in `resp.stream` for a streamed answer.

Falcon iterates it and then awaits its `close()` whatever happened (normal end, an error while
sending), so the upstream response is released and the access-log line and stream metrics are
written exactly once, when the last byte has gone out, not when the handler returned.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable


class ResponseStream:
    __slots__ = ("_closed", "_source", "first_chunk_at", "on_close")

    def __init__(self, source: AsyncGenerator[bytes, None]) -> None:
        self._source = source
        self._closed = False
        self.first_chunk_at: float | None = None
        self.on_close: list[Callable[[ResponseStream], None]] = []

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._source.__anext__()
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter()
        return chunk

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._source.aclose()
        finally:
            for callback in self.on_close:
                callback(self)
