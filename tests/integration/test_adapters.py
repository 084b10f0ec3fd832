"""OpenAI clients on Anthropic providers and Anthropic clients on OpenAI-compatible ones,
through the adapter (edge.routing.adapter): real gunicorn (4 workers), one real upstream process
speaking both APIs (tests/upstream_server.py, which also plays the model of an agent loop when
a request carries tools), the official openai and anthropic SDKs as clients.

Checked: text, streams (with usage), tools plain and streamed, an agent loop of tool call, tool
result and answer in both directions, errors in the client's shape with the status its SDK
expects (Anthropic's 529 a 503 retried by failover; an OpenAI 429 Anthropic's rate limit),
refusals naming the field, count_tokens (passed through, or estimated), failover across kinds,
and that translated usage feeds the token metrics and the access line as native usage does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from support import (
    Gunicorn,
    Upstream,
    access_line,
    free_port,
    metric_total,
    sdk_client,
    wait_until,
)

KEY = "sk-adapters-client-5e1f"
ANTHROPIC_KEY = "sk-ant-provider-9c2d"
OPENAI_KEY = "sk-oai-provider-4b7a"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
WEATHER_ANTHROPIC = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": WEATHER["function"]["parameters"],
}


@pytest.fixture(scope="module")
def upstream():
    server = Upstream("--pace", "0.01", "--chunks", "3")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, upstream):
    directory: Path = tmp_path_factory.mktemp("adapters")
    providers = directory / "providers.toml"
    dead = free_port()
    providers.write_text(
        f'[providers.claude]\nkind = "anthropic"\nbase_url = "{upstream.url}/v1"\n'
        f'api_key = "{ANTHROPIC_KEY}"\n'
        f'[providers.compat]\nbase_url = "{upstream.url}/v1"\napi_key = "{OPENAI_KEY}"\n'
        f'[providers.dead]\nkind = "anthropic"\nbase_url = "http://127.0.0.1:{dead}/v1"\n'
        'api_key = "sk-dead"\n'
        '[[models]]\nname = "claude-x"\ntargets = [{ provider = "claude" }]\n'
        '[[models]]\nname = "claude-small"\nmax_tokens_default = 77\n'
        'targets = [{ provider = "claude", model = "claude-x" }]\n'
        '[[models]]\nname = "gpt-x"\ntargets = [{ provider = "compat" }]\n'
        '[[models]]\nname = "mixed"\n'
        'targets = [{ provider = "dead", model = "claude-x" }, { provider = "compat" }]\n'
        '[[models]]\nname = "claude-then-gpt"\n'
        'targets = [{ provider = "claude", model = "claude-x" }, { provider = "compat" }]\n'
        '[[models]]\nname = "overloaded-then-gpt"\n'
        'targets = [{ provider = "claude", model = "overloaded" }, { provider = "compat" }]\n'
        '[[models]]\nname = "overloaded"\ntargets = [{ provider = "claude" }]\n'
        '[[models]]\nname = "error-400"\ntargets = [{ provider = "claude" }]\n'
        '[[models]]\nname = "rate-limited"\n'
        'targets = [{ provider = "compat", model = "error-429" }]\n'
        '[routing]\nstrategy = "priority"\n'
    )
    server = Gunicorn(
        WORKERS="4",
        API_KEYS=KEY,
        PROVIDERS_FILE=str(providers),
        RATE_LIMIT_BURST="100000",
        RATE_LIMIT_RPM="6000000",
    )
    yield server
    server.stop()


def claude_client(server: Gunicorn) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=20)


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


def seen_body(upstream: Upstream, request_id: str) -> dict[str, Any]:
    return json.loads(upstream.seen(request_id)["body"])


# ------------------------------------------------------------------ the openai SDK, Claude


def test_openai_client_on_an_anthropic_provider(proxy, upstream):
    request_id = unique("oa-text")
    client = sdk_client(proxy.url, KEY)
    raw = client.chat.completions.with_raw_response.create(
        model="claude-x",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello?"},
        ],
        temperature=0.5,
        stop=["END"],
        user="user-7",
        extra_headers={"x-request-id": request_id},
    )
    answer = raw.parse()
    assert answer.choices[0].message.content == "Hello from the upstream."
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (9, 4)
    sent = upstream.seen(request_id)
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent["headers"]
    body = json.loads(sent["body"])
    assert body["system"] == "Be brief."
    assert body["messages"] == [{"role": "user", "content": "Hello?"}]
    assert body["max_tokens"] == 4096  # ANTHROPIC_MAX_TOKENS_DEFAULT: the client set none
    assert body["stop_sequences"] == ["END"] and body["temperature"] == 0.5
    assert body["metadata"] == {"user_id": "user-7"}

    small = unique("oa-small")
    client.chat.completions.create(
        model="claude-small",
        messages=[{"role": "user", "content": "Hi"}],
        extra_headers={"x-request-id": small},
    )
    assert seen_body(upstream, small)["max_tokens"] == 77  # the model entry's default
    capped = unique("oa-capped")
    client.chat.completions.create(
        model="claude-x",
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=12,
        extra_headers={"x-request-id": capped},
    )
    assert seen_body(upstream, capped)["max_tokens"] == 12


def test_openai_stream_with_usage_from_an_anthropic_provider(proxy):
    client = sdk_client(proxy.url, KEY)
    chunks = list(
        client.chat.completions.create(
            model="claude-x",
            messages=[{"role": "user", "content": "Hello?"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the upstream."
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 9
    assert chunks[-1].usage.completion_tokens == 4


@pytest.mark.parametrize("stream", [False, True])
def test_openai_agent_loop_on_an_anthropic_provider(proxy, upstream, stream):
    client = sdk_client(proxy.url, KEY)
    asked: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    request_id = unique("oa-tools")
    if stream:
        calls: dict[int, dict[str, str]] = {}
        finish = None
        for chunk in client.chat.completions.create(
            model="claude-x",
            messages=asked,
            tools=[WEATHER],
            tool_choice="required",
            stream=True,
            extra_headers={"x-request-id": request_id},
        ):
            for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        assert finish == "tool_calls" and len(calls) == 1
        call_id, name, arguments = calls[0]["id"], calls[0]["name"], calls[0]["arguments"]
    else:
        first = client.chat.completions.create(
            model="claude-x",
            messages=asked,
            tools=[WEATHER],
            tool_choice="required",
            extra_headers={"x-request-id": request_id},
        )
        assert first.choices[0].finish_reason == "tool_calls"
        (call,) = first.choices[0].message.tool_calls
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert name == "get_weather" and json.loads(arguments) == {"city": "Paris"}
    sent = seen_body(upstream, request_id)
    assert sent["tools"] == [WEATHER_ANTHROPIC] and sent["tool_choice"] == {"type": "any"}

    asked += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"},
    ]
    final = client.chat.completions.create(model="claude-x", messages=asked, tools=[WEATHER])
    assert final.choices[0].message.content == "Tool said: sunny, 21 C"
    assert final.choices[0].finish_reason == "stop"


def test_openai_client_errors_in_its_shape(proxy):
    client = sdk_client(proxy.url, KEY)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="error-400", messages=[{"role": "user", "content": "x"}]
        )
    assert bad.value.status_code == 400 and "max_tokens" in bad.value.message
    with pytest.raises(openai.InternalServerError) as busy:
        client.chat.completions.create(
            model="overloaded", messages=[{"role": "user", "content": "x"}]
        )
    assert busy.value.status_code == 503  # Anthropic's 529, as OpenAI clients know it
    assert busy.value.code == "overloaded_error"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="claude-x", messages=[{"role": "user", "content": "x"}], n=2
        )
    assert refused.value.status_code == 400 and refused.value.param == "n"
    with pytest.raises(openai.BadRequestError) as hot:
        client.chat.completions.create(
            model="claude-x", messages=[{"role": "user", "content": "x"}], temperature=1.5
        )
    assert hot.value.param == "temperature"


def test_what_one_kind_refuses_goes_to_a_target_that_takes_it(proxy, upstream):
    """n=2 cannot go to Anthropic: the model's OpenAI-compatible target serves it instead."""
    request_id = unique("oa-n2")
    answer = sdk_client(proxy.url, KEY).chat.completions.create(
        model="claude-then-gpt",
        messages=[{"role": "user", "content": "x"}],
        n=2,
        extra_headers={"x-request-id": request_id},
    )
    assert answer.choices[0].message.content == "Hello from the upstream."
    assert upstream.seen(request_id)["path"] == "/v1/chat/completions"


