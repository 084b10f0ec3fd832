"""The keys file (API_KEYS_FILE) under edits: a file caught mid-write is refused, not half
applied; every load says how many keys are in force and a reload what it added, removed or
changed; a plaintext key others may read is warned about. Never a key in any of it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge import config as config_module
from edge.auth import KeyStore
from edge.config import Config, ConfigError, read_toml
from edge.routing.providers import load_file
from edge.server import master

SECRET = "sk-keysfile-canary-5d1e"
DIGEST = "ab" * 32


def entry(name: str, key: str | None = None, **limits: int) -> str:
    value = f'key = "{key}"' if key else f'sha256 = "{DIGEST}"'
    extra = "".join(f"{field} = {number}\n" for field, number in limits.items())
    return f'[[keys]]\nname = "{name}"\n{value}\n{extra}'


def load(path: Path) -> KeyStore:
    return KeyStore.load(Config.from_env({"API_KEYS_FILE": str(path)}))


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(entry("team", SECRET))
    path.chmod(0o600)
    return path


def test_a_complete_file_loads(keys_file: Path) -> None:
    store = load(keys_file)
    assert len(store) == 1 and store.lookup(SECRET) is not None
    assert store.warnings == ()


@pytest.mark.parametrize(
    "text, problem",
    [
        (entry("team", SECRET) + entry("other", "sk-other").rstrip("\n"), "newline"),
        # Cut short inside a value: still valid TOML up to there would drop the rest.
        (entry("team", SECRET) + '[[keys]]\nname = "oth', "newline"),
        ("", "is empty"),
    ],
)
def test_a_file_cut_short_is_refused(keys_file: Path, text: str, problem: str) -> None:
    keys_file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(keys_file)
    assert info.value.variable == "API_KEYS_FILE"
    assert problem in str(info.value) and "renaming" in str(info.value)
    assert SECRET not in str(info.value)


def test_a_comment_line_is_a_complete_empty_file(keys_file: Path) -> None:
    keys_file.write_text("# no keys from this file for now\n")
    assert len(KeyStore.load(Config.from_env({"API_KEYS_FILE": str(keys_file), "API_KEYS": "k"})))


def test_a_file_written_while_it_is_read_is_refused(
    keys_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer appends between the reader's first look at the file and its read: the read
    sees more than the first look, or less; either way nothing is taken from it."""
    real_fstat = os.fstat
    calls = 0

    def fstat_then_write(fd: int) -> os.stat_result:
        nonlocal calls
        calls += 1
        info = real_fstat(fd)
        if calls == 1:
            with keys_file.open("a") as writer:
                writer.write(entry("late", "sk-late"))
        return info

    monkeypatch.setattr(config_module.os, "fstat", fstat_then_write)
    with pytest.raises(ConfigError, match="changed while it was read") as info:
        load(keys_file)
    assert info.value.variable == "API_KEYS_FILE"
    assert SECRET not in str(info.value)


def test_the_providers_file_gets_the_same_checks(tmp_path: Path) -> None:
    path = tmp_path / "providers.toml"
    path.write_text('[providers.a]\nbase_url = "http://127.0.0.1:9/v1"')
    with pytest.raises(ConfigError, match="does not end with a newline") as info:
        load_file(path)
    assert info.value.variable == "PROVIDERS_FILE"
    path.write_text(path.read_text() + "\n")
    document, status = read_toml("PROVIDERS_FILE", path)
    assert document["providers"]["a"]["base_url"] == "http://127.0.0.1:9/v1"
    assert status.st_size == path.stat().st_size


@pytest.mark.parametrize(
    "mode, readers", [(0o640, "group"), (0o604, "others"), (0o644, "group and others")]
)
def test_plaintext_keys_others_may_read_are_warned_about(
    keys_file: Path, mode: int, readers: str
) -> None:
    keys_file.write_text(entry("team", SECRET) + entry("hashed"))
    keys_file.chmod(mode)
    (warning,) = load(keys_file).warnings
    assert str(keys_file) in warning and f"mode {mode:04o}" in warning
    assert f"readable by {readers} " in warning and "1 of its 2 keys" in warning
    assert SECRET not in warning and DIGEST not in warning


