"""The OpenAI endpoints: chat and legacy completions, the model list."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from edge.endpoints.body import (
    validate_chat,
    validate_completion,
)
from edge.endpoints.stream import ResponseStream
from edge.errors import ApiError
from edge.observability.context import RequestContext
from edge.ratelimit.tokens import CHAT, COMPLETION, Reservation, ask_for_usage
from edge.routing import mock
from edge.server.disconnect import unless_client_leaves

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime
from edge.endpoints.exchange import (
    JSON,
    SSE,
    forward,
    read_request,
    refund_on_error,
    reserve_tokens,
    send_upstream,
    settle_answer,
    settled_stream,
)


class Completions:
    """POST /v1/chat/completions (chat=True) and POST /v1/completions (chat=False)."""

    def __init__(self, runtime: Runtime, chat: bool) -> None:
        self._runtime = runtime
        self._chat = chat
        self._path = "/chat/completions" if chat else "/completions"
        self._validate = validate_chat if chat else validate_completion

    async def on_post(self, req: Any, resp: Any) -> None:
        runtime = self._runtime
        body, data, ctx = await read_request(req, runtime, self._validate)
        model, stream = ctx.model, ctx.stream
        where = CHAT if self._chat else COMPLETION
        reservation = await reserve_tokens(runtime, ctx, resp, data, where)
        hide_usage = False
        if reservation is not None:
            hide_usage = stream and ask_for_usage(data)
            body = orjson.dumps(data)  # as estimated: see reserve_tokens
        try:
            if runtime.router is None:
                await self._mock(req, resp, data, ctx, reservation, hide_usage)
                return
            route, path = runtime.router, self._path
            await forward(req, resp, ctx, route, path, body, model, stream, reservation, hide_usage)
        except ApiError as exc:
            await refund_on_error(reservation, exc)
            raise

    async def _mock(
        self,
        req: Any,
        resp: Any,
        data: dict[str, Any],
        ctx: RequestContext,
        reservation: Reservation | None,
        hide_usage: bool,
    ) -> None:
        chat = self._chat
        if ctx.stream:
            prompt, completion, source = mock.stream(data, ctx.model, ctx.request_id, chat)
            ctx.prompt_tokens, ctx.completion_tokens = prompt, completion
            resp.content_type = SSE
            resp.set_header("cache-control", "no-cache")
            source = settled_stream(source, reservation, ctx, hide_usage)
            resp.stream = ResponseStream(source)
            return
        build = mock.chat if chat else mock.completion
        resp.data, ctx.prompt_tokens, ctx.completion_tokens = build(data, ctx.model, ctx.request_id)
        resp.content_type = JSON
        await settle_answer(reservation, ctx, 200)


class Models:
    """GET /v1/models: the configured model names with PROVIDERS_FILE, else the upstream's."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def on_get(self, req: Any, resp: Any) -> None:
        router = self._runtime.router
        if router is None:
            resp.data = mock.models()
            resp.content_type = JSON
            return
        if router.providers.from_file:
            names = router.providers.model_names()
            resp.data = orjson.dumps({"object": "list", "data": [model_object(n) for n in names]})
            resp.content_type = JSON
            return
        ctx = req.context.edge
        result = await unless_client_leaves(req, router.call(ctx, "GET", "/models"))
        send_upstream(resp, ctx, result)

    on_head = on_get  # Falcon sends the head (with the GET's Content-Length) and no body


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llm-edge-proxy"}
