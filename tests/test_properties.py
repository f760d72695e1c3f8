"""Property tests of the whole router under random fault schedules.

Each hypothesis example builds a random config (custom providers backed by
`ScriptedProvider`), random per-key fault scripts and a random set of concurrent
requests submitted at random virtual times, runs them in its own `trio.run` on a
`MockClock`, and checks the router's invariants:

(a) every request ends in exactly one outcome: a ChatResponse or a RouterError,
    or trio.Cancelled only for the callers the test cancelled;
(b) no call ever reaches a key that is cooling, or whose breaker (for the
    request's tenant) is open, at that moment;
(c) afterwards every key has nothing in flight or queued, and `Router.open` exits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from scripted import Action, Fail, Hang, Reply, ScriptedProvider, make_config

from router import (
    ApiKey,
    ChatRequest,
    ChatResponse,
    Message,
    Router,
    RouterConfig,
    RouterError,
)

# -- strategies ---------------------------------------------------------------------------

latencies = st.sampled_from([0.0, 0.0, 0.05, 0.3, 1.0, 2.5, 6.0])

fails = st.one_of(
    st.builds(
        Fail,
        kind=st.just("rate_limit"),
        retry_after=st.one_of(st.none(), st.sampled_from([0.0, 0.5, 3.0, 12.0])),
        latency=latencies,
    ),
    st.builds(
        Fail,
        kind=st.sampled_from(
            [
                "transient",
                "transient",
                "unknown",
                "auth",
                "balance",
                "model_missing",
                "bad_request",
                "max_tokens",
                "context_exceeded",
                "content_filter",
            ]
        ),
        latency=latencies,
    ),
)
transients = st.builds(Fail, kind=st.just("transient"), latency=latencies)
actions: st.SearchStrategy[Action] = st.one_of(
    st.builds(Reply, latency=latencies),
    fails,
    transients,  # the commonest fault, and the one that retries in place
    st.just(Hang()),
)


@dataclass
class Req:
    at: float
    model: str
    tenant: str | None
    timeout: float | None
    max_tokens: int | None
    cancel_after: float | None


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n_providers = draw(st.integers(1, 3))
    providers = []
    scripts: dict[tuple[str, str], list[Action]] = {}
    for i in range(n_providers):
        name = f"p{i}"
        n_keys = draw(st.integers(1, 3))
        keys = []
        for j in range(n_keys):
            key_id = f"k{j}"  # same ids on every provider: pairs must stay separate
            keys.append(
                {
                    "id": key_id,
                    "secret": f"s-{name}-{key_id}",
                    "max_concurrency": draw(st.integers(1, 4)),
                }
            )
            scripts[(name, key_id)] = draw(st.lists(actions, max_size=10))
        providers.append({"name": name, "kind": "custom", "keys": keys})
    provider_names = [p["name"] for p in providers]

    n_models = draw(st.integers(1, 3))
    model_names = [f"m{i}" for i in range(n_models)]
    direct = [f"{p}/direct" for p in provider_names]
    models = []
    for i, name in enumerate(model_names):
        others = [m for m in model_names if m != name] + direct
        models.append(
            {
                "name": name,
                "provider": draw(st.sampled_from(provider_names)),
                "upstream": f"up{i}",
                "fallbacks": draw(st.lists(st.sampled_from(others), max_size=3)),
            }
        )

    router = {
        "timeout": draw(st.sampled_from([1.0, 3.0, 8.0, 20.0])),
        "attempt_timeout": draw(st.sampled_from([0.5, 1.5, 4.0])),
        "transient_retries": draw(st.integers(0, 2)),
        "retry_backoff": [0.5, 2.0],
        "retry_jitter": 0.0,
        "fallbacks": draw(st.lists(st.sampled_from(model_names + direct), max_size=2)),
        "balancing": draw(st.sampled_from(["ordered", "round_robin", "least_busy"])),
        "per_tenant_breakers": draw(st.booleans()),
        "seed": 0,
        "breaker": {
            "failure_threshold": draw(st.integers(1, 3)),
            "failure_rate": draw(st.sampled_from([0.0, 0.5])),
            "window": 4,
            "minimum_calls": 2,
            "open_for": draw(st.sampled_from([0.5, 2.0, 5.0])),
            "open_for_max": 10.0,
            "jitter": 0.0,
            "half_open_probes": draw(st.integers(1, 2)),
            "success_threshold": draw(st.integers(1, 2)),
        },
        "cooldown": {"min": 1.0, "max": 8.0, "auth": 6.0, "balance": 15.0},
        "health": {"disabled_for": 10.0},
        # A short Retry-After waited out in place passes the lane's cooldown on purpose
        # (tests/test_lanes.py); here every call to a cooling lane is a violation.
        "rate_limit_wait": 0.0,
    }
    config = {"router": router, "providers": providers, "models": models}

    requests = draw(
        st.lists(
            st.builds(
                Req,
                at=st.integers(0, 24).map(lambda t: t / 2),
                model=st.sampled_from(model_names + direct),
                tenant=st.sampled_from([None, "t1", "t2"]),
                timeout=st.one_of(st.none(), st.sampled_from([0.5, 2.0, 6.0])),
                max_tokens=st.one_of(st.none(), st.just(64)),
                cancel_after=st.one_of(st.none(), st.none(), st.sampled_from([0.0, 0.2, 1.0, 3.0])),
            ),
            min_size=1,
            max_size=25,
        )
    )
    return {"config": config, "scripts": scripts, "requests": requests}


# -- the checked run ------------------------------------------------------------------------


class CheckedProvider(ScriptedProvider):
    """A ScriptedProvider that remembers the tenant of the request being sent, so that
    the `on_call` hook can check that tenant's breaker."""

    current_tenant: str | None = None
    current_model: str = ""

    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse:
        # ScriptedProvider.complete runs on_call before its first checkpoint, so these
        # attributes are still this request's when the hook reads them.
        self.current_tenant = request.tenant
        self.current_model = request.model
        return await super().complete(request, key)


