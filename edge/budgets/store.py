"""Where each key's spend outlives the processes: an LMDB file under the state directory
(systemd's `StateDirectory=`), one record per key and period.

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

FILE_NAME: Final = "usage.lmdb"
MAP_SIZE: Final = 256 << 20  # address space, not disk: records are 64 bytes each
_VALUE = struct.Struct("<qqqqq")  # spent, requests, prompt, completion, version
_PERIOD = struct.Struct(">q")  # big-endian: a key's records sort by period


def _key(name: str, period: int) -> bytes:
    return name.encode() + b"\0" + _PERIOD.pack(period)


class StoreError(OSError):
    """The state store cannot be opened or used."""


class Store:
    """One process's handle on the file (open it after fork: LMDB handles do not survive it)."""

    __slots__ = ("_env", "path")

    def __init__(self, env: lmdb.Environment, path: str) -> None:
        self._env = env
        self.path = path

    @classmethod
    def open(cls, directory: str, readonly: bool = False) -> Store:
        path = os.path.join(directory, FILE_NAME)
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

    def get(self, name: str, period: int) -> Row | None:
        try:
            with self._env.begin(write=False) as txn:
                raw = txn.get(_key(name, period))
        except lmdb.Error as exc:
            raise StoreError(f"cannot read the usage store {self.path}: {exc}") from None
        if raw is None or len(raw) != _VALUE.size:
            return None
        return Row(name, period, *_VALUE.unpack(raw))

    def put_newer(self, rows: Iterable[Row]) -> int:
        """Write every row newer than what is stored (one transaction, synced); how many."""
        written = 0
        try:
            with self._env.begin(write=True) as txn:
                for row in rows:
                    key = _key(row.name, row.period)
                    raw = txn.get(key)
                    if raw is not None and len(raw) == _VALUE.size:  # noqa: SIM102
                        if _VALUE.unpack(raw)[4] >= row.version:
                            continue
                    txn.put(key, _VALUE.pack(*row[2:]))
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
                    name, mark, period = key[:-9], key[-9:-8], key[-8:]
                    if mark != b"\0" or len(raw) != _VALUE.size:
                        continue
                    found.append(
                        Row(
                            name.decode("utf-8", "replace"),
                            _PERIOD.unpack(period)[0],
                            *_VALUE.unpack(raw),
                        )
                    )
        except lmdb.Error as exc:
            raise StoreError(f"cannot read the usage store {self.path}: {exc}") from None
        return found
