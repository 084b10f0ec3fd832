"""OpenAI's image and audio endpoints: routed by `model` like chat, passed through untranslated
to the model's OpenAI-kind providers (with failover among them), answered by the built-in mock
without providers.

- POST /v1/images/generations: JSON; the model is optional, as in OpenAI's API (its default,
  edge.endpoints.body.DEFAULT_IMAGE_MODEL, is routed and written into the body).
- POST /v1/audio/speech: JSON; the answer is audio, relayed as raw bytes as the upstream sends
  them (Call.raw), not read whole first.
- POST /v1/audio/transcriptions and /v1/audio/translations: multipart (edge.endpoints.
  multipart), routed by the `model` form field and forwarded byte for byte under the client's
  Content-Type. The answer (JSON, or text/srt/vtt as `response_format` asks) is passed on as
  it came; a form with `stream=true` is relayed as it comes, like speech.

No token limit applies to them (their prompts are not text the estimator reads); the token
metrics count what an answer's `usage` reports (gpt-image-1, gpt-4o-transcribe do).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from edge import pipeline
from edge.auth import check_model
from edge.endpoints.body import (
    MAX_MODEL_LENGTH,
    read_request,
    validate_images,
    validate_speech,
)
from edge.endpoints.forward import Forward
from edge.endpoints.multipart import boundary_of, read_form, rename_field
from edge.errors import OPENAI, BadRequest
from edge.observability.context import RequestContext
from edge.routing.exchange import Call

if TYPE_CHECKING:  # the handlers hold the worker's Runtime
    from edge.runtime import Runtime


class Images(Forward):
    """POST /v1/images/generations."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime, "/images/generations", validate_images, None)

    async def on_post(self, req: Any, resp: Any) -> None:
        runtime = self._runtime
        body, data, ctx = await read_request(req, runtime, validate_images)
        if data.get("model") is None:  # the default, named, so a renaming target renames it
            data["model"] = ctx.model
            body = pipeline.reserialise(data)
        call = Call(OPENAI, "POST", self._path, body, data, ctx.model, ctx.stream)
        await pipeline.run(runtime, req, resp, call)


class Speech(Forward):
    """POST /v1/audio/speech: the audio relayed as it comes."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime, "/audio/speech", validate_speech, None)

    async def on_post(self, req: Any, resp: Any) -> None:
        runtime = self._runtime
        body, data, ctx = await read_request(req, runtime, validate_speech)
        call = Call(OPENAI, "POST", self._path, body, data, ctx.model, True, raw=True)
        await pipeline.run(runtime, req, resp, call)


class Transcribe:
    """POST /v1/audio/transcriptions or /v1/audio/translations (`path`): a multipart form."""

    def __init__(self, runtime: Runtime, path: str) -> None:
        self._runtime = runtime
        self._path = path

    async def on_post(self, req: Any, resp: Any) -> None:
        runtime = self._runtime
        body, content_type, fields = await read_form(req, runtime)
        model = fields.get("model", "")
        if not model or len(model) > MAX_MODEL_LENGTH:
            raise BadRequest(
                f"The form field 'model' is required (at most {MAX_MODEL_LENGTH} characters).",
                param="model",
            )
        stream = fields.get("stream", "false").strip().lower() == "true"
        ctx: RequestContext = req.context.edge
        ctx.model, ctx.stream = model, stream
        check_model(ctx.key, model)  # 403 for a model the key may not use
        headers = {"content-type": content_type}  # the boundary the parts are cut at
        # `data` stays None: the body is no JSON (a renaming target rewrites the form field).
        call = Call(OPENAI, "POST", self._path, body, None, model, stream, headers, raw=True)
        call.rename = functools.partial(_rename, boundary_of(content_type))
        await pipeline.run(runtime, req, resp, call)


def _rename(boundary: bytes, body: bytes, model: str) -> bytes:
    return rename_field(body, boundary, model)
