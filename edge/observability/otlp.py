"""OTLP's protobuf encoding of the gateway's spans, written by hand (sans I/O).

Why not the SDK's encoder: it builds every span as protobuf message objects (a `KeyValue` and an
`AnyValue` per attribute, each copied into its parent), about 25 µs a span on the benchmark
machine, 50 µs a traced request: more than all the rest of tracing together, and more than the
20 % of a request's CPU that tracing every request may cost (bench/run.py's tracing phase). The
few message types a span needs are written here directly, as bytes: a span is encoded once,
when its request ends, and a batch is those bytes concatenated under one resource and scope.

The bytes are checked against the SDK's own encoder (`encode_spans`), field by field after
decoding both with opentelemetry-proto: tests/unit/test_otlp.py, for generated spans. What goes
over the wire, with retries, headers, TLS and compression, is still the SDK exporter's
(edge.observability.tracing).

Wire format (protobuf): a field is a key, `field_number << 3 | wire_type`, then a varint
(type 0), 8 little-endian bytes (1), a length-prefixed payload (2), or 4 bytes (5). Fields of
opentelemetry.proto.trace.v1.Span and the messages it holds are numbered as in the .proto.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any

SERVER, CLIENT = 2, 3  # Span.SpanKind
STATUS_ERROR = 2  # Status.StatusCode
# SpanFlags: the flags say whether the parent is remote (the SDK sets both bits the same way).
HAS_IS_REMOTE, IS_REMOTE = 0x100, 0x200

_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack
_fixed32 = struct.Struct("<I").pack


def varint(value: int) -> bytes:
    """An unsigned varint; a negative int64 as its two's complement (ten bytes)."""
    if value < 0:
        value += 1 << 64
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes or an embedded message)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _string(number: int, text: str) -> bytes:
    # A lone surrogate (a JSON escape can make one) has no UTF-8: "?" rather than bytes a
    # collector would refuse the whole batch for.
    return _field(number, text.encode("utf-8", "replace"))


def any_value(value: Any) -> bytes:
    """An AnyValue: a string, bool, int, float, or a sequence of those (an ArrayValue)."""
    if isinstance(value, str):
        return _string(1, value)
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"\x18" + varint(value)
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, list | tuple):
        return _field(5, b"".join(_field(1, any_value(item)) for item in value))
    raise TypeError(f"no OTLP encoding here for a {type(value).__name__} attribute")


INT64 = range(-(1 << 63), 1 << 63)


def key_value(number: int, key: str, value: Any) -> bytes:
    """One KeyValue as field `number` (an empty AnyValue for None, as the SDK writes it); b""
    for an integer outside int64, which the SDK drops too."""
    if type(value) is int and value not in INT64:
        return b""
    return _field(number, _string(1, key) + _field(2, b"" if value is None else any_value(value)))


# Most attributes repeat from request to request (the method, the route, the provider, the
# model, the status): each is encoded once and kept, by field, key, type (True == 1, but its
# encoding differs) and value. Values unique to a request, and strings over KEPT_CHARS, are
# never kept, and the cache is emptied when full: bounded whatever clients or upstreams send.
UNIQUE_VALUES = frozenset(
    (
        "edge.request_id", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
        "gen_ai.input.messages", "gen_ai.output.messages",
    )
)  # fmt: skip
MAX_KEPT = 4096
KEPT_CHARS = 256
_kept: dict[tuple[int, str, type, Any], bytes] = {}


def attributes(number: int, pairs: Mapping[str, Any]) -> bytes:
    """Repeated KeyValue field `number`."""
    parts = []
    for key, value in pairs.items():
        kind = type(value)
        if (
            key in UNIQUE_VALUES
            or kind is list
            or kind is tuple
            or (kind is str and len(value) > KEPT_CHARS)
            or (kind is int and value not in INT64)
        ):
            parts.append(key_value(number, key, value))
            continue
        found = _kept.get((number, key, kind, value))
        if found is None:
            if len(_kept) >= MAX_KEPT:
                _kept.clear()
            found = _kept[number, key, kind, value] = key_value(number, key, value)
        parts.append(found)
    return b"".join(parts)


def span(
    trace_id: int,
    span_id: int,
    parent_id: int | None,
    remote_parent: bool,
    trace_state: str,
    name: str,
    kind: int,
    start_ns: int,
    end_ns: int,
    pairs: Mapping[str, Any],
    events: Iterable[tuple[str, int]] = (),
    error: bool = False,
) -> bytes:
    """One encoded Span message (without its field key: `request` frames it)."""
    parts = [
        b"\x0a\x10" + trace_id.to_bytes(16, "big"),
        b"\x12\x08" + span_id.to_bytes(8, "big"),
    ]
    if trace_state:
        parts.append(_string(3, trace_state))
    if parent_id is not None:
        parts.append(b"\x22\x08" + parent_id.to_bytes(8, "big"))
    parts += [
        _string(5, name),
        b"\x30" + varint(kind),
        b"\x39" + _fixed64(start_ns),
        b"\x41" + _fixed64(end_ns),
        attributes(9, pairs),
    ]
    for event_name, at_ns in events:
        parts.append(_field(11, b"\x09" + _fixed64(at_ns) + _string(2, event_name)))
    # Status: an empty message (UNSET) unless the span failed.
    parts.append(b"\x7a\x02\x18\x02" if error else b"\x7a\x00")
    flags = HAS_IS_REMOTE | (IS_REMOTE if remote_parent else 0)
    parts.append(b"\x85\x01" + _fixed32(flags))  # field 16, fixed32
    return b"".join(parts)


def scope_header(resource: Mapping[str, Any], name: str, version: str) -> tuple[bytes, bytes]:
    """The encoded Resource and InstrumentationScope a batch's spans are grouped under."""
    return attributes(1, resource), _string(1, name) + _string(2, version)


def request(resource: bytes, scope: bytes, spans: Iterable[bytes]) -> bytes:
    """An ExportTraceServiceRequest: one ResourceSpans holding one ScopeSpans of `spans`."""
    scope_spans = _field(1, scope) + b"".join(_field(2, one) for one in spans)
    resource_spans = _field(1, resource) + _field(2, scope_spans)
    return _field(1, resource_spans)
