"""The benchmark's runner: the load tools (wrk, an open-loop fixed-rate client, an SSE reader,
idle connections) and the phases that drive them against the targets of bench/targets.py."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from targets import (
    ABLATIONS,
    BENCH,
    BODY,
    CHAT_PATH,
    KEY,
    PYTHON,
    ROOT,
    STREAM_BODY,
    TOOLS,
    UPSTREAM_ANSWER,
    BenchError,
    Processes,
    Target,
    cpu_ticks,
    established,
    free_port,
    service_pids,
    service_rss_mb,
    start_edge,
    start_floor,
    start_nginx,
    start_sse_upstream,
)

PHASES = (
    "throughput", "latency", "rate", "stream", "memory", "cpu", "limiter", "redis", "routing",
    "ablation", "cache", "tracing", "translate", "budgets",
)  # fmt: skip

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


def wrk(
    url: str,
    threads: int,
    connections: int,
    seconds: int,
    latency: bool = False,
    distinct: bool = False,
) -> dict:
    """One wrk run posting BODY (bench/post.lua), or with `distinct` a body that differs in
    every request and from every other run's (bench/post_distinct.lua: a cache never has it)."""
    script = "post_distinct.lua" if distinct else "post.lua"
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
            "-s", str(BENCH / script)]  # fmt: skip
    if latency:
        argv.append("--latency")
    argv.append(url)
    if distinct:
        argv += ["--", f"{time.time_ns():x}"]  # the run's id, in every body it sends
    output = run_tool(argv, timeout=seconds + 60)
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


def micro_bench(
    script: str, quick_n: str, quick: bool, pattern: str, fields: tuple[str, ...]
) -> dict | None:
    """Run one of bench/'s micro-benchmarks and read its figures: `pattern`'s groups, as
    floats named `fields`; None (logged) when it fails or prints none."""
    argv = [PYTHON, str(BENCH / script), *(["--n", quick_n] if quick else [])]
    try:
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
        )
    except subprocess.TimeoutExpired:
        return None
    match = re.search(pattern, done.stdout)
    if done.returncode != 0 or not match:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        log(f"bench/{script} failed ({done.returncode}): {last}")
        return None
    return {field: float(value) for field, value in zip(fields, match.groups(), strict=True)}


def translate_bench(quick: bool) -> dict | None:
    """bench/bench_translate.py: µs per streamed event translated, each direction."""
    return micro_bench(
        "bench_translate.py", "200", quick, r"to_openai ([\d.]+) µs to_anthropic ([\d.]+) µs",
        ("to_openai_us", "to_anthropic_us"),
    )  # fmt: skip


def budgets_bench(quick: bool) -> dict | None:
    """bench/bench_budgets.py: µs per request of the accounting alone and with a budget."""
    return micro_bench(
        "bench_budgets.py", "2000", quick, r"accounting ([\d.]+) µs budget ([\d.]+) µs",
        ("accounting_us", "budget_us"),
    )  # fmt: skip


