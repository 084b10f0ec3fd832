"""Key policies in the keys file (#25, first part): `models` (shell-style patterns) and
`expires_at`. Bad values are refused naming the key and the field; a pattern that matches no
configured model too; the patterns match as fnmatch does."""

from __future__ import annotations

import fnmatch
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.auth import KeyEntry, KeyStore, check_model, model_patterns
from edge.config import Config, ConfigError
from edge.errors import Forbidden


def load(tmp_path: Path, body: str) -> KeyStore:
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nname = "team"\nsha256 = "{"ab" * 32}"\n{body}\n')
    return KeyStore.load(Config.from_env({"API_KEYS_FILE": str(path)}))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("models = []", "models"),
        ('models = "gpt-*"', "models"),
        ("models = [1]", "models"),
        (f'models = ["{"x" * 257}"]', "models"),
        ("expires_at = 2027-01-01T00:00:00", "expires_at"),  # no offset: ambiguous
        ('expires_at = "2027-01-01"', "expires_at"),
        ("expires_at = 12:00:00", "expires_at"),
        ("budget = 5", "budget"),  # unknown field
    ],
)
def test_a_bad_value_is_refused_naming_the_key_and_field(tmp_path, body, field):
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, body)
    assert "team" in str(refused.value) and field in str(refused.value)


def test_expiry_as_a_date_time_or_a_date(tmp_path):
    ((_, entry),) = load(tmp_path, "expires_at = 2027-01-01T01:00:00+01:00")._entries.values()
    assert entry.expires_at == 1798761600.0  # 2027-01-01T00:00:00Z
    assert entry.expired(1798761600.0) and not entry.expired(1798761599.9)
    ((_, entry),) = load(tmp_path, "expires_at = 2027-01-01")._entries.values()
    assert entry.expires_at == 1798761600.0
    ((_, entry),) = load(tmp_path, "")._entries.values()
    assert not entry.expired(time.time() + 1e9)


def test_a_pattern_that_matches_no_served_model_is_refused(tmp_path):
    store = load(tmp_path, 'models = ["gpt-*", "claude-3-*"]')
    store.check_models(["gpt-4o", "claude-3-haiku"])
    store.check_models(None)  # any name may be served: nothing to check
    with pytest.raises(ConfigError) as refused:
        store.check_models(["gpt-4o"])
    assert "claude-3-*" in str(refused.value) and "team" in str(refused.value)


def test_a_model_outside_the_list_is_403_naming_it():
    entry = KeyEntry("team", models=("gpt-*",), allowed=model_patterns(("gpt-*",)))
    check_model(entry, "gpt-4o")
    check_model(KeyEntry("open"), "anything")
    with pytest.raises(Forbidden) as refused:
        check_model(entry, "claude-x")
    assert refused.value.status == 403 and refused.value.code == "model_not_allowed"
    assert "claude-x" in refused.value.message and refused.value.param == "model"


names = st.text(alphabet="abcxyz-.*?[]!0", min_size=1, max_size=12)


@given(st.lists(names, min_size=1, max_size=4), st.text(alphabet="abcxyz-.0", max_size=12))
def test_the_patterns_match_as_fnmatch_does(patterns, model):
    compiled = model_patterns(tuple(patterns))
    expected = any(fnmatch.fnmatchcase(model, p) for p in patterns)
    assert (compiled.match(model) is not None) == expected
