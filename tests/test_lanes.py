"""Failover at the right grain, through the real Router: the configuration a newcomer
writes first (one provider, one key, several models, the defaults), where a model's
rate limit or outage must never block the other models of the key.

Every test drives real key actors with a ScriptedProvider under a virtual clock.
"""

from __future__ import annotations

import pytest
import trio
from scripted import (
    Fail,
    Hang,
    Reply,
    ScriptedProvider,
    StreamingScriptedProvider,
    StreamScript,
    make_config,
)

from router import (
    ChainExhaustedError,
    ChatRequest,
    ChatResponse,
    LaneSnapshot,
    Message,
    ModelSnapshot,
    ProviderError,
    Router,
    StreamChunk,
)
from router._config import RouterSettings

# One provider, one key, several models; x falls back to y, all with default settings.
ONE_KEY = """
[[providers]]
name = "p"
kind = "custom"
keys = [{ id = "k" }]
[[models]]
name = "x"
provider = "p"
upstream = "ux"
fallbacks = ["y"]
[[models]]
name = "y"
provider = "p"
upstream = "uy"
[[models]]
name = "z"
provider = "p"
upstream = "uz"
"""

DEFAULTS = RouterSettings()


def req(model: str = "x", **kw: object) -> ChatRequest:
    return ChatRequest(model=model, messages=[Message("user", "hi")], **kw)  # type: ignore[arg-type]


def lane(router: Router, upstream: str, key_id: str = "k") -> LaneSnapshot:
    (k,) = [k for k in router.snapshot().keys if k.key_id == key_id]
    (snap,) = [x for x in k.lanes if x.model == upstream]
    return snap


def model(router: Router, name: str) -> ModelSnapshot:
    (snap,) = [m for m in router.snapshot().models if m.name == name]
    return snap


def one_key(sp: ScriptedProvider, extra: str = ""):
    return Router.open(make_config(extra + ONE_KEY), providers={"p": sp})


def served(resp: ChatResponse) -> list[tuple[str, str]]:
    return [(a.model, a.outcome) for a in resp.attempts]


# -- a model's failure stays on its lane ---------------------------------------------------------


async def test_429_on_one_model_leaves_the_other_models_of_the_key_served(autojump_clock):
    sp = ScriptedProvider()
    sp.script("k/uz", [Fail("rate_limit", retry_after=30.0, status=429)])
    async with one_key(sp) as router:
        with pytest.raises(ChainExhaustedError):
            await router.submit(req("z"))  # no fallback; 30 s is too long to wait
        assert lane(router, "uz").cooling_for == pytest.approx(30.0)
        t0 = trio.current_time()
        resp = await router.submit(req("y"))
        assert trio.current_time() == t0  # no extra latency
        assert served(resp) == [("y", "ok")]
        resp = await router.submit(req("x"))
        assert served(resp) == [("x", "ok")]
        snap = router.snapshot()
        (k,) = snap.keys
        assert (k.cooling_for, k.breaker) == (0.0, "closed")
        assert model(router, "z").health == "cooling"
        assert model(router, "y").health == "healthy"
        # And z is skipped without a call while its lane cools.
        calls = len(sp.calls)
        with pytest.raises(ChainExhaustedError) as info:
            await router.submit(req("z"))
        assert len(sp.calls) == calls
        assert info.value.retry_after == pytest.approx(30.0)


async def test_503_burst_opens_one_lane_and_the_fallback_on_the_same_key_serves(autojump_clock):
    sp = ScriptedProvider()
    sp.set_default("k", Reply())
    sp.script("k/ux", [Fail("transient", status=503)] * 100)
    async with one_key(sp) as router:
        for _ in range(DEFAULTS.breaker.failure_threshold):
            resp = await router.submit(req("x"))
            assert resp.model == "y"
        assert lane(router, "ux").breaker == "open"
        assert lane(router, "uy").breaker == "closed"
        (k,) = router.snapshot().keys
        assert k.breaker == "closed"
        # The open lane is skipped: the fallback on the same key answers at once.
        calls = sp.calls_to("k", "ux")
        t0 = trio.current_time()
        resp = await router.submit(req("x"))
        assert (served(resp), trio.current_time()) == ([("y", "ok")], t0)
        assert sp.calls_to("k", "ux") == calls
        assert served(await router.submit(req("z"))) == [("z", "ok")]