async def run_scenario(scenario: dict[str, Any]) -> None:
    cfg = RouterConfig.from_dict(scenario["config"])
    requests: list[Req] = scenario["requests"]
    violations: list[str] = []
    providers: dict[str, CheckedProvider] = {}
    holder: dict[str, Router] = {}

    def make_hook(pname: str, prov: CheckedProvider) -> Any:
        def on_call(key_id: str) -> None:
            # Never raise here: the actor would turn it into an `unknown` failure.
            now = trio.current_time()
            router = holder["router"]
            matches = [a for a in router._runtimes[pname].actors if a.key_id == key_id]
            if len(matches) != 1:
                violations.append(f"{pname}/{key_id}: {len(matches)} actors")
                return
            actor = matches[0]
            if actor.cooldown.is_cooling(now):
                violations.append(
                    f"t={now}: call to {pname}/{key_id} while cooling until "
                    f"{actor.cooldown.until} ({actor.cooldown.reason})"
                )
            if actor.breaker.state_at(now) == "open":
                violations.append(
                    f"t={now}: call to {pname}/{key_id} while its key breaker is open "
                    f"until {actor.breaker.open_until}"
                )
            tenant = prov.current_tenant
            model = prov.current_model
            lane = actor.lane_state(model)
            if lane is None:
                violations.append(f"t={now}: call to {pname}/{key_id} for {model} with no lane")
                return
            if lane.cooldown.is_cooling(now):
                violations.append(
                    f"t={now}: call to {pname}/{key_id} for {model} while its lane cools "
                    f"until {lane.cooldown.until}"
                )
            breaker = (
                lane.tenant_breakers.get(tenant, lane.breaker)
                if actor.settings.per_tenant_breakers and tenant
                else lane.breaker
            )
            if breaker.state_at(now) == "open":
                violations.append(
                    f"t={now}: call to {pname}/{key_id} for {model} (tenant {tenant}) "
                    f"while its lane breaker is open until {breaker.open_until}"
                )

        return on_call

    for pc in cfg.providers:
        prov = CheckedProvider()
        prov.on_call = make_hook(pc.name, prov)
        for (pname, key_id), script in scenario["scripts"].items():
            if pname == pc.name:
                prov.script(key_id, script)
        providers[pc.name] = prov

    outcomes: dict[int, list[tuple[str, Any]]] = {i: [] for i in range(len(requests))}

    async def caller(i: int, r: Req, router: Router) -> None:
        await trio.sleep(r.at)
        request = ChatRequest(
            model=r.model,
            messages=[Message("user", f"request {i}")],
            tenant=r.tenant,
            timeout=r.timeout,
            max_tokens=r.max_tokens,
        )
        scope = trio.CancelScope(
            deadline=trio.current_time() + r.cancel_after
            if r.cancel_after is not None
            else math.inf
        )
        with scope:
            try:
                resp = await router.submit(request)
            except RouterError as exc:
                outcomes[i].append(("error", exc))
            except Exception as exc:  # anything else breaks invariant (a)
                outcomes[i].append(("unexpected", exc))
            else:
                outcomes[i].append(("ok", resp))
        if scope.cancelled_caught:
            outcomes[i].append(("cancelled", None))

    exited = False
    with trio.fail_after(100_000):  # a hang becomes a TooSlowError, in virtual time
        async with Router.open(cfg, providers=providers) as router:
            holder["router"] = router
            async with trio.open_nursery() as nursery:
                for i, r in enumerate(requests):
                    nursery.start_soon(caller, i, r, router)
            # (c) nothing left in flight or queued on any key.
            for rt in router._runtimes.values():
                for actor in rt.actors:
                    assert actor.in_flight == 0, (actor, actor.in_flight)
                    assert actor.queued == 0, (actor, actor.queued)
            for snap in router.snapshot().keys:
                assert snap.in_flight == 0 and snap.queued == 0, snap
        exited = True
    assert exited

    # (a) exactly one outcome per request, of an allowed type.
    counts = {"ok": 0, "error": 0, "cancelled": 0}
    for i, got in outcomes.items():
        assert len(got) == 1, (i, requests[i], got)
        tag, value = got[0]
        assert tag != "unexpected", (i, requests[i], value)
        if tag == "cancelled":
            assert requests[i].cancel_after is not None, (i, requests[i])
        elif tag == "ok":
            assert type(value) is ChatResponse
            assert value.attempts and value.attempts[-1].outcome == "ok"
            assert (value.provider, value.key_id) == (
                value.attempts[-1].provider,
                value.attempts[-1].key_id,
            )
            assert value.content == f"ok from {value.key_id}"
        else:
            assert isinstance(value, RouterError)
        counts[tag] += 1
    assert sum(counts.values()) == len(requests)
    for tag, n in counts.items():
        event(f"some {tag}" if n else f"no {tag}")

    # (b) no call to a cooling or open key.
    assert not violations, violations

    # Every upstream call belongs to exactly one attempt: the actors counted each one,
    # and the attempts the callers got back account for all of them (cancelled callers
    # take their attempt logs with them, so only then may some be unaccounted for).
    total_calls = sum(len(p.calls) for p in providers.values())
    assert total_calls == sum(a.requests for rt in router._runtimes.values() for a in rt.actors)
    recorded = sum(
        len(getattr(got[0][1], "attempts", None) or [])
        for got in outcomes.values()
        if got[0][0] != "cancelled"
    )
    if counts["cancelled"]:
        assert recorded <= total_calls
    else:
        assert recorded == total_calls


