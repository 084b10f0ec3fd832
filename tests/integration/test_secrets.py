"""Secrets from files and systemd credentials, end to end: the upstream gets the key, the
clients' keys work, and neither ever shows in logs, metrics or the processes' environment."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import httpx
import pytest
from support import Gunicorn, Upstream, wait_until

UPSTREAM_CANARY = "sk-upstream-canary-4be1d07a93"
CLIENT_CANARY = "sk-client-canary-c0ffee5eed"
KEYS_TOML = f'[[keys]]\nname = "team"\nkey = "{CLIENT_CANARY}"\n'
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def upstream():
    server = Upstream()
    yield server
    server.stop()


def seen_authorization(upstream: Upstream, request_id: str) -> str:
    headers = {k.lower(): v for k, v in upstream.seen(request_id)["headers"].items()}
    return headers["authorization"]


def chat(server: Gunicorn, request_id: str) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/chat/completions", json=CHAT, timeout=10,
        headers={"authorization": f"Bearer {CLIENT_CANARY}", "x-request-id": request_id},
    )  # fmt: skip


def log_after_stop(server: Gunicorn) -> str:
    text = server.log_path.read_text(errors="replace")
    assert "Booting worker" in text  # debug/info output was captured
    return text


def environ_of(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def test_systemd_credentials_supply_both_keys_and_nothing_leaks(upstream, tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "upstream-api-key").write_text(UPSTREAM_CANARY + "\n")
    (credentials / "api-keys.toml").write_text(KEYS_TOML)
    server = Gunicorn(
        CREDENTIALS_DIRECTORY=str(credentials), UPSTREAM_URL=upstream.url + "/v1",
        LOG_LEVEL="debug", WORKERS="1",
    )  # fmt: skip
    try:
        rid = f"cred-{uuid.uuid4().hex[:8]}"
        response = chat(server, rid)
        assert response.status_code == 200, response.text
        assert seen_authorization(upstream, rid) == f"Bearer {UPSTREAM_CANARY}"
        wrong = httpx.post(
            server.url + "/v1/chat/completions", json=CHAT, timeout=10,
            headers={"authorization": f"Bearer {UPSTREAM_CANARY}"},
        )  # fmt: skip
        assert wrong.status_code == 401
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        for pid in [server.pid, *server.worker_pids()]:
            environ = environ_of(pid)
            assert UPSTREAM_CANARY.encode() not in environ
            assert CLIENT_CANARY.encode() not in environ
    finally:
        assert server.stop() == 0
    for text in (log_after_stop(server), metrics, response.text, wrong.text):
        assert UPSTREAM_CANARY not in text
        assert CLIENT_CANARY not in text


def test_upstream_key_file_is_used_and_rereads_on_reload(upstream, tmp_path):
    key_file = tmp_path / "upstream.key"
    key_file.write_text(UPSTREAM_CANARY + "\n")
    server = Gunicorn(
        UPSTREAM_API_KEY_FILE=str(key_file), API_KEYS=CLIENT_CANARY,
        UPSTREAM_URL=upstream.url + "/v1", WORKERS="1", LOG_LEVEL="debug",
    )  # fmt: skip
    try:
        rid = f"file-{uuid.uuid4().hex[:8]}"
        assert chat(server, rid).status_code == 200
        assert seen_authorization(upstream, rid) == f"Bearer {UPSTREAM_CANARY}"
        assert UPSTREAM_CANARY.encode() not in environ_of(server.worker_pids()[0])

        rotated = UPSTREAM_CANARY + "-rotated"
        key_file.write_text(rotated + "\n")
        (old,) = server.worker_pids()
        server.signal(signal.SIGHUP)
        wait_until(
            lambda: server.worker_pids() not in ([], [old]) and len(server.worker_pids()) == 1
        )
        server.wait_ready()
        rid = f"file-{uuid.uuid4().hex[:8]}"
        assert chat(server, rid).status_code == 200
        assert seen_authorization(upstream, rid) == f"Bearer {rotated}"
    finally:
        assert server.stop() == 0
    assert UPSTREAM_CANARY not in log_after_stop(server)


def test_a_key_in_the_environment_stays_visible_in_proc_environ(upstream):
    """What the README says stays visible: a key given as an environment variable is in the
    initial environment of the master and, inherited, of every worker."""
    server = Gunicorn(
        UPSTREAM_API_KEY=UPSTREAM_CANARY, API_KEYS=CLIENT_CANARY,
        UPSTREAM_URL=upstream.url + "/v1", WORKERS="1",
    )  # fmt: skip
    try:
        for pid in [server.pid, *server.worker_pids()]:
            assert UPSTREAM_CANARY.encode() in environ_of(pid)
            assert CLIENT_CANARY.encode() in environ_of(pid)
    finally:
        assert server.stop() == 0
    assert UPSTREAM_CANARY not in log_after_stop(server)
