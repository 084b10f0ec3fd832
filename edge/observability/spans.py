"""A sampled request's spans: the facts recorded on its way, and the spans built at its end.

Theory of operation. Python's OpenTelemetry SDK builds a live `Span` per operation (a lock, a
bounded attribute dict, a processor call on start and end): tens of microseconds each, paid
while the request is served. Here nothing of the SDK but its sampler runs for a request. A sampled
request carries one `SpanRecord` (`ctx.span`; None for every request the sampler declined, so
an unsampled request builds nothing) that the request path fills as it goes:

- the router starts and ends each upstream `Attempt` (`attempt`, `attempt_ended`), which gives
  the attempt its span id, sent upstream in the `traceparent` of that attempt;
- the pipeline notes the request's parameters (`request`) and the answer's model, id, finish
  reasons and, when content capture is on, its text (`answer`, or `watching` a stream);

and when the response ends (its last byte, for a stream) `build` turns the record and the
request context into finished spans, encoded for OTLP (edge.observability.otlp): one SERVER
span for the request and one CLIENT span per upstream attempt, its child, with the GenAI
semantic conventions. They go to the SDK's OTLP exporter through
`edge.observability.span_queue`. Times are `perf_counter` values on the way, converted to the
epoch once, here.

Nothing here does I/O. Keys never appear (the key's configured name does); message text only
when OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT is on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from edge.observability import otlp

if TYPE_CHECKING:
    from edge.observability.context import RequestContext
    from edge.routing.exchange import Call

# gen_ai.operation.name by the upstream path the call goes to (GenAI semantic conventions).
OPERATIONS = {
    "/chat/completions": "chat",
    "/messages": "chat",
    "/responses": "chat",
    "/completions": "text_completion",
    "/embeddings": "embeddings",
}
MAX_CONTENT_CHARS = 65_536  # message text on a span (captured only when asked for)
# What an upstream's answer puts on a span, bounded: a model name, finish reasons.
MAX_NAME_CHARS = 256
MAX_REASONS = 16
_TRACE_FIELDS = (b'_reason"', b'"model"')
_SECONDS_TO_NS = 1_000_000_000


class Attempt:
    """One upstream attempt: its span id, where it went, when, and how it ended."""

    __slots__ = (
        "address",
        "end",
        "error",
        "kind",
        "model",
        "port",
        "provider",
        "span_id",
        "start",
        "status",
    )

    def __init__(self, span_id: str, provider: Any, model: str | None) -> None:
        self.span_id = span_id
        self.provider = provider.name
        self.kind = provider.kind
        self.address, self.port = server_of(provider.base_url)
        self.model = model
        self.start = time.perf_counter()
        self.end: float | None = None  # None: a stream, ending with the response
        self.status: int | None = None
        self.error: str | None = None


class SpanRecord:
    """What a sampled request's spans will say, gathered on its way (see the module doc)."""

    __slots__ = (
        "attempts",
        "capture",
        "finish_reasons",
        "input",
        "max_tokens",
        "new_span_id",
        "operation",
        "output",
        "response_model",
        "said",
        "temperature",
        "top_p",
    )

    def __init__(self, new_span_id: Callable[[], str], capture: bool) -> None:
        self.new_span_id = new_span_id
        self.capture = capture
        self.attempts: list[Attempt] = []
        self.operation: str | None = None
        self.max_tokens: int | None = None
        self.temperature: float | None = None
        self.top_p: float | None = None
        self.response_model: str | None = None
        self.finish_reasons: list[str] = []
        self.input: str | None = None
        self.said: str | None = None  # a whole answer's output, captured as JSON
        self.output: list[str] = []  # a stream's captured text, in pieces

    # ------------------------------------------------------------ the request path

    def request(self, call: Call) -> None:
        """The call's operation and the parameters the GenAI conventions name."""
        self.operation = OPERATIONS.get(call.path)
        data = call.data
        if not data:
            return
        for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = data.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                self.max_tokens = value
                break
        self.temperature = _number(data.get("temperature"))
        self.top_p = _number(data.get("top_p"))
        if self.capture:
            asked = {
                name: data[name]
                for name in ("system", "instructions", "messages", "input", "prompt")
                if name in data
            }
            self.input = _bounded(orjson.dumps(asked).decode())

    def attempt(self, ctx: RequestContext, provider: Any, model: str | None) -> None:
        """An attempt at `provider` starts: its span id goes upstream in `traceparent`."""
        attempt = Attempt(self.new_span_id(), provider, model)
        self.attempts.append(attempt)
        ctx.traceparent_out = f"00-{ctx.trace_id}-{attempt.span_id}-{ctx.trace_flags}"

    def attempt_ended(self, status: int | None, error: str | None, streamed: bool) -> None:
        """The current attempt's outcome; a stream's attempt ends with the response."""
        attempt = self.attempts[-1]
        attempt.status, attempt.error = status, error
        if not streamed:
            attempt.end = time.perf_counter()

    def answer(self, data: dict[str, Any]) -> None:
        """A whole answer's model, id, finish reasons (and text, when captured)."""
        self._note(data)
        if self.capture:
            said = data.get("choices") or data.get("content") or data.get("output")
            if said is not None:
                self.said = _bounded(orjson.dumps(said).decode())

    def watching(self, then: Callable[[bytes], None] | None) -> Callable[[bytes], None]:
        """A stream's block watcher that notes what `answer` does, then calls `then`."""

        def on_block(block: bytes) -> None:
            if self.capture or any(field in block for field in _TRACE_FIELDS):
                for line in block.splitlines():
                    if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                        try:
                            event = orjson.loads(line[5:])
                        except orjson.JSONDecodeError:
                            continue
                        if isinstance(event, dict):
                            self._note_event(event)
            if then is not None:
                then(block)

        return on_block

    def _note(self, data: dict[str, Any]) -> None:
        if self.response_model is None and isinstance(data.get("model"), str):
            self.response_model = data["model"][:MAX_NAME_CHARS]
        reasons = self.finish_reasons
        choices = data.get("choices")
        if isinstance(choices, list):
            for choice in choices[:MAX_REASONS]:
                if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                    reasons.append(choice["finish_reason"][:MAX_NAME_CHARS])
        for holder in (data, data.get("delta")):  # Anthropic: a message, or its message_delta
            if isinstance(holder, dict) and isinstance(holder.get("stop_reason"), str):
                reasons.append(holder["stop_reason"][:MAX_NAME_CHARS])
        if len(reasons) > MAX_REASONS:
            del reasons[MAX_REASONS:]

    def _note_event(self, event: dict[str, Any]) -> None:
        for holder in ("message", "response"):  # Anthropic's message_start, Responses events
            inner = event.get(holder)
            if isinstance(inner, dict):
                self._note(inner)
        self._note(event)
        if not self.capture:
            return
        delta = event.get("delta")
        choices = event.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            delta = choices[0].get("delta")
            if not isinstance(delta, dict):
                delta = {"text": choices[0].get("text")}
        if isinstance(delta, dict):
            text = delta.get("content", delta.get("text"))
            if isinstance(text, str):
                self.output.append(text)
        elif isinstance(delta, str):  # the Responses API's output_text.delta
            self.output.append(delta)


