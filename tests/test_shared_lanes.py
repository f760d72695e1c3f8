"""Lanes (one upstream model on one key) shared through Redis like the keys' own state:
several routers in one trio run on a real loopback redis-server (started here), with a
custom provider scripted per (key, upstream model). Real clock, short times."""

from __future__ import annotations

import json
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from test_shared import RedisServer

from router import (
    ApiKey,
    ChainExhaustedError,
    ChatRequest,
    ChatResponse,
    LaneSnapshot,
    Message,
    ProviderError,
    Router,
    RouterConfig,
    RouterError,
)


class LaneProvider:
    """A custom provider whose calls follow a script per (key id, upstream model): each
    scripted error is raised once, in order; otherwise it answers."""

    def __init__(self, fail_always: ProviderError | None = None) -> None:
        self.scripts: dict[tuple[str, str], deque[ProviderError]] = defaultdict(deque)
        self.calls: list[tuple[str, str]] = []
        self.times: list[tuple[float, str, str]] = []
        """(trio time, key id, model) of each call."""
        self.fail_always = fail_always
        """Raised by every call to key k1 (a key-wide failure, say)."""

    def script(self, key_id: str, model: str, *errors: ProviderError) -> None:
        self.scripts[key_id, model].extend(errors)

    def calls_to(self, key_id: str, model: str) -> int:
        return self.calls.count((key_id, model))

    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse:
        self.calls.append((key.id, request.model))
        self.times.append((trio.current_time(), key.id, request.model))
        queue = self.scripts[key.id, request.model]
        if queue:
            raise queue.popleft()
        if self.fail_always is not None and key.id == "k1":
            raise self.fail_always
        return ChatResponse(content=f"ok from {key.id}")


def rate_limited() -> ProviderError:
    return ProviderError("rate_limit", "scripted 429", retry_after=30.0, status=429)


def unavailable() -> ProviderError:
    return ProviderError("transient", "scripted 503", status=503)


def _config(
    port: int,
    prefix: str,
    *,
    failure_threshold: int = 3,
    open_for: float = 30.0,
    lanes_per_key: int = 256,
    success_threshold: int = 1,
) -> RouterConfig:
    return RouterConfig.from_toml(f"""
[router]
transient_retries = 0
rate_limit_wait = 0
lanes_per_key = {lanes_per_key}
[router.breaker]
failure_threshold = {failure_threshold}
minimum_calls = 1000
open_for = {open_for}
jitter = 0.0
success_threshold = {success_threshold}
[router.shared]
redis_url = "redis://127.0.0.1:{port}/0"
key_prefix = "{prefix}"
timeout = 0.3
ping_interval = 0.1
probe_lease = 1.0
[[providers]]
name = "c"
kind = "custom"
keys = [{{ id = "k1" }}, {{ id = "k2" }}]
""")


def request(upstream: str) -> ChatRequest:
    return ChatRequest(model=f"c/{upstream}", messages=[Message(role="user", content="hi")])


def lane(router: Router, key_id: str, upstream: str) -> LaneSnapshot | None:
    key = next(k for k in router.snapshot().keys if k.key_id == key_id)
    return next((x for x in key.lanes if x.model == upstream), None)


def cooling(router: Router, key_id: str, upstream: str) -> float:
    found = lane(router, key_id, upstream)
    return 0.0 if found is None else found.cooling_for


def breaker(router: Router, key_id: str, upstream: str) -> str:
    found = lane(router, key_id, upstream)
    return "closed" if found is None else found.breaker


def key_state(router: Router, key_id: str) -> tuple[str, float]:
    key = next(k for k in router.snapshot().keys if k.key_id == key_id)
    return key.breaker, key.cooling_for


async def wait_until(check: Callable[[], bool], tries: int = 200) -> None:
    """Poll `check` every 10 ms until it holds (fails after `tries` polls)."""
    for _ in range(tries):
        if check():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"not within {tries} polls")


@asynccontextmanager
async def redis_client(server: RedisServer) -> AsyncIterator[Any]:
    import coredis

    client: Any = coredis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
    async with client:
        yield client


async def stored(server: RedisServer, prefix: str) -> set[str]:
    """The Redis keys of the prefix, the prefix left off."""
    async with redis_client(server) as client:
        keys = await client.keys(f"{prefix}:*")
    return {k.removeprefix(f"{prefix}:") for k in keys}


