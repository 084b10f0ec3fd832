"""`UpstreamOutcome`: what one request's upstream exchange came to.

The router creates one outcome per routed request (`Router.exchange`) and records it on the
request context at once, in one place: `RequestContext.record_upstream`. From then on the
request reads the upstream facts only through it, as `ctx.upstream` (edge.middleware's
metrics, the access line of edge.observability.logs); the context has no upstream fields of its
own to write.

It is written through its methods only, by Layer 2 and the transport below it:

- the router (edge.routing.router) starts each `attempt` at a provider and records the
  `answered` status of the answer it passes on, or that the answer was `failed` (invalid);
- the transport (edge.upstream.client: an exchange, a stream's later reads and mid-stream
  failures) adds the time it `waited` on the upstream and names a failure (`failed`; a refused
  key also sets the status); it says when an attempt's request was `sent` (from then on the
  upstream may be working, and billing, for it) and when the upstream `declined` it with an
  error status (it did no work). `working` counts the attempts that may have been billed: the
  token limit keeps what they reserved (edge.pipeline).
"""

from __future__ import annotations

from edge.cost import Price


class UpstreamOutcome:
    """One request's upstream facts, as the metrics and the access line report them."""

    __slots__ = ("attempts", "error", "price", "provider", "status", "waited_s", "working")

    def __init__(self) -> None:
        self.status: int | None = None  # the status of the answer passed on (or refused)
        self.error: str | None = None  # timeout, connect, disconnect, invalid, auth
        self.waited_s = 0.0  # time spent waiting on the upstream: not the gateway's overhead
        self.provider: str | None = None  # the configured provider that answered (or last tried)
        self.attempts = 0  # upstream attempts made (failover retries included)
        self.working = 0  # attempts whose request was sent and not declined: maybe billed
        self.price: Price | None = None  # the answering target's prices (edge.cost)

    def attempt(self, provider: str) -> None:
        """An attempt at `provider` starts: the previous attempt's failure is no longer the
        request's."""
        self.attempts += 1
        self.provider = provider
        self.error = None

    def answered(self, status: int, provider: str | None = None) -> None:
        """The answer passed on has this status (an upstream error passed on included), from
        `provider` when it is named here (an exchange without routing: no attempt counted)."""
        self.status = status
        self.error = None
        if provider is not None:
            self.provider = provider

    def failed(self, kind: str, status: int | None = None) -> None:
        """The exchange failed: `kind` names how (bounded: see `error`); `status` when the
        upstream answered one that the gateway did not pass on (a refused key)."""
        self.error = kind
        if status is not None:
            self.status = status

    def sent(self) -> None:
        """An attempt's request was written to the upstream."""
        self.working += 1

    def declined(self) -> None:
        """The attempt's request was answered with an error status: no work was done for it."""
        self.working -= 1

    def waited(self, seconds: float) -> None:
        """Time spent waiting on the upstream (counted out of the gateway's overhead)."""
        self.waited_s += seconds
