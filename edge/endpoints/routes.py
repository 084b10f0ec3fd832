"""Which endpoint is this? Answered once, by Falcon's router, and looked up here.

Theory of operation: a raw path is client input. Falcon's router ignores leading empty
segments and uvicorn decodes percent-escapes (`%2F` included), so `//v1/chat/completions` and
`/%2Fv1/chat/completions` both reach the chat handler, while a test on the raw path
(`startswith("/v1/")`, `in HEALTH_PATHS`) would say they do not. So no decision looks at the
raw path. Every request is routed first; the route template Falcon matched (`req.uri_template`)
names its `Endpoint`, and authentication, the rate limiter and the metric `route` label all
read that one object (the access log keeps the raw path, truncated, for forensics). A request
that matches no route has no Endpoint: it is answered 404 (after the key check, when auth is
on), spends no rate-limit token and is counted as `unmatched`.

`ROUTES` is the one table of templates, their kinds and the API each speaks (which decides the
shape of its errors, edge.errors): `create_app` refuses a route missing from it, and the
HTTP/1.1 protocol asks `kind_of_target` (the same table in Falcon's router) when it must tell a
health check from other requests before the app runs.
"""

from __future__ import annotations

import functools
import logging
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from edge.config import Config
from edge.endpoints.body import check_object_id, validate_model_id
from edge.errors import ANTHROPIC, OPENAI

API = "api"  # the /v1 endpoints: need a key, spend a rate-limit token
HEALTH = "health"  # public unless AUTH_HEALTH_CHECK; never limited; exempt from the cap
METRICS = "metrics"  # public unless AUTH_METRICS; never limited

# template → (kind, the API it speaks: OPENAI or ANTHROPIC, and so the shape of its errors)
ROUTES: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": (API, OPENAI),
    "/v1/completions": (API, OPENAI),
    "/v1/models": (API, OPENAI),
    "/v1/models/{model_id:path}": (API, OPENAI),
    "/v1/embeddings": (API, OPENAI),
    "/v1/responses": (API, OPENAI),
    "/v1/moderations": (API, OPENAI),
    "/v1/messages": (API, ANTHROPIC),
    "/v1/messages/count_tokens": (API, ANTHROPIC),
    "/v1/images/generations": (API, OPENAI),
    "/v1/audio/speech": (API, OPENAI),
    "/v1/audio/transcriptions": (API, OPENAI),
    "/v1/audio/translations": (API, OPENAI),
    "/v1/files": (API, OPENAI),
    "/v1/files/{file_id}": (API, OPENAI),
    "/v1/files/{file_id}/content": (API, OPENAI),
    "/v1/batches": (API, OPENAI),
    "/v1/batches/{batch_id}": (API, OPENAI),
    "/v1/batches/{batch_id}/cancel": (API, OPENAI),
    "/v1/responses/{response_id}": (API, OPENAI),
    "/health": (HEALTH, OPENAI),
    "/health/live": (HEALTH, OPENAI),
    "/health/ready": (HEALTH, OPENAI),
    "/metrics": (METRICS, OPENAI),
}


def _check_model_id(params: dict[str, Any]) -> None:
    validate_model_id(params["model_id"])


def _check_id(name: str) -> Callable[[dict[str, Any]], None]:
    def check(params: dict[str, Any]) -> None:
        check_object_id(params[name], name)

    return check


PARAM_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "/v1/models/{model_id:path}": _check_model_id,
    "/v1/files/{file_id}": _check_id("file_id"),
    "/v1/files/{file_id}/content": _check_id("file_id"),
    "/v1/batches/{batch_id}": _check_id("batch_id"),
    "/v1/batches/{batch_id}/cancel": _check_id("batch_id"),
    "/v1/responses/{response_id}": _check_id("response_id"),
}
UNMATCHED = "unmatched"  # the `route` label of a request no route matched

log = logging.getLogger("edge.routes")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One route as the request path sees it, with this app's policy for it decided once."""

    template: str  # the route template: the canonical spelling and the `route` label
    kind: str  # API, HEALTH or METRICS
    api: str  # OPENAI or ANTHROPIC: the wire format it speaks, and so its error shape
    public: bool  # served without a key
    limited: bool  # spends a rate-limit token (on a method it serves: a 405 spends none)
    methods: frozenset[str] = frozenset()  # the methods its resource answers; empty: any
    # Checks the path parameters Falcon matched (raises 400), before any token is spent: a
    # spelling whose parameter names nothing (`/v1/models/`, `/v1/models/.`) is refused as if
    # unmatched, not limited and then refused.
    check: Callable[[dict[str, Any]], None] | None = None


def endpoint_table(
    config: Config, templates: Iterable[str], methods: dict[str, frozenset[str]] | None = None
) -> dict[str, Endpoint]:
    """The Endpoint of each served template, keyed by template (what `req.uri_template` holds);
    `methods` are those each template's resource answers (Falcon's own 405/OPTIONS are not)."""
    configured_public = frozenset(config.public_paths)
    found: dict[str, Endpoint] = {}
    for template in templates:
        kind, api = ROUTES[template]  # a KeyError: a new route must be given a kind in ROUTES
        public = (
            not config.auth_enabled
            or template in configured_public
            or (kind == HEALTH and not config.auth_health_check)
            or (kind == METRICS and not config.auth_metrics)
        )
        limited = kind == API and config.rate_limit_enabled
        served = methods.get(template, frozenset()) if methods else frozenset()
        check = PARAM_CHECKS.get(template)
        found[template] = Endpoint(template, kind, api, public, limited, served, check)
    for path in sorted(configured_public - found.keys()):
        log.warning("PUBLIC_PATHS entry %s is not a route: it has no effect", path[:200])
    return found


@functools.cache
def _router() -> object:
    from falcon.routing import CompiledRouter

    router = CompiledRouter()
    for template in ROUTES:
        router.add_route(template, template)  # the "resource" is the template itself
    return router


def kind_of_path(path: str) -> str | None:
    """The kind of the route Falcon's router matches for a decoded path, else None."""
    found = _router().find(path)  # type: ignore[attr-defined]
    return None if found is None else ROUTES[found[3]][0]


def kind_of_target(target: bytes) -> str | None:
    """`kind_of_path` for a raw request target, decoded the way uvicorn builds the ASGI path."""
    try:
        import httptools

        path = httptools.parse_url(target).path.decode("ascii")
    except Exception:  # not a target uvicorn would accept either
        return None
    if "%" in path:
        path = urllib.parse.unquote(path)
    return kind_of_path(path)
