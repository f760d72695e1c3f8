"""Circuit breakers as seen through the Router: opening, probing, closing, per-tenant
breakers, and the operator's reset()."""

from __future__ import annotations

import pytest
import trio
from scripted import Fail, Hang, Reply, ScriptedProvider, make_config

from router import (
    ChainExhaustedError,
    ChatRequest,
    InvalidRequestError,
    KeySnapshot,
    LaneSnapshot,
    Message,
    ModelSnapshot,
    Router,
)

CFG = """
[router]
transient_retries = 0
per_tenant_breakers = {per_tenant}
[router.breaker]
failure_threshold = 3
failure_rate = 0
open_for = 30
open_for_max = 300
open_growth = 2
half_open_probes = 1
success_threshold = 2
[[providers]]
name = "p"
kind = "custom"
keys = [{{ id = "a" }}, {{ id = "b" }}]
[[models]]
name = "m"
provider = "p"
upstream = "u"
"""


def req(model: str = "m", **kw: object) -> ChatRequest:
    return ChatRequest(model=model, messages=[Message("user", "hi")], **kw)  # type: ignore[arg-type]


def key(router: Router, key_id: str, provider: str = "p") -> KeySnapshot:
    (snap,) = [k for k in router.snapshot().keys if k.provider == provider and k.key_id == key_id]
    return snap


def lane(router: Router, key_id: str, upstream: str = "u") -> LaneSnapshot:
    """A model's failures (transient, rate limits) live in its lane on the key."""
    (snap,) = [x for x in key(router, key_id).lanes if x.model == upstream]
    return snap


def model(router: Router, name: str) -> ModelSnapshot:
    (snap,) = [m for m in router.snapshot().models if m.name == name]
    return snap


def open_router(sp: ScriptedProvider, per_tenant: bool = False):
    cfg = make_config(CFG.format(per_tenant="true" if per_tenant else "false"))
    return Router.open(cfg, providers={"p": sp})


async def trip_a(router: Router, sp: ScriptedProvider, **kw: object) -> None:
    """Three transient failures on key a (each exhausts the one-model chain)."""
    sp.script("a", [Fail("transient")] * 3)
    for _ in range(3):
        with pytest.raises(ChainExhaustedError):
            await router.submit(req(**kw))


async def test_breaker_opens_at_threshold_and_key_is_skipped(autojump_clock):
    sp = ScriptedProvider()
    async with open_router(sp) as router:
        sp.script("a", [Fail("transient")] * 2)
        for _ in range(2):
            with pytest.raises(ChainExhaustedError):
                await router.submit(req())
        # Two failures: still closed, and a is still the first choice.
        assert lane(router, "a").breaker == "closed"
        sp.script("a", [Fail("transient")])
        with pytest.raises(ChainExhaustedError):
            await router.submit(req())
        a = lane(router, "a")
        assert key(router, "a").breaker == "closed"  # a model's outage is its lane's
        assert a.breaker == "open"
        assert a.breaker_open_for == pytest.approx(30.0)
        assert a.opens == 1
        assert sp.calls_to("a") == 3
        assert sp.calls_to("b") == 0  # transient advances the model, not the key

        resp = await router.submit(req())
        assert resp.key_id == "b"
        assert sp.calls_to("a") == 3
        assert [x.key_id for x in resp.attempts] == ["b"]


async def test_half_open_lets_exactly_one_probe_and_successes_close_it(autojump_clock):
    sp = ScriptedProvider()
    async with open_router(sp) as router:
        t0 = trio.current_time()
        await trip_a(router, sp)
        await trio.sleep_until(t0 + 29.9)
        resp = await router.submit(req())
        assert resp.key_id == "b"
        assert lane(router, "a").breaker == "open"

        await trio.sleep_until(t0 + 30.0)
        assert lane(router, "a").breaker == "half_open"
        sp.set_default("a", Reply(latency=1.0))
        sp.set_default("b", Reply(latency=1.0))
        served: list[str] = []

        async def one() -> None:
            served.append((await router.submit(req())).key_id)

        before = sp.calls_to("a")
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(one)
        assert sp.calls_to("a") == before + 1
        assert sorted(served) == ["a", "b", "b"]
        # One success of success_threshold = 2: still half-open.
        assert lane(router, "a").breaker == "half_open"

        resp = await router.submit(req())
        assert resp.key_id == "a"
        a = lane(router, "a")
        assert a.breaker == "closed"
        assert a.breaker_open_for == 0

        # Closed again: a takes concurrent traffic.
        served.clear()
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(one)
        assert served == ["a", "a", "a"]


