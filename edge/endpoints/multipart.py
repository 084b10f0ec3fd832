"""Multipart bodies (audio transcriptions, file uploads): read within MAX_REQUEST_SIZE, a few
form fields learnt, the bytes forwarded unchanged.

The body goes upstream exactly as the client sent it (decoded first if it was compressed),
under the client's own Content-Type, since that carries the boundary the parts are cut at.
Only the text fields the gateway needs (the `model` to route by, `stream`) are parsed, with
Falcon's multipart parser (falcon.media.multipart, already a dependency: no second parser,
no hand-written one) over the bytes already read; file parts are skipped, never buffered
twice. A body that does not parse is the client's 400: the upstream would refuse it too.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING, Any

import falcon
from falcon.media.multipart import MultipartFormHandler, MultipartParseOptions

from edge.endpoints.body import read_body
from edge.errors import BadRequest, UnsupportedMediaType

if TYPE_CHECKING:
    from edge.runtime import Runtime

MAX_CONTENT_TYPE = 256
MAX_FIELD_BYTES = 4096  # a text field read here (a model name is at most 256 characters)
# RFC 2046 5.1.1: 1-70 characters, of these; and nothing in the header that could not go
# upstream as it came.
_CONTENT_TYPE = re.compile(r"^[\x20-\x7e]+$")
_FIELDS = ("model", "stream")


def _handler() -> MultipartFormHandler:
    options = MultipartParseOptions()
    options.max_body_part_count = 256  # OpenAI's forms have a dozen fields; arrays repeat them
    options.max_body_part_buffer_size = MAX_FIELD_BYTES
    return MultipartFormHandler(options)


_HANDLER = _handler()


def check_multipart(content_type: str | None) -> str:
    """The client's Content-Type when it is multipart/form-data with a usable boundary
    (forwarded as it is), else 415 (another media type) or 400 (no boundary)."""
    if content_type is None or content_type.partition(";")[0].strip().lower() != (
        "multipart/form-data"
    ):
        raise UnsupportedMediaType(
            "Content-Type must be multipart/form-data.", param="content-type"
        )
    if len(content_type) > MAX_CONTENT_TYPE or not _CONTENT_TYPE.match(content_type):
        raise BadRequest("The Content-Type header is too long or not printable ASCII.",
                         param="content-type")  # fmt: skip
    _, params = falcon.parse_header(content_type)
    boundary = params.get("boundary", "").rstrip()
    if not 1 <= len(boundary) <= 70:
        raise BadRequest(
            "A multipart Content-Type needs a boundary of 1 to 70 characters.",
            param="content-type",
        )
    return content_type


async def read_form(req: Any, runtime: Runtime) -> tuple[bytes, str, dict[str, str]]:
    """(body, Content-Type, the text fields `model` and `stream` found) of a multipart POST,
    read within MAX_REQUEST_SIZE (413 past it); its size goes into the metrics."""
    content_type = check_multipart(req.content_type)
    body = await read_body(req, runtime.config.max_request_size)
    fields = form_fields(body, content_type)
    ctx = req.context.edge
    if runtime.metrics is not None and ctx.route is not None:
        runtime.metrics.observe_request_size(ctx.route.template, len(body))
    return body, content_type, fields


def form_fields(body: bytes, content_type: str) -> dict[str, str]:
    """The value of each of _FIELDS among the form's parts. Every part is looked at: a field
    sent twice is a 400, as a JSON key sent twice is resolved once (edge.routing.router's
    rename_model): the model the gateway routes by and renames must be the only one the
    upstream can read."""
    found: dict[str, str] = {}
    try:
        form = _HANDLER.deserialize(io.BytesIO(body), content_type, len(body))
        for part in form:
            name = part.name
            if name not in _FIELDS:
                continue
            if name in found or part.filename is not None:
                raise BadRequest(f"The form has more than one '{name}' field.", param=name)
            found[name] = part.get_text() or ""
    except falcon.HTTPError:  # MultipartParseError, a part over MAX_FIELD_BYTES...
        raise BadRequest("The request body is not a valid multipart/form-data body.") from None
    except UnicodeDecodeError:
        raise BadRequest("A multipart text field is not valid UTF-8.") from None
    return found


def boundary_of(content_type: str) -> bytes:
    _, params = falcon.parse_header(content_type)
    return params["boundary"].rstrip().encode("ascii")


def _is_model_part(head: bytes) -> bool:
    """Whether a part's header block names the `model` text field, read as the parser reads
    it (its Content-Disposition's `name` parameter, exactly; a file part is not one)."""
    for line in head.split(b"\r\n"):
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == b"content-disposition":
            _, params = falcon.parse_header(value.decode("latin-1"))
            return params.get("name") == "model" and not (
                "filename" in params or "filename*" in params
            )
    return False


def rename_field(body: bytes, boundary: bytes, model: str) -> bytes:
    """`body` with the value of its `model` text part (the only one: `form_fields`) replaced
    by `model` (a target that serves the model under another name, Call.rename), all else
    byte for byte. Part headers are found by the delimiter line alone, so file bytes are never
    scanned as text."""
    delimiter = b"\r\n--" + boundary
    at = body.find(b"--" + boundary)  # the first delimiter needs no CRLF before it
    while at >= 0:
        start = body.find(b"\r\n", at) + 2
        end = body.find(b"\r\n\r\n", start)
        if start < 2 or end < 0:
            break
        following = body.find(delimiter, end + 4)
        if following < 0:
            break
        if _is_model_part(body[start:end]):
            return body[: end + 4] + model.encode() + body[following:]
        at = following + 2
    return body
