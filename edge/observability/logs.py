"""Structured JSON logging (python-json-logger) for the app, the access log and gunicorn.

`logconfig_dict(config)` is handed to gunicorn, which applies it in the master and every
worker, so gunicorn's own error log, uvicorn's and ours all come out as one JSON object per line
on stderr. uvicorn's plain-text access log is switched off in `edge.server.worker`; the access
line is written by `edge.middleware` through `log_access` below.

The access log is buffered. Each line is serialised with orjson straight from the request's
fields (no LogRecord, no formatter walk) and appended to a per-process buffer, written to the
`edge.access` logger's stream in whole lines: ACCESS_LOG_FLUSH_MS (50 ms) after the first
buffered line (a timer on the worker's event loop, so an idle worker never wakes up), as soon
as the buffer holds FLUSH_BYTES, at lifespan shutdown (`flush_access_log`, after uvicorn has
drained the connections on SIGTERM or a HUP reload) and at interpreter exit. A graceful stop
therefore loses no line; a SIGKILLed (or otherwise crashed) worker loses at most its buffer:
the lines of the last ACCESS_LOG_FLUSH_MS, at most FLUSH_BYTES. Every other record goes through
logging and python-json-logger as before, and when `edge.access` is routed anywhere other than
a plain StreamHandler with our JsonFormatter (a test's caplog, an operator's dictConfig) the
access line goes through logging too, with the same shape.

Nothing here logs a body, a key or an Authorization header: the access record is built from an
explicit list of fields.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import select
import stat
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from pythonjsonlogger.orjson import OrjsonFormatter

from edge.config import Config
from edge.observability.context import RequestContext, request_id_var, trace_id_var

ACCESS_LOGGER = "edge.access"
FLUSH_INTERVAL_S = 0.05
FLUSH_BYTES = 64 * 1024
MAX_LOGGED_PATH = 256
_RECORD_OWN = frozenset(("level", "logger", "message"))


class JsonFormatter(OrjsonFormatter):
    """python-json-logger's orjson formatter, with a fast path for the access log.

    An access record carries its fields, already JSON-ready, in `record.access`; serialising
    that dict directly skips python-json-logger's per-record walk over every LogRecord
    attribute, which was the largest single cost of logging a request. The output has the
    same shape as every other line: level, logger, message, the fields, timestamp.
    """

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__.get("access")
        if fields is None:
            return super().format(record)
        line = {"level": record.levelname, "logger": record.name, "message": record.msg}
        line.update(fields)
        line["timestamp"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat()
        return _escape_separators(orjson.dumps(line)).decode()


class ContextFilter(logging.Filter):
    """Stamp every record with the current request's id and trace id (from ContextVars)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "access" in record.__dict__:
            return True  # carries its own request and trace ids
        if record.exc_info and type(record.exc_info[1]).__name__ == "StreamBroken":
            # A raw answer (audio) that broke off upstream ends the response by raising
            # (edge.upstream.client.relay_raw), which uvicorn logs as an application error with
            # its traceback; the relay has logged the upstream's failure already, as a warning.
            return False
        # uvicorn adds an ANSI-coloured duplicate of its message; JSON logs don't want it.
        record.__dict__.pop("color_message", None)
        if not hasattr(record, "request_id"):
            request_id = request_id_var.get()
            if request_id is not None:
                record.request_id = request_id
        if not hasattr(record, "trace_id"):
            trace_id = trace_id_var.get()
            if trace_id is not None:
                record.trace_id = trace_id
        return True


def logconfig_dict(config: Config) -> dict[str, Any]:
    # Applied by gunicorn in the master, so every forked worker inherits the interval.
    _access.interval_s = config.access_log_flush_ms / 1000
    level = config.log_level.upper()
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "json",
        "filters": ["context"],
        "stream": "ext://sys.stderr",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "edge.observability.logs.ContextFilter"}},
        "formatters": {
            "json": {
                "()": "edge.observability.logs.JsonFormatter",
                "fmt": ["levelname", "name", "message"],
                "rename_fields": {"levelname": "level", "name": "logger"},
                "timestamp": True,
            }
        },
        "handlers": {"stderr": handler},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            # gunicorn's own access log does not apply to ASGI workers; ours is edge.access.
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            "uvicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            "uvicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            "edge": {"level": level, "handlers": ["stderr"], "propagate": False},
        },
    }