def _given(attributes: dict[str, Any], *pairs: tuple[str, Any]) -> None:
    """Set the attributes whose value is known (not None)."""
    for key, value in pairs:
        if value is not None:
            attributes[key] = value


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_CONTENT_CHARS else text[:MAX_CONTENT_CHARS] + "…"


_SERVERS: dict[str, tuple[str | None, int | None]] = {}


def server_of(base_url: str) -> tuple[str | None, int | None]:
    """(server.address, server.port) of a configured base URL (kept: there are few)."""
    found = _SERVERS.get(base_url)
    if found is None:
        parts = urlsplit(base_url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        found = _SERVERS[base_url] = (parts.hostname, port)
    return found


# ------------------------------------------------------------------ building the spans


class SpanBuilder:
    """Turns a finished request (its context and SpanRecord) into encoded OTLP spans
    (edge.observability.otlp): the request's SERVER span, then a CLIENT span per attempt."""

    def __init__(self, scheme: str) -> None:
        self._scheme = scheme
        self._offset_ns = 0

    def _ns(self, perf: float) -> int:
        return int(perf * _SECONDS_TO_NS) + self._offset_ns

    def build(
        self,
        ctx: RequestContext,
        record: SpanRecord,
        method: str,
        status: int,
        first_token: float | None,
        end: float,
    ) -> list[bytes]:
        """The request's spans, finished at `end` (perf_counter), encoded."""
        # perf_counter seconds -> the epoch's nanoseconds, taken again for every request: the
        # wall clock may be stepped (NTP, a VM resumed) while the worker lives.
        self._offset_ns = time.time_ns() - int(time.perf_counter() * _SECONDS_TO_NS)
        trace_id = int(ctx.trace_id or "0", 16)
        span_id = int(ctx.span_id or "0", 16)
        state = ctx.tracestate or ""
        parent = None if ctx.parent_id is None else int(ctx.parent_id, 16)
        route = ctx.route
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "http.response.status_code": status,
            "url.scheme": self._scheme,
            "edge.request_id": ctx.request_id,
        }
        if route is not None:
            attributes["http.route"] = route.template
        if ctx.client is not None:
            attributes["client.address"] = ctx.client
        if ctx.identity is not None:
            attributes["edge.key.name"] = ctx.identity
        if ctx.cache is not None:
            attributes["edge.cache"] = ctx.cache  # hit, miss, coalesced, bypass, error
        if ctx.error_code is not None:
            attributes["edge.error.code"] = ctx.error_code  # a refusal: rate limit, budget, …
        # Failed: a 5xx, or an upstream that broke after the status was sent (a stream).
        upstream = ctx.upstream
        error = upstream.error if upstream is not None else None
        failed = status >= 500 or error is not None
        if failed:
            attributes["error.type"] = error or str(status)
        attempts = record.attempts
        events: tuple[tuple[str, int], ...] = ()
        if first_token is not None and not attempts:
            events = (("gen_ai.first_token", self._ns(first_token)),)
        shown = "HTTP" if method == "_OTHER" else method
        name = shown if route is None else f"{shown} {route.template}"
        end_ns = self._ns(end)
        spans = [
            otlp.span(
                trace_id, span_id, parent, parent is not None, state, name, otlp.SERVER,
                self._ns(ctx.start), end_ns, attributes, events, failed,
            )
        ]  # fmt: skip
        last = len(attempts) - 1
        for index, attempt in enumerate(attempts):
            spans.append(
                self._attempt_span(
                    ctx, record, attempt, index == last, first_token, end_ns, trace_id, span_id
                )
            )
        return spans

    def _attempt_span(
        self,
        ctx: RequestContext,
        record: SpanRecord,
        attempt: Attempt,
        last: bool,
        first_token: float | None,
        end_ns: int,
        trace_id: int,
        server_id: int,
    ) -> bytes:
        operation = record.operation
        model = attempt.model
        attributes: dict[str, Any] = {
            "gen_ai.provider.name": attempt.kind,
            "edge.provider": attempt.provider,
        }
        _given(
            attributes,
            ("gen_ai.operation.name", operation),
            ("gen_ai.request.model", model),
            ("server.address", attempt.address),
            ("server.port", attempt.port),
            ("gen_ai.request.max_tokens", record.max_tokens),
            ("gen_ai.request.temperature", record.temperature),
            ("gen_ai.request.top_p", record.top_p),
        )
        status, error = attempt.status, attempt.error
        if last and attempt.end is None and ctx.upstream is not None and error is None:
            error = ctx.upstream.error  # the stream broke after its first event
        failed = error is not None or status is None or status >= 400
        if failed:  # the reason a failover moved on, or the upstream's error status
            attributes["error.type"] = error or (str(status) if status else "_OTHER")
            if status is not None:
                attributes["http.response.status_code"] = status
        events: tuple[tuple[str, int], ...] = ()
        if last and not failed:
            _given(
                attributes,
                ("gen_ai.response.model", record.response_model),
                ("gen_ai.response.finish_reasons", record.finish_reasons or None),
                ("gen_ai.usage.input_tokens", ctx.prompt_tokens),
                ("gen_ai.usage.output_tokens", ctx.completion_tokens),
                ("gen_ai.input.messages", record.input),
            )
            output = record.said
            if output is None and record.output:
                text = _bounded("".join(record.output))
                output = orjson.dumps([{"role": "assistant", "content": text}]).decode()
            if output is not None:
                attributes["gen_ai.output.messages"] = output
            if first_token is not None:
                events = (("gen_ai.first_token", self._ns(first_token)),)
        name = f"{operation or 'POST'} {model}" if model else (operation or "POST")
        return otlp.span(
            trace_id, int(attempt.span_id, 16), server_id, False, ctx.tracestate or "", name,
            otlp.CLIENT, self._ns(attempt.start),
            end_ns if attempt.end is None else self._ns(attempt.end), attributes, events, failed,
        )  # fmt: skip
