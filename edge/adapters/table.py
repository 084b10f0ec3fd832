"""The translation table: what each request field becomes in the other API, and why.

One source for the code and the README. The request translators read `TO_ANTHROPIC` and
`TO_OPENAI` to decide each top-level field: MAPPED fields are translated by their code, DROPPED
ones are left out for the reason written, REFUSED ones are 400 naming the field unless their
value is one of `harmless` (the API's own default, which asks for nothing: `"n": 1`), and a field
in neither table is refused too, so a feature added to an API later is never silently ignored.
`null` is both APIs' spelling of "not set": a null field is left out, whatever its row says.

`NOTES` are the rows that are not top-level request fields (content parts, answers, streams,
errors); `markdown()` renders all of it as the README's table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAPPED = "mapped"
DROPPED = "dropped"
REFUSED = "refused"

OPENAI_TO_ANTHROPIC = "OpenAI → Anthropic"
ANTHROPIC_TO_OPENAI = "Anthropic → OpenAI"
BOTH = "both"


@dataclass(frozen=True, slots=True)
class Rule:
    """What happens to one request field: `action` (MAPPED, DROPPED, REFUSED), `what` for the
    README, and for a refused field the values that are accepted (and left out) all the same."""

    action: str
    what: str
    harmless: tuple[Any, ...] = ()


def _refused(what: str, *harmless: Any) -> Rule:
    return Rule(REFUSED, what, harmless)


# OpenAI chat request fields, translated for an Anthropic target.
TO_ANTHROPIC: dict[str, Rule] = {
    "model": Rule(MAPPED, "kept"),
    "messages": Rule(
        MAPPED,
        "`system`/`developer` messages → `system` (hoisted, in order); `user`/`assistant` → "
        "turns, consecutive turns of one role merged; `tool` messages → `tool_result` blocks "
        "in a user turn; the parts are in the rows below",
    ),
    "max_completion_tokens": Rule(MAPPED, "→ `max_tokens` (it wins when both are set)"),
    "max_tokens": Rule(
        MAPPED,
        "→ `max_tokens`; with neither set, the target's default (Anthropic requires one)",
    ),
    "temperature": Rule(
        MAPPED,
        "→ `temperature` for 0 to 1; above 1 refused (400): Anthropic's range is 0 to 1, and "
        "clamping or scaling would change what was asked",
    ),
    "top_p": Rule(MAPPED, "→ `top_p`"),
    "top_k": Rule(
        MAPPED, "→ `top_k` (an extension vLLM and others accept; -1, vLLM's 'all', left out)"
    ),
    "stop": Rule(MAPPED, "→ `stop_sequences` (a string becomes a list of one)"),
    "user": Rule(MAPPED, "→ `metadata.user_id`"),
    "safety_identifier": Rule(MAPPED, "→ `metadata.user_id` (it wins over `user`)"),
    "stream": Rule(MAPPED, "→ `stream`"),
    "stream_options": Rule(
        MAPPED,
        "read by the gateway: `include_usage` adds the final usage chunk (Anthropic always "
        "reports usage)",
    ),
    "tools": Rule(
        MAPPED,
        "function tools → `{name, description, input_schema}`; `strict` dropped (Anthropic "
        "follows the schema without it); other tool types refused",
    ),
    "tool_choice": Rule(
        MAPPED,
        "`auto`/`none`/`required`/named → `auto`/`none`/`any`/`tool`; left out without tools",
    ),
    "parallel_tool_calls": Rule(MAPPED, "`false` → `tool_choice.disable_parallel_tool_use`"),
    "n": _refused("above 1 refused: Anthropic makes one answer per request", 1),
    "logprobs": _refused("`true` refused: Anthropic has no log probabilities", False),
    "top_logprobs": _refused("refused: Anthropic has no log probabilities", 0),
    "response_format": _refused(
        "`json_object`/`json_schema` refused: ignoring them would answer text where JSON was "
        "promised",
        {"type": "text"},
    ),
    "frequency_penalty": _refused("non-zero refused: Anthropic has no penalties", 0),
    "presence_penalty": _refused("non-zero refused: Anthropic has no penalties", 0),
    "logit_bias": _refused("non-empty refused: Anthropic has no logit bias", {}),
    "modalities": _refused('anything but `["text"]` refused', ["text"]),
    "audio": _refused("refused: no audio output"),
    "reasoning_effort": _refused("refused: not translated to extended thinking"),
    "verbosity": _refused("anything but `medium` refused", "medium"),
    "web_search_options": _refused("refused: Anthropic's web search is a server tool"),
    "functions": _refused("refused: the legacy function API (use `tools`)", []),
    "function_call": _refused("refused: the legacy function API (use `tool_choice`)"),
    "seed": Rule(DROPPED, "dropped: a best-effort hint in OpenAI too; Anthropic has no seed"),
    "prediction": Rule(DROPPED, "dropped: a latency hint; the answer is the same without it"),
    "service_tier": Rule(DROPPED, "dropped: the tier of an OpenAI account"),
    "store": Rule(DROPPED, "dropped: storage in OpenAI's dashboard; nothing is stored"),
    "metadata": Rule(DROPPED, "dropped: tags of OpenAI's stored completions"),
    "prompt_cache_key": Rule(DROPPED, "dropped: OpenAI's cache routing hint"),
}

# Anthropic Messages request fields, translated for an OpenAI-compatible target.
TO_OPENAI: dict[str, Rule] = {
    "model": Rule(MAPPED, "kept"),
    "messages": Rule(
        MAPPED,
        "text/image blocks → parts; `tool_use` → `tool_calls`; `tool_result` blocks → `tool` "
        "messages before the rest of their turn; the parts are in the rows below",
    ),
    "system": Rule(
        MAPPED, "→ the first message, role `system` (several text blocks joined by a blank line)"
    ),
    "max_tokens": Rule(
        MAPPED,
        "→ `max_tokens` (what vLLM, Ollama and most compatible servers read; OpenAI's reasoning "
        "models, which want `max_completion_tokens`, refuse it)",
    ),
    "temperature": Rule(MAPPED, "→ `temperature`"),
    "top_p": Rule(MAPPED, "→ `top_p`"),
    "top_k": Rule(MAPPED, "→ `top_k` (vLLM and others accept it; OpenAI itself refuses it)"),
    "stop_sequences": Rule(MAPPED, "→ `stop`"),
    "metadata": Rule(MAPPED, "`user_id` → `user`"),
    "stream": Rule(
        MAPPED, "→ `stream`, with `stream_options.include_usage`, so the usage is exact"
    ),
    "tools": Rule(
        MAPPED,
        "custom tools → function tools (`input_schema` → `parameters`); server tools refused",
    ),
    "tool_choice": Rule(
        MAPPED,
        "`auto`/`none`/`any`/`tool` → `auto`/`none`/`required`/named; "
        "`disable_parallel_tool_use` → `parallel_tool_calls: false`; left out without tools",
    ),
    "thinking": Rule(
        DROPPED,
        "dropped: the model reasons as it always does and the answer has no thinking blocks "
        "(refusing would make Claude Code unusable on these targets)",
    ),
    "service_tier": Rule(DROPPED, "dropped: the tier of an Anthropic account"),
    "container": _refused("refused: no code-execution containers"),
    "mcp_servers": _refused("refused: no MCP connector", []),
    "context_management": _refused("refused: no server-side context editing"),
    "output_format": _refused("refused: structured outputs are not translated"),
    "output_config": _refused("refused: not translated"),
}

# Rows that are not top-level request fields: content, answers, streams, errors.
NOTES: tuple[tuple[str, str, str], ...] = (
    ("any other request field", BOTH, "refused (400 naming it): never silently ignored"),
    (
        "`image_url` part / `image` block",
        BOTH,
        "a `data:` URL ⇄ a base64 source with its media type; an http(s) URL ⇄ a URL source; "
        "`detail` dropped; an image from Anthropic's Files API refused",
    ),
    (
        "`file` part / `document` block",
        BOTH,
        "a base64 PDF (`file_data`) ⇄ a base64 `document`; a `file_id`, or a document of "
        "text or from a URL, refused",
    ),
    ("`input_audio` part", OPENAI_TO_ANTHROPIC, "refused: Anthropic takes no audio"),
    ("`refusal` part (assistant)", OPENAI_TO_ANTHROPIC, "→ a text block"),
    (
        "assistant `audio` / `function_call`, `function` messages",
        OPENAI_TO_ANTHROPIC,
        "refused: no audio; the legacy function API (use tools)",
    ),
    (
        "message `name`",
        OPENAI_TO_ANTHROPIC,
        "dropped: Anthropic has no per-message names",
    ),
    (
        "assistant `tool_calls`",
        OPENAI_TO_ANTHROPIC,
        "→ `tool_use` blocks; `arguments` parsed into `input` (not a JSON object: 400 naming it; "
        "an empty string is `{}`); an id Anthropic would refuse is replaced by a stable digest",
    ),
    (
        "`tool_result` `is_error`",
        ANTHROPIC_TO_OPENAI,
        "the tool message's text starts with `Error: `",
    ),
    (
        "`tool_result` with an image",
        ANTHROPIC_TO_OPENAI,
        "refused: OpenAI's tool messages hold text only",
    ),
    (
        "`thinking`/`redacted_thinking` blocks in the history",
        ANTHROPIC_TO_OPENAI,
        "dropped: an OpenAI-compatible model cannot read them",
    ),
    ("`cache_control`", ANTHROPIC_TO_OPENAI, "dropped: the target caches prompts itself or not"),
    ("empty text", OPENAI_TO_ANTHROPIC, "dropped (Anthropic refuses empty text blocks)"),
    (
        "answer text and tool calls",
        BOTH,
        "text blocks ⇄ `content` (joined); `tool_use` ⇄ `tool_calls` (`arguments` a JSON string; "
        "arguments that are not a JSON object are a 502)",
    ),
    (
        "answer `thinking` blocks",
        ANTHROPIC_TO_OPENAI,
        "dropped: OpenAI's chat API has no field for them",
    ),
    (
        "`stop_reason` / `finish_reason`",
        BOTH,
        "`end_turn`, `stop_sequence`, `pause_turn` → `stop`; `max_tokens`, "
        "`model_context_window_exceeded` → `length`; `tool_use` ⇄ `tool_calls`; `refusal` ⇄ "
        "`content_filter`; `stop` → `end_turn` (`stop_sequence` when a vLLM-style `stop_reason` "
        "names the sequence)",
    ),
    (
        "usage",
        BOTH,
        "`prompt_tokens` = `input_tokens` + cache reads + cache writes (OpenAI's count includes "
        "cached tokens, Anthropic's does not); cache reads ⇄ `prompt_tokens_details."
        "cached_tokens`; `output_tokens` ⇄ `completion_tokens`",
    ),
    (
        "stream",
        ANTHROPIC_TO_OPENAI,
        "`message_start` → the role chunk; text and `input_json_delta` → `content` and "
        "`arguments` fragments; `message_delta` → the finish chunk; the usage chunk when "
        "`include_usage` was asked; `ping`, thinking and citation deltas dropped; `error` → "
        "the OpenAI error event (the stream ends there, without `[DONE]`)",
    ),
    (
        "stream",
        OPENAI_TO_ANTHROPIC,
        "rebuilt in Anthropic's grammar: `message_start` (input tokens 0 until known), one "
        "block at a time, `message_delta` with the exact usage from the usage chunk, "
        "`message_stop`; an error event → `event: error`",
    ),
    (
        "errors",
        BOTH,
        "the client's shape; 529 `overloaded_error` → 503 for OpenAI clients; the type follows "
        "the status (400 invalid_request_error, 401 authentication_error, 403 permission_error, "
        "404 not_found_error, 413 request_too_large, 429 rate_limit_error, 503/529 "
        "overloaded_error, other 5xx api_error)",
    ),
    (
        "`count_tokens`",
        ANTHROPIC_TO_OPENAI,
        "an estimate: the token limiter's (the body's bytes / 4, images and files at a fixed "
        "amount)",
    ),
)


def rows() -> tuple[tuple[str, str, str], ...]:
    """Every row, (field, direction, what happens): the request fields, then the notes."""
    fields = [
        (f"`{name}`", direction, rule.what)
        for direction, table in (
            (OPENAI_TO_ANTHROPIC, TO_ANTHROPIC),
            (ANTHROPIC_TO_OPENAI, TO_OPENAI),
        )
        for name, rule in table.items()
    ]
    return (*fields, *NOTES)


def markdown() -> str:
    """The README's translation table."""
    lines = ["| Field | Direction | What happens |", "|---|---|---|"]
    for field, direction, what in rows():
        escaped = what.replace("|", "\\|")
        lines.append(f"| {field} | {direction} | {escaped} |")
    return "\n".join(lines) + "\n"
