"""The router: the supervisor that walks the model chain over the key actors.

`Router.open(config, providers=...)` starts one `KeyActor` task per (provider, key)
in a nursery and yields the router; leaving the block stops them all. `submit()`
builds the request's chain, and for each model picks a key actor and hands it a job,
then carries out the failure table's step for the outcome (`router._failover`):
return, propagate, try the next key of the same model, advance to the next model, or
route an upstream context-length error to its `context_window_fallbacks` target. It
also owns per-model health (disabled models), which only it writes; a model's cooling
is derived from its keys and lanes.

`reload(config)` applies a new config to the running router: what a config determines
is set in one synchronous step (`_configure`), a request reads it once at its start and
its chain keeps that config's providers and key actors to its end; unchanged keys keep
their actors (and so all their state), removed ones drain (`KeyActor.drain`).

What this module must never do: count the caller's cancellation or its deadline as a
provider failure, leave a task running after `Router.open` exits, or let a request end
in anything but exactly one response or one `RouterError`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import msgspec
import trio

from ._actor import DEADLINE, SKIPPED, Job, JobResult, KeyActor
from ._chain import ModelChain, Route
from ._config import KeyConfig, ProviderConfig, RouterConfig, RouterSettings, resolve_secret
from ._errors import (
    ChainExhaustedError,
    ConfigError,
    ContextWindowError,
    DeadlineExceededError,
    InvalidRequestError,
    ProviderError,
    RouterClosedError,
    RouterError,
)
from ._failover import CONTEXT_FALLBACK, NEXT_KEY, PROPAGATE
from ._health import ModelHealth
from ._lane import Lane
from ._params import check as check_params
from ._provider import Provider
from ._shared import SharedSnapshot, SharedState
from ._simulated import SimulatedProvider
from ._stream import ChatStream, Continuation, Segment, StreamStart
from ._tokens import (
    CascadingTokenCounter,
    ExactTokenCounter,
    OfflineTokenCounter,
    TokenCounter,
    get_encoding,
)
from ._types import (
    ApiKey,
    Attempt,
    AudioPart,
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    FilePart,
    ImagePart,
    Message,
    TextPart,
    Tool,
    Usage,
)
from ._usage import PriceBook, UsageLedger, UsageSnapshot, load_table, needs_table

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from ._otel import Tracing

__all__ = [
    "KeySnapshot",
    "LaneSnapshot",
    "ModelSnapshot",
    "ReloadResult",
    "Router",
    "RouterSnapshot",
]

log = logging.getLogger("router")


class LaneSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The state of one upstream model on one key (a lane) at the snapshot's time."""

    model: str
    """The upstream model id."""
    breaker: str
    """closed, open or half_open (the lane's own breaker, not a tenant's)."""
    breaker_open_for: float
    """Seconds until an open breaker lets a probe through (0 otherwise)."""
    cooling_for: float
    """Seconds of rate-limit cooldown left (0 when the lane is not cooling)."""
    rate_limit_hits: int
    """Rate-limit hits since the lane's last success (the backoff's exponent)."""
    requests: int
    successes: int
    failures: int
    opens: int
    """Times the lane's breakers have opened, ever."""
    latency: float
    """Moving average of successful attempts' durations, seconds (0: none yet)."""
    tenant_breakers: dict[str, str]
    """Per-tenant breaker states, when per-tenant breakers are on."""
    cooling_source: str | None = None
    """While cooling: ``local`` or ``shared``."""
    breaker_source: str | None = None
    """While the breaker is not closed: ``local`` or ``shared``."""


class KeySnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The state of one (provider, key) pair at the snapshot's time: the key's own
    state (what stops every model of the key) and one `LaneSnapshot` per upstream
    model the key has served (what stops one model)."""

    provider: str
    key_id: str
    breaker: str
    """closed, open or half_open: the key's own breaker (auth and connection failures)."""
    breaker_open_for: float
    """Seconds until an open breaker lets a probe through (0 otherwise)."""
    cooling_for: float
    """Seconds of the key's own cooldown left (0 when the key is not cooling)."""
    cooling_reason: str | None
    """auth or balance while the key cools (a rate limit cools a lane)."""
    in_flight: int
    """Attempts being sent upstream now."""
    queued: int
    """Jobs waiting for a concurrency slot."""
    max_concurrency: int
    requests: int
    """Upstream attempts sent, ever."""
    successes: int
    failures: int
    opens: int
    """Times the key's own breaker has opened, ever."""
    lanes: list[LaneSnapshot]
    """One per upstream model the key has served (at most `lanes_per_key`)."""
    rpm_remaining: int | None = None
    """Requests left in the key's current 60 s window (None: no RPM budget). With shared
    state, this instance's own view: the shared window is in Redis."""
    tpm_remaining: int | None = None
    """Tokens left in the key's current 60 s window (None: no TPM budget)."""
    cooling_source: str | None = None
    """While cooling: ``local`` (learned here) or ``shared`` (from another instance)."""
    breaker_source: str | None = None
    """While the breaker is not closed: ``local`` or ``shared`` (tripped elsewhere, or
    held open while another instance probes)."""
    budget_source: str | None = None
    """With a budget: ``shared`` (reserved in Redis as well) or ``local`` (this process
    alone, or Redis unreachable)."""


class ModelSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The health of one model (a configured alias or a `provider/upstream` name)."""

    name: str
    provider: str
    upstream: str
    health: str
    """healthy, cooling or disabled."""
    remaining: float
    """Seconds until a cooling or disabled model is callable again."""
    source: str | None = None
    """While cooling or disabled: ``local`` or ``shared``."""


class RouterSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    time: float
    """The router clock's time when the snapshot was taken."""
    keys: list[KeySnapshot]
    models: list[ModelSnapshot]
    shared: SharedSnapshot | None = None
    """Shared state through Redis (None when `[router.shared]` is not configured)."""


class ReloadResult(msgspec.Struct, frozen=True, kw_only=True):
    """What `Router.reload` changed. Keys are named ``provider/key_id`` (never a secret)."""

    keys_added: list[str]
    """Keys that got a new actor (new keys, and keys whose settings or secret changed)."""
    keys_removed: list[str]
    """Keys whose actor drains (removed keys, and the old actors of changed ones)."""
    keys_kept: list[str]
    """Keys that kept their actor and its state."""
    models_added: list[str]
    models_removed: list[str]
    providers_replaced: list[str]
    """Providers whose connection settings changed: a new instance, new actors."""
    settings_changed: list[str]
    """`[router]` settings that changed (live)."""


_RESTART_ONLY: Final = (
    "shared",
    "seed",
    "breaker",
    "cooldown",
    "health",
    "lanes_per_key",
    "per_tenant_breakers",
    "attempt_timeout",
    "tokens",
    "tracing",
)
"""`[router]` settings a reload may not change: the state keys keep was shaped by them
(breakers, cooldowns, lanes; attempt timers queue in the order of one fixed timeout), or
they are wired in at open (`shared`, `seed`, the exact token counter, the tracer)."""


class _Plan:
    """A reload worked out before anything changes: the new runtimes, and which actors
    are kept and which start."""

    __slots__ = ("custom", "kept", "replaced", "runtimes", "started", "windows_needed")

    def __init__(self) -> None:
        self.runtimes: dict[str, _ProviderRuntime] = {}
        self.kept: list[KeyActor] = []
        self.started: list[KeyActor] = []
        self.replaced: list[str] = []
        self.custom: dict[str, Provider] = {}
        self.windows_needed = False


