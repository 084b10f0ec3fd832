#!/usr/bin/env python3

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

The ablation phase then starts edge again with one feature off at a time (metrics, access log,
rate limit, auth), and with all four off, each under the same load as the floor: what each
feature costs, in CPU per request and throughput against the floor. The redis phase starts a
local redis-server and edge on RATE_LIMIT_BACKEND=redis beside edge on shared memory (interleaved
throughput rounds); the limiter and routing phases run bench/bench_limiter.py and
bench/bench_routing.py (µs per rate-limit decision, µs routing adds per request). The cache
phase starts edge with CACHE_BACKEND=local beside edge with no cache: the hit path's throughput
(one body) against the miss path's (every body distinct), and the CPU a lookup adds to a miss.

This file is the command line; bench/targets.py starts the targets, bench/runner.py drives
the load and the phases, bench/report.py makes the tables and bench/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from report import (
    ablation_table,
    build_rows,
    cache_table,
    cpu_times,
    others_percent,
    own_cpu_seconds,
    render,
    steal_percent,
    write_results,
)
from runner import (
    PHASES,
    Settings,
    ensure_tools,
    measure,
    raise_fd_limit,
)
from targets import BENCH, ROOT, BenchError


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


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
    parser.add_argument(
        "--ablation-duration", type=int, help="seconds per run of the ablation phase (5)"
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
        ablation_duration=pick(args.ablation_duration, 5, 1),
    )
    if args.results is None:
        args.results = BENCH / "out" / "results-quick.md" if quick else BENCH / "results.md"
    if args.out_dir is None:
        args.out_dir = BENCH / "out"
    return settings, args


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
        if set(settings.phases) - {"limiter", "routing", "stream"}:
            ensure_tools(not args.no_install)
        raise_fd_limit(2 * settings.idle_connections + 1024)
        out = args.out_dir.resolve()
        out.mkdir(parents=True, exist_ok=True)
        for name in ("nginx.log", "floor.log", "edge.log", "edge-stream.log", "floor-stream.log",
                     "sse-upstream.log", "edge-ablation.log", "edge-redis.log",
                     "redis.log", "edge-cache.log"):  # fmt: skip
            (out / name).unlink(missing_ok=True)
        raw = measure(settings, out)
        rows = build_rows(settings, raw)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every started process was stopped", file=sys.stderr)
        return 130
    table = render(rows)
    ablation = ablation_table(raw)
    cache = cache_table(raw)
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
    if ablation:
        print(f"\nAblation (edge with features off, against the floor):\n\n{ablation}")
    if cache:
        print(f"\nCache (edge with CACHE_BACKEND=local: hit path, miss path, no cache):\n\n{cache}")
    met = [r for r in rows if r.met is not None]
    print(
        f"\n{sum(r.met for r in met)} of {len(met)} targets met; run took {took:.0f} s; "
        f"other processes used {others:.1f} % of the CPU, steal "
        f"{host['CPU steal during the run']}"
    )
    if others > 10:
        print("warning: the machine was busy with other work; figures are pessimistic")
    write_results(args.results, table, settings, command, took, host, ablation, cache)
    (out / "raw.json").write_text(json.dumps(raw, indent=1, default=str))
    print(f"written: {_shown(args.results)}; server logs and raw.json in {_shown(out)}")
    return 0


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(ROOT))
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
