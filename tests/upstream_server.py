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
    end-mid-event         two SSE chunks, half of the third, then a clean end of the response
    split-events          every event written in pieces, cut inside its data and its CRLFs,
                          with a pause between pieces (a whole, valid stream)
    huge-event            one chunk, then one 5 MiB event written in 64 KiB pieces, then [DONE]
    error-401, error-403  that status with an error body quoting part of the upstream key
                          and the canary string CANARY
    paced                 SSE chunks every --pace seconds (also: model "paced-N" sends N chunks)
    long-stream           SSE chunks as fast as the client reads, for --long-chunks chunks
    fast-N                N SSE chunks without pause (quick streams for soak and leak runs)

What it received is kept per x-request-id: GET /_seen/{request_id} returns the headers (and the
body's size) of that request, so a test can check what the proxy sent upstream. GET /_stats
counts streams started, finished and abandoned (for the client-disconnect tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

from aiohttp import web

SEEN: dict[str, dict] = {}
CANARY = "upstream-body-canary-7f3a"
STATS = {"streams_started": 0, "streams_finished": 0, "streams_cancelled": 0}


def _usage(prompt: int = 5, completion: int = 7) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _chat(model: str) -> dict:
    return {
        "id": "chatcmpl-upstream",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
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


async def completions(request: web.Request) -> web.StreamResponse:
    chat = request.path.endswith("/chat/completions")
    raw = await request.read()
    request_id = request.headers.get("x-request-id", "-")
    SEEN[request_id] = {
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body_size": len(raw),
        "path": request.path,
    }
    data = json.loads(raw)
    SEEN[request_id]["stream_options"] = data.get("stream_options")
    model = data.get("model", "")
    options = request.app["options"]
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
    if data.get("stream"):
        return await _stream(request, model, chat, options)
    return web.json_response(_chat(model) if chat else _completion(model))


async def _stream(request, model, chat, options) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
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
            "usage": _usage(3, count),
        }
        await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        STATS["streams_finished"] += 1
    except (asyncio.CancelledError, ConnectionResetError):
        STATS["streams_cancelled"] += 1
        raise
    return response


async def models(request: web.Request) -> web.Response:
    request_id = request.headers.get("x-request-id", "-")
    SEEN[request_id] = {
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body_size": 0,
        "path": request.path,
    }
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slow", type=float, default=30.0)
    parser.add_argument("--pace", type=float, default=0.2)
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--long-chunks", type=int, default=20000)
    options = parser.parse_args()
    app = web.Application()
    app["options"] = options
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/_seen/{request_id}", seen)
    app.router.add_get("/_stats", stats)
    app.router.add_get("/_health", health)
    web.run_app(app, host=options.host, port=options.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
