"""Model routing and failover: which provider answers, and trying the next one when it fails.

The request pipeline (edge.pipeline) hands the router a `Call` (edge.routing.exchange) and gets
one exchange back: a whole answer, or `Events` that report their own verdict to the breaker
when they end. Nothing above this module calls the transport or a breaker.

The router orders the model's targets by the strategy (weighted | priority | least-busy), skips
providers whose host-wide breaker is open or that are cooling down after a retry-after (a
cooling provider is still tried when nothing else is left), and tries targets until one
answers. A failure is a connect error, a timeout before the answer (or, for a stream, before
the first event), a 5xx, a 429, or a success that is not a JSON object (`invalid`); it is
retried on another target after a jittered backoff (Bifrost's min(0.5 s·2^n, 5 s) times
U(0.8, 1.2)), all within one deadline (SERVER_TIMEOUT_SECONDS). A 4xx other than 429 is the
client's answer. Nothing is retried once a byte has reached the client: `exchange` returns
before the relay starts.

The built-in mock (edge.routing.mock) is a provider like the others as far as the endpoints
know; nothing goes upstream for it, so it records no upstream outcome. The adapters that will
translate between the client's API and a provider of another kind plug in at one place,
`_attempt`, between choosing a target and calling the transport.

The router owns the request's `UpstreamOutcome` (edge.routing.outcome): `exchange` creates it,
records it on the request context once, and fills in the attempts and the status of the answer
it returns; the transport fills in its waiting time and failure kinds.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson

from edge.errors import (
    ApiError,
    BadGateway,
    GatewayTimeout,
    ModelNotFound,
    ServiceUnavailable,
    stream_error_event,
)
from edge.observability.context import RequestContext
from edge.routing import breaker as cb
from edge.routing.exchange import Call, Events
from edge.routing.mock import MockTransport
from edge.routing.outcome import UpstreamOutcome
from edge.routing.providers import MOCK, Providers, Target
from edge.upstream.client import StreamResponse, Upstream, UpstreamResponse, error_kind, relay
from edge.upstream.http1 import UpstreamError

log = logging.getLogger("edge.router")

# "auth": the provider refused the gateway's key (401/403): not the client's answer, and
# nothing has reached the client yet, so another provider may serve it.
RETRYABLE_ERRORS = frozenset({"timeout", "connect", "disconnect", "invalid", "auth"})
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 5.0


@dataclass(slots=True)
class Opened:
    """A stream that answered with its first event: relay `first`, then the rest of `resp`."""

    resp: StreamResponse
    first: bytes
    status: int


def backoff(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (1-based)."""
    jitter = (rng or random).uniform(0.8, 1.2)
    return min(BACKOFF_BASE_S * 2 ** (attempt - 1), BACKOFF_MAX_S) * jitter


