"""edge.upstream.http1 against h11, an HTTP/1.1 implementation written independently of it
and of llhttp: the independent check of the hand-written client.

Hypothesis writes upstream answers (interim 1xx heads, every framing, chunk extensions,
trailers, bodies that end with the connection, answers cut short) and splits them at random
read boundaries; each is fed to an `edge.upstream.http1.Connection` (collecting or streaming)
and to an h11 client connection that has sent its request. Both must come to the same answer
(status, headers as http1 exposes them, body, whether the connection may be reused), or both
refuse it. Broken and ambiguous answers (Content-Length with Transfer-Encoding, a repeated
Transfer-Encoding, conflicting lengths, bad chunk sizes, obs-fold, bare LF...) must be refused
by http1. h11 is more lenient on some of those: each shape h11 may take while http1 refuses it
is in LENIENT_H11 with its reason, and nothing else may differ; http1 never takes an answer h11
refuses.
"""

from __future__ import annotations

import asyncio
import itertools
import string
from dataclasses import dataclass
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http1 import FakeTransport

from edge.upstream.http1 import (
    Connection,
    Disconnected,
    InvalidResponse,
    Pool,
    UpstreamError,
)

LIMIT = 1 << 20
REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: upstream\r\ncontent-length: 2\r\n\r\n{}"
TCHAR = "!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters
VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))
# Names the random ones avoid: each is generated on purpose, where it belongs.
SPECIAL = {"content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer"}

# Shapes h11 takes and http1 refuses, and why refusing is right. Only these may differ, and
# only that way round (http1 refusing).
LENIENT_H11 = {
    "cl+te": "Content-Length with Transfer-Encoding: h11 lets chunked win; RFC 9112 section 6.3 "
    "says such a message 'ought to be handled as an error' (request smuggling, response "
    "splitting), and llhttp refuses it",
    "cl-repeated": "the same Content-Length twice (two lines, or '3, 3'): RFC 9110 section 8.6 "
    "lets a recipient reject it; llhttp does, and the project fails closed on any repeated "
    "framing field",
    "te-http/1.0": "Transfer-Encoding in an HTTP/1.0 answer: RFC 9112 section 6.1, a client "
    "'MUST treat the message as if the framing is faulty'; h11 reads it as chunked",
    "obs-fold": "a folded header line: RFC 9112 section 5.2, a sender MUST NOT generate it; "
    "h11 unfolds it, llhttp (strict) refuses it",
    "bare-lf": "a line ended by LF alone: RFC 9112 section 2.2 only lets a recipient accept "
    "it (MAY); llhttp (strict) does not, h11 does",
    "chunk-size-ws": "whitespace after a chunk size with no extension ('3 '): not chunk syntax "
    "(RFC 9112 section 7.1 allows BWS only before ';'); h11 skips it",
    "chunk-ext-bad": "a chunk extension that is not chunk-ext syntax (RFC 9112 section 7.1.1): "
    "h11 skips whatever follows ';', llhttp refuses it",
    "chunk-ext-bws": "whitespace around ';' or '=' in a chunk extension ('3; a=b'): a sender "
    "MUST NOT generate this BWS (RFC 9110 section 5.6.3), though a recipient is to remove it; "
    "llhttp (strict) refuses it, h11 ignores all after ';' (and refuses it before ';'). The one "
    "shape here where llhttp, not only the sender, strays from the RFC: a 502 for an upstream "
    "breaking a MUST NOT, never another body",
    "trailer-framing": "Content-Length or Transfer-Encoding as a trailer: RFC 9110 section "
    "6.5.1, framing fields cannot be trailers; h11 keeps them aside, http1 refuses",
    "interim-http/1.0": "an interim answer labelled HTTP/1.0: HTTP/1.0 has no 1xx (RFC 9110 "
    "section 15.2) and llhttp takes it as the end of the connection's keep-alive",
}
# Broken shapes that h11 refuses as well: http1 must refuse them too.
REFUSED_BY_BOTH = {
    "te-twice",  # the reported bug (see FOUND)
    "te-not-chunked",
    "cl-conflict",
    "cl-bad",
    "bad-chunk-size",
    "status-below-100",
    "space-before-colon",
}
# Shapes in the body: broken only where there is a body (not in a 204 or 304).
BODY_SHAPES = {
    "bad-chunk-size",
    "chunk-ext-bad",
    "chunk-ext-bws",
    "chunk-size-ws",
    "trailer-framing",
}


