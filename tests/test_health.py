"""Tests of the per-model health state machine (router/_health.py).

Health stores only what the model itself says (disabled on model-missing) and what
other instances tell it; a model's cooling is derived from its keys and lanes by the
router (tests/test_lanes.py checks that through the Router)."""

from __future__ import annotations

import pytest

from router._config import HealthConfig
from router._health import ModelHealth


def hc(disabled_for: float = 3600.0) -> HealthConfig:
    return HealthConfig(disabled_for=disabled_for)


def test_fresh_model_is_healthy() -> None:
    h = ModelHealth(hc())
    assert h.state_at(0.0) == "healthy"
    assert h.is_callable(0.0)
    assert h.remaining(0.0) == 0.0


def test_the_old_cooling_settings_are_config_errors() -> None:
    # Removed on purpose: a model cools only while its keys cannot serve it.
    from router import ConfigError, RouterConfig

    with pytest.raises(ConfigError) as info:
        RouterConfig.from_dict(
            {
                "providers": [{"name": "p", "kind": "simulated", "keys": [{"id": "k"}]}],
                "router": {"health": {"failures_to_cool": 3}},
            }
        )
    assert info.value.field == "router.health.failures_to_cool"


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


def test_model_missing_again_never_shortens() -> None:
    h = ModelHealth(hc(disabled_for=100.0))
    h.on_model_missing(0.0)
    assert h.merge("disabled", 500.0, 1.0)
    h.on_model_missing(2.0)
    assert h.until == pytest.approx(500.0)


def test_success_makes_it_healthy() -> None:
    h = ModelHealth(hc())
    h.on_model_missing(0.0)
    h.on_success()
    assert h.state_at(0.0) == "healthy"
    assert h.remaining(0.0) == 0.0


def test_cooling_learned_elsewhere_does_not_relabel_disabled() -> None:
    h = ModelHealth(hc(disabled_for=3600.0))
    h.on_model_missing(0.0)
    assert not h.merge("cooling", 50.0, 1.0)
    assert h.state_at(2.0) == "disabled"
    assert h.until == pytest.approx(3600.0)


def test_cooling_learned_elsewhere_expires() -> None:
    h = ModelHealth(hc())
    assert h.merge("cooling", 30.0, 0.0)
    assert not h.is_callable(29.9)
    assert h.is_callable(30.0)


def test_reset() -> None:
    h = ModelHealth(hc())
    h.on_model_missing(0.0)
    h.reset()
    assert h.state_at(0.0) == "healthy"
    assert h.is_callable(0.0)
    assert h.remaining(0.0) == 0.0
