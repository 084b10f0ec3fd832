"""Compaction of the multiprocess directory (edge/observability/metric_files.py), and the
prometheus_client internals it relies on: if one of these moves, this file fails first."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
from importlib.metadata import version
from pathlib import Path

import pytest
from support import wait_until

from edge.observability import metric_files
from edge.observability.metric_files import MetricsDirError, check_private_dir, fold

# A "worker": writes one value of every kind in multiprocess mode, then exits.
WORKER = """
import os, sys
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
r = CollectorRegistry()
n = int(sys.argv[1])
c = Counter("reqs", "h", ["route"], registry=r)
c.labels("/a").inc(n)
c.labels("/b").inc(2 * n)
h = Histogram("lat", "h", buckets=(0.1, 1.0), registry=r)
for v in (0.0625, 0.5, 5.0)[: 1 + n % 3]:  # binary fractions: sums exact in any order
    h.observe(v * n)
Summary("size", "h", registry=r).observe(10 * n)
Gauge("inflight", "h", multiprocess_mode="livesum", registry=r).set(n)
Gauge("build", "h", multiprocess_mode="max", registry=r).set(n)
Gauge("low", "h", multiprocess_mode="min", registry=r).set(n)
Gauge("total", "h", multiprocess_mode="sum", registry=r).set(n)
Gauge("last", "h", multiprocess_mode="mostrecent", registry=r).set(n)
print(os.getpid())
"""


def run_worker(directory: Path, n: int) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(n)], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def scrape(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.multiprocess import MultiProcessCollector

    # Skip a file a starting worker has created but not sized yet (as edge's collector does).
    files = [str(p) for p in directory.glob("*.db") if p.stat().st_size > 0]
    result = {}
    for family in MultiProcessCollector.merge(files, accumulate=True):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            result[(sample.name, labels)] = sample.value
    return result


def db_names(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("*.db")}


def test_prometheus_client_version_is_the_tested_range():
    major, minor = (int(part) for part in version("prometheus_client").split(".")[:2])
    assert (major, minor) >= (0, 21) and (major, minor) < (0, 27), (
        "prometheus_client outside the range metric_files.py was tested with; re-run this file"
        " and update pyproject.toml"
    )


def test_prometheus_client_internals_relied_on(tmp_path):
    from prometheus_client import multiprocess
    from prometheus_client.mmap_dict import MmapedDict

    assert callable(MmapedDict.read_all_values_from_file)
    assert callable(MmapedDict.write_value) and callable(MmapedDict.close)
    assert callable(multiprocess.mark_process_dead)
    pid = run_worker(tmp_path, 1)
    # The naming the fold parses: <type>_<pid>.db, gauges gauge_<mode>_<pid>.db.
    assert db_names(tmp_path) == {
        f"counter_{pid}.db", f"histogram_{pid}.db", f"summary_{pid}.db",
        f"gauge_livesum_{pid}.db", f"gauge_max_{pid}.db", f"gauge_min_{pid}.db",
        f"gauge_sum_{pid}.db", f"gauge_mostrecent_{pid}.db",
    }  # fmt: skip
    rows = list(MmapedDict.read_all_values_from_file(str(tmp_path / f"counter_{pid}.db")))
    assert {(len(row), type(row[0]), row[1]) for row in rows} == {(4, str, 1.0), (4, str, 2.0)}
    # A file written by MmapedDict is read back by the collector like a worker's.
    writer = MmapedDict(str(tmp_path / "counter_archive.db"))
    writer.write_value(rows[0][0], 5.0, 0.0)
    writer.close()
    assert scrape(tmp_path)[("reqs_total", (("route", "/a"),))] == 6.0


def test_fold_keeps_every_total_exact_and_removes_dead_files(tmp_path):
    from prometheus_client import multiprocess

    metric_files.prepare(tmp_path)
    pids = [run_worker(tmp_path, n) for n in (1, 2, 3, 4)]
    for pid in pids[:3]:
        multiprocess.mark_process_dead(pid, str(tmp_path))  # what child_exit does first
    before = scrape(tmp_path)
    assert fold(tmp_path, live_pids=[pids[3]]) == 3 * 7  # 3 workers x 7 foldable files
    assert scrape(tmp_path) == before
    assert not any(str(pid) in name for pid in pids[:3] for name in db_names(tmp_path))
    archives = {name for name in db_names(tmp_path) if "archive" in name}
    assert archives == {
        "counter_archive.db", "histogram_archive.db", "summary_archive.db",
        "gauge_max_archive.db", "gauge_min_archive.db", "gauge_sum_archive.db",
        "gauge_mostrecent_archive.db",
    }  # fmt: skip
    # The last worker dies too: folded into the same archives, totals unchanged.
    multiprocess.mark_process_dead(pids[3], str(tmp_path))
    before = {k: v for k, v in scrape(tmp_path).items() if k[0] != "inflight"}
    assert fold(tmp_path, live_pids=[]) == 7
    assert scrape(tmp_path) == before
    assert db_names(tmp_path) == archives
    assert before[("reqs_total", (("route", "/a"),))] == 1 + 2 + 3 + 4
    assert before[("build", ())] == 4 and before[("low", ())] == 1
    assert before[("total", ())] == 10 and before[("last", ())] == 4
    # Nothing dead left: a fold is a no-op.
    assert fold(tmp_path, live_pids=[]) == 0
    assert scrape(tmp_path) == before


def test_fold_waits_for_a_scrape_and_changes_nothing_if_it_cannot(tmp_path):
    metric_files.prepare(tmp_path)
    run_worker(tmp_path, 1)
    names = db_names(tmp_path)
    scraper = metric_files.open_lock(tmp_path)
    try:
        assert metric_files.try_lock(scraper, exclusive=False)
        assert fold(tmp_path, live_pids=[], lock_timeout_s=0.05) is None
        assert db_names(tmp_path) == names
    finally:
        os.close(scraper)
    assert fold(tmp_path, live_pids=[]) == 7


def test_scrapes_during_folds_always_see_exact_totals(tmp_path):
    """Workers keep dying and being folded while a scraper reads under the shared lock."""
    metric_files.prepare(tmp_path)
    seen: list[float] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            fd = metric_files.open_lock(tmp_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                seen.append(scrape(tmp_path).get(("reqs_total", (("route", "/a"),)), 0.0))
            finally:
                os.close(fd)

    thread = threading.Thread(target=scraper)
    thread.start()
    expected = [0.0]
    try:
        for n in range(1, 13):
            run_worker(tmp_path, n)
            expected.append(expected[-1] + n)
            # Without the lock within its 1 s, fold() changes nothing and returns None (the
            # master folds those files at the next worker exit): on a loaded machine this
            # tight scraper loop can keep it out that long, so fold again until one has it.
            wait_until(lambda: fold(tmp_path, live_pids=[]) is not None, timeout=60)
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 12
    assert set(seen) <= set(expected), sorted(set(seen) - set(expected))


def test_fold_leaves_a_torn_file_in_place(tmp_path):
    run_worker(tmp_path, 1)
    metric_files.prepare(tmp_path)  # wipes
    assert db_names(tmp_path) == set()
    pid = run_worker(tmp_path, 2)
    torn = tmp_path / "counter_999999.db"
    torn.write_bytes(b"\xff\xff\x00\x00" + b"\x00" * 60)  # `used` beyond the file
    fold(tmp_path, live_pids=[pid])
    assert torn.exists()


def test_private_dir_checks(tmp_path):
    me = [os.geteuid()]
    good = tmp_path / "good"
    good.mkdir(mode=0o700)
    check_private_dir(good, me)
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(MetricsDirError, match="symlink"):
        check_private_dir(link, me)
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o757)
    with pytest.raises(MetricsDirError, match="writable by group or others"):
        check_private_dir(loose, me)
    afile = tmp_path / "file"
    afile.touch()
    with pytest.raises(MetricsDirError, match="not a directory"):
        check_private_dir(afile, me)
    with pytest.raises(MetricsDirError, match="owned by uid"):
        check_private_dir(good, [os.geteuid() + 1])
    with pytest.raises(MetricsDirError, match="does not exist"):
        check_private_dir(tmp_path / "missing", me)
