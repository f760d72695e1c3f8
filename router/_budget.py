"""Per-key rate budgets (requests and tokens per minute): a pure state machine, clock injected.

A budget belongs to one (provider, key) pair and is written only by that pair's key
actor; every method that depends on time takes `now` (the router passes
`trio.current_time()`). Rules every change here must keep:

1. Sliding window over reservation times. An admitted request counts, with the tokens
   it currently holds, for exactly `WINDOW` (60 s) from its reservation time `t`: it is
   in the window at `now` iff ``now < t + WINDOW``. So the window is exact, not a fixed
   minute bucket: "an RPM budget of N admits at most N requests in any 60 s" holds for
   every 60 s interval, and a request refused at `now` is admitted at
   ``available_at(now, tokens)``, never earlier and never later.
2. Admission. ``try_reserve(now, tokens)`` admits iff, over the reservations in the
   window at `now`,

   - requests: ``count + 1 <= rpm``, and
   - tokens: ``held + tokens <= tpm``, or ``held == 0`` (the window holds no tokens).

   The second token clause is the oversize rule: a request estimated at more than the
   whole `tpm` could never fit, so it is admitted alone, once the window holds no tokens
   (no live reservation, or only ones reconciled to zero tokens), instead of being
   starved forever. While it is in the window nothing that needs tokens is admitted.
   An unlimited dimension (None) admits everything; with both None the budget is a
   couple of attribute checks and keeps no state.
3. Tokens are reserved, then reconciled. A reservation first holds its estimate
   (prompt estimate + max_tokens); ``reconcile()`` replaces it by the usage the provider
   reported, freeing (or taking) the difference for the rest of that reservation's
   60 s. The request count stays. Reconciling a reservation that has left the window
   changes nothing in it. Usage above the estimate can push the window over `tpm`:
   then nothing needing tokens is admitted until enough expires.
4. ``release()`` gives back both the request and its tokens (the attempt was never
   sent, or was cancelled before sending). Releasing twice, or after expiry, is a no-op;
   so is reconciling a released reservation.
5. O(1) amortised per operation: reservations live in a deque in time order; expired
   and released ones are dropped from the left, a running count and token sum are kept.
   Only ``available_at()`` walks the window (it is asked when a key is refused). Time
   never goes backwards for a budget: a reservation made with an earlier `now` than the
   newest one is stamped with the newest time (stricter, and keeps the deque ordered).

With the oversize rule and reconciling, the per-window token guarantee is: in any 60 s
interval, the admitted requests' tokens (each the smaller of its estimate and its
reconciled usage) sum to at most `tpm`, unless the interval holds a single request with
non-zero tokens (an oversize request admitted on a window without tokens).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

__all__ = ["WINDOW", "RateBudget", "Reservation"]

WINDOW: Final = 60.0
"""Seconds each admitted request counts against its key's budget."""


class Reservation:
    """One admitted request: when it was reserved and the tokens it holds (its estimate,
    then the reconciled usage). Belongs to the budget that issued it."""

    __slots__ = ("_held", "time", "tokens")

    def __init__(self, time: float, tokens: int) -> None:
        self.time = time
        self.tokens = tokens
        self._held = False
        """Counted in its budget's window (not released, not yet dropped as expired)."""

    def __repr__(self) -> str:
        return f"Reservation(time={self.time!r}, tokens={self.tokens!r})"


