"""Per-request context: request id, W3C trace context, timings, and what later stages learn.

What the upstream exchange came to is not written here field by field: the router records the
request's one `UpstreamOutcome` (edge.routing.outcome) with `record_upstream`, and readers
(metrics, the access line) read `ctx.upstream`.

The request id lives in a ContextVar as well as on the context object: uvicorn runs each
request in its own task, so log records from any code running for a request (the upstream
client, an error handler) carry that request's id and never another's.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import random
import re
import time
from contextvars import ContextVar
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # recorded here, produced by the layers that know them
    from edge.auth import KeyEntry
    from edge.endpoints.routes import Endpoint
    from edge.observability.spans import SpanRecord
    from edge.routing.outcome import UpstreamOutcome

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
trace_id_var: ContextVar[str | None] = ContextVar("trace_id", default=None)

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # whole value: fullmatch
_TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_MAX_TRACESTATE = 512
_MAX_TRACESTATE_MEMBERS = 32
# W3C Trace Context, tracestate list-member: key "=" value. The value is printable ASCII
# without "," and "=", never ending in a space; the key is a simple or a multi-tenant key.
_TRACESTATE_MEMBER_RE = re.compile(
    r"(?P<key>[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)


# Request ids without a syscall: a per-process counter under a keyed hash (BLAKE2b, a key from
# os.urandom drawn again in every forked worker), 32 hex digits as a random id would be. Unique
# within a process by construction and across processes with overwhelming probability; and
# unlike a bare counter they tell a client nothing about how many requests a worker served
# between two of its own.
# The keyed hash is set up once per process and copied per id (BLAKE2b's key costs a whole
# compression; a copy does not). Not `random` here: a client could rebuild its Mersenne
# Twister's state from enough ids; it serves the trace ids below, which go upstream only.
_next_id = itertools.count().__next__
_id_hash = blake2b(digest_size=16)


def _new_id_key() -> None:
    global _next_id, _id_hash
    _id_hash = blake2b(key=os.urandom(16), digest_size=16)
    _next_id = itertools.count().__next__


_new_id_key()
os.register_at_fork(after_in_child=_new_id_key)
# Trace and span ids come from `random` (reseeded from os.urandom after every fork by the
# random module itself): W3C asks for random ids, not secret ones, and this costs no syscall.
_random_bits = random.getrandbits


def new_span_id() -> str:
    """A random W3C span id: 16 hex digits, never all zeros."""
    return f"{_random_bits(64) or 1:016x}"


def new_request_id() -> str:
    digest = _id_hash.copy()
    digest.update(_next_id().to_bytes(8, "little"))
    return digest.hexdigest()


_CLIENTS: dict[str, str | None] = {}  # client address as given -> as validated
MAX_CLIENT_CACHE = 4096


def sane_client(value: str | None) -> str | None:
    """The client address if it is an IP address (what the socket gives, or what a trusted
    proxy's X-Forwarded-For says, which uvicorn passes on unchecked), else None: a crafted
    forwarded value never reaches the access line or a rate-limit bucket's identity.
    Validations are kept (bounded): most requests come from addresses seen before."""
    if value is None:
        return None
    found = _CLIENTS.get(value, False)
    if found is not False:
        return found  # type: ignore[return-value]
    sane: str | None = None
    if len(value) <= 64:  # the longest IPv6 text with a zone is well under this
        try:
            sane = str(ipaddress.ip_address(value))
        except ValueError:
            sane = None
    if len(_CLIENTS) >= MAX_CLIENT_CACHE:
        _CLIENTS.clear()
    _CLIENTS[value] = sane
    return sane


def sane_request_id(value: str | None) -> str:
    """The client's x-request-id if it is short and made of safe characters, else a new one."""
    if value and _REQUEST_ID_RE.fullmatch(value):
        return value
    return new_request_id()


def sane_tracestate(value: str | None) -> str | None:
    """The caller's tracestate if it is valid W3C tracestate within our bounds, else None.

    Anything else (control characters, non-ASCII, a malformed or duplicate member, more than 32
    members or 512 characters) is dropped whole rather than forwarded upstream, as the spec
    asks of a parser that cannot use a value.
    """
    if not value or len(value) > _MAX_TRACESTATE:
        return None
    keys = set()
    members = []
    for raw in value.split(","):
        member = raw.strip(" \t")
        if not member:
            continue  # empty list members are allowed (and not passed on)
        match = _TRACESTATE_MEMBER_RE.fullmatch(member)
        if match is None or match["key"] in keys:
            return None
        keys.add(match["key"])
        members.append(member)
    if not members or len(members) > _MAX_TRACESTATE_MEMBERS:
        return None
    return ",".join(members)


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace_id, parent span id, flags) from a valid W3C traceparent header, else None."""
    if not value:
        return None
    match = _TRACEPARENT_RE.match(value.strip().lower())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if version == "00" and rest:
        return None
    return trace_id, span_id, flags


class RequestContext:
    """What the request path knows about one request. Never holds a key."""

    __slots__ = (
        "budget",
        "cache",
        "cached_tokens",
        "client",
        "completion_tokens",
        "cost_usd",
        "error_code",
        "identity",
        "key",
        "model",
        "parallel",
        "parent_id",
        "prompt_tokens",
        "relayed",
        "request_id",
        "route",
        "span",
        "span_id",
        "start",
        "stream",
        "trace_flags",
        "trace_id",
        "traceparent_out",
        "tracestate",
        "upstream",
    )

    def __init__(self, request_id: str, client: str | None) -> None:
        self.start = time.perf_counter()
        self.request_id = request_id
        self.client = client
        self.route: Endpoint | None = None  # once the request is routed
        self.identity: str | None = None
        self.key: KeyEntry | None = None  # the key of an authenticated request
        # The slot digest of the key's requests in flight while this request holds one of them
        # (edge.ratelimit.parallel): set when taken, back to None when released (exactly once).
        self.parallel: bytes | None = None
        self.model: str | None = None
        self.stream = False
        self.upstream: UpstreamOutcome | None = None  # see record_upstream
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.cached_tokens: int | None = None  # of prompt_tokens, read from a prompt cache
        self.cost_usd: float | None = None  # what the request cost (edge.cost), once known
        self.budget: Any = None  # its budget reservation (edge.budgets.accounts)
        self.relayed = 0  # data lines of a stream relayed (a budget's charge when cut short)
        self.cache: str | None = None  # the cache lookup's result (edge.cache.answers)
        self.error_code: str | None = None  # the code of an error the gateway answered
        self.trace_id: str | None = None
        self.span_id: str | None = None  # this hop's: the server span's, when spans are exported
        self.parent_id: str | None = None  # the client's span, when it sent a traceparent
        self.trace_flags = "01"
        self.span: SpanRecord | None = None  # a sampled request's span facts (edge.observability)
        self.traceparent_out: str | None = None
        self.tracestate: str | None = None

    def record_upstream(self, outcome: UpstreamOutcome) -> None:
        """The one place a request learns its upstream outcome (edge.routing.outcome).

        Recorded once, when the router starts the exchange: the upstream layer goes on filling
        the same object (a stream's later reads too), so a request cut short by its client
        still reports what it tried and waited.
        """
        self.upstream = outcome

    def set_trace(self, traceparent: str | None, tracestate: str | None, start_new: bool) -> None:
        """Adopt the caller's trace, or start one when tracing is on; prepare what goes upstream.

        Upstream gets the same trace id with a new parent span id (this hop), as W3C
        propagation asks of an intermediary.
        """
        parsed = parse_traceparent(traceparent)
        if parsed is not None:
            self.trace_id, self.parent_id, self.trace_flags = parsed
            self.tracestate = sane_tracestate(tracestate)
            self.span_id = span_id = new_span_id()
        elif start_new:
            ids = f"{_random_bits(192):048x}"  # the trace id and this hop's span id
            self.trace_id, span_id = ids[:32], ids[32:]
            if span_id == _ZERO_SPAN:
                span_id = "0" * 15 + "1"
            self.span_id = span_id
        else:
            return
        self.traceparent_out = f"00-{self.trace_id}-{span_id}-{self.trace_flags}"

    def set_sampled(self, sampled: bool) -> None:
        """The sampler's decision (spans exported): the flags' sampled bit, as sent upstream."""
        flags = (int(self.trace_flags, 16) & 0xFE) | sampled
        self.trace_flags = f"{flags:02x}"
        self.traceparent_out = f"00-{self.trace_id}-{self.span_id}-{self.trace_flags}"