def test_an_overloaded_anthropic_target_fails_over_to_an_openai_one(proxy, upstream):
    request_id = unique("oa-over")
    answer = sdk_client(proxy.url, KEY).chat.completions.create(
        model="overloaded-then-gpt",
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"x-request-id": request_id},
    )
    assert answer.choices[0].message.content == "Hello from the upstream."
    assert upstream.seen(request_id)["path"] == "/v1/chat/completions"  # the second attempt


# ------------------------------------------------------------------ the anthropic SDK, OpenAI


def test_anthropic_client_on_an_openai_provider(proxy, upstream):
    request_id = unique("an-text")
    message = claude_client(proxy).messages.create(
        model="gpt-x",
        max_tokens=50,
        system="Be brief.",
        messages=[{"role": "user", "content": "Hello?"}],
        stop_sequences=["END"],
        extra_headers={"x-request-id": request_id},
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello from the upstream."
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 7)
    sent = upstream.seen(request_id)
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert not any(name.startswith("anthropic-") for name in sent["headers"])
    body = json.loads(sent["body"])
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello?"},
    ]
    assert body["max_tokens"] == 50 and body["stop"] == ["END"]


def test_anthropic_stream_from_an_openai_provider(proxy, upstream):
    request_id = unique("an-stream")
    with claude_client(proxy).messages.stream(
        model="gpt-x",
        max_tokens=50,
        messages=[{"role": "user", "content": "Hello?"}],
        extra_headers={"x-request-id": request_id},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "c0 c1 c2 "  # the upstream's three chunks
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3  # the usage chunk asked for upstream
    assert upstream.seen(request_id)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_agent_loop_on_an_openai_provider(proxy, upstream, stream):
    client = claude_client(proxy)
    asked: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    request_id = unique("an-tools")
    options = {
        "model": "gpt-x",
        "max_tokens": 100,
        "tools": [WEATHER_ANTHROPIC],
        "extra_headers": {"x-request-id": request_id},
    }
    if stream:
        with client.messages.stream(messages=asked, **options) as events:
            first = events.get_final_message()
    else:
        first = client.messages.create(messages=asked, **options)
    assert first.stop_reason == "tool_use"
    (use,) = [block for block in first.content if block.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    assert seen_body(upstream, request_id)["tools"] == [WEATHER]

    asked += [
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "rainy"}],
        },
    ]
    options.pop("extra_headers")
    final = client.messages.create(messages=asked, **options)
    assert final.content[0].text == "Tool said: rainy"
    assert final.stop_reason == "end_turn"


