"""The Prometheus multiprocess directory under real gunicorn: private, checked, removed on
exit and after a failed start, and compacted when workers come and go (counts exact)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import GUNICORN, ROOT, Gunicorn, base_env, free_port, is_child, wait_until

HEALTH_200 = {"route": "/health", "method": "GET", "status": "200"}


def no_auth(**env: str) -> dict[str, str]:
    env.setdefault("AUTH_ENABLED", "false")
    env.setdefault("RATE_LIMIT_ENABLED", "false")
    env.setdefault("WORKERS", "1")
    return env


def private_dirs(instance: str) -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f"llm-edge-proxy.{instance}.*.metrics"))


def counter(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def run_to_exit(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GUNICORN, "-c", "gunicorn.conf.py"], cwd=ROOT, env=base_env(**env),
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_default_directory_is_private_unpredictable_and_removed_on_exit():
    server = Gunicorn(**no_auth())
    instance = f"test{server.port}"
    try:
        found = private_dirs(instance)
        assert len(found) == 1, found
        path = found[0]
        # tempfile.mkdtemp: a random part after the instance, not the master's pid.
        assert path.name != f"llm-edge-proxy.{instance}.{server.pid}.metrics"
        info = os.lstat(path)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.geteuid()
        assert httpx.get(server.url + "/metrics", timeout=5).status_code == 200
    finally:
        assert server.stop() == 0
    assert not path.exists()


def test_failed_bind_leaves_no_directory_and_no_table():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        instance = f"test{port}"
        result = run_to_exit(
            no_auth(
                SERVER_ADDRESS=f"127.0.0.1:{port}", INSTANCE_NAME=instance,
                RATE_LIMIT_ENABLED="true",
            )
        )  # fmt: skip
    assert result.returncode != 0
    assert "Address already in use" in result.stdout + result.stderr
    assert private_dirs(instance) == []
    assert not [
        p for p in Path("/dev/shm").iterdir() if p.name.startswith(f"llm-edge-proxy.{instance}.")
    ]


def _refused(env: dict[str, str], *fragments: str, port: int | None = None) -> None:
    port = free_port() if port is None else port  # the instance is test<port>
    result = run_to_exit(
        no_auth(SERVER_ADDRESS=f"127.0.0.1:{port}", INSTANCE_NAME=f"test{port}", **env)
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("llm-edge-proxy:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert private_dirs(f"test{port}") == []


def test_operator_directory_that_is_a_symlink_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "metrics"
    link.symlink_to(target)
    _refused({"PROMETHEUS_MULTIPROC_DIR": str(link)}, "PROMETHEUS_MULTIPROC_DIR", "symlink")
    assert list(target.iterdir()) == []  # nothing written through it


def test_operator_directory_writable_by_others_is_refused(tmp_path):
    path = tmp_path / "metrics"
    path.mkdir()
    path.chmod(0o777)
    _refused({"PROMETHEUS_MULTIPROC_DIR": str(path)}, "PROMETHEUS_MULTIPROC_DIR", "writable")
    path.chmod(0o720)
    _refused({"PROMETHEUS_MULTIPROC_DIR": str(path)}, "writable by group")


def test_directory_owned_by_someone_else_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    port = free_port()
    planted = runtime / f"metrics.test{port}"
    planted.mkdir(mode=0o700)
    os.chown(planted, 65534, 65534)  # nobody
    _refused(
        {"RUNTIME_DIRECTORY": str(runtime)}, "RUNTIME_DIRECTORY", "owned by uid 65534", port=port
    )
    assert planted.is_dir()  # refused, and not removed either


def test_runtime_directory_symlink_is_refused(tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    port = free_port()
    (runtime / f"metrics.test{port}").symlink_to(tmp_path)
    _refused({"RUNTIME_DIRECTORY": str(runtime)}, "RUNTIME_DIRECTORY", "symlink", port=port)


def test_runtime_directory_metrics_is_created_private_and_removed(tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    server = Gunicorn(**no_auth(RUNTIME_DIRECTORY=str(runtime), INSTANCE_NAME="unit-a"))
    try:
        path = runtime / "metrics.unit-a"  # per instance: units may share a RuntimeDirectory
        assert [entry.name for entry in runtime.iterdir()] == ["metrics.unit-a"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert (path / ".lock").exists()
    finally:
        assert server.stop() == 0
    assert not path.exists()


def _second_start(env: dict[str, str]) -> str:
    """Start another master with `env` (on a port of its own); it must refuse with exit code 2
    and one line; return that line. Should it start instead, it and its workers (its own
    session) are killed: a master killed alone would leave its uvicorn workers running."""
    proc = subprocess.Popen(
        [GUNICORN, "-c", "gunicorn.conf.py"], cwd=ROOT, text=True, start_new_session=True,
        env=base_env(**{**env, "SERVER_ADDRESS": f"127.0.0.1:{free_port()}"}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    assert proc.returncode == 2, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("llm-edge-proxy:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("source", ["PROMETHEUS_MULTIPROC_DIR", "RUNTIME_DIRECTORY"])
def test_a_second_instance_on_the_same_directory_refuses_to_start(tmp_path, source):
    """Two instances with the same INSTANCE_NAME (and so the same metrics directory): the
    second refuses, naming the clash, and touches nothing; the first keeps its counts and its
    directory, also across a reload, and starts again once stopped."""
    instance = f"twin{free_port()}"
    if source == "PROMETHEUS_MULTIPROC_DIR":
        path = tmp_path / "metrics"
        env = no_auth(INSTANCE_NAME=instance, PROMETHEUS_MULTIPROC_DIR=str(path))
    else:
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700)
        path = runtime / f"metrics.{instance}"
        env = no_auth(INSTANCE_NAME=instance, RUNTIME_DIRECTORY=str(runtime))
    first = Gunicorn(**env)
    try:
        for _ in range(3):
            assert httpx.get(first.url + "/health", timeout=5).status_code == 200
        # The lock is the master's: a reload (new workers, old ones gone and folded) keeps it.
        (old,) = first.worker_pids()
        first.signal(signal.SIGHUP)
        wait_until(lambda: not is_child(old, first.pid) and len(first.worker_pids()) == 1)
        first.wait_ready()
        for _ in range(2):
            assert httpx.get(first.url + "/health", timeout=5).status_code == 200
        files = sorted(p.name for p in path.iterdir())
        assert f"counter_{first.worker_pids()[0]}.db" in files and ".master.lock" in files

        line = _second_start(env)
        assert str(path) in line and f"INSTANCE_NAME={instance}" in line, line
        assert f"in use by another master (pid {first.pid})" in line, line
        assert source in line, line

        assert sorted(p.name for p in path.iterdir()) == files  # nothing wiped, nothing removed
        assert stat.S_IMODE(os.stat(path / ".master.lock").st_mode) == 0o600
        response = httpx.get(first.url + "/metrics", timeout=5)
        assert response.status_code == 200
        assert counter(response.text, "edge_requests_total", **HEALTH_200) == 5
    finally:
        assert first.stop() == 0
    again = Gunicorn(**env)  # the lock is free once the master and its workers are gone
    try:
        assert httpx.get(again.url + "/metrics", timeout=5).status_code == 200
    finally:
        assert again.stop() == 0


def _gone(pid: int) -> bool:
    """Exited: no process, or a zombie (its descriptors, and so its locks, are released)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return True
    return fields[0] in ("Z", "X")