class _Walk:
    """Where one request's walk along its chain stands, for `alternatives`: asked by
    the key actor only after a failure (see `router._failover.Situation.alternatives`),
    could another key of the current model, or a later model, take the request now?
    An object, not a closure over the walk's variables: every request in flight keeps
    it alive, and the closure and its cells cost three times as much."""

    __slots__ = ("current", "position", "router", "routes", "tenant", "tokens")

    def __init__(
        self,
        router: Router,
        routes: list[Route[_ProviderRuntime]],
        tenant: str | None,
        tokens: int,
    ) -> None:
        self.router = router
        self.routes = routes
        self.tenant = tenant
        self.tokens = tokens
        self.position = 0
        self.current: KeyActor | None = None

    def alternatives(self, same_model: bool, later: bool) -> bool:
        router, routes, tenant, tokens = self.router, self.routes, self.tenant, self.tokens
        at = router._clock.current_time()
        here = routes[self.position]
        if same_model:
            for a in here.provider.actors:
                if a is not self.current and a.is_available(at, tenant, tokens, here.upstream):
                    return True
        if later:
            for r in routes[self.position + 1 :]:
                h = router._health.get(r.name)
                if h is not None and not h.is_callable(at):
                    continue
                for a in r.provider.actors:
                    if a.is_available(at, tenant, tokens, r.upstream):
                        return True
        return False


class _ProviderRuntime:
    """A provider's key actors in their configured order, plus balancing state."""

    __slots__ = ("actors", "config", "kind", "name", "next_index", "provider")

    def __init__(self, config: ProviderConfig, provider: Provider, actors: list[KeyActor]) -> None:
        self.name = config.name
        self.kind = config.kind
        self.config = config
        self.provider = provider
        self.actors = actors
        self.next_index = 0