async def settled(
    server: RedisServer, prefix: str, check: Callable[[set[str]], bool], tries: int = 100
) -> set[str]:
    """The stored keys once `check` holds for them (written off the request path)."""
    for _ in range(tries):
        keys = await stored(server, prefix)
        if check(keys):
            return keys
        await trio.sleep(0.02)
    raise AssertionError(f"stored keys not as expected: {sorted(keys)}")


# --------------------------------------------------------------------------- the tests


async def test_rate_limit_on_one_lane_is_skipped_by_the_others_for_that_model_only(
    redis: RedisServer, tmp_path: Path
) -> None:
    prefix = f"lanes-cool-{tmp_path.name}"
    config = _config(redis.port, prefix)
    one, two = LaneProvider(), LaneProvider()
    one.script("k1", "x", rate_limited())
    async with (
        Router.open(config, providers={"c": one}) as r1,
        Router.open(config, providers={"c": two}) as r2,
    ):
        response = await r1.submit(request("x"))  # k1 is rate-limited for x: k2 answers
        assert response.content == "ok from k2"
        await wait_until(lambda: cooling(r2, "k1", "x") > 25)
        found = lane(r2, "k1", "x")
        assert found is not None and found.cooling_source == "shared"
        assert key_state(r2, "k1") == ("closed", 0.0)  # the key itself is not cooling
        mine = lane(r1, "k1", "x")
        assert mine is not None and mine.cooling_source == "local"
        # r2 skips k1 for x, and still uses k1 for y.
        assert (await r2.submit(request("x"))).content == "ok from k2"
        assert (await r2.submit(request("y"))).content == "ok from k1"
        assert two.calls == [("k2", "x"), ("k1", "y")]
        keys = await stored(redis, prefix)
        assert "lane-cool:c/k1#x" in keys
        assert not keys & {"cool:c/k1", "breaker:c/k1", "lane-breaker:c/k1#x"}
        async with redis_client(redis) as client:
            assert 25_000 < await client.pttl(f"{prefix}:lane-cool:c/k1#x") <= 30_000


async def test_lane_trip_and_recovery_reach_the_others(redis: RedisServer, tmp_path: Path) -> None:
    prefix = f"lanes-breaker-{tmp_path.name}"
    config = _config(redis.port, prefix, failure_threshold=1, open_for=0.6)
    one, two = LaneProvider(), LaneProvider()
    one.script("k1", "x", unavailable())
    async with (
        Router.open(config, providers={"c": one}) as r1,
        Router.open(config, providers={"c": two}) as r2,
    ):
        with pytest.raises(ChainExhaustedError):
            await r1.submit(request("x"))  # x is down on k1: its lane opens
        await wait_until(lambda: breaker(r2, "k1", "x") == "open")
        found = lane(r2, "k1", "x")
        assert found is not None and found.breaker_source == "shared"
        assert key_state(r2, "k1") == ("closed", 0.0)
        assert "lane-breaker:c/k1#x" in await stored(redis, prefix)
        assert (await r2.submit(request("x"))).content == "ok from k2"
        assert (await r2.submit(request("y"))).content == "ok from k1"
        # r1 keeps sending x; once k1's lane half-opens it probes, recovers, and the
        # recovery closes the lane on r2, which sent nothing to k1 for x.
        with trio.fail_after(5.0):
            while breaker(r2, "k1", "x") != "closed":
                await r1.submit(request("x"))
                await trio.sleep(0.02)
        assert two.calls_to("k1", "x") == 0
        assert one.calls_to("k1", "x") >= 2  # the failure and the probe
        keys = await stored(redis, prefix)
        assert not keys & {"lane-breaker:c/k1#x", "lane-lease:c/k1#x"}


