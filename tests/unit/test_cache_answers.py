"""ResponseCache's lookup with fake tiers: following a leader within the request's deadline."""

from __future__ import annotations

import asyncio

import pytest

from edge.cache import entry as entries
from edge.cache.answers import COALESCED, MISS, ResponseCache
from edge.cache.flights import FOLLOWER, LEADER
from edge.config import Config
from edge.errors import GatewayTimeout
from edge.observability.context import RequestContext
from edge.routing.exchange import Call
from edge.routing.providers import Providers


class Store:
    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}
        self.evictions = 0

    def get(self, key: bytes) -> bytes | None:
        return self.values.get(key)

    def put(self, key: bytes, value: bytes) -> bool:
        self.values[key] = value
        return True


class Flights:
    """Someone else leads every key, until `leading` is set False."""

    def __init__(self, role: int = FOLLOWER) -> None:
        self.role = role
        self.leading_now = True

    def claim(self, key: bytes) -> tuple[int, int]:
        return (self.role, 7 if self.role == LEADER else 0)

    def leading(self, key: bytes) -> bool:
        return self.leading_now

    def release(self, key: bytes, token: int) -> None:
        self.leading_now = False


def cache(store: Store, flights: Flights, timeout: str) -> ResponseCache:
    config = Config.from_env(
        {"API_KEYS": "k", "CACHE_BACKEND": "local", "SERVER_TIMEOUT_SECONDS": timeout}
    )
    return ResponseCache(config, Providers.builtin_mock(), store, flights)


def call(stream: bool = False) -> Call:
    data = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return Call("openai", "POST", "/chat/completions", b"{}", data, "m", stream)


def test_a_follower_whose_leader_never_answers_gets_504_at_the_request_deadline():
    answers = cache(Store(), Flights(), "0.2")
    with pytest.raises(GatewayTimeout):
        asyncio.run(answers.lookup(RequestContext("r", None), call(), None))


def test_a_follower_whose_leader_let_go_goes_upstream_within_what_is_left():
    flights = Flights()
    answers = cache(Store(), flights, "30")
    asked = call()

    async def run():
        asyncio.get_running_loop().call_later(0.05, setattr, flights, "leading_now", False)
        return await answers.lookup(RequestContext("r", None), asked, None)

    found = asyncio.run(run())
    assert found.result == MISS and found.token == 0  # no leadership of its own
    assert asked.deadline is not None  # the router gets the rest of the 30 s, not 30 s more


def test_a_follower_gets_the_answer_the_leader_stored():
    store, flights = Store(), Flights()
    answers = cache(store, flights, "30")
    ctx = RequestContext("r", None)

    async def run():
        def store_it():
            lead = answers._route(call())  # the same key the follower computes
            from edge.cache.key import cache_key

            key = cache_key("addr:unknown", lead, "", call().data)
            fresh = entries.Entry(0.0, 0.0, 200, "application/json", False, [b"{}"], 1, 2)
            fresh.created = answers._clock()
            fresh.expires = fresh.created + 60
            store.values[key] = entries.encode(fresh)

        asyncio.get_running_loop().call_later(0.05, store_it)
        return await answers.lookup(ctx, call(), None)

    found = asyncio.run(run())
    assert found.result == COALESCED and found.entry is not None
    assert ctx.upstream is not None and ctx.upstream.waited_s > 0


def test_a_stream_follows_a_leader_for_a_short_while_only():
    """A stream's leader stores it once its own client has read it all: its followers wait
    FOLLOW_STREAM_S at most (here the request deadline is shorter still)."""
    answers = cache(Store(), Flights(), "0.2")
    with pytest.raises(GatewayTimeout):
        asyncio.run(answers.lookup(RequestContext("r", None), call(stream=True), None))


def test_a_whole_answer_ends_its_leadership_when_handed_over_not_when_read(tmp_path):
    """A 200 over SEND_PIECE_BYTES is sent in pieces, at the client's pace, and (over
    CACHE_MAX_ENTRY_BYTES) not stored: its leadership must not wait for a slow client, or
    every identical request would follow it until its deadline."""
    import types

    import orjson

    from edge import pipeline
    from edge.cache.answers import LocalFlights
    from edge.cache.local import LocalStore
    from edge.routing.exchange import Answer

    store = LocalStore.open(str(tmp_path / "s"), 64 << 20)
    flights = LocalFlights()
    answers = ResponseCache(
        Config.from_env({"API_KEYS": "k", "CACHE_BACKEND": "local"}),
        Providers.builtin_mock(),
        store,
        flights,
    )
    big = b'{"data":[' + b"1," * (600 * 1024) + b"1]}"
    assert len(big) > pipeline.SEND_PIECE_BYTES and len(big) > answers.max_entry_bytes

    class Router:
        async def exchange(self, ctx, call):
            return Answer(200, big, "application/json", {}, data={"data": []})

    runtime = types.SimpleNamespace(cache=answers, tokens=None, router=Router())
    ctx = RequestContext("r", None)
    req = types.SimpleNamespace(
        context=types.SimpleNamespace(edge=ctx),
        scope={"edge.protocol_watches": True},
        receive=None,
        get_header=lambda name: None,
    )

    class Resp:
        stream = data = status = content_type = content_length = None

        def set_header(self, name, value):
            pass

    resp = Resp()
    data = {"model": "m", "input": ["x"]}
    asked = Call("openai", "POST", "/embeddings", orjson.dumps(data), data, "m", False)

    async def run():
        claimed = []
        real_claim = flights.claim
        flights.claim = lambda key: claimed.append(key) or real_claim(key)
        await pipeline.run(runtime, req, resp, asked)
        await asyncio.sleep(0.01)  # a queued write has been flushed
        return claimed[0]

    key = asyncio.run(run())
    assert isinstance(resp.stream, pipeline.ResponseStream)  # still to be read by its client
    assert store.get(key) is None and not flights.leading(key)
    store.close()


def test_a_worker_whose_store_cannot_open_serves_without_the_cache(monkeypatch, caplog):
    """Not even a fresh store (a full disk, say): the worker serves, uncached, and says so."""
    from edge.cache import local
    from edge.runtime import Runtime

    def refuse(cls, path, max_bytes):
        raise OSError("cannot make a local cache store: No space left on device")

    monkeypatch.setattr(local.LocalStore, "open", classmethod(refuse))
    runtime = Runtime.build(Config.from_env({"API_KEYS": "k", "CACHE_BACKEND": "local"}))
    assert runtime.cache is None
    assert "serves without it" in caplog.text
