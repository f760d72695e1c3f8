"""Live reload (`Router.reload`): a new config applied to a running router.

Library tests drive real key actors with a ScriptedProvider under a virtual clock: keys
that did not change keep their state, new ones serve, removed ones drain, a request in
flight finishes on its own chain, and a bad config changes nothing. A hypothesis test
runs random sequences of reloads under load and checks the invariants.
"""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted import (
    Fail,
    Reply,
    ScriptedProvider,
    StreamingScriptedProvider,
    StreamScript,
    make_config,
)

from router import (
    ChatRequest,
    ChatResponse,
    ConfigError,
    Message,
    ReloadResult,
    Router,
    RouterConfig,
    RouterError,
    UnknownModelError,
)
from router._actor import WORKER_TASK_NAME


def conf(
    keys: tuple[str, ...] = ("a", "b"),
    models: tuple[str, ...] = ("x",),
    *,
    fallbacks: dict[str, list[str]] | None = None,
    router: str = "",
    key_extra: dict[str, str] | None = None,
) -> RouterConfig:
    """One custom provider `p` with `keys`, and `models` (model m -> upstream um)."""
    extra = key_extra or {}
    key_list = ", ".join(f'{{ id = "{k}"{extra.get(k, "")} }}' for k in keys)
    text = f"[router]\ntransient_retries = 0\n{router}\n"
    text += f'[[providers]]\nname = "p"\nkind = "custom"\nkeys = [{key_list}]\n'
    for m in models:
        text += f'[[models]]\nname = "{m}"\nprovider = "p"\nupstream = "u{m}"\n'
        for f in (fallbacks or {}).get(m, []):
            text += f'fallbacks = ["{f}"]\n'
    return make_config(text)


def req(model: str = "x") -> ChatRequest:
    return ChatRequest(model=model, messages=[Message("user", "hi")])


def actors(router: Router) -> dict[str, object]:
    return {a.key_id: a for rt in router._runtimes.values() for a in rt.actors}


def worker_tasks() -> int:
    """Key actor worker tasks alive in this trio run."""
    root = trio.lowlevel.current_root_task()
    found = 0
    stack = [root]
    while stack:
        task = stack.pop()
        if task.name == WORKER_TASK_NAME:
            found += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return found


async def test_unchanged_keys_keep_breaker_cooldown_and_lane_state(autojump_clock):
    provider = ScriptedProvider()
    # a: a long rate-limit cooldown on model x's lane; b: its key breaker opened by auth.
    provider.script("a", [Fail("rate_limit", retry_after=200)])
    provider.script("b", [Fail("auth")])
    config = conf(router="[router.breaker]\nfailure_threshold = 1\n")
    async with Router.open(config, providers={"p": provider}) as router:
        with pytest.raises(RouterError):
            await router.submit(req())
        before = {(k.provider, k.key_id): k for k in router.snapshot().keys}
        assert before[("p", "a")].lanes[0].cooling_for > 100
        assert before[("p", "b")].breaker == "open"
        old = actors(router)
        result = await router.reload(
            conf(("a", "b", "c"), router="[router.breaker]\nfailure_threshold = 1\n")
        )
        assert result.keys_added == ["p/c"]
        assert result.keys_kept == ["p/a", "p/b"]
        assert result.keys_removed == []
        now = actors(router)
        assert now["a"] is old["a"] and now["b"] is old["b"]
        after = {(k.provider, k.key_id): k for k in router.snapshot().keys}
        assert after[("p", "a")].lanes == before[("p", "a")].lanes
        assert after[("p", "b")].breaker == "open"
        assert after[("p", "b")].cooling_reason == "auth"
        # Only the new key can serve, and does.
        response = await router.submit(req())
        assert response.key_id == "c"