class Router:
    """Routes chat requests across providers, keys and models. Make one with
    `Router.open(...)`; see the module docstring."""

    def __init__(
        self, config: RouterConfig, runtimes: dict[str, _ProviderRuntime], rng: random.Random
    ) -> None:
        self._configure(config, runtimes)
        self._health: dict[str, ModelHealth] = {}
        """Configured models' health, and that of `provider/upstream` names seen (at most
        `adhoc_models` of those, least recently marked first out)."""
        self._adhoc: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._rng = rng
        self._open = False
        self._tracing: Tracing | None = None
        """Traces of requests (`router._otel`); None: tracing is off."""
        self._clock: trio.abc.Clock = trio.lowlevel.current_clock()
        for m in config.models:
            self._health_of(m.name)
        self._nursery: trio.Nursery | None = None
        """Where the actors run (set by `open`); a reload starts new ones there."""
        self._custom: dict[str, Provider] = {}
        """The custom provider instances given to `open` or `reload`."""
        self._instances: dict[int, Provider] = {
            id(rt.provider): rt.provider for rt in runtimes.values()
        }
        """Every provider instance not yet closed (a reload's retired ones included)."""
        self._reloading: trio.Lock | None = None
        self.draining: set[KeyActor] = set()
        """Actors of keys a reload removed whose in-flight jobs are still running."""
        self._shared: SharedState | None = None
        if config.router.shared is not None:
            self._shared = SharedState(
                config.router.shared,
                [a for rt in runtimes.values() for a in rt.actors],
                self._known_health,
                lambda: self._health.items(),
            )
            for rt in runtimes.values():
                for a in rt.actors:
                    a.shared = self._shared
        self.ledger = UsageLedger(time.time())
        """Tokens and cost per model, provider, key and tenant since the router opened."""
        self._offline_counter = OfflineTokenCounter()
        self._exact_counter: TokenCounter | None = None
        tokens = config.router.tokens
        if tokens.exact_provider is not None:
            self._exact_counter = CascadingTokenCounter(
                ExactTokenCounter(self._count_exactly), self._offline_counter
            )

    def _configure(self, config: RouterConfig, runtimes: dict[str, _ProviderRuntime]) -> None:
        """Set what `config` determines, all at once (no await: a request sees one
        config or the other). A request reads it once at its start; its chain holds the
        runtimes (and so the key actors) of that config to its end."""
        self.config = config
        self._settings = config.router
        self._runtimes = runtimes
        self._chain: ModelChain[_ProviderRuntime] = ModelChain(config, runtimes)
        self._configured = {m.name for m in config.models}
        self._strategy = config.router.balancing
        self.prices = PriceBook(config)
        """Prices of the models (`cost_usd` on answers; see `router._usage`)."""
        self._any_windows = any(m.context_window for m in config.models)
        self._any_embedding = any(m.mode == "embedding" for m in config.models)
        self._any_tpm = any(
            a.budget is not None and a.budget.tpm is not None
            for rt in runtimes.values()
            for a in rt.actors
        )

    def __repr__(self) -> str:
        keys = sum(len(r.actors) for r in self._runtimes.values())
        return f"<Router providers={len(self._runtimes)} keys={keys} open={self._open}>"

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: RouterConfig,
        providers: Mapping[str, Provider] | None = None,
        *,
        tracer_provider: TracerProvider | None = None,
    ) -> AsyncIterator[Router]:
        """Start the router: one actor task per (provider, key), stopped on exit.

        `providers` maps the names of ``kind = "custom"`` providers to instances.
        `tracer_provider`: trace every request into this OpenTelemetry provider (else
        `[router.tracing]` decides; see `router._otel`).
        """
        if not isinstance(config, RouterConfig):
            raise ConfigError("<root>", f"expected RouterConfig, got {type(config).__name__}")
        supplied = dict(providers or {})
        rng = random.Random(config.router.seed)
        custom = dict(supplied)
        runtimes: dict[str, _ProviderRuntime] = {}
        for i, pc in enumerate(config.providers):
            instance = _provider_instance(i, pc, supplied)
            actors = []
            for j, kc in enumerate(pc.keys):
                secret = resolve_secret(kc.secret, f"providers[{i}].keys[{j}].secret")
                actors.append(_key_actor(pc, kc, secret, instance, config.router, rng))
            runtimes[pc.name] = _ProviderRuntime(pc, instance, actors)
        if supplied:
            name = next(iter(supplied))
            raise ConfigError(f"providers[{name!r}]", f"no [[providers]] entry named {name!r}")
        router = cls(config, runtimes, rng)
        router._custom = custom
        if router._any_windows or router._any_tpm:
            # Load the tiktoken encoding once, off the event loop, before any request.
            await trio.to_thread.run_sync(get_encoding)
        if needs_table(config):  # the price table, likewise (about a second)
            await trio.to_thread.run_sync(load_table)
        body_error: BaseException | None = None
        try:
            tracing = config.router.tracing
            if tracer_provider is not None or (tracing is not None and tracing.enabled):
                router._tracing = _open_tracing(router, tracer_provider)
            async with trio.open_nursery() as nursery:
                for rt in runtimes.values():
                    for actor in rt.actors:
                        await nursery.start(actor.run)
                if router._shared is not None:
                    await nursery.start(router._shared.run)
                router._nursery = nursery
                router._open = True
                try:
                    yield router
                except BaseException as exc:
                    # Re-raised below, outside the nursery, so that an error in the
                    # caller's block reaches it as itself, not inside an ExceptionGroup.
                    body_error = exc
                finally:
                    router._open = False
                    router._nursery = None
                    nursery.cancel_scope.cancel()
            if body_error is not None:
                raise body_error
        finally:
            with trio.CancelScope(shield=True):
                for instance in router._instances.values():
                    aclose = getattr(instance, "aclose", None)
                    if aclose is not None:
                        await aclose()
                if router._tracing is not None:
                    await router._tracing.aclose()

    # -- live reload --------------------------------------------------------------------

    async def reload(
        self, config: RouterConfig, providers: Mapping[str, Provider] | None = None
    ) -> ReloadResult:
        """Apply a new config to the running router, without dropping a request.

        Requests already under way finish on the config they started with (their
        chain keeps that config's providers and keys), except that a removed key takes
        no new attempt. A key whose provider name, id, secret and budget-relevant
        settings (max_concurrency, rpm, tpm, `simulate`) are unchanged keeps its actor:
        its breakers, cooldowns, lanes and budget, and its shared-state registration.
        A model whose provider and upstream are unchanged keeps its health. A provider
        whose connection settings changed (kind, base_url, headers, `simulate`, seed)
        gets a new instance, and all its keys new actors. Removed keys drain: no new
        attempt goes to them, the running ones finish, then their tasks end (and a
        retired provider instance is closed). New keys start at once.

        Router settings change live, except those that shape the state keys keep
        (`breaker`, `cooldown`, `health`, `lanes_per_key`, `per_tenant_breakers`,
        `attempt_timeout`) and `shared` and `seed`: changing those is a `ConfigError`
        (they need a restart). Anything wrong (those, an unset ``env:`` secret, a custom
        provider without its instance) raises `ConfigError` and nothing changes.
        `providers`: instances of new or replaced ``kind = "custom"`` providers (a
        custom provider already running keeps its instance).
        """
        if not isinstance(config, RouterConfig):
            raise ConfigError("<root>", f"expected RouterConfig, got {type(config).__name__}")
        nursery = self._nursery
        if not self._open or nursery is None:
            raise RouterClosedError()
        if self._reloading is None:
            self._reloading = trio.Lock()
        async with self._reloading:
            plan = self._plan(config, dict(providers or {}))
            if plan.windows_needed and not (self._any_windows or self._any_tpm):
                await trio.to_thread.run_sync(get_encoding)
            if needs_table(config):  # loaded once per process; a no-op when it is
                await trio.to_thread.run_sync(load_table)
            for actor in plan.started:
                await nursery.start(actor.run)
            if self._nursery is not nursery:  # closed meanwhile
                raise RouterClosedError()
            return self._switch(config, plan, nursery)

    def _plan(self, config: RouterConfig, supplied: dict[str, Provider]) -> _Plan:
        """What `config` keeps, starts and retires; raises `ConfigError` having changed
        nothing."""
        old = self.config.router
        new = config.router
        for field in _RESTART_ONLY:
            if getattr(old, field) != getattr(new, field):
                raise ConfigError(
                    f"router.{field}",
                    "cannot change while the router runs (keys keep the state it shapes); "
                    "restart to change it",
                )
        old_rts = self._runtimes
        plan = _Plan()
        for i, pc in enumerate(config.providers):
            previous = old_rts.get(pc.name)
            given = supplied.get(pc.name)
            if pc.kind == "custom" and given is None:
                if previous is not None and previous.kind == "custom":
                    given = previous.provider
                else:
                    given = self._custom.get(pc.name)
                if given is not None:
                    supplied[pc.name] = given
            same = (
                previous is not None
                and _instance_settings(previous.config) == _instance_settings(pc)
                and (pc.kind != "custom" or given is previous.provider)
            )
            if same:
                assert previous is not None
                supplied.pop(pc.name, None)
                instance = previous.provider
            else:
                instance = _provider_instance(i, pc, supplied)
                if previous is not None:
                    plan.replaced.append(pc.name)
            kept_by_id: dict[str, KeyActor] = {}
            if same:
                assert previous is not None
                old_keys = {k.id: k for k in previous.config.keys}
                for a in previous.actors:
                    kept_by_id[a.key_id] = a
            actors = []
            for j, kc in enumerate(pc.keys):
                secret = resolve_secret(kc.secret, f"providers[{i}].keys[{j}].secret")
                actor = kept_by_id.get(kc.id)
                if (
                    actor is not None
                    and previous is not None
                    and actor.key.secret == secret
                    and _key_settings(previous.config, old_keys[kc.id]) == _key_settings(pc, kc)
                ):
                    plan.kept.append(actor)
                else:
                    actor = _key_actor(pc, kc, secret, instance, new, self._rng)
                    plan.started.append(actor)
                actors.append(actor)
            rt = _ProviderRuntime(pc, instance, actors)
            if previous is not None:
                rt.next_index = previous.next_index % len(actors)
            plan.runtimes[pc.name] = rt
        if supplied:
            name = next(iter(supplied))
            raise ConfigError(f"providers[{name!r}]", f"no [[providers]] entry named {name!r}")
        plan.custom = {n: rt.provider for n, rt in plan.runtimes.items() if rt.kind == "custom"}
        plan.windows_needed = any(m.context_window for m in config.models) or any(
            a.budget is not None and a.budget.tpm is not None for a in plan.started
        )
        return plan

    def _switch(self, config: RouterConfig, plan: _Plan, nursery: trio.Nursery) -> ReloadResult:
        """Swap to `config` (synchronous: no request sees half of it), then drain what it
        removed in the background."""
        old_config = self.config
        old_rts = self._runtimes
        kept = set(plan.kept)
        removed = [a for rt in old_rts.values() for a in rt.actors if a not in kept]
        live = {id(rt.provider): rt.provider for rt in plan.runtimes.values()}
        retired = {
            id(rt.provider): rt.provider for rt in old_rts.values() if id(rt.provider) not in live
        }
        for actor in plan.kept:
            actor.settings = config.router
        shared = self._shared
        if shared is not None:
            for actor in plan.started:
                actor.shared = shared
            shared.set_actors(a for rt in plan.runtimes.values() for a in rt.actors)
        for rt in plan.runtimes.values():
            configure_keys = getattr(rt.provider, "configure_keys", None)
            if configure_keys is not None and id(rt.provider) not in retired:
                configure_keys(rt.config)
        self._instances.update(live)
        self._custom.update(plan.custom)
        self._configure(config, plan.runtimes)
        # Health: a model routed to the same place keeps it; others start healthy.
        old_models = {m.name: (m.provider, m.upstream) for m in old_config.models}
        new_models = {m.name: (m.provider, m.upstream) for m in config.models}
        health: dict[str, ModelHealth] = {}
        for name, where in new_models.items():
            previous = self._health.get(name)
            if (
                previous is not None
                and old_models.get(name) == where
                and where[0] not in plan.replaced
            ):
                health[name] = previous
        for name in list(self._adhoc):
            prov = name.partition("/")[0]
            if name in new_models or prov not in plan.runtimes or prov in plan.replaced:
                del self._adhoc[name]
            else:
                health[name] = self._health[name]
        self._health = health
        for name in new_models:
            self._health_of(name)
        tokens = config.router.tokens
        if tokens.exact_provider is None:
            self._exact_counter = None
        elif self._exact_counter is None:
            self._exact_counter = CascadingTokenCounter(
                ExactTokenCounter(self._count_exactly), self._offline_counter
            )
        for actor in removed:
            actor.draining = True  # from now on no attempt goes to it
            self.draining.add(actor)
        keep_ids = {(a.provider_name, a.key_id) for rt in plan.runtimes.values() for a in rt.actors}
        nursery.start_soon(self._retire, removed, list(retired.values()), keep_ids)
        result = ReloadResult(
            keys_added=sorted(_key_name(a) for a in plan.started),
            keys_removed=sorted(_key_name(a) for a in removed),
            keys_kept=sorted(_key_name(a) for a in plan.kept),
            models_added=sorted(set(new_models) - set(old_models)),
            models_removed=sorted(set(old_models) - set(new_models)),
            providers_replaced=sorted(plan.replaced),
            settings_changed=sorted(
                f
                for f in msgspec.structs.asdict(config.router)
                if getattr(config.router, f) != getattr(old_config.router, f)
            ),
        )
        log.info(
            "router reloaded: keys +%d -%d =%d, models +%d -%d",
            len(result.keys_added),
            len(result.keys_removed),
            len(result.keys_kept),
            len(result.models_added),
            len(result.models_removed),
        )
        return result

    async def _retire(
        self, actors: list[KeyActor], instances: list[Provider], keep: set[tuple[str, str]]
    ) -> None:
        """Drain the actors a reload removed, then close what only they used: retired
        provider instances, and the connections of keys no longer configured."""
        async with trio.open_nursery() as nursery:
            for actor in actors:
                nursery.start_soon(self._drain_one, actor)
        closing = []
        for actor in actors:
            close_key = getattr(actor.provider, "close_key", None)
            if (
                close_key is not None
                and (actor.provider_name, actor.key_id) not in keep
                and all(actor.provider is not i for i in instances)
            ):
                closing.append(functools.partial(close_key, actor.key_id))
        for instance in instances:
            self._instances.pop(id(instance), None)
            aclose = getattr(instance, "aclose", None)
            if aclose is not None:
                closing.append(aclose)
        for close in closing:
            try:
                await close()
            except Exception:  # a failed close costs its connections, never the router
                log.exception("closing a retired key's or provider's connections failed")

    async def _drain_one(self, actor: KeyActor) -> None:
        await actor.drain()
        self.draining.discard(actor)
        if self._shared is not None:  # forget what its last jobs recorded
            self._shared.set_actors(a for rt in self._runtimes.values() for a in rt.actors)

    # -- the request path -------------------------------------------------------------------

    async def submit(self, request: ChatRequest) -> ChatResponse:
        """Serve `request` along its model chain; returns the response or raises one
        `RouterError` (see `router._errors` for the tree)."""
        if self._tracing is not None:
            return await self._tracing.submit(self._route, request)
        result = await self._route(request, False)
        assert type(result) is ChatResponse
        return result

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatStream]:
        """Serve `request` as a stream::

            async with router.stream(request) as stream:
                async for chunk in stream:
                    print(chunk.text, end="")

        Failover (next key, next model) happens until the first content chunk; the
        first-token timeout bounds that wait per attempt, and the request's deadline
        bounds the whole of it. After the first chunk, a pause longer than
        `idle_timeout` or any upstream failure raises `StreamInterruptedError` with
        the text received so far. Leaving the block closes the upstream stream.
        """
        if self._tracing is not None:
            async with self._tracing.stream(self._route, request) as traced:
                yield traced
            return
        start = await self._route(request, True)
        assert isinstance(start, ChatStream)
        try:
            yield start
        finally:
            await start.aclose()

    async def _route(self, request: ChatRequest, stream: bool) -> ChatResponse | ChatStream:
        if not self._open:
            raise RouterClosedError()
        _check_request(request)
        settings = self._settings
        clock = self._clock
        now = origin = clock.current_time()
        timeout = request.timeout if request.timeout is not None else settings.timeout
        deadline = now + timeout
        if stream and request.n is not None and request.n > 1:
            raise InvalidRequestError("n", "n > 1 cannot be streamed: ask for one choice")
        if len(request.fallbacks) > settings.max_chain:
            raise InvalidRequestError(
                "fallbacks",
                f"{len(request.fallbacks)} fallbacks; a chain holds at most "
                f"max_chain = {settings.max_chain} models",
            )
        chain = self._chain.build(request.model, request.fallbacks, settings.max_chain)
        if self._any_embedding:
            chain = _of_mode(chain, "chat")
        max_attempts = settings.max_attempts
        drop_default = settings.drop_params
        tenant = request.tenant
        tokens = 0
        if self._any_windows or self._any_tpm:
            prompt = await self._prompt_tokens(chain[0], request)
            if self._any_windows:
                chain = self._fit_context(chain, prompt, request.max_tokens or 0)
            if request.max_tokens is not None:
                tokens = prompt + request.max_tokens
            else:
                tokens = prompt + settings.tokens.completion_estimate
            now = clock.current_time()
        attempts: list[Attempt] = []
        last_error: RouterError | None = None
        routes = list(chain)
        walk = _Walk(self, routes, tenant, tokens)
        index = 0
        while index < len(routes):
            route = routes[index]
            walk.position = index
            index += 1
            health = self._health.get(route.name)
            if health is not None and not health.is_callable(now):
                continue
            upstream = route.upstream
            upstream_request = msgspec.structs.replace(request, model=upstream)
            drop = request.drop_params
            if drop is None:
                drop = route.drop_params if route.drop_params is not None else drop_default
            try:
                upstream_request, dropped = check_params(
                    upstream_request, route.provider.kind, route.name, drop
                )
            except InvalidRequestError as exc:
                if route is chain[0]:
                    raise  # the model asked for cannot honour the request: 400
                last_error = last_error or exc
                continue  # a fallback that cannot honour it is skipped, never used
            for actor in self._key_order(route.provider, tenant):
                now = clock.current_time()
                if now >= deadline:
                    raise DeadlineExceededError(timeout, attempts)
                if len(attempts) >= max_attempts:
                    raise ChainExhaustedError(
                        len({a.model for a in attempts}),
                        attempts,
                        last_error,
                        None,
                        chain_length=len(chain),
                        gave_up=f"stopped at max_attempts = {max_attempts}",
                    )
                if not actor.is_available(now, tenant, tokens, upstream):
                    continue
                walk.current = actor
                job = Job(
                    upstream_request,
                    route.name,
                    deadline,
                    attempts,
                    stream,
                    tokens,
                    alternatives=walk.alternatives,
                    origin=origin,
                )
                hedge_after = self._hedge_after(route, actor)
                if hedge_after is None:
                    result = await actor.call(job)
                else:
                    won = await self._hedged(
                        job, actor, route, routes, index - 1, hedge_after, tokens, drop_default
                    )
                    assert won.result is not None
                    hedge_won = won.job is not job
                    result, job = won.result, won.job
                    if hedge_won:  # the hedge answered first
                        actor, route, upstream = won.actor, won.route, won.route.upstream
                        dropped = won.dropped
                        health = self._health.get(route.name)
                if type(result) is ChatResponse:
                    if health is not None:
                        health.on_success()
                    result.model = route.name
                    if not result.upstream_model:
                        result.upstream_model = upstream
                    result.provider = actor.provider_name
                    result.key_id = actor.key_id
                    result.attempts = attempts
                    if dropped:
                        result.dropped_params[:0] = dropped
                    result.cost_usd = self._account(
                        route.name,
                        actor.provider_name,
                        actor.key_id,
                        upstream,
                        tenant,
                        result.usage,
                    )
                    return result
                if type(result) is StreamStart:
                    if health is not None:
                        health.on_success()
                    continuer = functools.partial(
                        self._continuation,
                        request,
                        routes,
                        index - 1,
                        actor,
                        deadline,
                        tokens,
                        origin,
                        attempts,
                    )
                    return ChatStream(
                        result,
                        model=route.name,
                        provider=actor.provider_name,
                        key_id=actor.key_id,
                        upstream_model=upstream,
                        dropped_params=list(dropped),
                        continuer=continuer if settings.max_continuations else None,
                        max_continuations=settings.max_continuations,
                        meter=functools.partial(self._meter, tenant),
                    )
                if result is SKIPPED:
                    continue
                if result is DEADLINE:
                    raise DeadlineExceededError(timeout, attempts)
                if isinstance(result, RouterClosedError):
                    raise result
                assert isinstance(result, ProviderError)
                last_error = result
                step = job.step
                if step is NEXT_KEY:
                    continue
                if step is PROPAGATE:
                    raise _propagated(result, attempts, request)
                if step is CONTEXT_FALLBACK:
                    target = self._context_fallback(route, routes, index)
                    if target is None:
                        raise _propagated(result, attempts, request)
                    routes.insert(index, target)
                    break
                # NEXT_MODEL
                if result.kind == "model_missing":
                    self._disable(route.name)
                break
            now = clock.current_time()
        raise self._chain_failed(
            now >= deadline, timeout, attempts, last_error, chain, tenant, tokens
        )

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """Embed `request`'s input (a text or a batch) along its model chain, with the
        same key actors as chat: lanes, cooldowns, breakers, budgets (TPM counts the
        input tokens), the failure table and the end-to-end deadline. The chain's first
        model must be an embedding model (``mode = "embedding"``, or a
        `provider/upstream` name); later chat models are passed over. Returns one
        vector per input, in order, or raises one `RouterError`."""
        if self._tracing is not None:
            return await self._tracing.embed(self._embed, request)
        return await self._embed(request)

    async def _embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        if not self._open:
            raise RouterClosedError()
        _check_embedding(request)
        settings = self._settings
        clock = self._clock
        timeout = request.timeout if request.timeout is not None else settings.timeout
        origin = clock.current_time()
        deadline = origin + timeout
        if len(request.fallbacks) > settings.max_chain:
            raise InvalidRequestError(
                "fallbacks",
                f"{len(request.fallbacks)} fallbacks; a chain holds at most "
                f"max_chain = {settings.max_chain} models",
            )
        chain = _of_mode(
            self._chain.build(request.model, request.fallbacks, settings.max_chain), "embedding"
        )
        texts = request.inputs
        tokens = 0
        if self._any_tpm:
            tokens = sum(self._offline_counter.count_text(t) for t in texts)
        tenant = request.tenant
        attempts: list[Attempt] = []
        last_error: RouterError | None = None
        now = clock.current_time()
        for route in chain:
            health = self._health.get(route.name)
            if health is not None and not health.is_callable(now):
                continue
            upstream_request = msgspec.structs.replace(request, model=route.upstream)
            for actor in self._key_order(route.provider, tenant):
                now = clock.current_time()
                if now >= deadline:
                    raise DeadlineExceededError(timeout, attempts)
                if len(attempts) >= settings.max_attempts:
                    raise ChainExhaustedError(
                        len({a.model for a in attempts}),
                        attempts,
                        last_error,
                        None,
                        chain_length=len(chain),
                        gave_up=f"stopped at max_attempts = {settings.max_attempts}",
                    )
                if not actor.is_available(now, tenant, tokens, route.upstream):
                    continue
                job = Job(
                    upstream_request, route.name, deadline, attempts, tokens=tokens, origin=origin
                )
                result = await actor.call(job)
                if type(result) is EmbeddingResponse:
                    if health is not None:
                        health.on_success()
                    if len(result.embeddings) != len(texts):
                        raise ProviderError(
                            "unknown",
                            f"{actor.provider_name} returned {len(result.embeddings)} vectors "
                            f"for {len(texts)} inputs",
                        )
                    if not result.usage.prompt_tokens:
                        estimate = sum(self._offline_counter.count_text(t) for t in texts)
                        result.usage = EmbeddingUsage(prompt_tokens=estimate, total_tokens=estimate)
                    result.model = route.name
                    if not result.upstream_model:
                        result.upstream_model = route.upstream
                    result.provider = actor.provider_name
                    result.key_id = actor.key_id
                    result.attempts = attempts
                    prompt = result.usage.prompt_tokens
                    result.cost_usd = self._account(
                        route.name,
                        actor.provider_name,
                        actor.key_id,
                        route.upstream,
                        tenant,
                        Usage(prompt_tokens=prompt, total_tokens=prompt),
                    )
                    return result
                if result is SKIPPED:
                    continue
                if result is DEADLINE:
                    raise DeadlineExceededError(timeout, attempts)
                if isinstance(result, RouterClosedError):
                    raise result
                assert isinstance(result, ProviderError)
                last_error = result
                step = job.step
                if step is NEXT_KEY:
                    continue
                if step is PROPAGATE or step is CONTEXT_FALLBACK:
                    result.attempts = attempts
                    raise result
                if result.kind == "model_missing":  # NEXT_MODEL
                    self._disable(route.name)
                break
            now = clock.current_time()
        raise self._chain_failed(
            now >= deadline, timeout, attempts, last_error, chain, tenant, tokens
        )

    def _chain_failed(
        self,
        late: bool,
        timeout: float,
        attempts: list[Attempt],
        last_error: RouterError | None,
        chain: tuple[Route[_ProviderRuntime], ...],
        tenant: str | None,
        tokens: int,
    ) -> RouterError:
        """The error a walk of the chain ends with when nothing answered: the deadline
        passed (`late`), or every model was tried or is cooling."""
        if late:
            return DeadlineExceededError(timeout, attempts)
        return ChainExhaustedError(
            len({a.model for a in attempts}),
            attempts,
            last_error,
            self._retry_after(chain, tenant, tokens),
            chain_length=len(chain),
        )

    def _account(
        self,
        model: str,
        provider: str,
        key_id: str,
        upstream: str,
        tenant: str | None,
        usage: Usage,
    ) -> float | None:
        """Price an answer and add it to the ledger; returns its cost (None: no price)."""
        cost = self.prices.cost(model, provider, upstream, usage)
        self.ledger.record(model, provider, key_id, tenant, usage, cost)
        return cost

    def _meter(self, tenant: str | None, segment: Segment, usage: Usage) -> float | None:
        """`_account` for one segment of a stream, when its usage is final."""
        return self._account(
            segment.model, segment.provider, segment.key_id, segment.upstream, tenant, usage
        )

    @property
    def shared_state(self) -> SharedState | None:
        """The link to the state shared through Redis (None: this process alone)."""
        return self._shared

    def usage(self) -> UsageSnapshot:
        """Tokens and cost per (model, provider, key, tenant) since the router opened."""
        return self.ledger.snapshot()

    def _hedge_after(self, route: Route[_ProviderRuntime], actor: KeyActor) -> float | None:
        """Seconds after which a second attempt races the first (None: no hedging).
        "auto": a high percentile of the lane's recent latencies, never under
        `hedge_floor`; with too few samples, no hedge yet."""
        setting = route.hedge_after if route.hedge_after is not None else self._settings.hedge_after
        if setting is None or not self._settings.max_hedges:
            return None
        if setting != "auto":
            return float(setting)
        lane = actor.lane_state(route.upstream)
        if lane is None:
            return None
        high = lane.latency_percentile(0.95)
        return None if high is None else max(self._settings.hedge_floor, high)

    async def _hedged(
        self,
        job: Job,
        actor: KeyActor,
        route: Route[_ProviderRuntime],
        routes: list[Route[_ProviderRuntime]],
        index: int,
        hedge_after: float,
        tokens: int,
        drop_default: bool,
    ) -> _Won:
        """Run `job` on `actor`; while it has no answer (a response, or a stream's first
        content) `hedge_after` seconds on, race it against another attempt on the next
        candidate (another key of the model, then later models), up to `max_hedges`.
        The first answer wins and the others are cancelled at once (a cancelled attempt
        is the caller's doing: never counted against its key or lane). When every racer
        fails, the first attempt's result stands and the router goes on from it."""
        clock = self._clock
        candidates = [(route, a) for a in route.provider.actors if a is not actor]
        for later in routes[index + 1 :]:
            candidates += [(later, a) for a in later.provider.actors]
        primary = _Won(job, actor, route, (), None)
        racers = [primary]
        scopes: list[trio.CancelScope] = []
        state = _Race()

        async def run(entry: _Won, scope: trio.CancelScope) -> None:
            with scope:
                entry.result = await entry.actor.call(entry.job)
                state.finished += 1
                if state.winner is None and type(entry.result) in (ChatResponse, StreamStart):
                    state.winner = entry
            state.wake.set()

        max_hedges = self._settings.max_hedges
        hedges = 0
        async with trio.open_nursery() as nursery:
            scopes.append(trio.CancelScope())
            nursery.start_soon(run, primary, scopes[0])
            next_hedge = clock.current_time() + hedge_after
            while state.winner is None and state.finished < len(racers):
                state.wake = trio.Event()
                with trio.move_on_at(next_hedge if hedges < max_hedges else math.inf):
                    await state.wake.wait()
                if state.winner is not None or state.finished == len(racers):
                    break
                if clock.current_time() < next_hedge:
                    continue  # a racer failed; the others are still running
                hedges += 1
                entry = self._hedge_entry(candidates, job, tokens, drop_default)
                if entry is None:
                    hedges = max_hedges  # nobody left to hedge on
                    continue
                racers.append(entry)
                scopes.append(trio.CancelScope())
                nursery.start_soon(run, entry, scopes[-1])
                next_hedge = clock.current_time() + hedge_after
            for racer, scope in zip(racers, scopes, strict=True):
                if racer is not state.winner:
                    scope.cancel()
        winner = state.winner
        for racer in racers:
            if racer is not winner and type(racer.result) is StreamStart:
                _close_stream(racer.result)
        if len(racers) > 1:
            _relabel_hedges(job.attempts, winner, [r for r in racers if r is not winner])
        return winner if winner is not None else primary

    def _hedge_entry(
        self,
        candidates: list[tuple[Route[_ProviderRuntime], KeyActor]],
        job: Job,
        tokens: int,
        drop_default: bool,
    ) -> _Won | None:
        """The next candidate that can take the request now, as a racer."""
        now = self._clock.current_time()
        request = job.request
        assert type(request) is ChatRequest
        tenant = request.tenant
        while candidates:
            route, actor = candidates.pop(0)
            health = self._health.get(route.name)
            if health is not None and not health.is_callable(now):
                continue
            if not actor.is_available(now, tenant, tokens, route.upstream):
                continue
            drop = request.drop_params
            if drop is None:
                drop = route.drop_params if route.drop_params is not None else drop_default
            try:
                upstream_request, dropped = check_params(
                    msgspec.structs.replace(request, model=route.upstream),
                    route.provider.kind,
                    route.name,
                    drop,
                )
            except InvalidRequestError:
                continue
            hedge = Job(
                upstream_request,
                route.name,
                job.deadline,
                job.attempts,
                job.stream,
                tokens,
                origin=job.origin,
            )
            return _Won(hedge, actor, route, dropped, None)
        return None

    async def _continuation(
        self,
        request: ChatRequest,
        routes: list[Route[_ProviderRuntime]],
        index: int,
        failed: KeyActor,
        deadline: float,
        tokens: int,
        origin: float,
        tried: list[Attempt],
        partial: str,
    ) -> Continuation | None:
        """Resume a stream that broke after `partial` reached the caller: on another key
        of the same model first, then on the chain's later models. A model that takes a
        prefill (`continuation`) gets the request plus `partial` as a trailing assistant
        message and answers only the rest; any other gets a replay of the request, which
        the stream accepts only if it begins with exactly `partial`. A candidate that
        fails or refuses is passed over; None when none could start (the caller then
        gets the original interruption, and `tried`, the request's attempts, gets the
        failed ones)."""
        clock = self._clock
        tenant = request.tenant
        candidates: list[tuple[Route[_ProviderRuntime], KeyActor]] = [
            (routes[index], a) for a in routes[index].provider.actors if a is not failed
        ]
        for route in routes[index + 1 :]:
            candidates += [(route, a) for a in route.provider.actors]
        attempts: list[Attempt] = []
        for route, actor in candidates:
            now = clock.current_time()
            if now >= deadline:
                break
            health = self._health.get(route.name)
            if health is not None and not health.is_callable(now):
                continue
            if not actor.is_available(now, tenant, tokens, route.upstream):
                continue
            prefill = (
                route.continuation
                if route.continuation is not None
                else route.provider.kind == "anthropic"
            )
            messages = list(request.messages)
            if prefill:
                # Anthropic refuses a prefill that ends in whitespace; the stream
                # drops that whitespace from the continuation's start instead.
                messages.append(Message("assistant", partial.rstrip()))
            upstream_request = msgspec.structs.replace(
                request, model=route.upstream, messages=messages
            )
            try:
                upstream_request, _ = check_params(
                    upstream_request,
                    route.provider.kind,
                    route.name,
                    bool(request.drop_params or route.drop_params or self._settings.drop_params),
                )
            except InvalidRequestError:
                continue  # this model cannot honour the request: never used
            job = Job(upstream_request, route.name, deadline, attempts, True, tokens, origin=origin)
            result = await actor.call(job)
            if type(result) is StreamStart:
                return Continuation(
                    result, route.name, actor.provider_name, actor.key_id, route.upstream, prefill
                )
            if result is DEADLINE or isinstance(result, RouterClosedError):
                break
        tried.extend(attempts)
        return None

    def _context_fallback(
        self, route: Route[_ProviderRuntime], routes: list[Route[_ProviderRuntime]], index: int
    ) -> Route[_ProviderRuntime] | None:
        """The `context_window_fallbacks` target of `route` when the upstream said the
        prompt does not fit it, unless that target was already tried for this request
        (never the same prompt to the same model twice); it is moved up to go next."""
        name = self._settings.context_window_fallbacks.get(route.name)
        if name is None:
            return None
        try:
            target = self._chain.resolve(name)
        except RouterError:  # a reload removed it while the request ran
            return None
        tried = routes[:index]
        if any(
            r.name == target.name
            or (r.provider is target.provider and r.upstream == target.upstream)
            for r in tried
        ):
            return None
        routes[index:] = [r for r in routes[index:] if r.name != target.name]
        return target

    # -- token counting ---------------------------------------------------------------------

    def token_counter(self, model: str) -> TokenCounter:
        """The counter used for prompts to `model`: the cascading exact counter when
        `[router.tokens] exact_provider` can count for it, else the offline one."""
        exact = self._exact_counter
        if exact is None:
            return self._offline_counter
        tokens = self._settings.tokens
        route = self._chain.resolve(model)
        if route.provider.name == tokens.exact_provider or tokens.exact_model is not None:
            return exact
        return self._offline_counter

    async def _prompt_tokens(self, route: Route[_ProviderRuntime], request: ChatRequest) -> int:
        counter = self.token_counter(route.name)
        return await counter.count_messages(route.name, request.messages, request.tools)

    def _fit_context(
        self, chain: tuple[Route[_ProviderRuntime], ...], prompt: int, max_tokens: int
    ) -> tuple[Route[_ProviderRuntime], ...]:
        """The chain without the models whose context window cannot hold the prompt
        plus max_tokens, with `context_window_fallbacks` routing to larger models."""
        need = prompt + max_tokens
        larger = self._settings.context_window_fallbacks
        fitted: list[Route[_ProviderRuntime]] = []
        too_small: dict[str, int] = {}
        queue = list(chain)
        seen = {r.name for r in queue}
        while queue:
            route = queue.pop(0)
            window = route.context_window
            if window is None or need <= window:
                fitted.append(route)
                continue
            too_small[route.name] = window
            target = larger.get(route.name)
            if target is not None and target not in seen:
                seen.add(target)
                with contextlib.suppress(RouterError):  # a reload may have removed it
                    queue.insert(0, self._chain.resolve(target))
        if not fitted:
            raise ContextWindowError(prompt, max_tokens, too_small)
        return tuple(fitted) if too_small else chain

    async def _count_exactly(
        self, model: str, messages: Sequence[Message], tools: Sequence[Tool] | None
    ) -> int:
        """Exact prompt tokens from the exact provider, through its key actors."""
        tokens = self._settings.tokens
        assert tokens.exact_provider is not None
        rt = self._runtimes[tokens.exact_provider]
        route = self._chain.resolve(model)
        upstream = route.upstream if route.provider is rt else tokens.exact_model
        if upstream is None:
            raise ProviderError("bad_request", f"no exact count for model {model!r}")
        request = ChatRequest(
            model=upstream, messages=list(messages), tools=list(tools or []) or None
        )
        now = self._clock.current_time()
        deadline = now + self._settings.attempt_timeout
        last: RouterError = ProviderError(
            "rate_limit", "every key of the exact provider is cooling"
        )
        for actor in rt.actors:
            if not actor.is_available(self._clock.current_time(), None):
                continue
            result = await actor.call(Job(request, model, deadline, [], count=True))
            if type(result) is int:
                return result
            if isinstance(result, RouterError):
                last = result
        raise last

    def _key_order(self, rt: _ProviderRuntime, tenant: str | None) -> Iterable[KeyActor]:
        """The keys of `rt` in the order to try them. O(1) when the first choice has
        room (no copy of the key list), so dispatch cost does not grow with the keys."""
        actors = rt.actors
        n = len(actors)
        if n == 1:
            return actors
        strategy = self._strategy
        if strategy == "least_busy":
            best = min(actors, key=_load)
            return itertools.chain((best,), (a for a in actors if a is not best))
        start = 0
        if strategy == "round_robin":
            start = rt.next_index
            rt.next_index = (start + 1) % n
        if not actors[start].is_saturated():
            if not start:
                return actors
            return actors[start:] + actors[:start]  # (smaller than a chain of slices)
        # Spill over: keys with free capacity first, in order; saturated ones last.
        rotated = actors[start:] + actors[:start]
        free = [a for a in rotated if not a.is_saturated()]
        return free + [a for a in rotated if a.is_saturated()] if free else rotated

    def _retry_after(
        self, chain: tuple[Route[_ProviderRuntime], ...], tenant: str | None, tokens: int = 0
    ) -> float | None:
        """Shortest wait until some model of the chain has a callable key, when none has
        one now; None when something is callable now (or nothing ever will be)."""
        now = trio.current_time()
        best = math.inf
        for route in chain:
            health = self._health.get(route.name)
            if health is not None and health.state_at(now) == "disabled":
                continue
            key_wait = min(
                a.wait_time(now, tenant, tokens, route.upstream) for a in route.provider.actors
            )
            best = min(best, max(health.remaining(now) if health else 0.0, key_wait))
        if best <= 0 or math.isinf(best):
            return None
        return best

    def _known_health(self, name: str) -> ModelHealth | None:
        """The health of `name` if it is a model this router can route (for state
        learned from other instances), else None."""
        try:
            self._chain.resolve(name)
        except RouterError:
            return None
        return self._health_of(name)

    def _disable(self, name: str) -> None:
        """The provider says model `name` does not exist: disable it (and say so to
        the other instances)."""
        health = self._health_of(name)
        health.on_model_missing(self._clock.current_time())
        if self._shared is not None:
            self._shared.health_changed(name, health)

    def _health_of(self, name: str) -> ModelHealth:
        """The health of `name`, made when it is first written. `provider/upstream`
        names a caller made up are bounded: past `adhoc_models` of them, the least
        recently written healthy one (else the oldest) is forgotten."""
        health = self._health.get(name)
        if name not in self._configured:
            adhoc = self._adhoc
            if health is not None:
                adhoc.move_to_end(name)
                return health
            if len(adhoc) >= self._settings.adhoc_models:
                now = self._clock.current_time()
                victim = next((n for n in adhoc if self._health[n].is_callable(now)), None)
                victim = victim if victim is not None else next(iter(adhoc))
                del adhoc[victim], self._health[victim]
            adhoc[name] = None
        if health is None:
            health = self._health[name] = ModelHealth(self._settings.health)
        return health

    # -- operator surface -----------------------------------------------------------------

    def snapshot(self) -> RouterSnapshot:
        """Every key's state and every known model's health, right now."""
        now = trio.current_time()
        shared = self._shared
        keys = []
        for rt in self._runtimes.values():
            for a in rt.actors:
                rpm_left, tpm_left = a.budget.remaining(now) if a.budget else (None, None)
                breaker = a.breaker.state_at(now)
                cooling = a.cooldown.is_cooling(now)
                keys.append(
                    KeySnapshot(
                        provider=a.provider_name,
                        key_id=a.key_id,
                        breaker=breaker,
                        breaker_open_for=a.breaker.remaining(now),
                        cooling_for=a.cooldown.remaining(now),
                        cooling_reason=a.cooldown.reason if cooling else None,
                        in_flight=a.in_flight,
                        queued=a.queued,
                        max_concurrency=a.max_concurrency,
                        requests=a.requests,
                        successes=a.successes,
                        failures=a.failures,
                        opens=a.breaker.opens,
                        lanes=[_lane_snapshot(lane, now) for lane in a.lanes.values()],
                        rpm_remaining=rpm_left,
                        tpm_remaining=tpm_left,
                        cooling_source=a.cooling_source if cooling else None,
                        breaker_source=a.breaker_source if breaker != "closed" else None,
                        budget_source=(
                            None
                            if a.budget is None
                            else "shared"
                            if shared is not None and shared.reachable
                            else "local"
                        ),
                    )
                )
        models = []
        for name, health in self._health.items():
            route = self._chain.resolve(name)
            state = health.state_at(now)
            remaining = health.remaining(now)
            source = None
            if state != "healthy":
                source = shared.health_sources.get(name, "local") if shared else "local"
            else:
                # Cooling is derived: no key can serve the model before `wait`.
                wait = min(a.failure_wait(now, None, route.upstream) for a in route.provider.actors)
                if wait > 0:
                    state, remaining, source = "cooling", wait, "local"
            models.append(
                ModelSnapshot(
                    name=name,
                    provider=route.provider.name,
                    upstream=route.upstream,
                    health=state,
                    remaining=remaining,
                    source=source,
                )
            )
        return RouterSnapshot(
            time=now,
            keys=keys,
            models=models,
            shared=shared.snapshot() if shared is not None else None,
        )

    def callable_keys(self) -> int:
        """How many keys could take a request right now: not cooling, breaker letting
        calls through, budget with room (what a readiness probe wants to know)."""
        now = self._clock.current_time()
        return sum(
            1 for rt in self._runtimes.values() for a in rt.actors if a.is_available(now, None)
        )

    def reset(
        self,
        *,
        provider: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        upstream: str | None = None,
    ) -> None:
        """Clear state an operator knows to be stale.

        ``reset(provider="p", key_id="k")`` clears that key's breakers and cooldowns,
        its lanes' included; ``reset(provider="p")`` every key of the provider;
        ``reset(provider="p", key_id="k", upstream="gpt-4o")`` only that lane (without
        `key_id`: that model's lane on every key of the provider); ``reset(model="m")``
        the model's health; ``reset()`` everything.
        """
        if key_id is not None and provider is None:
            raise InvalidRequestError("provider", "a key_id needs its provider")
        if upstream is not None and provider is None:
            raise InvalidRequestError("provider", "an upstream lane needs its provider")
        self._reset_local(provider, key_id, model, upstream)
        if self._shared is not None:
            self._shared.reset(provider, key_id, model, upstream)

    def _reset_local(
        self,
        provider: str | None,
        key_id: str | None,
        model: str | None,
        upstream: str | None = None,
    ) -> None:
        if model is not None:
            try:
                self._chain.resolve(model)
            except RouterError:
                raise InvalidRequestError("model", f"unknown model {model!r}") from None
            self._health_of(model).reset()
        if provider is not None:
            rt = self._runtimes.get(provider)
            if rt is None:
                raise InvalidRequestError("provider", f"unknown provider {provider!r}")
            actors = [a for a in rt.actors if key_id is None or a.key_id == key_id]
            if not actors:
                raise InvalidRequestError("key_id", f"provider {provider!r} has no key {key_id!r}")
            for a in actors:
                a.reset(upstream)
        if provider is None and model is None:
            for rt in self._runtimes.values():
                for a in rt.actors:
                    a.reset()
            for h in self._health.values():
                h.reset()

    def provider(self, name: str) -> Provider:
        """The provider instance serving `name` (the simulated one, or a custom one)."""
        return self._runtimes[name].provider


