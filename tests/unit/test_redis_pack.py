"""edge.ratelimit.redis.pack_command writes what redis-py's own packer writes."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection

from edge.ratelimit.redis import BUCKET_SCRIPT, SCRIPT_SHA, pack_command


@pytest.mark.parametrize(
    "args",
    [
        ("EVALSHA", SCRIPT_SHA, 1, "llm-edge-proxy:b:00ff", "0.5", 100, "1", "take"),
        ("EVAL", BUCKET_SCRIPT, 1, "k", repr(1e-9), 0, "-2.5", "adjust"),
        ("SCRIPT", "LOAD", BUCKET_SCRIPT),
        ("SET", "ключ", b"\x00\r\n", ""),
        ("PING",),
    ],
)
def test_packs_as_redis_py_does(args):
    assert pack_command(*args) == b"".join(Connection().pack_command(*args))
