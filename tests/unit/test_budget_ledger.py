"""Budgets, sans I/O and in one process: calendar periods with an injected clock, the ledger's
arithmetic and slots, the shared ledger's rollover and baseline from the store, the store's
forward-only records, what a request is charged when it ends, and the usage report."""

from __future__ import annotations

import asyncio
import datetime
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import FakeClock

from edge.budgets import ledger, periods
from edge.budgets.accounts import Accounts, write_rows
from edge.budgets.ledger import Ledger, Row, to_nano
from edge.budgets.report import read_env_file, rows_for, table
from edge.budgets.shared import LocalLedger, digest_of
from edge.budgets.store import Store
from edge.cost import Price
from edge.errors import ApiError, QuotaExceeded
from edge.ratelimit.tokens import CHAT

UTC = datetime.UTC


def epoch(*parts: int) -> float:
    return datetime.datetime(*parts, tzinfo=UTC).timestamp()


# ---------------------------------------------------------------- periods


@pytest.mark.parametrize(
    ("kind", "now", "start", "end"),
    [
        ("month", (2026, 12, 31, 23, 59, 59), (2026, 12, 1), (2027, 1, 1)),
        ("month", (2027, 1, 1, 0, 0, 0), (2027, 1, 1), (2027, 2, 1)),
        ("month", (2028, 2, 29, 12), (2028, 2, 1), (2028, 3, 1)),
        ("day", (2026, 12, 7, 23, 59, 59), (2026, 12, 7), (2026, 12, 8)),
        ("week", (2026, 12, 7, 0, 0, 0), (2026, 12, 7), (2026, 12, 14)),  # a Monday
        ("week", (2026, 12, 6, 23, 59, 59), (2026, 11, 30), (2026, 12, 7)),  # a Sunday
        ("week", (2027, 1, 2), (2026, 12, 28), (2027, 1, 4)),  # a week across the year
    ],
)
def test_periods_are_calendar_periods_in_utc(kind, now, start, end):
    assert periods.bounds(kind, epoch(*now)) == (int(epoch(*start)), int(epoch(*end)))


@given(st.sampled_from(periods.PERIODS), st.floats(0, 4e9))
def test_every_instant_is_in_exactly_one_period(kind, now):
    start, end = periods.bounds(kind, now)
    assert start <= now < end
    assert periods.bounds(kind, end)[0] == end  # the next one starts where this one ends
    assert periods.bounds(kind, start) == (start, end)


def test_an_unknown_period_is_refused():
    with pytest.raises(ValueError, match="year"):
        periods.bounds("year", 0)


# ---------------------------------------------------------------- the ledger

M = ("month", 100, 200)  # a period: kind, start, end


@given(
    st.integers(0, 10**12),
    st.lists(st.integers(1, 10**9), min_size=1, max_size=40),
)
def test_a_budget_admits_exactly_the_requests_it_can_pay_for(budget, costs):
    """Requests one after another, each settled to its cost: admitted while the spend is below
    the budget, so the spend passes it by at most the last request's cost."""
    local = LocalLedger(64)
    admitted = 0
    for cost in costs:
        ok, spent = local.admit("k", *M, budget, cost)
        if not ok:
            assert spent >= budget
            break
        assert local.settle("k", *M, cost - cost, 1, 1)
        admitted += 1
    assert local.get("k", *M[:2]).spent == sum(costs[:admitted])  # whole nano-dollars: exact
    # Each admitted request found the spend below the budget.
    assert all(sum(costs[:index]) < budget for index in range(admitted))


def test_five_requests_of_a_fifth_of_the_budget_are_admitted_not_six():
    price, reserve = to_nano(0.012), to_nano(0.02)
    local = LocalLedger(64)
    results = []
    for _ in range(6):
        ok, _ = local.admit("k", *M, 5 * price, reserve)
        results.append(ok)
        if ok:
            local.settle("k", *M, price - reserve, 5, 7)
    assert results == [True] * 5 + [False]
    row = local.get("k", *M[:2])
    assert (row.spent, row.requests, row.prompt, row.completion) == (5 * price, 5, 25, 35)


