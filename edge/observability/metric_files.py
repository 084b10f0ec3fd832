"""The Prometheus multiprocess directory: checks, the scrape/fold lock, and compaction.

Theory of operation. prometheus_client (multiprocess mode) gives every process its own files,
``<type>_<pid>.db`` (gauges: ``gauge_<mode>_<pid>.db``), each a list of (key, value,
timestamp) rows; a scrape sums every ``*.db`` file in the directory. Left alone, the directory
grows by one set of files per worker that ever lived, and every scrape reads them all.

So when a worker has exited (the master's ``child_exit``), the master *folds* its files into
one archive per type, ``<type>_archive.db`` (``gauge_<mode>_archive.db``), written in the same
format by prometheus_client's own ``MmapedDict``, and removes them. Counters, histogram
buckets, sums and counts, and summaries add up row by row, so the archive plus the live files
sum to exactly what the dead and live files summed to before. Gauges: ``live*`` modes are
dropped by ``mark_process_dead`` as before; ``sum`` adds, ``min``/``max`` keep the extreme,
``mostrecent`` keeps the newest row; ``all`` (one series per pid) cannot be folded and is left.

Exactness against a scrape that runs during a fold: both take an ``flock`` on ``.lock`` in the
directory, the fold exclusive, a scrape shared. The fold writes the new archive beside the old
one, renames it over the old one and unlinks the dead worker's files, all under the exclusive
lock, so a scrape sees either the old archive and the dead files, or the new archive and no
dead files; never both, never neither. A dead worker's files never change (the process is gone
before ``child_exit`` runs), and a live worker's files are not touched. If the lock cannot be
had in time, the fold is skipped and the next one (any later worker exit) sweeps up every file
whose pid is no longer a worker.

This relies on prometheus_client internals: the file naming, ``MmapedDict`` and
``MmapedDict.read_all_values_from_file``; pyproject.toml pins the range tested, and
tests/unit/test_metric_files.py fails loudly if they move.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import time
from collections.abc import Iterable
from pathlib import Path

LOCK_NAME = ".lock"
ARCHIVE = "archive"
_SUFFIX = ".db"
_TMP_SUFFIX = ".db.tmp"  # not `*.db`: a scrape never reads a half-written archive
_ADDITIVE = ("counter", "histogram", "summary")
_FOLDABLE_GAUGE_MODES = ("sum", "min", "max", "mostrecent")


class MetricsDirError(Exception):
    """The metrics directory is unsafe to use; ``str()`` is one line naming the problem."""


def check_private_dir(path: Path, allowed_uids: Iterable[int]) -> None:
    """Refuse a directory we must not write through: a symlink, not a directory, owned by
    someone else, or writable by group or others."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise MetricsDirError(f"{path} does not exist") from None
    if stat.S_ISLNK(info.st_mode):
        raise MetricsDirError(f"{path} is a symlink; refusing to write metrics through it")
    if not stat.S_ISDIR(info.st_mode):
        raise MetricsDirError(f"{path} is not a directory")
    if info.st_uid not in set(allowed_uids):
        raise MetricsDirError(
            f"{path} is owned by uid {info.st_uid}, not by the user the service runs as"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise MetricsDirError(
            f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
            "make it 0700"
        )


def prepare(path: Path, uid: int | None = None, gid: int | None = None) -> None:
    """Create the lock file and remove every metric file (a fresh start counts from zero)."""
    for stale in path.iterdir():
        if stale.name.endswith((_SUFFIX, _TMP_SUFFIX)):
            stale.unlink(missing_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
    finally:
        os.close(fd)


def open_lock(path: str | os.PathLike[str]) -> int:
    """This process's own descriptor on the directory's lock file (flock is per open file)."""
    return os.open(Path(path) / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def try_lock(fd: int, exclusive: bool) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _parse(name: str) -> tuple[str, str, str] | None:
    """``counter_123.db`` → ("counter", "", "123"); ``gauge_max_123.db`` → ("gauge", "max",
    "123"); None for anything else."""
    if not name.endswith(_SUFFIX):
        return None
    parts = name[: -len(_SUFFIX)].split("_")
    if len(parts) == 2 and parts[0] in _ADDITIVE:
        return parts[0], "", parts[1]
    if len(parts) == 3 and parts[0] == "gauge":
        return "gauge", parts[1], parts[2]
    return None


def dead_files(path: Path, live_pids: Iterable[int]) -> dict[tuple[str, str], list[Path]]:
    """Foldable files of processes not in ``live_pids``, grouped by (type, gauge mode)."""
    live = {str(pid) for pid in live_pids}
    groups: dict[tuple[str, str], list[Path]] = {}
    for entry in path.iterdir():
        parsed = _parse(entry.name)
        if parsed is None:
            continue
        typ, mode, pid = parsed
        if not pid.isdigit() or pid in live:
            continue
        if typ == "gauge" and mode not in _FOLDABLE_GAUGE_MODES:
            continue  # live* is mark_process_dead's; `all` keeps one series per pid
        groups.setdefault((typ, mode), []).append(entry)
    return groups


def fold(path: Path, live_pids: Iterable[int], lock_timeout_s: float = 1.0) -> int | None:
    """Fold the files of every process not in ``live_pids`` into the archives.

    Returns the number of files removed, or None when the lock was not had in time (nothing
    changed; a later fold will sweep them up).
    """
    fd = open_lock(path)
    try:
        deadline = time.monotonic() + lock_timeout_s
        while not try_lock(fd, exclusive=True):
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.001)
        removed = 0
        for (typ, mode), files in dead_files(path, live_pids).items():
            removed += _fold_group(path, typ, mode, files)
        return removed
    finally:
        os.close(fd)  # releases the lock


def _fold_group(path: Path, typ: str, mode: str, files: list[Path]) -> int:
    from prometheus_client.mmap_dict import MmapedDict

    stem = f"{typ}_{mode}_{ARCHIVE}" if mode else f"{typ}_{ARCHIVE}"
    archive = path / (stem + _SUFFIX)
    rows: dict[str, tuple[float, float]] = {}
    readable: list[Path] = []
    for source in [archive, *files]:
        try:
            if os.path.getsize(source) == 0:  # created, never sized: holds nothing
                readable.append(source)
                continue
            values = list(MmapedDict.read_all_values_from_file(str(source)))
        except FileNotFoundError:
            continue
        except (OSError, RuntimeError, struct.error, UnicodeDecodeError):
            if source == archive:
                return 0  # never replace an archive we cannot read: that would lose counts
            continue  # a torn file stays where it is (and stays in the scrape as before)
        for key, value, timestamp, _ in values:
            rows[key] = _combine(mode, rows.get(key), value, timestamp)
        readable.append(source)
    tmp = path / (stem + _TMP_SUFFIX)
    tmp.unlink(missing_ok=True)
    writer = MmapedDict(str(tmp))
    try:
        for key, (value, timestamp) in rows.items():
            writer.write_value(key, value, timestamp)
    finally:
        writer.close()
    # The archive inherits the directory's ownership story: same user as the dead files.
    with contextlib.suppress(OSError):
        if files:
            owner = os.stat(files[0])
            if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
                os.chown(tmp, owner.st_uid, owner.st_gid)
    os.replace(tmp, archive)
    removed = 0
    for source in readable:
        if source != archive:
            source.unlink(missing_ok=True)
            removed += 1
    return removed


def _combine(
    mode: str, current: tuple[float, float] | None, value: float, timestamp: float
) -> tuple[float, float]:
    if current is None:
        return value, timestamp
    old, old_ts = current
    if mode == "min":
        return (value, timestamp) if value < old else current
    if mode == "max":
        return (value, timestamp) if value > old else current
    if mode == "mostrecent":
        return (value, timestamp) if timestamp > old_ts else current
    return old + value, max(old_ts, timestamp)  # counters, histograms, summaries, gauge sum
