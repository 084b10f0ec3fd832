#!/usr/bin/env python3
"""Soak: worker memory and file descriptors stay flat over many mixed requests.

    /work/venv/bin/python bench/soak.py                      # 50,000 requests
    /work/venv/bin/python bench/soak.py --requests 5000 --concurrency 16

Starts its own misbehaving upstream (tests/upstream_server.py) and gunicorn (2 workers) in
front of it, warms up, records every worker's RSS and open file descriptors, runs the mixed
load and prints the figures before and after. The mix: chat and legacy completions, streams,
models, 404, 400, 401, 413, upstream 500, garbage and non-HTTP upstream answers, streams reset
mid-way, clients hanging up mid-stream, and clients giving up on an upstream that never
answers. Every answer is checked; the exit status is 1 when an answer was unexpected, a worker
was replaced, or RSS/fds grew past the bounds (--max-rss-growth-mib, --max-fd-growth).

`run_mixed` and `worker_stats` are also used by tests/integration/test_upstream_faults.py
(the same mix, a bounded number of requests).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support import rss_kb  # noqa: E402 - shared with the tests

KEY = "sk-soak-key"
MAX_BODY = 65536
CHAT_MESSAGES = [{"role": "user", "content": "Say hello"}]

# kind -> weight per 100 requests
MIX = {
    "chat": 30,
    "completion": 10,
    "stream": 15,
    "models": 5,
    "not_found": 5,
    "bad_json": 5,
    "unauthorized": 5,
    "too_large": 3,
    "upstream_500": 3,
    "garbage": 4,
    "garbage_http": 3,
    "reset_mid_stream": 3,
    "disconnect_mid_stream": 7,
    "client_gives_up": 2,
}


@dataclass
class Result:
    requests: int = 0
    seconds: float = 0.0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(n for kind, n in self.outcomes.items() if kind.endswith(":unexpected"))


def schedule(count: int, seed: int = 1234) -> list[str]:
    kinds = [kind for kind, weight in MIX.items() for _ in range(weight)]
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        rng.shuffle(kinds)
        out.extend(kinds)
    return out[:count]


class Driver:
    def __init__(self, base_url: str, key: str) -> None:
        self.base = base_url
        self.port = int(base_url.rsplit(":", 1)[1])
        self.auth = {"authorization": f"Bearer {key}"}
        self.key = key
        self._local = threading.local()
        self._clients: list[httpx.Client] = []

    def client(self) -> httpx.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(base_url=self.base, timeout=20)
            self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def chat(self, model: str, stream: bool = False, **kwargs) -> httpx.Response:
        body = {"model": model, "messages": CHAT_MESSAGES, "stream": stream}
        return self.client().post("/v1/chat/completions", json=body, headers=self.auth, **kwargs)

    # Each returns None when the answer was the expected one, else what was wrong.

    def run(self, kind: str) -> str | None:
        return getattr(self, "k_" + kind)()

    def k_chat(self) -> str | None:
        r = self.chat("gpt-test")
        return None if r.status_code == 200 and r.json()["choices"] else _bad(r)

    def k_completion(self) -> str | None:
        r = self.client().post(
            "/v1/completions", json={"model": "gpt-test", "prompt": "hi"}, headers=self.auth
        )
        return None if r.status_code == 200 and r.json()["choices"] else _bad(r)

    def k_stream(self) -> str | None:
        r = self.chat("fast-3", stream=True)
        ok = r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        return None if ok and r.text.count("data: ") == 5 else _bad(r)

    def k_models(self) -> str | None:
        r = self.client().get("/v1/models", headers=self.auth)
        return None if r.status_code == 200 else _bad(r)

    def k_not_found(self) -> str | None:
        return _envelope(self.client().get("/v1/nothing-here", headers=self.auth), 404)

    def k_bad_json(self) -> str | None:
        r = self.client().post(
            "/v1/chat/completions", content=b"{not json", headers={
                **self.auth, "content-type": "application/json"},
        )  # fmt: skip
        return _envelope(r, 400)

    def k_unauthorized(self) -> str | None:
        r = self.client().post(
            "/v1/chat/completions", json={"model": "m", "messages": CHAT_MESSAGES},
            headers={"authorization": "Bearer wrong-key"},
        )  # fmt: skip
        return _envelope(r, 401)

    def k_too_large(self) -> str | None:
        r = self.client().post(
            "/v1/chat/completions", content=b"x" * (MAX_BODY + 1),
            headers={**self.auth, "content-type": "application/json"},
        )  # fmt: skip
        return _envelope(r, 413)

    def k_upstream_500(self) -> str | None:
        return _envelope(self.chat("error-500"), 500)

    def k_garbage(self) -> str | None:
        return _envelope(self.chat("garbage"), 502)

    def k_garbage_http(self) -> str | None:
        return _envelope(self.chat("garbage-http", stream=True), 502)

    def k_reset_mid_stream(self) -> str | None:
        r = self.chat("reset-mid-stream", stream=True)
        ok = r.status_code == 200 and '"code":"upstream_' in r.text
        return None if ok else _bad(r)

    def k_disconnect_mid_stream(self) -> str | None:
        """Read the head and the first event of a long paced stream, then hang up."""
        body = json.dumps({"model": "paced-50", "stream": True, "messages": CHAT_MESSAGES})
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\n"
            f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(request)
            seen = b""
            while b"data: " not in seen:
                chunk = sock.recv(65536)
                if not chunk:
                    return f"closed before the first event: {seen[:200]!r}"
                seen += chunk
            if not seen.startswith(b"HTTP/1.1 200 "):
                return f"unexpected head: {seen[:200]!r}"
        return None

    def k_client_gives_up(self) -> str | None:
        """An upstream that never answers, and a client that stops waiting first."""
        try:
            r = self.chat("hang", timeout=0.3)
        except httpx.TimeoutException:
            return None
        return _bad(r)


def _bad(response: httpx.Response) -> str:
    return f"{response.status_code} {response.text[:200]!r}"


def _envelope(response: httpx.Response, status: int) -> str | None:
    if response.status_code != status:
        return _bad(response)
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return _bad(response)
    if set(error) != {"message", "type", "param", "code"}:
        return _bad(response)
    return None


def run_mixed(
    base_url: str,
    count: int,
    concurrency: int = 16,
    key: str = KEY,
    progress: Callable[[int], None] | None = None,
) -> Result:
    """`count` requests of the mix against `base_url`, `concurrency` at a time."""
    driver = Driver(base_url, key)
    result = Result(requests=count)
    lock = threading.Lock()
    done = 0

    def one(kind: str) -> None:
        nonlocal done
        try:
            problem = driver.run(kind)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        with lock:
            done += 1
            if problem is None:
                result.outcomes[kind + ":ok"] += 1
            else:
                result.outcomes[kind + ":unexpected"] += 1
                if len(result.failures) < 20:
                    result.failures.append(f"{kind}: {problem}")
            if progress is not None and done % 1000 == 0:
                progress(done)

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            for _ in pool.map(one, schedule(count)):
                pass
    finally:
        driver.close()  # our keep-alive connections: the workers' client sockets go with them
    result.seconds = time.monotonic() - started
    return result


# ------------------------------------------------------------------ process figures


def rss_kib(pid: int) -> int:
    value = rss_kb(pid)
    if not value:
        raise RuntimeError(f"no VmRSS for {pid}")
    return value


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _tcp_sockets() -> dict[str, tuple[int, int]]:
    """{socket inode: (local port, remote port)} of this network namespace's TCP sockets."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                table[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
    return table


