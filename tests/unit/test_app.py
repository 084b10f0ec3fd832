"""App tests through falcon.testing: the middleware and handlers without a server."""

from __future__ import annotations

import hashlib

import falcon.testing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.app import create_app
from edge.auth import digest_of, short_id
from edge.config import Config
from edge.endpoints.body import validate_responses

KEY = "sk-app-test-key"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


def client(**env: str) -> falcon.testing.TestClient:
    env.setdefault("API_KEYS", KEY)
    return falcon.testing.TestClient(create_app(Config.from_env(env)))


def auth(key: str = KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def app_client():
    return client()


@pytest.fixture(scope="module")
def open_client():
    """One app for a module's property tests (Hypothesis runs a test body many times): no
    rate limit to run into."""
    return client(RATE_LIMIT_ENABLED="false")


def test_mock_chat_with_rate_headers_and_request_id(app_client):
    result = app_client.simulate_post(
        "/v1/chat/completions", json=CHAT, headers={**auth(), "x-request-id": "abc-1"}
    )
    assert result.status_code == 200
    assert result.json["usage"]["prompt_tokens"] == 2
    assert result.headers["x-request-id"] == "abc-1"
    assert result.headers["x-ratelimit-limit-requests"] == "100"
    assert result.headers["x-ratelimit-remaining-requests"] == "99"
    assert result.headers["x-ratelimit-reset-requests"].endswith("ms")


def test_every_response_has_a_request_id(app_client):
    for result in (
        app_client.simulate_get("/health"),
        app_client.simulate_get("/nope", headers=auth()),
        app_client.simulate_post("/v1/chat/completions", json=CHAT),
    ):
        assert len(result.headers["x-request-id"]) == 32


def test_missing_and_wrong_keys_get_the_same_shape(app_client):
    missing = app_client.simulate_post("/v1/chat/completions", json=CHAT)
    wrong = app_client.simulate_post("/v1/chat/completions", json=CHAT, headers=auth("nope"))
    for result in (missing, wrong):
        assert result.status_code == 401
        assert result.headers["www-authenticate"] == "Bearer"
        assert set(result.json["error"]) == {"message", "type", "param", "code"}
        assert result.json["error"]["code"] == "invalid_api_key"
        assert result.json["error"]["type"] == "invalid_request_error"


def test_x_api_key_header_works(app_client):
    result = app_client.simulate_post("/v1/chat/completions", json=CHAT, headers={"x-api-key": KEY})
    assert result.status_code == 200


def test_stored_digest_does_not_authenticate():
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    hashed = client(API_KEYS="", API_KEY_HASHES=digest)
    assert hashed.simulate_post("/v1/completions", json={"model": "m", "prompt": "x"},
                                headers=auth()).status_code == 200  # fmt: skip
    assert hashed.simulate_post("/v1/completions", json={"model": "m", "prompt": "x"},
                                headers=auth(digest)).status_code == 401  # fmt: skip


def test_rate_limit_429_with_retry_headers():
    limited = client(RATE_LIMIT_BURST="2", RATE_LIMIT_RPM="6")
    statuses = [
        limited.simulate_post("/v1/chat/completions", json=CHAT, headers=auth()).status_code
        for _ in range(3)
    ]
    assert statuses == [200, 200, 429]
    result = limited.simulate_post("/v1/chat/completions", json=CHAT, headers=auth())
    assert result.json["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(result.headers["retry-after"]) <= 60
    assert 1 <= int(result.headers["retry-after-ms"]) <= 60_000
    assert result.headers["x-ratelimit-remaining-requests"] == "0"
    # Health is never limited.
    assert limited.simulate_get("/health").status_code == 200


def test_retry_after_and_reset_headers_are_exact_with_a_fake_clock():
    now = [1000.0]
    app = create_app(
        Config.from_env({"API_KEYS": KEY, "RATE_LIMIT_BURST": "2", "RATE_LIMIT_RPM": "6"}),
        clock=lambda: now[0],
    )
    limited = falcon.testing.TestClient(app)

    def post() -> falcon.testing.Result:
        return limited.simulate_post("/v1/chat/completions", json=CHAT, headers=auth())

    first = post()  # 2 -> 1 token; full again 10 s later (6 per minute: one per 10 s)
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "10s"
    assert post().headers["x-ratelimit-reset-requests"] == "20s"
    refused = post()
    assert refused.status_code == 429
    assert (refused.headers["retry-after"], refused.headers["retry-after-ms"]) == ("10", "10000")
    now[0] += 2.5
    refused = post()
    assert (refused.headers["retry-after"], refused.headers["retry-after-ms"]) == ("8", "7500")
    now[0] += 7.5
    assert post().status_code == 200  # one token refilled, exactly on time


def test_a_method_the_route_does_not_serve_spends_no_token():
    limited = client(RATE_LIMIT_BURST="5", RATE_LIMIT_RPM="0.001")
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        assert limited.simulate_request(method, "/v1/models", headers=auth()).status_code in (
            200,  # Falcon's own OPTIONS answer
            405,
        )
    assert (
        limited.simulate_get("/v1/models", headers=auth()).headers["x-ratelimit-remaining-requests"]
        == "4"
    )


@pytest.mark.parametrize(
    "value",
    [[None], [0, 1.5], [1e308], [], [["a"]], [{"x": 1}], ["x"] * 2049, 7, {"text": "x"}],
)
def test_embeddings_input_of_the_wrong_shape_is_400(value):
    result = client().simulate_post(
        "/v1/embeddings", json={"model": "m", "input": value}, headers=auth()
    )
    assert result.status_code == 400, result.text
    assert result.json["error"]["param"] == "input"


# ------------------------------------------------------------------ /v1/responses `input`

_NOT_AN_ITEM = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.text(max_size=3), max_size=2),
)  # fmt: skip
_ITEM = st.one_of(st.text(max_size=5), st.dictionaries(st.text(max_size=4), st.text(max_size=4)))


