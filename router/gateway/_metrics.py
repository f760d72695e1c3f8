"""The gateway's Prometheus metrics, on a registry of its own (never the global one).

Counters and histograms are updated as requests finish; per-key gauges (the key's own
breaker state and cooldown, in-flight, queued), per-lane gauges (one upstream model on
one key: its breaker state, rate-limit cooldown and breaker opens) and per-model health
are read from `Router.snapshot()` at scrape time by a custom collector, so they are
never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._router import RouterSnapshot
from .._types import Attempt
from .._usage import UsageSnapshot
from ._quota import TenantQuotas

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_BREAKER: Final = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
_HEALTH: Final = {"healthy": 0.0, "cooling": 1.0, "disabled": 2.0}
_COOLING_KINDS: Final = frozenset({"rate_limit", "auth", "balance"})
_LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
_OVERHEAD_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)  # fmt: skip


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], RouterSnapshot | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        if snap is None:
            return
        labels = ["provider", "key_id"]
        breaker = GaugeMetricFamily(
            "llm_router_key_breaker_state",
            "The key's own circuit breaker (auth and connection failures, which stop every "
            "model of the key): 0 closed, 1 half-open, 2 open",
            labels=labels,
        )
        in_flight = GaugeMetricFamily(
            "llm_router_key_in_flight", "Upstream attempts in flight per key", labels=labels
        )
        queued = GaugeMetricFamily(
            "llm_router_key_queued", "Jobs waiting for a concurrency slot per key", labels=labels
        )
        cooling = GaugeMetricFamily(
            "llm_router_key_cooldown_seconds",
            "Seconds of the key's own cooldown left (auth, balance; 0 when not cooling)",
            labels=labels,
        )
        opens = CounterMetricFamily(
            "llm_router_key_breaker_opens", "Times the key's own breaker opened", labels=labels
        )
        upstream = CounterMetricFamily(
            "llm_router_key_upstream_requests",
            "Upstream attempts sent per key, by result",
            labels=[*labels, "result"],
        )
        for k in snap.keys:
            lv = [k.provider, k.key_id]
            breaker.add_metric(lv, _BREAKER.get(k.breaker, 2.0))
            in_flight.add_metric(lv, k.in_flight)
            queued.add_metric(lv, k.queued)
            cooling.add_metric(lv, k.cooling_for)
            opens.add_metric(lv, k.opens)
            upstream.add_metric([*lv, "success"], k.successes)
            upstream.add_metric([*lv, "failure"], k.failures)
        lane_labels = [*labels, "model"]
        lane_breaker = GaugeMetricFamily(
            "llm_router_lane_breaker_state",
            "Circuit breaker of one upstream model on one key (that model's 5xx, timeouts "
            "and 429s): 0 closed, 1 half-open, 2 open",
            labels=lane_labels,
        )
        lane_cooling = GaugeMetricFamily(
            "llm_router_lane_cooldown_seconds",
            "Seconds of rate-limit cooldown left for one upstream model on one key "
            "(0 when not cooling)",
            labels=lane_labels,
        )
        lane_opens = CounterMetricFamily(
            "llm_router_lane_breaker_opens",
            "Times the breakers of one upstream model on one key opened (per-tenant "
            "breakers included)",
            labels=lane_labels,
        )
        for k in snap.keys:
            for lane in k.lanes:
                lv = [k.provider, k.key_id, lane.model]
                lane_breaker.add_metric(lv, _BREAKER.get(lane.breaker, 2.0))
                lane_cooling.add_metric(lv, lane.cooling_for)
                lane_opens.add_metric(lv, lane.opens)
        health = GaugeMetricFamily(
            "llm_router_model_health",
            "Model health: 0 healthy, 1 cooling, 2 disabled",
            labels=["model", "provider"],
        )
        for m in snap.models:
            health.add_metric([m.name, m.provider], _HEALTH.get(m.health, 2.0))
        yield from (breaker, in_flight, queued, cooling, opens, upstream)
        yield from (lane_breaker, lane_cooling, lane_opens, health)


class _UsageCollector(Collector):
    """Tokens and cost from the router's ledger, at scrape time.

    Per (model, provider, key_id) and, apart, per tenant: tenants are bounded under the
    gateway (one per configured gateway key), but a tenant label on the per-key series
    would multiply them (models x keys x tenants); two families keep the series count
    additive, and ``/v1/router/usage`` has the tenant x model breakdown."""

    def __init__(
        self, usage: Callable[[], UsageSnapshot | None], quotas: TenantQuotas | None
    ) -> None:
        self._usage = usage
        self._quotas = quotas

    def collect(self) -> Iterator[Metric]:
        snap = self._usage()
        if snap is not None:
            labels = ["model", "provider", "key_id"]
            tokens = CounterMetricFamily(
                "llm_router_tokens",
                "Tokens of answered requests by direction (input, output, cached_input: the "
                "part of input read from the provider's cache) and the model/provider/key "
                "that served",
                labels=["direction", *labels],
            )
            cost = CounterMetricFamily(
                "llm_router_cost_usd",
                "Cost in USD of answered requests whose model has a price",
                labels=labels,
            )
            t_tokens = CounterMetricFamily(
                "llm_router_tenant_tokens",
                "Tokens of answered requests by direction and tenant (the gateway key's)",
                labels=["direction", "tenant"],
            )
            t_cost = CounterMetricFamily(
                "llm_router_tenant_cost_usd",
                "Cost in USD of answered requests by tenant",
                labels=["tenant"],
            )
            per_key: dict[tuple[str, str, str], list[float]] = {}
            per_tenant: dict[str, list[float]] = {}
            for r in snap.rows:
                counts: tuple[float, ...] = (
                    r.input_tokens,
                    r.output_tokens,
                    r.cached_input_tokens,
                    r.cost_usd,
                )
                for into in (
                    per_key.setdefault((r.model, r.provider, r.key_id), [0.0] * 4),
                    per_tenant.setdefault(r.tenant or "", [0.0] * 4),
                ):
                    for at, n in enumerate(counts):
                        into[at] += n
            for (model, provider, key_id), (i, o, c, usd) in per_key.items():
                tokens.add_metric(["input", model, provider, key_id], i)
                tokens.add_metric(["output", model, provider, key_id], o)
                tokens.add_metric(["cached_input", model, provider, key_id], c)
                cost.add_metric([model, provider, key_id], usd)
            for tenant, (i, o, c, usd) in per_tenant.items():
                t_tokens.add_metric(["input", tenant], i)
                t_tokens.add_metric(["output", tenant], o)
                t_tokens.add_metric(["cached_input", tenant], c)
                t_cost.add_metric([tenant], usd)
            yield from (tokens, cost, t_tokens, t_cost)
        if self._quotas is not None:
            local = CounterMetricFamily(
                "llm_router_quota_local_decisions",
                "Tenant quota checks decided by this instance's own counts because Redis "
                "did not answer",
            )
            local.add_metric([], self._quotas.local_decisions)
            yield local


class GatewayMetrics:
    """Every metric of one gateway app, on `self.registry`."""

    def __init__(
        self,
        snapshot: Callable[[], RouterSnapshot | None],
        usage: Callable[[], UsageSnapshot | None] | None = None,
        quotas: TenantQuotas | None = None,
    ) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "llm_router_requests",
            "Chat requests answered, by the model/provider/key that served (or last failed) "
            "and the outcome (ok or an error kind)",
            ["model", "provider", "key_id", "outcome"],
            registry=registry,
        )
        self.http_responses = Counter(
            "llm_router_http_responses",
            "HTTP responses by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.attempts = Counter(
            "llm_router_attempts",
            "Upstream attempts, by model/provider/key and outcome",
            ["model", "provider", "key_id", "outcome"],
            registry=registry,
        )
        self.retries = Counter(
            "llm_router_retries",
            "In-place retries on the same key",
            ["provider", "key_id"],
            registry=registry,
        )
        self.failovers = Counter(
            "llm_router_failovers",
            "Moves to another key of the same model (kind=key) or to the next model (kind=model)",
            ["from_model", "kind"],
            registry=registry,
        )
        self.cooldowns = Counter(
            "llm_router_cooldowns",
            "Attempts that put their key (auth, balance) or the key's lane for the model "
            "(rate limit) into cooldown",
            ["provider", "key_id", "reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "llm_router_request_duration_seconds",
            "Time from request received to response complete",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "llm_router_overhead_seconds",
            "The gateway's and router's own time: total minus time in upstream attempts",
            buckets=_OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "llm_router_time_to_first_token_seconds",
            "Streams: time from request received to the first content chunk",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "llm_router_gateway_in_flight",
            "Chat requests being served by the gateway now",
            registry=registry,
        )
        self.connections = Gauge(
            "llm_router_gateway_connections",
            "Client connections open now",
            registry=registry,
        )
        self.rejected = Counter(
            "llm_router_gateway_rejected",
            "Requests and connections refused by the gateway's limits, by reason "
            "(in_flight, queue_delay, draining, connections, body_timeout, send_timeout)",
            ["reason"],
            registry=registry,
        )
        self.quota_rejected = Counter(
            "llm_router_quota_rejected",
            "Requests refused (429) by their gateway key's quota, by limit (rpm, tpm, budget)",
            ["gateway_key", "limit"],
            registry=registry,
        )
        registry.register(_SnapshotCollector(snapshot))
        if usage is not None:
            registry.register(_UsageCollector(usage, quotas))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_attempts(self, attempts: Sequence[Attempt]) -> None:
        prev: Attempt | None = None
        for a in attempts:
            self.attempts.labels(a.model, a.provider, a.key_id, a.outcome).inc()
            if a.outcome in _COOLING_KINDS:
                self.cooldowns.labels(a.provider, a.key_id, a.outcome).inc()
            if prev is not None:
                if prev.model == a.model and prev.key_id == a.key_id:
                    if prev.provider == a.provider:
                        self.retries.labels(a.provider, a.key_id).inc()
                elif prev.model == a.model:
                    self.failovers.labels(prev.model, "key").inc()
                else:
                    self.failovers.labels(prev.model, "model").inc()
            prev = a
