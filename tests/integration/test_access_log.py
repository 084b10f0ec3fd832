"""The buffered access log under real gunicorn: no line lost on a graceful stop or a HUP reload.

Access lines wait in a per-worker buffer (edge.observability.logs). These tests set the flush
interval far longer than the test (ACCESS_LOG_FLUSH_MS=60000), so the timer never writes a
line: what reaches the log was written by the flush at shutdown, and a line it missed is caught.
"""

from __future__ import annotations

import json
import signal
import uuid

import httpx
from support import Gunicorn, wait_until

BODY = {"model": "gpt-flush", "messages": [{"role": "user", "content": "hi"}]}
REQUESTS = 120
SERVER = {
    "AUTH_ENABLED": "false",
    "WORKERS": "2",
    "RATE_LIMIT_ENABLED": "false",
    "ACCESS_LOG_FLUSH_MS": "60000",
}


def access_ids(server: Gunicorn, prefix: str) -> list[str]:
    ids = []
    for raw in server.log_path.read_text().splitlines():
        record = json.loads(raw)  # every line is whole JSON: batches never split a line
        if record.get("logger") == "edge.access" and record["request_id"].startswith(prefix):
            assert record["status"] == 200 and record["path"] == "/v1/chat/completions"
            ids.append(record["request_id"])
    return ids


def fire(server: Gunicorn, prefix: str, count: int) -> set[str]:
    sent = set()
    # Several connections, so that both workers have lines in their buffers.
    clients = [httpx.Client(base_url=server.url, timeout=10) for _ in range(4)]
    try:
        for i in range(count):
            request_id = f"{prefix}{i}"
            reply = clients[i % 4].post(
                "/v1/chat/completions", json=BODY, headers={"x-request-id": request_id}
            )
            assert reply.status_code == 200
            sent.add(request_id)
    finally:
        for client in clients:
            client.close()
    return sent


def test_sigterm_loses_no_buffered_access_line():
    server = Gunicorn(**SERVER)
    prefix = f"flush-term-{uuid.uuid4().hex[:8]}-"
    try:
        sent = fire(server, prefix, REQUESTS)
        assert access_ids(server, prefix) == []  # all still buffered
        server.signal(signal.SIGTERM)
        server.proc.wait(20)
        assert server.proc.returncode == 0
    finally:
        server.stop()
    logged = access_ids(server, prefix)
    assert sorted(logged) == sorted(sent)  # every line, once


def test_hup_reload_loses_no_buffered_access_line():
    server = Gunicorn(**SERVER)
    prefix = f"flush-hup-{uuid.uuid4().hex[:8]}-"
    try:
        old = set(server.worker_pids())
        assert len(old) == 2
        sent = fire(server, prefix, REQUESTS)
        assert access_ids(server, prefix) == []  # all still buffered
        server.signal(signal.SIGHUP)
        # The old workers are gone (and wrote their buffers at shutdown); new ones serve.
        wait_until(lambda: not old & set(server.worker_pids()), timeout=30)
        logged = access_ids(server, prefix)
        assert sorted(logged) == sorted(sent)
    finally:
        server.stop()


def test_log_level_warning_writes_no_access_line():
    server = Gunicorn(AUTH_ENABLED="false", LOG_LEVEL="warning", RATE_LIMIT_ENABLED="false")
    prefix = f"flush-quiet-{uuid.uuid4().hex[:8]}-"
    try:
        fire(server, prefix, 8)
    finally:
        server.stop()
    assert access_ids(server, prefix) == []
    assert prefix not in server.log_path.read_text()
