"""Decisions on the matched route, against the real server (several workers), h1 and h2.

Any spelling of a path that Falcon routes to an endpoint (extra leading slashes, `%2F`, other
percent-escapes) must be authenticated, limited and counted exactly like the canonical one;
every other spelling (dot segments, case changes, trailing or inner slashes) is 404 and spends
no rate-limit token. Metric labels never grow with what clients send.
"""

from __future__ import annotations

import itertools
import random
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support import Gunicorn, Upstream, wait_until

from edge.endpoints.routes import ROUTES

BURST = 3
KEYS = [f"sk-routes-{n:04d}" for n in range(600)]
SPENT_KEY = KEYS[0]
_fresh_keys = iter(KEYS[1:])

CHAT_BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
LIMITED = {
    "/v1/chat/completions": ("POST", CHAT_BODY),
    "/v1/completions": ("POST", b'{"model": "m", "prompt": "hi"}'),
    "/v1/models": ("GET", None),
    "/v1/embeddings": ("POST", b'{"model": "m", "input": "hi"}'),
    "/v1/responses": ("POST", b'{"model": "m", "input": "hi"}'),
    "/v1/moderations": ("POST", b'{"input": "hi"}'),
}
UNKNOWN = ["/v1/embedding", "/v1/nothing-here", "/v2/models", "/v1/model/x", "/v1", "/"]
SEPARATORS = ["/", "/", "/", "%2F", "%2f", "//", "/./", "/x/../", "/%2E/"]
LEADING = ["/", "/", "//", "///", "/%2F", "/%2f/"]
TRAILING = ["", "", "", "/", "%2F", "/.", "?", "?x=1", "?a=%2F..&b", "#frag"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"]
H2_ONLY_METHODS = ["BREW", "FOO", "get", "X-" + "Y" * 20, "PROPFIND", "MKCOL"]

SERIES = re.compile(r"^(edge_\w+)\{(.*)\} ", re.MULTILINE)
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
# Every route template the app serves (edge.endpoints.routes.ROUTES, the one table), and the
# label of a request that matched none: the `route` label's whole range.
KNOWN_ROUTES = {*ROUTES, "unmatched"}
KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}


def spell(rng: random.Random, template: str) -> str:
    """One spelling of `template`: about half of them route to it, the rest do not."""
    rate = rng.choice([0.0, 0.0, 0.03, 0.15])  # how often a character is disguised

    def char(c: str) -> str:
        roll = rng.random()
        if roll >= rate:
            return c
        return rng.choice([f"%{ord(c):02X}", f"%{ord(c):02x}", c.swapcase()])

    segments = ["".join(char(c) for c in part) for part in template.strip("/").split("/")]
    odd = rng.random() < 0.3  # unusual separators and endings, else the routable ones
    path = rng.choice(LEADING) + segments[0]
    for segment in segments[1:]:
        path += rng.choice(SEPARATORS if odd else ["/", "/", "%2F", "%2f"]) + segment
    return path + rng.choice(TRAILING if odd else ["", "?", "?x=1", "?a=%2F..&b"])


def key_headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", "content-type": "application/json"}


def send(client: httpx.Client, method: str, target: str, key: str, template: str) -> httpx.Response:
    """`target` sent as it is (httpx would normalize it otherwise), with a valid body for
    `template` (a chat body for an unknown one)."""
    body = LIMITED.get(template, ("POST", CHAT_BODY))[1] if method == "POST" else None
    return client.request(
        method, "/", content=body, headers=key_headers(key), extensions={"target": target.encode()}
    )


