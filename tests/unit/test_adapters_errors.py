"""Errors across the APIs (edge.adapters.errors): statuses, types and bodies, and the exception
each SDK raises for what the client gets."""

from __future__ import annotations

import anthropic
import httpx2
import openai
import orjson
import pytest

from edge import pipeline
from edge.adapters import errors
from edge.errors import stream_error_event

REQUEST = httpx2.Request("POST", "http://gateway.invalid/")


def raised_by(sdk: str, status: int, body: bytes) -> Exception:
    """The exception the official SDK makes of this error answer."""
    response = httpx2.Response(status, content=body, request=REQUEST)
    if sdk == "openai":
        client: object = openai.OpenAI(api_key="x", base_url="http://gateway.invalid/")
    else:
        client = anthropic.Anthropic(api_key="x", base_url="http://gateway.invalid/")
    try:
        return client._make_status_error_from_response(response)  # type: ignore[attr-defined]
    finally:
        client.close()  # type: ignore[attr-defined]


def anthropic_error(kind: str, message: str = "Something specific.") -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


@pytest.mark.parametrize(
    ("status", "kind", "client_status", "type_", "exception"),
    [
        (400, "invalid_request_error", 400, "invalid_request_error", openai.BadRequestError),
        (401, "authentication_error", 401, "invalid_request_error", openai.AuthenticationError),
        (403, "permission_error", 403, "invalid_request_error", openai.PermissionDeniedError),
        (404, "not_found_error", 404, "invalid_request_error", openai.NotFoundError),
        (413, "request_too_large", 413, "invalid_request_error", openai.APIStatusError),
        (429, "rate_limit_error", 429, "rate_limit_error", openai.RateLimitError),
        (500, "api_error", 500, "server_error", openai.InternalServerError),
        (529, "overloaded_error", 503, "overloaded_error", openai.InternalServerError),
    ],
)
def test_an_anthropic_error_reaches_an_openai_client_in_its_shape(
    status, kind, client_status, type_, exception
):
    got_status, body = errors.for_openai(status, anthropic_error(kind))
    assert got_status == client_status
    assert orjson.loads(body) == {
        "error": {"message": "Something specific.", "type": type_, "param": None, "code": kind}
    }
    error = raised_by("openai", got_status, body)
    assert type(error) is exception
    assert error.message == f"Error code: {client_status} - Something specific."


@pytest.mark.parametrize(
    ("status", "kind", "exception"),
    [
        (400, "invalid_request_error", anthropic.BadRequestError),
        (401, "authentication_error", anthropic.AuthenticationError),
        (403, "permission_error", anthropic.PermissionDeniedError),
        (404, "not_found_error", anthropic.NotFoundError),
        (413, "request_too_large", anthropic.RequestTooLargeError),
        (422, "invalid_request_error", anthropic.UnprocessableEntityError),
        (429, "rate_limit_error", anthropic.RateLimitError),
        (500, "api_error", anthropic.InternalServerError),
        (502, "api_error", anthropic.InternalServerError),
        (503, "overloaded_error", anthropic.InternalServerError),
    ],
)
def test_an_openai_error_reaches_an_anthropic_client_in_its_shape(status, kind, exception):
    upstream = {"error": {"message": "Something specific.", "type": "x", "param": "p", "code": "c"}}
    got_status, body = errors.for_anthropic(status, orjson.dumps(upstream))
    assert got_status == status
    assert orjson.loads(body) == {
        "type": "error",
        "error": {"type": kind, "message": "Something specific."},
    }
    assert isinstance(raised_by("anthropic", got_status, body), exception)


def test_only_the_message_crosses_cut_to_the_pipelines_bound():
    assert errors.MAX_MESSAGE == pipeline.MAX_ERROR_MESSAGE
    long = {"error": {"message": "m" * 10_000, "type": "t", "trace": "at internal.host:8080"}}
    _, body = errors.for_anthropic(400, long)
    assert b"internal.host" not in body
    assert len(orjson.loads(body)["error"]["message"]) == errors.MAX_MESSAGE
    _, body = errors.for_openai(
        500, {"type": "error", "error": {"type": "api_error", "message": "m" * 5000, "host": "h"}}
    )
    assert set(orjson.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert len(orjson.loads(body)["error"]["message"]) == errors.MAX_MESSAGE


@pytest.mark.parametrize("body", [b"<html>Bad Gateway</html>", b"", b"[]", b'{"detail": 3}'])
def test_a_body_that_is_no_error_envelope_says_the_status(body):
    status, out = errors.for_openai(502, body)
    assert status == 502
    assert orjson.loads(out)["error"]["message"] == "The upstream answered HTTP 502."
    status, out = errors.for_anthropic(504, body)
    assert (status, orjson.loads(out)["error"]["type"]) == (504, "api_error")
    assert errors.for_openai(200, body)[0] == 502  # no error status at all: a bad gateway


def test_vllms_flat_error_shape_gives_its_message():
    flat = {"object": "error", "message": "max_tokens too large", "type": "BadRequestError"}
    _, body = errors.for_anthropic(400, orjson.dumps(flat))
    assert orjson.loads(body)["error"]["message"] == "max_tokens too large"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ({"error": {"message": "slow down", "type": "rate_limit_error"}}, "rate_limit_error"),
        ({"error": {"message": "slow down", "code": "rate_limit_exceeded"}}, "rate_limit_error"),
        (
            {"error": {"message": "bad", "type": "BadRequestError", "code": 400}},
            "invalid_request_error",
        ),
        ({"error": {"message": "busy", "type": "overloaded_error"}}, "overloaded_error"),
        ({"error": {"message": "what", "type": "mystery"}}, "api_error"),
    ],
)
def test_an_openai_stream_error_is_an_anthropic_error_event(error, kind):
    event = errors.anthropic_error_event(error)
    assert event.startswith(b"event: error\ndata: ")
    assert orjson.loads(event.split(b"data: ", 1)[1]) == {
        "type": "error",
        "error": {"type": kind, "message": error["error"]["message"]},
    }


def test_the_gateways_own_stream_errors_translate_too():
    """A relay that ends an upstream's stream with the gateway's error event in the upstream's
    shape (edge.errors.stream_error_event) is translated like the upstream's own."""
    openai_shaped = stream_error_event("timeout", "The upstream stopped responding.")
    data = orjson.loads(openai_shaped.split(b"data: ", 1)[1])
    anthropic_event = errors.anthropic_error_event(data)
    assert b'"type":"api_error"' in anthropic_event
    anthropic_shaped = stream_error_event("timeout", "stopped", "anthropic")
    data = orjson.loads(anthropic_shaped.split(b"data: ", 1)[1])
    event = orjson.loads(errors.openai_error_event(data)[len(b"data: ") :])
    assert event == {
        "error": {"message": "stopped", "type": "server_error", "param": None, "code": "api_error"}
    }
