"""Token limits (TPM) against real gunicorn, on both backends (shared memory and Redis).

* tpm = 300, six concurrent requests with max_tokens = 100: at most 2 admitted (the estimate
  is reserved before forwarding), the rest 429 naming tokens, with Retry-After.
* After a non-streamed and a streamed response the bucket reflects the *real* usage (read
  through x-ratelimit-remaining-tokens of the next request), on the test upstream.
* An estimate over the whole bucket: 400 at once.
* Streams: the gateway asks the upstream for usage and hides that chunk from a client that
  did not ask for it; a client that asked still gets it.

Each body is sent as bytes the test wrote, so it knows the estimate the gateway makes of it
(edge.ratelimit.tokens.estimate_tokens: the rule itself is tested in tests/unit/test_tokens.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import Gunicorn, RedisServer, Upstream

from edge.ratelimit.tokens import CHAT, EMBEDDINGS, RESPONSES, Prompt, estimate_tokens

KEYS = {
    "concurrent": 300, "usage": 120, "big": 50, "stream": 1000, "other-apis": 120, "refund": 120,
}  # fmt: skip
TOKEN_HEADERS = (
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)
MESSAGES = [{"role": "user", "content": "hi"}]


def key_of(name: str) -> str:
    return f"sk-tpm-{name}-19bd"


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tpm") / "keys.toml"
    path.write_text(
        "\n".join(
            f'[[keys]]\nname = "{name}"\nkey = "{key_of(name)}"\ntpm = {tpm}\n'
            for name, tpm in KEYS.items()
        )
    )
    return path


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream("--slow", "1.0")  # model "slow": answers after 1 s
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["shm", "redis"])
def server(
    request: pytest.FixtureRequest, keys_file: Path, upstream: Upstream
) -> Iterator[Gunicorn]:
    env = {
        "API_KEYS_FILE": str(keys_file),
        "RATE_LIMIT_BURST": "1000",
        "WORKERS": "2",
        "UPSTREAM_URL": upstream.url + "/v1",
        "RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS": str(DEFAULT_MAX),
    }
    redis = None
    if request.param == "redis":
        redis = RedisServer()
        env.update(
            RATE_LIMIT_BACKEND="redis",
            REDIS_URL=redis.url,
            RATE_LIMIT_REDIS_TIMEOUT_MS="2000",
            RATE_LIMIT_FAILURE_POLICY="deny",
        )
    gunicorn = Gunicorn(**env)
    try:
        yield gunicorn
    finally:
        gunicorn.stop()
        if redis is not None:
            redis.stop()


DEFAULT_MAX = 50  # RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS of these servers


def body_of(**fields: object) -> bytes:
    return json.dumps({"model": "m", "messages": MESSAGES, **fields}).encode()


def estimate(body: bytes, where: Prompt = CHAT) -> int:
    return estimate_tokens(len(body), json.loads(body), where, DEFAULT_MAX)


def post(server: Gunicorn, name: str, body: bytes, path: str = "/chat/completions"):
    return httpx.post(
        server.url + "/v1" + path,
        content=body,
        headers={"x-api-key": key_of(name), "content-type": "application/json"},
        timeout=20,
    )


def chat(server: Gunicorn, name: str, **fields: object) -> httpx.Response:
    return post(server, name, body_of(**fields))


def events(response: httpx.Response) -> list[object]:
    return [
        json.loads(line[6:])
        for line in response.text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def test_concurrent_reservations_cannot_overspend(server: Gunicorn) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        server.url + "/v1/chat/completions",
                        json={"model": "slow", "messages": MESSAGES, "max_tokens": 100},
                        headers={"x-api-key": key_of("concurrent"), "connection": "close"},
                    )
                    for _ in range(6)
                )
            )

    # All six are in flight together (the upstream takes 1 s): only reservations hold them.
    each = estimate(body_of(model="slow", max_tokens=100))
    responses = asyncio.run(asyncio.wait_for(run(), 60))
    statuses = sorted(r.status_code for r in responses)
    admitted = statuses.count(200)
    assert 1 <= admitted <= 300 // each, statuses
    assert statuses.count(429) == 6 - admitted
    for response in responses:
        if response.status_code == 200:
            assert response.headers["x-ratelimit-limit-tokens"] == "300"
            assert int(response.headers["x-ratelimit-remaining-tokens"]) < 300 - 100
            continue
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded"
        assert "tokens" in error["message"]
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert int(response.headers["retry-after-ms"]) >= 1
        assert response.headers["x-ratelimit-limit-tokens"] == "300"


def test_bucket_is_settled_on_real_usage(server: Gunicorn, upstream: Upstream) -> None:
    """The upstream uses 12 tokens non-streamed, 8 streamed. Between two requests the
    remaining tokens fall by what the first *used* plus the second's estimate minus the
    first's (give or take the refill, 2 tokens/s, and one for rounding)."""
    rate = KEYS["usage"] / 60
    first_body = body_of(max_tokens=30)
    first = post(server, "usage", first_body)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["total_tokens"] == 12
    r1 = int(first.headers["x-ratelimit-remaining-tokens"])
    t1 = time.monotonic()

    stream_body = body_of(model="fast-5", max_tokens=30, stream=True)
    streamed = post(server, "usage", stream_body)
    t2 = time.monotonic()
    assert streamed.status_code == 200, streamed.text
    assert set(TOKEN_HEADERS) <= set(streamed.headers)
    drop = r1 - int(streamed.headers["x-ratelimit-remaining-tokens"])
    expected = 12 + estimate(stream_body) - estimate(first_body)
    assert expected - (t2 - t1) * rate - 1 <= drop <= expected + 1, drop
    # The gateway asked the upstream for usage on the client's behalf and kept that chunk.
    seen = upstream.seen(streamed.headers["x-request-id"])
    assert seen["stream_options"] == {"include_usage": True}
    chunks = events(streamed)
    assert len(chunks) == 5 and all(chunk["choices"] for chunk in chunks), chunks
    r2 = int(streamed.headers["x-ratelimit-remaining-tokens"])

    after = post(server, "usage", first_body)
    t3 = time.monotonic()
    assert after.status_code == 200, after.text
    drop = r2 - int(after.headers["x-ratelimit-remaining-tokens"])
    expected = 8 + estimate(first_body) - estimate(stream_body)
    assert expected - (t3 - t2) * rate - 1 <= drop <= expected + 1, drop


