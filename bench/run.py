#!/usr/bin/env python3
# ruff: noqa: RUF001 - the table prints the multiplication sign, dashes and micro on purpose
"""llm-edge-proxy benchmark: direct upstream vs a no-feature floor vs edge, one table.

    /work/venv/bin/python bench/run.py            # the full run (about 3-4 minutes)
    python bench/run.py --quick                   # ~1 s phases: checks the suite works

Three targets under the same load, all on 127.0.0.1:

  direct  nginx answering a static chat.completion (2 workers, keep-alive, private prefix)
  floor   bench/floor_app.py: Falcon ASGI + aiohttp forwarder, same gunicorn/uvicorn worker
  edge    this proxy (gunicorn -c gunicorn.conf.py): auth, rate limits, metrics, JSON access log

Prints one table (figures from this run, the target beside each with ✅/❌) and writes it with
the date and the machine to bench/results.md. Every process it starts runs in its own process
group and is stopped on exit, Ctrl-C or SIGTERM. Needs wrk and nginx (Debian packages);
when one is missing and this runs as root with apt-get, they are installed first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

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
PHASES = ("throughput", "latency", "rate", "stream", "memory", "cpu", "limiter", "redis", "routing")
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
# Environment variables edge reads: cleared so the caller's shell cannot change the benchmark.
EDGE_VARIABLES = (
    "SERVER_ADDRESS", "SERVER_TIMEOUT_SECONDS", "MAX_REQUEST_SIZE", "WORKERS", "WEB_CONCURRENCY",
    "INSTANCE_NAME", "AUTH_ENABLED", "API_KEYS", "API_KEY_HASHES", "API_KEYS_FILE",
    "AUTH_HEALTH_CHECK", "AUTH_METRICS", "PUBLIC_PATHS", "RATE_LIMIT_ENABLED", "RATE_LIMIT_RPM",
    "RATE_LIMIT_BURST", "RATE_LIMIT_TABLE_SLOTS", "RATE_LIMIT_LOCK_TIMEOUT_MS",
    "RATE_LIMIT_FAILURE_POLICY", "RATE_LIMIT_BACKEND", "REDIS_URL", "REDIS_PASSWORD_FILE",
    "RATE_LIMIT_REDIS_TIMEOUT_MS", "REDIS_KEY_PREFIX", "RATE_LIMIT_TPM",
    "RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS", "LOG_LEVEL", "ENABLE_TRACING", "ENABLE_METRICS",
    "UPSTREAM_URL",
    "UPSTREAM_API_KEY", "UPSTREAM_CONNECT_TIMEOUT_SECONDS", "UPSTREAM_POOL_SIZE",
    "PROMETHEUS_MULTIPROC_DIR", "RUNTIME_DIRECTORY", "GUNICORN_CMD_ARGS",
)  # fmt: skip


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


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as err:
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


def wait_ready(proc: Proc, url: str, workers: int, timeout: float = 30.0) -> None:
    """Until `url` answers 200 and the master has all its workers (then a short settle)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log}")
        if len(children(proc.pid)) >= workers and http_status(url) == 200:
            # Each worker answers before counting as ready: a few more probes, then settle.
            for _ in range(4 * workers):
                http_status(url)
            time.sleep(0.5)
            return
        time.sleep(0.1)
    raise BenchError(f"{proc.name} not ready at {url} within {timeout:.0f} s; see {proc.log}")


# ----------------------------------------------------------------------------- /proc figures


def rss_kb(pid: int) -> int:
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
    return sum(rss_kb(pid) for pid in service_pids(master)) / 1024.0


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


def start_floor(procs: Processes, out: Path, port: int, upstream: str) -> Target:
    env = dict(os.environ)
    env.update(
        FLOOR_BIND=f"127.0.0.1:{port}", FLOOR_WORKERS=str(WORKERS), FLOOR_UPSTREAM_URL=upstream
    )
    argv = [GUNICORN, "-c", str(BENCH / "floor_gunicorn.conf.py")]
    proc = procs.start("floor", argv, out / "floor.log", env)
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
        API_KEYS=KEY,
        RATE_LIMIT_RPM="100000000",
        RATE_LIMIT_BURST="100000000",
        INSTANCE_NAME=instance,
        ENABLE_METRICS="true",
        AUTH_ENABLED="true",
        RATE_LIMIT_ENABLED="true",
        LOG_LEVEL="info",
    )
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


# ----------------------------------------------------------------------------- load tools


def run_tool(argv: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{argv[0]} did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def wrk(url: str, threads: int, connections: int, seconds: int, latency: bool = False) -> dict:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
            "-s", str(BENCH / "post.lua")]  # fmt: skip
    if latency:
        argv.append("--latency")
    output = run_tool([*argv, url], timeout=seconds + 60)
    for line in output.splitlines():
        if line.startswith("BENCH_JSON "):
            result = json.loads(line[len("BENCH_JSON ") :])
            result["rps"] = result["requests"] / max(result["duration_us"] / 1e6, 1e-9)
            result["socket_errors"] = sum(
                result[k] for k in ("connect", "read", "write", "timeout")
            )
            return result
    raise BenchError(f"wrk printed no summary:\n{output}")


