"""What one request can make the router do, hold or break (the library side of the
hardening issue): chain and attempt caps, bounded per-model state, deadline values,
a stream failing while its reader is slow, and a bug inside the router costing one
request only."""

from __future__ import annotations

import math

import pytest
import trio
from scripted import Fail, Reply, ScriptedProvider, StreamingScriptedProvider, make_config

from router import (
    ChainExhaustedError,
    ChatRequest,
    ConfigError,
    InvalidRequestError,
    Message,
    Router,
    RouterConfig,
    StreamChunk,
    StreamInterruptedError,
)

CFG = """
[[providers]]
name = "p"
kind = "custom"
keys = [{ id = "k" }]
[[models]]
name = "m"
provider = "p"
upstream = "u"
"""


def req(model: str = "m", **kw: object) -> ChatRequest:
    return ChatRequest(model=model, messages=[Message("user", "hi")], **kw)  # type: ignore[arg-type]


async def test_a_thousand_fallbacks_are_refused_before_any_call(autojump_clock):
    sp = ScriptedProvider()
    async with Router.open(make_config(CFG), providers={"p": sp}) as router:
        with pytest.raises(InvalidRequestError) as info:
            await router.submit(req(fallbacks=[f"p/u{i}" for i in range(1000)]))
        assert info.value.field == "fallbacks"
        assert "max_chain = 8" in str(info.value)
        # Duplicates count too: the raw list is what a caller sends.
        with pytest.raises(InvalidRequestError):
            await router.submit(req(fallbacks=["m"] * 9))
        assert sp.calls == []
        # Eight is fine.
        resp = await router.submit(req(fallbacks=[f"p/u{i}" for i in range(7)]))
        assert resp.model == "m"


async def test_configured_chains_longer_than_max_chain_are_config_errors() -> None:
    text = CFG + '[router]\nmax_chain = 2\nfallbacks = ["p/a", "p/b"]\n'
    with pytest.raises(ConfigError) as info:
        RouterConfig.from_toml(text)
    assert info.value.field == "models[0].fallbacks"


async def test_attempts_per_request_are_capped(autojump_clock):
    keys = ", ".join(f'{{ id = "k{i}" }}' for i in range(20))
    cfg = make_config(CFG.replace('keys = [{ id = "k" }]', f"keys = [{keys}]"))
    cfg.router.max_attempts = 5
    sp = ScriptedProvider(default=Fail("rate_limit", retry_after=60.0))
    async with Router.open(cfg, providers={"p": sp}) as router:
        with pytest.raises(ChainExhaustedError) as info:
            await router.submit(req())
        assert len(sp.calls) == 5
        assert "max_attempts = 5" in str(info.value)


async def test_in_place_retries_count_towards_max_attempts(autojump_clock):
    cfg = make_config(CFG)
    cfg.router.max_attempts = 2
    cfg.router.transient_retries = 5
    sp = ScriptedProvider(default=Fail("transient"))
    async with Router.open(cfg, providers={"p": sp}) as router:
        with pytest.raises(ChainExhaustedError):
            await router.submit(req())
        assert len(sp.calls) == 2


async def test_made_up_model_names_leave_bounded_state(autojump_clock):
    cfg = make_config(CFG)
    cfg.router.adhoc_models = 50
    cfg.router.lanes_per_key = 40
    sp = ScriptedProvider(default=Fail("model_missing", status=404))
    async with Router.open(cfg, providers={"p": sp}) as router:
        for i in range(500):
            with pytest.raises(ChainExhaustedError):
                await router.submit(req(f"p/made-up-{i}"))
        snap = router.snapshot()
        assert len(snap.models) <= 1 + 50
        assert all(len(k.lanes) <= 40 for k in snap.keys)
        assert len(router._chain._routes) <= 4096 + 1
        # The configured model keeps working, and the latest made-up one stays disabled.
        sp.set_default("k", Reply())
        assert (await router.submit(req("m"))).model == "m"
        with pytest.raises(ChainExhaustedError):
            await router.submit(req("p/made-up-499"))
        assert len(sp.calls) == 501


@pytest.mark.parametrize("value", [math.inf, math.nan, -1.0, 0.0, "5"])
async def test_a_deadline_must_be_positive_and_finite(autojump_clock, value):
    sp = ScriptedProvider()
    async with Router.open(make_config(CFG), providers={"p": sp}) as router:
        with pytest.raises(InvalidRequestError) as info:
            await router.submit(req(timeout=value))
        assert info.value.field == "timeout"
        assert sp.calls == []


async def test_a_stream_failing_while_its_reader_is_slow_reaches_the_reader(autojump_clock, caplog):
    class Fast(StreamingScriptedProvider):
        async def stream(self, request, key):  # type: ignore[no-untyped-def]
            # The first chunk is handed over with the stream; the next 16 fill the
            # channel to the brim, and then the upstream fails.
            for i in range(17):
                yield StreamChunk(text=f"{i} ")
            from router import ProviderError

            raise ProviderError("transient", "upstream reset mid-stream")

    sp = Fast()
    async with Router.open(make_config(CFG), providers={"p": sp}) as router:
        async with router.stream(req()) as stream:
            first = await stream.__anext__()
            assert first.text == "0 "
            await trio.sleep(60)  # the reader stalls while the upstream fails
            with pytest.raises(StreamInterruptedError) as info:
                async for _ in stream:
                    pass
        assert "reset mid-stream" in str(info.value)
        assert info.value.partial_text.startswith("0 1 2 ")
        assert "unexpected" not in caplog.text  # delivered, not caught as a router bug
        # The router is still up: the actor survived.
        async with router.stream(req()) as again:
            with pytest.raises(StreamInterruptedError):
                async for _ in again:
                    pass


async def test_a_bug_inside_the_router_costs_one_request_only(autojump_clock, caplog):
    sp = ScriptedProvider()
    sp.script("k", [Fail("transient")])
    cfg = make_config(CFG)
    cfg.router.transient_retries = 0
    async with Router.open(cfg, providers={"p": sp}) as router:
        (actor,) = router._runtimes["p"].actors
        original = actor._record_failure
        calls = {"n": 0}

        def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            raise RuntimeError("a bug")

        actor._record_failure = broken  # type: ignore[method-assign]
        with pytest.raises(ChainExhaustedError) as info:
            await router.submit(req())
        assert info.value.last_error is not None
        assert info.value.last_error.kind == "unknown"
        assert "router error" in info.value.last_error.message
        assert calls["n"] == 1
        actor._record_failure = original  # type: ignore[method-assign]
        resp = await router.submit(req())
        assert resp.content == "ok from k"
        assert "unexpected RuntimeError" in caplog.text


async def test_per_tenant_breakers_are_bounded_and_reads_make_none(autojump_clock):
    cfg = make_config(CFG)
    cfg.router.per_tenant_breakers = True
    sp = ScriptedProvider()
    async with Router.open(cfg, providers={"p": sp}) as router:
        for i in range(1100):
            await router.submit(req(tenant=f"t{i}"))
        (actor,) = router._runtimes["p"].actors
        lane = actor.lane_state("u")
        assert lane is not None
        assert len(lane.tenant_breakers) == 1024
        # Asking whether a key is available for an unseen tenant creates nothing.
        assert actor.is_available(trio.current_time(), "never-seen", 0, "u")
        assert "never-seen" not in lane.tenant_breakers
