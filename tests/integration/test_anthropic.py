"""POST /v1/messages with the official anthropic SDK: from the built-in mock, and routed to a
provider of kind "anthropic" (a real upstream process speaking the Messages API)."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from support import Gunicorn, Upstream

from edge.auth import digest_of, short_id

KEY = "sk-gateway-key-for-claude"
PROVIDER_KEY = "sk-ant-provider-secret"
ASK = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def upstream():
    server = Upstream("--name", "claude-up")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory):
    path = tmp_path_factory.mktemp("providers") / "providers.toml"
    path.write_text(f"""
[providers.claude]
base_url = "{upstream.url}/v1"
api_key = "{PROVIDER_KEY}"
kind = "anthropic"
[providers.openai]
base_url = "{upstream.url}/v1"
[[models]]
name = "claude-sonnet"
targets = [{{ provider = "claude", model = "claude-upstream-name" }}]
[[models]]
name = "gpt-only"
targets = [{{ provider = "openai" }}]
[[models]]
name = "error-400"
targets = [{{ provider = "claude" }}]
[[models]]
name = "html-502"
targets = [{{ provider = "claude" }}]
[[models]]
name = "cut-mid-event"
targets = [{{ provider = "claude" }}]
""")
    server = Gunicorn(API_KEYS=KEY, PROVIDERS_FILE=str(path))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mock_proxy():
    server = Gunicorn(API_KEYS=KEY)
    yield server
    server.stop()


def client(server: Gunicorn, key: str = KEY, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=server.url, api_key=key, max_retries=0, timeout=20, default_headers=headers
    )


def test_mock_messages_plain_and_streamed(mock_proxy):
    with client(mock_proxy) as sdk:
        message = sdk.messages.create(model="claude-x", max_tokens=64, messages=ASK)
        assert message.type == "message" and message.role == "assistant"
        assert "mock response" in message.content[0].text
        assert message.usage.input_tokens == 2
        with sdk.messages.stream(model="claude-x", max_tokens=64, messages=ASK) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == message.content[0].text
        assert final.usage.output_tokens == message.usage.output_tokens


def test_errors_in_anthropic_shape(mock_proxy):
    with client(mock_proxy, key="wrong") as sdk, pytest.raises(anthropic.AuthenticationError):
        sdk.messages.create(model="claude-x", max_tokens=8, messages=ASK)
    response = httpx.post(mock_proxy.url + "/v1/messages", json={"model": "m"},
                          headers={"x-api-key": KEY})  # fmt: skip
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "messages" in body["error"]["message"]
    # Other routes keep the OpenAI envelope.
    other = httpx.post(mock_proxy.url + "/v1/chat/completions", json={"model": "m"},
                       headers={"x-api-key": KEY})  # fmt: skip
    assert set(other.json()["error"]) == {"message", "type", "param", "code"}


def test_routed_to_an_anthropic_provider(proxy, upstream):
    with client(proxy, **{"anthropic-beta": "tools-2024-05-16"}) as sdk:
        message = sdk.messages.create(model="claude-sonnet", max_tokens=64, messages=ASK)
        assert message.content[0].text == "Hello from claude-up."
        assert message.model == "claude-upstream-name"
        assert message.usage.input_tokens == 9 and message.usage.output_tokens == 4
        with sdk.messages.stream(model="claude-sonnet", max_tokens=64, messages=ASK) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == "Hello from claude-up."
        assert final.usage.output_tokens == 4
    entry = next(e for e in reversed(upstream.log()) if e["path"] == "/v1/messages")
    assert entry["model"] == "claude-upstream-name"
    response = httpx.post(
        proxy.url + "/v1/messages",
        json={"model": "claude-sonnet", "max_tokens": 8, "messages": ASK},
        headers={"x-api-key": KEY, "x-request-id": "anthropic-headers-1",
                 "anthropic-version": "2023-06-01", "anthropic-beta": "b1"},
    )  # fmt: skip
    assert response.status_code == 200
    seen = upstream.seen("anthropic-headers-1")["headers"]
    assert seen["x-api-key"] == PROVIDER_KEY
    assert "authorization" not in seen
    assert seen["anthropic-version"] == "2023-06-01" and seen["anthropic-beta"] == "b1"
    metrics = httpx.get(proxy.url + "/metrics").text
    # Three requests of 9 input and 4 output tokens, one of them streamed (message_start
    # carries the input tokens, message_delta the output tokens).
    key = short_id(digest_of(KEY))  # the API_KEYS key's `key` label
    assert f'edge_tokens_total{{key="{key}",kind="prompt",model="claude-sonnet"}} 27.0' in metrics
    assert (
        f'edge_tokens_total{{key="{key}",kind="completion",model="claude-sonnet"}} 12.0' in metrics
    )


def test_routing_errors_in_anthropic_shape(proxy):
    with client(proxy) as sdk:
        with pytest.raises(anthropic.NotFoundError) as info:
            sdk.messages.create(model="not-configured", max_tokens=8, messages=ASK)
        assert info.value.body["error"]["type"] == "not_found_error"
        # A model served by an OpenAI-compatible provider only: through the adapter.
        served = sdk.messages.create(model="gpt-only", max_tokens=8, messages=ASK)
        assert served.content[0].text == "Hello from the upstream."
        with pytest.raises(anthropic.BadRequestError) as info:
            sdk.messages.create(model="error-400", max_tokens=8, messages=ASK)
        assert info.value.body["error"]["message"] == "max_tokens: required"  # the provider's
    # A provider error without a JSON body is wrapped in Anthropic's shape on this route.
    response = httpx.post(
        proxy.url + "/v1/messages",
        json={"model": "html-502", "max_tokens": 8, "messages": ASK},
        headers={"x-api-key": KEY},
    )
    assert response.status_code == 502
    assert response.json() == {
        "type": "error",
        "error": {"type": "api_error", "message": "The upstream answered HTTP 502."},
    }


def test_a_stream_broken_mid_event_ends_with_an_anthropic_error_event(proxy):
    """The upstream breaks inside the fourth event: the three whole ones arrive, the half one
    is dropped, and the stream ends with Anthropic's `error` event, which the SDK raises."""
    ask = {"model": "cut-mid-event", "max_tokens": 8, "messages": ASK}
    with (
        client(proxy) as sdk,
        pytest.raises(anthropic.APIStatusError) as info,
        sdk.messages.stream(**ask) as stream,
    ):
        for _ in stream:
            pass
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "api_error"
    assert "mid-stream" in info.value.body["error"]["message"]
    raw = httpx.post(
        proxy.url + "/v1/messages",
        json={"model": "cut-mid-event", "max_tokens": 8, "stream": True, "messages": ASK},
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
    ).text
    events = [block for block in raw.split("\n\n") if block]
    assert [block.split("\n")[0] for block in events] == [
        "event: message_start", "event: content_block_start", "event: ping", "event: error",
    ]  # fmt: skip
    assert "Hello from" not in raw  # the half event never reached the client