class _Won:
    """One racer of a hedged request: its job, where it runs, and its result."""

    __slots__ = ("actor", "dropped", "job", "result", "route")

    def __init__(
        self,
        job: Job,
        actor: KeyActor,
        route: Route[_ProviderRuntime],
        dropped: tuple[str, ...],
        result: JobResult | None,
    ) -> None:
        self.job = job
        self.actor = actor
        self.route = route
        self.dropped = dropped
        self.result = result


class _Race:
    __slots__ = ("finished", "wake", "winner")

    def __init__(self) -> None:
        self.finished = 0
        self.wake = trio.Event()
        self.winner: _Won | None = None


def _close_stream(start: StreamStart) -> None:
    """A stream that lost a hedge race: stop its pump (closing the upstream)."""
    pump = start.job.scope
    if pump is not None:
        pump.cancel()
    start.receive.close()


def _relabel_hedges(attempts: list[Attempt], winner: _Won | None, losers: list[_Won]) -> None:
    """After a race: the losers' cut attempts read "hedge_cancelled" (no failure of
    theirs), the winner's answer "hedge_won"."""
    for i, attempt in enumerate(attempts):
        if attempt.outcome in ("cancelled", "ok") and any(
            attempt.key_id == r.actor.key_id and attempt.model == r.route.name for r in losers
        ):
            attempts[i] = msgspec.structs.replace(attempt, outcome="hedge_cancelled")
        elif (
            winner is not None
            and attempt.outcome == "ok"
            and attempt.key_id == winner.actor.key_id
            and attempt.model == winner.route.name
        ):
            attempts[i] = msgspec.structs.replace(attempt, outcome="hedge_won")


