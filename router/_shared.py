"""State shared by several router instances through Redis (``[router.shared]``).

Why coredis: it is a maintained, fully typed asyncio/anyio Redis client, and anyio runs
it on trio natively (no asyncio loop in a thread). Before choosing it we checked under
``trio.run`` against a real redis-server: connect, SET/GET with expiry, SET NX, EVAL and
EVALSHA of Lua scripts, PUBLISH/SUBSCRIBE, cancellation mid-command, a server killed
and restarted under a live client (commands fail fast with ConnectionError, then work
again; a subscription ends with ConnectionError and can be re-opened), and a stopped
(SIGSTOP'd) server (commands end at our own timeouts and the client stays usable).
redis-py's asyncio client would need an asyncio loop; a RESP client of our own would
be code to maintain for nothing coredis lacks.

What is shared, and how:

- Targets: a key (its own cooldown and breaker: auth, balance, connections) and each
  of its lanes (key id + upstream model: that model's rate-limit cooldown and its
  breaker) are shared alike; an event's `model` names the lane's upstream model, and
  is empty for the key itself. Per-tenant breakers stay local.
- Cooldowns: an absolute wall-clock "until" per target, kept as a Redis key that
  expires then and written by a Lua script only if it is later than the stored one
  (merged by maximum: nobody shortens another's cooldown), and published. Receivers
  merge it with `Cooldown.merge_until`.
- Breaker trips and recoveries: a trip publishes the open time's end (kept as a Redis
  key until then); receivers `CircuitBreaker.force_open(until)`. A recovery (close)
  deletes the Redis key and publishes; receivers `force_close()`. Half-open probing is
  coordinated by a lease per target (SET NX PX with this instance's id): shortly before
  a target's open time ends, each instance asks for the lease; the winner goes
  half-open and probes (renewing the lease while a probe is in flight), the others
  stay open until the lease runs out or the winner's verdict (close, or a re-trip)
  arrives.
- A lane event for a model the key has no lane for here makes the lane (through the
  actor, which bounds its lanes) only when it is a cooldown or a trip still running;
  anything else about an absent lane is ignored.
- Model health (cooling, disabled): like cooldowns, merged by the later end.
- RPM/TPM budgets: a Lua script per reservation over a sorted set of reservation times
  (Redis's own clock, so hosts need no synchronised clocks) plus a token hash and a held
  token counter, all with expiry: at most `rpm` reservations and `tpm` tokens per 60 s
  across all instances. This is the one Redis call on the request path, bounded by
  `budget_timeout`; on timeout or error the key's local budget alone decides. A refusal
  for a full request window tells the local budget to admit nothing until the oldest
  shared reservation leaves the window (`RateBudget.hold_until`).

Redis keys (``P`` is `key_prefix`; ``p/k`` a provider and key id as configured; in
lane keys ``%``, ``/`` and ``#`` of ``p`` and ``k`` are %-escaped, so a key's lanes
match ``p/k#*`` and nothing else)::

    P:cool:p/k           P:lane-cool:p/k#model       cooldown event, expires at its end
    P:breaker:p/k        P:lane-breaker:p/k#model    trip event, expires at its end
    P:lease:p/k          P:lane-lease:p/k#model      half-open probe lease (instance id)
    P:health:model                                   model health event
    P:budget:p/k:{times,tokens,held}                 RPM/TPM budget
    P:events                                         the pub/sub channel

Everything else here runs in background tasks: the request path only appends to an
outbox (no await) and never waits on Redis except for the budget reservation.

Clocks: the state machines run on trio's clock; Redis holds wall-clock times
(`time.time()`). Absolute times are converted at the boundary, both ways, with
``local = trio_now + (wall - time.time())``.

Redis down or slow: a health ping every `ping_interval` (bounded by `timeout`), and any
failed operation, mark Redis unreachable: logged once, events are dropped (the local
actors keep all state), budgets are local. When a ping (or the subscription) succeeds
again, the instance reloads the shared state, republishes what it learned meanwhile,
logs once, and shares again. A request never fails because of Redis.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import re
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import msgspec
import trio

from ._breaker import CLOSED, HALF_OPEN, OPEN
from ._budget import WINDOW
from ._config import SharedConfig, mask_url, resolve_secret
from ._errors import ConfigError
from ._health import ModelHealth
from ._secrets import mask_urls_in, scrubber_for, url_secrets

if TYPE_CHECKING:
    from ._actor import KeyActor
    from ._breaker import CircuitBreaker
    from ._cooldown import Cooldown
    from ._lane import Lane

__all__ = ["SharedSnapshot", "SharedState", "Source"]

log = logging.getLogger("router.shared")

Source = Literal["local", "shared"]

_OUTBOX_MAX: Final = 10_000
_PROBE_TICK: Final = 0.05
"""How often open and half-open breakers are checked for the probe lease."""
_LEASE_LEAD: Final = 0.15
"""Seconds before an open time ends that the probe lease is asked for."""
_STATE_KINDS: Final = ("cool", "breaker", "lease")
"""The Redis keys of one target's state (a key's, or with the `lane-` prefix a lane's)."""
_LOADED_KINDS: Final = ("cool", "breaker", "health", "lane-cool", "lane-breaker")
"""The stored state an instance loads on (re)connecting."""
_ALL_KINDS: Final = (*_LOADED_KINDS, "lease", "lane-lease")
"""Everything a reset of all state deletes (budgets are not state to reset)."""

