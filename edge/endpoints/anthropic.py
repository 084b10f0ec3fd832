"""POST /v1/messages: Anthropic's Messages API, routed to providers of kind "anthropic".

The client authenticates with a gateway key (the anthropic SDK and Claude Code send it as
x-api-key, which the auth middleware accepts); upstream gets the provider's own key as
x-api-key, plus the client's anthropic-version (a default when absent) and anthropic-beta.
Errors on this route use Anthropic's shape, {"type": "error", "error": {"type", "message"}},
so the SDK raises the right exception. Without providers the built-in mock answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from edge.endpoints.body import validate_chat
from edge.endpoints.exchange import (
    JSON,
    SSE,
    answered_by_mock,
    forward,
    read_request,
    refund_on_error,
    reserve_tokens,
)
from edge.errors import ANTHROPIC, ApiError
from edge.observability.context import RequestContext
from edge.ratelimit.tokens import MESSAGES, Reservation
from edge.routing import mock

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime

DEFAULT_VERSION = "2023-06-01"
MAX_HEADER = 512


class Messages:
    """POST /v1/messages."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def on_post(self, req: Any, resp: Any) -> None:
        runtime = self._runtime
        body, data, ctx = await read_request(req, runtime, validate_chat)
        reservation = await reserve_tokens(runtime, ctx, resp, data, MESSAGES)
        if reservation is not None:
            body = orjson.dumps(data)  # as estimated: see reserve_tokens
        try:
            await self._answer(req, resp, ctx, body, data, reservation)
        except ApiError as exc:
            await refund_on_error(reservation, exc)
            raise

    async def _answer(
        self,
        req: Any,
        resp: Any,
        ctx: RequestContext,
        body: bytes,
        data: dict[str, Any],
        reservation: Reservation | None,
    ) -> None:
        runtime = self._runtime
        if runtime.router is None:
            _mock(resp, data, ctx)
            await answered_by_mock(resp, reservation, ctx)
            return
        headers = {"anthropic-version": _header(req, "anthropic-version") or DEFAULT_VERSION}
        beta = _header(req, "anthropic-beta")
        if beta:
            headers["anthropic-beta"] = beta
        await forward(
            req,
            resp,
            ctx,
            runtime.router,
            "/messages",
            body,
            ctx.model,
            ctx.stream,
            reservation,
            kind="anthropic",
            extra_headers=headers,
            error_shape=ANTHROPIC,
        )


def _header(req: Any, name: str) -> str | None:
    value = req.get_header(name)
    if value is None or len(value) > MAX_HEADER or not value.isascii() or not value.isprintable():
        return None
    return value


def _mock(resp: Any, data: dict[str, Any], ctx: RequestContext) -> None:
    prompt = mock._words(data.get("messages")) + mock._words(data.get("system"))
    text = mock._reply(prompt)
    output = len(text.split())
    ctx.prompt_tokens, ctx.completion_tokens = prompt, output
    message = {
        "id": f"msg_{ctx.request_id}",
        "type": "message",
        "role": "assistant",
        "model": ctx.model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": prompt, "output_tokens": output},
    }
    if not ctx.stream:
        resp.data, resp.content_type = orjson.dumps(message), JSON
        return
    resp.content_type = SSE
    resp.set_header("cache-control", "no-cache")
    resp.stream = _mock_stream(message, text)


async def _mock_stream(message: dict[str, Any], text: str) -> AsyncIterator[bytes]:
    def event(kind: str, payload: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None,
             "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0}}  # fmt: skip
    yield event("message_start", {"type": "message_start", "message": start})
    block = {"type": "text", "text": ""}
    yield event("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": block})  # fmt: skip
    for index, word in enumerate(text.split(" ")):
        delta = {"type": "text_delta", "text": word if index == 0 else " " + word}
        yield event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": delta})  # fmt: skip
    yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield event("message_delta", {"type": "message_delta",
                                  "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                  "usage": {"output_tokens": usage["output_tokens"]}})  # fmt: skip
    yield event("message_stop", {"type": "message_stop"})
