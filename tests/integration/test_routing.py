"""Providers, routing, failover and host-wide breakers end to end: real gunicorn, three real
upstream processes, the openai SDK. Fault injection goes through each upstream's /_control,
and what each provider received is read from its own request log (/_log)."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson
import pytest
from support import Gunicorn, Upstream, assert_envelope, sdk_client, wait_until

KEY = "sk-routing-test-key"
SECRET = "sk-provider-secret-never-shown"
CHAT = [{"role": "user", "content": "hi"}]


def providers_file(tmp_path: Path, ups: dict[str, Upstream], models: str, routing: str) -> str:
    lines = []
    for name, up in ups.items():
        lines += [f"[providers.{name}]", f'base_url = "{up.url}/v1"', f'api_key = "{SECRET}"']
    path = tmp_path / "providers.toml"
    path.write_text("\n".join(lines) + "\n" + models + "\n" + routing + "\n")
    return str(path)


@pytest.fixture(scope="module")
def upstreams():
    servers = {name: Upstream("--name", name, "--pace", "0.02") for name in ("a", "b", "c")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(autouse=True)
def _clear_faults(upstreams):
    for up in upstreams.values():
        if up.proc.poll() is None:
            up.control()
    yield


def start(tmp_path, upstreams, models, routing="", workers="2", **env) -> Gunicorn:
    path = providers_file(tmp_path, upstreams, models, routing)
    return Gunicorn(
        API_KEYS=KEY, PROVIDERS_FILE=path, RATE_LIMIT_ENABLED="false", WORKERS=workers, **env
    )


def chat(server: Gunicorn, model: str = "m", **extra) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": model, "messages": CHAT, **extra},
        headers={"authorization": f"Bearer {KEY}", **extra.pop("headers", {})},
        timeout=20,
    )


def count(up: Upstream, since: int = 0) -> int:
    return len(up.log()) - since


WEIGHTED = """
[[models]]
name = "m"
targets = [{ provider = "a", weight = 3 }, { provider = "b", weight = 1 }]
[[models]]
name = "renamed"
targets = [{ provider = "c", model = "upstream-name" }]
"""


def test_weighted_split_rename_model_list_and_health(tmp_path, upstreams):
    a, c = upstreams["a"], upstreams["c"]
    server = start(tmp_path, upstreams, WEIGHTED)
    try:
        before = {name: count(up) for name, up in upstreams.items()}
        served = Counter()
        with httpx.Client(timeout=20, headers={"authorization": f"Bearer {KEY}"}) as http:
            for _ in range(400):
                response = http.post(
                    server.url + "/v1/chat/completions", json={"model": "m", "messages": CHAT}
                )
                assert response.status_code == 200
                served[response.json()["upstream"]] += 1
        assert served["a"] + served["b"] == 400
        assert 0.65 <= served["a"] / 400 <= 0.85  # 3:1 within ±10 %
        assert count(a, before["a"]) == served["a"] and count(c, before["c"]) == 0

        body = b'{"messages": [{"role": "user", "content": "hi", "model": "keep"}], ' \
               b'"model": "renamed", "unknown_field": {"x": [1, 2.50]}}'  # fmt: skip
        headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json",
                   "x-request-id": "rename-1"}  # fmt: skip
        response = httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 200, response.text
        assert c.seen("rename-1")["body"] == body.decode().replace('"renamed"', '"upstream-name"')
        assert c.seen("rename-1")["headers"]["authorization"] == f"Bearer {SECRET}"

        missing = chat(server, model="not-listed")
        assert_envelope(missing, 404, "model_not_found")
        models = sdk_client(server.url, KEY).models.list()
        assert sorted(model.id for model in models.data) == ["m", "renamed"]
        assert sdk_client(server.url, KEY).models.retrieve("renamed").id == "renamed"

        health = httpx.get(server.url + "/health").json()
        assert health["providers"]["a"]["breaker"] == "closed"
        assert SECRET not in orjson.dumps(health).decode()
        metrics = httpx.get(server.url + "/metrics").text
        assert 'edge_provider_requests_total{outcome="2xx",provider="a"}' in metrics
        assert "edge_provider_breaker_state" in metrics
        assert SECRET not in metrics
    finally:
        server.stop()
    output = server.log_path.read_text()
    assert SECRET not in output
    lines = [orjson.loads(line) for line in output.splitlines() if '"request"' in line]
    access = [line for line in lines if line.get("path") == "/v1/chat/completions"]
    assert access and all(line["provider"] in ("a", "b", "c") for line in access[:400])
    assert all(line["attempts"] == 1 for line in access[:400])


FAILOVER = """
[[models]]
name = "m"
targets = [{ provider = "a" }, { provider = "b" }, { provider = "c" }]
"""


def test_5xx_and_429_fail_over_before_the_first_byte(tmp_path, upstreams):
    a, b = upstreams["a"], upstreams["b"]
    server = start(tmp_path, upstreams, FAILOVER, '[routing]\nstrategy = "priority"')
    try:
        a.control(status=500)
        for stream in (False, True):
            response = chat(server, stream=stream)
            assert response.status_code == 200, response.text
            if stream:
                assert response.text.rstrip().endswith("data: [DONE]")
        # 4xx other than 429 is the client's answer: not retried (a's fault cleared).
        a.control()
        b.control(status=400)
        before = count(b)
        response = chat(server, model="m")
        assert response.status_code == 200  # a answers again (its breaker still closed)
        # All targets failing: the client gets the last provider's own answer.
        for up in upstreams.values():
            up.control(status=503)
        response = chat(server)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "injected"
        assert count(b, before) >= 1
    finally:
        server.stop()


def test_a_provider_refusing_the_gateways_key_fails_over(tmp_path, upstreams):
    """A 401/403 from a provider is its key's fault, not the client's: before the first byte,
    the next provider answers, streamed or not."""
    a, b = upstreams["a"], upstreams["b"]
    server = start(tmp_path, upstreams, FAILOVER, '[routing]\nstrategy = "priority"')
    try:
        for status in (401, 403):
            a.control(status=status)
            before_a, before_b = count(a), count(b)
            for stream in (False, True):
                response = chat(server, stream=stream)
                assert response.status_code == 200, response.text
            assert count(a, before_a) >= 1 and count(b, before_b) == 2
    finally:
        a.control()
        server.stop()


def test_429_retry_after_moves_traffic_away_for_that_long(tmp_path, upstreams):
    a = upstreams["a"]
    server = start(tmp_path, upstreams, FAILOVER, '[routing]\nstrategy = "priority"')
    try:
        a.control(status=429, retry_after="7")
        before = count(a)
        # The cooldown starts when a's 429 arrives: after `sent`, and before `hit` by the
        # jittered backoff (up to BACKOFF_BASE_S) the gateway waits before asking b.
        sent = time.monotonic()
        assert chat(server).status_code == 200  # a says 429, b answers
        hit = time.monotonic()
        assert count(a, before) == 1
        a.control()  # healthy again at once; the gateway must still keep away for 7 s
        seen_at = None
        while time.monotonic() - hit < 12:
            assert chat(server).status_code == 200
            if count(a, before) > 1:
                seen_at = time.monotonic()
                break
            time.sleep(0.05)
        assert seen_at is not None, "traffic never returned to the provider"
        assert seen_at - sent >= 7, seen_at - sent
        assert seen_at - hit <= 8.5, seen_at - hit
    finally:
        server.stop()


def test_host_wide_breaker_with_four_workers(tmp_path, upstreams):
    a = upstreams["a"]
    routing = """[routing]
