"""Request ids without a syscall: a per-process random prefix and a counter."""

from __future__ import annotations

import os
import re

from edge.observability.context import RequestContext, new_request_id, sane_request_id

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def test_ids_are_32_hex_digits_and_unique():
    ids = [new_request_id() for _ in range(10_000)]
    assert all(HEX32.match(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert sane_request_id(None) != sane_request_id(None)
    assert sane_request_id("client-id-1") == "client-id-1"


def test_a_forked_worker_gets_its_own_prefix():
    read_fd, write_fd = os.pipe()
    parent = new_request_id()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.write(write_fd, new_request_id().encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    ours = new_request_id()  # what the child would have made without a key of its own
    try:
        theirs = os.read(read_fd, 64).decode()
    finally:
        os.close(read_fd)
        os.waitpid(child, 0)
    assert HEX32.match(theirs)
    assert theirs not in (parent, ours)  # a new key after fork, not the parent's


def test_trace_ids_are_valid_w3c_ids():
    started = RequestContext("r", None)
    started.set_trace(None, None, start_new=True)
    assert started.traceparent_out is not None
    assert re.match(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$", started.traceparent_out)
    adopted = RequestContext("r", None)
    adopted.set_trace("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None, False)
    assert adopted.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    span = adopted.traceparent_out.split("-")[2]
    assert re.match(r"^[0-9a-f]{16}$", span) and span != "00f067aa0ba902b7"
    off = RequestContext("r", None)
    off.set_trace(None, None, start_new=False)
    assert off.trace_id is None and off.traceparent_out is None
