"""The failure table: what the router does after an upstream attempt fails.

This module is the one place where that decision is made. It is pure (no clock, no
I/O, no router state): the key actor gathers the facts into a `Situation`, calls
`decide()`, and carries out the `Step` it gets back; the router carries out the steps
that leave the key (`NEXT_KEY`, `NEXT_MODEL`, `CONTEXT_FALLBACK`, `PROPAGATE`).
README.md's failure table, this table and `tests/test_failover_table.py` read the same.

Where a failure is recorded (the grain), by kind::

    kind              grain                      what is marked
    ----------------  -------------------------  ----------------------------------------
    transient         lane (key if key_wide)     a breaker failure, after the last retry
    rate_limit        lane                       lane cooldown (max(Retry-After, 5 s doubling
                                                 to 300 s)) and a lane breaker failure
    auth              key                        key cooldown (`cooldown.auth`) and a key
                                                 breaker failure
    balance           key                        key cooldown (`cooldown.balance`)
    model_missing     model                      the model is disabled (router)
    unknown, max_tokens, context_exceeded,
    bad_request, content_filter                  nothing

What happens next::

    kind              in place on the same key                     then
    ----------------  -------------------------------------------  ----------------
    transient         RETRY after the backoff, if retries remain    NEXT_MODEL, or
    unknown           and the time budget allows (below)            NEXT_KEY when
                                                                    key_wide
    rate_limit        WAIT_RETRY once, for Retry-After, when it is  NEXT_KEY
                      <= rate_limit_wait, no sibling key of the
                      model is callable and the deadline holds it
    auth, balance     no                                            NEXT_KEY
    model_missing     no                                            NEXT_MODEL
    max_tokens        RETRY_WITHOUT_MAX_TOKENS, once                PROPAGATE
    context_exceeded  no (never the same prompt to the same model)  CONTEXT_FALLBACK
    bad_request,      no                                            PROPAGATE
    content_filter

The time budget of an in-place retry (transient and unknown):

1. A half-open probe gets exactly one attempt: its failure re-opens the breaker and
   the request moves on at once.
2. A timed-out attempt (the upstream said nothing in time) is not retried in place
   while anything else in the chain is callable: a silent upstream must not eat the
   deadline its fallback needs.
3. A retry starts only if it can start before the deadline; and while anything else
   is callable, only if the time left holds the backoff, the retry's own attempt
   timeout and one attempt timeout elsewhere.
4. Nothing happens in place once the request made `max_attempts` attempts.

`NEXT_KEY` means: the next callable key of the same model, else the next model.
`CONTEXT_FALLBACK` means: the model's `context_window_fallbacks` target, once, if it is
configured and not yet tried for this request; else propagate the error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from ._errors import ErrorKind

__all__ = [
    "CONTEXT_FALLBACK",
    "NEXT_KEY",
    "NEXT_MODEL",
    "PROPAGATE",
    "RETRY",
    "RETRY_WITHOUT_MAX_TOKENS",
    "WAIT_RETRY",
    "Situation",
    "Step",
    "decide",
    "grain",
]


class Step:
    """A named step; `RETRY` and `WAIT_RETRY` carry how long to wait first."""

    __slots__ = ("delay", "name")

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay

    def __repr__(self) -> str:
        return f"{self.name}({self.delay:g})" if self.delay else self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Step) and (other.name, other.delay) == (self.name, self.delay)

    def __hash__(self) -> int:
        return hash((self.name, self.delay))


NEXT_KEY: Final = Step("NEXT_KEY")
NEXT_MODEL: Final = Step("NEXT_MODEL")
CONTEXT_FALLBACK: Final = Step("CONTEXT_FALLBACK")
PROPAGATE: Final = Step("PROPAGATE")
RETRY_WITHOUT_MAX_TOKENS: Final = Step("RETRY_WITHOUT_MAX_TOKENS")
RETRY: Final = "RETRY"
WAIT_RETRY: Final = "WAIT_RETRY"

_RETRYABLE: Final = frozenset({"transient", "unknown"})
_KEY_KINDS: Final = frozenset({"auth", "balance"})


class Situation:
    """The facts `decide()` needs about one failed attempt."""

    __slots__ = (
        "alternatives",
        "attempt_timeout",
        "attempts_left",
        "backoff",
        "key_wide",
        "kind",
        "max_tokens_droppable",
        "probe",
        "rate_limit_wait",
        "retries",
        "retry_after",
        "time_left",
        "timed_out",
        "transient_retries",
        "waited",
    )

    def __init__(
        self,
        kind: ErrorKind,
        *,
        key_wide: bool = False,
        timed_out: bool = False,
        retry_after: float | None = None,
        probe: bool = False,
        retries: int = 0,
        transient_retries: int = 2,
        backoff: float = 0.5,
        time_left: float = 60.0,
        attempt_timeout: float = 30.0,
        rate_limit_wait: float = 3.0,
        waited: bool = False,
        max_tokens_droppable: bool = False,
        alternatives: Callable[[bool, bool], bool] = lambda same_model, later: False,
        attempts_left: int = 1_000,
    ) -> None:
        self.kind = kind
        self.key_wide = key_wide
        """The failure is the key's or its host's (connection-level, route 404)."""
        self.timed_out = timed_out
        """The upstream said nothing within the attempt (or first-token) timeout."""
        self.retry_after = retry_after
        """The upstream's own hint, seconds."""
        self.probe = probe
        """The attempt was a half-open probe (of the key's or the lane's breaker)."""
        self.retries = retries
        """In-place retries already made for this request on this key."""
        self.transient_retries = transient_retries
        self.backoff = backoff
        """The (jittered) sleep before the next in-place retry."""
        self.time_left = time_left
        """Seconds until the request's deadline."""
        self.attempt_timeout = attempt_timeout
        self.rate_limit_wait = rate_limit_wait
        self.waited = waited
        """This request already waited out one short Retry-After on this key."""
        self.max_tokens_droppable = max_tokens_droppable
        """The request has max_tokens and it was not dropped yet."""
        self.attempts_left = attempts_left
        """Attempts the request may still make (`max_attempts` less those made)."""
        self.alternatives = alternatives
        """Asked lazily, ``alternatives(same_model, later)``: could another key of the
        same model (`same_model`) or a key of a later model of the chain (`later`) take
        the request now?"""