async def test_fast_failed_probe_reopens_for_the_same_open_for(autojump_clock):
    # The growth rule: a probe that fails fast (a 5xx) re-opens for open_for again, so a
    # recovered upstream gets traffic back within one open period.
    sp = ScriptedProvider()
    async with open_router(sp) as router:
        t0 = trio.current_time()
        await trip_a(router, sp)
        await trio.sleep_until(t0 + 30.0)
        sp.script("a", [Fail("transient")])
        with pytest.raises(ChainExhaustedError):
            await router.submit(req())  # no in-place retry of a probe; transient: next model
        assert sp.calls_to("a") == 4  # exactly one probe call
        a = lane(router, "a")
        assert a.breaker == "open"
        assert a.breaker_open_for == pytest.approx(30.0)
        assert a.opens == 2

        t1 = trio.current_time()
        await trio.sleep_until(t1 + 29.0)
        resp = await router.submit(req())
        assert resp.key_id == "b"
        assert sp.calls_to("a") == 4
        await trio.sleep_until(t1 + 30.0)
        resp = await router.submit(req())
        assert resp.key_id == "a"


async def test_timed_out_probe_reopens_with_longer_open_for(autojump_clock):
    # A silent upstream costs an attempt timeout per probe: its open time grows.
    sp = ScriptedProvider()
    async with open_router(sp) as router:
        t0 = trio.current_time()
        await trip_a(router, sp)
        await trio.sleep_until(t0 + 30.0)
        sp.script("a", [Hang()])
        with pytest.raises(ChainExhaustedError):
            await router.submit(req())
        assert sp.calls_to("a") == 4
        a = lane(router, "a")
        assert a.breaker == "open"
        assert a.breaker_open_for == pytest.approx(60.0 - 30.0)  # opened 30 s ago, at the timeout
        t1 = trio.current_time()
        await trio.sleep_until(t1 + 29.0)
        assert (await router.submit(req())).key_id == "b"
        await trio.sleep_until(t1 + 30.0)
        assert (await router.submit(req())).key_id == "a"


async def test_bad_requests_never_count_toward_the_breaker(autojump_clock):
    sp = ScriptedProvider()
    async with open_router(sp) as router:
        sp.script("a", [Fail("bad_request"), Fail("context_exceeded")] * 3)
        for _ in range(6):
            with pytest.raises(Exception, match="scripted"):
                await router.submit(req())
        assert key(router, "a").breaker == "closed"
        assert lane(router, "a").breaker == "closed"
        resp = await router.submit(req())
        assert resp.key_id == "a"


# -- per-tenant breakers ------------------------------------------------------------------------


async def test_per_tenant_breakers_isolate_tenants(autojump_clock):
    sp = ScriptedProvider()
    async with open_router(sp, per_tenant=True) as router:
        await trip_a(router, sp, tenant="t1")
        # t2 is still served by a.
        resp = await router.submit(req(tenant="t2"))
        assert resp.key_id == "a"
        # t1 is not: its breaker on a is open.
        n_a = sp.calls_to("a")
        resp = await router.submit(req(tenant="t1"))
        assert resp.key_id == "b"
        assert sp.calls_to("a") == n_a
        a = lane(router, "a")
        assert a.tenant_breakers == {"t1": "open", "t2": "closed"}
        assert a.breaker == "closed"  # the lane's own breaker is untouched
        assert key(router, "a").breaker == "closed"
        assert a.opens == 1
        # Requests with no tenant use the key's own breaker.
        resp = await router.submit(req())
        assert resp.key_id == "a"


async def test_without_per_tenant_breakers_one_tenant_opens_it_for_all(autojump_clock):
    sp = ScriptedProvider()
    async with open_router(sp, per_tenant=False) as router:
        await trip_a(router, sp, tenant="t1")
        resp = await router.submit(req(tenant="t2"))
        assert resp.key_id == "b"
        a = lane(router, "a")
        assert a.breaker == "open"
        assert a.tenant_breakers == {}


# -- reset ----------------------------------------------------------------------------------------


