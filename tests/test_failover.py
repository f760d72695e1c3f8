"""Failover through the real Router: DESIGN.md's failure table, row by row.

Every test drives real key actors with a ScriptedProvider under a virtual clock.
"""

from __future__ import annotations

import pytest
import trio
from scripted import Fail, Reply, ScriptedProvider, make_config

from router import (
    ChainExhaustedError,
    ChatRequest,
    ChatResponse,
    InvalidRequestError,
    KeySnapshot,
    LaneSnapshot,
    Message,
    ModelSnapshot,
    ProviderError,
    Router,
    UnknownModelError,
)

# One provider with two keys; model m on it, fallback model m2 on provider q.
TWO_KEYS = """
[router]
transient_retries = 2
[[providers]]
name = "p"
kind = "custom"
keys = [{ id = "a" }, { id = "b" }]
[[providers]]
name = "q"
kind = "custom"
keys = [{ id = "c" }]
[[models]]
name = "m"
provider = "p"
upstream = "up-m"
fallbacks = ["m2"]
[[models]]
name = "m2"
provider = "q"
upstream = "up-m2"
"""


def req(model: str = "m", **kw: object) -> ChatRequest:
    return ChatRequest(model=model, messages=[Message("user", "hi")], **kw)  # type: ignore[arg-type]


def key(router: Router, provider: str, key_id: str) -> KeySnapshot:
    (snap,) = [k for k in router.snapshot().keys if k.provider == provider and k.key_id == key_id]
    return snap


def lane(router: Router, provider: str, key_id: str, upstream: str = "up-m") -> LaneSnapshot:
    (snap,) = [x for x in key(router, provider, key_id).lanes if x.model == upstream]
    return snap


def model(router: Router, name: str) -> ModelSnapshot:
    (snap,) = [m for m in router.snapshot().models if m.name == name]
    return snap


def two_key_router(p: ScriptedProvider, q: ScriptedProvider, extra: str = ""):
    return Router.open(make_config(TWO_KEYS + extra), providers={"p": p, "q": q})


# -- rate limits and cooldowns ----------------------------------------------------------


async def test_rate_limit_cools_key_for_retry_after_and_next_key_serves(autojump_clock):
    p, q = ScriptedProvider(), ScriptedProvider()
    p.script("a", [Fail("rate_limit", retry_after=7.0, status=429)])
    async with two_key_router(p, q) as router:
        t0 = trio.current_time()
        resp = await router.submit(req())
        assert (resp.provider, resp.key_id, resp.model) == ("p", "b", "m")
        assert [c.key_id for c in p.calls] == ["a", "b"]
        assert q.calls == []
        a = lane(router, "p", "a")
        # max(retry_after 7, first backoff 5) = 7, on the model's lane, not the key.
        assert a.cooling_for == pytest.approx(7.0)
        assert a.rate_limit_hits == 1
        assert key(router, "p", "a").cooling_for == 0
        assert lane(router, "p", "b").cooling_for == 0

        await trio.sleep_until(t0 + 6.9)
        resp = await router.submit(req())
        assert resp.key_id == "b"
        assert p.calls_to("a") == 1

        await trio.sleep_until(t0 + 7.1)
        assert lane(router, "p", "a").cooling_for == 0
        resp = await router.submit(req())
        assert resp.key_id == "a"
        assert p.calls_to("a") == 2


async def test_rate_limit_cooldown_is_at_least_the_exponential_backoff(autojump_clock):
    p, q = ScriptedProvider(), ScriptedProvider()
    # A small Retry-After is raised to the 5 s floor; the second hit (no success in
    # between) backs off to 10 s.
    p.script("a", [Fail("rate_limit", retry_after=2.0)])
    async with two_key_router(p, q) as router:
        t0 = trio.current_time()
        await router.submit(req())
        assert lane(router, "p", "a").cooling_for == pytest.approx(5.0)
        await trio.sleep_until(t0 + 5.0)
        p.script("a", [Fail("rate_limit")])
        resp = await router.submit(req())
        assert resp.key_id == "b"
        assert lane(router, "p", "a").cooling_for == pytest.approx(10.0)