def grain(kind: ErrorKind, key_wide: bool) -> str | None:
    """Where a failure of `kind` is recorded: "lane", "key", "model" or None."""
    if kind == "transient":
        return "key" if key_wide else "lane"
    if kind == "rate_limit":
        return "lane"
    if kind in _KEY_KINDS:
        return "key"
    if kind == "model_missing":
        return "model"
    return None


def decide(s: Situation) -> Step:
    """The next step after the failed attempt described by `s` (see the module table)."""
    kind = s.kind
    if s.attempts_left <= 0:  # max_attempts: nothing more here, whatever the kind
        return _then(s)
    if kind in _RETRYABLE:
        key_wide = s.key_wide and kind == "transient"  # an unknown failure is nobody's
        if _may_retry(s, key_wide):
            return Step(RETRY, s.backoff)
        return NEXT_KEY if key_wide else NEXT_MODEL
    if kind == "rate_limit":
        wait = s.retry_after
        if (
            wait is not None
            and not s.probe
            and not s.waited
            and s.rate_limit_wait > 0
            and wait <= s.rate_limit_wait
            and wait < s.time_left
            and not s.alternatives(True, False)
        ):
            return Step(WAIT_RETRY, wait)
        return NEXT_KEY
    if kind in _KEY_KINDS:
        return NEXT_KEY
    if kind == "model_missing":
        return NEXT_MODEL
    if kind == "max_tokens":
        return RETRY_WITHOUT_MAX_TOKENS if s.max_tokens_droppable else PROPAGATE
    if kind == "context_exceeded":
        return CONTEXT_FALLBACK
    return PROPAGATE


def _then(s: Situation) -> Step:
    """The step after `s` when nothing more may happen on this key."""
    kind = s.kind
    if kind in _RETRYABLE:
        return NEXT_KEY if s.key_wide and kind == "transient" else NEXT_MODEL
    if kind == "rate_limit" or kind in _KEY_KINDS:
        return NEXT_KEY
    if kind == "model_missing":
        return NEXT_MODEL
    if kind == "context_exceeded":
        return CONTEXT_FALLBACK
    return PROPAGATE


def _may_retry(s: Situation, key_wide: bool) -> bool:
    if s.probe or s.retries >= s.transient_retries or s.backoff >= s.time_left:
        return False
    if s.timed_out or s.backoff + 2 * s.attempt_timeout > s.time_left:
        # Only when nothing the request would move on to could take it: other keys
        # of the model count only for a key-wide failure (a model's failure moves on
        # to the next model).
        return not s.alternatives(key_wide, True)
    return True
