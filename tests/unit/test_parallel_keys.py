"""`max_parallel` in configuration and in the app (one process: the process-local table, the
same arithmetic as the host-wide one): the keys-file field and KEY_MAX_PARALLEL are parsed
strictly; a request holds its key's place from admission until its answer ends (a whole answer,
an error, a stream's last byte, a client hanging up, a response that could not even start), and
a request that took none gives none back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import falcon.testing
import orjson
import pytest

from edge.app import EdgeApp, create_app
from edge.auth import KeyStore
from edge.config import Config, ConfigError
from edge.ratelimit.parallel import NO_LOCK, NO_SLOT

KEY, OTHER = "sk-parallel-unit-1", "sk-parallel-unit-2"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
STREAM = {**CHAT, "stream": True}


# --- configuration ---------------------------------------------------------------------


def keys_file(tmp_path: Path, body: str) -> dict[str, str]:
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nname = "team"\nkey = "{KEY}"\n{body}\n')
    return {"API_KEYS_FILE": str(path)}


def entry(store: KeyStore, key: str = KEY) -> Any:
    found = store.lookup(key)
    assert found is not None
    return found


def test_max_parallel_in_the_keys_file(tmp_path):
    assert (
        entry(KeyStore.load(Config.from_env(keys_file(tmp_path, "max_parallel = 8")))).max_parallel
        == 8
    )
    assert entry(KeyStore.load(Config.from_env(keys_file(tmp_path, "")))).max_parallel is None


@pytest.mark.parametrize("value", ["0", "-1", '"8"', "1.5", "8.0", "true", "1000001", "[8]", "inf"])
def test_a_bad_max_parallel_is_refused_naming_the_key_and_field(tmp_path, value):
    with pytest.raises(ConfigError) as refused:
        KeyStore.load(Config.from_env(keys_file(tmp_path, f"max_parallel = {value}")))
    text = str(refused.value)
    assert "API_KEYS_FILE" in text and "'team'" in text and "max_parallel" in text
    assert KEY not in text


def test_key_max_parallel_default_and_bounds():
    assert Config.from_env({}).key_max_parallel == 0
    assert Config.from_env({"KEY_MAX_PARALLEL": "8"}).key_max_parallel == 8
    for bad in ("-1", "x", "1.5", "1000001"):
        with pytest.raises(ConfigError) as refused:
            Config.from_env({"KEY_MAX_PARALLEL": bad})
        assert refused.value.variable == "KEY_MAX_PARALLEL"


# --- the app -----------------------------------------------------------------------------


def make_app(tmp_path: Path | None = None, keys: str = "", **env: str) -> EdgeApp:
    if tmp_path is not None:
        path = tmp_path / "keys.toml"
        path.write_text(keys)
        env["API_KEYS_FILE"] = str(path)
    else:
        env.setdefault("API_KEYS", f"{KEY},{OTHER}")
    return create_app(Config.from_env(env))


def auth(key: str = KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def in_flight(app: EdgeApp, identity_of: str = KEY) -> int:
    parallel = app.runtime.parallel
    found = app.runtime.keys.lookup(identity_of)
    assert found is not None
    return parallel.in_flight(parallel.digest(found.identity))


def hold(app: EdgeApp, key: str = KEY, cap: int = 1000) -> bytes:
    """Take one of the key's places by hand, as a request in flight elsewhere would."""
    parallel = app.runtime.parallel
    found = app.runtime.keys.lookup(key)
    assert found is not None
    digest = parallel.digest(found.identity)
    assert parallel.take(digest, cap) == -1
    return digest


