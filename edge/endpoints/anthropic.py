"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API.

The client authenticates with a gateway key (the anthropic SDK and Claude Code send it as
x-api-key, which the auth middleware accepts); upstream gets the provider's own key as
x-api-key, plus the client's anthropic-version (a default when absent) and anthropic-beta.
A model whose target is an OpenAI-compatible provider is served through the adapter
(edge.routing.adapter). Errors on these routes use Anthropic's shape (the route's API,
edge.endpoints.routes), so the SDK raises the right exception. Without providers the built-in
mock answers.

count_tokens goes to the model's Anthropic providers (with failover among them); a model with
none (OpenAI-compatible targets, the mock) is answered with the gateway's own estimate, the
token limiter's (edge.adapters.count_tokens), which is an estimate, not the provider's count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge import pipeline
from edge.adapters.count_tokens import count_tokens
from edge.endpoints.body import read_request, validate_chat
from edge.endpoints.forward import Forward
from edge.errors import ANTHROPIC
from edge.ratelimit.tokens import MESSAGES
from edge.routing.exchange import Call

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime

DEFAULT_VERSION = "2023-06-01"
MAX_HEADER = 512


class Messages(Forward):
    """POST /v1/messages."""

    api = ANTHROPIC

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime, "/messages", validate_chat, MESSAGES)

    def headers(self, req: Any) -> dict[str, str]:
        headers = {"anthropic-version": _header(req, "anthropic-version") or DEFAULT_VERSION}
        beta = _header(req, "anthropic-beta")
        if beta:
            headers["anthropic-beta"] = beta
        return headers


class CountTokens(Messages):
    """POST /v1/messages/count_tokens."""

    async def on_post(self, req: Any, resp: Any) -> None:
        runtime = self._runtime
        body, data, ctx = await read_request(req, runtime, validate_chat)
        targets = runtime.router.targets(ctx.model or "", ANTHROPIC, any_kind=True)
        if any(target.provider.kind == ANTHROPIC for target in targets):
            headers = self.headers(req)
            call = Call(ANTHROPIC, "POST", "/messages/count_tokens", body, data, ctx.model,
                        False, headers)  # fmt: skip
            await pipeline.run(runtime, req, resp, call)
            return
        resp.media = count_tokens(len(body), data)
        resp.set_header("x-edge-estimate", "true")


def _header(req: Any, name: str) -> str | None:
    value = req.get_header(name)
    if value is None or len(value) > MAX_HEADER or not value.isascii() or not value.isprintable():
        return None
    return value
