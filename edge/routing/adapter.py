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

from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson

from edge.adapters import answers, errors
from edge.adapters.request_to_anthropic import chat_to_messages
from edge.adapters.request_to_openai import messages_to_chat
from edge.adapters.stream_to_anthropic import ChunksToEvents
from edge.adapters.stream_to_openai import EventsToChunks
from edge.errors import ANTHROPIC, OPENAI, ApiError, BadGateway, BadRequest, stream_error_event
from edge.routing.exchange import Call
from edge.upstream.client import UpstreamResponse

ANTHROPIC_VERSION = "2023-06-01"
# A whole answer larger than this is not translated (parsing it would hold several times its
# size): the provider's failure, `invalid`, failed over like one.
MAX_TRANSLATED_BYTES = 8 << 20
# What a translated success must hold to be one, by the client's API (so an error sent with a
# 200, or `{}`, is not turned into an empty answer).
_ANSWER_FIELD = {OPENAI: ("content", list), ANTHROPIC: ("choices", list)}
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
        self.headers: dict[str, str] | None = None  # anthropic-version and -beta: Anthropic's
        self._include_usage = False
        try:
            if call.api == OPENAI:
                translated = chat_to_messages(data, max_tokens_default=max_tokens_default)
                self.headers = {"anthropic-version": ANTHROPIC_VERSION}
                options = data.get("stream_options")
                self._include_usage = (
                    isinstance(options, dict) and options.get("include_usage") is True
                )
            else:
                translated = messages_to_chat(data)
            self.body = orjson.dumps(translated)
        except (TypeError, RecursionError):  # orjson writes at most 254 levels
            raise BadRequest(
                "The request is nested too deeply to be translated for this model's provider "
                "(at most 254 levels, tool arguments and schemas included)."
            ) from None

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
        if len(result.body) > MAX_TRANSLATED_BYTES:
            raise BadGateway("The upstream's answer is too large to be translated.")
        try:
            data = orjson.loads(result.body)
        except orjson.JSONDecodeError:
            return result  # not JSON: the router judges it (invalid)
        field, kind = _ANSWER_FIELD[self._client]
        if not isinstance(data, dict) or not isinstance(data.get(field), kind):
            raise BadGateway("The upstream answered something that is not an answer.")
        try:
            if self._client == OPENAI:
                translated = answers.message_to_completion(data)
            else:
                translated = answers.completion_to_message(data)
            result.body = orjson.dumps(translated)
        except ApiError:
            raise
        except Exception:  # a hostile answer (nested past orjson's depth, odd types)
            raise BadGateway("The upstream's answer could not be translated.") from None
        result.data = translated
        result.content_type = "application/json"
        return result

    def error_event(self, kind: str, message: str) -> bytes:
        """The relay's event for a stream broken mid-way, in the upstream's shape (the
        stream's translator turns it into the client's)."""
        return stream_error_event(kind, message, self.kind)

    async def events(
        self, source: AsyncGenerator[bytes, None], broke: Callable[[], None]
    ) -> AsyncGenerator[bytes, None]:
        """The upstream's stream, block by block, as the client's API's events. A stream that
        cannot be translated, or that ends before it is whole (no `message_stop` or
        `[DONE]`, no error event), ends with the client's error event, and `broke()` tells the
        router (the provider's failure, `invalid`)."""
        translator: Any
        if self._client == OPENAI:
            translator = EventsToChunks(include_usage=self._include_usage)
        else:
            translator = ChunksToEvents()
        try:
            try:
                async for block in source:
                    out = translator.feed(block)
                    if out:
                        yield out
                    if translator.done:
                        break
                if isinstance(translator, ChunksToEvents):
                    tail = translator.end()  # an upstream that finished without [DONE]
                    if tail:
                        yield tail
                whole = translator.done
                message = "The upstream's stream ended before it was complete."
            except Exception:  # an event the translator cannot take (odd types, depth)
                whole = False
                message = "The upstream sent a stream event that could not be translated."
            if not whole:
                broke()
                yield stream_error_event("invalid", message, self._client)
        finally:
            await source.aclose()