strategy = "priority"
[routing.circuit_breaker]
failure_threshold = 3
timeout_seconds = 60
"""
    server = start(tmp_path, upstreams, FAILOVER, routing, workers="4")
    try:
        a.control(status=500)
        before = count(a)
        failures = []

        def client() -> None:
            with httpx.Client(timeout=20) as http:  # new connections: spread over workers
                for _ in range(15):
                    response = http.post(
                        server.url + "/v1/chat/completions",
                        json={"model": "m", "messages": CHAT},
                        headers={"authorization": f"Bearer {KEY}", "connection": "close"},
                    )
                    if response.status_code != 200:
                        failures.append(response.status_code)

        threads = [threading.Thread(target=client) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        received = count(a, before)
        assert 3 <= received <= 3 + 2, received  # not 4 workers times 3
        health = httpx.get(server.url + "/health").json()
        assert health["providers"]["a"]["breaker"] == "open"
        assert httpx.get(server.url + "/health/ready").status_code == 200  # b and c serve
        metrics = httpx.get(server.url + "/metrics").text
        assert 'edge_provider_breaker_state{provider="a"} 1.0' in metrics
        assert 'edge_provider_failovers_total{provider="a"}' in metrics
    finally:
        server.stop()


def test_streams_broken_mid_way_open_the_providers_breaker(tmp_path, upstreams):
    """Failures after the first event can no longer fail over, but they are the provider's:
    they count for its breaker, and once it opens the next streams go elsewhere."""
    models = """
[[models]]
name = "cut-mid-event"
targets = [{ provider = "a" }, { provider = "b", model = "paced-2" }]
"""
    routing = """[routing]