def routing_bench(quick: bool) -> dict | None:
    """bench/bench_routing.py: µs per request of Router.exchange, single upstream vs routing."""
    return micro_bench(
        "bench_routing.py", "5000", quick, r"routing added p50 (-?[\d.]+) µs p99 (-?[\d.]+) µs",
        ("p50_us", "p99_us"),
    )  # fmt: skip


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
    ablation_duration: int = 5


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(settings: Settings, out: Path) -> dict[str, Any]:
    """Start the targets, run the phases, stop everything; the raw figures."""
    raw: dict[str, Any] = {}
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="llm-edge-bench."))
    want = set(settings.phases)
    try:
        server_phases = {
            "throughput", "latency", "rate", "memory", "cpu", "redis", "ablation", "cache",
            "tracing", "translate", "budgets",
        }  # fmt: skip
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
            if "redis" in want:  # beside edge on shm, still running
                raw["redis"] = run_redis_phase(settings, procs, out, upstream, edge)
            if "cache" in want:  # beside edge without a cache, still running
                raw["cache"] = run_cache_phase(settings, procs, out, tmp, upstream, edge)
            if "tracing" in want:  # beside edge exporting nothing, still running
                raw["tracing"] = run_tracing_phase(settings, procs, out, direct, edge)
            if "translate" in want:
                raw["translate"] = run_translate_phase(settings, procs, out, tmp, direct)
            if "budgets" in want:
                raw["budgets"] = run_budgets_phase(settings, procs, out, tmp, direct)
            for target in targets:
                raw.setdefault("rss", {})[target.name] = dict(target.rss)
            procs.stop(edge.proc)
            if "ablation" in want:
                raw["ablation"] = run_ablation(settings, procs, out, floor, upstream)
            for proc in (floor.proc, direct.proc):
                procs.stop(proc)
        if "stream" in want:
            raw["stream"] = run_stream_phase(settings, procs, out)
        if "limiter" in want:
            log("rate-limiter micro-benchmark (bench/bench_limiter.py)")
            raw["limiter"] = limiter_bench(settings.quick)
        if "routing" in want:
            log("routing micro-benchmark (bench/bench_routing.py)")
            raw["routing"] = routing_bench(settings.quick)
        if "translate" in want:
            log("stream translation micro-benchmark (bench/bench_translate.py)")
            raw["translate_events"] = translate_bench(settings.quick)
        if "budgets" in want:
            log("budgets and cost accounting micro-benchmark (bench/bench_budgets.py)")
            raw["budgets_micro"] = budgets_bench(settings.quick)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        raw["pids"] = procs.started
    return raw


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


def load_cpu(
    target: Target, settings: Settings, seconds: int, warmup: bool = True, distinct: bool = False
) -> dict:
    """One wrk throughput run (after the warm-up), with the target's CPU time per request:
    utime + stime of master and workers over the run, divided by the requests answered.
    `distinct`: every request's body differs (see `wrk`)."""
    if warmup and settings.warmup:
        wrk(target.url, settings.threads, settings.connections, settings.warmup, distinct=distinct)
    pids = service_pids(target.proc.pid)
    ticks = sum(cpu_ticks(pid) for pid in pids)
    result = wrk(target.url, settings.threads, settings.connections, seconds, distinct=distinct)
    ticks = sum(cpu_ticks(pid) for pid in pids) - ticks
    result["cpu_us_per_req"] = ticks / os.sysconf("SC_CLK_TCK") * 1e6 / max(1, result["requests"])
    return result


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
            if redis.popen.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"redis-server did not start; see {redis.log}") from None
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
                runs[name].append(load_cpu(target, settings, settings.duration))
    finally:
        procs.stop(on_redis.proc)
        procs.stop(redis)
    return {name: best_throughput(results) for name, results in runs.items()}


def run_cache_phase(
    settings: Settings, procs: Processes, out: Path, tmp: Path, upstream: str, edge: Target
) -> dict[str, Any]:
    """Edge with CACHE_BACKEND=local (its store in the run's temp dir) beside `edge` (no
    cache), both in front of the same upstream, under the throughput load in interleaved rounds:

      hit       cached edge, every request the same body: after the first, all hits
      miss      cached edge, every body distinct (bench/post_distinct.lua): all misses, each
                looked up, sent upstream and its answer stored
      miss off  edge without a cache under the same distinct-body load

    The hit and miss runs are checked, not assumed: a sample request after each must say
    `x-cache` hit (resp. miss), and edge's `edge_cache_lookups_total` counts the lookups of each
    run (its warm-up included) by result. What the cache adds to a miss (the lookup, the flights
    claim, the answer stored) is the CPU per request of "miss" less "miss off", the best round
    of each as in the ablation phase; each round's pair (run back to back, its order
    alternating from round to round) is kept too.
    """
    port = free_port()
    log(f"response cache: starting edge with CACHE_BACKEND=local :{port}")
    cached = start_edge(
        procs, out, port, upstream, "benchedge-cache", "edge-cache.log",
        {"CACHE_BACKEND": "local", "CACHE_DIR": str(tmp / "cache")},
    )  # fmt: skip
    runs: dict[str, list[dict]] = {"hit": [], "miss": [], "miss off": []}
    try:
        check_answers([cached])  # a miss: the answer is stored
        x_cache(cached, BODY, "hit")
        for round_ in range(1, settings.rounds + 1):
            pair = [("miss", cached), ("miss off", edge)]
            order = [("hit", cached), *(pair if round_ % 2 else pair[::-1])]
            for name, target in order:
                log(f"response cache: {name} path (round {round_}/{settings.rounds})")
                before = settled_lookups(cached)
                result = load_cpu(
                    target, settings, settings.duration, round_ == 1, distinct=name != "hit"
                )
                result["lookups"] = counts_since(before, settled_lookups(cached))
                runs[name].append(result)
                if name == "hit":
                    x_cache(cached, BODY, "hit")
                elif name == "miss":
                    x_cache(cached, distinct_body(), "miss")
    finally:
        procs.stop(cached.proc)
    best = {name: best_throughput(results) for name, results in runs.items()}
    for name, results in runs.items():
        best[name]["lookups"] = sum_counts(r["lookups"] for r in results)
    best["pairs_us"] = [
        on["cpu_us_per_req"] - off["cpu_us_per_req"]
        for on, off in zip(runs["miss"], runs["miss off"], strict=True)
    ]
    return best