def test_settling_has_no_floor_saturates_and_ignores_negative_tokens():
    local = LocalLedger(64)
    local.admit("k", *M, budget=100, reserve=10)
    local.settle("k", *M, spent=90, prompt=-5, completion=3)
    row = local.get("k", *M[:2])
    assert row.spent == 100 and row.prompt == 0 and row.completion == 3 and row.version == 2
    local.settle("k", *M, spent=ledger.LIMIT, prompt=0, completion=0)
    local.settle("k", *M, spent=ledger.LIMIT, prompt=0, completion=0)
    assert local.get("k", *M[:2]).spent == ledger.LIMIT


def test_each_period_and_kind_is_a_slot_of_its_own():
    """A request admitted before the boundary settles into its own period; a key whose period
    kind changes meets a fresh record of the new kind."""
    local = LocalLedger(64)
    assert local.admit("k", "day", 100, 200, 50, 10) == (True, 0)
    assert local.admit("k", "day", 200, 300, 50, 10) == (True, 0)  # the next day
    assert local.settle("k", "day", 100, 200, 20 - 10, 1, 1)  # the first settles in its day
    assert local.get("k", "day", 100).spent == 20
    assert local.get("k", "day", 200).spent == 10
    assert local.admit("k", "month", 0, 1000, 50, 5) == (True, 0)


def fresh(slots: int = 64) -> Ledger:
    buf = bytearray(ledger.size_for(slots))
    ledger.format_buffer(buf, slots, 8)
    return Ledger(buf)


def test_a_torn_slot_reads_as_free_and_ended_periods_make_room():
    table = fresh(8)
    digest = digest_of("a", "month", 1)
    offset, row = table.find(digest)
    assert row is None
    table.write(offset, digest, Row("a", "month", 1, 2, spent=5))
    assert ledger.row_of(table.find(digest)[1]) == Row("a", "month", 1, 2, spent=5)
    table._buf[offset + 40] ^= 0xFF  # type: ignore[index]
    assert table.find(digest)[1] is None
    ends = [10_000 + index for index in range(8)]
    for index, end in enumerate(ends):
        other = digest_of(f"other-{index}", "day", 0)
        table.write(ledger.HEADER_SIZE + index * ledger.SLOT_SIZE, other, Row("o", "day", 0, end))
    newcomer = digest_of("newcomer", "day", 0)
    assert table.find(newcomer, now=10_000) == (ledger.FULL, None)  # every period is live
    # An hour after they ended, the one that ended first makes room.
    offset, row = table.find(newcomer, now=10_003 + ledger.RETAIN_S)
    assert row is None and offset == ledger.HEADER_SIZE


def test_the_flush_is_claimed_once_per_interval_and_only_after_a_write():
    table = fresh()
    assert not table.claim_flush(100.0, 1.0)  # nothing written yet
    digest = digest_of("a", "month", 1)
    table.write(table.find(digest)[0], digest, Row("a", "month", 1))
    assert table.claim_flush(100.0, 1.0)
    table.write(table.find(digest)[0], digest, Row("a", "month", 1, spent=1))
    assert not table.claim_flush(100.5, 1.0)  # claimed 0.5 s ago
    assert table.claim_flush(101.0, 1.0)
    assert not table.claim_flush(102.0, 1.0)  # nothing new
    assert table.claim_flush(102.0, 0.0)  # forced


def test_a_ledger_buffer_is_checked():
    with pytest.raises(ledger.LedgerFormatError):
        Ledger(bytearray(100))
    with pytest.raises(ledger.LedgerFormatError):
        Ledger(bytearray(ledger.size_for(4)))  # no magic


def test_the_table_is_sized_from_the_keys():
    assert ledger.slots_for(10) == ledger.MIN_SLOTS
    assert ledger.slots_for(10_000) == 80_000


# ---------------------------------------------------------------- shared ledger and store


