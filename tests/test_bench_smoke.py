"""Smoke test of the benchmark suite: `bench/run.py --quick` runs end to end.

It starts nginx, the floor forwarder and edge, drives ~1 s phases against each, and must print
its one table with every row and leave no process behind. No figure is checked: numbers from
one-second runs on a shared machine mean nothing (run `python bench/run.py` for those).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MISSING = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
ROWS = (
    "Throughput, c=64 (req/s)",
    "CPU time per request under load (server)",
    "Throughput errors (non-2xx / socket)",
    "Latency c=1 p50",
    "Latency c=1 p99",
    "Latency at 500 req/s p50",
    "Latency at 500 req/s p99",
    "Streaming TTFB, first SSE event (p50)",
    "Streaming: paced chunks received separately",
    "Streaming chunk gaps p50",
    "RSS idle (master + workers)",
    "RSS after load",
    "RSS with 100 idle keep-alive conns",
    "Idle CPU over 1 s (master + workers)",
    "Rate-limit decision p50 / p99",
    "Throughput on the Redis backend, c=64",
    "Routing on: added per request p50 / p99",
    "Response cache: hit vs miss path, c=64",
)


@pytest.mark.slow
@pytest.mark.skipif(
    bool(MISSING),
    reason=f"benchmark tools not installed: {', '.join(MISSING)} (apt-get install wrk nginx)",
)
def test_quick_benchmark_prints_its_table_and_cleans_up(tmp_path: Path) -> None:
    results = tmp_path / "results.md"
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--no-install",
            "--idle-connections",
            "100",
            "--results",
            str(results),
            "--out-dir",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"

    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "Figure"
    for row in ROWS:
        assert any(line.startswith(f"| {row}") for line in table), f"no row {row!r}"
    assert "targets met" in done.stdout
    # The micro-benchmark scripts and the Redis phase ran (a figure, whatever it is), not "n/a".
    measured = ["Routing on: added per request", "Response cache: hit vs miss path"]
    if shutil.which("redis-server"):
        measured.append("Throughput on the Redis backend")
    for row in measured:
        line = next(line for line in table if line.startswith(f"| {row}"))
        assert line.split("|")[4].strip() not in ("n/a", "\u2013"), line  # n/a or an en dash

    written = results.read_text()
    assert "Date:" in written and "Machine:" in written
    assert table[2] in written  # the same table as printed

    # The cache phase's own table, printed and written; its hit run was all hits, its miss run
    # all misses (edge's lookup counters), so the hit/miss figures are what they say.
    assert "\nCache (edge with CACHE_BACKEND=local" in done.stdout
    assert "## Response cache: the hit path against the miss path" in written
    lookups = next(line for line in table if line.startswith("| Lookups counted"))
    assert "hit runs 100.00 % hit" in lookups and "miss runs 100.00 % miss" in lookups, lookups
    assert lookups in written

    raw = json.loads((out / "raw.json").read_text())
    assert raw["pids"], "no process recorded"
    for pid in raw["pids"]:  # each server ran in its own process group; none may remain
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert (out / "edge.log").stat().st_size > 0  # the access log went to a real file


def test_bench_streams_holds_every_stream_it_opens() -> None:
    """`bench/streams.py` on a few streams: every one gets its first event, and the per-stream
    memory figure is printed."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "streams.py"), "--streams", "40", "--batch", "20"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "{'first event': 40}" in done.stdout
    assert "KB per stream" in done.stdout