def fd_kinds(pid: int, server_port: int, upstream_port: int) -> collections.Counter:
    """A worker's descriptors by kind: `client` (connections to the proxy's port), `upstream`
    (connections to the upstream), `other` (files, pipes, event fds, the listener...)."""
    tcp = _tcp_sockets()
    kinds: collections.Counter = collections.Counter()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = entry.readlink().name
        except OSError:
            continue  # closed meanwhile
        ports = tcp.get(target[8:-1]) if target.startswith("socket:[") else None
        if ports is not None and ports[0] == server_port and ports[1] != 0:
            kinds["client"] += 1
        elif ports is not None and ports[1] == upstream_port:
            kinds["upstream"] += 1
        else:
            kinds["other"] += 1
    return kinds


@dataclass(frozen=True)
class Figures:
    """One worker at one moment."""

    rss_kib: int
    fds: int
    client: int  # connections from clients
    upstream: int  # pooled connections to the upstream
    other: int  # everything else: listener, files, pipes, event fds, ...


def figures(pid: int, server_port: int, upstream_port: int) -> Figures:
    kinds = fd_kinds(pid, server_port, upstream_port)
    return Figures(
        rss_kib(pid), sum(kinds.values()), kinds["client"], kinds["upstream"], kinds["other"]
    )


