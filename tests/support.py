"""Start the real things for integration tests: gunicorn with our config, the test upstream.

Readiness is polled with deadlines; nothing sleeps and hopes. The process helpers (free ports,
readiness of a master and its workers, /proc RSS) are also the benchmarks' (bench/ puts this
directory on sys.path), so they are written once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
UPSTREAM_SCRIPT = str(ROOT / "tests" / "upstream_server.py")


def trusting(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def self_signed_certificate(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, written to `directory` by openssl
    (which the caller makes sure is installed): (cert path, key path)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status `url` answers a GET with, or None when nothing answers (stdlib only)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as err:
        err.close()
        return err.code
    except (OSError, urllib.error.URLError):
        return None


def children(pid: int) -> list[int]:
    """Direct children of pid (gunicorn's workers, nginx's workers), from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def is_child(pid: int, parent: int) -> bool:
    """Whether `pid` is still a child of `parent` (a zombie not yet reaped counts): one /proc
    read, where children() scans every process; for polling one known worker's exit."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return int(stat[stat.rindex(")") + 2 :].split()[1]) == parent


def wait_service(
    proc: subprocess.Popen[Any], url: str, workers: int = 0, timeout: float = 30.0
) -> None:
    """Until `url` answers 200 and `proc` (a master) has `workers` children; RuntimeError if
    it exits first or is not ready within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before it was ready")
        if len(children(proc.pid)) >= workers and http_status(url) == 200:
            return
        time.sleep(0.05)
    raise RuntimeError(f"not ready at {url} within {timeout:.0f} s")


def rss_kb(pid: int) -> int:
    """Resident memory of pid in KiB (VmRSS), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def service_pids(master: int) -> list[int]:
    return [master, *children(master)]


def service_rss_mb(master: int) -> float:
    """RSS of a master and its workers, in MiB."""
    return sum(rss_kb(pid) for pid in service_pids(master)) / 1024.0


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns a truthy value; fail with the last error otherwise."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:
            last = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last error: {last!r})")


class FakeClock:
    """A clock a test moves by hand (`clock.now += 5`), for code that takes an injected one."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Process:
    """A child process with its output captured to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def base_env(**overrides: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PROMETHEUS_", "API_", "AUTH_", "RATE_LIMIT_", "UPSTREAM_"))
    }
    # A short graceful timeout: a test that leaves a request hanging must not make the
    # master outlive Process.stop()'s patience (it would be SIGKILLed and skip its cleanup).
    env.update(
        {
            "LOG_LEVEL": "info",
            "WORKERS": "2",
            "PYTHONUNBUFFERED": "1",
            "GRACEFUL_TIMEOUT_SECONDS": "5",
        }
    )
    env.update(overrides)
    return env


class Upstream(Process):
    def __init__(self, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
        super().__init__(
            [PYTHON, UPSTREAM_SCRIPT, "--port", str(self.port), *extra], base_env(), "upstream"
        )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(lambda: httpx.get(self.url + "/_health", timeout=1).status_code == 200)

    def seen(self, request_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/_seen/{request_id}", timeout=5)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, int]:
        return httpx.get(f"{self.url}/_stats", timeout=5).json()

    def log(self) -> list[dict[str, Any]]:
        """Every /v1 request this upstream received: path, model, time."""
        return httpx.get(f"{self.url}/_log", timeout=5).json()

    def bills(self) -> list[dict[str, Any]]:
        """What the honest "bill" models billed: {at (epoch s), tokens, output} each."""
        return httpx.get(f"{self.url}/_bills", timeout=5).json()

    def control(self, **fault: Any) -> None:
        """Inject a fault for all /v1 requests (status=500, or status=429 with retry_after)."""
        httpx.post(f"{self.url}/_control", json=fault, timeout=5).raise_for_status()


class Gunicorn(Process):
    """`gunicorn -c gunicorn.conf.py` on a free loopback port, polled until ready."""

    def __init__(self, wait: bool = True, **env: str) -> None:
        self.port = free_port()
        env.setdefault("SERVER_ADDRESS", f"127.0.0.1:{self.port}")
        env.setdefault("INSTANCE_NAME", f"test{self.port}")
        full = base_env(**env)
        super().__init__([GUNICORN, "-c", "gunicorn.conf.py"], full, "gunicorn")
        # How many workers wait_ready() waits for (WORKERS unset or not a count: at least one).
        configured = full.get("WORKERS", "")
        self.workers = int(configured) if configured.isdigit() and int(configured) > 0 else 1
        self.tls_cert: str | None = env.get("TLS_CERT_FILE")
        scheme = "https" if self.tls_cert else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What an httpx client needs to trust this server (its self-signed certificate)."""
        return trusting(self.tls_cert) if self.tls_cert else True

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until /health/ready answers 200 and the master has its configured WORKERS children:
        one worker answering does not mean the others are forked yet."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited early:\n{self.output()}")
            if len(self.worker_pids()) < self.workers:
                return False
            url = self.url + "/health/ready"
            return httpx.get(url, timeout=1, verify=self.verify).status_code == 200

        wait_until(ready, timeout=timeout)

    def worker_pids(self) -> list[int]:
        return children(self.pid)


