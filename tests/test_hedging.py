"""Hedged requests: a second attempt races a slow first one; the first answer wins, the
loser is cancelled through its cancel scope and never counted against its key."""

from __future__ import annotations

from collections import Counter

import pytest
import trio
from scripted import (
    Fail,
    Reply,
    ScriptedProvider,
    StreamingScriptedProvider,
    StreamScript,
    make_config,
    reading_both_ways,
)

from router import ChainExhaustedError, ChatRequest, Message, Router

CFG = """
[router]
hedge_after = 2.0
[[providers]]
name = "p"
kind = "custom"
keys = [{ id = "a" }, { id = "b" }]
[[models]]
name = "m"
provider = "p"
upstream = "u"
"""


def req(**kw: object) -> ChatRequest:
    return ChatRequest(model="m", messages=[Message("user", "hi")], **kw)  # type: ignore[arg-type]


def lane_of(router: Router, key_id: str):  # type: ignore[no-untyped-def]
    (actor,) = [a for a in router._runtimes["p"].actors if a.key_id == key_id]
    return actor, actor.lane_state("u")


stream_reading = reading_both_ways(StreamingScriptedProvider)


async def test_a_slow_first_token_is_beaten_by_the_hedge(autojump_clock):
    p = StreamingScriptedProvider()
    p.script("a", [StreamScript(pieces=("slow",), latency=20.0)])
    p.set_default("b", StreamScript(pieces=("fast ", "answer"), latency=0.5))
    async with Router.open(make_config(CFG), providers={"p": p}) as router:
        t0 = trio.current_time()
        async with router.stream(req()) as stream:
            first_at = trio.current_time() - t0
            text = "".join([c.text async for c in stream])
        assert text == "fast answer"
        assert stream.key_id == "b"
        assert first_at == pytest.approx(2.5)
        assert p.closed.count("a") == 1  # the primary's stream was closed at once
        actor, lane = lane_of(router, "a")
        assert (actor.failures, lane.failures, lane.breaker.state) == (0, 0, "closed")
        assert sorted((x.key_id, x.outcome) for x in stream.attempts) == [
            ("a", "hedge_cancelled"),
            ("b", "hedge_won"),
        ]


async def test_a_slow_response_is_beaten_by_the_hedge(autojump_clock):
    p = ScriptedProvider()
    p.script("a", [Reply(latency=20.0)])
    p.set_default("b", Reply(latency=0.1))
    async with Router.open(make_config(CFG), providers={"p": p}) as router:
        t0 = trio.current_time()
        resp = await router.submit(req())
        assert resp.key_id == "b"
        assert trio.current_time() - t0 == pytest.approx(2.1)
        actor, lane = lane_of(router, "a")
        assert (actor.failures, lane.failures, actor.in_flight) == (0, 0, 0)


async def test_a_fast_first_attempt_is_never_hedged(autojump_clock):
    p = ScriptedProvider(default=Reply(latency=1.0))
    async with Router.open(make_config(CFG), providers={"p": p}) as router:
        for _ in range(5):
            await router.submit(req())
        assert {c.key_id for c in p.calls} == {"a"}


async def test_max_hedges_is_respected_under_100_concurrent_requests(autojump_clock):
    p = ScriptedProvider(default=Reply(latency=10.0))
    cfg = make_config(CFG.replace('{ id = "b" }', '{ id = "b" }, { id = "c" }'))
    async with Router.open(cfg, providers={"p": p}) as router:
        served: list[str] = []

        async def one(i: int) -> None:
            # max_tokens tags the request, so calls can be counted per request.
            served.append((await router.submit(req(max_tokens=i + 1))).key_id)

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
        assert len(served) == 100
        per_request = Counter(c.max_tokens for c in p.calls)
        assert len(per_request) == 100
        assert max(per_request.values()) == 2  # its attempt and one hedge, never more
        assert all(actor.in_flight == 0 for actor in router._runtimes["p"].actors)


async def test_when_every_racer_fails_the_router_goes_on_as_usual(autojump_clock):
    cfg = make_config(CFG)
    cfg.router.transient_retries = 0
    p = ScriptedProvider()
    p.script("a", [Fail("transient", latency=5.0)])
    p.script("b", [Fail("transient", latency=1.0)])
    async with Router.open(cfg, providers={"p": p}) as router:
        with pytest.raises(ChainExhaustedError) as info:
            await router.submit(req())
        assert [a.key_id for a in info.value.attempts] == ["b", "a"]
        assert info.value.attempts[-1].outcome == "transient"


async def test_auto_hedging_follows_the_lanes_recent_latency(autojump_clock):
    cfg = make_config(CFG.replace("hedge_after = 2.0", 'hedge_after = "auto"\nhedge_floor = 0.5'))
    p = ScriptedProvider(default=Reply(latency=0.2))
    async with Router.open(cfg, providers={"p": p}) as router:
        for _ in range(10):  # history: every answer in 0.2 s
            await router.submit(req())
        p.script("a", [Reply(latency=30.0)])
        t0 = trio.current_time()
        resp = await router.submit(req())
        # The 95th percentile is 0.2 s; the floor 0.5 s wins: hedged at 0.5 s.
        assert resp.key_id == "b"
        assert trio.current_time() - t0 == pytest.approx(0.5 + 0.2)


async def test_hedging_is_off_by_default(autojump_clock):
    p = ScriptedProvider()
    p.script("a", [Reply(latency=20.0)])
    async with Router.open(
        make_config(CFG.replace("hedge_after = 2.0", "")), providers={"p": p}
    ) as router:
        resp = await router.submit(req())
        assert resp.key_id == "a"
        assert len(p.calls) == 1
