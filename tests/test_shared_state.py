"""The pure-state-machine methods shared state is merged through, the `[router.shared]`
config, and (in one trio run, two routers on a real loopback redis-server) the
half-open probe lease: one instance probes a lane (a key's upstream model), not all."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio
from scripted import Fail, ScriptedProvider
from test_shared import RedisServer

from router import ChainExhaustedError, ChatRequest, ConfigError, Message, Router, RouterConfig
from router._breaker import CircuitBreaker
from router._budget import WINDOW, RateBudget
from router._config import BreakerConfig, CooldownConfig, HealthConfig, mask_url
from router._cooldown import Cooldown
from router._health import ModelHealth

# -- Cooldown.merge_until ------------------------------------------------------------


def test_cooldown_merge_takes_the_later_end_only() -> None:
    cd = Cooldown(CooldownConfig(min=5.0, factor=1.0))
    cd.hit(0.0, "rate_limit")
    assert cd.until == 5.0 and cd.hits == 1
    assert not cd.merge_until(3.0, "auth")  # never shortened
    assert (cd.until, cd.reason) == (5.0, "rate_limit")
    assert cd.merge_until(9.0, "auth")
    assert (cd.until, cd.reason, cd.hits) == (9.0, "auth", 1)  # own backoff untouched
    assert cd.is_cooling(8.9) and not cd.is_cooling(9.0)
    # a later local hit that ends sooner does not shorten the merged end
    cd.hit(1.0, "rate_limit")
    assert cd.until == 9.0


def test_cooldown_merge_into_fresh_cooldown() -> None:
    cd = Cooldown(CooldownConfig())
    assert cd.until == -math.inf
    assert cd.merge_until(2.5, "balance")
    assert cd.remaining(1.0) == pytest.approx(1.5)
    cd.reset()
    assert not cd.is_cooling(1.0)


# -- CircuitBreaker.force_open / force_close / probing ---------------------------------


def _breaker() -> CircuitBreaker:
    return CircuitBreaker(BreakerConfig(failure_threshold=1, open_for=10.0, jitter=0.0))


def test_force_open_from_closed_and_never_shortened() -> None:
    b = _breaker()
    t = b.try_acquire(0.0)
    assert t is not None
    assert b.force_open(5.0)
    assert b.state_at(1.0) == "open" and b.remaining(1.0) == pytest.approx(4.0)
    assert b.opens == 0 and b.trips == 0  # another instance's trip, not this one's
    b.on_success(t, 1.0, 0.1)  # a call started before says nothing now
    assert b.state_at(1.0) == "open"
    assert not b.force_open(4.0)
    assert b.open_until == 5.0
    assert b.force_open(7.0)
    assert b.open_until == 7.0
    assert b.state_at(7.0) == "half_open"


def test_force_open_while_half_open_invalidates_probes() -> None:
    b = _breaker()
    b.on_failure(b.try_acquire(0.0) or 0, 0.0)
    assert b.state_at(10.0) == "half_open"
    probe = b.try_acquire(10.0)
    assert probe is not None and b.probing
    assert b.force_open(12.0)  # another instance holds the probe lease
    assert not b.probing
    b.on_success(probe, 10.5, 0.1)  # the stale probe cannot close it
    assert b.state_at(11.0) == "open"
    assert b.state_at(12.0) == "half_open"


def test_force_close_is_a_recovery() -> None:
    b = _breaker()
    assert not b.force_close()
    b.on_failure(b.try_acquire(0.0) or 0, 0.0)
    assert b.state_at(1.0) == "open" and b.trips == 1
    assert b.force_close()
    assert b.state_at(1.0) == "closed" and b.trips == 0
    assert b.can_attempt(1.0)


# -- ModelHealth.merge ---------------------------------------------------------------


def test_health_merge() -> None:
    h = ModelHealth(HealthConfig())
    assert not h.merge("cooling", 5.0, 10.0)  # already over
    assert not h.merge("healthy", 50.0, 10.0)
    assert h.merge("cooling", 40.0, 10.0)
    assert h.state_at(10.0) == "cooling" and h.remaining(10.0) == pytest.approx(30.0)
    assert not h.merge("cooling", 30.0, 10.0)  # never shortened
    assert h.merge("disabled", 20.0, 10.0)
    assert h.state_at(10.0) == "disabled" and h.until == 40.0
    assert not h.merge("cooling", 90.0, 10.0)  # disabled is not relabelled cooling
    assert h.merge("disabled", 60.0, 10.0) and h.until == 60.0
    assert h.state_at(60.0) == "healthy"
    assert h.merge("cooling", 70.0, 61.0) and h.until == 70.0


# -- RateBudget.hold_until -----------------------------------------------------------


def test_budget_hold_until() -> None:
    b = RateBudget(rpm=3)
    assert b.try_reserve(0.0, 0) is not None
    b.hold_until(20.0)  # the shared window is full until 20
    assert b.try_reserve(10.0, 0) is None
    assert b.available_at(10.0, 0) == 20.0
    b.hold_until(15.0)  # merged by maximum
    assert b.available_at(10.0, 0) == 20.0
    assert b.try_reserve(20.0, 0) is not None
    assert b.remaining(20.0) == (1, None)
    # the local window still counts: full again until the first reservation expires
    assert b.try_reserve(21.0, 0) is not None
    assert b.available_at(22.0, 0) == WINDOW
    unlimited = RateBudget()
    unlimited.hold_until(100.0)
    assert unlimited.available_at(1.0, 0) == 1.0


# -- config --------------------------------------------------------------------------


def _cfg(shared: str) -> str:
    return f"""
