"""Host-wide circuit breakers and cooldowns, in shared memory: one per provider, one per target.

Theory of operation
-------------------
The state machine is sans-I/O (`allow`, `on_success`, `on_failure`, `cool_down` over a
`BreakerState` and a clock value passed in), so it is unit-tested with an injected clock.

    closed --(failure_threshold consecutive failures)--> open
    open --(timeout_seconds passed; the next allow())--> half-open
    half-open: at most half_open_max probes in flight; a failure --> open again,
               success_threshold successes --> closed

A probe that ends without a verdict (its client hung up, a retry-after answer) gives its place
back (`release`); one that never reports back at all (its worker died) holds its place only for
one breaker timeout, then its place is given to a new probe. A cooldown (from a provider's
retry-after) is separate: it only moves forward, so a shorter retry-after never shortens a
longer cooldown (LiteLLM #40130).

Panic (`panic_probe`): when every target of a model is open or cooling down, the router sends
the model's requests to them anyway rather than refuse everyone (as Envoy's panic threshold
does); each such request is a probe of the open breaker, outside `half_open_max`, so the first
successes close it again.

The router keeps two breakers a target (edge.routing.router): its provider's, for failures of
the connection (refused, reset, TLS, a refused key), and the target's own (the provider and the
upstream model), for failures of the answers (5xx, 429, timeouts, invalid answers), so one
model's failures never close the provider to its other models.

`SharedBreakers` keeps one 64-byte slot per breaker in a host-wide shared-memory segment
(edge.shm: created by the gunicorn master beside the rate-limit table, attached by each worker
after fork, locked with the kernel-released `flock`). Slots are keyed by a digest of the
breaker's name (edge.shm.Slots finds them), so a HUP that adds providers finds the old ones'
state where it was. The lock is held for one read-modify-write, never across an await. A slot
whose state reads `closed` with no failures is not locked at all: the common case costs one
unlocked read.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge.routing.providers import BreakerPolicy
from edge.shm import Segment, Slots

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}
MAX_COOLDOWN_S = 60.0


@dataclass(slots=True)
class BreakerState:
    state: int = CLOSED
    failures: int = 0
    successes: int = 0
    probes: int = 0
    opened_at: float = 0.0
    probe_at: float = 0.0
    cooldown_until: float = 0.0


def available(s: BreakerState, policy: BreakerPolicy, now: float) -> bool:
    """Would `allow` say yes (without claiming a probe)? For ordering and health."""
    if s.state == CLOSED:
        return True
    if s.state == OPEN:
        return now - s.opened_at >= policy.timeout_s
    return s.probes < policy.half_open_max or now - s.probe_at >= policy.timeout_s


def allow(s: BreakerState, policy: BreakerPolicy, now: float) -> bool:
    """May a request go to this provider now? In half-open this claims a probe place."""
    if s.state == CLOSED:
        return True
    if s.state == OPEN:
        if now - s.opened_at < policy.timeout_s:
            return False
        s.state, s.successes, s.probes = HALF_OPEN, 0, 0
    if s.probes >= policy.half_open_max:
        if now - s.probe_at < policy.timeout_s:
            return False
        s.probes = 0  # probes that never reported back (a worker died mid-probe)
    s.probes += 1
    s.probe_at = now
    return True


def on_success(s: BreakerState, policy: BreakerPolicy, now: float, probe: bool = True) -> None:
    """A success. In half-open only a probe's counts (`probe`: the report comes from a request
    that claimed a place in this half-open period); a late answer to a request sent before the
    breaker opened changes nothing, as in open."""
    if s.state == CLOSED:
        s.failures = 0
    elif s.state == HALF_OPEN and probe:
        s.probes = max(0, s.probes - 1)
        s.successes += 1
        if s.successes >= policy.success_threshold:
            s.state, s.failures, s.successes, s.probes = CLOSED, 0, 0, 0
    # OPEN: a late answer to a request sent before the breaker opened changes nothing


def on_failure(s: BreakerState, policy: BreakerPolicy, now: float, probe: bool = True) -> None:
    """A failure; in half-open only a probe's reopens the breaker (see on_success)."""
    if s.state == CLOSED:
        s.failures += 1
        if s.failures >= policy.failure_threshold:
            _open(s, now)
    elif s.state == HALF_OPEN and probe:
        _open(s, now)


