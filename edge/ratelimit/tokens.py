"""Token limits (TPM): reserve an estimate before forwarding, settle on the real usage after.

Theory of operation
-------------------
Each identity has a second token bucket beside its request bucket, holding up to ``tpm``
tokens and refilling at ``tpm / 60`` per second, in the same backend (shared memory or Redis).
A request is admitted only if its *estimate* fits, and the estimate is taken at once, so
concurrent requests cannot overspend: counting only after the response is what lets five
concurrent requests spend 663 tokens under a 100 TPM limit (LiteLLM #18730).

The estimate covers everything a provider bills:

- input: the whole request body's bytes / 4 (about a token per four characters of English):
  every field counts, messages, system and instructions, tool results, tools and their JSON
  schemas, ``response_format`` and ``text.format`` schemas, and fields no one has heard of yet,
  since the body's length bounds the bytes of every string in it. Image and file parts are not
  counted by their bytes or their URL but at a fixed, conservative amount per part
  (``IMAGE_PART_TOKENS``, ``FILE_PART_TOKENS``: providers scale images down, and bill a file by
  its pages), except a document whose source is plain text, counted by its bytes like any
  text; a prompt given as token ids counts one token per id;
- output: per route, the largest of the cap fields that route's API obeys (chat:
  ``max_completion_tokens`` and ``max_tokens``; completions and Anthropic's Messages:
  ``max_tokens``; Responses: ``max_output_tokens``), times ``n`` (or ``best_of``), times the
  number of prompts of a batched completion (``prompt`` as a list); with no cap present,
  RATE_LIMIT_TPM_DEFAULT_MAX_TOKENS. A cap field of another API, which the upstream ignores,
  counts for nothing. The gateway never adds, lowers or rewrites a cap: the default is a
  reservation, not a limit on the answer.

Settling, by the request pipeline (edge.pipeline), once the outcome is known:

- to the usage the upstream reports, with no floor: a request that used more than it reserved
  leaves the bucket in debt (edge.ratelimit.bucket), refused until the refill has paid it;
- tokens go back only when the upstream provably did no work: every attempt failed to connect
  before its request was sent, or was answered with an error status;
- an attempt whose request was sent and that ended without an answer (a timeout, a reset, the
  client hanging up, a stream cut short) keeps its reservation, or what it is seen to have
  used when that is larger: the usage reported so far, and for a stream at least one output
  token for each data line relayed (a client that leaves just before the usage chunk is
  settled to the generation it read); and when the router fails over after such an attempt,
  the next attempt may be billed too, so it takes another estimate (``Reservation.take_more``,
  debt allowed);
- a request whose answer the gateway could never see, so never settle (the Responses API's
  ``background: true``), is refused under a token limit.

An estimate larger than the whole bucket could never be admitted, so it is refused with 400 at
once rather than asked to retry forever.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from edge.errors import BadRequest, RateLimited
from edge.ratelimit import headers
from edge.ratelimit.base import Decision

BYTES_PER_TOKEN = 4
IMAGE_PART_TOKENS = 2_000  # one image, whatever its size: providers bill about 1,600 at most
FILE_PART_TOKENS = 25_000  # one file, document or audio part (about ten pages of a PDF)
_IMAGE_TYPES = frozenset(("image_url", "input_image", "image"))
_FILE_TYPES = frozenset(("file", "input_file", "document", "input_audio", "audio"))
_CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_COUNT_FIELDS = ("n", "best_of")  # completions generated per request


class Prompt:
    """What one API's request holds for its token estimate: the fields that may hold prompt
    content (images, files, token ids), the cap fields that API obeys (none: it generates
    nothing), and whether its streams report usage only when asked
    (`stream_options.include_usage`)."""

    __slots__ = ("asks_usage", "batch", "caps", "fields")

    def __init__(
        self,
        *fields: str,
        caps: tuple[str, ...] = (),
        asks_usage: bool = False,
        batch: str | None = None,
    ) -> None:
        self.fields = fields
        self.caps = caps
        self.asks_usage = asks_usage
        self.batch = batch  # a field that, as a list, asks for one generation per item

    @property
    def generates(self) -> bool:
        return bool(self.caps)


CHAT = Prompt("messages", caps=("max_completion_tokens", "max_tokens"), asks_usage=True)
COMPLETION = Prompt("prompt", caps=("max_tokens",), asks_usage=True, batch="prompt")
RESPONSES = Prompt("input", "instructions", caps=("max_output_tokens",))
MESSAGES = Prompt("messages", "system", caps=("max_tokens",))  # Anthropic's Messages API
EMBEDDINGS = Prompt("input")


class Reservation:
    """Tokens taken for one request: `estimate` for each attempt that may be billed (`prompt`
    of it for the input), settled once when its usage is known."""

    __slots__ = ("estimate", "identity", "limiter", "prompt", "settled", "taken", "tpm")

    def __init__(
        self, limiter: Any, identity: bytes, tpm: int, estimate: int, prompt: int = 0
    ) -> None:
        self.limiter = limiter
        self.identity = identity
        self.tpm = tpm
        self.estimate = estimate
        self.prompt = prompt
        self.taken = estimate
        self.settled = False

    async def take_more(self) -> None:
        """Another attempt may be billed (the router fails over after one whose request was
        sent and not answered): take another estimate, into debt if need be."""
        self.taken += self.estimate
        await self._adjust(-self.estimate)

    async def settle(self, used: int) -> None:
        """Give back what the request did not use (take what it used beyond what was taken:
        a debt). Awaited, so the next request of this identity sees the settled bucket."""
        if self.settled:
            return
        self.settled = True
        await self._adjust(self.taken - used)

    async def _adjust(self, refund: int) -> None:
        if not refund:
            return
        limiter = self.limiter
        if limiter.asynchronous:
            await limiter.adjust_async(self.identity, float(self.tpm), self.tpm, float(refund))
        else:
            limiter.adjust(self.identity, float(self.tpm), self.tpm, float(refund))


def output_cap(data: dict[str, Any], where: Prompt) -> int | None:
    """The largest of the cap fields `where`'s API obeys that the request sets, else None."""
    caps = [data.get(name) for name in where.caps]
    return max((cap for cap in caps if _whole(cap)), default=None)


