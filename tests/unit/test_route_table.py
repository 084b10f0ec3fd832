"""Which endpoint is this: decided on the route Falcon matched, never on the raw path."""

from __future__ import annotations

import falcon.testing
import pytest

from edge.app import create_app
from edge.config import Config
from edge.endpoints.routes import API, HEALTH, METRICS, ROUTES, endpoint_table, kind_of_target
from edge.observability.metrics import METHOD_LABELS

KEY = "sk-routes-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def make_app(**env: str):
    env.setdefault("API_KEYS", KEY)
    return create_app(Config.from_env(env))


def client(**env: str) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(make_app(**env))


def remaining(app_client: falcon.testing.TestClient) -> int:
    result = app_client.simulate_get("/v1/models", headers=AUTH)
    assert result.status_code == 200
    return int(result.headers["x-ratelimit-remaining-requests"])


def label_values(app_client: falcon.testing.TestClient, label: str) -> set[str]:
    text = app_client.simulate_get("/metrics").text
    values = set()
    for line in text.splitlines():
        if line.startswith("edge_") and f'{label}="' in line:
            values.add(line.split(f'{label}="', 1)[1].split('"', 1)[0])
    return values


def test_every_served_route_has_a_kind_and_the_router_agrees_with_the_app():
    app = make_app()
    router = app._router
    paths = [
        *ROUTES,
        "//v1/chat/completions", "///v1/models", "/health/", "//health/live", "/healthz",
        "/v1/models/", "/v1//models", "/v1/./models", "/V1/models", "/", "/metrics/x", "",
    ]  # fmt: skip
    for path in paths:
        found = router.find(path)
        expected = None if found is None else ROUTES[found[3]][0]
        assert kind_of_target(path.encode() or b"/") == expected, path
    assert {kind for kind, _ in ROUTES.values()} == {API, HEALTH, METRICS}


def test_a_route_without_a_kind_is_refused():
    with pytest.raises(KeyError):
        endpoint_table(Config.from_env({"API_KEYS": KEY}), ["/v1/not-a-route"])


def test_kind_of_target_decodes_like_uvicorn():
    assert kind_of_target(b"/%68ealth") == HEALTH
    assert kind_of_target(b"/%2Fhealth/ready") == HEALTH
    assert kind_of_target(b"http://example.com/health?x=1") == HEALTH
    assert kind_of_target(b"/%2Fv1/chat/completions") == API
    assert kind_of_target(b"/health%2F..%2Fv1/chat/completions") is None
    assert kind_of_target(b"/healthz") is None
    assert kind_of_target(b"/health/../v1/models") is None
    assert kind_of_target(b"/%ff") is None
    assert kind_of_target(b"\x00") is None


def test_unmatched_is_401_without_a_key_404_with_one_and_spends_nothing():
    app_client = client(RATE_LIMIT_BURST="5", RATE_LIMIT_RPM="0.001")
    assert app_client.simulate_post("/v1/nothing-here", json={}).status_code == 401
    for path in ("/v1/nothing-here", "/v1//models", "/V1/models", "/v1/./models"):
        result = app_client.simulate_post(path, json={}, headers=AUTH)
        assert result.status_code == 404, path
        assert result.json["error"]["code"] == "not_found"
        assert "x-ratelimit-remaining-requests" not in result.headers
    assert remaining(app_client) == 4  # only this request spent a token


def test_unmatched_is_404_without_auth_and_spends_nothing():
    app_client = client(AUTH_ENABLED="false", RATE_LIMIT_BURST="5", RATE_LIMIT_RPM="0.001")
    assert app_client.simulate_get("/v1/nothing-here").status_code == 404
    result = app_client.simulate_get("/v1/models")
    assert result.headers["x-ratelimit-remaining-requests"] == "4"


def test_other_spellings_of_a_route_are_authenticated_limited_and_labelled_canonically():
    app_client = client(RATE_LIMIT_BURST="5", RATE_LIMIT_RPM="0.001")
    assert app_client.simulate_get("//v1/models").status_code == 401
    assert app_client.simulate_post("///v1/chat/completions", json=CHAT).status_code == 401
    first = app_client.simulate_get("//v1/models", headers=AUTH)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-requests"] == "4"
    chat = app_client.simulate_post("///v1/chat/completions", json=CHAT, headers=AUTH)
    assert chat.status_code == 200
    assert chat.headers["x-ratelimit-remaining-requests"] == "3"
    assert remaining(app_client) == 2
    routes = label_values(app_client, "route")
    assert routes <= set(ROUTES) | {"unmatched"}
    assert {"/v1/models", "/v1/chat/completions"} <= routes


def test_health_spellings_stay_public_and_unlimited():
    app_client = client(RATE_LIMIT_BURST="1", RATE_LIMIT_RPM="0.001")
    for _ in range(3):
        result = app_client.simulate_get("//health/live")
        assert result.status_code == 200
        assert "x-ratelimit-remaining-requests" not in result.headers
    assert client(AUTH_HEALTH_CHECK="true").simulate_get("//health").status_code == 401


def test_public_paths_apply_to_the_matched_route():
    app_client = client(PUBLIC_PATHS="/v1/models")
    assert app_client.simulate_get("//v1/models").status_code == 200
    assert app_client.simulate_post("//v1/completions", json={}).status_code == 401


def test_method_label_is_bounded():
    app_client = client()
    for method in ("BREW", "FOO", "PROPFIND"):
        result = app_client.simulate_request(method, "/v1/models", headers=AUTH)
        assert result.status_code in (400, 405)
    assert app_client.simulate_request("BREW", "/nowhere", headers=AUTH).status_code in (400, 404)
    assert label_values(app_client, "method") <= METHOD_LABELS | {"other"}
    assert "other" in label_values(app_client, "method")


def test_405_names_the_route_not_the_spelling():
    result = client().simulate_get("///v1/chat/completions", headers=AUTH)
    assert result.status_code == 405
    assert result.json["error"]["message"] == "Method GET is not allowed on /v1/chat/completions."
