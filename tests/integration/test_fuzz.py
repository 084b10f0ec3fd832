"""Hypothesis against the app: random bodies and headers never get a 5xx, errors are always the
OpenAI envelope, and the app keeps answering normal requests.

Most of it goes through falcon.testing (auth on, mock provider, the rate limiter exercised but
never refusing); one property sends raw requests with random header lines to real gunicorn.
"""

from __future__ import annotations

import json
import re
import socket
import time

import falcon.testing
import httpx
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from edge.app import create_app
from edge.config import Config

KEY = "sk-fuzz-test-key"
ENV = {"API_KEYS": KEY, "RATE_LIMIT_RPM": "1000000000", "RATE_LIMIT_BURST": "1000000000"}
PATHS = ("/v1/chat/completions", "/v1/completions")
NORMAL = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def app():
    return falcon.testing.TestClient(create_app(Config.from_env(ENV)))


# ------------------------------------------------------------------ strategies

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)


def nested(depth: int, leaf: object) -> object:
    value = leaf
    for index in range(depth):
        value = [value] if index % 2 else {"content": value}
    return value


# Deep enough for the validators and the mock's word counter (the test's own json.dumps
# recursion bounds it; test_deeply_nested_content_is_not_a_500 goes to the parser's limit).
deep_values = st.builds(nested, st.integers(0, 600), scalars)
contents = st.one_of(st.text(max_size=60), json_values, deep_values)
messages = st.one_of(
    st.lists(
        st.dictionaries(
            st.sampled_from(["role", "content", "text", "name", "tool_calls"]), contents
        ),
        min_size=1,
        max_size=4,
    ),
    json_values,
)
optional_fields = {
    "stream": st.one_of(st.booleans(), st.none(), json_values),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": scalars}), scalars),
    "max_tokens": scalars,
    "extra": json_values,
}
# Close to a valid request (a string model, messages and a prompt), so the success path, the
# mock's stream and the field checks behind the first ones are reached often...
plausible = st.fixed_dictionaries(
    {
        "model": st.text(min_size=1, max_size=300),
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "tool"]), "content": contents}),
            min_size=1,
            max_size=3,
        ),
        "prompt": st.one_of(st.text(max_size=60), st.lists(contents, max_size=3)),
    },
    optional=optional_fields,
)
# ...and anything shaped like an object with the same keys.
arbitrary = st.fixed_dictionaries(
    {"model": st.one_of(st.text(min_size=1, max_size=300), json_values)},
    optional={
        "messages": messages,
        "prompt": st.one_of(st.text(max_size=60), st.lists(contents, max_size=4), json_values),
        **optional_fields,
    },
)
request_like = st.one_of(plausible, arbitrary)

latin1_printable = st.characters(
    codec="latin-1", categories=["L", "M", "N", "P", "S", "Zs"], exclude_characters="\x7f"
)
header_values = st.text(alphabet=latin1_printable, max_size=200).map(str.strip)
token_chars = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FRAMING = {"content-length", "transfer-encoding", "connection", "host", "upgrade", "expect"}
header_names = st.text(alphabet=token_chars, min_size=1, max_size=24).filter(
    lambda name: name.lower() not in FRAMING
)
traceparents = st.one_of(
    header_values,
    st.from_regex(r"\A[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[ -~]{0,20})?\Z"),
    st.just("00-" + "0" * 32 + "-" + "0" * 16 + "-01"),
)
content_types = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "APPLICATION/JSON",
            "application/vnd.api+json",
            "text/plain",
            "multipart/form-data; boundary=x",
            "",
            ";",
        ]
    ),
    header_values,
)
auth_headers = st.one_of(
    st.just({"authorization": f"Bearer {KEY}"}),
    st.just({"x-api-key": KEY}),
    st.builds(lambda v: {"authorization": v}, header_values),
    st.builds(lambda v: {"authorization": "Bearer " + v}, header_values),
    st.builds(lambda v: {"x-api-key": v}, header_values),
    st.builds(lambda v: {"x-api-key": v, "authorization": f"Bearer {KEY}"}, header_values),
    st.just({}),
)
special_headers = st.fixed_dictionaries(
    {},
    optional={
        "x-request-id": st.one_of(header_values, st.from_regex(r"\A[A-Za-z0-9._:/+=-]{1,140}\Z")),
        "traceparent": traceparents,
        "tracestate": header_values,
        "content-type": content_types,
        "accept": header_values,
        "x-forwarded-for": header_values,
    },
)
random_headers = st.dictionaries(header_names, header_values, max_size=8)