async def _fixed_rate(port: int, rate: float, seconds: float, connections: int) -> dict:
    """Open loop: a request is due every 1/rate s whatever the answers; up to `connections`
    keep-alive connections take them in turn. Latency runs from the due time to the last
    byte, so a server that falls behind is charged for the queue it builds."""
    body = BODY.encode()
    request = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    times: list[float] = []
    errors = 0
    clock = time.perf_counter

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (due := await queue.get()) is not None:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                if length is None:
                    raise BenchError(f"fixed-rate client: no content-length in {head[:200]!r}")
                await reader.readexactly(int(length.group(1)))
                times.append((clock() - due) * 1000.0)
                if not head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
                    errors += 1
        finally:
            writer.close()

    workers = [asyncio.ensure_future(connection()) for _ in range(connections)]
    loop = asyncio.get_running_loop()
    total = max(1, int(rate * seconds))
    started = loop.time()
    first = clock()
    for index in range(total):
        delay = started + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(clock())
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = clock() - first
    times.sort()
    return {
        "requests": len(times),
        "rps": len(times) / elapsed,
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "max_ms": times[-1] if times else float("nan"),
        "errors": errors,
    }


def fixed_rate(port: int, rate: float, seconds: float, connections: int = 16) -> dict:
    loop = _new_loop()
    try:
        return loop.run_until_complete(
            asyncio.wait_for(_fixed_rate(port, rate, seconds, connections), seconds + 60)
        )
    except TimeoutError as exc:
        raise BenchError("the fixed-rate client did not finish in time") from exc
    finally:
        loop.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-pct * len(ordered) // 100))))
    return ordered[rank - 1]


# ----------------------------------------------------------------------------- streaming


EVENT_RE = re.compile(rb"data: ([^\n]*)\n\n")
SENT_AT_RE = re.compile(rb'"sent_at": ?([0-9.]+)')


def sse_once(port: int, path: str, headers: dict[str, str], timeout: float = 30.0) -> dict:
    """One streamed request over a fresh connection; a timestamp for every recv().

    tests/upstream_server.py stamps each paced chunk with `sent_at`; a paced chunk counts as
    received separately when no other paced chunk arrived in the same read. (Its closing
    usage event and [DONE] are written back to back, so they may share a read anywhere.)
    """
    body = STREAM_BODY.encode()
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]  # fmt: skip
    head += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    reads: list[tuple[float, int]] = []  # (seconds since send, paced chunks completed)
    buffer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        sock.sendall(request)
        first_byte = None
        events = paced = 0
        position = 0
        while True:
            data = sock.recv(65536)
            now = time.perf_counter() - started
            if not data:
                break
            if first_byte is None:
                first_byte = now
            buffer += data
            new_paced = 0
            for match in EVENT_RE.finditer(buffer, position):
                events += 1
                position = match.end()
                if SENT_AT_RE.search(match.group(1)):
                    new_paced += 1
            if new_paced:
                reads.append((now, new_paced))
                paced += new_paced
    status = int(buffer.split(b" ", 2)[1]) if buffer.startswith(b"HTTP/1.") else 0
    arrivals = [t for t, _ in reads]
    return {
        "status": status,
        "first_byte_ms": first_byte * 1000 if first_byte is not None else float("nan"),
        "first_event_ms": arrivals[0] * 1000 if arrivals else float("nan"),
        "events": events,
        "paced": paced,
        "separate": sum(1 for _, n in reads if n == 1),
        "gaps_ms": [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)],
    }


def stream_series(port: int, headers: dict[str, str], count: int) -> dict:
    sse_once(port, CHAT_PATH, headers)  # warm the connection pool and code paths
    runs = [sse_once(port, CHAT_PATH, headers) for _ in range(count)]
    bad = [r["status"] for r in runs if r["status"] != 200]
    if bad:
        raise BenchError(f"streamed requests answered {bad[:5]}")
    gaps = sorted(g for r in runs for g in r["gaps_ms"])
    return {
        "ttfb_ms": statistics.median(r["first_event_ms"] for r in runs),
        "ttfb_max_ms": max(r["first_event_ms"] for r in runs),
        "first_byte_ms": statistics.median(r["first_byte_ms"] for r in runs),
        "events": min(r["events"] for r in runs),
        "paced": min(r["paced"] for r in runs),
        "separate_min": min(r["separate"] for r in runs),
        "gap_p50_ms": percentile(gaps, 50),
        "gap_min_ms": gaps[0] if gaps else float("nan"),
        "gap_max_ms": gaps[-1] if gaps else float("nan"),
        "runs": runs,
    }


# ----------------------------------------------------------------------------- idle connections


