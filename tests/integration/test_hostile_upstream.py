"""A broken or hostile upstream, scripted byte for byte on raw sockets, in front of real
gunicorn: ambiguous framing fails closed and is the provider's failure, error bodies pass only
their envelope, and whole answers too large to hold at once get 503 instead of the worker's
memory."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from support import Gunicorn, children, rss_kb

KEY = "sk-hostile-upstream-4e0c"
USER = [{"role": "user", "content": "hi"}]


class RawUpstream:
    """Answers every request on a fresh connection with `script(request_body)`: the bytes to
    write, or a list of pieces written 0.2 s apart (then the connection closes), in a thread of
    its own with its own event loop."""

    def __init__(self, script: Callable[[bytes], bytes | list[bytes]]) -> None:
        self.script = script
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, sock=self._sock))
        ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            self.requests += 1
            pieces = self.script(body)
            for index, piece in enumerate([pieces] if isinstance(pieces, bytes) else pieces):
                if index:
                    await asyncio.sleep(0.2)
                writer.write(piece)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def answer(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body


def start(tmp_path: Path, upstream: RawUpstream, **env: str) -> Gunicorn:
    path = tmp_path / "providers.toml"
    path.write_text(
        f'[providers.raw]\nbase_url = "{upstream.url}"\n'
        '[[models]]\nname = "*"\ntargets = [{ provider = "raw" }]\n'
        "[routing.circuit_breaker]\nfailure_threshold = 2\ntimeout_seconds = 60\n"
    )
    env.setdefault("RATE_LIMIT_ENABLED", "false")
    return Gunicorn(API_KEYS=KEY, PROVIDERS_FILE=str(path), **env)


def post(server: Gunicorn, **body: object) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "m", "messages": USER, **body},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30,
    )


def assert_open(server: Gunicorn) -> None:
    """The provider's one target is open: not ready (no provider can serve), gauge at 1."""
    assert httpx.get(server.url + "/health/ready").status_code == 503
    metrics = httpx.get(server.url + "/metrics").text
    assert 'edge_provider_breaker_state{provider="raw"} 1.0' in metrics


@pytest.fixture
def cleanup() -> Iterator[list]:
    things: list = []
    yield things
    for thing in reversed(things):
        thing.stop()


def test_two_transfer_encodings_are_refused_and_count_against_the_provider(tmp_path, cleanup):
    """The first Transfer-Encoding says gzip, the second chunked: read by the first, the
    connection's end would end the body (a cut body passed on as whole); read by the last,
    chunked. Either way it is 502, never a 200, and a failure of the provider's."""
    upstream = RawUpstream(
        lambda body: answer(
            "HTTP/1.1 200 OK\nContent-Type: application/json\nTransfer-Encoding: gzip\n"
            "Transfer-Encoding: chunked",
            b'9\r\n{"id": "x\r\n',
        )
    )
    cleanup.append(upstream)
    server = start(tmp_path, upstream)
    cleanup.append(server)
    for _ in range(2):
        response = post(server)
        assert response.status_code == 502, response.text
        assert response.json()["error"]["type"] == "upstream_error"
    assert_open(server)


def test_a_stream_whose_framing_breaks_mid_way_ends_with_the_error_event(tmp_path, cleanup):
    """Two whole events, then a chunk size that is not hexadecimal: the stream ends with the
    OpenAI error event on an event boundary, and the provider's breaker counts it."""
    event = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
    chunk = b"%x\r\n%s\r\n" % (len(event), event)
    upstream = RawUpstream(
        lambda body: [
            answer(
                "HTTP/1.1 200 OK\nContent-Type: text/event-stream\nTransfer-Encoding: chunked",
                chunk + chunk,
            ),
            b"zz\r\nnot a chunk\r\n",
        ]
    )
    cleanup.append(upstream)
    server = start(tmp_path, upstream)
    cleanup.append(server)
    for _ in range(2):
        response = post(server, stream=True)
        assert response.status_code == 200
        lines = [line for line in response.text.split("\n\n") if line]
        assert lines[:2] == [event.decode().strip()] * 2
        assert json.loads(lines[2][6:])["error"]["code"] == "upstream_invalid"
    assert_open(server)


def test_upstream_error_bodies_pass_only_their_envelope(tmp_path, cleanup):
    envelope = {"message": "Model overloaded.", "type": "server_error", "param": None,
                "code": "overloaded"}  # fmt: skip
    error = {**envelope, "internal_host": "gpu-node-17.corp.internal", "trace": ["a", "b"]}
    body = json.dumps({"error": error, "debug": {"host": "gpu-node-17.corp.internal"}})
    upstream = RawUpstream(
        lambda _: answer(
            f"HTTP/1.1 503 Service Unavailable\nContent-Type: application/json\n"
            f"Content-Length: {len(body)}",
            body.encode(),
        )
    )
    cleanup.append(upstream)
    server = start(tmp_path, upstream)
    cleanup.append(server)
    response = post(server)
    assert response.status_code == 503
    assert response.json() == {"error": envelope}
    assert "corp.internal" not in response.text
    anthropic = httpx.post(
        server.url + "/v1/messages",
        json={"model": "m", "max_tokens": 5, "messages": USER},
        headers={"x-api-key": KEY},
        timeout=30,
    )
    # The provider is of kind "openai": its error reaches an Anthropic client translated, in
    # Anthropic's shape, with the same message and nothing else of the body.
    assert anthropic.status_code == 503
    assert anthropic.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Model overloaded."},
    }
    assert "corp.internal" not in anthropic.text


def test_large_answers_at_once_are_bounded_by_the_buffer_budget(tmp_path, cleanup):
    """Twenty concurrent answers of 30 MiB to one worker: each is answered 200 or 503, never
    a 500 or a hang, and the worker stays under 512 MB."""
    size = 30 * 1024 * 1024
    padding = b"x" * (size - 200)
    payload = b'{"object": "list", "data": "' + padding + b'", "usage": {"prompt_tokens": 1, '
    payload += b'"total_tokens": 1}}'
    whole = answer(
        f"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: {len(payload)}",
        payload,
    )
    upstream = RawUpstream(lambda _: whole)
    cleanup.append(upstream)
    server = start(tmp_path, upstream, WORKERS="1")
    cleanup.append(server)
    worker = children(server.pid)[0]
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kb(worker))
            time.sleep(0.01)

    async def fetch(http: httpx.AsyncClient) -> tuple[int, int]:
        async with http.stream(
            "POST",
            server.url + "/v1/embeddings",
            json={"model": "m", "input": "hi"},
            headers={"authorization": f"Bearer {KEY}"},
        ) as response:
            received = 0
            async for chunk in response.aiter_raw():
                received += len(chunk)
            return response.status_code, received

    async def run() -> list[tuple[int, int]]:
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(fetch(http) for _ in range(20)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = asyncio.run(run())
    finally:
        done.set()
        watcher.join()
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1
    assert all(received == len(payload) for status, received in results if status == 200)
    assert peak < 512 * 1024, f"worker RSS peaked at {peak // 1024} MB"
