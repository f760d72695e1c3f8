"""The key actor: one trio task per (provider, key) pair.

It owns that pair's circuit breaker(s), cooldown, concurrency limiter and counters,
and is the only code that changes them. Others read them (`is_available`,
`wait_time`, `snapshot`) to skip a key without a round trip.

How a job travels, and why: the caller's task hands a `Job` to `KeyActor.call`,
which starts the job as a task in the actor's own nursery and parks the caller with
`trio.lowlevel.wait_task_rescheduled`. The job task wakes the caller directly with
`trio.lowlevel.reschedule` when it ends. Replying through a `trio.Event` or a memory
channel costs a second scheduling hop per request (measured at about three times
the overhead); this path keeps the actor's ownership (the job runs under the actor's
nursery, limiter and state) without it.

Cancellation: if the caller is cancelled while parked, the job's cancel scope is
cancelled and the caller stays parked until the job task has fully unwound (so
`in_flight` is back to its old value and the breaker's probe slot is freed before the
caller sees `Cancelled`). A caller's cancellation or the request's deadline is never
counted against the key.

What this module must never do: send a call to a key that is cooling or whose breaker
refuses at that moment (checked before every attempt, retries included), or put a
secret into an error.
"""

from __future__ import annotations

import random
from typing import Any, Final

import msgspec
import outcome
import trio

from ._breaker import CircuitBreaker
from ._config import RouterSettings
from ._cooldown import Cooldown
from ._errors import ProviderError, RouterClosedError
from ._provider import Provider
from ._types import ApiKey, Attempt, ChatRequest, ChatResponse

__all__ = ["DEADLINE", "SKIPPED", "Job", "JobResult", "KeyActor"]


class _Signal:
    """A named sentinel whose repr is its name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


SKIPPED: Final = _Signal("SKIPPED")
"""The key became unavailable (cooling, or its breaker refused) before an attempt."""
DEADLINE: Final = _Signal("DEADLINE")
"""The request's end-to-end deadline passed inside the job."""

JobResult = ChatResponse | ProviderError | RouterClosedError | _Signal

_AVAILABILITY_COOLING: Final = {"rate_limit": "rate_limit", "auth": "auth", "balance": "balance"}


class _NoClock(trio.abc.Clock):
    """Stands in until the actor runs; reading it is a bug."""

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        raise RuntimeError("key actor is not running")

    def deadline_to_sleep_time(self, deadline: float) -> float:
        raise RuntimeError("key actor is not running")


_NO_CLOCK: Final = _NoClock()


class Job:
    """One request's visit to one key: carries the deadline and the attempt log."""

    __slots__ = (
        "abandoned",
        "attempts",
        "deadline",
        "model",
        "raise_cancel",
        "request",
        "scope",
        "waiter",
    )

    def __init__(
        self, request: ChatRequest, model: str, deadline: float, attempts: list[Attempt]
    ) -> None:
        self.request = request
        self.model = model
        self.deadline = deadline
        self.attempts = attempts
        self.scope: trio.CancelScope | None = None
        """The cancel scope of the job's current wait, for the caller's abort."""
        self.waiter: trio.lowlevel.Task | None = None
        self.abandoned = False
        self.raise_cancel: Any = None

    def open_scope(self, deadline: float) -> trio.CancelScope:
        """A cancel scope for the job's next wait, already cancelled if the caller left."""
        scope = self.scope = trio.CancelScope(deadline=deadline)
        if self.abandoned:
            scope.cancel()
        return scope


