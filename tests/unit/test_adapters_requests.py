"""The request translators (edge.adapters.request_to_anthropic, request_to_openai) and the table
they follow (edge.adapters.table): what survives a round trip, what is refused or dropped, and
that a malformed body is a 400 naming the field, never another exception."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.adapters import table
from edge.adapters.request_to_anthropic import chat_to_messages, tool_id
from edge.adapters.request_to_openai import messages_to_chat
from edge.errors import BadRequest

DEFAULT_CAP = 4096

text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
names = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
ids = st.from_regex(r"call_[A-Za-z0-9_-]{1,20}", fullmatch=True)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
unit = st.floats(0, 1, allow_nan=False)


def to_anthropic(data: dict[str, Any]) -> dict[str, Any]:
    return chat_to_messages(data, max_tokens_default=DEFAULT_CAP)


def refused(call: Any, data: dict[str, Any]) -> str | None:
    """The param of the BadRequest that `call(data)` raises."""
    with pytest.raises(BadRequest) as raised:
        call(data)
    assert raised.value.status == 400
    return raised.value.param


# --- the round trip ---------------------------------------------------------------------------


def content(parts: list[dict[str, Any]], draw: Any) -> Any:
    """A single text part may be sent as a plain string."""
    if len(parts) == 1 and parts[0]["type"] == "text" and draw(st.booleans()):
        return parts[0]["text"]
    return parts


@st.composite
def user_parts(draw: Any) -> list[dict[str, Any]]:
    kinds = draw(st.lists(st.sampled_from(["text", "data", "url", "pdf"]), min_size=1, max_size=3))
    parts = []
    for kind in kinds:
        if kind == "text":
            parts.append({"type": "text", "text": draw(text)})
        elif kind == "data":
            media = draw(st.sampled_from(["image/png", "image/jpeg", "image/webp"]))
            url = (
                f"data:{media};base64,{draw(st.from_regex(r'[A-Za-z0-9+/]{4,12}', fullmatch=True))}"
            )
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "url":
            parts.append(
                {"type": "image_url", "image_url": {"url": f"https://x.test/{draw(names)}.png"}}
            )
        else:
            pdf = {
                "filename": draw(names) + ".pdf",
                "file_data": "data:application/pdf;base64,JVBERi0=",
            }
            parts.append({"type": "file", "file": pdf})
    return parts


@st.composite
def conversations(draw: Any) -> list[dict[str, Any]]:
    """A realistic conversation: instructions, then user turns (sometimes two in a row),
    assistant answers with text and/or tool calls, each call answered by a tool message."""
    messages: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 2))):
        role = draw(st.sampled_from(["system", "developer"]))
        parts = [{"type": "text", "text": t} for t in draw(st.lists(text, min_size=1, max_size=2))]
        messages.append({"role": role, "content": content(parts, draw)})
    for _ in range(draw(st.integers(1, 3))):
        for _ in range(draw(st.integers(1, 2))):
            messages.append({"role": "user", "content": content(draw(user_parts()), draw)})
        if draw(st.booleans()):
            texts = [{"type": "text", "text": t} for t in draw(st.lists(text, max_size=2))]
            calls = [
                {
                    "id": draw(ids),
                    "type": "function",
                    "function": {
                        "name": draw(names),
                        "arguments": orjson.dumps(
                            draw(st.dictionaries(text, json_value, max_size=3))
                        ).decode(),
                    },
                }
                for _ in range(draw(st.integers(0 if texts else 1, 2)))
            ]
            answer: dict[str, Any] = {
                "role": "assistant",
                "content": content(texts, draw) if texts else None,
            }
            if calls:
                answer["tool_calls"] = calls
            messages.append(answer)
            for call in calls:
                result = [
                    {"type": "text", "text": t}
                    for t in draw(st.lists(text, min_size=1, max_size=2))
                ]
                messages.append(
                    {"role": "tool", "tool_call_id": call["id"], "content": content(result, draw)}
                )
    return messages


@st.composite
def openai_requests(draw: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"model": "claude-x", "messages": draw(conversations())}
    optional = {
        "max_tokens": st.integers(1, 10**5),
        "max_completion_tokens": st.integers(1, 10**5),
        "temperature": unit,
        "top_p": unit,
        "top_k": st.integers(1, 500),
        "stop": text | st.lists(text, min_size=1, max_size=3),
        "user": text,
        "stream": st.booleans(),
        "tools": st.lists(
            st.builds(
                lambda name, description, schema: {
                    "type": "function",
                    "function": {"name": name, "description": description, "parameters": schema},
                },
                names,
                text,
                st.fixed_dictionaries(
                    {
                        "type": st.just("object"),
                        "properties": st.dictionaries(
                            names, st.just({"type": "string"}), max_size=2
                        ),
                    }
                ),
            ),
            min_size=1,
            max_size=3,
        ),
        "tool_choice": st.sampled_from(["auto", "none", "required"])
        | st.builds(lambda n: {"type": "function", "function": {"name": n}}, names),
        "parallel_tool_calls": st.booleans(),
        # dropped by the table: they must not reach the target, nor come back
        "seed": st.integers(0, 100),
        "service_tier": st.just("auto"),
        # refused fields set to their harmless defaults: accepted, and left out
        "n": st.just(1),
        "logprobs": st.just(False),
        "frequency_penalty": st.just(0),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            data[name] = draw(strategy)
    return data


def atoms(messages: list[dict[str, Any]]) -> tuple[str, list[tuple[Any, ...]]]:
    """What a conversation says, whatever the message boundaries: the system text, and each
    piece of content with its speaker, in order."""
    system: list[str] = []
    said: list[tuple[Any, ...]] = []

    def parts(value: Any) -> list[dict[str, Any]]:
        return [{"type": "text", "text": value}] if isinstance(value, str) else value or []

    for message in messages:
        role = message["role"]
        if role in ("system", "developer"):
            system += [part["text"] for part in parts(message["content"])]
        elif role == "tool":
            texts = tuple(part["text"] for part in parts(message["content"]))
            said.append(("tool", message["tool_call_id"], texts))
        else:
            said += [
                (role, orjson.dumps(part, option=orjson.OPT_SORT_KEYS))
                for part in parts(message["content"])
            ]
            for call in message.get("tool_calls", []):
                function = call["function"]
                said.append(
                    ("call", call["id"], function["name"], orjson.loads(function["arguments"]))
                )
    return "\n\n".join(system), said


@settings(max_examples=300, deadline=None)
@given(openai_requests())
def test_an_openai_request_survives_the_round_trip_through_anthropic(data):
    original = orjson.dumps(data)
    there = to_anthropic(data)
    back = messages_to_chat(there)
    assert orjson.dumps(data) == original  # the input is not modified
    assert atoms(back["messages"]) == atoms(data["messages"])
    assert back["model"] == data["model"]
    cap = data.get("max_completion_tokens", data.get("max_tokens", DEFAULT_CAP))
    assert there["max_tokens"] == back["max_tokens"] == cap
    for name in ("temperature", "top_p", "top_k", "user", "stream"):
        assert back.get(name) == data.get(name)
    stop = data.get("stop")
    assert back.get("stop") == ([stop] if isinstance(stop, str) else stop)
    assert back.get("stream_options") == ({"include_usage": True} if data.get("stream") else None)
    assert back.get("tools") == data.get("tools")
    tools = bool(data.get("tools"))
    parallel_off = tools and data.get("parallel_tool_calls") is False
    if data.get("tool_choice") == "none":
        parallel_off = False  # a call to no tool is neither parallel nor not
    assert back.get("parallel_tool_calls") == (False if parallel_off else None)
    choice = data.get("tool_choice", "auto" if parallel_off else None)  # auto: the default
    assert back.get("tool_choice") == (choice if tools else None)
    for name in ("seed", "service_tier", "n", "logprobs", "frequency_penalty"):
        assert name not in there and name not in back


# --- the table: refused, dropped, unknown -----------------------------------------------------

# A value each refused field cannot take, per direction: a new refused row needs one here.
REFUSED_TO_ANTHROPIC = {
    "n": 2,
    "logprobs": True,
    "top_logprobs": 3,
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
    "frequency_penalty": 0.5,
    "presence_penalty": -1,
    "logit_bias": {"50256": -100},
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "reasoning_effort": "high",
    "verbosity": "low",
    "web_search_options": {},
    "functions": [{"name": "f"}],
    "function_call": "auto",
}
REFUSED_TO_OPENAI = {
    "container": "container_1",
    "mcp_servers": [{"type": "url", "url": "https://mcp.test", "name": "x"}],
    "context_management": {"edits": []},
    "output_format": {"type": "json_schema", "schema": {}},
    "output_config": {"effort": "low"},
}
OPENAI_BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_BASE = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
DIRECTIONS = [
    (table.TO_ANTHROPIC, REFUSED_TO_ANTHROPIC, to_anthropic, OPENAI_BASE),
    (table.TO_OPENAI, REFUSED_TO_OPENAI, messages_to_chat, ANTHROPIC_BASE),
]


@pytest.mark.parametrize(("rules", "samples", "translate", "base"), DIRECTIONS)
def test_each_refused_field_is_a_400_naming_it_unless_harmless(rules, samples, translate, base):
    refused_fields = {name for name, rule in rules.items() if rule.action == table.REFUSED}
    assert set(samples) == refused_fields
    for name, value in samples.items():
        assert refused(translate, {**base, name: value}) == name
        for harmless in rules[name].harmless:
            assert name not in translate({**base, name: harmless})
        assert name not in translate({**base, name: None})  # null: not set


@pytest.mark.parametrize(("rules", "samples", "translate", "base"), DIRECTIONS)
def test_each_dropped_field_is_left_out(rules, samples, translate, base):
    dropped = [name for name, rule in rules.items() if rule.action == table.DROPPED]
    assert dropped
    for name in dropped:
        assert translate({**base, name: {"anything": 1}}) == translate(base)


@pytest.mark.parametrize(("rules", "samples", "translate", "base"), DIRECTIONS)
def test_a_field_the_table_does_not_know_is_refused(rules, samples, translate, base):
    assert refused(translate, {**base, "brand_new_feature": True}) == "brand_new_feature"


def test_the_markdown_table_has_a_row_for_every_field_and_three_columns():
    markdown = table.markdown()
    lines = markdown.splitlines()
    assert lines[0] == "| Field | Direction | What happens |"
    assert len(lines) == 2 + len(table.TO_ANTHROPIC) + len(table.TO_OPENAI) + len(table.NOTES)
    for line in lines:
        assert len(re.findall(r"(?<!\\)\|", line)) == 4, line
    for name in [*table.TO_ANTHROPIC, *table.TO_OPENAI]:
        assert f"| `{name}` |" in markdown


# --- OpenAI → Anthropic, one rule at a time ---------------------------------------------------


def test_system_and_developer_messages_are_hoisted_in_order():
    data = {
        "messages": [
            {"role": "developer", "content": "one"},
            {"role": "user", "content": "hi"},
            {"role": "system", "content": [{"type": "text", "text": "two"}]},
        ]
    }
    out = to_anthropic(data)
    assert out["system"] == [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert out["messages"] == [{"role": "user", "content": "hi"}]
    assert to_anthropic({"messages": [{"role": "system", "content": "only"}]})["system"] == "only"


def test_tool_results_are_merged_into_one_user_turn_first_in_it():
    data = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "a",
                        "type": "function",
                        "function": {"name": "w", "arguments": '{"c":"Oslo"}'},
                    },
                    {"id": "b", "type": "function", "function": {"name": "w", "arguments": ""}},
                ],
            },
            {"role": "user", "content": "also this"},  # out of place: results still go first
            {"role": "tool", "tool_call_id": "a", "content": "rain"},
            {"role": "tool", "tool_call_id": "b", "content": ""},
        ]
    }
    turns = to_anthropic(data)["messages"]
    assert [turn["role"] for turn in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "a", "name": "w", "input": {"c": "Oslo"}},
        {"type": "tool_use", "id": "b", "name": "w", "input": {}},
    ]
    assert turns[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "a", "content": "rain"},
        {"type": "tool_result", "tool_use_id": "b"},
        {"type": "text", "text": "also this"},
    ]


@pytest.mark.parametrize("arguments", ["not json", "[1, 2]", '"text"', "{"])
def test_tool_call_arguments_that_are_no_json_object_are_a_400_naming_them(arguments):
    call = {"id": "a", "type": "function", "function": {"name": "f", "arguments": arguments}}
    data = {
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}]
    }
    assert refused(to_anthropic, data) == "messages[1].tool_calls[0].function.arguments"


def test_a_tool_call_id_anthropic_would_refuse_gets_one_digest_for_call_and_result():
    call = {"id": "call.1/x", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    data = {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call.1/x", "content": "ok"},
        ]
    }
    turns = to_anthropic(data)["messages"]
    used, answered = turns[1]["content"][0]["id"], turns[2]["content"][0]["tool_use_id"]
    assert used == answered == tool_id("call.1/x", "id")
    assert re.fullmatch(r"toolu_[0-9a-f]{32}", used)
    assert tool_id("call.1-x", "id") != used


def test_images_files_and_their_refusals():
    def user(*parts: Any) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": list(parts)}]}

    image = {
        "type": "image_url",
        "image_url": {"url": "data:image/gif;base64,R0lG", "detail": "low"},
    }
    assert to_anthropic(user(image))["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/gif", "data": "R0lG"}}
    ]
    for bad in ("data:image/png,plain", "ftp://x.test/a.png", "data:;base64,AA"):
        part = {"type": "image_url", "image_url": {"url": bad}}
        assert refused(to_anthropic, user(part)) == "messages[0].content[0].image_url.url"
    by_id = {"type": "file", "file": {"file_id": "file-1"}}
    assert refused(to_anthropic, user(by_id)) == "messages[0].content[0].file.file_id"
    text_file = {"type": "file", "file": {"file_data": "data:text/plain;base64,aGk="}}
    assert refused(to_anthropic, user(text_file)) == "messages[0].content[0].file.file_data"
    audio = {"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}
    assert (
        refused(to_anthropic, user({"type": "text", "text": "x"}, audio))
        == "messages[0].content[1].type"
    )


def test_generation_parameters():
    out = to_anthropic({**OPENAI_BASE, "max_tokens": 5, "max_completion_tokens": 7, "top_k": -1})
    assert out["max_tokens"] == 7 and "top_k" not in out
    assert to_anthropic(OPENAI_BASE)["max_tokens"] == DEFAULT_CAP
    assert refused(to_anthropic, {**OPENAI_BASE, "temperature": 1.5}) == "temperature"
    assert to_anthropic({**OPENAI_BASE, "temperature": 1})["temperature"] == 1
    assert refused(to_anthropic, {**OPENAI_BASE, "max_tokens": 0}) == "max_tokens"
    both = to_anthropic({**OPENAI_BASE, "user": "u", "safety_identifier": "s"})
    assert both["metadata"] == {"user_id": "s"}
    assert "stop_sequences" not in to_anthropic({**OPENAI_BASE, "stop": []})


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        ("auto", True, {"type": "auto"}),
    ],
)
def test_tool_choice_and_parallel_tool_calls(choice, parallel, expected):
    tool = {"type": "function", "function": {"name": "f"}}
    out = to_anthropic(
        {**OPENAI_BASE, "tools": [tool], "tool_choice": choice, "parallel_tool_calls": parallel}
    )
    assert out["tools"] == [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]
    assert out["tool_choice"] == expected
    assert "tool_choice" not in to_anthropic({**OPENAI_BASE, "tool_choice": "required"})


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("tools", [{"type": "custom", "custom": {"name": "x"}}], "tools[0].type"),
        ("tool_choice", {"type": "allowed_tools"}, "tool_choice"),
        ("messages", [{"role": "function", "name": "f", "content": "x"}], "messages[0].role"),
        (
            "messages",
            [{"role": "assistant", "function_call": {"name": "f"}}],
            "messages[0].function_call",
        ),
        ("messages", [{"role": "robot", "content": "x"}], "messages[0].role"),
        ("messages", "hello", "messages"),
        ("stop", 5, "stop"),
    ],
)
def test_what_cannot_be_translated_to_anthropic_is_a_400_naming_it(field, value, param):
    tool = [{"type": "function", "function": {"name": "f"}}]
    assert refused(to_anthropic, {**OPENAI_BASE, "tools": tool, field: value}) == param


# --- Anthropic → OpenAI, one rule at a time ---------------------------------------------------


def test_an_anthropic_conversation_with_tools_thinking_and_errors():
    data = {
        **ANTHROPIC_BASE,
        "system": [
            {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "b"},
        ],
        "thinking": {"type": "enabled", "budget_tokens": 2000},
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
            },
            {
                "role": "assistant",
                "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}],
            },
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "s"},
                    {"type": "text", "text": "Calling."},
                    {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"x": [1]}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "is_error": True,
                        "content": [{"type": "text", "text": "boom"}],
                    },
                    {"type": "text", "text": "and?"},
                ],
            },
        ],
    }
    out = messages_to_chat(data, cap_field="max_completion_tokens")
    assert out["max_completion_tokens"] == 10 and "max_tokens" not in out
    assert "thinking" not in out
    assert out["messages"] == [
        {"role": "system", "content": "a\n\nb"},
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": "Calling.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"x":[1]}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: boom"},
        {"role": "user", "content": "and?"},
    ]


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("tools", [{"type": "web_search_20250305", "name": "web_search"}], "tools[0].type"),
        ("tool_choice", {"type": "sometimes"}, "tool_choice.type"),
        (
            "messages",
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [{"type": "image", "source": {}}],
                        }
                    ],
                }
            ],
            "messages[0].content[0].content[0].type",
        ),
        (
            "messages",
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "url", "url": "https://x.test/a.pdf"},
                        }
                    ],
                }
            ],
            "messages[0].content[0].source",
        ),
        (
            "messages",
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                }
            ],
            "messages[0].content[0].source.type",
        ),
        (
            "messages",
            [
                {
                    "role": "assistant",
                    "content": [
                        {"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}
                    ],
                }
            ],
            "messages[0].content[0].type",
        ),
        ("messages", [{"role": "system", "content": "x"}], "messages[0].role"),
        ("system", [{"type": "image", "source": {}}], "system[0].type"),
        ("max_tokens", "many", "max_tokens"),
        ("metadata", {"user_id": 5}, "metadata.user_id"),
    ],
)
def test_what_cannot_be_translated_to_openai_is_a_400_naming_it(field, value, param):
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    assert refused(messages_to_chat, {**ANTHROPIC_BASE, "tools": tools, field: value}) == param


def test_anthropic_tools_choice_and_parameters():
    data = {
        **ANTHROPIC_BASE,
        "tools": [
            {
                "name": "f",
                "description": "d",
                "input_schema": {"type": "object"},
                "cache_control": {"type": "ephemeral"},
            }
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u"},
        "stream": False,
        "top_k": 5,
    }
    out = messages_to_chat(data)
    assert out["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "description": "d", "parameters": {"type": "object"}},
        }
    ]
    assert (out["tool_choice"], out["parallel_tool_calls"]) == ("required", False)
    assert (out["stop"], out["user"], out["top_k"]) == (["END"], "u", 5)
    assert out["stream"] is False and "stream_options" not in out
    named = messages_to_chat({**data, "tool_choice": {"type": "tool", "name": "f"}})
    assert named["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert "tool_choice" not in messages_to_chat({**ANTHROPIC_BASE, "tool_choice": {"type": "any"}})


# --- malformed bodies -------------------------------------------------------------------------

KEYS = [
    "role",
    "content",
    "type",
    "text",
    "tool_calls",
    "function",
    "arguments",
    "name",
    "id",
    "tool_call_id",
    "image_url",
    "url",
    "file",
    "file_data",
    "source",
    "data",
    "media_type",
    "tool_use_id",
    "input",
    "is_error",
    "refusal",
    "title",
]
ROLES = ["system", "developer", "user", "assistant", "tool", "function"]
TYPES = [
    "text",
    "image_url",
    "file",
    "input_audio",
    "function",
    "image",
    "document",
    "tool_use",
    "tool_result",
    "thinking",
    "base64",
    "url",
    "refusal",
]
anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(ROLES + TYPES + ["{}", "[]", "data:image/png;base64,AA", "https://x.test"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)
    ),
    max_leaves=20,
)
FIELDS = sorted({*table.TO_ANTHROPIC, *table.TO_OPENAI} - {"model"})


@settings(max_examples=400, deadline=None)
@given(
    st.lists(anything, min_size=1, max_size=4),
    st.dictionaries(st.sampled_from(FIELDS), anything, max_size=4),
    st.sampled_from([to_anthropic, messages_to_chat]),
)
def test_a_malformed_body_is_a_400_never_another_exception(messages, fields, translate):
    try:
        out = translate({**fields, "messages": messages})
    except BadRequest as error:
        assert error.param
    else:
        orjson.dumps(out)  # what goes upstream is JSON


def test_readme_has_the_translation_table():
    """The README's translation table is `table.markdown()`, not a copy that drifts."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert table.markdown() in readme, "README's translation table drifted: paste table.markdown()"
