"""`create_app(config)`: the Falcon ASGI app over one worker's Runtime (edge.runtime, where
every object is built from the one Config), its route table and its error handlers.

Nothing here reads the environment or does I/O at import time.
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
from edge.endpoints.anthropic import CountTokens, Messages
from edge.endpoints.body import (
    validate_chat,
    validate_completion,
    validate_embeddings,
    validate_moderations,
    validate_responses,
)
from edge.endpoints.forward import Forward
from edge.endpoints.health import Health
from edge.endpoints.media import Images, Speech, Transcribe
from edge.endpoints.metrics import MetricsResource, SwitchedOff
from edge.endpoints.openai import Models
from edge.endpoints.passthrough import ModelRetrieve
from edge.endpoints.routes import endpoint_table
from edge.endpoints.stateful import STATEFUL_ROUTES, Stateful
from edge.errors import OPENAI, ApiError, MethodNotAllowed, NotFound, from_http_status
from edge.middleware import PARALLEL_HELD, EdgeMiddleware
from edge.pipeline import BUDGET_HELD
from edge.ratelimit.tokens import CHAT, COMPLETION, EMBEDDINGS, RESPONSES
from edge.routing.providers import Providers
from edge.runtime import HostTables, Runtime
from edge.server.disconnect import EdgeRequest

log = logging.getLogger("edge.app")
_EVERYTHING = re.compile("")


_HEAD_ONLY = {"type": "http.request", "body": b"", "more_body": True}


class EdgeApp(falcon.asgi.App):
    """The Falcon app, carrying its Runtime (tests look at it).

    Falcon awaits the first ASGI body event before it dispatches, so a request whose headers
    alone decide its fate (a Content-Length over the limit, a bad key) would wait for body
    bytes the client may never send. Handing Falcon an empty first chunk lets the middleware
    and handlers run as soon as the head is parsed; the body is then read on demand.

    When a request is over (returned or raised: every path), the place it took among its key's
    requests in flight (`max_parallel`) is given back here, in one place, and a budget
    reservation its answer's end did not settle is settled.
    """

    __slots__ = ("release_slot", "runtime")
    runtime: Runtime
    release_slot: Callable[[Any], None]  # EdgeMiddleware's: a key's request in flight given back

    # falcon.asgi.App's own __call__ ignores the same override: its WSGI base class has
    # another signature.
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:  # type: ignore[override]
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        try:
            await super().__call__(scope, _head_first(receive), send)
        finally:
            # The request is over, whichever way: its key's place among the requests in flight,
            # if it took one, is given back (edge.middleware).
            ctx = scope.get(PARALLEL_HELD)
            if ctx is not None:
                self.release_slot(ctx)
            ctx = scope.get(BUDGET_HELD)
            if ctx is not None and ctx.budget is not None:
                # Its answer never ended (its start could not be sent: Falcon closed nothing),
                # so its reservation was never settled: settled now, as a request cut short.
                self.runtime.accounts.finish(ctx, False)


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
    providers: Providers | None = None,
    tables: HostTables | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> EdgeApp:
    """The ASGI app for `config`: the worker's objects (`Runtime.build`, which says what the
    other arguments are) and the route table."""
    runtime = Runtime.build(config, keys, providers, tables, clock)
    health = Health(runtime)
    # With ENABLE_METRICS=false, /metrics stays a route that answers 404: the answer is then
    # the same with or without a key, as for the other public routes.
    metrics = runtime.metrics
    routes: list[tuple[str, Any, str | None]] = [
        ("/v1/chat/completions", Forward(runtime, "/chat/completions", validate_chat, CHAT), None),
        (
            "/v1/completions",
            Forward(runtime, "/completions", validate_completion, COMPLETION),
            None,
        ),
        ("/v1/models", Models(runtime), None),
        ("/v1/models/{model_id:path}", ModelRetrieve(runtime), None),
        ("/v1/embeddings", Forward(runtime, "/embeddings", validate_embeddings, EMBEDDINGS), None),
        ("/v1/responses", Forward(runtime, "/responses", validate_responses, RESPONSES), None),
        ("/v1/moderations", Forward(runtime, "/moderations", validate_moderations, None), None),
        ("/v1/messages", Messages(runtime), None),
        ("/v1/messages/count_tokens", CountTokens(runtime), None),
        ("/v1/images/generations", Images(runtime), None),
        ("/v1/audio/speech", Speech(runtime), None),
        ("/v1/audio/transcriptions", Transcribe(runtime, "/audio/transcriptions"), None),
        ("/v1/audio/translations", Transcribe(runtime, "/audio/translations"), None),
        *(
            (template, Stateful(runtime, path, methods), None)
            for template, (path, methods) in STATEFUL_ROUTES.items()
        ),
        ("/health", health, None),
        ("/health/live", health, "live"),
        ("/health/ready", health, "ready"),
        ("/metrics", MetricsResource(metrics) if metrics is not None else SwitchedOff(), None),
    ]
    # Every decision per endpoint (public, limited, the `route` label) is taken once, here,
    # on the template Falcon matches; see edge.endpoints.routes.
    answers = {
        path: frozenset(map_http_methods(resource, suffix)) for path, resource, suffix in routes
    }
    served = endpoint_table(config, answers, answers)
    edge = EdgeMiddleware(config, served, runtime)

    app = EdgeApp(request_type=EdgeRequest, middleware=[runtime, edge])
    app.req_options.strip_url_path_trailing_slash = False
    for path, resource, suffix in routes:
        app.add_route(path, resource, suffix=suffix)
    app.add_sink(edge.unmatched, _EVERYTHING)  # tried only when no route matched

    app.add_error_handler(Exception, _unexpected_error)
    app.add_error_handler(falcon.HTTPError, _falcon_error)
    app.add_error_handler(ApiError, _api_error)
    app.runtime = runtime
    app.release_slot = edge.release_slot
    return app


def _render(req: Any, resp: Any, error: ApiError) -> None:
    """The error in the shape of the API the matched route speaks (edge.errors); OpenAI's for a
    request that matched no route."""
    ctx = getattr(req.context, "edge", None)
    shape = OPENAI if ctx is None or ctx.route is None else ctx.route.api
    if ctx is not None:
        ctx.error_code = error.code  # the span's record of a refusal (edge.observability)
    resp.status = error.status
    resp.content_type = "application/json"
    resp.data = error.body(shape)
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
