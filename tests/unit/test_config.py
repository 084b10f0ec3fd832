from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge.config import Config, ConfigError


def test_defaults_match_the_reference_crate():
    config = Config.from_env({})
    assert (config.host, config.port) == ("0.0.0.0", 8080)
    assert config.timeout_s == 30.0
    assert config.max_request_size == 10_485_760
    assert config.auth_enabled is True
    assert config.auth_health_check is False
    assert config.rate_limit_enabled is True
    assert config.rate_limit_rpm == 1000.0
    assert config.rate_limit_burst == 100
    assert config.log_level == "info"
    assert config.enable_tracing is True
    assert config.enable_metrics is True
    assert config.upstream_url is None


def test_values_are_parsed():
    config = Config.from_env(
        {
            "SERVER_ADDRESS": "[::1]:9000",
            "SERVER_TIMEOUT_SECONDS": "2.5",
            "AUTH_ENABLED": "FALSE",
            "API_KEYS": "a-key, b-key",
            "RATE_LIMIT_RPM": "60",
            "LOG_LEVEL": "DEBUG",
            "UPSTREAM_URL": "https://api.example.com/v1/",
            "WORKERS": "3",
            "PUBLIC_PATHS": "/v1/models, /status",
        }
    )
    assert (config.host, config.port, config.bind) == ("::1", 9000, "[::1]:9000")
    assert config.timeout_s == 2.5
    assert config.auth_enabled is False
    assert config.api_keys == ("a-key", "b-key")
    assert config.rate_limit_rpm == 60.0
    assert config.log_level == "debug"
    assert config.upstream_url == "https://api.example.com/v1"
    assert config.default_workers() == 3
    assert config.public_paths == ("/v1/models", "/status")


def test_worker_count_falls_back_to_web_concurrency_then_cpus():
    assert Config.from_env({"WEB_CONCURRENCY": "5"}).default_workers() == 5
    assert Config.from_env({"WORKERS": "2", "WEB_CONCURRENCY": "5"}).default_workers() == 2
    assert Config.from_env({}).default_workers() >= 1


def test_empty_value_counts_as_unset():
    assert Config.from_env({"RATE_LIMIT_RPM": "  "}).rate_limit_rpm == 1000.0


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("SERVER_ADDRESS", "8080", "HOST:PORT"),
        ("SERVER_ADDRESS", "0.0.0.0:http", "port"),
        ("SERVER_ADDRESS", "0.0.0.0:70000", "0-65535"),
        ("SERVER_ADDRESS", "example.com:80", "IP address"),
        ("SERVER_TIMEOUT_SECONDS", "soon", "number"),
        ("SERVER_TIMEOUT_SECONDS", "0", "at least"),
        ("SERVER_TIMEOUT_SECONDS", "nan", "finite"),
        ("MAX_REQUEST_SIZE", "10MB", "whole number"),
        ("AUTH_ENABLED", "maybe", "true or false"),
        ("RATE_LIMIT_BURST", "0", "at least 1"),
        ("RATE_LIMIT_BURST", "1.5", "whole number"),
        ("RATE_LIMIT_FAILURE_POLICY", "shrug", "allow, deny"),
        ("LOG_LEVEL", "verbose", "one of"),
        ("UPSTREAM_URL", "localhost:9000", "http"),
        ("UPSTREAM_URL", "http://user:pw@host/v1", "credentials"),
        ("UPSTREAM_URL", "http://host:99999/v1", "port"),
        ("API_KEY_HASHES", "abc", "SHA-256"),
        ("API_KEYS", "a,,b", "empty"),
        ("API_KEYS_FILE", "/nonexistent/keys.toml", "readable file"),
        ("PUBLIC_PATHS", "health", "start with"),
        ("INSTANCE_NAME", "a/b", "letters"),
        ("WORKERS", "many", "whole number"),
    ],
)
def test_malformed_values_name_the_variable(variable, value, fragment):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({variable: value})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_secrets_are_never_echoed_in_errors():
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"API_KEYS": "good-key,bad key with space"})
    assert "bad key" not in str(caught.value)
    assert "good-key" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"UPSTREAM_API_KEY": "sk-secret\x01"})
    assert "sk-secret" not in str(caught.value)


def test_keys_are_hidden_from_repr(tmp_path: Path):
    config = Config.from_env({"API_KEYS": "sk-very-secret", "UPSTREAM_API_KEY": "sk-upstream"})
    assert "sk-very-secret" not in repr(config)
    assert "sk-upstream" not in repr(config)


# ---- every setting defined once: the table drives from_env, the README and env.example ----

REPO = Path(__file__).resolve().parents[2]


def test_every_config_field_is_filled_by_exactly_one_setting():
    import dataclasses

    from edge.config import SETTINGS

    filled: list[str] = []
    for setting in SETTINGS:
        filled += list(setting.field) if isinstance(setting.field, tuple) else [setting.field]
    assert sorted(filled) == sorted(f.name for f in dataclasses.fields(Config))
    variables = [setting.variable for setting in SETTINGS]
    assert len(variables) == len(set(variables))


def test_defaults_obey_their_own_bounds():
    """Defaults go through the parsers: a default outside its bounds fails here."""
    from edge.config import SETTINGS

    for setting in SETTINGS:
        if setting.default is not None:
            setting.parse(setting.variable, setting.default)


def test_readme_table_is_generated_from_the_settings():
    from edge.config import markdown_table

    readme = (REPO / "README.md").read_text()
    assert markdown_table() in readme, "README's table drifted: `python -m edge.config` prints it"


def test_env_example_shows_the_defaults():
    """Every `#NAME=value` line of systemd/env.example shows the default of NAME."""
    from edge.config import SETTINGS

    defaults = {s.variable: s.default for s in SETTINGS}
    text = (REPO / "systemd" / "env.example").read_text()
    commented = dict(re.findall(r"^#([A-Z][A-Z0-9_]*)=(.*)$", text, re.MULTILINE))
    for name, value in commented.items():
        if defaults.get(name) is not None and value:
            assert value == defaults[name], f"env.example shows {name}={value}"


@pytest.mark.parametrize("value", ["+5", "1_000", "٣", "5.0", "0x10", "-", "--5"])
def test_whole_numbers_are_plain_ascii_digits(value):
    with pytest.raises(ConfigError):
        Config.from_env({"MAX_REQUEST_SIZE": value})


def test_config_is_the_only_reader_of_the_environment():
    """No module but edge/config.py reads an environment variable. The master hands os.environ
    to Config.from_env and writes PROMETHEUS_MULTIPROC_DIR into it (prometheus_client reads it
    there), nothing else."""
    package = REPO / "edge"
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        if path.name == "config.py" and path.parent == package:
            continue
        reads = re.findall(r"getenv|environ(?:\.get|\[[^\]]*\](?!\s*=))", text)
        assert not reads, f"{path.relative_to(REPO)} reads the environment: {reads}"
        if path.name != "master.py":
            assert not re.search(r"\benviron\b", text), path.relative_to(REPO)