async def test_rate_limit_on_one_provider_never_cools_a_sibling_key_with_same_id(
    autojump_clock,
):
    cfg = """
[[providers]]
name = "p"
kind = "custom"
keys = [{ id = "default" }]
[[providers]]
name = "q"
kind = "custom"
keys = [{ id = "default" }]
[[models]]
name = "m1"
provider = "p"
upstream = "up1"
fallbacks = ["m2"]
[[models]]
name = "m2"
provider = "q"
upstream = "up2"
"""
    p, q = ScriptedProvider(), ScriptedProvider()
    p.script("default", [Fail("rate_limit", retry_after=7.0)])
    async with Router.open(make_config(cfg), providers={"p": p, "q": q}) as router:
        resp = await router.submit(req("m1"))
        assert (resp.provider, resp.key_id, resp.model) == ("q", "default", "m2")
        assert lane(router, "p", "default", "up1").cooling_for == pytest.approx(7.0)
        qk = key(router, "q", "default")
        assert qk.cooling_for == 0
        assert qk.cooling_reason is None

        # q's "default" is callable directly.
        resp = await router.submit(req("m2"))
        assert (resp.provider, resp.key_id) == ("q", "default")

        # m1's only key is cooling: skipped with no call, the fallback serves.
        await trio.sleep(1.0)
        resp = await router.submit(req("m1"))
        assert (resp.provider, resp.model) == ("q", "m2")
        assert len(p.calls) == 1
        assert [a.model for a in resp.attempts] == ["m2"]


async def test_all_keys_of_model_cooling_moves_to_fallback_without_calling_them(
    autojump_clock,
):
    p, q = ScriptedProvider(), ScriptedProvider()
    p.script("a", [Fail("rate_limit", retry_after=30.0)])
    p.script("b", [Fail("rate_limit", retry_after=30.0)])
    async with two_key_router(p, q) as router:
        resp = await router.submit(req())
        assert (resp.provider, resp.key_id, resp.model) == ("q", "c", "m2")
        assert [a.outcome for a in resp.attempts] == ["rate_limit", "rate_limit", "ok"]
        await trio.sleep(10.0)
        resp = await router.submit(req())
        assert (resp.provider, resp.key_id, resp.model) == ("q", "c", "m2")
        assert len(p.calls) == 2
        assert len(q.calls) == 2


async def test_everything_cooling_gives_chain_exhausted_with_shortest_retry_after(
    autojump_clock,
):
    p, q = ScriptedProvider(), ScriptedProvider()
    p.script("a", [Fail("rate_limit", retry_after=7.0)])
    p.script("b", [Fail("rate_limit", retry_after=20.0)])
    q.script("c", [Fail("rate_limit", retry_after=20.0)])
    async with two_key_router(p, q) as router:
        t0 = trio.current_time()
        with pytest.raises(ChainExhaustedError) as info:
            await router.submit(req())
        err = info.value
        assert err.models_tried == 2
        assert err.retry_after == pytest.approx(7.0)
        assert err.kind == "rate_limit"
        assert "cooling" in err.message
        assert [a.outcome for a in err.attempts] == ["rate_limit"] * 3
        assert err.last_error is not None and err.last_error.kind == "rate_limit"

        # Later, nothing is even attempted, and the wait has shrunk by the elapsed time.
        await trio.sleep_until(t0 + 3.0)
        with pytest.raises(ChainExhaustedError) as info:
            await router.submit(req())
        err = info.value
        assert err.retry_after == pytest.approx(4.0)
        assert err.kind == "rate_limit"
        assert err.attempts == []
        assert "cooling" in err.message
        assert "4.00s" in err.message
        assert len(p.calls) + len(q.calls) == 3


# -- transient and unknown --------------------------------------------------------------


async def test_transient_retried_in_place_with_backoff_then_next_model(autojump_clock):
    p, q = ScriptedProvider(), ScriptedProvider()
    p.set_default("a", Fail("transient", status=503))
    async with two_key_router(p, q) as router:
        t0 = trio.current_time()
        resp = await router.submit(req())
        # 1 + transient_retries calls to the same key, sleeping 0.5 s then 2 s.
        assert [c.key_id for c in p.calls] == ["a", "a", "a"]
        assert [c.time - t0 for c in p.calls] == pytest.approx([0.0, 0.5, 2.5])
        # Then the next MODEL, not key b of the same model.
        assert p.calls_to("b") == 0
        assert (resp.provider, resp.key_id, resp.model) == ("q", "c", "m2")
        assert q.calls[0].time - t0 == pytest.approx(2.5)
        assert [a.outcome for a in resp.attempts] == ["transient"] * 3 + ["ok"]
        assert [a.status for a in resp.attempts[:3]] == [503] * 3
        # Each attempt records the backoff slept before it (the gateway leaves it out
        # of the router's overhead).
        assert [a.backoff for a in resp.attempts] == pytest.approx([0.0, 0.5, 2.0, 0.0])


