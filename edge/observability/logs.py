"""Structured JSON logging (python-json-logger) for the app, the access log and gunicorn.

`logconfig_dict(config)` is handed to gunicorn, which applies it in the master and every
worker, so gunicorn's own error log, uvicorn's and ours all come out as one JSON object per line
on stderr. uvicorn's plain-text access log is switched off in `edge.server.worker`; the access
line is written by `edge.middleware` through the `edge.access` logger.

Nothing here logs a body, a key or an Authorization header: the access record is built from an
explicit list of fields.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson
from pythonjsonlogger.orjson import OrjsonFormatter

from edge.config import Config
from edge.observability.context import request_id_var, trace_id_var

ACCESS_LOGGER = "edge.access"


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
        return orjson.dumps(line).decode()


class ContextFilter(logging.Filter):
    """Stamp every record with the current request's id and trace id (from ContextVars)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "access" in record.__dict__:
            return True  # carries its own request and trace ids
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
            # Quieten libraries that would log at INFO on every connection.
            "aiohttp": {"level": "WARNING"},
        },
    }