def _scenario(
    scripts: dict[tuple[str, str], list[Action]],
    requests: list[Req],
    max_concurrency: int = 4,
    **router: Any,
) -> dict[str, Any]:
    """A hand-written scenario: provider p0 with the scripted keys, model m0 on it."""
    settings = {
        "timeout": 8.0,
        "attempt_timeout": 1.5,
        "transient_retries": 1,
        "rate_limit_wait": 0.0,
        "retry_backoff": [0.5, 2.0],
        "retry_jitter": 0.0,
        "seed": 0,
        "breaker": {"failure_threshold": 1, "failure_rate": 0.0, "open_for": 5.0, "jitter": 0.0},
    }
    settings.update(router)
    keys = sorted({k for _, k in scripts})
    return {
        "config": {
            "router": settings,
            "providers": [
                {
                    "name": "p0",
                    "kind": "custom",
                    "keys": [{"id": k, "max_concurrency": max_concurrency} for k in keys],
                }
            ],
            "models": [{"name": "m0", "provider": "p0", "upstream": "up0"}],
        },
        "scripts": scripts,
        "requests": requests,
    }


def _req(at: float, **kw: Any) -> Req:
    fields: dict[str, Any] = {
        "model": "m0",
        "tenant": None,
        "timeout": None,
        "max_tokens": None,
        "cancel_after": None,
    }
    fields.update(kw)
    return Req(at=at, **fields)