def _lane_snapshot(lane: Lane, now: float) -> LaneSnapshot:
    breaker = lane.breaker.state_at(now)
    cooling = lane.cooldown.is_cooling(now)
    return LaneSnapshot(
        model=lane.model,
        breaker=breaker,
        breaker_open_for=lane.breaker.remaining(now),
        cooling_for=lane.cooldown.remaining(now),
        rate_limit_hits=lane.cooldown.hits,
        requests=lane.requests,
        successes=lane.successes,
        failures=lane.failures,
        opens=lane.breaker.opens + sum(b.opens for b in lane.tenant_breakers.values()),
        latency=lane.latency,
        tenant_breakers={t: b.state_at(now) for t, b in sorted(lane.tenant_breakers.items())},
        cooling_source=lane.cooling_source if cooling else None,
        breaker_source=lane.breaker_source if breaker != "closed" else None,
    )


def _load(actor: KeyActor) -> float:
    """Jobs held or queued by the key, as a fraction of its concurrency (counted at
    dispatch, so a burst of submits sees its own earlier picks)."""
    return (actor.busy + actor.queued) / actor.max_concurrency


def _open_tracing(router: Router, provider: TracerProvider | None) -> Tracing:
    """The router's tracer (`router._otel`), which needs the `otel` extra."""
    try:
        from ._otel import open_tracing

        return open_tracing(
            router.config, provider, lambda name: router._chain.resolve(name).upstream
        )
    except ImportError:
        raise ConfigError(
            "router.tracing",
            "tracing needs the OpenTelemetry packages: pip install 'llm-router[otel]'",
        ) from None


