"""What goes into Layer 2 and what comes out of it: a `Call`, and one exchange back.

An exchange is either a whole answer (`Answer`, the transport's UpstreamResponse) or `Events`:
a stream's whole SSE events, which report their verdict to the provider's breaker themselves
when they end (the router wires that in), so nothing above Layer 2 ever calls a breaker.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from edge.upstream.client import UpstreamResponse as Answer

__all__ = ["Answer", "Call", "Events", "Exchange"]


@dataclass(slots=True)
class Call:
    """One request as Layer 2 sees it, once its endpoint has read and validated it."""

    api: str  # the client's API (edge.errors OPENAI or ANTHROPIC): targets, error shapes
    # "POST"; or "GET"/"DELETE", or any call pinned to `provider`: one exchange without
    # failover (the model list, the stateful endpoints)
    method: str
    path: str  # the upstream path, e.g. "/chat/completions"
    body: bytes | None = None  # forwarded byte for byte (a renaming target rewrites `model`)
    data: dict[str, Any] | None = None  # the parsed body
    model: str | None = None
    stream: bool = False
    headers: dict[str, str] | None = None  # client headers forwarded as they are (checked)
    provider: Any = None  # pinned to this provider (edge.routing.providers.Provider)
    prompt: Any = None  # its token-limit fields (edge.ratelimit.tokens.Prompt), when it has any
    on_event: Callable[[bytes], None] | None = None  # sees each block of a stream's events
    # Takes another token estimate before an attempt the upstream may bill on top of an
    # earlier one (edge.pipeline: a failover after a request that was sent and not answered).
    charge: Callable[[], Awaitable[None]] | None = None
    # time.monotonic() by which the exchange must end, when part of the request's deadline is
    # spent already (a cache follower that waited for an identical request); None: all of it.
    deadline: float | None = None
    # The answer is passed on as the upstream sent it, of any media type (audio, a file's
    # content, a transcription as text): not judged as a JSON object, and a stream is relayed
    # as raw bytes, not as SSE events.
    raw: bool = False
    # The answer's usage is this request's (False: a stored object's, as GET /v1/responses/{id}
    # returns: not counted again in the token metrics).
    metered: bool = True
    # Writes a renaming target's model into the body (a multipart form's field:
    # edge.endpoints.multipart); None: edge.routing.router.rename_model, for a JSON body.
    rename: Callable[[bytes, str], bytes] | None = None


class Events:
    """An answer as a stream of whole SSE events, relayed as they come.

    Iterate it; `aclose()` when done (it releases the upstream connection, also when iteration
    never started); `abort()` when the client hung up (a pending read ends at once, and the
    stream's end is then no verdict on the provider). `usage` is a usage the source knew
    before its first event (the built-in mock); upstream streams report theirs in an event.
    """

    __slots__ = ("_abort", "_release", "_source", "content_type", "headers", "status", "usage")

    def __init__(
        self,
        source: AsyncGenerator[bytes, None],
        abort: Callable[[], None] | None = None,
        release: Callable[[], None] | None = None,
        headers: dict[str, str] | None = None,
        usage: dict[str, Any] | None = None,
        content_type: str | None = None,
    ) -> None:
        """`content_type`: a raw byte stream's (Call.raw); None: SSE events."""
        self._source = source
        self._abort = abort
        self._release = release
        self.status = 200
        self.headers = headers or {}
        self.usage = usage
        self.content_type = content_type

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        return self._source

    async def aclose(self) -> None:
        try:
            await self._source.aclose()
        finally:
            # A generator closed before it started runs no `finally`: release here too.
            if self._release is not None:
                self._release()

    def abort(self) -> None:
        if self._abort is not None:
            self._abort()


Exchange = Answer | Events