# KEYS[1]: the state key. ARGV: until (wall seconds), the event (JSON), the channel.
# Stores and publishes the event only if its "until" is later than the stored one.
_SET_MAX: Final = """
local cur = redis.call('GET', KEYS[1])
local u = tonumber(ARGV[1])
if cur then
  local ok, old = pcall(cjson.decode, cur)
  if ok and type(old) == 'table' and tonumber(old['until']) and tonumber(old['until']) >= u then
    return 0
  end
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local at = math.floor(u * 1000)
if at <= now_ms then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', at)
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
"""

# KEYS: keys to delete. ARGV[1]: the channel, ARGV[2]: the event.
_DELETE_PUBLISH: Final = """
for i, k in ipairs(KEYS) do redis.call('DEL', k) end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

# KEYS[1]: the lease. ARGV: this instance's id, ttl ms. Returns the ttl (> 0) when the
# lease is ours (taken or renewed), minus the holder's remaining ms when it is not.
_LEASE: Final = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return tonumber(ARGV[2]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(ARGV[2])
end
local left = redis.call('PTTL', KEYS[1])
if left < 1 then left = 1 end
return -left
"""

_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

WINDOW_SLIDE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[5])
local cutoff = now - window
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff)
if #expired > 0 then
  local freed = 0
  for _, m in ipairs(expired) do
    freed = freed + (tonumber(redis.call('HGET', KEYS[2], m)) or 0)
    redis.call('HDEL', KEYS[2], m)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  redis.call('DECRBY', KEYS[3], freed)
end
"""
"""The start of every sliding-window script (the key budgets' here, the tenant quotas'
in `router.gateway._quota`): KEYS[1] the window's reservation times (a sorted set),
KEYS[2] their tokens (a hash), KEYS[3] the tokens held; ARGV[5] the window in ms. Drops
the reservations older than the window and frees their tokens; leaves `now` and
`window` (ms) set for the rest of the script."""


# KEYS: the reservation times (sorted set), their tokens (hash), the tokens held.
# ARGV: rpm (0: none), tpm (0: none), tokens, member, window ms.
# Returns {1, 0} when admitted, {0, ms until the window has a free request} or {0, 0}.
_RESERVE: Final = (
    WINDOW_SLIDE
    + """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local count = redis.call('ZCARD', KEYS[1])
local held = tonumber(redis.call('GET', KEYS[3])) or 0
if rpm > 0 and count >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, math.max(1, tonumber(oldest[2]) + window - now)}
end
if tpm > 0 and held > 0 and held + tokens > tpm then return {0, 0} end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('HSET', KEYS[2], ARGV[4], tokens)
redis.call('INCRBY', KEYS[3], tokens)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], window * 2) end
return {1, 0}
"""
)

# KEYS: as _RESERVE. ARGV: member, actual tokens.
_RECONCILE: Final = """
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
if old == nil then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - old)
return 1
"""


class Event(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One published change (and, for cool/open/health, the stored state)."""

    kind: Literal["cool", "open", "close", "health", "reset"]
    src: str
    """The publishing instance."""
    provider: str = ""
    key: str = ""
    model: str = ""
    """cool/open/close: the upstream model of the key's lane (empty: the key itself);
    health and reset: the router's model."""
    upstream: str = ""
    """reset: only this upstream model's lane of the key(s)."""
    until: float = 0.0
    """Wall-clock time (`time.time()`) the state lasts until."""
    reason: str = ""
    """Cooling reason (cool) or health state (health)."""
    all: bool = False
    """reset: everything."""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Event).decode