async def test_transient_with_zero_retries_from_config(autojump_clock):
    cfg = TWO_KEYS.replace("transient_retries = 2", "transient_retries = 0")
    p, q = ScriptedProvider(), ScriptedProvider()
    p.set_default("a", Fail("transient"))
    async with Router.open(make_config(cfg), providers={"p": p, "q": q}) as router:
        resp = await router.submit(req())
        assert [c.key_id for c in p.calls] == ["a"]
        assert (resp.model, resp.key_id) == ("m2", "c")


async def test_unknown_retried_like_transient_advances_and_does_not_mark_model(
    autojump_clock,
):
    cfg = TWO_KEYS + "[router.breaker]\nfailure_threshold = 1\n"
    cfg = cfg.replace("[router]\ntransient_retries = 2", "[router]\ntransient_retries = 1")
    p, q = ScriptedProvider(), ScriptedProvider()
    p.script("a", [Fail("unknown"), Fail("unknown")])
    async with Router.open(make_config(cfg), providers={"p": p, "q": q}) as router:
        t0 = trio.current_time()
        resp = await router.submit(req())
        assert [c.key_id for c in p.calls] == ["a", "a"]
        assert [c.time - t0 for c in p.calls] == pytest.approx([0.0, 0.5])
        assert resp.model == "m2"
        assert model(router, "m").health == "healthy"
        assert key(router, "p", "a").breaker == "closed"
        assert lane(router, "p", "a").breaker == "closed"

        # The model was not marked: the next request goes to it again.
        resp = await router.submit(req())
        assert (resp.model, resp.key_id) == ("m", "a")

        # Whereas a transient failure opens the lane (failure_threshold = 1); with key
        # b untouched the model is still callable on b.
        p.script("a", [Fail("transient"), Fail("transient")])
        resp = await router.submit(req())
        assert resp.model == "m2"
        assert lane(router, "p", "a").breaker == "open"
        assert model(router, "m").health == "healthy"
        p.script("b", [Fail("transient"), Fail("transient")])
        resp = await router.submit(req())
        assert [c.key_id for c in p.calls[-2:]] == ["b", "b"]
        assert resp.model == "m2"
        # Now no key can serve m: it is cooling until the first lane half-opens.
        assert model(router, "m").health == "cooling"
        assert model(router, "m").remaining == pytest.approx(30.0, abs=1.0)
        n = len(p.calls)
        resp = await router.submit(req())
        assert resp.model == "m2"
        assert len(p.calls) == n


async def test_unexpected_exception_is_unknown(autojump_clock):
    class Boom:
        async def complete(self, request, key):
            raise RuntimeError("kaboom")

    cfg = TWO_KEYS.replace("transient_retries = 2", "transient_retries = 0")
    q = ScriptedProvider()
    async with Router.open(make_config(cfg), providers={"p": Boom(), "q": q}) as router:
        resp = await router.submit(req())
        assert resp.model == "m2"
        assert resp.attempts[0].outcome == "unknown"
        assert model(router, "m").health == "healthy"


# -- errors that propagate ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bad_request", "context_exceeded", "content_filter"])
async def test_caller_errors_propagate_after_one_attempt(autojump_clock, kind):
    p, q = ScriptedProvider(), ScriptedProvider()
    p.script("a", [Fail(kind, status=400, message=f"nope {kind}")])
    async with two_key_router(p, q) as router:
        with pytest.raises(ProviderError) as info:
            await router.submit(req())
        err = info.value
        assert err.kind == kind
        assert f"nope {kind}" in err.message
        assert (err.provider, err.key_id, err.model) == ("p", "a", "m")
        assert len(err.attempts) == 1
        assert err.attempts[0].outcome == kind
        assert err.attempts[0].key_id == "a"
        assert len(p.calls) == 1
        assert q.calls == []
        a = key(router, "p", "a")
        assert a.breaker == "closed"
        assert a.cooling_for == 0
        assert model(router, "m").health == "healthy"


# -- model missing --------------------------------------------------------------------------


