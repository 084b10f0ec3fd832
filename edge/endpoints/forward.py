"""The endpoints routed by model: read and validate the body, then the request pipeline.

`Forward` serves POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses
and /v1/moderations (OpenAI's API), and, as edge.endpoints.anthropic.Messages, Anthropic's
/v1/messages: each is one upstream path, one body validator (edge.endpoints.body) and where
its token estimate looks (edge.ratelimit.tokens), or None for no token limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge import pipeline
from edge.endpoints.body import read_request
from edge.errors import OPENAI
from edge.ratelimit.tokens import Prompt
from edge.routing.exchange import Call

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime

Validator = Callable[[dict[str, Any]], tuple[str, bool]]


class Forward:
    """POST `path`: the body read within MAX_REQUEST_SIZE and checked by `validate`, then
    routed by its model (edge.pipeline)."""

    api = OPENAI  # the API the route speaks: its targets' kind and its errors' shape

    def __init__(
        self, runtime: Runtime, path: str, validate: Validator, prompt: Prompt | None
    ) -> None:
        self._runtime = runtime
        self._path = path
        self._validate = validate
        self._prompt = prompt

    async def on_post(self, req: Any, resp: Any) -> None:
        runtime = self._runtime
        body, data, ctx = await read_request(req, runtime, self._validate)
        headers = self.headers(req)
        call = Call(self.api, "POST", self._path, body, data, ctx.model, ctx.stream, headers)
        await pipeline.run(runtime, req, resp, call, self._prompt)

    def headers(self, req: Any) -> dict[str, str] | None:
        """Client headers passed upstream as they are (none, for OpenAI's API)."""
        return None
