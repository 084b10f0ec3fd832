"""OpenTelemetry export end to end: real gunicorn (4 workers), a real upstream, the openai SDK,
and a real OTLP/HTTP receiver (tests/collector.py) decoding the protobuf the SDK's exporter
sends. What is checked: span names, kinds, attributes and links, the client's trace
continued, the upstream given the attempt span's context, the access line's ids, failover,
streams, refusals and cache hits, the sampler, the flush on a reload, and that a collector
that is down or slow costs the requests nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import httpx
import openai
import pytest
from collector import Collector, Span
from support import (
    Gunicorn,
    Upstream,
    access_line,
    free_port,
    metric_total,
    sdk_client,
    wait_until,
)

TEAM_KEY = "sk-trace-team-7f3a9c21"
TIGHT_KEY = "sk-trace-tight-0be41d77"
# Sent to the collector only, never logged; percent-encoded in the variable (a ";" must be).
COLLECTOR_SECRET = "collector;canary-5d2e8b"
COLLECTOR_SECRET_ENCODED = "collector%3Bcanary-5d2e8b"
PROMPT_CANARY = "prompt-canary-91c4"  # message text: exported only when capture is on
PACE = 0.2  # seconds between the upstream's stream chunks
CHUNKS = 3
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
ERROR = 2  # Status.StatusCode.STATUS_CODE_ERROR


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def upstream():
    server = Upstream("--pace", str(PACE), "--chunks", str(CHUNKS))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def collector():
    receiver = Collector()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def dead_port() -> int:
    return free_port()  # nothing listens there: connections are refused


def write_files(directory: Path, upstream: Upstream, dead_port: int) -> dict[str, str]:
    keys = directory / "keys.toml"
    keys.write_text(
        f'[[keys]]\nname = "trace-team"\nkey = "{TEAM_KEY}"\n\n'
        f'[[keys]]\nname = "trace-tight"\nkey = "{TIGHT_KEY}"\nrpm = 1\nburst = 1\n'
    )
    providers = directory / "providers.toml"
    providers.write_text(
        f'[providers.live]\nbase_url = "{upstream.url}/v1"\napi_key = "sk-up"\n'
        f'[providers.dead]\nbase_url = "http://127.0.0.1:{dead_port}/v1"\napi_key = "sk-up"\n'
        '[[models]]\nname = "m"\ntargets = [{ provider = "live" }]\n'
        '[[models]]\nname = "fail-over"\ntargets = [{ provider = "dead" }, { provider = "live" }]\n'
        '[[models]]\nname = "broken"\n'
        'targets = [{ provider = "live", model = "reset-mid-stream" }]\n'
        '[routing]\nstrategy = "priority"\n'
    )
    return {"API_KEYS_FILE": str(keys), "PROVIDERS_FILE": str(providers)}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, upstream, collector, dead_port):
    files = write_files(tmp_path_factory.mktemp("trace"), upstream, dead_port)
    server = Gunicorn(
        WORKERS="4",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_EXPORTER_OTLP_HEADERS=f"x-collector-key={COLLECTOR_SECRET_ENCODED}",
        OTEL_SERVICE_NAME="edge-under-test",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test,service.name=not-this-one",
        OTEL_BSP_SCHEDULE_DELAY="50",
        CACHE_BACKEND="local",
        RATE_LIMIT_BURST="100000",
        RATE_LIMIT_RPM="6000000",
        **files,
    )
    yield server
    server.stop()


def new_trace() -> tuple[str, str]:
    return os.urandom(16).hex(), os.urandom(8).hex()


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


def spans_of(collector: Collector, trace_id: str, count: int) -> list[Span]:
    """The trace's spans once `count` of them have arrived (exports are batched per worker)."""
    return wait_until(
        lambda: (found := collector.trace(trace_id)) and len(found) >= count and found
    )


def split(spans: list[Span]) -> tuple[Span, list[Span]]:
    servers = [span for span in spans if span.kind == SERVER]
    assert len(servers) == 1, spans
    clients = sorted((span for span in spans if span.kind == CLIENT), key=lambda s: s.start_ns)
    assert len(servers) + len(clients) == len(spans)
    return servers[0], clients


def messages(text: str = "hi") -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{text} {PROMPT_CANARY} {os.urandom(4).hex()}"}]


