"""More OpenAI endpoints, routed by model like chat: embeddings, responses, moderations, and
GET /v1/models/{id}. Bodies pass byte for byte both ways (the SDK asks for base64 embeddings;
re-serialising them would break it); only a renaming target rewrites the `model` field."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from edge.endpoints.exchange import (
    JSON,
    SSE,
    answered_by_mock,
    forward,
    read_request,
    refund_on_error,
    reserve_tokens,
    send_upstream,
)
from edge.endpoints.openai import model_object
from edge.errors import ApiError
from edge.observability.context import RequestContext
from edge.ratelimit.tokens import Prompt
from edge.routing import mock
from edge.routing.router import ModelNotFound
from edge.server.disconnect import unless_client_leaves

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime

Validator = Callable[[dict[str, Any]], tuple[str, bool]]


class PassThrough:
    """POST /v1/embeddings, /v1/responses and /v1/moderations."""

    def __init__(
        self, runtime: Runtime, path: str, validate: Validator, tokens: Prompt | None
    ) -> None:
        self._runtime = runtime
        self._path = path
        self._validate = validate
        self._tokens = tokens  # where the prompt is, for TPM; None: no token limit (moderations)

    async def on_post(self, req: Any, resp: Any) -> None:
        runtime = self._runtime
        body, data, ctx = await read_request(req, runtime, self._validate)
        model, stream = ctx.model, ctx.stream
        reservation = None
        if self._tokens is not None:
            reservation = await reserve_tokens(runtime, ctx, resp, data, self._tokens)
        if reservation is not None:
            body = orjson.dumps(data)  # as estimated: see reserve_tokens
        try:
            if runtime.router is None:
                self._mock(resp, data, ctx)
                await answered_by_mock(resp, reservation, ctx)
                return
            router, path = runtime.router, self._path
            await forward(req, resp, ctx, router, path, body, model, stream, reservation)
        except ApiError as exc:
            await refund_on_error(reservation, exc)
            raise

    def _mock(self, resp: Any, data: dict[str, Any], ctx: RequestContext) -> None:
        model = ctx.model or ""
        resp.content_type = JSON
        if self._path == "/embeddings":
            resp.data, ctx.prompt_tokens = mock.embeddings(data, model)
        elif self._path == "/moderations":
            resp.data = mock.moderations(data, model, ctx.request_id)
        elif ctx.stream:
            ctx.prompt_tokens, ctx.completion_tokens = mock.response_usage(data)
            resp.content_type = SSE
            resp.set_header("cache-control", "no-cache")
            resp.stream = mock.response_stream(data, model, ctx.request_id)
        else:
            resp.data, ctx.prompt_tokens, ctx.completion_tokens = mock.response(
                data, model, ctx.request_id
            )


class ModelRetrieve:
    """GET /v1/models/{model_id}: from the configuration with PROVIDERS_FILE (a "*" entry asks
    its provider), else the upstream's answer, else the mock's list."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def on_get(self, req: Any, resp: Any, model_id: str) -> None:
        # model_id was checked by the route (edge.endpoints.routes.PARAM_CHECKS) before any
        # rate-limit token was spent.
        ctx: RequestContext = req.context.edge
        ctx.model = model_id
        router = self._runtime.router
        if router is None:
            body = mock.model(model_id)
            if body is None:
                raise _not_found(model_id)
            resp.data, resp.content_type = body, JSON
            return
        providers = router.providers
        if providers.from_file and model_id in providers.models:
            resp.data, resp.content_type = orjson.dumps(model_object(model_id)), JSON
            return
        targets = router.targets(model_id, "openai")  # 404 model_not_found if none
        target = targets[0]
        upstream_id = target.model or model_id
        result = await unless_client_leaves(
            req,
            router.call(
                ctx,
                "GET",
                "/models/" + quote(upstream_id, safe=""),
                target.provider if providers.from_file else None,
            ),
        )
        send_upstream(resp, ctx, result)


def _not_found(model_id: str) -> ModelNotFound:
    return ModelNotFound(f"The model '{model_id[:256]}' does not exist.", param="model")