def test_anthropic_client_errors_in_its_shape(proxy):
    client = claude_client(proxy)
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(
            model="rate-limited", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert limited.value.status_code == 429
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(
            model="gpt-x",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"container": "c1"},
        )
    assert "container" in refused.value.message


def test_count_tokens_passed_through_or_estimated(proxy, upstream):
    client = claude_client(proxy)
    asked = [{"role": "user", "content": "How many tokens is this?"}]
    request_id = unique("an-count")
    counted = client.messages.count_tokens(
        model="claude-x", messages=asked, extra_headers={"x-request-id": request_id}
    )
    assert counted.input_tokens == len(json.dumps(asked)) // 4  # the upstream's own count
    assert upstream.seen(request_id)["path"] == "/v1/messages/count_tokens"
    raw = client.messages.with_raw_response.count_tokens(model="gpt-x", messages=asked)
    assert raw.headers["x-edge-estimate"] == "true"
    assert raw.parse().input_tokens > 0


# ------------------------------------------------------------------ across kinds


def test_failover_crosses_kinds_with_no_client_error(proxy, upstream):
    """The model's first target (Anthropic) is dead: every request is served by the second
    (OpenAI-compatible), in the client's API, whichever it is."""
    openai_client, claude = sdk_client(proxy.url, KEY), claude_client(proxy)
    for _ in range(5):
        answer = openai_client.chat.completions.create(
            model="mixed", messages=[{"role": "user", "content": "x"}]
        )
        assert answer.choices[0].message.content == "Hello from the upstream."
        message = claude.messages.create(
            model="mixed", max_tokens=20, messages=[{"role": "user", "content": "x"}]
        )
        assert message.content[0].text == "Hello from the upstream."


def test_translated_usage_feeds_the_access_line_and_token_metrics(proxy):
    request_id = unique("oa-usage")
    before = _tokens(proxy, "claude-x")
    sdk_client(proxy.url, KEY).chat.completions.create(
        model="claude-x",
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"x-request-id": request_id},
    )
    found = access_line(proxy, request_id)
    assert (found["prompt_tokens"], found["completion_tokens"]) == (9, 4)
    assert found["provider"] == "claude" and found["status"] == 200
    after = wait_until(lambda: (now := _tokens(proxy, "claude-x")) != before and now)
    assert (after[0] - before[0], after[1] - before[1]) == (9, 4)


def _tokens(server: Gunicorn, model: str) -> tuple[float, float]:
    return tuple(  # type: ignore[return-value]
        metric_total(server, "edge_tokens_total", model=model, kind=kind)
        for kind in ("prompt", "completion")
    )


def test_langchain_chat_openai_with_tools_on_an_anthropic_provider(proxy):
    """LangChain's ChatOpenAI with bind_tools, as an application would use it, on a model
    whose provider is Anthropic: the tool call, then the answer to its result."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=proxy.url + "/v1", api_key=KEY, model="claude-x", max_retries=0, timeout=20
    )
    bound = llm.bind_tools([WEATHER])
    asked = [HumanMessage("Weather in Paris?")]
    first = bound.invoke(asked)
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    final = bound.invoke([*asked, first, ToolMessage("cloudy", tool_call_id=call["id"])])
    assert final.content == "Tool said: cloudy"
