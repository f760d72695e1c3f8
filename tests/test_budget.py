"""Tests of the per-key rate budget state machine (router/_budget.py).

The budget is pure and takes `now` explicitly, so everything here is synchronous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from router._budget import WINDOW, RateBudget, Reservation


def reserve(b: RateBudget, now: float, tokens: int = 0) -> Reservation:
    r = b.try_reserve(now, tokens)
    assert r is not None
    return r


# ---------------------------------------------------------------------------------------
# Requests per minute
# ---------------------------------------------------------------------------------------


def test_rpm_admits_exactly_n_within_a_minute() -> None:
    b = RateBudget(rpm=5)
    t0 = 1000.0
    admitted = [b.try_reserve(t0 + i, 1) for i in range(6)]
    assert all(r is not None for r in admitted[:5])
    assert admitted[5] is None
    assert b.try_reserve(t0 + 59.999, 1) is None


def test_the_n_plus_first_is_admitted_at_exactly_t0_plus_60() -> None:
    b = RateBudget(rpm=3)
    t0 = 500.0
    for i in range(3):
        reserve(b, t0 + 10 * i)
    assert b.try_reserve(t0 + 30, 0) is None
    # The oldest reservation (t0) leaves the window at t0 + 60, not a bucket boundary.
    assert b.available_at(t0 + 30, 0) == t0 + WINDOW
    assert b.try_reserve(math.nextafter(t0 + WINDOW, -math.inf), 0) is None
    assert b.try_reserve(t0 + WINDOW, 0) is not None
    # Now full again, until the second one (t0 + 10) expires.
    assert b.available_at(t0 + WINDOW, 0) == t0 + 10 + WINDOW


def test_available_at_is_now_when_there_is_room() -> None:
    b = RateBudget(rpm=2, tpm=100)
    assert b.available_at(7.0, 50) == 7.0
    reserve(b, 7.0, 50)
    assert b.available_at(8.0, 50) == 8.0


def test_sliding_window_has_no_bucket_boundary_burst() -> None:
    # A fixed per-minute bucket would admit 2N around a boundary; the sliding window
    # admits at most N in any 60 s.
    b = RateBudget(rpm=4)
    for i in range(4):
        reserve(b, 59.0 + i * 0.1)
    for t in (60.0, 61.0, 100.0, 118.9):
        assert b.try_reserve(t, 0) is None
    assert b.try_reserve(119.0, 0) is not None


def test_rpm_only_ignores_tokens() -> None:
    b = RateBudget(rpm=2)
    reserve(b, 0.0, 10**9)
    reserve(b, 0.0, 10**9)
    assert b.try_reserve(0.0, 0) is None
    assert b.remaining(0.0) == (0, None)


# ---------------------------------------------------------------------------------------
# Tokens per minute
# ---------------------------------------------------------------------------------------


def test_tpm_reserves_by_estimate() -> None:
    b = RateBudget(tpm=1000)
    reserve(b, 0.0, 400)
    reserve(b, 1.0, 400)
    assert b.try_reserve(2.0, 300) is None
    reserve(b, 2.0, 200)  # exactly fills the budget
    assert b.try_reserve(2.0, 1) is None
    assert b.remaining(2.0) == (None, 0)
    assert b.available_at(2.0, 300) == 0.0 + WINDOW
    assert b.available_at(2.0, 500) == 1.0 + WINDOW


def test_reconcile_down_frees_the_difference() -> None:
    b = RateBudget(tpm=1000)
    r1 = reserve(b, 0.0, 600)
    reserve(b, 0.0, 400)
    assert b.try_reserve(1.0, 100) is None
    b.reconcile(r1, 150, 1.0)  # the provider used 150 of the 600 reserved
    assert r1.tokens == 150
    assert b.remaining(1.0) == (None, 450)
    reserve(b, 1.0, 300)
    reserve(b, 1.0, 150)
    assert b.try_reserve(1.0, 1) is None


def test_reconcile_up_takes_the_difference() -> None:
    b = RateBudget(tpm=1000)
    r1 = reserve(b, 0.0, 300)
    assert b.remaining(0.0) == (None, 700)
    b.reconcile(r1, 800, 1.0)
    assert b.remaining(1.0) == (None, 200)
    assert b.try_reserve(1.0, 300) is None
    assert b.available_at(1.0, 300) == WINDOW
    reserve(b, 1.0, 200)


def test_usage_above_the_budget_overdraws_until_it_expires() -> None:
    b = RateBudget(tpm=100)
    r = reserve(b, 0.0, 100)
    b.reconcile(r, 250, 5.0)
    assert b.remaining(5.0) == (None, 0)
    assert b.try_reserve(5.0, 0) is None  # even a zero-token request: overdrawn
    assert b.available_at(5.0, 0) == WINDOW
    assert b.try_reserve(WINDOW, 100) is not None


def test_reconcile_keeps_the_request_count() -> None:
    b = RateBudget(rpm=1, tpm=1000)
    r = reserve(b, 0.0, 500)
    b.reconcile(r, 0, 1.0)
    assert b.remaining(1.0) == (0, 1000)
    assert b.try_reserve(1.0, 0) is None
    assert b.available_at(1.0, 0) == WINDOW


def test_reconcile_after_expiry_changes_nothing() -> None:
    b = RateBudget(tpm=100)
    r = reserve(b, 0.0, 50)
    reserve(b, 30.0, 50)
    b.reconcile(r, 1000, 70.0)  # a slow request: its reservation left the window at 60
    assert r.tokens == 1000
    assert b.remaining(70.0) == (None, 50)
    reserve(b, 70.0, 50)


# ---------------------------------------------------------------------------------------
# Release
# ---------------------------------------------------------------------------------------


def test_release_gives_back_request_and_tokens() -> None:
    b = RateBudget(rpm=2, tpm=100)
    r1 = reserve(b, 0.0, 60)
    reserve(b, 1.0, 40)
    assert b.remaining(1.0) == (0, 0)
    assert b.try_reserve(2.0, 10) is None
    b.release(r1)
    assert b.remaining(2.0) == (1, 60)
    reserve(b, 2.0, 60)
    assert b.try_reserve(2.0, 0) is None


def test_release_is_idempotent_and_ends_reconciling() -> None:
    b = RateBudget(rpm=3, tpm=100)
    r = reserve(b, 0.0, 30)
    b.release(r)
    b.release(r)
    b.reconcile(r, 90, 1.0)
    assert b.remaining(1.0) == (3, 100)


def test_release_after_expiry_is_a_no_op() -> None:
    b = RateBudget(rpm=1, tpm=100)
    r = reserve(b, 0.0, 30)
    r2 = reserve(b, 60.0, 30)
    b.release(r)
    assert b.remaining(60.0) == (0, 70)
    b.release(r2)
    assert b.remaining(60.0) == (1, 100)


def test_release_in_the_middle_moves_available_at() -> None:
    b = RateBudget(rpm=3)
    reserve(b, 0.0)
    r = reserve(b, 10.0)
    reserve(b, 20.0)
    assert b.available_at(30.0, 0) == 60.0
    b.release(r)
    assert b.available_at(30.0, 0) == 30.0
    reserve(b, 30.0)
    # Held now: 0, 20, 30 (10 was released): the next slot is when 0 expires, then 20.
    assert b.available_at(31.0, 0) == 60.0
    reserve(b, 60.0)
    assert b.available_at(61.0, 0) == 80.0


def test_available_at_skips_released_tokens() -> None:
    b = RateBudget(tpm=100)
    reserve(b, 0.0, 40)
    r = reserve(b, 10.0, 40)
    b.release(r)
    reserve(b, 20.0, 40)
    assert b.available_at(21.0, 60) == 0.0 + WINDOW
    # A full-budget request needs both held ones gone; the released one does not count.
    assert b.available_at(21.0, 100) == 20.0 + WINDOW
    assert b.try_reserve(10.0 + WINDOW, 100) is None
    assert b.try_reserve(20.0 + WINDOW, 100) is not None


# ---------------------------------------------------------------------------------------
# Oversize requests
# ---------------------------------------------------------------------------------------


def test_oversize_request_is_admitted_on_an_empty_window() -> None:
    b = RateBudget(tpm=100)
    r = reserve(b, 0.0, 500)
    assert b.remaining(0.0) == (None, 0)
    assert b.try_reserve(1.0, 0) is None
    assert b.try_reserve(1.0, 1) is None
    assert b.available_at(1.0, 10) == WINDOW
    reserve(b, WINDOW, 10)
    b.reconcile(r, 5, 61.0)  # expired already: nothing changes
    assert b.remaining(61.0) == (None, 90)


def test_oversize_request_waits_for_the_window_to_empty() -> None:
    b = RateBudget(tpm=100)
    reserve(b, 0.0, 10)
    reserve(b, 30.0, 10)
    assert b.try_reserve(31.0, 500) is None
    # Only when both small ones have expired does the window hold no tokens.
    assert b.available_at(31.0, 500) == 30.0 + WINDOW
    assert b.try_reserve(60.0, 500) is None
    assert b.try_reserve(30.0 + WINDOW, 500) is not None


def test_oversize_request_admitted_when_window_holds_no_tokens() -> None:
    # A reservation reconciled to zero tokens still counts as a request, not as tokens.
    b = RateBudget(rpm=5, tpm=100)
    r = reserve(b, 0.0, 50)
    b.reconcile(r, 0, 1.0)
    reserve(b, 1.0, 0)
    assert b.available_at(1.0, 500) == 1.0
    assert b.try_reserve(1.0, 500) is not None
    assert b.remaining(1.0) == (2, 0)


def test_oversize_request_also_needs_a_request_slot() -> None:
    b = RateBudget(rpm=1, tpm=100)
    r = reserve(b, 0.0, 0)
    assert b.try_reserve(1.0, 500) is None
    assert b.available_at(1.0, 500) == WINDOW
    b.release(r)
    assert b.available_at(1.0, 500) == 1.0


# ---------------------------------------------------------------------------------------
# Unlimited, remaining, validation, clock
# ---------------------------------------------------------------------------------------


def test_unlimited_budget_always_admits_and_keeps_nothing() -> None:
    b = RateBudget()
    assert b.unlimited
    rs = [reserve(b, 0.0, 10**9) for _ in range(1000)]
    assert b.available_at(0.0, 10**12) == 0.0
    assert b.remaining(0.0) == (None, None)
    b.reconcile(rs[0], 3, 0.0)
    assert rs[0].tokens == 3
    b.release(rs[1])
    assert len(b._live) == 0


def test_remaining_counts_the_window() -> None:
    b = RateBudget(rpm=10, tpm=1000)
    assert b.remaining(0.0) == (10, 1000)
    reserve(b, 0.0, 100)
    reserve(b, 20.0, 200)
    r = reserve(b, 40.0, 300)
    assert b.remaining(40.0) == (7, 400)
    b.reconcile(r, 100, 45.0)
    assert b.remaining(45.0) == (7, 600)
    assert b.remaining(60.0) == (8, 700)  # the first left at 60
    assert b.remaining(80.0) == (9, 900)
    assert b.remaining(100.0) == (10, 1000)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        RateBudget(rpm=0)
    with pytest.raises(ValueError):
        RateBudget(tpm=-1)
    b = RateBudget(rpm=1, tpm=10)
    with pytest.raises(ValueError):
        b.try_reserve(0.0, -1)
    r = reserve(b, 0.0, 1)
    with pytest.raises(ValueError):
        b.reconcile(r, -5, 0.0)


def test_a_clock_going_back_cannot_reorder_the_window() -> None:
    b = RateBudget(rpm=2)
    reserve(b, 10.0)
    r = reserve(b, 5.0)  # an earlier `now` is stamped with the newest time
    assert r.time == 10.0
    assert b.try_reserve(11.0, 0) is None
    assert b.available_at(11.0, 0) == 70.0


def test_expired_reservations_are_dropped() -> None:
    b = RateBudget(rpm=1000, tpm=10**9)
    for i in range(500):
        reserve(b, float(i), 1)
    assert b.remaining(499.0) == (940, 10**9 - 60)
    assert len(b._live) == 60


# ---------------------------------------------------------------------------------------
# Stateful: the budget against a naive reference model
# ---------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One admitted request in the reference model."""

    time: float
    estimate: int
    tokens: int  # what the budget should hold for it now
    reconciled: bool = False
    released: bool = False


