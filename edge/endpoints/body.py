"""Read a request body within the size limit, and validate it just enough to proxy safely.

The body is forwarded upstream byte for byte (decoded first if the client compressed it with
gzip or deflate); parsing it here only checks its shape and learns the model and whether the
client asked for a stream.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from edge.auth import check_model
from edge.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

if TYPE_CHECKING:
    from edge.observability.context import RequestContext
    from edge.runtime import Runtime

MAX_MODEL_LENGTH = 256
MAX_MESSAGES = 100_000


async def read_request(
    req: Any, runtime: Runtime, validate: Callable[[dict[str, Any]], tuple[str | None, bool]]
) -> tuple[bytes, dict[str, Any], RequestContext]:
    """A POST's JSON body, read within MAX_REQUEST_SIZE and validated; what it asks for (model,
    stream) goes on the request context, and its size into the metrics."""
    check_content_type(req.content_type)
    body = await read_body(req, runtime.config.max_request_size)
    data = parse_json_object(body)
    ctx: RequestContext = req.context.edge
    ctx.model, ctx.stream = validate(data)
    check_model(ctx.key, ctx.model)  # 403 for a model the key may not use
    if runtime.metrics is not None and ctx.route is not None:
        runtime.metrics.observe_request_size(ctx.route.template, len(body))
    return body, data, ctx


async def read_body(req: Any, limit: int) -> bytes:
    """The whole body, decoded, refusing with 413 as soon as it is known to exceed `limit` bytes.

    A declared Content-Length over the limit is refused before any of the body is read; a
    chunked body is read piece by piece and refused at the first byte past the limit, so no
    more than `limit` bytes are ever buffered. A body with a Content-Encoding is refused with
    415 before it is read unless the coding is gzip or deflate; such a body is then held to
    `limit` both as sent and as decoded (see `decode`).
    """
    coding = content_coding(req.get_header("content-encoding"))
    body = await _read_raw(req, limit)
    return decode(body, coding, limit) if coding else body


async def _read_raw(req: Any, limit: int) -> bytes:
    length = req.content_length
    if length is not None:
        if length > limit:
            raise _too_large(limit)
        return await req.stream.readall() if length else b""
    chunks = []
    size = 0
    async for chunk in req.stream:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"Request body exceeds the limit of {limit} bytes.", headers={"connection": "close"}
    )


_STEP = 256 * 1024  # most decoded bytes produced per decompression step


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def content_coding(header: str | None) -> str | None:
    """The one content coding to undo (`gzip`, `x-gzip`, `deflate`), None for none/`identity`,
    or 415 naming what is not supported (another coding, or more than one)."""
    if header is None:
        return None
    codings = [c.strip().lower() for c in header.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _WBITS:
        return codings[0]
    shown = ", ".join(codings)[:64]
    raise UnsupportedMediaType(
        f"Content-Encoding '{shown}' is not supported; send the body uncompressed, or "
        "compressed once with gzip or deflate.",
        param="content-encoding",
    )


def decode(data: bytes, coding: str, limit: int) -> bytes:
    """`data` decoded from `coding`, refused with 413 at the first decoded byte past `limit`.

    Decompression is incremental with a bound on each step's output (zlib's `max_length`), so
    a small body that inflates to gigabytes (a "zip bomb") costs at most `limit` bytes of memory
    before it is refused. Corrupt or truncated data is 400 naming the coding. `deflate` is
    the zlib format (RFC 9110 8.4.1.2); a raw deflate stream, which some clients send, is
    accepted too. Concatenated gzip members are decoded one after the other.
    """
    wbits = _WBITS[coding]
    if coding == "deflate" and not _zlib_header(data):
        wbits = -zlib.MAX_WBITS
    out: list[bytes] = []
    size = 0
    pending = data
    try:
        while True:
            inflater = zlib.decompressobj(wbits)
            while True:
                room = min(limit + 1 - size, _STEP)
                chunk = inflater.decompress(pending, room)
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(
                        f"Request body exceeds the limit of {limit} bytes once decoded ({coding})."
                    )
                out.append(chunk)
                pending = inflater.unconsumed_tail
                if inflater.eof or (not pending and len(chunk) < room):
                    break  # less than `room` came out, so all the input went in and out
            if not inflater.eof:
                raise BadRequest(
                    f"The request body is truncated {coding} data.", param="content-encoding"
                )
            pending = inflater.unused_data
            if not pending or wbits != _WBITS["gzip"]:
                break
    except zlib.error:
        raise BadRequest(
            f"The request body is not valid {coding} data.", param="content-encoding"
        ) from None
    if pending:
        raise BadRequest(
            f"The request body has data after the end of its {coding} stream.",
            param="content-encoding",
        )
    return b"".join(out)


def _zlib_header(data: bytes) -> bool:
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def check_content_type(content_type: str | None) -> None:
    """JSON or nothing: anything else is 415."""
    if content_type is None:
        return
    media = content_type.partition(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType("Content-Type must be application/json.", param="content-type")


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("The request body is empty; expected a JSON object.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest(
            "The request body is not valid JSON (or not UTF-8, or nested too deeply)."
        ) from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    return data


def _common(data: dict[str, Any]) -> tuple[str, bool]:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string.", param="model")
    if len(model) > MAX_MODEL_LENGTH:
        raise BadRequest(f"'model' must be at most {MAX_MODEL_LENGTH} characters.", param="model")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean.", param="stream")
    return model, stream


def validate_chat(data: dict[str, Any]) -> tuple[str, bool]:
    """(model, stream) of a chat completion request, or BadRequest naming the param."""
    model, stream = _common(data)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array.", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"'messages' must have at most {MAX_MESSAGES} entries.", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"'messages[{index}]' must be an object.", param=f"messages[{index}]")
    return model, stream


def validate_completion(data: dict[str, Any]) -> tuple[str, bool]:
    """(model, stream) of a legacy completion request, or BadRequest naming the param."""
    model, stream = _common(data)
    prompt = data.get("prompt")
    if prompt is None or not isinstance(prompt, str | list):
        raise BadRequest("'prompt' is required (a string or an array).", param="prompt")
    return model, stream


def validate_embeddings(data: dict[str, Any]) -> tuple[str, bool]:
    """(model, False) of an embeddings request."""
    model, _ = _common({"model": data.get("model")})
    value = data.get("input")
    if not _embeddings_input(value):
        raise BadRequest(
            "'input' must be a string, or a non-empty array (at most "
            f"{MAX_EMBEDDING_INPUTS}) of strings, of token ids, or of arrays of token ids.",
            param="input",
        )
    fmt = data.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    dimensions = data.get("dimensions")
    if dimensions is not None and (
        not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1
    ):
        raise BadRequest("'dimensions' must be a positive integer.", param="dimensions")
    return model, False


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request


def _embeddings_input(value: Any) -> bool:
    """A string, or a non-empty array of strings, of token ids, or of arrays of token ids."""
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value or len(value) > MAX_EMBEDDING_INPUTS:
        return False
    if all(isinstance(item, str) for item in value) or all(_token_ids(item) for item in value):
        return True
    return _token_ids(value)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(token, int) and not isinstance(token, bool) and token >= 0 for token in value
    )


def validate_responses(data: dict[str, Any]) -> tuple[str, bool]:
    """(model, stream) of a Responses-API request, or BadRequest naming `input`: it must be a
    string, or a non-empty array (at most MAX_MESSAGES) of input items, each an object (a
    message, an item reference, a tool call's output…) or a string. The items' contents are
    the upstream's to judge."""
    model, stream = _common(data)
    value = data.get("input")
    if isinstance(value, str):
        return model, stream
    if not isinstance(value, list) or not value:
        raise BadRequest(
            "'input' is required: a string, or a non-empty array of input items.", param="input"
        )
    if len(value) > MAX_MESSAGES:
        raise BadRequest(f"'input' must have at most {MAX_MESSAGES} items.", param="input")
    for index, item in enumerate(value):
        if not isinstance(item, dict | str):
            raise BadRequest(f"'input[{index}]' must be an object or a string.", param="input")
    return model, stream


DEFAULT_MODERATION_MODEL = "omni-moderation-latest"


def validate_moderations(data: dict[str, Any]) -> tuple[str, bool]:
    """(model, False) of a moderation request; the model is optional there."""
    if data.get("model") is None:
        model = DEFAULT_MODERATION_MODEL
    else:
        model, _ = _common({"model": data.get("model")})
    value = data.get("input")
    if value is None or not isinstance(value, str | list):
        raise BadRequest("'input' is required (a string or an array).", param="input")
    return model, False


def validate_model_id(model_id: str) -> str:
    """A model id from the path of GET /v1/models/{id}."""
    if not model_id or len(model_id) > MAX_MODEL_LENGTH or model_id in (".", ".."):
        raise BadRequest("Invalid model id in the path.", param="model")
    return model_id


DEFAULT_IMAGE_MODEL = "dall-e-2"  # OpenAI's own default when a request names none


def validate_images(data: dict[str, Any]) -> tuple[str, bool]:
    """(model, stream) of an image generation; the model is optional there, as in OpenAI's
    API (its default, DEFAULT_IMAGE_MODEL; the endpoint writes it into the body so a renaming
    target renames it too)."""
    if data.get("model") is None:
        model, stream = _common({**data, "model": DEFAULT_IMAGE_MODEL})
    else:
        model, stream = _common(data)
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' is required and must be a non-empty string.", param="prompt")
    return model, stream


def validate_speech(data: dict[str, Any]) -> tuple[str, bool]:
    """(model, True) of a text-to-speech request: its answer is relayed as it comes."""
    model, _ = _common({"model": data.get("model")})
    if not isinstance(data.get("input"), str) or not data["input"]:
        raise BadRequest("'input' is required and must be a non-empty string.", param="input")
    if data.get("voice") is None:
        raise BadRequest("'voice' is required.", param="voice")
    return model, True


MAX_OBJECT_ID = 128
_OBJECT_ID = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_OBJECT_ID - 1}}}$")


def check_object_id(value: str, param: str) -> None:
    """An object id from the path of a stateful endpoint (a file, a batch, a response): 1-128
    letters, digits, '_', '-' or '.', not starting with '.' (so never `..`): one plain path
    segment upstream; 400 naming it otherwise."""
    if not _OBJECT_ID.match(value):
        raise BadRequest(f"Invalid {param} in the path.", param=param)
