"""The host's local response store: one LMDB environment in a directory, opened by every worker
process, kept across reloads and restarts, bounded on disk.

Theory of operation
-------------------
Lifecycle: the gunicorn master calls `prepare` before forking. It makes (or vets) the
directory, checks the store, wiping a corrupt one, and closes it again: an LMDB environment
must never cross a fork (py-lmdb also refuses to open, in a forked child, a store its parent
still has open). Each worker then calls `LocalStore.open` after fork and `close()` on exit.
The files are ``data.mdb`` (the data, less than ``map_size`` bytes) and ``lock.mdb`` (the
reader table: 64 bytes per reader slot, 65,664 bytes for the 1024 slots opened here); nothing
else lives in the directory.

Bound: ``max_bytes``, rounded down to the page size, is LMDB's map size, which the data file can
never outgrow (LMDB answers MDB_MAP_FULL instead). Values live in three named databases:
``entries`` (32-byte key -> 8-byte sequence number + value), ``order`` (big-endian sequence
number -> key, so a cursor's first record is the oldest entry host-wide) and ``meta`` (the
format record, and the next sequence number with the total of the values' sizes). The sequence
counter is read and written inside each write transaction, and LMDB lets one writer at a time
run across all processes, so the order is consistent host-wide; replacing or deleting an entry
removes its old index record through the sequence number its value carries.

Sizes: LMDB keeps in the data file the largest map any process has committed with (it never
lowers it), and every process must map at least the pages committed. Processes sharing the store
with different ``max_bytes`` (a reload that changed it, while the old workers still run; two
instances on one directory) end up on the largest: each maps the larger of its own map and the
recorded one (at least the data file's size), read at open and again when a transaction finds
that another process grew the store past its map (MapResizedError), with one info line each time
it adopts a larger one. Until then a process evicts by its own map. No process writes past its
map, so the data file stays below the largest ``max_bytes`` among the processes that have
written the store since it was created: an instance with a smaller one exceeds its own bound by
at most that. So a reload that raises ``max_bytes`` takes effect at once, and one that lowers it
only at the next start. `prepare` checks at start: a store recorded (or grown) larger than the
master's map is removed, with one warning, when no process has it open (the operator lowered
``max_bytes``); when one has, `prepare` raises OSError instead, as removing it would split the
store (the processes attached keep using its unlinked files, neither shared any more nor
freed). So of two instances on one directory with different ``max_bytes``, the smaller one's
master refuses to start once the larger one has written.

Room: LMDB is copy-on-write. Pages a transaction frees can only be reused two commits later
(the last committed snapshot stays intact) and only once no reader still sees them, and a
value larger than half a page needs contiguous overflow pages. So a put does not wait for
MDB_MAP_FULL: in its own write transaction it first evicts the oldest entries while the pages
the databases hold, plus the pages the value needs, would pass `HIGH_WATER` of the map, which
leaves the rest for freshly freed pages, readers' snapshots and fragmentation. (It counts the
databases' pages only when the store's highest page, an upper bound of them that LMDB keeps,
says they might pass: a store below its budget is not asked.) When the put still meets
MDB_MAP_FULL it is aborted, and what happens next depends on why:

- A reader pins pages: some read transaction, in any process, still sees a snapshot older
  than the last commit (LMDB's reader table says so, after clearing dead processes' slots).
  The pages freed since it began, and any that an eviction would free now, cannot be reused
  until it ends, so evicting would lose entries for nothing: the put gives up at once and
  returns False, and the store keeps every entry. (The entries the aborted transaction
  evicted stay too.)
- Otherwise (the free pages are too few, or too scattered for the value's run): a
  transaction of its own evicts the oldest entries holding at least the value's pages,
  and a second one commits so that those pages become reusable, and the put is tried again;
  at the next failure the same, with 4 times as many pages, unless a reader pins pages by
  then; at most `ATTEMPTS` tries.

So beyond what `HIGH_WATER` asks, one put evicts at most 5 times its pages (its value's and
`_TREE_PAGES`), and nothing while pages are pinned; a value of `max_value`, a quarter of the
map, may empty the store. A value that then still does not fit, or exceeds `max_value`, is
not stored: `put` returns False. A put may wait for other processes' write transactions
(LMDB's robust process-shared mutex: a writer killed mid-transaction releases it), and runs
at most 3 * `ATTEMPTS` - 2 short write transactions of its own.

Under load some read is nearly always running somewhere, mostly a short one; a reader
descheduled on a busy host, or a process stopped in the middle of a get, pins pages for
longer. Once the free pages run out meanwhile, puts return False and evict nothing until it
ends: the cache stops taking new answers for that while, rather than emptying itself.

Reads take no lock: a get is one short read transaction (a reader slot this process keeps for
reuse) that copies the value out. Stale reader slots of dead processes would keep pages from
being reused; each open and each failed put clears them (``mdb_reader_check``).

Not ``writemap``: with a writable map a commit writes no pages (a put costs about 7 µs less
of its 18, measured), but LMDB then sets the data file's size to the map size of the process
that opens it (or changes its map), so a process with a smaller ``max_bytes`` (a master
preparing after a reload that lowered it, see Sizes) would cut the file under a writer with a
larger map: a SIGBUS, or pages it wrote zeroed; it would extend a truncated file with zeros
before the check below sees it; a full filesystem would kill a writer with SIGBUS on a hole of
the sparse file instead of failing the put; and LMDB forbids mixing processes with and without
it, which a reload from the previous version would do.

Durability: ``sync=False, metasync=False``: commits are not flushed to disk. A process that
dies loses nothing (the kernel holds its writes). A power cut or kernel crash may undo the last
commits and, LMDB documents, leaves the file intact only where the filesystem preserves the
order of writes; otherwise the store may be damaged, and `prepare` at the next start finds it.

Damage: the store is removed and started empty, with one warning on the ``edge.cache`` logger
naming the directory and the reason, when LMDB refuses to open it or fails the first reads; when
the data file is shorter than its own pages say (a truncated file would fault the process on
access); when the format record is missing or another version's. `prepare` also removes a store
larger than its map that no process has open (see Sizes), walks the whole index against the
entries, and, when no process has the store open, first runs py-lmdb's offline verifier over the
data file (``lmdb.verify``: every page checked without handing the file to the engine; it finds
what opening cannot, such as a free list naming live pages, which later writes would overwrite
silently). Each process holds a shared `flock` of the data file while it has the store open,
which is how `prepare` knows. Wiping happens under an exclusive `flock` of the directory, which
normal opens hold shared, so two processes never wipe or create the store at once; processes
still attached to a removed store keep using its unlinked files until they close them. Values
carry no checksum here: a flipped bit inside a value is returned as stored. An LMDB error while
in use (an I/O error, a corrupt page) raises `StoreError`; lack of room never does.

Truncating or overwriting ``data.mdb`` while the service runs is damage no check can catch in
time: it is mapped, so a process that touches a page past a truncated end dies of SIGBUS, and
overwritten pages reach LMDB as they are (a `StoreError` at best, a crash at worst). This is
inherent to mmap. gunicorn replaces the workers that die, and their open finds a truncated
store (or overwritten meta pages) and wipes it; damage deeper inside the file waits for
`prepare`'s walk and verifier at the next start. So the directory must be the service's own
(systemd's ``CacheDirectory=``), never a shared temporary directory that tmpfiles or another
cleaner prunes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import stat
import struct
from collections.abc import Iterator
from typing import Final

import lmdb
from lmdb import verify as lmdb_verify

KEY_SIZE: Final = 32
FORMAT: Final = b"llm-edge-proxy local cache store, format 1"
MIN_BYTES: Final = 1 << 20
MAX_VALUE: Final = 64 << 20  # and at most a quarter of the store, see `LocalStore.max_value`
HIGH_WATER: Final = 0.85  # share of the map's pages the databases may hold after a put
ATTEMPTS: Final = 3
MAX_READERS: Final = 1024  # simultaneous read transactions host-wide (workers x threads)
DATA_FILE: Final = "data.mdb"
LOCK_FILE: Final = "lock.mdb"

# Pages a put may allocate beyond its value's: the copied paths of the three databases it
# changes, the main database's records of them, the free list's record, a split or two.
_TREE_PAGES: Final = 16
_PAGE_HEADER: Final = 16  # LMDB's page header, in front of an overflow value
_EVICT_GROWTH: Final = 4
_SEQ = struct.Struct(">Q")  # big-endian, so the index's key order is insertion order
_COUNTERS = struct.Struct("<QQ")  # next sequence number, total bytes of the values
_FORMAT_KEY: Final = b"format"
_COUNTERS_KEY: Final = b"counters"
_DIR_MODE: Final = 0o700
_FILE_MODE: Final = 0o600

log = logging.getLogger("edge.cache")


class StoreError(OSError):
    """LMDB failed while the store was in use (an I/O error, a page found corrupt)."""


class _Unusable(Exception):
    """The store on disk cannot be used as it is: remove it and start empty."""


class LocalStore:
    """This process's attachment to the host's store. Thread-safe (LMDB serialises the write
    transactions); never use it in a process forked after `open`."""

    __slots__ = (
        "_budget",
        "_entries",
        "_env",
        "_holder",
        "_meta",
        "_order",
        "_pid",
        "_psize",
        "evictions",
        "map_size",
        "max_value",
        "path",
    )

    def __init__(
        self,
        path: str,
        env: lmdb.Environment,
        dbs: tuple[lmdb._Database, lmdb._Database, lmdb._Database],
        holder: int,
    ) -> None:
        self.path = path
        self._env = env
        self._entries, self._order, self._meta = dbs
        self._holder = holder  # the data file, shared-locked while this process uses it
        self._pid = os.getpid()
        self.evictions = 0  # entries this process evicted since open
        self._psize = env.stat()["psize"]
        self._set_bounds()

    @classmethod
    def open(cls, path: str, max_bytes: int) -> LocalStore:
        """Open (creating) the store in directory `path`, in this process (a worker, after
        fork). A corrupt or unreadable store is removed and started empty, with one warning
        naming the path and the reason; a store larger than `max_bytes` is used at its size
        (see Sizes in the module docstring), with one info line. OSError when the directory
        is unsafe (a symbolic link, not a directory, another user's, writable by group or
        others) or even a fresh store cannot be made; ValueError when `max_bytes` is below
        `MIN_BYTES`."""
        return cls._open(_clean(path), max_bytes, owners=(os.geteuid(),), thorough=False)

    @classmethod
    def _open(
        cls, path: str, max_bytes: int, owners: tuple[int, ...], thorough: bool
    ) -> LocalStore:
        map_size = map_size_for(max_bytes)
        vet_directory(path, owners)
        if not thorough:
            # An unusable store is looked at again under the exclusive lock, then removed.
            with _locked(path, fcntl.LOCK_SH), contextlib.suppress(_Unusable):
                return cls(path, *_attach(path, map_size, thorough))
        with _locked(path, fcntl.LOCK_EX):
            try:  # another process may have replaced it in between
                in_use = thorough and _verify_at_rest(path)
                return cls(path, *_attach(path, map_size, thorough, in_use))
            except _Unusable as exc:
                reason = str(exc)
            for name in (DATA_FILE, LOCK_FILE):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(path, name))
            log.warning(
                "local cache store unusable: removed it and started empty",
                extra={"directory": path, "reason": reason},
            )
            try:
                return cls(path, *_attach(path, map_size, thorough))
            except _Unusable as exc:
                raise OSError(f"cannot make a local cache store in {path}: {exc}") from None

    def get(self, key: bytes) -> bytes | None:
        """A copy of the value stored under `key`, else None. Takes no lock."""
        self._check(key)
        try:  # not `_failures`: a generator context manager costs as much as the read
            with self._begin(write=False) as txn:
                raw = txn.get(key, db=self._entries)
                return None if raw is None else bytes(raw[_SEQ.size :])
        except lmdb.Error as exc:
            raise _failed("get", exc) from exc

    def put(self, key: bytes, value: bytes) -> bool:
        """Store `value` under `key`, replacing, evicting the oldest entries as needed. False
        (nothing stored, nothing raised) when the value does not fit even an emptied store,
        or is larger than `max_value`."""
        self._check(key)
        if len(value) > self.max_value:
            return False
        need = _pages(len(value), self._psize) + _TREE_PAGES
        try:
            for attempt in range(ATTEMPTS):
                try:
                    with self._begin(write=True) as txn:
                        evicted = 0
                        # The pages in use are at most the store's highest page: while that
                        # leaves room, the databases' page counts need not be asked.
                        if self._env.info()["last_pgno"] + 1 + need > self._budget:
                            evicted = self._evict(txn, self._budget - need)
                        self._insert(txn, key, value)
                    self.evictions += evicted
                    return True
                except (lmdb.MapFullError, lmdb.TxnFullError):
                    pass  # aborted: nothing of it is stored
                if attempt == ATTEMPTS - 1 or not self._make_room(need * _EVICT_GROWTH**attempt):
                    break
        except lmdb.Error as exc:
            raise _failed("put", exc) from exc
        return False

    def put_many(self, items: list[tuple[bytes, bytes]]) -> int:
        """`put` each (key, value) of `items`, in one write transaction when they fit at
        once (the transaction, not the values, is most of a small write's cost); return how
        many were stored."""
        if len(items) == 1:
            return int(self.put(*items[0]))
        fits = [(key, value) for key, value in items if len(value) <= self.max_value]
        for key, _ in fits:
            self._check(key)
        need = sum(_pages(len(value), self._psize) + _TREE_PAGES for _, value in fits)
        try:
            with self._begin(write=True) as txn:
                evicted = 0
                if self._env.info()["last_pgno"] + 1 + need > self._budget:  # as in `put`
                    evicted = self._evict(txn, self._budget - need)
                for key, value in fits:
                    self._insert(txn, key, value)
            self.evictions += evicted
            return len(fits)
        except (lmdb.MapFullError, lmdb.TxnFullError):
            pass  # aborted: one at a time, each making its own room as `put` does
        except lmdb.Error as exc:
            raise _failed("put", exc) from exc
        return sum(self.put(key, value) for key, value in fits)

    def delete(self, key: bytes) -> None:
        """Remove the entry under `key`, if any."""
        self._check(key)
        with self._failures("delete"), self._begin(write=True) as txn:
            old = txn.get(key, db=self._entries)
            if old is None:
                return
            seq, size = bytes(old[: _SEQ.size]), len(old) - _SEQ.size
            txn.delete(key, db=self._entries)
            txn.delete(seq, db=self._order)
            next_seq, total = self._counters(txn)
            txn.put(_COUNTERS_KEY, _COUNTERS.pack(next_seq, total - size), db=self._meta)

    def stats(self) -> tuple[int, int]:
        """(total bytes of the stored values, number of entries), host-wide. Pages, keys and
        the 8-byte sequence number each value carries are not counted; `disk_bytes` is."""
        self._check_process()
        with self._failures("stats"), self._begin(write=False) as txn:
            _, total = self._counters(txn)
            return total, txn.stat(self._entries)["entries"]

    def disk_bytes(self) -> int:
        """Bytes the data file takes now (it never shrinks, and stays below the largest map of
        the processes writing it: this one's `map_size` unless another's is larger)."""
        return os.stat(os.path.join(self.path, DATA_FILE)).st_size

    def close(self) -> None:
        """Close this process's environment. Repeat calls have no effect."""
        self._env.close()
        if self._holder >= 0:
            os.close(self._holder)  # releases the shared lock
            self._holder = -1

    # Write-side helpers: each runs inside the caller's write transaction.

    def _insert(self, txn: lmdb.Transaction[memoryview], key: bytes, value: bytes) -> None:
        next_seq, total = self._counters(txn)
        old = txn.get(key, db=self._entries)
        if old is not None:
            old_seq, old_size = bytes(old[: _SEQ.size]), len(old) - _SEQ.size
            txn.delete(old_seq, db=self._order)
            total -= old_size
        seq = _SEQ.pack(next_seq)
        txn.put(seq, key, db=self._order, append=True)  # the largest key: appended
        txn.put(key, seq + value, db=self._entries)
        txn.put(_COUNTERS_KEY, _COUNTERS.pack(next_seq + 1, total + len(value)), db=self._meta)

    def _evict(self, txn: lmdb.Transaction[memoryview], limit: int) -> int:
        """Remove the oldest entries while the databases hold more than `limit` pages; return
        how many."""
        evicted = 0
        freed = 0
        # The main and meta databases keep their few records (and pages) through this loop.
        fixed = self._pages_of(txn, None) + self._pages_of(txn, self._meta)
        entries, order = self._entries, self._order
        with txn.cursor(db=order) as cursor:
            while (
                fixed + self._pages_of(txn, entries) + self._pages_of(txn, order) > limit
                and cursor.first()
            ):
                key = bytes(cursor.value())
                cursor.delete()
                old = txn.get(key, db=self._entries)
                if old is not None:
                    freed += len(old) - _SEQ.size
                    txn.delete(key, db=self._entries)
                evicted += 1
        if evicted:
            next_seq, total = self._counters(txn)
            txn.put(_COUNTERS_KEY, _COUNTERS.pack(next_seq, total - freed), db=self._meta)
        return evicted

    def _make_room(self, pages: int) -> bool:
        """After a put met MDB_MAP_FULL: evict the oldest entries holding at least `pages`
        pages (or all) and commit twice, so that the next write transaction may reuse those
        pages. False, evicting nothing, when a reader pins freed pages (see Room in the module
        docstring), when even the eviction meets MDB_MAP_FULL (no free page is reusable yet),
        or when the store was empty already: nothing to gain."""
        self._env.reader_check()  # a dead process's reader slot would pin the freed pages
        if self._pinned():
            return False
        try:
            with self._begin(write=True) as txn:
                evicted = self._evict(txn, self._live_pages(txn) - pages)
                self._touch(txn)  # commits even when nothing was evicted
            self.evictions += evicted
            with self._begin(write=True) as txn:
                self._touch(txn)
        except (lmdb.MapFullError, lmdb.TxnFullError):
            return False
        return evicted > 0

    def _pinned(self) -> bool:
        """Whether a read transaction (of any process) sees a snapshot older than the last
        commit: the pages freed since it began cannot be reused until it ends, nor can any
        page an eviction would free now. Parses LMDB's reader table (``mdb_reader_list``:
        pid, thread, and the snapshot's transaction id, or "-" for a slot kept idle)."""
        last = self._env.info()["last_txnid"]
        for line in self._env.readers().splitlines()[1:]:
            txnid = line.rsplit(None, 1)[-1]
            if txnid.isdigit() and int(txnid) < last:
                return True
        return False

    def _touch(self, txn: lmdb.Transaction[memoryview]) -> None:
        """Rewrite the counters as they are: the transaction changes a page, so its commit
        counts (a transaction that changed nothing commits nothing)."""
        txn.put(_COUNTERS_KEY, _COUNTERS.pack(*self._counters(txn)), db=self._meta)

    def _counters(self, txn: lmdb.Transaction[memoryview]) -> tuple[int, int]:
        raw = txn.get(_COUNTERS_KEY, db=self._meta)
        if raw is None or len(raw) != _COUNTERS.size:
            raise lmdb.CorruptedError("counters record missing or malformed")
        next_seq, total = _COUNTERS.unpack(raw)
        return next_seq, total

    def _live_pages(self, txn: lmdb.Transaction[memoryview]) -> int:
        """Pages the main and the three named databases hold (the free list's are not)."""
        return sum(self._pages_of(txn, db) for db in (None, self._entries, self._order, self._meta))

    @staticmethod
    def _pages_of(txn: lmdb.Transaction[memoryview], db: lmdb._Database | None) -> int:
        st = txn.stat(db)
        return st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]

    # Plumbing.

    def _begin(self, write: bool) -> lmdb.Transaction[memoryview]:
        try:
            return self._env.begin(write=write, buffers=True)
        except lmdb.MapResizedError:
            # Another process opened the store with a larger max_bytes and its data now
            # reaches past our map: adopt the map the store records, as LMDB requires (its
            # writer's, which committed it with the data, so at least the pages it holds).
            self._env.set_mapsize(0)
            self._set_bounds()
            _adopted(self.path, self.map_size)
            return self._env.begin(write=write, buffers=True)

    def _set_bounds(self) -> None:
        self.map_size = self._env.info()["map_size"]
        pages = self.map_size // self._psize
        self._budget = int(pages * HIGH_WATER)
        self.max_value = min(MAX_VALUE, self.map_size // 4)

    @contextlib.contextmanager
    def _failures(self, operation: str) -> Iterator[None]:
        try:
            yield
        except lmdb.Error as exc:
            raise _failed(operation, exc) from exc

    def _check(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must be {KEY_SIZE} bytes, got {len(key)}")
        self._check_process()

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError("a LocalStore used in a forked child: open the store in each worker")


def prepare(path: str, max_bytes: int, uid: int | None = None, gid: int | None = None) -> None:
    """In the gunicorn master before the fork: make the directory `path` (mode 0700), or refuse
    one that is a symbolic link, not a directory, owned by another user than this one or
    `uid`, or writable by group or others (OSError); check the store, wiping it if corrupt, or
    larger than `max_bytes` while no process has it open (one warning); close it again.
    OSError, the store left as it is, when it is larger than `max_bytes` and another process
    has it open (an instance with a larger max_bytes shares the directory: see Sizes in the
    module docstring). `uid`/`gid` hand the directory and its files to the user the workers
    run as, for a master running as root."""
    path = _clean(path)
    map_size_for(max_bytes)  # ValueError before anything is made
    owners = (os.geteuid(),) if uid is None else (os.geteuid(), uid)
    vet_directory(path, owners)
    chown = uid is not None or gid is not None
    if chown:
        os.chown(path, _id(uid), _id(gid), follow_symlinks=False)
    LocalStore._open(path, max_bytes, owners, thorough=True).close()
    if chown:
        for name in (DATA_FILE, LOCK_FILE):
            os.chown(os.path.join(path, name), _id(uid), _id(gid), follow_symlinks=False)


def map_size_for(max_bytes: int) -> int:
    """The LMDB map size for a store bounded by `max_bytes`: rounded down to whole pages."""
    if max_bytes < MIN_BYTES:
        raise ValueError(f"max_bytes must be at least {MIN_BYTES}, got {max_bytes}")
    return max_bytes - max_bytes % mmap.PAGESIZE


def _attach(
    path: str, map_size: int, thorough: bool, in_use: bool = False
) -> tuple[lmdb.Environment, tuple[lmdb._Database, lmdb._Database, lmdb._Database], int]:
    """Open the environment, check it and take the shared lock of its data file (the
    descriptor is returned); _Unusable when the store must be removed. `in_use`: another
    process has it open (known only to a thorough open, see `_verify_at_rest`)."""
    try:
        env = lmdb.open(
            path,
            map_size=map_size,
            subdir=True,
            create=False,  # the directory is ours, vetted; LMDB still creates the files
            mode=_FILE_MODE,
            sync=False,
            metasync=False,
            readahead=False,
            max_readers=MAX_READERS,
            max_dbs=3,
            max_spare_txns=1,  # keep the reader slot: a get needs no reader-table lock
            lock=True,
            lib_version=0,  # LMDB 0.9's data format; a 1.0 file is refused, so wiped
        )
    except lmdb.Error as exc:
        if "already open in this process" in str(exc):  # py-lmdb's own refusal: our bug
            raise RuntimeError(
                f"the local cache store {path} is already open in this process, or in the "
                "process it was forked from: close it there before the fork (see prepare)"
            ) from None
        raise _Unusable(_describe(exc)) from None
    try:
        dbs = _check_env(env, path, map_size, thorough, in_use)
        holder = os.open(os.path.join(path, DATA_FILE), os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(holder, fcntl.LOCK_SH)  # never waits: prepare's lock excludes ours
        except BaseException:
            os.close(holder)
            raise
        return env, dbs, holder
    except lmdb.Error as exc:
        env.close()
        raise _Unusable(_describe(exc)) from None
    except BaseException:
        env.close()
        raise


def _check_env(
    env: lmdb.Environment, path: str, map_size: int, thorough: bool, in_use: bool
) -> tuple[lmdb._Database, lmdb._Database, lmdb._Database]:
    info = env.info()
    psize = env.stat()["psize"]
    needed = (info["last_pgno"] + 1) * psize
    try:
        size = os.stat(os.path.join(path, DATA_FILE)).st_size
    except OSError as exc:
        raise _Unusable(f"data file: {exc.strerror}") from None
    if size < needed:
        raise _Unusable(f"data file truncated: {size} bytes, its pages need {needed}")
    # The map the store records: the largest any process committed with, at least its pages
    # (a damaged meta page is taken at its word here: prepare finds it over its map at start).
    env.set_mapsize(0)
    store_size = max(env.info()["map_size"], -(-size // psize) * psize)
    if store_size <= map_size:
        env.set_mapsize(map_size)
    elif not thorough:  # a worker: another instance's larger map is the store's now
        env.set_mapsize(store_size)
        _adopted(path, store_size)
    elif in_use:
        raise OSError(
            f"{path} is in use by another instance whose CACHE_MAX_BYTES is larger (the store "
            f"is sized for {store_size} bytes, over {map_size}): give each instance its own "
            "CACHE_DIR, or the same CACHE_MAX_BYTES"
        )
    else:
        raise _Unusable(f"the store is sized for {store_size} bytes, over {map_size}")
    env.reader_check()
    with env.begin(write=True) as txn:
        entries = env.open_db(b"entries", txn=txn)
        order = env.open_db(b"order", txn=txn)
        meta = env.open_db(b"meta", txn=txn)
        format_record = txn.get(_FORMAT_KEY, db=meta)
        counts = [txn.stat(db)["entries"] for db in (entries, order, meta)]
        if format_record is None:
            # A fresh store holds nothing but the records of its three databases.
            if any(counts) or txn.stat()["entries"] != 3:
                raise _Unusable("no format record: not a store of this code")
            txn.put(_FORMAT_KEY, FORMAT, db=meta)
            txn.put(_COUNTERS_KEY, _COUNTERS.pack(0, 0), db=meta)
        elif format_record != FORMAT:
            raise _Unusable(f"another format: {format_record[:64]!r}")
        else:
            counters = txn.get(_COUNTERS_KEY, db=meta)
            if counters is None or len(counters) != _COUNTERS.size:
                raise _Unusable("counters record missing or malformed")
            if counts[0] != counts[1]:
                raise _Unusable(f"{counts[0]} entries but {counts[1]} index records")
    if thorough:
        _walk(env, entries, order, meta)
    return entries, order, meta


def _walk(
    env: lmdb.Environment, entries: lmdb._Database, order: lmdb._Database, meta: lmdb._Database
) -> None:
    """Every index record names an entry carrying its sequence number; the counters agree."""
    with env.begin(buffers=True) as txn:
        counters = txn.get(_COUNTERS_KEY, db=meta)
        if counters is None or len(counters) != _COUNTERS.size:
            raise _Unusable("counters record missing or malformed")
        next_seq, total = _COUNTERS.unpack(counters)
        size = count = 0
        for seq, key in txn.cursor(db=order):
            if len(seq) != _SEQ.size or len(key) != KEY_SIZE or _SEQ.unpack(seq)[0] >= next_seq:
                raise _Unusable("malformed index record")
            value = txn.get(key, db=entries)
            if value is None or value[: _SEQ.size] != seq:
                raise _Unusable("an index record without its entry")
            size += len(value) - _SEQ.size
            count += 1
        if count != txn.stat(entries)["entries"] or size != total:
            raise _Unusable("the counters do not match the entries")


def _verify_at_rest(path: str) -> bool:
    """py-lmdb's offline verifier over the data file, when no process has the store open
    (none holds the data file's shared lock): a pure-Python walk of every page that never
    hands the file to the engine. It finds what opening cannot, such as a free list naming
    live pages, which a later write would overwrite silently. Skipped while the store is in
    use: the file is then changing under it, and its users opened it already. True when it
    is in use (the caller holds the directory's exclusive lock: no process opens it meanwhile,
    though one may close it)."""
    try:
        fd = os.open(os.path.join(path, DATA_FILE), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False  # a new store
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        try:
            problems = lmdb_verify.verify(path)
        except (lmdb_verify.VerifyError, OSError) as exc:
            raise _Unusable(f"verify: {exc}") from None
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise _Unusable(f"verify: {problems[0]}{more}")
        return False
    finally:
        os.close(fd)


def _adopted(path: str, map_size: int) -> None:
    log.info(
        "local cache store sized by a process with a larger max_bytes: using its size",
        extra={"directory": path, "map_size": map_size},
    )


def vet_directory(path: str, owners: tuple[int, ...], what: str = "cache directory") -> None:
    """Make the directory (0700) if missing; refuse one that is not safe to keep answers (or
    the usage store: edge.budgets) in: a symbolic link, not a directory, another user's, or
    writable by group or others. `what` names it in the error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            os.mkdir(path, _DIR_MODE)
        st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(f"{what} {path} is a symbolic link: name the directory itself")
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{what} {path} is not a directory")
    if st.st_uid not in owners:
        raise PermissionError(f"{what} {path} belongs to another user (uid {st.st_uid})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"{what} {path} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): make it 0700"
        )


@contextlib.contextmanager
def _locked(path: str, operation: int) -> Iterator[None]:
    """`flock` the directory itself: shared to open the store, exclusive to replace it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # releases the lock


def _pages(size: int, psize: int) -> int:
    """Pages a value of `size` bytes takes as an overflow value (an over-estimate when small)."""
    return -(-(size + _SEQ.size + _PAGE_HEADER) // psize)


def _clean(path: str) -> str:
    # lstat("link/") follows the link: drop trailing slashes so a symbolic link is seen.
    return path.rstrip("/") or "/"


def _id(value: int | None) -> int:
    return -1 if value is None else value


def _failed(operation: str, exc: lmdb.Error) -> StoreError:
    return StoreError(f"local cache store {operation} failed: {_describe(exc)}")


def _describe(exc: lmdb.Error) -> str:
    return f"{type(exc).__name__}: {exc}"
