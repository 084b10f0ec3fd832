"""Micro-benchmark: what budgets and cost accounting add to a request, on a real shared-memory
ledger (edge.budgets: the segment, its flock lock, the slot update).

    python bench/bench_budgets.py            # 100k requests per case
    python bench/bench_budgets.py --n 2000   # smoke run

Two cases, each a request's whole share of the work, as the pipeline and the middleware do it:

- **accounting**: a key without a budget: its cost from the usage at its target's prices
  (edge.cost) and `Accounts.finish` (the request, its tokens and cost counted in the
  worker's batch, written into the ledger every 50 ms);
- **budget**: a key with a budget: `Accounts.hold` (the token estimate of a chat request,
  priced, and the admission with its reservation) and then the same as above (its refund,
  far from the budget's end, batched as well).

Prints µs per request for each, the median of five runs. Target: ≤ 10 µs per request with a
budget (issue #25). The end-to-end figure is bench/run.py's budgets phase.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.budgets.accounts import Accounts
from edge.budgets.shared import SharedLedger
from edge.cost import Price, of_request
from edge.ratelimit.tokens import CHAT
from edge.shm import unlink

TARGET_US = 10.0
PRICE = Price(2.5, 10.0)
BODY = b'{"model":"bench","max_tokens":256,"messages":[{"role":"user","content":"hi there"}]}'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="requests per run")
    args = parser.parse_args(argv)
    import orjson

    name = f"llm-edge-proxy-bench-ledger.{os.getpid()}"
    SharedLedger.create(name).close()
    ledger = SharedLedger.attach(name)
    try:
        config = SimpleNamespace(
            rate_limit_tpm_default_max_tokens=1024, rate_limit_failure_policy="allow"
        )
        providers = SimpleNamespace(price_ceiling=lambda model: PRICE)
        accounts = Accounts(config, providers, ledger)
        outcome = SimpleNamespace(working=1, error=None, price=PRICE)
        data = orjson.loads(BODY)
        call = SimpleNamespace(data=data, model="bench", body=BODY, path="/chat/completions")

        def context(budget: float | None) -> SimpleNamespace:
            key = SimpleNamespace(identity="bench", budget_usd=budget, budget_period="month")
            return SimpleNamespace(key=key, budget=None, cost_usd=None, upstream=outcome,
                                   cache=None, prompt_tokens=12, completion_tokens=40,
                                   cached_tokens=None, relayed=0)  # fmt: skip

        def accounting(n: int) -> float:
            ctx = context(None)
            started = time.perf_counter()
            for _ in range(n):
                ctx.cost_usd = of_request(PRICE, 12, 40, None, False)
                accounts.finish(ctx, True)
            return (time.perf_counter() - started) / n * 1e6

        def budgeted(n: int) -> float:
            ctx = context(1e9)
            started = time.perf_counter()
            for _ in range(n):
                accounts.hold(ctx, call, CHAT)
                ctx.cost_usd = of_request(PRICE, 12, 40, None, False)
                accounts.finish(ctx, True)
            return (time.perf_counter() - started) / n * 1e6

        async def in_loop(n: int) -> float:  # as in a worker: no reservation, batched
            return accounting(n)

        plain = statistics.median(asyncio.run(in_loop(args.n)) for _ in range(5))

        async def held_in_loop(n: int) -> float:  # as in a worker: refunds batched
            return budgeted(n)

        held = statistics.median(asyncio.run(held_in_loop(args.n)) for _ in range(5))
    finally:
        ledger.close()
        unlink(name)
    met = "met" if held <= TARGET_US else "NOT met"
    print(f"accounting {plain:.2f} µs budget {held:.2f} µs (target ≤ {TARGET_US:g} µs: {met})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
