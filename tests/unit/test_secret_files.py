"""UPSTREAM_API_KEY_FILE, and systemd credentials ($CREDENTIALS_DIRECTORY) for the upstream
key and the keys file: they work, and errors name the variable, never the secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.auth import KeyStore
from edge.config import Config, ConfigError

CANARY = "sk-canary-7f3a9c1e5b"
KEYS_TOML = '[[keys]]\nname = "team"\nkey = "sk-client-from-credential"\n'


def test_upstream_key_file_is_read_and_trimmed(tmp_path: Path):
    path = tmp_path / "upstream.key"
    path.write_text(f"  {CANARY}\n")
    config = Config.from_env({"UPSTREAM_API_KEY_FILE": str(path)})
    assert config.upstream_api_key == CANARY
    assert config.upstream_api_key_file == path
    assert CANARY not in repr(config)


def test_credentials_directory_supplies_both_by_well_known_names(tmp_path: Path):
    (tmp_path / "upstream-api-key").write_text(CANARY + "\n")
    (tmp_path / "api-keys.toml").write_text(KEYS_TOML)
    config = Config.from_env({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.upstream_api_key == CANARY
    assert config.api_keys_file == tmp_path / "api-keys.toml"
    keys = KeyStore.load(config)
    assert keys.lookup("sk-client-from-credential") is not None


def test_relative_file_names_resolve_in_the_credentials_directory(tmp_path: Path):
    (tmp_path / "up").write_text(CANARY)
    (tmp_path / "clients.toml").write_text(KEYS_TOML)
    config = Config.from_env(
        {
            "CREDENTIALS_DIRECTORY": str(tmp_path),
            "UPSTREAM_API_KEY_FILE": "up",
            "API_KEYS_FILE": "clients.toml",
        }
    )
    assert config.upstream_api_key == CANARY
    assert config.api_keys_file == tmp_path / "clients.toml"


def test_no_credentials_directory_no_key(tmp_path: Path):
    config = Config.from_env({})
    assert config.upstream_api_key is None and config.api_keys_file is None
    # A credentials directory without our credentials changes nothing.
    config = Config.from_env({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.upstream_api_key is None and config.api_keys_file is None


def test_an_empty_credential_means_no_upstream_key(tmp_path: Path):
    (tmp_path / "upstream-api-key").write_text("\n")
    assert Config.from_env({"CREDENTIALS_DIRECTORY": str(tmp_path)}).upstream_api_key is None


def write(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "key"
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "empty"),
        (b" \n\t\n", "empty"),
        (CANARY.encode() + b"\n" + CANARY.encode(), "one line"),
        (CANARY.encode() + b" trailing-part", "header"),
        (CANARY.encode() + b"\x00", "header"),
        (CANARY.encode() + b"\x7f", "header"),
        (CANARY.encode() + "é".encode(), "non-ASCII"),
        (CANARY.encode() * 5000, "larger than"),
    ],
)
def test_bad_key_files_name_the_variable_not_the_secret(tmp_path: Path, content, fragment):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"UPSTREAM_API_KEY_FILE": write(tmp_path, content)})
    message = str(caught.value)
    assert caught.value.variable == "UPSTREAM_API_KEY_FILE"
    assert fragment in message
    assert "sk-canary" not in message
    assert "\n" not in message


def test_missing_key_file(tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"UPSTREAM_API_KEY_FILE": str(tmp_path / "nope")})
    assert caught.value.variable == "UPSTREAM_API_KEY_FILE"
    assert "not a readable file" in str(caught.value)


def test_key_and_key_file_together_are_refused(tmp_path: Path):
    env = {"UPSTREAM_API_KEY": CANARY, "UPSTREAM_API_KEY_FILE": write(tmp_path, b"sk-other")}
    with pytest.raises(ConfigError) as caught:
        Config.from_env(env)
    assert caught.value.variable == "UPSTREAM_API_KEY_FILE"
    assert "not both" in str(caught.value)
    assert CANARY not in str(caught.value) and "sk-other" not in str(caught.value)
    (tmp_path / "upstream-api-key").write_text("sk-cred")
    with pytest.raises(ConfigError, match="not both"):
        Config.from_env({"UPSTREAM_API_KEY": CANARY, "CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_an_empty_credential_leaves_upstream_api_key_in_force(tmp_path: Path):
    """The shipped unit always loads the credential (an empty file for "none"): a key set in
    the environment must still work beside it."""
    (tmp_path / "upstream-api-key").write_text("\n")
    config = Config.from_env(
        {"UPSTREAM_API_KEY": "sk-from-env", "CREDENTIALS_DIRECTORY": str(tmp_path)}
    )
    assert config.upstream_api_key == "sk-from-env"
    assert config.upstream_api_key_file is None