def remaining(client: httpx.Client, key: str) -> int:
    reply = client.get("/v1/models", headers=key_headers(key))
    assert reply.status_code == 200, reply.text
    return int(reply.headers["x-ratelimit-remaining-requests"])


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture(scope="module", params=["http1", "h2"])
def client(request, certificate) -> Iterator[httpx.Client]:
    env = {
        "API_KEYS": ",".join(KEYS),
        "WORKERS": "3",
        "RATE_LIMIT_BURST": str(BURST),
        "RATE_LIMIT_RPM": "0.001",  # no refill during the test
        "LOG_LEVEL": "warning",
    }
    h2 = request.param == "h2"
    if h2:
        cert, key = certificate
        env.update(TLS_CERT_FILE=cert, TLS_KEY_FILE=key, HTTP2_ENABLED="true")
    server = Gunicorn(**env)
    try:
        with httpx.Client(
            base_url=server.url, http2=h2, http1=not h2, verify=server.verify, timeout=10
        ) as http:
            reply = http.get("/health")
            assert reply.http_version == ("HTTP/2" if h2 else "HTTP/1.1")
            yield http
    finally:
        server.stop()


@pytest.fixture(scope="module")
def spent_key(client: httpx.Client) -> str:
    for _ in range(BURST):
        assert client.get("/v1/models", headers=key_headers(SPENT_KEY)).status_code == 200
    assert client.get("/v1/models", headers=key_headers(SPENT_KEY)).status_code == 429
    return SPENT_KEY


# The spellings of the report: each routes to its endpoint (percent-escapes only over
# HTTP/1.1: gunicorn's HTTP/2 worker does not decode them, so there they are 404).
REPORTED = ["//v1/chat/completions", "///v1/chat/completions", "/%2Fv1/chat/completions",
            "//v1/models", "/v1%2Fmodels?x=1"]  # fmt: skip


def test_the_reported_spellings_are_limited(client, spent_key):
    for target in REPORTED:
        template = "/v1/models" if "models" in target else "/v1/chat/completions"
        reply = send(client, LIMITED[template][0], target, spent_key, template)
        assert reply.status_code in (404, 429), (target, reply.status_code)
    assert send(client, "POST", REPORTED[0], spent_key, "/v1/chat/completions").status_code == 429


LIVE = settings(
    max_examples=80,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking against a live server
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)


@LIVE
@given(template=st.sampled_from(sorted(LIMITED)), rng=st.randoms(use_true_random=False))
def test_no_spelling_of_a_limited_endpoint_escapes_a_spent_bucket(client, spent_key, template, rng):
    method = LIMITED[template][0]
    target = spell(rng, template)
    reply = send(client, method, target, spent_key, template)
    assert not 200 <= reply.status_code < 300, (target, reply.status_code)
    assert reply.status_code in (400, 404, 429), (target, reply.status_code, reply.text)


@LIVE
@given(template=st.sampled_from(sorted(LIMITED) + UNKNOWN), rng=st.randoms(use_true_random=False))
def test_a_spelling_spends_a_token_only_if_it_reaches_an_endpoint(client, template, rng):
    key = next(_fresh_keys)
    method = LIMITED.get(template, ("POST", None))[0]
    target = spell(rng, template)
    reply = send(client, method, target, key, template)
    if 200 <= reply.status_code < 300:
        # Served: limited exactly like the canonical spelling.
        assert reply.headers["x-ratelimit-remaining-requests"] == str(BURST - 1), target
        assert remaining(client, key) == BURST - 2, target
    else:
        assert reply.status_code in (400, 404), (target, reply.status_code, reply.text)
        assert "x-ratelimit-remaining-requests" not in reply.headers
        assert remaining(client, key) == BURST - 1, target  # nothing was spent


@pytest.mark.parametrize(
    "target", ["/v1/models/", "/v1/models%2F", "/v1/models/.", "//v1/models/.."]
)
def test_a_model_path_naming_no_model_is_400_and_spends_no_token(client, target):
    """It routes to GET /v1/models/{id}, but its id names nothing: refused as if unmatched."""
    key = next(_fresh_keys)
    reply = send(client, "GET", target, key, "/v1/models/{model_id:path}")
    # 400 naming the model; 404 where the server does not decode %2F (the h2 worker)
    assert reply.status_code in (400, 404), (target, reply.text)
    if reply.status_code == 400:
        assert reply.json()["error"]["param"] == "model"
    assert "x-ratelimit-remaining-requests" not in reply.headers
    assert remaining(client, key) == BURST - 1  # nothing was spent


