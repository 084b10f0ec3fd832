"""What each request cost (#25, prices and cost): real gunicorn (4 workers), a real upstream
that reports usage, the openai SDK. The `x-edge-cost-usd` header of a whole answer is its usage
at the answering target's prices, the access line carries it for streams too, the metric sums it
per key name across workers, and an answer from the response cache costs nothing."""

from __future__ import annotations

import os

import pytest
from support import Gunicorn, Upstream, access_line, metric_total, sdk_client, wait_until

KEY = "sk-cost-team-6a1d"
INPUT, OUTPUT = 2.5, 10.0  # USD per million tokens
CHEAP_OUTPUT = 4.0


@pytest.fixture(scope="module")
def upstream():
    server = Upstream("--pace", "0.01", "--chunks", "3")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, upstream):
    directory = tmp_path_factory.mktemp("cost")
    keys = directory / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "team-a"\nkey = "{KEY}"\n')
    providers = directory / "providers.toml"
    providers.write_text(
        f'[providers.up]\nbase_url = "{upstream.url}/v1"\n'
        '[[models]]\nname = "priced"\n'
        f"price = {{ input_per_mtok = {INPUT}, output_per_mtok = {OUTPUT} }}\n"
        'targets = [{ provider = "up" }]\n'
        '[[models]]\nname = "cheap"\n'
        f"price = {{ input_per_mtok = {INPUT}, output_per_mtok = {OUTPUT} }}\n"
        f'targets = [{{ provider = "up", output_per_mtok = {CHEAP_OUTPUT} }}]\n'
        '[[models]]\nname = "free"\ntargets = [{ provider = "up" }]\n'
        '[[models]]\nname = "billed"\n'
        f"price = {{ input_per_mtok = {INPUT}, output_per_mtok = {OUTPUT} }}\n"
        'targets = [{ provider = "up", model = "bill" }]\n'
    )
    server = Gunicorn(
        WORKERS="4",
        API_KEYS_FILE=str(keys),
        PROVIDERS_FILE=str(providers),
        CACHE_BACKEND="local",
        RATE_LIMIT_BURST="100000",
        RATE_LIMIT_RPM="6000000",
    )
    yield server
    server.stop()


def ask(text: str = "hi") -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{text} {os.urandom(4).hex()}"}]


def spent(server: Gunicorn) -> float:
    return metric_total(server, "edge_cost_usd_total", key="team-a")


def test_the_cost_header_is_the_usage_at_the_targets_prices(proxy):
    client = sdk_client(proxy.url, KEY)
    for model, output in (("priced", OUTPUT), ("cheap", CHEAP_OUTPUT)):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=ask())
        used = raw.parse().usage
        expected = (used.prompt_tokens * INPUT + used.completion_tokens * output) / 1e6
        assert float(raw.headers["x-edge-cost-usd"]) == pytest.approx(expected, abs=1e-8)
    unpriced = client.chat.completions.with_raw_response.create(model="free", messages=ask())
    assert "x-edge-cost-usd" not in unpriced.headers


def test_a_streams_cost_is_in_its_access_line_and_the_metric_sums_every_worker(proxy):
    before = spent(proxy)
    client = sdk_client(proxy.url, KEY)
    request_id = f"cost-stream-{os.urandom(4).hex()}"
    chunks = list(
        client.chat.completions.create(
            model="priced",
            messages=ask(),
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-request-id": request_id},
        )
    )
    used = chunks[-1].usage
    expected = (used.prompt_tokens * INPUT + used.completion_tokens * OUTPUT) / 1e6
    assert access_line(proxy, request_id)["cost_usd"] == pytest.approx(expected, abs=1e-8)
    total = expected
    for _ in range(8):  # spread over the workers
        raw = client.chat.completions.with_raw_response.create(model="priced", messages=ask())
        total += float(raw.headers["x-edge-cost-usd"])
    wait_until(lambda: spent(proxy) - before == pytest.approx(total, rel=1e-6))


def test_a_priced_stream_asks_for_usage_and_hides_it_from_a_client_that_did_not(proxy, upstream):
    """An upstream that reports a stream's usage only when asked (the test upstream's honest
    "bill" model): a priced model's stream is asked for it, costed, and the client that did not
    ask sees no usage chunk."""
    request_id = f"cost-ask-{os.urandom(4).hex()}"
    chunks = list(
        sdk_client(proxy.url, KEY).chat.completions.create(
            model="billed",
            messages=ask(),
            max_tokens=5,
            stream=True,
            extra_headers={"x-request-id": request_id},
        )
    )
    assert all(chunk.choices for chunk in chunks)  # no usage chunk reached the client
    assert upstream.seen(request_id)["stream_options"] == {"include_usage": True}
    line = access_line(proxy, request_id)
    expected = (line["prompt_tokens"] * INPUT + line["completion_tokens"] * OUTPUT) / 1e6
    assert line["cost_usd"] == pytest.approx(expected, abs=1e-8) and line["cost_usd"] > 0


def test_an_answer_from_the_cache_costs_nothing(proxy):
    client = sdk_client(proxy.url, KEY)
    asked = ask("cached")
    first = client.chat.completions.with_raw_response.create(model="priced", messages=asked)
    assert float(first.headers["x-edge-cost-usd"]) > 0
    again = client.chat.completions.with_raw_response.create(model="priced", messages=asked)
    assert again.headers["x-cache"] == "hit"
    assert float(again.headers["x-edge-cost-usd"]) == 0