def span_counts(server: Gunicorn) -> dict[str, float]:
    return {
        result: metric_total(server, "edge_trace_spans_total", result=result)
        for result in ("exported", "failed", "dropped")
    }


# ------------------------------------------------------------------ one request, two spans


def test_a_request_is_a_server_span_with_a_child_span_per_attempt(proxy, upstream, collector):
    trace_id, parent = new_trace()
    request_id = unique("trace-one")
    client = sdk_client(proxy.url, TEAM_KEY)
    raw = client.chat.completions.with_raw_response.create(
        model="m",
        messages=messages(),
        max_tokens=20,
        temperature=0.25,
        extra_headers={
            "traceparent": f"00-{trace_id}-{parent}-01",
            "tracestate": "vendor=x",
            "x-request-id": request_id,
        },
    )
    answer = raw.parse()
    server, clients = split(spans_of(collector, trace_id, 2))

    # The server span: the client's span is its parent.
    assert server.parent_id == parent and server.trace_state == "vendor=x"
    assert server.name == "POST /v1/chat/completions"
    attributes = server.attributes
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"] == "/v1/chat/completions"
    assert attributes["http.response.status_code"] == 200
    assert attributes["url.scheme"] == "http"
    assert attributes["client.address"] == "127.0.0.1"
    assert attributes["edge.key.name"] == "trace-team"  # the name, never the key
    assert attributes["edge.request_id"] == request_id
    assert "error.type" not in attributes and server.status_code != ERROR
    assert server.resource["service.name"] == "edge-under-test"  # OTEL_SERVICE_NAME wins
    assert server.resource["deployment.environment"] == "test"

    # One attempt: a client span, child of the server span, in the GenAI conventions.
    (attempt,) = clients
    assert attempt.parent_id == server.span_id and attempt.name == "chat m"
    assert server.start_ns <= attempt.start_ns <= attempt.end_ns <= server.end_ns
    gen_ai = attempt.attributes
    assert gen_ai["gen_ai.operation.name"] == "chat"
    assert gen_ai["gen_ai.provider.name"] == "openai"
    assert gen_ai["gen_ai.request.model"] == "m"
    assert gen_ai["gen_ai.response.model"] == answer.model
    assert gen_ai["gen_ai.request.max_tokens"] == 20
    assert gen_ai["gen_ai.request.temperature"] == 0.25
    assert gen_ai["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert gen_ai["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert gen_ai["gen_ai.response.finish_reasons"] == (answer.choices[0].finish_reason,)
    assert gen_ai["server.address"] == "127.0.0.1" and gen_ai["server.port"] == upstream.port
    assert "http.response.status_code" not in gen_ai  # said on a failed attempt only

    # The upstream got the attempt span's context; the access line has the server span's ids.
    sent = upstream.seen(request_id)["headers"]
    assert sent["traceparent"] == f"00-{trace_id}-{attempt.span_id}-01"
    assert sent["tracestate"] == "vendor=x"
    line = access_line(proxy, request_id)
    assert (line["trace_id"], line["span_id"]) == (trace_id, server.span_id)

    # No message text (capture is off), no key; the collector's header reached it, unlogged.
    exported = json.dumps([span.attributes for span in collector.spans])
    assert PROMPT_CANARY not in exported and TEAM_KEY not in exported
    assert any(h.get("x-collector-key") == COLLECTOR_SECRET for h in collector.headers)
    assert collector.headers[0][":path"] == "/v1/traces"
    assert COLLECTOR_SECRET not in proxy.output()
    assert COLLECTOR_SECRET_ENCODED not in proxy.output()


def test_a_request_without_traceparent_starts_a_trace(proxy, collector):
    request_id = unique("trace-root")
    response = httpx.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "m", "messages": messages()},
        headers={"authorization": f"Bearer {TEAM_KEY}", "x-request-id": request_id},
        timeout=10,
    )
    assert response.status_code == 200
    line = access_line(proxy, request_id)
    server, clients = split(spans_of(collector, line["trace_id"], 2))
    assert server.parent_id == "" and server.span_id == line["span_id"]
    assert [span.parent_id for span in clients] == [server.span_id]


