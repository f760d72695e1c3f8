"""The key actor's worker pool: queued jobs keep their deadline, idle workers retire,
workers are reused, and errors in the caller's block come out unwrapped."""

from __future__ import annotations

import pytest
import trio
from scripted import Hang, Reply, ScriptedProvider, make_config

from router import ChainExhaustedError, ChatRequest, DeadlineExceededError, Message, Router

CONFIG = """
[router]
timeout = 100
attempt_timeout = 30
transient_retries = 0
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


def req(timeout: float | None = None) -> ChatRequest:
    return ChatRequest(model="m", messages=[Message("user", "hi")], timeout=timeout)


def worker_tasks() -> int:
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += task.name == "router.KeyActor.worker"
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def actor(router: Router):  # type: ignore[no-untyped-def]
    return router._runtimes["p"].actors[0]


async def test_a_queued_job_ends_at_its_deadline_while_workers_hang(autojump_clock):
    sp = ScriptedProvider()
    sp.set_default("k", Hang())
    async with Router.open(make_config(CONFIG.format(conc=1)), providers={"p": sp}) as router:
        outcomes: list[tuple[str, float]] = []
        t0 = trio.current_time()

        async def one(deadline_in: float) -> None:
            try:
                await router.submit(req(deadline_in))
                outcomes.append(("ok", trio.current_time() - t0))
            except DeadlineExceededError:
                outcomes.append(("deadline", trio.current_time() - t0))
            except ChainExhaustedError as exc:
                outcomes.append((exc.kind, trio.current_time() - t0))

        async with trio.open_nursery() as n:
            n.start_soon(one, 50.0)  # takes the only worker, hangs until its attempt timeout
            await trio.sleep(0.1)
            n.start_soon(one, 5.0)  # queued behind it; must still end at its 5 s deadline
            await trio.sleep(0.1)
            assert actor(router).queued == 1
        # The queued one ends at its own deadline; the hanging one is cut at its
        # 30 s attempt timeout (transient), with nothing else in its chain.
        assert outcomes == [("deadline", pytest.approx(5.1)), ("transient", pytest.approx(30.0))]
        assert actor(router).queued == 0
        # The queued job never reached the provider.
        assert len(sp.calls) == 1


async def test_queued_jobs_run_in_order_as_workers_free_up(autojump_clock):
    sp = ScriptedProvider(default=Reply(latency=1.0))
    async with Router.open(make_config(CONFIG.format(conc=2)), providers={"p": sp}) as router:
        done: list[float] = []

        async def one() -> None:
            await router.submit(req())
            done.append(trio.current_time())

        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            for _ in range(6):
                n.start_soon(one)
        assert sorted(round(t - t0, 6) for t in done) == [1, 1, 2, 2, 3, 3]
        assert worker_tasks() == 2  # the pool never grew past max_concurrency


async def test_workers_are_reused_and_retire_when_idle(autojump_clock):
    sp = ScriptedProvider(default=Reply(latency=0.5))
    async with Router.open(make_config(CONFIG.format(conc=50)), providers={"p": sp}) as router:
        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(router.submit, req())
        assert worker_tasks() == 20
        # Sequential requests reuse one warm worker instead of adding tasks.
        for _ in range(5):
            await router.submit(req())
        assert worker_tasks() == 20
        # Idle past their last attempt deadline (30 s), workers retire.
        await trio.sleep(31)
        assert worker_tasks() == 0
        assert actor(router).busy == 0
        # And the key still serves.
        resp = await router.submit(req())
        assert resp.key_id == "k"
        assert worker_tasks() == 1
    assert worker_tasks() == 0


async def test_an_error_in_the_callers_block_is_not_wrapped(autojump_clock):
    sp = ScriptedProvider()
    with pytest.raises(KeyError):
        async with Router.open(make_config(CONFIG.format(conc=2)), providers={"p": sp}):
            raise KeyError("mine")
