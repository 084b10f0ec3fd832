"""Host-wide shared memory: the segments every worker maps, their kernel-released lock, and
where a key's slot is. The rate-limit table (edge.ratelimit.shm), the breaker table
(edge.routing.breaker), the cache's fills in flight (edge.cache.flights) and each key's requests
in flight (edge.ratelimit.parallel) are each a `Segment` with a layout of their own; budgets are
meant to be the next.

Theory of operation
-------------------
Lifecycle: the gunicorn master calls `Segment.create` before forking (and may `close()` its
own mapping straight away), each worker calls `Segment.attach` after fork, and the master calls
`unlink()` on exit. Names are `<prefix>.<master pid>.<random token>` (`segment_name`): the
token makes them unpredictable, so another local user cannot plant an object under one
beforehand (in the sticky /dev/shm we could not remove theirs); objects are created mode 0600;
objects of the same prefix whose master is gone are removed at the next start (`remove_stale`).

The lock is `flock` on a descriptor each process opens itself. It belongs to the open file
description, so the kernel drops it when the holder dies, SIGKILL and SIGABRT included (a
POSIX semaphore has no owner and would stay taken for ever). A descriptor inherited across
fork shares its open file description with the parent, and then two processes could both
"hold" the lock: that is why `attach` opens the object anew, and why a Segment refuses to lock
in a process other than the one that opened it. `flock` measured about half the cost of an OFD
`fcntl` lock from Python. The lock is only ever held for one synchronous read-modify-write of a
few µs, never across an `await`, and taking it is bounded: non-blocking attempts, yielding the
CPU between them, then short sleeps, until a timeout.

Slots (`Slots`, sans I/O): a region of fixed-size slots, each starting with a 16-byte digest of
its key (never the key itself). A key lives in one slot within a window of `window` consecutive
slots starting at `digest mod (slot_count - window + 1)` (windows never wrap); a lookup
compares the digests of the whole window in one `unpack_from`. Which slot of the window is free
or may be evicted is the layout's own business (a checksum, an all-zero digest).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import re
import secrets
import struct
import time
from collections.abc import Callable

import posix_ipc

SHM_DIR = "/dev/shm"
DIGEST_SIZE = 16
_MODE = 0o600
_LOCK = fcntl.LOCK_EX | fcntl.LOCK_NB
_YIELD_ATTEMPTS = 32  # then back off with short sleeps: the holder may be descheduled
_BACKOFF_S = 50e-6

log = logging.getLogger("edge.shm")

# Forks this process is from: bumped in every forked child, so a Segment knows whether it is
# used in the process that opened it without asking the kernel for the pid each time.
_forks = [0]


def _forked() -> None:
    _forks[0] += 1


os.register_at_fork(after_in_child=_forked)


def segment_name(prefix: str, pid: int, token: str | None = None) -> str:
    """The name of a segment of the master with `pid`: `<prefix>.<pid>.<token>`.

    The random token makes the name unpredictable. The master chooses it once and workers
    learn it from the settings they inherit.
    """
    return f"{prefix}.{pid}.{secrets.token_hex(8) if token is None else token}"


class Segment:
    """A process's own attachment to one shared-memory object: descriptor, mapping and lock."""

    __slots__ = ("_fd", "_forks", "_shm", "mm", "name")

    def __init__(self, name: str, shm: posix_ipc.SharedMemory, mm: mmap.mmap) -> None:
        self.name = name
        self.mm = mm
        self._shm = shm
        self._fd = shm.fd
        self._forks = _forks[0]  # the process it was opened in (see `acquire`)

    @classmethod
    def create(
        cls,
        name: str,
        size: int,
        fill: Callable[[mmap.mmap], None],
        uid: int | None = None,
        gid: int | None = None,
    ) -> Segment:
        """Create the object (mode 0600) and `fill` its fresh mapping, replacing a stale object
        of the same name.

        One this user may not remove (another user's) raises FileExistsError: choose another
        name (see `segment_name`). `uid`/`gid` hand the object to the user the workers run as
        when the master runs as root.
        """
        path = _posix_name(name)
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
            fill(mm)
            return cls(path.lstrip("/"), shm, mm)
        except BaseException:
            if mm is not None:
                mm.close()
            shm.close_fd()
            _unlink(path)
            raise

    @classmethod
    def attach(cls, name: str, what: str = "shared-memory segment") -> Segment:
        """Open the existing object with this process's own descriptor and map it."""
        path = _posix_name(name)
        try:
            shm = posix_ipc.SharedMemory(path)
        except posix_ipc.ExistentialError as exc:
            raise FileNotFoundError(
                f"{what} {name!r} does not exist (create it in the master)"
            ) from exc
        except posix_ipc.PermissionsError as exc:
            raise PermissionError(f"no permission to open {what} {name!r}") from exc
        try:
            return cls(path.lstrip("/"), shm, mmap.mmap(shm.fd, shm.size))
        except BaseException:
            shm.close_fd()
            raise

    @property
    def size(self) -> int:
        return len(self.mm)

    def acquire(self, timeout_s: float) -> bool:
        """Take the lock, giving up after `timeout_s`. Never blocks in the kernel."""
        if _forks[0] != self._forks:  # cheaper than os.getpid(), a system call
            raise RuntimeError(
                "a shared-memory segment used in a forked child: attach it in each worker"
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

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Drop this process's mapping and descriptor (releasing the lock if held)."""
        if self._fd < 0:
            return
        self.mm.close()
        self._shm.close_fd()
        self._fd = -1

    def unlink(self) -> None:
        """Remove the name (the master, on exit). Existing attachments stay valid."""
        unlink(self.name)


def unlink(name: str) -> None:
    _unlink(_posix_name(name))


class Slots:
    """Where a 16-byte digest lives in a region of `slot_count` slots of `slot_size` bytes at
    `base` (see the module docstring). Sans I/O: it reads the buffer it is given."""

    __slots__ = ("_homes", "_window", "base", "slot_count", "slot_size", "window")

    def __init__(self, base: int, slot_count: int, slot_size: int, window: int) -> None:
        if not 1 <= window <= slot_count:
            raise ValueError(f"window must be in 1..{slot_count}, got {window}")
        self.base = base
        self.slot_count = slot_count
        self.slot_size = slot_size
        self.window = window
        self._homes = slot_count - window + 1
        gap = slot_size - DIGEST_SIZE
        self._window = struct.Struct(f"<{f'{DIGEST_SIZE}s{gap}x' * window}")

    def home(self, digest: bytes) -> int:
        """The offset of the first slot of `digest`'s window."""
        return self.base + (int.from_bytes(digest, "little") % self._homes) * self.slot_size

    def find(self, buffer: object, digest: bytes, home: int) -> int:
        """The offset of the slot holding `digest` in the window at `home`, else -1."""
        digests = self._window.unpack_from(buffer, home)  # type: ignore[arg-type]
        if digest in digests:
            return home + digests.index(digest) * self.slot_size
        return -1

    def offsets(self, home: int) -> range:
        """The offsets of the window's slots, in order."""
        return range(home, home + self.window * self.slot_size, self.slot_size)


def remove_stale(prefix: str, shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink `<prefix>.<pid>[.<token>]` objects whose pid is not a live process; return
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