def test_responses_and_embeddings_are_token_limited_too(server: Gunicorn) -> None:
    """The Responses API (the upstream uses 24, streamed or not) and embeddings (the upstream
    reports 4) reserve and settle like chat."""
    rate = KEYS["other-apis"] / 60

    def send(path: str, where: Prompt, **fields: object) -> tuple[int, float, int]:
        body = json.dumps({"model": "m", **fields}).encode()
        response = post(server, "other-apis", body, path)
        assert response.status_code == 200, response.text
        remaining = int(response.headers["x-ratelimit-remaining-tokens"])
        return remaining, time.monotonic(), estimate(body, where)

    r1, t1, e1 = send("/responses", RESPONSES, input="hi", max_output_tokens=30)
    r2, t2, e2 = send("/responses", RESPONSES, input="hi", max_output_tokens=30, stream=True)
    r3, t3, e3 = send("/responses", RESPONSES, input="hi", max_output_tokens=30)
    for before, after, elapsed, expected in (
        (r1, r2, t2 - t1, 24 + e2 - e1),
        (r2, r3, t3 - t2, 24 + e3 - e2),
    ):
        assert expected - elapsed * rate - 1 <= before - after <= expected + 1, (before, after)
    s1, t4, _ = send("/embeddings", EMBEDDINGS, input="abcdefgh")
    s2, t5, _ = send("/embeddings", EMBEDDINGS, input="abcdefgh")
    assert 4 - (t5 - t4) * rate - 1 <= s1 - s2 <= 4 + 1, (s1, s2)
    # Over the whole bucket: 400 at once, on these APIs too.
    big = json.dumps({"model": "m", "input": "hi", "max_output_tokens": 51}).encode()
    refused = post(server, "big", big, "/responses")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "tokens_exceed_limit"
    # A background response is never seen again by the gateway: it could never be settled.
    background = json.dumps({"model": "m", "input": "hi", "background": True}).encode()
    refused = post(server, "big", background, "/responses")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "background"


def test_no_cap_is_written_in_and_an_error_answer_refunds(
    server: Gunicorn, upstream: Upstream
) -> None:
    """No cap from the client: the default is reserved, not sent (the gateway never adds,
    lowers or rewrites a cap). A cap that is not a whole number is 400. An upstream error
    answer (nothing generated) gives the whole reservation back."""
    rate = KEYS["refund"] / 60
    t1 = time.monotonic()  # r1 is read when `first` reserves: the refill window opens after t1
    first_body = body_of()
    first = post(server, "refund", first_body)
    assert first.status_code == 200, first.text
    sent = json.loads(upstream.seen(first.headers["x-request-id"])["body"])
    assert not {"max_tokens", "max_completion_tokens", "max_output_tokens"} & set(sent)
    for bad in ("100000", 1e5, -1):
        refused = chat(server, "refund", max_tokens=bad)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    r1 = int(first.headers["x-ratelimit-remaining-tokens"])
    failed = chat(server, "refund", model="error-500", max_tokens=30)
    assert failed.status_code == 500
    after_body = body_of(max_tokens=30)
    after = post(server, "refund", after_body)
    t2 = time.monotonic()
    assert after.status_code == 200, after.text
    # r1 -> after: the first request's settlement (its estimate reserved, 12 used), nothing
    # kept for the failed one, this one's estimate reserved; plus the refill meanwhile.
    expected = estimate(after_body) - (estimate(first_body) - 12)
    drop = r1 - int(after.headers["x-ratelimit-remaining-tokens"])
    assert expected - (t2 - t1) * rate - 1 <= drop <= expected + 1, drop


def test_estimate_over_the_whole_bucket_is_400(server: Gunicorn) -> None:
    response = chat(server, "big", max_tokens=51)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "max_tokens" and "token limit" in error["message"]
    # Nothing was taken: a fitting request still gets the whole bucket.
    body = body_of(max_tokens=10)
    fits = post(server, "big", body)
    assert fits.status_code == 200
    assert int(fits.headers["x-ratelimit-remaining-tokens"]) == 50 - estimate(body)


def test_a_client_that_asked_for_usage_still_gets_it(server: Gunicorn) -> None:
    response = chat(
        server, "stream", model="fast-5", stream=True, stream_options={"include_usage": True}
    )
    assert response.status_code == 200
    chunks = events(response)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8
