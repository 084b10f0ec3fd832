"""The adapter between the router and the transport: a call sent to a provider of another kind.

A model's targets may be of any kind. When the client's API (`Call.api`) is not the target
provider's kind, the router asks `translate` once per kind and request for a `Translation`
(edge.routing.router.Router.exchange), and the attempt goes out as it says: another upstream
path, the translated body, the headers that kind needs. What comes back is made the client's
again here: a whole answer or an error answer (`answer`), a stream's events (`events`), and the
error event the relay writes when the upstream breaks mid-stream (`error_event`, in the
upstream's shape, so that the stream's translator turns it into the client's). Routing,
failover, breakers and the token accounting stay what they are for any target: the usage of a
translated answer is read like a native one (edge.usage reads both APIs' usage).

Only chat crosses: OpenAI's /chat/completions and Anthropic's /messages. Every other route is
served by providers of its own kind only (`TRANSLATED`). The translation itself (which fields,
what is refused) is edge.adapters, sans I/O.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import orjson

from edge.adapters import answers, errors
from edge.adapters.request_to_anthropic import chat_to_messages
from edge.adapters.request_to_openai import messages_to_chat
from edge.adapters.stream_to_anthropic import ChunksToEvents
from edge.adapters.stream_to_openai import EventsToChunks
from edge.errors import ANTHROPIC, OPENAI, BadGateway, stream_error_event
from edge.routing.exchange import Call
from edge.upstream.client import UpstreamResponse

ANTHROPIC_VERSION = "2023-06-01"
# (the client's API, its upstream path) → the path a provider of the other kind serves it at
TRANSLATED = {
    (OPENAI, "/chat/completions"): "/messages",
    (ANTHROPIC, "/messages"): "/chat/completions",
}


def translatable(call: Call) -> bool:
    """Whether the call's route may go to a provider of another kind."""
    return (call.api, call.path) in TRANSLATED


class Translation:
    """How one call goes to a provider of kind `kind`, and how its answer comes back."""

    __slots__ = ("_client", "_include_usage", "body", "headers", "kind", "path")

    def __init__(self, call: Call, kind: str, max_tokens_default: int) -> None:
        """Raises BadRequest naming the field when the call cannot be translated."""
        data = call.data or {}
        self._client = call.api
        self.kind = kind
        self.path = TRANSLATED[call.api, call.path]
        if call.api == OPENAI:
            translated = chat_to_messages(data, max_tokens_default=max_tokens_default)
            self.headers: dict[str, str] | None = {"anthropic-version": ANTHROPIC_VERSION}
            options = data.get("stream_options")
            self._include_usage = isinstance(options, dict) and options.get("include_usage") is True
        else:
            translated = messages_to_chat(data)
            self.headers = None  # anthropic-version and -beta are Anthropic's only
            self._include_usage = False
        self.body = orjson.dumps(translated)

    def answer(self, result: UpstreamResponse) -> UpstreamResponse:
        """A whole answer in the client's API: a success translated (left as it came when it
        is not a JSON object, for the router to judge), an error in the client's shape with
        the status its SDK expects (an Anthropic 529 is a 503; edge.adapters.errors)."""
        status = result.status
        if not 200 <= status < 300:
            to_client = errors.for_openai if self._client == OPENAI else errors.for_anthropic
            result.status, result.body = to_client(status, result.body)
            result.data, result.content_type = None, "application/json"
            return result
        try:
            data = orjson.loads(result.body)
        except orjson.JSONDecodeError:
            return result
        if not isinstance(data, dict):
            return result
        try:
            if self._client == OPENAI:
                translated = answers.message_to_completion(data)
            else:
                translated = answers.completion_to_message(data)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise BadGateway("The upstream's answer could not be translated.") from None
        result.body, result.data = orjson.dumps(translated), translated
        result.content_type = "application/json"
        return result

    def error_event(self, kind: str, message: str) -> bytes:
        """The relay's event for a stream broken mid-way, in the upstream's shape (the
        stream's translator turns it into the client's)."""
        return stream_error_event(kind, message, self.kind)

    async def events(self, source: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """The upstream's stream, block by block, as the client's API's events."""
        translator: Any
        if self._client == OPENAI:
            translator = EventsToChunks(include_usage=self._include_usage)
        else:
            translator = ChunksToEvents()
        try:
            async for block in source:
                out = translator.feed(block)
                if out:
                    yield out
            if isinstance(translator, ChunksToEvents):
                tail = translator.end()  # an upstream that finished without [DONE]
                if tail:
                    yield tail
        finally:
            await source.aclose()