def interleaved(phase: str, edges: dict[str, Target], settings: Settings) -> dict[str, Any]:
    """Throughput rounds over `edges` in turn (each answers first), the best of each kept."""
    check_answers(list(edges.values()))
    runs: dict[str, list[dict]] = {name: [] for name in edges}
    for round_ in range(1, settings.rounds + 1):
        for name, target in edges.items():
            log(f"{phase}: {name} (round {round_}/{settings.rounds})")
            runs[name].append(load_cpu(target, settings, settings.duration, round_ == 1))
    return {name: best_throughput(results) for name, results in runs.items()}


def run_translate_phase(
    settings: Settings, procs: Processes, out: Path, tmp: Path, direct: Target
) -> dict[str, Any]:
    """An OpenAI client (the throughput load) on an Anthropic provider, through the adapter,
    against the same client on an OpenAI provider, passed through: two edges with the same
    PROVIDERS_FILE shape (one provider, one model), nginx answering both (a Messages answer at
    /anthropic/v1/messages, the chat answer elsewhere), interleaved throughput rounds. What
    translation costs a non-streamed request is the CPU per request of one less the other."""
    edges: dict[str, Target] = {}
    try:
        for name, kind, base in (
            ("pass-through", "openai", direct.base + "/v1"),
            ("translated", "anthropic", direct.base + "/anthropic/v1"),
        ):
            providers = tmp / f"providers-{kind}.toml"
            providers.write_text(
                f'[providers.up]\nkind = "{kind}"\nbase_url = "{base}"\napi_key = "k"\n'
                '[[models]]\nname = "bench"\ntargets = [{ provider = "up" }]\n'
            )
            port = free_port()
            log(f"translate: starting edge, {name} ({kind} provider) :{port}")
            edges[name] = start_edge(
                procs, out, port, direct.base + "/v1", f"benchedge-{kind}{port}",
                "edge-translate.log", {"PROVIDERS_FILE": str(providers)},
            )  # fmt: skip
        return interleaved("translate", edges, settings)
    finally:
        for target in edges.values():
            procs.stop(target.proc)