def test_a_sigkilled_master_frees_the_directory_once_its_workers_are_gone(tmp_path):
    """The workers inherit the master's lock. While a SIGKILLed master's workers live (here:
    stopped), a new master is refused, naming the dead master; the workers notice their
    master is gone at their next heartbeat and exit by themselves (uvicorn's workers never
    did), and the directory is free again."""
    metrics = tmp_path / "metrics"
    env = no_auth(INSTANCE_NAME=f"killed{free_port()}", PROMETHEUS_MULTIPROC_DIR=str(metrics))
    first = Gunicorn(**env)
    workers = first.worker_pids()
    assert workers
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        first.signal(signal.SIGKILL)
        first.proc.wait(10)
        line = _second_start(env)
        assert f"the workers of a master that was killed (pid {first.pid}" in line, line
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: all(_gone(pid) for pid in workers), timeout=60)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        first.stop()
    again = Gunicorn(**env)
    try:
        assert httpx.get(again.url + "/metrics", timeout=5).status_code == 200
    finally:
        assert again.stop() == 0


class Scraper(threading.Thread):
    """Scrapes /metrics in a loop (its own connections) and keeps (value, sent so far)."""

    def __init__(self, url: str, sent: Callable[[], int]) -> None:
        super().__init__(daemon=True)
        self.url, self.sent = url, sent
        self.samples: list[tuple[float, int, int]] = []  # (value, sent before, sent after)
        self.stop = threading.Event()

    def run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self.url, timeout=10, limits=limits) as client:
            while not self.stop.is_set():
                before = self.sent()
                try:
                    response = client.get("/metrics")
                except httpx.HTTPError:
                    continue  # the answering worker was draining; not a count
                if response.status_code == 200:
                    value = counter(response.text, "edge_requests_total", **HEALTH_200)
                    self.samples.append((value, before, self.sent()))


