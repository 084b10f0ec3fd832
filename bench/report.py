# ruff: noqa: RUF001 - the table prints the multiplication sign, dashes and micro on purpose
"""The benchmark's report: the table rows with their targets, the ablation table, the machine
and its load during the run, and bench/results.md."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import resource
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from runner import Settings
from targets import TOOLS, WORKERS

# ----------------------------------------------------------------------------- the table


@dataclass
class Row:
    figure: str
    direct: str = "–"
    floor: str = "–"
    edge: str = "–"
    result: str = ""
    target: str = ""
    met: bool | None = None  # None: no target, or not measured
    marked: bool = False  # the target text carries its own marks (a target of two parts)

    def judge(self, *parts: tuple[str, bool]) -> None:
        """A target of several parts, each marked met or not; the row is met when all are."""
        self.target = ", ".join(f"{text} {MARKS[ok]}" for text, ok in parts)
        self.met = all(ok for _, ok in parts)
        self.marked = True

    def cells(self) -> list[str]:
        mark = "" if self.marked else MARKS[self.met]
        target = f"{self.target} {mark}".strip() if self.target else ""
        return [self.figure, self.direct, self.floor, self.edge, self.result, target]


MARKS = {True: "✅", False: "❌", None: ""}
HEADER = ["Figure", "direct", "floor", "edge", "edge vs baseline", "Target"]


def render(rows: list[Row]) -> str:
    return render_cells(HEADER, [row.cells() for row in rows])


def render_cells(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, columns padded to their widest cell."""
    cells = [header, *rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(c) for c in cells[1:]]
    )


def ms(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f} ms"