@st.composite
def _bad_input(draw: st.DrawFn) -> dict[str, object]:
    """A Responses body whose `input` is missing, null, of the wrong type, an empty array, or
    an array with one item that is neither an object nor a string (anywhere in it)."""
    kind = draw(st.sampled_from(["missing", "scalar", "object", "empty", "bad item"]))
    body: dict[str, object] = {"model": "m"}
    if kind == "scalar":
        body["input"] = draw(_NOT_AN_ITEM.filter(lambda v: not isinstance(v, list)))
    elif kind == "object":
        body["input"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
    elif kind == "empty":
        body["input"] = []
    elif kind == "bad item":
        items = draw(st.lists(_ITEM, max_size=4))
        items.insert(draw(st.integers(0, len(items))), draw(_NOT_AN_ITEM))
        body["input"] = items
    return body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bad_input(), stream=st.booleans())
def test_responses_input_of_the_wrong_shape_is_400_naming_input(open_client, body, stream):
    body["stream"] = stream
    result = open_client.simulate_post("/v1/responses", json=body, headers=auth())
    assert result.status_code == 400, (body, result.text)
    error = result.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["type"]) == ("input", "invalid_request_error"), error


@settings(max_examples=100, deadline=None)
@given(value=st.one_of(st.text(max_size=20), st.lists(_ITEM, min_size=1, max_size=5)))
def test_responses_input_a_string_or_items_is_accepted(value):
    assert validate_responses({"model": "m", "input": value}) == ("m", False)


