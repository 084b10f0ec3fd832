"""Settings of the Redis backend and the token limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import Config, ConfigError
from edge.server.master import redis_location


def test_defaults():
    config = Config.from_env({})
    assert config.rate_limit_backend == "shm"
    assert config.redis_url is None
    assert config.rate_limit_redis_timeout_s == 0.05
    assert config.redis_key_prefix == "llm-edge-proxy:"
    assert config.rate_limit_tpm == 0
    assert config.rate_limit_tpm_default_max_tokens == 1024


def test_redis_settings_are_parsed(tmp_path: Path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret-pass\n")
    config = Config.from_env(
        {
            "RATE_LIMIT_BACKEND": "redis",
            "REDIS_URL": "rediss://user@redis.example:6380/2",
            "REDIS_PASSWORD_FILE": str(secret),
            "RATE_LIMIT_REDIS_TIMEOUT_MS": "20",
            "REDIS_KEY_PREFIX": "edge-a:",
            "RATE_LIMIT_TPM": "30000",
            "RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS": "256",
        }
    )
    assert config.rate_limit_backend == "redis"
    assert config.redis_password == "s3cret-pass"
    assert config.rate_limit_redis_timeout_s == 0.02
    assert config.redis_key_prefix == "edge-a:"
    assert (config.rate_limit_tpm, config.rate_limit_tpm_default_max_tokens) == (30000, 256)
    # Neither password is in the repr (what a log line of the config would show).
    assert "s3cret" not in repr(config)
    with_password = Config.from_env({"REDIS_URL": "redis://:urlpass@h:1/0"})
    assert "urlpass" not in repr(with_password)
    assert redis_location(config.redis_url) == "rediss://redis.example:6380/2"
    assert Config.from_env({"REDIS_URL": "unix:///run/redis.sock"}).redis_url


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"RATE_LIMIT_BACKEND": "redis"}, "REDIS_URL"),
        ({"RATE_LIMIT_BACKEND": "memcached"}, "RATE_LIMIT_BACKEND"),
        ({"REDIS_URL": "http://secretpw@host:1"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://:pw@host:notaport"}, "REDIS_URL"),
        ({"REDIS_URL": "unix://"}, "REDIS_URL"),
        ({"REDIS_PASSWORD_FILE": "/nonexistent/pw"}, "REDIS_PASSWORD_FILE"),
        ({"REDIS_PASSWORD_FILE": __file__, "REDIS_URL": "redis://:pw@h:1"}, "REDIS_PASSWORD_FILE"),
        ({"RATE_LIMIT_REDIS_TIMEOUT_MS": "0"}, "RATE_LIMIT_REDIS_TIMEOUT_MS"),
        ({"REDIS_KEY_PREFIX": "has space"}, "REDIS_KEY_PREFIX"),
        ({"RATE_LIMIT_TPM": "-1"}, "RATE_LIMIT_TPM"),
        ({"RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS": "0"}, "RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS"),
    ],
)
def test_bad_values_name_the_variable_and_hide_secrets(env, variable):
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    assert info.value.variable == variable
    assert "secretpw" not in str(info.value) and ":pw@" not in str(info.value)


def test_keys_file_tpm(tmp_path: Path):
    from edge.auth import KeyStore

    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "a"\nkey = "sk-a"\ntpm = 5000\n')
    store = KeyStore.load(Config.from_env({"API_KEYS_FILE": str(path)}))
    assert store.lookup("sk-a").tpm == 5000
    path.write_text('[[keys]]\nname = "a"\nkey = "sk-a"\ntpm = -1\n')
    with pytest.raises(ConfigError, match="tpm"):
        KeyStore.load(Config.from_env({"API_KEYS_FILE": str(path)}))
