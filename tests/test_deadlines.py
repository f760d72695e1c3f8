"""Time through the real Router: the end-to-end deadline, attempt timeouts, caller
cancellation, concurrency inside one key actor, and closing under load."""

from __future__ import annotations

from collections import Counter

import pytest
import trio
from scripted import Fail, Hang, Reply, ScriptedProvider, make_config

from router import (
    ChainExhaustedError,
    ChatRequest,
    DeadlineExceededError,
    KeySnapshot,
    LaneSnapshot,
    Message,
    ModelSnapshot,
    Router,
    RouterClosedError,
)
from router._config import RouterSettings

THREE_MODELS = """
[router]
timeout = 60
attempt_timeout = {attempt_timeout}
transient_retries = {retries}
[[providers]]
name = "p1"
kind = "custom"
keys = [{{ id = "k1" }}]
[[providers]]
name = "p2"
kind = "custom"
keys = [{{ id = "k2" }}]
[[providers]]
name = "p3"
kind = "custom"
keys = [{{ id = "k3" }}]
[[models]]
name = "m1"
provider = "p1"
upstream = "u1"
fallbacks = ["m2", "m3"]
[[models]]
name = "m2"
provider = "p2"
upstream = "u2"
[[models]]
name = "m3"
provider = "p3"
upstream = "u3"
"""

ONE_KEY = """
[router]
attempt_timeout = 30
[router.breaker]
failure_threshold = 1
[[providers]]
name = "p"
kind = "custom"
max_concurrency = {conc}
keys = [{{ id = "k" }}]
[[models]]
name = "m"
provider = "p"
upstream = "u"
"""


def req(model: str = "m1", **kw: object) -> ChatRequest:
    return ChatRequest(model=model, messages=[Message("user", "hi")], **kw)  # type: ignore[arg-type]


def key(router: Router, provider: str, key_id: str) -> KeySnapshot:
    (snap,) = [k for k in router.snapshot().keys if k.provider == provider and k.key_id == key_id]
    return snap


def lane(router: Router, provider: str, key_id: str, upstream: str) -> LaneSnapshot:
    (snap,) = [x for x in key(router, provider, key_id).lanes if x.model == upstream]
    return snap


def model(router: Router, name: str) -> ModelSnapshot:
    (snap,) = [m for m in router.snapshot().models if m.name == name]
    return snap


def three(sp: ScriptedProvider, attempt_timeout: float = 30, retries: int = 0):
    cfg = make_config(THREE_MODELS.format(attempt_timeout=attempt_timeout, retries=retries))
    return Router.open(cfg, providers={"p1": sp, "p2": sp, "p3": sp})


def worker_tasks() -> int:
    """Key-actor worker tasks alive anywhere in the task tree."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task.name == "router.KeyActor.worker":
            count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def busy_workers(router: Router) -> int:
    """Workers serving a job; idle workers wait, parked, for the next one."""
    busy = sum(a.busy for rt in router._runtimes.values() for a in rt.actors)
    assert busy <= worker_tasks()
    return busy


class Recorder:
    """A provider that never answers and records how each call ended."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.finished = 0

    async def complete(self, request, key):
        self.started += 1
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.finished += 1


# -- the end-to-end deadline -------------------------------------------------------------


async def test_one_deadline_across_attempt_timeouts_and_fallbacks(autojump_clock):
    sp = ScriptedProvider(default=Hang())
    async with three(sp, attempt_timeout=3) as router:
        t0 = trio.current_time()
        with pytest.raises(DeadlineExceededError) as info:
            await router.submit(req(timeout=5.0))
        assert trio.current_time() - t0 == pytest.approx(5.0)
        err = info.value
        assert err.timeout == 5.0
        assert "5s" in err.message
        got = [(a.model, a.key_id, a.outcome) for a in err.attempts]
        assert got == [("m1", "k1", "transient"), ("m2", "k2", "deadline")]
        assert [a.duration for a in err.attempts] == pytest.approx([3.0, 2.0])
        assert [c.key_id for c in sp.calls] == ["k1", "k2"]
        # The deadline cut on k2 is not the provider's fault.
        k2 = key(router, "p2", "k2")
        assert (k2.failures, k2.in_flight, k2.breaker) == (0, 0, "closed")
        assert key(router, "p1", "k1").failures == 1
        assert busy_workers(router) == 0


