"""Token limits (TPM): reserve an estimate before forwarding, settle on the real usage after.

Theory of operation
-------------------
Each identity has a second token bucket beside its request bucket, holding up to ``tpm``
tokens and refilling at ``tpm / 60`` per second, in the same backend (shared memory or Redis).
A request is admitted only if its *estimate* fits: the prompt's size (bytes of its text / 4,
about a token per four characters of English) plus the most it may generate
(``max_completion_tokens``, ``max_tokens`` or ``max_output_tokens``, times ``n``; the
configured RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS when none is set). The estimate is taken at once,
so concurrent requests cannot overspend: counting only after the response is what lets five
concurrent requests spend 663 tokens under a 100 TPM limit (LiteLLM #18730).

When the response reports its ``usage``, the difference is settled: unused tokens go back,
an overspend is taken (down to an empty bucket, never into debt). No usage, no settlement:
a stream the client abandons, or an upstream that failed mid-way, keeps its reservation. An
upstream that answered with an error gives everything back (nothing was generated).

An estimate larger than the whole bucket could never be admitted, so it is refused with 400 at
once rather than asked to retry forever.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from edge.errors import BadRequest, RateLimited
from edge.ratelimit import headers
from edge.ratelimit.base import Decision

_MAX_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
BYTES_PER_TOKEN = 4


_COUNT_FIELDS = ("n", "best_of")  # completions generated per request


class Prompt:
    """Where an API's request holds its prompt, whether it generates output, the field that
    caps that output in this API (written into the request when the client set none), and
    whether its streams report usage only when asked (`stream_options.include_usage`)."""

    __slots__ = ("asks_usage", "cap", "fields", "generates")

    def __init__(
        self, *fields: str, cap: str = "", generates: bool = True, asks_usage: bool = False
    ) -> None:
        self.fields = fields
        self.cap = cap
        self.generates = generates
        self.asks_usage = asks_usage


CHAT = Prompt("messages", cap="max_completion_tokens", asks_usage=True)
COMPLETION = Prompt("prompt", cap="max_tokens", asks_usage=True)
RESPONSES = Prompt("input", "instructions", cap="max_output_tokens")
MESSAGES = Prompt("messages", "system", cap="max_tokens")  # Anthropic's Messages API
EMBEDDINGS = Prompt("input", generates=False)


class Reservation:
    """Tokens taken for one request, to settle when its usage is known."""

    __slots__ = ("estimate", "identity", "limiter", "settled", "tpm")

    def __init__(self, limiter: Any, identity: bytes, tpm: int, estimate: int) -> None:
        self.limiter = limiter
        self.identity = identity
        self.tpm = tpm
        self.estimate = estimate
        self.settled = False

    async def settle(self, used: int) -> None:
        """Give back what the request did not use (take what it used beyond the estimate).
        Awaited, so the next request of this identity sees the settled bucket."""
        if self.settled:
            return
        self.settled = True
        refund = self.estimate - used
        if not refund:
            return
        limiter = self.limiter
        if limiter.asynchronous:
            await limiter.adjust_async(self.identity, float(self.tpm), self.tpm, float(refund))
        else:
            limiter.adjust(self.identity, float(self.tpm), self.tpm, float(refund))

    async def settle_usage(self, usage: Any) -> None:
        used = used_tokens(usage)
        if used is not None:
            await self.settle(used)


def used_tokens(usage: Any) -> int | None:
    """Tokens a response reports: prompt + completion (or input + output), else total."""
    if not isinstance(usage, dict):
        return None

    def count(*names: str) -> int | None:
        for name in names:
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        return None

    prompt = count("prompt_tokens", "input_tokens")
    completion = count("completion_tokens", "output_tokens")
    if prompt is not None and completion is not None:
        return prompt + completion
    return count("total_tokens")


def estimate_tokens(data: dict[str, Any], where: Prompt, default_max: int) -> int:
    """Prompt size estimate + the most the request may generate (see `hold_to_estimate`)."""
    text_bytes, prompt_tokens = _prompt_size([data.get(name) for name in where.fields])
    prompt = prompt_tokens + math.ceil(text_bytes / BYTES_PER_TOKEN)
    if not where.generates:
        return prompt
    completion = default_max
    for name in _MAX_FIELDS:
        value = data.get(name)
        if _whole(value):
            completion = value
            break
    counts = [data.get(name) for name in _COUNT_FIELDS]
    choices = max((count for count in counts if _whole(count)), default=1)
    return prompt + completion * max(1, choices)


def hold_to_estimate(data: dict[str, Any], where: Prompt, default_max: int) -> None:
    """Make the request the upstream sees match what was estimated: a cap or count field that
    is not a whole number is 400 (an upstream may read "100000" or 1e5 where the estimate could
    not), and a request without a cap gets the default one written in (the upstream would
    otherwise generate as much as it likes, past what was reserved)."""
    for name in (*_MAX_FIELDS, *_COUNT_FIELDS):
        if name in data and not _whole(data[name]):
            raise BadRequest(f"'{name}' must be a whole number >= 0.", param=name)
    if where.generates and where.cap and not any(name in data for name in _MAX_FIELDS):
        data[where.cap] = default_max


def _whole(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _prompt_size(value: Any) -> tuple[int, int]:
    """(UTF-8 bytes of the text, tokens given as token ids) in messages or a prompt.

    Iterative, so a prompt nested as deep as the JSON parser allows cannot exhaust the
    recursion limit. Every string counts (roles, names, tool arguments cost tokens too).
    """
    size = tokens = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            size += len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, int) and not isinstance(item, bool):
            tokens += 1  # a prompt given as token ids
    return size, tokens


class TokenLimiter:
    """Reserve/settle against the worker's rate limiter (the request buckets' backend)."""

    def __init__(self, config: Any, limiter: Any, metrics: Any) -> None:
        self._default_tpm = config.rate_limit_tpm
        self._default_max = config.rate_limit_tpm_default_max_tokens
        self._policy = config.rate_limit_failure_policy
        self._limiter = limiter
        self._metrics = metrics

    def limit_for(self, ctx: Any) -> int:
        entry = ctx.key
        if entry is not None and entry.tpm is not None:
            return entry.tpm
        return self._default_tpm

    async def reserve(
        self, ctx: Any, resp: Any, data: dict[str, Any], where: Prompt
    ) -> Reservation | None:
        """Take the estimate from the identity's token bucket, or raise 429 / 400.

        Returns None when no token limit applies, or when the limiter could not be consulted
        and the failure policy admitted the request (nothing was taken, nothing to settle).
        """
        tpm = self.limit_for(ctx)
        limiter = self._limiter
        if tpm <= 0 or limiter is None:
            return None
        hold_to_estimate(data, where, self._default_max)
        estimate = estimate_tokens(data, where, self._default_max)
        if estimate > tpm:
            raise BadRequest(
                f"This request may use up to {estimate} tokens (prompt estimate plus its "
                f"maximum output), more than the token limit of {tpm} per minute allows. "
                "Lower max_tokens or shorten the prompt.",
                param="max_tokens",
                code="tokens_exceed_limit",
            )
        identity = token_identity(ctx)
        if limiter.asynchronous:
            decision = await limiter.check_async(identity, float(tpm), tpm, estimate)
        else:
            decision = limiter.check(identity, float(tpm), tpm, estimate)
        if decision.failure is not None:
            if self._metrics is not None:
                self._metrics.limiter_failure(decision.failure, self._policy)
            if decision.allowed:
                return None
            raise refused(decision, tpm, estimate, {})
        sent = headers.admitted(decision, "tokens")
        if not decision.allowed:
            raise refused(decision, tpm, estimate, sent)
        resp.set_headers(sent)
        return Reservation(limiter, identity, tpm, estimate)


def token_identity(ctx: Any) -> bytes:
    """The token bucket's identity: the request bucket's, in a namespace of its own."""
    if ctx.key is not None:
        return ("tpm:key:" + ctx.identity).encode()
    return ("tpm:addr:" + (ctx.client or "unknown")).encode()


def refused(decision: Decision, tpm: int, estimate: int, sent: dict[str, str]) -> RateLimited:
    retry_ms = headers.retry_after(decision.retry_after, sent)
    if decision.failure is not None:
        message = "Rate limit reached for tokens: the limiter is unavailable. Try again shortly."
    else:
        message = (
            f"Rate limit reached for tokens (limit {tpm} per minute, requested {estimate}, "
            f"remaining {decision.remaining}). Try again in {retry_ms / 1000:.3g}s."
        )
    return RateLimited(message, headers=sent)


def ask_for_usage(data: dict[str, Any]) -> bool:
    """Make a streamed request ask for the usage chunk; True when the client had not asked
    (then the body must be re-serialised and the chunk hidden from the client)."""
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    data["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return True