def log_access(
    ctx: RequestContext, method: str, path: str, status: int, total_s: float, overhead_s: float
) -> None:
    """The one JSON access line of a finished request (nothing when LOG_LEVEL is above info)."""
    writer = _access
    if not writer.logger.isEnabledFor(logging.INFO):
        return
    upstream = ctx.upstream  # the recorded outcome (edge.routing.outcome), if it went upstream
    # The whole line in its final order (level, logger, message, the fields, timestamp), built
    # once.
    line = {
        "level": "INFO",
        "logger": ACCESS_LOGGER,
        "message": "request",
        "request_id": ctx.request_id,
        "method": method,
        "path": path if len(path) <= MAX_LOGGED_PATH else path[:MAX_LOGGED_PATH] + "…",
        "status": status,
        "duration_ms": round(total_s * 1000, 3),
        "overhead_ms": round(overhead_s * 1000, 3),
        "client": ctx.client,
        "identity": ctx.identity,
        "model": ctx.model,
        "stream": ctx.stream,
        "upstream_status": None if upstream is None else upstream.status,
        "upstream_error": None if upstream is None else upstream.error,
        "prompt_tokens": ctx.prompt_tokens,
        "completion_tokens": ctx.completion_tokens,
        "provider": None if upstream is None else upstream.provider,
        "attempts": 0 if upstream is None else upstream.attempts,
    }
    if ctx.cost_usd is not None:
        line["cost_usd"] = round(ctx.cost_usd, 8)  # edge.cost: usage at the target's prices
    if ctx.cache is not None:
        line["cache"] = ctx.cache  # hit, miss, bypass, coalesced or error (CACHE_BACKEND set)
    if ctx.trace_id is not None:
        line["trace_id"] = ctx.trace_id
        line["span_id"] = ctx.span_id  # the server span's, when spans are exported
    writer.write(line)


def log_refusal(
    request_id: str, method: str | None, path: str | None, status: int, client: str | None,
    reason: str,
) -> None:  # fmt: skip
    """The access line of a request the HTTP protocol refused before the app saw it (400, 408,
    414, 431, 503 at the concurrency cap, an h2c preface): what is known of it, and why."""
    writer = _access
    if not writer.logger.isEnabledFor(logging.INFO):
        return
    if path is not None and len(path) > MAX_LOGGED_PATH:
        path = path[:MAX_LOGGED_PATH] + "…"
    line = {
        "level": "INFO",
        "logger": ACCESS_LOGGER,
        "message": "request",
        "request_id": request_id,
        "method": method,
        "path": path,
        "status": status,
        "client": client,
        "refused": reason,
    }
    writer.write(line)


def flush_access_log() -> None:
    """Write out the buffered access lines now (lifespan shutdown, interpreter exit)."""
    _access.flush()