def retry_after_s(headers: dict[str, str]) -> float | None:
    """A provider's retry-after-ms or retry-after (seconds), if it sent one we can read."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            return None  # an HTTP date: rare from LLM providers; the breaker covers it
    return None


_MODEL_KEY = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]]', re.DOTALL)


_KEY = b'"model"'
_COLON = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def rename_model(body: bytes, model: str) -> bytes:
    """`body` with every top-level "model" value replaced by `model`; all else byte for byte.

    Every top-level occurrence is rewritten (duplicate keys included), so a client cannot
    smuggle a second "model" past the rename. The body was already parsed as a JSON object with
    a top-level string "model".

    Fast path: a body with one literal `"model"` key and no backslash-u escape anywhere. A quote
    inside a JSON string is always escaped, so an unescaped `"model"` followed by a colon is a
    key, and without backslash-u escapes the top-level key the validation found can only be
    spelled literally: that one key is it. Anything else takes the full scan.
    """
    at = body.find(_KEY)
    if (
        at > 0
        and body.find(_KEY, at + 7) < 0
        and body[at - 1] != 0x5C  # not preceded by a backslash
        and b"\\u" not in body
    ):
        colon = _COLON.match(body, at + 7)
        if colon is not None:
            value = _STRING.match(body, colon.end())
            if value is not None:
                return body[: value.start()] + orjson.dumps(model) + body[value.end() :]
    return _rename_scan(body, model)


def _rename_scan(body: bytes, model: str) -> bytes:
    replacement = orjson.dumps(model)
    depth = 0
    spans = []
    tokens = _MODEL_KEY.finditer(body)
    for token in tokens:
        text = token.group()
        if text in (b"{", b"["):
            depth += 1
        elif text in (b"}", b"]"):
            depth -= 1
        elif depth == 1 and _is_model_key(text):
            colon = _COLON.match(body, token.end())
            if colon is None:
                continue  # a string value, not a key
            if body[colon.end() : colon.end() + 1] == b'"':
                value = next(tokens)  # the string value is the very next token
                spans.append((value.start(), value.end()))
            # Else the value is an object or array, whose bracket is the next token and is
            # counted above, or a number, true, false or null, which is no token at all: either
            # way nothing is consumed here, so the scan stays in step with the nesting.
    if not spans:
        return body
    out = []
    at = 0
    for start, end in spans:
        out.append(body[at:start])
        out.append(replacement)
        at = end
    out.append(body[at:])
    return b"".join(out)


def _is_model_key(text: bytes) -> bool:
    return text == b'"model"' or (b"\\" in text and orjson.loads(text) == "model")


class Router:
    """One worker's router over the configured providers and the host-wide breakers."""

    def __init__(
        self,
        providers: Providers,
        upstream: Upstream | None,
        breakers: Any,
        timeout_s: float,
        metrics: Any = None,
    ) -> None:
        self.providers = providers
        self.upstream = upstream  # the transport; None when every provider is the mock
        self.mock = MockTransport()
        self.breakers = breakers
        self._policy = providers.routing.breaker
        self._routing = providers.routing
        self._use_breakers = providers.routing.breakers_enabled
        self._timeout_s = timeout_s
        self._metrics = metrics
        self.busy: dict[str, int] = dict.fromkeys(providers.providers, 0)

    # ---------------------------------------------------------------- choosing

    def targets(self, model: str, api: str) -> tuple[Target, ...]:
        """The model's targets that speak the client's `api` (the mock speaks every one); 404
        when none."""
        targets = self.providers.targets(model) or ()
        if any(t.provider.kind not in (api, MOCK) for t in targets):
            targets = tuple(t for t in targets if t.provider.kind in (api, MOCK))
        if not targets:
            raise ModelNotFound(
                f"The model '{model}' does not exist or is not served here.", param="model"
            )
        return targets

    def order(self, targets: tuple[Target, ...]) -> list[Target]:
        """The strategy's order; cooling-down and open providers moved to the end."""
        strategy = self._routing.strategy
        if len(targets) == 1 or strategy == "priority":
            ordered = list(targets)
        elif strategy == "least-busy":
            busy = self.busy
            ordered = sorted(targets, key=lambda t: (busy.get(t.provider.name, 0), random.random()))
        else:  # weighted: the first drawn by weight, the rest (fallbacks) in the file's order
            ordered = _weighted(targets)
        if not self._use_breakers:
            return ordered
        breakers = self.breakers
        now = breakers.clock()
        ready, later = [], []
        for target in ordered:
            name = target.provider.name
            state, _, cooldown = breakers.hot(name)
            if cooldown > now:
                later.append(target)
            elif state == cb.CLOSED or cb.available(breakers.peek(name), self._policy, now):
                ready.append(target)
            else:
                later.append(target)
        return ready + later

    def _admit(self, target: Target, last_resort: bool) -> tuple[bool, float | None]:
        """Claim the right to send to this target: (admitted, probe). `probe` names the
        half-open place claimed (the period's `opened_at`), else None; the attempt's verdict or
        release carries it, so it can only ever count for, or give back, its own place."""
        if not self._use_breakers:
            return True, None
        policy = self._policy

        def change(state: cb.BreakerState, now: float) -> tuple[bool, float | None]:
            if state.cooldown_until > now and not last_resort:
                return False, None
            if not cb.allow(state, policy, now):
                return False, None
            return True, (state.opened_at if state.state == cb.HALF_OPEN else None)

        name = target.provider.name
        state, _, cooldown = self.breakers.hot(name)
        if state == cb.CLOSED and (last_resort or cooldown <= self.breakers.clock()):
            return True, None  # the common case: no lock
        try:
            return self.breakers.update(name, change)
        except TimeoutError:
            return True, None

    def _report(
        self, name: str, ok: bool, cooldown: float | None = None, probe: float | None = None
    ) -> None:
        if not self._use_breakers:
            return
        policy = self._policy
        state, failures, _ = self.breakers.hot(name)
        if ok and cooldown is None and state == cb.CLOSED and failures == 0:
            return  # nothing to change: no lock

        def change(state: cb.BreakerState, now: float) -> None:
            if cooldown is not None:
                cb.cool_down(state, now, cooldown)
                cb.release(state, probe)  # a probe answered with retry-after: no verdict
            elif ok:
                cb.on_success(state, policy, now, cb.claimed(state, probe))
            else:
                cb.on_failure(state, policy, now, cb.claimed(state, probe))

        try:
            self.breakers.update(name, change)
        except TimeoutError:
            log.warning("breaker update skipped: table lock timeout", extra={"provider": name})

    def _release(self, target: Target, probe: float | None) -> None:
        """Give back the half-open place `probe` that `_admit` claimed, for an attempt that
        ends without a verdict (see breaker.release). Nothing to do without one."""
        if probe is None or not self._use_breakers:
            return
        name = target.provider.name
        try:
            self.breakers.update(name, lambda state, now: cb.release(state, probe))
        except TimeoutError:
            log.warning("breaker update skipped: table lock timeout", extra={"provider": name})

    # ---------------------------------------------------------------- forwarding

    async def exchange(self, ctx: RequestContext, call: Call) -> UpstreamResponse | Events:
        """The first good answer (or the last bad one) from the model's targets; a GET is one
        exchange with one provider (`_one`)."""
        if call.method == "GET":
            return await self._one(ctx, call)
        targets = self.targets(call.model or "", call.api)
        if targets[0].provider.kind == MOCK:
            return await self.mock.exchange(ctx, call)  # nothing goes upstream
        candidates = self.order(targets)
        outcome = UpstreamOutcome()
        ctx.record_upstream(outcome)
        routing = self._routing
        max_attempts = 1 + (routing.max_retries if routing.fallback_enabled else 0)
        clock = time.monotonic
        deadline = clock() + self._timeout_s
        attempts = 0
        last: UpstreamResponse | None = None
        failure: ApiError | None = None
        tried: set[str] = set()
        for last_resort in (False, True):
            for target in candidates:
                if attempts >= max_attempts:
                    break
                name = target.provider.name
                if name in tried:
                    continue
                pause = 0.0
                if attempts:
                    pause = min(backoff(attempts), deadline - clock())
                    if pause <= 0:
                        break
                # Admitted only once the deadline allows the attempt: a half-open probe place
                # claimed here is then always used (and reported).
                admitted, probe = self._admit(target, last_resort)
                if not admitted:
                    continue
                if pause:
                    self._count("retries", name)
                    try:
                        await asyncio.sleep(pause)
                    except BaseException:  # the client hung up during the backoff
                        self._release(target, probe)
                        raise
                remaining = deadline - clock()
                if remaining <= 0:
                    self._release(target, probe)
                    break
                tried.add(name)
                attempts += 1
                outcome.attempt(name)
                result, failure_now = await self._attempt(
                    ctx, outcome, target, call, remaining, probe
                )
                if failure_now is None and result is not None and not _failed(result):
                    outcome.answered(result.status)
                    return result
                if failure_now is not None:
                    failure = failure_now
                    last = None
                else:
                    assert isinstance(result, UpstreamResponse)
                    last = result
                    failure = None
                if attempts < max_attempts:
                    self._count("failovers", name)
            if attempts >= max_attempts or deadline <= clock():
                break
        if last is not None:
            outcome.answered(last.status)
            return last
        if failure is not None:
            raise failure
        raise ServiceUnavailable(
            "No provider is available for this model right now (circuit breakers open).",
            code="no_provider_available",
            headers={"retry-after": "1"},
        )

    async def _one(self, ctx: RequestContext, call: Call) -> UpstreamResponse | Events:
        """One exchange with one provider (the pinned one, else the UPSTREAM_URL one): no
        failover, no breaker (GET /v1/models, and /v1/models/{id} asked of its provider)."""
        provider = call.provider or self.providers.default
        if provider.kind == MOCK:
            return await self.mock.exchange(ctx, call)
        assert self.upstream is not None
        outcome = UpstreamOutcome()
        ctx.record_upstream(outcome)
        result = await self.upstream.call(call.method, call.path, None, ctx, outcome, provider)
        # Named once it answered, and only when pinned; attempts stay 0 (no routing took place).
        outcome.answered(result.status, None if call.provider is None else provider.name)
        if 200 <= result.status < 300:
            _judge(result, outcome)
        return result

    async def _attempt(
        self,
        ctx: RequestContext,
        outcome: UpstreamOutcome,
        target: Target,
        call: Call,
        remaining: float,
        probe: float | None = None,
    ) -> tuple[UpstreamResponse | Events | None, ApiError | None]:
        """One attempt at `target`; `probe` is the half-open place `_admit` claimed for it."""
        provider = target.provider
        name = provider.name
        timeout = remaining if provider.timeout_s is None else min(provider.timeout_s, remaining)
        body = call.body
        if target.model is not None and body is not None:
            body = rename_model(body, target.model)
        # Adapters (translating the call for a provider of another kind, and the answer back)
        # plug in here: routing, failover and breakers stay the same for translated targets.
        transport = self.upstream
        assert transport is not None
        self.busy[name] = self.busy.get(name, 0) + 1
        started = time.perf_counter()
        try:
            if call.stream:
                result: UpstreamResponse | Opened = await self._open(
                    ctx, outcome, target, call.path, body or b"", timeout, call.headers
                )
            else:
                result = await transport.call(
                    call.method, call.path, body, ctx, outcome, provider, timeout, call.headers
                )
            if isinstance(result, UpstreamResponse) and 200 <= result.status < 300:
                _judge(result, outcome)  # a stream request answered whole is judged too
        except ApiError as exc:
            if outcome.error not in RETRYABLE_ERRORS:
                self._release(target, probe)  # not the provider's failure: no verdict
                raise
            self._report(name, False, probe=probe)
            self._observe(name, "error", None)
            return None, exc
        except BaseException:  # cancelled: the client hung up before the answer
            self._release(target, probe)
            raise
        finally:
            self.busy[name] -= 1
        if isinstance(result, Opened):
            # A stream's verdict comes at its end, when it is known whether it broke; only a
            # half-open probe's success is reported now, so the breaker can close without
            # waiting out a long stream.
            if probe is not None:
                self._report(name, True, probe=probe)
            self._observe(name, "2xx", time.perf_counter() - started)
            return self._events(result, outcome, call, name, probe), None
        status = result.status
        label = f"{status // 100}xx" if 100 <= status <= 599 else "error"
        self._observe(name, label, time.perf_counter() - started)
        if status == 429:
            wait = retry_after_s(result.headers)
            self._report(name, False, wait, probe) if wait else self._report(
                name, False, None, probe
            )
        elif status >= 500:
            self._report(name, False, probe=probe)
        else:
            self._report(name, True, probe=probe)
        return result, None

    def _events(
        self, opened: Opened, outcome: UpstreamOutcome, call: Call, name: str, probe: float | None
    ) -> Events:
        """The opened stream's events, reporting how the stream ended to the provider's breaker:
        broken after its first event (a reset, a stall, a malformed event) is a failure like one
        before the first byte, though the client's stream can no longer fail over; whole, a
        success (unless the first event already reported a probe's). A stream whose client hung
        up has no verdict and is not reported."""

        def ended(ok: bool) -> None:
            if not (ok and probe is not None):
                self._report(name, ok, probe=probe)

        def error_event(kind: str, message: str) -> bytes:
            return stream_error_event(kind, message, call.api)

        resp = opened.resp
        source = relay(resp, outcome, error_event, opened.first, call.on_event, ended)
        return Events(source, resp.abort, resp.close)

    async def _open(
        self,
        ctx: RequestContext,
        outcome: UpstreamOutcome,
        target: Target,
        path: str,
        body: bytes,
        timeout: float,
        extra_headers: dict[str, str] | None,
    ) -> UpstreamResponse | Opened:
        """Open a stream and wait (within `timeout`) for its first bytes, so that a provider
        that answers the head but never an event is still failed over."""
        started = time.monotonic()
        assert self.upstream is not None
        opened = await self.upstream.open_stream(
            path, body, ctx, outcome, target.provider, timeout, extra_headers
        )
        if isinstance(opened, UpstreamResponse):
            return opened
        left = max(0.001, timeout - (time.monotonic() - started))
        waited = time.perf_counter()
        try:
            async with asyncio.timeout(left):
                first = await opened.readany()
        except TimeoutError:
            opened.close()
            outcome.failed("timeout")
            raise GatewayTimeout("The upstream sent no event in time.") from None
        except UpstreamError as exc:
            opened.close()
            exc.__traceback__ = None
            outcome.failed(error_kind(exc))
            raise BadGateway("The upstream connection failed before the first event.") from None
        except BaseException:  # cancelled (the client hung up): end the upstream stream too
            opened.close()
            raise
        finally:
            outcome.waited(time.perf_counter() - waited)  # waiting on the upstream
        if not first:
            opened.close()
            outcome.failed("invalid")
            raise BadGateway("The upstream closed the stream without an event.")
        return Opened(opened, first, opened.status)

    def _count(self, what: str, name: str) -> None:
        if self._metrics is not None:
            self._metrics.provider_event(what, name)

    def _observe(self, name: str, outcome: str, ttfb: float | None) -> None:
        if self._metrics is not None:
            self._metrics.provider_attempt(name, outcome, ttfb)

    # ---------------------------------------------------------------- health

    def states(self) -> dict[str, dict[str, Any]]:
        """Each provider's breaker state and cooldown, for /health (no secrets)."""
        out = {}
        now = self.breakers.clock() if self.breakers is not None else 0.0
        for name, provider in self.providers.providers.items():
            entry = provider.describe()
            if self._use_breakers:
                state = self.breakers.peek(name)
                entry["breaker"] = cb.STATE_NAMES.get(state.state, "unknown")
                if state.state == cb.OPEN and cb.available(state, self._policy, now):
                    entry["breaker"] = "half_open"  # the next request will probe it
                entry["cooldown_seconds"] = round(max(0.0, state.cooldown_until - now), 3)
            else:
                entry["breaker"] = "disabled"
            out[name] = entry
        return out

    def breaker_numbers(self) -> dict[str, int]:
        """provider → 0 closed, 1 open, 2 half-open (for the breaker gauge)."""
        if not self._use_breakers:
            return {}
        now = self.breakers.clock()
        out = {}
        for name in self.providers.providers:
            state = self.breakers.peek(name)
            number = state.state
            if number == cb.OPEN and cb.available(state, self._policy, now):
                number = cb.HALF_OPEN
            out[name] = number
        return out

    def can_serve(self) -> bool:
        """Ready unless no provider can take any request (all breakers open)."""
        if not self._use_breakers:
            return True
        now = self.breakers.clock()
        return any(
            cb.available(self.breakers.peek(name), self._policy, now)
            for name in self.providers.providers
        )


def _weighted(targets: tuple[Target, ...]) -> list[Target]:
    point = random.random() * sum(t.weight for t in targets)
    index = len(targets) - 1  # float rounding at the very top
    for at, target in enumerate(targets):
        point -= target.weight
        if point < 0:
            index = at
            break
    return [targets[index], *targets[:index], *targets[index + 1 :]]


def _failed(result: UpstreamResponse | Events) -> bool:
    return isinstance(result, UpstreamResponse) and (result.status == 429 or result.status >= 500)


def _judge(answer: UpstreamResponse, outcome: UpstreamOutcome) -> None:
    """A success must be a JSON object (its `usage` feeds the token limits and metrics):
    anything else is the provider's failure (502, `invalid`), failed over like one."""
    try:
        data = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        outcome.failed("invalid", answer.status)
        raise BadGateway("The upstream sent a response that is not a JSON object.")
    answer.data = data
