"""Key policies end to end (#25, first part): a key's `models` patterns and its `expires_at`,
on real gunicorn (2 workers), a real upstream, the openai and anthropic SDKs. An expired key is
refused exactly as an unknown one (no oracle); a model outside the list is 403
`model_not_allowed` in the route's shape and missing from the key's /v1/models; a keys file
with a bad policy stops the start, and on HUP is refused while the running keys stay."""

from __future__ import annotations

import signal
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from support import Gunicorn, Upstream, sdk_client, wait_until

LIMITED = "sk-policy-limited-3c9a"
EXPIRED = "sk-policy-expired-81fe"
LATER = "sk-policy-later-0d2b"
UNKNOWN = "sk-policy-unknown-77aa"
KEYS = f"""
[[keys]]
name = "limited"
key = "{LIMITED}"
models = ["gpt-*", "claude-x"]

[[keys]]
name = "expired"
key = "{EXPIRED}"
expires_at = 2020-01-01T00:00:00Z

[[keys]]
name = "later"
key = "{LATER}"
expires_at = 2999-01-01
"""


@pytest.fixture(scope="module")
def upstream():
    server = Upstream()
    yield server
    server.stop()


def providers_file(directory: Path, upstream: Upstream) -> Path:
    path = directory / "providers.toml"
    path.write_text(
        f'[providers.up]\nbase_url = "{upstream.url}/v1"\n'
        f'[providers.claude]\nkind = "anthropic"\nbase_url = "{upstream.url}/v1"\n'
        'api_key = "sk-ant"\n'
        + "".join(
            f'[[models]]\nname = "{name}"\ntargets = [{{ provider = "up" }}]\n'
            for name in ("gpt-a", "gpt-b", "other")
        )
        + '[[models]]\nname = "claude-x"\ntargets = [{ provider = "claude" }]\n'
        + '[routing]\nstateful_provider = "up"\n'
    )
    return path


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, upstream):
    directory = tmp_path_factory.mktemp("policies")
    keys = directory / "keys.toml"
    keys.write_text(KEYS)
    server = Gunicorn(
        API_KEYS_FILE=str(keys), PROVIDERS_FILE=str(providers_file(directory, upstream))
    )
    server.keys_path = keys  # type: ignore[attr-defined]
    yield server
    server.stop()


def chat(server: Gunicorn, key: str, model: str) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )


def test_a_model_outside_the_keys_list_is_403_in_the_routes_shape(proxy):
    client = sdk_client(proxy.url, LIMITED)
    assert client.chat.completions.create(
        model="gpt-a", messages=[{"role": "user", "content": "hi"}]
    ).choices
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    assert refused.value.code == "model_not_allowed" and "'other'" in refused.value.message
    claude = anthropic.Anthropic(base_url=proxy.url, api_key=LIMITED, max_retries=0)
    assert claude.messages.create(
        model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    ).content
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        claude.messages.create(
            model="other", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert denied.value.body["error"]["type"] == "permission_error"


def test_the_model_list_shows_only_what_the_key_may_use(proxy):
    listed = sorted(model.id for model in sdk_client(proxy.url, LIMITED).models.list())
    assert listed == ["claude-x", "gpt-a", "gpt-b"]
    everything = sorted(model.id for model in sdk_client(proxy.url, LATER).models.list())
    assert everything == ["claude-x", "gpt-a", "gpt-b", "other"]
    with pytest.raises(openai.PermissionDeniedError):
        sdk_client(proxy.url, LIMITED).models.retrieve("other")


def test_a_key_limited_to_some_models_may_not_create_batches(proxy):
    """A batch runs whatever models its file names, past the gateway's check."""
    with pytest.raises(openai.PermissionDeniedError) as refused:
        sdk_client(proxy.url, LIMITED).batches.create(
            input_file_id="file-1", endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert refused.value.code == "model_not_allowed"
    batch = sdk_client(proxy.url, LATER).batches.create(
        input_file_id="file-1", endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.id


def test_an_expired_key_is_refused_as_an_unknown_one(proxy):
    expired, unknown = chat(proxy, EXPIRED, "gpt-a"), chat(proxy, UNKNOWN, "gpt-a")
    assert expired.status_code == unknown.status_code == 401
    assert expired.json() == unknown.json()
    assert expired.headers["www-authenticate"] == unknown.headers["www-authenticate"]
    assert chat(proxy, LATER, "gpt-a").status_code == 200
    metrics = httpx.get(proxy.url + "/metrics", timeout=10).text
    assert 'edge_auth_failures_total{reason="expired"}' in metrics


@pytest.mark.parametrize(
    ("policy", "named"),
    [
        ('models = ["mistral-*"]', "mistral-*"),  # matches no configured model
        ("expires_at = 2027-01-01T00:00:00", "expires_at"),  # no UTC offset
    ],
)
def test_a_bad_policy_stops_the_start_naming_key_and_field(tmp_path, upstream, policy, named):
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "team"\nkey = "{LIMITED}"\n{policy}\n')
    server = Gunicorn(
        wait=False,
        API_KEYS_FILE=str(keys),
        PROVIDERS_FILE=str(providers_file(tmp_path, upstream)),
    )
    try:
        assert server.proc.wait(30) != 0
        output = server.output()
        assert "team" in output and named in output and LIMITED not in output
    finally:
        server.stop()


def test_a_bad_policy_on_hup_keeps_the_running_keys(proxy):
    keys: Path = proxy.keys_path  # type: ignore[attr-defined]
    good = keys.read_text()
    try:
        keys.write_text(good.replace('"claude-x"]', '"claude-x", "nothing-*"]'))
        proxy.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in proxy.output())
        assert chat(proxy, LIMITED, "gpt-b").status_code == 200
        assert chat(proxy, LIMITED, "other").status_code == 403
    finally:
        keys.write_text(good)
