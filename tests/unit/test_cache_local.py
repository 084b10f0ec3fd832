"""The host's local store on LMDB: real files in a temporary directory, real processes."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import random
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from edge.cache.local import (
    DATA_FILE,
    LOCK_FILE,
    MIN_BYTES,
    LocalStore,
    map_size_for,
    prepare,
)

MiB = 1 << 20
FORK = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")
WAIT_S = 30.0  # upper bound for anything we wait on; never reached when things work
# The lock file: LMDB's reader table, 64 bytes for each of the 1024 reader slots and a header
# (65,664 bytes), in whole 4 KiB blocks. The data file alone stays within max_bytes.
LOCK_OVERHEAD = 68 * 1024


def key(i: int) -> bytes:
    return hashlib.sha256(f"key {i}".encode()).digest()


def value(i: int, size: int) -> bytes:
    return random.Random(i).randbytes(size)


def disk_usage(path: str) -> int:
    """What `du` counts for the store's files: allocated blocks."""
    return sum(entry.stat().st_blocks * 512 for entry in os.scandir(path))


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "edge.cache" and r.levelno >= logging.WARNING]


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture
def store(path: str) -> Iterator[LocalStore]:
    opened = LocalStore.open(path, 4 * MiB)
    yield opened
    opened.close()


def raw_env(path: str, map_size: int = 16 * MiB, lib_version: int = 0) -> lmdb.Environment:
    """The store's environment opened directly, to damage it as a test needs."""
    return lmdb.open(path, map_size=map_size, max_dbs=3, lib_version=lib_version)


# --- the basics ---------------------------------------------------------------------------


def test_round_trip(store: LocalStore):
    assert store.get(key(1)) is None
    assert store.put(key(1), b"answer one")
    assert store.put(key(2), b"")
    got = store.get(key(1))
    assert got == b"answer one" and type(got) is bytes
    assert store.get(key(2)) == b""
    assert store.get(key(3)) is None


def test_put_replaces(store: LocalStore):
    assert store.put(key(1), b"first")
    assert store.put(key(1), b"second, longer")
    assert store.get(key(1)) == b"second, longer"
    assert store.stats() == (len(b"second, longer"), 1)


def test_delete(store: LocalStore):
    store.put(key(1), b"one")
    store.put(key(2), b"two")
    store.delete(key(1))
    store.delete(key(1))  # already gone: nothing happens
    store.delete(key(9))
    assert store.get(key(1)) is None
    assert store.get(key(2)) == b"two"
    assert store.stats() == (3, 1)


def test_stats_count_the_values(store: LocalStore):
    assert store.stats() == (0, 0)
    for i in range(10):
        store.put(key(i), value(i, 100 * i))
    store.put(key(3), b"x")  # replaces 300 bytes
    store.delete(key(5))
    expected = sum(100 * i for i in range(10)) - 300 + 1 - 500
    assert store.stats() == (expected, 9)
    assert sum(len(store.get(key(i)) or b"") for i in range(10)) == expected


def test_the_store_outlives_the_process_attachment(path: str):
    first = LocalStore.open(path, 4 * MiB)
    first.put(key(1), b"kept")
    first.close()
    first.close()  # repeat calls have no effect
    again = LocalStore.open(path, 4 * MiB)
    assert again.get(key(1)) == b"kept"
    assert again.stats() == (4, 1)
    again.close()


def test_keys_are_32_byte_digests(store: LocalStore):
    for bad in (b"", b"short", bytes(33)):
        with pytest.raises(ValueError, match="32 bytes"):
            store.put(bad, b"v")
        with pytest.raises(ValueError, match="32 bytes"):
            store.get(bad)
        with pytest.raises(ValueError, match="32 bytes"):
            store.delete(bad)


def test_max_bytes_is_rounded_to_pages_and_has_a_floor(path: str):
    assert map_size_for(16 * MiB + 100) == 16 * MiB
    with pytest.raises(ValueError, match="at least"):
        LocalStore.open(path, MIN_BYTES - 1)
    assert not os.path.exists(path)


