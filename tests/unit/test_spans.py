"""Trace export's sans-I/O parts: the sampler's decision and the flags sent upstream, what a
SpanRecord notes of answers and streams, the spans SpanBuilder makes of them, the span queue's
batching, drops and shutdown, and the OTEL_* settings' validation."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import orjson
import pytest
from collector import attributes
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from support import wait_until

from edge.config import Config, ConfigError
from edge.endpoints.routes import API, Endpoint
from edge.errors import OPENAI
from edge.observability.context import RequestContext
from edge.observability.span_queue import MAX_BATCH_BYTES, SpanQueue
from edge.observability.spans import SpanRecord
from edge.observability.tracing import Tracing
from edge.routing.exchange import Call

ENDPOINT = "http://127.0.0.1:4318"
PARENT = "4bf92f3577b34da6a3ce929d0e0e4736"
CHAT = Endpoint("/v1/chat/completions", API, OPENAI, public=False, limited=True)


class Exporter:
    """The exporter's double: records the batches sent; `gate` (when set) holds each send."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list] = []
        self.gate = gate
        self.shut = False

    def send(self, batch):
        if self.gate is not None:
            self.gate.wait()
        self.batches.append(batch)
        return True

    def shutdown(self):
        self.shut = True


def queue_of(exporter: Exporter, max_queue: int, max_batch: int, counts: list) -> SpanQueue:
    def report(result: str, n: int) -> None:
        counts.append((result, n))

    return SpanQueue(exporter.send, exporter.shutdown, max_queue, max_batch, 3600, report)


def tracing(**env: str) -> tuple[Tracing, list[tuple[str, int]], Exporter]:
    counts: list[tuple[str, int]] = []
    metrics = SimpleNamespace(trace_spans=lambda result, n: counts.append((result, n)))
    exporter = Exporter()
    config = Config.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, **env})
    return Tracing(config, metrics, exporter.send), counts, exporter


def begin(tracer: Tracing, traceparent: str | None) -> RequestContext:
    ctx = RequestContext("rid-1", "10.0.0.7")
    ctx.set_trace(traceparent, None, start_new=True)
    tracer.begin(ctx)
    return ctx


# ------------------------------------------------------------------ sampling


@pytest.mark.parametrize(
    ("sampler", "arg", "parent_flags", "sampled"),
    [
        ("parentbased_always_on", "1", None, True),
        ("parentbased_always_on", "1", "00", False),  # the parent's decision is followed
        ("parentbased_always_off", "1", "01", True),
        ("parentbased_always_off", "1", None, False),
        ("parentbased_traceidratio", "0", None, False),
        ("parentbased_traceidratio", "0", "01", True),
        ("always_off", "1", "01", False),
        ("always_on", "1", "00", True),
        ("traceidratio", "0", "01", False),
        ("traceidratio", "1", "00", True),
    ],
)
def test_the_sampler_decides_and_upstream_is_told(sampler, arg, parent_flags, sampled):
    tracer, _, _ = tracing(OTEL_TRACES_SAMPLER=sampler, OTEL_TRACES_SAMPLER_ARG=arg)
    traceparent = None if parent_flags is None else f"00-{PARENT}-00f067aa0ba902b7-{parent_flags}"
    ctx = begin(tracer, traceparent)
    assert (ctx.span is not None) is sampled  # an unsampled request has no record at all
    assert ctx.traceparent_out is not None
    assert ctx.traceparent_out.endswith("-01" if sampled else "-00")
    assert ctx.traceparent_out.split("-")[2] == ctx.span_id
    if parent_flags is not None:
        assert ctx.trace_id == PARENT and ctx.parent_id == "00f067aa0ba902b7"


