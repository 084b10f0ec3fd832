"""A stored answer and its bytes: the value the response cache keeps under a request's key.
Sans I/O.

Theory of operation
-------------------
An `Entry` is what a cache hit replays: the status, the content type, and the body, either one
whole JSON body (``stream=False``, ``blocks == [body]``) or the SSE blocks of a streamed answer
in order, each block whole events (``stream=True``). ``created`` and ``expires`` are wall-clock
seconds (``time.time()``), not monotonic ones: an entry outlives the process that stored it
(the local store is kept across restarts, a remote one is shared by hosts), and Age is
``now - created``. The token counts are the usage the answer reported, counted as saved by a
hit.

`encode` lays an entry out as (all little-endian)::

    magic "EDGC", format version (u8)
    created f64, expires f64, status u16, flags u8 (bit 0: stream),
    prompt tokens u64, completion tokens u64, block count u32, content-type length u8
    content type (printable ASCII, 0x20-0x7E, at most 255 bytes)
    per block: length u32, bytes

`decode` reads it back and returns None for anything it cannot vouch for: another magic or
version, a truncated or over-long buffer, a length that claims more than what remains, unknown
flag bits, a content type with a byte outside printable ASCII (0x20-0x7E: a stored value may
come from Redis, and a CR or LF there would end up inside the response's Content-Type header), a
non-finite time, a non-streamed entry without exactly one block. Every length is checked against
the bytes that remain before anything is sliced or allocated, so a corrupt or hostile value
costs at most one pass over its own bytes and never raises. There is no checksum: a flipped bit
inside a block's bytes still decodes (the stores are trusted to return what they were given).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Final

MAGIC: Final = b"EDGC"
VERSION: Final = 1
FLAG_STREAM: Final = 0x01
MAX_CONTENT_TYPE: Final = 255
MAX_BLOCK: Final = 2**32 - 1

# magic, version, created, expires, status, flags, prompt, completion, block count, ct length
_HEADER = struct.Struct("<4sBddHBQQIB")
_LENGTH = struct.Struct("<I")
_PREFIX: Final = MAGIC + bytes([VERSION])
_U64: Final = 2**64 - 1
_PRINTABLE: Final = bytes(range(0x20, 0x7F))  # what a content type may hold: no control bytes


@dataclass(slots=True)
class Entry:
    created: float  # wall-clock seconds (time.time()) when stored; Age is computed from it
    expires: float  # wall-clock seconds after which it must not be served
    status: int  # HTTP status
    content_type: str  # e.g. "application/json", "text/event-stream"; printable ASCII, <= 255
    stream: bool  # True: `blocks` are whole SSE blocks in order; False: the body in blocks[0]
    blocks: list[bytes]
    prompt_tokens: int  # usage the answer reported (0 when none): saved by a hit
    completion_tokens: int


def body_size(entry: Entry) -> int:
    """Total bytes of the entry's blocks."""
    return sum(len(block) for block in entry.blocks)


def encode(entry: Entry) -> bytes:
    """The entry's bytes. ValueError for an entry `decode` would not give back (a field out of
    its range, a non-finite time, a content type over-long or not printable ASCII, a
    non-streamed entry without exactly one block)."""
    if not (math.isfinite(entry.created) and math.isfinite(entry.expires)):
        raise ValueError("created and expires must be finite")
    if not 0 <= entry.status <= 0xFFFF:
        raise ValueError(f"status out of range: {entry.status}")
    if not (0 <= entry.prompt_tokens <= _U64 and 0 <= entry.completion_tokens <= _U64):
        raise ValueError("token counts must be in 0..2**64-1")
    content_type = entry.content_type.encode("ascii")  # UnicodeEncodeError is a ValueError
    if content_type.translate(None, _PRINTABLE):
        raise ValueError("content type not printable ASCII (0x20-0x7E)")
    if len(content_type) > MAX_CONTENT_TYPE:
        raise ValueError(f"content type longer than {MAX_CONTENT_TYPE} bytes")
    blocks = entry.blocks
    if not entry.stream and len(blocks) != 1:
        raise ValueError(f"a non-streamed entry has exactly one block, got {len(blocks)}")
    parts = [
        _HEADER.pack(
            MAGIC,
            VERSION,
            entry.created,
            entry.expires,
            entry.status,
            FLAG_STREAM if entry.stream else 0,
            entry.prompt_tokens,
            entry.completion_tokens,
            len(blocks),
            len(content_type),
        ),
        content_type,
    ]
    pack_length = _LENGTH.pack
    for block in blocks:
        if len(block) > MAX_BLOCK:
            raise ValueError(f"a block longer than {MAX_BLOCK} bytes")
        parts.append(pack_length(len(block)))
        parts.append(block)
    return b"".join(parts)


def decode(data: bytes | memoryview) -> Entry | None:
    """The entry in `data`, or None when `data` is not exactly one well-formed entry of this
    format version. Never raises."""
    try:
        with memoryview(data) as outer, outer.cast("B") as view:
            return _decode(view)
    except (struct.error, ValueError, TypeError):  # defensive: every length is checked first
        return None


def _decode(view: memoryview) -> Entry | None:
    size = len(view)
    if size < _HEADER.size or view[: len(_PREFIX)] != _PREFIX:
        return None
    (_, _, created, expires, status, flags, prompt, completion, count, ct_length) = (
        _HEADER.unpack_from(view)
    )
    if flags & ~FLAG_STREAM or not (math.isfinite(created) and math.isfinite(expires)):
        return None
    stream = bool(flags & FLAG_STREAM)
    offset = _HEADER.size + ct_length
    # Each block takes at least its 4-byte length: a count the rest cannot hold is corrupt,
    # checked before the list of blocks is built.
    if offset > size or count * _LENGTH.size > size - offset or (not stream and count != 1):
        return None
    raw_type = bytes(view[_HEADER.size : offset])
    if raw_type.translate(None, _PRINTABLE):  # a byte left over is not printable ASCII
        return None
    blocks = []
    unpack_length = _LENGTH.unpack_from
    for _ in range(count):
        if size - offset < _LENGTH.size:
            return None
        (length,) = unpack_length(view, offset)
        offset += _LENGTH.size
        if length > size - offset:
            return None
        blocks.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != size:
        return None  # trailing bytes: not an entry this code wrote
    return Entry(
        created=created,
        expires=expires,
        status=status,
        content_type=raw_type.decode("ascii"),
        stream=stream,
        blocks=blocks,
        prompt_tokens=prompt,
        completion_tokens=completion,
    )
