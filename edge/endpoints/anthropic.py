"""POST /v1/messages: Anthropic's Messages API, routed to providers of kind "anthropic".

The client authenticates with a gateway key (the anthropic SDK and Claude Code send it as
x-api-key, which the auth middleware accepts); upstream gets the provider's own key as
x-api-key, plus the client's anthropic-version (a default when absent) and anthropic-beta.
Errors on this route use Anthropic's shape (the route's API, edge.endpoints.routes), so the SDK
raises the right exception. Without providers the built-in mock answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge.endpoints.body import validate_chat
from edge.endpoints.forward import Forward
from edge.errors import ANTHROPIC
from edge.ratelimit.tokens import MESSAGES

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


def _header(req: Any, name: str) -> str | None:
    value = req.get_header(name)
    if value is None or len(value) > MAX_HEADER or not value.isascii() or not value.isprintable():
        return None
    return value