def test_a_period_met_for_the_first_time_starts_from_the_store(tmp_path):
    store = Store.open(str(tmp_path), "i")
    store.put_newer([Row("a", "month", 100, 200, spent=70, requests=3, version=9)])
    local = LocalLedger(64, load=store.get)
    assert local.admit("a", *M, budget=100, reserve=10) == (True, 70)
    assert local.get("a", *M[:2]) == Row("a", "month", 100, 200, 80, 3, 0, 0, 10)
    assert local.admit("a", *M, budget=80, reserve=0) == (False, 80)  # not below it
    store.close()


def test_the_store_keeps_only_newer_versions_per_instance(tmp_path):
    store = Store.open(str(tmp_path), "i")
    rows = [Row("a", "month", 1, 2, spent=10, version=5), Row("b:c", "day", 2**33, version=1)]
    assert store.put_newer(rows) == 2
    assert store.put_newer([Row("a", "month", 1, 2, spent=3, version=4)]) == 0  # late, older
    assert store.get("a", "month", 1) == Row("a", "month", 1, 2, spent=10, version=5)
    assert store.get("a", "day", 1) is None  # another kind
    assert store.put_newer([Row("a", "month", 1, 2, spent=11, version=6)]) == 1
    assert sorted(store.rows()) == sorted(
        [Row("a", "month", 1, 2, 11, version=6), Row("b:c", "day", 2**33, version=1)]
    )
    store.close()
    reader = Store.open(str(tmp_path), "i", readonly=True)
    assert reader.get("a", "month", 1).spent == 11
    reader.close()
    other = Store.open(str(tmp_path), "other")  # another instance's store
    assert other.rows() == []
    other.close()


def test_a_snapshot_flushed_is_what_the_store_then_holds(tmp_path):
    store = Store.open(str(tmp_path), "i")
    local = LocalLedger(64)
    local.settle("a", *M, spent=to_nano(0.5), prompt=10, completion=20)
    snapshot = local.snapshot(1.0, 1.0)
    assert snapshot is not None and local.snapshot(1.5, 1.0) is None
    assert write_rows(store, snapshot) == 1
    assert store.get("a", "month", 100) == Row("a", "month", 100, 200, to_nano(0.5), 1, 10, 20, 1)
    store.close()


# ---------------------------------------------------------------- accounts


def accounts(clock: FakeClock, price: float | None = 1000.0) -> Accounts:
    config = SimpleNamespace(
        rate_limit_tpm_default_max_tokens=100, rate_limit_failure_policy="allow"
    )
    providers = SimpleNamespace(
        price_ceiling=lambda model: None if price is None else Price(price, price)
    )
    return Accounts(config, providers, LocalLedger(64), clock=clock)


def context(budget: float | None, **fields):
    key = SimpleNamespace(identity="team", budget_usd=budget, budget_period="month")
    values = {"key": key, "budget": None, "cost_usd": None, "upstream": None, "cache": None,
              "prompt_tokens": None, "completion_tokens": None, "relayed": 0}  # fmt: skip
    values.update(fields)
    return SimpleNamespace(**values)


def call(max_tokens: int | None = 10, path: str = "/chat/completions", **more):
    data = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], **more}
    if max_tokens is not None:
        data["max_tokens"] = max_tokens
    return SimpleNamespace(data=data, model="m", body=b"x" * 80, path=path)


def spent(books: Accounts, clock: FakeClock) -> int:
    row = books._ledger.get("team", "month", periods.start_of("month", clock.now))
    return 0 if row is None else row.spent


def test_a_hold_reserves_the_priced_estimate_and_the_end_settles_to_the_cost():
    clock = FakeClock(epoch(2026, 12, 7))
    books = accounts(clock)
    ctx = context(1.0)
    assert not books.hold(ctx, call(10), CHAT)
    reserved = ctx.budget[3]
    assert reserved == to_nano((20 + 10) * 1000 / 1e6)  # 80 bytes / 4 in, 10 out
    assert spent(books, clock) == reserved
    ctx.cost_usd = 0.004
    ctx.upstream = SimpleNamespace(working=1, error=None)
    books.finish(ctx, whole=True)
    assert spent(books, clock) == to_nano(0.004)