def _key_actor(
    pc: ProviderConfig,
    kc: KeyConfig,
    secret: str,
    instance: Provider,
    settings: RouterSettings,
    rng: random.Random,
) -> KeyActor:
    return KeyActor(
        pc.name,
        ApiKey(pc.name, kc.id, secret),
        instance,
        kc.max_concurrency or pc.max_concurrency,
        settings,
        rng,
        rpm=kc.rpm if kc.rpm is not None else pc.rpm,
        tpm=kc.tpm if kc.tpm is not None else pc.tpm,
    )


def _instance_settings(pc: ProviderConfig) -> tuple[object, ...]:
    """What a provider instance is built from (besides its keys): a change means a new
    instance on reload."""
    return (pc.kind, pc.base_url, pc.headers, pc.proxy, pc.simulate, pc.seed)


def _key_settings(pc: ProviderConfig, kc: KeyConfig) -> tuple[object, ...]:
    """What a key's actor is built from (besides its secret), defaults applied."""
    return (
        kc.max_concurrency or pc.max_concurrency,
        kc.rpm if kc.rpm is not None else pc.rpm,
        kc.tpm if kc.tpm is not None else pc.tpm,
        kc.simulate,
    )


def _key_name(actor: KeyActor) -> str:
    return f"{actor.provider_name}/{actor.key_id}"


