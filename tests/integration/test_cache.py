"""The response cache end to end: real gunicorn (4 workers), a real upstream process that logs
every request it receives (/_log), the official openai SDK, redis-server for the Redis tier.

Every request goes out on a new connection (httpx.post), so a hit is the host's store shared by
the workers, not one worker remembering."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import signal
import socket
import struct
from pathlib import Path

import httpx
import orjson
import pytest
from support import REDIS_SERVER, Gunicorn, RedisServer, Upstream, sdk_client, wait_until

from edge.auth import digest_of, short_id

KEY = "sk-cache-test-key"
OTHER = "sk-cache-other-key"
HEADERS = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def upstream():
    server = Upstream("--slow", "1", "--pace", "0.01", "--chunks", "5")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(upstream, tmp_path_factory):
    store = tmp_path_factory.mktemp("cache") / "store"
    server = cached(
        store, upstream, API_KEYS=f"{KEY},{OTHER}", WORKERS="4", RATE_LIMIT_ENABLED="false"
    )
    yield server
    server.stop()


def cached(store: Path, upstream: Upstream | None = None, **env: str) -> Gunicorn:
    """Gunicorn with the local cache in `store`, on KEY unless `env` names other keys, in
    front of `upstream` (else `env`'s PROVIDERS_FILE)."""
    env.setdefault("CACHE_BACKEND", "local")
    if "API_KEYS_FILE" not in env:
        env.setdefault("API_KEYS", KEY)
    if upstream is not None:
        env["UPSTREAM_URL"] = upstream.url + "/v1"
    return Gunicorn(CACHE_DIR=str(store), **env)


def received(upstream: Upstream, model: str) -> int:
    """How many requests for `model` the upstream received."""
    return sum(1 for entry in upstream.log() if entry["model"] == model)


def chat(server: Gunicorn, model: str, key: str = KEY, headers=None, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(
        server.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", **(headers or {})},
        timeout=20,
    )


def test_the_same_request_is_answered_once_upstream_with_the_same_bytes(gateway, upstream):
    first = chat(gateway, "same-twice")
    assert first.status_code == 200
    assert first.headers["x-cache"] == "miss"
    second = chat(gateway, "same-twice")
    assert second.status_code == 200
    assert second.headers["x-cache"] == "hit"
    assert int(second.headers["age"]) >= 0
    assert second.content == first.content
    assert received(upstream, "same-twice") == 1
    # Whitespace and key order are not the request: the canonical body is.
    raw = b'{ "messages" : [ {"content": "hi", "role": "user"} ],\n "model": "same-twice" }'
    third = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=raw,
        headers={**HEADERS, "content-type": "application/json"},
        timeout=20,
    )
    assert third.headers["x-cache"] == "hit" and third.content == first.content


def test_another_key_or_another_field_is_a_miss(gateway, upstream):
    assert chat(gateway, "scoped").headers["x-cache"] == "miss"
    assert chat(gateway, "scoped", key=OTHER).headers["x-cache"] == "miss"
    # A field no one has heard of is still part of the request.
    assert chat(gateway, "scoped", some_new_parameter=1).headers["x-cache"] == "miss"
    assert chat(gateway, "scoped", temperature=0.5).headers["x-cache"] == "miss"
    assert chat(gateway, "scoped", stream=False).headers["x-cache"] == "miss"
    assert received(upstream, "scoped") == 5
    assert chat(gateway, "scoped", key=OTHER).headers["x-cache"] == "hit"
    assert received(upstream, "scoped") == 5


def test_a_stream_is_replayed_as_the_same_events_through_the_sdk(gateway, upstream):
    client = sdk_client(gateway.url, KEY)

    def text() -> tuple[str, list[str]]:
        chunks = client.chat.completions.create(
            model="streamed", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        parts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        return "".join(parts), parts

    first, first_parts = text()
    second, second_parts = text()
    assert first and second == first and second_parts == first_parts
    assert received(upstream, "streamed") == 1
    raw = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "streamed", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers=HEADERS,
        timeout=20,
    )
    assert raw.headers["x-cache"] == "hit"
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_base64_embeddings_come_back_byte_for_byte(gateway, upstream):
    client = sdk_client(gateway.url, KEY)
    first = client.embeddings.create(model="embed-cached", input=["a", "b"])
    second = client.embeddings.create(model="embed-cached", input=["a", "b"])
    assert [d.embedding for d in first.data] == [d.embedding for d in second.data]
    assert received(upstream, "embed-cached") == 1
    raw = httpx.post(
        gateway.url + "/v1/embeddings",
        json={"model": "embed-cached", "input": ["a"], "encoding_format": "base64"},
        headers=HEADERS,
        timeout=20,
    )
    again = httpx.post(
        gateway.url + "/v1/embeddings",
        json={"model": "embed-cached", "input": ["a"], "encoding_format": "base64"},
        headers=HEADERS,
        timeout=20,
    )
    assert again.headers["x-cache"] == "hit" and again.content == raw.content
    vector = base64.b64decode(again.json()["data"][0]["embedding"])
    assert struct.unpack(f"<{len(vector) // 4}f", vector)[0] == pytest.approx(0.125)


def test_concurrent_identical_requests_reach_the_upstream_once(gateway, upstream):
    """20 at once, spread over the 4 workers, for a model the upstream takes 1 s to answer."""
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: chat(gateway, "slow"), range(20)))
    assert [a.status_code for a in answers] == [200] * 20
    assert received(upstream, "slow") == 1
    assert len({a.content for a in answers}) == 1
    assert sorted(a.headers["x-cache"] for a in answers).count("miss") == 1