async def test_deadline_holds_across_in_place_retries_of_slow_failures(autojump_clock):
    # m3 has no fallback: nothing else could take the request, so it retries in place.
    sp = ScriptedProvider(default=Fail("transient", latency=1.0))
    async with three(sp, retries=2) as router:
        router_timeout = 5.0
        t0 = trio.current_time()
        with pytest.raises(DeadlineExceededError) as info:
            await router.submit(req("m3", timeout=router_timeout))
        assert trio.current_time() - t0 == pytest.approx(5.0)
        # k3 at 0 (fails at 1), +0.5 -> 1.5 (fails at 2.5), +2 -> 4.5, cut at 5.
        assert [c.time - t0 for c in sp.calls] == pytest.approx([0.0, 1.5, 4.5])
        assert [a.outcome for a in info.value.attempts] == ["transient", "transient", "deadline"]
        assert {c.key_id for c in sp.calls} == {"k3"}


async def test_no_in_place_retry_that_the_deadline_cannot_hold_with_a_fallback(autojump_clock):
    # With fallbacks callable, a retry needs its backoff plus two attempt timeouts
    # (its own and one elsewhere) left: 0.5 + 2 * 30 > 5, so the request moves on.
    sp = ScriptedProvider(default=Fail("transient", latency=1.0))
    sp.set_default("k3", Reply())
    async with three(sp, retries=2) as router:
        t0 = trio.current_time()
        resp = await router.submit(req(timeout=5.0))
        assert (resp.model, resp.key_id) == ("m3", "k3")
        assert [c.key_id for c in sp.calls] == ["k1", "k2", "k3"]
        assert trio.current_time() - t0 == pytest.approx(2.0)
    # With room for one (attempt_timeout 1.5: 0.5 + 3 <= 4 left after the first
    # failure, but not 2 + 3 <= 2.5 after the second), it retries in place once.
    async with three(sp, retries=2, attempt_timeout=1.5) as router:
        resp = await router.submit(req(timeout=5.0))
        assert [c.key_id for c in sp.calls[3:]] == ["k1", "k1", "k2", "k3"]


async def test_deadline_across_three_models_failing_slowly(autojump_clock):
    sp = ScriptedProvider(default=Fail("transient", latency=2.0))
    async with three(sp, retries=0) as router:
        t0 = trio.current_time()
        with pytest.raises(DeadlineExceededError) as info:
            await router.submit(req(timeout=5.0))
        assert trio.current_time() - t0 == pytest.approx(5.0)
        got = [(a.model, a.outcome) for a in info.value.attempts]
        assert got == [("m1", "transient"), ("m2", "transient"), ("m3", "deadline")]
        assert [c.time - t0 for c in sp.calls] == pytest.approx([0.0, 2.0, 4.0])
        assert key(router, "p3", "k3").failures == 0


async def test_router_timeout_setting_is_the_default_deadline(autojump_clock):
    sp = ScriptedProvider(default=Hang())
    cfg = make_config(THREE_MODELS.format(attempt_timeout=30, retries=0))
    cfg.router.timeout = 7.0
    async with Router.open(cfg, providers={"p1": sp, "p2": sp, "p3": sp}) as router:
        t0 = trio.current_time()
        with pytest.raises(DeadlineExceededError) as info:
            await router.submit(req())
        assert trio.current_time() - t0 == pytest.approx(7.0)
        assert info.value.timeout == 7.0
        assert [a.outcome for a in info.value.attempts] == ["deadline"]


# -- the attempt timeout ------------------------------------------------------------------


async def test_hang_is_cut_at_attempt_timeout_counted_transient_and_retried(autojump_clock):
    # Retried in place only because nothing else could take the request (m3 alone).
    sp = ScriptedProvider()
    sp.script("k3", [Hang(), Reply("late")])
    async with three(sp, attempt_timeout=2, retries=1) as router:
        t0 = trio.current_time()
        resp = await router.submit(req("m3"))
        assert trio.current_time() - t0 == pytest.approx(2.5)
        assert (resp.model, resp.key_id, resp.content) == ("m3", "k3", "late from k3")
        assert [a.outcome for a in resp.attempts] == ["transient", "ok"]
        assert resp.attempts[0].duration == pytest.approx(2.0)
        assert [c.time - t0 for c in sp.calls] == pytest.approx([0.0, 2.5])
        k3 = key(router, "p3", "k3")
        assert (k3.requests, k3.failures, k3.successes, k3.in_flight) == (2, 1, 1, 0)


