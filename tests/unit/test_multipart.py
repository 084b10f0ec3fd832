"""Multipart forms (edge.endpoints.multipart): the model the gateway routes by is the only one
the upstream can read, and a renaming target's name replaces exactly that field, however the
form spells its parts. Cases from a review: duplicate fields, an unquoted name, a decoy in
another part's headers or in upper case."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.endpoints.multipart import boundary_of, form_fields, rename_field
from edge.errors import BadRequest

BOUNDARY = "b0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def form(*parts: tuple[str, bytes]) -> bytes:
    """Parts as (header lines, value)."""
    out = b""
    for head, value in parts:
        out += f"--{BOUNDARY}\r\n{head}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def field(name: str, extra: str = "") -> str:
    return f'Content-Disposition: form-data; name="{name}"{extra}'


FILE = (field("file", '; filename="a.wav"') + "\r\nContent-Type: audio/wav", b"RIFF\x00model")


def test_a_duplicate_model_field_is_refused():
    body = form((field("model"), b"whisper-1"), FILE, (field("model"), b"gpt-4o-transcribe"))
    with pytest.raises(BadRequest) as refused:
        form_fields(body, CONTENT_TYPE)
    assert refused.value.param == "model"


def test_the_one_model_field_is_read_and_renamed():
    body = form(FILE, (field("prompt"), b"hi"), (field("model"), b"alias"))
    assert form_fields(body, CONTENT_TYPE)["model"] == "alias"
    renamed = rename_field(body, boundary_of(CONTENT_TYPE), "whisper-large")
    assert form_fields(renamed, CONTENT_TYPE)["model"] == "whisper-large"
    assert renamed.replace(b"whisper-large", b"alias") == body  # nothing else moved


@pytest.mark.parametrize(
    "parts",
    [
        # the real field unquoted: still renamed
        ((("Content-Disposition: form-data; name=model"), b"alias"), FILE),
        # a decoy named MODEL first: the parser's name is exact, so is the rename
        ((field("MODEL"), b"decoy"), (field("model"), b"alias"), FILE),
        # a decoy header line inside another part: only Content-Disposition counts
        ((field("prompt") + '\r\nX-Note: name="model"', b"keep me"), (field("model"), b"alias")),
    ],
)
def test_the_rename_hits_the_field_the_parser_read(parts):
    body = form(*parts)
    assert form_fields(body, CONTENT_TYPE)["model"] == "alias"
    renamed = rename_field(body, boundary_of(CONTENT_TYPE), "target-name")
    assert form_fields(renamed, CONTENT_TYPE)["model"] == "target-name"
    assert b"alias" not in renamed
    assert renamed.count(b"decoy") == body.count(b"decoy")
    assert renamed.count(b"keep me") == body.count(b"keep me")


@given(st.sampled_from(["model", "stream"]), st.integers(2, 4))
def test_any_field_sent_more_than_once_is_refused(name, times):
    body = form(*[(field(name), b"x")] * times, FILE)
    with pytest.raises(BadRequest):
        form_fields(body, CONTENT_TYPE)
