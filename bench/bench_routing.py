"""Micro-benchmark: what routing adds per request on top of the single-upstream edge.

    python bench/bench_routing.py            # 100k requests per mode
    python bench/bench_routing.py --n 5000   # smoke run

Both modes run the whole `Router.exchange` of one request in an event loop, with an upstream
stub that answers at once (so only the gateway's own work is timed): **single** is the
UPSTREAM_URL case (one target, no breaker), **routing** is a PROVIDERS_FILE model with three
weighted targets, one renaming the model, and host-wide breakers in a real shared-memory table.
Prints p50/p99 µs per request for each and the added cost (routing minus single, p50).
Target: added ≤ 20 µs per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.config import Config
from edge.observability.context import RequestContext
from edge.routing import breaker as cb
from edge.routing.exchange import Call
from edge.routing.providers import Providers, parse
from edge.routing.router import Router
from edge.shm import unlink
from edge.upstream.client import UpstreamResponse

TARGET_ADDED_US = 20.0
MODEL = "gpt-4o-mini"
BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},'
    b'{"role":"user","content":"Say hello in five words, please, and nothing else."}],'
    b'"temperature":0.2,"max_tokens":64}'
)
DOCUMENT = {
    "providers": {
        "a": {"base_url": "http://127.0.0.1:1/v1", "api_key": "sk-a"},
        "b": {"base_url": "http://127.0.0.1:2/v1", "api_key": "sk-b"},
        "c": {"base_url": "http://127.0.0.1:3/v1"},
    },
    "models": [
        {
            "name": "gpt-4o-mini",
            "targets": [
                {"provider": "a", "model": "qwen2.5-7b-instruct", "weight": 3},
                {"provider": "b", "weight": 1},
                {"provider": "c", "weight": 1},
            ],
        }
    ],
}


class StubUpstream:
    """Answers at once, like a provider on zero latency."""

    def __init__(self) -> None:
        self.answer = UpstreamResponse(200, b'{"ok":true}', "application/json", {})

    async def call(
        self, method, path, body, ctx, outcome, provider=None, timeout_s=None, extra=None
    ):
        return self.answer


async def run(router: Router, n: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        started = clock()
        ctx = RequestContext("bench", None)
        await router.exchange(ctx, Call("openai", "POST", "/chat/completions", BODY, None, MODEL))
        samples[i] = clock() - started
    return samples


def pct(ordered: list[int], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="requests per mode")
    args = parser.parse_args(argv)
    stub = StubUpstream()
    single = Router(
        Providers.single(Config.from_env({"UPSTREAM_URL": "http://127.0.0.1:1/v1"})),
        stub,  # type: ignore[arg-type]
        cb.LocalBreakers(),
        30.0,
    )
    name = f"llm-edge-proxy-bench.breakers.{os.getpid()}"
    cb.SharedBreakers.create(name)
    shared = cb.SharedBreakers.attach(name)
    try:
        routing = Router(parse(DOCUMENT), stub, shared, 30.0)  # type: ignore[arg-type]
        loop = asyncio.new_event_loop()
        try:
            results = {}
            for label, router in (("single", single), ("routing", routing)):
                loop.run_until_complete(run(router, min(args.n, 10_000)))  # warm up
                results[label] = sorted(loop.run_until_complete(run(router, args.n)))
        finally:
            loop.close()
    finally:
        shared.close()
        unlink(name)
    print(f"{args.n} requests per mode, pid {os.getpid()}")
    for label, ordered in results.items():
        p50, p99 = pct(ordered, 0.5), pct(ordered, 0.99)
        print(f"{label:<8} Router.exchange p50 {p50:6.2f} µs   p99 {p99:6.2f} µs")
    added = pct(results["routing"], 0.5) - pct(results["single"], 0.5)
    added99 = pct(results["routing"], 0.99) - pct(results["single"], 0.99)
    verdict = "OK" if added <= TARGET_ADDED_US else "OVER TARGET"
    print(f"routing added p50 {added:.2f} µs p99 {added99:.2f} µs per request "
          f"(target <= {TARGET_ADDED_US:.0f} µs): {verdict}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
