"""A worker's finished spans wait here; a thread of its own sends them in batches.

The spans arrive encoded (edge.observability.otlp) and leave through the SDK exporter's HTTP
client (edge.observability.tracing). The batching is this class rather than the SDK's
`BatchSpanProcessor`, which takes SDK span objects, logs a warning for every span it drops
(behind a dead collector, a log line per request) and counts its drops only in the SDK's own
metrics, behind another variable and never in `/metrics`. This one keeps the processor's
settings (OTEL_BSP_*) and behaviour:

- a bounded queue (OTEL_BSP_MAX_QUEUE_SIZE); a request's spans go in together or not at all,
  and what does not fit is dropped at once and counted (`edge_trace_spans_total{result=
  "dropped"}`), so a slow, refusing or absent collector costs a request nothing;
- one thread, woken every OTEL_BSP_SCHEDULE_DELAY or as soon as a batch is full, sending
  batches of at most OTEL_BSP_MAX_EXPORT_BATCH_SIZE spans (and MAX_BATCH_BYTES): the request
  path only appends;
- at shutdown (and a reload) what is queued is sent within a bound, then the exporter is shut
  down.

Counts are handed back to the event loop's thread (`report`), which owns the metric files.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("edge.tracing")

# An export request's spans at most (one larger span goes alone): well under the 20 MiB an
# OpenTelemetry Collector accepts by default, whatever content capture puts on the spans.
MAX_BATCH_BYTES = 4 << 20


class SpanQueue:
    """Encoded spans waiting to be sent, and the thread that sends them (see the docstring)."""

    def __init__(
        self,
        send: Callable[[list[bytes]], bool],
        shutdown: Callable[[], None],
        max_queue: int,
        max_batch: int,
        delay_s: float,
        report: Callable[[str, int], None],
    ) -> None:
        """`send(batch)` sends encoded spans, True when the collector took them; `shutdown`
        ends the exporter; `report(result, count)` counts spans "exported" or "failed" (on the
        loop's thread, from `start`'s loop) and "dropped" (on `put`'s caller's thread)."""
        self._send = send
        self._shutdown = shutdown
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._delay_s = delay_s
        self._report = report
        self._spans: collections.deque[bytes] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Start the thread (in the worker, after the fork: a thread does not survive one)."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="edge-span-export", daemon=True)
        self._thread.start()

    def put(self, spans: list[bytes]) -> None:
        """Queue one request's spans, or drop them all if they do not fit. Never blocks."""
        queued = self._spans
        if len(queued) + len(spans) > self._max_queue or self._stopping:
            self._report("dropped", len(spans))
            return
        queued.extend(spans)
        if len(queued) >= self._max_batch and not self._wake.is_set():
            self._wake.set()

    def close(self, timeout_s: float) -> None:
        """Send what is queued, waiting at most `timeout_s`, then shut the exporter down.
        Blocks: call it off the event loop."""
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning(
                    "spans still queued at shutdown were not all exported in time",
                    extra={"queued": len(self._spans)},
                )
        try:
            self._shutdown()
        except Exception:  # the exporter's own failure: nothing more to do at shutdown
            log.exception("the span exporter failed to shut down")

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._export()
        self._export()  # what was queued before the stop

    def _export(self) -> None:
        spans = self._spans
        while spans:
            batch = [spans.popleft()]
            size = len(batch[0])
            while (
                spans and len(batch) < self._max_batch and size + len(spans[0]) <= MAX_BATCH_BYTES
            ):
                size += len(spans[0])
                batch.append(spans.popleft())
            try:
                ok = self._send(batch)
            except Exception:  # an exporter bug must not end the thread
                log.exception("the span exporter failed")
                ok = False
            self._tell("exported" if ok else "failed", len(batch))

    def _tell(self, result: str, count: int) -> None:
        loop = self._loop
        if loop is None:
            self._report(result, count)
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: the process is ending
            loop.call_soon_threadsafe(self._report, result, count)
