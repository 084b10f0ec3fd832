"""The bucket table in POSIX shared memory, serialised by a lock the kernel releases on death.

Lifecycle: the gunicorn master calls ``SharedTable.create`` before forking (and may
``close()`` its own mapping straight away), each worker calls ``SharedTable.attach``
after fork, and the master calls ``unlink()`` on exit.

Why ``flock`` on a descriptor each worker opens itself: the lock belongs to the open
file description, so the kernel drops it when the holder dies, SIGKILL and SIGABRT
included (a POSIX semaphore has no owner and would stay taken forever). A descriptor
inherited across fork shares its open file description with the parent, and then two
processes could both "hold" the lock; that is why ``attach`` opens the object anew, and
why a SharedTable refuses to lock in a process other than the one that opened it.
``flock`` measured about half the cost of an OFD ``fcntl`` lock from Python.

The lock is only ever held for one synchronous ``Table.decide`` (a few µs), never across
an ``await``. Taking it is bounded: non-blocking attempts, yielding the CPU between them,
until ``lock_timeout_s`` has passed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import re
import secrets
import time
from collections.abc import Callable

import posix_ipc

from edge.ratelimit.base import (
    ALLOW,
    LOCK_TIMEOUT,
    TABLE_FULL,
    Decision,
    DigestCache,
    check_policy,
    failure_decision,
)
from edge.ratelimit.table import (
    DEFAULT_PROBE_WINDOW,
    HEADER_SIZE,
    Table,
    TableFormatError,
    format_buffer,
    size_for,
)

DEFAULT_LOCK_TIMEOUT_S = 0.05
LOCK_COOLOFF_S = 1.0  # after a lock timeout, only non-blocking tries for this long
SHM_DIR = "/dev/shm"
_MODE = 0o600
_LOCK = fcntl.LOCK_EX | fcntl.LOCK_NB
_YIELD_ATTEMPTS = 32  # then back off with short sleeps: the holder may be descheduled
_BACKOFF_S = 50e-6


log = logging.getLogger("edge.ratelimit")


def table_name(prefix: str, pid: int, token: str | None = None) -> str:
    """The shared-memory name for the table of the master with ``pid``: ``<prefix>.<pid>.<token>``.

    The random token makes the name unpredictable, so another local user cannot plant an
    object under it beforehand (in the sticky /dev/shm we could not remove theirs). The master
    chooses it once and workers learn it from the settings they inherit.
    """
    return f"{prefix}.{pid}.{secrets.token_hex(8) if token is None else token}"


class SharedTable:
    """A process's own attachment to the shared table: descriptor, mapping and lock."""

    __slots__ = ("_fd", "_mm", "_pid", "_shm", "name", "table")

    def __init__(self, name: str, shm: posix_ipc.SharedMemory, mm: mmap.mmap, table: Table) -> None:
        self.name = name
        self.table = table
        self._shm = shm
        self._mm = mm
        self._fd = shm.fd
        self._pid = os.getpid()

    @classmethod
    def create(
        cls,
        name: str,
        slots: int,
        *,
        probe_window: int = DEFAULT_PROBE_WINDOW,
        uid: int | None = None,
        gid: int | None = None,
    ) -> SharedTable:
        """Create and format the object (mode 0600), replacing a stale one of the same name.

        An existing object of the same name is removed and replaced; one this user may not
        remove (another user's) raises FileExistsError: choose another name (see
        ``table_name``). ``uid``/``gid`` hand the object to the user the workers run as when
        the master runs as root.
        """
        path = _posix_name(name)
        size = size_for(slots)
        try:
            shm = posix_ipc.SharedMemory(path, posix_ipc.O_CREX, _MODE, size)
        except posix_ipc.ExistentialError:
            try:
                _unlink(path)
                shm = posix_ipc.SharedMemory(path, posix_ipc.O_CREX, _MODE, size)
            except (posix_ipc.PermissionsError, posix_ipc.ExistentialError):
                raise FileExistsError(
                    f"shared-memory name {name!r} is taken by an object this user cannot remove"
                ) from None
        mm = None
        try:
            os.fchmod(shm.fd, _MODE)  # exactly 0600 whatever the umask
            if uid is not None or gid is not None:
                os.fchown(shm.fd, -1 if uid is None else uid, -1 if gid is None else gid)
            mm = mmap.mmap(shm.fd, size)
            format_buffer(mm, slots, probe_window)
            return cls(path.lstrip("/"), shm, mm, Table(mm))
        except BaseException:
            if mm is not None:
                mm.close()
            shm.close_fd()
            _unlink(path)
            raise

    @classmethod
    def attach(cls, name: str) -> SharedTable:
        """Open the existing table with this process's own descriptor and map it."""
        path = _posix_name(name)
        try:
            shm = posix_ipc.SharedMemory(path)
        except posix_ipc.ExistentialError as exc:
            raise FileNotFoundError(
                f"rate-limit table {name!r} does not exist (create it in the master)"
            ) from exc
        except posix_ipc.PermissionsError as exc:
            raise PermissionError(f"no permission to open rate-limit table {name!r}") from exc
        try:
            if shm.size < HEADER_SIZE:
                raise TableFormatError(
                    f"shared memory {name!r} ({shm.size} bytes) is not a rate-limit table"
                )
            mm = mmap.mmap(shm.fd, shm.size)
            try:
                return cls(path.lstrip("/"), shm, mm, Table(mm))
            except BaseException:
                mm.close()
                raise
        except BaseException:
            shm.close_fd()
            raise

    def acquire(self, timeout_s: float) -> bool:
        """Take the lock, giving up after ``timeout_s``. Never blocks in the kernel."""
        if os.getpid() != self._pid:
            raise RuntimeError(
                "SharedTable used in a forked child: call SharedTable.attach() in each worker"
            )
        try:
            fcntl.flock(self._fd, _LOCK)
            return True
        except BlockingIOError:
            return self._acquire_contended(timeout_s)

    def _acquire_contended(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        attempts = 0
        while True:
            if attempts < _YIELD_ATTEMPTS:
                os.sched_yield()
            else:
                time.sleep(_BACKOFF_S)
            attempts += 1
            try:
                fcntl.flock(self._fd, _LOCK)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Drop this process's mapping and descriptor (releasing the lock if held)."""
        if self._fd < 0:
            return
        self.table.close()
        self._mm.close()
        self._shm.close_fd()
        self._fd = -1

    def unlink(self) -> None:
        """Remove the name (the master, on exit). Existing attachments stay valid."""
        _unlink(_posix_name(self.name))


class ShmRateLimiter:
    """RateLimiter over a SharedTable attached in this process."""

    asynchronous = False  # decisions are plain calls (see RateLimiter)

    __slots__ = (
        "_clock",
        "_cooloff_until",
        "_digest",
        "_lock_timeout_s",
        "_policy",
        "_shared",
        "_table",
    )

    def __init__(
        self,
        table: SharedTable,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        failure_policy: str = ALLOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_policy(failure_policy)
        if not 0.0 <= lock_timeout_s < 60.0:
            raise ValueError(f"lock_timeout_s must be in [0, 60), got {lock_timeout_s!r}")
        self._shared = table
        self._table = table.table
        self._lock_timeout_s = lock_timeout_s
        self._policy = failure_policy
        self._clock = clock
        self._digest = DigestCache()
        self._cooloff_until = 0.0

    def check(self, identity: bytes, rpm: float, burst: int, cost: int = 1) -> Decision:
        digest = self._digest(identity)
        shared = self._shared
        # After a timeout, wait no more for a while: a holder that hangs (stopped, not dead)
        # must not stall this worker's event loop for the full timeout on every request. One
        # non-blocking try is still made, so a freed lock is used again at once.
        cooling = self._cooloff_until and self._clock() < self._cooloff_until
        if not shared.acquire(0.0 if cooling else self._lock_timeout_s):
            if not cooling:
                self._cooloff_until = self._clock() + LOCK_COOLOFF_S
            return failure_decision(LOCK_TIMEOUT, self._policy, burst)
        self._cooloff_until = 0.0
        try:
            # Read the clock under the lock so writes to a slot carry non-decreasing times.
            decision = self._table.decide(digest, self._clock(), rpm / 60.0, burst, cost)
        finally:
            shared.release()
        if decision is None:
            return failure_decision(TABLE_FULL, self._policy, burst)
        return decision

    def adjust(self, identity: bytes, rpm: float, burst: int, refund: float) -> None:
        """Settle a reservation: give back ``refund`` tokens (take when negative). Best
        effort: when the lock cannot be had at once the correction is dropped."""
        shared = self._shared
        if not shared.acquire(0.0 if self._cooloff_until else self._lock_timeout_s):
            return
        try:
            self._table.adjust(self._digest(identity), self._clock(), rpm / 60.0, burst, refund)
        finally:
            shared.release()

    def close(self) -> None:
        self._shared.close()


def remove_stale(prefix: str, shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink ``<prefix>.<pid>[.<token>]`` objects whose pid is not a live process; return
    their names. One this user may not remove (another user's) is logged and left alone: it
    cannot collide with our unpredictable names.

    Assumes the masters share our pid namespace (true for one host under systemd).
    """
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)(?:\.[0-9a-f]+)?")
    removed = []
    for entry in sorted(os.listdir(shm_dir)):
        match = pattern.fullmatch(entry)
        if match and not pid_alive(int(match[1])):
            try:
                _unlink("/" + entry)
            except posix_ipc.PermissionsError:
                log.warning(
                    "a stale shared-memory object of this instance cannot be removed "
                    "(another user's?); leaving it",
                    extra={"object": entry},
                )
                continue
            removed.append(entry)
    return removed


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # kill(0, ...) would address our process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _posix_name(name: str) -> str:
    bare = name[1:] if name.startswith("/") else name
    if not bare or "/" in bare or bare in (".", ".."):
        raise ValueError(f"invalid shared-memory name {name!r}")
    return "/" + bare


def _unlink(path: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):  # already gone: fine
        posix_ipc.unlink_shared_memory(path)