def _provider_instance(index: int, pc: ProviderConfig, supplied: dict[str, Provider]) -> Provider:
    field = f"providers[{index}]"
    given = supplied.pop(pc.name, None)
    if pc.kind == "custom":
        if given is None:
            raise ConfigError(
                f"{field}.kind",
                f"custom provider {pc.name!r} needs an instance: "
                f"Router.open(config, providers={{{pc.name!r}: ...}})",
            )
        if not isinstance(given, Provider):
            raise ConfigError(field, f"{type(given).__name__} has no async complete(request, key)")
        return given
    if given is not None:
        raise ConfigError(
            f"{field}.kind",
            f"provider {pc.name!r} is of kind {pc.kind!r}; only custom ones take an instance",
        )
    if pc.kind == "simulated":
        return SimulatedProvider(pc)
    from ._http import HttpProvider, protocol_for

    limits = {k.id: k.max_concurrency or pc.max_concurrency for k in pc.keys}
    return HttpProvider(pc, protocol_for(pc.kind), limits)


def _propagated(
    error: ProviderError, attempts: list[Attempt], request: ChatRequest
) -> ProviderError:
    error.attempts = attempts
    if error.kind == "max_tokens":
        if request.max_tokens is not None:
            what = (
                f"max_tokens={request.max_tokens} is above the output ceiling of model "
                f"{error.model!r}, and the request was rejected again without max_tokens"
            )
        else:
            what = f"model {error.model!r} rejected its own default output limit"
        error.message = (
            f"{what}; lower max_tokens in the request or the config. Upstream said: {error.message}"
        )
        error.args = (error.message,)
    return error


