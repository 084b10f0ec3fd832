"""A stored answer's bytes: round trips, and decode never trusts what it is given (no I/O)."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.cache.entry import MAGIC, VERSION, Entry, body_size, decode, encode

HEADER = struct.Struct("<4sBddHBQQIB")  # the layout the module docstring documents

times = st.floats(allow_nan=False, allow_infinity=False)
tokens = st.integers(min_value=0, max_value=2**64 - 1)
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
content_types = st.text(PRINTABLE, max_size=255)
# A byte no content type may hold: a control byte (CR and LF among them), DEL, or non-ASCII.
unprintable_bytes = st.integers(min_value=0, max_value=255).filter(lambda b: not 0x20 <= b <= 0x7E)


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    stream = draw(st.booleans())
    if stream:
        blocks = draw(st.lists(st.binary(max_size=300), max_size=12))
    else:
        blocks = [draw(st.binary(max_size=2000))]
    return Entry(
        created=draw(times),
        expires=draw(times),
        status=draw(st.integers(min_value=0, max_value=0xFFFF)),
        content_type=draw(content_types),
        stream=stream,
        blocks=blocks,
        prompt_tokens=draw(tokens),
        completion_tokens=draw(tokens),
    )


def sample(**changes: object) -> Entry:
    fields: dict[str, object] = {
        "created": 1_700_000_000.25,
        "expires": 1_700_000_600.5,
        "status": 200,
        "content_type": "text/event-stream",
        "stream": True,
        "blocks": [b'data: {"a":1}\n\n', b"data: [DONE]\n\n"],
        "prompt_tokens": 12,
        "completion_tokens": 34,
    }
    fields.update(changes)
    return Entry(**fields)  # type: ignore[arg-type]


@settings(max_examples=300)
@given(entries())
def test_round_trip(entry):
    assert decode(encode(entry)) == entry
    assert decode(memoryview(encode(entry))) == entry


@given(entries())
def test_body_size_counts_the_blocks(entry):
    assert body_size(entry) == sum(map(len, entry.blocks))


def test_layout_is_the_documented_one():
    entry = sample()
    data = encode(entry)
    assert data[:5] == MAGIC + bytes([VERSION]) == b"EDGC\x01"
    fields = HEADER.unpack_from(data)
    assert fields == (MAGIC, VERSION, entry.created, entry.expires, 200, 1, 12, 34, 2, 17)
    offset = HEADER.size
    assert data[offset : offset + 17] == b"text/event-stream"
    offset += 17
    for block in entry.blocks:
        assert struct.unpack_from("<I", data, offset) == (len(block),)
        assert data[offset + 4 : offset + 4 + len(block)] == block
        offset += 4 + len(block)
    assert offset == len(data)


def test_a_non_streamed_entry_has_its_body_in_one_block():
    body = sample(stream=False, content_type="application/json", blocks=[b'{"id":"x"}'])
    assert decode(encode(body)) == body
    with pytest.raises(ValueError, match="exactly one block"):
        encode(sample(stream=False, blocks=[b"a", b"b"]))


@pytest.mark.parametrize(
    "changes",
    [
        {"created": math.nan},
        {"expires": math.inf},
        {"status": 70_000},
        {"prompt_tokens": -1},
        {"completion_tokens": 2**64},
        {"content_type": "text/plain; charset=é"},
        {"content_type": "x" * 256},
        {"content_type": "text/event-stream\r\nX-Injected: 1"},
        {"content_type": "text/plain\n"},
        {"content_type": "text/plain\x00"},
        {"content_type": "text/plain\x7f"},
        {"content_type": "text/plain\tcharset=utf-8"},
    ],
)
def test_encode_refuses_what_decode_would_not_give_back(changes):
    with pytest.raises(ValueError):
        encode(sample(**changes))


def printable(content_type: str) -> bool:
    return all(0x20 <= ord(c) <= 0x7E for c in content_type)


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_random_bytes_never_raise(data):
    result = decode(data)
    assert result is None or (isinstance(result, Entry) and printable(result.content_type))


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_bytes_behind_a_valid_prefix_never_raise(tail):
    """Random bytes mostly fail the magic; these pass it and reach the length checks."""
    result = decode(b"EDGC\x01" + tail)
    assert result is None or (isinstance(result, Entry) and printable(result.content_type))


@settings(max_examples=300)
@given(entries(), st.data())
def test_a_content_type_with_an_unprintable_byte_is_refused(entry, data):
    """A value from Redis is not trusted: a CR or LF in the content type would become part of
    the response's header block. decode refuses it, and encode never writes it."""
    raw = bytearray(data.draw(st.binary(min_size=1, max_size=255)))
    index = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    raw[index] = data.draw(unprintable_bytes)
    entry.content_type = "x" * len(raw)
    encoded = bytearray(encode(entry))
    encoded[HEADER.size : HEADER.size + len(raw)] = raw
    assert decode(bytes(encoded)) is None
    entry.content_type = raw.decode("latin-1")
    with pytest.raises(ValueError):
        encode(entry)


