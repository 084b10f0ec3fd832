# ruff: noqa: RUF001, RUF002 - the table prints the multiplication sign and dashes on purpose
"""Instructions per request: a deterministic measure of the request path's CPU work.

    python bench/instructions.py [--requests N] [--no-valgrind]

Time-based figures on a shared 2-core VM move by ±10 % between runs (the floor's own CPU per
request has read 174 µs in one phase and 220 µs in the next), which hides any change smaller
than that. Counting the instructions a request executes does not: valgrind's cachegrind counts
them exactly, and two runs of the same code agree within about 1 %.

Each configuration runs in one process, in-process and without load generators: the server
side is the real thing (uvicorn's HTTP protocol, edge's own protocol class for edge, the ASGI
app, its aiohttp session to a static nginx upstream), the client side a fake transport fed one
keep-alive request at a time. Each is counted twice, with N and 3N requests after a warm-up,
and the difference divided by 2N is what one request costs: start-up and warm-up cancel out.
What it does not count: the kernel's work (sockets, flock), and cache misses, which make a
larger request path cost more time per instruction than a smaller one (under wrk, edge's
time ratio to the floor runs ~0.2–0.4× above its instruction ratio).

Configurations: the floor (bench/floor_app.py on uvicorn's stock httptools protocol), edge with
every feature on (as bench/run.py starts it: auth, shm-like process-local rate limiter, metrics,
JSON access log, tracing), edge with each feature off in turn, and edge with all four off.
Needs `valgrind` (Debian package); `--no-valgrind` counts CPU time instead (noisy; for a quick
check that the drivers work).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from targets import (  # noqa: E402 - found through BENCH above
    ABLATIONS,
    BODY,
    CHAT_PATH,
    EDGE_FEATURES_ON,
    KEY,
    UPSTREAM_ANSWER,
    Processes,
    free_port,
    start_nginx,
)

# key (for --only) -> (row label, edge settings over EDGE_FEATURES_ON; None: the floor): the
# floor, bench/run.py's ablation configurations (ABLATIONS, in its order), and tracing off.
_ABLATION_KEYS = ("on", "metrics-off", "log-off", "limit-off", "auth-off", "all-off")
CONFIGS: dict[str, tuple[str, dict[str, str] | None]] = {
    "floor": ("floor (no features)", None),
    **{
        key: (f"edge, {label}", settings)
        for key, (label, settings) in zip(_ABLATION_KEYS, ABLATIONS, strict=True)
    },
    "tracing-off": ("edge, tracing off", {"ENABLE_TRACING": "false"}),
}
IR_RE = re.compile(r"I\s+refs:\s+([\d,]+)")


# ------------------------------------------------------------------ the driver (one process)


class _ClientTransport:
    """The client's side of one keep-alive connection: completes a future per response."""

    def __init__(self) -> None:
        self.buffer = b""
        self.done: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        at = head.find(b"\r\ncontent-length: ")
        length = int(head[at + 18 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
        if len(self.buffer) - end - 4 >= length and self.done is not None:
            self.buffer = b""
            self.done.set_result(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True


async def _drive(app: Any, http: Any, requests: int, warmup: int) -> float:
    import uvicorn
    from uvicorn.server import ServerState

    loop = asyncio.get_running_loop()
    startup: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    started = asyncio.Event()

    async def lifespan_send(message: dict[str, Any]) -> None:
        started.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    lifespan = asyncio.ensure_future(app(scope, startup.get, lifespan_send))
    await started.wait()
    config = uvicorn.Config(app=app, http=http, interface="asgi3", lifespan="off",
                            log_level="warning", access_log=False, server_header=False)  # fmt: skip
    config.load()
    protocol = config.http_protocol_class(
        config=config, server_state=ServerState(), app_state={}, _loop=loop
    )
    client = _ClientTransport()
    protocol.connection_made(client)  # type: ignore[arg-type]
    body = BODY.encode()
    request = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def one() -> None:
        client.done = loop.create_future()
        protocol.data_received(request)
        await client.done

    for _ in range(warmup):
        await one()
    cpu = time.process_time()
    for _ in range(requests):
        await one()
    cpu = time.process_time() - cpu
    protocol.connection_lost(None)
    await startup.put({"type": "lifespan.shutdown"})
    await lifespan
    return cpu / requests


def drive(name: str, upstream: str, requests: int, warmup: int) -> None:
    """Run `requests` requests through configuration `name`; print CPU µs per request."""
    import logging.config

    import uvloop

    overrides = CONFIGS[name][1]
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="edge-instr-")
    if overrides is None:
        os.environ["FLOOR_UPSTREAM_URL"] = upstream
        import floor_app

        app, http = floor_app.create_app(), "httptools"
    else:
        from edge.app import create_app
        from edge.config import Config
        from edge.observability import logs
        from edge.server.protocol import EdgeLimits, protocol_class

        config = Config.from_env({**EDGE_FEATURES_ON, "UPSTREAM_URL": upstream, **overrides})
        app, http = create_app(config), protocol_class(EdgeLimits.from_config(config))
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the access log, as under gunicorn
        logging.config.dictConfig(logs.logconfig_dict(config))
    uvloop.install()
    per_request = asyncio.run(_drive(app, http, requests, warmup))
    sys.__stdout__.write(f"{per_request * 1e6:.1f}\n")


# ------------------------------------------------------------------ the runs


def _run(name: str, upstream: str, requests: int, warmup: int, valgrind: bool) -> float:
    argv = [sys.executable, str(Path(__file__).resolve()), "--drive", name, "--upstream",
            upstream, "--requests", str(requests), "--warmup", str(warmup)]  # fmt: skip
    if valgrind:
        argv = ["valgrind", "--tool=cachegrind", "--cache-sim=no",
                "--cachegrind-out-file=/dev/null", *argv]  # fmt: skip
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        _CHILDREN.add(child)
        try:
            stdout, stderr = child.communicate(timeout=1800)
        finally:
            _CHILDREN.discard(child)
    if child.returncode != 0:
        raise SystemExit(f"{name}: the driver failed:\n{stderr[-2000:]}")
    if not valgrind:
        return float(stdout.split()[-1])
    found = IR_RE.search(stderr)
    if found is None:
        raise SystemExit(f"{name}: no instruction count in valgrind's output")
    return int(found[1].replace(",", ""))


def measure(
    names: list[str], upstream: str, requests: int, warmup: int, valgrind: bool
) -> dict[str, float]:
    """Instructions (or CPU µs) per request of each configuration, two at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> float:
        if not valgrind:
            return _run(name, upstream, requests, warmup, False)
        more = _run(name, upstream, 3 * requests, warmup, True)
        return (more - _run(name, upstream, requests, warmup, True)) / (2 * requests)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def table(results: dict[str, float], valgrind: bool) -> str:
    floor = results.get("floor")
    unit = "instructions/request" if valgrind else "CPU µs/request (noisy)"
    lines = [f"| Configuration | {unit} | ×floor |", "|---|---|---|"]
    for name, value in results.items():
        ratio = f"{value / floor:.2f}×" if floor else "–"
        shown = f"{value:,.0f}" if valgrind else f"{value:.1f}"
        lines.append(f"| {CONFIGS[name][0]} | {shown} | {ratio} |")
    return "\n".join(lines)


_CHILDREN: set[subprocess.Popen[str]] = set()


def _interrupted(signum: int, frame: Any) -> None:
    """SIGTERM: end the drivers (their threads then return) and stop nginx on the way out."""
    for child in list(_CHILDREN):
        child.kill()
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="N (counted: N and 3N)")
    parser.add_argument("--warmup", type=int, default=300, help="requests before counting")
    parser.add_argument("--no-valgrind", action="store_true", help="CPU time instead (noisy)")
    parser.add_argument("--only", help=f"comma-separated, of: {','.join(CONFIGS)}")
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args.drive, args.upstream, args.requests, args.warmup)
        return
    valgrind = not args.no_valgrind
    if valgrind and subprocess.run(["which", "valgrind"], capture_output=True).returncode:
        raise SystemExit("valgrind is not installed (apt-get install -y valgrind), or use "
                         "--no-valgrind")  # fmt: skip
    names = list(CONFIGS) if not args.only else args.only.split(",")
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known: {','.join(CONFIGS)}")
    procs = Processes()
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    with tempfile.TemporaryDirectory(prefix="edge-instr-") as tmp:
        try:
            nginx = start_nginx(procs, Path(tmp), Path(tmp) / "out", free_port(), UPSTREAM_ANSWER)
            started = time.monotonic()
            results = measure(names, nginx.base + "/v1", args.requests, args.warmup, valgrind)
        finally:
            procs.stop_all()
    print(table(results, valgrind))
    print(f"\n({args.requests} and {3 * args.requests} requests per configuration; "
          f"{time.monotonic() - started:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
