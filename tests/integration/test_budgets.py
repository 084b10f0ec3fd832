"""Budgets per key (#25): real gunicorn (4 workers), a real upstream that reports a fixed usage
(5 prompt and 7 completion tokens a chat answer), the openai SDK. A budget admits exactly the
requests it can pay for, whichever workers answer them, then 429 `insufficient_quota` that the
SDK does not retry; the spend outlives a full restart (the state store) and, with Redis, holds
on a second instance; `llm-edge-proxy usage` agrees with /metrics and the access log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from support import (
    Gunicorn,
    RedisServer,
    Upstream,
    access_line,
    metric_total,
    sdk_client,
    wait_until,
)

PAYER = "sk-budget-payer-51f0"
FREE = "sk-budget-free-93a2"
PRICE = 1000.0  # USD per million tokens, input and output: a chat answer costs $0.012
PER_REQUEST = 12 * PRICE / 1e6
PAID_FOR = 5
USAGE = [sys.executable, "-m", "edge.cli", "usage"]


@pytest.fixture(scope="module")
def upstream():
    server = Upstream("--pace", "0.01", "--chunks", "3")
    yield server
    server.stop()


def write_config(directory: Path, upstream: Upstream, budget: float) -> dict[str, str]:
    keys = directory / "keys.toml"
    keys.write_text(
        f'[[keys]]\nname = "payer"\nkey = "{PAYER}"\nbudget_usd = {budget}\n'
        'budget_period = "month"\n'
        f'[[keys]]\nname = "free"\nkey = "{FREE}"\n'
    )
    providers = directory / "providers.toml"
    providers.write_text(
        f'[providers.up]\nbase_url = "{upstream.url}/v1"\n'
        '[[models]]\nname = "priced"\n'
        f"price = {{ input_per_mtok = {PRICE}, output_per_mtok = {PRICE} }}\n"
        'targets = [{ provider = "up" }]\n'
    )
    return {
        "WORKERS": "4",
        "API_KEYS_FILE": str(keys),
        "PROVIDERS_FILE": str(providers),
        "RATE_LIMIT_BURST": "100000",
        "RATE_LIMIT_RPM": "6000000",
    }


def ask(client, **options):
    return client.chat.completions.with_raw_response.create(
        model="priced",
        messages=[{"role": "user", "content": f"hi {os.urandom(4).hex()}"}],
        max_tokens=7,  # a small reservation: the estimate is priced too
        **options,
    )


def spend_until_refused(url: str) -> int:
    """Requests admitted before the first refusal (each on a fresh connection, so spread over
    the workers); the refusal is checked."""
    for admitted in range(PAID_FOR * 3):
        try:
            raw = ask(sdk_client(url, PAYER))
        except openai.RateLimitError as refused:
            check_refusal(refused)
            return admitted
        assert float(raw.headers["x-edge-cost-usd"]) == pytest.approx(PER_REQUEST)
    raise AssertionError("the budget never refused")


def check_refusal(refused: openai.RateLimitError) -> None:
    assert refused.status_code == 429
    assert refused.code == "insufficient_quota"
    assert refused.type == "insufficient_quota"
    assert refused.response.headers["x-should-retry"] == "false"
    assert "resets at 20" in refused.message  # the period's end, in UTC
    assert PAYER not in refused.message


@pytest.fixture
def state(tmp_path, upstream):
    env = write_config(tmp_path, upstream, PAID_FOR * PER_REQUEST)
    env["STATE_DIR"] = str(tmp_path / "state")
    # The store is the instance's: a restart on another port must keep the instance's name.
    env["INSTANCE_NAME"] = f"budgets{os.getpid()}"
    return env


def test_a_budget_admits_exactly_what_it_pays_for_then_refuses_without_retries(state):
    server = Gunicorn(**state)
    try:
        assert spend_until_refused(server.url) == PAID_FOR
        # The SDK's default retries: one request reaches the gateway, the refusal is final.
        sent = []
        hooks = {"request": [sent.append]}
        client = sdk_client(
            server.url, PAYER, max_retries=2, http_client=httpx.Client(event_hooks=hooks)
        )
        with pytest.raises(openai.RateLimitError) as refused:
            ask(client)
        check_refusal(refused.value)
        assert len(sent) == 1
        # Another key is not touched by it.
        assert ask(sdk_client(server.url, FREE)).status_code == 200
        spent = metric_total(server, "edge_cost_usd_total", key="payer")
        assert spent == pytest.approx(PAID_FOR * PER_REQUEST)
    finally:
        server.stop()


def test_the_budget_holds_after_a_full_restart(state):
    first = Gunicorn(**state)
    try:
        for _ in range(PAID_FOR - 1):
            ask(sdk_client(first.url, PAYER))
    finally:
        assert first.stop() == 0
    second = Gunicorn(**state)
    try:
        assert spend_until_refused(second.url) == 1
    finally:
        second.stop()


def usage(env: dict[str, str], *args: str) -> list[dict]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "RATE_LIMIT_"))}
    full.update(env)
    done = subprocess.run(
        [*USAGE, "--json", *args], env=full, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_usage_command_agrees_with_the_metrics_and_the_access_log(state):
    server = Gunicorn(**state)
    try:
        ids = []
        for index in range(3):
            request_id = f"usage-{index}-{os.urandom(4).hex()}"
            ask(sdk_client(server.url, PAYER), extra_headers={"x-request-id": request_id})
            ids.append(request_id)
        stream_id = f"usage-stream-{os.urandom(4).hex()}"
        list(
            sdk_client(server.url, PAYER).chat.completions.create(
                model="priced",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=7,
                stream=True,
                extra_headers={"x-request-id": stream_id},
            )
        )
        ids.append(stream_id)
        lines = [access_line(server, request_id) for request_id in ids]
        logged_cost = sum(line["cost_usd"] for line in lines)
        logged_tokens = sum(line["prompt_tokens"] + line["completion_tokens"] for line in lines)
        metric = metric_total(server, "edge_cost_usd_total", key="payer")
        assert metric == pytest.approx(logged_cost)

        def payer() -> dict:
            return next(line for line in usage(state) if line["key"] == "payer")

        report = wait_until(lambda: (found := payer())["requests"] == len(ids) and found)
        assert report["spent_usd"] == pytest.approx(logged_cost)
        assert report["prompt_tokens"] + report["completion_tokens"] == logged_tokens
        assert report["budget_usd"] == pytest.approx(PAID_FOR * PER_REQUEST)
        assert report["remaining_usd"] == pytest.approx(PAID_FOR * PER_REQUEST - logged_cost)
        assert report["period"] == "month" and report["period_end"].endswith("-01T00:00:00Z")
        free = next(line for line in usage(state) if line["key"] == "free")
        assert free["requests"] == 0 and free["budget_usd"] is None
    finally:
        server.stop()
    # With the service stopped, the table form reads the same store.
    full = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "RATE_LIMIT_"))}
    full.update(state)
    table = subprocess.run(USAGE, env=full, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "payer" in table.stdout and "free" in table.stdout and PAYER not in table.stdout


@pytest.mark.parametrize(
    ("good", "bad", "named"),
    [
        ("budget_usd = 1.0", "budget_usd = -1", "budget_usd"),
        ("budget_usd = 1.0", 'budget_usd = "10"', "budget_usd"),
        ('budget_period = "month"', 'budget_period = "year"', "budget_period"),
    ],
)
def test_a_bad_budget_stops_the_start_naming_key_and_field(tmp_path, upstream, good, bad, named):
    env = write_config(tmp_path, upstream, 1.0)
    keys = Path(env["API_KEYS_FILE"])
    assert good in keys.read_text()
    keys.write_text(keys.read_text().replace(good, bad))
    server = Gunicorn(wait=False, **env)
    try:
        assert server.proc.wait(30) != 0
        output = server.output()
        assert "payer" in output and named in output and PAYER not in output
    finally:
        server.stop()


def test_with_redis_the_budget_holds_on_a_second_instance(tmp_path, upstream):
    redis = RedisServer()
    env = write_config(tmp_path, upstream, PAID_FOR * PER_REQUEST)
    env.update(RATE_LIMIT_BACKEND="redis", REDIS_URL=redis.url)
    first = Gunicorn(**env)
    second = Gunicorn(**env)
    try:
        for _ in range(PAID_FOR - 1):
            ask(sdk_client(first.url, PAYER))
        assert spend_until_refused(second.url) == 1
        with pytest.raises(openai.RateLimitError):
            ask(sdk_client(first.url, PAYER))
        report = next(line for line in usage(env) if line["key"] == "payer")
        assert report["spent_usd"] == pytest.approx(PAID_FOR * PER_REQUEST)
        assert report["requests"] == PAID_FOR + 2  # the two refusals count as requests
    finally:
        first.stop()
        second.stop()
        redis.stop()


def test_what_a_budget_cannot_hold_is_capped_or_refused(tmp_path, upstream):
    """A budgeted request without an output cap reaches the upstream with the one it reserved
    for; input the gateway cannot see, and routes it cannot price, are refused with a clear
    error; another key's request is forwarded as it came."""
    env = write_config(tmp_path, upstream, 100.0)  # room for the default cap's reservation
    server = Gunicorn(**env, STATE_DIR=str(tmp_path / "state"))
    try:
        request_id = f"capped-{os.urandom(4).hex()}"
        sdk_client(server.url, PAYER).chat.completions.create(
            model="priced",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-request-id": request_id},
        )
        assert json.loads(upstream.seen(request_id)["body"])["max_completion_tokens"] == 1024
        free_id = f"uncapped-{os.urandom(4).hex()}"
        sdk_client(server.url, FREE).chat.completions.create(
            model="priced",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-request-id": free_id},
        )
        assert "max_completion_tokens" not in json.loads(upstream.seen(free_id)["body"])
        with pytest.raises(openai.BadRequestError) as refused:
            sdk_client(server.url, PAYER).chat.completions.create(
                model="priced",
                messages=[{"role": "user", "content": "hi"}],
                tools=[{"type": "web_search"}],  # run by the provider, billed as input
            )
        assert refused.value.code == "budget_not_applicable"
        with pytest.raises(openai.PermissionDeniedError) as denied:
            sdk_client(server.url, PAYER).images.generate(model="priced", prompt="a cat")
        assert denied.value.code == "budget_not_applicable"
    finally:
        server.stop()
