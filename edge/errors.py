"""Errors in the OpenAI envelope: `{"error": {"message", "type", "param", "code"}}`.

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
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> bytes:
        return envelope(self.message, self.type, self.param, self.code)


class BadRequest(ApiError):
    status = 400
    type = INVALID_REQUEST


class Unauthorized(ApiError):
    status = 401
    type = INVALID_REQUEST
    code = "invalid_api_key"


class NotFound(ApiError):
    status = 404
    type = INVALID_REQUEST
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = INVALID_REQUEST
    code = "method_not_allowed"


class PayloadTooLarge(ApiError):
    status = 413
    type = INVALID_REQUEST
    code = "request_too_large"


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


def envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


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
    error = ApiError(title, code=code, status=status)
    error.type = type_
    return error