async def test_model_missing_disables_model_and_later_requests_skip_it(autojump_clock):
    p, q = ScriptedProvider(), ScriptedProvider()
    p.script("a", [Fail("model_missing", status=404)])
    async with two_key_router(p, q) as router:
        resp = await router.submit(req())
        assert resp.model == "m2"
        # Not a key problem: key b of the same model was not tried.
        assert [c.key_id for c in p.calls] == ["a"]
        m = model(router, "m")
        assert m.health == "disabled"
        assert m.remaining == pytest.approx(router.config.router.health.disabled_for)
        assert key(router, "p", "a").cooling_for == 0

        resp = await router.submit(req())
        assert resp.model == "m2"
        assert len(p.calls) == 1


# -- max_tokens ceiling -----------------------------------------------------------------------


async def test_max_tokens_retried_once_without_max_tokens(autojump_clock):
    p, q = ScriptedProvider(), ScriptedProvider()
    p.script("a", [Fail("max_tokens", status=400)])
    async with two_key_router(p, q) as router:
        resp = await router.submit(req(max_tokens=100_000))
        assert (resp.key_id, resp.model) == ("a", "m")
        assert [(c.key_id, c.max_tokens) for c in p.calls] == [("a", 100_000), ("a", None)]
        assert [a.outcome for a in resp.attempts] == ["max_tokens", "ok"]
        assert q.calls == []


async def test_max_tokens_failing_again_propagates_clear_error(autojump_clock):
    p, q = ScriptedProvider(), ScriptedProvider()
    p.script("a", [Fail("max_tokens"), Fail("max_tokens", message="still too big")])
    async with two_key_router(p, q) as router:
        with pytest.raises(ProviderError) as info:
            await router.submit(req(max_tokens=100_000))
        err = info.value
        assert err.kind == "max_tokens"
        assert "max_tokens" in err.message
        assert "still too big" in err.message
        assert "'m'" in err.message
        assert [(c.key_id, c.max_tokens) for c in p.calls] == [("a", 100_000), ("a", None)]
        assert [a.outcome for a in err.attempts] == ["max_tokens", "max_tokens"]
        assert q.calls == []


# -- auth and balance -------------------------------------------------------------------------


async def test_auth_cools_key_long_counts_breaker_failure_and_next_key_serves(
    autojump_clock,
):
    cfg = TWO_KEYS + "[router.breaker]\nfailure_threshold = 1\n"
    p, q = ScriptedProvider(), ScriptedProvider()
    p.script("a", [Fail("auth", status=401)])
    async with Router.open(make_config(cfg), providers={"p": p, "q": q}) as router:
        resp = await router.submit(req())
        assert (resp.key_id, resp.model) == ("b", "m")
        a = key(router, "p", "a")
        assert a.cooling_reason == "auth"
        assert a.cooling_for == pytest.approx(router.config.router.cooldown.auth)
        # A breaker failure: with failure_threshold = 1 it opened.
        assert a.breaker == "open"
        assert a.opens == 1
        assert a.failures == 1


async def test_balance_cools_key_for_balance_duration_and_next_key_serves(autojump_clock):
    cfg = TWO_KEYS + "[router.breaker]\nfailure_threshold = 1\n"
    p, q = ScriptedProvider(), ScriptedProvider()
    p.script("a", [Fail("balance", status=402)])
    async with Router.open(make_config(cfg), providers={"p": p, "q": q}) as router:
        t0 = trio.current_time()
        resp = await router.submit(req())
        assert (resp.key_id, resp.model) == ("b", "m")
        a = key(router, "p", "a")
        assert a.cooling_reason == "balance"
        assert a.cooling_for == pytest.approx(router.config.router.cooldown.balance)
        assert a.breaker == "closed"  # out of credit is not an outage
        await trio.sleep_until(t0 + router.config.router.cooldown.balance - 1)
        resp = await router.submit(req())
        assert resp.key_id == "b"
        assert p.calls_to("a") == 1


# -- the response -------------------------------------------------------------------------------