def test_errors_and_streams_cut_short_are_never_stored(gateway, upstream):
    for _ in range(2):
        assert chat(gateway, "error-500").status_code == 500
    assert received(upstream, "error-500") == 2
    for _ in range(2):
        cut = chat(gateway, "cut-mid-event", stream=True)
        assert cut.headers["x-cache"] == "miss"
        assert "error" in cut.text  # the SSE error event the relay ends it with
    assert received(upstream, "cut-mid-event") == 2


def test_cache_control_no_cache_and_no_store(gateway, upstream):
    first = chat(gateway, "controls")
    fresh = chat(gateway, "controls", headers={"cache-control": "no-cache"})
    assert fresh.headers["x-cache"] == "bypass"
    assert fresh.content != first.content  # a new answer from the upstream
    assert chat(gateway, "controls").content == fresh.content  # ... stored for the next
    unstored = chat(gateway, "controls", headers={"cache-control": "no-store"})
    assert unstored.headers["x-cache"] == "bypass"
    assert unstored.content not in (first.content, fresh.content)
    assert chat(gateway, "controls").content == fresh.content
    assert received(upstream, "controls") == 3
    # max-age: an entry older than it is not served (it is fetched anew, and stored).
    wait_until(lambda: int(chat(gateway, "controls").headers["age"]) >= 1, timeout=10)
    assert (
        chat(gateway, "controls", headers={"cache-control": "max-age=3600"}).headers["x-cache"]
        == "hit"
    )
    refetched = chat(gateway, "controls", headers={"cache-control": "max-age=0"})
    assert refetched.headers["x-cache"] == "miss"
    assert received(upstream, "controls") == 4