class RateBudget:
    """Requests-per-minute and tokens-per-minute budget of one key over a sliding 60 s
    window. See the module docstring for the rules."""

    __slots__ = ("_count", "_held", "_hold", "_live", "_unlimited", "rpm", "tpm")

    def __init__(self, rpm: int | None = None, tpm: int | None = None) -> None:
        if rpm is not None and rpm <= 0:
            raise ValueError(f"rpm must be positive or None, got {rpm!r}")
        if tpm is not None and tpm <= 0:
            raise ValueError(f"tpm must be positive or None, got {tpm!r}")
        self.rpm = rpm
        self.tpm = tpm
        self._unlimited = rpm is None and tpm is None
        self._live: deque[Reservation] = deque()
        """Reservations in time order; released ones stay until dropped from the left."""
        self._count = 0
        """Held (unreleased) reservations in `_live`."""
        self._held = 0
        """Tokens held by those reservations."""
        self._hold = -math.inf
        """Nothing is admitted before this time (a shared budget said it is full)."""

    @property
    def unlimited(self) -> bool:
        return self._unlimited

    # -- queries ----------------------------------------------------------------

    def available_at(self, now: float, tokens: int) -> float:
        """The earliest time >= `now` at which ``try_reserve(·, tokens)`` succeeds, if
        nothing else is reserved, reconciled or released meanwhile."""
        if self._unlimited:
            return now
        self._expire(now)
        rpm, tpm = self.rpm, self.tpm
        # Requests: the oldest `excess` held reservations must expire first.
        excess = 0 if rpm is None else self._count + 1 - rpm
        # Tokens: expire reservations until what is held fits, or nothing is held.
        held = self._held
        limit = held + tokens if tpm is None else tpm  # unlimited tokens: fits at once
        tokens_ok = held + tokens <= limit or held == 0
        at = now
        for r in self._live:
            if excess <= 0 and tokens_ok:
                break
            if not r._held:
                continue
            at = r.time + WINDOW  # the same expression `_expire` compares against
            excess -= 1
            held -= r.tokens
            if not tokens_ok:
                tokens_ok = held + tokens <= limit or held == 0
        return max(at, now, self._hold)

    def remaining(self, now: float) -> tuple[int | None, int | None]:
        """Requests and tokens left in the window at `now` (None: unlimited). Tokens
        left is 0 when usage above the estimates has overdrawn the window."""
        if self._unlimited:
            return None, None
        self._expire(now)
        requests = None if self.rpm is None else self.rpm - self._count
        tokens = None if self.tpm is None else max(0, self.tpm - self._held)
        return requests, tokens

    # -- events -------------------------------------------------------------------

    def try_reserve(self, now: float, tokens: int) -> Reservation | None:
        """Admit one request expected to use `tokens` (prompt estimate + max_tokens),
        or return None when the budget refuses it at `now`."""
        if self._unlimited:
            return Reservation(now, tokens)
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens!r}")
        live = self._live
        self._expire(now)
        if now < self._hold:
            return None
        if self.rpm is not None and self._count >= self.rpm:
            return None
        tpm = self.tpm
        if tpm is not None and self._held + tokens > tpm and self._held != 0:
            return None
        if live and live[-1].time > now:
            now = live[-1].time
        r = Reservation(now, tokens)
        r._held = True
        live.append(r)
        self._count += 1
        self._held += tokens
        return r

    def reconcile(self, reservation: Reservation, actual_tokens: int, now: float) -> None:
        """Replace the tokens `reservation` holds by the usage the provider reported."""
        if actual_tokens < 0:
            raise ValueError(f"actual_tokens must be >= 0, got {actual_tokens!r}")
        if self._unlimited:
            reservation.tokens = actual_tokens
            return
        self._expire(now)
        if reservation._held:
            self._held += actual_tokens - reservation.tokens
        reservation.tokens = actual_tokens

    def hold_until(self, until: float) -> None:
        """Admit nothing before `until` (merged by maximum): a budget shared with other
        router instances is full until then. A no-op on an unlimited budget."""
        if not self._unlimited and until > self._hold:
            self._hold = until

    def release(self, reservation: Reservation) -> None:
        """The attempt was never sent: give back its request and its tokens."""
        if reservation._held:
            reservation._held = False
            self._count -= 1
            self._held -= reservation.tokens

    # -- internals ------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        live = self._live
        while live:
            r = live[0]
            if r._held:
                if now < r.time + WINDOW:
                    return
                r._held = False
                self._count -= 1
                self._held -= r.tokens
            live.popleft()