async def test_response_names_who_served_and_lists_every_attempt(autojump_clock):
    p, q = ScriptedProvider(), ScriptedProvider()
    p.script("a", [Fail("rate_limit", latency=0.25)])
    p.script("b", [Fail("transient", latency=1.0), Fail("transient", latency=1.0)])
    p.script("b", [Fail("transient", latency=1.0)])
    q.script("c", [Reply(latency=0.5)])
    async with two_key_router(p, q) as router:
        resp = await router.submit(req())
        assert isinstance(resp, ChatResponse)
        assert (resp.model, resp.provider, resp.key_id) == ("m2", "q", "c")
        assert resp.upstream_model == "up-m2"
        assert resp.content == "ok from c"
        got = [(a.model, a.provider, a.key_id, a.outcome) for a in resp.attempts]
        assert got == [
            ("m", "p", "a", "rate_limit"),
            ("m", "p", "b", "transient"),
            ("m", "p", "b", "transient"),
            ("m", "p", "b", "transient"),
            ("m2", "q", "c", "ok"),
        ]
        assert [a.duration for a in resp.attempts] == pytest.approx([0.25, 1, 1, 1, 0.5])
        # The provider saw upstream ids, not aliases.
        assert {c.model for c in p.calls} == {"up-m"}
        assert {c.model for c in q.calls} == {"up-m2"}


# -- the chain ------------------------------------------------------------------------------------

CHAIN = """
[router]
transient_retries = 0
fallbacks = ["g1", "f1", "p/direct-g"]
[[providers]]
name = "p"
kind = "custom"
keys = [{ id = "k" }]
[[models]]
name = "m"
provider = "p"
upstream = "up-m"
fallbacks = ["f1", "r1", "f2"]
[[models]]
name = "f1"
provider = "p"
upstream = "up-f1"
[[models]]
name = "f2"
provider = "p"
upstream = "up-f2"
[[models]]
name = "r1"
provider = "p"
upstream = "up-r1"
[[models]]
name = "g1"
provider = "p"
upstream = "up-g1"
"""


async def test_chain_order_is_request_then_model_then_global_deduplicated(autojump_clock):
    p = ScriptedProvider(default=Fail("unknown"))
    async with Router.open(make_config(CHAIN), providers={"p": p}) as router:
        with pytest.raises(ChainExhaustedError) as info:
            await router.submit(req("m", fallbacks=[" r1 ", "p/direct-r", "m", ""]))
        order = [c.model for c in p.calls]
        assert order == [
            "up-m",
            "up-r1",
            "direct-r",
            "up-f1",
            "up-f2",
            "up-g1",
            "direct-g",
        ]
        assert info.value.models_tried == 7
        assert [a.model for a in info.value.attempts] == [
            "m",
            "r1",
            "p/direct-r",
            "f1",
            "f2",
            "g1",
            "p/direct-g",
        ]


async def test_provider_slash_upstream_addressing_without_models_entry(autojump_clock):
    p = ScriptedProvider()
    async with Router.open(make_config(CHAIN), providers={"p": p}) as router:
        resp = await router.submit(req("p/some-upstream-id"))
        assert resp.model == "p/some-upstream-id"
        assert resp.upstream_model == "some-upstream-id"
        assert p.calls[0].model == "some-upstream-id"


async def test_unknown_model_raises_before_any_call(autojump_clock):
    p = ScriptedProvider()
    async with Router.open(make_config(CHAIN), providers={"p": p}) as router:
        with pytest.raises(UnknownModelError) as info:
            await router.submit(req("nope"))
        assert info.value.kind == "model_missing"
        assert info.value.field == "model"
        # An unknown fallback (unknown provider) fails the same way, before any call.
        with pytest.raises(UnknownModelError) as info:
            await router.submit(req("m", fallbacks=["zz/x"]))
        assert info.value.field == "fallbacks[0]"
        assert p.calls == []


@pytest.mark.parametrize(
    ("field", "kw"),
    [
        ("messages", {"messages": []}),
        ("max_tokens", {"max_tokens": 0}),
        ("temperature", {"temperature": 3.0}),
        ("model", {"model": "  "}),
        ("timeout", {"timeout": 0.0}),
    ],
)
async def test_invalid_request_names_field_and_makes_no_call(autojump_clock, field, kw):
    p = ScriptedProvider()
    base = {"model": "m", "messages": [Message("user", "hi")]}
    base.update(kw)
    async with Router.open(make_config(CHAIN), providers={"p": p}) as router:
        with pytest.raises(InvalidRequestError) as info:
            await router.submit(ChatRequest(**base))  # type: ignore[arg-type]
        assert info.value.field == field
        assert field in str(info.value)
        assert info.value.kind == "bad_request"
        assert p.calls == []
