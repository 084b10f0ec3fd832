"""POST /v1/messages/count_tokens for a target that cannot count: the gateway's own estimate.

An Anthropic target counts exactly (the request passes through). Any other has no such endpoint,
and Claude Code calls it before each request, so the gateway answers with the estimate its token
limit reserves for a request's input (edge.ratelimit.tokens.estimate_input: the body's bytes / 4,
images and files at a fixed amount), not a second rule beside it. It is an estimate, larger
than the real count for most English text, and the README says so.
"""

from __future__ import annotations

from typing import Any

from edge.ratelimit.tokens import MESSAGES, estimate_input


def count_tokens(body_size: int, data: dict[str, Any]) -> dict[str, int]:
    """Anthropic's count_tokens answer for a request body of `body_size` bytes, parsed as
    `data`."""
    return {"input_tokens": estimate_input(body_size, data, MESSAGES)}
