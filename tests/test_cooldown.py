"""Tests of the key cooldown state machine (router/_cooldown.py)."""

from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from router._config import CooldownConfig
from router._cooldown import Cooldown


def test_fresh_cooldown_is_not_cooling() -> None:
    cd = Cooldown(CooldownConfig())
    assert not cd.is_cooling(0.0)
    assert cd.remaining(0.0) == 0.0
    assert cd.hits == 0
    assert cd.reason is None


def test_rate_limit_with_retry_after_cools_at_least_retry_after() -> None:
    cd = Cooldown(CooldownConfig(min=5.0))
    delay = cd.hit(100.0, "rate_limit", retry_after=7.0)
    assert delay == 7.0
    assert cd.until == 107.0
    assert cd.reason == "rate_limit"
    assert cd.is_cooling(106.999)
    assert cd.remaining(100.0) == pytest.approx(7.0)
    assert cd.remaining(106.0) == pytest.approx(1.0)
    assert not cd.is_cooling(107.0)
    assert cd.remaining(107.0) == 0.0
    assert cd.remaining(200.0) == 0.0


def test_retry_after_smaller_than_backoff_uses_backoff() -> None:
    cd = Cooldown(CooldownConfig(min=5.0))
    assert cd.hit(0.0, "rate_limit", retry_after=1.0) == 5.0
    assert cd.until == 5.0


def test_missing_zero_or_negative_retry_after_is_ignored() -> None:
    for ra in (None, 0.0, -3.0):
        cd = Cooldown(CooldownConfig(min=5.0))
        assert cd.hit(0.0, "rate_limit", retry_after=ra) == 5.0
        assert cd.until == 5.0


def test_rate_limit_backoff_grows_by_hit_count_and_is_capped() -> None:
    cd = Cooldown(CooldownConfig(min=5.0, factor=2.0, max=300.0))
    now = 0.0
    delays = []
    for _ in range(9):
        delays.append(cd.hit(now, "rate_limit"))
        assert cd.until == pytest.approx(now + delays[-1])
        now = cd.until  # rate-limited again as soon as the cooldown runs out
        assert not cd.is_cooling(now)
    assert delays == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]
    assert cd.hits == 9


def test_backoff_stays_capped_after_very_many_hits() -> None:
    # A key that is only ever rate-limited must keep backing off at `max`; the hit count
    # must not make the backoff computation overflow (2.0 ** 1024 raises for floats).
    cd = Cooldown(CooldownConfig(min=5.0, factor=2.0, max=300.0))
    now = 0.0
    for _ in range(1100):
        delay = cd.hit(now, "rate_limit")
        now = cd.until
    assert delay == 300.0


def test_retry_after_above_max_is_honoured() -> None:
    cd = Cooldown(CooldownConfig(min=5.0, max=300.0))
    assert cd.hit(0.0, "rate_limit", retry_after=900.0) == 900.0
    assert cd.remaining(0.0) == 900.0


def test_smaller_later_retry_after_never_shortens() -> None:
    cd = Cooldown(CooldownConfig(min=5.0))
    cd.hit(0.0, "rate_limit", retry_after=60.0)
    assert cd.until == 60.0
    delay = cd.hit(10.0, "rate_limit", retry_after=1.0)
    assert delay == 10.0  # the second hit asked for max(1, 5 * 2)
    assert cd.until == 60.0
    assert cd.is_cooling(59.0)
    assert cd.remaining(10.0) == 50.0


def test_longer_later_hit_extends() -> None:
    cd = Cooldown(CooldownConfig(min=5.0))
    cd.hit(0.0, "rate_limit", retry_after=10.0)
    cd.hit(5.0, "rate_limit", retry_after=30.0)
    assert cd.until == 35.0


def test_rate_limit_does_not_shorten_an_auth_cooldown() -> None:
    cd = Cooldown(CooldownConfig(auth=600.0))
    cd.hit(0.0, "auth")
    cd.hit(1.0, "rate_limit", retry_after=2.0)
    assert cd.until == 600.0
    assert cd.reason == "auth"


def test_auth_uses_config_auth() -> None:
    cd = Cooldown(CooldownConfig(auth=123.0, balance=4567.0))
    assert cd.hit(10.0, "auth") == 123.0
    assert cd.until == 133.0
    assert cd.reason == "auth"
    assert cd.hits == 0  # auth failures are not rate-limit hits
    assert cd.is_cooling(132.9)
    assert not cd.is_cooling(133.0)


def test_balance_uses_config_balance() -> None:
    cd = Cooldown(CooldownConfig(auth=123.0, balance=4567.0))
    assert cd.hit(10.0, "balance") == 4567.0
    assert cd.until == 4577.0
    assert cd.reason == "balance"
    assert cd.hits == 0


def test_auth_and_balance_honour_a_longer_retry_after() -> None:
    cd = Cooldown(CooldownConfig(auth=100.0, balance=200.0))
    assert cd.hit(0.0, "auth", retry_after=150.0) == 150.0
    cd2 = Cooldown(CooldownConfig(auth=100.0, balance=200.0))
    assert cd2.hit(0.0, "balance", retry_after=50.0) == 200.0