def test_responses_with_input_items_reach_the_mock(open_client):
    items = ["plain text", {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    result = open_client.simulate_post(
        "/v1/responses", json={"model": "m", "input": items}, headers=auth()
    )
    assert result.status_code == 200, result.text


def test_the_mock_keeps_embeddings_small():
    body = {"model": "m", "input": [str(i) for i in range(1000)], "dimensions": 8192}
    result = client().simulate_post("/v1/embeddings", json=body, headers=auth())
    assert result.status_code == 400 and result.json["error"]["param"] == "input"
    for value in ("one", ["one", "two"], [1, 2, 3], [[1, 2], [3]]):
        fine = client().simulate_post(
            "/v1/embeddings", json={"model": "m", "input": value, "dimensions": 4}, headers=auth()
        )
        assert fine.status_code == 200, (value, fine.text)


def test_clients_cannot_fill_the_token_metrics_model_labels():
    app_client = client()
    for index in range(40):
        body = {**CHAT, "model": f"junk-{index}-\u202e"}
        assert (
            app_client.simulate_post("/v1/chat/completions", json=body, headers=auth()).status_code
            == 200
        )
    body = {**CHAT, "model": "gpt-4o"}
    assert (
        app_client.simulate_post("/v1/chat/completions", json=body, headers=auth()).status_code
        == 200
    )
    scrape = app_client.simulate_get("/metrics").text
    key = short_id(digest_of(KEY))  # the API_KEYS key's label: its short id
    assert f'edge_tokens_total{{key="{key}",kind="prompt",model="gpt-4o"}}' in scrape
    assert "junk-" not in scrape
    assert 'model="other"' in scrape


def test_health_can_require_a_key():
    protected = client(AUTH_HEALTH_CHECK="true")
    assert protected.simulate_get("/health/live").status_code == 401
    assert protected.simulate_get("/health/live", headers=auth()).status_code == 200


def test_metrics_public_by_default_protected_on_request():
    assert client().simulate_get("/metrics").status_code == 200
    protected = client(AUTH_METRICS="true")
    assert protected.simulate_get("/metrics").status_code == 401
    assert protected.simulate_get("/metrics", headers=auth()).status_code == 200


def test_metrics_disabled_removes_the_route():
    result = client(ENABLE_METRICS="false").simulate_get("/metrics", headers=auth())
    assert result.status_code == 404


def test_public_paths_setting():
    open_models = client(PUBLIC_PATHS="/v1/models")
    assert open_models.simulate_get("/v1/models").status_code == 200
    assert open_models.simulate_post("/v1/completions", json={}).status_code == 401


def test_auth_disabled_limits_per_client_address():
    anonymous = client(AUTH_ENABLED="false", API_KEYS="", RATE_LIMIT_BURST="1", RATE_LIMIT_RPM="1")
    first = anonymous.simulate_post("/v1/chat/completions", json=CHAT, remote_addr="10.0.0.1")
    second = anonymous.simulate_post("/v1/chat/completions", json=CHAT, remote_addr="10.0.0.1")
    other = anonymous.simulate_post("/v1/chat/completions", json=CHAT, remote_addr="10.0.0.2")
    assert (first.status_code, second.status_code, other.status_code) == (200, 429, 200)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"", 400, None),
        (b"{", 400, None),
        (b'"just a string"', 400, None),
        (b'{"model": "m", "messages": {}}', 400, "messages"),
        (b'{"model": "", "messages": [{}]}', 400, "model"),
        (b'{"model": "m", "messages": [{}], "stream": 1}', 400, "stream"),
        (b"[" * 5000 + b"]" * 5000, 400, None),
    ],
)
def test_bad_bodies(app_client, body, status, param):
    result = app_client.simulate_post(
        "/v1/chat/completions", body=body, headers={**auth(), "content-type": "application/json"}
    )
    assert result.status_code == status
    assert result.json["error"]["param"] == param


def test_unexpected_exception_is_500_without_internals(app_client, monkeypatch):
    from edge.routing import mock

    def explode(*args, **kwargs):
        raise RuntimeError("internal detail /secret/path")

    monkeypatch.setattr(mock, "chat", explode)
    result = app_client.simulate_post("/v1/chat/completions", json=CHAT, headers=auth())
    assert result.status_code == 500
    assert "secret" not in result.text and "RuntimeError" not in result.text
    assert result.json["error"]["type"] == "server_error"


@pytest.mark.parametrize("depth", [250, 300, 1000])
def test_a_deeply_nested_body_under_a_token_limit_is_answered_not_a_500(depth):
    """Under a token limit the body is re-serialised, and orjson writes at most 254 levels
    (it reads 1024): deeper is 400 naming the limit, never a server error."""
    limited = client(RATE_LIMIT_TPM="1000000")
    body = (
        '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": '
        + "[" * depth
        + "]" * depth
        + "}"
    )
    result = limited.simulate_post(
        "/v1/chat/completions", body=body, headers={**auth(), "content-type": "application/json"}
    )
    if depth <= 250:
        assert result.status_code == 200
    else:
        assert result.status_code == 400
        assert "nested too deeply" in result.json["error"]["message"]


DEEP = "[" * 300 + "]" * 300  # parsed (orjson reads 1024 levels), deeper than it writes (254)


@pytest.mark.parametrize("stream", ["false", "true"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", '{"model": "m", "input": "hi", "instructions": %s'),
        ("/v1/responses", '{"model": "m", "input": "hi", "metadata": %s'),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": %s}]'),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user"}], "tools": %s'),
        ("/v1/completions", '{"model": "m", "prompt": "hi", "suffix": %s'),
        ("/v1/messages", '{"model": "m", "max_tokens": 5, "messages": [], "system": %s'),
    ],
)
def test_the_mock_answers_a_deeply_nested_field_without_a_500(open_client, path, body, stream):
    """The built-in mock echoes only strings of a request, so a field nested deeper than
    orjson writes never becomes a server error."""
    text = body % DEEP + ', "stream": ' + stream + "}"
    result = open_client.simulate_post(
        path, body=text, headers={**auth(), "content-type": "application/json"}
    )
    assert result.status_code in (200, 400), result.text
    assert "server_error" not in result.text