async def _open_idle(port: int, count: int, parallel: int) -> list[asyncio.StreamWriter]:
    body = BODY.encode()
    request = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    gate = asyncio.Semaphore(parallel)
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            match = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if match:
                await reader.readexactly(int(match.group(1)))

    results = await asyncio.wait_for(
        asyncio.gather(*(one() for _ in range(count)), return_exceptions=True), timeout=60
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for writer in writers:
            writer.close()
        raise BenchError(f"{len(failed)} of {count} idle connections failed: {failed[0]!r}")
    return writers


def idle_connections_rss(target: Target, count: int) -> dict:
    """RSS before and while `count` keep-alive connections (one request each) sit idle."""
    before = service_rss_mb(target.proc.pid)
    loop = asyncio.new_event_loop()
    try:
        writers = loop.run_until_complete(_open_idle(target.port, count, 32))
        try:
            time.sleep(0.2)  # let the workers finish their bookkeeping
            during = service_rss_mb(target.proc.pid)
            still_open = established(target.port)
        finally:
            for writer in writers:
                writer.close()
            loop.run_until_complete(asyncio.sleep(0.2))
    finally:
        loop.close()
    opened = max(1, min(count, still_open))
    return {
        "before_mb": before,
        "during_mb": during,
        "open": still_open,
        "per_conn_kb": (during - before) * 1024.0 / opened,
    }


# ----------------------------------------------------------------------------- other figures


def idle_cpu(master: int, seconds: float) -> float:
    """CPU time of master + workers over `seconds` of no traffic, as % of one core."""
    pids = service_pids(master)
    start_ticks = sum(cpu_ticks(pid) for pid in pids)
    started = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - started
    used = sum(cpu_ticks(pid) for pid in pids) - start_ticks
    return 100.0 * used / os.sysconf("SC_CLK_TCK") / wall


def limiter_bench(quick: bool) -> dict | None:
    """bench/bench_limiter.py (maintained on its own): p50/p99 µs of one decision, or None."""
    script = BENCH / "bench_limiter.py"
    if not script.is_file():
        return None
    argv = [PYTHON, str(script), *(["--n", "5000"] if quick else [])]
    try:
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    for line in done.stdout.splitlines():
        match = re.search(r"p50\s+([\d.]+)\s*µs\s+p99\s+([\d.]+)\s*µs", line)
        if match:
            return {"p50_us": float(match.group(1)), "p99_us": float(match.group(2))}
    return None


def routing_bench(quick: bool) -> dict | None:
    """bench/bench_routing.py: µs per request of Router.forward, single upstream vs routing."""
    script = BENCH / "bench_routing.py"
    argv = [PYTHON, str(script), *(["--n", "5000"] if quick else [])]
    try:
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
        )
    except subprocess.TimeoutExpired:
        return None
    match = re.search(r"routing added p50 (-?[\d.]+) µs p99 (-?[\d.]+) µs", done.stdout)
    if done.returncode != 0 or not match:
        return None
    return {"p50_us": float(match.group(1)), "p99_us": float(match.group(2))}


# ----------------------------------------------------------------------------- the table


@dataclass
class Row:
    figure: str
    direct: str = "–"
    floor: str = "–"
    edge: str = "–"
    result: str = ""
    target: str = ""
    met: bool | None = None  # None: no target, or not measured
    marked: bool = False  # the target text carries its own marks (a target of two parts)

    def cells(self) -> list[str]:
        mark = "" if self.marked else MARKS[self.met]
        target = f"{self.target} {mark}".strip() if self.target else ""
        return [self.figure, self.direct, self.floor, self.edge, self.result, target]


MARKS = {True: "✅", False: "❌", None: ""}
HEADER = ["Figure", "direct", "floor", "edge", "edge vs baseline", "Target"]


