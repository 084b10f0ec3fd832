"""`llm-edge-proxy usage`: each key's spend, tokens, requests, budget and what remains of it in
its current budget period, read from the store the workers write (the state store, or Redis
with `RATE_LIMIT_BACKEND=redis`), with or without the service running.

It reads the service's own settings from the environment, or from `--env-file` (the file the
systemd unit's `EnvironmentFile=` names), so it finds the same store and the same keys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from edge.budgets import periods
from edge.budgets.ledger import Row, to_usd


def rows_for(keys: Any, stored: list[Row], now: float, default_period: str) -> list[dict[str, Any]]:
    """One line per configured key for its current period (zeros when it has no record yet),
    then any other name with a record of a current period (a key since removed or renamed)."""
    by_key = {(row.name, row.kind, row.start): row for row in stored}
    lines = []
    named = set()
    for entry in sorted(keys.entries(), key=lambda e: e.identity):
        kind = entry.budget_period or default_period
        start, end = periods.bounds(kind, now)
        row = by_key.get((entry.identity, kind, start)) or Row(entry.identity, kind, start, end)
        named.add(entry.identity)
        lines.append(_line(row, end, entry.budget_usd, True))
    for row in sorted(stored):
        start, end = periods.bounds(row.kind, now)
        if row.name not in named and row.start == start:
            lines.append(_line(row, end, None, False))
    return lines


def _line(row: Row, end: int, budget: float | None, configured: bool) -> dict[str, Any]:
    spent = to_usd(row.spent)
    return {
        "key": row.name,
        "configured": configured,
        "period": row.kind,
        "period_start": periods.iso(row.start),
        "period_end": periods.iso(end),
        "spent_usd": round(spent, 9),
        "requests": row.requests,
        "prompt_tokens": row.prompt,
        "completion_tokens": row.completion,
        "budget_usd": budget,
        "remaining_usd": None if budget is None else round(max(budget - spent, 0.0), 9),
    }


def table(lines: list[dict[str, Any]]) -> str:
    header = ("key", "period", "from", "spent $", "budget $", "remaining $", "requests",
              "prompt", "completion")  # fmt: skip
    body = [
        (
            line["key"] + ("" if line["configured"] else " (not in the keys)"),
            line["period"],
            line["period_start"][:10],
            f"{line['spent_usd']:.6f}",
            "-" if line["budget_usd"] is None else f"{line['budget_usd']:.2f}",
            "-" if line["remaining_usd"] is None else f"{line['remaining_usd']:.6f}",
            str(line["requests"]),
            str(line["prompt_tokens"]),
            str(line["completion_tokens"]),
        )
        for line in lines
    ]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    out = []
    for row in (header, *body):
        cells = [
            cell.ljust(width) if i < 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def read_env_file(path: str) -> dict[str, str]:
    """`NAME=value` lines as systemd's `EnvironmentFile=` reads them (comments and blank lines
    skipped, one pair of surrounding quotes removed)."""
    found = {}
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.strip()
            if not line or line[0] in "#;" or "=" not in line:
                continue
            name, _, value = line.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            found[name.strip()] = value
    return found


def stored_rows(config: Any, state_dir: str | None) -> list[Row]:
    """Every record of the store the service writes."""
    if config.rate_limit_enabled and config.rate_limit_backend == "redis":
        import redis

        from edge.budgets.redis import read_rows

        client = redis.Redis.from_url(
            config.redis_url, password=config.redis_password, socket_timeout=10
        )
        try:
            return read_rows(client, config.redis_key_prefix)
        except redis.RedisError as exc:
            raise OSError(f"cannot read the usage records in Redis: {exc}") from None
        finally:
            client.close()
    from edge.budgets.store import Store, file_name

    directory = state_dir or config.state_dir or config.state_directory
    if directory is None:
        raise OSError(
            "no state directory: set STATE_DIR (or systemd's STATE_DIRECTORY), or pass --state-dir"
        )
    directory = str(directory)
    if not os.path.isdir(directory):
        raise OSError(f"the state directory {directory} is not a directory")
    if not os.path.isdir(os.path.join(directory, file_name(config.instance))):
        print(
            f"llm-edge-proxy usage: no usage recorded yet in {directory} for "
            f"INSTANCE_NAME={config.instance}",
            file=sys.stderr,
        )
        return []
    store = Store.open(directory, config.instance, readonly=True)
    try:
        return store.rows()
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    from edge.auth import KeyStore
    from edge.config import Config, ConfigError, environment

    parser = argparse.ArgumentParser(
        prog="llm-edge-proxy usage",
        description="Each key's spend, tokens and requests in its current budget period.",
    )
    parser.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    parser.add_argument("--env-file", help="read the service's settings from this file")
    parser.add_argument("--state-dir", help="the usage store's directory (default: STATE_DIR)")
    args = parser.parse_args(argv)
    try:
        config = Config.from_env(environment(read_env_file(args.env_file) if args.env_file else {}))
        keys = KeyStore.load(config)
        stored = stored_rows(config, args.state_dir)
    except ConfigError as exc:
        print(f"llm-edge-proxy usage: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"llm-edge-proxy usage: {exc}", file=sys.stderr)
        return 1
    lines = rows_for(keys, stored, time.time(), config.key_budget_period)
    print(json.dumps(lines, indent=1) if args.json else table(lines))
    return 0