async def test_reset_of_one_lane_clears_it_everywhere(redis: RedisServer, tmp_path: Path) -> None:
    prefix = f"lanes-reset-{tmp_path.name}"
    config = _config(redis.port, prefix)
    one = LaneProvider()
    one.script("k1", "x", rate_limited())
    one.script("k1", "y", rate_limited())
    one.script("k2", "x", rate_limited())
    async with (
        Router.open(config, providers={"c": one}) as r1,
        Router.open(config, providers={"c": LaneProvider()}) as r2,
    ):
        with pytest.raises(RouterError):
            await r1.submit(request("x"))  # x is rate-limited on both keys
        assert (await r1.submit(request("y"))).content == "ok from k2"
        lanes = [("k1", "x"), ("k1", "y"), ("k2", "x")]
        await wait_until(lambda: all(cooling(r2, k, m) > 25 for k, m in lanes))
        assert {f"lane-cool:c/{k}#{m}" for k, m in lanes} <= await stored(redis, prefix)

        # One lane of one key.
        r1.reset(provider="c", key_id="k1", upstream="x")
        assert cooling(r1, "k1", "x") == 0
        await wait_until(lambda: cooling(r2, "k1", "x") == 0)
        for r in (r1, r2):
            assert cooling(r, "k1", "y") > 25 and cooling(r, "k2", "x") > 25
        keys = await settled(redis, prefix, lambda keys: "lane-cool:c/k1#x" not in keys)
        assert {"lane-cool:c/k1#y", "lane-cool:c/k2#x"} <= keys

        # That model's lane on every key of the provider.
        r2.reset(provider="c", upstream="x")
        await wait_until(lambda: cooling(r1, "k2", "x") == 0)
        assert cooling(r2, "k2", "x") == 0
        for r in (r1, r2):
            assert cooling(r, "k1", "y") > 25
        keys = await settled(redis, prefix, lambda keys: "lane-cool:c/k2#x" not in keys)
        assert "lane-cool:c/k1#y" in keys

        # A key: its lanes too.
        r2.reset(provider="c", key_id="k1")
        await wait_until(lambda: cooling(r1, "k1", "y") == 0)
        await settled(redis, prefix, lambda keys: not any(":c/k1" in k for k in keys))
        # Everything.
        one.script("k1", "z", rate_limited())
        await r1.submit(request("z"))
        await wait_until(lambda: cooling(r2, "k1", "z") > 25)
        r2.reset()
        await wait_until(lambda: cooling(r1, "k1", "z") == 0)
        await settled(redis, prefix, lambda keys: not any(k.startswith("lane-") for k in keys))


async def test_a_late_instance_loads_lane_state(redis: RedisServer, tmp_path: Path) -> None:
    prefix = f"lanes-late-{tmp_path.name}"
    config = _config(redis.port, prefix, failure_threshold=2)
    one = LaneProvider()
    one.script("k1", "x", rate_limited())
    one.script("k1", "y", unavailable(), unavailable())
    async with Router.open(config, providers={"c": one}) as r1:
        await r1.submit(request("x"))  # k1 is rate-limited for x
        for _ in range(2):
            with pytest.raises(ChainExhaustedError):
                await r1.submit(request("y"))  # y is down on k1: its lane opens
        assert breaker(r1, "k1", "y") == "open"
        await settled(redis, prefix, lambda keys: "lane-breaker:c/k1#y" in keys)
        late = LaneProvider()
        async with Router.open(config, providers={"c": late}) as r3:
            # The first look, right after it opened: loaded before it serves.
            x = lane(r3, "k1", "x")
            assert x is not None and x.cooling_for > 25 and x.cooling_source == "shared"
            assert x.breaker == "closed"
            y = lane(r3, "k1", "y")
            assert y is not None and y.breaker == "open" and y.breaker_source == "shared"
            assert 25 < y.breaker_open_for <= 30
            assert key_state(r3, "k1") == ("closed", 0.0)
            assert (await r3.submit(request("x"))).content == "ok from k2"
            assert (await r3.submit(request("y"))).content == "ok from k2"
            assert (await r3.submit(request("z"))).content == "ok from k1"
            assert late.calls == [("k2", "x"), ("k2", "y"), ("k1", "z")]