class KeyActor:
    """The actor of one (provider, key) pair. Built by the router, not by users."""

    def __init__(
        self,
        provider_name: str,
        key: ApiKey,
        provider: Provider,
        max_concurrency: int,
        settings: RouterSettings,
        rng: random.Random,
    ) -> None:
        self.provider_name = provider_name
        self.key = key
        self.key_id = key.id
        self.provider = provider
        self.max_concurrency = max_concurrency
        self.settings = settings
        self._rng = rng
        self.breaker = CircuitBreaker(settings.breaker, rng)
        self.tenant_breakers: dict[str, CircuitBreaker] = {}
        self._per_tenant = settings.per_tenant_breakers
        self.cooldown = Cooldown(settings.cooldown)
        self.limiter = trio.CapacityLimiter(max_concurrency)
        self.in_flight = 0
        """Attempts being sent upstream right now."""
        self.queued = 0
        """Jobs waiting for a concurrency slot."""
        self.requests = 0
        self.successes = 0
        self.failures = 0
        self._nursery: trio.Nursery | None = None
        self._clock: trio.abc.Clock = _NO_CLOCK

    def __repr__(self) -> str:
        return f"KeyActor(provider={self.provider_name!r}, key_id={self.key_id!r})"

    # -- the actor task ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The actor's own task: holds the nursery every job of this key runs in."""
        try:
            async with trio.open_nursery() as nursery:
                self._clock = trio.lowlevel.current_clock()
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    # -- reads (any task) ---------------------------------------------------------------

    def breaker_for(self, tenant: str | None) -> CircuitBreaker:
        if not self._per_tenant or not tenant:
            return self.breaker
        breaker = self.tenant_breakers.get(tenant)
        if breaker is None:
            breaker = self.tenant_breakers[tenant] = CircuitBreaker(
                self.settings.breaker, self._rng
            )
        return breaker

    def is_available(self, now: float, tenant: str | None) -> bool:
        return now >= self.cooldown.until and self.breaker_for(tenant).can_attempt(now)

    def is_saturated(self) -> bool:
        return self.in_flight + self.queued >= self.max_concurrency

    def wait_time(self, now: float, tenant: str | None) -> float:
        """Seconds until this key may be called again (0 if it may be now)."""
        return max(self.cooldown.remaining(now), self.breaker_for(tenant).remaining(now))

    # -- writes (the actor's own operations) ------------------------------------------

    def reset(self) -> None:
        self.breaker.reset()
        for b in self.tenant_breakers.values():
            b.reset()
        self.cooldown.reset()

    # -- the hop --------------------------------------------------------------------------

    async def call(self, job: Job) -> JobResult:
        """Run `job` on this key and return its result; see the module docstring."""
        nursery = self._nursery
        if nursery is None:
            return RouterClosedError("router is closed (key actor stopped)")
        job.waiter = trio.lowlevel.current_task()
        try:
            nursery.start_soon(self._run, job, name="router.KeyActor.job")
        except RuntimeError:
            return RouterClosedError("router is closing")

        def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
            job.abandoned = True
            job.raise_cancel = raise_cancel
            if job.scope is not None:
                job.scope.cancel()
            return trio.lowlevel.Abort.FAILED

        result: JobResult = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    async def _run(self, job: Job) -> None:
        result: JobResult | None = None
        try:
            result = await self._attempts(job)
        finally:
            waiter = job.waiter
            assert waiter is not None
            if job.abandoned:
                trio.lowlevel.reschedule(waiter, outcome.capture(job.raise_cancel))
            else:
                if result is None:  # cancelled from outside: the router is closing
                    result = RouterClosedError("router closed while the request was running")
                trio.lowlevel.reschedule(waiter, outcome.Value(result))

    async def _attempts(self, job: Job) -> JobResult:
        limiter = self.limiter
        try:
            limiter.acquire_on_behalf_of_nowait(job)
        except trio.WouldBlock:
            self.queued += 1
            try:
                with job.open_scope(job.deadline) as scope:
                    await limiter.acquire_on_behalf_of(job)
            finally:
                self.queued -= 1
                job.scope = None
            if scope.cancelled_caught:
                return DEADLINE  # or abandoned: then the result is not used
        try:
            return await self._attempt_loop(job)
        finally:
            limiter.release_on_behalf_of(job)

    async def _attempt_loop(self, job: Job) -> JobResult:
        settings = self.settings
        clock = self._clock
        breaker = self.breaker_for(job.request.tenant)
        cooldown = self.cooldown
        request = job.request
        retries = 0
        dropped_max_tokens = False
        while True:
            now = clock.current_time()
            if job.abandoned or now >= job.deadline:
                return DEADLINE
            if now < cooldown.until:
                return SKIPPED
            ticket = breaker.try_acquire(now)
            if ticket is None:
                return SKIPPED
            self.requests += 1
            self.in_flight += 1
            response: ChatResponse | None = None
            error: ProviderError | None = None
            verdict = False
            attempt_deadline = now + settings.attempt_timeout
            try:
                with job.open_scope(min(attempt_deadline, job.deadline)) as scope:
                    try:
                        response = await self.provider.complete(request, self.key)
                    except ProviderError as exc:
                        error = exc
                    except Exception as exc:  # a provider bug is an unknown failure
                        error = ProviderError(
                            "unknown", f"provider raised {type(exc).__name__}: {exc}"
                        )
                end = clock.current_time()
                if scope.cancelled_caught:
                    if job.abandoned or end >= job.deadline:
                        raise _NoVerdict
                    error = ProviderError(
                        "transient", f"attempt timed out after {settings.attempt_timeout:g}s"
                    )
                verdict = True
            except _NoVerdict:
                pass
            finally:
                job.scope = None
                self.in_flight -= 1
                if not verdict:
                    # Cancelled (caller, deadline, shutdown): no verdict on the key.
                    breaker.on_abandon(ticket)
                    job.attempts.append(
                        Attempt(
                            model=job.model,
                            provider=self.provider_name,
                            key_id=self.key_id,
                            outcome="cancelled" if job.abandoned else "deadline",
                            duration=clock.current_time() - now,
                        )
                    )
            if not verdict:
                return DEADLINE
            if error is None:
                if type(response) is not ChatResponse:
                    error = ProviderError(
                        "unknown",
                        f"provider returned {type(response).__name__}, not ChatResponse",
                    )
                else:
                    breaker.on_success(ticket, end, end - now)
                    cooldown.hits = 0
                    self.successes += 1
                    job.attempts.append(
                        Attempt(
                            model=job.model,
                            provider=self.provider_name,
                            key_id=self.key_id,
                            outcome="ok",
                            duration=end - now,
                        )
                    )
                    return response
            self.failures += 1
            error = self._own(error, job)
            kind = error.kind
            job.attempts.append(
                Attempt(
                    model=job.model,
                    provider=self.provider_name,
                    key_id=self.key_id,
                    outcome=kind,
                    duration=end - now,
                    status=error.status,
                )
            )
            if kind == "transient" or kind == "unknown":
                if retries < settings.transient_retries:
                    backoff = settings.retry_backoff
                    delay = backoff[min(retries, len(backoff) - 1)]
                    delay *= 1.0 + settings.retry_jitter * self._rng.random()
                    retries += 1
                    if end + delay < job.deadline:
                        breaker.on_abandon(ticket)  # the verdict waits for the last retry
                        with job.open_scope(job.deadline):
                            await trio.sleep(delay)
                        job.scope = None
                        continue
                if kind == "transient":
                    breaker.on_failure(ticket, end)
                else:
                    breaker.on_abandon(ticket)
                return error
            reason = _AVAILABILITY_COOLING.get(kind)
            if reason is not None:
                cooldown.hit(end, reason, error.retry_after)  # type: ignore[arg-type]
                if kind == "balance":
                    breaker.on_abandon(ticket)
                else:
                    breaker.on_failure(ticket, end)
                return error
            breaker.on_abandon(ticket)
            if kind == "max_tokens" and request.max_tokens is not None and not dropped_max_tokens:
                request = msgspec.structs.replace(request, max_tokens=None)
                dropped_max_tokens = True
                continue
            return error

    def _own(self, error: ProviderError, job: Job) -> ProviderError:
        """Stamp the error with where it happened, and scrub the secret from it."""
        error.provider = self.provider_name
        error.key_id = self.key_id
        error.model = job.model
        secret = self.key.secret
        if secret and secret in error.message:
            error.message = error.message.replace(secret, "***")
            error.args = (error.message,)
        return error


class _NoVerdict(Exception):
    """Internal: the attempt was cut by the caller or the deadline, not the key."""