async def test_auth_failure_blocks_every_model_of_the_key(autojump_clock):
    sp = ScriptedProvider()
    sp.script("k/uz", [Fail("auth", status=401)])
    async with one_key(sp) as router:
        with pytest.raises(ChainExhaustedError):
            await router.submit(req("z"))
        (k,) = router.snapshot().keys
        assert (k.cooling_reason, k.cooling_for) == ("auth", DEFAULTS.cooldown.auth)
        calls = len(sp.calls)
        for name in ("x", "y", "z"):
            with pytest.raises(ChainExhaustedError) as info:
                await router.submit(req(name))
            assert info.value.retry_after == pytest.approx(DEFAULTS.cooldown.auth)
        assert len(sp.calls) == calls


async def test_connection_failure_blocks_every_model_of_the_key(autojump_clock):
    sp = ScriptedProvider()
    sp.script("k/uz", [Fail("transient", key_wide=True)] * 50)
    async with one_key(sp, "[router.breaker]\nfailure_threshold = 1\n") as router:
        with pytest.raises(ChainExhaustedError):
            await router.submit(req("z"))
        (k,) = router.snapshot().keys
        assert k.breaker == "open"
        assert lane(router, "uz").breaker == "closed"
        calls = len(sp.calls)
        with pytest.raises(ChainExhaustedError):
            await router.submit(req("y"))
        assert len(sp.calls) == calls


async def test_lanes_are_bounded_per_key(autojump_clock):
    sp = ScriptedProvider()
    sp.script("k/u0", [Fail("rate_limit", retry_after=100.0)])
    async with one_key(sp, "[router]\nlanes_per_key = 4\n") as router:
        with pytest.raises(ChainExhaustedError):
            await router.submit(req("p/u0"))
        for i in range(1, 20):
            await router.submit(req(f"p/u{i}"))
        (k,) = router.snapshot().keys
        assert len(k.lanes) == 4
        # The cooling lane is kept; healthy ones are dropped first.
        assert "u0" in {x.model for x in k.lanes}
        with pytest.raises(ChainExhaustedError):
            await router.submit(req("p/u0"))
        assert sp.calls_to("k", "u0") == 1


# -- probes ------------------------------------------------------------------------------------


async def test_failed_half_open_probe_is_one_call_and_the_request_is_served_elsewhere(
    autojump_clock,
):
    sp = ScriptedProvider()
    sp.script("k/ux", [Fail("transient", status=503)] * 100)
    async with one_key(sp) as router:
        for _ in range(DEFAULTS.breaker.failure_threshold):
            await router.submit(req("x"))
        assert lane(router, "ux").breaker == "open"
        await trio.sleep(lane(router, "ux").breaker_open_for)
        assert lane(router, "ux").breaker == "half_open"
        before = sp.calls_to("k", "ux")
        resp = await router.submit(req("x"))
        assert sp.calls_to("k", "ux") == before + 1  # the probe, and no in-place retry
        assert served(resp) == [("x", "transient"), ("y", "ok")]
        assert lane(router, "ux").breaker == "open"


# -- time budgeted across the chain ---------------------------------------------------------------


async def test_silent_primary_with_default_timeouts_answers_from_the_fallback(autojump_clock):
    sp = ScriptedProvider()
    sp.script("k/ux", [Hang()] * 10)
    async with one_key(sp) as router:
        t0 = trio.current_time()
        resp = await router.submit(req("x"))
        elapsed = trio.current_time() - t0
        assert served(resp) == [("x", "transient"), ("y", "ok")]
        assert sp.calls_to("k", "ux") == 1
        assert elapsed == pytest.approx(DEFAULTS.attempt_timeout)
        assert elapsed < DEFAULTS.timeout


async def test_fast_failures_are_retried_in_place_with_the_defaults(autojump_clock):
    # A fast 503 with a fallback callable: the defaults hold two in-place retries plus
    # one attempt elsewhere, so a blip is ridden out on the primary.
    sp = ScriptedProvider()
    sp.script("k/ux", [Fail("transient", status=503)] * 2)
    async with one_key(sp) as router:
        resp = await router.submit(req("x"))
        assert served(resp) == [("x", "transient"), ("x", "transient"), ("x", "ok")]


# -- short Retry-After waits ----------------------------------------------------------------------