def run_budgets_phase(
    settings: Settings, procs: Processes, out: Path, tmp: Path, direct: Target
) -> dict[str, Any]:
    """Two edges on the same upstream (nginx's answer reports its usage), interleaved
    throughput rounds: "budget", whose model has prices and whose key a budget it never
    reaches (each request priced, reserved, settled and costed); "priced", the same without
    the budget (costed only); and "unpriced", the model without prices and the key without a
    budget (its requests still counted per key).
    What budgets and cost add to a request is the CPU per request of one less the other."""
    edges: dict[str, Target] = {}
    try:
        priced = "price = { input_per_mtok = 2.5, output_per_mtok = 10 }\n"
        for name, price, budget in (
            ("unpriced", "", ""),
            ("priced", priced, ""),
            ("budget", priced, "budget_usd = 1000000000\n"),
        ):
            providers = tmp / f"providers-{name}.toml"
            providers.write_text(
                f'[providers.up]\nbase_url = "{direct.base}/v1"\napi_key = "k"\n'
                f'[[models]]\nname = "bench"\n{price}targets = [{{ provider = "up" }}]\n'
            )
            keys = tmp / f"keys-{name}.toml"
            keys.write_text(f'[[keys]]\nname = "bench"\nkey = "{KEY}"\n{budget}')
            keys.chmod(0o600)
            port = free_port()
            log(f"budgets: starting edge, {name} :{port}")
            edges[name] = start_edge(
                procs, out, port, direct.base + "/v1", f"benchedge-{name}{port}",
                "edge-budgets.log",
                {"PROVIDERS_FILE": str(providers), "API_KEYS_FILE": str(keys), "API_KEYS": "",
                 "STATE_DIR": str(tmp / f"state-{name}")},
            )  # fmt: skip
        return interleaved("budgets", edges, settings)
    finally:
        for target in edges.values():
            procs.stop(target.proc)


TRACE_RATIOS = ("1.0", "0.1", "0.0")


def run_tracing_phase(
    settings: Settings, procs: Processes, out: Path, direct: Target, edge: Target
) -> dict[str, Any]:
    """Edge exporting spans over OTLP/HTTP (to nginx's /v1/traces, which takes every export and
    keeps nothing), sampling every request, one in ten and none (OTEL_TRACES_SAMPLER=
    traceidratio), beside `edge` (export off), under the throughput load in interleaved rounds.
    Each exporting edge's `edge_trace_spans_total` is read after its runs: spans dropped for a
    full queue would make export look cheaper than it is, so the counts are reported too."""
    traced: dict[str, Target] = {}
    try:
        for ratio in (*TRACE_RATIOS, "control"):
            port = free_port()
            log(f"tracing: starting edge exporting spans, ratio {ratio} :{port}")
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": direct.base, "OTEL_TRACES_SAMPLER":
                   "traceidratio", "OTEL_TRACES_SAMPLER_ARG": ratio}  # fmt: skip
            if ratio == "control":  # a second edge exporting nothing: the phase's noise
                env = {}
            traced[ratio] = start_edge(
                procs, out, port, direct.base + "/v1", f"benchedge-trace{port}", "edge-tracing.log",
                env,
            )  # fmt: skip
        targets = {"off": edge, **traced}
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        for round_ in range(1, settings.rounds + 1):
            for name, target in targets.items():
                log(f"tracing: export {name} (round {round_}/{settings.rounds})")
                runs[name].append(load_cpu(target, settings, settings.duration, round_ == 1))
        spans = {
            ratio: span_counts(target) for ratio, target in traced.items() if ratio != "control"
        }
    finally:
        for target in traced.values():
            procs.stop(target.proc)
    best = {name: best_throughput(results) for name, results in runs.items()}
    return {"runs": best, "spans": spans}


_SPANS_RE = re.compile(r'^edge_trace_spans_total\{result="(\w+)"\} (\S+)$', re.MULTILINE)