def test_a_stream_span_ends_with_the_stream(proxy, collector):
    trace_id, parent = new_trace()
    client = sdk_client(proxy.url, TEAM_KEY)
    stream = client.chat.completions.create(
        model="m",
        messages=messages(),
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and sum(1 for c in chunks if c.choices) == CHUNKS
    server, (attempt,) = split(spans_of(collector, trace_id, 2))
    events = dict(attempt.events)
    first = events["gen_ai.first_token"]
    assert attempt.start_ns <= first <= attempt.end_ns <= server.end_ns
    # The upstream pauses PACE after each of its chunks: a span that ended at the first
    # token, not at the stream's end, would be shorter than this.
    assert attempt.end_ns - first >= (CHUNKS - 1) * PACE * 1e9
    assert attempt.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attempt.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens


def test_a_stream_broken_mid_way_is_an_error_on_its_spans(proxy, collector):
    trace_id, parent = new_trace()
    with pytest.raises(openai.APIError):
        for _ in sdk_client(proxy.url, TEAM_KEY).chat.completions.create(
            model="broken",
            messages=messages(),
            stream=True,
            extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"},
        ):
            pass
    server, (attempt,) = split(spans_of(collector, trace_id, 2))
    assert server.attributes["http.response.status_code"] == 200  # sent before it broke
    for span in (server, attempt):
        assert span.attributes["error.type"] == "disconnect" and span.status_code == ERROR


def test_health_checks_and_scrapes_are_not_traced(proxy, collector):
    trace_id, parent = new_trace()
    headers = {"traceparent": f"00-{trace_id}-{parent}-01"}
    for path in ("/health/ready", "/metrics"):
        assert httpx.get(proxy.url + path, headers=headers, timeout=10).status_code == 200
    marker, marker_parent = new_trace()  # a traced request after them, on every worker
    for _ in range(8):
        response = httpx.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "m", "messages": messages()},
            headers={
                "authorization": f"Bearer {TEAM_KEY}",
                "traceparent": f"00-{marker}-{marker_parent}-01",
            },
            timeout=10,
        )
        assert response.status_code == 200
    spans_of(collector, marker, 16)
    assert collector.trace(trace_id) == []


def test_failover_is_two_attempt_spans_with_the_reason_on_the_first(
    proxy, collector, dead_port, upstream
):
    trace_id, parent = new_trace()
    answer = sdk_client(proxy.url, TEAM_KEY).chat.completions.create(
        model="fail-over",
        messages=messages(),
        extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    assert answer.choices[0].message.content  # the client saw no error
    server, (failed, served) = split(spans_of(collector, trace_id, 3))
    assert server.attributes["http.response.status_code"] == 200
    assert failed.parent_id == served.parent_id == server.span_id
    assert failed.attributes["server.port"] == dead_port
    assert failed.attributes["error.type"] == "connect" and failed.status_code == ERROR
    assert "gen_ai.response.model" not in failed.attributes
    assert failed.end_ns <= served.start_ns
    assert served.attributes["server.port"] == upstream.port
    assert served.attributes["gen_ai.response.model"] == answer.model
    assert "error.type" not in served.attributes


def test_refusals_and_cache_hits_are_on_the_server_span(proxy, collector):
    tight = sdk_client(proxy.url, TIGHT_KEY, max_retries=0)
    refused_trace = None
    for _ in range(3):  # a burst of 1: the second request at the latest is refused
        trace_id, parent = new_trace()
        try:
            tight.chat.completions.create(
                model="m",
                messages=messages(),
                extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"},
            )
        except openai.RateLimitError:
            refused_trace = trace_id
            break
    assert refused_trace is not None
    (server,) = spans_of(collector, refused_trace, 1)
    assert server.attributes["http.response.status_code"] == 429
    assert server.attributes["edge.error.code"] == "rate_limit_exceeded"
    assert server.attributes["edge.key.name"] == "trace-tight"

    asked = messages("cached")
    traces = []
    for _ in range(2):
        trace_id, parent = new_trace()
        traces.append(trace_id)
        response = httpx.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "m", "messages": asked},
            headers={
                "authorization": f"Bearer {TEAM_KEY}",
                "traceparent": f"00-{trace_id}-{parent}-01",
            },
            timeout=10,
        )
        assert response.status_code == 200
    assert response.headers["x-cache"] == "hit"
    miss, _ = split(spans_of(collector, traces[0], 2))
    assert miss.attributes["edge.cache"] == "miss"
    (hit,) = spans_of(collector, traces[1], 1)  # answered from the cache: no attempt
    assert hit.attributes["edge.cache"] == "hit"
    assert hit.attributes["http.response.status_code"] == 200