async def test_short_retry_after_is_waited_out_on_the_same_model(autojump_clock):
    sp = ScriptedProvider()
    sp.script("k/ux", [Fail("rate_limit", retry_after=2.0, status=429)])
    async with one_key(sp) as router:
        t0 = trio.current_time()
        resp = await router.submit(req("x"))
        assert served(resp) == [("x", "rate_limit"), ("x", "ok")]
        calls = [c for c in sp.calls if c.model == "ux"]
        assert len(calls) == 2
        assert calls[1].time - t0 >= 2.0
        assert sp.calls_to("k", "uy") == 0  # no fallback
        # The lane still cools for others (max(Retry-After, 5 s)); the success reset
        # its backoff count.
        assert lane(router, "ux").rate_limit_hits == 0


async def test_long_retry_after_falls_back_at_once(autojump_clock):
    sp = ScriptedProvider()
    sp.script("k/ux", [Fail("rate_limit", retry_after=30.0, status=429)])
    async with one_key(sp) as router:
        t0 = trio.current_time()
        resp = await router.submit(req("x"))
        assert served(resp) == [("x", "rate_limit"), ("y", "ok")]
        assert trio.current_time() == t0


async def test_short_retry_after_prefers_a_sibling_key_now(autojump_clock):
    cfg = ONE_KEY.replace('keys = [{ id = "k" }]', 'keys = [{ id = "k" }, { id = "k2" }]')
    sp = ScriptedProvider()
    sp.script("k/ux", [Fail("rate_limit", retry_after=2.0, status=429)])
    async with Router.open(make_config(cfg), providers={"p": sp}) as router:
        t0 = trio.current_time()
        resp = await router.submit(req("x"))
        assert [(a.key_id, a.outcome) for a in resp.attempts] == [
            ("k", "rate_limit"),
            ("k2", "ok"),
        ]
        assert trio.current_time() == t0


async def test_short_wait_is_taken_once_only(autojump_clock):
    sp = ScriptedProvider()
    sp.script("k/ux", [Fail("rate_limit", retry_after=1.0, status=429)] * 2)
    async with one_key(sp) as router:
        resp = await router.submit(req("x"))
        assert served(resp) == [("x", "rate_limit"), ("x", "rate_limit"), ("y", "ok")]


async def test_short_wait_that_the_deadline_cannot_hold_falls_back(autojump_clock):
    sp = ScriptedProvider()
    sp.script("k/ux", [Fail("rate_limit", retry_after=2.0, status=429)])
    async with one_key(sp) as router:
        resp = await router.submit(req("x", timeout=1.5))
        assert served(resp) == [("x", "rate_limit"), ("y", "ok")]


# -- recovery ---------------------------------------------------------------------------------


async def test_traffic_returns_within_30s_of_recovery_after_a_one_minute_outage(autojump_clock):
    outage = 60.0
    failed_at: list[float] = []

    class Outage(ScriptedProvider):
        async def complete(self, request, key):  # type: ignore[no-untyped-def]
            now = trio.current_time() - t0
            if request.model == "ux" and now < outage:
                failed_at.append(now)
                raise ProviderError("transient", "503 overloaded", status=503)
            return await super().complete(request, key)

    sp = Outage()
    async with one_key(sp) as router:
        t0 = trio.current_time()
        back: float | None = None
        while trio.current_time() - t0 < 300:
            resp = await router.submit(req("x"))
            assert resp.model in ("x", "y")  # every request is answered
            if resp.model == "x" and trio.current_time() - t0 >= outage:
                back = trio.current_time() - t0
                break
            await trio.sleep(0.25)
        assert back is not None
        assert back - outage <= 30.0
        # Once the lane opened, a down upstream saw at most one probe per open period.
        # (Each request that failed made 1 + transient_retries calls before the lane's
        # breaker heard one failure.)
        opened = failed_at[DEFAULTS.breaker.failure_threshold * 3 - 1]
        probes = [t for t in failed_at if t > opened]
        shortest_open = DEFAULTS.breaker.open_for * (1 - DEFAULTS.breaker.jitter)
        assert 1 <= len(probes) <= 1 + (outage - opened) / shortest_open
        gaps = [b - a for a, b in zip([opened, *probes], probes, strict=False)]
        assert all(g >= shortest_open for g in gaps)


# -- upstream context-length errors ------------------------------------------------------------