def _escape(name: str) -> str:
    """A provider or key id as a lane key holds it: no `/` or `#` of its own."""
    return name.replace("%", "%25").replace("/", "%2F").replace("#", "%23")


def _glob(literal: str) -> str:
    """`literal` as a Redis SCAN MATCH pattern that matches only itself."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", literal)


class _Holder(Protocol):
    """What holds shareable failure state: a key actor, or one of its lanes."""

    cooldown: Cooldown
    breaker: CircuitBreaker
    cooling_source: Source
    breaker_source: Source


class _Target:
    """This instance's record of one shared target (a key, or a lane of a key): what it
    last knew of the target's state, to tell its own changes (published) from merged
    ones (not republished), and whether it holds the target's probe lease. The record
    belongs to one `holder`: a lane the actor dropped and made again gets a new one."""

    __slots__ = ("breaker", "cool", "holder", "lease")

    def __init__(self, holder: _Holder) -> None:
        self.holder = holder
        self.cool = -math.inf
        """The latest cooldown end known (trio clock)."""
        self.breaker: tuple[str, float] | None = None
        """The last breaker verdict known: (state, open_until)."""
        self.lease = False
        """This instance holds the half-open probe lease."""


class SharedSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Where shared state stands, for the router's snapshot."""

    instance: str
    """This router instance's id (host:pid:random)."""
    redis_url: str
    """The Redis URL, password masked."""
    key_prefix: str
    reachable: bool
    """Redis answers: state is shared. False: local-only until it returns."""
    since: float
    """Seconds since `reachable` last changed."""
    published: int
    """Events sent to the other instances."""
    received: int
    """Events received from the other instances and applied."""
    budget_fallbacks: int
    """Budget reservations decided locally because Redis did not answer in time."""


