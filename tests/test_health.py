"""Tests of the per-model health state machine (router/_health.py)."""

from __future__ import annotations

import pytest

from router._config import HealthConfig
from router._health import ModelHealth


def hc(**kw: object) -> HealthConfig:
    base: dict[str, object] = {
        "failures_to_cool": 3,
        "cooling_for": 30.0,
        "cooling_max": 300.0,
        "disabled_for": 3600.0,
    }
    base.update(kw)
    return HealthConfig(**base)  # type: ignore[arg-type]


def cool(h: ModelHealth, now: float) -> None:
    for _ in range(h.config.failures_to_cool):
        h.on_availability_failure(now)


def test_fresh_model_is_healthy() -> None:
    h = ModelHealth(hc())
    assert h.state_at(0.0) == "healthy"
    assert h.is_callable(0.0)
    assert h.remaining(0.0) == 0.0


def test_cools_after_failures_to_cool_consecutive_failures() -> None:
    h = ModelHealth(hc(failures_to_cool=3, cooling_for=30.0))
    h.on_availability_failure(100.0)
    h.on_availability_failure(100.0)
    assert h.state_at(100.0) == "healthy"
    assert h.is_callable(100.0)
    h.on_availability_failure(100.0)
    assert h.state_at(100.0) == "cooling"
    assert not h.is_callable(100.0)
    assert h.remaining(100.0) == pytest.approx(30.0)
    assert h.remaining(110.0) == pytest.approx(20.0)
    assert h.state_at(129.999) == "cooling"
    assert not h.is_callable(129.999)


def test_cooling_expires_exactly_at_cooling_for() -> None:
    h = ModelHealth(hc(cooling_for=30.0))
    cool(h, 100.0)
    assert h.is_callable(130.0)
    assert h.state_at(130.0) == "healthy"
    assert h.remaining(130.0) == 0.0


def test_cooling_grows_twofold_on_repeats_up_to_cooling_max() -> None:
    h = ModelHealth(hc(cooling_for=30.0, cooling_max=300.0))
    now = 0.0
    durations = []
    for _ in range(7):
        cool(h, now)
        assert h.state_at(now) == "cooling"
        durations.append(h.until - now)
        now = h.until
        assert h.state_at(now) == "healthy"
    assert durations == pytest.approx([30.0, 60.0, 120.0, 240.0, 300.0, 300.0, 300.0])


def test_cooling_stays_capped_after_very_many_repeats() -> None:
    # A model that stays down keeps cooling at cooling_max; the repeat count must not
    # make the duration computation overflow (2.0 ** 1024 raises for floats).
    h = ModelHealth(hc(failures_to_cool=1, cooling_for=30.0, cooling_max=300.0))
    now = 0.0
    for _ in range(1100):
        h.on_availability_failure(now)
        now = h.until
    h.on_availability_failure(now)
    assert h.until - now == pytest.approx(300.0)


def test_success_resets_the_failure_count() -> None:
    h = ModelHealth(hc(failures_to_cool=3))
    for _ in range(5):
        h.on_availability_failure(0.0)
        h.on_availability_failure(0.0)
        h.on_success()
    assert h.state_at(0.0) == "healthy"
    assert h.failures == 0


def test_success_resets_the_growth() -> None:
    h = ModelHealth(hc(cooling_for=30.0))
    cool(h, 0.0)
    cool(h, 30.0)
    assert h.until == pytest.approx(90.0)  # second cooling: 60 s
    h.on_success()
    assert h.state_at(90.0) == "healthy"
    cool(h, 100.0)
    assert h.until == pytest.approx(130.0)  # back to cooling_for


def test_success_ends_cooling() -> None:
    h = ModelHealth(hc())
    cool(h, 0.0)
    h.on_success()
    assert h.state_at(1.0) == "healthy"
    assert h.is_callable(1.0)
    assert h.remaining(1.0) == 0.0


def test_failure_count_restarts_after_cooling() -> None:
    h = ModelHealth(hc(failures_to_cool=3, cooling_for=30.0))
    cool(h, 0.0)
    h.on_availability_failure(30.0)
    h.on_availability_failure(30.0)
    assert h.state_at(30.0) == "healthy"
    h.on_availability_failure(30.0)
    assert h.state_at(30.0) == "cooling"


def test_model_missing_disables_for_disabled_for() -> None:
    h = ModelHealth(hc(disabled_for=3600.0))
    h.on_model_missing(10.0)
    assert h.state_at(10.0) == "disabled"
    assert not h.is_callable(10.0)
    assert h.remaining(10.0) == pytest.approx(3600.0)
    assert h.state_at(3609.999) == "disabled"
    assert h.state_at(3610.0) == "healthy"
    assert h.is_callable(3610.0)
    assert h.remaining(3610.0) == 0.0


def test_state_at_returns_healthy_after_expiry() -> None:
    h = ModelHealth(hc())
    h.on_model_missing(0.0)
    assert h.state_at(1e6) == "healthy"
    h2 = ModelHealth(hc())
    cool(h2, 0.0)
    assert h2.state_at(1e6) == "healthy"


def test_model_missing_while_cooling_disables() -> None:
    h = ModelHealth(hc(cooling_for=30.0, disabled_for=3600.0))
    cool(h, 0.0)
    h.on_model_missing(5.0)
    assert h.state_at(5.0) == "disabled"
    assert h.until == pytest.approx(3605.0)


def test_availability_failures_do_not_turn_disabled_into_cooling() -> None:
    # Disabled lasts disabled_for (or until a reset); availability failures arriving
    # meanwhile (e.g. from requests already in flight) must not relabel it as cooling.
    h = ModelHealth(hc(failures_to_cool=3, cooling_for=30.0, disabled_for=3600.0))
    h.on_model_missing(0.0)
    cool(h, 1.0)
    assert h.state_at(2.0) == "disabled"
    assert not h.is_callable(2.0)
    assert h.until == pytest.approx(3600.0)


def test_reset() -> None:
    h = ModelHealth(hc(cooling_for=30.0))
    h.on_model_missing(0.0)
    h.reset()
    assert h.state_at(0.0) == "healthy"
    assert h.is_callable(0.0)
    assert h.remaining(0.0) == 0.0
    cool(h, 1.0)
    cool(h, 31.0)
    h.on_availability_failure(61.0)
    h.reset()
    assert h.state_at(61.0) == "healthy"
    assert h.failures == 0
    assert h.trips == 0
    cool(h, 100.0)
    assert h.until == pytest.approx(130.0)