# --- eviction and the bound -------------------------------------------------------------


def test_the_oldest_entries_are_evicted_first(path: str):
    store = LocalStore.open(path, 2 * MiB)
    size = 64 * 1024
    for i in range(100):
        assert store.put(key(i), value(i, size))
    present = [store.get(key(i)) is not None for i in range(100)]
    survivors = present.index(True)
    assert survivors > 0, "nothing was evicted: the test needs a fuller store"
    assert all(present[survivors:]), "an entry newer than an evicted one is missing"
    assert store.evictions == survivors
    assert store.stats() == ((100 - survivors) * size, 100 - survivors)
    store.close()


def test_a_replaced_entry_counts_as_new(path: str):
    store = LocalStore.open(path, 2 * MiB)
    size = 64 * 1024
    for i in range(10):
        store.put(key(i), value(i, size))
    store.put(key(0), value(1000, size))  # now the newest
    i = 10
    while store.get(key(1)) is not None:  # fill until the oldest goes
        assert store.put(key(i), value(i, size))
        i += 1
    assert store.get(key(0)) == value(1000, size)
    assert store.get(key(2)) is not None
    store.close()


def test_the_data_stays_within_max_bytes_on_disk(path: str):
    max_bytes = 16 * MiB
    store = LocalStore.open(path, max_bytes)
    data = os.path.join(path, DATA_FILE)
    for i in range(300):
        item = value(i, 200 * 1024)
        assert store.put(key(i), item), f"put {i} failed"
        assert os.stat(data).st_size <= max_bytes
        assert disk_usage(path) <= max_bytes + LOCK_OVERHEAD
        assert store.get(key(i)) == item
    assert store.evictions > 200
    # Mixed sizes, up to the largest value a store takes (a quarter of it).
    sizes = random.Random(7)
    for i in range(300, 500):
        size = sizes.choice([10, 4096, 100_000, 1 * MiB, store.max_value])
        assert store.put(key(i), value(i, size)), f"put {i} of {size} bytes failed"
        assert disk_usage(path) <= max_bytes + LOCK_OVERHEAD
    total, count = store.stats()
    assert 0 < total <= max_bytes and count > 0
    assert store.disk_bytes() == os.stat(data).st_size <= max_bytes
    store.close()
    assert os.stat(os.path.join(path, LOCK_FILE)).st_size <= LOCK_OVERHEAD


def test_a_value_that_cannot_fit_is_refused(store: LocalStore):
    store.put(key(1), b"kept")
    assert store.max_value == store.map_size // 4
    assert not store.put(key(2), bytes(4 * MiB + 1))
    assert not store.put(key(2), bytes(store.max_value + 1))
    assert store.get(key(2)) is None
    assert store.get(key(1)) == b"kept"
    assert store.stats() == (4, 1)
    assert store.evictions == 0


def test_the_largest_value_fits_a_full_store(store: LocalStore):
    for i in range(60):
        assert store.put(key(i), value(i, 60_000))
    largest = value(99, store.max_value)
    assert store.put(key(99), largest)
    assert store.get(key(99)) == largest
    assert store.put(key(100), value(100, store.max_value))  # and again, as the room is reused
    assert store.get(key(99)) == largest


def test_a_reader_held_open_makes_puts_fail_not_raise(store: LocalStore):
    """Pages freed after a read transaction began cannot be reused until it ends."""
    reader = store._env.begin()  # a process stopped in the middle of a get
    try:
        results = [store.put(key(i), value(i, 200 * 1024)) for i in range(40)]
    finally:
        reader.abort()
    assert results[0] and not all(results)
    assert store.put(key(100), value(100, 200 * 1024))
    assert store.get(key(100)) == value(100, 200 * 1024)


# --- damage ---------------------------------------------------------------------------------


