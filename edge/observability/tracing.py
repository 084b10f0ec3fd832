"""OpenTelemetry trace export for one worker: `Tracing`, built from the one Config.

On when ENABLE_TRACING is true and an OTLP endpoint is set (Config.export_traces). The worker
builds it after the fork (edge.runtime), starts its export thread at lifespan startup and
flushes it at shutdown, within the graceful timeout; the master never loads the SDK.

A request meets it twice, in edge.middleware:
- `begin`, as it starts: the sampler (the SDK's, from OTEL_TRACES_SAMPLER and its argument)
  decides on the request's trace (the client's `traceparent` continued, else a new one). The
  decision is the sampled flag sent upstream; a sampled request gets a `SpanRecord`
  (edge.observability.spans) and an unsampled one nothing at all;
- `finish`, as its response ends (the last byte of a stream): the record becomes encoded spans
  (edge.observability.spans, .otlp), queued for the export thread (.span_queue), which sends
  them with the SDK OTLP/HTTP exporter's client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from edge import __version__
from edge.config import Config
from edge.observability import otlp
from edge.observability.context import RequestContext, new_span_id
from edge.observability.metrics import METHOD_LABELS
from edge.observability.span_queue import SpanQueue
from edge.observability.spans import SpanBuilder, SpanRecord

DEFAULT_SERVICE_NAME = "llm-edge-proxy"
SCOPE = "llm-edge-proxy"


def sampler_for(config: Config) -> tuple[Any, Any]:
    """The SDK sampler OTEL_TRACES_SAMPLER names (its ratio from OTEL_TRACES_SAMPLER_ARG), and
    its root sampler: the one that decides on a trace without a parent."""
    from opentelemetry.sdk.trace import sampling

    name, ratio = config.otel_sampler, config.otel_sampler_arg
    root = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
    }[name.removeprefix("parentbased_")]
    return (sampling.ParentBased(root) if name.startswith("parentbased_") else root), root


def resource_for(config: Config) -> dict[str, Any]:
    """The resource's attributes: service.name (OTEL_SERVICE_NAME, else one in
    OTEL_RESOURCE_ATTRIBUTES, else ours), the other OTEL_RESOURCE_ATTRIBUTES, and the SDK's
    own (telemetry.sdk.*, service.instance.id)."""
    from opentelemetry.sdk.resources import Resource

    attributes = dict(config.otel_resource_attributes)
    service = config.otel_service_name or attributes.get("service.name") or DEFAULT_SERVICE_NAME
    attributes.update({"service.name": service, "service.version": __version__})
    return dict(Resource.create({}).merge(Resource(attributes)).attributes)


def exporter_for(config: Config) -> Any:
    """The SDK's OTLP/HTTP span exporter, configured from Config alone (TLS certificates and
    compression from its own OTEL_EXPORTER_OTLP_* variables).

    Its requests session does not read the environment (`trust_env`): otherwise every export
    scans the whole environment for proxy settings and stats certificate bundles, which was
    most of the export thread's time in a profile under load (about 2 ms an export). So the
    collector is reached directly, never through an HTTP(S)_PROXY."""
    import requests
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # The traces headers, when set, replace the general ones (the OTLP exporter spec).
    headers = dict(config.otel_traces_headers or config.otel_headers)
    session = requests.Session()
    session.trust_env = False
    return OTLPSpanExporter(
        endpoint=config.otel_traces_url,
        headers=headers,
        timeout=config.otel_timeout_s,
        session=session,
    )


def sender_for(exporter: Any, resource: dict[str, Any]) -> Callable[[list[bytes]], bool]:
    """A function that sends a batch of encoded spans (edge.observability.otlp) with the SDK
    exporter's HTTP client: its retries with backoff within OTEL_EXPORTER_OTLP_TIMEOUT, its
    headers, TLS and compression. The exporter's own `export` would encode the spans again,
    from SDK span objects, at several times the cost (see edge.observability.otlp); its client
    takes the bytes. That client is the exporter's `_client`: pyproject.toml bounds the
    version, and tests/unit/test_otlp.py fails if it moves."""
    client = exporter._client
    resource_bytes, scope = otlp.scope_header(resource, SCOPE, __version__)

    def send(batch: list[bytes]) -> bool:
        return bool(client.export(otlp.request(resource_bytes, scope, batch)).success)

    return send


class Tracing:
    """Sampling as a request starts, its spans at its end (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        metrics: Any = None,
        send: Callable[[list[bytes]], bool] | None = None,
    ) -> None:
        """`send`: sends a batch of encoded spans (tests); else the SDK exporter's client."""
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
        from opentelemetry.trace import set_span_in_context as in_context

        # A trace the gateway starts has no parent: the decision is the root sampler's (the
        # sampler itself, or a ParentBased's root), asked directly, or known at once when it
        # is constant (always_on, always_off). Asking the ParentBased sampler instead reads the
        # current context and builds result objects: some µs a request, for the same answer.
        self._sampler, self._root_sampler = sampler_for(config)
        kind = config.otel_sampler.removeprefix("parentbased_")
        self._root_always = {"always_on": True, "always_off": False}.get(kind)
        self._parent = lambda trace_id, span_id, flags: in_context(
            NonRecordingSpan(SpanContext(trace_id, span_id, True, TraceFlags(flags)))
        )
        self._capture = config.otel_capture_content
        self._builder = SpanBuilder("https" if config.tls else "http")
        self._metrics = metrics
        shutdown: Callable[[], None] = lambda: None  # noqa: E731
        if send is None:
            exporter = exporter_for(config)
            send, shutdown = sender_for(exporter, resource_for(config)), exporter.shutdown
        self._queue = SpanQueue(
            send,
            shutdown,
            config.otel_bsp_max_queue,
            config.otel_bsp_max_batch,
            config.otel_bsp_delay_s,
            self._count,
        )
        # A flush at shutdown may take at most half the graceful timeout: the other half is
        # the connections' to drain.
        self._flush_s = min(config.otel_bsp_export_timeout_s, config.graceful_timeout_s / 2)

    def _count(self, result: str, count: int) -> None:
        if self._metrics is not None:
            self._metrics.trace_spans(result, count)

    # ------------------------------------------------------------ per request

    def begin(self, ctx: RequestContext) -> None:
        """The sampler's decision on the request's trace (set by `ctx.set_trace`)."""
        trace_id = ctx.trace_id
        if trace_id is None:  # pragma: no cover - ENABLE_TRACING is on whenever this runs
            return
        if ctx.parent_id is None:
            sampled = self._root_always
            if sampled is None:
                decision = self._root_sampler.should_sample(None, int(trace_id, 16), "")
                sampled = decision.decision.is_sampled()
        else:
            number = int(trace_id, 16)
            parent = self._parent(number, int(ctx.parent_id, 16), int(ctx.trace_flags, 16))
            sampled = self._sampler.should_sample(parent, number, "").decision.is_sampled()
        ctx.set_sampled(sampled)
        if sampled:
            ctx.span = SpanRecord(new_span_id, self._capture)

    def finish(
        self,
        ctx: RequestContext,
        record: SpanRecord,
        method: str,
        status: int,
        first_token: float | None,
        end: float,
    ) -> None:
        """The finished request's spans, queued for export (or dropped and counted)."""
        # Another method is "_OTHER" (HTTP semantic conventions): bounded whatever a client sends.
        method = method if method in METHOD_LABELS else "_OTHER"
        self._queue.put(self._builder.build(ctx, record, method, status, first_token, end))

    # ------------------------------------------------------------ the worker's life

    def start(self) -> None:
        self._queue.start(asyncio.get_running_loop())

    async def aclose(self) -> None:
        await asyncio.to_thread(self._queue.close, self._flush_s)
