"""Key cooldowns: a pure state machine, clock injected.

A cooldown belongs to one (provider, key) pair and is written only by that pair's key
actor. Rules every change here must keep:

1. Never shortened. A hit sets ``until = max(until, now + delay)``: a later, smaller
   Retry-After cannot bring a key back early.
2. Rate limits back off exponentially by hit count: ``min * factor ** hits``, capped
   at `max`, and never below the upstream's Retry-After. The hit count is cleared by a
   success on the key (or a reset), not by the cooldown running out, so a key that is
   rate-limited again at once after cooling waits longer each time.
3. Auth failures cool the key for `auth` seconds, balance/quota failures for
   `balance` seconds (out of credit is not fixed by waiting a few seconds).
"""

from __future__ import annotations

import math
from typing import Literal

from ._config import CooldownConfig, capped_growth

__all__ = ["Cooldown"]

CoolingReason = Literal["rate_limit", "auth", "balance"]


class Cooldown:
    __slots__ = ("config", "hits", "reason", "until")

    def __init__(self, config: CooldownConfig) -> None:
        self.config = config
        self.until = -math.inf
        """The time (on the router's clock) until which the key is not called."""
        self.hits = 0
        """Rate-limit hits since the key's last success."""
        self.reason: CoolingReason | None = None

    def is_cooling(self, now: float) -> bool:
        return now < self.until

    def remaining(self, now: float) -> float:
        return max(0.0, self.until - now)

    def hit(self, now: float, reason: CoolingReason, retry_after: float | None = None) -> float:
        """Record a cooling failure; returns the delay this hit asked for."""
        cfg = self.config
        hint = retry_after if retry_after is not None and retry_after > 0 else 0.0
        if reason == "rate_limit":
            backoff = capped_growth(cfg.min, cfg.factor, self.hits, cfg.max)
            self.hits += 1
            delay = max(hint, backoff)
        elif reason == "auth":
            delay = max(hint, cfg.auth)
        else:
            delay = max(hint, cfg.balance)
        until = now + delay
        if until > self.until:
            self.until = until
            self.reason = reason
        return delay

    def merge_until(self, until: float, reason: CoolingReason) -> bool:
        """Take a cooldown learned elsewhere (another router instance): the key cools
        until the later of the two times, never shorter. Returns whether it grew. The
        hit count is left alone: it is this instance's own backoff history."""
        if until > self.until:
            self.until = until
            self.reason = reason
            return True
        return False

    def on_success(self) -> None:
        self.hits = 0

    def reset(self) -> None:
        self.until = -math.inf
        self.hits = 0
        self.reason = None
