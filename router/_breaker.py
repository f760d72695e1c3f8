"""The circuit breaker: a pure state machine, fed events, clock injected.

Rules every change here must keep:

1. No I/O and no clock of its own: every method that depends on time takes `now`
   (the router passes `trio.current_time()`), so tests drive it synchronously.
2. One writer. The key actor that owns a breaker is the only caller of its mutating
   methods; anyone else reads `state_at()` / `remaining()`.
3. Only availability failures are fed to it (transient, rate limit, auth, and latency
   anomalies in adaptive mode). Bad requests and context errors never reach it.
4. A verdict counts only for the breaker state it was issued in. `try_acquire()`
   returns a ticket; a result whose ticket belongs to an earlier open/half-open
   episode cannot close or re-open the circuit (a slow call started before the trip
   says nothing about the provider now).

Transitions::

    state      event                                         next
    ---------  --------------------------------------------  ---------
    closed     failure_threshold consecutive failures        open
    closed     failure rate >= failure_rate over the window  open
               (once minimum_calls are in the window)
    closed     adaptive: latency_anomalies_to_open           open
               consecutive latency z-scores > threshold,
               or slow-call rate >= slow_call_rate
    open       now >= open_until                             half_open
    half_open  failure of a probe                            open (open_for grows)
    half_open  success_threshold consecutive probe           closed
               successes (adaptive: after half_open_sample
               probes, success rate >= half_open_success_rate)
    any        reset()                                       closed

Each trip opens for ``open_for * open_growth ** growths``, capped at `open_for_max`
and shortened by up to `jitter` (so `open_for` and `open_for_max` stay upper bounds:
an upstream that recovered is probed again within `open_for`). The growth rule:
the open time grows only on trips whose failure was a timeout (``grow=True``: a silent
upstream costs a whole attempt timeout per probe, so it is probed less and less
often); a trip by fast failures (a 5xx, a refused connection) keeps the current open
time, so a fast-failing upstream is probed once per `open_for` and traffic returns
within one open period of its recovery. A full recovery (closing) resets the growth.
"""

from __future__ import annotations

import math
import random
from collections import deque
from typing import Final, Literal

from ._config import BreakerConfig, capped_growth