def estimate_tokens(body_size: int, data: dict[str, Any], where: Prompt, default_max: int) -> int:
    """The most the request may be billed: its input plus the most it may generate. See the
    module docstring."""
    return estimate_input(body_size, data, where) + estimate_output(data, where, default_max)


def estimate_input(body_size: int, data: dict[str, Any], where: Prompt) -> int:
    """The input part: the body's `body_size` bytes / 4, image and file parts at a fixed
    amount each, token ids one each."""
    media_bytes, media_tokens, token_ids = _media([data.get(name) for name in where.fields])
    prompt = math.ceil(max(0, body_size - media_bytes) / BYTES_PER_TOKEN)
    return prompt + media_tokens + token_ids


def estimate_output(data: dict[str, Any], where: Prompt, default_max: int) -> int:
    """The output part: the cap (else `default_max`) times the generations asked for."""
    if not where.caps:
        return 0
    cap = -1
    for name in where.caps:  # the largest whole cap set (as `output_cap`, without its lists)
        value = data.get(name)
        if value.__class__ is int and value > cap:
            cap = value
    choices = 1
    for name in _COUNT_FIELDS:
        value = data.get(name)
        if value.__class__ is int and value > choices:
            choices = value
    batch = 1
    if where.batch:
        prompts = data.get(where.batch)
        if isinstance(prompts, list) and _batched(prompts):
            batch = max(1, len(prompts))
    return (default_max if cap < 0 else cap) * choices * batch


def _batched(prompts: list[Any]) -> bool:
    """A completions `prompt` list is a batch (one generation per item) when its items are
    strings or token-id lists; a list of ints is one prompt given as token ids."""
    return bool(prompts) and not isinstance(prompts[0], int)


def check_counts(data: dict[str, Any]) -> None:
    """A cap or count field that is not a whole number is 400: an upstream may read "100000"
    or 1e5 where the estimate could not. `null` is the APIs' spelling of "not set" (the
    estimate then takes the default cap, or one choice)."""
    for name in (*_CAP_FIELDS, *_COUNT_FIELDS):
        value = data.get(name)
        if value is not None and not _whole(value):
            raise BadRequest(f"'{name}' must be a whole number >= 0.", param=name)


def _whole(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _media(value: Any) -> tuple[int, int, int]:
    """(bytes of the strings inside image and file parts, the tokens those parts count for,
    token ids) in the prompt fields.

    Iterative, so a prompt nested as deep as the JSON parser allows cannot exhaust the
    recursion limit. A part is a JSON object whose "type" names an image or a file, in any of
    the APIs' spellings (OpenAI chat and Responses, Anthropic).
    """
    media_bytes = media_tokens = token_ids = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            kind = item.get("type")
            if (kind in _IMAGE_TYPES or kind in _FILE_TYPES) and not _text_source(item):
                media_tokens += IMAGE_PART_TOKENS if kind in _IMAGE_TYPES else FILE_PART_TOKENS
                media_bytes += _string_bytes(item)
            else:
                pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            token_ids += 1  # a prompt given as token ids
    return media_bytes, media_tokens, token_ids


def _text_source(part: dict[str, Any]) -> bool:
    """An Anthropic document whose source is text (`text`, or `content` blocks): billed as
    the text it holds, so counted by its bytes, not at the fixed amount of a file."""
    source = part.get("source")
    return isinstance(source, dict) and source.get("type") in ("text", "content")


def _string_bytes(value: Any) -> int:
    """UTF-8 bytes of every string in `value` (at most what they take in the body)."""
    size = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):  # an ASCII string's length is its bytes: no copy
            size += len(item) if item.isascii() else len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return size


class TokenLimiter:
    """Reserve against the worker's rate limiter (the request buckets' backend)."""

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
        self, ctx: Any, resp: Any, body_size: int, data: dict[str, Any], where: Prompt
    ) -> Reservation | None:
        """Take the estimate from the identity's token bucket, or raise 429 / 400.

        Returns None when no token limit applies, or when the limiter could not be consulted
        and the failure policy admitted the request (nothing was taken, nothing to settle).
        """
        tpm = self.limit_for(ctx)
        limiter = self._limiter
        if tpm <= 0 or limiter is None:
            return None
        check_counts(data)
        if data.get("background") is True:
            raise BadRequest(
                "'background' responses cannot be held to a token limit (the gateway never "
                "sees their usage); send the request without it.",
                param="background",
            )
        prompt = estimate_input(body_size, data, where)
        estimate = prompt + estimate_output(data, where, self._default_max)
        if estimate > tpm:
            raise BadRequest(
                f"This request may use up to {estimate} tokens (the estimate of its input plus "
                f"its maximum output), more than the token limit of {tpm} per minute allows. "
                "Lower its output cap or shorten it.",
                param=next((cap for cap in where.caps if cap in data), where.caps[0])
                if where.caps
                else None,
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
        return Reservation(limiter, identity, tpm, estimate, prompt)


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
        wait = decision.retry_after
        when = (
            f"{retry_ms / 1000:.3g}s" if wait <= 60 else f"{math.ceil(wait)}s (the key is in debt)"
        )
        message = (
            f"Rate limit reached for tokens (limit {tpm} per minute, requested {estimate}, "
            f"remaining {decision.remaining}). Try again in {when}."
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