@pytest.mark.slow
def test_files_stay_bounded_and_counts_exact_over_many_reloads(tmp_path):
    """100 HUPs with one worker: each reload is polled to completion (new worker serving, old
    one reaped and folded); a known number of requests between reloads; the file count stays
    what it was after the first reload, and edge_requests_total is exact, at the end and in
    every scrape taken meanwhile (never lower than what was answered before the scrape, never
    higher than what was sent by its end). With one worker a scrape seldom overlaps a fold (the
    new worker is still booting while the old one is folded); the next test makes them overlap."""
    reloads, per_reload = 100, 3
    metrics = tmp_path / "metrics"
    server = Gunicorn(**no_auth(PROMETHEUS_MULTIPROC_DIR=str(metrics), LOG_LEVEL="warning"))
    sent = 0
    scraper = Scraper(server.url, lambda: sent)
    try:
        counts = []
        # No keep-alive: an idle connection would hold the old worker in its graceful shutdown.
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=server.url, timeout=10, limits=limits) as client:

            def send() -> None:
                nonlocal sent
                for _ in range(per_reload):
                    assert client.get("/health").status_code == 200
                    sent += 1

            send()
            scraper.start()
            for _ in range(reloads):
                (old,) = server.worker_pids()

                def reloaded(old: int = old) -> bool:
                    # Cheap enough to poll every 5 ms (children() scans all of /proc): the old
                    # worker reaped and folded; the one-worker check follows once.
                    return (
                        not is_child(old, server.pid)
                        and not (metrics / f"counter_{old}.db").exists()
                        and not (metrics / f"histogram_{old}.db").exists()
                    )

                server.signal(signal.SIGHUP)
                wait_until(reloaded, timeout=30, interval=0.005)
                server.wait_ready()
                pids = server.worker_pids()
                assert len(pids) == 1 and pids[0] != old, (old, pids)
                send()
                counts.append(len([p for p in metrics.iterdir() if p.name.endswith(".db")]))
            scraper.stop.set()
            scraper.join(15)
            text = client.get("/metrics").text
        # Scrapes are answered too, but they are counted under route /metrics.
        assert counter(text, "edge_requests_total", **HEALTH_200) == sent
        assert len(scraper.samples) >= reloads, len(scraper.samples)
        for value, before, after in scraper.samples:
            # A request is counted just before its response is sent, so one may be counted
            # and not yet seen as answered by the sender.
            assert before <= value <= after + 1, (value, before, after)
        assert counts[-1] <= counts[0] + 1, counts
        assert max(counts) <= counts[0] + 2, counts
        names = sorted(p.name for p in metrics.iterdir())
        assert "counter_archive.db" in names and "histogram_archive.db" in names, names
    finally:
        scraper.stop.set()
        assert server.stop() == 0


@pytest.mark.slow
def test_scrapes_stay_exact_while_workers_exit_and_are_folded(tmp_path):
    """Two workers; one after another is stopped (SIGTERM) and replaced by gunicorn while the
    other keeps answering scrapes, so scrapes run while the master folds the dead worker's
    files. Every scrape lies between what was answered before it and what was sent by its end;
    no count lost or doubled."""
    exits, per_exit = 25, 3
    metrics = tmp_path / "metrics"
    server = Gunicorn(
        **no_auth(PROMETHEUS_MULTIPROC_DIR=str(metrics), LOG_LEVEL="warning", WORKERS="2")
    )
    sent = 0
    scrapers = [Scraper(server.url, lambda: sent) for _ in range(2)]
    try:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=server.url, timeout=10, limits=limits) as client:

            def send() -> None:
                nonlocal sent
                for _ in range(per_exit):
                    assert client.get("/health").status_code == 200
                    sent += 1

            send()
            for scraper in scrapers:
                scraper.start()
            for _ in range(exits):
                pids = server.worker_pids()
                assert len(pids) == 2, pids
                victim = pids[0]
                os.kill(victim, signal.SIGTERM)

                def folded(victim: int = victim) -> bool:  # cheap: polled every 5 ms
                    return (
                        not is_child(victim, server.pid)
                        and not (metrics / f"counter_{victim}.db").exists()
                    )

                wait_until(folded, timeout=30, interval=0.005)
                wait_until(lambda: len(server.worker_pids()) == 2, timeout=30)  # replaced
                send()
            for scraper in scrapers:
                scraper.stop.set()
                scraper.join(15)
            text = client.get("/metrics").text
        assert counter(text, "edge_requests_total", **HEALTH_200) == sent
        samples = [sample for scraper in scrapers for sample in scraper.samples]
        assert len(samples) >= exits, len(samples)
        for value, before, after in samples:
            assert before <= value <= after + 1, (value, before, after)
        db_files = [p.name for p in metrics.iterdir() if p.name.endswith(".db")]
        assert len(db_files) <= 2 * 4 + 3, db_files  # two live workers' files + the archives
    finally:
        for scraper in scrapers:
            scraper.stop.set()
        assert server.stop() == 0