def claimed(s: BreakerState, probe: float | None) -> bool:
    """Whether `probe` (what `Router._admit` handed a request: the half-open period's
    `opened_at` it claimed a place in, else None) is a place in the current half-open period."""
    return probe is not None and s.state == HALF_OPEN and s.opened_at == probe


def release(s: BreakerState, probe: float | None) -> None:
    """A probe that ends without a verdict (its client hung up, its attempt was never sent, a
    retry-after answer) gives its place back at once, instead of holding it for a timeout. Only
    a place it claimed, in this same half-open period: never another request's."""
    if claimed(s, probe) and s.probes > 0:
        s.probes -= 1


def panic_probe(s: BreakerState, now: float) -> float | None:
    """Claim a probe whatever the state allows (panic routing, see the module docstring): an
    open breaker goes half-open at once. Returns the probe (what `claimed` checks), or None
    when the breaker is closed (nothing to probe)."""
    if s.state == CLOSED:
        return None
    if s.state == OPEN:
        s.state, s.successes, s.probes = HALF_OPEN, 0, 0
    s.probes += 1
    s.probe_at = now
    return s.opened_at


def _open(s: BreakerState, now: float) -> None:
    s.state, s.opened_at, s.successes, s.probes = OPEN, now, 0, 0


def cool_down(s: BreakerState, now: float, seconds: float) -> None:
    """Keep requests away until now + seconds (at most 60 s); never shortens a cooldown."""
    until = now + min(max(seconds, 0.0), MAX_COOLDOWN_S)
    if until > s.cooldown_until:
        s.cooldown_until = until


# ------------------------------------------------------------------ storage

# key(16) state(B) pad(3) failures successes probes (I) pad(4) opened_at probe_at cooldown (d)
_SLOT = struct.Struct("<16sB3xIII4xddd")
_HOT = struct.Struct("<16xB3xI28xd")  # state, failures, cooldown_until: the unlocked fast path
SLOT_SIZE = 64
_MAGIC = b"EDGEBRK1"
_HEADER = struct.Struct("<8sI4x")
HEADER_SIZE = 16
DEFAULT_SLOTS = 4096  # a provider's breaker and one per target (64 bytes each)
WINDOW = 16  # slots probed for a key (edge.shm.Slots)
LOCK_TIMEOUT_S = 0.05
_FREE = bytes(16)
assert _SLOT.size <= SLOT_SIZE


def slot_key(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=16, person=b"edge-breaker").digest()