async def test_events_for_a_lane_not_made_here(redis: RedisServer, tmp_path: Path) -> None:
    """A lane's cooldown or trip still running makes the lane; anything else about a
    lane the key does not have is ignored."""
    prefix = f"lanes-absent-{tmp_path.name}"
    config = _config(redis.port, prefix)
    async with Router.open(config, providers={"c": LaneProvider()}) as r2:
        now = time.time()
        base = {"src": "elsewhere", "provider": "c", "key": "k1"}
        events: list[dict[str, Any]] = [
            {"kind": "cool", "model": "over", "until": now - 1, "reason": "rate_limit"},
            {"kind": "open", "model": "over-too", "until": now - 1},
            {"kind": "close", "model": "closed"},
            {"kind": "cool", "model": "x", "key": "nobody", "until": now + 30},
            {"kind": "open", "model": "tripped", "until": now + 30},
            {"kind": "cool", "model": "cooling", "until": now + 30, "reason": "rate_limit"},
        ]
        async with redis_client(redis) as client:
            for event in events:
                await client.publish(f"{prefix}:events", json.dumps({**base, **event}))
        await wait_until(lambda: cooling(r2, "k1", "cooling") > 25)
        snapshot = r2.snapshot()
        k1 = next(k for k in snapshot.keys if k.key_id == "k1")
        assert sorted(x.model for x in k1.lanes) == ["cooling", "tripped"]
        tripped = lane(r2, "k1", "tripped")
        assert tripped is not None
        assert (tripped.breaker, tripped.breaker_source) == ("open", "shared")
        assert key_state(r2, "k1") == ("closed", 0.0)
        # The recovery of a lane it has closes it.
        async with redis_client(redis) as client:
            close = {**base, "kind": "close", "model": "tripped"}
            await client.publish(f"{prefix}:events", json.dumps(close))
        await wait_until(lambda: breaker(r2, "k1", "tripped") == "closed")


async def test_records_of_dropped_lanes_are_let_go(redis: RedisServer, tmp_path: Path) -> None:
    """A key keeps at most `lanes_per_key` lanes; what the shared state keeps of a lane
    the actor dropped goes with it."""
    prefix = f"lanes-cap-{tmp_path.name}"
    config = _config(redis.port, prefix, lanes_per_key=2)
    one = LaneProvider()
    for upstream in ("a", "b", "c"):
        one.script("k1", upstream, rate_limited())
    async with (
        Router.open(config, providers={"c": one}) as r1,
        Router.open(config, providers={"c": LaneProvider()}) as r2,
    ):
        shared: Any = r2._shared  # its records are what this test is about

        def known() -> list[str]:
            return sorted(m for a, m in shared._targets if a.key_id == "k1" and m)

        for upstream in ("a", "b"):
            await r1.submit(request(upstream))
        await wait_until(lambda: known() == ["a", "b"])
        await r1.submit(request("c"))  # r2 makes lane c and drops a (least recently used)
        await wait_until(lambda: cooling(r2, "k1", "c") > 25)
        await wait_until(lambda: known() == ["b", "c"])
        k1 = next(k for k in r2.snapshot().keys if k.key_id == "k1")
        assert sorted(x.model for x in k1.lanes) == ["b", "c"]
        # A reset of the dropped lane's stored state still reaches Redis.
        r2.reset(provider="c", key_id="k1", upstream="a")
        await settled(redis, prefix, lambda keys: "lane-cool:c/k1#a" not in keys)


async def test_one_instance_probes_a_half_open_key(redis: RedisServer, tmp_path: Path) -> None:
    """A key-wide failure (a connection refused) opens the key itself, not a lane: the
    key's trip spreads and its half-open probe is taken by one instance, as a lane's."""
    prefix = f"lanes-key-{tmp_path.name}"
    config = _config(redis.port, prefix, failure_threshold=1, open_for=0.6, success_threshold=2)
    refused = ProviderError("transient", "connection refused", key_wide=True)
    one, two = LaneProvider(fail_always=refused), LaneProvider()
    async with (
        Router.open(config, providers={"c": one}) as r1,
        Router.open(config, providers={"c": two}) as r2,
    ):
        assert (await r1.submit(request("x"))).content == "ok from k2"
        await wait_until(lambda: key_state(r2, "k1")[0] == "open")
        k1 = next(k for k in r2.snapshot().keys if k.key_id == "k1")
        assert k1.breaker_source == "shared" and 0.3 < k1.breaker_open_for <= 0.6
        assert breaker(r2, "k1", "x") == "closed"  # not the lane's doing
        one.fail_always = None
        end = trio.current_time() + 2.5
        while trio.current_time() < end:
            await r1.submit(request("x"))
            await r2.submit(request("y"))
            await trio.sleep(0.01)
        for r in (r1, r2):
            assert key_state(r, "k1")[0] == "closed"
        probes = [(t, "one") for t, k, _ in one.times[1:] if k == "k1"]
        probes += [(t, "two") for t, k, _ in two.times if k == "k1"]
        probes.sort()
        assert len(probes) >= 2, "the key recovered"
        # The first two k1 calls after the trip are the probes (success_threshold = 2):
        # they come from one instance; the other waited for its verdict.
        assert probes[0][1] == probes[1][1]