def fill(path: str, max_bytes: int = 4 * MiB, count: int = 20, size: int = 50_000) -> None:
    store = LocalStore.open(path, max_bytes)
    for i in range(count):
        assert store.put(key(i), value(i, size))
    store.close()


def garbage(path: str) -> None:
    data = Path(path, DATA_FILE)
    data.write_bytes(random.Random(1).randbytes(data.stat().st_size))


def zeroed_meta_pages(path: str) -> None:
    with open(os.path.join(path, DATA_FILE), "r+b") as f:
        f.write(bytes(2 * 4096))


def truncated(path: str) -> None:
    os.truncate(os.path.join(path, DATA_FILE), 5 * 4096)


def other_format(path: str) -> None:
    with raw_env(path) as env:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"format", b"llm-edge-proxy local cache store, format 2", db=meta)


def lmdb_1_0_file(path: str) -> None:
    for name in (DATA_FILE, LOCK_FILE):
        os.unlink(os.path.join(path, name))
    with raw_env(path, lib_version=1) as env, env.begin(write=True) as txn:
        txn.put(b"k", b"v")


def foreign(path: str) -> None:
    for name in (DATA_FILE, LOCK_FILE):
        os.unlink(os.path.join(path, name))
    with raw_env(path) as env, env.begin(write=True) as txn:
        txn.put(b"someone else's", b"data")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (garbage, "MDB_INVALID"),
        (zeroed_meta_pages, "MDB_INVALID"),
        (truncated, "truncated"),
        (other_format, "another format"),
        (lmdb_1_0_file, "MDB_INVALID"),
        (foreign, "no format record"),
    ],
)
def test_an_unusable_store_is_removed_with_one_warning(path, caplog, damage, reason):
    fill(path)
    damage(path)
    caplog.set_level(logging.WARNING, logger="edge.cache")
    store = LocalStore.open(path, 4 * MiB)
    assert store.stats() == (0, 0)
    (record,) = warnings(caplog)
    assert record.__dict__["directory"] == path
    assert reason in record.__dict__["reason"]
    assert store.get(key(0)) is None
    assert store.put(key(1), b"fresh")
    assert store.get(key(1)) == b"fresh"
    store.close()
    again = LocalStore.open(path, 4 * MiB)  # the fresh store is accepted as it is
    assert again.get(key(1)) == b"fresh"
    again.close()
    assert len(warnings(caplog)) == 1


def test_prepare_wipes_a_corrupt_store_too(path, caplog):
    fill(path)
    garbage(path)
    caplog.set_level(logging.WARNING, logger="edge.cache")
    prepare(path, 4 * MiB)
    assert len(warnings(caplog)) == 1
    store = LocalStore.open(path, 4 * MiB)
    assert store.stats() == (0, 0)
    store.close()
    assert len(warnings(caplog)) == 1


def test_prepare_walks_the_index_that_open_only_counts(path, caplog):
    fill(path)
    with raw_env(path, map_size=4 * MiB) as env:
        entries = env.open_db(b"entries")
        with env.begin(write=True) as txn:
            stored = txn.get(key(3), db=entries)
            assert stored is not None
            txn.put(key(3), struct.pack(">Q", 999) + stored[8:], db=entries)  # wrong sequence
    caplog.set_level(logging.WARNING, logger="edge.cache")
    store = LocalStore.open(path, 4 * MiB)  # counts agree: accepted
    assert store.stats()[1] == 20
    store.close()
    assert warnings(caplog) == []
    prepare(path, 4 * MiB)
    (record,) = warnings(caplog)
    assert "without its entry" in record.__dict__["reason"]
    store = LocalStore.open(path, 4 * MiB)
    assert store.stats() == (0, 0)
    store.close()


