"""How many concurrent streams one host holds, and what each costs in memory.

    python bench/streams.py                    # 5,000 streams, 2 workers, the defaults
    python bench/streams.py --streams 500      # a quicker look

Starts the test upstream (tests/upstream_server.py, one event every --pace seconds) and edge
with its default limits (2 workers), opens --streams concurrent streams through edge, each
read until its first event, and holds them open while it measures the workers' RSS. Prints
how many streams got their first event (every one should), how many were refused and how,
and the workers' RSS per open stream (what sizing MAX_CONCURRENT_REQUESTS and
UPSTREAM_POOL_SIZE from memory needs). All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import Gunicorn, Upstream, rss_kb  # noqa: E402

KEY = "bench-streams-key"


async def open_stream(port: int, held: list[asyncio.StreamWriter], outcomes: Counter) -> None:
    body = (
        b'{"model": "paced-100", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        outcomes[f"connect {type(exc).__name__}"] += 1
        return
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        status = head.split(b" ", 2)[1].decode()
        if status != "200":
            outcomes[f"status {status}"] += 1
            writer.close()
            return
        await asyncio.wait_for(reader.readuntil(b"data:"), 60)
        outcomes["first event"] += 1
        held.append(writer)
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        outcomes[f"error {type(exc).__name__}"] += 1
        writer.close()


async def hold(port: int, streams: int, batch: int) -> tuple[Counter, list[asyncio.StreamWriter]]:
    outcomes: Counter = Counter()
    held: list[asyncio.StreamWriter] = []
    for start in range(0, streams, batch):
        count = min(batch, streams - start)
        await asyncio.gather(*(open_stream(port, held, outcomes) for _ in range(count)))
    return outcomes, held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=250, help="streams opened at once")
    parser.add_argument("--pace", type=float, default=2.0, help="seconds between events")
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.streams + 256:
        print(f"open-file limit {hard} is below {args.streams} streams", file=sys.stderr)
        return 2
    upstream = Upstream("--pace", str(args.pace))
    edge = Gunicorn(
        API_KEYS=KEY, UPSTREAM_URL=upstream.url + "/v1", WORKERS=str(args.workers),
        RATE_LIMIT_ENABLED="false", LOG_LEVEL="warning",
    )  # fmt: skip
    loop = asyncio.new_event_loop()
    try:
        workers = edge.worker_pids()
        idle = sum(rss_kb(pid) for pid in workers)
        started = time.monotonic()
        outcomes, held = loop.run_until_complete(hold(edge.port, args.streams, args.batch))
        elapsed = time.monotonic() - started
        loaded = sum(rss_kb(pid) for pid in workers)
        for writer in held:
            writer.close()
        loop.run_until_complete(asyncio.sleep(0.5))
    finally:
        loop.close()
        edge.stop()
        upstream.stop()
    opened = outcomes["first event"]
    per_stream = (loaded - idle) / opened if opened else float("nan")
    print(f"{args.streams} streams through {args.workers} workers, opened in {elapsed:.1f} s")
    print(f"  outcomes: {dict(outcomes)}")
    print(f"  workers' RSS: idle {idle / 1024:.1f} MB, with {opened} streams open "
          f"{loaded / 1024:.1f} MB: {per_stream:.1f} KB per stream")  # fmt: skip
    return 0 if opened == args.streams else 1


if __name__ == "__main__":
    sys.exit(main())
