"""The OpenAI endpoints beyond chat (embeddings, responses, moderations, models.retrieve)
through real gunicorn, with the official openai SDK, against the built-in mock and against a
real upstream. Bodies pass byte for byte in both directions."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest
from support import Gunicorn, Upstream, assert_envelope, sdk_client

from edge.auth import digest_of, short_id

KEY = "sk-endpoints-test-key"


@pytest.fixture(scope="module")
def upstream():
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(upstream):
    server = Gunicorn(API_KEYS=KEY, UPSTREAM_URL=upstream.url + "/v1", UPSTREAM_API_KEY="sk-up")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mock_proxy():
    server = Gunicorn(API_KEYS=KEY)
    yield server
    server.stop()


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}


# ------------------------------------------------------------------ built-in mock


def test_mock_embeddings_base64_and_float_agree(mock_proxy):
    client = sdk_client(mock_proxy.url, KEY)
    b64 = client.embeddings.create(model="text-embedding-3-small", input=["hello world", "x"])
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=["hello world", "x"], encoding_format="float"
    )
    assert len(b64.data) == 2 and len(b64.data[0].embedding) == 1536
    assert b64.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert b64.data[0].embedding != b64.data[1].embedding
    again = client.embeddings.create(model="text-embedding-3-small", input="hello world")
    assert again.data[0].embedding == b64.data[0].embedding  # deterministic
    small = client.embeddings.create(model="m", input="hello", dimensions=8)
    assert len(small.data[0].embedding) == 8
    assert sum(v * v for v in small.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
    assert b64.usage.prompt_tokens == 3


def test_mock_responses_plain_and_streamed(mock_proxy):
    client = sdk_client(mock_proxy.url, KEY)
    result = client.responses.create(model="gpt-4o-mini", input="Say hello")
    assert result.object == "response" and result.status == "completed"
    assert "mock response" in result.output_text
    assert result.usage.input_tokens == 2 and result.usage.output_tokens > 0
    with client.responses.create(model="gpt-4o-mini", input="Say hello", stream=True) as events:
        kinds = []
        deltas = []
        for event in events:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type == "response.completed":
                final = event.response
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(deltas) == result.output_text == final.output_text


def test_mock_models_retrieve_and_moderations(mock_proxy):
    client = sdk_client(mock_proxy.url, KEY)
    assert client.models.retrieve("gpt-4o").id == "gpt-4o"
    response = httpx.get(mock_proxy.url + "/v1/models/no-such-model", headers=auth())
    assert_envelope(response, 404, "model_not_found")
    moderation = client.moderations.create(input="hello")
    assert moderation.results[0].flagged is False


def test_mock_endpoints_validate(mock_proxy):
    url = mock_proxy.url
    assert_envelope(httpx.post(url + "/v1/embeddings", json={"model": "m"}, headers=auth()),
                    400, type_="invalid_request_error")  # fmt: skip
    bad_format = {"model": "m", "input": "x", "encoding_format": "hex"}
    error = assert_envelope(
        httpx.post(url + "/v1/embeddings", json=bad_format, headers=auth()), 400
    )
    assert error["param"] == "encoding_format"
    assert_envelope(httpx.post(url + "/v1/responses", json={"input": "x"}, headers=auth()), 400)
    assert_envelope(httpx.post(url + "/v1/moderations", json={}, headers=auth()), 400)
    assert_envelope(httpx.post(url + "/v1/embeddings", json={"model": "m", "input": "x"}), 401)


# ------------------------------------------------------------------ through an upstream


def test_embeddings_pass_byte_for_byte(proxy, upstream):
    body = b'{"input": ["a", "b"],  "model":"emb", "encoding_format":"base64", "x-extra": 1}'
    headers = {**auth(), "content-type": "application/json", "x-request-id": "emb-bytes-1"}
    through = httpx.post(proxy.url + "/v1/embeddings", content=body, headers=headers)
    direct = httpx.post(upstream.url + "/v1/embeddings", content=body,
                        headers={"content-type": "application/json"})  # fmt: skip
    assert through.status_code == 200
    assert through.content == direct.content  # the upstream's own spacing, untouched
    assert upstream.seen("emb-bytes-1")["body"] == body.decode()
    vector = struct.unpack("<8f", base64.b64decode(through.json()["data"][0]["embedding"]))
    assert vector[0] == pytest.approx(0.125)


def test_sdk_embeddings_through_upstream(proxy):
    client = sdk_client(proxy.url, KEY)
    result = client.embeddings.create(model="emb", input=["a", "b"])  # base64 on the wire
    assert [d.index for d in result.data] == [0, 1]
    assert result.data[1].embedding[:2] == pytest.approx([0.25, 0.5])
    floats = client.embeddings.create(model="emb", input="a", encoding_format="float")
    assert floats.data[0].embedding[:2] == pytest.approx([0.125, 0.25])


def test_sdk_responses_through_upstream(proxy):
    client = sdk_client(proxy.url, KEY)
    result = client.responses.create(model="resp-model", input="hi")
    assert result.output_text == "Hello from the upstream."
    assert result.usage.output_tokens == 13
    with client.responses.create(model="resp-stream", input="hi", stream=True) as events:
        kinds = [event.type for event in events]
    assert kinds == ["response.created", "response.output_text.delta", "response.completed"]
    # The streamed usage (in response.completed) feeds the token metrics.
    metrics = httpx.get(proxy.url + "/metrics").text
    key = short_id(digest_of(KEY))  # the API_KEYS key's `key` label
    assert f'edge_tokens_total{{key="{key}",kind="prompt",model="resp-stream"}} 11.0' in metrics
    assert f'edge_tokens_total{{key="{key}",kind="completion",model="resp-stream"}} 13.0' in metrics


def test_sdk_models_retrieve_and_moderations_through_upstream(proxy, upstream):
    client = sdk_client(proxy.url, KEY)
    assert client.models.retrieve("some-model").owned_by == "up"
    response = httpx.get(proxy.url + "/v1/models/missing", headers=auth())
    assert_envelope(response, 404, "model_not_found")
    moderation = client.moderations.create(input="something", model="omni-moderation-latest")
    assert moderation.results[0].flagged is True
    # A model id that would climb out of /models/ is refused or stays inside it.
    response = httpx.get(proxy.url + "/v1/models/..", headers=auth())
    assert response.status_code in (400, 404)
