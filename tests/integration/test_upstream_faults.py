"""A misbehaving upstream behind real gunicorn (2 workers, SERVER_TIMEOUT_SECONDS=2).

Streams that break or stall mid-way end with an SSE error event; an upstream that never answers
is a 504 and garbage a 502, all within the deadline; a slow reader gets backpressure rather
than a proxy buffering the whole stream; a client hanging up mid-stream cancels the upstream
request; and a bounded mixed run leaves worker memory and descriptors where they were.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import soak  # bench/soak.py: the mixed load and the worker figures, shared with the soak benchmark
from support import Gunicorn, Upstream, assert_envelope, wait_until

from edge.upstream.sse import MAX_EVENT_BYTES

KEY = "sk-upstream-faults-key"
TIMEOUT = 2.0  # SERVER_TIMEOUT_SECONDS
SLACK = 4.0  # on top of a deadline: proves "no hang", not a speed bound
LONG_CHUNKS = 200_000  # ~46 MB of SSE from the long-stream model
CHAT = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def upstream():
    server = Upstream("--pace", "0.2", "--long-chunks", str(LONG_CHUNKS))
    yield server
    server.stop(timeout=3)  # `hang` handlers never finish: don't wait out aiohttp's shutdown


@pytest.fixture(scope="module")
def proxy(upstream):
    server = Gunicorn(
        API_KEYS=KEY,
        UPSTREAM_URL=upstream.url + "/v1",
        SERVER_TIMEOUT_SECONDS=str(TIMEOUT),
        MAX_REQUEST_SIZE=str(soak.MAX_BODY),
        RATE_LIMIT_RPM="1000000000",
        RATE_LIMIT_BURST="1000000000",
    )
    yield server
    server.stop()


def sdk(server: Gunicorn) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT + 10
    )


def post(server: Gunicorn, model: str, stream: bool = False, **kwargs) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": model, "messages": CHAT, "stream": stream},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=kwargs.pop("timeout", TIMEOUT + 10),
        **kwargs,
    )


def assert_upstream_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    return assert_envelope(response, status, code, type_="upstream_error")


def stream_until_error(server: Gunicorn, model: str) -> tuple[list[str], openai.APIError, float]:
    """Consume a stream with the SDK; (contents received, the error it raised, seconds from
    the last content chunk to the error)."""
    contents: list[str] = []
    last = time.monotonic()
    # Client and stream closed explicitly: the error's traceback holds this frame, and a socket
    # left to the garbage collector would surface as an unraisable ResourceWarning elsewhere.
    with sdk(server) as client, pytest.raises(openai.APIError) as raised:
        stream = client.chat.completions.create(model=model, messages=CHAT, stream=True)
        with stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    contents.append(chunk.choices[0].delta.content)
                    last = time.monotonic()
    return contents, raised.value, time.monotonic() - last


def ready(server: Gunicorn) -> None:
    assert httpx.get(server.url + "/health/ready", timeout=5).status_code == 200


# ------------------------------------------------------------------ broken streams


def test_reset_mid_stream_ends_with_an_error_event(proxy):
    contents, error, _ = stream_until_error(proxy, "reset-mid-stream")
    assert contents == ["c0 ", "c1 "]
    assert isinstance(error.body, dict)
    assert error.body["code"].startswith("upstream_")
    assert error.body["type"] == "upstream_error"


def test_reset_mid_stream_raw_text_names_the_upstream_failure(proxy):
    started = time.monotonic()
    response = post(proxy, "reset-mid-stream", stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert len(events) == 3  # two chunks, then the error event; no [DONE] after a failure
    assert '"code":"upstream_' in events[-1]
    assert time.monotonic() - started < TIMEOUT + SLACK


@pytest.mark.parametrize("model", ["cut-mid-event", "end-mid-event"])
def test_a_stream_broken_mid_event_is_an_api_error_for_the_sdk(proxy, model):
    # Before: the half event went out, the error event was appended to its line, and the SDK
    # raised JSONDecodeError (which pytest.raises(openai.APIError) does not catch).
    contents, error, _ = stream_until_error(proxy, model)
    assert contents == ["c0 ", "c1 "]
    assert isinstance(error.body, dict)
    assert error.body["type"] == "upstream_error"
    assert error.body["code"].startswith("upstream_")


@pytest.mark.parametrize("model", ["cut-mid-event", "end-mid-event"])
def test_a_stream_broken_mid_event_carries_whole_events_only(proxy, model):
    response = post(proxy, model, stream=True)
    assert response.status_code == 200
    text = response.text
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert len(events) == 3, text  # two chunks, the error event; the half event dropped
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
        assert isinstance(json.loads(event[len("data: ") :]), dict)
    assert json.loads(events[-1][len("data: ") :])["error"]["code"].startswith("upstream_")


def test_an_event_past_the_bound_ends_the_stream_with_an_error_event(proxy):
    # The incomplete event waiting for its end is bounded (MAX_EVENT_BYTES, 4 MiB): a 5 MiB
    # one is an upstream error, not 5 MiB of buffer per stream.
    assert MAX_EVENT_BYTES < 5 * 1024 * 1024
    contents, error, _ = stream_until_error(proxy, "huge-event")
    assert contents == ["c0 "]
    assert error.body["code"] == "upstream_invalid"


def test_events_written_in_pieces_reach_the_sdk_whole(proxy):
    with sdk(proxy) as client:
        stream = client.chat.completions.create(model="split-events", messages=CHAT, stream=True)
        with stream:
            contents = [c.choices[0].delta.content for c in stream if c.choices]
    assert contents == [f"c{i} " for i in range(5)]


def test_stall_mid_stream_ends_with_an_error_event_at_the_deadline(proxy):
    contents, error, waited = stream_until_error(proxy, "stall-mid-stream")
    assert contents == ["c0 ", "c1 "]
    assert error.body["code"] == "upstream_timeout"
    assert TIMEOUT - 0.5 <= waited <= TIMEOUT + SLACK, waited


# ------------------------------------------------------------------ no answer, bad answers


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_that_never_answers_is_504_within_the_deadline(proxy, stream):
    started = time.monotonic()
    response = post(proxy, "hang", stream=stream)
    elapsed = time.monotonic() - started
    assert_upstream_error(response, 504, "upstream_timeout")
    assert TIMEOUT - 0.5 <= elapsed <= TIMEOUT + SLACK, elapsed


def test_sdk_sees_the_504_as_an_api_status_error(proxy):
    with sdk(proxy) as client, pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="hang", messages=CHAT)
    assert raised.value.status_code == 504


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("model", ["garbage", "garbage-http"])
def test_garbage_from_the_upstream_is_502(proxy, model, stream):
    assert_upstream_error(post(proxy, model, stream=stream), 502, "bad_gateway")


# ------------------------------------------------------------------ slow reader, hang-ups


def worker_rss(server: Gunicorn) -> dict[int, int]:
    return {pid: soak.rss_kib(pid) for pid in server.worker_pids()}


def test_slow_reader_gets_backpressure_not_a_buffered_stream(proxy, upstream):
    finished = upstream.stats()["streams_finished"]
    baseline = worker_rss(proxy)
    peak = dict(baseline)
    body = {"model": "long-stream", "messages": CHAT, "stream": True}
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST", proxy.url + "/v1/chat/completions", json=body,
            headers={"authorization": f"Bearer {KEY}"},
        ) as response,
    ):  # fmt: skip
        assert response.status_code == 200
        chunks = response.iter_bytes()
        first = b""
        while len(first) < 4096:
            first += next(chunks)
        assert first.startswith(b"data: ")

        # Stop reading for ~2 s, watching the upstream and the workers meanwhile.
        paused_until = time.monotonic() + 2.0
        while time.monotonic() < paused_until:
            assert upstream.stats()["streams_finished"] == finished, "the stream ran ahead"
            for pid, rss in worker_rss(proxy).items():
                peak[pid] = max(peak.get(pid, 0), rss)
            time.sleep(0.2)
        # The whole stream is ~46 MB: had the proxy buffered it, the upstream would be done.
        assert upstream.stats()["streams_finished"] == finished
        grown = {pid: (peak[pid] - baseline.get(pid, peak[pid])) / 1024 for pid in peak}
        assert max(grown.values()) < 20, grown  # MiB

        size, tail = len(first), b""
        for chunk in chunks:
            size += len(chunk)
            tail = (tail + chunk)[-64:]
    assert tail.endswith(b"data: [DONE]\n\n"), tail
    assert size > 40_000_000
    wait_until(lambda: upstream.stats()["streams_finished"] == finished + 1, timeout=5)


def test_client_hanging_up_mid_stream_cancels_the_upstream_request(proxy, upstream):
    cancelled = upstream.stats()["streams_cancelled"]
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", proxy.url + "/v1/chat/completions",
            json={"model": "paced-50", "messages": CHAT, "stream": True},
            headers={"authorization": f"Bearer {KEY}"},
        ) as response,
    ):  # fmt: skip
        assert response.status_code == 200
        first = next(response.iter_bytes())
        assert first.startswith(b"data: ")
    hung_up = time.monotonic()
    # paced-50 at 0.2 s would run 10 s: the upstream must see the cancellation well before.
    wait_until(lambda: upstream.stats()["streams_cancelled"] == cancelled + 1, timeout=5)
    assert time.monotonic() - hung_up < 5
    ready(proxy)


def test_a_client_that_stops_reading_is_dropped_and_its_request_ends(upstream):
    """A client that sends a stream request and never reads: its socket fills, and after
    HTTP_SEND_TIMEOUT_SECONDS the connection is dropped and the request ends (the relay closes
    its upstream response), so it cannot hold a slot and an upstream connection at will."""
    server = Gunicorn(
        API_KEYS=KEY, UPSTREAM_URL=upstream.url + "/v1", HTTP_SEND_TIMEOUT_SECONDS="1", WORKERS="1"
    )
    request_id = f"never-reads-{time.monotonic_ns()}"
    try:
        body = json.dumps({"model": "long-stream", "messages": CHAT, "stream": True}).encode()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                b"x-request-id: " + request_id.encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )

            def finished() -> dict | None:  # the access line is written when the request ends
                for line in server.output().splitlines():
                    if request_id in line and '"edge.access"' in line:
                        return json.loads(line)
                return None

            # Never read: the long stream (~46 MB) would take as long as the client liked.
            record = wait_until(finished, timeout=15)
        assert record["duration_ms"] < 10_000, record
        assert httpx.get(server.url + "/health/ready", timeout=5).status_code == 200
    finally:
        server.stop()


def test_many_hang_ups_mid_stream_all_cancel_upstream(proxy, upstream):
    before = upstream.stats()
    driver = soak.Driver(proxy.url, KEY)
    try:
        problems = [driver.k_disconnect_mid_stream() for _ in range(20)]
    finally:
        driver.close()
    assert problems == [None] * 20
    wait_until(
        lambda: upstream.stats()["streams_cancelled"] == before["streams_cancelled"] + 20,
        timeout=5,
    )
    assert upstream.stats()["streams_finished"] == before["streams_finished"]


# ------------------------------------------------------------------ leak check


class Leak(AssertionError):
    """Memory that does not come back (kept apart from functional failures)."""


@pytest.mark.slow
def test_hang_ups_mid_stream_do_not_leak_memory(proxy, upstream):
    driver = soak.Driver(proxy.url, KEY)

    def hang_ups(count: int) -> None:
        with ThreadPoolExecutor(16) as pool:
            problems = list(pool.map(lambda _: driver.k_disconnect_mid_stream(), range(count)))
        assert problems == [None] * count

    pids = sorted(proxy.worker_pids())
    try:
        hang_ups(300)
        before = soak.settled(pids, proxy.port, upstream.port)
        hang_ups(2000)
        after = soak.settled(pids, proxy.port, upstream.port)
    finally:
        driver.close()
    soak.report(before, after)
    assert all(after[pid].client == 0 for pid in pids), after
    grown_mib = sum(after[pid].rss_kib - before[pid].rss_kib for pid in pids) / 1024
    if grown_mib >= 8:
        raise Leak(f"2000 hang-ups mid-stream: worker RSS grew {grown_mib:.1f} MiB in total")


@pytest.mark.slow
def test_mixed_run_leaves_memory_and_descriptors_flat(proxy, upstream):
    pids = sorted(proxy.worker_pids())
    warm = soak.run_mixed(proxy.url, 600, concurrency=16, key=KEY)
    assert warm.failed == 0, warm.failures
    before = soak.settled(pids, proxy.port, upstream.port)
    assert all(f.client == 0 for f in before.values()), before

    result = soak.run_mixed(proxy.url, 3000, concurrency=16, key=KEY)
    assert result.failed == 0, result.failures
    assert sum(result.outcomes.values()) == 3000
    assert all(result.outcomes[kind + ":ok"] for kind in soak.MIX), result.outcomes

    after = soak.settled(sorted(proxy.worker_pids()), proxy.port, upstream.port)
    soak.report(before, after)
    found = soak.problems(before, after, max_rss_growth_mib=15, max_fd_growth=16 + 4, pool_bound=16)
    assert not found, found
    ready(proxy)


def test_no_unhandled_errors_in_the_log(proxy):
    ready(proxy)
    log = proxy.output()
    assert "Exception in ASGI application" not in log
    assert "unhandled error" not in log
    assert "Traceback" not in log
