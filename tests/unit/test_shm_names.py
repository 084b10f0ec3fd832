"""Shared-memory table names: unpredictable, and an object the service may not remove (another
user's) never stops the start with a traceback."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import pytest

from edge import shm as shm_module
from edge.ratelimit import SharedTable
from edge.server import master
from edge.shm import remove_stale
from edge.shm import segment_name as table_name

SHM = Path("/dev/shm")


@pytest.fixture
def planted() -> Iterator[list[str]]:
    """Names of objects planted by a test, unlinked afterwards whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory("/" + name)


def plant(names: list[str], name: str) -> None:
    posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, 0o644, 4096).close_fd()
    names.append(name)


def cannot_unlink(monkeypatch: pytest.MonkeyPatch) -> None:
    """What unlinking another user's object in the sticky /dev/shm does."""

    def refuse(path: str) -> None:
        raise posix_ipc.PermissionsError("Permission denied")

    monkeypatch.setattr(shm_module.posix_ipc, "unlink_shared_memory", refuse)


def test_names_are_unpredictable():
    names = {table_name("llm-edge-proxy.x", 1234) for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert re.fullmatch(r"llm-edge-proxy\.x\.1234\.[0-9a-f]{16}", name)


def test_an_object_this_user_cannot_remove_is_a_clear_error(planted, monkeypatch):
    name = f"llm-edge-proxy-test.{uuid.uuid4().hex[:12]}.1"
    plant(planted, name)
    cannot_unlink(monkeypatch)
    with pytest.raises(FileExistsError, match="taken by an object this user cannot remove"):
        SharedTable.create(name, slots=16)


def test_remove_stale_skips_objects_it_cannot_remove(planted, monkeypatch, caplog):
    prefix = f"llm-edge-proxy-test.{uuid.uuid4().hex[:12]}"
    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    plant(planted, f"{prefix}.{dead_pid}")
    plant(planted, f"{prefix}.{dead_pid}.0123456789abcdef")
    cannot_unlink(monkeypatch)
    assert remove_stale(prefix) == []
    assert (SHM / f"{prefix}.{dead_pid}").exists()
    assert "cannot be removed" in caplog.text


def test_remove_stale_removes_dead_masters_tables_of_both_name_forms(planted):
    prefix = f"llm-edge-proxy-test.{uuid.uuid4().hex[:12]}"
    dead_pid = 2**22 + 12345
    old, new = f"{prefix}.{dead_pid}", table_name(prefix, dead_pid)
    plant(planted, old)
    plant(planted, new)
    assert sorted(remove_stale(prefix)) == sorted([old, new])


def test_master_starts_when_its_table_name_is_taken_by_an_unremovable_object(
    planted, monkeypatch, tmp_path
):
    monkeypatch.setattr(master, "_current", None)
    monkeypatch.setattr(master, "_segments", [])
    env = {"AUTH_ENABLED": "false", "INSTANCE_NAME": f"test{uuid.uuid4().hex[:8]}"}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    settings = master.load(env)
    taken = settings.table_name
    plant(planted, taken)  # as if planted by someone who guessed the name
    real_unlink = posix_ipc.unlink_shared_memory

    def refuse_taken(path: str) -> None:
        if path == "/" + taken:
            raise posix_ipc.PermissionsError("Permission denied")
        real_unlink(path)

    monkeypatch.setattr(shm_module.posix_ipc, "unlink_shared_memory", refuse_taken)
    server = types.SimpleNamespace(cfg=types.SimpleNamespace())
    try:
        master.on_starting(server)
        chosen = master.current().table_name
        assert chosen != taken
        assert chosen.startswith(f"llm-edge-proxy.{env['INSTANCE_NAME']}.{os.getpid()}.")
        assert (SHM / chosen).exists()
        attached = SharedTable.attach(chosen)  # what a worker does with the settings' name
        attached.close()
    finally:
        master.on_exit(server)
        monkeypatch.setattr(master, "_current", None)
    assert not (SHM / chosen).exists()


REAL_OTHER_USER = """
import sys
from edge.ratelimit import SharedTable
from edge.shm import remove_stale
try:
    SharedTable.create(sys.argv[1], slots=16)
except FileExistsError as exc:
    print("refused:", exc)
print("stale:", remove_stale(sys.argv[2]))
"""


def test_object_planted_by_another_user_for_real(planted):
    """As root: plant an object as root, then run as `nobody`, who may not remove it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    prefix = f"llm-edge-proxy-test.{uuid.uuid4().hex[:12]}"
    name = f"{prefix}.{2**22 + 12345}"
    plant(planted, name)

    def as_nobody() -> None:
        os.setgid(65534)
        os.setuid(65534)

    try:
        result = subprocess.run(
            [sys.executable, "-c", REAL_OTHER_USER, name, prefix],
            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=30,
            preexec_fn=as_nobody, check=False,
        )  # fmt: skip
    except PermissionError as exc:
        pytest.skip(f"this Python is not usable by nobody: {exc}")
    if result.returncode != 0 and "Permission denied" in result.stderr and "edge" in result.stderr:
        pytest.skip(f"the checkout or virtualenv is not readable by nobody: {result.stderr}")
    assert result.returncode == 0, result.stderr
    assert "refused: shared-memory name" in result.stdout
    assert "stale: []" in result.stdout
    assert "Traceback" not in result.stderr