def test_litellm_body_controls_are_honoured_and_never_forwarded(gateway, upstream):
    first = chat(gateway, "body-controls", cache={"namespace": "team-a"})
    assert first.headers["x-cache"] == "miss"
    request_id = first.headers["x-request-id"]
    assert "cache" not in orjson.loads(upstream.seen(request_id)["body"])
    assert chat(gateway, "body-controls", cache={"namespace": "team-a"}).headers["x-cache"] == (
        "hit"
    )
    assert chat(gateway, "body-controls", cache={"namespace": "team-b"}).headers["x-cache"] == (
        "miss"
    )
    skipped = chat(gateway, "body-controls", cache={"namespace": "team-a", "no-cache": True})
    assert skipped.headers["x-cache"] == "bypass"
    assert "cache" not in orjson.loads(upstream.seen(skipped.headers["x-request-id"])["body"])
    bad = chat(gateway, "body-controls", cache={"ttl": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache"
    assert chat(gateway, "body-controls", cache="yes").status_code == 400


def test_stateful_responses_requests_are_never_stored(gateway, upstream):
    for body in (
        {"model": "stateful", "input": "hi", "previous_response_id": "resp_1"},
        {"model": "stateful", "input": "hi", "store": True},
    ):
        for _ in range(2):
            answer = httpx.post(
                gateway.url + "/v1/responses", json=body, headers=HEADERS, timeout=20
            )
            assert answer.headers["x-cache"] == "bypass"
    assert received(upstream, "stateful") == 4


def test_metrics_and_access_log_say_what_the_cache_did(gateway, upstream):
    chat(gateway, "observed")
    chat(gateway, "observed")
    scrape = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert (
        'edge_cache_lookups_total{result="hit",route="/v1/chat/completions",tier="local"}' in scrape
    )
    assert "edge_cache_store_entries " in scrape and "edge_cache_store_bytes " in scrape
    key = short_id(digest_of(KEY))  # the API_KEYS key's `key` label
    assert (
        f'edge_cache_saved_tokens_total{{key="{key}",kind="completion",model="observed"}}' in scrape
    )

    def logged() -> list[dict]:
        lines = [line for line in gateway.output().splitlines() if '"observed"' in line]
        return [orjson.loads(line) for line in lines if line.startswith("{")]

    caches = wait_until(lambda: [line.get("cache") for line in logged()] or None)
    wait_until(lambda: {"hit", "miss"} <= {line.get("cache") for line in logged()})
    assert caches


def test_an_entry_still_hits_after_a_reload(gateway, upstream):
    first = chat(gateway, "after-hup")
    old = set(gateway.worker_pids())
    gateway.signal(signal.SIGHUP)
    wait_until(lambda: not old & set(gateway.worker_pids()), timeout=30)
    gateway.wait_ready()
    second = chat(gateway, "after-hup")
    assert second.headers["x-cache"] == "hit" and second.content == first.content
    assert received(upstream, "after-hup") == 1


def test_entries_expire_after_the_ttl(upstream, tmp_path):
    server = cached(tmp_path / "store", upstream, CACHE_TTL_SECONDS="1")
    try:
        assert chat(server, "ttl").headers["x-cache"] == "miss"
        # Polled: a hit until a second has passed, then a miss (never a wall-clock assertion).
        wait_until(lambda: chat(server, "ttl").headers["x-cache"] == "miss", timeout=15)
        assert received(upstream, "ttl") == 2
    finally:
        server.stop()


def _disk_usage(path: Path) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in path.rglob("*") if p.is_file())


def test_the_store_stays_within_its_size_on_disk(upstream, tmp_path):
    """Hundreds of large distinct answers (about 190 KB each) through a 4 MiB store."""
    store = tmp_path / "store"
    limit = 4 << 20
    server = cached(
        store,
        upstream,
        CACHE_MAX_BYTES=str(limit),
        CACHE_MAX_ENTRY_BYTES=str(512 << 10),
        RATE_LIMIT_ENABLED="false",
    )
    try:
        sizes = []
        for index in range(300):
            answer = httpx.post(
                server.url + "/v1/embeddings",
                json={"model": f"big-{index}", "input": ["x"], "dimensions": 12_000},
                headers=HEADERS,
                timeout=20,
            )
            assert answer.status_code == 200
            sizes.append(len(answer.content))
            assert _disk_usage(store) <= limit + (64 << 10)  # the data file, plus its lock file
        assert min(sizes) > 100_000
        again = httpx.post(
            server.url + "/v1/embeddings",
            json={"model": "big-299", "input": ["x"], "dimensions": 12_000},
            headers=HEADERS,
            timeout=20,
        )
        assert again.headers["x-cache"] == "hit"  # the newest entries stay
        scrape = httpx.get(server.url + "/metrics", timeout=10).text
        evicted = [line for line in scrape.splitlines() if line.startswith("edge_cache_evictions")]
        assert evicted and float(evicted[0].split()[-1]) > 0
    finally:
        server.stop()


def test_a_hit_costs_no_tokens_of_the_token_limit(upstream, tmp_path):
    server = cached(tmp_path / "store", upstream, RATE_LIMIT_TPM="1500")
    try:
        # Each distinct request reserves about 1,030 tokens (the default output cap of 1,024).
        first = chat(server, "tokens")
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        for _ in range(3):
            hit = chat(server, "tokens")
            assert hit.status_code == 200 and hit.headers["x-cache"] == "hit"
            assert "x-ratelimit-remaining-tokens" not in hit.headers
        assert received(upstream, "tokens") == 1
    finally:
        server.stop()


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_redis_shares_entries_across_instances_and_its_absence_is_a_miss(upstream, tmp_path):
    redis = RedisServer()
    servers = []
    try:
        for name in ("one", "two"):
            servers.append(
                cached(
                    tmp_path / name,
                    upstream,
                    CACHE_BACKEND="redis",
                    REDIS_URL=redis.url,
                    RATE_LIMIT_ENABLED="false",
                )
            )
        one, two = servers
        first = chat(one, "across-hosts")
        assert first.headers["x-cache"] == "miss"
        # The write to Redis does not delay the answer: poll until the other host sees it.
        second = wait_until(
            lambda: (r := chat(two, "across-hosts")).headers["x-cache"] == "hit" and r, timeout=10
        )
        assert second.content == first.content
        redis.kill()
        answered = chat(two, "redis-gone")
        assert answered.status_code == 200 and answered.headers["x-cache"] == "miss"
        assert chat(one, "redis-gone-2").status_code == 200
    finally:
        for server in servers:
            server.stop()
        redis.stop()


def test_the_scope_is_the_key_not_a_name_given_to_another_key(upstream, tmp_path):
    """A keys file that gives a name to a new key (the old one revoked) does not hand the new
    key the old key's answers."""
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "customer-17"\nkey = "sk-old-customer"\n')
    keys.chmod(0o600)
    server = cached(tmp_path / "store", upstream, API_KEYS_FILE=str(keys))
    try:
        private = [{"role": "user", "content": "my private question"}]
        assert chat(server, "named", key="sk-old-customer", messages=private).status_code == 200
        keys.write_text('[[keys]]\nname = "customer-17"\nkey = "sk-new-customer"\n')
        old = set(server.worker_pids())
        server.signal(signal.SIGHUP)
        wait_until(lambda: not old & set(server.worker_pids()), timeout=30)
        server.wait_ready()
        assert chat(server, "named", key="sk-old-customer").status_code == 401
        other = chat(server, "named", key="sk-new-customer", messages=private)
        assert other.status_code == 200 and other.headers["x-cache"] == "miss"
    finally:
        server.stop()


def test_anthropic_headers_and_the_routing_are_part_of_the_key(upstream, tmp_path):
    """anthropic-version and anthropic-beta go upstream and change the answer: another key."""
    path = tmp_path / "providers.toml"
    path.write_text(
        f'[providers.claude]\nbase_url = "{upstream.url}/v1"\nkind = "anthropic"\n'
        'api_key = "sk-provider"\n'
        '[[models]]\nname = "claude-cached"\ntargets = [{ provider = "claude" }]\n'
    )
    server = cached(tmp_path / "store", PROVIDERS_FILE=str(path))
    body = {
        "model": "claude-cached",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
    }

    def post(**headers: str) -> httpx.Response:
        return httpx.post(
            server.url + "/v1/messages",
            json=body,
            headers={"x-api-key": KEY, **headers},
            timeout=20,
        )

    try:
        beta = {"anthropic-version": "2023-06-01", "anthropic-beta": "output-128k-2025-02-19"}
        assert post(**beta).headers["x-cache"] == "miss"
        assert post(**beta).headers["x-cache"] == "hit"
        assert post(**{"anthropic-version": "2023-06-01"}).headers["x-cache"] == "miss"
        assert post(**{"anthropic-version": "2099-01-01"}).headers["x-cache"] == "miss"
        assert post().headers["x-cache"] == "hit"  # the default version: the same as 2023-06-01
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("model", "stream"),
    [("long-content-type", False), ("negative-usage", False), ("negative-usage", True)],
)
def test_an_answer_the_cache_cannot_hold_is_answered_all_the_same(gateway, upstream, model, stream):
    for _ in range(2):
        answer = chat(gateway, model, stream=stream)
        assert answer.status_code == 200
        if stream:
            assert answer.text.rstrip().endswith("data: [DONE]")
    assert "Traceback" not in gateway.output()