async def test_silent_primary_with_default_timeouts_moves_to_its_fallback(autojump_clock):
    # The documented defaults: a silent primary costs one attempt timeout, then its
    # healthy fallback answers, well before the request's deadline.
    cfg = make_config(THREE_MODELS.format(attempt_timeout=30, retries=2))
    defaults = RouterSettings()
    cfg.router.timeout = defaults.timeout
    cfg.router.attempt_timeout = defaults.attempt_timeout
    cfg.router.transient_retries = defaults.transient_retries
    sp = ScriptedProvider()
    sp.set_default("k1", Hang())
    async with Router.open(cfg, providers={"p1": sp, "p2": sp, "p3": sp}) as router:
        t0 = trio.current_time()
        resp = await router.submit(req())
        elapsed = trio.current_time() - t0
        assert (resp.model, resp.key_id) == ("m2", "k2")
        assert sp.calls_to("k1") == 1
        assert elapsed == pytest.approx(defaults.attempt_timeout)
        assert elapsed < defaults.timeout


async def test_hang_cut_at_attempt_timeout_then_next_model_when_retries_exhausted(
    autojump_clock,
):
    sp = ScriptedProvider()
    sp.set_default("k1", Hang())
    async with three(sp, attempt_timeout=2, retries=0) as router:
        t0 = trio.current_time()
        resp = await router.submit(req())
        assert trio.current_time() - t0 == pytest.approx(2.0)
        assert (resp.model, resp.key_id) == ("m2", "k2")
        assert resp.attempts[0].outcome == "transient"


# -- caller cancellation ---------------------------------------------------------------------


async def test_caller_cancellation_cancels_the_attempt_and_counts_nothing(autojump_clock):
    rec = Recorder()
    cfg = make_config(ONE_KEY.format(conc=4))
    async with Router.open(cfg, providers={"p": rec}) as router:
        t0 = trio.current_time()
        seen_in_flight = []

        async def watch() -> None:
            await trio.sleep(1.0)
            seen_in_flight.append(key(router, "p", "k").in_flight)
            seen_in_flight.append(busy_workers(router))

        async with trio.open_nursery() as n:
            n.start_soon(watch)
            with trio.move_on_after(3.0) as scope:
                await router.submit(req("m"))
        assert scope.cancelled_caught
        assert trio.current_time() - t0 == pytest.approx(3.0)
        assert seen_in_flight == [1, 1]
        assert (rec.started, rec.cancelled, rec.finished) == (1, 1, 1)
        k = key(router, "p", "k")
        assert k.in_flight == 0
        assert k.queued == 0
        assert k.failures == 0
        assert k.breaker == "closed"
        assert k.cooling_for == 0
        assert model(router, "m").health == "healthy"
        assert busy_workers(router) == 0

        # The key is still usable (failure_threshold = 1 would have opened it otherwise).
        rec2_calls = rec.started
        with trio.move_on_after(1.0):
            await router.submit(req("m"))
        assert rec.started == rec2_calls + 1
    assert rec.finished == rec.started


async def test_cancelling_callers_nursery_cancels_attempts(autojump_clock):
    rec = Recorder()
    cfg = make_config(ONE_KEY.format(conc=2))
    async with Router.open(cfg, providers={"p": rec}) as router:
        outcomes: list[str] = []

        async def one() -> None:
            try:
                await router.submit(req("m"))
            except trio.Cancelled:
                outcomes.append("cancelled")
                raise

        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(one)
            await trio.sleep(2.0)
            k = key(router, "p", "k")
            # Two attempts in flight, one job waiting for a concurrency slot.
            assert (k.in_flight, k.queued) == (2, 1)
            assert busy_workers(router) == 2
            n.cancel_scope.cancel()
        assert outcomes == ["cancelled"] * 3
        assert (rec.started, rec.cancelled, rec.finished) == (2, 2, 2)
        k = key(router, "p", "k")
        assert (k.in_flight, k.queued, k.failures, k.breaker) == (0, 0, 0, "closed")
        assert busy_workers(router) == 0


