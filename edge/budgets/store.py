"""Where each key's spend outlives the processes: an LMDB file under the state directory
(systemd's `StateDirectory=`), `usage.<INSTANCE_NAME>.lmdb`, one record per key and period.

The host's live figures are in shared memory (edge.budgets.ledger); once a second one worker
copies them here (edge.budgets.shared), so a crash loses at most the last second of spend, and
the master writes them a last time when it stops. A key's record for its current period is
read back the first time a worker needs it after a restart. `llm-edge-proxy usage` reads the
same file, with or without the service running (LMDB lets readers and writers of several
processes share it).

Records only move forward: a record is replaced only by one of a higher `version` (the
ledger's count of writes), so a slow flush can never put back older figures than a later one
wrote.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from typing import Final

import lmdb

from edge.budgets.ledger import Row
from edge.budgets.periods import PERIODS

MAP_SIZE: Final = 256 << 20  # address space, not disk: records are 80 bytes each
_VALUE = struct.Struct("<qqqqqq")  # end, spent, requests, prompt, completion, version
_PERIOD = struct.Struct(">q")  # big-endian: a key's records sort by period
_KINDS = {kind: kind[0].encode() for kind in PERIODS}  # "d", "w", "m"
_KIND_OF = {code: kind for kind, code in _KINDS.items()}


def file_name(instance: str) -> str:
    """The store of one instance (INSTANCE_NAME): two services sharing a state directory never
    share a store."""
    return f"usage.{instance}.lmdb"


def _key(name: str, kind: str, start: int) -> bytes:
    return name.encode() + b"\0" + _KINDS[kind] + _PERIOD.pack(start)


class StoreError(OSError):
    """The state store cannot be opened or used."""


class Store:
    """One process's handle on the file (open it after fork: LMDB handles do not survive it)."""

    __slots__ = ("_env", "path")

    def __init__(self, env: lmdb.Environment, path: str) -> None:
        self._env = env
        self.path = path

    @classmethod
    def open(cls, directory: str, instance: str, readonly: bool = False) -> Store:
        path = os.path.join(directory, file_name(instance))
        try:
            if not readonly:
                os.makedirs(path, mode=0o700, exist_ok=True)
            env = lmdb.open(
                path,
                map_size=MAP_SIZE,
                subdir=True,
                readonly=readonly,
                lock=True,
                max_dbs=0,
                mode=0o600,
                create=not readonly,
            )
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the usage store {path}: {exc}") from None
        return cls(env, path)

    def close(self) -> None:
        self._env.close()

    def get(self, name: str, kind: str, start: int) -> Row | None:
        try:
            with self._env.begin(write=False) as txn:
                raw = txn.get(_key(name, kind, start))
        except lmdb.Error as exc:
            raise StoreError(f"cannot read the usage store {self.path}: {exc}") from None
        if raw is None or len(raw) != _VALUE.size:
            return None
        return Row(name, kind, start, *_VALUE.unpack(raw))

    def put_newer(self, rows: Iterable[Row]) -> int:
        """Write every row newer than what is stored (one transaction, synced); how many."""
        written = 0
        try:
            with self._env.begin(write=True) as txn:
                for row in rows:
                    key = _key(row.name, row.kind, row.start)
                    raw = txn.get(key)
                    if raw is not None and len(raw) == _VALUE.size:  # noqa: SIM102
                        if _VALUE.unpack(raw)[5] >= row.version:
                            continue
                    txn.put(key, _VALUE.pack(*row[3:]))
                    written += 1
        except lmdb.Error as exc:
            raise StoreError(f"cannot write the usage store {self.path}: {exc}") from None
        return written

    def rows(self) -> list[Row]:
        """Every record, by key name then period."""
        found = []
        try:
            with self._env.begin(write=False) as txn:
                for key, raw in txn.cursor():
                    key = bytes(key)
                    name, mark, kind, start = key[:-10], key[-10:-9], key[-9:-8], key[-8:]
                    if mark != b"\0" or kind not in _KIND_OF or len(raw) != _VALUE.size:
                        continue
                    found.append(
                        Row(
                            name.decode("utf-8", "replace"),
                            _KIND_OF[kind],
                            _PERIOD.unpack(start)[0],
                            *_VALUE.unpack(raw),
                        )
                    )
        except lmdb.Error as exc:
            raise StoreError(f"cannot read the usage store {self.path}: {exc}") from None
        return found