[router.shared]
{shared}

[[providers]]
name = "p"
kind = "simulated"
keys = [{{ id = "k" }}]
"""


def test_shared_config() -> None:
    cfg = RouterConfig.from_toml(_cfg('redis_url = "redis://u:hunter2@h:6379/0"'))
    shared = cfg.router.shared
    assert shared is not None
    assert shared.key_prefix == "llm-router"
    assert shared.budget_timeout < shared.timeout <= 1.0
    assert "hunter2" not in repr(cfg)
    with pytest.raises(ConfigError) as missing:
        RouterConfig.from_toml(_cfg(""))
    assert missing.value.field == "router.shared.redis_url"
    plain = RouterConfig.from_toml(_cfg("").replace("[router.shared]", ""))
    assert plain.router.shared is None
    with pytest.raises(ConfigError) as bad:
        RouterConfig.from_toml(_cfg('redis_url = "http://h"'))
    assert bad.value.field == "router.shared.redis_url"
    with pytest.raises(ConfigError) as typo:
        RouterConfig.from_toml(_cfg('redis_url = "redis://h"\nredis_ulr = "x"'))
    assert "redis_ulr" in typo.value.field


def test_mask_url() -> None:
    assert mask_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert mask_url("redis://:pw@h") == "redis://:***@h"
    assert mask_url("redis://pw@h") == "redis://***@h"
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"
    assert mask_url("env:REDIS_URL") == "env:REDIS_URL"


# -- the probe lease, two routers in one run --------------------------------------------


def _lease_config(port: int, prefix: str) -> RouterConfig:
    return RouterConfig.from_toml(f"""
[router]
transient_retries = 0
[router.breaker]
failure_threshold = 1
open_for = 0.6
jitter = 0.0
success_threshold = 2
[router.shared]
redis_url = "redis://127.0.0.1:{port}/0"
key_prefix = "{prefix}"
ping_interval = 0.1
probe_lease = 1.0
[[providers]]
name = "c"
kind = "custom"
keys = [{{ id = "k1" }}, {{ id = "k2" }}]
""")


def _lane_breaker(router: Router, key_id: str = "k1", model: str = "m") -> tuple[str, str | None]:
    """(breaker state, breaker source) of the key's lane of `model` in the snapshot."""
    key = next(k for k in router.snapshot().keys if k.key_id == key_id)
    lane = next((x for x in key.lanes if x.model == model), None)
    return ("closed", None) if lane is None else (lane.breaker, lane.breaker_source)


async def test_one_instance_probes_a_half_open_lane(redis: RedisServer, tmp_path: Path) -> None:
    config = _lease_config(redis.port, f"lease-{tmp_path.name}")
    one, two = ScriptedProvider(), ScriptedProvider()
    one.script("k1", [Fail("transient")])
    request = ChatRequest(model="c/m", messages=[Message(role="user", content="hi")])
    async with (
        Router.open(config, providers={"c": one}) as r1,
        Router.open(config, providers={"c": two}) as r2,
    ):
        assert r1.snapshot().shared.reachable and r2.snapshot().shared.reachable  # type: ignore[union-attr]
        with pytest.raises(ChainExhaustedError):
            await r1.submit(request)  # k1 fails: its lane of m opens on r1, then on r2
        for _ in range(100):
            if _lane_breaker(r2)[0] == "open":
                break
            await trio.sleep(0.01)
        assert _lane_breaker(r2) == ("open", "shared")
        assert r2.snapshot().keys[0].breaker == "closed"  # the key itself is fine
        # Both keep sending; once the open time ends, only one of them probes k1.
        end = trio.current_time() + 1.5
        while trio.current_time() < end:
            await r1.submit(request)
            await r2.submit(request)
            await trio.sleep(0.01)
        probes = [(t, "one") for t in one.calls[1:] if t.key_id == "k1"]
        probes += [(t, "two") for t in two.calls if t.key_id == "k1"]
        probes.sort(key=lambda p: p[0].time)
        assert len(probes) >= 2, "the key recovered"
        # The first two k1 calls after the trip are the probes (success_threshold = 2):
        # they come from one instance; the other waited for its verdict.
        assert probes[0][1] == probes[1][1]
        for r in (r1, r2):
            assert _lane_breaker(r)[0] == "closed"
