"""An OpenAI chat completion request, rewritten as an Anthropic Messages request.

Anthropic's conversation is stricter than OpenAI's: instructions live in one top-level `system`,
turns alternate between `user` and `assistant`, a tool's result is a `tool_result` block inside
a user turn (first in it), and every text block holds some text. So system and developer
messages are hoisted into `system` in order, `tool` messages become tool_result blocks, turns of
one role are merged into one, and empty text is left out. Which top-level fields are mapped,
dropped or refused is the table's (edge.adapters.table.TO_ANTHROPIC).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from edge.adapters.checks import array, boolean, fail, number, obj, screen, string, whole
from edge.adapters.table import TO_ANTHROPIC

API = "Anthropic's Messages API"
_TOOL_ID = re.compile(r"[A-Za-z0-9_-]+")  # what Anthropic accepts as a tool_use id
_CHOICES = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}


def chat_to_messages(data: dict[str, Any], *, max_tokens_default: int) -> dict[str, Any]:
    """The Anthropic request for OpenAI chat request `data` (not modified), or BadRequest naming
    the field that cannot be translated. `max_tokens_default` is the cap sent when the request
    sets none: Anthropic requires one."""
    fields = screen(data, TO_ANTHROPIC, API)
    out: dict[str, Any] = {}
    if "model" in fields:
        out["model"] = fields["model"]
    system, turns = _conversation(array(fields.get("messages"), "messages"))
    if system:
        out["system"] = system[0]["text"] if len(system) == 1 else system
    out["messages"] = turns
    out["max_tokens"] = _cap(fields, max_tokens_default)
    if "temperature" in fields:
        temperature = number(fields["temperature"], "temperature")
        if not 0 <= temperature <= 1:
            fail(
                "temperature",
                "'temperature' must be from 0 to 1 for this model (Anthropic's range; "
                "OpenAI's goes to 2, and the gateway does not rescale it).",
            )
        out["temperature"] = temperature
    if "top_p" in fields:
        out["top_p"] = number(fields["top_p"], "top_p")
    if "top_k" in fields and fields["top_k"] != -1:  # -1: vLLM's "no top-k"
        out["top_k"] = whole(fields["top_k"], "top_k", 1)
    if "stop" in fields:
        stop = _stop(fields["stop"])
        if stop:
            out["stop_sequences"] = stop
    user = fields.get("safety_identifier", fields.get("user"))
    if user is not None:
        param = "safety_identifier" if "safety_identifier" in fields else "user"
        out["metadata"] = {"user_id": string(user, param)}
    if "stream" in fields:
        out["stream"] = boolean(fields["stream"], "stream")
    if "stream_options" in fields:
        obj(fields["stream_options"], "stream_options")
    tools = [
        _tool(tool, f"tools[{i}]") for i, tool in enumerate(array(fields.get("tools", []), "tools"))
    ]
    if tools:
        out["tools"] = tools
        choice = _tool_choice(fields)
        if choice is not None:
            out["tool_choice"] = choice
    return out


def _cap(fields: dict[str, Any], default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        if name in fields:
            return whole(fields[name], name, 1)
    return default


def _stop(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [string(item, f"stop[{i}]") for i, item in enumerate(array(value, "stop"))]


def _conversation(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system text blocks, alternating turns) for the OpenAI `messages`."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        message = obj(message, param)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system += _text_blocks(content, f"{param}.content", ("text",))
            continue
        if role == "user":
            blocks = _user_blocks(content, f"{param}.content")
        elif role == "assistant":
            blocks = _assistant_blocks(message, param)
        elif role == "tool":
            blocks = [_tool_result(message, param)]
        elif role == "function":
            fail(
                f"{param}.role",
                "'function' messages (the legacy function API) cannot be "
                "translated for this model: use tools and 'tool' messages.",
            )
        else:
            fail(
                f"{param}.role",
                f"'{param}.role' must be system, developer, user, assistant or tool.",
            )
        if not blocks:
            continue  # an empty message says nothing, and Anthropic refuses empty turns
        role = "assistant" if role == "assistant" else "user"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        blocks = turn["content"]
        if turn["role"] == "user" and any(b["type"] == "tool_result" for b in blocks):
            # Results first in their turn, as Anthropic requires (stable otherwise).
            blocks.sort(key=lambda block: block["type"] != "tool_result")
        if len(blocks) == 1 and blocks[0]["type"] == "text":
            turn["content"] = blocks[0]["text"]
    return system, turns


def _text_blocks(content: Any, param: str, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """Text blocks for a string or for parts of the `kinds` given (text; a refusal is text)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for index, part in enumerate(array(content, param)):
        where = f"{param}[{index}]"
        kind = obj(part, where).get("type")
        if kind not in kinds:
            fail(f"{where}.type", f"'{where}.type' must be one of: {', '.join(kinds)}.")
        blocks += _text(part, where, kind)
    return blocks


def _text(part: dict[str, Any], param: str, kind: str) -> list[dict[str, Any]]:
    """A text (or refusal) part's block, none for empty text."""
    text = string(part.get(kind), f"{param}.{kind}")
    return [{"type": "text", "text": text}] if text else []


def _user_blocks(content: Any, param: str) -> list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return _text_blocks(content, param, ("text",))
    blocks = []
    for index, part in enumerate(array(content, param)):
        where = f"{param}[{index}]"
        kind = obj(part, where).get("type")
        if kind == "text":
            blocks += _text(part, where, "text")
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), f"{where}.image_url"))
        elif kind == "file":
            blocks.append(_document(obj(part.get("file"), f"{where}.file"), f"{where}.file"))
        elif kind == "input_audio":
            fail(
                f"{where}.type",
                "Audio input cannot be translated for this model "
                "(Anthropic's Messages API takes no audio).",
            )
        else:
            fail(f"{where}.type", f"'{where}.type' must be text, image_url or file.")
    return blocks


