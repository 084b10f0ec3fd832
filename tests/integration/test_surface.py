"""The rest of the OpenAI surface through real gunicorn, against the real test upstream
(tests/upstream_server.py), with the official openai SDK as the client: images, speech (raw
bytes relayed as they come), multipart transcriptions routed by their `model` field, and the
stateful endpoints (files, batches, stored responses) pinned to `[routing] stateful_provider`;
404 without one, 401 without a key, 400 for a bad path parameter, 413 past MAX_REQUEST_SIZE.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import httpx
import openai
import pytest
from support import Gunicorn, Upstream, assert_envelope, sdk_client

KEY = "sk-surface-client-3a9e"
PROVIDER_KEY = "sk-surface-provider-71c4"
MAX_REQUEST = 256 * 1024
SPEECH = bytes(range(256)) * 1024  # tests/upstream_server.py SPEECH_BYTES
AUDIO = b"RIFF\x00\r\n--not-a-boundary\r\n" + bytes(range(256)) * 64


@pytest.fixture(scope="module")
def upstream():
    server = Upstream()
    yield server
    server.stop()


def _providers(directory: Path, upstream: Upstream, stateful: bool) -> Path:
    path = directory / ("stateful.toml" if stateful else "plain.toml")
    path.write_text(
        f'[providers.primary]\nbase_url = "{upstream.url}/v1"\napi_key = "{PROVIDER_KEY}"\n'
        f'[providers.claude]\nkind = "anthropic"\nbase_url = "{upstream.url}/v1"\n'
        '[[models]]\nname = "gpt-image-1"\ntargets = [{ provider = "primary" }]\n'
        '[[models]]\nname = "tts-1"\ntargets = [{ provider = "primary" }]\n'
        '[[models]]\nname = "whisper-1"\ntargets = [{ provider = "primary" }]\n'
        '[[models]]\nname = "renamed-whisper"\n'
        'targets = [{ provider = "primary", model = "whisper-large" }]\n'
        '[[models]]\nname = "claude-only"\ntargets = [{ provider = "claude" }]\n'
        + ('[routing]\nstateful_provider = "primary"\n' if stateful else "")
    )
    return path


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, upstream):
    directory = tmp_path_factory.mktemp("surface")
    server = Gunicorn(
        API_KEYS=KEY,
        PROVIDERS_FILE=str(_providers(directory, upstream, True)),
        MAX_REQUEST_SIZE=str(MAX_REQUEST),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain(tmp_path_factory, upstream):
    directory = tmp_path_factory.mktemp("surface-plain")
    server = Gunicorn(API_KEYS=KEY, PROVIDERS_FILE=str(_providers(directory, upstream, False)))
    yield server
    server.stop()


def _seen(upstream: Upstream, response: httpx.Response) -> dict:
    return upstream.seen(response.headers["x-request-id"])


def _assert_provider_key(seen: dict) -> None:
    assert seen["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert KEY not in str(seen["headers"])


def test_images_generation(proxy, upstream):
    client = sdk_client(proxy.url, KEY)
    raw = client.images.with_raw_response.generate(model="gpt-image-1", prompt="a red cube")
    image = raw.parse()
    assert image.data[0].b64_json and image.data[0].revised_prompt == "a red cube"
    seen = _seen(upstream, raw.http_response)
    assert seen["path"] == "/v1/images/generations"
    _assert_provider_key(seen)


def test_images_model_only_routes_to_openai_kind(proxy):
    client = sdk_client(proxy.url, KEY)
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="claude-only", prompt="x")


def test_speech_bytes_as_sent(proxy, upstream):
    client = sdk_client(proxy.url, KEY)
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", input="Hello.", voice="alloy"
    ) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        got = b"".join(response.iter_bytes())
        request_id = response.headers["x-request-id"]
    assert got == SPEECH
    _assert_provider_key(upstream.seen(request_id))


def test_transcription_multipart_unchanged(proxy, upstream):
    client = sdk_client(proxy.url, KEY)
    raw = client.audio.transcriptions.with_raw_response.create(
        file=("a.wav", io.BytesIO(AUDIO), "audio/wav"), model="whisper-1", language="en"
    )
    assert raw.parse().text == f"upstream transcript of {len(AUDIO)} bytes"
    seen = _seen(upstream, raw.http_response)
    assert seen["path"] == "/v1/audio/transcriptions"
    assert seen["form"]["model"] == "whisper-1" and seen["form"]["language"] == "en"
    assert seen["form"]["file_sha256"] == hashlib.sha256(AUDIO).hexdigest()
    assert seen["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    _assert_provider_key(seen)


def test_translation_text_and_renamed_model(proxy, upstream):
    # The SDK's audio.translations is deprecated (a warning, an error here): plain multipart.
    response = httpx.post(
        proxy.url + "/v1/audio/translations", headers={"authorization": f"Bearer {KEY}"},
        files={"file": ("a.wav", AUDIO, "audio/wav")},
        data={"model": "renamed-whisper", "response_format": "text"}, timeout=10,
    )  # fmt: skip
    assert response.status_code == 200 and response.text == "upstream transcript\n"
    assert response.headers["content-type"].startswith("text/plain")
    seen = _seen(upstream, response)
    assert seen["path"] == "/v1/audio/translations"
    assert seen["form"]["model"] == "whisper-large"  # the target's name, in the form field
    assert seen["form"]["file_sha256"] == hashlib.sha256(AUDIO).hexdigest()


def test_file_upload_list_retrieve_delete(proxy, upstream):
    client = sdk_client(proxy.url, KEY)
    content = b'{"custom_id": "1"}\n' * 50
    raw = client.files.with_raw_response.create(
        file=("batch.jsonl", io.BytesIO(content)), purpose="batch"
    )
    created = raw.parse()
    _assert_provider_key(_seen(upstream, raw.http_response))
    assert created.bytes == len(content) and created.filename == "batch.jsonl"
    assert created.id in [f.id for f in client.files.list(purpose="batch")]
    assert client.files.retrieve(created.id).purpose == "batch"
    assert client.files.content(created.id).content == content
    assert client.files.delete(created.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)


def test_a_file_content_is_relayed_as_it_comes(proxy):
    """A stateful GET's answer is streamed, not held whole: a file's content
    comes back byte for byte, without a Content-Length the gateway would have had to buffer
    the whole answer to know."""
    client = sdk_client(proxy.url, KEY)
    content = bytes(range(256)) * 800  # every byte value, under this proxy's MAX_REQUEST_SIZE
    created = client.files.create(file=("big.bin", io.BytesIO(content)), purpose="batch")
    raw = client.files.with_raw_response.content(created.id)
    assert raw.http_response.headers.get("transfer-encoding") == "chunked"
    assert raw.content == content
    client.files.delete(created.id)


def test_batches_create_retrieve_cancel(proxy):
    client = sdk_client(proxy.url, KEY)
    batch = client.batches.create(
        input_file_id="file-1", endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert client.batches.retrieve(batch.id).status == "validating"
    assert batch.id in [b.id for b in client.batches.list()]
    assert client.batches.cancel(batch.id).status == "cancelling"


def test_responses_retrieve_delete(proxy, upstream):
    client = sdk_client(proxy.url, KEY)
    stored = client.responses.retrieve("resp_abc123")
    assert stored.id == "resp_abc123" and stored.output_text == "Stored answer."
    client.responses.delete("resp_abc123")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_missing")


def test_stateful_404_without_provider(plain):
    headers = {"authorization": f"Bearer {KEY}"}
    calls = [("GET", "/v1/files"), ("POST", "/v1/batches"), ("GET", "/v1/responses/resp_1"),
             ("DELETE", "/v1/files/file-1")]  # fmt: skip
    for method, path in calls:
        response = httpx.request(method, plain.url + path, headers=headers, timeout=10)
        error = assert_envelope(response, 404, "stateful_provider_not_configured")
        assert "stateful_provider" in error["message"]


def test_unauthenticated_401(proxy):
    for method, path in [("GET", "/v1/files"), ("POST", "/v1/audio/speech"),
                         ("GET", "/v1/batches/batch_1")]:  # fmt: skip
        assert_envelope(httpx.request(method, proxy.url + path, timeout=10), 401)


@pytest.mark.parametrize(
    "path",
    ["/v1/files/.x", "/v1/files/a%24b/content", "/v1/batches/.x", "/v1/responses/" + "r" * 200],
)
def test_bad_path_parameter_400(proxy, path):
    response = httpx.get(proxy.url + path, headers={"authorization": f"Bearer {KEY}"}, timeout=10)
    assert_envelope(response, 400)


def test_multipart_over_limit_413(proxy):
    files = {"file": ("big.wav", b"\x00" * (MAX_REQUEST + 1), "audio/wav")}
    for path in ("/v1/audio/transcriptions", "/v1/files"):
        response = httpx.post(
            proxy.url + path, headers={"authorization": f"Bearer {KEY}"},
            files=files, data={"model": "whisper-1", "purpose": "batch"}, timeout=10,
        )  # fmt: skip
        assert_envelope(response, 413)


def test_transcription_without_model_400(proxy):
    response = httpx.post(
        proxy.url + "/v1/audio/transcriptions", headers={"authorization": f"Bearer {KEY}"},
        files={"file": ("a.wav", AUDIO, "audio/wav")}, timeout=10,
    )  # fmt: skip
    assert assert_envelope(response, 400)["param"] == "model"
