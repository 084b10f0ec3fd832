"""The built-in deterministic mock provider, answering when no UPSTREAM_URL is configured.

It is a provider behind the router like any other (`Providers.builtin_mock`, kind "mock"),
answering every API in process (`MockTransport.exchange`): nothing goes upstream.

Same request, same text: the reply is derived from the request alone, so tests and first-time
users see stable output. Token counts are whitespace-separated words: rough, but filled in.
`n` gives n identical choices (1..128, else 400); offered `tools` get a tool call when
`tool_choice` asks for one (see `_tool_choice`), with placeholder arguments for the required
parameters.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import orjson

from edge.errors import BadRequest, ModelNotFound
from edge.routing.exchange import Answer, Call, Events

if TYPE_CHECKING:
    from edge.observability.context import RequestContext

MOCK_MODELS = ("mock-gpt", "gpt-4o-mini", "gpt-4o")
_REPLY = "This is a mock response from llm-edge-proxy: no upstream is configured."


def _words(value: Any) -> int:
    """A rough token count: the words of a prompt, or of the messages' text content.

    Iterative, so a request nested as deep as the JSON parser allows cannot exhaust the
    interpreter's recursion limit.
    """
    count = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            count += len(item.split())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):  # a message, or a content part
            pending.append(item.get("content"))
            pending.append(item.get("text"))
    return count


def _reply(prompt_words: int) -> str:
    return f"{_REPLY} Your prompt had {prompt_words} word{'' if prompt_words == 1 else 's'}."


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def models() -> dict[str, Any]:
    created = 1_700_000_000
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "llm-edge-proxy"}
            for name in MOCK_MODELS
        ],
    }


MAX_N = 128  # the most choices the mock makes (OpenAI's own bound)


class _Plan:
    """What the mock answers to one request: `n` choices, each the text or one tool call."""

    __slots__ = ("arguments", "n", "prompt", "text", "tool")

    def __init__(self, data: dict[str, Any], chat_api: bool) -> None:
        self.prompt = _words(data.get("messages") if chat_api else data.get("prompt"))
        self.n = _n(data.get("n"))
        self.tool = _tool_choice(data) if chat_api else None
        self.text = _reply(self.prompt)
        self.arguments = _arguments(self.tool) if self.tool is not None else ""

    @property
    def name(self) -> str:
        assert self.tool is not None
        return self.tool["function"]["name"]

    def words(self) -> list[str]:
        return self.text.split(" ")

    def completion_tokens(self) -> int:
        """Per choice: the reply's words, or the call's name and argument words."""
        each = 1 + len(self.arguments.split()) if self.tool is not None else len(self.words())
        return self.n * each

    def tool_call(self, request_id: str, index: int) -> dict[str, Any]:
        return {
            "id": f"call_{request_id}_{index}"[:40],
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _n(value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_N:
        raise BadRequest(f"'n' must be an integer from 1 to {MAX_N}.", param="n")
    return value


def _tool_choice(data: dict[str, Any]) -> dict[str, Any] | None:
    """The tool the mock calls, or None for a text reply.

    `tool_choice` "required" calls the first offered tool, a named function calls that one
    (which must be offered). "auto" (the default when tools are offered) calls the first
    offered tool whose name appears in the last message, when that message is the user's;
    otherwise, and with "none", the reply is text. So an agent loop ends: after the tool's
    result, the mock answers in text.
    """
    tools = data.get("tools")
    choice = data.get("tool_choice")
    if tools is None:
        if choice in (None, "none", "auto"):
            return None
        raise BadRequest(
            "'tool_choice' is only allowed when 'tools' are given.", param="tool_choice"
        )
    if not isinstance(tools, list) or not tools or not all(_is_function_tool(t) for t in tools):
        raise BadRequest(
            '\'tools\' must be a non-empty list of {"type": "function", "function": '
            '{"name": ...}} objects.',
            param="tools",
        )
    if choice is None or choice == "auto":
        messages = data.get("messages")
        last = messages[-1] if isinstance(messages, list) and messages else None
        if not isinstance(last, dict) or last.get("role") != "user":
            return None
        said = _text(last.get("content"))
        return next((t for t in tools if t["function"]["name"] in said), None)
    if choice == "none":
        return None
    if choice == "required":
        return tools[0]
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        for tool in tools:
            if tool["function"]["name"] == name:
                return tool
        raise BadRequest(
            "'tool_choice' names a function that is not in 'tools'.", param="tool_choice"
        )
    raise BadRequest(
        '\'tool_choice\' must be "none", "auto", "required" or a named function.',
        param="tool_choice",
    )


def _is_function_tool(tool: Any) -> bool:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        return False
    function = tool.get("function")
    return isinstance(function, dict) and isinstance(function.get("name"), str)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


_PLACEHOLDERS: dict[str, Any] = {
    "string": "mock",
    "integer": 0,
    "number": 0,
    "boolean": False,
    "array": [],
    "object": {},
}


def _arguments(tool: dict[str, Any]) -> str:
    """JSON arguments with a placeholder for each required top-level parameter, by its type."""
    schema = tool["function"].get("parameters")
    args: dict[str, Any] = {}
    if isinstance(schema, dict):
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        for name in required if isinstance(required, list) else []:
            if not isinstance(name, str):
                continue
            prop = properties.get(name)
            kind = prop.get("type") if isinstance(prop, dict) else None
            enum = prop.get("enum") if isinstance(prop, dict) else None
            if isinstance(enum, list) and enum:
                args[name] = enum[0]
            else:
                args[name] = _PLACEHOLDERS.get(kind, "mock") if isinstance(kind, str) else "mock"
    return orjson.dumps(args).decode()


def chat(data: dict[str, Any], model: str, request_id: str) -> dict[str, Any]:
    """A chat.completion."""
    plan = _Plan(data, chat_api=True)
    choices = []
    for index in range(plan.n):
        if plan.tool is not None:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [plan.tool_call(request_id, index)],
            }
            finish = "tool_calls"
        else:
            message, finish = {"role": "assistant", "content": plan.text}, "stop"
        choices.append(
            {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
        )
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(plan.prompt, plan.completion_tokens()),
    }


def completion(data: dict[str, Any], model: str, request_id: str) -> dict[str, Any]:
    """A text_completion."""
    plan = _Plan(data, chat_api=False)
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": index, "text": plan.text, "logprobs": None, "finish_reason": "stop"}
            for index in range(plan.n)
        ],
        "usage": _usage(plan.prompt, plan.completion_tokens()),
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def stream(
    data: dict[str, Any], model: str, request_id: str, chat_api: bool
) -> tuple[int, int, AsyncGenerator[bytes, None]]:
    """(prompt tokens, completion tokens, the SSE events) of a streamed answer. Raises
    BadRequest for what the mock cannot answer, so before the stream starts.

    The events: per word, one chunk for each of the `n` choices; a final chunk per choice with
    its finish_reason; then [DONE]. A tool call streams as OpenAI's do: its id and name, then
    its arguments, then finish_reason "tool_calls". `stream_options.include_usage` adds the
    usage chunk, as OpenAI does.
    """
    plan = _Plan(data, chat_api)
    options = data.get("stream_options")
    usage = isinstance(options, dict) and options.get("include_usage") is True
    events = _events(plan, model, request_id, chat_api, usage)
    return plan.prompt, plan.completion_tokens(), events


async def _events(
    plan: _Plan, model: str, request_id: str, chat_api: bool, usage: bool
) -> AsyncGenerator[bytes, None]:
    created = int(time.time())
    if chat_api:
        base = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
    else:
        base = {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": created,
            "model": model,
        }

    def chunk(
        index: int, piece: str | None, finish: str | None, first: bool = False
    ) -> dict[str, Any]:
        if chat_api:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if piece is not None:
                delta["content"] = piece
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {
                "index": index, "text": piece or "", "logprobs": None, "finish_reason": finish
            }  # fmt: skip
        return {**base, "choices": [choice]}

    def call_chunk(index: int, first: bool) -> dict[str, Any]:
        call = plan.tool_call(request_id, index)
        if first:
            delta = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {**call, "index": 0, "function": {**call["function"], "arguments": ""}}
                ],
            }
        else:
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": plan.arguments}}]}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        return {**base, "choices": [choice]}

    if plan.tool is not None:
        for first in (True, False):
            for index in range(plan.n):
                yield _sse(call_chunk(index, first))
        finish = "tool_calls"
    else:
        for position, word in enumerate(plan.words()):
            piece = word if position == 0 else " " + word
            for index in range(plan.n):
                yield _sse(chunk(index, piece, None, first=position == 0))
        finish = "stop"
    for index in range(plan.n):
        yield _sse(chunk(index, None, finish))
    if usage:
        counts = _usage(plan.prompt, plan.completion_tokens())
        yield _sse({**base, "choices": [], "usage": counts})
    yield b"data: [DONE]\n\n"


# ------------------------------------------------------------------ more OpenAI endpoints

EMBEDDING_DIMENSIONS = 1536
MAX_MOCK_DIMENSIONS = 8192
MAX_MOCK_VALUES = 1 << 18


def model(model_id: str) -> dict[str, Any] | None:
    """One model object (GET /v1/models/{id}), or None when the mock does not serve it."""
    if model_id not in MOCK_MODELS:
        return None
    return {
        "id": model_id,
        "object": "model",
        "created": 1_700_000_000,
        "owned_by": "llm-edge-proxy",
    }


def _vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector derived from the text alone."""
    import hashlib
    import math

    raw = b""
    counter = 0
    seed = text.encode("utf-8", "surrogatepass")
    while len(raw) < dimensions * 2:
        raw += hashlib.blake2b(seed, digest_size=64, salt=counter.to_bytes(8, "little")).digest()
        counter += 1
    values = [
        (int.from_bytes(raw[i * 2 : i * 2 + 2], "little") - 32768) / 32768.0
        for i in range(dimensions)
    ]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def embeddings(data: dict[str, Any], model_name: str) -> dict[str, Any]:
    """An embeddings list, honouring encoding_format and dimensions."""
    import array
    import base64

    items = data.get("input")
    inputs = items if isinstance(items, list) else [items]
    if inputs and all(isinstance(i, int) for i in inputs):  # one array of token ids
        inputs = [inputs]
    dimensions = data.get("dimensions")
    if not isinstance(dimensions, int) or isinstance(dimensions, bool):
        dimensions = EMBEDDING_DIMENSIONS
    dimensions = max(1, min(dimensions, MAX_MOCK_DIMENSIONS))
    if len(inputs) * dimensions > MAX_MOCK_VALUES:  # the mock's work and answer stay small
        raise BadRequest(
            f"The built-in mock answers at most {MAX_MOCK_VALUES} embedding values per request.",
            param="input",
        )
    as_base64 = data.get("encoding_format") == "base64"
    out = []
    tokens = 0
    for index, item in enumerate(inputs):
        text = item if isinstance(item, str) else " ".join(str(t) for t in item)
        tokens += len(item) if isinstance(item, list) else len(text.split())
        vector = _vector(text, dimensions)
        embedding: Any = vector
        if as_base64:
            packed = array.array("f", vector)
            if packed.itemsize != 4:  # pragma: no cover - every platform we run on
                raise RuntimeError("float32 array expected")
            embedding = base64.b64encode(packed.tobytes()).decode("ascii")
        out.append({"object": "embedding", "index": index, "embedding": embedding})
    return {
        "object": "list",
        "data": out,
        "model": model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


_MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/instructions", "self-harm/intent", "sexual",
    "sexual/minors", "violence", "violence/graphic",
)  # fmt: skip


