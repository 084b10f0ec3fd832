"""`max_parallel` end to end (#25): real gunicorn with three workers, a real upstream that
answers slowly or streams slowly, the official openai SDK. A key's requests in flight are
counted host-wide: beyond its cap, 429 `too_many_parallel_requests` with retry-after, while
other keys go on; a stream holds its place until its last byte or its client hanging up; a
worker SIGKILLed mid-request gives its places back; a bad `max_parallel` stops the start naming
the key and the field, and on HUP is refused while the running keys stay."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support import Gunicorn, Upstream, metric_total, sdk_client, wait_until

from edge.ratelimit.parallel import SharedParallel

CAPPED = "sk-parallel-capped-5b1e"  # max_parallel = 3
FREE = "sk-parallel-free-90c2"  # no cap
SINGLE = "sk-parallel-single-4d7a"  # max_parallel = 1
KILLED = "sk-parallel-killed-e83f"  # max_parallel = 2
KEYS = f"""
[[keys]]
name = "capped"
key = "{CAPPED}"
max_parallel = 3

[[keys]]
name = "free"
key = "{FREE}"

[[keys]]
name = "single"
key = "{SINGLE}"
max_parallel = 1

[[keys]]
name = "killed"
key = "{KILLED}"
max_parallel = 2
"""
SLOW_S = 8.0  # the upstream's "slow" model answers after this long
PACE_S = 0.4  # and "paced-N" streams N chunks this far apart
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream():
    server = Upstream("--slow", str(SLOW_S), "--pace", str(PACE_S))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, upstream):
    keys = tmp_path_factory.mktemp("parallel") / "keys.toml"
    keys.write_text(KEYS)
    server = Gunicorn(
        WORKERS="3",
        API_KEYS_FILE=str(keys),
        UPSTREAM_URL=upstream.url + "/v1",
        UPSTREAM_API_KEY="sk-up",
        RATE_LIMIT_BURST="1000",
    )
    server.keys_path = keys  # type: ignore[attr-defined]
    yield server
    server.stop()


def quick(proxy: Gunicorn, key: str) -> bool:
    """Whether one quick request of `key` is admitted (False: refused at its cap)."""
    try:
        sdk_client(proxy.url, key).chat.completions.create(model="gpt-x", messages=HI)
    except openai.RateLimitError as refused:
        assert refused.code == "too_many_parallel_requests"
        return False
    return True


def open_stream(proxy: Gunicorn, key: str, model: str = "paced-1000") -> Any:
    """A streamed chat, its head and first event read and the rest left unread; the response
    (close it to hang up), or the 429 response when refused."""
    client = httpx.Client(timeout=20)
    request = client.build_request(
        "POST",
        proxy.url + "/v1/chat/completions",
        json={"model": model, "messages": HI, "stream": True},
        headers={"authorization": f"Bearer {key}"},
    )
    response = client.send(request, stream=True)
    response.client = client  # type: ignore[attr-defined]
    if response.status_code == 200:
        # Kept: an iterator dropped unfinished closes the response (a hang-up).
        response.events = response.iter_raw()  # type: ignore[attr-defined]
        next(response.events)  # type: ignore[attr-defined]  # the upstream streams to it
    else:
        response.read()
    return response


def hang_up(response: Any) -> None:
    response.close()
    response.client.close()


def stream_refused(proxy: Gunicorn, key: str) -> bool:
    """Whether a stream of `key` is refused at its cap now (one admitted is hung up)."""
    response = open_stream(proxy, key)
    hang_up(response)
    if response.status_code == 429:
        assert response.json()["error"]["code"] == "too_many_parallel_requests"
    return response.status_code == 429


def test_concurrent_slow_requests_beyond_the_cap_get_429(proxy, upstream):
    cap, extra = 3, 3
    before = sum(1 for entry in upstream.log() if entry.get("model") == "slow")
    results: list[Any] = [None] * (cap + extra)

    def call(index: int) -> None:
        client = sdk_client(proxy.url, CAPPED, timeout=30)
        try:
            results[index] = client.chat.completions.create(model="slow", messages=HI)
        except openai.RateLimitError as refused:
            results[index] = refused

    with ThreadPoolExecutor(cap + extra) as pool:
        started = time.monotonic()
        futures = [pool.submit(call, index) for index in range(cap + extra)]
        # The refused come back at once, the admitted only when the upstream answers.
        wait_until(
            lambda: sum(isinstance(r, openai.RateLimitError) for r in results) == extra,
            timeout=SLOW_S,
        )
        assert time.monotonic() - started < SLOW_S  # all decided while the admitted were held
        assert not any(isinstance(r, openai.types.chat.ChatCompletion) for r in results)
        # Another key is not affected, nor is a request of this one elsewhere in the API.
        assert quick(proxy, FREE)
        assert quick(proxy, SINGLE)
        for future in futures:
            future.result(timeout=SLOW_S + 20)
    admitted = [r for r in results if isinstance(r, openai.types.chat.ChatCompletion)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert (len(admitted), len(refused)) == (cap, extra)
    assert sum(1 for entry in upstream.log() if entry.get("model") == "slow") - before == cap
    for error in refused:
        assert error.status_code == 429 and error.code == "too_many_parallel_requests"
        assert error.type == "rate_limit_error"
        assert f"{cap} requests in flight" in error.message and "max_parallel" in error.message
        assert error.response.headers["retry-after"] == "1"
        assert error.response.headers["retry-after-ms"] == "1000"
    assert metric_total(proxy, "edge_parallel_limited_total") >= extra
    # They have ended: the key is admitted again, up to its cap at once.
    wait_until(lambda: quick(proxy, CAPPED))
    streams = [open_stream(proxy, CAPPED) for _ in range(cap)]
    try:
        assert [s.status_code for s in streams] == [200] * cap
    finally:
        for stream in streams:
            hang_up(stream)


def test_a_stream_holds_its_place_until_its_end_or_its_client_leaves(proxy):
    chunks = 8  # PACE_S apart: a stream of about 3 s
    stream = sdk_client(proxy.url, SINGLE, timeout=30).chat.completions.create(
        model=f"paced-{chunks}", messages=HI, stream=True
    )
    events = iter(stream)
    next(events)
    assert not quick(proxy, SINGLE)  # mid-stream: its place is held
    assert quick(proxy, FREE)
    assert sum(1 for _ in events) >= chunks - 1  # read to its end
    stream.close()
    wait_until(lambda: quick(proxy, SINGLE))  # given back with its last byte
    # A client that hangs up mid-stream gives its place back too.
    held = open_stream(proxy, SINGLE)
    assert held.status_code == 200
    assert stream_refused(proxy, SINGLE)
    hang_up(held)
    wait_until(lambda: quick(proxy, SINGLE))


def connection_owner(pids: list[int], server_port: int, client_port: int) -> int | None:
    """Which of `pids` holds the accepted TCP connection from 127.0.0.1:`client_port` to
    `server_port` (from /proc/net/tcp and the processes' descriptors)."""
    inode = None
    wanted = (f"{server_port:04X}", f"{client_port:04X}")
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                local, remote = fields[1].rsplit(":", 1)[1], fields[2].rsplit(":", 1)[1]
                if (local, remote) == wanted:
                    inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in descriptors:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def held_in_table(proxy: Gunicorn, name: str) -> int:
    """The key `name`'s requests in flight as the host-wide table says (read from outside)."""
    (path,) = Path("/dev/shm").glob(f"llm-edge-proxy.test{proxy.port}.parallel.*")
    table = SharedParallel.attach(path.name)
    try:
        return table.in_flight(table.digest(name))
    finally:
        table.close()


def test_a_worker_killed_mid_request_gives_its_places_back(proxy):
    cap = 2
    streams = [open_stream(proxy, KILLED) for _ in range(cap)]
    assert [s.status_code for s in streams] == [200] * cap
    assert stream_refused(proxy, KILLED)
    assert held_in_table(proxy, "killed") == cap
    workers = proxy.worker_pids()
    owners = []
    for stream in streams:
        port = stream.extensions["network_stream"].get_extra_info("client_addr")[1]
        owners.append(connection_owner(workers, proxy.port, port))
    assert all(owner in workers for owner in owners), owners
    victim = owners[0]
    lost = owners.count(victim)  # its streams die with it; the others keep their places
    os.kill(victim, signal.SIGKILL)
    survivors = [s for s, owner in zip(streams, owners, strict=True) if owner != victim]
    opened: list[Any] = []
    try:
        # No request is made meanwhile: the master, reaping the worker, frees its places.
        wait_until(lambda: held_in_table(proxy, "killed") == cap - lost, timeout=30)
        wait_until(lambda: "their keys' places are given back" in proxy.output())
        for stream, owner in zip(streams, owners, strict=True):
            if owner == victim:
                hang_up(stream)
        # Exactly `lost` places are free; the survivors' are still held.
        for _ in range(lost):
            opened.append(open_stream(proxy, KILLED))
            assert opened[-1].status_code == 200
        assert stream_refused(proxy, KILLED)
        for stream in survivors:  # a survivor's stream still flows
            assert next(stream.events)
    finally:
        for stream in opened + survivors:
            hang_up(stream)
    proxy.wait_ready()  # gunicorn has replaced the worker
    # Every place is free: the full cap is admitted at once again.
    wait_until(lambda: held_in_table(proxy, "killed") == 0)
    streams = [open_stream(proxy, KILLED) for _ in range(cap)]
    try:
        assert [s.status_code for s in streams] == [200] * cap
        assert stream_refused(proxy, KILLED)
    finally:
        for stream in streams:
            hang_up(stream)


@pytest.mark.parametrize("value", ["0", "-2", '"8"', "1.5"])
def test_a_bad_max_parallel_stops_the_start_naming_key_and_field(tmp_path, upstream, value):
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "team"\nkey = "{CAPPED}"\nmax_parallel = {value}\n')
    server = Gunicorn(wait=False, API_KEYS_FILE=str(keys), UPSTREAM_URL=upstream.url + "/v1")
    try:
        assert server.proc.wait(30) != 0
        output = server.output()
        assert "'team'" in output and "max_parallel" in output and CAPPED not in output
    finally:
        server.stop()


def test_a_bad_max_parallel_on_hup_keeps_the_running_keys(proxy):
    keys: Path = proxy.keys_path  # type: ignore[attr-defined]
    good = keys.read_text()
    old_workers = set(proxy.worker_pids())
    try:
        keys.write_text(good.replace("max_parallel = 1\n", "max_parallel = 0\n"))
        proxy.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in proxy.output())
        # gunicorn replaces the workers whatever the load said: wait for the new ones.
        wait_until(lambda: not old_workers & set(proxy.worker_pids()), timeout=30)
        proxy.wait_ready()
        line = next(line for line in proxy.output().splitlines() if "reload refused" in line)
        assert "'single'" in line and "max_parallel" in line
        held = open_stream(proxy, SINGLE)  # still capped at 1
        try:
            assert held.status_code == 200
            assert not quick(proxy, SINGLE)
            assert quick(proxy, FREE)
        finally:
            hang_up(held)
        wait_until(lambda: quick(proxy, SINGLE))
    finally:
        keys.write_text(good)


