"""The SSE event splitter (edge.upstream.sse): whole events out, whatever the read boundaries.

The reference for "the same events" is the official openai SDK's own SSE decoder.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from edge.upstream.sse import EventSplitter, EventTooLarge, iter_events

EOLS = [b"\n", b"\r\n", b"\r"]


def decoded(pieces: list[bytes]) -> list[tuple]:
    """What the openai SDK makes of these bytes."""
    return [
        (sse.event, sse.data, sse.id, sse.retry) for sse in SSEDecoder().iter_bytes(iter(pieces))
    ]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def run(reads: list[bytes], max_event_bytes: int = 1 << 20) -> list[list[bytes]]:
    splitter = EventSplitter(max_event_bytes)
    return [splitter.feed(read) for read in reads]


def merged(events: list[bytes]) -> list[bytes]:
    """Glue a lone LF back onto the event whose CR it completes (see the module docstring)."""
    out: list[bytes] = []
    for event in events:
        if event == b"\n" and out and out[-1].endswith(b"\r"):
            out[-1] += event
        else:
            out.append(event)
    return out


field_value = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=30
)
field = st.tuples(st.sampled_from(["data", "event", "id", ": comment", "retry"]), field_value)
event = st.tuples(st.lists(field, min_size=1, max_size=4), st.none())


@st.composite
def event_streams(draw) -> bytes:
    """A valid event stream: events of field lines, each line and each event ended by any of
    the three terminators, chosen independently."""
    out = b""

    def eol() -> bytes:
        # After a lone CR, an LF would turn it into one CRLF: the next terminator starts with CR.
        return draw(st.sampled_from(EOLS[1:] if out.endswith(b"\r") else EOLS))

    for fields, _ in draw(st.lists(event, max_size=6)):
        for name, value in fields:
            out += f"{name}: {value}".encode()
            out += eol()
        out += eol()
        if draw(st.booleans()):  # and now and then, extra blank lines between events
            out += eol()
    return out


@settings(max_examples=400, deadline=None)
@given(stream=event_streams(), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_yields_the_same_events_in_the_same_order(stream, cuts):
    whole = EventSplitter().feed(stream)
    results = run(split_at(stream, cuts))
    events = [e for result in results for e in result]
    assert merged(events) == merged(whole)
    assert b"".join(events) == stream  # byte for byte: a valid stream is passed on whole
    assert decoded(events) == decoded([stream])
    # Forwarding one block per read (what the relay does) gives the SDK the same events.
    assert decoded([b"".join(r) for r in results if r]) == decoded([stream])


@settings(max_examples=300, deadline=None)
@given(stream=event_streams(), tail=st.binary(max_size=40), cuts=st.lists(st.integers(0)))
def test_an_incomplete_tail_is_held_back_never_returned(stream, tail, cuts):
    tail = tail.replace(b"\r", b"").replace(b"\n", b"") + b"\n"  # one line, no blank line
    splitter = EventSplitter()
    events = [e for read in split_at(stream + b"data: x" + tail, cuts) for e in splitter.feed(read)]
    assert b"".join(events) == stream
    assert splitter.pending == len(b"data: x" + tail)


@pytest.mark.parametrize("eol", EOLS)
def test_each_read_returns_the_events_it_completed(eol):
    one = b"data: 1" + eol + eol
    two = b"data: 2" + eol + b"id: 7" + eol + eol
    splitter = EventSplitter()
    assert splitter.feed(one) == [one]
    assert splitter.feed(two[:5]) == []
    assert splitter.feed(two[5:] + one + one[:3]) == [two, one]
    assert splitter.pending == 3


def test_a_read_ending_inside_crlf():
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r\n\r") == [b"data: a\r\n\r"]  # complete: sent at once
    assert splitter.feed(b"\ndata: b\r") == [b"\n"]  # the LF that was the CR's other half
    assert splitter.feed(b"\n") == []  # inside an event: just part of it
    assert splitter.feed(b"\r\n") == [b"data: b\r\n\r\n"]


def test_an_event_past_the_bound_is_an_error():
    splitter = EventSplitter(max_event_bytes=16)
    assert splitter.feed(b"data: 12345678\n\n") == [b"data: 12345678\n\n"]  # whole: fine
    splitter.feed(b"data: 123456")
    with pytest.raises(EventTooLarge):
        splitter.feed(b"7890123")


def test_iter_events_drops_an_incomplete_tail():
    assert iter_events(b"data: 1\n\ndata: 2\n\ndata: 3\n") == [b"data: 1\n\n", b"data: 2\n\n"]
