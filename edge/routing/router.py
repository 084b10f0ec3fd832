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
from edge.ratelimit.tokens import output_cap
from edge.routing import breaker as cb
from edge.routing.adapter import Translation, translatable
from edge.routing.exchange import Call, Events
from edge.routing.mock import MockTransport
from edge.routing.outcome import UpstreamOutcome
from edge.routing.providers import MOCK, Providers, Target
from edge.upstream.client import (
    StreamResponse,
    Upstream,
    UpstreamResponse,
    error_kind,
    relay,
    relay_raw,
)
from edge.upstream.http1 import UpstreamError

log = logging.getLogger("edge.router")

# What fails over to the next target. "auth": the provider refused the gateway's key
# (401/403): not the client's answer, and nothing has reached the client yet, so another
# provider may serve it. "busy": the provider's connections are all in use (nothing was sent).
RETRYABLE_ERRORS = frozenset({"timeout", "connect", "disconnect", "invalid", "auth", "busy"})
# A non-streamed request whose output cap is at most this, and that times out, counts against
# its target's breaker; one that may generate more does not: how long it takes depends on the
# request, and one key's long generations must not close a target to everyone.
SMALL_OUTPUT_CAP = 256
NORMAL, LAST_RESORT, PANIC = 0, 1, 2  # admission: as the breakers say; cooling too; anyway
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
        max_tokens_default: int = 4096,
    ) -> None:
        """`max_tokens_default`: the `max_tokens` an OpenAI call translated for an Anthropic
        provider gets when it sets none and its model entry gives none (Anthropic requires
        one)."""
        self.providers = providers
        self._max_tokens_default = max_tokens_default
        self.upstream = upstream  # the transport; None when every provider is the mock
        self.mock = MockTransport()
        self.breakers = breakers
        self._policy = providers.routing.breaker
        self._routing = providers.routing
        self._use_breakers = providers.routing.breakers_enabled
        self._timeout_s = timeout_s
        self._metrics = metrics
        self.busy: dict[str, int] = dict.fromkeys(providers.providers, 0)
        # Each provider's targets' breakers, for the state a provider shows (/health, metrics).
        self._targets_of: dict[str, list[str]] = {name: [] for name in providers.providers}
        for targets in providers.models.values():
            for target in targets:
                keys = self._targets_of[target.provider.name]
                if target.breaker not in keys:
                    keys.append(target.breaker)

    # ---------------------------------------------------------------- choosing

    def targets(self, model: str, api: str, any_kind: bool = False) -> tuple[Target, ...]:
        """The model's targets that speak the client's `api` (the mock speaks every one), or
        all of them when the call can be translated for the others (`any_kind`:
        edge.routing.adapter); 404 when none."""
        targets = self.providers.targets(model) or ()
        if not any_kind and any(t.provider.kind not in (api, MOCK) for t in targets):
            targets = tuple(t for t in targets if t.provider.kind in (api, MOCK))
        if not targets:
            raise ModelNotFound(
                f"The model '{model}' does not exist or is not served here.", param="model"
            )
        return targets

    def order(self, targets: tuple[Target, ...]) -> list[Target]:
        """The strategy's order; targets that are cooling down or whose breakers are open moved
        to the end."""
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
        now = self.breakers.clock()
        ready, later = [], []
        for target in ordered:
            if self._ready(target.provider.name, now) and self._ready(target.breaker, now):
                ready.append(target)
            else:
                later.append(target)
        return ready + later

    def _ready(self, name: str, now: float) -> bool:
        state, _, cooldown = self.breakers.hot(name)
        if cooldown > now:
            return False
        return state == cb.CLOSED or cb.available(self.breakers.peek(name), self._policy, now)

    def _admit(self, target: Target, mode: int) -> tuple[float | None, float | None] | None:
        """Claim the right to send to this target: None when refused, else the half-open probe
        places claimed on its provider's breaker and on its own (see `_claim`); the attempt's
        verdict or release carries them."""
        if not self._use_breakers:
            return None, None
        provider = target.provider.name
        admitted, provider_probe = self._claim(provider, mode)
        if not admitted:
            return None
        admitted, target_probe = self._claim(target.breaker, mode)
        if not admitted:
            self._report(provider, None, provider_probe)
            return None
        return provider_probe, target_probe

    def _claim(self, name: str, mode: int) -> tuple[bool, float | None]:
        """(admitted, probe) on one breaker. `probe` names the half-open place claimed (the
        period's `opened_at`), else None, so it can only ever count for, or give back, its own
        place. NORMAL skips a cooling target, LAST_RESORT does not, PANIC claims a probe
        whatever the state (breaker.panic_probe)."""
        state, _, cooldown = self.breakers.hot(name)
        if state == cb.CLOSED and (mode != NORMAL or cooldown <= self.breakers.clock()):
            return True, None  # the common case: no lock
        policy = self._policy

        def change(state: cb.BreakerState, now: float) -> tuple[bool, float | None]:
            if mode == PANIC:
                return True, cb.panic_probe(state, now)
            if state.cooldown_until > now and mode == NORMAL:
                return False, None
            if not cb.allow(state, policy, now):
                return False, None
            return True, (state.opened_at if state.state == cb.HALF_OPEN else None)

        try:
            return self.breakers.update(name, change)
        except TimeoutError:
            return True, None

    def _report(
        self, name: str, ok: bool | None, probe: float | None = None, cooldown: float = 0.0
    ) -> None:
        """A verdict on one breaker: a success, a failure, or none (`ok` None: the attempt's
        place is given back); `cooldown` seconds from a retry-after (no verdict either)."""
        if not self._use_breakers:
            return
        if ok is None and probe is None and not cooldown:
            return  # no place claimed: nothing to give back
        policy = self._policy
        state, failures, _ = self.breakers.hot(name)
        if ok and probe is None and state == cb.CLOSED and failures == 0:
            return  # nothing to change: no lock

        def change(state: cb.BreakerState, now: float) -> None:
            if cooldown:
                cb.cool_down(state, now, cooldown)
            if ok is None or cooldown:
                cb.release(state, probe)  # no verdict: its place back
            elif ok:
                cb.on_success(state, policy, now, cb.claimed(state, probe))
            else:
                cb.on_failure(state, policy, now, cb.claimed(state, probe))

        try:
            self.breakers.update(name, change)
        except TimeoutError:
            log.warning("breaker update skipped: table lock timeout", extra={"breaker": name})

    def _verdict(
        self,
        target: Target,
        probes: tuple[float | None, float | None],
        provider_ok: bool | None,
        target_ok: bool | None,
        cooldown: float = 0.0,
    ) -> None:
        """One attempt's verdict on its provider's breaker and on its target's."""
        if not self._use_breakers:
            return
        self._report(target.provider.name, provider_ok, probes[0])
        self._report(target.breaker, target_ok, probes[1], cooldown)

    # ---------------------------------------------------------------- forwarding

    async def exchange(self, ctx: RequestContext, call: Call) -> UpstreamResponse | Events:
        """The first good answer (or the last bad one) from the model's targets; a GET or a
        DELETE, and a call pinned to a provider, is one exchange with one provider (`_one`)."""
        if call.method != "POST" or call.provider is not None:
            return await self._one(ctx, call)
        targets = self.targets(call.model or "", call.api, translatable(call))
        if targets[0].provider.kind == MOCK:
            return await self.mock.exchange(ctx, call)  # nothing goes upstream
        # Per provider kind, how the call goes to it: None for the client's own kind, else a
        # Translation (edge.routing.adapter), or the 400 saying why it cannot be translated.
        translations: dict[str, Translation | ApiError | None] = {call.api: None}
        refused: ApiError | None = None
        candidates = self.order(targets)
        outcome = UpstreamOutcome()
        ctx.record_upstream(outcome)
        routing = self._routing
        max_attempts = 1 + (routing.max_retries if routing.fallback_enabled else 0)
        clock = time.monotonic
        deadline = clock() + self._timeout_s
        if call.deadline is not None:
            deadline = min(deadline, call.deadline)
        attempts = 0
        charged = 1  # the token reservation taken for the first attempt (edge.pipeline)
        last: UpstreamResponse | None = None
        failure: ApiError | None = None
        tried: set[str] = set()
        for mode in (NORMAL, LAST_RESORT, PANIC):
            if mode == PANIC and attempts:
                break  # panic only when no target at all could be admitted
            for target in candidates:
                if attempts >= max_attempts:
                    break
                name = target.provider.name
                if name in tried:
                    continue
                kind = target.provider.kind
                if kind not in translations:
                    translations[kind] = self._translation(call, kind)
                translation = translations[kind]
                if isinstance(translation, ApiError):  # this kind cannot serve the request
                    refused = translation
                    continue
                pause = 0.0
                if attempts:
                    pause = min(backoff(attempts), deadline - clock())
                    if pause <= 0:
                        break
                # Admitted only once the deadline allows the attempt: a half-open probe place
                # claimed here is then always used (and reported).
                probes = self._admit(target, mode)
                if probes is None:
                    continue
                if mode == PANIC:
                    self._count("panics", name)
                    log.warning(
                        "no target of the model is available: routing to it anyway (panic)",
                        extra={"provider": name},
                    )
                try:
                    if pause:
                        self._count("retries", name)
                        await asyncio.sleep(pause)
                    if call.charge is not None and outcome.working >= charged:
                        # An earlier attempt's request was sent and not answered: the upstream
                        # may bill it, and will bill this one too.
                        await call.charge()
                        charged += 1
                except BaseException:  # the client hung up during the backoff
                    self._verdict(target, probes, None, None)
                    raise
                remaining = deadline - clock()
                if remaining <= 0:
                    self._verdict(target, probes, None, None)
                    break
                tried.add(name)
                attempts += 1
                outcome.attempt(name)
                span = ctx.span
                if span is not None:  # a sampled request: the attempt's span id goes upstream
                    span.attempt(ctx, target.provider, target.model or call.model)
                try:
                    result, failure_now = await self._attempt(
                        ctx, outcome, target, call, remaining, probes, translation
                    )
                except BaseException as exc:  # not the provider's: the client left, a 4xx…
                    if span is not None:
                        why = outcome.error or getattr(exc, "code", None) or "cancelled"
                        span.attempt_ended(outcome.status, why, False)
                    raise
                if span is not None:
                    status = None if result is None else result.status
                    span.attempt_ended(status, outcome.error, isinstance(result, Events))
                if failure_now is None and result is not None and not _failed(result):
                    outcome.answered(result.status)
                    outcome.price = target.price  # what its usage costs (edge.cost)
                    return result
                if last is not None:
                    last.release()  # a better answer, or a failure, replaces it
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
        if refused is not None and not attempts:  # no target could take the request as sent
            raise refused
        raise ServiceUnavailable(
            "No provider could take this request in time.",
            code="no_provider_available",
            headers={"retry-after": "1"},
        )

    async def _one(self, ctx: RequestContext, call: Call) -> UpstreamResponse | Events:
        """One exchange with one provider (the pinned one, else the UPSTREAM_URL one): no
        failover, no breaker (GET /v1/models, /v1/models/{id} asked of its provider, and the
        stateful endpoints on theirs: edge.endpoints.stateful)."""
        provider = call.provider or self.providers.default
        if provider.kind == MOCK:
            return await self.mock.exchange(ctx, call)
        assert self.upstream is not None
        outcome = UpstreamOutcome()
        ctx.record_upstream(outcome)
        named = None if call.provider is None else provider.name
        if call.stream and call.raw:  # relayed as its bytes arrive (a stateful GET)
            opened = await self.upstream.open_stream(
                call.path, call.body or b"", ctx, outcome, provider, None, call.headers,
                raw=True, method=call.method,
            )  # fmt: skip
            if isinstance(opened, StreamResponse):
                outcome.answered(opened.status, named)
                source = relay_raw(opened, outcome)
                return Events(source, opened.abort, opened.close, content_type=opened.content_type)
            outcome.answered(opened.status, named)
            return opened
        result = await self.upstream.call(
            call.method, call.path, call.body, ctx, outcome, provider, None, call.headers
        )
        # Named once it answered, and only when pinned; attempts stay 0 (no routing took place).
        outcome.answered(result.status, named)
        if 200 <= result.status < 300 and not call.raw:
            _judge(result, outcome)
        return result

    def _translation(self, call: Call, kind: str) -> Translation | ApiError:
        """How `call` goes to a provider of `kind` (edge.routing.adapter), or the error (400
        naming the field) saying it cannot."""
        rule = self.providers.max_tokens_default(call.model or "")
        try:
            return Translation(call, kind, rule or self._max_tokens_default)
        except ApiError as exc:
            return exc

    async def _attempt(
        self,
        ctx: RequestContext,
        outcome: UpstreamOutcome,
        target: Target,
        call: Call,
        remaining: float,
        probes: tuple[float | None, float | None],
        translation: Translation | None = None,
    ) -> tuple[UpstreamResponse | Events | None, ApiError | None]:
        """One attempt at `target`, with the probe places `_admit` claimed for it; through
        `translation` when the provider's kind is not the client's API."""
        provider = target.provider
        name = provider.name
        timeout = remaining if provider.timeout_s is None else min(provider.timeout_s, remaining)
        # The adapter (edge.routing.adapter) sits here, between choosing the target and the
        # transport: routing, failover and breakers stay the same for translated targets.
        path, body, headers = call.path, call.body, call.headers
        if translation is not None:
            path, body, headers = translation.path, translation.body, translation.headers
        if target.model is not None and body is not None:
            body = (call.rename or rename_model)(body, target.model)
        transport = self.upstream
        assert transport is not None
        self.busy[name] = self.busy.get(name, 0) + 1
        started = time.perf_counter()
        try:
            if call.stream:
                result: UpstreamResponse | Opened = await self._open(
                    ctx, outcome, target, path, body or b"", timeout, headers, call.raw
                )
            else:
                result = await transport.call(
                    call.method, path, body, ctx, outcome, provider, timeout, headers
                )
            if isinstance(result, UpstreamResponse) and translation is not None:
                try:
                    result = translation.answer(result)
                except ApiError:
                    outcome.failed("invalid", result.status)
                    raise
            # A stream request answered whole is judged too; a raw answer (audio, a
            # transcription's text) may be any bytes.
            ok = isinstance(result, UpstreamResponse) and 200 <= result.status < 300
            if ok and not call.raw:
                _judge(result, outcome)  # type: ignore[arg-type]
        except ApiError as exc:
            kind = outcome.error
            if kind not in RETRYABLE_ERRORS:
                self._verdict(target, probes, None, None)  # not the provider's failure
                raise
            provider_ok, target_ok = _failure_verdict(kind, call)
            self._verdict(target, probes, provider_ok, target_ok)
            self._observe(name, "error", None)
            return None, exc
        except BaseException:  # cancelled: the client hung up before the answer
            self._verdict(target, probes, None, None)
            raise
        finally:
            self.busy[name] -= 1
        if isinstance(result, Opened):
            # The connection works; the target's verdict comes at the stream's end, when it is
            # known whether it broke. Only a half-open probe's success is reported now, so the
            # breaker can close without waiting out a long stream.
            self._verdict(target, probes, True, True if probes[1] is not None else None)
            self._observe(name, "2xx", time.perf_counter() - started)
            probed = probes[1] is not None
            return self._events(result, outcome, call, target, probed, translation), None
        status = result.status
        label = f"{status // 100}xx" if 100 <= status <= 599 else "error"
        self._observe(name, label, time.perf_counter() - started)
        if status == 429:
            wait = retry_after_s(result.headers)
            self._verdict(target, probes, True, False if not wait else None, wait or 0.0)
        elif status >= 500:
            self._verdict(target, probes, True, False)
        else:
            self._verdict(target, probes, True, True)
        return result, None

    def _events(
        self,
        opened: Opened,
        outcome: UpstreamOutcome,
        call: Call,
        target: Target,
        probed: bool,
        translation: Translation | None = None,
    ) -> Events:
        """The opened stream's events, reporting how the stream ended to the target's breaker:
        broken after its first event (a reset, a stall, a malformed event) is a failure like
        one before the first byte, though the client's stream can no longer fail over; whole,
        a success (unless the first event already reported a probe's). A stream whose client
        hung up has no verdict and is not reported."""

        def ended(ok: bool) -> None:
            # The connection worked (its first event came): how the answer ended is the
            # target's verdict, a reset mid-stream included.
            if not (ok and probed):
                self._report(target.breaker, ok)

        def error_event(kind: str, message: str) -> bytes:
            return stream_error_event(kind, message, call.api)

        resp = opened.resp
        if call.raw:  # bytes (audio), relayed as they come: no events, no usage to watch
            raw = relay_raw(resp, outcome, opened.first, ended)
            return Events(raw, resp.abort, resp.close, content_type=resp.content_type)
        if translation is None:
            source = relay(resp, outcome, error_event, opened.first, call.on_event, ended)
        else:  # the upstream's events (and the relay's error event) in its own shape, then ours

            def broke() -> None:  # the stream could not be translated, or ended early
                outcome.failed("invalid")
                self._report(target.breaker, False)

            upstream = relay(
                resp, outcome, translation.error_event, opened.first, call.on_event, ended
            )
            source = translation.events(upstream, broke)
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
        raw: bool = False,
    ) -> UpstreamResponse | Opened:
        """Open a stream (`raw`: of any bytes) and wait (within `timeout`) for its first bytes,
        so that a provider that answers the head but never an event is still failed over."""
        started = time.monotonic()
        assert self.upstream is not None
        opened = await self.upstream.open_stream(
            path, body, ctx, outcome, target.provider, timeout, extra_headers, raw
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

    def _number(self, name: str, now: float) -> int:
        """One breaker's state: 0 closed, 1 open, 2 half-open (open whose timeout is over:
        the next request will probe it)."""
        state = self.breakers.peek(name)
        if state.state == cb.OPEN and cb.available(state, self._policy, now):
            return cb.HALF_OPEN
        return state.state

    def _provider_number(self, name: str, now: float) -> int:
        """A provider's state as /health and the gauge show it: its own breaker's when that
        is not closed, else the best of its targets' (open only when all of them are)."""
        own = self._number(name, now)
        targets = self._targets_of.get(name) or []
        if own != cb.CLOSED or not targets:
            return own
        numbers = {self._number(key, now) for key in targets}
        for best in (cb.CLOSED, cb.HALF_OPEN, cb.OPEN):
            if best in numbers:
                return best
        return cb.CLOSED  # pragma: no cover

    def states(self) -> dict[str, dict[str, Any]]:
        """Each provider's breaker state and the longest cooldown of its targets, and the
        targets whose own breaker is not closed, for /health (no secrets)."""
        out = {}
        now = self.breakers.clock() if self.breakers is not None else 0.0
        for name, provider in self.providers.providers.items():
            entry = provider.describe()
            if self._use_breakers:
                number = self._provider_number(name, now)
                entry["breaker"] = cb.STATE_NAMES.get(number, "unknown")
                keys = self._targets_of.get(name) or []
                cooldowns = [self.breakers.peek(key).cooldown_until - now for key in keys]
                entry["cooldown_seconds"] = round(max([0.0, *cooldowns]), 3)
                degraded = {key: self._number(key, now) for key in keys}
                entry["targets"] = {
                    key.partition("/")[2]: cb.STATE_NAMES[value]
                    for key, value in degraded.items()
                    if value != cb.CLOSED
                }
            else:
                entry["breaker"] = "disabled"
            out[name] = entry
        return out

    def breaker_numbers(self) -> dict[str, int]:
        """provider → 0 closed, 1 open, 2 half-open (for the breaker gauge)."""
        if not self._use_breakers:
            return {}
        now = self.breakers.clock()
        return {name: self._provider_number(name, now) for name in self.providers.providers}

    def can_serve(self) -> bool:
        """Ready unless no provider can take any request (all breakers open)."""
        if not self._use_breakers:
            return True
        now = self.breakers.clock()
        return any(self._provider_number(name, now) != cb.OPEN for name in self.providers.providers)


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


def _failure_verdict(kind: str | None, call: Call) -> tuple[bool | None, bool | None]:
    """(provider, target) verdicts of an attempt that failed with `kind`: the connection's
    failures are the provider's, the answers' the target's; a timeout counts only when it does
    not depend on the request (before a stream's first event, or with a small output cap);
    a full pool is no one's."""
    if kind in ("connect", "disconnect", "auth"):
        return False, None
    if kind == "timeout":
        return None, (False if call.stream or _small_output(call) else None)
    if kind == "invalid":
        return True, False
    return None, None


PARSE_MAX_BYTES = 1 << 20  # a larger success is judged by its ends and its usage alone


def _small_output(call: Call) -> bool:
    """Whether the request caps its output at SMALL_OUTPUT_CAP tokens or fewer (in a field its
    API obeys)."""
    if call.prompt is None or call.data is None:
        return False
    cap = output_cap(call.data, call.prompt)
    return cap is not None and cap <= SMALL_OUTPUT_CAP


def _judge(answer: UpstreamResponse, outcome: UpstreamOutcome) -> None:
    """A success must be a JSON object (its `usage` feeds the token limits and metrics):
    anything else is the provider's failure (502, `invalid`), failed over like one.

    An answer over PARSE_MAX_BYTES (embeddings, mostly) is not parsed whole, which would cost
    several times its size in memory: it must begin and end as an object, and its `usage` is
    read from the object that follows the last `"usage"` key."""
    body = answer.body
    if len(body) <= PARSE_MAX_BYTES:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
    else:
        data = _usage_only(body)
    if not isinstance(data, dict):
        outcome.failed("invalid", answer.status)
        raise BadGateway("The upstream sent a response that is not a JSON object.")
    answer.data = data


_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')


def _usage_only(body: bytes) -> dict[str, Any] | None:
    """{"usage": …} of a large JSON object (see `_judge`), {} when it has none, None when the
    body does not begin and end as an object."""
    if body.lstrip()[:1] != b"{" or body.rstrip()[-1:] != b"}":
        return None
    at = body.rfind(b'"usage"')
    if at < 0:
        return {}
    key = _USAGE_KEY.match(body, at)
    if key is None:
        return {}
    start = key.end()
    depth = 0
    for end in range(start, min(len(body), start + 4096)):
        char = body[end]
        if char == 0x7B:  # {
            depth += 1
        elif char == 0x7D:  # }
            depth -= 1
            if depth == 0:
                try:
                    return {"usage": orjson.loads(body[start : end + 1])}
                except orjson.JSONDecodeError:
                    return {}
        elif depth == 0:
            return {}  # not an object (null, say)
    return {}