class AccessWriter:
    """The per-process access-line buffer (see the module docstring)."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(ACCESS_LOGGER)
        self.interval_s = FLUSH_INTERVAL_S
        self._chunks: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._target: tuple[int, int] | None = None  # (fd, bytes per write), once resolved
        self._resolved_for: Any = None
        self._second = -1
        self._second_text = ""

    def write(self, line: dict[str, Any]) -> None:
        """Buffer one access line: `line` holds level, logger, message and the fields, in that
        order; the timestamp is added here."""
        target = self._resolve()
        if target is None:
            self._through_logging(line)
            return
        line["timestamp"] = self._timestamp()
        data = _escape_separators(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a script, a sync test): write at once
                self.flush()
                return
            self._timer = loop.call_later(self.interval_s, self._on_timer)

    def _timestamp(self) -> str:
        """ISO 8601 in UTC with microseconds, as the formatter writes it; the date and time to
        the second are formatted once a second (datetime's isoformat costs ~1-3 µs)."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._second_text}.{int((now - second) * 1e6):06d}+00:00"

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._chunks:
            return
        chunks, self._chunks, self._size = self._chunks, [], 0
        target = self._target
        if target is None:  # pragma: no cover - lines are only buffered once resolved
            return
        fd, most = target
        try:
            for batch in _batches(chunks, most):
                view = memoryview(batch)
                while view:
                    try:
                        view = view[os.write(fd, view) :]
                    except BlockingIOError:  # a non-blocking stderr that is full: wait
                        select.select([], [fd], [], 1.0)
        except OSError:  # stderr is gone (closed pipe): nothing better to do with the lines
            pass

    def _resolve(self) -> tuple[int, int] | None:
        """(fd, largest write) of the logger's stream if it is a plain JSON StreamHandler."""
        handlers = _effective_handlers(self.logger)
        if handlers is self._resolved_for or handlers == self._resolved_for:
            return self._target
        self.flush()  # logging was reconfigured: lines buffered so far go where they were meant
        self._resolved_for = handlers
        self._target = None
        if len(handlers) == 1:
            handler = handlers[0]
            if type(handler) is logging.StreamHandler and isinstance(
                handler.formatter, JsonFormatter
            ):
                try:
                    handler.flush()
                    fd = handler.stream.fileno()
                    mode = os.fstat(fd).st_mode
                except (AttributeError, OSError, ValueError):
                    return None
                # Writes to a pipe or socket (journald, a supervisor) shared by every worker
                # are atomic only up to PIPE_BUF, so batches never exceed it there.
                most = FLUSH_BYTES if stat.S_ISREG(mode) else select.PIPE_BUF
                self._target = (fd, most)
        return self._target

    def _through_logging(self, line: dict[str, Any]) -> None:
        # makeRecord + handle is what Logger.info does, minus the caller lookup. The record
        # carries the fields only: level, logger and message are the record's own.
        fields = {name: value for name, value in line.items() if name not in _RECORD_OWN}
        record = self.logger.makeRecord(
            ACCESS_LOGGER,
            logging.INFO,
            __file__,
            0,
            "request",
            (),
            None,
            extra={"access": fields},
        )
        self.logger.handle(record)

    def after_fork(self) -> None:
        """A child starts with an empty buffer: the parent's lines are the parent's to write."""
        self._chunks, self._size, self._timer = [], 0, None


_LS, _PS = "\u2028".encode(), "\u2029".encode()


def _escape_separators(data: bytes) -> bytes:
    """JSON allows U+2028 and U+2029 raw in strings, but JavaScript (and some log viewers)
    take them as line breaks: escaped as `\\u2028` and `\\u2029`, like the other line breaks
    (a path or a model name is client input)."""
    if b"\xe2\x80" not in data:
        return data
    return data.replace(_LS, b"\\u2028").replace(_PS, b"\\u2029")


def _effective_handlers(logger: logging.Logger) -> list[logging.Handler]:
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        handlers.extend(current.handlers)
        if not current.propagate:
            break
        current = current.parent
    return handlers


def _batches(chunks: list[bytes], most: int) -> list[bytes]:
    """Whole lines joined into writes of at most `most` bytes (a longer line goes alone)."""
    if sum(map(len, chunks)) <= most:
        return [b"".join(chunks)]
    batches: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for chunk in chunks:
        if current and size + len(chunk) > most:
            batches.append(b"".join(current))
            current, size = [], 0
        current.append(chunk)
        size += len(chunk)
    if current:
        batches.append(b"".join(current))
    return batches


_access = AccessWriter()
atexit.register(flush_access_log)
os.register_at_fork(after_in_child=_access.after_fork)
