"""The key actor: one trio task per (provider, key) pair, and the workers it owns.

A `KeyActor` owns its pair's state at two grains, and is the only code that changes
it: the key's own breaker and cooldown (auth, balance, connections that cannot be
made: they stop every model of the key), and one `Lane` per upstream model the key
serves (rate-limit cooldown, breaker, latency: they stop only that model; see
`router._lane`). It also owns its concurrency bound and counters. Others read them
(`is_available`, `wait_time`, the router's snapshot) to skip a key without a round
trip. What follows a failed attempt is not decided here: `_next_step` asks the
failure table (`router._failover.decide`), records the failure at its grain, and
carries out the steps that stay on this key (retry after a backoff, wait out a short
Retry-After, retry without max_tokens); the router carries out the rest.
With `[router.shared]`, `router._shared` also merges into them what other router
instances learned (`Cooldown.merge_until`, `CircuitBreaker.force_open/force_close`,
`RateBudget.hold_until`: merge-only, never shortening), and the actor tells it of its
own changes through sync hooks that never wait; the one await on Redis is the shared
budget reservation (`_reserve_shared`), bounded by `budget_timeout`.

How a job travels, and why this way:

- The caller's task hands a `Job` to `KeyActor.call` and parks itself with
  `trio.lowlevel.wait_task_rescheduled`. An idle worker of the actor is woken with the
  job directly (`trio.lowlevel.reschedule`); if none is idle and the key is below
  `max_concurrency`, a new worker task is started in the actor's nursery; otherwise
  the job waits in the actor's queue. The worker wakes the caller directly when the
  job ends. So a request costs two task switches and no channel, no Event and no task
  creation once the pool is warm. (Measured on this project's machines: a task per
  job cost about 6 µs more per request than a warm worker, and a fresh cancel scope
  per attempt about 6 µs more than one long-lived scope per worker.)
- Each worker runs one job at a time inside one long-lived cancel scope. An attempt's
  timeout is not a trio deadline: it is a `_Timer` appended to the actor's deque
  (attempts of one key start in order and share one timeout, so the deque is in
  deadline order), and the actor's own task cancels the worker's scope when the front
  timer expires. Moving a trio deadline per attempt cost 5 to 10 µs per request at
  1,000 concurrent callers (the deadline heap churns); a deque append costs well under
  one. When the request's own deadline comes before the attempt timeout (rare), the
  worker scope's trio deadline is used instead. When the scope fires (attempt timeout,
  request deadline, or the caller's cancellation), the worker settles the cut attempt
  from the state kept in the `Job` and carries on with the job (a timeout is a
  transient failure, timed out: the failure table decides whether it is retried in
  place) in a fresh scope.
- Workers idle for an attempt timeout retire (the actor task wakes them with None);
  `max_concurrency` bounds how many exist, so jobs beyond it queue in trio, never in
  the HTTP pool.
- The actor's task also ends queued jobs at their deadlines, so a request waiting for
  a free worker still ends at its deadline.
- A handed-over stream is read by the caller's own task (`_Pull`) when the provider
  allows it and its transport can cut a pending read from outside (the built-in HTTP
  kinds on the router's transport): one task step per upstream read, where a pump
  and a channel cost two and a hop (about a quarter of a token-by-token stream's CPU,
  measured). The worker keeps the key's slot and waits for the end. Other providers'
  streams are pumped by the worker, one batch (the chunks of one upstream read) per
  channel item. Either way the idle timeout is an `_IdleTimer` in a heap the actor's
  task watches: the reader writes two attributes around each wait, the heap sees the
  stream about once per idle timeout, and a read that waited too long is cut (the
  transport's cut, or the pump's cancel scope). A fresh cancel scope per chunk, as
  before, measured about a third of the library's CPU per chunk in bursts.

Draining (a key a reload removed, `drain`): the key takes no new job (`is_available`
says no, `call` answers SKIPPED so the router moves on), its idle workers retire, busy
ones retire once their job (a stream included) ends, and then the actor's task ends.

Cancellation: if the caller is cancelled while its job runs, the worker's scope is
cancelled and the caller stays parked until the attempt has unwound (so `in_flight`
is back and the breaker's probe slot is freed before the caller sees `Cancelled`). A
queued job is simply withdrawn. A caller's cancellation or the request's deadline is
never counted against the key.

What this module must never do: send a call to a key, or a lane, that is cooling or
whose breaker refuses at that moment (checked before every attempt, retries included;
the one exception is the single retry after a short Retry-After was waited out, which
passes the lane's own rate-limit cooldown on purpose), answer a job twice or never, or
put a secret into an error.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import random
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Final

import msgspec
import outcome
import trio

from ._breaker import CircuitBreaker
from ._budget import RateBudget, Reservation
from ._config import RouterSettings
from ._cooldown import Cooldown
from ._errors import ProviderError, RouterClosedError
from ._failover import RETRY, RETRY_WITHOUT_MAX_TOKENS, WAIT_RETRY, Situation, Step, decide, grain
from ._lane import Lane
from ._provider import IN_KEY_ACTOR, STREAM_CUT, Provider, ReadCut
from ._secrets import scrubber_for
from ._stream import STREAM_END, StreamFailure, StreamItem, StreamStart
from ._types import (
    ApiKey,
    Attempt,
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    StreamChunk,
    ToolCallDelta,
)

if TYPE_CHECKING:
    from ._shared import SharedState, Source

__all__ = ["DEADLINE", "SKIPPED", "STREAMED", "Job", "JobResult", "KeyActor"]

log = logging.getLogger("router.actor")


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
STREAMED: Final = _Signal("STREAMED")
"""A stream job handed its stream to the caller and pumped it to the end."""

JobResult = (
    ChatResponse
    | EmbeddingResponse
    | ProviderError
    | RouterClosedError
    | StreamStart
    | _Signal
    | int
)


def _no_alternatives(same_model: bool, later: bool) -> bool:
    return False


WORKER_TASK_NAME: Final = "router.KeyActor.worker"
_AFTER_FINISH_GRACE: Final = 1.0


class _NoClock(trio.abc.Clock):
    """Stands in until the actor runs; reading it is a bug."""

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        raise RuntimeError("key actor is not running")

    def deadline_to_sleep_time(self, deadline: float) -> float:
        raise RuntimeError("key actor is not running")


_NO_CLOCK: Final = _NoClock()


class _Timer:
    """One attempt's timeout: the actor task cancels `scope` at `deadline` unless the
    attempt is `done` by then."""

    __slots__ = ("deadline", "done", "scope")

    def __init__(self, deadline: float, scope: trio.CancelScope) -> None:
        self.deadline = deadline
        self.scope = scope
        self.done = False


class _IdleTimer:
    """A handed-over stream's idle timeout, kept by the actor task.

    The pump writes `since` and `waiting` around each wait for the upstream's next
    batch (attribute writes, no cancel scope, no trio deadline); the actor task cancels
    `scope` only when the pump has been waiting for `limit` seconds, and otherwise
    files the timer again for when the wait could expire. So the actor's heap sees a
    stream about once per `limit` seconds, not once per chunk. While the pump waits
    on a slow reader (`waiting` False) the timeout does not run, as before."""

    __slots__ = ("cut", "done", "due", "fired", "limit", "scope", "since", "waiting")

    def __init__(self, limit: float) -> None:
        self.limit = limit
        """Seconds the pump may wait for the next batch (shorter after the finish)."""
        self.since = 0.0
        self.waiting = False
        self.due = math.inf
        """The deadline of the timer's live heap entry (other entries are stale)."""
        self.done = False
        self.fired = False
        self.scope = trio.CancelScope()
        self.cut: Callable[[], None] | None = None
        """Ends the pending read instead of cancelling `scope`, where the transport
        offers it (`router._provider.STREAM_CUT`)."""

    def __lt__(self, other: _IdleTimer) -> bool:  # for the heap's ties
        return id(self) < id(other)


