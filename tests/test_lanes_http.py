"""The newcomer's configuration over real HTTP: one OpenAI-compatible provider, one API
key, several models on it, the default settings, against the loopback emulator.

These use real sockets and the real clock (waits are a second or two at most)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from router import ChainExhaustedError, ChatRequest, Message, Router, RouterConfig
from router.emulator import Emulator, Fault

SECRET = "sk-newcomer-0001"


@asynccontextmanager
async def newcomer(**router: object) -> AsyncIterator[tuple[Emulator, Router]]:
    async with Emulator.serve(port=0) as emu:
        config = RouterConfig.from_dict(
            {
                "router": router,
                "providers": [
                    {
                        "name": "openai",
                        "kind": "openai",
                        "base_url": f"{emu.url}/v1",
                        "keys": [{"id": "main", "secret": SECRET}],
                    }
                ],
                "models": [
                    {
                        "name": "smart",
                        "provider": "openai",
                        "upstream": "gpt-big",
                        "fallbacks": ["cheap"],
                    },
                    {"name": "cheap", "provider": "openai", "upstream": "gpt-small"},
                    {"name": "other", "provider": "openai", "upstream": "gpt-other"},
                ],
            }
        )
        async with Router.open(config) as r:
            yield emu, r
        assert emu.errors == []


def req(model: str) -> ChatRequest:
    return ChatRequest(model=model, messages=[Message("user", "hello")])


def models_called(emu: Emulator) -> list[str]:
    return [c.model for c in emu.calls]


async def test_a_429_on_one_model_does_not_block_the_key() -> None:
    async with newcomer() as (emu, router):
        emu.script(Fault(status=429, headers={"retry-after": "30"}), model="gpt-big")
        start = trio.current_time()
        resp = await router.submit(req("smart"))
        assert (resp.model, resp.key_id) == ("cheap", "main")
        assert [(a.model, a.outcome) for a in resp.attempts] == [
            ("smart", "rate_limit"),
            ("cheap", "ok"),
        ]
        other = await router.submit(req("other"))
        assert other.model == "other"
        assert trio.current_time() - start < 2.0  # no waiting anywhere
        (key,) = router.snapshot().keys
        assert (key.cooling_for, key.breaker) == (0.0, "closed")
        lanes = {x.model: x for x in key.lanes}
        assert 29.0 < lanes["gpt-big"].cooling_for <= 30.0
        assert lanes["gpt-small"].cooling_for == 0.0
        # While the lane cools, "smart" goes straight to its fallback.
        again = await router.submit(req("smart"))
        assert [a.model for a in again.attempts] == ["cheap"]
        assert models_called(emu).count("gpt-big") == 1


async def test_a_short_retry_after_is_waited_out_on_the_same_model() -> None:
    async with newcomer() as (emu, router):
        emu.script(Fault(status=429, headers={"retry-after": "1"}), model="gpt-big")
        start = trio.current_time()
        resp = await router.submit(req("smart"))
        assert resp.model == "smart"
        assert trio.current_time() - start >= 1.0
        assert models_called(emu) == ["gpt-big", "gpt-big"]


async def test_an_auth_failure_stops_every_model_of_the_key() -> None:
    async with newcomer() as (emu, router):
        emu.script(Fault(status=401), model="gpt-big")
        with pytest.raises(ChainExhaustedError):
            await router.submit(req("smart"))
        with pytest.raises(ChainExhaustedError):
            await router.submit(req("other"))
        assert models_called(emu) == ["gpt-big"]
        (key,) = router.snapshot().keys
        assert key.cooling_reason == "auth"


async def test_a_503_burst_opens_the_lane_and_the_fallback_keeps_answering() -> None:
    async with newcomer(retry_backoff=[0.01]) as (emu, router):
        emu.script([Fault(status=503)] * 15, model="gpt-big")
        for _ in range(5):
            resp = await router.submit(req("smart"))
            assert resp.model == "cheap"
        (key,) = router.snapshot().keys
        lanes = {x.model: x for x in key.lanes}
        assert lanes["gpt-big"].breaker == "open"
        assert key.breaker == "closed"
        calls = len(emu.calls)
        resp = await router.submit(req("smart"))
        assert [a.model for a in resp.attempts] == ["cheap"]
        assert len(emu.calls) == calls + 1


async def test_a_hedge_answers_a_slow_model_and_the_slow_connection_is_closed() -> None:
    async with newcomer(hedge_after=0.5) as (emu, router):
        emu.script(Fault(latency=5.0), model="gpt-big")
        start = trio.current_time()
        resp = await router.submit(req("smart"))
        assert resp.model == "cheap"
        assert trio.current_time() - start < 2.0
        slow = [c for c in emu.calls if c.model == "gpt-big"]
        assert len(slow) == 1
        with trio.fail_after(2):
            while not slow[0].disconnected:  # noqa: ASYNC110 (an emulator record)
                await trio.sleep(0.05)
        (key,) = router.snapshot().keys
        lanes = {x.model: x for x in key.lanes}
        assert (lanes["gpt-big"].failures, lanes["gpt-big"].breaker) == (0, "closed")
        assert sorted(a.outcome for a in resp.attempts) == ["hedge_cancelled", "hedge_won"]
