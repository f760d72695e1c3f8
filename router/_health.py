"""Per-model health: a pure state machine, clock injected.

The supervisor owns it and is its only writer. Rules every change here must keep:

1. Disabled on model-missing (the provider says the model does not exist) for
   `disabled_for` seconds, or until a reset.
2. Cooling is not stored here. A model is cooling exactly while none of its keys can
   serve it (every key's own cooldown or breaker, or its lane for the model, stops
   it); the router derives that from the keys whenever it is asked, so a model's
   cooling never outlives its keys' and lanes' own state, follows their resets and
   recoveries, and needs no settings of its own. (`merge` still takes a cooling state
   learned from another instance.)
3. Untouched by unknown failures: an ambiguous error may be the request's own, and
   parking a usable primary would push all later traffic onto the fallback.
4. A success makes it healthy.
"""

from __future__ import annotations

import math
from typing import Literal

from ._config import HealthConfig

__all__ = ["ModelHealth"]

HealthState = Literal["healthy", "cooling", "disabled"]


class ModelHealth:
    __slots__ = ("config", "state", "until")

    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        self.state: HealthState = "healthy"
        self.until = -math.inf

    def state_at(self, now: float) -> HealthState:
        if self.state != "healthy" and now >= self.until:
            self.state = "healthy"
        return self.state

    def is_callable(self, now: float) -> bool:
        return self.state == "healthy" or self.state_at(now) == "healthy"

    def remaining(self, now: float) -> float:
        if self.state_at(now) == "healthy":
            return 0.0
        return max(0.0, self.until - now)

    def on_success(self) -> None:
        self.state = "healthy"
        self.until = -math.inf

    def on_model_missing(self, now: float) -> None:
        self.state = "disabled"
        self.until = max(self.until, now + self.config.disabled_for)

    def merge(self, state: HealthState, until: float, now: float) -> bool:
        """Take a cooling or disabled state learned elsewhere (another router instance),
        merged by the later end time: never shortened, and a disabled model is not
        relabelled cooling. Returns whether anything changed."""
        if state == "healthy" or until <= now:
            return False
        current = self.state_at(now)
        if current == "disabled" and state == "cooling":
            return False
        if current == state and until <= self.until:
            return False
        self.state = state
        self.until = max(self.until, until) if current != "healthy" else until
        return True

    def reset(self) -> None:
        self.state = "healthy"
        self.until = -math.inf
