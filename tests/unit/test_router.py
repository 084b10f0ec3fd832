"""The failover loop of Router.exchange against a scripted upstream stub (no network)."""

from __future__ import annotations

import asyncio

import pytest

from edge.errors import BadGateway
from edge.observability.context import RequestContext
from edge.routing import breaker as cb
from edge.routing import router as router_module
from edge.routing.exchange import Call
from edge.routing.providers import parse
from edge.routing.router import Router
from edge.upstream.client import UpstreamResponse
from edge.upstream.http1 import Disconnected

OK = UpstreamResponse(200, b'{"ok":1}', "application/json", {})
CALL = Call("openai", "POST", "/chat/completions", b'{"model":"m"}', None, "m")


def answer(status: int, **headers: str) -> UpstreamResponse:
    return UpstreamResponse(status, b'{"error":{}}', "application/json", headers)


class Script:
    """provider name → list of answers (an UpstreamResponse, or "connect" for a failure)."""

    def __init__(self, **answers: list) -> None:
        self.answers = answers
        self.calls: list[tuple[str, bytes | None]] = []

    async def call(
        self, method, path, body, ctx, outcome, provider=None, timeout_s=None, extra=None
    ):
        self.calls.append((provider.name, body))
        queue = self.answers[provider.name]
        result = queue.pop(0) if len(queue) > 1 else queue[0]
        if result == "hang":
            await asyncio.sleep(3600)  # cancelled by the test: the client hangs up
        if result == "connect":
            outcome.error = "connect"  # as Upstream.call names a failure
            raise BadGateway("The upstream could not be reached.")
        return result


def make(script: Script, routing: dict | None = None, clock=None) -> Router:
    document = {
        "providers": {n: {"base_url": f"http://127.0.0.1:{i + 1}/v1"} for i, n in
                      enumerate(("a", "b", "c"))},
        "models": [{"name": "m", "targets": [{"provider": "a", "model": "renamed"},
                                             {"provider": "b"}, {"provider": "c"}]}],
        "routing": {"strategy": "priority", **(routing or {})},
    }  # fmt: skip
    breakers = cb.LocalBreakers(clock) if clock else cb.LocalBreakers()
    return Router(parse(document), script, breakers, 30.0)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(router_module, "backoff", lambda attempt, rng=None: 0.001)


def forward(router: Router, body: bytes = b'{"model":"m"}') -> tuple[object, RequestContext]:
    ctx = RequestContext("r", None)
    result = asyncio.run(
        router.exchange(ctx, Call("openai", "POST", "/chat/completions", body, None, "m"))
    )
    return result, ctx


def test_5xx_and_connect_failures_move_on_with_the_rename_per_target():
    script = Script(a=["connect"], b=[answer(502)], c=[OK])
    result, ctx = forward(make(script))
    assert result is OK and ctx.upstream.provider == "c" and ctx.upstream.attempts == 3
    assert script.calls == [("a", b'{"model":"renamed"}'), ("b", b'{"model":"m"}'),
                            ("c", b'{"model":"m"}')]  # fmt: skip


def test_4xx_is_the_clients_answer():
    script = Script(a=[answer(400)], b=[OK], c=[OK])
    result, ctx = forward(make(script))
    assert result.status == 400 and ctx.upstream.attempts == 1


def test_max_retries_bounds_attempts_and_the_last_answer_is_returned():
    script = Script(a=[answer(500)], b=[answer(503)], c=[OK])
    result, ctx = forward(make(script, {"fallback": {"max_retries": 1}}))
    assert result.status == 503 and ctx.upstream.attempts == 2
    script = Script(a=[answer(500)], b=[OK], c=[OK])
    result, _ = forward(make(script, {"fallback": {"enabled": False}}))
    assert result.status == 500


def test_all_failing_by_exception_raises_the_last_failure():
    script = Script(a=["connect"], b=["connect"], c=["connect"])
    with pytest.raises(BadGateway):
        forward(make(script))


def test_retry_after_cools_down_but_a_cooling_provider_is_the_last_resort():
    now = [100.0]
    script = Script(a=[answer(429, **{"retry-after": "7"}), OK], b=[OK], c=[OK])
    router = make(script, clock=lambda: now[0])
    result, ctx = forward(router)
    assert result is OK and ctx.upstream.provider == "b"
    now[0] = 106.9
    assert forward(router)[1].upstream.provider == "b"  # a is still cooling
    now[0] = 107.1
    assert forward(router)[1].upstream.provider == "a"
    # Nothing else left (b and c open): the cooling provider is still tried.
    solo = Script(a=[answer(429, **{"retry-after": "30"}), OK], b=["connect"], c=["connect"])
    router = make(solo, {"circuit_breaker": {"failure_threshold": 1}}, clock=lambda: now[0])
    with pytest.raises(BadGateway):
        forward(router)  # a 429s (cooling 30 s), b and c fail (their breakers open)
    result, ctx = forward(router)
    assert result is OK and ctx.upstream.provider == "a"


def test_breaker_opens_and_traffic_skips_the_provider():
    now = [0.0]
    script = Script(a=[answer(500)], b=[OK], c=[OK])
    router = make(script, {"circuit_breaker": {"failure_threshold": 2, "timeout_seconds": 5}},
                  clock=lambda: now[0])  # fmt: skip
    for _ in range(5):
        assert forward(router)[0] is OK
    assert [name for name, _ in script.calls].count("a") == 2
    assert router.states()["a"]["breaker"] == "open"
    now[0] = 5.0
    script.answers["a"] = [OK]
    forward(router)  # the probe
    assert router.states()["a"]["breaker"] == "half_open"