# A retry must re-check the breaker: B's last retry opens it at t=0.9, while A sleeps
# before its retry at t=1.0, which must then be skipped.
RETRY_AFTER_CONCURRENT_TRIP = _scenario(
    {
        ("p0", "k0"): [
            Fail("transient", latency=0.4),  # B's first try, t=0 -> 0.4
            Fail("transient"),  # A's first try, t=0.5
            Fail("transient"),  # B's retry, t=0.9: the breaker opens
            Reply(),  # would be A's retry at t=1.0 if the breaker were ignored
        ]
    },
    [_req(0.0), _req(0.5)],
)

# The same with a cooldown: A's first try fails at t=0 and A sleeps 0.5 s; B, sent at
# t=0 too, gets a 429 that cools the key; A's retry at t=0.5 must be skipped.
RETRY_AFTER_CONCURRENT_COOLDOWN = _scenario(
    {
        ("p0", "k0"): [
            Fail("transient"),  # A's first try, t=0
            Fail("rate_limit", retry_after=3.0),  # B's try, t=0: the key cools
            Reply(),  # would be A's retry at t=0.5 if the cooldown were ignored
        ]
    },
    [_req(0.0), _req(0.0, tenant="t1")],
    breaker={"failure_threshold": 5, "failure_rate": 0.0, "jitter": 0.0},
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@example(RETRY_AFTER_CONCURRENT_TRIP)
@example(RETRY_AFTER_CONCURRENT_COOLDOWN)
@given(scenarios())
def test_router_invariants_under_random_faults(scenario: dict[str, Any]) -> None:
    trio.run(
        run_scenario,
        scenario,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


# -- a targeted regression: a half-open breaker's probe slot is freed exactly once --------


HALF_OPEN_CONFIG = """
[router]
timeout = 30.0
attempt_timeout = 5.0
transient_retries = 1
retry_backoff = [0.5]

[router.breaker]
failure_threshold = 1
failure_rate = 0.0
open_for = 1.0
half_open_probes = 1
success_threshold = 1

[[providers]]
name = "p"
kind = "custom"
keys = [{ id = "k" }]
"""


async def test_half_open_admits_one_probe_after_unknown_near_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A half-open probe that fails `unknown` when its retry would not fit before the
    deadline must free its probe slot once, not twice: afterwards the breaker must
    still admit only `half_open_probes` (1) concurrent probe."""
    prov = ScriptedProvider()
    prov.script(
        "k",
        [
            Fail("transient"),  # t=0: first try
            Fail("transient"),  # t=0.5: the retry; the breaker opens until t=1.5
            Fail("unknown", latency=0.3),  # t=2.0: the half-open probe; ends t=2.3
            Reply(latency=1.0),  # t=3.0: the next probe
            Reply(latency=1.0),  # t=3.0: a second, concurrent probe (must not happen)
        ],
    )

    def req(timeout: float | None = None) -> ChatRequest:
        return ChatRequest(model="p/x", messages=[Message("user", "hi")], timeout=timeout)

    async with Router.open(make_config(HALF_OPEN_CONFIG), providers={"p": prov}) as router:
        actor = router._runtimes["p"].actors[0]
        with_errors: list[BaseException] = []
        try:
            await router.submit(req())
        except RouterError as exc:
            with_errors.append(exc)
        lane = actor.lane_state("x")
        assert lane is not None
        assert lane.breaker.state_at(trio.current_time()) == "open"
        await trio.sleep_until(2.0)
        assert lane.breaker.state_at(trio.current_time()) == "half_open"
        # Deadline at t=2.7: the unknown failure ends at t=2.3 and a 0.5 s backoff would
        # pass the deadline, so no retry is made.
        try:
            await router.submit(req(timeout=0.7))
        except RouterError as exc:
            with_errors.append(exc)
        assert len(with_errors) == 2
        assert len(prov.calls) == 3
        assert lane.breaker.state_at(trio.current_time()) == "half_open"

        await trio.sleep_until(3.0)
        results: list[object] = []

        async def one() -> None:
            try:
                results.append(await router.submit(req()))
            except RouterError as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
    probes_at_3 = [c for c in prov.calls if c.time == 3.0]
    assert len(probes_at_3) == 1, (
        f"half_open_probes = 1 but {len(probes_at_3)} concurrent probes were sent"
    )
    assert sum(isinstance(r, ChatResponse) for r in results) == 1
