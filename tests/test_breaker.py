"""Tests of the circuit breaker state machine (router/_breaker.py).

The breaker is pure and takes `now` explicitly, so everything here is synchronous.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from router._breaker import CircuitBreaker
from router._config import BreakerConfig


def cfg(**kw: object) -> BreakerConfig:
    kw.setdefault("jitter", 0.0)
    return BreakerConfig(**kw)  # type: ignore[arg-type]


def trip_closed(cb: CircuitBreaker, now: float, n: int | None = None) -> None:
    """Feed `n` (default failure_threshold) fresh failures while closed."""
    for _ in range(cb.config.failure_threshold if n is None else n):
        t = cb.try_acquire(now)
        assert t is not None
        cb.on_failure(t, now)


def succeed(cb: CircuitBreaker, now: float, latency: float = 0.1) -> None:
    t = cb.try_acquire(now)
    assert t is not None
    cb.on_success(t, now, latency)


def fail(cb: CircuitBreaker, now: float) -> None:
    t = cb.try_acquire(now)
    assert t is not None
    cb.on_failure(t, now)


# ---------------------------------------------------------------------------------------
# Closed -> open
# ---------------------------------------------------------------------------------------


def test_fresh_breaker_is_closed() -> None:
    cb = CircuitBreaker(cfg())
    assert cb.state_at(0.0) == "closed"
    assert cb.can_attempt(0.0)
    assert cb.remaining(0.0) == 0.0
    assert cb.trips == 0


def test_opens_exactly_at_failure_threshold() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=5, failure_rate=0.0))
    for i in range(4):
        fail(cb, 10.0)
        assert cb.state_at(10.0) == "closed", f"opened after {i + 1} failures"
        assert cb.consecutive_failures == i + 1
    fail(cb, 10.0)
    assert cb.state_at(10.0) == "open"
    assert not cb.can_attempt(10.0)
    assert cb.try_acquire(10.0) is None
    assert cb.remaining(10.0) == pytest.approx(30.0)
    assert cb.trips == 1
    assert cb.opens == 1


def test_success_resets_the_consecutive_count() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=3, failure_rate=0.0))
    for _ in range(5):
        fail(cb, 0.0)
        fail(cb, 0.0)
        succeed(cb, 0.0)
        assert cb.consecutive_failures == 0
        assert cb.state_at(0.0) == "closed"
    fail(cb, 0.0)
    fail(cb, 0.0)
    assert cb.state_at(0.0) == "closed"
    fail(cb, 0.0)
    assert cb.state_at(0.0) == "open"


def test_failure_rate_trigger_with_alternating_outcomes() -> None:
    # Consecutive failures never exceed 1, so only the rate can open it.
    cb = CircuitBreaker(cfg(failure_threshold=5, window=10, minimum_calls=10, failure_rate=0.5))
    for _ in range(4):
        succeed(cb, 0.0)
        fail(cb, 0.0)
    succeed(cb, 0.0)
    assert cb.state_at(0.0) == "closed"  # 9 calls: below minimum_calls
    fail(cb, 0.0)  # 10 calls, 5 failures: rate 0.5
    assert cb.state_at(0.0) == "open"


def test_failure_rate_below_threshold_stays_closed() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=5, window=10, minimum_calls=10, failure_rate=0.5))
    # Pattern S S F repeated: one failure in three, for a long time.
    for _ in range(20):
        succeed(cb, 0.0)
        succeed(cb, 0.0)
        fail(cb, 0.0)
        assert cb.state_at(0.0) == "closed"


def test_failure_rate_is_judged_over_the_sliding_window() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=100, window=4, minimum_calls=4, failure_rate=0.75))
    fail(cb, 0.0)
    fail(cb, 0.0)
    succeed(cb, 0.0)  # window F F S
    succeed(cb, 0.0)  # window F F S S (0.5)
    succeed(cb, 0.0)  # window F S S S
    fail(cb, 0.0)  # window S S S F (0.25)
    fail(cb, 0.0)  # window S S F F (0.5)
    assert cb.state_at(0.0) == "closed"
    fail(cb, 0.0)  # window S F F F (0.75)
    assert cb.state_at(0.0) == "open"


def test_failure_rate_zero_disables_the_rate_trigger() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=3, window=4, minimum_calls=1, failure_rate=0.0))
    for _ in range(10):
        fail(cb, 0.0)
        fail(cb, 0.0)
        succeed(cb, 0.0)
    assert cb.state_at(0.0) == "closed"


def test_failure_rate_exactly_at_the_configured_fraction_opens() -> None:
    # 7 failures out of 25 calls is a rate of exactly 0.28 >= failure_rate.
    # (0.28 * 25 evaluates to 7.000000000000001 in floating point.)
    cb = CircuitBreaker(cfg(failure_threshold=100, window=25, minimum_calls=25, failure_rate=0.28))
    outcomes = ([True] + [False] * 3) * 6
    assert sum(outcomes) == 6
    for failed in outcomes:
        (fail if failed else succeed)(cb, 0.0)
    assert cb.state_at(0.0) == "closed"
    fail(cb, 0.0)  # 25 calls, 7 failures
    assert cb.state_at(0.0) == "open"


def test_failures_while_open_are_not_counted() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=2, failure_rate=0.0))
    stale = [cb.try_acquire(0.0) for _ in range(5)]
    trip_closed(cb, 0.0)
    assert cb.state_at(0.0) == "open"
    until = cb.open_until
    for t in stale:
        assert t is not None
        cb.on_failure(t, 1.0)
    assert cb.state_at(1.0) == "open"
    assert cb.open_until == until
    assert cb.trips == 1


# ---------------------------------------------------------------------------------------
# Open -> half-open -> closed / open
# ---------------------------------------------------------------------------------------


def test_open_becomes_half_open_exactly_at_open_for() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=1, open_for=30.0))
    trip_closed(cb, 100.0)
    assert cb.open_until == pytest.approx(130.0)
    assert cb.state_at(129.999) == "open"
    assert cb.remaining(129.0) == pytest.approx(1.0)
    assert not cb.can_attempt(129.999)
    assert cb.try_acquire(129.999) is None
    assert cb.state_at(130.0) == "half_open"
    assert cb.remaining(130.0) == 0.0
    assert cb.can_attempt(130.0)


def test_remaining_reports_open_time_left() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=1, open_for=30.0))
    trip_closed(cb, 0.0)
    assert cb.remaining(0.0) == pytest.approx(30.0)
    assert cb.remaining(10.0) == pytest.approx(20.0)
    assert cb.remaining(30.0) == 0.0
    assert cb.remaining(1000.0) == 0.0


def test_half_open_closes_after_success_threshold_successes() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=1, success_threshold=3, open_for=10.0))
    trip_closed(cb, 0.0)
    for _ in range(2):
        succeed(cb, 10.0)
        assert cb.state_at(10.0) == "half_open"
    succeed(cb, 10.0)
    assert cb.state_at(10.0) == "closed"
    assert cb.trips == 0
    assert cb.remaining(10.0) == 0.0


def test_failed_probe_reopens_with_grown_duration() -> None:
    cb = CircuitBreaker(
        cfg(failure_threshold=1, open_for=30.0, open_growth=2.0, open_for_max=300.0)
    )
    now = 0.0
    trip_closed(cb, now)
    durations = [cb.open_until - now]
    for _ in range(6):
        now = cb.open_until
        assert cb.state_at(now) == "half_open"
        fail(cb, now)  # a probe fails
        assert cb.state_at(now) == "open"
        durations.append(cb.open_until - now)
    assert durations == pytest.approx([30.0, 60.0, 120.0, 240.0, 300.0, 300.0, 300.0])
    assert cb.trips == 7
    assert cb.opens == 7


def test_open_duration_stays_capped_after_very_many_trips() -> None:
    # A provider that stays down keeps failing its probes; the open duration must stay at
    # open_for_max, not overflow (2.0 ** 1024 raises OverflowError for floats).
    cb = CircuitBreaker(
        cfg(failure_threshold=1, open_for=30.0, open_growth=2.0, open_for_max=300.0)
    )
    now = 0.0
    trip_closed(cb, now)
    for _ in range(1100):
        now = cb.open_until
        fail(cb, now)
    assert cb.state_at(now) == "open"
    assert cb.open_until - now == pytest.approx(300.0)


def test_probes_limited_to_half_open_probes_in_flight() -> None:
    cb = CircuitBreaker(
        cfg(failure_threshold=1, half_open_probes=2, success_threshold=5, open_for=10.0)
    )
    trip_closed(cb, 0.0)
    p1 = cb.try_acquire(10.0)
    p2 = cb.try_acquire(10.0)
    assert p1 is not None and p2 is not None
    assert cb.try_acquire(10.0) is None
    assert not cb.can_attempt(10.0)
    assert cb.state_at(10.0) == "half_open"
    assert cb.remaining(10.0) == 0.0
    cb.on_success(p1, 11.0, 0.1)  # frees a slot
    assert cb.can_attempt(11.0)
    p3 = cb.try_acquire(11.0)
    assert p3 is not None
    assert cb.try_acquire(11.0) is None
    cb.on_abandon(p2)  # an abandoned probe frees a slot too
    assert cb.can_attempt(11.0)
    p4 = cb.try_acquire(11.0)
    assert p4 is not None
    assert cb.try_acquire(11.0) is None


def test_abandoned_probe_counts_nothing() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=1, success_threshold=2, open_for=10.0))
    trip_closed(cb, 0.0)
    p = cb.try_acquire(10.0)
    assert p is not None
    cb.on_abandon(p)
    assert cb.state_at(10.0) == "half_open"
    succeed(cb, 10.0)
    assert cb.state_at(10.0) == "half_open"  # one success so far, not two
    succeed(cb, 10.0)
    assert cb.state_at(10.0) == "closed"


def test_closing_resets_the_trip_count() -> None:
    cb = CircuitBreaker(
        cfg(failure_threshold=1, success_threshold=1, open_for=30.0, open_for_max=300.0)
    )
    trip_closed(cb, 0.0)
    fail(cb, 30.0)  # probe fails: 60 s
    assert cb.open_until == pytest.approx(90.0)
    assert cb.trips == 2
    succeed(cb, 90.0)  # probe succeeds: closed
    assert cb.state_at(90.0) == "closed"
    assert cb.trips == 0
    trip_closed(cb, 100.0)
    assert cb.open_until == pytest.approx(130.0)  # back to open_for
    assert cb.trips == 1
    assert cb.opens == 3


def test_closing_clears_the_failure_history() -> None:
    cb = CircuitBreaker(
        cfg(failure_threshold=3, success_threshold=1, failure_rate=0.0, open_for=10.0)
    )
    trip_closed(cb, 0.0)
    succeed(cb, 10.0)
    assert cb.state_at(10.0) == "closed"
    assert cb.consecutive_failures == 0
    fail(cb, 10.0)
    fail(cb, 10.0)
    assert cb.state_at(10.0) == "closed"


def test_reset_closes_an_open_breaker() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=1, open_for=30.0))
    trip_closed(cb, 0.0)
    fail(cb, 30.0)
    assert cb.state_at(31.0) == "open"
    cb.reset()
    assert cb.state_at(31.0) == "closed"
    assert cb.can_attempt(31.0)
    assert cb.remaining(31.0) == 0.0
    assert cb.trips == 0
    assert cb.consecutive_failures == 0
    trip_closed(cb, 40.0)
    assert cb.open_until == pytest.approx(70.0)


def test_reset_closes_a_half_open_breaker() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=1, half_open_probes=1, open_for=30.0))
    trip_closed(cb, 0.0)
    assert cb.try_acquire(30.0) is not None
    assert not cb.can_attempt(30.0)
    cb.reset()
    assert cb.state_at(30.0) == "closed"
    assert cb.can_attempt(30.0)


def test_jitter_shortens_open_duration_by_at_most_jitter() -> None:
    # Jitter only ever shortens: open_for stays an upper bound, so a recovered upstream
    # is probed again within open_for.
    ends = set()
    for seed in range(20):
        cb = CircuitBreaker(
            BreakerConfig(failure_threshold=1, open_for=30.0, jitter=0.1),
            rng=random.Random(seed),
        )
        trip_closed(cb, 0.0)
        assert 27.0 <= cb.open_until <= 30.0
        ends.add(cb.open_until)
    assert len(ends) > 1


def test_fast_failures_do_not_grow_the_open_time_and_timeouts_do() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=1, open_for=30.0, open_growth=2.0))
    now = 0.0
    durations = []
    for grow in (False, False, True, True, False, True):
        ticket = cb.try_acquire(now)
        assert ticket is not None
        cb.on_failure(ticket, now, grow=grow)
        durations.append(cb.open_until - now)
        now = cb.open_until
        assert cb.state_at(now) == "half_open"
    # A trip opens for the current time; only a timed-out failure grows the next one.
    assert durations == pytest.approx([30.0, 30.0, 30.0, 60.0, 120.0, 120.0])


# ---------------------------------------------------------------------------------------
# Stale tickets
# ---------------------------------------------------------------------------------------


def test_stale_probe_from_earlier_half_open_episode_is_ignored() -> None:
    cb = CircuitBreaker(
        cfg(failure_threshold=1, half_open_probes=2, success_threshold=1, open_for=10.0)
    )
    trip_closed(cb, 0.0)
    old_probe = cb.try_acquire(10.0)
    assert old_probe is not None
    fail(cb, 10.0)  # another probe fails: open again until 30
    assert cb.state_at(10.0) == "open"
    assert cb.state_at(30.0) == "half_open"
    cb.on_success(old_probe, 30.0, 0.1)  # from the previous half-open episode
    assert cb.state_at(30.0) == "half_open"
    cb.on_failure(old_probe, 30.0)
    assert cb.state_at(30.0) == "half_open"
    # It does not free a slot either.
    cb.on_abandon(old_probe)
    p = cb.try_acquire(30.0)
    p2 = cb.try_acquire(30.0)
    assert p is not None and p2 is not None
    assert cb.try_acquire(30.0) is None


def test_closed_ticket_is_ignored_while_half_open() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=2, success_threshold=1, open_for=10.0))
    old = cb.try_acquire(0.0)
    assert old is not None
    trip_closed(cb, 0.0)
    assert cb.state_at(10.0) == "half_open"
    cb.on_success(old, 10.0, 0.1)
    assert cb.state_at(10.0) == "half_open"
    cb.on_failure(old, 10.0)
    assert cb.state_at(10.0) == "half_open"
    assert cb.trips == 1


def test_closed_ticket_from_before_the_trip_is_ignored_after_recovery() -> None:
    # A slow call started before the trip says nothing about the provider now: its
    # failure, arriving after the breaker recovered, must not re-open it.
    cb = CircuitBreaker(cfg(failure_threshold=1, success_threshold=1, open_for=10.0))
    slow = cb.try_acquire(0.0)
    assert slow is not None
    fail(cb, 1.0)  # trips
    succeed(cb, 11.0)  # the probe closes it
    assert cb.state_at(11.0) == "closed"
    cb.on_failure(slow, 12.0)
    assert cb.state_at(12.0) == "closed"
    assert cb.trips == 0


def test_probe_result_after_the_breaker_closed_is_ignored() -> None:
    # A probe from the (finished) half-open episode cannot re-open the closed circuit.
    cb = CircuitBreaker(
        cfg(failure_threshold=1, half_open_probes=2, success_threshold=1, open_for=10.0)
    )
    trip_closed(cb, 0.0)
    p1 = cb.try_acquire(10.0)
    p2 = cb.try_acquire(10.0)
    assert p1 is not None and p2 is not None
    cb.on_success(p1, 11.0, 0.1)
    assert cb.state_at(11.0) == "closed"
    cb.on_failure(p2, 12.0)
    assert cb.state_at(12.0) == "closed"


def test_ticket_from_before_reset_is_ignored() -> None:
    cb = CircuitBreaker(cfg(failure_threshold=1, open_for=10.0))
    old = cb.try_acquire(0.0)
    assert old is not None
    cb.reset()
    cb.on_failure(old, 1.0)
    assert cb.state_at(1.0) == "closed"


# ---------------------------------------------------------------------------------------
# Adaptive mode
# ---------------------------------------------------------------------------------------


def adaptive(**kw: object) -> BreakerConfig:
    base: dict[str, object] = {
        "adaptive": True,
        "jitter": 0.0,
        "failure_threshold": 100,
        "failure_rate": 0.0,
        "latency_z_threshold": 2.5,
        "latency_window": 200,
        "latency_min_samples": 20,
        "latency_anomalies_to_open": 3,
        "open_for": 30.0,
    }
    base.update(kw)
    return BreakerConfig(**base)  # type: ignore[arg-type]


def normal_latencies(n: int) -> list[float]:
    # 100 ms-ish with a little variation: mean 100, std sqrt(2).
    return [100.0 + (i % 5 - 2) for i in range(n)]


def feed(cb: CircuitBreaker, latencies: list[float], now: float = 0.0) -> None:
    for lat in latencies:
        succeed(cb, now, lat)


def test_adaptive_latency_anomalies_open() -> None:
    cb = CircuitBreaker(adaptive())
    feed(cb, normal_latencies(100))
    assert cb.state_at(0.0) == "closed"
    feed(cb, [1000.0, 1000.0])
    assert cb.state_at(0.0) == "closed"
    feed(cb, [1000.0])
    assert cb.state_at(0.0) == "open"
    assert cb.open_until == pytest.approx(30.0)


def test_adaptive_fewer_anomalies_than_needed_do_not_open() -> None:
    cb = CircuitBreaker(adaptive(latency_anomalies_to_open=4))
    feed(cb, normal_latencies(100))
    feed(cb, [1000.0] * 3)
    assert cb.state_at(0.0) == "closed"
    feed(cb, [1000.0])
    assert cb.state_at(0.0) == "open"


def test_adaptive_normal_latency_resets_the_anomaly_count() -> None:
    cb = CircuitBreaker(adaptive())
    feed(cb, normal_latencies(100))
    feed(cb, [1000.0, 1000.0, 100.0, 1000.0, 1000.0])
    assert cb.state_at(0.0) == "closed"
    feed(cb, [1000.0])
    assert cb.state_at(0.0) == "open"


def test_adaptive_failure_resets_the_anomaly_count() -> None:
    cb = CircuitBreaker(adaptive())
    feed(cb, normal_latencies(100))
    feed(cb, [1000.0, 1000.0])
    fail(cb, 0.0)
    feed(cb, [1000.0, 1000.0])
    assert cb.state_at(0.0) == "closed"


def test_adaptive_needs_latency_min_samples() -> None:
    cb = CircuitBreaker(adaptive(latency_anomalies_to_open=1, latency_min_samples=20))
    feed(cb, normal_latencies(10))
    feed(cb, [1000.0])  # only 10 samples before it: not judged
    assert cb.state_at(0.0) == "closed"
    cb2 = CircuitBreaker(adaptive(latency_anomalies_to_open=1, latency_min_samples=20))
    feed(cb2, normal_latencies(20))
    feed(cb2, [1000.0])
    assert cb2.state_at(0.0) == "open"


def test_adaptive_no_anomaly_when_std_is_zero() -> None:
    cb = CircuitBreaker(adaptive(latency_anomalies_to_open=1))
    feed(cb, [100.0] * 20)
    feed(cb, [1000.0])  # std of the window was 0: no z-score, no anomaly
    assert cb.state_at(0.0) == "closed"
    feed(cb, [1000.0])  # now std > 0 and the z-score is large
    assert cb.state_at(0.0) == "open"


def test_adaptive_constant_inexact_latencies_have_zero_std() -> None:
    # 0.1 is not exact in binary; a window of identical 0.1 s latencies still has a
    # standard deviation of 0, so a slightly slower call is not a z-score anomaly.
    cb = CircuitBreaker(adaptive(latency_anomalies_to_open=1))
    feed(cb, [0.1] * 20)
    feed(cb, [0.1000001])
    assert cb.state_at(0.0) == "closed"


def test_adaptive_latency_is_not_judged_when_not_adaptive() -> None:
    cb = CircuitBreaker(adaptive(adaptive=False, latency_anomalies_to_open=1))
    feed(cb, normal_latencies(100))
    feed(cb, [1000.0] * 10)
    assert cb.state_at(0.0) == "closed"


def slow_cfg(**kw: object) -> BreakerConfig:
    base: dict[str, object] = {
        "slow_call_seconds": 1.0,
        "slow_call_rate": 0.5,
        "window": 10,
        "minimum_calls": 10,
        "latency_min_samples": 1000,  # keep the z-score trigger out of the way
    }
    base.update(kw)
    return adaptive(**base)


def test_adaptive_slow_call_rate_opens() -> None:
    cb = CircuitBreaker(slow_cfg())
    for _ in range(4):
        feed(cb, [0.1, 2.0])
    feed(cb, [0.1])
    assert cb.state_at(0.0) == "closed"  # 9 calls: below minimum_calls
    feed(cb, [2.0])  # 10 calls, 5 slow
    assert cb.state_at(0.0) == "open"


def test_adaptive_slow_call_rate_below_threshold_stays_closed() -> None:
    cb = CircuitBreaker(slow_cfg())
    for _ in range(20):
        feed(cb, [0.1, 0.1, 2.0])
    assert cb.state_at(0.0) == "closed"


def test_adaptive_slow_call_disabled_when_zero() -> None:
    cb = CircuitBreaker(slow_cfg(slow_call_seconds=0.0))
    feed(cb, [50.0] * 30)
    assert cb.state_at(0.0) == "closed"


def test_adaptive_call_at_exactly_slow_call_seconds_is_not_slow() -> None:
    cb = CircuitBreaker(slow_cfg())
    feed(cb, [1.0] * 30)
    assert cb.state_at(0.0) == "closed"


def sample_cfg(**kw: object) -> BreakerConfig:
    base: dict[str, object] = {
        "failure_threshold": 1,
        "half_open_sample": 5,
        "half_open_success_rate": 0.8,
        "half_open_probes": 1,
        "open_for": 10.0,
        "latency_min_samples": 1000,
    }
    base.update(kw)
    return adaptive(**base)


def test_adaptive_half_open_four_of_five_closes() -> None:
    cb = CircuitBreaker(sample_cfg())
    trip_closed(cb, 0.0)
    now = 10.0
    for ok in (True, True, False, True):
        (succeed if ok else fail)(cb, now)
        assert cb.state_at(now) == "half_open"
    succeed(cb, now)
    assert cb.state_at(now) == "closed"
    assert cb.trips == 0


def test_adaptive_half_open_waits_for_the_full_sample() -> None:
    cb = CircuitBreaker(sample_cfg())
    trip_closed(cb, 0.0)
    now = 10.0
    for _ in range(4):
        succeed(cb, now)
        assert cb.state_at(now) == "half_open"
    fail(cb, now)  # 4 of 5: still at the success rate
    assert cb.state_at(now) == "closed"


def test_adaptive_half_open_two_failures_reopen_early() -> None:
    cb = CircuitBreaker(sample_cfg())
    trip_closed(cb, 0.0)
    now = 10.0
    fail(cb, now)
    assert cb.state_at(now) == "half_open"  # one failure: 4 of 5 still possible
    succeed(cb, now)
    assert cb.state_at(now) == "half_open"
    fail(cb, now)  # two failures after 3 probes: the sample cannot reach 0.8
    assert cb.state_at(now) == "open"
    assert cb.open_until == pytest.approx(now + 20.0)  # second trip: grown
    assert cb.trips == 2


def test_adaptive_half_open_probes_limited_to_the_sample() -> None:
    cb = CircuitBreaker(sample_cfg(half_open_probes=10))
    trip_closed(cb, 0.0)
    tickets = [cb.try_acquire(10.0) for _ in range(5)]
    assert all(t is not None for t in tickets)
    assert cb.try_acquire(10.0) is None
    assert not cb.can_attempt(10.0)
    t0 = tickets[0]
    assert t0 is not None
    cb.on_abandon(t0)  # an abandoned probe frees its place in the sample
    assert cb.try_acquire(10.0) is not None
    assert cb.try_acquire(10.0) is None


# ---------------------------------------------------------------------------------------
# Stateful test against a reference model (non-adaptive, jitter 0)
# ---------------------------------------------------------------------------------------


class BreakerModel:
    """The documented rules, written plainly."""

    def __init__(self, c: BreakerConfig) -> None:
        self.c = c
        self.state = "closed"
        self.open_until = -math.inf
        self.consecutive = 0
        self.window: deque[bool] = deque(maxlen=c.window)
        self.trips = 0
        self.episode = 0
        self.in_flight = 0
        self.successes = 0

    def _new_episode(self) -> None:
        self.episode += 1
        self.in_flight = 0
        self.successes = 0

    def tick(self, now: float) -> None:
        if self.state == "open" and now >= self.open_until:
            self.state = "half_open"
            self._new_episode()

    def can_attempt(self, now: float) -> bool:
        self.tick(now)
        if self.state == "closed":
            return True
        if self.state == "open":
            return False
        return self.in_flight < self.c.half_open_probes

    def remaining(self, now: float) -> float:
        self.tick(now)
        return self.open_until - now if self.state == "open" else 0.0

    def acquire(self, now: float) -> bool:
        if not self.can_attempt(now):
            return False
        if self.state == "half_open":
            self.in_flight += 1
        return True

    def _trip(self, now: float) -> None:
        self.trips += 1
        c = self.c
        self.open_until = now + min(c.open_for * c.open_growth ** (self.trips - 1), c.open_for_max)
        self.state = "open"
        self._new_episode()

    def close(self) -> None:
        self.state = "closed"
        self.trips = 0
        self.open_until = -math.inf
        self.consecutive = 0
        self.window.clear()
        self._new_episode()

    def success(self, episode: int, now: float) -> None:
        if episode != self.episode:
            return  # stale: issued in an earlier episode
        if self.state == "closed":
            self.consecutive = 0
            self.window.append(False)
        else:
            self.in_flight -= 1
            self.successes += 1
            if self.successes >= self.c.success_threshold:
                self.close()

    def failure(self, episode: int, now: float) -> None:
        if episode != self.episode:
            return
        if self.state == "closed":
            self.consecutive += 1
            self.window.append(True)
            n = len(self.window)
            rate_trips = (
                self.c.failure_rate > 0
                and n >= self.c.minimum_calls
                and sum(self.window) >= self.c.failure_rate * n
            )
            if self.consecutive >= self.c.failure_threshold or rate_trips:
                self._trip(now)
        else:
            self.in_flight -= 1
            self._trip(now)

    def abandon(self, episode: int) -> None:
        if episode == self.episode and self.state == "half_open":
            self.in_flight -= 1


@dataclass
class Held:
    ticket: int
    episode: int  # the model's episode when the ticket was issued


breaker_configs = st.builds(
    lambda ft, fr, win, mc, of, growth, extra, hp, stt: BreakerConfig(
        failure_threshold=ft,
        failure_rate=fr,
        window=win,
        minimum_calls=mc,
        open_for=of,
        open_growth=growth,
        open_for_max=of * extra,
        jitter=0.0,
        half_open_probes=hp,
        success_threshold=stt,
    ),
    st.integers(1, 4),
    st.sampled_from([0.0, 0.5, 0.6, 1.0]),
    st.integers(1, 6),
    st.integers(1, 6),
    st.sampled_from([1.0, 5.0, 30.0]),
    st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    st.sampled_from([1.0, 4.0, 10.0]),
    st.integers(1, 3),
    st.integers(1, 3),
)


class BreakerMachine(RuleBasedStateMachine):
    # When False, tickets from an earlier episode are dropped instead of reported while
    # the breaker is closed (used to check the other rules independently of that one).
    report_stale_while_closed = True

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.held: list[Held] = []

    @initialize(c=breaker_configs)
    def setup(self, c: BreakerConfig) -> None:
        self.cb = CircuitBreaker(c)
        self.model = BreakerModel(c)

    # -- time ----------------------------------------------------------------------

    @rule(dt=st.one_of(st.floats(0.0, 50.0), st.sampled_from([0.0, 0.001, 1.0, 400.0])))
    def advance(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.model.state == "open")
    @rule(offset=st.sampled_from([0.0, -1e-6, 1e-6]))
    def advance_to_open_until(self, offset: float) -> None:
        self.now = max(self.now, self.model.open_until + offset)

    # -- calls -----------------------------------------------------------------------

    def _acquire(self) -> Held | None:
        ticket = self.cb.try_acquire(self.now)
        expected = self.model.acquire(self.now)
        assert (ticket is not None) == expected, (self.model.state, ticket)
        if ticket is None:
            return None
        return Held(ticket, self.model.episode)

    @rule()
    def acquire(self) -> None:
        h = self._acquire()
        if h is not None:
            self.held.append(h)

    @rule(latency=st.floats(0.0, 10.0))
    def call_succeeds(self, latency: float) -> None:
        h = self._acquire()
        if h is not None:
            self.cb.on_success(h.ticket, self.now, latency)
            self.model.success(h.episode, self.now)

    @rule()
    def call_fails(self) -> None:
        h = self._acquire()
        if h is not None:
            self.cb.on_failure(h.ticket, self.now)
            self.model.failure(h.episode, self.now)

    def _take(self, data: st.DataObject) -> Held | None:
        i = data.draw(st.integers(0, len(self.held) - 1))
        h = self.held.pop(i)
        if (
            not self.report_stale_while_closed
            and self.model.state == "closed"
            and h.episode != self.model.episode
        ):
            return None
        return h

    @precondition(lambda self: self.held)
    @rule(data=st.data(), latency=st.floats(0.0, 10.0))
    def held_succeeds(self, data: st.DataObject, latency: float) -> None:
        h = self._take(data)
        if h is not None:
            self.cb.on_success(h.ticket, self.now, latency)
            self.model.success(h.episode, self.now)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def held_fails(self, data: st.DataObject) -> None:
        h = self._take(data)
        if h is not None:
            self.cb.on_failure(h.ticket, self.now)
            self.model.failure(h.episode, self.now)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def held_abandoned(self, data: st.DataObject) -> None:
        h = self._take(data)
        if h is not None:
            self.cb.on_abandon(h.ticket)
            self.model.abandon(h.episode)

    @rule()
    def reset(self) -> None:
        self.cb.reset()
        self.model.close()

    @rule()
    def query(self) -> None:
        # These move an expired open breaker to half-open (the lazy transition).
        assert self.cb.can_attempt(self.now) == self.model.can_attempt(self.now)
        assert self.cb.state_at(self.now) == self.model.state

    # -- invariants (read-only on the breaker, so the lazy transition stays lazy) ------

    @invariant()
    def same_state(self) -> None:
        m = self.model
        m.tick(self.now)
        cb = self.cb
        effective = cb.state
        if effective == "open" and self.now >= cb.open_until:
            effective = "half_open"
        assert effective == m.state
        assert cb.trips == m.trips
        if m.state == "open":
            assert cb.open_until == pytest.approx(m.open_until, rel=1e-12)
        if m.state == "closed":
            assert cb.consecutive_failures == m.consecutive
        assert cb.remaining(self.now) == pytest.approx(m.remaining(self.now), abs=1e-9)
        assert cb.remaining(self.now) >= 0.0


class BreakerMachineNoStaleClosedReports(BreakerMachine):
    report_stale_while_closed = False


_machine_settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = _machine_settings
TestBreakerMachineNoStaleClosedReports = BreakerMachineNoStaleClosedReports.TestCase
TestBreakerMachineNoStaleClosedReports.settings = _machine_settings
