"""`create_app(config)`: wires the Falcon ASGI app from one Config.

Per-worker resources (the upstream session, the shared rate-limit table, metric files) are
opened at ASGI lifespan startup, i.e. in the worker after gunicorn forked it, and closed at
shutdown. Nothing here reads the environment or does I/O at import time.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon
import falcon.asgi

from edge.auth import KeyStore
from edge.config import Config
from edge.endpoints.anthropic import Messages
from edge.endpoints.anthropic import error_body as anthropic_error_body
from edge.endpoints.body import validate_embeddings, validate_moderations, validate_responses
from edge.endpoints.openai import Completions, Health, MetricsResource, Models
from edge.endpoints.passthrough import ModelRetrieve, PassThrough
from edge.errors import ApiError, MethodNotAllowed, NotFound, from_http_status
from edge.middleware import AuthMiddleware, ContextMiddleware, RateLimitMiddleware
from edge.runtime import Runtime
from edge.upstream.client import Upstream

log = logging.getLogger("edge.app")


class EdgeRequest(falcon.asgi.Request):
    """Falcon's request plus the ASGI `receive` callable, used to notice a client hanging up
    while a stream is relayed (Falcon does not watch for that on `resp.stream`)."""

    __slots__ = ()

    @property
    def receive(self) -> Any:
        return self._receive


_HEAD_ONLY = {"type": "http.request", "body": b"", "more_body": True}


class EdgeApp(falcon.asgi.App):
    """The Falcon app, carrying its Runtime (tests look at it).

    Falcon awaits the first ASGI body event before it dispatches, so a request whose headers
    alone decide its fate (a Content-Length over the limit, a bad key) would wait for body
    bytes the client may never send. Handing Falcon an empty first chunk lets the middleware
    and handlers run as soon as the head is parsed; the body is then read on demand.
    """

    __slots__ = ("runtime",)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            receive = _head_first(receive)
        await super().__call__(scope, receive, send)


def _head_first(receive: Any) -> Any:
    pending = True

    async def head_then_body() -> Any:
        nonlocal pending
        if pending:
            pending = False
            return {**_HEAD_ONLY}  # a fresh event: Falcon owns what it is given
        return await receive()

    return head_then_body


def create_app(
    config: Config,
    keys: KeyStore | None = None,
    limiter_factory: Any = None,
    providers: Any = None,
    breakers_factory: Any = None,
) -> EdgeApp:
    """The ASGI app for `config`.

    `keys` is the KeyStore loaded by the gunicorn master (so a bad keys file stops the start,
    not a worker); when None it is loaded here. `limiter_factory` opens the rate limiter in
    the worker at startup (and it is closed at shutdown); without one, a process-local table
    is used (tests, a single process). `providers` (edge.upstream.providers.Providers) are those
    the master validated; when None they are loaded here from PROVIDERS_FILE or UPSTREAM_URL.
    `breakers_factory` attaches the host-wide breaker table at startup; without one, breakers
    are process-local.
    """
    from edge.upstream.breaker import LocalBreakers
    from edge.upstream.providers import load_for
    from edge.upstream.router import Router

    if providers is None:
        providers = load_for(config)
    if keys is None:
        keys = KeyStore.load(config)
    local_limiter = None
    if config.rate_limit_enabled and limiter_factory is None:
        from edge.ratelimit.local import LocalRateLimiter

        local_limiter = LocalRateLimiter(
            config.rate_limit_slots, failure_policy=config.rate_limit_failure_policy
        )
    metrics = None
    if config.enable_metrics:
        from edge.observability.metrics import Metrics

        metrics = Metrics()
    upstream = Upstream(config) if providers is not None else None
    runtime = Runtime(
        config, metrics, limiter_factory if config.rate_limit_enabled else None, upstream
    )
    runtime.limiter = local_limiter
    if providers is not None and upstream is not None:
        runtime.router = Router(providers, upstream, LocalBreakers(), config.timeout_s, metrics)
        runtime.breakers_factory = breakers_factory
        if metrics is not None:
            metrics.breaker_source = runtime.router.breaker_numbers

    health = Health(runtime)
    routes: list[tuple[str, Any, str | None]] = [
        ("/v1/chat/completions", Completions(runtime, chat=True), None),
        ("/v1/completions", Completions(runtime, chat=False), None),
        ("/v1/models", Models(runtime), None),
        ("/v1/models/{model_id:path}", ModelRetrieve(runtime), None),
        ("/v1/embeddings", PassThrough(runtime, "/embeddings", validate_embeddings), None),
        ("/v1/responses", PassThrough(runtime, "/responses", validate_responses), None),
        ("/v1/moderations", PassThrough(runtime, "/moderations", validate_moderations), None),
        ("/v1/messages", Messages(runtime), None),
        ("/health", health, None),
        ("/health/live", health, "live"),
        ("/health/ready", health, "ready"),
    ]
    if metrics is not None:
        routes.append(("/metrics", MetricsResource(metrics), None))

    # The routes double as the bounded set of `route` label values (anything else: unmatched).
    context = ContextMiddleware(config, metrics, frozenset(path for path, _, _ in routes))
    middleware: list[Any] = [runtime, context]
    if config.auth_enabled:
        middleware.append(AuthMiddleware(config, keys, metrics))
    if config.rate_limit_enabled:
        middleware.append(RateLimitMiddleware(config, runtime, metrics))

    app = EdgeApp(request_type=EdgeRequest, middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = False
    for path, resource, suffix in routes:
        app.add_route(path, resource, suffix=suffix)

    errors = _ErrorHandlers(app)
    app.add_error_handler(Exception, errors.unexpected_error)
    app.add_error_handler(falcon.HTTPError, errors.falcon_error)
    app.add_error_handler(ApiError, errors.api_error)
    app.runtime = runtime
    return app


class _ErrorHandlers:
    """One error handler per exception family; each renders in the envelope of the route that
    matched (Anthropic's on /v1/messages, OpenAI's everywhere else). The route is looked up
    with the app's own router, because an error raised by middleware comes before routing."""

    def __init__(self, app: EdgeApp) -> None:
        self._find = app._router.find

    def _anthropic(self, req: Any) -> bool:
        try:
            found = self._find(req.path)
        except Exception:  # pragma: no cover - a path the router cannot even look up
            return False
        return found is not None and getattr(found[0], "anthropic", False) is True

    def _render(self, req: Any, resp: Any, error: ApiError) -> None:
        resp.status = error.status
        resp.content_type = "application/json"
        resp.data = anthropic_error_body(error) if self._anthropic(req) else error.body()
        resp.stream = None
        if error.headers:
            resp.set_headers(error.headers)

    async def api_error(self, req: Any, resp: Any, error: ApiError, params: Any) -> None:
        self._render(req, resp, error)

    async def falcon_error(self, req: Any, resp: Any, error: falcon.HTTPError, params: Any) -> None:
        status = error.status_code
        if status == 404:
            mapped: ApiError = NotFound(f"Unknown route: {req.method} {req.path[:200]}")
        elif status == 405:
            mapped = MethodNotAllowed(f"Method {req.method} is not allowed on {req.path}.")
        else:
            mapped = from_http_status(status, error.description or error.title or "Bad request.")
        if error.headers:
            mapped.headers.update(error.headers)
        self._render(req, resp, mapped)

    async def unexpected_error(self, req: Any, resp: Any, error: Exception, params: Any) -> None:
        log.error("unhandled error", exc_info=error)
        self._render(
            req,
            resp,
            ApiError(
                "The server had an error while processing your request.", code="internal_error"
            ),
        )
