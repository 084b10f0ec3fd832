"""The benchmark's targets: what a run starts, how each one starts, and when it is ready.

  direct  nginx answering a static chat.completion (2 workers, keep-alive, private prefix)
  floor   bench/floor_app.py: Falcon ASGI + aiohttp forwarder, same gunicorn/uvicorn worker
  edge    this proxy (gunicorn -c gunicorn.conf.py): every feature on, or some off (ABLATIONS),
          or on RATE_LIMIT_BACKEND=redis against a local redis-server (the redis phase)

Every process runs in its own session (process group) and is stopped in reverse order. The
generic helpers (free ports, readiness, /proc RSS) are shared with the tests: tests/support.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
# The process helpers shared with the tests; bench/runner.py imports them from here.
from support import (  # noqa: F401
    free_port,
    http_status,
    service_pids,
    service_rss_mb,
    wait_service,
)

from edge.config import SETTINGS

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
GUNICORN = (
    str(Path(PYTHON).with_name("gunicorn"))
    if Path(PYTHON).with_name("gunicorn").exists()
    else shutil.which("gunicorn") or "gunicorn"
)
KEY = "bench-key"
BODY = '{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = '{"model":"bench","stream":true,"messages":[{"role":"user","content":"hi"}]}'
CHAT_PATH = "/v1/chat/completions"
TOOLS = {"wrk": "wrk", "nginx": "nginx"}  # binary -> Debian package
WORKERS = 2
# The static answer nginx returns (no ' or $: it sits in a quoted nginx string).
UPSTREAM_ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    },
    separators=(",", ":"),
)
# The same answer as an Anthropic message (the translate phase's anthropic provider).
ANTHROPIC_ANSWER = json.dumps(
    {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": "bench",
        "content": [{"type": "text", "text": "Hello from the bench upstream."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 7},
    },
    separators=(",", ":"),
)
# Environment variables edge reads: cleared so the caller's shell cannot change the benchmark.
# Every setting edge reads (edge.config.SETTINGS) and the environment gunicorn.conf.py or
# systemd hand it: cleared, so the caller's shell cannot change what is measured.
EDGE_VARIABLES = (
    *(setting.variable for setting in SETTINGS),
    "PROMETHEUS_MULTIPROC_DIR", "RUNTIME_DIRECTORY", "CREDENTIALS_DIRECTORY", "GUNICORN_CMD_ARGS",
)  # fmt: skip
# Edge with one feature off at a time, then all four off (the ablation phase): each feature's
# cost is the difference to "all features on", measured beside the floor in the same run.
ABLATIONS: tuple[tuple[str, dict[str, str]], ...] = (
    ("all features on", {}),
    ("metrics off", {"ENABLE_METRICS": "false"}),
    ("access log off", {"LOG_LEVEL": "warning"}),
    ("rate limit off", {"RATE_LIMIT_ENABLED": "false"}),
    ("auth off", {"AUTH_ENABLED": "false"}),
    (
        "all four off",
        {
            "ENABLE_METRICS": "false",
            "LOG_LEVEL": "warning",
            "RATE_LIMIT_ENABLED": "false",
            "AUTH_ENABLED": "false",
        },
    ),
)


# Edge as every run starts it: every feature on, a key, and a rate limit too large to refuse.
EDGE_FEATURES_ON = {
    "API_KEYS": KEY,
    "RATE_LIMIT_RPM": "100000000",
    "RATE_LIMIT_BURST": "100000000",
    "ENABLE_METRICS": "true",
    "AUTH_ENABLED": "true",
    "RATE_LIMIT_ENABLED": "true",
    "LOG_LEVEL": "info",
}


class BenchError(RuntimeError):
    """A target did not start or a load tool failed: the run stops with this message."""


# ----------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


class Processes:
    """Every server this run starts: own session (process group), stopped in reverse order."""

    def __init__(self) -> None:
        self.running: list[Proc] = []
        self.started: list[int] = []  # every pid, for raw.json (the smoke test checks them)

    def start(
        self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> Proc:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.running.append(proc)
        self.started.append(popen.pid)
        return proc

    def stop(self, proc: Proc, timeout: float = 15.0) -> None:
        if proc in self.running:
            self.running.remove(proc)
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout)
        # Whatever is left in the group (a worker that outlived its master) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)


def wait_ready(proc: Proc, url: str, workers: int, timeout: float = 30.0) -> None:
    """Until `url` answers 200 and the master has all its workers (then a short settle)."""
    try:
        wait_service(proc.popen, url, workers, timeout)
    except RuntimeError as exc:
        raise BenchError(f"{proc.name}: {exc}; see {proc.log}") from exc
    # Each worker answers before counting as ready: a few more probes, then settle.
    for _ in range(4 * workers):
        http_status(url)
    time.sleep(0.5)


def cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of stat)


def established(port: int) -> int:
    """Server-side ESTABLISHED TCP sockets on 127.0.0.1:port (from /proc/net/tcp)."""
    count = 0
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            parts = line.split()
            if parts[1] == local and parts[3] == "01":
                count += 1
    return count


# ----------------------------------------------------------------------------- the targets


@dataclass
class Target:
    name: str
    proc: Proc
    base: str  # http://127.0.0.1:PORT
    port: int
    rss: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base + CHAT_PATH


def start_nginx(procs: Processes, tmp: Path, out: Path, port: int, answer: str) -> Target:
    prefix = tmp / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf.write_text(
        f"""worker_processes {WORKERS};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/json;
    keepalive_timeout 65;
    keepalive_requests 100000000;
{temp_paths}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 '{answer}'; }}
        # An OTLP/HTTP collector that takes every export and keeps nothing (the tracing
        # phase): what export costs the gateway, not what a collector costs the host.
        location = /v1/traces {{ return 200 ""; }}
        # An Anthropic provider (the translate phase): the same answer as a Messages answer.
        location = /anthropic/v1/messages {{ return 200 '{ANTHROPIC_ANSWER}'; }}
    }}
}}
"""
    )
    argv = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
            "-g", "daemon off;"]  # fmt: skip
    proc = procs.start("nginx", argv, out / "nginx.log")
    target = Target("direct", proc, f"http://127.0.0.1:{port}", port)
    deadline = time.monotonic() + 15
    while http_status(target.base + "/") != 200:
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"nginx did not start; see {prefix / 'error.log'} and {proc.log}")
        time.sleep(0.1)
    return target


def start_floor(
    procs: Processes, out: Path, port: int, upstream: str, log_name: str = "floor.log"
) -> Target:
    env = dict(os.environ)
    env.update(
        FLOOR_BIND=f"127.0.0.1:{port}", FLOOR_WORKERS=str(WORKERS), FLOOR_UPSTREAM_URL=upstream
    )
    argv = [GUNICORN, "-c", str(BENCH / "floor_gunicorn.conf.py")]
    proc = procs.start("floor", argv, out / log_name, env)
    target = Target("floor", proc, f"http://127.0.0.1:{port}", port)
    wait_ready(proc, target.base + "/health/ready", WORKERS)
    return target


def start_edge(
    procs: Processes,
    out: Path,
    port: int,
    upstream: str,
    instance: str,
    log_name: str,
    extra_env: dict[str, str] | None = None,
) -> Target:
    env = {k: v for k, v in os.environ.items() if k not in EDGE_VARIABLES}
    env.update(
        SERVER_ADDRESS=f"127.0.0.1:{port}",
        WORKERS=str(WORKERS),
        UPSTREAM_URL=upstream,
        INSTANCE_NAME=instance,
    )
    env.update(EDGE_FEATURES_ON)
    env.update(extra_env or {})  # e.g. a feature switched off, to see what it costs
    argv = [GUNICORN, "-c", "gunicorn.conf.py"]
    proc = procs.start("edge", argv, out / log_name, env)
    target = Target("edge", proc, f"http://127.0.0.1:{port}", port)
    wait_ready(proc, target.base + "/health/ready", WORKERS)
    return target


def start_sse_upstream(
    procs: Processes, out: Path, port: int, pace: float, chunks: int
) -> tuple[Proc, str]:
    script = ROOT / "tests" / "upstream_server.py"
    if not script.is_file():
        raise BenchError(f"{script} not found")
    argv = [PYTHON, str(script), "--port", str(port), "--pace", str(pace),
            "--chunks", str(chunks)]  # fmt: skip
    proc = procs.start("sse-upstream", argv, out / "sse-upstream.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while http_status(base + "/_health") != 200:
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"tests/upstream_server.py did not start; see {proc.log}")
        time.sleep(0.1)
    return proc, base
