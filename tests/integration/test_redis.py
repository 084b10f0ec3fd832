"""The Redis backend end to end: real gunicorn instances ("hosts", 2 workers each) sharing one
real redis-server (free loopback port, no persistence), on the built-in mock provider.

* Two hosts, one key, concurrent requests spread over both: exactly burst + refill (±1).
* Keys in Redis hold digests (never a client key) and all carry a TTL.
* Redis frozen (SIGSTOP): every request is answered within the timeout plus normal latency,
  by RATE_LIMIT_FAILURE_POLICY (allow and deny), counted by reason; /health/ready stays 200.
* Redis SIGKILLed and started again on the same port: limits hold again within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Gunicorn, RedisServer, wait_until

CHAT_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
KEYS = {
    "two-hosts": {"burst": 20, "rpm": 6},  # 0.1 token/s: the refill during a test is ~0-1
    "frozen": {"burst": 1000, "rpm": 60},
    "exhaust": {"burst": 1, "rpm": 0.01},
    "after-restart": {"burst": 1, "rpm": 0.01},
}


def key_of(name: str) -> str:
    return f"sk-redis-{name}-77aa"


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("redis") / "keys.toml"
    entries = []
    for name, limits in KEYS.items():
        lines = [f'name = "{name}"', f'key = "{key_of(name)}"']
        lines += [f"{field} = {value}" for field, value in limits.items()]
        entries.append("[[keys]]\n" + "\n".join(lines) + "\n")
    path.write_text("\n".join(entries))
    return path


def host(redis: RedisServer, keys_file: Path, **env: str) -> Gunicorn:
    env.setdefault("RATE_LIMIT_FAILURE_POLICY", "allow")
    return Gunicorn(
        RATE_LIMIT_BACKEND="redis",
        REDIS_URL=redis.url,
        API_KEYS_FILE=str(keys_file),
        WORKERS="2",
        **env,
    )


@contextlib.contextmanager
def hosts(redis: RedisServer, keys_file: Path, *envs: dict[str, str]) -> Iterator[list[Gunicorn]]:
    started: list[Gunicorn] = []
    try:
        for env in envs:
            started.append(host(redis, keys_file, **env))
        yield started
    finally:
        for server in started:
            server.stop()


async def _send(port: int, key: str) -> tuple[int, dict[str, str]] | None:
    """One chat request on a new connection (so any worker); (status, headers) or None."""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"x-api-key: {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(CHAT_BODY)}\r\n\r\n"
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    try:
        writer.write(head.encode() + CHAT_BODY)
        data = await reader.read()
    except OSError:
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    raw_head, sep, _ = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), headers


def post(server: Gunicorn, name: str) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/chat/completions",
        content=CHAT_BODY,
        headers={"x-api-key": key_of(name), "content-type": "application/json"},
        timeout=10,
    )


def counter(server: Gunicorn, sample: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


def test_two_hosts_share_one_bucket_and_keys_hold_only_digests(
    shared_redis: RedisServer, keys_file: Path
) -> None:
    # A generous timeout here: this test is about arithmetic, not about failures.
    env = {"RATE_LIMIT_REDIS_TIMEOUT_MS": "2000", "RATE_LIMIT_FAILURE_POLICY": "deny"}
    with hosts(shared_redis, keys_file, env, env) as (first, second):
        key = key_of("two-hosts")
        ports = [first.port, second.port] * 40

        async def run() -> list[tuple[int, dict[str, str]] | None]:
            return await asyncio.gather(*(_send(port, key) for port in ports))

        started = time.monotonic()
        replies = asyncio.run(asyncio.wait_for(run(), 60))
        elapsed = time.monotonic() - started
        assert all(r is not None for r in replies)
        statuses = [r[0] for r in replies if r is not None]
        assert set(statuses) <= {200, 429}, statuses
        # Every reply was decided by the bucket (the headers are there), none by the policy.
        assert all("x-ratelimit-limit-requests" in r[1] for r in replies if r is not None)
        admitted = statuses.count(200)
        refill = elapsed * 6 / 60
        assert 20 - 1 <= admitted <= 20 + refill + 1, (admitted, elapsed)
        # Each host admitted some: the bucket really was shared, not per host.
        by_port = {port: 0 for port in (first.port, second.port)}
        for port, reply in zip(ports, replies, strict=True):
            if reply is not None and reply[0] == 200:
                by_port[port] += 1
        assert sum(by_port.values()) == admitted

        raw = shared_redis.command("KEYS", "*")
        names = [line for line in raw.split("\r\n") if line and line[0] not in "*$"]
        assert names, raw
        for name in names:
            # The buckets, and each key's usage this period (edge.budgets.redis).
            assert name.startswith(("llm-edge-proxy:b:", "llm-edge-proxy:u:")), name
            assert key not in name and "sk-" not in name and "two-hosts" not in name
            ttl = shared_redis.command("PTTL", name)
            assert ttl.startswith(":") and int(ttl[1:]) > 0, (name, ttl)


@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_frozen_redis_answers_within_the_timeout_by_policy(keys_file: Path, policy: str) -> None:
    redis = RedisServer()
    timeout_s = 0.05
    try:
        env = {"RATE_LIMIT_FAILURE_POLICY": policy, "RATE_LIMIT_REDIS_TIMEOUT_MS": "50"}
        with hosts(redis, keys_file, env) as (server,):
            normal = []
            for _ in range(10):
                started = time.monotonic()
                assert post(server, "frozen").status_code == 200
                normal.append(time.monotonic() - started)
            # Without the timeout a request would wait on the stopped Redis until the client
            # gives up (seconds); the floor keeps a busy CI machine (4 test processes on 2
            # cores) from turning one slow answer into a failure.
            bound = timeout_s + max(2 * max(normal) + 0.1, 0.5)
            before = sum(
                counter(server, "edge_rate_limiter_failures_total", event=event, policy=policy)
                for event in ("redis_timeout", "redis_backoff")
            )
            redis.signal(signal.SIGSTOP)
            try:
                slow = []
                for _ in range(20):
                    started = time.monotonic()
                    response = post(server, "frozen")
                    took = time.monotonic() - started
                    if took > bound:
                        slow.append(took)
                    if policy == "allow":
                        assert response.status_code == 200, response.text
                    else:
                        assert response.status_code == 429, response.text
                        assert response.json()["error"]["code"] == "rate_limit_exceeded"
                        assert response.headers["retry-after"] == "1"
                    # The bucket was not consulted: no x-ratelimit-* figures are invented.
                    assert "x-ratelimit-remaining-requests" not in response.headers
                assert not slow, (slow, bound)
                ready = httpx.get(server.url + "/health/ready", timeout=5)
                assert ready.status_code == 200
                after = sum(
                    counter(server, "edge_rate_limiter_failures_total", event=event, policy=policy)
                    for event in ("redis_timeout", "redis_backoff")
                )
                assert after - before == 20
                assert (
                    counter(server, "edge_rate_limiter_failures_total", event="redis_timeout") >= 1
                )
            finally:
                redis.signal(signal.SIGCONT)
            # Recovery without a restart: decisions come from the bucket again.
            wait_until(
                lambda: "x-ratelimit-remaining-requests" in post(server, "frozen").headers,
                timeout=10,
            )
    finally:
        redis.signal(signal.SIGCONT)
        redis.stop()


def test_killed_redis_restarted_on_the_same_port_enforces_again(keys_file: Path) -> None:
    redis = RedisServer()
    try:
        with hosts(redis, keys_file, {"RATE_LIMIT_FAILURE_POLICY": "allow"}) as (server,):
            assert post(server, "exhaust").status_code == 200
            assert post(server, "exhaust").status_code == 429  # burst 1: enforced
            redis.kill()
            down = post(server, "frozen")  # a key not refused before (a worker remembers those)
            assert down.status_code == 200  # policy allow while Redis is away
            assert "x-ratelimit-remaining-requests" not in down.headers
            assert httpx.get(server.url + "/health/ready", timeout=5).status_code == 200
            redis.restart()  # same port, empty
            restarted = time.monotonic()

            def enforced() -> bool:
                # A key never refused before: its first refusal can only come from Redis.
                response = post(server, "after-restart")
                return (
                    response.status_code == 429
                    and "x-ratelimit-remaining-requests" in response.headers
                )

            wait_until(enforced, timeout=5, interval=0.05)
            assert time.monotonic() - restarted < 5
    finally:
        redis.stop()


@pytest.mark.parametrize("where", ["file", "url"])
def test_password_from_file_or_url_is_used_and_never_logged(
    keys_file: Path, tmp_path: Path, where: str
) -> None:
    secret = "pw-Secret-4821"
    redis = RedisServer(password=secret)
    try:
        env = {"LOG_LEVEL": "debug"}
        if where == "file":
            (tmp_path / "pw").write_text(secret + "\n")
            env["REDIS_PASSWORD_FILE"] = str(tmp_path / "pw")
            url = redis.url
        else:
            url = redis.url.replace("redis://", f"redis://:{secret}@")
        server = Gunicorn(
            RATE_LIMIT_BACKEND="redis",
            REDIS_URL=url,
            API_KEYS_FILE=str(keys_file),
            RATE_LIMIT_FAILURE_POLICY="deny",
            RATE_LIMIT_REDIS_TIMEOUT_MS="2000",
            **env,
        )
        try:
            response = post(server, "frozen")
            assert response.status_code == 200, response.text
            assert "x-ratelimit-remaining-requests" in response.headers  # Redis decided
            metrics = httpx.get(server.url + "/metrics", timeout=10).text
        finally:
            server.stop()
        output = server.log_path.read_text(errors="replace")
        assert f"127.0.0.1:{redis.port}" in output  # the location is logged...
        assert secret not in output and secret not in metrics  # ...the password never
    finally:
        redis.stop()
