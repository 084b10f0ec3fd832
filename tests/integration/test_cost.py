"""What each request cost (#25, prices and cost): real gunicorn (4 workers), a real upstream
that reports usage, the openai SDK. The `x-edge-cost-usd` header of a whole answer is its usage
at the answering target's prices, the access line carries it for streams too, the metric sums it
per key name across workers, and an answer from the response cache costs nothing.

The metrics by key (#25, metrics): tokens and cost carry the key's name from the keys file, or
the short id of an API_KEYS key (never the key or its digest), and a cache hit's tokens and
what it would have cost are counted apart, under its key."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Gunicorn, Upstream, access_line, metric_total, sdk_client, wait_until

from edge.auth import digest_of, short_id

KEY = "sk-cost-team-6a1d"
KEY_B = "sk-cost-team-b-90f3"
PLAIN = "sk-cost-plain-api-keys-5c2e"  # from API_KEYS: no name, labelled by its short id
PLAIN_ID = short_id(digest_of(PLAIN))
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
    keys.write_text(
        f'[[keys]]\nname = "team-a"\nkey = "{KEY}"\n[[keys]]\nname = "team-b"\nkey = "{KEY_B}"\n'
    )
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
        API_KEYS=PLAIN,
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


# ------------------------------------------------------------------ metrics by key


def scrape(server: Gunicorn) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def samples(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def label_values(text: str, name: str, label: str) -> set[str]:
    return {
        sample.labels[label]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def test_tokens_and_cost_are_counted_per_key(proxy):
    """Two named keys and an API_KEYS key, each over several requests (so several workers):
    each key's tokens and spend are its own answers' usage, at its targets' prices."""
    before = scrape(proxy)
    plan = [(KEY, "team-a", "priced", OUTPUT)] * 4 + [(KEY_B, "team-b", "cheap", CHEAP_OUTPUT)] * 3
    plan += [(PLAIN, PLAIN_ID, "priced", OUTPUT)] * 3
    tokens: dict[tuple[str, str, str], int] = {}
    spend: dict[str, float] = {}
    for key, label, model, output in plan:
        raw = sdk_client(proxy.url, key).chat.completions.with_raw_response.create(
            model=model, messages=ask("by key")
        )
        assert raw.headers["x-cache"] == "miss"
        used = raw.parse().usage
        for kind, count in (("prompt", used.prompt_tokens), ("completion", used.completion_tokens)):
            tokens[(label, model, kind)] = tokens.get((label, model, kind), 0) + count
        usd = (used.prompt_tokens * INPUT + used.completion_tokens * output) / 1e6
        assert float(raw.headers["x-edge-cost-usd"]) == pytest.approx(usd, abs=1e-8)
        spend[label] = spend.get(label, 0.0) + usd

    def counted() -> bool:
        after = scrape(proxy)
        for (label, model, kind), count in tokens.items():
            labels = {"key": label, "model": model, "kind": kind}
            grown = samples(after, "edge_tokens_total", **labels)
            if grown - samples(before, "edge_tokens_total", **labels) != count:
                return False
        return all(
            samples(after, "edge_cost_usd_total", key=label)
            - samples(before, "edge_cost_usd_total", key=label)
            == pytest.approx(usd, rel=1e-9)
            for label, usd in spend.items()
        )

    wait_until(counted)
    after = scrape(proxy)
    # Only identities of the key store are labels: the names, the API_KEYS key's short id.
    for name in ("edge_tokens_total", "edge_cost_usd_total"):
        assert label_values(after, name, "key") == {"team-a", "team-b", PLAIN_ID}, name
    assert PLAIN_ID.startswith("key-") and len(PLAIN_ID) == 16
    digest = hashlib.sha256(PLAIN.encode()).hexdigest()
    for secret in (PLAIN, KEY, KEY_B, digest, digest[:12], digest[-12:]):
        assert secret not in after
    assert PLAIN_ID[4:] not in digest


def test_a_cache_hit_is_saved_under_its_key_and_costs_nothing(proxy):
    """A hit adds its stored usage to the saved tokens and what it would have cost (the
    model's one target's prices: what the miss cost) to the saved USD, under its key; it adds
    nothing to the key's tokens or spend."""
    client = sdk_client(proxy.url, KEY_B)
    asked = ask("saved")
    miss = client.chat.completions.with_raw_response.create(model="cheap", messages=asked)
    assert miss.headers["x-cache"] == "miss"
    would_cost = float(miss.headers["x-edge-cost-usd"])
    used = miss.parse().usage
    assert would_cost == pytest.approx(
        (used.prompt_tokens * INPUT + used.completion_tokens * CHEAP_OUTPUT) / 1e6, abs=1e-8
    )
    team = {"key": "team-b"}
    cheap = {**team, "model": "cheap"}
    wait_until(lambda: samples(scrape(proxy), "edge_cost_usd_total", **team) >= would_cost)
    before = scrape(proxy)
    hits = 3
    for _ in range(hits):
        hit = client.chat.completions.with_raw_response.create(model="cheap", messages=asked)
        assert hit.headers["x-cache"] == "hit"
        assert float(hit.headers["x-edge-cost-usd"]) == 0

    def delta(text: str, name: str, **labels: str) -> float:
        return samples(text, name, **labels) - samples(before, name, **labels)

    def saved() -> bool:
        after = scrape(proxy)
        return delta(after, "edge_cache_saved_usd_total", **team) == pytest.approx(
            hits * would_cost, rel=1e-9
        ) and delta(after, "edge_cache_saved_tokens_total", **cheap, kind="completion") == (
            hits * used.completion_tokens
        )

    wait_until(saved)
    after = scrape(proxy)
    assert delta(after, "edge_cache_saved_tokens_total", **cheap, kind="prompt") == (
        hits * used.prompt_tokens
    )
    assert delta(after, "edge_cost_usd_total", **team) == 0
    assert delta(after, "edge_tokens_total", **team) == 0
    # The other keys saved nothing here.
    for other in ("team-a", PLAIN_ID):
        assert delta(after, "edge_cache_saved_usd_total", key=other) == 0


def test_the_metrics_by_key_pass_promtool_check(proxy):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    client = sdk_client(proxy.url, PLAIN)
    asked = ask("promtool")
    for _ in range(2):  # a miss and a hit: every family of this section has samples
        client.chat.completions.create(model="priced", messages=asked)
    body = scrape(proxy)
    for name in ("edge_tokens_total", "edge_cost_usd_total", "edge_cache_saved_usd_total"):
        assert samples(body, name, key=PLAIN_ID) > 0, name
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""