async def test_cancelled_half_open_probe_frees_the_probe_slot(autojump_clock):
    cfg = make_config(ONE_KEY.format(conc=4))
    cfg.router.transient_retries = 0
    cfg.router.breaker.open_for = 10.0
    sp = ScriptedProvider()
    sp.script("k", [Fail("transient"), Hang()])
    async with Router.open(cfg, providers={"p": sp}) as router:
        with pytest.raises(ChainExhaustedError):
            await router.submit(req("m"))
        assert lane(router, "p", "k", "u").breaker == "open"
        await trio.sleep(10.0)
        # The probe hangs; its caller gives up.
        with trio.move_on_after(1.0) as scope:
            await router.submit(req("m"))
        assert scope.cancelled_caught
        assert len(sp.calls) == 2
        k = key(router, "p", "k")
        assert (lane(router, "p", "k", "u").breaker, k.failures, k.in_flight) == (
            "half_open",
            1,
            0,
        )
        # The probe slot was freed, so a new probe goes through and is not refused.
        resp = await router.submit(req("m"))
        assert resp.key_id == "k"
        assert len(sp.calls) == 3


# -- concurrency inside one key actor -----------------------------------------------------------


@pytest.mark.parametrize(("conc", "expected"), [(100, 1.0), (128, 1.0), (10, 10.0)])
async def test_one_key_runs_requests_concurrently_up_to_max_concurrency(
    autojump_clock, conc, expected
):
    sp = ScriptedProvider(default=Reply(latency=1.0))
    cfg = make_config(ONE_KEY.format(conc=conc))
    async with Router.open(cfg, providers={"p": sp}) as router:
        t0 = trio.current_time()
        done: list[float] = []
        peak: list[tuple[int, int]] = []

        async def one() -> None:
            await router.submit(req("m"))
            done.append(trio.current_time() - t0)

        async def watch() -> None:
            await trio.sleep(0.5)
            k = key(router, "p", "k")
            peak.append((k.in_flight, k.queued))

        async with trio.open_nursery() as n:
            n.start_soon(watch)
            for _ in range(100):
                n.start_soon(one)
        assert len(done) == 100
        assert max(done) == pytest.approx(expected)
        active = min(conc, 100)
        assert peak == [(active, 100 - active)]
        per_instant = Counter(round(c.time - t0, 6) for c in sp.calls)
        assert sorted(per_instant.values()) == [active] * (100 // active)
        k = key(router, "p", "k")
        assert (k.in_flight, k.queued, k.successes) == (0, 0, 100)


# -- closing under load -------------------------------------------------------------------------


async def test_closing_router_fails_in_flight_requests_with_router_closed(autojump_clock):
    rec = Recorder()
    cfg = make_config(ONE_KEY.format(conc=3))
    results: list[object] = []

    async def one(router: Router) -> None:
        try:
            results.append(await router.submit(req("m")))
        except RouterClosedError as exc:
            results.append(exc)

    t_close = None
    async with trio.open_nursery() as outer:
        async with Router.open(cfg, providers={"p": rec}) as router:
            for _ in range(5):
                outer.start_soon(one, router)
            await trio.sleep(2.0)
            assert key(router, "p", "k").in_flight == 3
            assert key(router, "p", "k").queued == 2
            t_close = trio.current_time()
        # Router.open exits at once, with no virtual time passing.
        assert trio.current_time() == t_close
    assert trio.current_time() == t_close
    assert len(results) == 5
    assert all(isinstance(r, RouterClosedError) for r in results)
    assert (rec.started, rec.cancelled, rec.finished) == (3, 3, 3)
    assert worker_tasks() == 0

    with pytest.raises(RouterClosedError):
        await router.submit(req("m"))


async def test_submit_after_close_raises_router_closed(autojump_clock):
    sp = ScriptedProvider()
    cfg = make_config(ONE_KEY.format(conc=3))
    async with Router.open(cfg, providers={"p": sp}) as router:
        resp = await router.submit(req("m"))
        assert resp.key_id == "k"
    with pytest.raises(RouterClosedError) as info:
        await router.submit(req("m"))
    assert info.value.kind == "unknown"
    assert len(sp.calls) == 1
