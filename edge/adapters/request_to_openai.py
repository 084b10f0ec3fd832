"""An Anthropic Messages request, rewritten as an OpenAI chat completion request.

The reverse of edge.adapters.request_to_anthropic. `system` becomes the first message; a user
turn's `tool_result` blocks become `tool` messages, placed before the rest of the turn (OpenAI
wants each result right after the assistant message that called for it); `tool_use` blocks
become the assistant's `tool_calls`. The model's own reasoning from earlier turns (thinking
blocks) is left out, since an OpenAI-compatible model cannot read it. Which top-level fields are
mapped, dropped or refused is the table's (edge.adapters.table.TO_OPENAI).
"""

from __future__ import annotations

from typing import Any

import orjson

from edge.adapters.checks import array, boolean, fail, number, obj, screen, string, whole
from edge.adapters.table import TO_OPENAI

API = "OpenAI's chat completions API"
CAP_FIELDS = ("max_tokens", "max_completion_tokens")
_CHOICES = {"auto": "auto", "none": "none", "any": "required"}
_SKIPPED = frozenset(("thinking", "redacted_thinking"))


def messages_to_chat(data: dict[str, Any], *, cap_field: str = "max_tokens") -> dict[str, Any]:
    """The OpenAI chat request for Anthropic request `data` (not modified), or BadRequest
    naming the field that cannot be translated. `cap_field` names the output cap the target
    reads: `max_tokens` (vLLM, Ollama, most compatible servers) or `max_completion_tokens`
    (OpenAI's reasoning models refuse the other)."""
    if cap_field not in CAP_FIELDS:
        raise ValueError(f"cap_field must be one of {CAP_FIELDS}")
    fields = screen(data, TO_OPENAI, API)
    out: dict[str, Any] = {}
    if "model" in fields:
        out["model"] = fields["model"]
    messages = _system(fields.get("system"))
    for index, message in enumerate(array(fields.get("messages"), "messages")):
        messages += _turn(obj(message, f"messages[{index}]"), f"messages[{index}]")
    out["messages"] = messages
    if "max_tokens" in fields:
        out[cap_field] = whole(fields["max_tokens"], "max_tokens", 1)
    for name in ("temperature", "top_p"):
        if name in fields:
            out[name] = number(fields[name], name)
    if "top_k" in fields:
        out["top_k"] = whole(fields["top_k"], "top_k", 1)
    if "stop_sequences" in fields:
        stop = array(fields["stop_sequences"], "stop_sequences")
        if stop:
            out["stop"] = [string(s, f"stop_sequences[{i}]") for i, s in enumerate(stop)]
    user = obj(fields.get("metadata", {}), "metadata").get("user_id")
    if user is not None:
        out["user"] = string(user, "metadata.user_id")
    if "stream" in fields:
        out["stream"] = boolean(fields["stream"], "stream")
        if out["stream"]:
            out["stream_options"] = {"include_usage": True}
    tools = [
        _tool(obj(t, f"tools[{i}]"), f"tools[{i}]")
        for i, t in enumerate(array(fields.get("tools", []), "tools"))
    ]
    if tools:
        out["tools"] = tools
        if "tool_choice" in fields:
            _tool_choice(obj(fields["tool_choice"], "tool_choice"), out)
    return out