class LocalBreakers:
    """Process-local breakers (tests through falcon.testing, a single process)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._states: dict[str, BreakerState] = {}
        self.clock = clock

    def _state(self, name: str) -> BreakerState:
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = BreakerState()
        return state

    def peek(self, name: str) -> BreakerState:
        return self._state(name)

    def hot(self, name: str) -> tuple[int, int, float]:
        s = self._state(name)
        return s.state, s.failures, s.cooldown_until

    def update(self, name: str, change: Callable[[BreakerState, float], object]) -> object:
        return change(self._state(name), self.clock())

    def close(self) -> None:
        pass


class SharedBreakers:
    """One process's attachment to the breaker table (see the module docstring)."""

    def __init__(self, segment: Segment, clock: Callable[[], float]) -> None:
        self._segment = segment
        self._mm = segment.mm
        slots = _HEADER.unpack_from(self._mm, 0)[1]
        self._slots = Slots(HEADER_SIZE, slots, SLOT_SIZE, min(WINDOW, slots))
        self._index: dict[str, int] = {}
        self.clock = clock
        self._local = LocalBreakers(clock)  # when the table is full (logged by the caller)

    @staticmethod
    def create(name: str, slots: int = DEFAULT_SLOTS, uid: int | None = None,
               gid: int | None = None) -> None:  # fmt: skip
        """Create and format the segment (mode 0600), replacing a stale one; the master."""

        def fill(mm: object) -> None:
            _HEADER.pack_into(mm, 0, _MAGIC, slots)  # type: ignore[arg-type]

        Segment.create(name, HEADER_SIZE + slots * SLOT_SIZE, fill, uid, gid).close()

    @classmethod
    def attach(cls, name: str, clock: Callable[[], float] = time.monotonic) -> SharedBreakers:
        segment = Segment.attach(name, "breaker table")
        mm = segment.mm
        if len(mm) < HEADER_SIZE or _HEADER.unpack_from(mm, 0)[0] != _MAGIC:
            segment.close()
            raise ValueError(f"shared memory {name!r} is not a breaker table")
        return cls(segment, clock)

    def _slot(self, name: str) -> int:
        """The slot offset for this provider, claiming a free slot the first time (locked)."""
        index = self._index.get(name)
        if index is not None:
            return index
        key = slot_key(name)
        home = self._slots.home(key)
        offset = self._slots.find(self._mm, key, home)
        if offset < 0:
            if not self._segment.acquire(LOCK_TIMEOUT_S):
                return -1  # not cached: a local breaker this once, the shared slot next time
            try:
                offset = self._slots.find(self._mm, key, home)  # claimed meanwhile?
                if offset < 0:
                    offset = next(
                        (at for at in self._slots.offsets(home) if self._mm[at : at + 16] == _FREE),
                        -1,
                    )
                    if offset >= 0:
                        self._mm[offset : offset + 16] = key
            finally:
                self._segment.release()
        self._index[name] = offset
        return offset

    def _read(self, offset: int) -> BreakerState:
        """The slot's state; a torn or corrupt one (a state out of range, a time that is not a
        number or lies ahead of what any transition writes) reads as a fresh closed breaker, so
        it costs at most what a new provider's first failures cost, never a lasting lock-out."""
        _, *fields = _SLOT.unpack_from(self._mm, offset)
        state = BreakerState(*fields)
        now = self.clock()
        times = (state.opened_at, state.probe_at, state.cooldown_until)
        if (
            state.state not in (CLOSED, OPEN, HALF_OPEN)
            or any(t != t for t in times)  # NaN
            or state.opened_at > now + 1.0
            or state.probe_at > now + 1.0
            or state.cooldown_until > now + MAX_COOLDOWN_S + 1.0
        ):
            return BreakerState()
        return state

    def _write(self, offset: int, key: bytes, s: BreakerState) -> None:
        _SLOT.pack_into(
            self._mm, offset, key, s.state, s.failures, s.successes, s.probes,
            s.opened_at, s.probe_at, s.cooldown_until,
        )  # fmt: skip

    def peek(self, name: str) -> BreakerState:
        """An unlocked snapshot: good for ordering and display, never for a transition."""
        offset = self._slot(name)
        if offset < 0:
            return self._local.peek(name)
        return self._read(offset)

    def hot(self, name: str) -> tuple[int, int, float]:
        """(state, failures, cooldown_until), unlocked: enough to skip the lock when closed."""
        offset = self._index.get(name)
        if offset is None:
            offset = self._slot(name)
        if offset < 0:
            return self._local.hot(name)
        return _HOT.unpack_from(self._mm, offset)

    def update(self, name: str, change: Callable[[BreakerState, float], object]) -> object:
        """Apply `change(state, now)` under the lock and store the result. TimeoutError when
        the lock cannot be had within LOCK_TIMEOUT_S (a holder stopped, not dead): a breaker
        update may then be skipped, the event loop is never stalled."""
        offset = self._slot(name)
        if offset < 0:
            return self._local.update(name, change)
        if not self._segment.acquire(LOCK_TIMEOUT_S):
            raise TimeoutError("breaker table lock timeout")
        try:
            state = self._read(offset)
            result = change(state, self.clock())
            self._write(offset, self._mm[offset : offset + 16], state)
        finally:
            self._segment.release()
        return result

    def close(self) -> None:
        self._segment.close()
