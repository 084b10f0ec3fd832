"""A real OpenAI-compatible upstream for the integration tests, run as its own process.

    python tests/upstream_server.py --port 9000

It answers like a provider and misbehaves on demand, chosen by the request's `model`:

    any model             a chat.completion / text_completion (stream: true → paced SSE)
    slow                  answers after --slow seconds (longer than the proxy's timeout)
    hang                  reads the request and never answers
    error-429             429 with retry-after: 7 and an OpenAI error body
    error-500             500 with an OpenAI error body
    html-500              500 with an HTML body
    garbage               200 with a body that is not JSON
    garbage-http          bytes that are not HTTP at all, then close
    reset-mid-stream      two SSE chunks, then a TCP reset
    stall-mid-stream      two SSE chunks, then silence
    cut-mid-event         two SSE chunks, half of the third, then the connection closes
                          (/v1/messages: three events, half of the fourth)
    end-mid-event         two SSE chunks, half of the third, then a clean end of the response
    split-events          every event written in pieces, cut inside its data and its CRLFs,
                          with a pause between pieces (a whole, valid stream)
    huge-event            one chunk, then one 5 MiB event written in 64 KiB pieces, then [DONE]
    error-401, error-403  that status with an error body quoting part of the upstream key
                          and the canary string CANARY
    stall-first           the stream's response head, then silence
    paced                 SSE chunks every --pace seconds (also: model "paced-N" sends N chunks)
    long-stream           SSE chunks as fast as the client reads, for --long-chunks chunks
    fast-N                N SSE chunks without pause (quick streams for soak and leak runs)
    negative-usage        a usage with prompt_tokens -1 (whole and streamed)
    long-content-type     an answer whose content type is over 300 characters
    bill, bill-slow       an honest provider's billing (chat, completions, responses): input
                          tokens are the bytes of every string in the body (keys included) / 4
                          plus 1,000 per image part; it generates the output cap the route's
                          API obeys (at most 400, and 400 without one), times `n`, streamed
                          one token an event when asked; "bill-slow" takes 10 ms a token.
                          What it billed, and when, is at GET /_bills (a client that leaves is
                          billed what was generated until it left; "done" once it stopped)

With `tools` in a chat or Messages request, it answers like a model in an agent loop: a call of
the first tool with {"city": "Paris"} (streamed: the arguments in three fragments), or, when
the last message is that tool's result, the text "Tool said: <the result>". Anthropic's
/v1/messages also answers model "overloaded" with 529 overloaded_error, and
/v1/messages/count_tokens counts the bytes of `messages` / 4.

The rest of the OpenAI surface: /v1/images/generations (one b64 image, and usage),
/v1/audio/speech (SPEECH_BYTES written in pieces, audio/mpeg), /v1/audio/transcriptions and
/translations (multipart: the `model` field and the file's size and SHA-256 are kept with what
GET /_seen returns, as `form`), and in-memory /v1/files (upload, list, retrieve, content,
delete), /v1/batches (create, list, retrieve, cancel) and GET/DELETE /v1/responses/{id}.

More endpoints: /v1/embeddings (echoes encoding_format: base64 or float), /v1/responses
(streamed and not), /v1/moderations, /v1/models/{id}, and Anthropic's /v1/messages (streamed
and not; errors in Anthropic's shape).

For routing tests: --name NAME is put in every answer (header x-upstream-name, and the reply
text); GET /_log lists every /v1 request received (path, model), POST /_control sets a fault
for all /v1 requests ({"status": 500} or {"status": 429, "retry_after": "7"}; {} clears it).

What it received is kept per x-request-id: GET /_seen/{request_id} returns the headers (and the
body's size) of that request, so a test can check what the proxy sent upstream. GET /_stats
counts streams started, finished and abandoned (for the client-disconnect tests).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import socket
import struct
import time

from aiohttp import web

SEEN: dict[str, dict] = {}
CANARY = "upstream-body-canary-7f3a"
LOG: list[dict] = []
CONTROL: dict = {}
STATS = {"streams_started": 0, "streams_finished": 0, "streams_cancelled": 0}
BILLS: list[dict] = []
SERIAL = [0]
BILL_MAX_OUTPUT = 400
IMAGE_TYPES = ("image_url", "input_image", "image")


def _usage(prompt: int = 5, completion: int = 7) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _serial() -> str:
    """A mark unique to each answer this upstream writes (the cache tests tell a replay from a
    fresh answer by it)."""
    SERIAL[0] += 1
    return f"fp_{SERIAL[0]}"


def _chat(model: str) -> dict:
    return {
        "id": "chatcmpl-upstream",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": _serial(),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(),
    }


def _completion(model: str) -> dict:
    return {
        "id": "cmpl-upstream",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": "Hello from the upstream.", "finish_reason": "stop"}],
        "usage": _usage(),
    }


def _chunk(model: str, index: int, chat: bool) -> bytes:
    if chat:
        choice = {"index": 0, "delta": {"content": f"c{index} "}, "finish_reason": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": f"c{index} ", "finish_reason": None}
        obj = "text_completion"
    payload = {
        "id": "chatcmpl-upstream",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "sent_at": time.time(),
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _error(status: int, message: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": "upstream_test", "param": None, "code": code}}
    return web.json_response(body, status=status)


def _record(request: web.Request, raw: bytes) -> dict:
    request_id = request.headers.get("x-request-id", "-")
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        data = {}
    SEEN[request_id] = {
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body_size": len(raw),
        "body": raw.decode("utf-8", "replace") if len(raw) < 65536 else None,
        "path": request.path,
        "stream_options": data.get("stream_options") if isinstance(data, dict) else None,
    }
    LOG.append({"path": request.path, "model": data.get("model"), "at": time.time()})
    return data


def _fault() -> web.Response | None:
    status = CONTROL.get("status")
    if not status:
        return None
    response = _error(status, "Injected fault.", "injected")
    if CONTROL.get("retry_after"):
        response.headers["retry-after"] = str(CONTROL["retry_after"])
    return response


@web.middleware
async def name_header(request: web.Request, handler):
    response = await handler(request)
    name = request.app["options"].name
    if name and not response.prepared:
        response.headers["x-upstream-name"] = name
    return response


def _billed_input(data: object) -> int:
    """What an honest provider bills as input: every string's bytes / 4, images 1,000 each."""
    size = images = 0
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            size += len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, dict):
            if item.get("type") in IMAGE_TYPES:
                images += 1
                continue
            size += sum(len(key.encode()) for key in item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return -(-size // 4) + 1000 * images


async def _bill(request: web.Request, data: dict, api: str) -> web.StreamResponse:
    """An honest provider's answer and bill (see the module docstring)."""
    caps = {"chat": ("max_completion_tokens", "max_tokens"), "completions": ("max_tokens",),
            "responses": ("max_output_tokens",)}[api]  # fmt: skip
    cap = next((data[name] for name in caps if isinstance(data.get(name), int)), None)
    each = BILL_MAX_OUTPUT if cap is None else min(cap, BILL_MAX_OUTPUT)
    output = each * max(1, data.get("n") or 1)
    prompt = _billed_input(data)
    pace = 0.01 if data.get("model") == "bill-slow" else 0.0
    bill = {"at": time.time(), "tokens": prompt, "output": 0, "done": False}
    BILLS.append(bill)
    usage = {"prompt_tokens": prompt, "completion_tokens": output,
             "total_tokens": prompt + output}  # fmt: skip
    if not data.get("stream"):
        try:
            if pace:
                await asyncio.sleep(pace * output)
        finally:  # a client that left mid-way is billed what was generated until then
            generated = output if not pace else min(output, int((time.time() - bill["at"]) / pace))
            bill["tokens"], bill["output"], bill["done"] = prompt + generated, generated, True
        return web.json_response(
            {
                "id": "bill",
                "object": "chat.completion",
                "model": data.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "x " * each},
                        "finish_reason": "length",
                    }
                ],
                "usage": usage,
            }
        )
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    try:
        for _ in range(output):
            chunk = {"object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"content": "x "}}]}  # fmt: skip
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            bill["tokens"] += 1
            bill["output"] += 1
            if pace:
                await asyncio.sleep(pace)
        options = data.get("stream_options") or {}
        if options.get("include_usage"):
            final = {"object": "chat.completion.chunk", "choices": [], "usage": usage}
            await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the client left: billed what was generated
    finally:
        bill["done"] = True
    return response


async def bills(request: web.Request) -> web.Response:
    return web.json_response(BILLS)


async def completions(request: web.Request) -> web.StreamResponse:
    chat = request.path.endswith("/chat/completions")
    raw = await request.read()
    _record(request, raw)
    fault = _fault()
    if fault is not None:
        return fault
    data = json.loads(raw)
    model = data.get("model", "")
    options = request.app["options"]
    if model.startswith("bill"):
        return await _bill(request, data, "chat" if chat else "completions")
    if model == "slow":
        await asyncio.sleep(options.slow)
    elif model == "hang":
        await asyncio.sleep(3600)
    elif model == "error-429":
        response = _error(429, "Upstream rate limit reached.", "rate_limit_exceeded")
        response.headers["retry-after"] = "7"
        return response
    elif model in ("error-401", "error-403"):
        key = request.headers.get("authorization", "")[-8:]
        message = f"Incorrect API key provided: sk-...{key}. {CANARY}"
        return _error(int(model[-3:]), message, "invalid_api_key")
    elif model == "error-500":
        return _error(500, "Upstream exploded.", "server_error")
    elif model == "html-500":
        return web.Response(status=500, text="<html>oops</html>", content_type="text/html")
    elif model == "garbage":
        return web.Response(status=200, text="this is not json", content_type="application/json")
    elif model == "garbage-http":
        request.transport.write(b"NOT-HTTP garbage\r\n\r\n")
        request.transport.close()
        await asyncio.sleep(0.1)
        raise web.HTTPInternalServerError
    if chat and data.get("tools"):
        return await _tool_chat(request, data)
    if data.get("stream"):
        return await _stream(request, model, chat, options)
    body = _chat(model) if chat else _completion(model)
    if model == "negative-usage":
        body["usage"] = {"prompt_tokens": -1, "completion_tokens": 2, "total_tokens": 1}
    elif model == "long-content-type":  # a content type no cache entry can hold
        profile = "application/json; profile=" + "x" * 300
        return web.Response(body=json.dumps(body).encode(), headers={"content-type": profile})
    if options.name:
        body["upstream"] = options.name
    return web.json_response(body)


async def _stream(request, model, chat, options) -> web.StreamResponse:
    headers = {"content-type": "text/event-stream"}
    if options.name:
        headers["x-upstream-name"] = options.name
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    STATS["streams_started"] += 1
    count, pace = options.chunks, options.pace
    if model.startswith("paced-"):
        count = int(model.split("-", 1)[1])
    if model == "long-stream":
        count, pace = options.long_chunks, 0.0
    if model.startswith("fast-"):
        count, pace = int(model.split("-", 1)[1]), 0.0
    try:
        for index in range(count):
            if index == 2 and model == "reset-mid-stream":
                sock = request.transport.get_extra_info("socket")
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                request.transport.abort()
                return response
            if index == 0 and model == "stall-first":  # the head, then no event at all
                await asyncio.sleep(3600)
            if index == 2 and model == "stall-mid-stream":
                await asyncio.sleep(3600)
            if index == 2 and model in ("cut-mid-event", "end-mid-event"):
                event = _chunk(model, index, chat)
                await response.write(event[: len(event) // 2])
                await asyncio.sleep(0.1)  # let the half event reach the proxy on its own
                if model == "end-mid-event":
                    await response.write_eof()
                else:
                    request.transport.close()
                return response
            if index == 1 and model == "huge-event":
                await response.write(b'data: {"x": "')
                for _ in range(80):
                    await response.write(b"x" * 65536)
                await response.write(b'"}\n\n')
                continue
            if model == "split-events":
                event = _chunk(model, index, chat).replace(b"\n\n", b"\r\n\r\n")
                for piece in (event[:9], event[9:-3], event[-3:-1], event[-1:]):
                    await response.write(piece)
                    await asyncio.sleep(0.02)
                continue
            await response.write(_chunk(model, index, chat))
            if pace:
                await asyncio.sleep(pace)
        final = {
            "id": "chatcmpl-upstream",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [],
            "usage": _usage(-1 if model == "negative-usage" else 3, count),
        }
        await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        STATS["streams_finished"] += 1
    except (asyncio.CancelledError, ConnectionResetError):
        STATS["streams_cancelled"] += 1
        raise
    return response


async def embeddings(request: web.Request) -> web.Response:
    raw = await request.read()
    data = _record(request, raw)
    fault = _fault()
    if fault is not None:
        return fault
    items = data.get("input")
    inputs = items if isinstance(items, list) else [items]
    dims = data.get("dimensions") or 8
    out = []
    for index, _ in enumerate(inputs):
        vector = [round(0.125 * (index + 1) * (i + 1), 6) for i in range(dims)]
        if data.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        else:
            embedding = vector
        out.append({"object": "embedding", "index": index, "embedding": embedding})
    # Spacing the proxy must keep as it is (bodies pass byte for byte).
    body = json.dumps(
        {"object": "list", "data": out, "model": data.get("model"),
         "usage": {"prompt_tokens": 4, "total_tokens": 4}}, indent=1,
    )  # fmt: skip
    return web.Response(body=body.encode(), content_type="application/json")


async def moderations(request: web.Request) -> web.Response:
    raw = await request.read()
    data = _record(request, raw)
    return web.json_response(
        {"id": "modr-upstream", "model": data.get("model") or "omni-moderation-latest",
         "results": [{"flagged": True, "categories": {"violence": True},
                      "category_scores": {"violence": 0.9}}]}
    )  # fmt: skip


def _response_obj(model: str, status: str, text: str | None) -> dict:
    output = []
    if text is not None:
        output = [
            {
                "type": "message",
                "id": "msg_up",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
    return {
        "id": "resp_upstream", "object": "response", "created_at": int(time.time()),
        "status": status, "model": model, "output": output, "parallel_tool_calls": True,
        "tool_choice": "auto", "tools": [], "error": None, "incomplete_details": None,
        "instructions": None, "metadata": {},
        "usage": None if text is None else {
            "input_tokens": 11, "output_tokens": 13, "total_tokens": 24,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }  # fmt: skip


async def responses(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    data = _record(request, raw)
    fault = _fault()
    if fault is not None:
        return fault
    model = data.get("model", "")
    if model.startswith("bill"):
        return await _bill(request, data, "responses")
    text = f"Hello from {request.app['options'].name or 'the upstream'}."
    if not data.get("stream"):
        return web.json_response(_response_obj(model, "completed", text))
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    events = [
        ("response.created", {"response": _response_obj(model, "in_progress", None)}),
        ("response.output_text.delta", {"item_id": "msg_up", "output_index": 0,
                                        "content_index": 0, "delta": text}),
        ("response.completed", {"response": _response_obj(model, "completed", text)}),
    ]  # fmt: skip
    for seq, (kind, payload) in enumerate(events):
        event = {"type": kind, "sequence_number": seq, **payload}
        await response.write(f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode())
    await response.write_eof()
    return response


async def model(request: web.Request) -> web.Response:
    _record(request, b"")
    model_id = request.match_info["model_id"]
    if model_id == "missing":
        return _error(404, "No such model.", "model_not_found")
    return web.json_response({"id": model_id, "object": "model", "created": 1, "owned_by": "up"})


def _anthropic_error(status: int, kind: str, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status)


async def messages(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    data = _record(request, raw)
    if not request.headers.get("x-api-key"):
        return _anthropic_error(401, "authentication_error", "x-api-key header is required")
    if not request.headers.get("anthropic-version"):
        return _anthropic_error(400, "invalid_request_error", "anthropic-version is required")
    status = CONTROL.get("status")
    if status:
        return _anthropic_error(status, "overloaded_error", "Injected fault.")
    model = data.get("model", "")
    if model == "error-400":
        return _anthropic_error(400, "invalid_request_error", "max_tokens: required")
    if model == "overloaded":
        return _anthropic_error(529, "overloaded_error", "Overloaded.")
    if data.get("tools"):
        return await _tool_message(request, data)
    if model == "html-502":
        return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")
    text = f"Hello from {request.app['options'].name or 'the upstream'}."
    message = {
        "id": "msg_upstream", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": 4},
    }  # fmt: skip
    if not data.get("stream"):
        return web.json_response(message)
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    start = {**message, "content": [], "stop_reason": None,
             "usage": {"input_tokens": 9, "output_tokens": 1}}  # fmt: skip
    events = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": text}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 4}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    for index, (kind, payload) in enumerate(events):
        event = f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()
        if model == "cut-mid-event" and index == 3:
            await response.write(event[: len(event) // 2])
            request.transport.close()  # the connection breaks inside an event
            return response
        await response.write(event)
    await response.write_eof()
    return response


# ------------------------------------------------------------------ an agent loop's model

TOOL_ARGS = '{"city": "Paris"}'


def _tool_result_openai(data: dict) -> str | None:
    last = (data.get("messages") or [{}])[-1]
    return str(last.get("content")) if last.get("role") == "tool" else None


def _tool_result_anthropic(data: dict) -> str | None:
    last = (data.get("messages") or [{}])[-1]
    content = last.get("content")
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            inner = block.get("content")
            if isinstance(inner, list):
                inner = "".join(part.get("text", "") for part in inner if isinstance(part, dict))
            return str(inner)
    return None


def _sse(payload: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


async def _tool_chat(request: web.Request, data: dict) -> web.StreamResponse:
    """OpenAI chat with tools: call the first tool, or answer its result."""
    model = data.get("model", "")
    result = _tool_result_openai(data)
    name = data["tools"][0]["function"]["name"]
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": TOOL_ARGS}}
    reply = {"role": "assistant", "content": f"Tool said: {result}" if result else None}
    if result is None:
        reply["tool_calls"] = [call]
    finish = "stop" if result else "tool_calls"
    usage = _usage(11, 6)
    if not data.get("stream"):
        body = {"id": "chatcmpl-tools", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": reply, "finish_reason": finish}],
                "usage": usage}  # fmt: skip
        return web.json_response(body)
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)

    def chunk(delta: dict, reason: str | None = None) -> bytes:
        return _sse({"id": "chatcmpl-tools", "object": "chat.completion.chunk", "created": 1,
                     "model": model, "choices": [{"index": 0, "delta": delta,
                                                  "finish_reason": reason}]})  # fmt: skip

    pieces = [chunk({"role": "assistant", "content": ""})]
    if result is None:
        first = {**call, "function": {"name": name, "arguments": ""}}
        pieces.append(chunk({"tool_calls": [{"index": 0, **first}]}))
        for start in range(0, len(TOOL_ARGS), 6):
            fragment = {"index": 0, "function": {"arguments": TOOL_ARGS[start : start + 6]}}
            pieces.append(chunk({"tool_calls": [fragment]}))
    else:
        pieces += [chunk({"content": "Tool said: "}), chunk({"content": result})]
    pieces.append(chunk({}, finish))
    if (data.get("stream_options") or {}).get("include_usage"):
        last = {"id": "chatcmpl-tools", "object": "chat.completion.chunk", "created": 1,
                "model": model, "choices": [], "usage": usage}  # fmt: skip
        pieces.append(_sse(last))
    pieces.append(b"data: [DONE]\n\n")
    for piece in pieces:
        await response.write(piece)
    await response.write_eof()
    return response


async def _tool_message(request: web.Request, data: dict) -> web.StreamResponse:
    """Anthropic Messages with tools: call the first tool, or answer its result."""
    model = data.get("model", "")
    result = _tool_result_anthropic(data)
    name = data["tools"][0]["name"]
    if result is None:
        block = {"type": "tool_use", "id": "toolu_1", "name": name, "input": {"city": "Paris"}}
    else:
        block = {"type": "text", "text": f"Tool said: {result}"}
    reason = "end_turn" if result else "tool_use"
    message = {"id": "msg_tools", "type": "message", "role": "assistant", "model": model,
               "content": [block], "stop_reason": reason, "stop_sequence": None,
               "usage": {"input_tokens": 12, "output_tokens": 8}}  # fmt: skip
    if not data.get("stream"):
        return web.json_response(message)
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    start = {**message, "content": [], "stop_reason": None,
             "usage": {"input_tokens": 12, "output_tokens": 1}}  # fmt: skip
    opened = {**block, "input": {}} if result is None else {"type": "text", "text": ""}
    events = [
        _sse({"type": "message_start", "message": start}, "message_start"),
        _sse({"type": "content_block_start", "index": 0, "content_block": opened},
             "content_block_start"),
        _sse({"type": "ping"}, "ping"),
    ]  # fmt: skip
    if result is None:
        for at in range(0, len(TOOL_ARGS), 6):
            delta = {"type": "input_json_delta", "partial_json": TOOL_ARGS[at : at + 6]}
            events.append(_sse({"type": "content_block_delta", "index": 0, "delta": delta},
                               "content_block_delta"))  # fmt: skip
    else:
        delta = {"type": "text_delta", "text": block["text"]}
        events.append(_sse({"type": "content_block_delta", "index": 0, "delta": delta},
                           "content_block_delta"))  # fmt: skip
    events += [
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None},
              "usage": {"output_tokens": 8}}, "message_delta"),
        _sse({"type": "message_stop"}, "message_stop"),
    ]  # fmt: skip
    for event in events:
        await response.write(event)
    await response.write_eof()
    return response


async def count_tokens(request: web.Request) -> web.Response:
    raw = await request.read()
    data = _record(request, raw)
    return web.json_response({"input_tokens": len(json.dumps(data.get("messages"))) // 4})


async def request_log(request: web.Request) -> web.Response:
    return web.json_response(LOG)


async def control(request: web.Request) -> web.Response:
    CONTROL.clear()
    CONTROL.update(await request.json())
    return web.json_response(CONTROL)


async def models(request: web.Request) -> web.Response:
    _record(request, b"")
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": "upstream-model", "object": "model", "created": 0, "owned_by": "test"}],
        }
    )


async def seen(request: web.Request) -> web.Response:
    record = SEEN.get(request.match_info["request_id"])
    if record is None:
        raise web.HTTPNotFound
    return web.json_response(record)


async def stats(request: web.Request) -> web.Response:
    return web.json_response(STATS)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


SPEECH_BYTES = bytes(range(256)) * 1024  # 256 KiB of "audio", every byte value
FILES: dict[str, dict] = {}
FILE_CONTENT: dict[str, bytes] = {}
BATCHES: dict[str, dict] = {}


async def images(request: web.Request) -> web.Response:
    data = _record(request, await request.read())
    png = base64.b64encode(b"\x89PNG upstream image").decode()
    return web.json_response(
        {"created": 1, "data": [{"b64_json": png, "revised_prompt": data.get("prompt")}],
         "usage": {"input_tokens": 9, "output_tokens": 21, "total_tokens": 30}}
    )  # fmt: skip


async def speech(request: web.Request) -> web.StreamResponse:
    _record(request, await request.read())
    response = web.StreamResponse(headers={"content-type": "audio/mpeg"})
    await response.prepare(request)
    for start in range(0, len(SPEECH_BYTES), 65536):
        await response.write(SPEECH_BYTES[start : start + 65536])
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


async def _form(request: web.Request) -> tuple[dict, dict]:
    """The multipart form's text fields, and its file (name, bytes), kept with what _seen
    returns for the request (aiohttp's own multipart reader: not the proxy's parser)."""
    _record(request, b"")
    fields: dict = {}
    upload: dict = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if part.filename:  # type: ignore[union-attr]
            upload = {"filename": part.filename, "bytes": bytes(await part.read())}  # type: ignore[union-attr]
        else:
            fields[part.name] = (await part.read()).decode()  # type: ignore[union-attr]
    record = SEEN[request.headers.get("x-request-id", "-")]
    record["body_size"] = request.content_length
    record["form"] = {
        **fields,
        "file_size": len(upload.get("bytes", b"")),
        "file_sha256": hashlib.sha256(upload.get("bytes", b"")).hexdigest(),
    }
    LOG[-1]["model"] = fields.get("model")
    return fields, upload


async def transcriptions(request: web.Request) -> web.Response:
    fields, upload = await _form(request)
    if fields.get("response_format") == "text":
        return web.Response(text="upstream transcript\n", content_type="text/plain")
    return web.json_response(
        {"text": f"upstream transcript of {len(upload.get('bytes', b''))} bytes",
         "usage": {"type": "tokens", "input_tokens": 3, "output_tokens": 4, "total_tokens": 7}}
    )  # fmt: skip


def _file_object(file_id: str) -> dict:
    return FILES[file_id]


async def files_create(request: web.Request) -> web.Response:
    fields, upload = await _form(request)
    file_id = f"file-{_serial()}"
    FILE_CONTENT[file_id] = upload.get("bytes", b"")
    FILES[file_id] = {
        "id": file_id, "object": "file", "bytes": len(FILE_CONTENT[file_id]), "created_at": 1,
        "filename": upload.get("filename", ""), "purpose": fields.get("purpose", ""),
        "status": "processed",
    }  # fmt: skip
    return web.json_response(FILES[file_id])


async def files_list(request: web.Request) -> web.Response:
    _record(request, b"")
    purpose = request.query.get("purpose")
    data = [f for f in FILES.values() if purpose is None or f["purpose"] == purpose]
    return web.json_response({"object": "list", "data": data, "has_more": False})


def _file_or_404(request: web.Request) -> str | web.Response:
    _record(request, b"")
    file_id = request.match_info["file_id"]
    if file_id not in FILES:
        return _error(404, f"No such File object: {file_id}", "not_found")
    return file_id


async def files_get(request: web.Request) -> web.Response:
    found = _file_or_404(request)
    return found if isinstance(found, web.Response) else web.json_response(FILES[found])


async def files_delete(request: web.Request) -> web.Response:
    found = _file_or_404(request)
    if isinstance(found, web.Response):
        return found
    del FILES[found], FILE_CONTENT[found]
    return web.json_response({"id": found, "object": "file", "deleted": True})


async def files_content(request: web.Request) -> web.Response:
    found = _file_or_404(request)
    if isinstance(found, web.Response):
        return found
    return web.Response(body=FILE_CONTENT[found], content_type="application/octet-stream")


def _batch(batch_id: str, data: dict, status: str) -> dict:
    return {
        "id": batch_id, "object": "batch", "endpoint": data.get("endpoint"),
        "input_file_id": data.get("input_file_id"), "completion_window": "24h",
        "status": status, "created_at": 1, "errors": None, "output_file_id": None,
        "error_file_id": None, "metadata": data.get("metadata"),
    }  # fmt: skip


async def batches_create(request: web.Request) -> web.Response:
    data = _record(request, await request.read())
    batch_id = f"batch_{_serial()}"
    BATCHES[batch_id] = _batch(batch_id, data, "validating")
    return web.json_response(BATCHES[batch_id])


async def batches_list(request: web.Request) -> web.Response:
    _record(request, b"")
    data = list(BATCHES.values())
    return web.json_response({"object": "list", "data": data, "has_more": False})


async def batches_get(request: web.Request) -> web.Response:
    _record(request, b"")
    found = BATCHES.get(request.match_info["batch_id"])
    if found is None:
        return _error(404, "No such batch.", "not_found")
    return web.json_response(found)


async def batches_cancel(request: web.Request) -> web.Response:
    _record(request, await request.read())
    found = BATCHES.get(request.match_info["batch_id"])
    if found is None:
        return _error(404, "No such batch.", "not_found")
    found["status"] = "cancelling"
    return web.json_response(found)


async def response_get(request: web.Request) -> web.Response:
    _record(request, b"")
    response_id = request.match_info["response_id"]
    if response_id == "resp_missing":
        return _error(404, "No such response.", "not_found")
    stored = _response_obj("gpt-x", "completed", "Stored answer.")
    return web.json_response({**stored, "id": response_id})


async def response_delete(request: web.Request) -> web.Response:
    _record(request, b"")
    response_id = request.match_info["response_id"]
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slow", type=float, default=30.0)
    parser.add_argument("--pace", type=float, default=0.2)
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--long-chunks", type=int, default=20000)
    parser.add_argument("--name", default="")
    options = parser.parse_args()
    app = web.Application(middlewares=[name_header])
    app["options"] = options
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model_id}", model)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/moderations", moderations)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/v1/images/generations", images)
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_post("/v1/audio/translations", transcriptions)
    app.router.add_post("/v1/files", files_create)
    app.router.add_get("/v1/files", files_list)
    app.router.add_get("/v1/files/{file_id}", files_get)
    app.router.add_delete("/v1/files/{file_id}", files_delete)
    app.router.add_get("/v1/files/{file_id}/content", files_content)
    app.router.add_post("/v1/batches", batches_create)
    app.router.add_get("/v1/batches", batches_list)
    app.router.add_get("/v1/batches/{batch_id}", batches_get)
    app.router.add_post("/v1/batches/{batch_id}/cancel", batches_cancel)
    app.router.add_get("/v1/responses/{response_id}", response_get)
    app.router.add_delete("/v1/responses/{response_id}", response_delete)
    app.router.add_get("/_log", request_log)
    app.router.add_post("/_control", control)
    app.router.add_get("/_seen/{request_id}", seen)
    app.router.add_get("/_stats", stats)
    app.router.add_get("/_health", health)
    app.router.add_get("/_bills", bills)
    # A short shutdown: a test that leaves a stream or a `hang` handler running must not make
    # a stop wait out aiohttp's default 60 s for handlers to finish.
    web.run_app(
        app, host=options.host, port=options.port, print=None, access_log=None,
        shutdown_timeout=1.0,
    )  # fmt: skip


if __name__ == "__main__":
    main()
