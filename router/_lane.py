"""Lanes: the state of one upstream model on one key.

Providers scope most failures to a model, not to a key: OpenAI's rate limits are per
model per organisation, Anthropic's per model class, Gemini's per model, and a 503
"overloaded" is one model's. So inside each key actor, every upstream model the key
serves has a `Lane` with its own rate-limit cooldown (and backoff count), its own
circuit breaker for that model's availability failures, and its latency statistics.
A 429 or an outage of one model never blocks the other models of the same key; what
belongs to the key itself (auth, balance, a connection that cannot be made) stays on
the key actor and stops every lane.

Rules every change here must keep:

1. The key actor is the only writer of its lanes; anyone else only reads them.
2. Lanes are created on first use by a request (never by a read) and bounded per key:
   past `[router] lanes_per_key` the least recently used lane is dropped, preferring
   lanes that hold no state (idle and healthy), so a cooling lane is the last to go.
3. Like the key's own state, a lane takes `now` from its caller and does no I/O.
"""

from __future__ import annotations

import random
from collections import deque
from typing import TYPE_CHECKING, Final

from ._breaker import CircuitBreaker
from ._config import RouterSettings
from ._cooldown import Cooldown

if TYPE_CHECKING:
    from ._shared import Source

__all__ = ["Lane"]

_LATENCY_WEIGHT: Final = 0.2
"""Weight of the newest sample in the latency moving average."""
_RECENT: Final = 64
_MIN_SAMPLES: Final = 8
_TENANTS: Final = 1024
"""Per-tenant breakers a lane keeps (tenants are a caller's strings: bounded)."""


class Lane:
    """One (key, upstream model) pair's failure state and statistics."""

    __slots__ = (
        "_per_tenant",
        "_rng",
        "_settings",
        "breaker",
        "breaker_source",
        "cooldown",
        "cooling_source",
        "failures",
        "latency",
        "model",
        "recent",
        "requests",
        "successes",
        "tenant_breakers",
    )

    def __init__(self, model: str, settings: RouterSettings, rng: random.Random) -> None:
        self.model = model
        """The upstream model id this lane is for."""
        self._settings = settings
        self._rng = rng
        self._per_tenant = settings.per_tenant_breakers
        self.breaker = CircuitBreaker(settings.breaker, rng)
        """Availability failures (transient, rate limit) of this model on this key."""
        self.tenant_breakers: dict[str, CircuitBreaker] = {}
        """With `per_tenant_breakers`: one breaker per tenant, in place of `breaker`."""
        self.cooldown = Cooldown(settings.cooldown)
        """Rate-limit cooldown of this model on this key."""
        self.requests = 0
        self.successes = 0
        self.failures = 0
        self.latency = 0.0
        """Moving average of successful attempts' durations, seconds (0: none yet)."""
        self.recent: deque[float] = deque(maxlen=_RECENT)
        """The latest successful latencies (for "auto" hedging)."""
        self.cooling_source: Source = "local"
        self.breaker_source: Source = "local"

    def __repr__(self) -> str:
        return f"Lane(model={self.model!r})"

    def breaker_for(self, tenant: str | None) -> CircuitBreaker:
        """The breaker a request of `tenant` uses (made on first use; at most
        `_TENANTS` per lane, a closed one dropped first to make room)."""
        if not self._per_tenant or not tenant:
            return self.breaker
        breakers = self.tenant_breakers
        breaker = breakers.get(tenant)
        if breaker is None:
            if len(breakers) >= _TENANTS:
                victim = next((t for t, b in breakers.items() if b.state == "closed"), None)
                del breakers[victim if victim is not None else next(iter(breakers))]
            breaker = breakers[tenant] = CircuitBreaker(self._settings.breaker, self._rng)
        return breaker

    def _peek(self, tenant: str | None) -> CircuitBreaker | None:
        """The breaker `tenant` would use, without making one (None: a fresh one)."""
        if not self._per_tenant or not tenant:
            return self.breaker
        return self.tenant_breakers.get(tenant)

    def is_available(self, now: float, tenant: str | None) -> bool:
        if now < self.cooldown.until:
            return False
        breaker = self._peek(tenant)
        return breaker is None or breaker.can_attempt(now)

    def wait_time(self, now: float, tenant: str | None) -> float:
        """Seconds until this lane may be called again (0 if it may be now)."""
        breaker = self._peek(tenant)
        wait = breaker.remaining(now) if breaker is not None else 0.0
        return max(self.cooldown.remaining(now), wait)

    def is_idle_and_healthy(self, now: float) -> bool:
        """Holds nothing worth keeping: no cooldown, every breaker closed."""
        if now < self.cooldown.until or self.breaker.state != "closed":
            return False
        return all(b.state == "closed" for b in self.tenant_breakers.values())

    def record_latency(self, seconds: float) -> None:
        if self.latency:
            self.latency += _LATENCY_WEIGHT * (seconds - self.latency)
        else:
            self.latency = seconds
        self.recent.append(seconds)

    def latency_percentile(self, q: float) -> float | None:
        """The `q` quantile of the recent successful latencies (None: too few yet)."""
        recent = self.recent
        if len(recent) < _MIN_SAMPLES:
            return None
        ordered = sorted(recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def reset(self) -> None:
        self.breaker.reset()
        for b in self.tenant_breakers.values():
            b.reset()
        self.cooldown.reset()
        self.cooling_source = self.breaker_source = "local"