def test_a_request_without_an_output_cap_is_sent_with_the_one_it_reserved_for():
    books = accounts(FakeClock(epoch(2026, 12, 7)))
    request = call(None)
    assert books.hold(context(1.0), request, CHAT)  # the caller re-serialises the body
    assert request.data["max_completion_tokens"] == 100  # RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (call(10, background=True), None),
        (call(10**15), "cost_exceeds_budget"),  # more than the whole budget (and past i64)
        (call(10, n=10**12), "cost_exceeds_budget"),
        (call(10, path="/images/generations"), "budget_not_applicable"),
        (call(10, path="/audio/speech"), "budget_not_applicable"),
        # Input or work the provider bills that the gateway never sees.
        (call(10, path="/responses", previous_response_id="resp_1"), "budget_not_applicable"),
        (call(10, path="/responses", conversation="conv_1"), "budget_not_applicable"),
        (call(10, path="/responses", prompt={"id": "pmpt_1"}), "budget_not_applicable"),
        (call(10, tools=[{"type": "web_search"}]), "budget_not_applicable"),
        (call(10, tools=[{"type": "web_search_20250305", "name": "s"}]), "budget_not_applicable"),
        (call(10, web_search_options={}), "budget_not_applicable"),
        (call(10, mcp_servers=[{"url": "x"}]), "budget_not_applicable"),
        (call(0), None),  # a cap of 0 is "no limit" to some servers
    ],
)
def test_what_a_budget_cannot_hold_is_refused(request_, code):
    books = accounts(FakeClock(epoch(2026, 12, 7)))
    with pytest.raises(ApiError) as refused:
        books.hold(context(1.0), request_, CHAT)
    assert refused.value.status in (400, 403) and (code is None or refused.value.code == code)


def test_client_tools_and_a_completions_prompt_are_held_as_usual():
    books = accounts(FakeClock(epoch(2026, 12, 7)))
    tools = [{"type": "function", "function": {"name": "f"}}, {"name": "anthropic-style"}]
    books.hold(context(1.0), call(10, tools=tools), CHAT)
    books.hold(context(1.0), call(10, path="/completions", prompt="hi"), CHAT)


@pytest.mark.parametrize(
    ("cost", "working", "error", "whole", "relayed", "charged"),
    [
        (0.004, 1, None, True, 0, "cost"),
        (None, 1, None, False, 0, "reserve"),  # the client hung up before the usage came
        (0.001, 1, "disconnect", False, 0, "reserve"),  # broken off: at least the estimate
        (0.5, 1, "disconnect", False, 0, "cost"),  # ...or what it is seen to cost, if more
        (None, 1, None, False, 500, "seen"),  # 500 events relayed before the hang-up
        (None, 0, "connect", True, 0, "nothing"),  # the upstream provably did no work
        (None, None, None, True, 0, "nothing"),  # never went upstream (refused before)
        (0.004, 3, None, True, 0, "failover"),  # two attempts failed over from, maybe billed
    ],
)
def test_what_a_request_is_charged_when_it_ends(cost, working, error, whole, relayed, charged):
    clock = FakeClock(epoch(2026, 12, 7))
    books = accounts(clock)
    ctx = context(1.0)
    books.hold(ctx, call(10), CHAT)
    reserved = ctx.budget[3]
    ctx.cost_usd, ctx.relayed = cost, relayed
    ctx.upstream = None if working is None else SimpleNamespace(working=working, error=error)
    books.finish(ctx, whole=whole)
    expected = {
        "cost": to_nano(cost or 0),
        "reserve": reserved,
        "seen": to_nano((20 + 500) * 1000 / 1e6),
        "nothing": 0,
        "failover": to_nano(0.004) + 2 * reserved,
    }[charged]
    assert spent(books, clock) == expected


def test_a_failover_takes_another_reservation_at_once():
    """Each attempt a failover adds is reserved when it is made (concurrent requests see it),
    and the end settles the whole to the cost plus a reservation per attempt maybe billed."""
    clock = FakeClock(epoch(2026, 12, 7))
    books = accounts(clock)
    ctx = context(1.0)
    books.hold(ctx, call(10), CHAT)
    reserved = ctx.budget[3]
    asyncio.run(books.take_more(ctx))
    asyncio.run(books.take_more(ctx))
    assert spent(books, clock) == 3 * reserved
    ctx.cost_usd = 0.004
    ctx.upstream = SimpleNamespace(working=3, error=None)
    books.finish(ctx, whole=True)
    assert spent(books, clock) == to_nano(0.004) + 2 * reserved


