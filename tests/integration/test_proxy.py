"""The foundation end to end: real gunicorn (2 workers), a real upstream, the openai SDK."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import subprocess
import time

import httpx
import openai
import pytest
from support import (
    GUNICORN,
    ROOT,
    Gunicorn,
    Upstream,
    assert_envelope,
    base_env,
    free_port,
    raw_exchange,
    sdk_client,
    wait_until,
)
from upstream_server import CANARY

CLIENT_KEY = "sk-client-key-for-tests"
UPSTREAM_KEY = "sk-upstream-secret-for-tests"
CHAT = [{"role": "user", "content": "Say hello in five words"}]


@pytest.fixture(scope="module")
def upstream():
    server = Upstream("--slow", "5", "--pace", "0.25", "--chunks", "5")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(upstream):
    server = Gunicorn(
        API_KEYS=CLIENT_KEY,
        UPSTREAM_URL=upstream.url + "/v1",
        UPSTREAM_API_KEY=UPSTREAM_KEY,
        SERVER_TIMEOUT_SECONDS="1.5",
        MAX_REQUEST_SIZE="4096",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mock_proxy():
    server = Gunicorn(API_KEYS=CLIENT_KEY)
    yield server
    server.stop()


def sdk(server: Gunicorn, key: str = CLIENT_KEY) -> openai.OpenAI:
    return sdk_client(server.url, key)


def post(server: Gunicorn, path: str, **kwargs) -> httpx.Response:
    headers = {"authorization": f"Bearer {CLIENT_KEY}", **kwargs.pop("headers", {})}
    return httpx.post(server.url + path, headers=headers, timeout=20, **kwargs)


# ------------------------------------------------------------------ built-in mock provider


def test_mock_chat_is_openai_shaped_with_usage(mock_proxy):
    first = sdk(mock_proxy).chat.completions.create(model="mock-gpt", messages=CHAT)
    second = sdk(mock_proxy).chat.completions.create(model="mock-gpt", messages=CHAT)
    assert first.object == "chat.completion"
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content == second.choices[0].message.content  # deterministic
    assert first.usage.prompt_tokens == 5
    assert first.usage.completion_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_mock_completions(mock_proxy):
    result = sdk(mock_proxy).completions.create(model="mock-gpt", prompt="one two three")
    assert result.object == "text_completion"
    assert result.choices[0].text
    assert result.usage.prompt_tokens == 3


def test_mock_streaming_chunks_then_done(mock_proxy):
    stream = sdk(mock_proxy).chat.completions.create(
        model="mock-gpt", messages=CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = sdk(mock_proxy).chat.completions.create(model="mock-gpt", messages=CHAT)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 5
    raw = post(
        mock_proxy, "/v1/chat/completions", json={"model": "m", "messages": CHAT, "stream": True}
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_mock_models(mock_proxy):
    models = sdk(mock_proxy).models.list()
    assert "mock-gpt" in [model.id for model in models.data]


def test_health_endpoints(mock_proxy):
    for path, status in (("/health", "ok"), ("/health/live", "alive"), ("/health/ready", "ready")):
        response = httpx.get(mock_proxy.url + path)
        assert response.status_code == 200
        assert response.json() == {"status": status}


def test_startup_says_no_upstream_is_configured(mock_proxy):
    assert "no upstream configured" in mock_proxy.output()


# ------------------------------------------------------------------ through a real upstream


def test_chat_and_completions_through_upstream(proxy):
    chat = sdk(proxy).chat.completions.create(model="gpt-test", messages=CHAT)
    assert chat.choices[0].message.content == "Hello from the upstream."
    assert chat.usage.completion_tokens == 7
    completion = sdk(proxy).completions.create(model="gpt-test", prompt="hi")
    assert completion.choices[0].text == "Hello from the upstream."


def test_models_through_upstream(proxy):
    assert [m.id for m in sdk(proxy).models.list().data] == ["upstream-model"]


def test_stream_chunks_arrive_spaced_as_upstream_sent_them(proxy):
    arrivals = []
    stream = sdk(proxy).chat.completions.create(model="paced-5", messages=CHAT, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
    assert len(arrivals) == 5
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    # The upstream waits 0.25 s between chunks; a buffering proxy would deliver them together.
    assert min(gaps) > 0.15, gaps


def test_upstream_gets_its_own_key_never_the_clients(proxy, upstream):
    response = post(
        proxy,
        "/v1/chat/completions",
        json={"model": "gpt-test", "messages": CHAT},
        headers={
            "x-api-key": CLIENT_KEY,
            "cookie": "session=secret-cookie",
            "x-request-id": "rid-keys-1",
        },
    )
    assert response.status_code == 200
    seen = {k.lower(): v for k, v in upstream.seen("rid-keys-1")["headers"].items()}
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-api-key" not in seen
    assert "cookie" not in seen
    assert CLIENT_KEY not in str(seen)


def test_request_id_round_trips_to_client_and_upstream(proxy, upstream):
    response = post(
        proxy, "/v1/chat/completions", json={"model": "gpt-test", "messages": CHAT},
        headers={"x-request-id": "trace-me-123"},
    )  # fmt: skip
    assert response.headers["x-request-id"] == "trace-me-123"
    assert upstream.seen("trace-me-123")["headers"]["x-request-id"] == "trace-me-123"


def test_unsafe_request_id_is_replaced(proxy):
    response = post(
        proxy, "/v1/chat/completions", json={"model": "gpt-test", "messages": CHAT},
        headers={"x-request-id": "bad id with spaces" + "x" * 200},
    )  # fmt: skip
    assert response.status_code == 200
    rid = response.headers["x-request-id"]
    assert rid != "" and " " not in rid and len(rid) <= 128


@pytest.mark.parametrize("bad", [b"\x7f", b"\t", b"\x01", b"\x1b[31m", "\u00e9".encode()])
def test_tracestate_with_control_characters_is_not_forwarded(proxy, upstream, bad):
    request_id = f"tracestate-{bad.hex()}"
    body = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}'
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        b"x-request-id: " + request_id.encode() + b"\r\n"
        b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
        b"tracestate: congo=a" + bad + b"b\r\n\r\n"
    )
    answer = raw_exchange(proxy.port, head + body)
    status = int(answer.split(b" ", 2)[1])
    if status == 400:
        return  # the HTTP parser refused it: nothing reached the upstream either
    assert status == 200, answer[:300]
    headers = upstream.seen(request_id)["headers"]
    assert "traceparent" in headers
    assert "tracestate" not in headers, headers["tracestate"]


def test_upstream_error_keeps_status_body_and_retry_after(proxy):
    response = post(proxy, "/v1/chat/completions", json={"model": "error-429", "messages": CHAT})
    error = assert_envelope(response, 429, "rate_limit_exceeded")
    assert error["message"] == "Upstream rate limit reached."
    assert response.headers["retry-after"] == "7"
    with pytest.raises(openai.InternalServerError):
        sdk(proxy).chat.completions.create(model="error-500", messages=CHAT)


def test_upstream_html_error_is_wrapped_in_envelope(proxy):
    assert_envelope(
        post(proxy, "/v1/chat/completions", json={"model": "html-500", "messages": CHAT}), 500
    )


def test_upstream_garbage_is_502(proxy):
    for model in ("garbage", "garbage-http"):
        response = post(proxy, "/v1/chat/completions", json={"model": model, "messages": CHAT})
        assert_envelope(response, 502, "bad_gateway")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("status", [401, 403])
def test_upstream_refusing_the_gateways_key_is_502_without_its_body(proxy, status, stream):
    # Before: the upstream's 401/403 and its body (quoting part of the upstream key) went to
    # the client, whose SDK raised AuthenticationError about its own, valid key.
    model = f"error-{status}"
    with pytest.raises(openai.APIStatusError) as raised:
        if stream:
            with sdk(proxy).chat.completions.create(model=model, messages=CHAT, stream=True) as s:
                list(s)
        else:
            sdk(proxy).chat.completions.create(model=model, messages=CHAT)
    error = raised.value
    assert error.status_code == 502
    assert not isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError)
    assert error.code == "upstream_auth_failed"
    assert "credentials" in error.message

    response = post(proxy, "/v1/chat/completions",
                    json={"model": model, "messages": CHAT, "stream": stream})  # fmt: skip
    body = assert_envelope(response, 502, "upstream_auth_failed", type_="upstream_error")
    for secret in (CANARY, UPSTREAM_KEY[-8:], "Incorrect API key"):
        assert secret not in response.text
        assert secret not in str(body)
    request_id = response.headers["x-request-id"]

    def logged() -> list[dict]:
        return [line for line in log_records(proxy) if line.get("request_id") == request_id]

    records = wait_until(lambda: [r for r in logged() if r.get("status") == 502])
    assert records[0]["upstream_status"] == status
    assert any(r.get("error_kind") == "auth" and r.get("upstream_status") == status
               for r in logged())  # fmt: skip
    output = proxy.output()
    assert CANARY not in output
    assert UPSTREAM_KEY[-8:] not in output


def log_records(server: Gunicorn) -> list[dict]:
    records = []
    for line in server.output().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def test_slow_upstream_is_504(proxy):
    started = time.monotonic()
    response = post(proxy, "/v1/chat/completions", json={"model": "slow", "messages": CHAT})
    assert_envelope(response, 504, "upstream_timeout")
    assert time.monotonic() - started < 5  # the upstream answers after 5 s; we must not wait


def test_unreachable_upstream_is_502():
    server = Gunicorn(AUTH_ENABLED="false", UPSTREAM_URL=f"http://127.0.0.1:{free_port()}/v1")
    try:
        response = httpx.post(
            server.url + "/v1/chat/completions", json={"model": "m", "messages": CHAT}
        )
        assert_envelope(response, 502, "bad_gateway")
        with pytest.raises(openai.InternalServerError):
            sdk(server).chat.completions.create(model="m", messages=CHAT)
    finally:
        server.stop()


# ------------------------------------------------------------------ request errors


def test_body_over_limit_by_content_length_is_413(proxy):
    response = post(proxy, "/v1/chat/completions", content=b"x" * 5000,
                    headers={"content-type": "application/json"})  # fmt: skip
    assert_envelope(response, 413, "request_too_large")


def test_chunked_body_over_limit_is_413(proxy):
    def chunks():
        for _ in range(20):
            yield b'{"model": "m", "messages": [], "pad": "' + b"x" * 500

    response = post(proxy, "/v1/chat/completions", content=chunks(),
                    headers={"content-type": "application/json"})  # fmt: skip
    assert_envelope(response, 413, "request_too_large")


def test_413_before_the_body_is_sent(proxy):
    """A declared Content-Length over the limit is refused without reading the body."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer "
            + CLIENT_KEY.encode()
            + b"\r\nContent-Length: 999999999\r\n\r\n"
        )
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413 ")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"\xff\xfe{}", None),
        (b"[1, 2]", None),
        (b"null", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "m"}', "messages"),
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"model": "m", "messages": ["x"]}', "messages[0]"),
        (b'{"model": "m", "messages": [{}], "stream": "yes"}', "stream"),
    ],
)
def test_bad_bodies_are_400_naming_the_param(proxy, body, param):
    response = post(
        proxy, "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    error = assert_envelope(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_completions_need_a_prompt(proxy):
    error = assert_envelope(post(proxy, "/v1/completions", json={"model": "m"}), 400)
    assert error["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        sdk(proxy).chat.completions.create(model="m", messages=[])


def test_wrong_content_type_is_415(proxy):
    response = post(proxy, "/v1/chat/completions", content=b"model=m",
                    headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert_envelope(response, 415, "unsupported_media_type")


def test_unknown_route_404_and_wrong_method_405(proxy):
    assert_envelope(post(proxy, "/v1/nothing-here", json={}), 404, "not_found")
    response = httpx.get(
        proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {CLIENT_KEY}"}
    )
    assert_envelope(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]
    with pytest.raises(openai.NotFoundError):
        sdk(proxy).files.list()


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RATE_LIMIT_RPM", "lots"),
        ("SERVER_ADDRESS", "nowhere"),
        ("AUTH_ENABLED", "perhaps"),
        ("UPSTREAM_URL", "ftp://example.invalid"),
        ("MAX_REQUEST_SIZE", "-1"),
        ("WORKERS", "0"),
    ],
)
def test_bad_config_value_stops_the_start_naming_the_variable(variable, value):
    env = base_env(API_KEYS=CLIENT_KEY, SERVER_ADDRESS=f"127.0.0.1:{free_port()}")
    env[variable] = value
    result = subprocess.run(
        [GUNICORN, "-c", "gunicorn.conf.py"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llm-edge-proxy: configuration error: " + variable)
