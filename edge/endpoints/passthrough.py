"""More OpenAI endpoints, routed by model like chat: embeddings, responses, moderations, and
GET /v1/models/{id}. Bodies pass byte for byte both ways (the SDK asks for base64 embeddings;
re-serialising them would break it); only a renaming target rewrites the `model` field."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from edge import pipeline
from edge.endpoints.body import read_request
from edge.endpoints.openai import model_object
from edge.errors import OPENAI
from edge.observability.context import RequestContext
from edge.ratelimit.tokens import Prompt
from edge.routing.exchange import Call

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime

Validator = Callable[[dict[str, Any]], tuple[str, bool]]


class PassThrough:
    """POST /v1/embeddings, /v1/responses and /v1/moderations."""

    def __init__(
        self, runtime: Runtime, path: str, validate: Validator, prompt: Prompt | None
    ) -> None:
        self._runtime = runtime
        self._path = path
        self._validate = validate
        self._prompt = prompt  # where the prompt is, for TPM; None: no token limit (moderations)

    async def on_post(self, req: Any, resp: Any) -> None:
        runtime = self._runtime
        body, data, ctx = await read_request(req, runtime, self._validate)
        call = Call(OPENAI, "POST", self._path, body, data, ctx.model, ctx.stream)
        await pipeline.run(runtime, req, resp, call, self._prompt)


class ModelRetrieve:
    """GET /v1/models/{model_id}: from the configuration with PROVIDERS_FILE (a "*" entry asks
    its provider), else the upstream's answer (the built-in mock's without one)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def on_get(self, req: Any, resp: Any, model_id: str) -> None:
        # model_id was checked by the route (edge.endpoints.routes.PARAM_CHECKS) before any
        # rate-limit token was spent.
        ctx: RequestContext = req.context.edge
        ctx.model = model_id
        router = self._runtime.router
        providers = router.providers
        if providers.from_file and model_id in providers.models:
            resp.data, resp.content_type = orjson.dumps(model_object(model_id)), pipeline.JSON
            return
        target = router.targets(model_id, OPENAI)[0]  # 404 model_not_found if none
        path = "/models/" + quote(target.model or model_id, safe="")
        pinned = target.provider if providers.from_file else None
        await pipeline.run(self._runtime, req, resp, Call(OPENAI, "GET", path, provider=pinned))

    on_head = on_get  # Falcon sends the head (with the GET's Content-Length) and no body
