"""`Accounts`: what each key spent, in tokens and USD, per budget period, and the budget that
stops it.

Theory of operation
-------------------
A budget is a token limit priced in dollars over a calendar period (edge.budgets.periods), and
works as the token limit does (edge.ratelimit.tokens): the same estimate, reserved before the
request goes upstream, settled to what it really cost when it ends, with no floor.

- `hold`, in the request pipeline after the cache lookup (a hit costs nothing): a key with a
  budget is admitted while its spend in the current period, the reservations of its requests
  in flight included, is below `budget_usd`; the request's estimate (input and maximum output
  tokens) priced at the highest prices among its model's targets is then reserved. Over
  budget: 429 `insufficient_quota` with `x-should-retry: false` (edge.errors.QuotaExceeded).
- `finish`, once per request of any key when its answer has ended (edge.middleware): the
  request's cost (edge.cost, from the usage the provider reported) replaces its reservation.
  One whose usage never arrived (the client hung up, the upstream broke off) is charged at
  least its reservation when the upstream may have worked on it, nothing when it provably did
  not. Its tokens and the request itself are counted for `llm-edge-proxy usage`.

Where the figures live: with the shared-memory rate limiter, in the host's ledger
(edge.budgets.shared), copied once a second into the state store (edge.budgets.store); with
`RATE_LIMIT_BACKEND=redis`, in Redis (edge.budgets.redis), shared by every host. When they
cannot be consulted (lock timeout, no slot, Redis away) RATE_LIMIT_FAILURE_POLICY decides and
`edge_rate_limiter_failures_total{event="budget_*"}` counts it.

Only priced models cost anything: a key with a budget that uses a model without prices spends
nothing on it (the README says so; the start logs a warning).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from edge.budgets import periods
from edge.budgets.ledger import Ledger, Row, to_nano, to_usd
from edge.budgets.store import StoreError
from edge.errors import QuotaExceeded, RateLimited
from edge.ratelimit.base import DENY
from edge.ratelimit.tokens import check_counts, estimate_input, estimate_output

log = logging.getLogger("edge.budgets")

FLUSH_EVERY_S = 1.0
BATCH_S = 0.05  # how long a worker may hold the counts of requests without a reservation


_UNKNOWN: Any = object()


class Accounts:
    """One worker's access to the spend of every key (see the module docstring)."""

    def __init__(
        self,
        config: Any,
        providers: Any,
        ledger: Any,
        store: Any = None,
        metrics: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`ledger`: edge.budgets.shared's (synchronous) or edge.budgets.redis's
        (`asynchronous`); `store`: the state store the shared ledger is flushed to."""
        self._providers = providers
        self._default_max = config.rate_limit_tpm_default_max_tokens
        self._policy = config.rate_limit_failure_policy
        self._ledger = ledger
        self.asynchronous = getattr(ledger, "asynchronous", False)  # hold_async, not hold
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._bounds: dict[str, tuple[int, int]] = {}
        self._ceilings: dict[str, Any] = {}  # model -> Providers.price_ceiling, memoised
        # Requests without a reservation, counted per (key, period) until the next batch.
        self._batch: dict[tuple[str, int], list[int]] = {}
        self._batch_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()

    # ---------------------------------------------------------------- periods

    def period(self, kind: str, now: float) -> tuple[int, int]:
        """(start, end) of the `kind` period holding `now`, memoised until it ends."""
        found = self._bounds.get(kind)
        if found is None or not found[0] <= now < found[1]:
            found = self._bounds[kind] = periods.bounds(kind, now)
        return found

    # ---------------------------------------------------------------- admission

    def hold(self, ctx: Any, call: Any, prompt: Any) -> None:
        """Admit the request of a key with a budget, reserving its priced estimate; raise 429
        `insufficient_quota` when the key's spend has reached its budget. The shared ledger's
        (a plain call); with Redis, `hold_async`."""
        entry = ctx.key
        start, end = self.period(entry.budget_period, self._clock())
        reserve = to_nano(self.estimate(call, prompt))
        try:
            found = self._ledger.admit(entry.identity, start, to_nano(entry.budget_usd), reserve)
        except StoreError as exc:
            log.error("the usage store cannot be read", extra={"error": str(exc)})
            found = None
        self._decide(ctx, found, start, end, reserve)

    async def hold_async(self, ctx: Any, call: Any, prompt: Any) -> None:
        entry = ctx.key
        start, end = self.period(entry.budget_period, self._clock())
        reserve = to_nano(self.estimate(call, prompt))
        budget = to_nano(entry.budget_usd)
        found = await self._ledger.admit(entry.identity, start, end, budget, reserve)
        self._decide(ctx, found, start, end, reserve)

    def _decide(
        self, ctx: Any, found: tuple[bool, int] | None, start: int, end: int, reserve: int
    ) -> None:
        if found is None:
            self._failed("budget_unavailable")
            if self._policy == DENY:
                raise RateLimited(
                    "The key's budget cannot be checked right now. Try again shortly.",
                    headers={"retry-after": "1"},
                )
            return
        if not found[0]:
            entry = ctx.key
            raise QuotaExceeded(
                f"This key has used its budget of ${entry.budget_usd:.2f} for the current "
                f"{entry.budget_period} (spent ${to_usd(found[1]):.6f}). The budget resets at "
                f"{periods.iso(end)}."
            )
        ctx.budget = (start, reserve)

    def estimate(self, call: Any, prompt: Any) -> float:
        """USD the request may cost at most: the token limit's estimate of its input and
        output, at its model's highest prices; 0 for a model without prices or a request
        without a prompt."""
        data = call.data
        if prompt is None or data is None or call.model is None:
            return 0.0
        price = self._ceilings.get(call.model, _UNKNOWN)
        if price is _UNKNOWN:
            if len(self._ceilings) >= 4096:  # model names may be any the client sends ("*")
                self._ceilings.clear()
            price = self._ceilings[call.model] = self._providers.price_ceiling(call.model)
        if price is None:
            return 0.0
        check_counts(data)
        size = len(call.body or b"")
        return price.cost(
            estimate_input(size, data, prompt), estimate_output(data, prompt, self._default_max)
        )

    # ---------------------------------------------------------------- the end of a request

    def finish(self, ctx: Any, whole: bool) -> None:
        """Count a key's request once its answer has ended (`whole`: it ended as it should,
        not cut short), settling its reservation to its cost."""
        entry = ctx.key
        hold: tuple[int, int] | None = ctx.budget
        if hold is not None:
            ctx.budget = None
            period, reserved = hold
        else:
            period, reserved = self.period(entry.budget_period, self._clock())[0], 0
        usd = ctx.cost_usd
        outcome = ctx.upstream
        worked = outcome is not None and outcome.working > 0
        charge = 0 if usd is None else to_nano(usd)
        if worked and (usd is None or not whole or outcome.error is not None):
            charge = max(charge, reserved)  # usage never (wholly) reported: the estimate
        from_cache = ctx.cache is not None and usd == 0.0 and outcome is None
        prompt = 0 if from_cache else ctx.prompt_tokens or 0
        completion = 0 if from_cache else ctx.completion_tokens or 0
        if self.asynchronous:
            task = asyncio.get_running_loop().create_task(
                self._settle_async(entry.identity, period, charge, reserved, prompt, completion)
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            return
        if hold is None:  # nothing reserved, so nothing waits on it: counted in batches
            key = (entry.identity, period)
            batched = self._batch.get(key)
            if batched is not None:
                batched[0] += charge
                batched[1] += 1
                batched[2] += prompt
                batched[3] += completion
                return
            if self._schedule_batch():
                self._batch[key] = [charge, 1, prompt, completion]
                return
        self._settle(entry.identity, period, charge, reserved, prompt, completion, 1)

    def _settle(self, *args: Any) -> None:
        try:
            done = self._ledger.settle(*args)
        except StoreError as exc:
            log.error("the usage store cannot be read", extra={"error": str(exc)})
            done = False
        if not done:
            self._failed("budget_unrecorded")

    def _schedule_batch(self) -> bool:
        """Make sure the batch is written within BATCH_S; False when there is no event loop
        to do it (then the caller writes at once)."""
        if self._batch_timer is not None:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._batch_timer = loop.call_later(BATCH_S, self.write_batch)
        return True

    def write_batch(self) -> None:
        """Write the requests counted since the last batch (one ledger update per key)."""
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        batch, self._batch = self._batch, {}
        for (name, period), (charge, requests, prompt, completion) in batch.items():
            self._settle(name, period, charge, 0, prompt, completion, requests)

    async def _settle_async(self, *args: Any) -> None:
        if not await self._ledger.settle(*args):
            self._failed("budget_unrecorded")

    def _failed(self, event: str) -> None:
        if self._metrics is not None:
            self._metrics.limiter_failure(event, self._policy)

    # ---------------------------------------------------------------- the flush

    async def start(self) -> None:
        """Open the ledger's connections (Redis) and start the once-a-second copy into the
        state store (the shared ledger)."""
        start = getattr(self._ledger, "start", None)
        if start is not None:
            await start()
        if self._store is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            try:
                await self.flush(force=False)
            except Exception:
                log.exception("could not copy usage into the state store; trying again")

    async def flush(self, force: bool) -> None:
        """Write the rows this process retired and, when it is this process's turn (or
        `force`), a snapshot of the whole ledger, in a thread (LMDB syncs to disk)."""
        self.write_batch()
        ledger = self._ledger
        snapshot = ledger.snapshot(self._clock(), 0.0 if force else FLUSH_EVERY_S * 0.9)
        retired = ledger.take_retired()
        if snapshot is None and not retired:
            return
        await asyncio.to_thread(write_rows, self._store, snapshot, retired)

    async def aclose(self) -> None:
        """Stop the flush and write what this process holds (lifespan shutdown)."""
        self.write_batch()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            try:
                await self.flush(force=True)
            except Exception:
                log.exception("could not copy usage into the state store at shutdown")
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=1.0)
        if self._store is not None:
            self._store.close()
            self._store = None
        aclose = getattr(self._ledger, "aclose", None)
        if aclose is not None:
            await aclose()
        else:
            self._ledger.close()


def write_rows(store: Any, snapshot: bytes | None, retired: list[Row]) -> int:
    """Write a ledger snapshot's rows and `retired` rows into `store` (newer versions only)."""
    rows = list(retired)
    if snapshot is not None:
        rows.extend(Ledger(snapshot).rows())
    return store.put_newer(rows) if rows else 0
