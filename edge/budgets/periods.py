"""Budget periods: calendar days, ISO weeks (Monday to Monday) and months, in UTC (sans I/O).

A period is named by its start, in whole seconds since the epoch: every process and every host
computes the same name for the same instant, so the spend of a period is one record wherever it
is kept (shared memory, the state store, Redis). The clock is passed in.
"""

from __future__ import annotations

import datetime
from typing import Final

PERIODS: Final = ("day", "week", "month")
DEFAULT_PERIOD: Final = "month"
_UTC = datetime.UTC


def bounds(period: str, now: float) -> tuple[int, int]:
    """(start, end) of the `period` holding the instant `now` (seconds since the epoch, UTC):
    the start included, the end excluded."""
    day = datetime.datetime.fromtimestamp(now, _UTC).date()
    if period == "day":
        start = day
        end = day + datetime.timedelta(days=1)
    elif period == "week":
        start = day - datetime.timedelta(days=day.weekday())
        end = start + datetime.timedelta(days=7)
    elif period == "month":
        start = day.replace(day=1)
        end = (start + datetime.timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown budget period {period!r}: use one of {', '.join(PERIODS)}")
    return _epoch(start), _epoch(end)


def start_of(period: str, now: float) -> int:
    return bounds(period, now)[0]


def iso(epoch: int) -> str:
    """`2027-01-01T00:00:00Z`."""
    return datetime.datetime.fromtimestamp(epoch, _UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(day: datetime.date) -> int:
    return int(datetime.datetime(day.year, day.month, day.day, tzinfo=_UTC).timestamp())