# ------------------------------------------------------------------ checks


def check(result: falcon.testing.Result, method: str = "POST") -> None:
    """No 5xx; an error is the OpenAI envelope; every response carries a sane request id."""
    if currently_in_test_context():
        event(f"status {result.status_code}")
    assert result.status_code < 500, (result.status_code, result.text[:500])
    request_id = result.headers.get("x-request-id")
    assert request_id and re.fullmatch(r"[A-Za-z0-9._:/+=-]{1,128}", request_id), request_id
    if result.status_code >= 400:
        assert result.headers["content-type"].startswith("application/json"), result.headers
        error = json.loads(result.text)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"]
        assert KEY not in result.text
    elif result.headers.get("content-type", "").startswith("text/event-stream"):
        assert result.text.endswith("data: [DONE]\n\n"), result.text[-200:]
    elif method == "OPTIONS":  # Falcon's default OPTIONS answer: an Allow header, no body
        assert result.status_code == 200 and "allow" in result.headers
    elif result.headers.get("content-type", "").startswith("application/json"):
        assert isinstance(json.loads(result.text), dict)
    else:  # /metrics: Prometheus text
        assert result.text.startswith("#"), result.text[:200]


def still_serves(app: falcon.testing.TestClient) -> None:
    result = app.simulate_post(
        "/v1/chat/completions", json=NORMAL, headers={"authorization": f"Bearer {KEY}"}
    )
    assert result.status_code == 200, result.text
    assert result.json["choices"][0]["message"]["content"]


def authed(content_type: str | None = "application/json") -> dict[str, str]:
    headers = {"authorization": f"Bearer {KEY}"}
    if content_type is not None:
        headers["content-type"] = content_type
    return headers


# ------------------------------------------------------------------ falcon.testing properties


@FUZZ
@given(path=st.sampled_from(PATHS), value=json_values)
def test_any_json_value_as_a_body(app, path, value):
    body = json.dumps(value).encode()
    check(app.simulate_post(path, body=body, headers=authed()))


@FUZZ
@given(path=st.sampled_from(PATHS), data=request_like, ascii_only=st.booleans())
def test_request_shaped_bodies(app, path, data, ascii_only):
    try:
        body = json.dumps(data, ensure_ascii=ascii_only).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: send it escaped instead
        body = json.dumps(data).encode()
    result = app.simulate_post(path, body=body, headers=authed())
    check(result)
    if result.status_code == 200:
        assert isinstance(data["model"], str) and 0 < len(data["model"]) <= 256


@FUZZ
@given(
    path=st.sampled_from(PATHS),
    body=st.one_of(
        st.binary(max_size=2000),
        st.builds(
            lambda data, cut, junk: json.dumps(data).encode()[:cut] + junk,
            request_like,
            st.integers(0, 400),
            st.binary(max_size=8),
        ),
    ),
    content_type=st.one_of(st.none(), content_types),
)
def test_random_bytes_as_a_body(app, path, body, content_type):
    check(app.simulate_post(path, body=body, headers=authed(content_type)))


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=st.sampled_from([*PATHS, "/v1/models", "/health", "/health/ready", "/metrics", "/v1/x"]),
    auth=auth_headers,
    special=special_headers,
    extra=random_headers,
    body=st.one_of(st.none(), st.just(json.dumps(NORMAL)), st.text(max_size=100)),
)
def test_random_headers(app, method, path, auth, special, extra, body):
    headers = {**extra, **special, **auth}
    result = app.simulate_request(method, path, headers=headers, body=body)
    if method == "HEAD":
        assert result.status_code < 500
        return
    check(result, method)
    if path in PATHS and result.status_code == 200:
        assert method in ("POST", "OPTIONS")
    still_serves(app)