def test_a_ratio_samples_by_the_trace_id():
    tracer, _, _ = tracing(OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0.5")
    low = begin(tracer, f"00-{'1' * 16}{'0' * 16}-00f067aa0ba902b7-00")
    high = begin(tracer, f"00-{'1' * 16}{'f' * 16}-00f067aa0ba902b7-01")
    assert low.span is not None and high.span is None


# ------------------------------------------------------------------ what a record notes


def chunk(**fields) -> bytes:
    return b"data: " + orjson.dumps(fields) + b"\n\n"


OPENAI_STREAM = [
    chunk(id="c1", model="gpt-x", choices=[{"index": 0, "delta": {"content": "Hel"}}]),
    chunk(id="c1", model="gpt-x", choices=[{"index": 0, "delta": {"content": "lo"}}])
    + chunk(id="c1", model="gpt-x", choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    chunk(id="c1", model="gpt-x", choices=[], usage={"prompt_tokens": 3}),
    b"data: [DONE]\n\n",
]
ANTHROPIC_STREAM = [
    b"event: message_start\n"
    + chunk(type="message_start", message={"id": "msg_1", "model": "claude-x", "usage": {}}),
    b"event: content_block_delta\n"
    + chunk(type="content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"}),
    b"event: ping\ndata: {}\n\n",
    b"event: message_delta\n"
    + chunk(type="message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 1}),
]


@pytest.mark.parametrize(
    ("blocks", "model", "reasons", "text"),
    [
        (OPENAI_STREAM, "gpt-x", ["stop"], "Hello"),
        (ANTHROPIC_STREAM, "claude-x", ["end_turn"], "Hi"),
    ],
)
@pytest.mark.parametrize("capture", [False, True])
def test_a_stream_is_watched_for_its_model_and_finish(blocks, model, reasons, text, capture):
    record = SpanRecord(lambda: "1" * 16, capture)
    seen: list[bytes] = []
    watch = record.watching(seen.append)
    for block in blocks:
        watch(block)
    assert seen == blocks  # the usage watcher behind it still sees every block
    assert record.response_model == model
    assert record.finish_reasons == reasons
    assert "".join(record.output) == (text if capture else "")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_a_watcher_survives_any_block(block):
    record = SpanRecord(lambda: "1" * 16, True)
    record.watching(None)(block + b'"finish_reason" "model"')


def test_request_parameters_and_captured_content():
    data = {
        "model": "m",
        "messages": [{"role": "user", "content": "secret prompt"}],
        "max_completion_tokens": 9,
        "temperature": 0,
        "top_p": True,  # not a number: not reported
    }
    call = Call(OPENAI, "POST", "/chat/completions", b"", data, "m")
    for capture in (False, True):
        record = SpanRecord(lambda: "1" * 16, capture)
        record.request(call)
        assert (record.operation, record.max_tokens) == ("chat", 9)
        assert (record.temperature, record.top_p) == (0.0, None)
        assert (record.input is not None) is capture
        if capture:
            assert json.loads(record.input)["messages"] == data["messages"]


# ------------------------------------------------------------------ the spans built


def queued(tracer: Tracing) -> list[Span]:
    """The spans queued (not yet sent: the thread is not started), decoded."""
    return [Span.FromString(data) for data in tracer._queue._spans]


def finished(tracer: Tracing, ctx: RequestContext, status: int, first: float | None = None):
    assert ctx.span is not None
    tracer.finish(ctx, ctx.span, "POST", status, first, ctx.start + 1.0)
    return queued(tracer)


def test_a_failover_gives_a_span_per_attempt_and_the_answer_goes_on_the_last():
    tracer, _, _ = tracing()
    ctx = begin(tracer, f"00-{PARENT}-00f067aa0ba902b7-01")
    ctx.route, ctx.identity, ctx.model = CHAT, "team-a", "m"
    ctx.prompt_tokens, ctx.completion_tokens = 4, 2
    record = ctx.span
    record.request(Call(OPENAI, "POST", "/chat/completions", b"", {"max_tokens": 5}, "m"))
    dead = SimpleNamespace(name="dead", kind="openai", base_url="http://10.0.0.1:9/v1")
    live = SimpleNamespace(name="live", kind="anthropic", base_url="https://api.example/v1")
    record.attempt(ctx, dead, "m")
    first_out = ctx.traceparent_out
    record.attempt_ended(None, "connect", False)
    record.attempt(ctx, live, "claude-x")
    record.attempt_ended(200, None, True)  # a stream: ends with the response
    record.answer({"model": "claude-x-1", "id": "msg_9", "stop_reason": "end_turn"})
    server, failed, served = finished(tracer, ctx, 200, first=ctx.start + 0.5)
    said = {id(span): attributes(span.attributes) for span in (server, failed, served)}

    assert server.kind == Span.SPAN_KIND_SERVER and server.name == "POST /v1/chat/completions"
    assert server.parent_span_id.hex() == "00f067aa0ba902b7"
    assert server.flags == 0x300  # the parent is remote
    assert said[id(server)]["edge.key.name"] == "team-a"
    assert server.end_time_unix_nano - server.start_time_unix_nano == 1_000_000_000
    for span, provider in ((failed, "dead"), (served, "live")):
        assert span.kind == Span.SPAN_KIND_CLIENT and span.parent_span_id == server.span_id
        assert said[id(span)]["edge.provider"] == provider
        assert span.trace_id.hex() == PARENT and span.flags == 0x100
    assert first_out == f"00-{PARENT}-{failed.span_id.hex()}-01"
    assert ctx.traceparent_out == f"00-{PARENT}-{served.span_id.hex()}-01"
    failure, answer = said[id(failed)], said[id(served)]
    assert failure["error.type"] == "connect" and failed.status.code == 2
    assert failure["server.address"] == "10.0.0.1" and failure["server.port"] == 9
    assert "gen_ai.usage.input_tokens" not in failure and not failed.events
    assert served.name == "chat claude-x" and answer["server.port"] == 443
    assert answer["gen_ai.provider.name"] == "anthropic"
    assert answer["gen_ai.response.model"] == "claude-x-1"
    assert answer["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert answer["gen_ai.usage.input_tokens"] == 4
    assert answer["gen_ai.request.max_tokens"] == 5
    assert [event.name for event in served.events] == ["gen_ai.first_token"]
    # the stream's attempt ends with the response
    assert served.end_time_unix_nano == server.end_time_unix_nano


def test_a_server_error_and_an_unknown_method():
    tracer, _, _ = tracing()
    ctx = begin(tracer, None)
    assert ctx.span is not None
    tracer.finish(ctx, ctx.span, "BREW", 503, None, ctx.start + 0.1)
    (server,) = queued(tracer)
    assert server.parent_span_id == b"" and server.name == "HTTP"
    said = attributes(server.attributes)
    assert said["http.request.method"] == "_OTHER" and said["error.type"] == "503"
    assert server.status.code == 2


# ------------------------------------------------------------------ the queue


def test_the_queue_drops_whole_requests_when_full_and_counts_them():
    counts: list[tuple[str, int]] = []
    exporter = Exporter()
    queue = queue_of(exporter, 5, 2, counts)
    queue.put([b"a1", b"a2"])
    queue.put([b"b1", b"b2"])
    queue.put([b"c1", b"c2"])  # 6 > 5: dropped whole, not split
    assert counts == [("dropped", 2)]
    queue.start(None)  # full batches queued: exported at once, not after the schedule's hour
    wait_until(lambda: sum(map(len, exporter.batches)) == 4)
    queue.put([b"d1", b"d2"])  # a full batch wakes the thread again
    wait_until(lambda: sum(map(len, exporter.batches)) == 6)
    assert all(len(batch) <= 2 for batch in exporter.batches)
    exported = [span for batch in exporter.batches for span in batch]
    assert exported == [b"a1", b"a2", b"b1", b"b2", b"d1", b"d2"]
    queue.close(5)
    assert exporter.shut and ("exported", 2) in counts


def test_close_exports_what_is_queued_and_gives_up_on_a_stuck_exporter():
    gate = threading.Event()
    exporter = Exporter(gate)
    counts: list[tuple[str, int]] = []
    queue = queue_of(exporter, 100, 10, counts)
    queue.start(None)
    queue.put([b"x"] * 3)
    queue.close(0.2)  # the exporter is stuck: close returns after its bound anyway
    assert exporter.shut and not exporter.batches
    queue.put([b"late"])  # after close: dropped, never queued
    assert ("dropped", 1) in counts
    gate.set()
    wait_until(lambda: exporter.batches)
    assert exporter.batches == [[b"x"] * 3]


def test_a_batch_is_bounded_in_bytes_too():
    exporter = Exporter()
    queue = queue_of(exporter, 100, 50, [])
    big = b"x" * (MAX_BATCH_BYTES // 3)
    queue.put([big] * 4 + [b"y" * (MAX_BATCH_BYTES + 1)])  # the last one alone, too big
    queue._export()
    assert [len(batch) for batch in exporter.batches] == [3, 1, 1]


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "-0.1"),
        ("OTEL_TRACES_SAMPLER_ARG", "nan"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096"),  # above the queue's 2048
        ("OTEL_BSP_SCHEDULE_DELAY", "soon"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),  # not served: refused, not ignored
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://collector/v1/traces"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "no-equals-sign"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "bad header=1"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer tok;v=1"),  # ";" must be encoded
        ("OTEL_EXPORTER_OTLP_HEADERS", 'x-key="quoted"'),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-key=a%0Ab"),  # a line break, decoded
        ("OTEL_RESOURCE_ATTRIBUTES", "team=caf\udce9"),  # latin-1 bytes in the environment
        ("OTEL_SERVICE_NAME", "edge\x07"),
        ("OTEL_TRACES_EXPORTER", "jaeger"),
        ("OTEL_RESOURCE_ATTRIBUTES", "=value"),
        ("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "maybe"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(variable, value):
    with pytest.raises(ConfigError) as refused:
        Config.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, variable: value})
    assert refused.value.variable == variable


@settings(max_examples=200)
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40))
def test_a_header_value_is_never_echoed(value):
    secret = f"sk-{value}"
    try:
        config = Config.from_env({"OTEL_EXPORTER_OTLP_HEADERS": f"x-key={secret}\x00"})
    except ConfigError as refused:
        assert secret not in str(refused)
    else:  # pragma: no cover - a NUL never passes
        pytest.fail(f"accepted {config.otel_headers!r}")
    config = Config.from_env({"OTEL_EXPORTER_OTLP_HEADERS": "x-key=sk-1"})
    assert "sk-1" not in repr(config)


def test_export_is_on_only_with_tracing_and_an_endpoint():
    assert Config.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}).export_traces
    assert not Config.from_env({}).export_traces
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "ENABLE_TRACING": "false"}
    assert not Config.from_env(off).export_traces
    disabled = {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "true"}
    assert not Config.from_env(disabled).export_traces
    config = Config.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT + "/base/"})
    assert config.otel_traces_url == ENDPOINT + "/base/v1/traces"
    given_url = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT + "/custom"}
    assert Config.from_env(given_url).otel_traces_url == ENDPOINT + "/custom"
    headers = "a=1,b=x%20y, c = %20trimmed%20 ,d=semi%3Bcolon"
    config = Config.from_env({"OTEL_EXPORTER_OTLP_HEADERS": headers})
    assert config.otel_headers == (("a", "1"), ("b", "x y"), ("c", "trimmed"), ("d", "semi;colon"))
    none = {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}
    assert not Config.from_env(none).export_traces


def test_what_an_upstream_puts_on_a_span_is_bounded():
    record = SpanRecord(lambda: "1" * 16, False)
    choices = [{"finish_reason": "x" * 10_000}] * 1000
    record.answer({"model": "m" * 1_000_000, "choices": choices})
    assert len(record.response_model) == 256
    assert len(record.finish_reasons) == 16 and all(len(r) == 256 for r in record.finish_reasons)
    from edge.observability import otlp

    otlp._kept.clear()
    otlp.attributes(9, {"gen_ai.response.model": "m" * 300, "short": "s", "big": 1 << 70})
    assert list(otlp._kept) == [(9, "short", str, "s")]  # long strings are never kept