strategy = "priority"
[routing.circuit_breaker]
failure_threshold = 2
timeout_seconds = 60
"""
    server = start(tmp_path, upstreams, models, routing)
    try:
        for _ in range(2):
            broken = chat(server, "cut-mid-event", stream=True)
            assert broken.status_code == 200  # the stream had started: no failover
            assert '"upstream_error"' in broken.text.splitlines()[-2]  # its closing error event
        health = httpx.get(server.url + "/health").json()
        assert health["providers"]["a"]["breaker"] == "open"
        before = count(upstreams["b"])
        served = chat(server, "cut-mid-event", stream=True)
        assert served.status_code == 200 and served.text.rstrip().endswith("data: [DONE]")
        assert count(upstreams["b"], before) == 1
    finally:
        server.stop()


def test_provider_killed_under_load_no_request_fails(tmp_path, upstreams):
    a = upstreams["a"]
    routing = """[routing]
strategy = "weighted"
[routing.circuit_breaker]
failure_threshold = 2
timeout_seconds = 2
success_threshold = 1
"""
    models = """
[[models]]
name = "m"
targets = [{ provider = "a", weight = 2 }, { provider = "b" }, { provider = "c" }]
"""
    server = start(tmp_path, upstreams, models, routing, workers="2")
    errors: list[tuple[float, bool, BaseException]] = []
    served = Counter()
    stop = threading.Event()
    killed_at = float("inf")

    def load(stream: bool) -> None:
        client = sdk_client(server.url, KEY)
        while not stop.is_set():
            started = time.monotonic()
            try:
                if stream:
                    chunks = client.chat.completions.create(model="m", messages=CHAT, stream=True)
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    assert text
                else:
                    result = client.chat.completions.create(model="m", messages=CHAT)
                    served[result.model_extra["upstream"]] += 1
            except BaseException as exc:
                errors.append((started, stream, exc))

    threads = [threading.Thread(target=load, args=(s,)) for s in (False, True, False, True)]
    replacement = None
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: served["a"] >= 5, timeout=20)
        a.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        a.proc.wait(5)
        wait_until(lambda: sum(served.values()) >= 40, timeout=30)
        served_a_while_dead = served["a"]
        replacement = Upstream("--name", "a", "--pace", "0.02", port=a.port)
        back = time.monotonic()
        wait_until(lambda: served["a"] > served_a_while_dead, timeout=2 + 5)
        assert time.monotonic() - back <= 2 + 5
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        server.stop()
        if replacement is not None:
            upstreams["a"] = replacement
        a.stop()
    # Every request sent after the kill, and every non-streamed one, succeeded. The only
    # permitted failure is a stream that was already relaying a's bytes when a died: it
    # cannot be failed over (bytes were sent) and ends with the SSE error event instead.
    unexpected = [
        exc
        for started, stream, exc in errors
        if started >= killed_at or not stream or "mid-stream" not in str(exc)
    ]
    assert unexpected == [], unexpected[:3]
    assert len(errors) <= 2  # at most the two streaming clients' streams in flight


def test_timeout_before_answer_or_first_event_fails_over(tmp_path, upstreams):
    a, b = upstreams["a"], upstreams["b"]
    path = tmp_path / "providers.toml"
    path.write_text(f"""
[providers.a]
base_url = "{a.url}/v1"
timeout_seconds = 1
[providers.b]
base_url = "{b.url}/v1"
[[models]]
name = "hangs"
targets = [{{ provider = "a", model = "hang" }}, {{ provider = "b" }}]
[[models]]
name = "stalls"
targets = [{{ provider = "a", model = "stall-first" }}, {{ provider = "b" }}]
[routing]
strategy = "priority"
""")
    server = Gunicorn(API_KEYS=KEY, PROVIDERS_FILE=str(path), SERVER_TIMEOUT_SECONDS="10")
    try:
        started = time.monotonic()
        response = chat(server, model="hangs")
        assert response.status_code == 200 and response.json()["upstream"] == "b"
        response = chat(server, model="stalls", stream=True)
        assert response.status_code == 200
        assert response.text.rstrip().endswith("data: [DONE]")
        assert time.monotonic() - started < 8  # two 1 s timeouts plus backoff, not 10 s each
    finally:
        server.stop()


def test_hup_refuses_a_bad_providers_file_and_applies_a_good_one(tmp_path, upstreams):
    path = providers_file(tmp_path, upstreams, WEIGHTED, "")
    server = Gunicorn(API_KEYS=KEY, PROVIDERS_FILE=path)
    headers = {"authorization": f"Bearer {KEY}"}

    def listed() -> list[str]:
        data = httpx.get(server.url + "/v1/models", headers=headers, timeout=5).json()["data"]
        return sorted(model["id"] for model in data)

    try:
        assert listed() == ["m", "renamed"]
        Path(path).write_text(Path(path).read_text().replace('provider = "c"', 'provider = "zz"'))
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in server.output(), timeout=20)
        assert listed() == ["m", "renamed"]
        assert chat(server).status_code == 200
        providers_file(tmp_path, upstreams, FAILOVER, "")
        server.signal(signal.SIGHUP)
        wait_until(lambda: listed() == ["m"], timeout=20)
        assert chat(server, model="renamed").status_code == 404
    finally:
        server.stop()
