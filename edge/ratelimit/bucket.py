"""Token-bucket arithmetic, sans I/O.

Theory of operation
-------------------
A bucket holds up to ``burst`` tokens and refills continuously at ``rate_per_s``
(= rpm / 60) tokens per second. A request of ``cost`` tokens is admitted when that many
are present, and then removes them. Nothing here reads a clock or touches memory: the
caller passes the stored state ``(tokens, updated)`` and the current time ``now`` and
stores what comes back. That keeps the subtle part testable with an injected clock and
lets any storage (a shared-memory slot, Redis) sit underneath.

Rather than storing a "last request" time and a counter, we store the token level as of
``updated``. Refill is applied lazily: the level at ``now`` is
``min(burst, tokens + (now - updated) * rate)``. So

* a rejected request costs nothing: the state written back is just the refilled level at
  ``now``, which is what the old state already implied;
* a long idle period caps at ``burst``: an idle bucket holds no more than a full one;
* a brand-new identity starts full, exactly like one that has been idle forever.

A level may be negative: a debt. Token limits reserve an estimate and settle to the usage the
provider reports (``adjust``); a request that used more than it reserved leaves the bucket
below zero, and nothing is admitted until the refill has paid the debt back (a request bucket
is only ever taken from, never below zero).

Stored state comes from shared memory that a crashed or buggy process may have scribbled
on, so it is never trusted. NaN, infinities, a debt beyond ``MAX_DEBT`` (more than any
request could use), or an ``updated`` that is ahead of ``now`` by more than ``CLOCK_SKEW_S``
make the bucket start again full. That costs at most one burst of extra admissions, and can
never lock an identity out (a bogus far-future ``updated`` would otherwise stall refill until
that time arrives). A level above ``burst`` (say, after burst was lowered by a config reload)
is clamped.

Small backward steps (within ``CLOCK_SKEW_S``) are treated as "no time has passed", not
as corruption: a reset there would hand out a free burst whenever two processes race
reading the clock. Callers should read ``now`` while holding the table lock, where
CLOCK_MONOTONIC (system-wide on Linux) never goes backwards anyway.
"""

from __future__ import annotations

import math
from typing import Final

CLOCK_SKEW_S: Final = 1.0
"""An ``updated`` ahead of ``now`` by more than this is corrupt, not clock jitter."""

MAX_WAIT_S: Final = 86_400.0
"""Upper bound on the waits we report; the HTTP layer caps Retry-After lower still."""

MAX_DEBT: Final = 1e12
"""A level below ``-MAX_DEBT`` is corrupt, not a debt: no request reports that much usage."""


BucketOutcome = tuple[bool, float, float, float, float]
"""``(allowed, tokens, updated, retry_after_s, reset_after_s)``.

``tokens`` and ``updated`` are the state to store; ``retry_after_s`` is the time until
``cost`` tokens are available (0.0 if allowed); ``reset_after_s`` the time until the
bucket is full again. Both waits are capped at ``MAX_WAIT_S``. A plain tuple because
this runs on every request and a NamedTuple costs a noticeable share of it.
"""


def level_at(
    tokens: float, updated: float, now: float, rate_per_s: float, burst: float
) -> tuple[float, float]:
    """Return ``(level, as_of)``: the validated, refilled token level and the time it holds at.

    ``as_of`` is ``now`` except on a small backward clock step, where it stays ``updated``
    so that storing it never manufactures refill time.
    """
    if not (-MAX_DEBT <= tokens < math.inf and -math.inf < updated < math.inf):
        return burst, now  # NaN, inf or an impossible debt: corrupt, start full
    elapsed = now - updated
    if elapsed < 0.0:
        if elapsed < -CLOCK_SKEW_S:
            return burst, now  # far-future timestamp: corrupt, start full
        return (tokens if tokens < burst else burst), updated
    level = tokens + elapsed * rate_per_s
    return (level if level < burst else burst), now


def seconds_until(level: float, target: float, rate_per_s: float) -> float:
    """Time for ``level`` to refill up to ``target``; ``math.inf`` if it never will."""
    if level >= target:
        return 0.0
    if rate_per_s <= 0.0:
        return math.inf
    return (target - level) / rate_per_s


def decide(
    tokens: float, updated: float, now: float, rate_per_s: float, burst: int, cost: int
) -> BucketOutcome:
    """Admit or reject a request of ``cost`` tokens against the stored state.

    Raises ValueError only for invalid *parameters* (a configuration bug), never for
    invalid stored state.
    """
    if not (0.0 <= rate_per_s < math.inf and burst >= 1 and cost >= 0):
        raise ValueError(
            f"invalid bucket parameters: rate_per_s={rate_per_s!r} burst={burst!r} cost={cost!r}"
        )
    level, as_of = level_at(tokens, updated, now, rate_per_s, burst)
    if cost <= level:
        level -= cost
        reset = seconds_until(level, burst, rate_per_s)
        return True, level, as_of, 0.0, (reset if reset < MAX_WAIT_S else MAX_WAIT_S)
    # Rejected: nothing is taken. If cost > burst it can never be admitted.
    retry = seconds_until(level, cost, rate_per_s) if cost <= burst else MAX_WAIT_S
    reset = seconds_until(level, burst, rate_per_s)
    return (
        False,
        level,
        as_of,
        (retry if retry < MAX_WAIT_S else MAX_WAIT_S),
        (reset if reset < MAX_WAIT_S else MAX_WAIT_S),
    )


def full_at(tokens: float, updated: float, rate_per_s: float, burst: int) -> float:
    """Absolute time at which a stored bucket is full again (uncapped; ``math.inf`` if never).

    A bucket that is full at ``now`` carries no information: forgetting it and starting a
    new one full is indistinguishable, which is what makes it safe to evict.
    """
    return updated + seconds_until(tokens, burst, rate_per_s)


def adjust(
    tokens: float, updated: float, now: float, rate_per_s: float, burst: int, refund: float
) -> tuple[float, float]:
    """Return the state after giving back ``refund`` tokens (take more when negative).

    Used to correct a reservation once the real cost is known (token limits: reserve the
    estimate, then settle on the reported usage). An overspend beyond what is left is carried
    as a debt (a negative level, at most ``MAX_DEBT``) that the refill pays back; a refund
    never fills the bucket past full.
    """
    if not (0.0 <= rate_per_s < math.inf and burst >= 1 and math.isfinite(refund)):
        raise ValueError(f"invalid adjustment: rate_per_s={rate_per_s!r} refund={refund!r}")
    level, as_of = level_at(tokens, updated, now, rate_per_s, burst)
    level += refund
    if level < -MAX_DEBT:
        level = -MAX_DEBT
    elif level > burst:
        level = float(burst)
    return level, as_of
