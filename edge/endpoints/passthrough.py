"""GET /v1/models/{id}: one model, from the configuration or asked of its provider."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from edge import pipeline
from edge.auth import check_model
from edge.endpoints.openai import model_object
from edge.errors import OPENAI
from edge.observability.context import RequestContext
from edge.routing.exchange import Call

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime


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
        check_model(ctx.key, model_id)  # 403 for a model the key may not use
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
