"""The request path's middleware, in order: context → authentication → rate limit.

Falcon runs `process_request` in list order and `process_response` in reverse, so
`ContextMiddleware` sees every request first and every final status last. Streamed responses
are finished (metrics, access log) when their `ResponseStream` closes, after the last byte.
"""

from __future__ import annotations

import math
import time
from typing import Any

from edge.auth import KeyStore, presented_key, unauthorized
from edge.config import Config
from edge.errors import RateLimited
from edge.observability.context import RequestContext, request_id_var, sane_request_id, trace_id_var
from edge.observability.logs import log_access
from edge.ratelimit import Decision, RateLimiter
from edge.upstream.stream import ResponseStream

HEALTH_PATHS = frozenset({"/health", "/health/ready", "/health/live"})


class ContextMiddleware:
    """Request id, trace context, in-flight gauge; at the end, metrics and the access line."""

    def __init__(self, config: Config, metrics: Any, routes: frozenset[str]) -> None:
        self._tracing = config.enable_tracing
        self._metrics = metrics
        self._routes = routes

    async def process_request(self, req: Any, resp: Any) -> None:
        ctx = RequestContext(sane_request_id(req.get_header("x-request-id")), req.remote_addr)
        req.context.edge = ctx
        request_id_var.set(ctx.request_id)
        ctx.set_trace(req.get_header("traceparent"), req.get_header("tracestate"), self._tracing)
        if ctx.trace_id is not None:
            trace_id_var.set(ctx.trace_id)
        resp.set_header("x-request-id", ctx.request_id)
        if self._metrics is not None:
            self._metrics.in_flight.inc()

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

    def _finish(
        self, req: Any, ctx: RequestContext, status: int, stream: ResponseStream | None
    ) -> None:
        now = time.perf_counter()
        total = now - ctx.start
        overhead = max(0.0, total - ctx.upstream_s)
        path = req.path
        route = path if path in self._routes else "unmatched"
        metrics = self._metrics
        if metrics is not None:
            metrics.in_flight.dec()
            metrics.observe_request(route, req.method, status, total, overhead)
            if ctx.upstream_status is not None or ctx.upstream_error is not None:
                metrics.observe_upstream(ctx.upstream_status, ctx.upstream_s, ctx.upstream_error)
            if ctx.prompt_tokens is not None or ctx.completion_tokens is not None:
                metrics.observe_tokens(ctx.model, ctx.prompt_tokens, ctx.completion_tokens)
            if stream is not None:
                if stream.first_chunk_at is not None:
                    metrics.ttft.observe(stream.first_chunk_at - ctx.start)
                metrics.stream_duration.observe(total)
        log_access(ctx, req.method, path, status, total, overhead)


class AuthMiddleware:
    """Authenticate every non-public request; put the key's identity on the context."""

    def __init__(self, config: Config, keys: KeyStore, metrics: Any) -> None:
        public = set(config.public_paths)
        if not config.auth_health_check:
            public |= HEALTH_PATHS
        if not config.auth_metrics:
            public.add("/metrics")
        self._public = frozenset(public)
        self._keys = keys
        self._metrics = metrics

    async def process_request(self, req: Any, resp: Any) -> None:
        if req.path in self._public:
            return
        key = presented_key(req.get_header("x-api-key"), req.get_header("authorization"))
        entry = self._keys.lookup(key) if key else None
        if entry is None:
            reason = "missing" if key is None else ("empty" if not key else "invalid")
            if self._metrics is not None:
                self._metrics.auth_failure(reason)
            raise unauthorized(missing=key is None)
        ctx: RequestContext = req.context.edge
        ctx.identity = entry.identity
        ctx.key = entry


class RateLimitMiddleware:
    """One token bucket per key identity (per client address when auth is off), host-wide."""

    def __init__(self, config: Config, runtime: Any, metrics: Any) -> None:
        self._rpm = config.rate_limit_rpm
        self._burst = config.rate_limit_burst
        self._policy = config.rate_limit_failure_policy
        self._runtime = runtime
        self._metrics = metrics

    async def process_request(self, req: Any, resp: Any) -> None:
        if not req.path.startswith("/v1/"):
            return  # health and metrics are never limited
        ctx: RequestContext = req.context.edge
        rpm, burst = self._rpm, self._burst
        entry = ctx.key
        if entry is not None:
            identity = "key:" + ctx.identity
            if entry.rpm is not None:
                rpm = entry.rpm
            if entry.burst is not None:
                burst = entry.burst
        else:
            identity = "addr:" + (ctx.client or "unknown")
        limiter: RateLimiter = self._runtime.limiter
        decision = limiter.check(identity.encode(), rpm, burst)
        ctx.rate_decision = decision
        if decision.failure is not None and self._metrics is not None:
            self._metrics.limiter_failure(decision.failure, self._policy)
        if decision.failure is not None:
            # The bucket could not be consulted: the policy decided, and there is no
            # meaningful remaining/reset to report.
            if decision.allowed:
                return
            headers = {}
        else:
            headers = rate_headers(decision)
        if not decision.allowed:
            if self._metrics is not None:
                self._metrics.rate_limited.inc()
            retry_ms = min(60_000, max(1, math.ceil(decision.retry_after * 1000)))
            headers["retry-after"] = str(min(60, max(1, math.ceil(decision.retry_after))))
            headers["retry-after-ms"] = str(retry_ms)
            raise RateLimited(
                f"Rate limit reached for requests ({decision.limit} burst, {rpm:g} per minute). "
                f"Try again in {retry_ms / 1000:.3g}s.",
                headers=headers,
            )
        resp.set_headers(headers)


def rate_headers(decision: Decision) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(decision.limit),
        "x-ratelimit-remaining-requests": str(decision.remaining),
        "x-ratelimit-reset-requests": format_duration(decision.reset_after),
    }


def format_duration(seconds: float) -> str:
    """OpenAI's style: `20ms`, `1s`, `6m0s`, `1h2m3s` (whole seconds rounded up from 1 s)."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