async def test_reset_key_clears_breaker_and_cooldown(autojump_clock):
    sp = ScriptedProvider()
    async with open_router(sp) as router:
        await trip_a(router, sp)
        sp.script("b", [Fail("rate_limit", retry_after=100.0)])
        with pytest.raises(ChainExhaustedError):
            await router.submit(req())
        assert lane(router, "a").breaker == "open"
        assert lane(router, "b").cooling_for == pytest.approx(100.0)

        router.reset(provider="p", key_id="a")
        a = lane(router, "a")
        assert (a.breaker, a.breaker_open_for, a.cooling_for) == ("closed", 0, 0)
        assert lane(router, "b").cooling_for == pytest.approx(100.0)  # untouched
        resp = await router.submit(req())
        assert resp.key_id == "a"

        router.reset(provider="p", key_id="b")
        b = lane(router, "b")
        assert (b.cooling_for, b.rate_limit_hits) == (0, 0)
        # The rate-limit hit count was cleared too: the next 429 backs off from 5 s.
        sp.script("a", [Fail("rate_limit")])
        sp.script("b", [Fail("rate_limit")])
        with pytest.raises(ChainExhaustedError):
            await router.submit(req())
        assert lane(router, "b").cooling_for == pytest.approx(5.0)


async def test_reset_one_lane_leaves_the_key_and_other_lanes(autojump_clock):
    sp = ScriptedProvider()
    async with open_router(sp) as router:
        sp.script("a/u", [Fail("rate_limit", retry_after=100.0)])
        sp.script("a/v", [Fail("rate_limit", retry_after=100.0)])
        assert (await router.submit(req())).key_id == "b"
        assert (await router.submit(req("p/v"))).key_id == "b"
        router.reset(provider="p", key_id="a", upstream="u")
        assert lane(router, "a").cooling_for == 0
        assert lane(router, "a", "v").cooling_for == pytest.approx(100.0)
        assert (await router.submit(req())).key_id == "a"
        assert (await router.submit(req("p/v"))).key_id == "b"
        with pytest.raises(InvalidRequestError):
            router.reset(upstream="u")


async def test_reset_provider_clears_every_key(autojump_clock):
    sp = ScriptedProvider()
    async with open_router(sp) as router:
        sp.script("a", [Fail("auth")])
        sp.script("b", [Fail("balance")])
        with pytest.raises(ChainExhaustedError):
            await router.submit(req())
        assert key(router, "a").cooling_for > 0
        assert key(router, "b").cooling_for > 0
        router.reset(provider="p")
        assert key(router, "a").cooling_for == 0
        assert key(router, "b").cooling_for == 0
        assert (await router.submit(req())).key_id == "a"


async def test_reset_model_clears_health(autojump_clock):
    sp = ScriptedProvider()
    async with open_router(sp) as router:
        sp.script("a", [Fail("model_missing")])
        with pytest.raises(ChainExhaustedError):
            await router.submit(req())
        assert model(router, "m").health == "disabled"
        with pytest.raises(ChainExhaustedError):
            await router.submit(req())
        assert len(sp.calls) == 1
        router.reset(model="m")
        assert model(router, "m").health == "healthy"
        resp = await router.submit(req())
        assert resp.key_id == "a"
        assert len(sp.calls) == 2


async def test_reset_everything(autojump_clock):
    sp = ScriptedProvider()
    async with open_router(sp) as router:
        await trip_a(router, sp)
        sp.script("b", [Fail("model_missing")])
        with pytest.raises(ChainExhaustedError):
            await router.submit(req())
        assert model(router, "m").health == "disabled"
        router.reset()
        assert lane(router, "a").breaker == "closed"
        assert model(router, "m").health == "healthy"
        assert (await router.submit(req())).key_id == "a"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"provider": "nope"}, "provider"),
        ({"provider": "nope", "key_id": "a"}, "provider"),
        ({"provider": "p", "key_id": "zz"}, "key_id"),
        ({"key_id": "a"}, "provider"),
        ({"model": "nope"}, "model"),
        ({"model": "zz/x"}, "model"),
    ],
)
async def test_reset_unknown_names_raise_invalid_request(autojump_clock, kwargs, field):
    sp = ScriptedProvider()
    async with open_router(sp) as router:
        await trip_a(router, sp)
        with pytest.raises(InvalidRequestError) as info:
            router.reset(**kwargs)
        assert info.value.field == field
        # A failed reset changed nothing.
        assert lane(router, "a").breaker == "open"
