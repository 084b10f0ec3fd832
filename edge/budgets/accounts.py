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
  What a budget cannot hold is refused to a key that has one: a request that sets no output
  cap is sent with the one it was reserved for (RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS), so the
  provider cannot bill past it, and a priced request is always forwarded as parsed; what makes
  the provider bill input the gateway never sees (`background` responses, stored state such
  as `previous_response_id`, server-side tools), images and audio (no usage to price) and
  batches (edge.endpoints.stateful) are refused; a request that may cost more than the whole
  budget is 400.
- `finish`, once per request of any key when its answer has ended (edge.middleware): the
  request's cost (edge.cost, from the usage the provider reported) replaces its reservation.
  One whose usage never (wholly) arrived, the client gone or the upstream broken off, is
  charged its reservation or what it is seen to have cost when that is more (its input, and
  an output token per event relayed); one the upstream provably never worked on costs
  nothing; each attempt a failover moved on from that the upstream may bill costs another
  reservation. The request and its tokens are counted for `llm-edge-proxy usage`. Requests
  that reserved nothing, and refunds far from the budget's end (at least another reservation
  of room left), are counted in per-worker batches written every BATCH_S: a delayed refund
  only makes admission stricter for a moment; a charge above the reservation, or a refund near
  the end, is written at once.

Where the figures live: with the shared-memory rate limiter, in the host's ledger
(edge.budgets.shared), copied once a second into the state store (edge.budgets.store); with
`RATE_LIMIT_BACKEND=redis`, in Redis (edge.budgets.redis), shared by every host. When they
cannot be consulted (lock timeout, no slot, Redis away) RATE_LIMIT_FAILURE_POLICY decides and
`edge_rate_limiter_failures_total{event="budget_*"}` counts it; a settle that cannot be written
is tried again with the next batches for about a second.

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
from edge.budgets.ledger import LIMIT, Ledger, to_nano, to_usd
from edge.budgets.store import StoreError
from edge.cache.answers import SERVED
from edge.errors import BadRequest, Forbidden, QuotaExceeded, RateLimited
from edge.ratelimit.base import DENY
from edge.ratelimit.tokens import check_counts, estimate_input, estimate_output, output_cap

log = logging.getLogger("edge.budgets")

FLUSH_EVERY_S = 1.0
BATCH_S = 0.05  # how long a worker may hold the counts of requests without a reservation
RETRIES = 20  # batches a settle that could not be written is tried again in (about 1 s)
# Routes whose cost the gateway cannot see (no token usage to price): refused to a budget.
UNPRICED_PATHS = frozenset(
    ("/images/generations", "/audio/speech", "/audio/transcriptions", "/audio/translations")
)