def series(client: httpx.Client) -> list[tuple[str, dict[str, str]]]:
    text = client.get("/metrics").text
    return [(name, dict(LABEL.findall(labels))) for name, labels in SERIES.findall(text)]


def test_metric_series_stay_bounded_under_random_paths_and_methods(client):
    rng = random.Random(11)
    h2 = client.get("/health").http_version == "HTTP/2"
    methods = METHODS + (H2_ONLY_METHODS if h2 else [])
    templates = [*LIMITED, *UNKNOWN, "/health", "/health/live", "/metrics"]
    keys = itertools.cycle(KEYS[-50:])

    def burst_of_requests(count: int) -> None:
        for _ in range(count):
            template = rng.choice(templates)
            target = spell(rng, template) if rng.random() < 0.7 else f"/r{rng.getrandbits(40):x}"
            method = rng.choice(methods)
            if template in LIMITED and rng.random() < 0.5:
                method = LIMITED[template][0]
            send(client, method, target, next(keys), template)

    # The two routes checked at the end, whatever the draws below send (over h2 they route
    # no chat request) and whatever other tests sent before.
    send(client, "POST", "/v1/chat/completions", next(keys), "/v1/chat/completions")
    send(client, "GET", "/v1/nothing-here", next(keys), "/v1/nothing-here")
    burst_of_requests(150)
    after_first = series(client)
    burst_of_requests(250)
    after_second = series(client)

    for _, labels in after_second:
        assert labels.get("route", "unmatched") in KNOWN_ROUTES, labels
        assert labels.get("method", "GET") in KNOWN_METHODS | {"other"}, labels
    statuses = {labels["status"] for _, labels in after_second if "status" in labels}
    assert len(statuses) <= 10, statuses
    # What the label sets allow, whatever the number of requests: edge_requests_total by
    # route x method x status, three histograms by route (buckets + sum + count), and the
    # label-free or fixed-label families.
    ceiling = len(KNOWN_ROUTES) * (len(KNOWN_METHODS) + 1) * len(statuses)
    ceiling += 3 * len(KNOWN_ROUTES) * 17 + 100
    assert len(after_first) <= len(after_second) <= ceiling, (len(after_second), ceiling)
    routes = {labels["route"] for _, labels in after_second if "route" in labels}
    assert "unmatched" in routes and "/v1/chat/completions" in routes


# ------------------------------------------------------------------ the concurrency cap


@pytest.fixture(scope="module")
def capped() -> Iterator[Gunicorn]:
    upstream = Upstream()
    server = Gunicorn(
        API_KEYS=KEYS[0],
        RATE_LIMIT_ENABLED="false",
        WORKERS="1",
        MAX_CONCURRENT_REQUESTS="2",
        UPSTREAM_URL=upstream.url + "/v1",
        SERVER_TIMEOUT_SECONDS="10",
        LOG_LEVEL="warning",
    )
    try:
        yield server
    finally:
        server.stop()
        upstream.stop(timeout=3)  # `hang` handlers never finish


def test_the_cap_exempts_health_checks_by_the_matched_route(capped):
    body = b'{"model": "hang", "messages": [{"role": "user", "content": "hi"}]}'
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
        % (KEYS[0].encode(), len(body), body)
    )
    held = []
    try:
        for _ in range(2):  # both slots taken by requests the upstream never answers
            sock = socket.create_connection(("127.0.0.1", capped.port))
            held.append(sock)
            sock.sendall(request)
        with httpx.Client(base_url=capped.url, timeout=10) as http:

            def status(target: str) -> int:
                return http.get("/", extensions={"target": target.encode()}).status_code

            wait_until(lambda: status("/v1/models") == 503)
            for target in ("/health/live", "//health/live", "/%2Fhealth/ready", "/%68ealth"):
                assert status(target) == 200, target
            for target in ("/healthz", "/health/x", "//v1/models", "/metrics"):
                assert status(target) == 503, target
    finally:
        for sock in held:
            sock.close()
