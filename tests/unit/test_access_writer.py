"""The access-line writer: whole lines, batched under PIPE_BUF on pipes, logging as a fallback."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select

import pytest

from edge.observability import logs
from edge.observability.context import RequestContext
from edge.routing.outcome import UpstreamOutcome


def context(request_id: str) -> RequestContext:
    ctx = RequestContext(request_id, "10.0.0.7")
    ctx.identity, ctx.model = "team", "gpt"
    ctx.record_upstream(outcome := UpstreamOutcome())
    outcome.status = 200
    ctx.prompt_tokens, ctx.completion_tokens = 3, 4
    return ctx


@pytest.fixture
def pipe_logger(monkeypatch: pytest.MonkeyPatch):
    """A writer routed as in production (one StreamHandler + JsonFormatter), onto a pipe."""
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    writer = logs.AccessWriter()
    writer.logger = logger = logging.Logger("test-access-pipe", logging.INFO)  # not in a tree
    logger.addHandler(handler)
    logger.propagate = False
    monkeypatch.setattr(logs, "_access", writer)
    yield read_fd, logger
    writer.flush()
    stream.close()
    os.close(read_fd)


def read_lines(fd: int) -> list[bytes]:
    data = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        data += chunk
    return data.splitlines(keepends=True)


def test_lines_wait_for_the_timer_then_come_out_whole(pipe_logger):
    read_fd, _ = pipe_logger

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        for i in range(3):
            logs.log_access(context(f"id-{i}"), "POST", "/v1/chat/completions", 200, 0.01, 0.001)
        assert logs._access._target is not None  # the fast path, not logging
        early = read_lines(read_fd)
        await asyncio.sleep(logs._access.interval_s * 3)
        return early, read_lines(read_fd)

    early, late = asyncio.run(scenario())
    assert early == []  # buffered, no write per line
    assert len(late) == 3
    line = json.loads(late[0])
    assert list(line)[:3] == ["level", "logger", "message"]
    assert (line["level"], line["logger"], line["message"]) == ("INFO", "edge.access", "request")
    assert line["request_id"] == "id-0" and line["identity"] == "team"
    assert line["prompt_tokens"] == 3 and line["completion_tokens"] == 4
    assert line["duration_ms"] == 10.0 and line["overhead_ms"] == 1.0
    assert "trace_id" not in line and line["timestamp"].endswith("+00:00")


def test_a_pipe_gets_writes_of_whole_lines_no_larger_than_pipe_buf():
    chunks = [b"x" * 1000 + b"\n"] * 9 + [b"y" * 5000 + b"\n"]
    batches = logs._batches(chunks, select.PIPE_BUF)
    assert b"".join(batches) == b"".join(chunks)
    assert all(batch.endswith(b"\n") for batch in batches)
    assert all(len(batch) <= select.PIPE_BUF for batch in batches[:-1])
    assert batches[-1] == chunks[-1]  # a line longer than PIPE_BUF goes alone


def test_size_threshold_flushes_without_a_loop(pipe_logger):
    read_fd, _ = pipe_logger
    logs.log_access(context("no-loop"), "GET", "/health", 200, 0.001, 0.001)
    assert len(read_lines(read_fd)) == 1  # no event loop: written at once


def test_warning_level_writes_nothing(pipe_logger):
    read_fd, logger = pipe_logger
    logger.setLevel(logging.WARNING)
    logs.log_access(context("quiet"), "GET", "/health", 200, 0.001, 0.001)
    logs.flush_access_log()
    assert read_lines(read_fd) == []


def test_other_routing_goes_through_logging(caplog):
    logger = logging.getLogger(logs.ACCESS_LOGGER)
    saved = logger.propagate
    logger.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger=logs.ACCESS_LOGGER):
            logs.log_access(context("via-logging"), "GET", "/x" * 300, 404, 0.002, 0.002)
    finally:
        logger.propagate = saved
    (record,) = [r for r in caplog.records if r.name == logs.ACCESS_LOGGER]
    assert record.access["request_id"] == "via-logging"
    assert len(record.access["path"]) == logs.MAX_LOGGED_PATH + 1  # cut, with an ellipsis
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["status"] == 404 and line["logger"] == "edge.access"


def test_line_and_paragraph_separators_are_escaped_like_other_line_breaks(pipe_logger):
    read_fd, _ = pipe_logger
    ctx = context("separators")
    ctx.model = "gpt\u2028evil\u2029model"
    logs.log_access(ctx, "POST", "/v1/\u2028chat\ncompletions", 200, 0.01, 0.001)
    logs.flush_access_log()
    (line,) = read_lines(read_fd)
    assert b"\xe2\x80\xa8" not in line and b"\xe2\x80\xa9" not in line
    assert b"\\u2028" in line and b"\\u2029" in line
    record = json.loads(line)
    assert record["model"] == "gpt\u2028evil\u2029model"  # the same text, once decoded
    assert record["path"] == "/v1/\u2028chat\ncompletions"


def test_a_raw_stream_broken_upstream_is_not_logged_again_as_an_application_error():
    """relay_raw ends a cut audio answer by raising StreamBroken, which uvicorn logs with a
    traceback; the relay's own warning says it already."""
    import logging
    import sys

    from edge.observability.logs import ContextFilter
    from edge.upstream.client import StreamBroken

    try:
        raise StreamBroken("cut")
    except StreamBroken:
        info = sys.exc_info()
    record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "boom", (), info)
    assert ContextFilter().filter(record) is False
    other = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "boom", (), None)
    assert ContextFilter().filter(other) is True