def _image(value: Any, param: str) -> dict[str, Any]:
    url = value if isinstance(value, str) else string(obj(value, param).get("url"), f"{param}.url")
    if url.startswith("data:"):
        media_type, data = _data_url(url, f"{param}.url")
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    fail(f"{param}.url", f"'{param}.url' must be an http(s) URL or a base64 data: URL.")


def _document(file: dict[str, Any], param: str) -> dict[str, Any]:
    if file.get("file_data") is None:
        fail(
            f"{param}.file_id",
            "A file given by 'file_id' cannot be translated for this model "
            "(send its contents as 'file_data').",
        )
    media_type, data = _data_url(
        string(file["file_data"], f"{param}.file_data"), f"{param}.file_data"
    )
    if media_type != "application/pdf":
        fail(f"{param}.file_data", "Only PDF files can be translated for this model.")
    block: dict[str, Any] = {
        "type": "document",
        "source": {"type": "base64", "media_type": media_type, "data": data},
    }
    if isinstance(file.get("filename"), str):
        block["title"] = file["filename"]
    return block


def _data_url(url: str, param: str) -> tuple[str, str]:
    """(media type, base64 data) of a `data:<type>;base64,<data>` URL."""
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64") or len(header) <= len("data:;base64"):
        fail(param, f"'{param}' must be a base64 data: URL (data:<media type>;base64,...).")
    return header[5:-7], data


def _assistant_blocks(message: dict[str, Any], param: str) -> list[dict[str, Any]]:
    for legacy in ("function_call", "audio"):
        if message.get(legacy) is not None:
            fail(f"{param}.{legacy}", f"'{param}.{legacy}' cannot be translated for this model.")
    blocks = _text_blocks(message.get("content"), f"{param}.content", ("text", "refusal"))
    refusal = message.get("refusal")
    if refusal is not None and not blocks:  # a refused answer has no content but this
        blocks = _text(message, param, "refusal")
    calls = message.get("tool_calls")
    for index, call in enumerate(array(calls, f"{param}.tool_calls") if calls is not None else []):
        blocks.append(
            _tool_use(obj(call, f"{param}.tool_calls[{index}]"), f"{param}.tool_calls[{index}]")
        )
    return blocks


def _tool_use(call: dict[str, Any], param: str) -> dict[str, Any]:
    if call.get("type", "function") != "function":
        fail(f"{param}.type", f"'{param}.type' must be 'function'.")
    function = obj(call.get("function"), f"{param}.function")
    arguments = string(function.get("arguments", ""), f"{param}.function.arguments")
    return {
        "type": "tool_use",
        "id": tool_id(call.get("id"), f"{param}.id"),
        "name": string(function.get("name"), f"{param}.function.name"),
        "input": _arguments(arguments, f"{param}.function.arguments"),
    }


def _arguments(arguments: str, param: str) -> dict[str, Any]:
    """A tool call's `arguments` (a JSON string) as Anthropic's `input` (an object)."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        fail(param, f"'{param}' must be a JSON object, as a string.")
    return value


def tool_id(value: Any, param: str) -> str:
    """A tool call id Anthropic accepts: the id itself when it can, else a digest of it (the
    same one for the call and its result, so they still pair)."""
    value = string(value, param)
    if _TOOL_ID.fullmatch(value):
        return value
    return "toolu_" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _tool_result(message: dict[str, Any], param: str) -> dict[str, Any]:
    block: dict[str, Any] = {
        "type": "tool_result",
        "tool_use_id": tool_id(message.get("tool_call_id"), f"{param}.tool_call_id"),
    }
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    else:
        texts = _text_blocks(content, f"{param}.content", ("text",))
        if texts:
            block["content"] = texts
    return block


def _tool(tool: Any, param: str) -> dict[str, Any]:
    tool = obj(tool, param)
    if tool.get("type") != "function":
        fail(f"{param}.type", "Only 'function' tools can be translated for this model.")
    function = obj(tool.get("function"), f"{param}.function")
    out: dict[str, Any] = {"name": string(function.get("name"), f"{param}.function.name")}
    if function.get("description") is not None:
        out["description"] = string(function["description"], f"{param}.function.description")
    parameters = function.get("parameters")
    if parameters is None:  # a tool without parameters: Anthropic requires a schema
        out["input_schema"] = {"type": "object", "properties": {}}
    else:
        out["input_schema"] = obj(parameters, f"{param}.function.parameters")
    return out


def _tool_choice(fields: dict[str, Any]) -> dict[str, Any] | None:
    value = fields.get("tool_choice")
    choice: dict[str, Any] | None
    if value is None:
        choice = None
    elif isinstance(value, str) and value in _CHOICES:
        choice = dict(_CHOICES[value])
    elif isinstance(value, dict) and value.get("type") == "function":
        function = obj(value.get("function"), "tool_choice.function")
        choice = {"type": "tool", "name": string(function.get("name"), "tool_choice.function.name")}
    else:
        fail("tool_choice", "'tool_choice' must be auto, none, required or a named function.")
    if "parallel_tool_calls" in fields:
        parallel = boolean(fields["parallel_tool_calls"], "parallel_tool_calls")
        if not parallel and (choice is None or choice["type"] != "none"):
            choice = choice or {"type": "auto"}
            choice["disable_parallel_tool_use"] = True
    return choice