def span_counts(target: Target) -> dict[str, int]:
    """The target's spans so far by result (exported, failed, dropped), summed over workers."""
    try:
        with urllib.request.urlopen(target.base + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError as exc:
        raise BenchError(f"the tracing edge's /metrics did not answer: {exc}") from exc
    return {result: int(float(value)) for result, value in _SPANS_RE.findall(text)}


def distinct_body() -> str:
    """A chat completion no other request of the run has sent."""
    return BODY[:-1] + f',"user":"sample-{time.time_ns():x}"}}'


def x_cache(target: Target, body: str, expected: str) -> None:
    """One request to `target`: its answer must be 200 with `x-cache: expected`."""
    request = urllib.request.Request(
        target.url,
        data=body.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            resp.read()
            found = resp.headers.get("x-cache")
    except OSError as exc:
        raise BenchError(f"the cached edge did not answer: {exc}") from exc
    if found != expected:
        raise BenchError(f"the cached edge answered x-cache: {found}, expected {expected}")


LOOKUP_RE = re.compile(
    r'^edge_cache_lookups_total\{(?:[^}]*,)?result="(\w+)"[^}]*\} (\S+)$', re.MULTILINE
)


def cache_lookups(target: Target) -> dict[str, float]:
    """Edge's cache lookups so far, by result (hit, miss, ...), summed over routes and tiers:
    from its /metrics (every worker's counters)."""
    try:
        with urllib.request.urlopen(target.base + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError as exc:
        raise BenchError(f"the cached edge's /metrics did not answer: {exc}") from exc
    counts: dict[str, float] = {}
    for result, value in LOOKUP_RE.findall(text):
        counts[result] = counts.get(result, 0.0) + float(value)
    return counts


def settled_lookups(target: Target, timeout_s: float = 10.0) -> dict[str, float]:
    """`cache_lookups` once two scrapes 0.1 s apart agree: requests a load left in flight when
    wrk stopped (on a busy machine, a worker's backlog) are counted with their own run."""
    deadline = time.monotonic() + timeout_s
    counts = cache_lookups(target)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        again = cache_lookups(target)
        if again == counts:
            break
        counts = again
    return counts


def counts_since(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: round(v - before.get(k, 0.0)) for k, v in after.items() if v > before.get(k, 0.0)}


def sum_counts(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        for key, value in one.items():
            total[key] = total.get(key, 0) + value
    return total


def run_ablation(
    settings: Settings, procs: Processes, out: Path, floor: Target, upstream: str
) -> dict[str, Any]:
    """Edge with each feature off in turn (ABLATIONS), beside the running floor.

    Every configuration runs at once (idle gunicorn workers cost next to nothing) and the
    throughput runs are interleaved, floor first, over `settings.rounds` rounds, the best kept
    (as in the throughput phase): a change of machine load during the phase then touches every
    configuration alike instead of skewing the one that ran at the time.
    """
    seconds = settings.ablation_duration
    edges: dict[str, Target] = {}
    try:
        for name, env in ABLATIONS:
            port = free_port()
            log(f"ablation: starting edge with {name} :{port}")
            edges[name] = start_edge(
                procs, out, port, upstream, f"benchabl{port}", "edge-ablation.log", env
            )
        targets = {"floor": floor, **edges}
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        for round_ in range(1, settings.rounds + 1):
            for name, target in targets.items():
                log(
                    f"ablation {name} (round {round_}/{settings.rounds}): wrk "
                    f"-t{settings.threads} -c{settings.connections} -d{seconds}s"
                )
                runs[name].append(load_cpu(target, settings, seconds, warmup=round_ == 1))
    finally:
        for edge in edges.values():
            procs.stop(edge.proc)
    best = {name: best_throughput(results) for name, results in runs.items()}
    return {"floor": best.pop("floor"), "configs": best}


def run_stream_phase(settings: Settings, procs: Processes, out: Path) -> dict[str, Any] | None:
    upstream_port, floor_port, edge_port = free_port(), free_port(), free_port()
    log(f"streaming: tests/upstream_server.py :{upstream_port} ({settings.stream_chunks} chunks "
        f"every {settings.stream_pace:g} s), floor :{floor_port}, edge :{edge_port}")  # fmt: skip
    upstream_proc, upstream_base = start_sse_upstream(
        procs, out, upstream_port, settings.stream_pace, settings.stream_chunks
    )
    floor = edge = None
    try:
        floor = start_floor(procs, out, floor_port, upstream_base + "/v1", "floor-stream.log")
        edge = start_edge(
            procs, out, edge_port, upstream_base + "/v1", "benchedge-stream", "edge-stream.log"
        )
        direct = stream_series(upstream_port, {}, settings.stream_requests)
        floored = stream_series(floor_port, {}, settings.stream_requests)
        through = stream_series(
            edge_port, {"Authorization": f"Bearer {KEY}"}, settings.stream_requests
        )
    finally:
        for target in (edge, floor):
            if target is not None:
                procs.stop(target.proc)
        procs.stop(upstream_proc)
    return {"direct": direct, "floor": floored, "edge": through, "sent": settings.stream_chunks}