def settled(
    pids: list[int], server_port: int, upstream_port: int, timeout: float = 15.0
) -> dict[int, Figures]:
    """Each worker's figures once no client connection is left open (requests held on the
    upstream have ended, hung-up sockets are closed), or as they are at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        now = {pid: figures(pid, server_port, upstream_port) for pid in pids}
        if all(f.client == 0 for f in now.values()) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def report(before: dict[int, Figures], after: dict[int, Figures]) -> None:
    for pid in sorted(before):
        b, a = before[pid], after[pid]
        print(
            f"  worker {pid}: RSS {b.rss_kib / 1024:6.1f} -> {a.rss_kib / 1024:6.1f} MiB "
            f"({(a.rss_kib - b.rss_kib) / 1024:+.1f}); fds {b.fds} -> {a.fds} "
            f"(client {b.client} -> {a.client}, upstream pool {b.upstream} -> {a.upstream}, "
            f"other {b.other} -> {a.other})"
        )


def problems(
    before: dict[int, Figures],
    after: dict[int, Figures],
    max_rss_growth_mib: float,
    max_fd_growth: int,
    pool_bound: int,
) -> list[str]:
    """What is wrong between two settled snapshots (empty when memory and fds are flat)."""
    found = []
    if sorted(before) != sorted(after):
        found.append(f"workers changed: {sorted(before)} -> {sorted(after)}")
        return found
    for pid in sorted(before):
        b, a = before[pid], after[pid]
        if (a.rss_kib - b.rss_kib) / 1024 > max_rss_growth_mib:
            found.append(f"worker {pid}: RSS grew {(a.rss_kib - b.rss_kib) / 1024:.1f} MiB")
        if a.client:
            found.append(f"worker {pid}: {a.client} client connections still open")
        if a.other > b.other:
            found.append(f"worker {pid}: {a.other - b.other} more non-connection fds")
        if a.upstream > pool_bound:
            found.append(f"worker {pid}: {a.upstream} upstream connections (bound {pool_bound})")
        if a.fds - b.fds > max_fd_growth:
            found.append(f"worker {pid}: fds grew {a.fds - b.fds}")
    return found


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--warmup", type=int, default=3_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-rss-growth-mib", type=float, default=15.0)
    parser.add_argument("--max-fd-growth", type=int, default=16)
    args = parser.parse_args()

    from support import Gunicorn, Upstream

    upstream = Upstream("--pace", "0.2")
    server = None
    try:
        server = Gunicorn(
            API_KEYS=KEY,
            UPSTREAM_URL=upstream.url + "/v1",
            WORKERS=str(args.workers),
            SERVER_TIMEOUT_SECONDS="2",
            MAX_REQUEST_SIZE=str(MAX_BODY),
            RATE_LIMIT_RPM="1000000000",
            RATE_LIMIT_BURST="1000000000",
            LOG_LEVEL="warning",
        )
        pids = sorted(server.worker_pids())
        print(f"gunicorn {server.url}, workers {pids}; upstream {upstream.url}")
        print(f"warm-up: {args.warmup} requests")
        warm = run_mixed(server.url, args.warmup, args.concurrency)
        before = settled(pids, server.port, upstream.port)
        print(f"soak: {args.requests} mixed requests, {args.concurrency} at a time")
        result = run_mixed(
            server.url,
            args.requests,
            args.concurrency,
            progress=lambda n: print(f"  {n} done", flush=True),
        )
        after = settled(sorted(server.worker_pids()), server.port, upstream.port)
        print(f"done in {result.seconds:.1f}s ({result.requests / result.seconds:.0f} req/s)")
        for kind in MIX:
            ok = result.outcomes[kind + ":ok"]
            bad = result.outcomes[kind + ":unexpected"]
            print(f"  {kind:24s} {ok:6d} ok {bad:4d} unexpected")
        for failure in result.failures:
            print("  !", failure)
        report(before, after)
        found = problems(
            before, after, args.max_rss_growth_mib, args.max_fd_growth, args.concurrency
        )
        if warm.failed or result.failed:
            found.insert(0, f"{warm.failed + result.failed} unexpected answers")
        print("RESULT:", "; ".join(found) if found else "flat (within bounds)")
        return 1 if found else 0
    finally:
        if server is not None:
            server.stop()
        upstream.stop(timeout=3)


if __name__ == "__main__":
    sys.exit(main())