class _Singles:
    """A provider's `stream()` (one chunk at a time) as batches of one chunk."""

    __slots__ = ("_chunks",)

    def __init__(self, chunks: AsyncIterator[StreamChunk]) -> None:
        self._chunks = chunks

    def __aiter__(self) -> _Singles:
        return self

    async def __anext__(self) -> list[StreamChunk]:
        return [await self._chunks.__anext__()]

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()


class _Pull:
    """A handed-over stream that the caller's own task reads (a `StreamSource`).

    For providers whose batches may be read from any task (`reads_anywhere`: no cancel
    scope or nursery open across a yield) and whose transport can cut a pending read
    from outside (`STREAM_CUT`): the built-in HTTP ones on the router's transport.
    Each `receive` reads one batch upstream where the caller runs, so a token costs
    one task step, not a worker's step, a channel hop and the caller's step, and no
    cancel scope either: the idle timer ends a read that waited too long by the cut.
    The worker keeps the key's slot and waits for the end (`wait`); the pump's duties
    run here: the idle timer, the short grace after the finish reason, usage
    reconciliation, and a failure recorded at its grain."""

    __slots__ = (
        "_actor",
        "_done",
        "_finished",
        "_grace",
        "_idle",
        "_job",
        "_now",
        "_timer",
        "_upstream",
        "closed",
    )

    def __init__(
        self,
        actor: KeyActor,
        job: Job,
        upstream: AsyncIterator[list[StreamChunk]],
        timer: _IdleTimer,
        finished: bool,
        idle: float,
        grace: float,
    ) -> None:
        self._actor = actor
        self._job = job
        self._upstream = upstream
        self._timer = timer
        self._finished = finished
        self._idle = idle
        self._grace = grace
        self._now = actor._clock.current_time
        self._done = trio.Event()
        self.closed = False
        """Over: the end was handed out, or the caller or the worker let go."""

    async def wait(self) -> None:
        """The worker's wait for the end of the stream."""
        await self._done.wait()

    def close(self) -> None:
        """The caller stops reading (`StreamSource.close`)."""
        self._over()

    def let_go(self) -> bool:
        """The worker stops waiting (its scope was cancelled: the caller's `aclose`, a
        lost hedge race, the router closing). Returns whether the upstream is the
        worker's to close: not while the caller's task is inside a read, which is cut
        instead (the read fails, and the upstream ends as that failure unwinds it)."""
        self._over()
        if not self._timer.waiting:  # not inside a read (always so once the stream ended)
            return True
        cut = self._timer.cut
        assert cut is not None
        cut()
        return False

    def _over(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._timer.done = True
        # The key's count is settled before the caller sees the end (the worker that
        # waits on `_done` runs later).
        self._actor.in_flight -= 1
        self._done.set()

    async def receive(self) -> StreamItem:
        if self.closed:
            raise trio.ClosedResourceError("the stream was closed")
        timer = self._timer
        if timer.waiting:  # (the caller's mistake, never the upstream's failure)
            raise trio.BusyResourceError("another task is already reading this stream")
        upstream = self._upstream
        timer.since = self._now()
        timer.waiting = True  # (also: the caller's task is inside the upstream's read)
        try:
            batch = await upstream.__anext__()
        except StopAsyncIteration:
            return self._end(None)
        except Exception as exc:
            return self._end(exc)
        except BaseException:  # the caller's cancellation ended the upstream as it unwound
            self._over()
            raise
        finally:
            timer.waiting = False
        if self.closed:  # let go while a batch was arriving: close the upstream here
            await _close_upstream(upstream, self._actor._clock)
            raise trio.ClosedResourceError("the stream was closed")
        for chunk in batch:
            if chunk.finish_reason and not self._finished:
                self._finished = True
                timer.limit = self._grace
                if self._grace < self._idle:
                    self._actor._idle_file(timer, self._now() + self._grace)
            usage = chunk.usage
            if usage is not None and usage.total_tokens:
                self._actor._reconcile(self._job, usage.total_tokens, self._now())
        if timer.fired:  # it fell due just as the batch came: not idle, file it again
            timer.done = timer.fired = False
            self._actor._idle_file(timer, self._now() + timer.limit)
        return batch

    def _end(self, exc: Exception | None) -> StreamItem:
        """The upstream ended (`exc` None) or raised `exc` (a cut read among others):
        the item that says how, handed out last."""
        if self.closed:
            raise trio.ClosedResourceError("the stream was closed")
        self._over()
        if self._finished:
            # Whole: the upstream ended after its finish reason, the grace after it
            # ran out, or the connection broke once the answer was complete.
            return STREAM_END
        if exc is not None and self._timer.fired:  # the idle timer cut the read
            error = ProviderError("transient", f"stream idle for {self._idle:g}s", timed_out=True)
        elif exc is None:
            error = ProviderError("transient", "stream ended before its finish reason")
        elif isinstance(exc, ProviderError):
            error = exc
        else:
            error = ProviderError("unknown", f"provider raised {type(exc).__name__}: {exc}")
        return StreamFailure(self._actor._stream_recorded(self._job, error))


async def _close_upstream(upstream: object, clock: trio.abc.Clock) -> None:
    """Close a stream's upstream iterator, even inside a cancelled scope (bounded)."""
    aclose = getattr(upstream, "aclose", None)
    if aclose is not None:
        with trio.CancelScope(shield=True) as closing:
            closing.deadline = clock.current_time() + 5.0
            await aclose()


class Job:
    """One request's visit to one key. Carries the deadline, the attempt log, and the
    state of the attempt in progress, so that a worker can settle an attempt its
    cancel scope cut and carry on."""

    __slots__ = (
        "abandoned",
        "alternatives",
        "attempts",
        "backoff",
        "breaker",
        "count",
        "deadline",
        "done",
        "dropped_max_tokens",
        "embed",
        "failure",
        "in_attempt",
        "key_ticket",
        "lane",
        "member",
        "model",
        "origin",
        "queue",
        "queued",
        "raise_cancel",
        "request",
        "reservation",
        "retries",
        "scope",
        "started",
        "step",
        "stream",
        "ticket",
        "tokens",
        "wait_over",
        "waited",
        "waiter",
    )

    def __init__(
        self,
        request: ChatRequest | EmbeddingRequest,
        model: str,
        deadline: float,
        attempts: list[Attempt],
        stream: bool = False,
        tokens: int = 0,
        count: bool = False,
        alternatives: Callable[[bool, bool], bool] = _no_alternatives,
        origin: float = 0.0,
    ) -> None:
        self.stream = stream
        self.origin = origin
        """When the request began (router clock): attempts record their start from it."""
        self.embed = type(request) is EmbeddingRequest
        """An embedding request (the provider's `embed`), not a chat request: it takes
        the same path (lanes, breakers, cooldowns, budgets, failure table)."""
        self.alternatives = alternatives
        """Asked only after a failure (see `router._failover.Situation.alternatives`):
        could another key of the model, or a later model, take the request now?"""
        self.step: Step | None = None
        """The failure table's last step for the job: what the router does next."""
        self.failure: ProviderError | None = None
        """A handed-over stream's failure, for a reader the channel could not reach."""
        self.backoff = 0.0
        """Seconds slept before the next attempt (an in-place retry's backoff)."""
        self.tokens = tokens
        """Tokens the request may use (prompt estimate + max_tokens), for TPM budgets."""
        self.count = count
        """A count-tokens call, not a chat request (see `KeyActor._count`)."""
        self.request = request
        self.model = model
        self.deadline = deadline
        self.attempts = attempts
        self.waiter: trio.lowlevel.Task | None = None
        self.scope: trio.CancelScope | None = None
        """The scope of the worker serving the job, for the caller's abort."""
        self.abandoned = False
        self.raise_cancel: Any = None
        self.done = False
        self.queued = False
        self.queue: deque[Job] | None = None
        """The actor queue the job waits in (while `queued`), for `abort`."""
        self.breaker: CircuitBreaker | None = None
        """The lane's breaker (or the tenant's breaker of the lane) the job uses."""
        self.lane: Lane | None = None
        self.key_ticket = 0
        """The key breaker's ticket of the attempt in progress (`ticket`: the lane's)."""
        self.waited = False
        """The job already waited out one short Retry-After (at most once)."""
        self.wait_over = False
        """The short wait just ended: the next attempt may pass the lane's cooldown."""
        self.retries = 0
        self.dropped_max_tokens = False
        self.in_attempt = False
        self.ticket = 0
        self.started = 0.0
        self.reservation: Reservation | None = None
        self.member: str | None = None
        """The id of the job's reservation in the shared budget, if it has one."""

    def abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        """The caller was cancelled while parked in `KeyActor.call`: a queued job is
        withdrawn; a running one has its worker's scope cancelled (the caller stays
        parked until the attempt has unwound)."""
        self.abandoned = True
        if self.queued:  # nothing started: withdraw it
            self.queued = False
            self.done = True
            if self.queue is not None:
                self.queue.remove(self)
            return trio.lowlevel.Abort.SUCCEEDED
        self.raise_cancel = raise_cancel
        if self.scope is not None:
            self.scope.cancel()
        return trio.lowlevel.Abort.FAILED

    def __lt__(self, other: Job) -> bool:  # for the queue-deadline heap's ties
        return id(self) < id(other)


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
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> None:
        self.provider_name = provider_name
        self.key = key
        self.key_id = key.id
        self.provider = provider
        self.max_concurrency = max_concurrency
        self.settings = settings
        self._rng = rng
        self.breaker = CircuitBreaker(settings.breaker, rng)
        """The key's own breaker: failures that stop every model of the key (auth, and
        connections that cannot be made). A model's failures go to its lane."""
        self.cooldown = Cooldown(settings.cooldown)
        """The key's own cooldown: auth and balance failures (rate limits are a lane's)."""
        self.lanes: OrderedDict[str, Lane] = OrderedDict()
        """Upstream model id -> its lane on this key, least recently used first."""
        self._lanes_cap = settings.lanes_per_key
        self.budget = RateBudget(rpm, tpm) if rpm is not None or tpm is not None else None
        """Requests/tokens per minute; None when the key has no budget."""
        self.shared: SharedState | None = None
        """The link to state shared with other router instances (`[router.shared]`)."""
        self.cooling_source: Source = "local"
        """Where the cooldown's current end came from: this instance or another."""
        self.breaker_source: Source = "local"
        """Where the breaker's last trip (or recovery) came from."""
        self.in_flight = 0
        """Attempts being sent upstream right now."""
        self.requests = 0
        self.successes = 0
        self.failures = 0
        self._nursery: trio.Nursery | None = None
        self._clock: trio.abc.Clock = _NO_CLOCK
        self._workers = 0
        self._idle: list[trio.lowlevel.Task] = []
        self._idle_since: list[float] = []
        """When each idle worker parked (parallel to `_idle`, oldest first)."""
        self._queue: deque[Job] = deque()
        self._queue_deadlines: list[tuple[float, Job]] = []
        self._timers: deque[_Timer] = deque()
        """Attempt timeouts in start order (so in deadline order: the timeout is one
        constant), watched by the actor task."""
        self._idle_timers: list[tuple[float, _IdleTimer]] = []
        """Idle timeouts of the streams this key is pumping (a heap; see `_IdleTimer`)."""
        self._watch_scope: trio.CancelScope | None = None
        self.draining = False
        """Removed by a reload (`Router.reload`): takes no new job, finishes the ones it
        has, then its task ends (`drain`)."""
        self._drained: trio.Event | None = None
        self._ended: trio.Event | None = None
        self.stopped = False
        """The actor's task has ended (set by `run`)."""

    def __repr__(self) -> str:
        return f"KeyActor(provider={self.provider_name!r}, key_id={self.key_id!r})"

    # -- reads (any task) ---------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Jobs waiting for a free worker."""
        return len(self._queue)

    @property
    def busy(self) -> int:
        """Workers serving a job (in an attempt, a retry backoff, or about to start)."""
        return self._workers - len(self._idle)

    def lane_state(self, model: str) -> Lane | None:
        """The lane of upstream `model`, if the key has one (reads never create one)."""
        return self.lanes.get(model)

    def is_available(
        self, now: float, tenant: str | None, tokens: int = 0, model: str = ""
    ) -> bool:
        """Whether the key could take a request for upstream `model` now."""
        if now < self.cooldown.until or self.draining or not self.breaker.can_attempt(now):
            return False
        lane = self.lanes.get(model)
        if lane is not None and not lane.is_available(now, tenant):
            return False
        budget = self.budget
        return budget is None or budget.available_at(now, tokens) <= now

    def is_saturated(self) -> bool:
        return self._workers - len(self._idle) + len(self._queue) >= self.max_concurrency

    def wait_time(self, now: float, tenant: str | None, tokens: int = 0, model: str = "") -> float:
        """Seconds until this key may be called again for `model` (0 if it may be now)."""
        wait = max(self.cooldown.remaining(now), self.breaker.remaining(now))
        lane = self.lanes.get(model)
        if lane is not None:
            wait = max(wait, lane.wait_time(now, tenant))
        if self.budget is not None:
            wait = max(wait, self.budget.available_at(now, tokens) - now)
        return wait

    def failure_wait(self, now: float, tenant: str | None, model: str) -> float:
        """Seconds until neither the key's nor `model`'s lane's failure state (cooldowns,
        breakers) stops a call for `model`; budgets are not failures."""
        wait = max(self.cooldown.remaining(now), self.breaker.remaining(now))
        lane = self.lanes.get(model)
        if lane is not None:
            wait = max(wait, lane.wait_time(now, tenant))
        return wait

    # -- writes (the actor's own operations) ------------------------------------------

    def lane(self, model: str) -> Lane:
        """The lane of upstream `model`, made on first use; past `lanes_per_key` the
        least recently used lane holding no state is dropped (else the oldest)."""
        lanes = self.lanes
        lane = lanes.get(model)
        if lane is not None:
            lanes.move_to_end(model)
            return lane
        if len(lanes) >= self._lanes_cap:
            now = self._clock.current_time()
            victim = next((m for m, x in lanes.items() if x.is_idle_and_healthy(now)), None)
            del lanes[victim if victim is not None else next(iter(lanes))]
        lane = lanes[model] = Lane(model, self.settings, self._rng)
        return lane

    def reset(self, model: str | None = None) -> None:
        """Clear the key's state and every lane's, or only the lane of `model`."""
        if model is not None:
            lane = self.lanes.get(model)
            if lane is not None:
                lane.reset()
            return
        self.breaker.reset()
        self.cooldown.reset()
        for lane in self.lanes.values():
            lane.reset()
        self.cooling_source = self.breaker_source = "local"

    # -- the actor task -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The actor's own task: holds the nursery its workers run in, and ends queued
        jobs at their deadlines."""
        try:
            async with trio.open_nursery() as nursery:
                self._clock = trio.lowlevel.current_clock()
                self._nursery = nursery
                task_status.started()
                await self._watch()
        finally:
            self._nursery = None
            self.stopped = True
            if self._ended is not None:
                self._ended.set()
            closed = RouterClosedError("router closed while the request was queued")
            while self._queue:
                job = self._queue.popleft()
                job.queued = False
                self._finish(job, closed)

    async def _watch(self) -> None:
        """The actor's timekeeping: ends queued jobs at their deadlines and cuts
        attempts at their timeouts. One sleep serves every attempt of the key, so an
        attempt costs a deque append instead of a trio deadline registration."""
        heap = self._queue_deadlines
        timers = self._timers
        clock = self._clock
        retire_after = self.settings.attempt_timeout
        idle_timers = self._idle_timers
        while True:
            while timers and timers[0].done:
                timers.popleft()
            target = heap[0][0] if heap else math.inf
            if timers and timers[0].deadline < target:
                target = timers[0].deadline
            if self._idle_since and self._idle_since[0] + retire_after < target:
                target = self._idle_since[0] + retire_after
            if idle_timers and idle_timers[0][0] < target:
                target = idle_timers[0][0]
            with trio.CancelScope(deadline=target) as scope:
                self._watch_scope = scope
                await trio.sleep_forever()
            self._watch_scope = None
            now = clock.current_time()
            while heap and heap[0][0] <= now:
                job = heapq.heappop(heap)[1]
                if job.queued:
                    job.queued = False
                    self._queue.remove(job)
                    self._finish(job, DEADLINE)
            while timers and (timers[0].done or timers[0].deadline <= now):
                timer = timers.popleft()
                if not timer.done:
                    timer.done = True
                    timer.scope.cancel()
            while idle_timers and idle_timers[0][0] <= now:
                due, stream_timer = heapq.heappop(idle_timers)
                if not stream_timer.done and due == stream_timer.due:  # else stale
                    self._idle_check(stream_timer, now)
            # Workers idle for an attempt timeout retire (the oldest idle ones first).
            while self._idle_since and self._idle_since[0] + retire_after <= now:
                del self._idle_since[0]
                trio.lowlevel.reschedule(self._idle.pop(0), outcome.Value(None))

    def _idle_check(self, timer: _IdleTimer, now: float) -> None:
        """A stream's idle timer is due: cut the pump's wait if it has lasted `limit`,
        else file the timer for when it could."""
        if timer.waiting:
            expiry = timer.since + timer.limit
            if expiry <= now:
                timer.done = timer.fired = True
                if timer.cut is not None:
                    timer.cut()
                else:
                    timer.scope.cancel()
                return
        else:
            expiry = now + timer.limit  # busy handing a batch over: not idle
        self._idle_file(timer, expiry)

    def _idle_file(self, timer: _IdleTimer, due: float) -> None:
        timer.due = due
        heapq.heappush(self._idle_timers, (due, timer))
        watch = self._watch_scope
        if watch is not None and due < watch.deadline:
            watch.deadline = due

    async def drain(self) -> None:
        """Stop taking jobs, let the running and queued ones finish, then end the
        actor's task (a key a reload removed). Returns once the task has ended."""
        self.draining = True
        self._drained = trio.Event()
        while self._idle:  # idle workers retire now; busy ones as their job ends
            self._idle_since.pop()
            trio.lowlevel.reschedule(self._idle.pop(), outcome.Value(None))
        if self._workers:
            await self._drained.wait()
        nursery = self._nursery
        if nursery is not None and not self.stopped:
            self._ended = trio.Event()
            nursery.cancel_scope.cancel()
            await self._ended.wait()

    # -- the hop --------------------------------------------------------------------------

    async def call(self, job: Job) -> JobResult:
        """Run `job` on this key and return its result; see the module docstring."""
        nursery = self._nursery
        if nursery is None or self.draining:
            if self.draining:
                return SKIPPED  # a reload removed the key: the request goes elsewhere
            return RouterClosedError("router is closed (key actor stopped)")
        job.waiter = trio.lowlevel.current_task()
        if self._idle:
            self._idle_since.pop()
            trio.lowlevel.reschedule(self._idle.pop(), outcome.Value(job))
        elif self._workers < self.max_concurrency:
            try:
                nursery.start_soon(self._worker, job, name=WORKER_TASK_NAME)
            except RuntimeError:
                return RouterClosedError("router is closing")
            self._workers += 1
        else:
            self._enqueue(job)

        # (a bound method of the job, not a closure: a parked caller keeps it alive)
        result: JobResult = await trio.lowlevel.wait_task_rescheduled(job.abort)
        return result

    def _enqueue(self, job: Job) -> None:
        job.queued = True
        job.queue = self._queue
        self._queue.append(job)
        heapq.heappush(self._queue_deadlines, (job.deadline, job))
        watch = self._watch_scope
        if watch is not None and job.deadline < watch.deadline:
            watch.deadline = job.deadline

    def _finish(self, job: Job, result: JobResult) -> None:
        """Wake the job's caller with its one outcome."""
        if job.done:
            return
        job.done = True
        waiter = job.waiter
        assert waiter is not None
        if job.abandoned:
            trio.lowlevel.reschedule(waiter, outcome.capture(job.raise_cancel))
        else:
            trio.lowlevel.reschedule(waiter, outcome.Value(result))

    # -- workers ----------------------------------------------------------------------------

    async def _worker(self, first: Job) -> None:
        IN_KEY_ACTOR.set(True)  # this task's own context: the providers it calls
        me = trio.lowlevel.current_task()
        job: Job | None = first
        try:
            while True:
                scope = trio.CancelScope()
                with scope:
                    while True:
                        if job is None:
                            if self._queue:
                                job = self._queue.popleft()
                                job.queued = False
                            else:
                                job = await self._park(me)
                                if job is None:
                                    return  # idle for an attempt timeout: retire
                                if scope.cancel_called:
                                    break  # a stale deadline of this scope: take a fresh one
                        job.scope = scope
                        try:
                            result = await self._serve(job, scope)
                        except Exception as exc:  # a bug costs one request, not the router
                            result = self._crashed(job, exc)
                        job.scope = None
                        self._finish(job, result)
                        job = None
                        if scope.cancel_called:
                            break
                if job is None and scope.cancelled_caught:
                    return  # a stale deadline fired while idle: retire
                # Otherwise the scope cut `job` (its attempt timed out, its deadline
                # passed or its caller left): `_serve` settles that in a fresh scope.
        finally:
            self._workers -= 1
            if not self._workers and self._drained is not None:
                self._drained.set()
            if job is not None and not job.done:
                self._finish(job, RouterClosedError("router closed while the request was running"))

    async def _park(self, me: trio.lowlevel.Task) -> Job | None:
        """Wait for the next job; None tells the worker to retire."""
        if self.draining:
            return None
        idle, since = self._idle, self._idle_since
        idle.append(me)
        now = self._clock.current_time()
        since.append(now)
        watch = self._watch_scope
        if watch is not None and watch.deadline == math.inf:
            watch.deadline = now + self.settings.attempt_timeout  # time this one's retirement

        def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
            index = idle.index(me)
            del idle[index], since[index]
            return trio.lowlevel.Abort.SUCCEEDED

        job: Job | None = await trio.lowlevel.wait_task_rescheduled(abort)
        return job

    async def _serve(self, job: Job, scope: trio.CancelScope) -> JobResult:
        """Attempt `job` on this key, with in-place retries, until it has a result."""
        if job.done:
            return STREAMED  # a stream handed over and pumped: nothing left to do
        settings = self.settings
        clock = self._clock
        if job.count:
            now = clock.current_time()
            if job.abandoned or now >= job.deadline:
                return DEADLINE
            if now < self.cooldown.until:
                return SKIPPED
            scope.deadline = job.deadline
            return await self._count(job, now)
        lane = job.lane
        if lane is None:
            lane = job.lane = self.lane(job.request.model)
            job.breaker = lane.breaker_for(job.request.tenant)
        breaker = job.breaker
        assert breaker is not None
        key_breaker = self.breaker
        while True:
            response: ChatResponse | EmbeddingResponse | None = None
            error: ProviderError | None = None
            if job.in_attempt:
                # The previous attempt was cut by the worker's scope.
                job.in_attempt = False
                now = job.started
                end = clock.current_time()
                if job.abandoned or end >= job.deadline:
                    self._no_verdict(job)  # the caller's doing: no verdict
                    self._log(job, "cancelled" if job.abandoned else "deadline", end - now)
                    return DEADLINE
                error = ProviderError(
                    "transient",
                    f"attempt timed out after {settings.attempt_timeout:g}s",
                    timed_out=True,
                )
            else:
                now = clock.current_time()
                if job.abandoned or now >= job.deadline:
                    return DEADLINE
                if now < self.cooldown.until:
                    return SKIPPED
                if now < lane.cooldown.until and not job.wait_over:
                    return SKIPPED
                job.wait_over = False
                key_ticket = key_breaker.try_acquire(now)
                if key_ticket is None:
                    return SKIPPED
                ticket = breaker.try_acquire(now)
                if ticket is None:
                    key_breaker.on_abandon(key_ticket)
                    return SKIPPED
                job.key_ticket = key_ticket
                job.ticket = ticket
                if self.budget is not None:
                    reservation = self.budget.try_reserve(now, job.tokens)
                    if reservation is None:
                        self._no_verdict(job)
                        return SKIPPED
                    job.reservation = reservation
                    if self.shared is not None:
                        if not await self._reserve_shared(job, scope):
                            return SKIPPED
                        now = clock.current_time()
                job.started = now
                self.requests += 1
                lane.requests += 1
                job.in_attempt = True
                self.in_flight += 1
                if job.stream:
                    scope.deadline = job.deadline  # the first-token timeout is inside
                    error = await self._stream_attempt(job, now, scope)  # ends in_flight
                    job.in_attempt = False
                    if error is None:
                        return STREAMED
                else:
                    attempt_deadline = now + settings.attempt_timeout
                    timer: _Timer | None = None
                    if job.deadline < attempt_deadline:
                        scope.deadline = job.deadline  # the request's deadline comes first
                    else:
                        if scope.deadline != math.inf:
                            scope.deadline = math.inf  # left over from a slow path
                        timer = _Timer(attempt_deadline, scope)
                        self._timers.append(timer)
                        watch = self._watch_scope
                        if watch is not None and attempt_deadline < watch.deadline:
                            watch.deadline = attempt_deadline
                    try:
                        request = job.request
                        if type(request) is EmbeddingRequest:
                            response = await self._embed(request)
                        else:
                            assert type(request) is ChatRequest
                            response = await self.provider.complete(request, self.key)
                    except ProviderError as exc:
                        error = exc
                    except Exception as exc:  # a provider bug is an unknown failure
                        error = ProviderError(
                            "unknown", f"provider raised {type(exc).__name__}: {exc}"
                        )
                    finally:
                        self.in_flight -= 1
                        if timer is not None:
                            timer.done = True
                            timers = self._timers
                            while timers and timers[0].done:
                                timers.popleft()
                    job.in_attempt = False
                end = clock.current_time()
            if error is None:
                if type(response) is (EmbeddingResponse if job.embed else ChatResponse):
                    assert response is not None
                    if job.reservation is not None and response.usage.total_tokens:
                        self._reconcile(job, response.usage.total_tokens, end)
                    self._succeeded(job, end, end - now)
                    job.attempts.append(
                        Attempt(
                            model=job.model,
                            provider=self.provider_name,
                            key_id=self.key_id,
                            outcome="ok",
                            duration=end - now,
                            backoff=job.backoff,
                            started=now - job.origin,
                        )
                    )
                    return response
                wanted = "EmbeddingResponse" if job.embed else "ChatResponse"
                error = ProviderError(
                    "unknown", f"provider returned {type(response).__name__}, not {wanted}"
                )
            error = self._own(error, job)
            self._log(job, error.kind, end - now, error.status)
            self.failures += 1
            lane.failures += 1
            step = self._next_step(job, error, end)
            if step.name == RETRY or step.name == WAIT_RETRY:
                if step.name == RETRY:
                    job.retries += 1
                else:
                    job.waited = job.wait_over = True
                scope.deadline = job.deadline
                await trio.sleep(step.delay)
                job.backoff = clock.current_time() - end
                continue
            if step is RETRY_WITHOUT_MAX_TOKENS:
                assert type(job.request) is ChatRequest
                job.request = msgspec.structs.replace(job.request, max_tokens=None)
                job.dropped_max_tokens = True
                continue
            return error

    def _crashed(self, job: Job, exc: Exception) -> ProviderError:
        """An unexpected error inside the router while serving `job`: logged, the
        job's tickets freed, and the job answered with an `unknown` failure, so no
        single request can end the actor (and with it every other request)."""
        log.error(
            "key actor %s/%s: unexpected %s while serving a request",
            self.provider_name,
            self.key_id,
            type(exc).__name__,
            exc_info=exc,
        )
        if job.in_attempt:
            job.in_attempt = False
        if job.lane is not None:
            self._no_verdict(job)
        return self._own(
            ProviderError(
                "unknown", f"router error while serving the request: {type(exc).__name__}"
            ),
            job,
        )

    def _next_step(self, job: Job, error: ProviderError, now: float) -> Step:
        """Ask the failure table what follows `error`, and settle the attempt's
        breaker tickets: an in-place retry after a backoff leaves the verdict to the
        last retry; any other step records the failure at its grain (see
        `router._failover`)."""
        settings = self.settings
        step = decide(
            Situation(
                error.kind,
                key_wide=error.key_wide,
                timed_out=error.timed_out,
                retry_after=error.retry_after,
                probe=CircuitBreaker.is_probe(job.ticket)
                or CircuitBreaker.is_probe(job.key_ticket),
                retries=job.retries,
                transient_retries=settings.transient_retries,
                backoff=self._backoff(job.retries),
                time_left=job.deadline - now,
                attempt_timeout=(
                    settings.first_token_timeout if job.stream else settings.attempt_timeout
                ),
                rate_limit_wait=settings.rate_limit_wait,
                waited=job.waited,
                max_tokens_droppable=type(job.request) is ChatRequest
                and job.request.max_tokens is not None
                and not job.dropped_max_tokens,
                alternatives=job.alternatives,
                attempts_left=settings.max_attempts - len(job.attempts),
            )
        )
        job.step = step
        if step.name == RETRY:
            self._no_verdict(job)  # the verdict waits for the last retry
        else:
            self._record_failure(job, error, now)  # settles both tickets
        return step

    def _backoff(self, retries: int) -> float:
        settings = self.settings
        delays = settings.retry_backoff
        delay = delays[min(retries, len(delays) - 1)]
        return delay * (1.0 + settings.retry_jitter * self._rng.random())

    def _succeeded(self, job: Job, now: float, latency: float) -> None:
        """An attempt was answered: both breakers hear it, the lane's backoff resets."""
        lane = job.lane
        breaker = job.breaker
        assert lane is not None and breaker is not None
        self.successes += 1
        lane.successes += 1
        lane.record_latency(latency)
        lane.cooldown.hits = 0
        self.breaker.on_success(job.key_ticket, now, latency)
        breaker.on_success(job.ticket, now, latency)
        shared = self.shared
        if shared is not None:
            shared.breaker_changed(self)
            if breaker is lane.breaker:
                shared.lane_breaker_changed(self, lane)

    def _no_verdict(self, job: Job) -> None:
        """The attempt says nothing about the key or the model: free the tickets."""
        self.breaker.on_abandon(job.key_ticket)
        if job.breaker is not None:
            job.breaker.on_abandon(job.ticket)

    def _record_failure(self, job: Job, error: ProviderError, now: float) -> None:
        """Record a failure at its grain: the lane (a model's rate limit or outage), the
        key (auth, balance, a connection that cannot be made) or nowhere. A lane
        failure still tells the key's breaker that the key itself answered."""
        lane = job.lane
        breaker = job.breaker
        assert lane is not None and breaker is not None
        kind = error.kind
        where = grain(kind, error.key_wide)
        key_breaker = self.breaker
        shared = self.shared
        if where == "lane":
            if kind == "rate_limit":
                lane.cooldown.hit(now, "rate_limit", error.retry_after)
                if shared is not None:
                    shared.lane_cooled(self, lane)
            breaker.on_failure(job.ticket, now, error.timed_out)
            if error.timed_out:
                key_breaker.on_abandon(job.key_ticket)  # nothing was heard from the key
            else:
                key_breaker.on_success(job.key_ticket, now, 0.0)
            if shared is not None and breaker is lane.breaker:
                shared.lane_breaker_changed(self, lane)
        elif where == "key":
            breaker.on_abandon(job.ticket)
            if kind == "auth" or kind == "balance":
                self.cooldown.hit(now, kind, error.retry_after)
                if shared is not None:
                    shared.cooled(self)
            if kind == "balance":
                key_breaker.on_abandon(job.key_ticket)
            else:
                key_breaker.on_failure(job.key_ticket, now, error.timed_out)
        else:
            self._no_verdict(job)
        if shared is not None:
            shared.breaker_changed(self)

    async def _reserve_shared(self, job: Job, scope: trio.CancelScope) -> bool:
        """Reserve the job in the budget shared with other router instances (the one
        wait on Redis a request makes, bounded by `budget_timeout`). False: the shared
        budget is full, and the local reservation and the ticket are given back. When
        Redis does not answer in time, the local reservation alone stands."""
        assert self.shared is not None and self.budget is not None
        reservation = job.reservation
        assert reservation is not None
        scope.deadline = job.deadline  # not a previous job's attempt deadline
        try:
            member = await self.shared.reserve(self, job.tokens)
        except BaseException:  # cancelled before the attempt began: undo, count nothing
            self.budget.release(reservation)
            job.reservation = None
            self._no_verdict(job)
            raise
        if member is False:
            self.budget.release(reservation)
            job.reservation = None
            self._no_verdict(job)
            return False
        job.member = member if isinstance(member, str) else None
        return True

    def _reconcile(self, job: Job, total_tokens: int, now: float) -> None:
        budget, reservation = self.budget, job.reservation
        if budget is not None and reservation is not None:
            budget.reconcile(reservation, total_tokens, now)
            if self.shared is not None and job.member is not None:
                self.shared.reconcile(self, job.member, total_tokens)
        job.reservation = None

    async def _count(self, job: Job, now: float) -> int | ProviderError:
        """A count-tokens call (for the exact token counter). It uses the key's worker
        and skips a cooling key, but its failures feed neither the key's breaker nor its
        cooldown: the counter has a breaker of its own and falls back offline."""
        count = getattr(self.provider, "count_tokens", None)
        if count is None:
            return ProviderError("bad_request", f"{self.provider_name} cannot count tokens")
        with trio.CancelScope(deadline=min(now + self.settings.attempt_timeout, job.deadline)):
            try:
                assert type(job.request) is ChatRequest
                tokens: int = await count(job.request, self.key)
            except ProviderError as exc:
                return self._own(exc, job)
            except Exception as exc:
                return self._own(
                    ProviderError("unknown", f"provider raised {type(exc).__name__}: {exc}"), job
                )
            return tokens
        return ProviderError("transient", "count-tokens call timed out")

    async def _embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """An embedding attempt: the provider's optional `embed(request, key)`."""
        embed = getattr(self.provider, "embed", None)
        if embed is None:
            raise ProviderError("bad_request", f"{self.provider_name} cannot embed")
        response: EmbeddingResponse = await embed(request, self.key)
        return response

    # -- streams ----------------------------------------------------------------------------

    def _open_stream(self, request: ChatRequest) -> AsyncIterator[list[StreamChunk]]:
        """The upstream's answer as batches: what the provider's `stream_batches`
        yields (all the chunks one upstream read produced), else its `stream`'s chunks
        one by one, else its `complete` answer as one chunk."""
        batches = getattr(self.provider, "stream_batches", None)
        if batches is not None:
            opened: AsyncIterator[list[StreamChunk]] = batches(request, self.key)
            return opened
        stream = getattr(self.provider, "stream", None)
        if stream is not None:
            return _Singles(stream(request, self.key))
        return self._complete_as_stream(request)

    async def _complete_as_stream(self, request: ChatRequest) -> AsyncIterator[list[StreamChunk]]:
        """A provider without `stream()`: its whole answer as one chunk."""
        response = await self.provider.complete(request, self.key)
        yield [
            StreamChunk(
                text=response.content,
                tool_calls=[
                    ToolCallDelta(index=i, id=call.id, name=call.name, arguments=call.arguments)
                    for i, call in enumerate(response.tool_calls)
                ],
                finish_reason=response.finish_reason,
                usage=response.usage,
            )
        ]

    async def _stream_attempt(
        self, job: Job, now: float, scope: trio.CancelScope
    ) -> ProviderError | None:
        """One streamed attempt. Before the first content chunk a failure is returned
        (and may fail over); after it, the stream belongs to the caller, whose task
        reads the rest itself where the provider allows (`_Pull`), else the batches are
        pumped into its channel; a failure reaches it as `StreamInterruptedError`.
        Returns None once the stream has been handed over and has ended."""
        settings = self.settings
        clock = self._clock
        assert type(job.request) is ChatRequest
        upstream = self._open_stream(job.request)
        # The caller's task reads the rest itself where the provider allows it and its
        # transport can cut a pending read (see `_Pull`); else the worker pumps it.
        cut = ReadCut() if getattr(self.provider, "reads_anywhere", False) is True else None
        relay: _Pull | None = None
        try:
            first: list[StreamChunk] = []
            ended = False
            with trio.CancelScope(deadline=now + settings.first_token_timeout) as ttft:
                token = STREAM_CUT.set(cut)
                try:
                    while True:
                        try:
                            batch = await upstream.__anext__()
                        except StopAsyncIteration:
                            ended = True
                            break
                        first += batch
                        if any(chunk.has_content for chunk in batch):
                            break
                except ProviderError as exc:
                    return exc
                except Exception as exc:
                    return ProviderError("unknown", f"provider raised {type(exc).__name__}: {exc}")
                finally:
                    STREAM_CUT.reset(token)
            if ttft.cancelled_caught:
                return ProviderError(
                    "transient",
                    f"no first token within {settings.first_token_timeout:g}s",
                    timed_out=True,
                )
            finished = any(chunk.finish_reason for chunk in first)
            if ended and not finished:
                return ProviderError("transient", "stream ended before its first token")
            # The upstream answered: from here on the stream is the caller's.
            end = clock.current_time()
            self._succeeded(job, end, end - now)
            self._log(job, "ok", end - now)
            for chunk in first:  # a short answer's usage may come in its first read
                if chunk.usage is not None and chunk.usage.total_tokens:
                    self._reconcile(job, chunk.usage.total_tokens, end)
            pump = job.scope = trio.CancelScope()  # what the caller's aclose() cancels
            scope.deadline = math.inf  # the request deadline bounded the wait for this
            if cut is not None and cut.cut is not None and not ended:
                idle = settings.idle_timeout
                grace = min(idle, _AFTER_FINISH_GRACE)
                timer = _IdleTimer(grace if finished else idle)
                timer.cut = cut.cut
                relay = _Pull(self, job, upstream, timer, finished, idle, grace)
                self._finish(job, StreamStart(first, relay, job))
                with pump:
                    self._idle_file(timer, clock.current_time() + timer.limit)
                    await relay.wait()
                return None  # ended, or cut short: the caller's aclose, a hedge race, shutdown
            send, receive = trio.open_memory_channel[StreamItem](16)
            self._finish(job, StreamStart(first, receive, job))
            with send:
                if ended:
                    send.send_nowait(STREAM_END)
                else:
                    await self._pump(job, upstream, send, pump, finished)
            return None
        finally:
            # The upstream iterator is this worker's to close, unless the caller's task
            # is inside a read of it right now (then that read is cut instead).
            owned = relay.let_go() if relay is not None else True  # (settles in_flight)
            try:
                if owned:
                    await _close_upstream(upstream, clock)
            finally:
                if relay is None:
                    self.in_flight -= 1  # (a pulled stream gave it back as it ended)

    async def _pump(
        self,
        job: Job,
        upstream: AsyncIterator[list[StreamChunk]],
        send: trio.MemorySendChannel[StreamItem],
        pump: trio.CancelScope,
        finished: bool,
    ) -> None:
        """Relay the upstream's batches to the caller, one channel item per batch. The
        idle timeout is an `_IdleTimer` the actor task keeps, so a batch costs no cancel
        scope; after the finish reason only trailing usage and the end marker are due,
        so the wait shrinks to a short grace, then the (whole) answer ends anyway."""
        idle = self.settings.idle_timeout
        grace = min(idle, _AFTER_FINISH_GRACE)
        clock = self._clock
        timer = _IdleTimer(grace if finished else idle)
        pending: list[StreamChunk] | None = None
        with pump:
            try:
                self._idle_file(timer, clock.current_time() + timer.limit)
                while True:
                    wait = timer.scope = trio.CancelScope()  # a new one only after a cut
                    with wait:
                        if pending is not None:
                            await send.send(pending)
                            pending = None
                        while True:
                            timer.since = clock.current_time()
                            timer.waiting = True
                            batch = await upstream.__anext__()
                            timer.waiting = False
                            for chunk in batch:
                                if chunk.finish_reason and not finished:
                                    finished = True
                                    timer.limit = grace
                                    if grace < idle:
                                        self._idle_file(timer, clock.current_time() + grace)
                                usage = chunk.usage
                                if usage is not None and usage.total_tokens:
                                    self._reconcile(job, usage.total_tokens, clock.current_time())
                            pending = batch
                            if timer.fired:  # it fell due as the batch came: a new scope
                                break
                            try:
                                # No trip through the scheduler when there is room
                                # (the upstream's read is this task's checkpoint).
                                send.send_nowait(batch)
                            except trio.WouldBlock:  # a slow reader: wait for room
                                await send.send(batch)
                            pending = None
                            if pump.cancel_called:
                                return
                    if pending is None:  # the timer cut a wait of `limit` seconds
                        if finished:
                            break
                        raise ProviderError(
                            "transient", f"stream idle for {idle:g}s", timed_out=True
                        )
                    # The timer fell due just as a batch arrived (the actor task ran
                    # between the batch's arrival and this task): not idle. The cut
                    # scope is spent; the batch goes out in a fresh one.
                    timer.done = timer.fired = False
                    self._idle_file(timer, clock.current_time() + timer.limit)
            except StopAsyncIteration:
                if not finished:  # ended with neither finish reason nor end marker
                    self._stream_failed(
                        job,
                        send,
                        ProviderError("transient", "stream ended before its finish reason"),
                    )
                    return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the caller stopped reading
            except Exception as exc:
                if not finished:
                    self._stream_failed(
                        job,
                        send,
                        exc
                        if isinstance(exc, ProviderError)
                        else ProviderError(
                            "unknown", f"provider raised {type(exc).__name__}: {exc}"
                        ),
                    )
                    return
                # The finish reason arrived, then the connection was lost before the end
                # marker: the answer is whole.
            finally:
                timer.done = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await send.send(STREAM_END)

    def _stream_failed(
        self, job: Job, send: trio.MemorySendChannel[StreamItem], error: ProviderError
    ) -> None:
        """A stream failed after it was handed to the caller: record it at its grain
        (its first chunk already counted as the attempt's success) and tell the caller."""
        error = self._stream_recorded(job, error)
        # The caller learns of it without the actor ever waiting on the caller: in the
        # channel when there is room, else from the job when the channel ends (a full
        # channel means a slow reader, who must not hold the worker or break the actor).
        with contextlib.suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            send.send_nowait(StreamFailure(error))

    def _stream_recorded(self, job: Job, error: ProviderError) -> ProviderError:
        """Record a handed-over stream's failure at its grain; returns it stamped and
        scrubbed (and kept on the job)."""
        error = self._own(error, job)
        # The first chunk settled the attempt's tickets; these verdicts count only
        # where the breaker is closed (a probe's slot was already given back).
        job.ticket &= ~1
        job.key_ticket &= ~1
        self.failures += 1
        if job.lane is not None:
            job.lane.failures += 1
        self._record_failure(job, error, self._clock.current_time())
        job.failure = error
        return error

    def _log(self, job: Job, outcome: str, duration: float, status: int | None = None) -> None:
        job.attempts.append(
            Attempt(
                model=job.model,
                provider=self.provider_name,
                key_id=self.key_id,
                outcome=outcome,
                duration=duration,
                status=status,
                backoff=job.backoff,
                started=job.started - job.origin,
            )
        )
        job.backoff = 0.0

    def _own(self, error: ProviderError, job: Job) -> ProviderError:
        """Stamp the error with where it happened, and scrub from it the key's secret
        and the provider's other credentials (`known_secrets`: header values, base_url
        credentials), whole or any long piece of them (`router._secrets.Scrubber`)."""
        error.provider = self.provider_name
        error.key_id = self.key_id
        error.model = job.model
        others: tuple[str, ...] = getattr(self.provider, "known_secrets", ())
        scrubbed = scrubber_for((self.key.secret, *others)).scrub(error.message)
        if scrubbed != error.message:
            error.message = scrubbed
            error.args = (scrubbed,)
        return error