@given(entries(), st.data())
def test_every_truncation_is_refused(entry, data):
    encoded = encode(entry)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    assert decode(encoded[:cut]) is None


def test_all_truncations_of_a_sample_are_refused():
    encoded = encode(sample())
    assert all(decode(encoded[:cut]) is None for cut in range(len(encoded)))


@given(entries(), st.data())
def test_a_corrupted_byte_never_raises(entry, data):
    encoded = bytearray(encode(entry))
    index = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    original = encoded[index]
    encoded[index] = data.draw(st.integers(min_value=0, max_value=255).filter(original.__ne__))
    result = decode(bytes(encoded))
    assert result is None or (isinstance(result, Entry) and printable(result.content_type))


def test_every_single_byte_corruption_of_a_sample_never_raises():
    encoded = encode(sample())
    for index in range(len(encoded)):
        for value in (0x00, 0x7F, 0x80, 0xFF, encoded[index] ^ 0x01):
            corrupt = bytearray(encoded)
            corrupt[index] = value
            result = decode(bytes(corrupt))
            assert result is None or (isinstance(result, Entry) and printable(result.content_type))


def test_trailing_bytes_are_refused():
    assert decode(encode(sample()) + b"\x00") is None


def test_another_version_or_magic_is_refused():
    encoded = encode(sample())
    assert decode(b"EDGC\x02" + encoded[5:]) is None
    assert decode(b"EDGX" + encoded[4:]) is None


def test_a_block_count_the_bytes_cannot_hold_is_refused():
    encoded = bytearray(encode(sample()))
    struct.pack_into("<I", encoded, HEADER.size - 5, 2**32 - 1)
    assert decode(bytes(encoded)) is None


def test_a_block_length_past_the_end_is_refused():
    encoded = bytearray(encode(sample()))
    struct.pack_into("<I", encoded, HEADER.size + 17, 2**32 - 1)
    assert decode(bytes(encoded)) is None


def test_unknown_flags_and_non_ascii_content_types_are_refused():
    encoded = bytearray(encode(sample()))
    flags = HEADER.size - 1 - 4 - 8 - 8 - 1  # the flags byte sits before the token counts
    assert encoded[flags] == 1
    encoded[flags] = 3
    assert decode(bytes(encoded)) is None
    encoded = bytearray(encode(sample()))
    encoded[HEADER.size] = 0xC3
    assert decode(bytes(encoded)) is None


@pytest.mark.parametrize("byte", [0x00, 0x09, 0x0A, 0x0D, 0x1F, 0x7F])
def test_control_bytes_in_the_content_type_are_refused(byte):
    """Every printable byte passes (the sample's 17 are replaced one by one), no control byte
    does: CR and LF would split the response's headers."""
    for index in range(17):
        encoded = bytearray(encode(sample()))
        encoded[HEADER.size + index] = byte
        assert decode(bytes(encoded)) is None
    for printable_byte in range(0x20, 0x7F):
        encoded = bytearray(encode(sample()))
        encoded[HEADER.size + 16] = printable_byte
        found = decode(bytes(encoded))
        assert found is not None and found.content_type[-1] == chr(printable_byte)


def test_non_finite_times_are_refused():
    encoded = bytearray(encode(sample()))
    struct.pack_into("<d", encoded, 5, math.nan)
    assert decode(bytes(encoded)) is None
    struct.pack_into("<d", encoded, 5, 1.0)
    struct.pack_into("<d", encoded, 13, math.inf)
    assert decode(bytes(encoded)) is None
