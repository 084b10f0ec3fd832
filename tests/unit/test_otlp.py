"""The hand-written OTLP encoding (edge.observability.otlp) against the SDK's own encoder: for
generated spans, both are decoded with opentelemetry-proto and must be the same message. And the
SDK exporter's client, which sends the bytes, is where edge.observability.tracing expects it."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from edge.config import Config
from edge.observability import otlp
from edge.observability.tracing import exporter_for, sender_for

ids = st.integers(1, (1 << 64) - 1)
texts = st.text(max_size=30)
scalars = st.one_of(
    texts,
    st.booleans(),
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.integers(-(1 << 70), 1 << 70),  # outside int64: dropped, as the SDK drops it
    st.floats(allow_nan=False),
)
values = st.one_of(scalars, st.lists(texts, max_size=3).map(tuple))
keys = st.text(min_size=1, max_size=20)
states = st.sampled_from(["", "vendor=x", "a=1,b=2"])


@st.composite
def spans(draw):
    parent = draw(st.none() | ids)
    return {
        "trace_id": draw(st.integers(1, (1 << 128) - 1)),
        "span_id": draw(ids),
        "parent_id": parent,
        "remote_parent": parent is not None and draw(st.booleans()),
        "trace_state": draw(states),
        "name": draw(texts),
        "kind": draw(st.sampled_from([otlp.SERVER, otlp.CLIENT])),
        "start_ns": draw(st.integers(0, 1 << 63)),
        "end_ns": draw(st.integers(0, 1 << 63)),
        "pairs": draw(st.dictionaries(keys, values, max_size=6)),
        "events": draw(st.lists(st.tuples(texts, st.integers(0, 1 << 63)), max_size=2)),
        "error": draw(st.booleans()),
    }


def sdk_span(fields: dict, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    state = TraceState.from_header([fields["trace_state"]]) if fields["trace_state"] else None
    flags = TraceFlags(TraceFlags.SAMPLED)
    context = SpanContext(fields["trace_id"], fields["span_id"], False, flags, state)
    parent = None
    if fields["parent_id"] is not None:
        parent = SpanContext(fields["trace_id"], fields["parent_id"], fields["remote_parent"])
    kind = SpanKind.SERVER if fields["kind"] == otlp.SERVER else SpanKind.CLIENT
    return ReadableSpan(
        name=fields["name"],
        context=context,
        parent=parent,
        resource=resource,
        attributes=fields["pairs"],
        events=[Event(name, None, at) for name, at in fields["events"]],
        kind=kind,
        status=Status(StatusCode.ERROR if fields["error"] else StatusCode.UNSET),
        start_time=fields["start_ns"],
        end_time=fields["end_ns"],
        instrumentation_scope=scope,
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(spans(), min_size=1, max_size=4),
    st.dictionaries(keys, texts, max_size=4),
)
def test_encoded_spans_decode_as_the_sdk_encodes_them(generated, resource_attributes):
    resource = Resource(resource_attributes)
    scope = InstrumentationScope("llm-edge-proxy", "0.1.0")
    expected = encode_spans([sdk_span(fields, resource, scope) for fields in generated])
    header = otlp.scope_header(resource_attributes, scope.name, scope.version)
    ours = otlp.request(*header, [otlp.span(**fields) for fields in generated])
    assert ExportTraceServiceRequest.FromString(ours) == expected


@given(st.integers(-(1 << 63), (1 << 64) - 1))
def test_varints_decode_as_protobuf_reads_them(value):
    from google.protobuf.internal.decoder import _DecodeVarint

    decoded, end = _DecodeVarint(otlp.varint(value), 0)
    assert decoded == value % (1 << 64) and end == len(otlp.varint(value))


def test_the_sdk_exporter_client_takes_encoded_bytes(monkeypatch):
    """The bytes go out through the SDK exporter's `_client.export(data)`: present, and
    answering with `.success`, in the installed version (pyproject.toml bounds it)."""
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    config = Config.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    exporter = exporter_for(config)
    sent: list[bytes] = []

    class Answer:
        success = True

    monkeypatch.setattr(exporter._client, "export", lambda data: sent.append(data) or Answer())
    send = sender_for(exporter, {"service.name": "svc"})
    span = otlp.span(1, 2, None, False, "", "n", otlp.SERVER, 0, 1, {"k": "v"})
    assert send([span]) is True
    decoded = ExportTraceServiceRequest.FromString(sent[0])
    (resource_spans,) = decoded.resource_spans
    assert resource_spans.scope_spans[0].scope.name == "llm-edge-proxy"
    assert resource_spans.scope_spans[0].spans[0].name == "n"
    exporter.shutdown()
    assert os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") is None
