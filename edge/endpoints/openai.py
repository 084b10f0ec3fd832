"""GET /v1/models: the model list."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from edge import pipeline
from edge.errors import OPENAI, BadGateway
from edge.routing.exchange import Call

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime


class Models:
    """GET /v1/models: the configured model names with PROVIDERS_FILE, else the upstream's
    (the built-in mock's without one); for a key with `models` patterns, only those it may
    use."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def on_get(self, req: Any, resp: Any) -> None:
        providers = self._runtime.router.providers
        key = req.context.edge.key
        if providers.from_file:
            names = providers.model_names()
            if key is not None:
                names = [name for name in names if key.may_use(name)]
            resp.data = orjson.dumps({"object": "list", "data": [model_object(n) for n in names]})
            resp.content_type = pipeline.JSON
            return
        await pipeline.run(self._runtime, req, resp, Call(OPENAI, "GET", "/models"))
        if key is not None and key.allowed is not None and resp.status_code == 200:
            if resp.data is None and resp.stream is not None:
                # Over SEND_PIECE_BYTES the list would go out in pieces, unfiltered: refused.
                await resp.stream.close()
                raise BadGateway("The upstream's model list is too large to filter for this key.")
            resp.data = _allowed_only(resp.data, key)

    on_head = on_get  # Falcon sends the head (with the GET's Content-Length) and no body


def _allowed_only(body: bytes | None, key: Any) -> bytes | None:
    """An upstream's model list with only the models `key` may use."""
    try:
        listed = orjson.loads(body or b"")
    except orjson.JSONDecodeError:
        return body
    if isinstance(listed, dict) and isinstance(listed.get("data"), list):
        listed["data"] = [
            item
            for item in listed["data"]
            if isinstance(item, dict)
            and isinstance(item.get("id"), str)
            and key.may_use(item["id"])
        ]
        return orjson.dumps(listed)
    return body


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llm-edge-proxy"}
