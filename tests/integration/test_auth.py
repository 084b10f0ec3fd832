"""API-key authentication against real gunicorn (2 workers)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess

import httpx
import openai
import pytest
from support import (
    GUNICORN,
    ROOT,
    Gunicorn,
    Upstream,
    base_env,
    free_port,
    raw_exchange,
    wait_until,
)

PLAIN = "sk-canary-plain-7f3a9c"
HASHED = "sk-canary-hashed-51be02"
FILE_KEY = "sk-canary-file-c0ffee"
FILE_HASHED = "sk-canary-filehash-d00d"
NEW_KEY = "sk-canary-added-on-hup-99"
WRONG = "sk-canary-wrong-bad1bad"
UPSTREAM_KEY = "sk-canary-upstream-0a0a"
CANARIES = (PLAIN, HASHED, FILE_KEY, FILE_HASHED, NEW_KEY, WRONG, UPSTREAM_KEY)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_file_text(*extra: str) -> str:
    return "\n".join(
        [
            '[[keys]]\nname = "team-a"\nkey = "' + FILE_KEY + '"\nrpm = 600\nburst = 50\n',
            '[[keys]]\nname = "ci-bot"\nsha256 = "' + sha(FILE_HASHED) + '"\n',
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def upstream():
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keys_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(keys_file_text())
    return path


@pytest.fixture(scope="module")
def proxy(upstream, keys_path):
    server = Gunicorn(
        API_KEYS=PLAIN,
        API_KEY_HASHES=sha(HASHED),
        API_KEYS_FILE=str(keys_path),
        UPSTREAM_URL=upstream.url + "/v1",
        UPSTREAM_API_KEY=UPSTREAM_KEY,
    )
    yield server
    server.stop()


def chat(server: Gunicorn, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=10)


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    for canary in CANARIES:
        assert canary not in response.text


@pytest.mark.parametrize("key", [PLAIN, HASHED, FILE_KEY, FILE_HASHED])
@pytest.mark.parametrize("style", ["bearer", "x-api-key"])
def test_every_key_source_and_both_headers(proxy, key, style):
    headers = {"authorization": f"Bearer {key}"} if style == "bearer" else {"x-api-key": key}
    assert chat(proxy, headers).status_code == 200


def test_stored_digest_is_rejected(proxy):
    assert_401(chat(proxy, {"authorization": f"Bearer {sha(HASHED)}"}))
    assert_401(chat(proxy, {"x-api-key": sha(FILE_HASHED)}))
    assert_401(chat(proxy, {"x-api-key": sha(PLAIN)}))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": f"Bearer {WRONG}"},
        {"x-api-key": WRONG},
        {"authorization": "Bearer"},
        {"x-api-key": ""},
        {"authorization": f"Basic {PLAIN}"},
        {"authorization": "Bearer " + "k" * 8192},
        {"x-api-key": "z" * 8192},
        {"x-api-key": PLAIN + " extra"},
    ],
    ids=["missing", "wrong-bearer", "wrong-x-api-key", "bare-bearer",
         "empty-x-api-key", "basic-scheme", "8k-bearer", "8k-x-api-key", "suffix"],
)  # fmt: skip
def test_bad_keys_are_refused_cleanly(proxy, headers):
    assert_401(chat(proxy, headers))


def test_empty_bearer_on_the_wire_is_refused_cleanly(proxy):
    body = json.dumps(CHAT).encode()
    reply = raw_exchange(
        proxy.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
    )
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]
    assert b'"invalid_api_key"' in reply


def test_non_ascii_key_is_refused_cleanly(proxy):
    response = chat(proxy, {"x-api-key": "sk-ключ-🔑".encode()})  # raw UTF-8 bytes on the wire
    assert_401(response)


def test_sdk_raises_authentication_error_and_works_with_a_good_key(proxy):
    bad = openai.OpenAI(base_url=proxy.url + "/v1", api_key=WRONG, max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(**CHAT)
    assert caught.value.code == "invalid_api_key"
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key=FILE_KEY, max_retries=0) as good:
        assert good.chat.completions.create(**CHAT).choices[0].message.content


def test_health_and_metrics_public_by_default(proxy):
    for path in ("/health", "/health/live", "/health/ready", "/metrics"):
        assert httpx.get(proxy.url + path).status_code == 200


def test_access_log_names_the_identity_never_the_key(proxy):
    chat(proxy, {"x-api-key": FILE_KEY, "x-request-id": "auth-identity-1"})
    chat(proxy, {"x-api-key": PLAIN, "x-request-id": "auth-identity-2"})

    def access_lines():
        lines = [json.loads(line) for line in proxy.output().splitlines() if line.startswith("{")]
        found = {
            line.get("request_id"): line for line in lines if line.get("logger") == "edge.access"
        }
        return found if {"auth-identity-1", "auth-identity-2"} <= found.keys() else None

    lines = wait_until(access_lines)
    assert lines["auth-identity-1"]["identity"] == "team-a"
    assert lines["auth-identity-2"]["identity"].startswith("key-")


def test_protected_health_and_metrics():
    server = Gunicorn(API_KEYS=PLAIN, AUTH_HEALTH_CHECK="true", AUTH_METRICS="true", WORKERS="2",
                      wait=False)  # fmt: skip
    try:
        wait_until(
            lambda: (
                httpx.get(server.url + "/health/ready", headers={"x-api-key": PLAIN}).status_code
                == 200
            )
        )
        for path in ("/health", "/health/live", "/health/ready", "/metrics"):
            assert_401(httpx.get(server.url + path))
            assert httpx.get(server.url + path, headers={"x-api-key": PLAIN}).status_code == 200
    finally:
        server.stop()


def test_refuses_to_start_with_auth_on_and_no_keys():
    env = base_env(SERVER_ADDRESS=f"127.0.0.1:{free_port()}")
    result = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode != 0
    assert "AUTH_ENABLED" in result.stderr
    assert "API_KEYS" in result.stderr and "AUTH_ENABLED=false" in result.stderr


def test_auth_disabled_runs_open_with_a_warning():
    server = Gunicorn(AUTH_ENABLED="false")
    try:
        assert chat(server, {}).status_code == 200
        assert "AUTH_ENABLED=false" in server.output()
    finally:
        server.stop()


def test_bad_keys_file_stops_the_start(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "x"\nkey = "' + PLAIN + '"\nsha256 = "00"\n')
    env = base_env(SERVER_ADDRESS=f"127.0.0.1:{free_port()}", API_KEYS_FILE=str(path))
    result = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode != 0
    assert "API_KEYS_FILE" in result.stderr
    assert PLAIN not in result.stderr


def test_keys_file_is_reread_on_hup(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(keys_file_text())
    server = Gunicorn(API_KEYS_FILE=str(path))
    try:
        assert_401(chat(server, {"x-api-key": NEW_KEY}))
        path.write_text(keys_file_text('[[keys]]\nname = "late"\nkey = "' + NEW_KEY + '"\n'))
        server.signal(signal.SIGHUP)
        # Old workers drain while new ones start; poll until every answer uses the new file.
        wait_until(lambda: all(chat(server, {"x-api-key": NEW_KEY}).status_code == 200
                               for _ in range(6)), timeout=30)  # fmt: skip
        # A broken file on HUP is refused and the running keys stay in force.
        path.write_text("this is [not toml")
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in server.output(), timeout=30)
        assert chat(server, {"x-api-key": NEW_KEY}).status_code == 200
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_canary_keys_never_appear_in_logs_metrics_or_bodies(proxy, upstream):
    """Use every canary (valid and not) every way we can, then scan everything captured."""
    bodies = []
    for key in CANARIES:
        for headers in ({"x-api-key": key}, {"authorization": f"Bearer {key}"}):
            bodies.append(chat(proxy, headers).text)
            bodies.append(httpx.get(proxy.url + "/v1/nope", headers=headers).text)
            bodies.append(httpx.post(proxy.url + "/v1/completions", json={"model": "m"},
                                     headers=headers).text)  # fmt: skip
            bodies.append(httpx.post(proxy.url + "/v1/chat/completions", json={"model": "error-500",
                          "messages": CHAT["messages"]}, headers=headers).text)  # fmt: skip
    metrics = httpx.get(proxy.url + "/metrics").text
    captured = "\n".join([*bodies, metrics, proxy.output()])
    assert "edge_requests_total" in metrics
    assert len(proxy.output().splitlines()) > 20
    for canary in CANARIES:
        assert canary not in captured, canary
        assert sha(canary) not in captured, canary