def metric(app: EdgeApp, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = app.runtime.metrics.render()[0].decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def test_a_key_at_its_cap_gets_429_and_others_do_not(tmp_path):
    app = make_app(
        tmp_path,
        f'[[keys]]\nname = "team"\nkey = "{KEY}"\nmax_parallel = 2\n'
        f'[[keys]]\nname = "other"\nkey = "{OTHER}"\n',
    )
    client = falcon.testing.TestClient(app)
    for _ in range(5):  # one after another: each gives its place back
        assert (
            client.simulate_post("/v1/chat/completions", json=CHAT, headers=auth()).status_code
            == 200
        )
    assert in_flight(app) == 0
    held = [hold(app), hold(app)]
    refused = client.simulate_post("/v1/chat/completions", json=CHAT, headers=auth())
    assert refused.status_code == 429
    error = refused.json["error"]
    assert error["code"] == "too_many_parallel_requests" and error["type"] == "rate_limit_error"
    assert "2 requests in flight" in error["message"] and "max_parallel" in error["message"]
    assert (refused.headers["retry-after"], refused.headers["retry-after-ms"]) == ("1", "1000")
    assert in_flight(app) == 2  # the refusal gave back nothing it did not take
    # Another key (no cap) is not affected; Anthropic's route answers in its own shape.
    assert (
        client.simulate_post("/v1/chat/completions", json=CHAT, headers=auth(OTHER)).status_code
        == 200
    )
    messages = client.simulate_post(
        "/v1/messages",
        json={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        headers=auth(),
    )
    assert messages.status_code == 429 and messages.json["error"]["type"] == "rate_limit_error"
    assert metric(app, "edge_parallel_limited_total") == 2
    assert metric(app, "edge_rate_limited_total") == 0
    app.runtime.parallel.release(held.pop())
    assert (
        client.simulate_post("/v1/chat/completions", json=CHAT, headers=auth()).status_code == 200
    )
    assert in_flight(app) == 1


def test_key_max_parallel_caps_keys_that_set_none(tmp_path):
    app = make_app(KEY_MAX_PARALLEL="1")  # API_KEYS keys
    client = falcon.testing.TestClient(app)
    hold(app)
    assert (
        client.simulate_post("/v1/chat/completions", json=CHAT, headers=auth()).status_code == 429
    )
    assert (
        client.simulate_post("/v1/chat/completions", json=CHAT, headers=auth(OTHER)).status_code
        == 200
    )
    # A key's own max_parallel wins over the default.
    own = make_app(
        tmp_path,
        f'[[keys]]\nname = "team"\nkey = "{KEY}"\nmax_parallel = 2\n',
        KEY_MAX_PARALLEL="1",
    )
    hold(own)
    assert (
        falcon.testing.TestClient(own)
        .simulate_post("/v1/chat/completions", json=CHAT, headers=auth())
        .status_code
        == 200
    )


def test_no_cap_takes_nothing():
    app = make_app()
    client = falcon.testing.TestClient(app)
    hold(app, cap=1)  # whatever is in flight, a key without a cap is not counted or refused
    assert (
        client.simulate_post("/v1/chat/completions", json=CHAT, headers=auth()).status_code == 200
    )
    assert in_flight(app) == 1


def test_errors_give_the_place_back_and_refusals_before_it_take_none():
    app = make_app(KEY_MAX_PARALLEL="2", RATE_LIMIT_BURST="3", RATE_LIMIT_RPM="0.001")
    client = falcon.testing.TestClient(app)
    hold(app)
    bad = client.simulate_post("/v1/chat/completions", json={"model": "m"}, headers=auth())
    assert bad.status_code == 400  # the handler's error: the place is given back
    assert in_flight(app) == 1
    assert (
        client.simulate_post("/v1/chat/completions", json=CHAT, headers=auth()).status_code == 200
    )
    assert client.simulate_get("/v1/models", headers=auth()).status_code == 200
    limited = client.simulate_post("/v1/chat/completions", json=CHAT, headers=auth())
    assert limited.json["error"]["code"] == "rate_limit_exceeded"  # no place taken ...
    assert in_flight(app) == 1  # ... so none given back: the one held by hand stays
    assert client.simulate_get("/health").status_code == 200  # never counted
    assert client.simulate_post("/v1/nothing", headers=auth()).status_code == 404
    assert in_flight(app) == 1


class Refusing:
    """A table that cannot count (lock timeout, or no slot)."""

    def __init__(self, verdict: int) -> None:
        self.verdict = verdict
        self.released = 0

    def digest(self, identity: str) -> bytes:
        return b"d" * 16

    def take(self, digest: bytes, cap: int) -> int:
        return self.verdict

    def release(self, digest: bytes) -> None:
        self.released += 1

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("verdict", "event"), [(NO_LOCK, "parallel_lock_timeout"), (NO_SLOT, "parallel_table_full")]
)
@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_a_table_that_cannot_count_follows_the_failure_policy(monkeypatch, verdict, event, policy):
    app = make_app(KEY_MAX_PARALLEL="1", RATE_LIMIT_FAILURE_POLICY=policy)
    table = Refusing(verdict)
    monkeypatch.setattr(app.runtime, "parallel", table)
    # The middleware read the table at build time: swap it there as well.
    middleware = app.release_slot.__self__  # type: ignore[attr-defined]
    monkeypatch.setattr(middleware, "_parallel", table)
    result = falcon.testing.TestClient(app).simulate_post(
        "/v1/chat/completions", json=CHAT, headers=auth()
    )
    if policy == "allow":
        assert result.status_code == 200
    else:
        assert result.status_code == 429
        assert result.json["error"]["code"] == "too_many_parallel_requests"
        assert result.headers["retry-after"] == "1"
    assert table.released == 0  # nothing was held: nothing given back
    from prometheus_client.parser import text_string_to_metric_families

    text = app.runtime.metrics.render()[0].decode()
    failures = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "edge_rate_limiter_failures_total"
    ]
    assert [(s.labels, s.value) for s in failures] == [({"event": event, "policy": policy}, 1.0)]