@contextlib.contextmanager
def running(**env: str) -> Iterator[Gunicorn]:
    server = Gunicorn(**env)
    try:
        yield server
    finally:
        server.stop()


def access_line(server: Gunicorn, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The JSON access line of `request_id` in the server's output, waiting for it (lines are
    buffered per worker, ACCESS_LOG_FLUSH_MS)."""

    def find() -> dict[str, Any] | None:
        for line in server.output().splitlines():
            if request_id in line and '"edge.access"' in line:
                return json.loads(line)
        return None

    return wait_until(find, timeout=timeout)


def metric_total(server: Gunicorn, name: str, **labels: str) -> float:
    """The sum of a scrape's samples called `name` that have (at least) these labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def raw_exchange(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes or `timeout`; return everything read."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


_SDK_CLIENTS: list[Any] = []


def sdk_client(url: str, key: str, **options: Any) -> Any:
    """An official openai SDK client for `url`, closed after the test by conftest (an
    unclosed one leaks its pooled sockets)."""
    import openai

    options.setdefault("max_retries", 0)
    options.setdefault("timeout", 20)
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, **options)
    _SDK_CLIENTS.append(client)
    return client


def close_sdk_clients() -> None:
    while _SDK_CLIENTS:
        _SDK_CLIENTS.pop().close()


def assert_envelope(
    response: httpx.Response, status: int, code: str | None = None, type_: str | None = None
) -> dict[str, Any]:
    """The response is `status` with the OpenAI error envelope (and an x-request-id)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if type_ is not None:
        assert error["type"] == type_
    assert "x-request-id" in response.headers
    return error


REDIS_SERVER = shutil.which("redis-server")


class RedisServer(Process):
    """A throw-away redis-server on a free loopback port: no persistence, no config file.

    `restart()` starts it again on the same port (after `kill()`), as a crashed Redis would
    come back under its supervisor.
    """

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        if REDIS_SERVER is None:
            import pytest

            pytest.skip("redis-server is not installed")
        self.port = port or free_port()
        self.password = password
        argv = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
        ]  # fmt: skip
        if password:
            argv += ["--requirepass", password]
        self._argv = argv
        super().__init__(argv, base_env(), "redis")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.wait_ready()

    def command(self, *args: str) -> str:
        """One command through redis-cli-free RESP over a socket; the reply as text."""
        payload = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = str(arg).encode()
            payload += b"$%d\r\n%s\r\n" % (len(data), data)
        if self.password:
            payload = (
                b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(self.password), self.password.encode())
                + payload
            )
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        reply = b"".join(chunks).decode(errors="replace")
        if self.password:
            reply = reply.split("\r\n", 1)[1]
        return reply

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited:\n{self.output()}")
            return self.command("PING").startswith("+PONG")

        wait_until(ready, timeout=15)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def restart(self) -> None:
        self._log.close()
        Process.__init__(self, self._argv, base_env(), "redis")
        self.wait_ready()