class SharedState:
    """The link of one router instance to the shared state. Built by the router."""

    def __init__(
        self,
        config: SharedConfig,
        actors: Iterable[KeyActor],
        health_of: Callable[[str], ModelHealth | None],
        models: Callable[[], Iterable[tuple[str, ModelHealth]]],
    ) -> None:
        self.config = config
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._actors: dict[tuple[str, str], KeyActor] = {
            (a.provider_name, a.key_id): a for a in actors
        }
        self._health_of = health_of
        self._models = models
        prefix = config.key_prefix
        self._prefix = prefix
        self._channel = f"{prefix}:events"
        self.reachable = False
        self._changed_at = trio.current_time()
        self._logged_down = False
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._outbox: deque[Callable[[], Awaitable[object]]] = deque()
        self._wake = trio.Event()
        self._first_check = trio.Event()
        self._seq = itertools.count()
        self.published = 0
        self.received = 0
        self.budget_fallbacks = 0
        self.tickers: list[Callable[[], None]] = []
        """Called every `ping_interval` while Redis is reachable (other modules' batched
        writes: the gateway's usage totals)."""
        # What this instance last knew of each piece of state, to tell its own changes
        # (published) from merged ones (not republished). Targets are (actor, upstream
        # model; "" for the key itself); records of lanes the actor dropped, and of
        # targets back to a closed breaker and no cooldown, are pruned by `_prober`.
        self._targets: dict[tuple[KeyActor, str], _Target] = {}
        self._health_known: dict[str, tuple[str, float]] = {}
        self.health_sources: dict[str, Source] = {}

    def set_actors(self, actors: Iterable[KeyActor]) -> None:
        """The actors this instance has now (after a reload): events about other keys
        are ignored from here on, and what was recorded of a removed key is forgotten
        (what Redis holds of it stays, for the instances that still have it)."""
        self._actors = {(a.provider_name, a.key_id): a for a in actors}
        live = set(self._actors.values())
        for target in [t for t in self._targets if t[0] not in live]:
            del self._targets[target]

    # -- clocks ----------------------------------------------------------------------

    @staticmethod
    def to_wall(local: float) -> float:
        return time.time() + (local - trio.current_time())

    @staticmethod
    def to_local(wall: float) -> float:
        return trio.current_time() + (wall - time.time())

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}:{kind}:{name}"

    def _actor_key(self, kind: str, actor: KeyActor) -> str:
        return self._key(kind, f"{actor.provider_name}/{actor.key_id}")

    def _state_key(self, kind: str, actor: KeyActor, model: str) -> str:
        """The Redis key of a target's cool, breaker or lease state."""
        if not model:
            return self._actor_key(kind, actor)
        owner = self._lane_owner(actor.provider_name, actor.key_id)
        return self._key(f"lane-{kind}", f"{owner}#{model}")

    @staticmethod
    def _lane_owner(provider: str, key_id: str) -> str:
        return f"{_escape(provider)}/{_escape(key_id)}"

    def _pattern(self, kind: str, literal: str = "") -> str:
        """A SCAN pattern: the keys of `kind` whose name starts with `literal`."""
        return _glob(self._key(kind, literal)) + "*"

    def _target(self, actor: KeyActor, model: str, holder: _Holder) -> _Target:
        """The record of (actor, model), made (or made anew for a new lane) if need be."""
        target = self._targets.get((actor, model))
        if target is None or target.holder is not holder:
            target = self._targets[actor, model] = _Target(holder)
        return target

    def _event(
        self,
        kind: Literal["cool", "open", "close"],
        actor: KeyActor,
        model: str,
        until: float | None = None,
        reason: str = "",
    ) -> Event:
        return Event(
            kind=kind,
            src=self.instance,
            provider=actor.provider_name,
            key=actor.key_id,
            model=model,
            until=0.0 if until is None else self.to_wall(until),
            reason=reason,
        )

    def _cool_event(self, actor: KeyActor, model: str, cooldown: Cooldown) -> Event:
        return self._event("cool", actor, model, cooldown.until, cooldown.reason or "rate_limit")

    # -- hooks of the request path (sync, never wait) ----------------------------------

    def cooled(self, actor: KeyActor) -> None:
        """The actor's own cooldown took a hit: publish it if it grew here."""
        self._cooled(actor, "", actor)

    def lane_cooled(self, actor: KeyActor, lane: Lane) -> None:
        """A lane of the actor took a rate-limit hit: publish it if it grew here."""
        self._cooled(actor, lane.model, lane)

    def breaker_changed(self, actor: KeyActor) -> None:
        """A verdict was fed to the actor's own breaker: publish a trip or recovery."""
        self._breaker_changed(actor, "", actor)

    def lane_breaker_changed(self, actor: KeyActor, lane: Lane) -> None:
        """A verdict was fed to a lane's own breaker: publish a trip or recovery."""
        self._breaker_changed(actor, lane.model, lane)

    def _cooled(self, actor: KeyActor, model: str, holder: _Holder) -> None:
        cooldown = holder.cooldown
        target = self._target(actor, model, holder)
        if cooldown.until <= target.cool:
            return
        target.cool = cooldown.until
        holder.cooling_source = "local"
        event = self._cool_event(actor, model, cooldown)
        self._send(self._store_max, self._state_key("cool", actor, model), event)

    def _breaker_changed(self, actor: KeyActor, model: str, holder: _Holder) -> None:
        breaker = holder.breaker
        state = breaker.state
        target = self._targets.get((actor, model))
        if target is not None and target.holder is not holder:
            target = None  # a lane made anew: nothing is known of it yet
        known = target.breaker if target is not None else None
        if state == HALF_OPEN or (known is None and state == CLOSED):
            return  # not a verdict anyone else needs
        until = breaker.open_until
        if known == (state, until):
            return
        if target is None:
            target = self._target(actor, model, holder)
        target.breaker = (state, until)
        if state == OPEN:
            holder.breaker_source = "local"
            event = self._event("open", actor, model, until)
            self._send(self._store_max, self._state_key("breaker", actor, model), event)
        elif known is not None and known[0] != CLOSED:
            holder.breaker_source = "local"
            keys = [self._state_key(kind, actor, model) for kind in ("breaker", "lease")]
            self._send(self._delete_publish, keys, self._event("close", actor, model))

    def health_changed(self, name: str, health: ModelHealth) -> None:
        """The router fed a failure to a model's health: publish it if it went down."""
        now = trio.current_time()
        state = health.state_at(now)
        if state == "healthy":
            return
        known = self._health_known.get(name)
        if known is not None and known[0] == state and health.until <= known[1]:
            return
        self._health_known[name] = (state, health.until)
        self.health_sources[name] = "local"
        event = Event(
            kind="health",
            src=self.instance,
            model=name,
            until=self.to_wall(health.until),
            reason=state,
        )
        self._send(self._store_max, self._key("health", name), event)

    def reset(
        self,
        provider: str | None,
        key_id: str | None,
        model: str | None,
        upstream: str | None = None,
    ) -> None:
        """An operator reset here: reset the other instances and the stored state too.
        With `upstream`, only that lane of the key (or of every key of the provider)."""
        event = Event(
            kind="reset",
            src=self.instance,
            provider=provider or "",
            key=key_id or "",
            model=model or "",
            upstream=(upstream or "") if provider else "",
            all=provider is None and model is None,
        )
        self._forget(event)
        self._send(self._reset_stored, event)

    def _send(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        if not self.reachable or len(self._outbox) >= _OUTBOX_MAX:
            return  # the resync on Redis's return republishes what still holds
        self._outbox.append(lambda: fn(*args))
        self._wake.set()

    # -- the shared budget (the request path's one wait) --------------------------------

    async def reserve(self, actor: KeyActor, tokens: int) -> str | bool | None:
        """Reserve one request (and `tokens`) of the actor's shared budget. Returns the
        reservation's id when admitted, False when the shared budget refuses, None when
        Redis did not answer (the local budget decides)."""
        budget = actor.budget
        if not self.reachable or budget is None:
            return None
        member = f"{self.instance}:{next(self._seq)}"
        keys = self._budget_keys(actor)
        args = [budget.rpm or 0, budget.tpm or 0, tokens, member, int(WINDOW * 1000)]
        result: Any = None
        with trio.move_on_after(self.config.budget_timeout):
            try:
                result = await self._scripts["reserve"](keys=keys, args=args)
            except Exception as exc:
                self._failed(exc)
        if result is None:
            self.budget_fallbacks += 1
            return None
        admitted, wait_ms = int(result[0]), int(result[1])
        if admitted:
            return member
        if wait_ms > 0:
            budget.hold_until(trio.current_time() + wait_ms / 1000)
        return False

    def reconcile(self, actor: KeyActor, member: str, tokens: int) -> None:
        """The provider reported the usage of a shared reservation (sync: queued)."""
        if actor.budget is not None and actor.budget.tpm is not None:
            self._send(self._reconcile, self._budget_keys(actor), member, tokens)

    # -- scripts of other modules (the gateway's tenant quotas) ---------------------------

    def key(self, kind: str, name: str) -> str:
        """A Redis key under this router's prefix."""
        return self._key(kind, name)

    async def call(
        self, source: str, keys: list[str], args: list[Any], within: float
    ) -> Any | None:
        """Run a Lua script (`source`, registered on first use) within `within` s; None
        when Redis is unreachable, slow or failing (then marked unreachable, as for any
        other operation): the caller decides locally."""
        client = self._client
        if not self.reachable or client is None:
            return None
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = client.register_script(source)
        result: Any = None
        with trio.move_on_after(within):
            try:
                result = await script(keys=keys, args=args)
            except Exception as exc:
                self._failed(exc)
        return result

    def call_later(self, source: str, keys: list[str], args: list[Any]) -> None:
        """Queue a Lua script run off the request path (dropped while Redis is down)."""
        self._send(self._call_script, source, keys, args)

    async def _call_script(self, source: str, keys: list[str], args: list[Any]) -> None:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self._client.register_script(source)
        await script(keys=keys, args=args)

    def _budget_keys(self, actor: KeyActor) -> list[str]:
        base = self._actor_key("budget", actor)
        return [f"{base}:times", f"{base}:tokens", f"{base}:held"]

    # -- Redis operations (background tasks only) ---------------------------------------

    async def _store_max(self, key: str, event: Event) -> None:
        await self._scripts["set_max"](
            keys=[key], args=[repr(event.until), _encode(event), self._channel]
        )
        self.published += 1

    async def _delete_publish(self, keys: list[str], event: Event) -> None:
        await self._scripts["delete_publish"](keys=keys, args=[self._channel, _encode(event)])
        self.published += 1

    async def _reconcile(self, keys: list[str], member: str, tokens: int) -> None:
        await self._scripts["reconcile"](keys=keys, args=[member, tokens])

    async def _reset_stored(self, event: Event) -> None:
        client = self._client
        keys: list[str] = []
        if event.all:
            for kind in _ALL_KINDS:
                keys += [k async for k in client.scan_iter(match=self._pattern(kind))]
        if event.provider:
            actors = self._matching(event)
            if event.upstream:
                for actor in actors:
                    keys += [self._state_key(k, actor, event.upstream) for k in _STATE_KINDS]
            else:
                for actor in actors:
                    keys += [self._state_key(kind, actor, "") for kind in _STATE_KINDS]
                # Every lane of the key(s), including lanes this instance never made.
                owner = (
                    f"{self._lane_owner(event.provider, event.key)}#"
                    if event.key
                    else f"{_escape(event.provider)}/"
                )
                for kind in _STATE_KINDS:
                    pattern = self._pattern(f"lane-{kind}", owner)
                    keys += [k async for k in client.scan_iter(match=pattern)]
        if event.model:
            keys.append(self._key("health", event.model))
        await self._delete_publish(keys, event)

    def _matching(self, event: Event) -> list[KeyActor]:
        """The actors a reset event is about."""
        return [
            actor
            for (p, k), actor in self._actors.items()
            if event.all or (p == event.provider and (not event.key or k == event.key))
        ]

    # -- applying what others publish -------------------------------------------------

    def _apply(self, event: Event) -> None:
        if event.src == self.instance:
            return
        self.received += 1
        if event.kind == "reset":
            self._forget(event)
            return
        if event.kind == "health":
            self._merge_health(event)
            return
        actor = self._actors.get((event.provider, event.key))
        if actor is None:
            return  # a key this instance does not have
        model = event.model
        holder: _Holder | None = actor.lane_state(model) if model else actor
        if holder is None:
            # A lane this key has not made here (or dropped): take what still holds
            # (a cooldown or a trip not yet over), through the actor, which bounds its
            # lanes; a recovery or an expired state says nothing to keep.
            if event.kind == "close" or self.to_local(event.until) <= trio.current_time():
                return
            holder = actor.lane(model)
        target = self._target(actor, model, holder)
        if event.kind == "cool":
            until = self.to_local(event.until)
            reason: Any = event.reason if event.reason in ("auth", "balance") else "rate_limit"
            if holder.cooldown.merge_until(until, reason):
                holder.cooling_source = "shared"
            target.cool = max(target.cool, until)
        elif event.kind == "open":
            breaker = holder.breaker
            if breaker.force_open(self.to_local(event.until)):
                holder.breaker_source = "shared"
            target.breaker = (breaker.state, breaker.open_until)
        elif event.kind == "close":
            breaker = holder.breaker
            if breaker.force_close():
                holder.breaker_source = "shared"
            target.breaker = (breaker.state, breaker.open_until)
            target.lease = False

    def _merge_health(self, event: Event) -> None:
        health = self._health_of(event.model)
        if health is None or event.reason not in ("cooling", "disabled"):
            return
        state: Any = event.reason
        until = self.to_local(event.until)
        if health.merge(state, until, trio.current_time()):
            self.health_sources[event.model] = "shared"
        self._health_known[event.model] = (health.state, health.until)

    def _forget(self, event: Event) -> None:
        """Apply a reset (ours or another instance's) to local state."""
        actors = set(self._matching(event))
        upstream = event.upstream
        if actors:
            if event.src != self.instance:
                for actor in actors:
                    actor.reset(upstream or None)
            for target in [
                t for t in self._targets if t[0] in actors and (not upstream or t[1] == upstream)
            ]:
                del self._targets[target]
        for name, health in list(self._models()):
            if event.all or name == event.model:
                if event.src != self.instance:
                    health.reset()
                self._health_known.pop(name, None)
                self.health_sources.pop(name, None)

    # -- the background tasks -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and load the shared state, waiting for that at most a few `timeout`s
        (the router never waits longer to open), then keep it in sync until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sessions)
            with trio.move_on_after(self.config.timeout * 4):
                await self._first_check.wait()
            task_status.started()

    async def _sessions(self) -> None:
        while True:
            try:
                await self._session()
            except* Exception as group:  # never let Redis take the router down
                self._failed(group.exceptions[0])
            self._first_check.set()
            await trio.sleep(self.config.ping_interval)

    async def _session(self) -> None:
        import coredis
        from coredis.retry import NoRetryPolicy

        cfg = self.config
        url = resolve_secret(cfg.redis_url, "router.shared.redis_url")
        client: Any = coredis.Redis.from_url(
            url,
            connect_timeout=cfg.timeout,
            stream_timeout=max(cfg.timeout, cfg.budget_timeout),
            retry_policy=NoRetryPolicy(),
            max_connections=64,
        )
        async with client:
            self._client = client
            self._scripts = {
                "set_max": client.register_script(_SET_MAX),
                "delete_publish": client.register_script(_DELETE_PUBLISH),
                "lease": client.register_script(_LEASE),
                "release": client.register_script(_RELEASE),
                "reserve": client.register_script(_RESERVE),
                "reconcile": client.register_script(_RECONCILE),
            }
            try:
                await self._check()
                self._first_check.set()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._monitor)
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._subscriber)
                    nursery.start_soon(self._prober)
            finally:
                self._client = None
                self._set_reachable(False)

    async def _check(self) -> None:
        """Ping; if Redis answers and was unreachable, resynchronise."""
        timeout = self.config.timeout
        try:
            with trio.fail_after(timeout):
                await self._client.ping()
            if not self.reachable:
                with trio.fail_after(timeout * 4):
                    await self._resync()
        except Exception as exc:  # trio.TooSlowError included
            self._failed(exc)

    async def _resync(self) -> None:
        """Load every stored piece of shared state, then republish what this instance
        holds that others may have missed, then count Redis as reachable."""
        client = self._client
        for kind in _LOADED_KINDS:
            keys = [k async for k in client.scan_iter(match=self._pattern(kind))]
            if not keys:
                continue
            for raw in await client.mget(keys):
                if raw is None:
                    continue
                try:
                    event = _decode(raw)
                except msgspec.DecodeError:
                    continue
                if event.src != self.instance:
                    self._apply(event)
                    self.received -= 1  # loaded, not an event
        now = trio.current_time()
        republish: list[tuple[str, Event]] = []
        for actor in self._actors.values():
            holders: list[tuple[str, _Holder]] = [("", actor)]
            holders += actor.lanes.items()
            for model, holder in holders:
                c = holder.cooldown
                if c.until > now and holder.cooling_source == "local":
                    key = self._state_key("cool", actor, model)
                    republish.append((key, self._cool_event(actor, model, c)))
                b = holder.breaker
                if b.state == OPEN and b.open_until > now and holder.breaker_source == "local":
                    key = self._state_key("breaker", actor, model)
                    republish.append((key, self._event("open", actor, model, b.open_until)))
        for name, health in list(self._models()):
            state = health.state_at(now)
            if state != "healthy" and self.health_sources.get(name, "local") == "local":
                republish.append(
                    (
                        self._key("health", name),
                        Event(
                            kind="health",
                            src=self.instance,
                            model=name,
                            until=self.to_wall(health.until),
                            reason=state,
                        ),
                    )
                )
        for key, event in republish:
            await self._store_max(key, event)
        self._set_reachable(True)

    async def _monitor(self) -> None:
        while True:
            await trio.sleep(self.config.ping_interval)
            await self._check()
            for tick in self.tickers:
                tick()

    async def _writer(self) -> None:
        outbox = self._outbox
        timeout = self.config.timeout
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while outbox:
                if not self.reachable:
                    outbox.clear()
                    break
                op = outbox.popleft()
                with trio.move_on_after(timeout) as scope:
                    try:
                        await op()
                    except Exception as exc:
                        self._failed(exc)
                if scope.cancelled_caught:
                    self._failed(TimeoutError(f"no answer within {timeout:g}s"))

    async def _subscriber(self) -> None:
        from coredis.retry import NoRetryPolicy

        while True:
            try:
                async with self._client.pubsub(
                    channels=[self._channel],
                    ignore_subscribe_messages=True,
                    retry_policy=NoRetryPolicy(),
                    max_idle_seconds=max(1.0, self.config.ping_interval * 4),
                ) as pubsub:
                    # Subscribed: what was published before is in the stored state.
                    if not self.reachable:
                        await self._check()
                    async for message in pubsub:
                        data = message.get("data")
                        if isinstance(data, bytes | str):
                            try:
                                event = _decode(data)
                            except msgspec.DecodeError:
                                continue
                            self._apply(event)
            except* Exception as group:  # (coredis may add errors to a cancellation)
                self._failed(group.exceptions[0])
            await trio.sleep(self.config.ping_interval)

    async def _prober(self) -> None:
        """Coordinate half-open probes: one instance probes a target (a key or a lane),
        the others wait."""
        ttl_ms = int(self.config.probe_lease * 1000)
        while True:
            await trio.sleep(_PROBE_TICK)
            if not self.reachable:
                self._drop_leases()
                continue
            due, dropped = self._due(trio.current_time())
            for actor, model in dropped:  # lanes the actor let go of while we held a lease
                await self._lease_call("release", actor, model, self.instance)
            for (actor, model), target in due:
                if self._targets.get((actor, model)) is not target:
                    continue  # reset or dropped while we waited on Redis
                breaker = target.holder.breaker
                now = trio.current_time()
                state = breaker.state
                if state == CLOSED:
                    if target.lease:
                        target.lease = False
                        await self._lease_call("release", actor, model, self.instance)
                    continue
                if state == OPEN:
                    if breaker.open_until - now > _LEASE_LEAD:
                        if target.lease:  # re-tripped: let the lease go
                            target.lease = False
                            await self._lease_call("release", actor, model, self.instance)
                        continue
                elif target.lease and not breaker.probing:
                    continue  # half-open, ours, idle: the lease runs out by itself
                left = await self._lease_call("lease", actor, model, self.instance, ttl_ms)
                if left is None:
                    continue
                if left > 0:
                    target.lease = True
                else:
                    target.lease = False
                    until = trio.current_time() + (-left) / 1000
                    if breaker.force_open(until):
                        target.holder.breaker_source = "shared"
                    target.breaker = (breaker.state, breaker.open_until)

    def _due(
        self, now: float
    ) -> tuple[list[tuple[tuple[KeyActor, str], _Target]], list[tuple[KeyActor, str]]]:
        """The targets whose breaker is not closed or whose lease we hold, and the lanes
        dropped by their actors while we held their lease. Prunes the records of lanes
        the actors dropped and of targets with nothing left to know (closed breaker, no
        cooldown, no lease), so the records stay bounded by the actors' lanes."""
        for actor in self._actors.values():
            if actor.breaker.state != CLOSED:
                self._target(actor, "", actor)
        due: list[tuple[tuple[KeyActor, str], _Target]] = []
        dropped: list[tuple[KeyActor, str]] = []
        for name, target in list(self._targets.items()):
            actor, model = name
            holder = target.holder
            if model and actor.lane_state(model) is not holder:
                del self._targets[name]
                if target.lease:
                    dropped.append(name)
            elif holder.breaker.state != CLOSED or target.lease:
                due.append((name, target))
            elif holder.cooldown.until <= now:
                del self._targets[name]
        return due, dropped

    def _drop_leases(self) -> None:
        for target in self._targets.values():
            target.lease = False

    async def _lease_call(self, name: str, actor: KeyActor, model: str, *args: Any) -> int | None:
        with trio.move_on_after(self.config.timeout):
            try:
                result = await self._scripts[name](
                    keys=[self._state_key("lease", actor, model)], args=list(args)
                )
                return int(result)
            except Exception as exc:
                self._failed(exc)
        return None

    # -- reachability -------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        if trio.current_effective_deadline() == -math.inf:
            return  # shutting down: not an outage
        if self.reachable or not self._logged_down:
            log.warning(
                "Redis at %s unreachable (%s: %s): router state is local-only until it returns",
                mask_url(self.config.redis_url),
                type(exc).__name__,
                self._scrub(str(exc)),
            )
            self._logged_down = True
        self._set_reachable(False)

    def _scrub(self, text: str) -> str:
        """A Redis client's error text with the URL's credentials hidden (the
        password, also when the URL comes from ``env:``, and any URL in it masked)."""
        raw = self.config.redis_url
        secrets = url_secrets(raw)
        with contextlib.suppress(ConfigError):
            secrets += url_secrets(resolve_secret(raw, "router.shared.redis_url"))
        return scrubber_for(secrets).scrub(mask_urls_in(text))

    def _set_reachable(self, reachable: bool) -> None:
        if reachable == self.reachable:
            return
        self.reachable = reachable
        self._changed_at = trio.current_time()
        if reachable:
            self._logged_down = False
            log.info(
                "Redis at %s reachable: router state is shared (instance %s)",
                mask_url(self.config.redis_url),
                self.instance,
            )
        else:
            self._outbox.clear()
            self._drop_leases()

    def snapshot(self) -> SharedSnapshot:
        return SharedSnapshot(
            instance=self.instance,
            redis_url=mask_url(self.config.redis_url),
            key_prefix=self._prefix,
            reachable=self.reachable,
            since=max(0.0, trio.current_time() - self._changed_at),
            published=self.published,
            received=self.received,
            budget_fallbacks=self.budget_fallbacks,
        )
