"""`UpstreamOutcome`: what one request's upstream exchange came to, with one owner.

The router creates one outcome per forwarded request (`Router.forward`, or `Router.call` for a
single exchange without failover) and records it on the request context at once, in one place:
`RequestContext.record_upstream`. From then on the request reads the upstream facts only
through it, as `ctx.upstream` (edge.middleware's metrics, the access line of
edge.observability.logs); the context has no upstream fields of its own to write.

The upstream layer fills the outcome it was handed, and nothing else:

- `Router` sets `provider` and `attempts` per attempt, clears `error` when an attempt starts,
  and sets `status` from the answer it returns;
- `Upstream.call` / `open_stream` (edge.upstream.client) add the time spent waiting on the
  upstream to `waited_s` and name a failure in `error` (a refused key also sets `status`);
- the router's first-event wait and `relay` (a stream's later reads and mid-stream failures)
  do the same, since a stream keeps waiting on the upstream after the router returned.

The one exception outside the upstream layer: the endpoint that parses a success answer
(edge.endpoints.exchange.send_upstream) marks one that is not a JSON object `invalid`.
"""

from __future__ import annotations


class UpstreamOutcome:
    """One request's upstream facts, as the metrics and the access line report them."""

    __slots__ = ("attempts", "error", "provider", "status", "waited_s")

    def __init__(self) -> None:
        self.status: int | None = None  # the status of the answer passed on (or refused)
        self.error: str | None = None  # timeout, connect, disconnect, invalid, auth
        self.waited_s = 0.0  # time spent waiting on the upstream: not the gateway's overhead
        self.provider: str | None = None  # the configured provider that answered (or last tried)
        self.attempts = 0  # upstream attempts made (failover retries included)
