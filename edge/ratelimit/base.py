"""The rate-limiter interface shared by every backend (shared memory, Redis)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final, Protocol

DIGEST_SIZE: Final = 16

LOCK_TIMEOUT: Final = "lock_timeout"
TABLE_FULL: Final = "table_full"

ALLOW: Final = "allow"
DENY: Final = "deny"
FAILURE_POLICIES: Final = (ALLOW, DENY)


def check_policy(policy: str) -> None:
    if policy not in FAILURE_POLICIES:
        raise ValueError(f"failure_policy must be one of {FAILURE_POLICIES}, got {policy!r}")


@dataclass(slots=True)
class Decision:
    """The outcome of one rate-limit check. Read-only by convention: it is not frozen because
    a frozen dataclass costs about 0.8 µs more to build, a tenth of a whole decision.

    When ``failure`` is set the limiter could not consult the bucket and ``allowed``
    follows the configured failure policy; ``remaining``/``reset_after`` then carry no
    information (0) and callers may prefer to omit the x-ratelimit-* headers.
    """

    allowed: bool
    limit: int  # burst (capacity)
    remaining: int  # whole tokens left after this decision (floor, >= 0)
    retry_after: float  # seconds until the request could be admitted (0.0 if allowed)
    reset_after: float  # seconds until the bucket is full again
    failure: str | None = None  # None, LOCK_TIMEOUT, TABLE_FULL or a redis_* reason


class RateLimiter(Protocol):
    """A backend. Synchronous ones (shm, local) decide in ``check``; one that must wait on the
    network (Redis) sets ``asynchronous = True`` and decides in ``check_async``, and the
    caller awaits only then, so the shared-memory path pays for no coroutine."""

    asynchronous: bool

    def check(self, identity: bytes, rpm: float, burst: int, cost: int = 1) -> Decision: ...

    async def check_async(
        self, identity: bytes, rpm: float, burst: int, cost: int = 1
    ) -> Decision: ...

    def adjust(self, identity: bytes, rpm: float, burst: int, refund: float) -> None:
        """Give ``refund`` tokens back (take when negative), best effort: settle a reservation."""

    def close(self) -> None: ...


class DigestCache:
    """identity → slot digest, memoised: the same few identities recur on every request, and
    a dict hit costs a tenth of hashing. Bounded: cleared when it reaches `size` entries."""

    __slots__ = ("_digests", "_size")

    def __init__(self, size: int = 65_536) -> None:
        self._digests: dict[bytes, bytes] = {}
        self._size = size

    def __call__(self, identity: bytes) -> bytes:
        digest = self._digests.get(identity)
        if digest is None:
            if len(self._digests) >= self._size:
                self._digests.clear()
            digest = self._digests[identity] = slot_digest(identity)
        return digest


def slot_digest(identity: bytes) -> bytes:
    """Hash an identity down to the 16-byte digest stored in a slot.

    The identity is already key-derived (never the API key itself); hashing again keeps
    slot contents fixed-size and uniformly spread for open addressing.
    """
    return hashlib.blake2b(identity, digest_size=DIGEST_SIZE).digest()


def failure_decision(failure: str, policy: str, burst: int) -> Decision:
    """The Decision returned when the bucket could not be consulted."""
    if policy == ALLOW:
        return Decision(True, burst, 0, 0.0, 0.0, failure)
    # A transient failure: ask the client to come back soon rather than in a minute.
    return Decision(False, burst, 0, 1.0, 0.0, failure)
