"""What an answer says it used: the token counts of a whole answer or of a stream's events.

`record` puts a `usage` object's counts on the request context, whichever API wrote it
(OpenAI's prompt/completion_tokens, the Responses and Anthropic APIs' input/output_tokens);
`watcher` finds them in a stream's events as they pass (they feed the token metrics, the access
line and the token limit's settling).

The usage chunk of an OpenAI stream: with `stream_options.include_usage`, the last data event
before `[DONE]` is a chunk with `"choices": []` and the request's `usage`. The token limit needs
that usage; when the gateway asked for it on the client's behalf, the client must not see the
extra chunk (clients that did not ask can crash on its empty `choices`). `usage_event(event)`
is the per-event test; `hide_usage_event` drops it from a stream, holding back only an
incomplete trailing event, never a whole stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeGuard

import orjson

if TYPE_CHECKING:
    from edge.observability.context import RequestContext

_MARK = b'"usage"'
_CACHE_FIELDS = ("cache_creation_input_tokens", "cache_read_input_tokens")


def record(ctx: RequestContext, usage: Any) -> None:
    """Token counts from `usage` onto the request context. A count absent here keeps its
    earlier value (Anthropic streams input tokens first and output tokens at the end). The
    prompt count is every input token billed, read from a prompt cache included."""
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        if _count(prompt):
            # Anthropic's input_tokens leaves out the prompt cache's tokens, billed as input
            # too; OpenAI's prompt_tokens (and input_tokens, with input_tokens_details)
            # include their cached tokens, also when a compatible server adds Anthropic's
            # cache fields beside them.
            if "prompt_tokens" not in usage and "input_tokens_details" not in usage:
                for name in _CACHE_FIELDS:
                    cached = usage.get(name)
                    if _count(cached) and cached > 0:
                        prompt += cached
            ctx.prompt_tokens = prompt
            read = _cache_reads(usage)
            if read is not None:
                ctx.cached_tokens = read
        if _count(completion):
            ctx.completion_tokens = completion


MAX_COUNT = 10**9  # tokens of one answer, at most: a larger count is an upstream's error


def _count(value: Any) -> TypeGuard[int]:
    """A token count to believe: a whole number up to MAX_COUNT (a hostile upstream's 2^64
    would otherwise settle a token limit, or a cost, to nonsense)."""
    return isinstance(value, int) and not isinstance(value, bool) and value <= MAX_COUNT


def _cache_reads(usage: dict[str, Any]) -> int | None:
    """Input tokens read from a prompt cache (priced apart: edge.cost): OpenAI's
    `prompt_tokens_details.cached_tokens` (the Responses API's `input_tokens_details`),
    Anthropic's `cache_read_input_tokens`."""
    for holder in ("prompt_tokens_details", "input_tokens_details"):
        details = usage.get(holder)
        if isinstance(details, dict) and "cached_tokens" in details:
            read = details["cached_tokens"]
            return read if _count(read) and read >= 0 else None
    read = usage.get("cache_read_input_tokens")
    return read if _count(read) and read >= 0 else None


def watcher(ctx: RequestContext) -> Callable[[bytes], None]:
    """A function that picks `usage` out of each block of a relayed stream.

    Only blocks that mention usage are parsed, and only their `data:` line holding it. The
    relay hands over whole events only (edge.upstream.sse), so a usage event is never split.
    """

    def on_block(block: bytes) -> None:
        # Every data line that mentions usage (several events may share one read: Anthropic's
        # message_start and message_delta, the Responses API's created and completed).
        at = block.find(_MARK)
        while at >= 0:
            start = block.rfind(b"data:", 0, at)
            end = block.find(b"\n", at)
            end = end if end >= 0 else len(block)
            if start >= 0:
                _from_line(ctx, block[start + 5 : end])
            at = block.find(_MARK, end)

    return on_block


def _from_line(ctx: RequestContext, line: bytes) -> None:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return
    if isinstance(event, dict):
        record(ctx, event.get("usage"))
        for holder in ("response", "message"):  # Responses API, Anthropic message_start
            inner = event.get(holder)
            if isinstance(inner, dict):
                record(ctx, inner.get("usage"))


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


async def hide_usage_event(source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Relay `source` as whole events, dropping the usage-only chunk (`usage_event`). Whatever
    is left at the end is passed on as it is. Closing this generator closes `source` (the
    relay, which releases the upstream)."""
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
                if usage_event(event) is None:
                    out.append(event)
            buffer = buffer[start:]
            if out:
                yield b"".join(out)
        if buffer:
            yield buffer
    finally:
        await source.aclose()  # type: ignore[attr-defined]