def break_an_overflow_page(path: str) -> None:
    """Make the first page of a large value claim another page number: LMDB reads the value
    without looking, the offline verifier does not let it pass."""
    data = Path(path, DATA_FILE)
    raw = bytearray(data.read_bytes())
    psize = 4096
    for page in range(2, len(raw) // psize):
        number, flags = struct.unpack_from("<Q2xH", raw, page * psize)
        if number == page and flags & 0x04:  # P_OVERFLOW, in the header of its first page
            struct.pack_into("<Q", raw, page * psize, 999_999)
            data.write_bytes(raw)
            return
    raise AssertionError("no overflow page found")


def test_prepare_verifies_a_store_no_process_has_open(path, caplog):
    fill(path)
    break_an_overflow_page(path)
    caplog.set_level(logging.WARNING, logger="edge.cache")
    store = LocalStore.open(path, 4 * MiB)  # the engine does not notice
    assert store.stats()[1] == 20
    store.close()
    assert warnings(caplog) == []
    prepare(path, 4 * MiB)
    (record,) = warnings(caplog)
    assert "verify: " in record.__dict__["reason"]
    assert "mp_pgno 999999" in record.__dict__["reason"]
    store = LocalStore.open(path, 4 * MiB)
    assert store.stats() == (0, 0)
    store.close()


def hold_open_child(path: str, conn) -> None:
    store = LocalStore.open(path, 4 * MiB)
    conn.send("open")
    conn.recv()
    store.close()
    conn.send("closed")


def test_prepare_does_not_verify_a_store_in_use(path, caplog):
    """The file changes under a verifier while processes write: it is left to them."""
    fill(path)
    break_an_overflow_page(path)
    parent, child = FORK.Pipe()
    proc = FORK.Process(target=hold_open_child, args=(path, child))
    proc.start()
    assert parent.poll(WAIT_S) and parent.recv() == "open"
    caplog.set_level(logging.WARNING, logger="edge.cache")
    prepare(path, 4 * MiB)
    assert warnings(caplog) == []
    parent.send("close")
    assert parent.poll(WAIT_S) and parent.recv() == "closed"
    proc.join(WAIT_S)
    prepare(path, 4 * MiB)
    assert len(warnings(caplog)) == 1


def test_a_second_open_in_one_process_is_an_error_not_damage(store: LocalStore, path, caplog):
    store.put(key(1), b"kept")
    caplog.set_level(logging.WARNING, logger="edge.cache")
    with pytest.raises(RuntimeError, match="already open"):
        LocalStore.open(path, 4 * MiB)
    assert warnings(caplog) == []
    assert store.get(key(1)) == b"kept"


# --- the directory and prepare ------------------------------------------------------------


def test_prepare_makes_a_private_directory_and_closes_the_store(path):
    prepare(path, 4 * MiB, uid=os.getuid(), gid=os.getgid())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    for name in (DATA_FILE, LOCK_FILE):
        assert stat.S_IMODE(os.stat(os.path.join(path, name)).st_mode) == 0o600
    store = LocalStore.open(path, 4 * MiB)  # prepare closed its environment: this is allowed
    assert store.put(key(1), b"v")
    store.close()
    prepare(path, 4 * MiB)  # again, on the existing store: kept
    store = LocalStore.open(path, 4 * MiB)
    assert store.get(key(1)) == b"v"
    store.close()


def test_prepare_and_open_refuse_a_symbolic_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    for target in (str(link), f"{link}/"):
        with pytest.raises(OSError, match="symbolic link"):
            prepare(target, 4 * MiB)
        with pytest.raises(OSError, match="symbolic link"):
            LocalStore.open(target, 4 * MiB)
    assert list(real.iterdir()) == []


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o777])
def test_prepare_refuses_a_directory_others_may_write(path, mode):
    os.mkdir(path)
    os.chmod(path, mode)
    with pytest.raises(PermissionError, match="writable by group or others"):
        prepare(path, 4 * MiB)
    with pytest.raises(PermissionError, match="writable by group or others"):
        LocalStore.open(path, 4 * MiB)
    assert os.listdir(path) == []


def test_prepare_refuses_what_is_not_a_directory(path):
    Path(path).write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        prepare(path, 4 * MiB)


# --- processes ------------------------------------------------------------------------------


