"""Observability end to end: metrics summed over real gunicorn workers, JSON logs, trace context.

Real gunicorn (3 workers), the real test upstream, httpx and the openai SDK as clients. The
module-scoped proxy is shared, so metric assertions compare a scrape before with one after
(deltas) and use request ids and models unique to each test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from support import Gunicorn, Upstream, free_port, sdk_client, wait_until

WORKERS = "3"
# Canary keys: valid (team key), valid with a tiny bucket, and never configured. None of them
# (nor their SHA-256 digests) may ever show up in a log line or a scrape.
TEAM_KEY = "sk-obs-canary-team-3e7d51a9"
TIGHT_KEY = "sk-obs-canary-tight-b40c2f66"
WRONG_KEY = "sk-obs-canary-wrong-9a1f0e27"
CANARIES = (TEAM_KEY, TIGHT_KEY, WRONG_KEY)
AUTH = {"authorization": f"Bearer {TEAM_KEY}"}
MESSAGES = [{"role": "user", "content": "Say hello"}]
CHAT = "/v1/chat/completions"
CHAT_200 = {"route": CHAT, "method": "POST", "status": "200"}
PACE = 0.1  # seconds between the upstream's SSE chunks
TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def upstream():
    server = Upstream("--slow", "5", "--pace", str(PACE), "--chunks", "3")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("obs-keys") / "keys.toml"
    path.write_text(
        f'[[keys]]\nname = "obs-team"\nkey = "{TEAM_KEY}"\n\n'
        f'[[keys]]\nname = "obs-tight"\nkey = "{TIGHT_KEY}"\nrpm = 1\nburst = 1\n'
    )
    return path


def start(upstream: Upstream, keys_file: Path, metrics_dir: Path | None, **env: str) -> Gunicorn:
    env.setdefault("WORKERS", WORKERS)
    env.setdefault("UPSTREAM_URL", upstream.url + "/v1")
    env.setdefault("API_KEYS_FILE", str(keys_file))
    # The team key is used for a few hundred requests here; only obs-tight is meant to run dry.
    env.setdefault("RATE_LIMIT_BURST", "100000")
    env.setdefault("RATE_LIMIT_RPM", "6000000")
    if metrics_dir is not None:
        # An operator-chosen directory, so the tests can also read each worker's own files.
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    server = Gunicorn(**env)
    try:
        # Gunicorn() returns once one worker answers; wait for all of them, so that no test
        # scrapes while a worker is still creating its metric files (see
        # test_scrape_tolerates_a_metrics_file_being_created).
        wait_started(server, int(env["WORKERS"]))
    except BaseException:
        server.stop()
        raise
    return server


def wait_started(server: Gunicorn, workers: int) -> None:
    """Wait until `workers` workers (in all, since the start) have finished starting up."""

    def started() -> bool:
        done = [r for r in records(server) if r["message"] == "Application startup complete."]
        return len(done) >= workers

    wait_until(started)


@pytest.fixture(scope="module")
def metrics_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("obs-metrics")


@pytest.fixture(scope="module")
def proxy(upstream, keys_file, metrics_dir):
    """Metrics and tracing on, a 1 s upstream deadline (the upstream's `slow` takes 5 s)."""
    server = start(upstream, keys_file, metrics_dir, SERVER_TIMEOUT_SECONDS="1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy_off(upstream, keys_file):
    """ENABLE_METRICS=false and ENABLE_TRACING=false."""
    server = start(upstream, keys_file, None, ENABLE_METRICS="false", ENABLE_TRACING="false")
    yield server
    server.stop()


# ------------------------------------------------------------------ helpers

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape_text(server: Gunicorn) -> str:
    # httpx.get opens a new connection each time, so consecutive scrapes may hit any worker.
    response = httpx.get(server.url + "/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def scrape(server: Gunicorn) -> Samples:
    return parse(scrape_text(server))


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels; 0 when it does not exist (yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` that has (at least) these labels."""
    return sum(
        count
        for (sample_name, sample_labels), count in samples.items()
        if sample_name == name and labels.items() <= dict(sample_labels).items()
    )


def buckets(samples: Samples, name: str, **labels: str) -> dict[float, float]:
    """{upper bound: cumulative count} of one histogram series."""
    result = {}
    for (sample_name, sample_labels), count in samples.items():
        found = dict(sample_labels)
        le = found.pop("le", None)
        if sample_name == name + "_bucket" and le is not None and found == labels:
            result[float(le)] = count
    return result


def worker_value(metrics_dir: Path, kind: str, pid: int, name: str, **labels: str) -> float:
    """One worker's own value of a metric, read from its multiprocess file."""
    path = metrics_dir / f"{kind}_{pid}.db"
    if not path.exists():
        return 0.0
    total = 0.0
    for family in MultiProcessCollector.merge([str(path)], accumulate=False):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def log_lines(server: Gunicorn) -> list[str]:
    """Complete lines of everything master and workers wrote (a line being written is left)."""
    text = server.output()
    lines = text.split("\n")[:-1]  # the last element is "" or an incomplete line
    return [line for line in lines if line.strip()]


def records(server: Gunicorn) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_lines(server)]


def access_lines(server: Gunicorn, request_id: str) -> list[dict[str, Any]]:
    return [
        record
        for record in records(server)
        if record.get("logger") == "edge.access" and record.get("request_id") == request_id
    ]


def access(server: Gunicorn, request_id: str) -> dict[str, Any]:
    """The one access line of `request_id`, waiting for it to be written."""

    def one() -> dict[str, Any] | None:
        found = access_lines(server, request_id)
        assert len(found) <= 1, found
        return found[0] if found else None

    return wait_until(one, timeout=10)


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


def chat(server: Gunicorn, model: str, request_id: str, **headers: str) -> httpx.Response:
    return httpx.post(
        server.url + CHAT,
        json={"model": model, "messages": MESSAGES},
        headers={**AUTH, "x-request-id": request_id, **headers},
        timeout=20,
    )


def sdk(server: Gunicorn, key: str = TEAM_KEY) -> openai.OpenAI:
    return sdk_client(server.url, key)


# ------------------------------------------------------------------ 1. counters across workers


def test_request_counter_is_exact_across_workers_and_scrapes(proxy, metrics_dir):
    n = 60
    before = value(scrape(proxy), "edge_requests_total", **CHAT_200)
    # No keep-alive: every request is a new connection, which any worker may accept.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=proxy.url, headers=AUTH, limits=limits, timeout=20) as client:
        for i in range(n):
            response = client.post(CHAT, json={"model": f"count-{i % 3}", "messages": MESSAGES})
            assert response.status_code == 200, response.text
    expected = before + n
    seen = [value(scrape(proxy), "edge_requests_total", **CHAT_200) for _ in range(8)]
    assert seen == [expected] * len(seen)

    # The sum is really over workers: more than one worker served these, and whichever
    # worker answered a scrape reported the total of all of them.
    per_worker = {
        pid: worker_value(metrics_dir, "counter", pid, "edge_requests_total", **CHAT_200)
        for pid in proxy.worker_pids()
    }
    assert len(per_worker) == int(WORKERS)
    assert sum(per_worker.values()) == expected
    assert sum(1 for count in per_worker.values() if count > 0) >= 2, per_worker
    build = {"version": "0.1.0", "python": platform.python_version()}
    assert value(scrape(proxy), "edge_build_info", **build) == 1


# ------------------------------------------------------------------ 2. a SIGKILLed worker


class StreamHolder(threading.Thread):
    """Opens a long streamed completion and reads it until told to stop (or it breaks)."""

    def __init__(self, url: str, request_id: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.request_id = request_id
        self.first_chunk = threading.Event()
        self.stop = threading.Event()
        self.broken: BaseException | None = None

    def run(self) -> None:
        body = {"model": "paced-300", "prompt": "hold", "stream": True}
        headers = {**AUTH, "x-request-id": self.request_id}
        try:
            with (
                httpx.Client(timeout=20) as client,
                client.stream(
                    "POST", self.url + "/v1/completions", json=body, headers=headers
                ) as response,
            ):
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        self.first_chunk.set()
                    if self.stop.is_set():
                        return
        except httpx.HTTPError as exc:  # the killed worker's connection drops
            self.broken = exc


def test_totals_survive_a_sigkilled_worker(upstream, keys_file, tmp_path):
    metrics_dir = tmp_path / "metrics"
    server = start(upstream, keys_file, metrics_dir)
    holders: list[StreamHolder] = []
    try:
        n = 45
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=server.url, headers=AUTH, limits=limits, timeout=20) as client:
            for _ in range(n):
                response = client.post(CHAT, json={"model": "kill", "messages": MESSAGES})
                assert response.status_code == 200, response.text

        # Streams in flight, so the victim dies with a non-zero in-flight gauge.
        holders = [StreamHolder(server.url, unique(f"obs-hold-{i}")) for i in range(6)]
        for holder in holders:
            holder.start()
        for holder in holders:
            assert holder.first_chunk.wait(10), "a held stream never started"
        pids = server.worker_pids()
        in_flight = {}

        def all_streams_counted() -> bool:
            in_flight.clear()
            for pid in pids:
                in_flight[pid] = worker_value(
                    metrics_dir, "gauge_livesum", pid, "edge_requests_in_flight"
                )
            return sum(in_flight.values()) == len(holders)

        wait_until(all_streams_counted)
        served = {
            pid: worker_value(metrics_dir, "counter", pid, "edge_requests_total", **CHAT_200)
            for pid in pids
        }
        assert sum(served.values()) == n
        candidates = [pid for pid in pids if in_flight[pid] > 0 and served[pid] > 0]
        assert candidates, (
            f"no worker both served requests and holds a stream: {served} {in_flight}"
        )
        victim = max(candidates, key=lambda pid: served[pid])
        victim_streams = int(in_flight[victim])

        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            now = server.worker_pids()
            return victim not in now and len(now) == int(WORKERS)

        wait_until(replaced)
        wait_started(server, int(WORKERS) + 1)  # the replacement is up
        server.wait_ready()
        for holder in holders:
            holder.stop.set()
        for holder in holders:
            holder.join(10)
            assert not holder.is_alive()
        assert sum(1 for holder in holders if holder.broken is not None) == victim_streams

        # Only the scrape itself is in flight once the surviving streams have finished: the
        # dead worker's gauge was folded out by child_exit (mark_process_dead).
        def settled() -> Samples | None:
            samples = scrape(server)
            return samples if value(samples, "edge_requests_in_flight") == 1 else None

        samples = wait_until(settled)
        assert value(samples, "edge_requests_total", **CHAT_200) == n  # the victim's included
        # Streams cut by the kill were never answered in full, the others were counted.
        finished = value(
            samples, "edge_requests_total", route="/v1/completions", method="POST", status="200"
        )
        assert finished == len(holders) - victim_streams
        assert not (metrics_dir / f"gauge_livesum_{victim}.db").exists()
        # Its counters were folded into the archive (child_exit), and its files removed.
        assert not (metrics_dir / f"counter_{victim}.db").exists()
        assert (metrics_dir / "counter_archive.db").exists()
        for _ in range(5):  # every worker, the new one too, reports the same total
            assert value(scrape(server), "edge_requests_total", **CHAT_200) == n
        assert any("SIGKILL" in record["message"] for record in records(server))
    finally:
        for holder in holders:
            holder.stop.set()
        server.stop()


def test_scrape_tolerates_a_metrics_file_being_created(proxy, metrics_dir):
    # What a scrape sees while a worker boots (start, HUP, TTIN, a replaced worker): the file
    # exists, empty, between MmapedDict's open() and its truncate() to the initial size.
    # Seen for real: 3 of ~650 scrapes during a 6-worker start were 500.
    creating = metrics_dir / "counter_999999.db"
    creating.touch()
    try:
        responses = [httpx.get(proxy.url + "/metrics", timeout=10) for _ in range(3)]
    finally:
        creating.unlink()
    assert [response.status_code for response in responses] == [200, 200, 200]


# ------------------------------------------------------------------ 3. promtool


def test_metrics_pass_promtool_check(proxy):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    # Some traffic first, so every kind of family has samples: histograms, labelled counters.
    assert chat(proxy, "promtool", unique("obs-prom")).status_code == 200
    stream = list(sdk(proxy).chat.completions.create(model="p", messages=MESSAGES, stream=True))
    assert stream
    assert chat(proxy, "m", unique("obs-prom"), authorization="Bearer nope").status_code == 401
    body = scrape_text(proxy)
    assert "edge_overhead_seconds_bucket" in body and "edge_tokens_total" in body
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
    )
    # Exit 0 and no lint findings at all (promtool prints them and exits 3).
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


# ------------------------------------------------------------------ 4. JSON logs


def test_every_log_line_is_json_and_access_line_is_complete(proxy, upstream):
    request_id = unique("obs-access")
    reply = sdk(proxy).chat.completions.create(
        model="gpt-obs", messages=MESSAGES, extra_headers={"x-request-id": request_id}
    )
    assert reply.usage.prompt_tokens == 5
    # Some other log producers too: a 404, a 401, an upstream timeout warning. Access lines
    # wait in the workers' buffers (ACCESS_LOG_FLUSH_MS): each is in before the count below.
    slow_id, missing_id, refused_id = (unique(f"obs-json-{n}") for n in ("slow", "404", "401"))
    assert chat(proxy, "slow", slow_id).status_code == 504
    missing = httpx.get(proxy.url + "/nowhere", headers={**AUTH, "x-request-id": missing_id})
    assert missing.status_code == 404
    refused = httpx.get(proxy.url + "/nowhere", headers={"x-request-id": refused_id})
    assert refused.status_code == 401
    for other in (slow_id, missing_id, refused_id):
        access(proxy, other)

    line = access(proxy, request_id)
    sent = TRACEPARENT_RE.match(upstream.seen(request_id)["headers"]["traceparent"])
    assert sent is not None
    assert line["level"] == "INFO"
    assert line["message"] == "request"
    assert line["method"] == "POST"
    assert line["path"] == CHAT
    assert line["status"] == 200
    assert line["model"] == "gpt-obs"
    assert line["identity"] == "obs-team"
    assert line["stream"] is False
    assert line["upstream_status"] == 200
    assert line["upstream_error"] is None
    assert line["prompt_tokens"] == 5
    assert line["completion_tokens"] == 7
    assert line["client"] == "127.0.0.1"
    assert line["trace_id"] == sent.group(1)
    assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] > 0
    assert isinstance(line["overhead_ms"], float | int)
    assert 0 <= line["overhead_ms"] <= line["duration_ms"]
    assert line["timestamp"]

    text = proxy.output()
    assert text.endswith("\n")
    raw_lines = [raw for raw in text.splitlines() if raw.strip()]
    assert len(raw_lines) > 20
    for raw in raw_lines:
        try:
            record = json.loads(raw)
        except ValueError:
            pytest.fail(f"log line is not JSON: {raw!r}")
        assert isinstance(record, dict), raw
        assert {"level", "logger", "message", "timestamp"} <= set(record), raw
    loggers = {json.loads(raw)["logger"] for raw in raw_lines}
    assert {"gunicorn.error", "uvicorn.error", "edge.access", "edge.upstream"} <= loggers


# ------------------------------------------------------------------ 5. no key in logs or metrics


def test_canary_keys_never_reach_logs_or_metrics(proxy):
    request_id = unique("obs-canary")
    for headers, status in (
        ({"x-api-key": TEAM_KEY}, 200),
        ({"authorization": f"Bearer {TEAM_KEY}"}, 200),
        ({"x-api-key": WRONG_KEY}, 401),
        ({"authorization": f"Bearer {WRONG_KEY}"}, 401),
        ({"authorization": f"Bearer {TEAM_KEY}", "x-api-key": WRONG_KEY}, 401),
        ({"authorization": f"Basic {WRONG_KEY}"}, 401),
    ):
        response = httpx.post(
            proxy.url + CHAT,
            json={"model": "canary", "messages": MESSAGES},
            headers={**headers, "x-request-id": request_id},
            timeout=20,
        )
        assert response.status_code == status, (headers, response.text)
        assert all(canary not in response.text for canary in CANARIES)
    with pytest.raises(openai.AuthenticationError):
        sdk(proxy, WRONG_KEY).chat.completions.create(model="canary", messages=MESSAGES)
    wait_until(lambda: len(access_lines(proxy, request_id)) == 6)

    logs, metrics = proxy.output(), scrape_text(proxy)
    assert "invalid" in metrics and "obs-team" in logs  # the failures and identity are there
    for canary in CANARIES:
        for secret in (canary, hashlib.sha256(canary.encode()).hexdigest()):
            assert secret not in logs
            assert secret not in metrics


# ------------------------------------------------------------------ 6. trace context


def test_client_trace_is_continued_upstream(proxy, upstream):
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    request_id = unique("obs-trace")
    response = chat(
        proxy,
        "traced",
        request_id,
        traceparent=f"00-{trace_id}-{span_id}-01",
        tracestate="vendor=x",
    )
    assert response.status_code == 200
    headers = upstream.seen(request_id)["headers"]
    sent = TRACEPARENT_RE.match(headers["traceparent"])
    assert sent is not None, headers["traceparent"]
    assert sent.group(1) == trace_id  # the same trace
    assert sent.group(2) != span_id and sent.group(2) != "0" * 16  # a new span for this hop
    assert sent.group(3) == "01"
    assert headers["tracestate"] == "vendor=x"
    assert access(proxy, request_id)["trace_id"] == trace_id


def test_trace_is_started_when_the_client_sent_none(proxy, upstream):
    ids = []
    for traceparent in (None, f"00-{'0' * 32}-{'1' * 16}-01", "garbage"):
        request_id = unique("obs-newtrace")
        extra = {} if traceparent is None else {"traceparent": traceparent}
        assert chat(proxy, "traced", request_id, **extra).status_code == 200
        headers = upstream.seen(request_id)["headers"]
        sent = TRACEPARENT_RE.match(headers["traceparent"])
        assert sent is not None, headers
        assert sent.group(1) != "0" * 32
        assert "tracestate" not in headers
        assert access(proxy, request_id)["trace_id"] == sent.group(1)
        ids.append(sent.group(1))
    assert len(set(ids)) == len(ids)


def test_no_trace_upstream_when_tracing_is_off(proxy_off, upstream):
    trace_id = os.urandom(16).hex()
    adopted, plain = unique("obs-off-adopt"), unique("obs-off-plain")
    # One keep-alive connection: nothing of the first request's trace may leak into the next.
    with httpx.Client(base_url=proxy_off.url, headers=AUTH, timeout=20) as client:
        for request_id, extra in (
            (adopted, {"traceparent": f"00-{trace_id}-{'2' * 16}-01"}),
            (plain, {}),
        ):
            response = client.post(
                CHAT,
                json={"model": "off", "messages": MESSAGES},
                headers={"x-request-id": request_id, **extra},
            )
            assert response.status_code == 200
    assert "traceparent" not in upstream.seen(plain)["headers"]
    assert "trace_id" not in access(proxy_off, plain)
    # A client's valid trace is still adopted with tracing off (only starting one is off).
    assert TRACEPARENT_RE.match(upstream.seen(adopted)["headers"]["traceparent"]).group(1) == (
        trace_id
    )
    assert access(proxy_off, adopted)["trace_id"] == trace_id


# ------------------------------------------------------------------ 7. request ids under load


def test_concurrent_requests_never_mix_request_ids(proxy):
    token = os.urandom(3).hex()
    count = 50

    async def fire() -> list[tuple[str, str, bool, httpx.Response]]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=proxy.url, headers=AUTH, limits=limits, timeout=30
        ) as client:

            async def one(i: int) -> tuple[str, str, bool, httpx.Response]:
                request_id, model, stream = f"obs-conc-{token}-{i:02d}", f"m-{token}-{i:02d}", i % 2
                response = await client.post(
                    CHAT,
                    json={"model": model, "messages": MESSAGES, "stream": bool(stream)},
                    headers={"x-request-id": request_id},
                )
                return request_id, model, bool(stream), response

            return await asyncio.gather(*(one(i) for i in range(count)))

    results = asyncio.run(fire())
    sent = {}
    for request_id, model, stream, response in results:
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == request_id
        assert f'"model": "{model}"' in response.text  # the upstream echoes the model
        sent[request_id] = (model, stream)

    def all_logged() -> dict[str, dict[str, Any]] | None:
        lines = [
            record
            for record in records(proxy)
            if record.get("logger") == "edge.access"
            and str(record.get("request_id")).startswith(f"obs-conc-{token}-")
        ]
        assert len(lines) <= count
        return {line["request_id"]: line for line in lines} if len(lines) == count else None

    logged = wait_until(all_logged)
    assert {rid: (line["model"], line["stream"]) for rid, line in logged.items()} == sent
    # Each request carried its own trace too.
    assert len({line["trace_id"] for line in logged.values()}) == count


# ------------------------------------------------------------------ 8. streams


def test_stream_metrics_and_access_line_after_the_end(proxy):
    # 1 s of stream: the mid-stream checks below must run before it ends, also on a loaded
    # machine (4 test processes on 2 cores), where a scrape and a log read can take 0.4 s.
    chunks = 10
    before = scrape(proxy)
    request_id = unique("obs-stream")
    started = time.monotonic()
    with (
        httpx.Client(base_url=proxy.url, headers=AUTH, timeout=20) as client,
        client.stream(
            "POST",
            CHAT,
            json={"model": f"paced-{chunks}", "messages": MESSAGES, "stream": True},
            headers={"x-request-id": request_id},
        ) as response,
    ):
        assert response.status_code == 200
        events = []
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            if not events:
                # Mid-stream: counted as in flight, and not logged yet.
                assert value(scrape(proxy), "edge_requests_in_flight") >= 2
                assert access_lines(proxy, request_id) == []
            events.append(line)
        elapsed_ms = (time.monotonic() - started) * 1000
    assert events[-1] == "data: [DONE]"
    assert len(events) == chunks + 2  # the content chunks, the usage chunk, [DONE]

    line = access(proxy, request_id)
    assert line["stream"] is True
    assert line["status"] == 200
    assert line["upstream_status"] == 200
    assert line["prompt_tokens"] == 3 and line["completion_tokens"] == chunks
    # Written when the stream ended, so it covers the whole of it (the upstream paces chunks).
    assert line["duration_ms"] >= chunks * PACE * 1000 * 0.9
    assert line["duration_ms"] <= elapsed_ms + 50

    after = scrape(proxy)
    for name in ("edge_stream_duration_seconds", "edge_stream_time_to_first_token_seconds"):
        assert value(after, name + "_count") == value(before, name + "_count") + 1, name
    ttft = value(after, "edge_stream_time_to_first_token_seconds_sum") - value(
        before, "edge_stream_time_to_first_token_seconds_sum"
    )
    duration = value(after, "edge_stream_duration_seconds_sum") - value(
        before, "edge_stream_duration_seconds_sum"
    )
    assert 0 < ttft < duration
    assert duration >= chunks * PACE * 0.9
    # By kind over all models: earlier tests may have used up a worker's 32 model labels, so
    # the model may be counted as "other".
    completion = total(after, "edge_tokens_total", kind="completion")
    assert completion == total(before, "edge_tokens_total", kind="completion") + chunks


# ------------------------------------------------------------------ 9. error counters


def test_upstream_errors_are_counted_by_kind(proxy):
    before = scrape(proxy)
    expected = {"timeout": 1, "5xx": 1, "invalid": 1}
    timed_out = unique("obs-timeout")
    assert chat(proxy, "slow", timed_out).status_code == 504
    assert chat(proxy, "error-500", unique("obs-500")).status_code == 500
    assert chat(proxy, "garbage", unique("obs-garbage")).status_code == 502
    after = scrape(proxy)
    for kind, increase in expected.items():
        assert value(after, "edge_upstream_errors_total", kind=kind) == (
            value(before, "edge_upstream_errors_total", kind=kind) + increase
        ), kind
    assert value(after, "edge_upstream_requests_total", outcome="error") == (
        value(before, "edge_upstream_requests_total", outcome="error") + 2  # timeout, garbage
    )
    assert value(after, "edge_upstream_requests_total", outcome="5xx") == (
        value(before, "edge_upstream_requests_total", outcome="5xx") + 1
    )
    line = access(proxy, timed_out)
    assert (line["status"], line["upstream_error"], line["upstream_status"]) == (
        504,
        "timeout",
        None,
    )
    # The upstream client's own warning carries the request's id and trace (ContextVars).
    warnings = [
        record
        for record in records(proxy)
        if record["logger"] == "edge.upstream" and record.get("request_id") == timed_out
    ]
    assert len(warnings) == 1 and warnings[0]["level"] == "WARNING"
    assert warnings[0]["trace_id"] == line["trace_id"]


def test_unreachable_upstream_counts_connect_errors(upstream, keys_file):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    server = start(upstream, keys_file, None, UPSTREAM_URL=dead)
    try:
        request_id = unique("obs-connect")
        assert chat(server, "m", request_id).status_code == 502
        samples = scrape(server)
        assert value(samples, "edge_upstream_errors_total", kind="connect") == 1
        assert value(samples, "edge_upstream_requests_total", outcome="error") == 1
        assert value(samples, "edge_requests_total", route=CHAT, method="POST", status="502") == 1
        assert access(server, request_id)["upstream_error"] == "connect"
    finally:
        server.stop()


def test_auth_failures_are_counted_by_reason(proxy):
    before = scrape(proxy)
    cases = (
        ({"authorization": f"Bearer {WRONG_KEY}"}, "invalid"),
        ({"x-api-key": WRONG_KEY}, "invalid"),
        ({}, "missing"),
        ({"authorization": "Basic abc"}, "empty"),
    )
    for headers, _ in cases:
        response = httpx.post(
            proxy.url + CHAT, json={"model": "m", "messages": MESSAGES}, headers=headers
        )
        assert response.status_code == 401
    after = scrape(proxy)
    for reason, increase in (("invalid", 2), ("missing", 1), ("empty", 1)):
        assert value(after, "edge_auth_failures_total", reason=reason) == (
            value(before, "edge_auth_failures_total", reason=reason) + increase
        ), reason
    labels = {"route": CHAT, "method": "POST", "status": "401"}
    assert value(after, "edge_requests_total", **labels) == (
        value(before, "edge_requests_total", **labels) + len(cases)
    )


def test_rate_limited_requests_are_counted(proxy):
    before = scrape(proxy)
    tight = sdk(proxy, TIGHT_KEY)  # burst 1, 1 per minute
    tight.chat.completions.create(model="tight", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        tight.chat.completions.create(model="tight", messages=MESSAGES)
    after = scrape(proxy)
    assert value(after, "edge_rate_limited_total") == value(before, "edge_rate_limited_total") + 1
    labels = {"route": CHAT, "method": "POST", "status": "429"}
    assert value(after, "edge_requests_total", **labels) == (
        value(before, "edge_requests_total", **labels) + 1
    )


# ------------------------------------------------------------------ 10. metrics off


def test_metrics_off_means_404_and_requests_still_work(proxy_off):
    response = httpx.get(proxy_off.url + "/metrics")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    request_id = unique("obs-off")
    reply = chat(proxy_off, "off", request_id)
    assert reply.status_code == 200
    assert reply.json()["usage"]["completion_tokens"] == 7
    assert access(proxy_off, request_id)["status"] == 200
    assert httpx.get(proxy_off.url + "/health/ready").status_code == 200


# ------------------------------------------------------------------ 11. overhead histogram


def test_overhead_histogram_has_sub_ms_buckets_and_excludes_upstream_time(proxy):
    route = {"route": CHAT}
    before = scrape(proxy)
    fast = 5
    for _ in range(fast):
        assert chat(proxy, "fast", unique("obs-fast")).status_code == 200
    slow_id = unique("obs-overhead-slow")
    assert chat(proxy, "slow", slow_id).status_code == 504  # ~1 s waiting on the upstream
    after = scrape(proxy)

    histogram = buckets(after, "edge_overhead_seconds", **route)
    sub_ms = {0.00005, 0.0001, 0.00025, 0.0005, 0.00075}
    assert sub_ms <= set(histogram), sorted(histogram)
    counts = [histogram[bound] for bound in sorted(histogram)]
    assert counts == sorted(counts)  # cumulative
    assert histogram[float("inf")] == value(after, "edge_overhead_seconds_count", **route)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("edge_overhead_seconds_count", **route) == fast + 1
    # The proxy's own time stays small even for the request that waited ~1 s upstream.
    assert delta("edge_overhead_seconds_bucket", le="0.1", **route) == fast + 1
    assert delta("edge_request_duration_seconds_sum", **route) >= 0.9
    assert delta("edge_overhead_seconds_sum", **route) < 0.5
    line = access(proxy, slow_id)
    assert line["duration_ms"] >= 900 and line["overhead_ms"] < 100


def test_stream_overhead_excludes_waiting_for_upstream_chunks(proxy):
    request_id = unique("obs-stream-overhead")
    with httpx.Client(base_url=proxy.url, headers=AUTH, timeout=20) as client:
        response = client.post(
            CHAT,
            json={"model": "paced-5", "messages": MESSAGES, "stream": True},
            headers={"x-request-id": request_id},
        )
    assert response.status_code == 200
    line = access(proxy, request_id)
    assert line["duration_ms"] >= 5 * PACE * 1000 * 0.9
    assert line["overhead_ms"] < 100, line
