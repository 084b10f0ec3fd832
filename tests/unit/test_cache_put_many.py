"""LocalStore.put_many: the writes of one event-loop turn in one transaction."""

from __future__ import annotations

import hashlib

from edge.cache.local import LocalStore, prepare

MiB = 1 << 20


def key(n: int) -> bytes:
    return hashlib.sha256(str(n).encode()).digest()


def test_put_many_stores_every_item_like_put(tmp_path):
    path = str(tmp_path / "store")
    prepare(path, 4 * MiB)
    store = LocalStore.open(path, 4 * MiB)
    try:
        items = [(key(n), bytes([n]) * (100 + n)) for n in range(50)]
        items.append((key(3), b"replaced"))  # a key twice in one batch: the last wins
        assert store.put_many(items) == 51
        assert store.get(key(3)) == b"replaced"
        assert all(store.get(key(n)) == bytes([n]) * (100 + n) for n in range(50) if n != 3)
        assert store.stats()[1] == 50
        assert store.put_many([]) == 0
        assert store.put_many([(key(99), b"one")]) == 1
    finally:
        store.close()


def test_put_many_past_the_store_evicts_the_oldest_and_stays_within_it(tmp_path):
    path = str(tmp_path / "store")
    prepare(path, 2 * MiB)
    store = LocalStore.open(path, 2 * MiB)
    try:
        for batch in range(20):
            items = [(key(batch * 10 + i), b"x" * 40_000) for i in range(10)]
            assert store.put_many(items) == 10
        assert store.get(key(199)) is not None  # the newest stay
        assert store.get(key(0)) is None  # the oldest went
        assert store.evictions > 0
        assert store.disk_bytes() <= 2 * MiB
    finally:
        store.close()
