"""The built-in mock provider emulates `n` and `tools` (real gunicorn, the openai SDK)."""

from __future__ import annotations

import json

import openai
import pytest
from support import Gunicorn, sdk_client

KEY = "sk-mock-provider-tests"
CHAT = [{"role": "user", "content": "Say hello in five words"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "verbose": {"type": "boolean"},
            },
            "required": ["city", "days", "unit"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, CLOCK]


@pytest.fixture(scope="module")
def server():
    proxy = Gunicorn(API_KEYS=KEY)
    yield proxy
    proxy.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return sdk_client(server.url, KEY)


# ------------------------------------------------------------------ n


def test_n_gives_n_choices(client):
    one = client.chat.completions.create(model="mock-gpt", messages=CHAT)
    three = client.chat.completions.create(model="mock-gpt", messages=CHAT, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.prompt_tokens == one.usage.prompt_tokens


def test_n_streams_every_choice(client):
    whole = client.chat.completions.create(model="mock-gpt", messages=CHAT)
    text = whole.choices[0].message.content
    parts: dict[int, str] = {}
    finished: dict[int, str] = {}
    stream = client.chat.completions.create(
        model="mock-gpt", messages=CHAT, n=4, stream=True, stream_options={"include_usage": True}
    )
    usage = None
    with stream:
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                parts[choice.index] = parts.get(choice.index, "") + (choice.delta.content or "")
                if choice.finish_reason:
                    finished[choice.index] = choice.finish_reason
    assert parts == {i: text for i in range(4)}
    assert finished == {i: "stop" for i in range(4)}
    assert usage is not None and usage.completion_tokens == 4 * whole.usage.completion_tokens


def test_n_on_legacy_completions(client):
    result = client.completions.create(model="mock-gpt", prompt="Say hello", n=2)
    assert [c.index for c in result.choices] == [0, 1]
    assert result.choices[0].text == result.choices[1].text != ""


@pytest.mark.parametrize("n", [0, -1, 129, "2", True, 1.5])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_n_out_of_bounds_is_400_naming_n(client, n, stream):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="mock-gpt", messages=CHAT, stream=stream, extra_body={"n": n}
        )
    assert raised.value.param == "n"


# ------------------------------------------------------------------ tools


def arguments(call) -> dict:
    return json.loads(call.function.arguments)


def test_tool_choice_required_calls_the_first_tool(client):
    result = client.chat.completions.create(
        model="mock-gpt", messages=CHAT, tools=TOOLS, tool_choice="required"
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert arguments(call) == {"city": "mock", "days": 0, "unit": "celsius"}


def test_tool_choice_naming_a_function_calls_it(client):
    result = client.chat.completions.create(
        model="mock-gpt", messages=CHAT, tools=TOOLS, n=2,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )  # fmt: skip
    assert [c.message.tool_calls[0].function.name for c in result.choices] == ["get_time"] * 2
    assert arguments(result.choices[0].message.tool_calls[0]) == {}


def test_auto_calls_a_tool_the_user_names_then_answers_its_result_in_text(client):
    ask = [{"role": "user", "content": "Please use get_time now"}]
    first = client.chat.completions.create(model="mock-gpt", messages=ask, tools=TOOLS)
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    after = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"},
    ]
    second = client.chat.completions.create(model="mock-gpt", messages=after, tools=TOOLS)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content


@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_no_tool_call_unless_asked(client, tool_choice):
    result = client.chat.completions.create(
        model="mock-gpt", messages=CHAT, tools=TOOLS, tool_choice=tool_choice
    )
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].message.tool_calls is None


def test_a_streamed_tool_call_is_assembled_by_the_sdk(client):
    with client.chat.completions.stream(
        model="mock-gpt", messages=CHAT, tools=TOOLS, tool_choice="required"
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert arguments(call) == {"city": "mock", "days": 0, "unit": "celsius"}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": []}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": "get_weather"}, "tools"),
    ],
)  # fmt: skip
def test_tools_the_mock_cannot_honour_are_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="mock-gpt", messages=CHAT, extra_body=extra)
    assert raised.value.param == param