def test_over_budget_is_insufficient_quota_saying_when_it_resets():
    clock = FakeClock(epoch(2026, 12, 31, 23, 59))
    books = accounts(clock)
    ctx = context(0.001)
    ctx.cost_usd, ctx.upstream = 0.002, SimpleNamespace(working=1, error=None)
    books.hold(ctx, call(), None)
    books.finish(ctx, whole=True)
    with pytest.raises(QuotaExceeded) as refused:
        books.hold(context(0.001), call(), None)
    assert refused.value.status == 429 and refused.value.code == "insufficient_quota"
    assert refused.value.headers == {"x-should-retry": "false"}
    assert "2027-01-01T00:00:00Z" in refused.value.message
    clock.now = epoch(2027, 1, 1)  # the calendar boundary, in UTC: a fresh budget
    books.hold(context(0.001), call(), None)


@settings(max_examples=50)
@given(st.lists(st.tuples(st.integers(0, 10**7), st.booleans()), max_size=30))
def test_requests_in_flight_are_reserved_and_all_settle(requests):
    """Holds taken while others are in flight (unpriced: nothing reserved), all ended: only
    their costs remain."""
    clock = FakeClock(epoch(2026, 12, 7))
    books = accounts(clock, price=None)
    held = []
    for cost, _ in requests:
        ctx = context(1e9)
        books.hold(ctx, call(), None)
        ctx.cost_usd, ctx.upstream = cost / 1e9, SimpleNamespace(working=1, error=None)
        held.append(ctx)
    for ctx, (_, whole) in zip(held, requests, strict=True):
        books.finish(ctx, whole=whole)
    assert spent(books, clock) == sum(cost for cost, _ in requests)


def test_requests_without_a_reservation_are_counted_in_batches():
    async def run() -> tuple[int, int]:
        clock = FakeClock(epoch(2026, 12, 7))
        books = accounts(clock)
        for _ in range(5):
            ctx = context(None, cost_usd=0.001, prompt_tokens=3, completion_tokens=4)
            books.finish(ctx, whole=True)
        before = spent(books, clock)
        books.write_batch()
        row = books._ledger.get("team", "month", periods.start_of("month", clock.now))
        return before, row.requests

    before, requests = asyncio.run(run())
    assert before == 0 and requests == 5


# ---------------------------------------------------------------- the report


def test_the_report_lists_every_configured_key_and_the_stored_strangers():
    now = epoch(2026, 12, 7)
    month = periods.start_of("month", now)
    day = periods.start_of("day", now)
    keys = SimpleNamespace(
        entries=lambda: [
            SimpleNamespace(identity="b", budget_usd=2.0, budget_period="day"),
            SimpleNamespace(identity="a", budget_usd=None, budget_period="month"),
        ]
    )
    stored = [
        Row("b", "day", day, spent=to_nano(0.5), requests=2, prompt=3, completion=4),
        Row("b", "day", day - 86_400, spent=to_nano(9)),  # yesterday's
        Row("gone", "month", month, spent=to_nano(1)),
    ]
    lines = rows_for(keys, stored, now, "month")
    assert [line["key"] for line in lines] == ["a", "b", "gone"]
    assert lines[1]["spent_usd"] == 0.5 and lines[1]["remaining_usd"] == 1.5
    assert lines[0]["requests"] == 0 and lines[0]["remaining_usd"] is None
    assert not lines[2]["configured"]
    text = table(lines)
    assert "gone (not in the keys)" in text and "1.500000" in text


def test_the_env_file_is_read_as_systemd_reads_it(tmp_path):
    path = tmp_path / "env"
    path.write_text('# comment\n\nSTATE_DIR="/var/lib/x"\nKEY_BUDGET_USD = 5\n;other\n')
    assert read_env_file(str(path)) == {"STATE_DIR": "/var/lib/x", "KEY_BUDGET_USD": "5"}
