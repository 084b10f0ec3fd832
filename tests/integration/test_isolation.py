"""One key, one model or one provider cannot make the gateway refuse everyone else: real gunicorn,
real upstream processes (tests/upstream_server.py), several providers in a PROVIDERS_FILE.

- One key's over-long generations time out at both providers (2 s), and they stay closed to
  another key's small requests.
- A provider killed under load, while the backup's breaker for another model opened moments
  ago, costs no client request.
- One provider's stalled streams fill its own connections only: another provider's requests
  are served, and the stalled provider's extra ones get 503 at once, never after a wait.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import Gunicorn, Upstream, wait_until

pytestmark = pytest.mark.slow

ATTACKER = "sk-isolation-attacker-0d2f"
OTHER = "sk-isolation-other-8b31"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Upstream]]:
    servers = {name: Upstream("--name", name, "--pace", "0.05") for name in ("a", "b")}
    yield servers
    for server in servers.values():
        server.stop()


def start(tmp_path: Path, ups: dict[str, Upstream], text: str, **env: str) -> Gunicorn:
    lines = []
    for name, up in ups.items():
        lines += [f"[providers.{name}]", f'base_url = "{up.url}/v1"', "timeout_seconds = 2"]
    path = tmp_path / "providers.toml"
    path.write_text("\n".join(lines) + "\n" + text)
    env.setdefault("RATE_LIMIT_ENABLED", "false")
    return Gunicorn(API_KEYS=f"{ATTACKER},{OTHER}", PROVIDERS_FILE=str(path), **env)


def post(server: Gunicorn, key: str, timeout: float = 30, **body: object) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": USER, **body},
        headers={"authorization": f"Bearer {key}", "connection": "close"},
        timeout=timeout,
    )


def test_one_keys_long_generations_do_not_close_the_providers_to_others(tmp_path, upstreams):
    """ "bill-slow" takes 10 ms a token: with no cap it generates 400 (4 s, past each
    provider's 2 s timeout); with max_tokens 5, 50 ms. Five of the first at once time out at
    both providers, and are no verdict on either: the other key's small requests are all
    answered."""
    models = """
[[models]]
name = "m"
targets = [{ provider = "a", model = "bill-slow" }, { provider = "b", model = "bill-slow" }]
[routing]
strategy = "priority"
[routing.circuit_breaker]
failure_threshold = 3
timeout_seconds = 60
"""
    server = start(tmp_path, upstreams, models)
    try:

        async def long_ones() -> list[int]:
            async with httpx.AsyncClient(timeout=30) as http:
                responses = await asyncio.gather(
                    *(
                        http.post(
                            server.url + "/v1/chat/completions",
                            json={"model": "m", "messages": USER},
                            headers={"authorization": f"Bearer {ATTACKER}"},
                        )
                        for _ in range(5)
                    )
                )
            return [response.status_code for response in responses]

        assert asyncio.run(long_ones()) == [504] * 5
        health = httpx.get(server.url + "/health").json()["providers"]
        assert health["a"]["breaker"] == health["b"]["breaker"] == "closed", health
        answered = [post(server, OTHER, model="m", max_tokens=5).status_code for _ in range(10)]
        assert answered == [200] * 10
    finally:
        server.stop()


def test_a_provider_killed_while_the_backups_other_model_is_open_costs_no_request(
    tmp_path, upstreams
):
    """b's breaker for model "z" (its error-500 model) opened moments ago; then a, the
    primary of "x", dies under load: every "x" request is answered by b."""
    a = upstreams["a"]
    models = """
[[models]]
name = "x"
targets = [{ provider = "a" }, { provider = "b" }]
[[models]]
name = "z"
targets = [{ provider = "b", model = "error-500" }]
[routing]
strategy = "priority"
[routing.circuit_breaker]
failure_threshold = 2
timeout_seconds = 60
"""
    server = start(tmp_path, upstreams, models)
    errors: list[int] = []
    served: Counter[str] = Counter()
    stop = threading.Event()
    replacement = None

    def load() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                response = http.post(
                    server.url + "/v1/chat/completions",
                    json={"model": "x", "messages": USER},
                    headers={"authorization": f"Bearer {OTHER}"},
                )
                if response.status_code == 200:
                    served[response.json()["upstream"]] += 1
                else:
                    errors.append(response.status_code)

    threads = [threading.Thread(target=load) for _ in range(3)]
    try:
        for _ in range(2):
            assert post(server, ATTACKER, model="z").status_code == 500
        health = httpx.get(server.url + "/health").json()["providers"]["b"]
        assert health["targets"] == {"error-500": "open"} and health["breaker"] == "closed"
        for thread in threads:
            thread.start()
        wait_until(lambda: served["a"] >= 5, timeout=20)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(5)
        wait_until(lambda: served["b"] >= 20, timeout=30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        server.stop()
        if a.proc.poll() is not None:
            replacement = Upstream("--name", "a", "--pace", "0.05", port=a.port)
            upstreams["a"] = replacement
            a.stop()
    assert errors == []


def test_one_providers_stalled_streams_do_not_starve_another(tmp_path, upstreams):
    """Four connections per provider and worker: four streams that stall fill a's; a fifth
    stream for a is refused at once (503, Retry-After), while b serves its model throughout,
    and a's breaker is no worse for it (a full pool is no provider's failure)."""
    models = """
[[models]]
name = "stuck"
targets = [{ provider = "a", model = "stall-mid-stream" }]
[[models]]
name = "fine"
targets = [{ provider = "b" }]
"""
    server = start(tmp_path, upstreams, models, WORKERS="1", UPSTREAM_POOL_SIZE="4")
    held: list[httpx.Response] = []
    clients: list[httpx.Client] = []
    try:
        for _ in range(4):
            client = httpx.Client(timeout=30)
            clients.append(client)
            request = client.build_request(
                "POST",
                server.url + "/v1/chat/completions",
                json={"model": "stuck", "messages": USER, "stream": True},
                headers={"authorization": f"Bearer {ATTACKER}"},
            )
            response = client.send(request, stream=True)
            assert response.status_code == 200
            held.append(response)
        started = time.monotonic()
        refused = post(server, ATTACKER, model="stuck", stream=True)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "gateway_busy"
        assert time.monotonic() - started < 2.0  # not after UPSTREAM_CONNECT_TIMEOUT_SECONDS
        for _ in range(5):
            assert post(server, OTHER, model="fine").status_code == 200
        health = httpx.get(server.url + "/health").json()["providers"]["a"]
        assert health["breaker"] == "closed" and health["targets"] == {}
        metrics = httpx.get(server.url + "/metrics").text
        assert 'edge_upstream_errors_total{kind="busy"} 1.0' in metrics
    finally:
        for response in held:
            response.close()
        for client in clients:
            client.close()
        server.stop()