def moderations(data: dict[str, Any], model_name: str, request_id: str) -> dict[str, Any]:
    items = data.get("input")
    inputs = items if isinstance(items, list) else [items]
    result = {
        "flagged": False,
        "categories": dict.fromkeys(_MODERATION_CATEGORIES, False),
        "category_scores": dict.fromkeys(_MODERATION_CATEGORIES, 0.0),
        "category_applied_input_types": {name: ["text"] for name in _MODERATION_CATEGORIES},
    }
    return {"id": f"modr-{request_id}", "model": model_name, "results": [result for _ in inputs]}


def _response_object(
    data: dict[str, Any], model_name: str, request_id: str, status: str, text: str | None
) -> dict[str, Any]:
    prompt = _words(data.get("input")) + _words(data.get("instructions"))
    output = []
    usage = None
    if text is not None:
        output = [_response_message(request_id, text, "completed")]
        completion = len(text.split())
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
    return {
        "id": f"resp_{request_id}",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": _text_or_none(data.get("instructions")),
        "max_output_tokens": data.get("max_output_tokens"),
        "model": model_name,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": data.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "metadata": {},
    }


def _response_message(request_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{request_id}",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _response_text(data: dict[str, Any]) -> str:
    return _reply(_words(data.get("input")) + _words(data.get("instructions")))


def response(data: dict[str, Any], model_name: str, request_id: str) -> dict[str, Any]:
    """A Responses-API `response` object."""
    return _response_object(data, model_name, request_id, "completed", _response_text(data))


def response_usage(data: dict[str, Any]) -> dict[str, int]:
    text = _response_text(data)
    prompt = _words(data.get("input")) + _words(data.get("instructions"))
    return {"input_tokens": prompt, "output_tokens": len(text.split())}


async def response_stream(
    data: dict[str, Any], model_name: str, request_id: str
) -> AsyncGenerator[bytes, None]:
    """The Responses API's streamed events, in its order, ending with response.completed."""
    sequence = 0

    def event(kind: str, payload: dict[str, Any]) -> bytes:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **payload}
        sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    text = _response_text(data)
    pending = _response_object(data, model_name, request_id, "in_progress", None)
    item_id = f"msg_{request_id}"
    yield event("response.created", {"response": pending})
    yield event("response.in_progress", {"response": pending})
    item = {**_response_message(request_id, "", "in_progress"), "content": []}
    yield event("response.output_item.added", {"output_index": 0, "item": item})
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield event("response.content_part.added", {**where, "part": part})
    for index, word in enumerate(text.split(" ")):
        delta = word if index == 0 else " " + word
        yield event("response.output_text.delta", {**where, "delta": delta, "logprobs": []})
    yield event("response.output_text.done", {**where, "text": text, "logprobs": []})
    yield event("response.content_part.done", {**where, "part": {**part, "text": text}})
    done = _response_message(request_id, text, "completed")
    yield event("response.output_item.done", {"output_index": 0, "item": done})
    final = _response_object(data, model_name, request_id, "completed", text)
    yield event("response.completed", {"response": final})