def render(rows: list[Row]) -> str:
    cells = [HEADER, *(row.cells() for row in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    return "\n".join(
        [line(HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(c) for c in cells[1:]]
    )


def ms(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f} ms"


def signed_ms(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or value != value else f"{value:+.{digits}f} ms"


def mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"


# ----------------------------------------------------------------------------- environment


def ensure_tools(install: bool) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return
    packages = sorted({TOOLS[tool] for tool in missing})
    can_install = install and os.geteuid() == 0 and shutil.which("apt-get") is not None
    if not can_install:
        raise BenchError(
            f"missing {', '.join(missing)}: install them first "
            f"(Debian/Ubuntu: sudo apt-get install -y {' '.join(packages)})"
        )
    print(f"installing {' '.join(packages)} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *packages],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    still = [tool for tool in TOOLS if shutil.which(tool) is None]
    if still:
        raise BenchError(f"still missing after apt-get: {', '.join(still)}")


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


def cpu_times() -> list[int]:
    """The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as fh:
        return [int(v) for v in fh.readline().split()[1:9]]


def steal_percent(before: list[int], after: list[int]) -> float:
    delta = [b - a for a, b in zip(before, after, strict=True)]
    return 100.0 * delta[7] / max(1, sum(delta))


def own_cpu_seconds() -> float:
    """CPU time of this process and every child it waited for (servers, workers, wrk)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def others_percent(before: list[int], after: list[int], own_seconds: float) -> float:
    """CPU used by processes this run did not start, as % of all cores over the run."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    busy = sum(delta) - delta[3] - delta[4] - delta[7]  # minus idle, iowait, steal
    total = max(1, sum(delta))
    others = busy - own_seconds * os.sysconf("SC_CLK_TCK")
    return max(0.0, 100.0 * others / total)


def machine_info() -> dict[str, str]:
    info = {"cpu": platform.processor() or platform.machine(), "cores": str(os.cpu_count())}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                info["os"] = line.split("=", 1)[1].strip('"')
    info["kernel"] = platform.release()
    info["python"] = platform.python_version()
    versions = []
    for dist in ("gunicorn", "uvicorn", "uvicorn-worker", "falcon", "aiohttp", "uvloop"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{dist} {metadata.version(dist)}")
    info["packages"] = ", ".join(versions)
    tools = []
    for tool in TOOLS:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", TOOLS[tool]],
                capture_output=True, text=True, timeout=10, check=False,
            ).stdout.strip()  # fmt: skip
            tools.append(f"{tool} {out or '?'}")
    info["tools"] = ", ".join(tools)
    return info


# ----------------------------------------------------------------------------- the run


@dataclass
class Settings:
    duration: int
    latency_duration: int
    rate_duration: float
    rate: int
    rate_connections: int
    threads: int
    connections: int
    warmup: int
    stream_requests: int
    stream_pace: float
    stream_chunks: int
    idle_connections: int
    idle_cpu_seconds: float
    rounds: int
    quick: bool
    phases: tuple[str, ...]


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1 s phases (smoke test)")
    parser.add_argument("--duration", type=int, help="seconds per throughput run (10)")
    parser.add_argument("--latency-duration", type=int, help="seconds per c=1 run (5)")
    parser.add_argument("--rate-duration", type=float, help="seconds per fixed-rate run (10)")
    parser.add_argument("--rate", type=int, default=500, help="fixed request rate (500/s)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument(
        "--rounds", type=int, help="interleaved throughput and c=1 rounds, best kept (2)"
    )
    parser.add_argument("--stream-requests", type=int, help="streamed requests per target (20)")
    parser.add_argument("--idle-connections", type=int, help="idle keep-alive sockets (1000)")
    parser.add_argument("--idle-cpu-seconds", type=float, help="idle CPU window (30)")
    parser.add_argument(
        "--only", help=f"comma-separated phases to run, of: {', '.join(PHASES)} (default all)"
    )
    parser.add_argument("--results", type=Path, help="markdown output (bench/results.md)")
    parser.add_argument("--out-dir", type=Path, help="server logs (bench/out/)")
    parser.add_argument(
        "--no-install", action="store_true", help="never apt-get install missing tools"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    phases = PHASES
    if args.only:
        phases = tuple(p.strip() for p in args.only.split(",") if p.strip())
        unknown = sorted(set(phases) - set(PHASES))
        if unknown:
            parser.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")

    def pick(value: Any, normal: Any, small: Any) -> Any:
        return value if value is not None else (small if quick else normal)

    settings = Settings(
        duration=pick(args.duration, 10, 1),
        latency_duration=pick(args.latency_duration, 5, 1),
        rate_duration=pick(args.rate_duration, 10.0, 1.0),
        rate=args.rate,
        rate_connections=16,
        threads=args.threads,
        connections=args.connections,
        warmup=0 if quick else 2,
        stream_requests=pick(args.stream_requests, 20, 2),
        stream_pace=0.05,
        stream_chunks=10,
        idle_connections=pick(args.idle_connections, 1000, 200),
        idle_cpu_seconds=pick(args.idle_cpu_seconds, 30.0, 1.0),
        rounds=pick(args.rounds, 2, 1),
        quick=quick,
        phases=phases,
    )
    if args.results is None:
        args.results = BENCH / "out" / "results-quick.md" if quick else BENCH / "results.md"
    if args.out_dir is None:
        args.out_dir = BENCH / "out"
    return settings, args


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(settings: Settings, out: Path) -> tuple[list[Row], dict[str, Any]]:
    """Start the targets, run the phases, stop everything; the table rows and raw figures."""
    raw: dict[str, Any] = {}
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="llm-edge-bench."))
    want = set(settings.phases)
    try:
        server_phases = {"throughput", "latency", "rate", "memory", "cpu", "redis"}
        if want & server_phases:
            nginx_port, floor_port, edge_port = free_port(), free_port(), free_port()
            log(f"starting nginx :{nginx_port}, floor :{floor_port}, edge :{edge_port}")
            direct = start_nginx(procs, tmp, out, nginx_port, UPSTREAM_ANSWER)
            upstream = direct.base + "/v1"
            floor = start_floor(procs, out, floor_port, upstream)
            edge = start_edge(procs, out, edge_port, upstream, "benchedge", "edge.log")
            targets = [direct, floor, edge]
            for target in targets:
                target.rss["idle"] = service_rss_mb(target.proc.pid)
            check_answers(targets)
            run_server_phases(settings, want, targets, raw)
            if "redis" in want:
                raw["redis"] = run_redis_phase(settings, procs, out, upstream, edge)
            for target in targets:
                raw.setdefault("rss", {})[target.name] = dict(target.rss)
            for proc in (edge.proc, floor.proc, direct.proc):
                procs.stop(proc)
        if "stream" in want:
            raw["stream"] = run_stream_phase(settings, procs, out)
        if "limiter" in want:
            log("rate-limiter micro-benchmark (bench/bench_limiter.py)")
            raw["limiter"] = limiter_bench(settings.quick)
        if "routing" in want:
            log("routing micro-benchmark (bench/bench_routing.py)")
            raw["routing"] = routing_bench(settings.quick)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        raw["pids"] = procs.started
    return build_rows(settings, raw), raw


def check_answers(targets: list[Target]) -> None:
    for target in targets:
        request = urllib.request.Request(
            target.url,
            data=BODY.encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError) as exc:
            raise BenchError(f"{target.name} did not answer a chat completion: {exc}") from exc
        if body.get("object") != "chat.completion":
            raise BenchError(f"{target.name} answered {body!r}")


def run_server_phases(
    settings: Settings, want: set[str], targets: list[Target], raw: dict[str, Any]
) -> None:
    edge = targets[-1]
    if "throughput" in want:
        runs: dict[str, list[dict]] = {t.name: [] for t in targets}
        for round_ in range(1, settings.rounds + 1):
            for target in targets:
                log(
                    f"throughput {target.name} (round {round_}/{settings.rounds}): wrk "
                    f"-t{settings.threads} -c{settings.connections} -d{settings.duration}s"
                )
                if settings.warmup:
                    wrk(target.url, settings.threads, settings.connections, settings.warmup)
                pids = service_pids(target.proc.pid)
                ticks = sum(cpu_ticks(pid) for pid in pids)
                result = wrk(target.url, settings.threads, settings.connections, settings.duration)
                ticks = sum(cpu_ticks(pid) for pid in pids) - ticks
                result["cpu_us_per_req"] = (
                    ticks / os.sysconf("SC_CLK_TCK") * 1e6 / max(1, result["requests"])
                )
                runs[target.name].append(result)
                target.rss["after_load"] = service_rss_mb(target.proc.pid)
        raw["throughput"] = {name: best_throughput(results) for name, results in runs.items()}
    if "latency" in want:
        runs = {t.name: [] for t in targets}
        for round_ in range(1, settings.rounds + 1):
            for target in targets:
                log(
                    f"latency c=1 {target.name} (round {round_}/{settings.rounds}): "
                    f"wrk -t1 -c1 -d{settings.latency_duration}s"
                )
                runs[target.name].append(wrk(target.url, 1, 1, settings.latency_duration, True))
        raw["latency"] = {name: best_latency(results) for name, results in runs.items()}
    if "rate" in want:
        raw["rate"] = {}
        for target in targets:
            log(f"fixed rate {target.name}: {settings.rate} req/s for {settings.rate_duration:g} s")
            raw["rate"][target.name] = fixed_rate(
                target.port, settings.rate, settings.rate_duration, settings.rate_connections
            )
    if "memory" in want:
        raw["idle_conns"] = {}
        for target in targets[1:]:
            log(f"{settings.idle_connections} idle keep-alive connections to {target.name}")
            raw["idle_conns"][target.name] = idle_connections_rss(target, settings.idle_connections)
            target.rss.setdefault("after_load", raw["idle_conns"][target.name]["before_mb"])
    if "cpu" in want:
        time.sleep(0.5)
        log(f"idle CPU of edge over {settings.idle_cpu_seconds:g} s")
        raw["idle_cpu"] = idle_cpu(edge.proc.pid, settings.idle_cpu_seconds)


def run_redis_phase(
    settings: Settings, procs: Processes, out: Path, upstream: str, edge: Target
) -> dict[str, Any] | None:
    """Edge on RATE_LIMIT_BACKEND=redis (a local redis-server, no persistence) against the
    same edge on shared memory, interleaved rounds of the throughput run."""
    binary = shutil.which("redis-server")
    if binary is None:
        log("redis-server not installed: Redis phase skipped")
        return None
    redis_port, port = free_port(), free_port()
    log(f"Redis backend: redis-server :{redis_port}, edge :{port}")
    redis = procs.start(
        "redis",
        [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--loglevel", "warning"],
        out / "redis.log",
        dict(os.environ),
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", redis_port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError("redis-server did not start") from None
            time.sleep(0.05)
    on_redis = start_edge(
        procs, out, port, upstream, "benchedge-redis", "edge-redis.log",
        {"RATE_LIMIT_BACKEND": "redis", "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"},
    )  # fmt: skip
    runs: dict[str, list[dict]] = {"shm": [], "redis": []}
    try:
        check_answers([on_redis])
        for round_ in range(1, settings.rounds + 1):
            for name, target in (("shm", edge), ("redis", on_redis)):
                log(f"throughput edge on {name} (round {round_}/{settings.rounds})")
                if settings.warmup:
                    wrk(target.url, settings.threads, settings.connections, settings.warmup)
                pids = service_pids(target.proc.pid)
                ticks = sum(cpu_ticks(pid) for pid in pids)
                result = wrk(target.url, settings.threads, settings.connections, settings.duration)
                ticks = sum(cpu_ticks(pid) for pid in pids) - ticks
                result["cpu_us_per_req"] = (
                    ticks / os.sysconf("SC_CLK_TCK") * 1e6 / max(1, result["requests"])
                )
                runs[name].append(result)
    finally:
        procs.stop(on_redis.proc)
        procs.stop(redis)
    return {name: best_throughput(results) for name, results in runs.items()}


def best_throughput(runs: list[dict]) -> dict:
    """The round with the most req/s (the least disturbed by other load), errors of all."""
    best = dict(max(runs, key=lambda r: r["rps"]))
    best["status"] = sum(r["status"] for r in runs)
    best["socket_errors"] = sum(r["socket_errors"] for r in runs)
    best["rounds"] = [round(r["rps"]) for r in runs]
    best["cpu_us_per_req"] = min(r["cpu_us_per_req"] for r in runs)
    return best


def best_latency(runs: list[dict]) -> dict:
    """The lowest p50 and the lowest p99 over the rounds."""
    return {
        "p50_us": min(r["p50_us"] for r in runs),
        "p99_us": min(r["p99_us"] for r in runs),
        "rounds": [(r["p50_us"], r["p99_us"]) for r in runs],
    }


def run_stream_phase(settings: Settings, procs: Processes, out: Path) -> dict[str, Any] | None:
    upstream_port, edge_port = free_port(), free_port()
    log(f"streaming: tests/upstream_server.py :{upstream_port} ({settings.stream_chunks} chunks "
        f"every {settings.stream_pace:g} s), edge :{edge_port}")  # fmt: skip
    upstream_proc, upstream_base = start_sse_upstream(
        procs, out, upstream_port, settings.stream_pace, settings.stream_chunks
    )
    edge = start_edge(
        procs, out, edge_port, upstream_base + "/v1", "benchedge-stream", "edge-stream.log"
    )
    try:
        direct = stream_series(upstream_port, {}, settings.stream_requests)
        through = stream_series(
            edge_port, {"Authorization": f"Bearer {KEY}"}, settings.stream_requests
        )
    finally:
        procs.stop(edge.proc)
        procs.stop(upstream_proc)
    return {"direct": direct, "edge": through, "sent": settings.stream_chunks}


def build_rows(settings: Settings, raw: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    names = ("direct", "floor", "edge")

    tp = raw.get("throughput")
    row = Row(f"Throughput, c={settings.connections} (req/s)")
    if tp:
        row.direct, row.floor, row.edge = (f"{tp[n]['rps']:,.0f}" for n in names)
        vs_floor = tp["edge"]["rps"] / tp["floor"]["rps"]
        vs_direct = tp["edge"]["rps"] / tp["direct"]["rps"]
        row.result = f"{vs_floor:.2f}× floor, {vs_direct:.2f}× direct"
        ratio_ok, rate_ok = vs_floor >= 0.75, tp["edge"]["rps"] >= 5000
        row.met = ratio_ok and rate_ok
        row.target = f"≥ 0.75× floor {MARKS[ratio_ok]}, ≥ 5,000 req/s {MARKS[rate_ok]}"
        row.marked = True
    else:
        row.result = "skipped"
        row.target = "≥ 0.75× floor, ≥ 5,000 req/s"
    rows.append(row)

    row = Row("CPU time per request under load (server)")
    if tp:
        cpu = {n: tp[n]["cpu_us_per_req"] for n in names}
        row.direct, row.floor, row.edge = (f"{cpu[n]:.0f} µs" for n in names)
        row.result = (
            f"{cpu['edge'] / cpu['floor']:.2f}× floor ({cpu['edge'] - cpu['floor']:+.0f} µs)"
        )
    rows.append(row)

    row = Row("Throughput errors (non-2xx / socket)")
    if tp:
        row.direct, row.floor, row.edge = (
            f"{tp[n]['status']} / {tp[n]['socket_errors']}" for n in names
        )
        row.met = all(tp[n]["status"] == 0 and tp[n]["socket_errors"] == 0 for n in names)
        row.target = "0 / 0"
    rows.append(row)

    lat = raw.get("latency")
    for pct, limit in (("p50", 0.5), ("p99", 2.0)):
        row = Row(f"Latency c=1 {pct}")
        if lat:
            values = {n: lat[n][f"{pct}_us"] / 1000.0 for n in names}
            row.direct, row.floor, row.edge = (ms(values[n], 3) for n in names)
            added = values["edge"] - values["direct"]
            floor_added = values["floor"] - values["direct"]
            row.result = f"{signed_ms(added, 3)} added (floor {signed_ms(floor_added, 3)})"
            row.met = added <= limit
        else:
            row.result = "skipped"
        row.target = f"added ≤ {limit:g} ms"
        rows.append(row)

    rate = raw.get("rate")
    for pct in ("p50", "p99"):
        row = Row(f"Latency at {settings.rate} req/s {pct}")
        if rate:
            row.direct, row.floor, row.edge = (ms(rate[n][f"{pct}_ms"], 1) for n in names)
            added = rate["edge"][f"{pct}_ms"] - rate["direct"][f"{pct}_ms"]
            row.result = f"{signed_ms(added, 1)} added"
            if pct == "p99":
                errors = sum(rate[n]["errors"] for n in names)
                achieved = rate["edge"]["rps"]
                row.result += f"; edge {achieved:,.0f} req/s, {errors} errors"
        else:
            row.result = "skipped"
        rows.append(row)

    stream = raw.get("stream")
    row = Row("Streaming TTFB, first SSE event (p50)")
    if stream:
        row.direct = ms(stream["direct"]["ttfb_ms"], 2)
        row.edge = ms(stream["edge"]["ttfb_ms"], 2)
        added = stream["edge"]["ttfb_ms"] - stream["direct"]["ttfb_ms"]
        row.result = f"{signed_ms(added, 2)} added"
        row.met = added <= 1.0
    else:
        row.result = "skipped" if "stream" not in settings.phases else "n/a"
    row.target = "added ≤ 1 ms"
    rows.append(row)

    row = Row("Streaming: paced chunks received separately")
    if stream:
        sent = stream["sent"]
        d, e = stream["direct"], stream["edge"]
        row.direct = f"{d['separate_min']} of {sent}"
        row.edge = f"{e['separate_min']} of {sent}"
        row.met = e["separate_min"] == sent and e["paced"] == sent
        row.result = "no coalescing" if row.met else "coalesced or lost"
    else:
        row.result = "skipped" if "stream" not in settings.phases else "n/a"
    row.target = "all, in every stream"
    rows.append(row)

    row = Row("Streaming chunk gaps p50 (min–max)")
    if stream:
        d, e = stream["direct"], stream["edge"]
        row.direct = f"{d['gap_p50_ms']:.1f} ({d['gap_min_ms']:.1f}–{d['gap_max_ms']:.1f}) ms"
        row.edge = f"{e['gap_p50_ms']:.1f} ({e['gap_min_ms']:.1f}–{e['gap_max_ms']:.1f}) ms"
        row.result = f"sent every {settings.stream_pace * 1000:g} ms"
    rows.append(row)

    rss = raw.get("rss", {})
    row = Row("RSS idle (master + workers)")
    if rss:
        row.direct, row.floor, row.edge = (mb(rss[n].get("idle")) for n in names)
    rows.append(row)

    row = Row("RSS after load")
    if rss and "after_load" in rss.get("edge", {}):
        row.direct, row.floor, row.edge = (mb(rss[n].get("after_load")) for n in names)
        row.met = rss["edge"]["after_load"] <= 160
    else:
        row.result = "skipped"
    row.target = "edge ≤ 160 MB"
    rows.append(row)

    conns = raw.get("idle_conns")
    row = Row(f"RSS with {settings.idle_connections:,} idle keep-alive conns")
    if conns:
        row.floor, row.edge = (
            f"{mb(conns[n]['during_mb'])}, {conns[n]['per_conn_kb']:.1f} KB/conn"
            for n in ("floor", "edge")
        )
        row.result = f"{conns['edge']['open']} open at measurement"
        row.met = conns["edge"]["per_conn_kb"] <= 50 and conns["edge"]["during_mb"] > 0
    else:
        row.result = "skipped"
    row.target = "edge ≤ 50 KB per connection"
    rows.append(row)

    row = Row(f"Idle CPU over {settings.idle_cpu_seconds:g} s (master + workers)")
    if "idle_cpu" in raw:
        row.edge = f"{raw['idle_cpu']:.2f} %"
        row.met = raw["idle_cpu"] < 2.0
    else:
        row.result = "skipped"
    row.target = "< 2 % of a core"
    rows.append(row)

    limiter = raw.get("limiter")
    row = Row("Rate-limit decision p50 / p99 (bench_limiter.py)")
    if limiter:
        row.edge = f"{limiter['p50_us']:.2f} / {limiter['p99_us']:.2f} µs"
        row.met = limiter["p99_us"] <= 10.0
    else:
        row.edge = "n/a"
        row.result = "skipped" if "limiter" not in settings.phases else ""
    row.target = "p99 ≤ 10 µs"
    rows.append(row)

    redis = raw.get("redis")
    row = Row(f"Throughput on the Redis backend, c={settings.connections}")
    row.target = "≥ 0.8× edge on shm"
    if redis:
        ratio = redis["redis"]["rps"] / redis["shm"]["rps"]
        row.edge = f"{redis['redis']['rps']:,.0f} req/s ({redis['shm']['rps']:,.0f} on shm)"
        row.result = (
            f"{ratio:.2f}× shm; CPU {redis['redis']['cpu_us_per_req']:.0f} vs "
            f"{redis['shm']['cpu_us_per_req']:.0f} µs/req; errors "
            f"{redis['redis']['status']} / {redis['redis']['socket_errors']}"
        )
        row.met = ratio >= 0.8
        row.marked = True
    else:
        row.edge = "n/a"
        row.result = "skipped" if "redis" not in settings.phases else "n/a"
    rows.append(row)

    routing = raw.get("routing")
    row = Row("Routing on: added per request p50 / p99 (bench_routing.py)")
    if routing:
        row.edge = f"+{routing['p50_us']:.2f} / +{routing['p99_us']:.2f} µs"
        row.result = "3 weighted targets, rename, shm breakers vs UPSTREAM_URL"
        row.met = routing["p50_us"] <= 20.0
    else:
        row.edge = "n/a"
        row.result = "skipped" if "routing" not in settings.phases else ""
    row.target = "≤ 20 µs per request"
    rows.append(row)
    return rows


def write_results(
    path: Path, table: str, settings: Settings, command: str, took: float, host: dict[str, str]
) -> None:
    info = {**machine_info(), **host}
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = "\n".join(f"- {key}: {value}" for key, value in info.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"""# llm-edge-proxy benchmark results

Date: {now} (run took {took:.0f} s)

Command: `{command}`

Machine:
{machine}

Settings: {WORKERS} workers per target; throughput `wrk -t{settings.threads} \
-c{settings.connections} -d{settings.duration}s` (after a {settings.warmup} s warm-up); \
c=1 latency `wrk -t1 -c1 -d{settings.latency_duration}s`; both in {settings.rounds} \
interleaved round(s), the best kept; fixed rate: an open-loop \
client (bench/run.py) sending {settings.rate} req/s, evenly spaced, over up to \
{settings.rate_connections} keep-alive connections for {settings.rate_duration:g} s; \
streaming {settings.stream_requests} requests of \
{settings.stream_chunks} chunks every {settings.stream_pace * 1000:g} ms; \
{settings.idle_connections} idle connections; idle CPU over {settings.idle_cpu_seconds:g} s. \
All load generators share the machine's cores with the targets.

{table}
"""
    )


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    signal.signal(signal.SIGINT, _raise_interrupt)  # also when started with SIGINT ignored
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    started = time.monotonic()
    load_at_start = os.getloadavg()
    cpu_at_start = cpu_times()
    own_at_start = own_cpu_seconds()
    try:
        if set(settings.phases) - {"limiter", "stream"}:
            ensure_tools(not args.no_install)
        raise_fd_limit(2 * settings.idle_connections + 1024)
        out = args.out_dir.resolve()
        out.mkdir(parents=True, exist_ok=True)
        for name in ("nginx.log", "floor.log", "edge.log", "edge-stream.log", "sse-upstream.log"):
            (out / name).unlink(missing_ok=True)
        rows, raw = measure(settings, out)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every started process was stopped", file=sys.stderr)
        return 130
    table = render(rows)
    took = time.monotonic() - started
    cpu_at_end = cpu_times()
    others = others_percent(cpu_at_start, cpu_at_end, own_cpu_seconds() - own_at_start)
    host = {
        "load average at start": " ".join(f"{v:.2f}" for v in load_at_start),
        "CPU steal during the run": f"{steal_percent(cpu_at_start, cpu_at_end):.1f} %",
        "CPU used by other processes during the run": f"{others:.1f} % of all cores",
    }
    command = " ".join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    print(table)
    met = [r for r in rows if r.met is not None]
    print(
        f"\n{sum(r.met for r in met)} of {len(met)} targets met; run took {took:.0f} s; "
        f"other processes used {others:.1f} % of the CPU, steal "
        f"{host['CPU steal during the run']}"
    )
    if others > 10:
        print("warning: the machine was busy with other work; figures are pessimistic")
    write_results(args.results, table, settings, command, took, host)
    (out / "raw.json").write_text(json.dumps(raw, indent=1, default=str))
    print(f"written: {_shown(args.results)}; server logs and raw.json in {_shown(out)}")
    return 0


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(ROOT))
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