# ------------------------------------------------------------------------- the two clients


@dataclass(frozen=True)
class Outcome:
    result: str  # "ok", "refused" or "incomplete" (no end yet and no error)
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    reusable: bool | None = None
    error: type | None = None

    def same_answer(self) -> tuple[Any, ...]:
        return (self.result, self.status, self.headers, self.body)


def first_kept(pairs: list[tuple[bytes, bytes]]) -> tuple[tuple[str, str], ...]:
    """h11's header list as http1 exposes it: lower-case names, the first of a repeated
    name kept."""
    kept: dict[str, str] = {}
    for name, value in pairs:
        key = name.decode("latin-1").lower()
        if key not in kept:
            kept[key] = value.decode("latin-1")
    return tuple(kept.items())


def comparable(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Headers to compare. h11 lower-cases the value of Transfer-Encoding (a coding name is
    case-insensitive, RFC 9112 section 7) where http1 keeps it as sent: compared lower-cased."""
    return tuple(
        (name, value.lower() if name == "transfer-encoding" else value)
        for name, value in headers.items()
    )


def via_h11(pieces: list[bytes], end: str) -> Outcome:
    conn = h11.Connection(our_role=h11.CLIENT)
    conn.send(
        h11.Request(
            method="POST",
            target="/v1/chat/completions",
            headers=[("host", "upstream"), ("content-length", "2")],
        )
    )
    conn.send(h11.Data(data=b"{}"))
    conn.send(h11.EndOfMessage())
    status, headers, body = 0, (), b""
    feeds = [*pieces, b""] if end == "eof" else pieces
    try:
        for piece in feeds:
            conn.receive_data(piece)
            while (event := conn.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Response):
                    status, headers = event.status_code, first_kept(list(event.headers))
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    reusable = conn.their_state is h11.DONE and conn.our_state is h11.DONE
                    return Outcome("ok", status, comparable(dict(headers)), body, reusable)
                elif isinstance(event, h11.ConnectionClosed):
                    return Outcome("refused")
    except h11.RemoteProtocolError:
        return Outcome("refused")
    # A reset ends an answer that is not whole without ending it well.
    return Outcome("refused" if end == "reset" else "incomplete")


async def via_http1(pieces: list[bytes], end: str, stream: bool) -> Outcome:
    pool = Pool(2)
    conn = Connection(pool, ("upstream", 80, False))
    conn.connection_made(FakeTransport())
    pool._all.add(conn)
    conn.send(REQUEST, 0 if stream else LIMIT)
    for piece in pieces:
        if conn.closed:
            break
        conn.data_received(piece)
    if end != "open" and not conn.closed:
        conn.connection_lost(None if end == "eof" else ConnectionResetError(104, "reset"))
    loop = asyncio.get_running_loop()
    try:
        try:
            await conn.wait(loop.time())
            if stream:
                parts = []
                while part := await conn.readany(0):
                    parts.append(part)
                body = b"".join(parts)
            else:
                body = conn.body()
        except UpstreamError as error:
            return Outcome("refused", error=type(error))
        except TimeoutError:
            return Outcome("incomplete")
        return Outcome("ok", conn.status, comparable(conn.headers), body, conn.reusable)
    finally:
        conn.done()
        await pool.close()


def http1_outcome(pieces: list[bytes], end: str, stream: bool) -> Outcome:
    return asyncio.run(via_http1(pieces, end, stream))


# ------------------------------------------------------------------------- answers


@dataclass
class Answer:
    """An upstream answer as bytes, and what was put in it."""

    data: bytes
    version: str = "HTTP/1.1"
    connection: str | None = None
    close_delimited: bool = False
    extra: bytes = b""  # bytes after the answer (a next message, or junk)


names = st.text(TCHAR, min_size=1, max_size=8).filter(lambda n: n.lower() not in SPECIAL)
values = st.tuples(
    st.sampled_from(["", " ", "\t", "  "]),  # OWS before the value
    st.text(VCHAR + " \t", max_size=12),
).map("".join)
random_fields = st.lists(st.tuples(names, values), max_size=4)
few_fields = st.lists(st.tuples(names, values), max_size=2)  # where they are not the point
reasons = st.none() | st.text(VCHAR + " \t", max_size=12)
CONNECTIONS = ["close", "keep-alive", "Close", "Keep-Alive", "close, x-y", "x-y, keep-alive"]


def spelled(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper(), name.title()])


def head(version: str, status: int, reason: str | None, fields: list[tuple[str, str]]) -> list[str]:
    """The head's lines, without their ends."""
    line = f"{version} {status:03d}" + ("" if reason is None else f" {reason}")
    return [line, *(f"{name}:{value}" for name, value in fields), ""]


def joined(lines: list[str], eol: str = "\r\n") -> bytes:
    return "".join(line + eol for line in lines).encode("latin-1")


def chunk_line(draw, size: int) -> str:
    digits = f"{size:x}"
    digits = draw(st.sampled_from([digits, digits.upper(), "0" + digits, "00" + digits]))
    extension = draw(st.sampled_from(["", ";a", ";a=b", ';x="q s"', ";a=1;b", ";A=~"]))
    return digits + extension


@st.composite
def chunked_body(draw, body: bytes, trailers: bool = True) -> tuple[bytes, bytes]:
    """The body in chunks of random sizes; then the last chunk, trailers and the end."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body))), max_size=4))))
    points = [0, *(c for c in cuts if c < len(body)), len(body)]
    chunks = b""
    for a, b in itertools.pairwise(points):
        if b > a:
            chunks += chunk_line(draw, b - a).encode() + b"\r\n" + body[a:b] + b"\r\n"
    fields = draw(random_fields) if trailers and draw(st.booleans()) else []
    last = chunk_line(draw, 0).encode() + b"\r\n" + joined([f"{n}:{v}" for n, v in fields])
    return chunks, last + b"\r\n"


@st.composite
def interims(draw) -> list[bytes]:
    """0 to 2 interim answers (100, 103): always HTTP/1.1, without framing fields."""
    out = []
    for _ in range(draw(st.integers(0, 2))):
        code = draw(st.sampled_from([100, 103]))
        fields = draw(few_fields)
        if code == 103 and draw(st.booleans()):
            fields.append(("Link", " </style.css>; rel=preload"))
        out.append(joined(head("HTTP/1.1", code, draw(reasons), fields)))
    return out


@st.composite
def answers(draw) -> Answer:
    """A well-formed answer: status, random fields, a framing (Content-Length, chunked or
    neither), sometimes a Connection field, a body; sometimes bytes after it."""
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    status = draw(st.sampled_from([200, 204, 304]) | st.integers(200, 599))
    fields = draw(random_fields)
    body = draw(st.binary(max_size=40))
    framings = ["length", "none"] if version == "HTTP/1.0" else ["length", "chunked", "none"]
    framing = draw(st.sampled_from(framings))
    no_body = status in (204, 304)
    payload = b""
    if framing == "length":
        framing_field = (draw(spelled("Content-Length")), f" {len(body)}")
        payload = body
    elif framing == "chunked":
        coding = draw(st.sampled_from(["chunked", "Chunked", "CHUNKED", "chunked ", "\tchunked"]))
        framing_field = (draw(spelled("Transfer-Encoding")), f" {coding}")
        payload = b"".join(draw(chunked_body(body)))
    else:
        framing_field = None
        payload = body
    if framing_field is not None:
        fields.insert(draw(st.integers(0, len(fields))), framing_field)
    connection = draw(st.none() | st.sampled_from(CONNECTIONS))
    if connection is not None:
        fields.insert(draw(st.integers(0, len(fields))), ("Connection", f" {connection}"))
    data = b"".join(draw(interims())) + joined(head(version, status, draw(reasons), fields))
    answer = Answer(data, version, connection, framing == "none" and not no_body)
    if not no_body:
        answer.data += payload
    if not answer.close_delimited:  # bytes after a framed answer are not part of it
        answer.extra = draw(
            st.sampled_from([b"", b"", b"HTTP/1.1 200 OK\r\n\r\n", b"junk", b"\r\n"])
        )
    return answer


@st.composite
def broken_answers(draw, shape: str) -> Answer:
    """An answer with one broken or ambiguous shape in it."""
    version = "HTTP/1.0" if shape == "te-http/1.0" else "HTTP/1.1"
    statuses = [200, 404, 500] if shape in BODY_SHAPES else [200, 200, 404, 500, 204, 304]
    status = draw(st.sampled_from(statuses))
    if shape == "status-below-100":
        status = draw(st.integers(0, 99))
    fields = draw(few_fields)
    body = draw(st.binary(max_size=30))
    chunks, last = draw(chunked_body(body, trailers=False))
    chunked = chunks + last
    te = draw(spelled("Transfer-Encoding"))
    cl = draw(spelled("Content-Length"))
    framing: list[tuple[str, str]] = []
    payload = chunked
    eol = "\r\n"
    if shape == "te-twice":
        other = draw(st.sampled_from(["chunked", "gzip", "identity"]))
        framing = [(te, " chunked"), (te, f" {other}")]
        framing = draw(st.permutations(framing))
        payload = draw(st.sampled_from([chunked, chunks, body]))  # whole, cut short, raw
    elif shape == "te-not-chunked":
        coding = draw(
            st.sampled_from(
                [
                    *("gzip", "identity", "gzip, chunked", "chunked, gzip", "chunked, chunked"),
                    *("chunked;q=1", "x", "chunked,"),
                ]
            )
        )
        framing = [(te, f" {coding}")]
        payload = draw(st.sampled_from([chunked, body]))
    elif shape == "te-http/1.0":
        framing = [(te, " chunked")]
    elif shape == "cl+te":
        framing = list(draw(st.permutations([(te, " chunked"), (cl, f" {len(body)}")])))
        payload = draw(st.sampled_from([chunked, body]))
    elif shape == "cl-repeated":
        n = len(body)
        framing = draw(st.sampled_from([[(cl, f" {n}"), (cl, f" {n}")], [(cl, f" {n}, {n}")]]))
        payload = body
    elif shape == "cl-conflict":
        n, m = len(body), len(body) + draw(st.integers(1, 5))
        pair = draw(st.sampled_from([[(cl, f" {n}"), (cl, f" {m}")], [(cl, f" {n}, {m}")]]))
        framing = list(draw(st.permutations(pair)))
        payload = body
    elif shape == "cl-bad":
        value = draw(st.sampled_from(["+1", "-1", "1.0", "0x1", "", "1 1", "one", "1_0"]))
        framing = [(cl, f" {value}")]
        payload = body
    elif shape == "bad-chunk-size":
        bad = draw(st.sampled_from(["zz", "-1", "0x3", "", "g", "3 ;", "1\x00", "3\x0b"]))
        framing = [(te, " chunked")]
        payload = bad.encode() + b"\r\nabc\r\n" + last
    elif shape == "chunk-ext-bad":
        framing = [(te, " chunked")]
        extension = draw(st.sampled_from([";", ";a=b c", ';a="x', ";a b", ";\x7f", ";a;"]))
        payload = f"3{extension}\r\nabc\r\n".encode() + last
    elif shape == "chunk-ext-bws":
        framing = [(te, " chunked")]
        extension = draw(st.sampled_from(["; a", ";a =b", ";a= b", " ;a", "\t;a=b"]))
        payload = f"3{extension}\r\nabc\r\n".encode() + last
    elif shape == "chunk-size-ws":
        framing = [(te, " chunked")]
        payload = f"{len(body):x}{draw(st.sampled_from([' ', '  ', chr(9)]))}\r\n".encode()
        payload += body + b"\r\n" + last if body else b"\r\n"
    elif shape == "trailer-framing":
        framing = [(te, " chunked")]
        trailer = draw(st.sampled_from([f"{cl}: {len(body)}", f"{te}: chunked", f"{te}: gzip"]))
        payload = chunks + last[: -len(b"\r\n")] + trailer.encode() + b"\r\n\r\n"
    elif shape == "obs-fold":
        framing = [(cl, f" {len(body)}")]
        payload = body
    elif shape == "bare-lf":
        framing = draw(st.sampled_from([[(cl, f" {len(body)}")], [(te, " chunked")]]))
        payload = body if framing[0][0] == cl else chunked
        eol = "\n"
    elif shape == "space-before-colon":
        framing = [(cl + draw(st.sampled_from([" ", "\t"])), f" {len(body)}")]
        payload = body
    elif shape in ("interim-http/1.0", "status-below-100"):
        framing = [(cl, f" {len(body)}")]
        payload = body
    for item in framing:
        fields.insert(draw(st.integers(0, len(fields))), item)
    lines = head(version, status, draw(reasons), fields)
    if shape == "obs-fold":
        at = draw(st.integers(1, len(lines) - 1))  # after the status line, before the end
        lines.insert(at, draw(st.sampled_from([" folded", "\tfolded", "  x"])))
    if eol == "\n":  # one line of the head, or every one, ended by LF alone
        everywhere = draw(st.booleans())
        which = draw(st.integers(0, len(lines) - 1))
        data = b"".join(
            (line + ("\n" if everywhere or i == which else "\r\n")).encode("latin-1")
            for i, line in enumerate(lines)
        )
    else:
        data = joined(lines)
    prefix = b"".join(draw(interims()))
    if shape == "interim-http/1.0":
        prefix += joined(head("HTTP/1.0", draw(st.sampled_from([100, 103])), "Early", []))
    return Answer(prefix + data + payload, version)


@st.composite
def deliveries(draw, answer: Answer, may_cut: bool) -> tuple[list[bytes], str, bool, int | None]:
    """How the answer arrives: pieces (random read boundaries), how the connection ends
    ("open": not yet, "eof": closed by the upstream, "reset"), collected or streamed, and
    where it was cut short (None: whole)."""
    data = answer.data
    cut = None
    if may_cut and data and draw(st.integers(0, 3)) == 0:
        cut = draw(st.integers(0, len(data) - 1))
        data = data[:cut]
    else:
        data += answer.extra
    points = draw(st.lists(st.integers(0, len(data)), max_size=6))
    edges = sorted({0, len(data), *points})
    pieces = [data[a:b] for a, b in itertools.pairwise(edges) if b > a]
    ends = ["eof", "eof", "reset", "open"] if answer.close_delimited or cut is not None else None
    end = draw(st.sampled_from(ends or ["open", "open", "eof", "reset"]))
    return pieces, end, draw(st.booleans()), cut


# ------------------------------------------------------------------------- the checks

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SETTINGS
@given(st.data())
def test_well_formed_answers_read_alike(data):
    answer = data.draw(answers(), label="answer")
    pieces, end, stream, cut = data.draw(deliveries(answer, may_cut=True), label="delivery")
    theirs = via_h11(pieces, end)
    ours = http1_outcome(pieces, end, stream)
    assert ours.same_answer() == theirs.same_answer()
    if ours.result == "refused":
        # cut short, or ended by a reset: never complete, never "invalid"
        assert ours.error is Disconnected, (cut, end)
    if ours.result == "ok" and end == "open" and not answer.extra:
        # h11 keeps no HTTP/1.0 connection alive; llhttp keeps one whose answer says
        # "Connection: keep-alive", as RFC 9112 section 9.3 allows.
        said = (answer.connection or "").lower()
        kept_alive_1_0 = answer.version == "HTTP/1.0" and "keep-alive" in said
        assert ours.reusable == (theirs.reusable or kept_alive_1_0)


@pytest.mark.parametrize("shape", sorted(LENIENT_H11.keys() | REFUSED_BY_BOTH))
@settings(SETTINGS, max_examples=30)
@given(data=st.data())
def test_broken_and_ambiguous_answers_are_refused(shape, data):
    answer = data.draw(broken_answers(shape), label="answer")
    pieces, end, stream, _ = data.draw(deliveries(answer, may_cut=False), label="delivery")
    theirs = via_h11(pieces, end)
    ours = http1_outcome(pieces, end, stream)
    assert ours.result == "refused" and ours.error is InvalidResponse, ours
    if theirs.result != "refused":
        assert shape in LENIENT_H11, theirs


# The shapes the differential test found, as fixed examples: http1 refuses each at the head
# (before it gives out a byte of the body), whatever follows.
CHUNKED_CUT = b"3\r\nabc\r\n"
FOUND = {
    # the reported bug: llhttp went by the last Transfer-Encoding (chunked), the client's dict
    # by the first (gzip: to the end of the connection); a chunked body cut short by a close
    # was passed on whole, as a 200
    "te-gzip-then-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED_CUT,
    "te-chunked-then-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: gzip\r\n\r\nabc",
    "te-chunked-twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    # a transfer coding other than chunked was read to the end of the connection and passed on
    "te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "te-gzip-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    + CHUNKED_CUT
    + b"0\r\n\r\n",
    # HTTP/1.0 with Transfer-Encoding: faulty framing (RFC 9112 section 6.1)
    "te-http/1.0": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    # a framing field as a trailer was ignored
    "te-trailer": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    b"Transfer-Encoding: gzip\r\n\r\n",
    # a status code below 100 was waited on as an interim answer, until the deadline
    "status-000": b"HTTP/1.1 000 X\r\nContent-Length: 1\r\n\r\nx",
}


@pytest.mark.parametrize("answer", FOUND.values(), ids=FOUND.keys())
@pytest.mark.parametrize("end", ["open", "eof"])
def test_the_shapes_found_are_refused_as_invalid(answer, end):
    ours = http1_outcome([answer], end, stream=False)
    assert (ours.result, ours.error) == ("refused", InvalidResponse)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}junk",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 200 OK\r\n\r\n",
    ],
)
def test_what_follows_a_whole_answer_does_not_spoil_it(answer):
    """Bytes after a complete answer that ends the connection: llhttp refuses them outright,
    and http1 took that for a broken answer; the answer is whole (h11 agrees)."""
    ours = http1_outcome([answer], "open", stream=False)
    assert ours.same_answer() == via_h11([answer], "open").same_answer()
    assert (ours.result, ours.body, ours.reusable) == ("ok", b"{}", False)


def test_trailing_whitespace_is_not_part_of_a_value():
    answer = b"HTTP/1.1 200 OK\r\nRetry-After: 5 \t\r\nContent-Length: 0\r\n\r\n"
    ours = http1_outcome([answer], "open", stream=False)
    assert dict(ours.headers)["retry-after"] == "5"
