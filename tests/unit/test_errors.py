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


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error"),
     (413, "request_too_large"), (429, "rate_limit_error"), (418, "invalid_request_error"),
     (500, "api_error"), (503, "overloaded_error"), (504, "api_error")],
)  # fmt: skip
def test_the_anthropic_shape_maps_the_status_to_its_error_type(status, kind):
    error = errors.ApiError("Something specific.", status=status, param="model", code="x")
    assert orjson.loads(error.body(errors.ANTHROPIC)) == {
        "type": "error",
        "error": {"type": kind, "message": "Something specific."},
    }
    assert error.body() == error.body(errors.OPENAI)


def test_stream_error_events_in_each_shape():
    openai = errors.stream_error_event("timeout", "Stalled.")
    assert openai.startswith(b"data: ") and openai.endswith(b"\n\n")
    assert orjson.loads(openai[6:])["error"]["code"] == "upstream_timeout"
    anthropic = errors.stream_error_event("disconnect", "Broken.", errors.ANTHROPIC)
    event, data = anthropic.rstrip(b"\n").split(b"\n")
    assert event == b"event: error"
    assert orjson.loads(data[6:]) == {
        "type": "error",
        "error": {"type": "api_error", "message": "Broken."},
    }


@pytest.mark.parametrize(
    ("status", "code", "type_"),
    [(400, "bad_request", "invalid_request_error"), (408, "request_timeout",
     "invalid_request_error"), (413, "request_too_large", "invalid_request_error"),
     (414, "request_line_too_long", "invalid_request_error"),
     (431, "request_header_fields_too_large", "invalid_request_error"),
     (503, "overloaded", "overloaded_error"),
     (505, "http_version_not_supported", "invalid_request_error")],
)  # fmt: skip
def test_the_protocols_refusals_are_openai_envelopes(status, code, type_):
    error = errors.protocol_refusal(status, "No.")
    assert error.status == status
    assert orjson.loads(error.body()) == {
        "error": {"message": "No.", "type": type_, "param": None, "code": code}
    }