async def test_a_changed_secret_or_budget_is_a_new_actor(autojump_clock):
    provider = ScriptedProvider()
    async with Router.open(conf(("a", "b")), providers={"p": provider}) as router:
        old = actors(router)
        result = await router.reload(
            conf(("a", "b"), key_extra={"a": ', secret = "s2"', "b": ", rpm = 10"})
        )
        assert result.keys_added == ["p/a", "p/b"]
        assert result.keys_removed == ["p/a", "p/b"]
        assert result.keys_kept == []
        now = actors(router)
        assert now["a"] is not old["a"] and now["b"] is not old["b"]
        assert now["b"].budget is not None
        await trio.sleep(1)
        assert old["a"].stopped and old["b"].stopped
        assert (await router.submit(req())).key_id == "a"


async def test_removed_key_drains_its_in_flight_request_then_stops(autojump_clock):
    provider = ScriptedProvider()
    provider.script("a", [Reply("slow", latency=10)])
    async with Router.open(conf(("a", "b")), providers={"p": provider}) as router:
        old_a = actors(router)["a"]
        results: list[ChatResponse] = []

        async def slow() -> None:
            results.append(await router.submit(req()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await trio.sleep(1)  # the slow request is on key a now
            result = await router.reload(conf(("b",)))
            assert result.keys_removed == ["p/a"]
            assert router.draining == {old_a}
            assert old_a.draining and not old_a.stopped
            # New requests go to b, never to the draining key.
            for _ in range(5):
                assert (await router.submit(req())).key_id == "b"
            assert provider.calls_to("a") == 1
        assert results[0].content == "slow from a"
        await trio.testing.wait_all_tasks_blocked()
        assert old_a.stopped
        assert router.draining == set()
        assert set(actors(router)) == {"b"}
        assert [k.key_id for k in router.snapshot().keys] == ["b"]


async def test_a_stream_on_a_removed_key_runs_to_its_end(autojump_clock):
    provider = StreamingScriptedProvider()
    provider.script("a", [StreamScript(("one ", "two ", "three"), interval=2.0)])
    async with Router.open(conf(("a", "b")), providers={"p": provider}) as router:
        old_a = actors(router)["a"]
        async with router.stream(req()) as stream:
            text = ""
            async for chunk in stream:
                text += chunk.text
                if text == "one ":
                    await router.reload(conf(("b",)))
                    assert (await router.submit(req())).key_id == "b"
                    assert not old_a.stopped
        assert text == "one two three"
        await trio.testing.wait_all_tasks_blocked()
        assert old_a.stopped


async def test_a_kept_key_keeps_its_budget(autojump_clock):
    provider = ScriptedProvider()
    config = conf(("a",), key_extra={"a": ", rpm = 2"})
    async with Router.open(config, providers={"p": provider}) as router:
        await router.submit(req())
        await router.submit(req())
        assert router.snapshot().keys[0].rpm_remaining == 0
        result = await router.reload(conf(("a", "b"), key_extra={"a": ", rpm = 2"}))
        assert result.keys_kept == ["p/a"]
        assert router.snapshot().keys[0].rpm_remaining == 0
        assert (await router.submit(req())).key_id == "b"  # a's window is spent


async def test_a_model_is_added_and_removed(autojump_clock):
    provider = ScriptedProvider()
    async with Router.open(conf(models=("x",)), providers={"p": provider}) as router:
        with pytest.raises(UnknownModelError):
            await router.submit(req("y"))
        result = await router.reload(conf(models=("y",)))
        assert result.models_added == ["y"]
        assert result.models_removed == ["x"]
        assert result.keys_kept == ["p/a", "p/b"]
        assert (await router.submit(req("y"))).key_id == "a"
        assert provider.calls[-1].model == "uy"
        with pytest.raises(UnknownModelError):
            await router.submit(req("x"))
        assert [m.name for m in router.snapshot().models] == ["y"]


async def test_a_request_in_flight_finishes_on_the_chain_it_started_with(autojump_clock):
    provider = ScriptedProvider()
    # x's only key fails after 5 s; x's fallback is y (same provider, same key).
    provider.script("a/ux", [Fail("transient", latency=5)])
    config = conf(("a",), ("x", "y"), fallbacks={"x": ["y"]})
    async with Router.open(config, providers={"p": provider}) as router:
        results: list[ChatResponse] = []

        async def first() -> None:
            results.append(await router.submit(req("x")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.sleep(1)
            # The new config has no y and no fallback for x.
            result = await router.reload(conf(("a",), ("x",)))
            assert result.models_removed == ["y"]
        assert results[0].model == "y"
        assert [c.model for c in provider.calls] == ["ux", "uy"]
        # A new request takes the new chain: x alone.
        provider.script("a/ux", [Fail("transient")])
        with pytest.raises(RouterError):
            await router.submit(req("x"))
        assert provider.calls[-1].model == "ux"


async def test_invalid_configs_are_refused_and_the_old_one_kept(autojump_clock, monkeypatch):
    provider = ScriptedProvider()
    monkeypatch.delenv("RELOAD_TEST_UNSET", raising=False)
    async with Router.open(conf(("a",)), providers={"p": provider}) as router:
        old = actors(router)
        config = router.config
        # A setting the keys' state was shaped by: restart only.
        with pytest.raises(ConfigError) as err:
            await router.reload(conf(("a", "b"), router="[router.breaker]\nopen_for = 5\n"))
        assert err.value.field == "router.breaker"
        assert "restart" in str(err.value)
        with pytest.raises(ConfigError) as err:
            await router.reload(conf(("a",), router="attempt_timeout = 3\n"))
        assert err.value.field == "router.attempt_timeout"
        # A secret that cannot be resolved (the variable's name only in the error).
        with pytest.raises(ConfigError) as err:
            await router.reload(
                conf(("a", "b"), key_extra={"b": ', secret = "env:RELOAD_TEST_UNSET"'})
            )
        assert err.value.field == "providers[0].keys[1].secret"
        # A new custom provider without its instance; an instance for no provider.
        bad = make_config(
            '[router]\ntransient_retries = 0\n[[providers]]\nname = "p"\nkind = "custom"\n'
            'keys = [{ id = "a" }]\n[[providers]]\nname = "q"\nkind = "custom"\n'
            'keys = [{ id = "k" }]\n'
        )
        with pytest.raises(ConfigError) as err:
            await router.reload(bad)
        assert err.value.field == "providers[1].kind"
        with pytest.raises(ConfigError) as err:
            await router.reload(conf(("a",)), providers={"zz": ScriptedProvider()})
        assert "zz" in str(err.value)
        with pytest.raises(ConfigError):
            await router.reload({"providers": []})  # type: ignore[arg-type]
        assert router.config is config
        assert actors(router) == old
        assert not any(a.draining for a in old.values())
        assert (await router.submit(req())).key_id == "a"
        # A live setting does change.
        result = await router.reload(conf(("a",), router="max_attempts = 3\ntimeout = 40\n"))
        assert result.settings_changed == ["max_attempts", "timeout"]
        assert router.config.router.max_attempts == 3
        assert actors(router) == old
        assert old["a"].settings.max_attempts == 3


async def test_a_new_custom_provider_and_a_replaced_simulated_one(autojump_clock):
    custom = ScriptedProvider()
    base = (
        '[router]\ntransient_retries = 0\n[[providers]]\nname = "s"\nkind = "simulated"\n'
        'keys = [{ id = "k" }]\nseed = SEED\n[providers.simulate]\nlatency = 0.01\n'
        '[[models]]\nname = "m"\nprovider = "s"\nupstream = "um"\n'
    )
    async with Router.open(make_config(base.replace("SEED", "1"))) as router:
        old_k = actors(router)["k"]
        old_instance = router.provider("s")
        assert (await router.submit(req("m"))).key_id == "k"
        with_custom = base.replace("SEED", "1") + (
            '[[providers]]\nname = "c"\nkind = "custom"\nkeys = [{ id = "ck" }]\n'
        )
        result = await router.reload(make_config(with_custom), providers={"c": custom})
        assert result.keys_added == ["c/ck"] and result.keys_kept == ["s/k"]
        assert (await router.submit(req("c/any"))).key_id == "ck"
        # Reloading again keeps the custom provider's instance without naming it.
        result = await router.reload(make_config(with_custom))
        assert result.keys_kept == ["c/ck", "s/k"]
        assert router.provider("c") is custom
        # A changed seed is a new simulated instance: new actors for its keys.
        result = await router.reload(make_config(with_custom.replace("seed = 1", "seed = 2")))
        assert result.providers_replaced == ["s"]
        assert result.keys_removed == ["s/k"] and result.keys_added == ["s/k"]
        assert router.provider("s") is not old_instance
        assert (await router.submit(req("m"))).key_id == "k"
        await trio.sleep(1)
        assert old_k.stopped
        assert id(old_instance) not in router._instances


async def test_a_closed_router_refuses_reload(autojump_clock):
    async with Router.open(conf(), providers={"p": ScriptedProvider()}) as router:
        pass
    with pytest.raises(RouterError):
        await router.reload(conf())


# -- invariants over random reloads under load ----------------------------------------

KEYS = ("a", "b", "c", "d")
MODELS = ("x", "y", "z")

step = st.tuples(
    st.frozensets(st.sampled_from(KEYS), min_size=1),
    st.frozensets(st.sampled_from(MODELS), min_size=1),
    st.lists(st.floats(0.0, 3.0), max_size=6),
    st.floats(0.0, 2.0),
    st.sampled_from(["", ', secret = "rotated"', ", rpm = 1000"]),  # key a changed or not
)

Step = tuple[frozenset[str], frozenset[str], list[float], float, str]


async def _run_sequence(steps: list[Step]) -> None:
    provider = ScriptedProvider(default=Reply(latency=1.0))
    outcomes: list[str] = []
    submitted = 0
    ever: list[object] = []

    def cfg(keys: frozenset[str], models: frozenset[str], a: str = "") -> RouterConfig:
        return conf(tuple(sorted(keys)), tuple(sorted(models)), key_extra={"a": a})

    async def one(router: Router, n: int, delay: float) -> None:
        await trio.sleep(delay)
        names = sorted(m.name for m in router.config.models)  # the config of now
        model = names[n % len(names)]
        try:
            await router.submit(req(model))
            outcomes.append("ok")
        except RouterError as exc:
            outcomes.append(type(exc).__name__)

    first_keys, first_models = steps[0][0], steps[0][1]
    async with Router.open(cfg(first_keys, first_models), providers={"p": provider}) as router:
        ever.extend(actors(router).values())
        async with trio.open_nursery() as nursery:
            for keys, models, delays, pause, a in steps:
                before = actors(router)
                result = await router.reload(cfg(keys, models, a))
                assert isinstance(result, ReloadResult)
                after = actors(router)
                # Kept keys are the very same actors; the result says which.
                kept = {k for k in before if k in after and after[k] is before[k]}
                assert result.keys_kept == sorted(f"p/{k}" for k in kept)
                assert result.keys_added == sorted(f"p/{k}" for k in set(after) - kept)
                # The actors are exactly the config's keys; none of them drains.
                live = actors(router)
                assert set(live) == set(keys)
                assert not any(a.draining for a in live.values())
                ever.extend(live.values())
                for delay in delays:
                    submitted += 1
                    nursery.start_soon(one, router, submitted, delay)
                await trio.sleep(pause)
        # Every request ended, in exactly one outcome, and each was served: a request
        # in flight finishes on its key, and a new one only sees live keys and models.
        assert len(outcomes) == submitted
        assert outcomes == ["ok"] * submitted
        await trio.testing.wait_all_tasks_blocked()
        assert router.draining == set()
    assert all(a.stopped for a in ever)  # type: ignore[attr-defined]
    assert worker_tasks() == 0


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(step, min_size=1, max_size=6))
def test_random_reload_sequences_keep_the_invariants(steps):
    trio.run(_run_sequence, steps, clock=trio.testing.MockClock(autojump_threshold=0))


def test_no_secret_in_reload_result_or_error(monkeypatch):
    monkeypatch.setenv("RELOAD_SECRET", "sk-very-secret-1234")

    async def main() -> None:
        base = conf(("a",))
        async with Router.open(base, providers={"p": ScriptedProvider()}) as router:
            result = await router.reload(
                conf(("a", "b"), key_extra={"b": ', secret = "env:RELOAD_SECRET"'})
            )
            assert "sk-very-secret" not in repr(result)
            with pytest.raises(ConfigError) as err:
                await router.reload(
                    conf(
                        ("a", "b"),
                        key_extra={"b": ', secret = "env:RELOAD_SECRET"'},
                        router="seed = 5\n",
                    )
                )
            assert "sk-very-secret" not in str(err.value)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert os.environ["RELOAD_SECRET"]


# -- shared state (a real redis-server) ---------------------------------------------------


def _shared_config(port: int, prefix: str, keys: tuple[str, ...]) -> RouterConfig:
    key_list = ", ".join(f'{{ id = "{k}" }}' for k in keys)
    return RouterConfig.from_toml(f"""
[router]
transient_retries = 0
[router.breaker]
failure_threshold = 1
open_for = 30
jitter = 0.0
[router.shared]
redis_url = "redis://127.0.0.1:{port}/0"
key_prefix = "{prefix}"
ping_interval = 0.1
[[providers]]
name = "c"
kind = "custom"
keys = [{key_list}]
""")


async def _lane_opens(router: Router, key_id: str) -> None:
    with trio.fail_after(5):
        while True:
            key = next(k for k in router.snapshot().keys if k.key_id == key_id)
            if any(lane.breaker == "open" for lane in key.lanes):
                return
            await trio.sleep(0.01)


async def test_kept_and_added_keys_share_state_through_redis_after_reload(redis, tmp_path):  # type: ignore[no-untyped-def]
    prefix = f"reload-{tmp_path.name}"
    one, two = ScriptedProvider(), ScriptedProvider()
    request = ChatRequest(model="c/m", messages=[Message("user", "hi")])
    async with (
        Router.open(_shared_config(redis.port, prefix, ("k1",)), providers={"c": one}) as r1,
        Router.open(_shared_config(redis.port, prefix, ("k1",)), providers={"c": two}) as r2,
    ):
        kept = actors(r2)["k1"]
        for r in (r1, r2):
            result = await r.reload(_shared_config(redis.port, prefix, ("k1", "k2")))
            assert result.keys_kept == ["c/k1"] and result.keys_added == ["c/k2"]
        assert actors(r2)["k1"] is kept
        assert set(r2._shared._actors) == {("c", "k1"), ("c", "k2")}  # type: ignore[union-attr]
        # A trip on r1 reaches r2's kept key and its new key alike.
        one.script("k1", [Fail("transient")])
        one.script("k2", [Fail("transient")])
        for _ in range(2):  # a transient failure moves on to the next model, not key
            with pytest.raises(RouterError):
                await r1.submit(request)
        assert [c.key_id for c in one.calls] == ["k1", "k2"]
        await _lane_opens(r2, "k1")
        await _lane_opens(r2, "k2")
        # A removed key is no longer registered; news of it is ignored.
        await r2.reload(_shared_config(redis.port, prefix, ("k2",)))
        await trio.sleep(0.1)  # the removed key drains (it has nothing in flight)
        assert not r2.draining
        assert set(r2._shared._actors) == {("c", "k2")}  # type: ignore[union-attr]
        assert all(t[0].key_id == "k2" for t in r2._shared._targets)  # type: ignore[union-attr]
        r1.reset(provider="c", key_id="k1")
        one.script("k1", [Fail("transient")])
        with pytest.raises(RouterError):
            await r1.submit(ChatRequest(model="c/m", messages=[Message("user", "hi")]))
        await trio.sleep(0.3)
        assert [k.key_id for k in r2.snapshot().keys] == ["k2"]
