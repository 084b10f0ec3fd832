"""GET /v1/models: the model list."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from edge import pipeline
from edge.errors import OPENAI
from edge.routing.exchange import Call

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime


class Models:
    """GET /v1/models: the configured model names with PROVIDERS_FILE, else the upstream's
    (the built-in mock's without one)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def on_get(self, req: Any, resp: Any) -> None:
        providers = self._runtime.router.providers
        if providers.from_file:
            names = providers.model_names()
            resp.data = orjson.dumps({"object": "list", "data": [model_object(n) for n in names]})
            resp.content_type = pipeline.JSON
            return
        await pipeline.run(self._runtime, req, resp, Call(OPENAI, "GET", "/models"))

    on_head = on_get  # Falcon sends the head (with the GET's Content-Length) and no body


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llm-edge-proxy"}