def signed_ms(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or value != value else f"{value:+.{digits}f} ms"


def mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"


# ----------------------------------------------------------------------------- the machine


def cpu_times() -> list[int]:
    """The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as fh:
        return [int(v) for v in fh.readline().split()[1:9]]


def steal_percent(before: list[int], after: list[int]) -> float:
    delta = [b - a for a, b in zip(before, after, strict=True)]
    return 100.0 * delta[7] / max(1, sum(delta))


def own_cpu_seconds() -> float:
    """CPU time of this process and every child it waited for (servers, workers, wrk)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def others_percent(before: list[int], after: list[int], own_seconds: float) -> float:
    """CPU used by processes this run did not start, as % of all cores over the run."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    busy = sum(delta) - delta[3] - delta[4] - delta[7]  # minus idle, iowait, steal
    total = max(1, sum(delta))
    others = busy - own_seconds * os.sysconf("SC_CLK_TCK")
    return max(0.0, 100.0 * others / total)


def machine_info() -> dict[str, str]:
    info = {"cpu": platform.processor() or platform.machine(), "cores": str(os.cpu_count())}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                info["os"] = line.split("=", 1)[1].strip('"')
    info["kernel"] = platform.release()
    info["python"] = platform.python_version()
    versions = []
    for dist in ("gunicorn", "uvicorn", "uvicorn-worker", "falcon", "aiohttp", "uvloop"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{dist} {metadata.version(dist)}")
    info["packages"] = ", ".join(versions)
    tools = []
    for tool in TOOLS:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", TOOLS[tool]],
                capture_output=True, text=True, timeout=10, check=False,
            ).stdout.strip()  # fmt: skip
            tools.append(f"{tool} {out or '?'}")
    info["tools"] = ", ".join(tools)
    return info


# ----------------------------------------------------------------------------- rows and results.md


def build_rows(settings: Settings, raw: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    names = ("direct", "floor", "edge")

    tp = raw.get("throughput")
    row = Row(f"Throughput, c={settings.connections} (req/s)")
    if tp:
        row.direct, row.floor, row.edge = (f"{tp[n]['rps']:,.0f}" for n in names)
        vs_floor = tp["edge"]["rps"] / tp["floor"]["rps"]
        vs_direct = tp["edge"]["rps"] / tp["direct"]["rps"]
        row.result = f"{vs_floor:.2f}× floor, {vs_direct:.2f}× direct"
        row.judge(("≥ 0.75× floor", vs_floor >= 0.75), ("≥ 5,000 req/s", tp["edge"]["rps"] >= 5000))
    else:
        row.result = "skipped"
        row.target = "≥ 0.75× floor, ≥ 5,000 req/s"
    rows.append(row)

    row = Row("CPU time per request under load (server)")
    if tp:
        cpu = {n: tp[n]["cpu_us_per_req"] for n in names}
        row.direct, row.floor, row.edge = (f"{cpu[n]:.0f} µs" for n in names)
        row.result = (
            f"{cpu['edge'] / cpu['floor']:.2f}× floor ({cpu['edge'] - cpu['floor']:+.0f} µs)"
        )
        row.met = cpu["edge"] <= 1.4 * cpu["floor"]
    row.target = "≤ 1.4× floor"
    rows.append(row)

    row = Row("Throughput errors (non-2xx / socket)")
    if tp:
        row.direct, row.floor, row.edge = (
            f"{tp[n]['status']} / {tp[n]['socket_errors']}" for n in names
        )
        row.met = all(tp[n]["status"] == 0 and tp[n]["socket_errors"] == 0 for n in names)
        row.target = "0 / 0"
    rows.append(row)

    lat = raw.get("latency")
    # The reference's bound on what edge adds, and what edge adds over the floor's own hop.
    for pct, limit, over in (("p50", 0.5, 0.15), ("p99", 2.0, 0.5)):
        row = Row(f"Latency c=1 {pct}")
        row.target = f"added ≤ {limit:g} ms, over floor's ≤ {over:g} ms"
        if lat:
            values = {n: lat[n][f"{pct}_us"] / 1000.0 for n in names}
            row.direct, row.floor, row.edge = (ms(values[n], 3) for n in names)
            added = values["edge"] - values["direct"]
            floor_added = values["floor"] - values["direct"]
            row.result = f"{signed_ms(added, 3)} added (floor {signed_ms(floor_added, 3)})"
            row.judge(
                (f"added ≤ {limit:g} ms", added <= limit),
                (f"over floor's ≤ {over:g} ms", added - floor_added <= over),
            )
        else:
            row.result = "skipped"
        rows.append(row)

    rate = raw.get("rate")
    for pct in ("p50", "p99"):
        row = Row(f"Latency at {settings.rate} req/s {pct}")
        if rate:
            row.direct, row.floor, row.edge = (ms(rate[n][f"{pct}_ms"], 1) for n in names)
            added = rate["edge"][f"{pct}_ms"] - rate["direct"][f"{pct}_ms"]
            row.result = f"{signed_ms(added, 1)} added"
            if pct == "p99":
                errors = sum(rate[n]["errors"] for n in names)
                achieved = rate["edge"]["rps"]
                row.result += f"; edge {achieved:,.0f} req/s, {errors} errors"
        else:
            row.result = "skipped"
        rows.append(row)

    stream = raw.get("stream")
    streamed = [n for n in names if stream and n in stream]  # older raw.json: no floor
    row = Row("Streaming TTFB, first SSE event (p50)")
    row.target = "added ≤ 1 ms, over floor's ≤ 0.5 ms"
    if stream:
        ttfb = {n: stream[n]["ttfb_ms"] for n in streamed}
        row.direct, row.edge = ms(ttfb["direct"], 2), ms(ttfb["edge"], 2)
        added = ttfb["edge"] - ttfb["direct"]
        row.result = f"{signed_ms(added, 2)} added"
        row.met = added <= 1.0
        if "floor" in ttfb:
            row.floor = ms(ttfb["floor"], 2)
            floor_added = ttfb["floor"] - ttfb["direct"]
            row.result += f" (floor {signed_ms(floor_added, 2)})"
            row.judge(
                ("added ≤ 1 ms", added <= 1.0),
                ("over floor's ≤ 0.5 ms", added - floor_added <= 0.5),
            )
    else:
        row.result = "skipped" if "stream" not in settings.phases else "n/a"
    rows.append(row)

    row = Row("Streaming: paced chunks received separately")
    if stream:
        sent = stream["sent"]
        d, e = stream["direct"], stream["edge"]
        row.direct = f"{d['separate_min']} of {sent}"
        row.edge = f"{e['separate_min']} of {sent}"
        if "floor" in stream:
            row.floor = f"{stream['floor']['separate_min']} of {sent}"
        row.met = e["separate_min"] == sent and e["paced"] == sent
        row.result = "no coalescing" if row.met else "coalesced or lost"
    else:
        row.result = "skipped" if "stream" not in settings.phases else "n/a"
    row.target = "all, in every stream"
    rows.append(row)

    row = Row("Streaming chunk gaps p50 (min–max)")
    if stream:
        gaps = {
            n: f"{s['gap_p50_ms']:.1f} ({s['gap_min_ms']:.1f}–{s['gap_max_ms']:.1f}) ms"
            for n, s in ((n, stream[n]) for n in streamed)
        }
        row.direct, row.floor, row.edge = (gaps.get(n, "–") for n in names)
        row.result = f"sent every {settings.stream_pace * 1000:g} ms"
    rows.append(row)

    rss = raw.get("rss", {})
    row = Row("RSS idle (master + workers)")
    if rss:
        row.direct, row.floor, row.edge = (mb(rss[n].get("idle")) for n in names)
    rows.append(row)

    row = Row("RSS after load")
    if rss and "after_load" in rss.get("edge", {}):
        row.direct, row.floor, row.edge = (mb(rss[n].get("after_load")) for n in names)
        row.met = rss["edge"]["after_load"] <= 160
    else:
        row.result = "skipped"
    row.target = "edge ≤ 160 MB"
    rows.append(row)

    conns = raw.get("idle_conns")
    row = Row(f"RSS with {settings.idle_connections:,} idle keep-alive conns")
    if conns:
        row.floor, row.edge = (
            f"{mb(conns[n]['during_mb'])}, {conns[n]['per_conn_kb']:.1f} KB/conn"
            for n in ("floor", "edge")
        )
        row.result = f"{conns['edge']['open']} open at measurement"
        row.met = conns["edge"]["per_conn_kb"] <= 50 and conns["edge"]["during_mb"] > 0
    else:
        row.result = "skipped"
    row.target = "edge ≤ 50 KB per connection"
    rows.append(row)

    row = Row(f"Idle CPU over {settings.idle_cpu_seconds:g} s (master + workers)")
    if "idle_cpu" in raw:
        row.edge = f"{raw['idle_cpu']:.2f} %"
        row.met = raw["idle_cpu"] < 2.0
    else:
        row.result = "skipped"
    row.target = "< 2 % of a core"
    rows.append(row)

    limiter = raw.get("limiter")
    row = Row("Rate-limit decision p50 / p99 (bench_limiter.py)")
    if limiter:
        row.edge = f"{limiter['p50_us']:.2f} / {limiter['p99_us']:.2f} µs"
        row.met = limiter["p99_us"] <= 10.0
    else:
        row.edge = "n/a"
        row.result = "skipped" if "limiter" not in settings.phases else ""
    row.target = "p99 ≤ 10 µs"
    rows.append(row)

    redis = raw.get("redis")
    row = Row(f"Throughput on the Redis backend, c={settings.connections}")
    row.target = "≥ 0.8× edge on shm"
    if redis:
        ratio = redis["redis"]["rps"] / redis["shm"]["rps"]
        row.edge = f"{redis['redis']['rps']:,.0f} req/s ({redis['shm']['rps']:,.0f} on shm)"
        row.result = (
            f"{ratio:.2f}× shm; CPU {redis['redis']['cpu_us_per_req']:.0f} vs "
            f"{redis['shm']['cpu_us_per_req']:.0f} µs/req; errors "
            f"{redis['redis']['status']} / {redis['redis']['socket_errors']}"
        )
        row.met = ratio >= 0.8
    else:
        row.edge = "n/a"
        row.result = "skipped" if "redis" not in settings.phases else "n/a"
    rows.append(row)

    routing = raw.get("routing")
    row = Row("Routing on: added per request p50 / p99 (bench_routing.py)")
    if routing:
        row.edge = f"+{routing['p50_us']:.2f} / +{routing['p99_us']:.2f} µs"
        row.result = "3 weighted targets, rename, shm breakers vs UPSTREAM_URL"
        row.met = routing["p50_us"] <= 20.0
    else:
        row.edge = "n/a"
        row.result = "skipped" if "routing" not in settings.phases else ""
    row.target = "≤ 20 µs per request"
    rows.append(row)

    cache = raw.get("cache")
    row = Row(f"Response cache: hit vs miss path, c={settings.connections}")
    row.target = f"hit ≥ {CACHE_HIT_RATIO:g}× miss, lookup ≤ {CACHE_LOOKUP_US:g} µs"
    if cache:
        ratio, added = cache_figures(cache)
        row.edge = f"{cache['hit']['rps']:,.0f} vs {cache['miss']['rps']:,.0f} req/s"
        row.result = f"{ratio:.2f}× miss; a lookup adds {added:+.1f} µs CPU to a miss"
        row.judge(
            (f"hit ≥ {CACHE_HIT_RATIO:g}× miss", ratio >= CACHE_HIT_RATIO),
            (f"lookup ≤ {CACHE_LOOKUP_US:g} µs", added <= CACHE_LOOKUP_US),
        )
    else:
        row.edge = "n/a"
        row.result = "skipped" if "cache" not in settings.phases else "n/a"
    rows.append(row)

    rows.append(
        added_cpu_row(
            f"OpenAI client on an Anthropic provider (translated), c={settings.connections}",
            raw.get("translate"), "translated", "pass-through", "passed through",
            TRANSLATE_REQUEST_US, "translate" in settings.phases,
        )
    )  # fmt: skip
    events = raw.get("translate_events")
    row = Row("A streamed event translated (bench_translate.py)")
    row.target = f"≤ {TRANSLATE_EVENT_US:g} µs per event"
    if events:
        row.edge = (
            f"{events['to_openai_us']:.2f} µs → OpenAI, {events['to_anthropic_us']:.2f} µs → "
            "Anthropic"
        )
        row.met = max(events.values()) <= TRANSLATE_EVENT_US
    else:
        row.edge = "n/a"
        row.result = "skipped" if "translate" not in settings.phases else "n/a"
    rows.append(row)

    budgets = raw.get("budgets")
    row = added_cpu_row(
        f"Budgets and cost: a priced model and a key with a budget, c={settings.connections}",
        budgets, "budget", "unpriced", "unpriced", BUDGET_REQUEST_US, "budgets" in settings.phases,
    )  # fmt: skip
    if budgets and "priced" in budgets:  # what costing alone adds, of that
        cost = budgets["priced"]["cpu_us_per_req"] - budgets["unpriced"]["cpu_us_per_req"]
        row.result = row.result.replace(" µs/req;", f" µs/req (of which cost alone {cost:+.1f});")
    rows.append(row)
    micro = raw.get("budgets_micro")
    row = Row("Budget hold and settle, cost and usage counted (bench_budgets.py)")
    row.target = f"≤ {BUDGET_REQUEST_US:g} µs per request"
    if micro:
        row.edge = (
            f"{micro['budget_us']:.2f} µs with a budget, {micro['accounting_us']:.2f} µs without"
        )
        row.met = micro["budget_us"] <= BUDGET_REQUEST_US
    else:
        row.edge = "n/a"
        row.result = "skipped" if "budgets" not in settings.phases else "n/a"
    rows.append(row)

    tracing = raw.get("tracing")
    if tracing and "control" in tracing["runs"]:
        runs = tracing["runs"]
        row = Row(f"Span export off, a second edge (the phase's noise), c={settings.connections}")
        row.edge = f"{runs['control']['rps']:,.0f} req/s ({runs['off']['rps']:,.0f} off)"
        row.result = (
            f"{runs['control']['rps'] / runs['off']['rps']:.2f}× off; CPU "
            f"{runs['control']['cpu_us_per_req'] - runs['off']['cpu_us_per_req']:+.1f} µs/req"
        )
        row.target = "(a control: the same configuration)"
        rows.append(row)
    for ratio, aim in TRACE_AIMS:
        row = Row(f"Span export, sampling {ratio}, c={settings.connections}")
        row.target = f"≥ {aim:.2f}× export off"
        if tracing:
            runs, spans = tracing["runs"], tracing["spans"][ratio]
            on, off = runs[ratio], runs["off"]
            share = on["rps"] / off["rps"]
            row.edge = f"{on['rps']:,.0f} req/s ({off['rps']:,.0f} off)"
            row.result = (
                f"{share:.2f}× off; CPU {on['cpu_us_per_req'] - off['cpu_us_per_req']:+.1f} "
                f"µs/req; spans exported {spans.get('exported', 0):,}, dropped "
                f"{spans.get('dropped', 0):,}, failed {spans.get('failed', 0):,}"
            )
            row.met = share >= aim and not spans.get("dropped") and not spans.get("failed")
        else:
            row.edge = "n/a"
            row.result = "skipped" if "tracing" not in settings.phases else "n/a"
        rows.append(row)
    return rows


# What translation may cost (issue #24): a non-streamed request, a streamed event.
TRANSLATE_REQUEST_US = 30.0
TRANSLATE_EVENT_US = 3.0
BUDGET_REQUEST_US = 10.0  # issue #25: budgets and cost accounting per request


# Span export's throughput against export off, by sampling ratio (issue #26): every request
# at most 20 % less, one in ten at most 5 %, none about nothing.
TRACE_AIMS = (("1.0", 0.80), ("0.1", 0.95), ("0.0", 0.98))


CACHE_HIT_RATIO = 2.0  # the hit path's throughput against the miss path's (issue #23)
CACHE_LOOKUP_US = 15.0  # CPU a lookup may add to a miss, per request (issue #23)


def added_cpu_row(
    title: str,
    runs: dict[str, Any] | None,
    on: str,
    off: str,
    off_label: str,
    aim_us: float,
    ran: bool,
) -> Row:
    """A row comparing two edges of one phase: the CPU per request `on` adds over `off`
    (aim: at most `aim_us`), and its throughput as a multiple of `off`'s."""
    row = Row(title)
    row.target = f"≤ {aim_us:g} µs CPU per request over {off}"
    if not runs:
        row.edge = "n/a"
        row.result = "n/a" if ran else "skipped"
        return row
    first, base = runs[on], runs[off]
    added = first["cpu_us_per_req"] - base["cpu_us_per_req"]
    row.edge = f"{first['rps']:,.0f} req/s ({base['rps']:,.0f} {off_label})"
    row.result = (
        f"{first['rps'] / base['rps']:.2f}× {off}; CPU {added:+.1f} µs/req; errors "
        f"{first['status']} / {first['socket_errors']}"
    )
    row.met = added <= aim_us and first["status"] == 0
    return row


def cache_figures(cache: dict[str, Any]) -> tuple[float, float]:
    """(hit / miss throughput with the cache on, CPU µs per request the cache adds to a miss)."""
    ratio = cache["hit"]["rps"] / cache["miss"]["rps"]
    added = cache["miss"]["cpu_us_per_req"] - cache["miss off"]["cpu_us_per_req"]
    return ratio, added


ABLATION_HEADER = ["Edge configuration", "req/s", "throughput ×floor", "CPU/request", "CPU ×floor"]


def ablation_table(raw: dict[str, Any]) -> str | None:
    """What each feature costs: edge with one feature off at a time, against the floor."""
    ablation = raw.get("ablation")
    if not ablation:
        return None
    floor = ablation["floor"]
    cells = [["floor (no features)", f"{floor['rps']:,.0f}", "1.00×",
              f"{floor['cpu_us_per_req']:.0f} µs", "1.00×"]]  # fmt: skip
    for name, result in ablation["configs"].items():
        cells.append(
            [
                f"edge, {name}",
                f"{result['rps']:,.0f}",
                f"{result['rps'] / floor['rps']:.2f}×",
                f"{result['cpu_us_per_req']:.0f} µs",
                f"{result['cpu_us_per_req'] / floor['cpu_us_per_req']:.2f}×",
            ]
        )
    return render_cells(ABLATION_HEADER, cells)


CACHE_HEADER = ["Figure", "Value", "Aim"]


def cache_table(raw: dict[str, Any]) -> str | None:
    """The cache phase: the hit path against the miss path, and what a lookup adds to a miss."""
    cache = raw.get("cache")
    if not cache:
        return None
    hit, miss, off = cache["hit"], cache["miss"], cache["miss off"]
    ratio, added = cache_figures(cache)

    def run(result: dict) -> str:
        return f"{result['rps']:,.0f} req/s, {result['cpu_us_per_req']:.0f} µs CPU/request"

    def share(result: dict, kind: str) -> str:
        counts = result.get("lookups", {})
        total = sum(counts.values())
        if not total:
            return f"no {kind} counted"
        return f"{100.0 * counts.get(kind, 0) / total:.2f} % {kind} of {total:,}"

    errors = [(r["status"], r["socket_errors"]) for r in (hit, miss, off)]
    clean = all(e == (0, 0) for e in errors)
    pairs = ", ".join(f"{d:+.1f}" for d in cache.get("pairs_us", []))
    cells = [
        ["Hit path: one body, CACHE_BACKEND=local", run(hit), ""],
        ["Miss path: every body distinct, CACHE_BACKEND=local", run(miss), ""],
        ["Miss path: every body distinct, no cache", run(off), ""],
        [
            "Hit / miss throughput",
            f"{ratio:.2f}× ({hit['rps'] / off['rps']:.2f}× the miss path with no cache)",
            f"≥ {CACHE_HIT_RATIO:g}× {MARKS[ratio >= CACHE_HIT_RATIO]}",
        ],
        [
            "Lookup cost on a miss (CPU/request, cache on − off)",
            f"{added:+.1f} µs (each round's pair: {pairs} µs)",
            f"≤ {CACHE_LOOKUP_US:g} µs {MARKS[added <= CACHE_LOOKUP_US]}",
        ],
        [
            "Lookups counted (edge_cache_lookups_total)",
            f"hit runs {share(hit, 'hit')}; miss runs {share(miss, 'miss')}",
            "",
        ],
        [
            "Errors (non-2xx / socket): hit, miss, miss with no cache",
            ", ".join(f"{s} / {e}" for s, e in errors),
            f"0 / 0 {MARKS[clean]}",
        ],
    ]
    return render_cells(CACHE_HEADER, cells)


def write_results(
    path: Path,
    table: str,
    settings: Settings,
    command: str,
    took: float,
    host: dict[str, str],
    ablation: str | None = None,
    cache: str | None = None,
) -> None:
    info = {**machine_info(), **host}
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = "\n".join(f"- {key}: {value}" for key, value in info.items())
    ablation_section = ""
    if ablation:
        ablation_section = f"""
## Ablation: what each feature costs

Edge started again with one feature off at a time, then with all four off (metrics:
`ENABLE_METRICS=false`; access log: `LOG_LEVEL=warning`; rate limit:
`RATE_LIMIT_ENABLED=false`; auth: `AUTH_ENABLED=false`), all running beside the floor, each
under `wrk -t{settings.threads} -c{settings.connections} -d{settings.ablation_duration}s` \
(after a warm-up) in {settings.rounds} interleaved round(s), the best kept. A feature's cost
is its row's distance from "all features on"; "all four off" is what the rest of edge costs.

{ablation}
"""
    cache_section = ""
    if cache:
        cache_section = f"""
## Response cache: the hit path against the miss path

Edge started again with `CACHE_BACKEND=local` (its store in a temp dir), beside edge with no
cache, in front of the same upstream, each run under `wrk -t{settings.threads} \
-c{settings.connections} -d{settings.duration}s` (after a warm-up) in {settings.rounds} \
interleaved round(s), the best kept: the hit path (every request the same body: after the
first, all hits), the miss path (every body distinct, `bench/post_distinct.lua`: each looked up,
sent upstream and stored) and the same distinct-body load on edge with no cache. The lookup's
cost on a miss is the CPU per request (master + workers) of the miss path with the cache less
without it: the lookup, the coalescing table's claim and the answer's store. A sample request
after each run checks `x-cache`; `edge_cache_lookups_total` counts every lookup by result.

{cache}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"""# llm-edge-proxy benchmark results

Date: {now} (run took {took:.0f} s)

Command: `{command}`

Machine:
{machine}

Settings: {WORKERS} workers per target; throughput `wrk -t{settings.threads} \
-c{settings.connections} -d{settings.duration}s` (after a {settings.warmup} s warm-up); \
c=1 latency `wrk -t1 -c1 -d{settings.latency_duration}s`; both in {settings.rounds} \
interleaved round(s), the best kept; fixed rate: an open-loop \
client (bench/run.py) sending {settings.rate} req/s, evenly spaced, over up to \
{settings.rate_connections} keep-alive connections for {settings.rate_duration:g} s; \
streaming {settings.stream_requests} requests of \
{settings.stream_chunks} chunks every {settings.stream_pace * 1000:g} ms; \
{settings.idle_connections} idle connections; idle CPU over {settings.idle_cpu_seconds:g} s. \
All load generators share the machine's cores with the targets.

{table}
{ablation_section}{cache_section}"""
    )