def test_a_client_ttl_never_outlives_the_operators(upstream, tmp_path):
    server = cached(
        tmp_path / "store",
        upstream,
        API_KEYS=f"{KEY},{OTHER}",
        CACHE_SCOPE="shared",
        CACHE_TTL_SECONDS="1",
    )
    try:
        pinned = chat(server, "pinned", key=OTHER, cache={"ttl": 365 * 86400})
        assert pinned.headers["x-cache"] == "miss"
        # The operator's second, not the client's year: polled until it is a miss again.
        wait_until(lambda: chat(server, "pinned").headers["x-cache"] == "miss", timeout=15)
    finally:
        server.stop()


def test_a_slow_reading_leader_of_a_stream_does_not_hold_its_followers(upstream, tmp_path):
    """A client that reads its stream a few bytes at a time keeps leading it; an identical
    stream from another key follows only FOLLOW_STREAM_S, then goes upstream itself (its first
    byte comes while the leader's stream is still going)."""
    server = cached(
        tmp_path / "store",
        upstream,
        API_KEYS=f"{KEY},{OTHER}",
        CACHE_SCOPE="shared",
        RATE_LIMIT_ENABLED="false",
    )
    body = orjson.dumps(
        {"model": "long-stream", "stream": True, "messages": [{"role": "user", "content": "p"}]}
    )
    attacker = socket.create_connection(("127.0.0.1", server.port))
    attacker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        attacker.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer {OTHER}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert b"x-cache: miss" in attacker.recv(512)
        headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
        with httpx.stream(
            "POST", server.url + "/v1/chat/completions", content=body, headers=headers, timeout=30
        ) as victim:
            assert victim.headers["x-cache"] == "miss"
            assert next(victim.iter_raw())
            attacker.recv(64)  # still leading, still reading
        assert received(upstream, "long-stream") == 2
    finally:
        attacker.close()
        server.stop()


