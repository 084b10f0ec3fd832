from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

_TEST_TABLE = re.compile(
    r"llm-edge-proxy\.test\d+\.(?:breakers\.|parallel\.)?(\d+)(?:\.[0-9a-f]+)?"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding a `slow` test first, otherwise collection order: the test processes
    (pytest-xdist, one file at a time in this order) start the longest files at once instead
    of ending the run on them."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(autouse=True)
def _close_sdk_clients():
    yield
    from support import close_sdk_clients

    close_sdk_clients()


@pytest.fixture(scope="session", autouse=True)
def _no_stale_test_tables():
    """After the run, remove rate-limit tables of test masters that are gone (a master killed
    outright cannot unlink its own); the product does the same per instance at start."""
    yield
    from edge.shm import SHM_DIR, pid_alive

    if not os.path.isdir(SHM_DIR):
        return
    for entry in os.listdir(SHM_DIR):
        match = _TEST_TABLE.fullmatch(entry)
        if match and not pid_alive(int(match[1])):
            Path(SHM_DIR, entry).unlink(missing_ok=True)
