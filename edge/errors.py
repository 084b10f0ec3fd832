"""Every error a client can see, and every shape it can take, in one module.

Two shapes, chosen by the endpoint the request matched (`Endpoint.api`, edge.endpoints.routes):

- OpenAI's envelope, `{"error": {"message", "type", "param", "code"}}`, on every route but one,
  on paths that match no route and on the HTTP protocol's own refusals (400, 408, 413, 414,
  431, 503, 505: `protocol_refusal`);
- Anthropic's, `{"type": "error", "error": {"type", "message"}}`, on `/v1/messages`, so the
  anthropic SDK raises the right exception.

A stream broken after its first event cannot change its status any more: it ends with an SSE
error event in the same shape (`stream_error_event`), which both SDKs raise.

Every exception here carries the HTTP status it maps to (as h11's do), so the error
handlers in `edge.app` need no table. Messages are written for clients: they never carry a key, a
traceback or an internal name.
"""

from __future__ import annotations

import orjson

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
RATE_LIMIT = "rate_limit_error"
NOT_FOUND = "not_found_error"
SERVER = "server_error"
UPSTREAM = "upstream_error"
OVERLOADED = "overloaded_error"

OPENAI = "openai"  # the API (and so the error shape) of an endpoint: edge.endpoints.routes
ANTHROPIC = "anthropic"


class ApiError(Exception):
    """An error answered to the client in the OpenAI envelope."""

    status = 500
    type = SERVER
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type_ is not None:
            self.type = type_
        self.headers = headers or {}

    def body(self, shape: str = OPENAI) -> bytes:
        """The error's JSON body in `shape` (OPENAI or ANTHROPIC)."""
        if shape == ANTHROPIC:
            kind = anthropic_type(self.status)
            return orjson.dumps({"type": "error", "error": {"type": kind, "message": self.message}})
        return envelope(self.message, self.type, self.param, self.code)


class BadRequest(ApiError):
    status = 400
    type = INVALID_REQUEST


class Unauthorized(ApiError):
    status = 401
    type = INVALID_REQUEST
    code = "invalid_api_key"


class Forbidden(ApiError):
    status = 403
    type = INVALID_REQUEST
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    type = INVALID_REQUEST
    code = "not_found"


class RequestTimeout(ApiError):
    status = 408
    type = INVALID_REQUEST
    code = "request_timeout"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = INVALID_REQUEST
    code = "method_not_allowed"


class PayloadTooLarge(ApiError):
    status = 413
    type = INVALID_REQUEST
    code = "request_too_large"


class RequestLineTooLong(ApiError):
    status = 414
    type = INVALID_REQUEST
    code = "request_line_too_long"


class HeaderFieldsTooLarge(ApiError):
    status = 431
    type = INVALID_REQUEST
    code = "request_header_fields_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    type = INVALID_REQUEST
    code = "unsupported_media_type"


class ClientClosedRequest(ApiError):
    """The client hung up before the answer was ready (nginx's 499; never reaches the client,
    but it is what the access log and metrics record)."""

    status = 499
    type = INVALID_REQUEST
    code = "client_closed_request"


class RateLimited(ApiError):
    status = 429
    type = RATE_LIMIT
    code = "rate_limit_exceeded"


class QuotaExceeded(ApiError):
    """A key's budget is spent (edge.budgets): the official SDKs must not retry it."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"x-should-retry": "false"})


class BadGateway(ApiError):
    status = 502
    type = UPSTREAM
    code = "bad_gateway"


class ServiceUnavailable(ApiError):
    status = 503
    type = OVERLOADED
    code = "service_unavailable"


class GatewayTimeout(ApiError):
    status = 504
    type = UPSTREAM
    code = "upstream_timeout"


class VersionNotSupported(ApiError):
    status = 505
    type = INVALID_REQUEST
    code = "http_version_not_supported"


class Overloaded(ApiError):
    """The worker is at MAX_CONCURRENT_REQUESTS (the HTTP protocol's refusal)."""

    status = 503
    type = OVERLOADED
    code = "overloaded"


def envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


# HTTP status → Anthropic error type (https://docs.anthropic.com/en/api/errors)
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    """Anthropic's error type for an HTTP status (the gateway's own errors, and an OpenAI
    upstream's translated by edge.adapters)."""
    return ANTHROPIC_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def stream_error_event(kind: str, message: str, shape: str = OPENAI) -> bytes:
    """The SSE event that ends a stream broken mid-way (`kind`: timeout, disconnect, invalid):
    OpenAI's is the envelope as data, coded `upstream_<kind>`; Anthropic's an `error` event."""
    if shape == ANTHROPIC:
        error = GatewayTimeout(message) if kind == "timeout" else BadGateway(message)
        return b"event: error\ndata: " + error.body(ANTHROPIC) + b"\n\n"
    return b"data: " + envelope(message, UPSTREAM, None, f"upstream_{kind}") + b"\n\n"


_REFUSALS: dict[int, type[ApiError]] = {
    408: RequestTimeout,
    413: PayloadTooLarge,
    414: RequestLineTooLong,
    431: HeaderFieldsTooLarge,
    503: Overloaded,
    505: VersionNotSupported,
}


def protocol_refusal(status: int, message: str) -> ApiError:
    """A refusal of the HTTP protocol itself (before any route is known: OpenAI's shape)."""
    if status == 400:
        return ApiError(message, status=400, code="bad_request", type_=INVALID_REQUEST)
    return _REFUSALS[status](message)


# Falcon raises its own HTTPError subclasses for routing and parsing problems; map their status
# to our envelope so every error a client sees has the same shape.
_FALCON_STATUS = {
    400: (INVALID_REQUEST, "bad_request"),
    404: (INVALID_REQUEST, "not_found"),
    405: (INVALID_REQUEST, "method_not_allowed"),
    411: (INVALID_REQUEST, "length_required"),
    413: (INVALID_REQUEST, "request_too_large"),
    415: (INVALID_REQUEST, "unsupported_media_type"),
}


def from_http_status(status: int, title: str) -> ApiError:
    """An ApiError for a Falcon HTTPError of the given status."""
    type_, code = _FALCON_STATUS.get(status, (SERVER if status >= 500 else INVALID_REQUEST, None))
    return ApiError(title, code=code, status=status, type_=type_)
