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

- Key cooldowns: an absolute wall-clock "until" per key, kept as a key that expires
  then and written by a Lua script only if it is later than the stored one (merged by
  maximum: nobody shortens another's cooldown), and published. Receivers merge it with
  `Cooldown.merge_until`.
- Breaker trips and recoveries of each key's own breaker (per-tenant breakers stay
  local): a trip publishes the open time's end (kept as a key until then); receivers
  `CircuitBreaker.force_open(until)`. A recovery (close) deletes the key and publishes;
  receivers `force_close()`. Half-open probing is coordinated by a lease per key (SET NX
  PX with this instance's id): shortly before a key's open time ends, each instance
  asks for the lease; the winner goes half-open and probes (renewing the lease while a
  probe is in flight), the others stay open until the lease runs out or the winner's
  verdict (close, or a re-trip) arrives.
- Model health (cooling, disabled): like cooldowns, merged by the later end.
- RPM/TPM budgets: a Lua script per reservation over a sorted set of reservation times
  (Redis's own clock, so hosts need no synchronised clocks) plus a token hash and a held
  token counter, all with expiry: at most `rpm` reservations and `tpm` tokens per 60 s
  across all instances. This is the one Redis call on the request path, bounded by
  `budget_timeout`; on timeout or error the key's local budget alone decides. A refusal
  for a full request window tells the local budget to admit nothing until the oldest
  shared reservation leaves the window (`RateBudget.hold_until`).

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

import itertools
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec
import trio

from ._breaker import CLOSED, HALF_OPEN, OPEN
from ._budget import WINDOW
from ._config import SharedConfig, mask_url, resolve_secret
from ._health import ModelHealth

if TYPE_CHECKING:
    from ._actor import KeyActor

__all__ = ["SharedSnapshot", "SharedState", "Source"]

log = logging.getLogger("router.shared")

Source = Literal["local", "shared"]

_OUTBOX_MAX: Final = 10_000
_PROBE_TICK: Final = 0.05
"""How often open and half-open breakers are checked for the probe lease."""
_LEASE_LEAD: Final = 0.15
"""Seconds before an open time ends that the probe lease is asked for."""

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

# KEYS: the reservation times (sorted set), their tokens (hash), the tokens held.
# ARGV: rpm (0: none), tpm (0: none), tokens, member, window ms.
# Returns {1, 0} when admitted, {0, ms until the window has a free request} or {0, 0}.
_RESERVE: Final = """
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
    until: float = 0.0
    """Wall-clock time (`time.time()`) the state lasts until."""
    reason: str = ""
    """Cooling reason (cool) or health state (health)."""
    all: bool = False
    """reset: everything."""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Event).decode


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
        # What this instance last knew of each piece of state, to tell its own changes
        # (published) from merged ones (not republished).
        self._cool_known: dict[KeyActor, float] = {}
        self._breaker_known: dict[KeyActor, tuple[str, float]] = {}
        self._health_known: dict[str, tuple[str, float]] = {}
        self.health_sources: dict[str, Source] = {}
        self._leases: set[KeyActor] = set()

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

    # -- hooks of the request path (sync, never wait) ----------------------------------

    def cooled(self, actor: KeyActor) -> None:
        """The actor's cooldown took a hit: publish it if it grew here."""
        cooldown = actor.cooldown
        if cooldown.until <= self._cool_known.get(actor, -math.inf):
            return
        self._cool_known[actor] = cooldown.until
        actor.cooling_source = "local"
        event = Event(
            kind="cool",
            src=self.instance,
            provider=actor.provider_name,
            key=actor.key_id,
            until=self.to_wall(cooldown.until),
            reason=cooldown.reason or "rate_limit",
        )
        self._send(self._store_max, self._actor_key("cool", actor), event)

    def breaker_changed(self, actor: KeyActor) -> None:
        """A verdict was fed to the actor's own breaker: publish a trip or recovery."""
        breaker = actor.breaker
        state, until = breaker.state, breaker.open_until
        known = self._breaker_known.get(actor)
        if known is not None and known == (state, until):
            return
        if state == HALF_OPEN:
            return  # not a verdict anyone else needs
        self._breaker_known[actor] = (state, until)
        if state == OPEN:
            actor.breaker_source = "local"
            event = Event(
                kind="open",
                src=self.instance,
                provider=actor.provider_name,
                key=actor.key_id,
                until=self.to_wall(until),
            )
            self._send(self._store_max, self._actor_key("breaker", actor), event)
        elif known is not None and known[0] != CLOSED:
            actor.breaker_source = "local"
            event = Event(
                kind="close", src=self.instance, provider=actor.provider_name, key=actor.key_id
            )
            keys = [self._actor_key("breaker", actor), self._actor_key("lease", actor)]
            self._send(self._delete_publish, keys, event)

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

    def reset(self, provider: str | None, key_id: str | None, model: str | None) -> None:
        """An operator reset here: reset the other instances and the stored state too."""
        event = Event(
            kind="reset",
            src=self.instance,
            provider=provider or "",
            key=key_id or "",
            model=model or "",
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
            for kind in ("cool", "breaker", "lease", "health"):
                keys += [k async for k in client.scan_iter(match=self._key(kind, "*"))]
        if event.provider:
            for (p, k), actor in self._actors.items():
                if p == event.provider and (not event.key or k == event.key):
                    keys += [self._actor_key(kind, actor) for kind in ("cool", "breaker", "lease")]
        if event.model:
            keys.append(self._key("health", event.model))
        await self._delete_publish(keys, event)

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
        if event.kind == "cool":
            until = self.to_local(event.until)
            reason: Any = event.reason if event.reason in ("auth", "balance") else "rate_limit"
            if actor.cooldown.merge_until(until, reason):
                actor.cooling_source = "shared"
            self._cool_known[actor] = max(self._cool_known.get(actor, -math.inf), until)
        elif event.kind == "open":
            breaker = actor.breaker
            if breaker.force_open(self.to_local(event.until)):
                actor.breaker_source = "shared"
            self._breaker_known[actor] = (breaker.state, breaker.open_until)
        elif event.kind == "close":
            breaker = actor.breaker
            if breaker.force_close():
                actor.breaker_source = "shared"
            self._breaker_known[actor] = (breaker.state, breaker.open_until)
            self._leases.discard(actor)

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
        for (p, k), actor in self._actors.items():
            if event.all or (p == event.provider and (not event.key or k == event.key)):
                if event.src != self.instance:
                    actor.reset()
                self._cool_known.pop(actor, None)
                self._breaker_known.pop(actor, None)
                self._leases.discard(actor)
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
        for kind in ("cool", "breaker", "health"):
            keys = [k async for k in client.scan_iter(match=self._key(kind, "*"))]
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
            c = actor.cooldown
            if c.until > now and actor.cooling_source == "local":
                republish.append(
                    (
                        self._actor_key("cool", actor),
                        Event(
                            kind="cool",
                            src=self.instance,
                            provider=actor.provider_name,
                            key=actor.key_id,
                            until=self.to_wall(c.until),
                            reason=c.reason or "rate_limit",
                        ),
                    )
                )
            b = actor.breaker
            if b.state == OPEN and b.open_until > now and actor.breaker_source == "local":
                republish.append(
                    (
                        self._actor_key("breaker", actor),
                        Event(
                            kind="open",
                            src=self.instance,
                            provider=actor.provider_name,
                            key=actor.key_id,
                            until=self.to_wall(b.open_until),
                        ),
                    )
                )
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
        """Coordinate half-open probes: one instance probes a key, the others wait."""
        ttl_ms = int(self.config.probe_lease * 1000)
        while True:
            await trio.sleep(_PROBE_TICK)
            if not self.reachable:
                self._leases.clear()
                continue
            for actor in self._actors.values():
                breaker = actor.breaker
                now = trio.current_time()
                state = breaker.state
                if state == CLOSED:
                    if actor in self._leases:
                        self._leases.discard(actor)
                        await self._lease_call("release", actor, self.instance)
                    continue
                if state == OPEN:
                    if breaker.open_until - now > _LEASE_LEAD:
                        if actor in self._leases:  # re-tripped: let the lease go
                            self._leases.discard(actor)
                            await self._lease_call("release", actor, self.instance)
                        continue
                elif actor in self._leases and not breaker.probing:
                    continue  # half-open, ours, idle: the lease runs out by itself
                left = await self._lease_call("lease", actor, self.instance, ttl_ms)
                if left is None:
                    continue
                if left > 0:
                    self._leases.add(actor)
                else:
                    self._leases.discard(actor)
                    until = trio.current_time() + (-left) / 1000
                    if breaker.force_open(until):
                        actor.breaker_source = "shared"
                    self._breaker_known[actor] = (breaker.state, breaker.open_until)

    async def _lease_call(self, name: str, actor: KeyActor, *args: Any) -> int | None:
        with trio.move_on_after(self.config.timeout):
            try:
                result = await self._scripts[name](
                    keys=[self._actor_key("lease", actor)], args=list(args)
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
                exc,
            )
            self._logged_down = True
        self._set_reachable(False)

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
            self._leases.clear()

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