def test_balance_after_rate_limit_extends_and_changes_reason() -> None:
    cd = Cooldown(CooldownConfig(min=5.0, balance=3600.0))
    cd.hit(0.0, "rate_limit")
    cd.hit(1.0, "balance")
    assert cd.until == 3601.0
    assert cd.reason == "balance"


def test_success_resets_the_hit_count() -> None:
    cd = Cooldown(CooldownConfig(min=5.0, factor=2.0))
    cd.hit(0.0, "rate_limit")
    cd.hit(5.0, "rate_limit")
    cd.hit(15.0, "rate_limit")
    assert cd.hits == 3
    cd.on_success()
    assert cd.hits == 0
    assert cd.hit(100.0, "rate_limit") == 5.0


def test_expiry_does_not_reset_the_hit_count() -> None:
    cd = Cooldown(CooldownConfig(min=5.0, factor=2.0))
    cd.hit(0.0, "rate_limit")
    assert not cd.is_cooling(1000.0)
    assert cd.hit(1000.0, "rate_limit") == 10.0


def test_success_does_not_end_a_running_cooldown() -> None:
    cd = Cooldown(CooldownConfig(min=5.0))
    cd.hit(0.0, "rate_limit", retry_after=30.0)
    cd.on_success()
    assert cd.is_cooling(10.0)


def test_reset_clears_everything() -> None:
    cd = Cooldown(CooldownConfig(min=5.0))
    cd.hit(0.0, "rate_limit")
    cd.hit(1.0, "auth")
    cd.reset()
    assert not cd.is_cooling(1.0)
    assert cd.remaining(1.0) == 0.0
    assert cd.hits == 0
    assert cd.reason is None
    assert cd.hit(2.0, "rate_limit") == 5.0
    assert cd.until == 7.0


# ---------------------------------------------------------------------------------------
# Stateful test against a reference model
# ---------------------------------------------------------------------------------------


class CooldownModel:
    def __init__(self, c: CooldownConfig) -> None:
        self.c = c
        self.until = -math.inf
        self.hits = 0
        self.reason: str | None = None

    def hit(self, now: float, reason: str, retry_after: float | None) -> float:
        ra = retry_after if retry_after and retry_after > 0 else 0.0
        if reason == "rate_limit":
            delay = max(ra, min(self.c.min * self.c.factor**self.hits, self.c.max))
            self.hits += 1
        else:
            delay = max(ra, self.c.auth if reason == "auth" else self.c.balance)
        if now + delay > self.until:
            self.until = now + delay
            self.reason = reason
        return delay

    def reset(self) -> None:
        self.until = -math.inf
        self.hits = 0
        self.reason = None


cooldown_configs = st.builds(
    lambda lo, span, factor, auth, balance: CooldownConfig(
        min=lo, max=lo * span, factor=factor, auth=auth, balance=balance
    ),
    st.sampled_from([0.5, 1.0, 5.0]),
    st.sampled_from([1.0, 3.0, 60.0]),
    st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    st.sampled_from([10.0, 600.0]),
    st.sampled_from([20.0, 3600.0]),
)
retry_afters = st.one_of(st.none(), st.sampled_from([0.0, -1.0]), st.floats(0.001, 1000.0))


class CooldownMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 50.0

    @initialize(c=cooldown_configs)
    def setup(self, c: CooldownConfig) -> None:
        self.cd = Cooldown(c)
        self.model = CooldownModel(c)

    @rule(dt=st.one_of(st.floats(0.0, 500.0), st.sampled_from([0.0, 1e-6, 3600.0])))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(offset=st.sampled_from([0.0, -1e-6, 1e-6]))
    def advance_to_until(self, offset: float) -> None:
        if math.isfinite(self.model.until):
            self.now = max(self.now, self.model.until + offset)

    @rule(reason=st.sampled_from(["rate_limit", "rate_limit", "auth", "balance"]), ra=retry_afters)
    def hit(self, reason: str, ra: float | None) -> None:
        before = self.cd.until
        got = self.cd.hit(self.now, reason, retry_after=ra)  # type: ignore[arg-type]
        want = self.model.hit(self.now, reason, ra)
        assert got == pytest.approx(want)
        assert self.cd.until >= before  # never shortened
        if ra is not None and ra > 0:
            assert got >= ra

    @rule()
    def on_success(self) -> None:
        self.cd.on_success()
        self.model.hits = 0

    @rule()
    def reset(self) -> None:
        self.cd.reset()
        self.model.reset()

    @invariant()
    def agrees(self) -> None:
        m = self.model
        cd = self.cd
        assert cd.until == pytest.approx(m.until)
        assert cd.hits == m.hits
        assert cd.reason == m.reason
        assert cd.is_cooling(self.now) == (self.now < m.until)
        assert cd.remaining(self.now) == pytest.approx(max(0.0, m.until - self.now), abs=1e-9)


TestCooldownMachine = CooldownMachine.TestCase
TestCooldownMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
