"""The rate limits' response headers, as OpenAI sends them: one place for their format.

Admitted: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`. Refused (429):
`retry-after` in whole seconds (1-60) and `retry-after-ms`, which the official SDKs honour.
"""

from __future__ import annotations

import math

from edge.ratelimit.base import Decision

_NAMES = {
    unit: (
        f"x-ratelimit-limit-{unit}",
        f"x-ratelimit-remaining-{unit}",
        f"x-ratelimit-reset-{unit}",
    )
    for unit in ("requests", "tokens")
}


def admitted(decision: Decision, unit: str) -> dict[str, str]:
    """The x-ratelimit-* headers of an admitted request; `unit` is "requests" or "tokens"."""
    limit, remaining, reset = _NAMES[unit]
    return {
        limit: str(decision.limit),
        remaining: str(decision.remaining),
        reset: format_duration(decision.reset_after),
    }


def retry_after(seconds: float, headers: dict[str, str]) -> int:
    """Add `retry-after` (whole seconds, 1-60) and `retry-after-ms` (1-60,000) for a wait of
    `seconds` to `headers`; return the milliseconds."""
    retry_ms = min(60_000, max(1, math.ceil(seconds * 1000)))
    headers["retry-after"] = str(min(60, max(1, math.ceil(seconds))))
    headers["retry-after-ms"] = str(retry_ms)
    return retry_ms


def format_duration(seconds: float) -> str:
    """OpenAI's style: `20ms`, `1s`, `6m0s`, `1h2m3s` (whole seconds rounded up from 1 s)."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