HALF_OPEN_ONE = {"circuit_breaker": {"failure_threshold": 1, "timeout_seconds": 5,
                                     "half_open_max": 1}}  # fmt: skip


def half_open_router(now: list[float], *answers: object) -> tuple[Router, Script]:
    """Router whose provider "a" is one failure from open, then answers `answers`."""
    script = Script(a=["connect", *answers], b=[OK], c=[OK])
    router = make(script, HALF_OPEN_ONE, clock=lambda: now[0])
    assert forward(router)[1].upstream.provider == "b"  # a failed once: open
    now[0] = 5.0  # its timeout passed: the next request to it is the one probe
    return router, script


def test_a_probe_whose_client_hangs_up_gives_its_place_back():
    now = [0.0]
    router, _ = half_open_router(now, "hang")

    async def hang_up() -> None:
        ctx = RequestContext("r", None)
        task = asyncio.ensure_future(router.exchange(ctx, CALL))
        for _ in range(10):
            await asyncio.sleep(0)
        assert router.breakers.peek("a").probes == 1  # the probe is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(hang_up())
    state = router.breakers.peek("a")
    assert state.state == cb.HALF_OPEN and state.probes == 0  # given back, not held 5 s
    assert cb.available(state, router._policy, now[0])


def test_a_probe_answered_with_retry_after_gives_its_place_back():
    now = [0.0]
    router, _ = half_open_router(now, answer(429, **{"retry-after": "2"}), OK)
    result, ctx = forward(router)
    assert result is OK and ctx.upstream.provider == "b"  # a asked for 2 s: b answered
    assert router.breakers.peek("a").probes == 0  # the provider's probe place given back
    # The cooldown is the target's (a rate limit is the model's), not the whole provider's.
    assert router.breakers.peek("a/renamed").cooldown_until == pytest.approx(7.0)
    now[0] = 7.1
    assert forward(router)[1].upstream.provider == "a"  # probed again once the cooldown is over


class ScriptedStream:
    """A live upstream stream (edge.upstream.client.StreamResponse): its reads, then a break
    (`fail`) or the end."""

    status = 200

    def __init__(self, reads: list[bytes], fail: BaseException | None) -> None:
        self._reads, self._fail = list(reads), fail
        self.aborted = False

    async def readany(self) -> bytes:
        if self._reads:
            return self._reads.pop(0)
        if self._fail is not None:
            raise self._fail
        return b""

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


def stream_through(router: Router, fail: BaseException | None) -> list[bytes]:
    """One streamed request answered by a scripted stream: the blocks the client gets."""
    from edge.upstream.http1 import Disconnected

    async def opened(*args: object, **kwargs: object) -> ScriptedStream:
        return ScriptedStream([b"data: 1\n\n", b"data: 2\n\n"], fail and Disconnected("cut"))

    router.upstream.open_stream = opened  # type: ignore[attr-defined]
    call = Call("openai", "POST", "/chat/completions", b'{"model":"m"}', None, "m", True)

    async def run() -> list[bytes]:
        events = await router.exchange(RequestContext("s", None), call)
        try:
            return [block async for block in events]  # type: ignore[union-attr]
        finally:
            await events.aclose()  # type: ignore[union-attr]

    return asyncio.run(run())


def test_a_stream_broken_after_its_first_event_counts_against_the_breaker():
    now = [0.0]
    script = Script(a=[OK], b=[OK], c=[OK])
    router = make(script, {"circuit_breaker": {"failure_threshold": 2, "timeout_seconds": 5}},
                  clock=lambda: now[0])  # fmt: skip
    broken = stream_through(router, Disconnected("cut"))
    assert broken[:2] == [b"data: 1\n\n", b"data: 2\n\n"] and b"upstream_disconnect" in broken[2]
    stream_through(router, None)  # a whole stream in between: failures are consecutive
    stream_through(router, Disconnected("cut"))
    assert router.breakers.peek("a/renamed").state == cb.CLOSED
    stream_through(router, Disconnected("cut"))
    # The answers' failures: the target's breaker opens; the connection worked each time.
    assert router.breakers.peek("a/renamed").state == cb.OPEN
    assert router.breakers.peek("a").state == cb.CLOSED
    assert router.states()["a"]["breaker"] == "open"  # its only target is open
    assert forward(router)[1].upstream.provider == "b"


def test_a_request_that_claimed_no_probe_place_gives_none_back():
    """Admitted while the breaker was closed, still waiting when it opened and went half-open,
    then its client hung up: the one probe place, claimed by another request, stays taken."""
    now = [0.0]
    script = Script(a=["hang"], b=[OK], c=[OK])
    router = make(script, HALF_OPEN_ONE, clock=lambda: now[0])

    async def scenario() -> None:
        old = asyncio.ensure_future(
            router.exchange(RequestContext("old", None), CALL)
        )  # fmt: skip
        for _ in range(10):
            await asyncio.sleep(0)
        router.breakers.update("a", lambda state, t: cb.on_failure(state, router._policy, t))
        assert router.breakers.peek("a").state == cb.OPEN  # other requests failed meanwhile
        now[0] = 5.0
        probe = asyncio.ensure_future(
            router.exchange(RequestContext("probe", None), CALL)
        )  # fmt: skip
        for _ in range(10):
            await asyncio.sleep(0)
        assert router.breakers.peek("a").probes == 1
        old.cancel()
        with pytest.raises(asyncio.CancelledError):
            await old
        assert router.breakers.peek("a").probes == 1  # not the old request's to give back
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert router.breakers.peek("a").probes == 0  # the probe's own place

    asyncio.run(scenario())
