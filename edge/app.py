"""`create_app(config)`: wires the Falcon ASGI app from one Config.

Per-worker resources (the upstream session, the shared rate-limit table, metric files) are
opened at ASGI lifespan startup, i.e. in the worker after gunicorn forked it, and closed at
shutdown. Nothing here reads the environment or does I/O at import time.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi
from falcon.routing import map_http_methods

from edge.auth import KeyStore
from edge.config import Config
from edge.endpoints.anthropic import Messages
from edge.endpoints.anthropic import error_body as anthropic_error_body
from edge.endpoints.body import validate_embeddings, validate_moderations, validate_responses
from edge.endpoints.health import Health
from edge.endpoints.metrics import MetricsResource, SwitchedOff
from edge.endpoints.openai import Completions, Models
from edge.endpoints.passthrough import ModelRetrieve, PassThrough
from edge.endpoints.routes import ANTHROPIC_ROUTES, endpoint_table
from edge.errors import ApiError, MethodNotAllowed, NotFound, from_http_status
from edge.middleware import EdgeMiddleware
from edge.ratelimit.tokens import EMBEDDINGS, RESPONSES
from edge.runtime import Runtime
from edge.server.disconnect import EdgeRequest
from edge.upstream.client import Upstream

log = logging.getLogger("edge.app")
_EVERYTHING = re.compile("")


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
    clock: Callable[[], float] = time.monotonic,
) -> EdgeApp:
    """The ASGI app for `config`.

    `keys` is the KeyStore loaded by the gunicorn master (so a bad keys file stops the start,
    not a worker); when None it is loaded here. `limiter_factory` opens the rate limiter in
    the worker at startup (and it is closed at shutdown); without one, a process-local table
    is used (tests, a single process). `providers` (edge.upstream.providers.Providers) are those
    the master validated; when None they are loaded here from PROVIDERS_FILE or UPSTREAM_URL.
    `breakers_factory` attaches the host-wide breaker table at startup; without one, breakers
    are process-local. `clock` drives the process-local limiter (tests pass a fake one).
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
            config.rate_limit_slots, failure_policy=config.rate_limit_failure_policy, clock=clock
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
    if config.rate_limit_enabled and (config.rate_limit_tpm > 0 or keys.any_token_limit()):
        # Only where a token limit applies: otherwise every request would ask it for nothing.
        from edge.ratelimit.tokens import TokenLimiter

        runtime.tokens = TokenLimiter(config, runtime, metrics)
    if providers is not None and upstream is not None:
        runtime.router = Router(providers, upstream, LocalBreakers(), config.timeout_s, metrics)
        runtime.breakers_factory = breakers_factory
        if metrics is not None:
            metrics.breaker_source = runtime.router.breaker_numbers
    if metrics is not None:
        metrics.model_label = _model_labels(providers)

    health = Health(runtime)
    routes: list[tuple[str, Any, str | None]] = [
        ("/v1/chat/completions", Completions(runtime, chat=True), None),
        ("/v1/completions", Completions(runtime, chat=False), None),
        ("/v1/models", Models(runtime), None),
        ("/v1/models/{model_id:path}", ModelRetrieve(runtime), None),
        (
            "/v1/embeddings",
            PassThrough(runtime, "/embeddings", validate_embeddings, EMBEDDINGS),
            None,
        ),
        ("/v1/responses", PassThrough(runtime, "/responses", validate_responses, RESPONSES), None),
        ("/v1/moderations", PassThrough(runtime, "/moderations", validate_moderations, None), None),
        ("/v1/messages", Messages(runtime), None),
        ("/health", health, None),
        ("/health/live", health, "live"),
        ("/health/ready", health, "ready"),
    ]
    # With ENABLE_METRICS=false, /metrics stays a route that answers 404: the answer is then
    # the same with or without a key, as for the other public routes.
    metrics_resource = MetricsResource(metrics) if metrics is not None else SwitchedOff()
    routes.append(("/metrics", metrics_resource, None))

    # Every decision per endpoint (public, limited, the `route` label) is taken once, here,
    # on the template Falcon matches; see edge.endpoints.routes.
    answers = {
        path: frozenset(map_http_methods(resource, suffix)) for path, resource, suffix in routes
    }
    served = endpoint_table(config, answers, answers)
    edge = EdgeMiddleware(config, served, keys, runtime, metrics)

    app = EdgeApp(request_type=EdgeRequest, middleware=[runtime, edge])
    app.req_options.strip_url_path_trailing_slash = False
    for path, resource, suffix in routes:
        app.add_route(path, resource, suffix=suffix)
    app.add_sink(edge.unmatched, _EVERYTHING)  # tried only when no route matched

    app.add_error_handler(Exception, _unexpected_error)
    app.add_error_handler(falcon.HTTPError, _falcon_error)
    app.add_error_handler(ApiError, _api_error)
    app.runtime = runtime
    return app


def _model_labels(providers: Any) -> Callable[[str], str] | None:
    """The `model` label of the token metrics: a name this gateway serves (a PROVIDERS_FILE
    entry, a mock model), anything else `other`, so clients cannot fill the label set with
    names of their own. None with UPSTREAM_URL: the upstream decides which names exist (usage
    comes only with its answers), and the first MAX_MODEL_LABELS per worker are kept."""
    if providers is None:
        from edge.upstream.mock import MOCK_MODELS

        names = frozenset(MOCK_MODELS)
    elif providers.from_file:
        names = frozenset(providers.model_names())
    else:
        return None
    return lambda model: model if model in names else "other"


def _render(req: Any, resp: Any, error: ApiError) -> None:
    """The error in the envelope of the route that matched: Anthropic's on /v1/messages,
    OpenAI's everywhere else (a request that matched no route included)."""
    ctx = getattr(req.context, "edge", None)
    anthropic = ctx is not None and ctx.route is not None and ctx.route.template in ANTHROPIC_ROUTES
    resp.status = error.status
    resp.content_type = "application/json"
    resp.data = anthropic_error_body(error) if anthropic else error.body()
    resp.stream = None
    if error.headers:
        resp.set_headers(error.headers)


async def _api_error(req: Any, resp: Any, error: ApiError, params: Any) -> None:
    _render(req, resp, error)


async def _falcon_error(req: Any, resp: Any, error: falcon.HTTPError, params: Any) -> None:
    status = error.status_code
    if status == 404:
        mapped: ApiError = NotFound(f"Unknown route: {req.method} {req.path[:200]}")
    elif status == 405:  # on a matched route: name it, not the client's spelling of it
        ctx = getattr(req.context, "edge", None)
        where = ctx.route.template if ctx is not None and ctx.route else req.path[:200]
        mapped = MethodNotAllowed(f"Method {req.method} is not allowed on {where}.")
    else:
        mapped = from_http_status(status, error.description or error.title or "Bad request.")
    if error.headers:
        mapped.headers.update(error.headers)
    _render(req, resp, mapped)


async def _unexpected_error(req: Any, resp: Any, error: Exception, params: Any) -> None:
    log.error("unhandled error", exc_info=error)
    _render(
        req,
        resp,
        ApiError("The server had an error while processing your request.", code="internal_error"),
    )