_UNKNOWN: Any = object()
Period = tuple[str, int, int]  # kind, start, end


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
        # What requests added, per (key, period), until the next batch is written: spent
        # (nano-USD), requests, prompt and completion tokens, and the batches it has missed.
        self._batch: dict[tuple[str, str, int, int], list[int]] = {}
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

    def hold(self, ctx: Any, call: Any, prompt: Any) -> bool:
        """Admit the request of a key with a budget, reserving its priced estimate; raise 429
        `insufficient_quota` when the key's spend has reached its budget. True when the
        request's body was given an output cap (the caller re-serialises it). The shared
        ledger's (a plain call); with Redis, `hold_async`."""
        entry = ctx.key
        kind = entry.budget_period
        start, end = self.period(kind, self._clock())
        budget = to_nano(entry.budget_usd)
        reserve, prompt_tokens, price, capped = self._estimate(call, prompt, entry, budget)
        try:
            found = self._ledger.admit(entry.identity, kind, start, end, budget, reserve)
        except StoreError as exc:
            log.error("the usage store cannot be read", extra={"error": str(exc)})
            found = None
        self._decide(ctx, found, (kind, start, end), budget, reserve, prompt_tokens, price)
        return capped

    async def hold_async(self, ctx: Any, call: Any, prompt: Any) -> bool:
        entry = ctx.key
        kind = entry.budget_period
        start, end = self.period(kind, self._clock())
        budget = to_nano(entry.budget_usd)
        reserve, prompt_tokens, price, capped = self._estimate(call, prompt, entry, budget)
        found = await self._ledger.admit(entry.identity, kind, start, end, budget, reserve)
        self._decide(ctx, found, (kind, start, end), budget, reserve, prompt_tokens, price)
        return capped

    def _decide(
        self,
        ctx: Any,
        found: tuple[bool, int] | None,
        period: Period,
        budget: int,
        reserve: int,
        prompt_tokens: int,
        price: Any,
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
                f"{periods.iso(period[2])}."
            )
        # Room left after this request's reservation, for `finish` (a refund far from the
        # budget's end may wait for the batch).
        room = budget - found[1] - reserve
        ctx.budget = [*period, reserve, prompt_tokens, price, room, 1]  # 1: reservations taken

    def _estimate(
        self, call: Any, prompt: Any, entry: Any, budget: int
    ) -> tuple[int, int, Any, bool]:
        """(the reservation in nano-USD, the input tokens estimated, the prices it is at,
        whether an output cap was added to the body) of a call by a key with a budget; 400 /
        403 for what a budget cannot hold (see the module docstring)."""
        if call.path in UNPRICED_PATHS:
            raise Forbidden(
                "This key has a budget, and this route's cost cannot be held to it (no usage "
                "is reported to price).",
                code="budget_not_applicable",
            )
        data = call.data
        if prompt is None or data is None or call.model is None:
            return 0, 0, None, False  # moderations, count_tokens: nothing billed
        price = self._ceilings.get(call.model, _UNKNOWN)
        if price is _UNKNOWN:
            if len(self._ceilings) >= 4096:  # model names may be any the client sends ("*")
                self._ceilings.clear()
            price = self._ceilings[call.model] = self._providers.price_ceiling(call.model)
        if price is None:
            return 0, 0, None, False
        _check_seen(data, call.path)
        check_counts(data)
        capped = False
        cap = output_cap(data, prompt) if prompt.caps else 1
        if cap is None:
            # Sent with the cap it is reserved for: the provider cannot bill past it.
            data[prompt.caps[0]] = self._default_max
            capped = True
        elif cap < 1:  # some compatible servers read 0 as "no limit"
            raise BadRequest(
                "This key has a budget: an output cap must be at least 1.",
                param=next(name for name in prompt.caps if data.get(name) == cap),
            )
        input_tokens = estimate_input(len(call.body or b""), data, prompt)
        output_tokens = estimate_output(data, prompt, self._default_max)
        reserve = to_nano(price.cost(input_tokens, output_tokens))
        if reserve > budget > 0 or reserve >= LIMIT:
            cap = next((name for name in prompt.caps if name in data), None)
            raise BadRequest(
                f"This request may cost up to ${to_usd(reserve):.6f} (its input and its maximum "
                f"output at the model's prices), more than the key's whole budget of "
                f"${entry.budget_usd:.2f}. Lower its output cap or shorten it.",
                param=cap,
                code="cost_exceeds_budget",
            )
        return reserve, input_tokens, price, capped

    # ---------------------------------------------------------------- the end of a request

    def finish(self, ctx: Any, whole: bool) -> None:
        """Count a key's request once its answer has ended (`whole`: it ended as it should,
        not cut short), settling its reservation to its cost."""
        entry = ctx.key
        hold = ctx.budget
        usd = ctx.cost_usd
        outcome = ctx.upstream
        from_cache = ctx.cache in SERVED
        prompt = 0 if from_cache else ctx.prompt_tokens or 0
        completion = 0 if from_cache else ctx.completion_tokens or 0
        charge = 0 if usd is None else to_nano(usd)
        if hold is None:
            kind = entry.budget_period
            start, end = self.period(kind, self._clock())
            self._add((entry.identity, kind, start, end), charge, 1, prompt, completion)
            return
        ctx.budget = None
        kind, start, end, reserved, prompt_tokens, price, room, taken = hold
        working = 0 if outcome is None else outcome.working
        if working > 0:
            if usd is None or not whole or outcome.error is not None:
                # Its usage never (wholly) arrived: the reservation, or what it was seen to
                # cost when that is more (its input, and an output token per event relayed).
                seen = 0.0
                if price is not None:
                    seen = price.cost(
                        max(prompt_tokens, ctx.prompt_tokens or 0),
                        max(ctx.relayed, ctx.completion_tokens or 0),
                    )
                charge = max(charge, reserved, to_nano(seen))
            charge += (working - 1) * reserved  # attempts failed over from may be billed
        key = (entry.identity, kind, start, end)
        held = reserved * taken  # the first reservation, and one per failover (`take_more`)
        if charge <= held and room > held:
            # A refund (or nothing) far from the budget's end: it may wait for the batch, as
            # a later refund only ever makes admission stricter, never looser. One locked write
            # fewer per request.
            self._add(key, charge - held, 1, prompt, completion)
        elif self.asynchronous:
            self._spawn(self._settle_async(key, charge - held, 1, prompt, completion, 0))
        elif not self._settle(key, charge - held, 1, prompt, completion):
            self._retry(key, charge - held, 1, prompt, completion, 0)

    async def take_more(self, ctx: Any) -> None:
        """Another attempt may be billed (the router fails over after one whose request was
        sent and not answered): take another reservation at once, past the budget if need be,
        so concurrent requests see it (as the token limit's `Reservation.take_more`)."""
        hold = ctx.budget
        if hold is None or not hold[3]:
            return
        key = (ctx.key.identity, hold[0], hold[1], hold[2])
        hold[7] += 1
        if self.asynchronous:
            done = await self._ledger.settle(*key, hold[3], 0, 0, 0)
        else:
            done = self._settle(key, hold[3], 0, 0, 0)
        if not done:
            self._retry(key, hold[3], 0, 0, 0, 0)

    def _add(self, key: tuple[str, str, int, int], spent: int, *counts: int) -> None:
        """Count into the batch (written within BATCH_S), or at once without an event loop."""
        batched = self._batch.get(key)
        if batched is not None:
            batched[0] += spent
            batched[1] += counts[0]
            batched[2] += counts[1]
            batched[3] += counts[2]
        elif self._schedule_batch():
            self._batch[key] = [spent, *counts, 0]
        elif not self._settle(key, spent, *counts):
            self._failed("budget_unrecorded")

    def _retry(self, key: tuple[str, str, int, int], spent: int, *counts: int) -> None:
        """A settle that could not be written: into the batch, tried again with it."""
        requests, prompt, completion, tries = counts
        if tries >= RETRIES or not self._schedule_batch():
            self._failed("budget_unrecorded")
            return
        batched = self._batch.setdefault(key, [0, 0, 0, 0, tries + 1])
        batched[0] += spent
        batched[1] += requests
        batched[2] += prompt
        batched[3] += completion
        batched[4] = max(batched[4], tries + 1)

    def _settle(self, key: tuple[str, str, int, int], spent: int, *counts: int) -> bool:
        try:
            return bool(self._ledger.settle(*key, spent, counts[1], counts[2], counts[0]))
        except StoreError as exc:
            log.error("the usage store cannot be read", extra={"error": str(exc)})
            return False

    async def _settle_async(self, key: tuple[str, str, int, int], spent: int, *counts: int) -> None:
        done = await self._ledger.settle(*key, spent, counts[1], counts[2], counts[0])
        if not done:
            self._retry(key, spent, *counts)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

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
        for key, (spent, requests, prompt, completion, tries) in batch.items():
            if self.asynchronous:
                self._spawn(self._settle_async(key, spent, requests, prompt, completion, tries))
            elif not self._settle(key, spent, requests, prompt, completion):
                self._retry(key, spent, requests, prompt, completion, tries)

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
        """When it is this process's turn (or `force`), a snapshot of the whole ledger into
        the state store, in a thread (LMDB syncs to disk)."""
        self.write_batch()
        snapshot = self._ledger.snapshot(self._clock(), 0.0 if force else FLUSH_EVERY_S * 0.9)
        if snapshot is not None:
            await asyncio.to_thread(write_rows, self._store, snapshot)

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
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        if self._store is not None:
            self._store.close()
            self._store = None
        aclose = getattr(self._ledger, "aclose", None)
        if aclose is not None:
            await aclose()
        else:
            self._ledger.close()