# ------------------------------------------------------------------ Anthropic's Messages API


def message(data: dict[str, Any], model_name: str, request_id: str) -> dict[str, Any]:
    """An Anthropic `message`."""
    prompt = _words(data.get("messages")) + _words(data.get("system"))
    text = _reply(prompt)
    return {
        "id": f"msg_{request_id}",
        "type": "message",
        "role": "assistant",
        "model": model_name,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": prompt, "output_tokens": len(text.split())},
    }


async def message_stream(whole: dict[str, Any]) -> AsyncGenerator[bytes, None]:
    """Anthropic's streamed events for the message `whole`, in its grammar."""

    def event(kind: str, payload: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    usage = whole["usage"]
    text = whole["content"][0]["text"]
    start = {**whole, "content": [], "stop_reason": None,
             "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0}}  # fmt: skip
    yield event("message_start", {"type": "message_start", "message": start})
    block = {"type": "text", "text": ""}
    yield event("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": block})  # fmt: skip
    for index, word in enumerate(text.split(" ")):
        delta = {"type": "text_delta", "text": word if index == 0 else " " + word}
        yield event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": delta})  # fmt: skip
    yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield event("message_delta", {"type": "message_delta",
                                  "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                  "usage": {"output_tokens": usage["output_tokens"]}})  # fmt: skip
    yield event("message_stop", {"type": "message_stop"})


# ------------------------------------------------------------------ the provider

_JSON = "application/json"


def _answer(obj: dict[str, Any], status: int = 200) -> Answer:
    return Answer(status, orjson.dumps(obj), _JSON, {}, obj)


class MockTransport:
    """The mock as the router sees it: a call in, one exchange out, nothing upstream."""

    async def exchange(self, ctx: RequestContext, call: Call) -> Answer | Events:
        path, data, request_id = call.path, call.data or {}, ctx.request_id
        model_name = call.model or ""
        if call.method == "GET":
            if path == "/models":
                return _answer(models())
            model_id = unquote(path.removeprefix("/models/"))
            found = model(model_id)
            if found is None:
                missing = ModelNotFound(
                    f"The model '{model_id[:256]}' does not exist.", param="model"
                )
                return _answer(orjson.loads(missing.body()), 404)
            return _answer(found)
        if path in ("/chat/completions", "/completions"):
            chat_api = path == "/chat/completions"
            if call.stream:
                prompt, output, source = stream(data, model_name, request_id, chat_api)
                usage = {"prompt_tokens": prompt, "completion_tokens": output}
                return Events(source, usage=usage)
            build = chat if chat_api else completion
            return _answer(build(data, model_name, request_id))
        if path == "/embeddings":
            return _answer(embeddings(data, model_name))
        if path == "/moderations":
            return _answer(moderations(data, model_name, request_id))
        if path == "/responses":
            if call.stream:
                source = response_stream(data, model_name, request_id)
                return Events(source, usage=response_usage(data))
            return _answer(response(data, model_name, request_id))
        if path in MEDIA:
            return MEDIA[path](data)
        if path == "/messages":
            whole = message(data, model_name, request_id)
            if call.stream:
                return Events(message_stream(whole), usage=whole["usage"])
            return _answer(whole)
        raise AssertionError(f"the mock has no answer for {path}")  # pragma: no cover


# A 1x1 transparent PNG, and 0.1 s of 8 kHz 8-bit mono silence as WAV: the smallest real media
# an SDK's caller can open.
_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5E"
    "rkJggg=="
)
_SILENCE = 800
_WAV = (
    b"RIFF" + (36 + _SILENCE).to_bytes(4, "little") + b"WAVEfmt "
    + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
    + (8000).to_bytes(4, "little") + (8000).to_bytes(4, "little") + (1).to_bytes(2, "little")
    + (8).to_bytes(2, "little") + b"data" + _SILENCE.to_bytes(4, "little") + b"\x80" * _SILENCE
)  # fmt: skip


def _image(data: dict[str, Any]) -> Answer:
    n = min(_n(data.get("n")), 10)
    return _answer({"created": int(time.time()), "data": [{"b64_json": _PNG}] * n})


def _speech(data: dict[str, Any]) -> Answer:
    return Answer(200, _WAV, "audio/wav", {})


def _transcription(data: dict[str, Any]) -> Answer:
    return _answer({"text": "This is a mock transcription from llm-edge-proxy."})


# The OpenAI media endpoints (edge.endpoints.media), answered so a first-time user sees the
# route work: an image, silence, a fixed text (multipart calls carry no parsed body).
MEDIA = {
    "/images/generations": _image,
    "/audio/speech": _speech,
    "/audio/transcriptions": _transcription,
    "/audio/translations": _transcription,
}


def _text_or_none(value: Any) -> str | None:
    """A string the client sent, echoed; anything else is not (it may nest deeper than
    orjson writes)."""
    return value if isinstance(value, str) else None