# ------------------------------------------------------------------ sampling, flushing


def test_the_sampler_decides_and_a_reload_flushes_what_was_queued(tmp_path, upstream, dead_port):
    """parentbased_traceidratio at 0: a request without a sampled parent exports nothing, and
    goes upstream unsampled; one with a sampled parent is exported. The schedule delay is ten
    minutes, so the spans can only come from the flush of a reload (HUP), then of the stop.
    Content capture is on here: the sampled request's text is on its attempt span."""
    receiver = Collector()
    server = Gunicorn(
        WORKERS="2",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.url + "/v1/traces",
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0",
        OTEL_BSP_SCHEDULE_DELAY="600000",
        OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true",
        **write_files(tmp_path, upstream, dead_port),
    )
    try:
        auth = {"authorization": f"Bearer {TEAM_KEY}"}
        with httpx.Client(timeout=10, headers=auth) as http:
            for index in range(10):
                request_id = unique(f"unsampled-{index}")
                body = {"model": "m", "messages": messages()}
                response = http.post(
                    server.url + "/v1/chat/completions",
                    json=body,
                    headers={"x-request-id": request_id},
                )
                assert response.status_code == 200
                assert upstream.seen(request_id)["headers"]["traceparent"].endswith("-00")
            trace_id, parent = new_trace()
            request_id = unique("sampled")
            asked = messages("sampled")
            response = http.post(
                server.url + "/v1/chat/completions",
                json={"model": "m", "messages": asked},
                headers={"traceparent": f"00-{trace_id}-{parent}-01", "x-request-id": request_id},
            )
            assert response.status_code == 200
            assert upstream.seen(request_id)["headers"]["traceparent"].endswith("-01")
        server.signal(signal.SIGHUP)
        _, (attempt,) = split(spans_of(receiver, trace_id, 2))
        assert asked[0]["content"] in attempt.attributes["gen_ai.input.messages"]
        assert (
            response.json()["choices"][0]["message"]["content"]
            in (attempt.attributes["gen_ai.output.messages"])
        )
    finally:
        server.stop()
        receiver.stop()
    assert {span.trace_id for span in receiver.spans} == {trace_id}


# ------------------------------------------------------------------ a collector that fails


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("kind", ["down", "slow"])
def test_a_collector_down_or_slow_costs_requests_nothing(tmp_path, upstream, dead_port, kind):
    """Export runs on its own thread: every request is answered (well within a client timeout
    shorter than one export's), and the spans that do not fit the queue are dropped and
    counted."""
    receiver = Collector(delay_s=60) if kind == "slow" else None
    server = Gunicorn(
        WORKERS="2",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url if receiver else closed_port_url(),
        OTEL_EXPORTER_OTLP_TIMEOUT="30000",
        OTEL_BSP_SCHEDULE_DELAY="20",
        OTEL_BSP_MAX_QUEUE_SIZE="4",
        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="2",
        **write_files(tmp_path, upstream, dead_port),
    )
    try:
        auth = {"authorization": f"Bearer {TEAM_KEY}"}
        with httpx.Client(timeout=5, headers=auth) as http:
            for _ in range(40):
                response = http.post(
                    server.url + "/v1/chat/completions",
                    json={"model": "m", "messages": messages()},
                )
                assert response.status_code == 200
        counts = wait_until(lambda: (found := span_counts(server)).get("dropped") and found)
        assert counts["dropped"] > 0 and not counts.get("exported")
    finally:
        server.stop()
        if receiver is not None:
            receiver.stop()


def test_a_bad_otel_value_stops_the_start_naming_the_variable(tmp_path):
    for variable, value in (
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "many"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
    ):
        server = Gunicorn(wait=False, **{variable: value})
        try:
            assert server.proc.wait(30) != 0
            assert variable in server.output()
        finally:
            server.stop()