def use_inherited_child(store: LocalStore, conn) -> None:
    try:
        store.get(key(1))
    except RuntimeError as exc:
        conn.send(str(exc))
    else:
        conn.send("no error")


def test_a_store_is_not_used_across_a_fork(store: LocalStore):
    parent, child = FORK.Pipe()
    proc = FORK.Process(target=use_inherited_child, args=(store, child))
    proc.start()
    assert parent.poll(WAIT_S)
    assert "forked child" in parent.recv()
    proc.join(WAIT_S)


WORKERS = 4
SMALL = 40  # entries of 8 KiB each worker writes first: they all fit
LARGE = 60  # then entries of 100 KiB: together four times the store
LARGE_SIZE = 100 * 1024
LARGE_PAGES = -(-(LARGE_SIZE + 8 + 16) // 4096)  # its overflow pages: value, sequence, header
# What one put may evict (see Room in the module docstring): the oldest entries holding its
# pages (value and 16 for the trees) for HIGH_WATER, then, at most, that again and 4 times
# that when the map is full and no reader pins pages; each step may overshoot by one entry.
NEED = LARGE_PAGES + 16
MOST_EVICTED_BY_A_PUT = sum(-(-k * NEED // LARGE_PAGES) for k in (1, 1, 4))


def worker_child(path: str, max_bytes: int, worker: int, barrier, conn) -> None:
    store = LocalStore.open(path, max_bytes)
    barrier.wait(WAIT_S)
    failed = sum(not store.put(key(worker * 1000 + i), value(i, 8192)) for i in range(SMALL))
    barrier.wait(WAIT_S)  # everyone has written their small entries
    seen = sum(
        store.get(key(w * 1000 + i)) == value(i, 8192) for w in range(WORKERS) for i in range(SMALL)
    )
    barrier.wait(WAIT_S)
    for i in range(SMALL):  # gone before the large ones come: every entry evicted is a large one
        store.delete(key(worker * 1000 + i))
    barrier.wait(WAIT_S)
    wrong = refused = most_evicted = 0
    for i in range(LARGE):
        before = store.evictions
        refused += not store.put(key(worker * 1000 + 500 + i), value(i, LARGE_SIZE))
        most_evicted = max(most_evicted, store.evictions - before)
        other = (worker + 1) % WORKERS * 1000 + 500 + i
        got = store.get(key(other))  # another process's entry, maybe not written or evicted
        wrong += got is not None and got != value(i, LARGE_SIZE)
    conn.send((failed, seen, wrong, refused, most_evicted, store.evictions, disk_usage(path)))
    store.close()


def test_processes_share_the_store_within_its_bound(path, caplog):
    """Four processes write, read and evict one store at once. A put may be refused while
    another process's read pins the pages it would need (how often depends on the load of the
    machine), but no put evicts more than its bounded share, and every value read is whole."""
    max_bytes = 8 * MiB
    prepare(path, max_bytes)
    barrier = FORK.Barrier(WORKERS)
    pipes = [FORK.Pipe() for _ in range(WORKERS)]
    procs = [
        FORK.Process(target=worker_child, args=(path, max_bytes, w, barrier, pipes[w][1]))
        for w in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    results = []
    for parent, _ in pipes:
        assert parent.poll(WAIT_S), "a worker process did not report"
        results.append(parent.recv())
    for proc in procs:
        proc.join(WAIT_S)
        assert proc.exitcode == 0
    for failed, seen, wrong, refused, most_evicted, _, usage in results:
        assert failed == 0  # the small entries fit: no put of theirs meets a full map
        assert seen == WORKERS * SMALL  # every process saw every other's entries
        assert wrong == 0
        assert refused < LARGE
        assert most_evicted <= MOST_EVICTED_BY_A_PUT
        assert usage <= max_bytes + LOCK_OVERHEAD
    assert sum(r[5] for r in results) > 0  # the large ones did not all fit
    assert disk_usage(path) <= max_bytes + LOCK_OVERHEAD
    caplog.set_level(logging.WARNING, logger="edge.cache")
    prepare(path, max_bytes)  # walks the index: consistent after the concurrent writes
    assert warnings(caplog) == []
    store = LocalStore.open(path, max_bytes)
    present = {
        (w, i): got
        for w in range(WORKERS)
        for i in range(LARGE)
        if (got := store.get(key(w * 1000 + 500 + i))) is not None
    }
    assert all(got == value(i, LARGE_SIZE) for (_, i), got in present.items())
    assert store.stats() == (len(present) * LARGE_SIZE, len(present))
    store.close()


def grow_child(path: str, conn) -> None:
    store = LocalStore.open(path, 8 * MiB)
    ok = all(store.put(key(100 + i), value(i, 200_000)) for i in range(30))
    store.close()
    conn.send(ok)


def test_a_store_grown_by_another_process_is_adopted(path):
    """A reload that raises max_bytes: the old workers adopt the larger map LMDB reports."""
    store = LocalStore.open(path, 2 * MiB)
    store.put(key(1), b"small")
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=grow_child, args=(path, child))
    proc.start()
    assert parent.poll(WAIT_S) and parent.recv()
    proc.join(WAIT_S)
    assert store.get(key(129)) == value(29, 200_000)  # past the 2 MiB this process mapped
    assert store.map_size == 8 * MiB
    assert store.put(key(2), b"more")
    assert store.get(key(1)) == b"small"
    store.close()


# --- instances with different max_bytes on one directory (see Sizes in the module docstring) ---


def inode(path: str) -> int:
    return os.stat(os.path.join(path, DATA_FILE)).st_ino


def infos(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "edge.cache" and r.levelno == logging.INFO]


@pytest.mark.parametrize("count", [60, 1])  # 6 MB of data; or little, the 16 MiB map recorded
def test_a_worker_uses_a_store_larger_than_its_max_bytes(path, caplog, count):
    fill(path, max_bytes=16 * MiB, count=count, size=100_000)
    before = inode(path)
    caplog.set_level(logging.INFO, logger="edge.cache")
    store = LocalStore.open(path, 4 * MiB)
    assert warnings(caplog) == []
    (record,) = infos(caplog)
    assert record.__dict__["directory"] == path
    assert store.map_size == record.__dict__["map_size"] == 16 * MiB
    assert store.stats() == (count * 100_000, count)
    assert store.get(key(count - 1)) == value(count - 1, 100_000)
    assert store.put(key(1000), b"more")
    store.close()
    assert inode(path) == before


@pytest.mark.parametrize("count", [60, 1])
def test_prepare_wipes_a_larger_store_no_process_has_open(path, caplog, count):
    """The operator lowered max_bytes: the store is started again at the new size."""
    fill(path, max_bytes=16 * MiB, count=count, size=100_000)
    caplog.set_level(logging.INFO, logger="edge.cache")
    prepare(path, 4 * MiB)
    (record,) = warnings(caplog)
    assert record.__dict__["reason"] == "the store is sized for 16777216 bytes, over 4194304"
    store = LocalStore.open(path, 4 * MiB)
    assert store.stats() == (0, 0)
    assert store.map_size == 4 * MiB
    store.close()
    assert len(warnings(caplog)) == 1 and infos(caplog) == []


class Kept(logging.Handler):
    """The edge.cache records of a child process, sent back to the test on request."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelname, record.getMessage()))


def instance_worker(path: str, max_bytes: int, conn) -> None:
    """A worker of an instance with its own max_bytes: opens the store in a process of its own
    (spawned: nothing inherited) and does what the test asks until told to close."""
    kept = Kept()
    logger = logging.getLogger("edge.cache")
    logger.setLevel(logging.INFO)
    logger.addHandler(kept)
    store = LocalStore.open(path, max_bytes)
    conn.send("open")
    data = os.path.join(path, DATA_FILE)
    while True:
        command, *args = conn.recv()
        if command == "fill":  # puts, and the largest size of the data file seen meanwhile
            start, count, size = args
            ok, largest = True, 0
            for i in range(start, start + count):
                ok = store.put(key(i), value(i, size)) and ok
                largest = max(largest, os.stat(data).st_size)
            conn.send((ok, largest))
        elif command == "get":
            conn.send(store.get(key(args[0])))
        elif command == "state":  # this process's map, the file it has open, its log lines
            conn.send((store.map_size, os.fstat(store._holder).st_ino, kept.records))
        else:
            store.close()
            conn.send("closed")
            return


class Worker:
    def __init__(self, path: str, max_bytes: int) -> None:
        self.conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=instance_worker, args=(path, max_bytes, child))
        self.proc.start()
        assert self.conn.poll(WAIT_S) and self.conn.recv() == "open"

    def ask(self, *command: object) -> Any:
        self.conn.send(command)
        assert self.conn.poll(WAIT_S), f"no answer to {command}"
        return self.conn.recv()

    def close(self) -> None:
        assert self.ask("close") == "closed"
        self.proc.join(WAIT_S)
        assert self.proc.exitcode == 0


def test_a_smaller_instance_neither_splits_nor_outgrows_the_store(path, caplog):
    """Two instances on one directory, 2 MiB and 8 MiB, each a master's prepare and workers of
    its own: one store for both, within the larger bound, never removed while in use."""
    small, large = 2 * MiB, 8 * MiB
    caplog.set_level(logging.INFO, logger="edge.cache")
    prepare(path, small)
    first_small = Worker(path, small)
    prepare(path, large)  # the store is not larger than this master's map: kept
    assert caplog.records == []
    store = inode(path)
    first_large = Worker(path, large)
    try:
        ok, largest = first_large.ask("fill", 100, 30, 200_000)  # 6 MB: past the 2 MiB map
        assert ok and small < largest <= large
        # The small instance's worker adopts the larger map when it meets the grown store...
        assert first_small.ask("get", 129) == value(129, 200_000)
        map_size, held, records = first_small.ask("state")
        assert map_size == large and held == store
        assert [level for level, _ in records] == ["INFO"]
        # ... and its own writes keep the data file within the larger bound, not past it.
        ok, largest = first_small.ask("fill", 200, 60, 200_000)
        assert ok and largest <= large
        assert disk_usage(path) <= large + LOCK_OVERHEAD
        assert first_large.ask("get", 259) == value(259, 200_000)  # still one store
        # A worker of the small instance that restarts opens it at the larger size.
        second_small = Worker(path, small)
        try:
            map_size, held, records = second_small.ask("state")
            assert map_size == large and held == store
            assert [level for level, _ in records] == ["INFO"]
            assert second_small.ask("get", 259) == value(259, 200_000)
        finally:
            second_small.close()
        # The small instance's master, restarted while the large one runs, refuses to start.
        with pytest.raises(OSError) as refused:
            prepare(path, small)
        message = str(refused.value)
        assert message == (
            f"{path} is in use by another instance whose CACHE_MAX_BYTES is larger (the store "
            f"is sized for {large} bytes, over {small}): give each instance its own CACHE_DIR, "
            "or the same CACHE_MAX_BYTES"
        )
        assert "\n" not in message
        assert warnings(caplog) == [] and inode(path) == store
        for worker in (first_small, first_large):
            assert worker.ask("state")[1] == store
        prepare(path, large)  # the large one's master may restart: the store is its size
        assert warnings(caplog) == [] and inode(path) == store
    finally:
        first_small.close()
        first_large.close()
    assert os.stat(os.path.join(path, DATA_FILE)).st_size <= large
    # No process has it open: the small master takes it for a lowered max_bytes.
    prepare(path, small)
    (record,) = warnings(caplog)
    assert "over 2097152" in record.__dict__["reason"]
    fresh = LocalStore.open(path, small)
    assert fresh.stats() == (0, 0) and fresh.map_size == small
    fresh.close()
