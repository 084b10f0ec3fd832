"""Cut a Server-Sent Events byte stream into whole events, sans I/O.

Theory of operation. An SSE stream is lines, each ended by CRLF, LF or a lone CR; a blank line
ends an event (WHATWG HTML, "Server-sent events", 9.2.5/9.2.6). A relay that forwards bytes as
they were read can hand a client half an event; if the stream then breaks, whatever the relay
appends (an error event) lands on that half-written line and the client's parser chokes on the
mix. So the relay forwards only whole events: `EventSplitter.feed` takes each read as it comes
and returns the events it completed, byte for byte as received, each with its blank line; the
rest waits, bounded, for the next read. Nothing is re-encoded, and events that arrived in
separate reads are never merged by the splitter.

Every blank line ends an event, so a blank line with nothing before it is an "event" of its
own (it dispatches nothing, and is forwarded as it came). The one byte whose meaning depends on
the next read is a CR: an event whose blank line ends in CR is complete and returned at once,
and if the next read starts with LF (the other half of a CRLF), that LF comes back alone, as
`b"\\n"`, at the front of the next result: forward it like an event, it holds none.
"""

from __future__ import annotations

import re

# One line terminator, atomically: CRLF is never re-read as CR followed by an LF terminator.
_EOL = re.compile(rb"(?>\r\n|\r|\n)")
# A blank line inside a line: a terminator directly followed by another.
_BLANK = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")

MAX_EVENT_BYTES = 4 * 1024 * 1024  # the largest incomplete event held while waiting for its end


class EventTooLarge(ValueError):
    """An event grew past the splitter's bound without ending."""


class EventSplitter:
    """Feed it reads; get back the whole events they completed, in order."""

    __slots__ = ("_after_cr", "_line_start", "_pending", "_pending_size", "max_event_bytes")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._pending: list[bytes] = []  # the incomplete event's bytes so far
        self._pending_size = 0
        self._line_start = True  # the last byte seen ended a line (or nothing was seen yet)
        self._after_cr = False  # the last byte seen was a CR

    @property
    def pending(self) -> int:
        """Bytes of an incomplete event held back (what a stream ending now would lose)."""
        return self._pending_size

    def feed(self, data: bytes) -> list[bytes]:
        """The events `data` completes. Raises EventTooLarge when the incomplete rest would
        exceed `max_event_bytes`."""
        if not data:
            return []
        events: list[bytes] = []
        start = 0
        if self._after_cr and data[0] == 0x0A:  # the LF of a CRLF whose CR came last time
            start = 1
            if self._pending:
                self._pending.append(b"\n")
                self._pending_size += 1
            else:
                events.append(b"\n")
        cut = start  # where the bytes not yet returned begin
        pos = start
        size = len(data)
        lf_only = b"\r" not in data  # the usual case: then a blank line is simply LF LF
        while pos < size:
            if self._line_start and data[pos] in b"\r\n":
                end = _EOL.match(data, pos).end()  # type: ignore[union-attr]
            elif lf_only:
                end = data.find(b"\n\n", pos) + 2
                if end == 1:
                    break
            else:
                match = _BLANK.search(data, pos)
                if match is None:
                    break
                end = match.end()
            if self._pending:
                self._pending.append(data[cut:end])
                events.append(b"".join(self._pending))
                self._pending.clear()
                self._pending_size = 0
            elif cut == 0 and end == size:
                events.append(data)  # the common case: one read, one whole event; no copy
            else:
                events.append(data[cut:end])
            cut = pos = end
            self._line_start = True
        last = data[-1]
        self._after_cr = last == 0x0D
        if cut < size:
            rest = data[cut:]
            self._line_start = last in (0x0A, 0x0D)
            self._pending_size += len(rest)
            if self._pending_size > self.max_event_bytes:
                raise EventTooLarge(f"an event grew past {self.max_event_bytes} bytes")
            self._pending.append(rest)
        return events


def iter_events(data: bytes) -> list[bytes]:
    """The whole events in `data` (a complete stream or a relayed block); an incomplete tail
    is dropped."""
    return EventSplitter(max_event_bytes=len(data) + 1).feed(data)