__all__ = ["BreakerState", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half_open"]

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

# Tickets: the episode number shifted left once, with the low bit set for probes.
_PROBE: Final = 1
_EPSILON: Final = 1e-9


class CircuitBreaker:
    """Closed / open / half-open breaker with count, rate and (optional) latency
    triggers. See the module docstring for the transition table."""

    __slots__ = (
        "_anomalies",
        "_episode",
        "_fail_window",
        "_failures_in_window",
        "_lat_sum",
        "_lat_sumsq",
        "_latencies",
        "_probe_failures",
        "_probe_successes",
        "_probes_done",
        "_probes_in_flight",
        "_rng",
        "_slow_in_window",
        "_slow_window",
        "config",
        "consecutive_failures",
        "open_until",
        "opens",
        "state",
        "trips",
    )

    def __init__(self, config: BreakerConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()
        self.state: BreakerState = CLOSED
        self.open_until = -math.inf
        self.consecutive_failures = 0
        self.trips = 0
        """Growing trips (by timeouts) since the last full recovery; grows the open time."""
        self.opens = 0
        """Times this breaker has opened, ever (a statistic)."""
        self._episode = 0
        self._fail_window: deque[bool] = deque()
        self._failures_in_window = 0
        self._slow_window: deque[bool] = deque()
        self._slow_in_window = 0
        self._latencies: deque[float] = deque()
        self._lat_sum = 0.0
        self._lat_sumsq = 0.0
        self._anomalies = 0
        self._probes_in_flight = 0
        self._probes_done = 0
        self._probe_successes = 0
        self._probe_failures = 0

    # -- queries ----------------------------------------------------------------

    def state_at(self, now: float) -> BreakerState:
        """The state at `now`, moving an expired open breaker to half-open."""
        if self.state == OPEN and now >= self.open_until:
            self._to_half_open()
        return self.state

    def can_attempt(self, now: float) -> bool:
        """Whether `try_acquire(now)` would succeed."""
        state = self.state_at(now)
        if state == CLOSED:
            return True
        if state == OPEN:
            return False
        return self._probe_slot_free()

    def remaining(self, now: float) -> float:
        """Seconds until an attempt may be allowed (0 when one is, or when half-open)."""
        if self.state == OPEN:
            return max(0.0, self.open_until - now)
        return 0.0

    # -- events -------------------------------------------------------------------

    def try_acquire(self, now: float) -> int | None:
        """Ask to send one call. Returns a ticket to pass back with its result, or None
        when the breaker refuses (open, or half-open with its probes taken)."""
        state = self.state_at(now)
        if state == CLOSED:
            return self._episode << 1
        if state == OPEN or not self._probe_slot_free():
            return None
        self._probes_in_flight += 1
        return (self._episode << 1) | _PROBE

    def on_success(self, ticket: int, now: float, latency: float) -> None:
        if self.state == CLOSED:
            if ticket >> 1 != self._episode:
                return  # issued before a trip or reset: says nothing about now
            self.consecutive_failures = 0
            self._record_window(False)
            if self.config.adaptive and self._latency_trips(latency):
                self._trip(now)
            return
        if not self._is_current_probe(ticket):
            return
        self._probes_in_flight -= 1
        self._probes_done += 1
        self._probe_successes += 1
        if self.config.adaptive:
            self._judge_sample(now)
        elif self._probe_successes >= self.config.success_threshold:
            self._close()

    def on_failure(self, ticket: int, now: float, grow: bool = True) -> None:
        """A failed call. `grow`: a trip caused by this failure grows the open time
        (pass ``error.timed_out``: only timeouts grow it, see the module docstring)."""
        if self.state == CLOSED:
            if ticket >> 1 != self._episode:
                return
            self.consecutive_failures += 1
            self._anomalies = 0
            self._record_window(True)
            if self.consecutive_failures >= self.config.failure_threshold or self._rate_trips():
                self._trip(now, grow)
            return
        if not self._is_current_probe(ticket):
            return
        self._probes_in_flight -= 1
        self._probes_done += 1
        self._probe_failures += 1
        if self.config.adaptive:
            self._judge_sample(now, grow)
        else:
            self._trip(now, grow)

    @staticmethod
    def is_probe(ticket: int) -> bool:
        """Whether `ticket` was issued for a half-open probe."""
        return ticket & _PROBE == _PROBE

    def on_abandon(self, ticket: int) -> None:
        """The call ended with no verdict (cancelled, or a caller's error): free its
        probe slot, count nothing."""
        if self._is_current_probe(ticket):
            self._probes_in_flight -= 1

    @property
    def probing(self) -> bool:
        """A half-open probe is in flight."""
        return self.state == HALF_OPEN and self._probes_in_flight > 0

    def force_open(self, until: float) -> bool:
        """Treat the circuit as open until `until`: another router instance tripped it,
        or holds the half-open probe. Never shortens an open period. A new episode
        begins, so verdicts of calls started before cannot close it. Trips and opens
        are this breaker's own history and are left alone. Returns whether it changed."""
        if self.state == OPEN and until <= self.open_until:
            return False
        self.state = OPEN
        self.open_until = until
        self._new_episode()
        return True

    def force_close(self) -> bool:
        """Another router instance's probes found the provider recovered: close (as a
        full recovery would here). Returns whether it changed."""
        if self.state == CLOSED:
            return False
        self._close()
        return True

    def reset(self) -> None:
        """Back to a fresh closed breaker (an operator's decision)."""
        self._close()
        self.consecutive_failures = 0

    # -- internals ------------------------------------------------------------------

    def _is_current_probe(self, ticket: int) -> bool:
        return (
            self.state == HALF_OPEN and ticket & _PROBE == _PROBE and ticket >> 1 == self._episode
        )

    def _probe_slot_free(self) -> bool:
        cfg = self.config
        if self._probes_in_flight >= cfg.half_open_probes:
            return False
        if cfg.adaptive:
            return self._probes_done + self._probes_in_flight < cfg.half_open_sample
        return True

    def _record_window(self, failed: bool) -> None:
        win = self._fail_window
        win.append(failed)
        self._failures_in_window += failed
        if len(win) > self.config.window:
            self._failures_in_window -= win.popleft()

    def _rate_trips(self) -> bool:
        cfg = self.config
        n = len(self._fail_window)
        return (
            cfg.failure_rate > 0
            and n >= cfg.minimum_calls
            and self._failures_in_window >= cfg.failure_rate * n - _EPSILON
        )

    def _latency_trips(self, latency: float) -> bool:
        cfg = self.config
        tripped = False
        lat = self._latencies
        n = len(lat)
        if n >= cfg.latency_min_samples:
            mean = self._lat_sum / n
            var = max(0.0, self._lat_sumsq / n - mean * mean)
            std = math.sqrt(var)
            # The running sums lose precision: a spread under a millionth of the mean
            # is rounding, not variation.
            if std > 1e-6 * abs(mean) and (latency - mean) / std > cfg.latency_z_threshold:
                self._anomalies += 1
                tripped = self._anomalies >= cfg.latency_anomalies_to_open
            else:
                self._anomalies = 0
        lat.append(latency)
        self._lat_sum += latency
        self._lat_sumsq += latency * latency
        if len(lat) > cfg.latency_window:
            old = lat.popleft()
            self._lat_sum -= old
            self._lat_sumsq -= old * old
        if cfg.slow_call_seconds > 0:
            slow = latency > cfg.slow_call_seconds
            sw = self._slow_window
            sw.append(slow)
            self._slow_in_window += slow
            if len(sw) > cfg.window:
                self._slow_in_window -= sw.popleft()
            n_slow = len(sw)
            if (
                n_slow >= cfg.minimum_calls
                and self._slow_in_window >= cfg.slow_call_rate * n_slow - _EPSILON
            ):
                tripped = True
        return tripped

    def _judge_sample(self, now: float, grow: bool = True) -> None:
        cfg = self.config
        needed = math.ceil(cfg.half_open_success_rate * cfg.half_open_sample - _EPSILON)
        if self._probe_successes >= needed and self._probes_done >= cfg.half_open_sample:
            self._close()
        elif self._probe_failures > cfg.half_open_sample - needed:
            self._trip(now, grow)  # the sample can no longer reach the success rate

    def _trip(self, now: float, grow: bool = True) -> None:
        cfg = self.config
        base = capped_growth(cfg.open_for, cfg.open_growth, self.trips, cfg.open_for_max)
        if cfg.jitter:
            base *= 1.0 - cfg.jitter * self._rng.random()
        if grow:
            self.trips += 1
        self.opens += 1
        self.state = OPEN
        self.open_until = now + base
        self._new_episode()

    def _to_half_open(self) -> None:
        self.state = HALF_OPEN
        self._new_episode()

    def _close(self) -> None:
        self.state = CLOSED
        self.trips = 0
        self.open_until = -math.inf
        self.consecutive_failures = 0
        self._fail_window.clear()
        self._failures_in_window = 0
        self._slow_window.clear()
        self._slow_in_window = 0
        self._anomalies = 0
        self._new_episode()

    def _new_episode(self) -> None:
        self._episode += 1
        self._probes_in_flight = 0
        self._probes_done = 0
        self._probe_successes = 0
        self._probe_failures = 0