class Model:
    """A plain list of reservations; everything is recomputed from scratch."""

    def __init__(self, rpm: int | None, tpm: int | None) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.entries: list[Entry] = []

    def live(self, now: float) -> list[Entry]:
        return [e for e in self.entries if not e.released and now < e.time + WINDOW]

    def admits(self, now: float, tokens: int) -> bool:
        live = self.live(now)
        held = sum(e.tokens for e in live)
        if self.rpm is not None and len(live) + 1 > self.rpm:
            return False
        return self.tpm is None or held + tokens <= self.tpm or held == 0

    def available_at(self, now: float, tokens: int) -> float:
        # Admission can only change when a reservation expires.
        candidates = sorted({now} | {e.time + WINDOW for e in self.live(now)})
        for c in candidates:
            if self.admits(c, tokens):
                return c
        raise AssertionError("a budget with nothing in the window must admit")


# Zero-token and oversize requests are the corner cases: draw them often.
TOKENS = st.sampled_from([0, 0, 1, 50, 100]) | st.integers(0, 400)


class BudgetMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.budget = RateBudget()
        self.model = Model(None, None)
        self.entry_of: dict[int, Entry] = {}

    @initialize(
        rpm=st.none() | st.integers(1, 8),
        tpm=st.none() | st.sampled_from([1, 2, 100, 250]) | st.integers(1, 300),
    )
    def setup(self, rpm: int | None, tpm: int | None) -> None:
        self.budget = RateBudget(rpm, tpm)
        self.model = Model(rpm, tpm)

    @rule(
        dt=st.sampled_from([0.0, 0.5, 1.0, 10.0, 30.0, 59.0, 60.0, 61.0, 120.0])
        | st.floats(0.0, 90.0, allow_nan=False)
    )
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(target=reservations, tokens=TOKENS)
    def try_reserve(self, tokens: int) -> Reservation | None:
        expected = self.model.admits(self.now, tokens)
        predicted = self.budget.available_at(self.now, tokens)
        r = self.budget.try_reserve(self.now, tokens)
        assert (r is not None) == expected
        assert (predicted == self.now) == expected  # available_at agrees with trying
        assert predicted == self.model.available_at(self.now, tokens)
        if r is None:
            return None
        assert r.time == self.now
        assert r.tokens == tokens
        e = Entry(self.now, tokens, tokens)
        self.model.entries.append(e)
        self.entry_of[id(r)] = e
        return r

    @rule(target=reservations, tokens=TOKENS)
    def reserve_when_available(self, tokens: int) -> Reservation:
        """Jump to available_at(): refused just before it, admitted at it."""
        at = self.budget.available_at(self.now, tokens)
        assert at >= self.now
        assert at == self.model.available_at(self.now, tokens)
        if at > self.now:
            before = math.nextafter(at, -math.inf)
            assert not self.model.admits(before, tokens)
            assert self.budget.try_reserve(before, tokens) is None
        self.now = at
        r = self.budget.try_reserve(self.now, tokens)
        assert r is not None
        e = Entry(self.now, tokens, tokens)
        self.model.entries.append(e)
        self.entry_of[id(r)] = e
        return r

    @rule(r=reservations, actual=TOKENS)
    def reconcile(self, r: Reservation | None, actual: int) -> None:
        if r is None:
            return
        e = self.entry_of[id(r)]
        if e.reconciled:
            return  # one usage report per request
        self.budget.reconcile(r, actual, self.now)
        # Out of the window this changes nothing the budget counts (`live()` ignores
        # the entry); the window invariant judges the final usage either way.
        e.reconciled = True
        e.tokens = actual
        assert r.tokens == actual

    @rule(r=consumes(reservations))
    def release(self, r: Reservation | None) -> None:
        if r is None:
            return
        e = self.entry_of[id(r)]
        self.budget.release(r)
        # Already out of the window, releasing changes nothing: keep it in the history
        # the window invariant checks (it really was admitted and counted).
        e.released = self.now < e.time + WINDOW

    @precondition(lambda self: self.budget.rpm is None and self.budget.tpm is None)
    @rule(tokens=st.integers(0, 10**6))
    def unlimited_always_admits(self, tokens: int) -> None:
        assert self.budget.try_reserve(self.now, tokens) is not None

    @invariant()
    def remaining_agrees(self) -> None:
        live = self.model.live(self.now)
        requests, tokens = self.budget.remaining(self.now)
        rpm, tpm = self.model.rpm, self.model.tpm
        assert requests == (None if rpm is None else rpm - len(live))
        held = sum(e.tokens for e in live)
        assert tokens == (None if tpm is None else max(0, tpm - held))

    @invariant()
    def available_at_agrees(self) -> None:
        for tokens in (0, 1, 60, 150, 400):
            assert self.budget.available_at(self.now, tokens) == self.model.available_at(
                self.now, tokens
            )

    @invariant()
    def every_window_keeps_the_budget(self) -> None:
        """In any 60 s interval: at most rpm requests, and at most tpm tokens (each
        request's smaller of estimate and reported usage), unless the interval holds
        a single request with tokens (the oversize rule)."""
        kept = [e for e in self.model.entries if not e.released]
        rpm, tpm = self.model.rpm, self.model.tpm
        # The worst interval starts at some reservation's time.
        for start in {e.time for e in kept}:
            inside = [e for e in kept if start <= e.time < start + WINDOW]
            if rpm is not None:
                assert len(inside) <= rpm
            if tpm is not None:
                used = [min(e.estimate, e.tokens) for e in inside]
                assert sum(used) <= tpm or sum(1 for u in used if u > 0) == 1


TestBudgetMachine = BudgetMachine.TestCase
TestBudgetMachine.settings = settings(max_examples=250, stateful_step_count=40, deadline=None)
