"""Budgets in the app (one process, the built-in mock: unpriced, so nothing is reserved, but
every request of a key with a budget is held and settled): a request is counted once when its
answer ends, including one whose response could not even start (Falcon then closes nothing)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import falcon.testing
import orjson
import pytest

from edge.app import EdgeApp, create_app
from edge.budgets import periods
from edge.config import Config

KEY = "sk-budget-app-1"
STREAM = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hello"}]}


def make_app(tmp_path: Path) -> EdgeApp:
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "team"\nkey = "{KEY}"\nbudget_usd = 5\n')
    return create_app(Config.from_env({"API_KEYS_FILE": str(keys)}))


def requests(app: EdgeApp) -> int:
    accounts = app.runtime.accounts
    accounts.write_batch()
    start = periods.start_of("month", time.time())
    row = accounts._ledger.get("team", "month", start)
    return 0 if row is None else row.requests


def scope(path: str) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
        "headers": [(b"authorization", f"Bearer {KEY}".encode()),
                    (b"content-type", b"application/json"), (b"host", b"x")],
    }  # fmt: skip


def test_every_request_of_a_budgeted_key_is_settled_once(tmp_path):
    app = make_app(tmp_path)
    client = falcon.testing.TestClient(app, headers={"authorization": f"Bearer {KEY}"})
    assert client.simulate_post("/v1/chat/completions", json=STREAM).status_code == 200
    assert client.simulate_post("/v1/chat/completions", json={**STREAM, "stream": False})
    assert requests(app) == 2


def test_a_response_that_cannot_start_is_still_settled(tmp_path):
    app = make_app(tmp_path)
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": orjson.dumps(STREAM), "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError

    async def send(event: dict[str, Any]) -> None:
        raise OSError("connection lost")

    async def main() -> None:
        with pytest.raises(OSError):
            await app(scope("/v1/chat/completions"), receive, send)

    asyncio.run(main())
    assert requests(app) == 1
