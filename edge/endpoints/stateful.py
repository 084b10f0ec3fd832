"""OpenAI's stateful endpoints, pinned to one provider: files, batches, stored responses.

A file uploaded, a batch created or a response stored exists only at the provider that made
it, so these calls cannot be routed by model or failed over: they all go to the provider named
by `[routing] stateful_provider` in PROVIDERS_FILE (edge.routing.providers; of kind openai,
passed through untranslated), one exchange each, no breaker, no token limit. Without one they
answer 404 saying so. Auth, rate limits, metrics and the access log apply as on every /v1
route (edge.endpoints.routes); the path parameters were checked there (edge.endpoints.body.
check_object_id) before any token was spent, so an id goes upstream as one safe segment.

Bodies: an upload is multipart, read within MAX_REQUEST_SIZE and forwarded byte for byte under
the client's Content-Type; a batch is a JSON object. Answers are passed on as they came
(`Call.raw`: a file's content is any bytes): a GET's relayed as its bytes arrive, the others'
read whole within the answer size bound; their `usage` (a stored response's) is not this
request's, so it is not counted again.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any

from edge import pipeline
from edge.endpoints.body import check_content_type, parse_json_object, read_body
from edge.endpoints.multipart import check_multipart
from edge.errors import OPENAI, BadRequest, Forbidden, NotFound
from edge.routing.exchange import Call

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime

MAX_QUERY = 2048  # characters of the query string passed on (list paging: limit, after…)


class Stateful:
    """One stateful route: `path` is the upstream path, with `{name}` for each path parameter;
    `methods` those it serves ("POST_FORM": a multipart upload, "POST": a JSON body, else no
    body)."""

    def __init__(self, runtime: Runtime, path: str, methods: tuple[str, ...]) -> None:
        self._runtime = runtime
        self._path = path
        self._methods = methods
        if "GET" in methods:
            self.on_get = self._get
        if "DELETE" in methods:
            self.on_delete = self._delete
        if "POST" in methods or "POST_FORM" in methods:
            self.on_post = self._post

    def _provider(self) -> Any:
        provider = self._runtime.router.providers.stateful
        if provider is None:
            raise NotFound(
                "No stateful provider is configured: files, batches and stored responses need "
                "[routing] stateful_provider in PROVIDERS_FILE.",
                code="stateful_provider_not_configured",
            )
        return provider

    def _upstream_path(self, req: Any, params: dict[str, str]) -> str:
        path = self._path.format(**params)  # ids checked by the route: safe segments
        query = _query(req)
        return f"{path}?{query}" if query else path

    async def _get(self, req: Any, resp: Any, **params: str) -> None:
        await self._send(req, resp, "GET", params, None, None)

    async def _delete(self, req: Any, resp: Any, **params: str) -> None:
        await self._send(req, resp, "DELETE", params, None, None)

    async def _post(self, req: Any, resp: Any, **params: str) -> None:
        self._provider()  # 404 before the body is read when there is none
        key = req.context.edge.key
        if self._path == "/batches" and key is not None and key.allowed is not None:
            # A batch runs the models its uploaded file names, which the gateway never sees
            # go by: a key limited to some models may not create one.
            raise Forbidden(
                "This key is limited to some models and may not create batches.",
                code="model_not_allowed",
            )
        if self._path == "/batches" and key is not None and key.budget_usd is not None:
            # Nor can a batch be priced or held to a budget before it runs.
            raise Forbidden(
                "This key has a budget and may not create batches (their cost cannot be held "
                "to it).",
                code="budget_not_applicable",
            )
        limit = self._runtime.config.max_request_size
        headers = None
        if "POST_FORM" in self._methods:
            headers = {"content-type": check_multipart(req.content_type)}
            body = await read_body(req, limit)
        else:
            check_content_type(req.content_type)
            body = await read_body(req, limit)
            if body:  # a cancel has none; a batch is a JSON object
                parse_json_object(body)
        metrics, route = self._runtime.metrics, req.context.edge.route
        if metrics is not None and route is not None:
            metrics.observe_request_size(route.template, len(body))
        await self._send(req, resp, "POST", params, body, headers)

    async def _send(
        self,
        req: Any,
        resp: Any,
        method: str,
        params: dict[str, str],
        body: bytes | None,
        headers: dict[str, str] | None,
    ) -> None:
        provider = self._provider()
        path = self._upstream_path(req, params)
        # A GET's answer (a file's content, a stored response's events) is relayed as its
        # bytes arrive, never held whole: a client that reads slowly then holds an upstream
        # connection (until HTTP_SEND_TIMEOUT_SECONDS), not the worker's buffer budget that
        # every whole answer shares, and a file larger than an answer may be still arrives.
        relayed = method == "GET"
        call = Call(OPENAI, method, path, body, None, None, relayed, headers, provider,
                    raw=True, metered=False)  # fmt: skip
        await pipeline.run(self._runtime, req, resp, call)


def _query(req: Any) -> str:
    """The client's query parameters, re-encoded (so only ASCII goes into the request line),
    or 400 past MAX_QUERY characters."""
    raw = req.query_string or ""
    if not raw:
        return ""
    if len(raw) > MAX_QUERY:
        raise BadRequest(f"The query string must be at most {MAX_QUERY} characters.")
    pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True)
    return urllib.parse.urlencode(pairs)


# template → (upstream path, methods); the templates' kinds and checks are in
# edge.endpoints.routes.
STATEFUL_ROUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "/v1/files": ("/files", ("POST_FORM", "GET")),
    "/v1/files/{file_id}": ("/files/{file_id}", ("GET", "DELETE")),
    "/v1/files/{file_id}/content": ("/files/{file_id}/content", ("GET",)),
    "/v1/batches": ("/batches", ("POST", "GET")),
    "/v1/batches/{batch_id}": ("/batches/{batch_id}", ("GET",)),
    "/v1/batches/{batch_id}/cancel": ("/batches/{batch_id}/cancel", ("POST",)),
    "/v1/responses/{response_id}": ("/responses/{response_id}", ("GET", "DELETE")),
}
