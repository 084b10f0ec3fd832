"""The OpenAI endpoints: chat and legacy completions, the model list."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from edge import pipeline
from edge.endpoints.body import read_request, validate_chat, validate_completion
from edge.errors import OPENAI
from edge.ratelimit.tokens import CHAT, COMPLETION
from edge.routing.exchange import Call

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime


class Completions:
    """POST /v1/chat/completions (chat=True) and POST /v1/completions (chat=False)."""

    def __init__(self, runtime: Runtime, chat: bool) -> None:
        self._runtime = runtime
        self._path = "/chat/completions" if chat else "/completions"
        self._validate = validate_chat if chat else validate_completion
        self._prompt = CHAT if chat else COMPLETION

    async def on_post(self, req: Any, resp: Any) -> None:
        runtime = self._runtime
        body, data, ctx = await read_request(req, runtime, self._validate)
        call = Call(OPENAI, "POST", self._path, body, data, ctx.model, ctx.stream)
        await pipeline.run(runtime, req, resp, call, self._prompt)


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