def test_threads_hammering_one_key_never_get_more_than_the_cap(proxy, upstream):
    """Many clients at once, in every worker: the upstream never sees more of the key's
    requests at once than its cap (the upstream's own count of streams in flight)."""
    cap = 3
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            stats = upstream.stats()
            open_now = stats["streams_started"] - stats["streams_finished"]
            open_now -= stats.get("streams_cancelled", 0)
            peak = max(peak, open_now)
            time.sleep(0.02)

    def client(_: int) -> int:
        admitted = 0
        for _ in range(4):
            try:
                stream = sdk_client(proxy.url, CAPPED, timeout=30).chat.completions.create(
                    model="paced-3", messages=HI, stream=True
                )
                for _ in stream:
                    pass
                admitted += 1
            except openai.RateLimitError:
                time.sleep(0.05)
        return admitted

    # Only this test's streams run now (the other tests' have ended or been hung up).
    wait_until(
        lambda: (
            (lambda s: s["streams_started"] - s["streams_finished"] - s["streams_cancelled"])(
                upstream.stats()
            )
            == 0
        ),
        timeout=30,
    )
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            admitted = sum(pool.map(client, range(8)))
    finally:
        done.set()
        watcher.join(5)
    assert admitted >= cap  # some got through
    assert 1 <= peak <= cap


def test_with_the_redis_backend_the_cap_is_still_host_wide(upstream):
    """Rate limits in Redis, requests in flight in this host's shared memory: an API_KEYS key
    capped by KEY_MAX_PARALLEL is refused beyond it, whichever worker answers."""
    from support import RedisServer

    redis = RedisServer()
    server = Gunicorn(
        API_KEYS=SINGLE,
        KEY_MAX_PARALLEL="1",
        RATE_LIMIT_BACKEND="redis",
        REDIS_URL=redis.url,
        UPSTREAM_URL=upstream.url + "/v1",
    )
    try:
        held = open_stream(server, SINGLE)
        try:
            assert held.status_code == 200
            assert all(stream_refused(server, SINGLE) for _ in range(4))
        finally:
            hang_up(held)
        wait_until(lambda: quick(server, SINGLE))
    finally:
        server.stop()
        redis.stop()
