"""edge.upstream.client.relay in-process, over a scripted upstream response: what the client
gets per upstream read, and how a stream broken mid-event ends."""

from __future__ import annotations

import asyncio
import json

import pytest

from edge.errors import stream_error_event
from edge.observability.context import RequestContext
from edge.routing.exchange import Events
from edge.routing.outcome import UpstreamOutcome
from edge.upstream import client as client_module
from edge.upstream.client import relay
from edge.upstream.http1 import Disconnected, InvalidResponse
from edge.upstream.sse import EventSplitter


class ScriptedResponse:
    """A live upstream stream (edge.upstream.client.StreamResponse): hands out the scripted
    reads one by one, then an exception or EOF."""

    def __init__(self, reads: list[bytes], fail: BaseException | None = None) -> None:
        self._reads = list(reads)
        self._fail = fail
        self.read_count = 0
        self.closed = False
        self.aborted = False

    async def readany(self) -> bytes:
        self.read_count += 1
        if self._reads:
            return self._reads.pop(0)
        if self._fail is not None:
            raise self._fail
        return b""

    def close(self) -> None:
        self.closed = True

    abort = close


def recorded() -> RequestContext:
    """A request context with an upstream outcome recorded, as the router leaves it."""
    ctx = RequestContext("rid", None)
    ctx.record_upstream(UpstreamOutcome())
    return ctx


def collect(reads: list[bytes], fail: BaseException | None = None):
    resp = ScriptedResponse(reads, fail)
    ctx = recorded()
    seen: list[bytes] = []
    ends: list[bool] = []

    async def run() -> list[bytes]:
        stream = relay(
            resp,  # type: ignore[arg-type]
            ctx.upstream,  # type: ignore[arg-type]
            stream_error_event,
            on_chunk=seen.append,
            on_end=ends.append,
        )
        return [block async for block in stream]

    blocks = asyncio.run(run())
    assert resp.closed
    # on_chunk sees exactly the upstream's events that go out (not our closing error event)
    assert blocks[: len(seen)] == seen and len(blocks) - len(seen) <= 1
    # the provider's breaker gets one verdict: a failure exactly when the stream ended on one
    assert ends == [ctx.upstream.error is None]
    return blocks, ctx


def event(n: int) -> bytes:
    return b'data: {"n": %d}\n\n' % n


def test_events_from_separate_reads_go_out_separately():
    blocks, ctx = collect([event(0), event(1), event(2) + b"data: [DONE]\n\n"])
    assert blocks == [event(0), event(1), event(2) + b"data: [DONE]\n\n"]
    assert ctx.upstream.error is None


def test_an_event_split_over_reads_goes_out_whole_when_complete():
    whole = event(1)
    blocks, _ = collect([event(0) + whole[:4], whole[4:9], whole[9:-1], whole[-1:]])
    assert blocks == [event(0), whole]


def error_of(block: bytes) -> dict:
    assert block.startswith(b"data: ") and block.endswith(b"\n\n")
    return json.loads(block[6:-2])["error"]


@pytest.mark.parametrize(
    "fail",
    [InvalidResponse("cut"), Disconnected("gone"), TimeoutError(), None],
    ids=["payload", "disconnect", "timeout", "clean-eof"],
)
def test_a_break_mid_event_drops_the_tail_and_ends_on_a_boundary(fail):
    half = b'data: {"half": tr'  # the upstream broke here
    blocks, ctx = collect([event(0), event(1) + half], fail)
    assert blocks[:2] == [event(0), event(1)]
    assert len(blocks) == 3
    assert b'"half"' not in b"".join(blocks)
    error = error_of(blocks[2])
    assert error["type"] == "upstream_error"
    assert error["code"] == f"upstream_{ctx.upstream.error}"
    assert ctx.upstream.error is not None


def test_the_routers_first_read_goes_through_the_splitter_too():
    """The router reads a stream's first bytes itself (to fail over a provider that sends no
    event); they are handed to the relay, so a first read that ends mid-event is held like any
    other, and a break then still ends on an event boundary."""
    resp = ScriptedResponse([b'"half": tr'], InvalidResponse("cut"))
    ctx = recorded()
    first = event(0) + b"data: {"

    async def run() -> list[bytes]:
        source = relay(resp, ctx.upstream, stream_error_event, first)  # type: ignore[arg-type]
        return [block async for block in source]

    blocks = asyncio.run(run())
    assert resp.closed
    assert blocks[0] == event(0)
    assert len(blocks) == 2 and b"half" not in blocks[1]
    assert error_of(blocks[1])["type"] == "upstream_error"


def test_a_relay_closed_before_it_started_is_released_by_its_stream():
    from edge.pipeline import ResponseStream

    resp = ScriptedResponse([event(0)])
    source = relay(resp, UpstreamOutcome(), stream_error_event)  # type: ignore[arg-type]
    events = Events(source, resp.abort, resp.close)  # as the router builds them
    asyncio.run(ResponseStream(aiter(events), events).close())
    assert resp.closed


def test_an_oversized_event_is_an_upstream_error(monkeypatch):
    monkeypatch.setattr(client_module, "EventSplitter", lambda: EventSplitter(100))
    blocks, ctx = collect([event(0), b"data: " + b"x" * 80, b"x" * 80, event(9)])
    assert blocks[0] == event(0)
    assert error_of(blocks[1])["code"] == "upstream_invalid"
    assert len(blocks) == 2 and ctx.upstream.error == "invalid"


def test_backpressure_no_read_ahead_of_the_consumer():
    resp = ScriptedResponse([event(i) for i in range(5)])
    outcome = UpstreamOutcome()

    async def run() -> None:
        stream = relay(resp, outcome, stream_error_event)  # type: ignore[arg-type]
        assert await anext(stream) == event(0)
        assert resp.read_count == 1  # nothing read beyond what was handed on
        assert await anext(stream) == event(1)
        assert resp.read_count == 2
        await stream.aclose()

    asyncio.run(run())
    assert resp.closed
