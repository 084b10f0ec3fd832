"""One owner per upstream outcome: the router records one UpstreamOutcome on the request, once,
and the metrics and the access line read exactly what it recorded (edge.routing.outcome)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from edge.errors import BadGateway
from edge.middleware import EdgeMiddleware
from edge.observability import logs
from edge.observability.context import RequestContext
from edge.routing import breaker as cb
from edge.routing import router as router_module
from edge.routing.exchange import Call
from edge.routing.outcome import UpstreamOutcome
from edge.routing.providers import parse
from edge.routing.router import Router
from edge.upstream.client import UpstreamResponse

OK = UpstreamResponse(200, b'{"ok":1}', "application/json", {})
BAD = UpstreamResponse(502, b'{"error":{}}', "application/json", {})
WAIT_S = 0.25  # what each scripted exchange reports as time spent waiting on the upstream
# The access line's upstream fields, named as the context's read-only views of the outcome.
FIELDS = ("upstream_status", "upstream_error", "provider", "attempts")


class Script:
    """An Upstream stub that fills the outcome it is handed, as Upstream.call does."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers

    async def call(
        self, method, path, body, ctx, outcome, provider=None, timeout_s=None, extra=None
    ):
        outcome.waited_s += WAIT_S
        answer = self.answers[provider.name]
        if answer == "connect":
            outcome.error = "connect"
            raise BadGateway("The upstream could not be reached.")
        return answer


def make(script: Script) -> Router:
    document = {
        "providers": {n: {"base_url": f"http://127.0.0.1:{i + 1}/v1"} for i, n in
                      enumerate(("a", "b", "c"))},
        "models": [{"name": "m", "targets": [{"provider": "a"}, {"provider": "b"},
                                             {"provider": "c"}]}],
        "routing": {"strategy": "priority"},
    }  # fmt: skip
    return Router(parse(document), script, cb.LocalBreakers(), 30.0)  # type: ignore[arg-type]


class Recordings:
    """Every RequestContext.record_upstream call: (context, outcome)."""

    def __init__(self) -> None:
        self.calls: list[tuple[RequestContext, UpstreamOutcome]] = []


@pytest.fixture
def recordings(monkeypatch: pytest.MonkeyPatch) -> Recordings:
    monkeypatch.setattr(router_module, "backoff", lambda attempt, rng=None: 0.001)
    seen = Recordings()
    original = RequestContext.record_upstream

    def record(ctx: RequestContext, outcome: UpstreamOutcome) -> None:
        seen.calls.append((ctx, outcome))
        original(ctx, outcome)

    monkeypatch.setattr(RequestContext, "record_upstream", record)
    return seen


class FakeMetrics:
    """What EdgeMiddleware._finish reports, call by call."""

    def __init__(self) -> None:
        self.in_flight = SimpleNamespace(dec=lambda: None)
        self.upstream: list[tuple[int | None, float, str | None]] = []
        self.requests: list[tuple[Any, ...]] = []

    def observe_request(self, route, method, status, total_s, overhead_s) -> None:
        self.requests.append((route, method, status, total_s, overhead_s))

    def observe_upstream(self, status, seconds, error) -> None:
        self.upstream.append((status, seconds, error))

    def observe_tokens(  # pragma: no cover
        self, model, prompt, completion, cached=False, identity=None
    ) -> None:
        raise AssertionError("no tokens were reported")


@pytest.fixture
def access_lines(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The access lines log_access writes (its fields, before serialisation)."""
    lines: list[dict[str, Any]] = []
    writer = SimpleNamespace(
        logger=SimpleNamespace(isEnabledFor=lambda level: True), write=lines.append
    )
    monkeypatch.setattr(logs, "_access", writer)
    return lines


def finish(ctx: RequestContext, status: int) -> FakeMetrics:
    """EdgeMiddleware._finish for `ctx` (metrics and the access line), with fake metrics."""
    middleware = EdgeMiddleware.__new__(EdgeMiddleware)
    middleware._metrics = metrics = FakeMetrics()
    req = SimpleNamespace(path="/v1/chat/completions", method="POST")
    middleware._finish(req, ctx, status, None)
    return metrics


def forward(router: Router, ctx: RequestContext) -> Any:
    body = b'{"model":"m"}'
    return asyncio.run(
        router.exchange(ctx, Call("openai", "POST", "/chat/completions", body, None, "m"))
    )


def test_a_failover_sequence_is_recorded_once_and_read_as_recorded(recordings, access_lines):
    ctx = RequestContext("r1", "10.0.0.1")
    ctx.start -= 1.0  # the request has taken a second so far
    result = forward(make(Script(a="connect", b=BAD, c=OK)), ctx)
    assert result is OK
    assert len(recordings.calls) == 1  # one recording point, however many attempts
    recorded_on, outcome = recordings.calls[0]
    assert recorded_on is ctx and ctx.upstream is outcome
    assert (outcome.status, outcome.error) == (200, None)
    assert (outcome.provider, outcome.attempts) == ("c", 3)
    assert outcome.waited_s == pytest.approx(3 * WAIT_S)  # every attempt's waiting, summed

    metrics = finish(ctx, 200)
    assert metrics.upstream == [(200, outcome.waited_s, None)]
    (_, _, _, total_s, overhead_s) = metrics.requests[0]
    assert overhead_s == pytest.approx(total_s - 3 * WAIT_S)  # waiting is not overhead
    (line,) = access_lines
    assert tuple(line[field] for field in FIELDS) == (200, None, "c", 3)
    assert line["overhead_ms"] == round(overhead_s * 1000, 3)


def test_a_sequence_that_fails_throughout_is_recorded_once_with_the_last_failure(
    recordings, access_lines
):
    ctx = RequestContext("r2", None)
    with pytest.raises(BadGateway):
        forward(make(Script(a=BAD, b="connect", c="connect")), ctx)
    assert len(recordings.calls) == 1 and ctx.upstream is recordings.calls[0][1]
    # b's 502 answer was not passed on: no status, the last attempt's failure kind.
    outcome = ctx.upstream
    assert (outcome.status, outcome.error, outcome.provider, outcome.attempts) == (
        None, "connect", "c", 3,
    )  # fmt: skip
    metrics = finish(ctx, 502)
    assert metrics.upstream == [(None, pytest.approx(3 * WAIT_S), "connect")]
    (line,) = access_lines
    assert tuple(line[field] for field in FIELDS) == (None, "connect", "c", 3)


def test_a_request_that_never_went_upstream_reports_nothing_upstream(recordings, access_lines):
    ctx = RequestContext("r3", None)
    metrics = finish(ctx, 200)
    assert recordings.calls == [] and ctx.upstream is None
    assert metrics.upstream == []  # no upstream metrics without an outcome
    (_, _, _, total_s, overhead_s) = metrics.requests[0]
    assert overhead_s == total_s
    (line,) = access_lines
    assert tuple(line[field] for field in FIELDS) == (None, None, None, 0)


@pytest.mark.parametrize("field", [*FIELDS, "upstream_s"])
def test_the_context_cannot_be_written_around_the_outcome(field):
    ctx = RequestContext("r4", None)
    with pytest.raises(AttributeError):
        setattr(ctx, field, None)
