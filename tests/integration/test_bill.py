"""What one key can make an honest upstream bill: real gunicorn (2 workers), the test upstream's
honest "bill" models (tests/upstream_server.py: input the bytes of every string / 4, images
1,000 each, the output cap the route's API obeys, at most 400), and a client that honours
every 429 while it tries every body shape, cap combination, abandoned stream and timeout.

A key of 1,000 tokens a minute must not make the upstream bill more than 3,000 tokens in any
5 seconds (its bucket holds 1,000 and refills 83 in 5 s; what it may borrow is one request's
overrun, settled as a debt).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import Gunicorn, Upstream, wait_until

pytestmark = pytest.mark.slow

KEY = "sk-bill-attacker-7c1e"
TPM = 1000
WINDOW_S = 5.0
MOST_BILLED = 3000
RUN_S = 12.0
SCHEMA = {  # about 1,200 bytes of tool schema: billed as input, so counted in the estimate
    "type": "object",
    "properties": {
        f"field_{i}": {"type": "string", "description": "a property the model must fill " * 2}
        for i in range(12)
    },
}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}}]
IMAGE = {"type": "image_url", "image_url": {"url": "https://images.example/cat.png"}}


def shapes() -> list[tuple[str, dict]]:
    """(path, body) of every kind of request the attacker tries."""
    user = [{"role": "user", "content": "Tell me everything about everything."}]
    return [
        ("/chat/completions", {"model": "bill", "messages": user, "tools": TOOLS}),
        ("/chat/completions", {"model": "bill", "messages": user, "max_output_tokens": 0}),
        (
            "/chat/completions",
            {"model": "bill", "messages": user, "max_tokens": 300, "max_completion_tokens": 0},
        ),
        (
            "/chat/completions",
            {
                "model": "bill",
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Look."}, IMAGE]}
                ],
                "max_tokens": 50,
            },
        ),
        ("/chat/completions", {"model": "bill", "messages": user, "n": 2, "max_tokens": 150}),
        (
            "/chat/completions",
            {
                "model": "bill",
                "messages": user,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA},
                },
            },
        ),
        (
            "/completions",
            {"model": "bill", "prompt": "Once upon a time", "max_completion_tokens": 0},
        ),
        (
            "/responses",
            {
                "model": "bill",
                "input": "Go on.",
                "instructions": "Be long. " * 40,
                "text": {"format": {"type": "json_schema", "schema": SCHEMA}},
            },
        ),
        ("/chat/completions", {"model": "bill", "messages": user, "stream": True}),  # abandoned
        ("/chat/completions", {"model": "bill-slow", "messages": user}),  # times out
    ]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bill") / "keys.toml"
    path.write_text(
        f'[[keys]]\nname = "attacker"\nkey = "{KEY}"\ntpm = {TPM}\nrpm = 100000\nburst = 1000\n'
        '[[keys]]\nname = "debtor"\nkey = "sk-bill-debtor-51aa"\ntpm = 120\n'
    )
    return path


async def attack(url: str, stop_at: float) -> dict[str, int]:
    """Four concurrent clients sending every shape in turn, each waiting out a 429's
    retry-after-ms as the SDKs do. Returns how the requests ended."""
    outcomes: dict[str, int] = {}
    headers = {"authorization": f"Bearer {KEY}"}

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=url + "/v1", headers=headers, timeout=30) as http:
            while time.monotonic() < stop_at:
                path, body = rng.choice(shapes())
                if body.get("stream"):
                    async with http.stream("POST", path, json=body) as response:
                        status = response.status_code
                        if status == 200:
                            async for _ in response.aiter_lines():
                                break  # the first event, then the client leaves
                else:
                    response = await http.post(path, json=body)
                    status = response.status_code
                outcomes[str(status)] = outcomes.get(str(status), 0) + 1
                if status == 429:
                    await asyncio.sleep(int(response.headers["retry-after-ms"]) / 1000)

    await asyncio.gather(*(client(seed) for seed in range(4)))
    return outcomes


def test_a_key_within_its_token_limit_cannot_make_the_upstream_bill_more(upstream, keys_file):
    server = Gunicorn(
        API_KEYS_FILE=str(keys_file),
        UPSTREAM_URL=upstream.url + "/v1",
        SERVER_TIMEOUT_SECONDS="1",  # "bill-slow" takes 4 s: every one of those times out
        RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS="400",
    )
    try:
        before = len(upstream.bills())
        outcomes = asyncio.run(attack(server.url, time.monotonic() + RUN_S))
    finally:
        server.stop()
    # The slow ones go on generating after the gateway gave up: their bills come when done.
    bills = wait_until(
        lambda: (found := upstream.bills()[before:]) and all(b["done"] for b in found) and found,
        timeout=30,
    )
    # The key got what its limit allows, was refused the rest, and tried the timeouts.
    assert outcomes.get("200", 0) >= 1 and outcomes.get("429", 0) >= 1, outcomes
    assert sum(outcomes.values()) >= 6, outcomes
    worst = max(
        sum(b["tokens"] for b in bills if start["at"] <= b["at"] < start["at"] + WINDOW_S)
        for start in bills
    )
    assert worst <= MOST_BILLED, (worst, outcomes)


def test_an_overrun_is_a_debt_the_refill_must_pay_back(upstream, keys_file):
    """The debtor (120 a minute) asks with no cap; the gateway reserves its estimate with a
    default of 20 output tokens, the honest upstream generates 400: the key is in debt, and
    refused (remaining 0, a retry-after) until the refill pays it back."""
    server = Gunicorn(
        API_KEYS_FILE=str(keys_file),
        UPSTREAM_URL=upstream.url + "/v1",
        RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS="20",
    )
    headers = {"authorization": "Bearer sk-bill-debtor-51aa"}
    body = {"model": "bill", "messages": [{"role": "user", "content": "hi"}]}
    try:
        first = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers,
                           timeout=20)  # fmt: skip
        assert first.status_code == 200, first.text
        used = first.json()["usage"]["total_tokens"]
        assert used > 120  # more than the whole bucket: far more than was reserved
        refused = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers,
                             timeout=20)  # fmt: skip
        assert refused.status_code == 429, refused.text
        assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
        assert refused.headers["retry-after"] == "60"  # the debt takes longer than 60 s
        assert "debt" in refused.json()["error"]["message"]
    finally:
        server.stop()
    billed = [bill for bill in upstream.bills() if bill["tokens"] == used]
    assert billed  # the upstream billed what the gateway settled to


def test_timeouts_keep_what_they_reserved(upstream, keys_file):
    """A request that timed out after it was sent may still be billed: its reservation is
    kept, so a key cannot spend its way past the limit with requests that time out."""
    server = Gunicorn(
        API_KEYS_FILE=str(keys_file),
        UPSTREAM_URL=upstream.url + "/v1",
        SERVER_TIMEOUT_SECONDS="0.5",
        RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS="400",
    )
    headers = {"authorization": f"Bearer {KEY}"}
    body = json.dumps({"model": "bill-slow", "messages": [{"role": "user", "content": "hi"}]})
    try:
        statuses = []
        with httpx.Client(base_url=server.url + "/v1", headers=headers, timeout=20) as http:
            for _ in range(4):  # each reserves about 420 of 1,000
                response = http.post("/chat/completions", content=body,
                                     headers={"content-type": "application/json"})  # fmt: skip
                statuses.append(response.status_code)
        assert statuses[:2] == [504, 504] and 429 in statuses[2:], statuses
    finally:
        server.stop()