# --- streams, straight through ASGI ---------------------------------------------------------


def scope(path: str, key: str = KEY) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {key}".encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


def receiver(body: bytes, hang_up: asyncio.Event | None = None) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if hang_up is None:
            await asyncio.Event().wait()  # the client stays until the answer ends
        else:
            await hang_up.wait()
        return {"type": "http.disconnect"}

    return receive


def test_a_stream_holds_its_place_until_its_last_byte():
    app = make_app(KEY_MAX_PARALLEL="1")
    events: list[dict[str, Any]] = []
    first_body, go_on = asyncio.Event(), asyncio.Event()

    async def send(event: dict[str, Any]) -> None:
        events.append(event)
        if event["type"] == "http.response.body" and not first_body.is_set():
            first_body.set()
            await go_on.wait()  # the client reads slowly: the stream is mid-way

    async def main() -> None:
        task = asyncio.ensure_future(
            app(scope("/v1/chat/completions"), receiver(orjson.dumps(STREAM)), send)
        )
        await asyncio.wait_for(first_body.wait(), 10)
        assert events[0]["status"] == 200
        assert in_flight(app) == 1  # mid-stream
        refused = falcon.testing.ASGIConductor(app)
        async with refused as conductor:
            result = await conductor.simulate_post(
                "/v1/chat/completions", json=CHAT, headers=auth()
            )
        assert result.status_code == 429
        go_on.set()
        await asyncio.wait_for(task, 10)
        assert events[-1].get("more_body", False) is False
        assert b"[DONE]" in b"".join(e.get("body", b"") for e in events)
        assert in_flight(app) == 0

    asyncio.run(main())


def test_a_response_that_cannot_start_still_gives_its_place_back():
    """The response start fails (the connection is gone): Falcon never iterates or closes the
    stream, so the middleware never sees its end; the app gives the place back."""
    app = make_app(KEY_MAX_PARALLEL="1")

    async def send(event: dict[str, Any]) -> None:
        raise OSError("connection lost")

    async def main() -> None:
        with pytest.raises(OSError):
            await app(scope("/v1/chat/completions"), receiver(orjson.dumps(STREAM)), send)

    asyncio.run(main())
    assert in_flight(app) == 0


def test_a_client_hanging_up_mid_stream_gives_its_place_back(tmp_path):
    app = make_app(KEY_MAX_PARALLEL="1")
    hang_up = asyncio.Event()
    bodies = 0

    async def send(event: dict[str, Any]) -> None:
        nonlocal bodies
        if event["type"] == "http.response.body":
            bodies += 1
            if bodies == 1:
                assert in_flight(app) == 1
                hang_up.set()
                await asyncio.sleep(0.05)  # the stream's watcher sees the hang-up

    async def main() -> None:
        await asyncio.wait_for(
            app(scope("/v1/chat/completions"), receiver(orjson.dumps(STREAM), hang_up), send), 10
        )

    asyncio.run(main())
    assert in_flight(app) == 0
