from __future__ import annotations

import orjson
import pytest

from edge import errors


@pytest.mark.parametrize(
    ("cls", "status", "type_", "code"),
    [
        (errors.BadRequest, 400, "invalid_request_error", None),
        (errors.Unauthorized, 401, "invalid_request_error", "invalid_api_key"),
        (errors.NotFound, 404, "invalid_request_error", "not_found"),
        (errors.MethodNotAllowed, 405, "invalid_request_error", "method_not_allowed"),
        (errors.PayloadTooLarge, 413, "invalid_request_error", "request_too_large"),
        (errors.UnsupportedMediaType, 415, "invalid_request_error", "unsupported_media_type"),
        (errors.RateLimited, 429, "rate_limit_error", "rate_limit_exceeded"),
        (errors.BadGateway, 502, "upstream_error", "bad_gateway"),
        (errors.ServiceUnavailable, 503, "overloaded_error", "service_unavailable"),
        (errors.GatewayTimeout, 504, "upstream_error", "upstream_timeout"),
    ],
)
def test_each_error_carries_its_status_and_envelope(cls, status, type_, code):
    error = cls("Something specific.", param="model")
    assert error.status == status
    body = orjson.loads(error.body())
    assert body == {
        "error": {"message": "Something specific.", "type": type_, "param": "model", "code": code}
    }


def test_code_and_status_can_be_overridden_per_instance():
    error = errors.ApiError("x", code="custom", status=418)
    assert (error.status, error.code) == (418, "custom")
    assert errors.ApiError.status == 500  # the class default is untouched


def test_falcon_statuses_map_into_the_envelope():
    error = errors.from_http_status(411, "Length Required")
    assert error.status == 411
    assert orjson.loads(error.body())["error"]["code"] == "length_required"
    assert errors.from_http_status(503, "Down").type == "server_error"