# What makes a provider bill input the gateway never sees, refused to a key with a budget: stored
# conversation state and prompts (the Responses API), and tools the provider runs itself
# (search, code, MCP, computer use), whose results it bills as input.
_UNSEEN_FIELDS = ("previous_response_id", "conversation", "mcp_servers", "container",
                  "web_search_options")  # fmt: skip
_CLIENT_TOOLS = frozenset(("function", "custom"))


def _check_seen(data: dict[str, Any], path: str) -> None:
    """400 for a budgeted request whose bill depends on input the gateway cannot see (its
    reservation could not cover it): `background` answers, stored state, server-side tools."""
    if data.get("background") is True:
        field = "background"
    else:
        field = next((name for name in _UNSEEN_FIELDS if data.get(name) is not None), "")
        if not field and path == "/responses" and data.get("prompt") is not None:
            field = "prompt"  # a stored prompt (on /completions, `prompt` is the input itself)
        tools = data.get("tools")
        if not field and isinstance(tools, list):
            for tool in tools:
                kind = tool.get("type") if isinstance(tool, dict) else None
                if kind is not None and kind not in _CLIENT_TOOLS:
                    field = "tools"
                    break
    if field:
        raise BadRequest(
            f"This key has a budget, and '{field}' makes the provider bill for input or work the "
            "gateway never sees, which the budget cannot hold; send the request without it.",
            param=field,
            code="budget_not_applicable",
        )


def write_rows(store: Any, snapshot: bytes | None) -> int:
    """Write a ledger snapshot's rows into `store` (newer versions only)."""
    if snapshot is None:
        return 0
    rows = Ledger(snapshot).rows()
    return store.put_newer(rows) if rows else 0