def test_no_warning_for_digests_only_or_a_private_file(keys_file: Path) -> None:
    keys_file.chmod(0o400)
    assert load(keys_file).warnings == ()
    keys_file.write_text(entry("hashed"))
    keys_file.chmod(0o644)
    assert load(keys_file).warnings == ()


def test_no_warning_for_a_systemd_credential(tmp_path: Path) -> None:
    """systemd lets only the service's user read a credential; with an ACL granting it, the
    group bits show the ACL's mask (0440), which is no exposure."""
    credential = tmp_path / "api-keys.toml"
    credential.write_text(entry("team", SECRET))
    credential.chmod(0o440)
    config = Config.from_env({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.api_keys_file == credential
    assert KeyStore.load(config).warnings == ()


def test_changes_are_by_identity(keys_file: Path) -> None:
    keys_file.write_text(entry("stays", "sk-1") + entry("rotated", "sk-2") + entry("gone", "sk-3"))
    before = load(keys_file)
    keys_file.write_text(entry("stays", "sk-1") + entry("rotated", "sk-2b") + entry("new", "sk-4"))
    after = load(keys_file)
    assert after.changes(before) == {"added": ["new"], "removed": ["gone"], "changed": ["rotated"]}
    keys_file.write_text(
        entry("stays", "sk-1", rpm=5) + entry("rotated", "sk-2b") + entry("new", "sk-4")
    )
    assert load(keys_file).changes(after) == {"added": [], "removed": [], "changed": ["stays"]}
    assert after.changes(after) == {"added": [], "removed": [], "changed": []}


# ------------------------------------------------------------------ the master's log lines


@pytest.fixture
def fresh_master(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """master.load() as a new master would run it, its module state restored afterwards."""
    monkeypatch.setattr(master, "_current", None)
    yield


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "edge.server"]


def test_every_load_logs_the_count_and_a_reload_its_changes(
    keys_file: Path, tmp_path: Path, fresh_master: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge.server")
    keys_file.write_text(entry("a", SECRET) + entry("b") + entry("c", "sk-c"))
    keys_file.chmod(0o640)
    environ = {
        "API_KEYS_FILE": str(keys_file),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "RATE_LIMIT_ENABLED": "false",
    }
    settings = master.load(environ)
    master._log_keys(settings.keys, None)  # what on_starting does, once logging is set up
    (loaded, warned) = lines(caplog)
    assert (loaded.levelno, loaded.getMessage(), loaded.keys) == (
        logging.INFO,
        "API keys loaded",
        3,
    )
    assert warned.levelno == logging.WARNING and "mode 0640" in warned.getMessage()
    caplog.clear()

    # A reload that loses two keys (a shorter file that is still complete and valid).
    keys_file.write_text(entry("a", SECRET) + entry("d", "sk-d"))
    master.load(environ)
    reloaded = lines(caplog)[0]
    assert reloaded.levelno == logging.INFO
    assert reloaded.getMessage() == "API keys reloaded: 1 added, 2 removed, 0 changed"
    assert (reloaded.keys, reloaded.added, reloaded.removed) == (2, ["d"], ["b", "c"])
    assert reloaded.changed == []
    caplog.clear()

    # Cut short by a write in progress: refused, the running keys stay.
    running = master.current().keys
    keys_file.write_text(entry("a", SECRET)[:-3])
    assert master.load(environ).keys is running
    (refused,) = lines(caplog)
    assert refused.levelno == logging.ERROR and "newline" in refused.error
    for record in caplog.records:
        assert SECRET not in record.getMessage() and SECRET not in str(record.__dict__)
