"""The request path's middleware: one class, three steps.

Falcon calls `process_request` before routing, `process_resource` after it (only when a route
matched) and `process_response` at the end:

- `process_request`: request id, trace context, in-flight gauge;
- `process_resource`: the matched `Endpoint` (edge.endpoints.routes) is recorded, then the key
  is checked unless the endpoint is public, then its path parameters (400 if one names
  nothing), then a rate-limit token is taken if it is limited and the method is one it serves
  (a 405 or Falcon's OPTIONS answer spends none), and then, for a key with a `max_parallel`
  (or KEY_MAX_PARALLEL), one of its requests in flight (edge.ratelimit.parallel);
- `process_response`: metrics and the access line. Streamed responses are finished when their
  `ResponseStream` closes, after the last byte.

A key's place among its requests in flight is given back in one place, when the request is
over: `EdgeApp.__call__` returns (after the last byte of a whole answer or a stream, an error's
answer, a client hanging up) or raises (a response that could not start, a cancelled task). It
finds the request under PARALLEL_HELD in the ASGI scope and calls `release_slot`, which gives
back what `RequestContext.parallel` says is held, once; a request that took none gives none.

A request that matches no route reaches the `unmatched` sink instead of `process_resource`: the
key is checked (when auth is on), and it is answered 404 having spent no token.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import falcon

from edge.auth import presented_key, unauthorized
from edge.cache.answers import SERVED
from edge.config import Config
from edge.endpoints.routes import API, UNMATCHED, Endpoint
from edge.errors import RateLimited
from edge.observability.context import (
    RequestContext,
    request_id_var,
    sane_client,
    sane_request_id,
    trace_id_var,
)
from edge.observability.logs import log_access
from edge.pipeline import ResponseStream, request_cost
from edge.ratelimit import Decision, RateLimiter, headers
from edge.ratelimit.base import ALLOW
from edge.ratelimit.parallel import HELD, NO_LOCK

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime

PARALLEL_HELD = "edge.parallel_held"  # ASGI scope: the RequestContext of a request holding one


class EdgeMiddleware:
    """Context, authentication and rate limiting, all decided on the matched endpoint."""

    def __init__(self, config: Config, endpoints: dict[str, Endpoint], runtime: Runtime) -> None:
        self._tracing = config.enable_tracing
        self._endpoints = endpoints
        self._auth = config.auth_enabled
        self._keys = runtime.keys
        self._rpm = config.rate_limit_rpm
        self._burst = config.rate_limit_burst
        self._policy = config.rate_limit_failure_policy
        self._limiter = runtime.limiter
        self._parallel = runtime.parallel
        self._default_parallel = config.key_max_parallel  # 0: no cap for keys that set none
        self._metrics = runtime.metrics
        self._spans = runtime.tracing  # exporting spans (edge.observability.tracing), or None
        self._accounts = runtime.accounts  # spend per key (edge.budgets), or None

    # -------------------------------------------------------------- the three steps

    async def process_request(self, req: Any, resp: Any) -> None:
        ctx = RequestContext(
            sane_request_id(req.get_header("x-request-id")), sane_client(req.remote_addr)
        )
        req.context.edge = ctx
        request_id_var.set(ctx.request_id)
        ctx.set_trace(req.get_header("traceparent"), req.get_header("tracestate"), self._tracing)
        if ctx.trace_id is not None:
            trace_id_var.set(ctx.trace_id)
            if self._spans is not None:
                self._spans.begin(ctx)
        resp.set_header("x-request-id", ctx.request_id)
        if self._metrics is not None:
            self._metrics.in_flight.inc()

    async def process_resource(self, req: Any, resp: Any, resource: Any, params: Any) -> None:
        ctx: RequestContext = req.context.edge
        ctx.route = endpoint = self._endpoints[req.uri_template]
        if not endpoint.public:
            self._authenticate(req, ctx)
        if endpoint.check is not None:
            endpoint.check(params)  # 400 for a parameter naming nothing: no token spent
        if endpoint.limited and (req.method in endpoint.methods or not endpoint.methods):
            identity, rpm, burst = self._bucket_of(ctx)
            limiter: RateLimiter = self._limiter
            if limiter.asynchronous:  # Redis: awaited; shm: a plain call, no coroutine
                decision = await limiter.check_async(identity, rpm, burst)
            else:
                decision = limiter.check(identity, rpm, burst)
            self._admit(resp, decision, rpm)
            entry = ctx.key
            if entry is not None:
                cap = entry.max_parallel or self._default_parallel
                if cap:
                    self._hold(req, ctx, entry.identity, cap)

    async def process_response(
        self, req: Any, resp: Any, resource: Any, req_succeeded: bool
    ) -> None:
        ctx: RequestContext | None = getattr(req.context, "edge", None)
        if ctx is None:  # pragma: no cover - process_request always runs first
            return
        stream = resp.stream
        if isinstance(stream, ResponseStream):
            status = resp.status_code

            def finish_stream(closed: ResponseStream) -> None:
                self._finish(req, ctx, status, closed)

            stream.on_close.append(finish_stream)
        else:
            self._finish(req, ctx, resp.status_code, None)

    async def unmatched(self, req: Any, resp: Any, **params: Any) -> None:
        """The sink for requests no route matched: the key check, then 404. No token spent."""
        if self._auth:
            self._authenticate(req, req.context.edge)
        raise falcon.HTTPRouteNotFound()

    # -------------------------------------------------------------- decisions

    def _authenticate(self, req: Any, ctx: RequestContext) -> None:
        """Put the presented key's identity on the context, or refuse with 401."""
        key = presented_key(req.get_header("x-api-key"), req.get_header("authorization"))
        entry = self._keys.lookup(key) if key else None
        if entry is not None and entry.expired(time.time()):
            # Refused as an unknown key is (no oracle); the metric alone says why.
            if self._metrics is not None:
                self._metrics.auth_failure("expired")
            raise unauthorized(missing=False)
        if entry is None:
            reason = "missing" if key is None else ("empty" if not key else "invalid")
            if self._metrics is not None:
                self._metrics.auth_failure(reason)
            raise unauthorized(missing=key is None)
        ctx.identity = entry.identity
        ctx.key = entry

    def _bucket_of(self, ctx: RequestContext) -> tuple[bytes, float, int]:
        """The bucket a request draws from: the key's identity (the client address when the
        endpoint is public), with the key's own limits where it has them."""
        rpm, burst = self._rpm, self._burst
        entry = ctx.key
        if entry is not None:
            identity = "key:" + entry.identity
            if entry.rpm is not None:
                rpm = entry.rpm
            if entry.burst is not None:
                burst = entry.burst
        else:
            identity = "addr:" + (ctx.client or "unknown")
        return identity.encode(), rpm, burst

    def _admit(self, resp: Any, decision: Decision, rpm: float) -> None:
        """Refuse with 429 (Retry-After), or admit with the x-ratelimit-* headers."""
        if decision.failure is not None and self._metrics is not None:
            self._metrics.limiter_failure(decision.failure, self._policy)
        if decision.failure is not None:
            # The bucket could not be consulted: the policy decided, and there is no
            # meaningful remaining/reset to report.
            if decision.allowed:
                return
            sent = {}
        else:
            sent = headers.admitted(decision, "requests")
        if not decision.allowed:
            if self._metrics is not None:
                self._metrics.rate_limited.inc()
            retry_ms = headers.retry_after(decision.retry_after, sent)
            raise RateLimited(
                f"Rate limit reached for requests ({decision.limit} burst, {rpm:g} per minute). "
                f"Try again in {retry_ms / 1000:.3g}s.",
                headers=sent,
            )
        resp.set_headers(sent)

    def _hold(self, req: Any, ctx: RequestContext, identity: str, cap: int) -> None:
        """Count the request among its key's requests in flight, or refuse it with 429 when
        the key has `cap` of them (or, by the failure policy, when they cannot be counted)."""
        parallel = self._parallel
        digest = parallel.digest(identity)
        got = parallel.take(digest, cap)
        if got == HELD:
            ctx.parallel = digest
            req.scope[PARALLEL_HELD] = ctx
            return
        metrics = self._metrics
        if got < 0:  # the table could not count it (lock timeout, no slot): the policy decides
            event = "parallel_lock_timeout" if got == NO_LOCK else "parallel_table_full"
            if metrics is not None:
                metrics.limiter_failure(event, self._policy)
            if self._policy == ALLOW:
                return
            message = "This key's requests in flight could not be counted. Try again in 1s."
        else:
            if metrics is not None:
                metrics.parallel_limited.inc()
            message = (
                f"This key has {got} requests in flight, its limit (max_parallel) is {cap}. "
                "Try again when one of them has finished."
            )
        sent: dict[str, str] = {}
        headers.retry_after(1.0, sent)
        raise RateLimited(message, code="too_many_parallel_requests", headers=sent)

    def release_slot(self, ctx: RequestContext) -> None:
        """Give back the request's place among its key's requests in flight, if it holds one
        (at most once)."""
        digest = ctx.parallel
        if digest is not None:
            ctx.parallel = None
            self._parallel.release(digest)

    # -------------------------------------------------------------- finishing

    def _finish(
        self, req: Any, ctx: RequestContext, status: int, stream: ResponseStream | None
    ) -> None:
        now = time.perf_counter()
        total = now - ctx.start
        upstream = ctx.upstream  # the recorded outcome (edge.routing.outcome), if it went upstream
        overhead = total if upstream is None else max(0.0, total - upstream.waited_s)
        path = req.path
        metrics = self._metrics
        if metrics is not None:
            endpoint = ctx.route
            route = UNMATCHED if endpoint is None else endpoint.template
            metrics.in_flight.dec()
            metrics.observe_request(route, req.method, status, total, overhead)
            if upstream is not None and (upstream.status is not None or upstream.error is not None):
                metrics.observe_upstream(upstream.status, upstream.waited_s, upstream.error)
            if ctx.prompt_tokens is not None or ctx.completion_tokens is not None:
                metrics.observe_tokens(
                    ctx.model,
                    ctx.prompt_tokens,
                    ctx.completion_tokens,
                    ctx.cache in SERVED,
                    ctx.identity,
                )
            if stream is not None:
                if stream.first_chunk_at is not None:
                    metrics.ttft.observe(stream.first_chunk_at - ctx.start)
                metrics.stream_duration.observe(total)
        usd = ctx.cost_usd  # a whole answer's, computed for its header
        if usd is None:
            ctx.cost_usd = usd = request_cost(ctx)
        if usd and metrics is not None:
            metrics.observe_cost(ctx.identity, usd)
        if ctx.key is not None and self._accounts is not None:
            self._accounts.finish(ctx, stream is None or stream.ended)
        record = ctx.span
        if record is not None and (ctx.route is None or ctx.route.kind == API):
            # Health checks and scrapes are not traced: probes would drown the requests.
            first = None if stream is None else stream.first_chunk_at
            self._spans.finish(ctx, record, req.method, status, first, now)
        log_access(ctx, req.method, path, status, total, overhead)