def test_models_can_turn_the_cache_off_or_set_their_ttl(upstream, tmp_path):
    path = tmp_path / "providers.toml"
    path.write_text(
        f'[providers.up]\nbase_url = "{upstream.url}/v1"\n'
        '[[models]]\nname = "uncached"\ncache = false\ntargets = [{ provider = "up" }]\n'
        '[[models]]\nname = "short-lived"\ncache_ttl_seconds = 1\ntargets = [{ provider = "up" }]\n'
        '[[models]]\nname = "*"\ntargets = [{ provider = "up" }]\n'
    )
    server = cached(tmp_path / "store", PROVIDERS_FILE=str(path))
    try:
        for _ in range(2):
            assert chat(server, "uncached").headers["x-cache"] == "bypass"
        assert received(upstream, "uncached") == 2
        assert chat(server, "short-lived").headers["x-cache"] == "miss"
        wait_until(lambda: chat(server, "short-lived").headers["x-cache"] == "miss", timeout=15)
        assert chat(server, "any-other").headers["x-cache"] == "miss"
        assert chat(server, "any-other").headers["x-cache"] == "hit"  # CACHE_TTL_SECONDS: an hour
    finally:
        server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_the_responses_api_is_cached(gateway, upstream, stream):
    body = {"model": f"responses-{stream}", "input": "hi", "store": False, "stream": stream}

    def post() -> httpx.Response:
        return httpx.post(gateway.url + "/v1/responses", json=body, headers=HEADERS, timeout=20)

    first, second = post(), post()
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    assert second.headers["x-cache"] == "hit" and second.content == first.content
    assert received(upstream, f"responses-{stream}") == 1