_PARTS: Final = (TextPart, ImagePart, FilePart, AudioPart)


def _of_mode(
    chain: tuple[Route[_ProviderRuntime], ...], mode: str
) -> tuple[Route[_ProviderRuntime], ...]:
    """The chain without the models configured for the other kind of request; its
    first model of the other kind is a clear 400 (before any upstream call)."""
    first = chain[0]
    if first.mode is not None and first.mode != mode:
        if mode == "chat":
            what = "an embedding model: send it embedding requests (`Router.embed`)"
        else:
            what = 'a chat model: embedding requests need a model with mode = "embedding"'
        raise InvalidRequestError("model", f"model {first.name!r} is {what}")
    if all(r.mode is None or r.mode == mode for r in chain):
        return chain
    return tuple(r for r in chain if r.mode is None or r.mode == mode)


def _check_embedding(request: EmbeddingRequest) -> None:
    if type(request) is not EmbeddingRequest:
        raise InvalidRequestError(
            "<request>", f"expected EmbeddingRequest, got {type(request).__name__}"
        )
    if type(request.model) is not str or not request.model.strip():
        raise InvalidRequestError("model", "must be a non-empty string")
    raw = request.input
    if isinstance(raw, list):
        if not raw:
            raise InvalidRequestError("input", "must not be an empty list")
        for i, item in enumerate(raw):
            if type(item) is not str:
                what = (
                    "token arrays are not supported: send the text"
                    if isinstance(item, int | list)
                    else "must be a string"
                )
                raise InvalidRequestError(f"input[{i}]", what)
            if not item:
                raise InvalidRequestError(f"input[{i}]", "must not be empty")
    elif type(raw) is not str:
        raise InvalidRequestError("input", "must be a string or a list of strings")
    elif not raw:
        raise InvalidRequestError("input", "must not be empty")
    if request.dimensions is not None and (
        type(request.dimensions) is not int or request.dimensions < 1
    ):
        raise InvalidRequestError("dimensions", "must be a positive integer")
    if request.encoding_format not in ("float", "base64"):
        raise InvalidRequestError("encoding_format", 'must be "float" or "base64"')
    if request.timeout is not None and not (
        type(request.timeout) in (int, float) and 0 < request.timeout < math.inf
    ):
        raise InvalidRequestError("timeout", "must be a positive, finite number of seconds")
    if not isinstance(request.fallbacks, list):
        raise InvalidRequestError("fallbacks", "must be a list of model names")


def _check_request(request: ChatRequest) -> None:
    if type(request) is not ChatRequest:
        raise InvalidRequestError(
            "<request>", f"expected ChatRequest, got {type(request).__name__}"
        )
    if type(request.model) is not str or not request.model.strip():
        raise InvalidRequestError("model", "must be a non-empty string")
    messages = request.messages
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of Message")
    for i, m in enumerate(messages):
        if type(m) is not Message:
            raise InvalidRequestError(f"messages[{i}]", "must be a Message")
        content = m.content
        if type(content) is not str and not (
            isinstance(content, list) and all(isinstance(p, _PARTS) for p in content)
        ):
            raise InvalidRequestError(
                f"messages[{i}].content", "must be a string or a list of content parts"
            )
    if request.max_tokens is not None and (
        type(request.max_tokens) is not int or request.max_tokens < 1
    ):
        raise InvalidRequestError("max_tokens", "must be a positive integer")
    if request.temperature is not None and not 0 <= request.temperature <= 2:
        raise InvalidRequestError("temperature", "must be between 0 and 2")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise InvalidRequestError("top_p", "must be in (0, 1]")
    if request.timeout is not None and not (
        type(request.timeout) in (int, float) and 0 < request.timeout < math.inf
    ):
        raise InvalidRequestError("timeout", "must be a positive, finite number of seconds")
    if not isinstance(request.fallbacks, list):
        raise InvalidRequestError("fallbacks", "must be a list of model names")