def test_still_serves_after_the_fuzzing(app):
    still_serves(app)
    assert app.simulate_get("/health").status_code == 200


@pytest.mark.parametrize(
    ("path", "field"), [("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")]
)
@pytest.mark.parametrize("stream", [False, True])
def test_deeply_nested_content_is_not_a_500(app, path, field, stream):
    """Regression: the mock's word counter recursed per level, so content nested ~500 deep
    (orjson accepts up to 1023) was a RecursionError answered 500 (fixed in f8c045e). Past the
    parser's limit it is a 400."""
    for depth, status in ((1000, 200), (1030, 400)):
        deep = "[" * depth + "]" * depth
        inner = f'[{{"role":"user","content":{deep}}}]' if field == "messages" else deep
        body = f'{{"model":"m","stream":{json.dumps(stream)},"{field}":{inner}}}'
        result = app.simulate_post(path, body=body.encode(), headers=authed())
        check(result)
        assert result.status_code == status, result.text[:300]


# ------------------------------------------------------------------ against real gunicorn


@pytest.fixture(scope="module")
def server():
    from support import Gunicorn

    gunicorn = Gunicorn(
        API_KEYS=KEY,
        RATE_LIMIT_ENABLED="false",
        HTTP_HEADER_TIMEOUT_SECONDS="2",
        HTTP_BODY_TIMEOUT_SECONDS="2",
        MAX_REQUEST_SIZE="65536",
    )
    yield gunicorn
    gunicorn.stop()


WELL_KNOWN = "authorization x-api-key x-request-id traceparent tracestate content-type cookie"
raw_header_names = st.one_of(header_names, st.sampled_from(WELL_KNOWN.split()))
raw_values = st.one_of(
    header_values,
    st.binary(max_size=60).map(lambda b: b.translate(None, b"\r\n").decode("latin-1")),
    st.just(f"Bearer {KEY}"),
)
header_line = st.tuples(raw_header_names, raw_values).map(lambda nv: f"{nv[0]}: {nv[1]}")
junk_line = st.binary(max_size=40).map(lambda b: b.translate(None, b"\r\n").decode("latin-1"))
raw_lines = st.one_of(
    st.lists(header_line, max_size=12),  # mostly well-formed lines...
    st.lists(st.one_of(header_line, junk_line), max_size=12),  # ...sometimes with junk
)
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def raw_roundtrip(port: int, request: bytes) -> tuple[bytes, bool]:
    chunks, closed = [], False
    with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
        try:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
    return b"".join(chunks), closed


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    post=st.booleans(),
    lines=raw_lines,
    authorized=st.booleans(),
)
def test_raw_random_header_lines_against_gunicorn(server, post, lines, authorized):
    head = ["POST /v1/chat/completions HTTP/1.1" if post else "GET /health HTTP/1.1", "Host: x"]
    if authorized:
        head.append(f"Authorization: Bearer {KEY}")
    head.extend(lines)
    body = json.dumps(NORMAL).encode() if post else b""
    head.append(f"Content-Length: {len(body)}")
    head.append("Connection: close")
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    started = time.monotonic()
    response, closed = raw_roundtrip(server.port, request)
    assert closed, f"no answer and no close within {time.monotonic() - started:.1f}s"
    statuses = [int(s) for s in STATUS_LINE.findall(response)]
    assert len(statuses) == 1, response[:500]
    event(f"status {statuses[0]}")
    assert statuses[0] < 500, response[:500]
    if statuses[0] >= 400:
        payload = response.partition(b"\r\n\r\n")[2]
        assert set(json.loads(payload)["error"]) == {"message", "type", "param", "code"}


def test_gunicorn_healthy_after_the_raw_fuzzing(server):
    assert httpx.get(server.url + "/health/ready", timeout=5).status_code == 200
    chat = httpx.post(
        server.url + "/v1/chat/completions", json=NORMAL,
        headers={"authorization": f"Bearer {KEY}"}, timeout=5,
    )  # fmt: skip
    assert chat.status_code == 200
    log = server.output()
    assert "Exception in ASGI application" not in log
    assert "Traceback" not in log
