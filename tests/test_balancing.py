"""Key choice within a model: ordered (with spill-over), round robin, least busy."""

from __future__ import annotations

import trio
from scripted import Fail, Reply, ScriptedProvider, make_config

from router import ChatRequest, Message, Router

CONFIG = """
[router]
balancing = "{balancing}"
transient_retries = 0
[[providers]]
name = "p"
kind = "custom"
keys = [
  {{ id = "a", max_concurrency = 2 }},
  {{ id = "b", max_concurrency = 2 }},
  {{ id = "c", max_concurrency = 4 }},
]
[[models]]
name = "m"
provider = "p"
upstream = "u"
"""


def req() -> ChatRequest:
    return ChatRequest(model="m", messages=[Message("user", "hi")])


async def concurrently(router: Router, n: int) -> list[str]:
    served: list[str] = []

    async def one() -> None:
        served.append((await router.submit(req())).key_id)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return served


async def test_ordered_uses_the_first_key_and_spills_over_when_it_is_full(autojump_clock):
    sp = ScriptedProvider(default=Reply(latency=1.0))
    cfg = make_config(CONFIG.format(balancing="ordered"))
    async with Router.open(cfg, providers={"p": sp}) as router:
        assert [(await router.submit(req())).key_id for _ in range(3)] == ["a"] * 3
        t0 = trio.current_time()
        served = await concurrently(router, 5)
        # a holds 2, b holds 2, the fifth goes to c: nobody queues behind a full key.
        assert sorted(served) == ["a", "a", "b", "b", "c"]
        assert trio.current_time() - t0 == 1.0


async def test_round_robin_cycles_and_skips_a_cooling_key(autojump_clock):
    sp = ScriptedProvider()
    cfg = make_config(CONFIG.format(balancing="round_robin"))
    async with Router.open(cfg, providers={"p": sp}) as router:
        assert [(await router.submit(req())).key_id for _ in range(6)] == ["a", "b", "c"] * 2
        sp.script("b", [Fail("rate_limit", retry_after=30)])
        served = [(await router.submit(req())).key_id for _ in range(6)]
        # b's turn: it answers 429, cools, and the next key in the rotation (c) serves;
        # while b cools its turns go to c as well.
        assert served == ["a", "c", "c", "a", "c", "c"]
        assert sp.calls_to("b") == 3


async def test_least_busy_sends_the_next_request_to_the_least_loaded_key(autojump_clock):
    sp = ScriptedProvider(default=Reply(latency=1.0))
    cfg = make_config(CONFIG.format(balancing="least_busy"))
    async with Router.open(cfg, providers={"p": sp}) as router:
        served = await concurrently(router, 4)
        # Loads as fractions of max_concurrency: a and b fill at half the rate of c.
        assert sorted(served) == ["a", "b", "c", "c"]