def _system(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        texts = [value]
    else:
        texts = [
            _text(obj(b, f"system[{i}]"), f"system[{i}]")
            for i, b in enumerate(array(value, "system"))
        ]
    text = "\n\n".join(t for t in texts if t)
    return [{"role": "system", "content": text}] if text else []


def _text(block: dict[str, Any], param: str) -> str:
    if block.get("type") != "text":
        fail(f"{param}.type", f"'{param}.type' must be 'text'.")
    return string(block.get("text"), f"{param}.text")


def _turn(message: dict[str, Any], param: str) -> list[dict[str, Any]]:
    """The OpenAI messages for one Anthropic turn."""
    role = message.get("role")
    if role not in ("user", "assistant"):
        fail(f"{param}.role", f"'{param}.role' must be user or assistant.")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    blocks = array(content, f"{param}.content")
    if role == "assistant":
        return _assistant(blocks, f"{param}.content")
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for index, block in enumerate(blocks):
        where = f"{param}.content[{index}]"
        kind = obj(block, where).get("type")
        if kind == "tool_result":
            results.append(_tool_result(block, where))
        elif kind == "text":
            parts.append({"type": "text", "text": _text(block, where)})
        elif kind == "image":
            parts.append(_image(obj(block.get("source"), f"{where}.source"), f"{where}.source"))
        elif kind == "document":
            parts.append(_document(block, where))
        else:
            fail(f"{where}.type", f"'{where}.type' {kind!r} cannot be translated for this model.")
    if parts:
        text_only = len(parts) == 1 and parts[0]["type"] == "text"
        results.append({"role": "user", "content": parts[0]["text"] if text_only else parts})
    return results


def _assistant(blocks: list[Any], param: str) -> list[dict[str, Any]]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(blocks):
        where = f"{param}[{index}]"
        kind = obj(block, where).get("type")
        if kind == "text":
            texts.append(_text(block, where))
        elif kind == "tool_use":
            calls.append(_tool_call(block, where))
        elif kind not in _SKIPPED:
            fail(f"{where}.type", f"'{where}.type' {kind!r} cannot be translated for this model.")
    if not texts and not calls:
        return []  # only thinking: nothing an OpenAI-compatible model can read
    message: dict[str, Any] = {"role": "assistant"}
    if len(texts) == 1:
        message["content"] = texts[0]
    elif texts:
        message["content"] = [{"type": "text", "text": text} for text in texts]
    else:
        message["content"] = None
    if calls:
        message["tool_calls"] = calls
    return [message]


def _tool_call(block: dict[str, Any], param: str) -> dict[str, Any]:
    return {
        "id": string(block.get("id"), f"{param}.id"),
        "type": "function",
        "function": {
            "name": string(block.get("name"), f"{param}.name"),
            "arguments": orjson.dumps(obj(block.get("input", {}), f"{param}.input")).decode(),
        },
    }


def _tool_result(block: dict[str, Any], param: str) -> dict[str, Any]:
    content = block.get("content")
    if content is None or isinstance(content, str):
        texts = [content or ""]
    else:
        texts = []
        for index, item in enumerate(array(content, f"{param}.content")):
            where = f"{param}.content[{index}]"
            if obj(item, where).get("type") != "text":
                fail(
                    f"{where}.type",
                    "A tool result can hold only text for this model (OpenAI's "
                    "tool messages take no images or documents).",
                )
            texts.append(_text(item, where))
    text: str | list[dict[str, Any]]
    if block.get("is_error") is True:
        text = "Error: " + "\n\n".join(texts)
    elif len(texts) == 1:
        text = texts[0]
    else:
        text = [{"type": "text", "text": t} for t in texts]
    tool_use_id = string(block.get("tool_use_id"), f"{param}.tool_use_id")
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}


def _image(source: dict[str, Any], param: str) -> dict[str, Any]:
    kind = source.get("type")
    if kind == "base64":
        media_type = string(source.get("media_type"), f"{param}.media_type")
        url = f"data:{media_type};base64,{string(source.get('data'), f'{param}.data')}"
    elif kind == "url":
        url = string(source.get("url"), f"{param}.url")
    else:
        fail(f"{param}.type", "An image must have a base64 or url source for this model.")
    return {"type": "image_url", "image_url": {"url": url}}


def _document(block: dict[str, Any], param: str) -> dict[str, Any]:
    source = obj(block.get("source"), f"{param}.source")
    if source.get("type") != "base64" or source.get("media_type") != "application/pdf":
        fail(f"{param}.source", "Only base64 PDF documents can be translated for this model.")
    data = string(source.get("data"), f"{param}.source.data")
    title = block.get("title")
    return {
        "type": "file",
        "file": {
            "filename": title if isinstance(title, str) else "document.pdf",
            "file_data": f"data:application/pdf;base64,{data}",
        },
    }


def _tool(tool: dict[str, Any], param: str) -> dict[str, Any]:
    if tool.get("type", "custom") != "custom":
        fail(
            f"{param}.type",
            f"The server tool {tool.get('type')!r} cannot be translated for "
            "this model: only custom tools can.",
        )
    function: dict[str, Any] = {"name": string(tool.get("name"), f"{param}.name")}
    if tool.get("description") is not None:
        function["description"] = string(tool["description"], f"{param}.description")
    function["parameters"] = obj(tool.get("input_schema"), f"{param}.input_schema")
    return {"type": "function", "function": function}


def _tool_choice(choice: dict[str, Any], out: dict[str, Any]) -> None:
    kind = choice.get("type")
    if kind == "tool":
        name = string(choice.get("name"), "tool_choice.name")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif isinstance(kind, str) and kind in _CHOICES:
        out["tool_choice"] = _CHOICES[kind]
    else:
        fail("tool_choice.type", "'tool_choice.type' must be auto, any, tool or none.")
    disable = choice.get("disable_parallel_tool_use")
    parallel_off = disable is not None and boolean(disable, "tool_choice.disable_parallel_tool_use")
    if parallel_off and kind != "none":  # `none` calls no tool at all
        out["parallel_tool_calls"] = False