CONTEXT = """
[router]
context_window_fallbacks = { "x" = "big" }
[[models]]
name = "big"
provider = "p"
upstream = "ubig"
"""


async def test_upstream_context_error_goes_once_to_the_context_fallback(autojump_clock):
    sp = ScriptedProvider()
    sp.script("k/ux", [Fail("context_exceeded", status=400, message="context_length_exceeded")])
    async with Router.open(make_config(ONE_KEY + CONTEXT), providers={"p": sp}) as router:
        resp = await router.submit(req("x"))
        assert served(resp) == [("x", "context_exceeded"), ("big", "ok")]
        assert [c.model for c in sp.calls] == ["ux", "ubig"]


async def test_upstream_context_error_without_a_fallback_is_one_attempt_and_raised(
    autojump_clock,
):
    sp = ScriptedProvider()
    sp.script("k/uy", [Fail("context_exceeded", status=400, message="prompt is too long")])
    async with one_key(sp) as router:
        with pytest.raises(ProviderError) as info:
            await router.submit(req("y", fallbacks=["z"]))
        assert info.value.kind == "context_exceeded"
        assert "prompt is too long" in info.value.message
        assert [c.model for c in sp.calls] == ["uy"]


async def test_context_fallback_is_never_sent_the_same_prompt_twice(autojump_clock):
    sp = ScriptedProvider()
    sp.script("k/ux", [Fail("context_exceeded", status=400)])
    sp.script("k/ubig", [Fail("context_exceeded", status=400)])
    cfg = ONE_KEY + CONTEXT.replace('{ "x" = "big" }', '{ "x" = "big", "big" = "x" }')
    async with Router.open(make_config(cfg), providers={"p": sp}) as router:
        with pytest.raises(ProviderError) as info:
            await router.submit(req("x"))
        assert info.value.kind == "context_exceeded"
        assert [c.model for c in sp.calls] == ["ux", "ubig"]


# -- streams ------------------------------------------------------------------------------------


async def test_stream_that_finishes_then_loses_its_connection_is_complete(autojump_clock):
    class FinishThenDrop(StreamingScriptedProvider):
        async def stream(self, request, key):  # type: ignore[no-untyped-def]
            yield StreamChunk(text="whole ")
            yield StreamChunk(text="answer", finish_reason="stop")
            raise ProviderError("transient", "connection lost before the end marker")

    sp = FinishThenDrop()
    async with one_key(sp) as router:
        async with router.stream(req("x")) as stream:
            text = "".join([c.text async for c in stream])
        assert (text, stream.finish_reason) == ("whole answer", "stop")
        assert lane(router, "ux").failures == 0


async def test_stream_429_on_one_model_leaves_the_other_streaming(autojump_clock):
    sp = StreamingScriptedProvider()
    sp.script("k/uz", [Fail("rate_limit", retry_after=60.0, status=429)])
    sp.set_default("k", StreamScript())
    async with one_key(sp) as router:
        with pytest.raises(ChainExhaustedError):
            async with router.stream(req("z")):
                pass
        async with router.stream(req("y")) as stream:
            assert "".join([c.text async for c in stream]) == "hello world"


async def test_a_probe_retried_without_max_tokens_frees_its_slot_once(autojump_clock):
    sp = ScriptedProvider()
    sp.script("k/ux", [Fail("transient", status=503)] * 15)
    async with one_key(sp) as router:
        for _ in range(DEFAULTS.breaker.failure_threshold):
            await router.submit(req("x"))
        await trio.sleep(lane(router, "ux").breaker_open_for)
        # The probe is refused for its max_tokens, retried once without, and answered.
        sp.script("k/ux", [Fail("max_tokens", status=400), Reply(latency=1.0)])
        resp = await router.submit(req("x", max_tokens=10_000))
        assert served(resp) == [("x", "max_tokens"), ("x", "ok")]
        assert lane(router, "ux").breaker == "half_open"  # 1 of success_threshold 2
        # Exactly one probe at a time is still admitted.
        sp.set_default("k", Reply(latency=1.0))
        before = sp.calls_to("k", "ux")
        results: list[str] = []

        async def one() -> None:
            results.append((await router.submit(req("x"))).model)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
        assert sp.calls_to("k", "ux") == before + 1
        assert sorted(results) == ["x", "y", "y"]
