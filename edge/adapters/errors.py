"""An upstream's error in the client's shape, with the status the client's SDK expects.

Both SDKs raise by status (400 BadRequestError, 401 AuthenticationError, 429 RateLimitError,
5xx InternalServerError, ...), so the status carries the meaning and the type follows from it:

- for an OpenAI client, Anthropic's 529 `overloaded_error` is a 503 (the openai SDK and the
  gateway's failover know 503 as "try again"; 529 is no HTTP status they know); the envelope's
  `type` is the one the gateway's own errors use for that status (edge.errors), its `code` the
  upstream's Anthropic error type, so nothing of the upstream's classification is lost;
- for an Anthropic client, the status is kept and the type is Anthropic's for it (an OpenAI
  429 is a `rate_limit_error`).

Only the message crosses from the upstream's body, cut to MAX_MESSAGE characters (as
edge.pipeline does for errors passed through): anything else an upstream puts in an error
(host names, traces, request echoes) is left behind. A body that is not an error envelope gets a
message saying the upstream's status. Stream error events are translated by the same rules.
"""

from __future__ import annotations

from typing import Any

import orjson

from edge.errors import (
    INVALID_REQUEST,
    OVERLOADED,
    RATE_LIMIT,
    SERVER,
    anthropic_type,
    envelope,
)

MAX_MESSAGE = 4096

# Anthropic error type → the status it is answered with
ANTHROPIC_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
# OpenAI error types and codes (the gateway's own among them) → an Anthropic type, for stream
# error events, which carry no status
_OPENAI_KINDS = {
    INVALID_REQUEST: "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    RATE_LIMIT: "rate_limit_error",
    "rate_limit_exceeded": "rate_limit_error",
    "insufficient_quota": "rate_limit_error",
    OVERLOADED: "overloaded_error",
    "service_unavailable": "overloaded_error",
}


def openai_status(status: int) -> int:
    """The status an OpenAI client gets for an Anthropic upstream's: 529 is 503; a status that
    is no error (or no status at all) is 502."""
    if status == 529:
        return 503
    return status if 400 <= status <= 599 else 502


def openai_type(status: int) -> str:
    """The OpenAI envelope's type for a status, as the gateway's own errors spell it."""
    if status == 429:
        return RATE_LIMIT
    if status == 503:
        return OVERLOADED
    return SERVER if status >= 500 else INVALID_REQUEST


def for_openai(status: int, body: Any) -> tuple[int, bytes]:
    """(status, OpenAI envelope) for an Anthropic upstream's error answer (`body`: bytes, or
    the parsed JSON)."""
    error = _error(body)
    kind = _text(error, "type")
    mapped = openai_status(status)
    message = _text(error, "message") or f"The upstream answered HTTP {status}."
    return mapped, envelope(message, openai_type(mapped), None, kind)


def for_anthropic(status: int, body: Any) -> tuple[int, bytes]:
    """(status, Anthropic error body) for an OpenAI upstream's error answer."""
    mapped = status if 400 <= status <= 599 else 502
    message = _text(_error(body), "message") or f"The upstream answered HTTP {status}."
    return mapped, _anthropic_body(anthropic_type(mapped), message)


def openai_error_event(error: Any) -> bytes:
    """The OpenAI stream's error event (the envelope as data, which the openai SDK raises) for
    an Anthropic `event: error`'s data."""
    kind = _text(_error(error), "type") or "api_error"
    status = openai_status(ANTHROPIC_STATUS.get(kind, 500))
    message = _text(_error(error), "message") or "The upstream's stream failed."
    return b"data: " + envelope(message, openai_type(status), None, kind) + b"\n\n"


def anthropic_error_event(error: Any) -> bytes:
    """Anthropic's `event: error` (which the anthropic SDK raises) for an OpenAI stream's error
    data. No status comes with it: the type comes from the error's own code or type."""
    fields = _error(error)
    code = fields.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        kind = anthropic_type(code)  # vLLM puts the status in `code`
    else:
        kind = _OPENAI_KINDS.get(_text(fields, "code") or "") or _OPENAI_KINDS.get(
            _text(fields, "type") or "", "api_error"
        )
    message = _text(fields, "message") or "The upstream's stream failed."
    return b"event: error\ndata: " + _anthropic_body(kind, message) + b"\n\n"


def _anthropic_body(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def _error(body: Any) -> dict[str, Any]:
    """The error object of either API's error body (bytes or parsed), else {}."""
    if isinstance(body, bytes | bytearray | memoryview | str):
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            return {}
    if not isinstance(body, dict):
        return {}
    error = body.get("error")
    if isinstance(error, dict):
        return error
    return body if isinstance(body.get("message"), str) else {}  # vLLM's older, flat shape


def _text(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    return value[:MAX_MESSAGE] if isinstance(value, str) and value else None
