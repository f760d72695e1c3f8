"""Tenant quotas: each gateway key's requests per minute, tokens per minute and budget.

A `[[gateway.api_keys]]` entry may carry `rpm`, `tpm` and `budget_usd` (per UTC day or
month, `budget_period`). The gateway asks `TenantQuotas.admit` before it calls the
router; a refusal becomes a 429 with ``Retry-After`` (seconds until the window frees
a request, or until the budget's period ends) and no upstream call. After the answer
`settle` replaces the token estimate by the reported usage and charges the cost.

The rules are the upstream keys' budgets' (`router._budget`), reused:

- RPM and TPM are a sliding 60 s window (`RateBudget`): a request counts from its
  admission for 60 s. TPM counts the prompt's offline estimate up front, then the
  usage the provider reported (prompt + completion) replaces it; a request estimated
  over the whole `tpm` is admitted alone on an empty window rather than never.
- The budget is checked before a request and charged after it, by the answer's
  `cost_usd`: requests already running when it runs out finish (the overshoot is
  what they cost), and answers of models without a price cost nothing here.

With `[router.shared]` the windows and the spend live in Redis (under the router's
`key_prefix`), so every worker and host enforces one limit: one Lua script per
request checks the budget and reserves in the window atomically (Redis's clock for
the window; the period of the budget is the UTC calendar's, from the gateway's
clock), bounded by `budget_timeout`; reconciling and charging are queued off the
request path. Each instance also counts locally. When Redis does not answer, the
local counts decide (each instance then enforces the limits alone), a warning is
logged once per outage and `llm_router_quota_local_decisions_total` counts the
decisions: a request never fails because of Redis.

What this module must never do: call upstream for a refused request, fail a request
because Redis is down, or name a key's secret (keys are named by their ids).
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import trio

from .._budget import WINDOW, RateBudget, Reservation
from .._config import GatewayKey
from .._shared import WINDOW_SLIDE

if TYPE_CHECKING:
    from .._shared import SharedState
    from .._types import Usage

__all__ = [
    "QuotaClock",
    "Refusal",
    "TenantQuotas",
    "Ticket",
    "current",
    "default_clock",
    "usage_report",
]

log = logging.getLogger("router.gateway")

_LIMITS: Final = ("", "rpm", "tpm")

# KEYS: the window's times (sorted set), their tokens (hash), the tokens held, the
# period's spend. ARGV: rpm (0: none), tpm (0: none), tokens, member, window ms, budget
# ("": none). Returns {1, 0, 0} admitted, {0, ms until it would be, 1 rpm | 2 tpm}, or
# {2, 0, 0} when the budget is spent.
_ADMIT: Final = (
    """
if ARGV[6] ~= '' then
  local spent = tonumber(redis.call('GET', KEYS[4])) or 0
  if spent >= tonumber(ARGV[6]) then return {2, 0, 0} end
end
"""
    + WINDOW_SLIDE
    + """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
if rpm > 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, math.max(1, tonumber(oldest[2]) + window - now), 1}
end
local held = tonumber(redis.call('GET', KEYS[3])) or 0
if tpm > 0 and held > 0 and held + tokens > tpm then
  local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  local wait = window
  for i = 1, #entries, 2 do
    held = held - (tonumber(redis.call('HGET', KEYS[2], entries[i])) or 0)
    if held <= 0 or held + tokens <= tpm then
      wait = tonumber(entries[i + 1]) + window - now
      break
    end
  end
  return {0, math.max(1, wait), 2}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('HSET', KEYS[2], ARGV[4], tokens)
redis.call('INCRBY', KEYS[3], tokens)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], window * 2) end
return {1, 0, 0}
"""
)

# KEYS: as _ADMIT's first three. ARGV: member, actual tokens.
_RECONCILE: Final = """
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
if old == nil then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - old)
return 1
"""

# KEYS[1]: the period's spend. ARGV: USD, expiry (Unix ms: a day past the period's end).
_SPEND: Final = """
redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1]: the usage hash. ARGV: groups of six: the field prefix (tenant, model), then
# requests, input, output, cached input tokens, USD to add.
_USAGE_ADD: Final = """
for i = 1, #ARGV, 6 do
  local p = ARGV[i]
  redis.call('HINCRBY', KEYS[1], p .. 'requests', ARGV[i + 1])
  redis.call('HINCRBY', KEYS[1], p .. 'input_tokens', ARGV[i + 2])
  redis.call('HINCRBY', KEYS[1], p .. 'output_tokens', ARGV[i + 3])
  redis.call('HINCRBY', KEYS[1], p .. 'cached_input_tokens', ARGV[i + 4])
  if tonumber(ARGV[i + 5]) > 0 then
    redis.call('HINCRBYFLOAT', KEYS[1], p .. 'cost_usd', ARGV[i + 5])
  end
end
return 1
"""
_FLUSH_EVERY: Final = 1.0
"""Seconds between writes of the usage totals to Redis (one script for all of them)."""

_READ: Final = """
local out = {redis.call('HGETALL', KEYS[1])}
local spends = {}
for i = 2, #KEYS do spends[#spends + 1] = redis.call('GET', KEYS[i]) or '0' end
out[2] = spends
return out
"""

_SEP: Final = "\x1f"

current: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar(
    "router_quota_ticket", default=None
)
"""The ticket of the request being served, until it is settled."""


class QuotaClock:
    """Where quotas read the time: `now` for the 60 s windows (trio's clock), `wall`
    for the budget's UTC calendar periods. Tests replace them."""

    def now(self) -> float:
        return trio.current_time()

    def wall(self) -> float:
        return time.time()


default_clock = QuotaClock()
"""The clock a `TenantQuotas` reads unless given one."""


def period_of(wall: float, kind: str) -> tuple[str, float]:
    """The UTC calendar period (``2026-01-05`` or ``2026-01``) holding `wall`, and its
    end (Unix seconds)."""
    at = datetime.fromtimestamp(math.floor(wall), UTC)  # no rounding into the next one
    if kind == "day":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), start.timestamp() + 86_400.0
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        end = start.replace(year=start.year + 1, month=1)
    else:
        end = start.replace(month=start.month + 1)
    return start.strftime("%Y-%m"), end.timestamp()


class Refusal:
    """Why a request is over its key's quota, and when to retry."""

    __slots__ = ("limit", "message", "retry_after")

    def __init__(self, limit: str, retry_after: float, message: str) -> None:
        self.limit = limit
        """"rpm", "tpm" or "budget"."""
        self.retry_after = retry_after
        self.message = message


def _limits(key: GatewayKey) -> tuple[object, ...]:
    return (key.rpm, key.tpm, key.budget_usd, key.budget_period)


class _KeyQuota:
    """One gateway key's limits and local counts."""

    __slots__ = ("budget", "config", "id", "period", "spent", "window")

    def __init__(self, config: GatewayKey) -> None:
        self.config = config
        self.id = config.id
        self.window = (
            RateBudget(config.rpm, config.tpm)
            if config.rpm is not None or config.tpm is not None
            else None
        )
        self.budget = config.budget_usd
        self.period = ""
        self.spent = 0.0
        """USD spent in `period` (this instance's own count)."""

    def spent_in(self, period: str) -> float:
        if period != self.period:
            self.period, self.spent = period, 0.0
        return self.spent


class Ticket:
    """An admitted request's hold on its key's quota, settled after the answer."""

    __slots__ = ("member", "quota", "reservation", "tokens")

    def __init__(
        self, quota: _KeyQuota, reservation: Reservation | None, member: str | None, tokens: int
    ) -> None:
        self.quota = quota
        self.reservation = reservation
        self.member = member
        """The shared window's reservation id (None: counted locally only)."""
        self.tokens = tokens


class TenantQuotas:
    """The quotas of every gateway key that has one (see the module docstring)."""

    def __init__(self, keys: list[GatewayKey], clock: QuotaClock | None = None) -> None:
        self._quotas = {
            k.id: _KeyQuota(k)
            for k in keys
            if k.rpm is not None or k.tpm is not None or k.budget_usd is not None
        }
        self.clock = clock or default_clock
        self.shared: SharedState | None = None
        """Set by the gateway when the router shares state through Redis."""
        self.shared_timeout = 0.1
        self.local_decisions = 0
        """Checks decided by local counts alone because Redis did not answer."""
        self._warned = False
        self._seq = 0
        self._usage: dict[tuple[str, str], list[float]] = {}
        """Usage not yet added to the shared totals, per (tenant, model)."""
        self._flushed = -math.inf
        self._ticking: SharedState | None = None

    def __bool__(self) -> bool:
        return bool(self._quotas)

    def reconfigure(self, keys: list[GatewayKey]) -> None:
        """The gateway keys after a reload: a key whose limits did not change keeps its
        counts (its window and this period's spend); a new or changed one starts
        afresh; a removed one is forgotten (tickets it issued still settle)."""
        old = self._quotas
        quotas: dict[str, _KeyQuota] = {}
        for k in keys:
            if k.rpm is None and k.tpm is None and k.budget_usd is None:
                continue
            kept = old.get(k.id)
            if kept is not None and _limits(kept.config) == _limits(k):
                kept.config = k
                quotas[k.id] = kept
            else:
                quotas[k.id] = _KeyQuota(k)
        self._quotas = quotas

    def needs_tokens(self, key_id: str) -> bool:
        quota = self._quotas.get(key_id)
        return quota is not None and quota.config.tpm is not None

    def _keys(self, quota: _KeyQuota, period: str) -> list[str]:
        shared = self.shared
        assert shared is not None
        base = shared.key("quota", quota.id)
        return [f"{base}:times", f"{base}:tokens", f"{base}:held", f"{base}:spend:{period}"]

    async def admit(self, key_id: str, tokens: int) -> Ticket | Refusal | None:
        """Admit one request of `key_id` expected to use `tokens` prompt tokens: a
        ticket to `settle`, a refusal, or None when the key has no quota."""
        quota = self._quotas.get(key_id)
        if quota is None:
            return None
        cfg = quota.config
        now = self.clock.now()
        wall = self.clock.wall()
        period, end = period_of(wall, cfg.budget_period)
        shared = self.shared
        if shared is not None:
            self._seq += 1
            member = f"{shared.instance}:{self._seq}"
            args = [cfg.rpm or 0, cfg.tpm or 0, tokens, member, int(WINDOW * 1000)]
            args.append(repr(cfg.budget_usd) if cfg.budget_usd is not None else "")
            result = await shared.call(_ADMIT, self._keys(quota, period), args, self.shared_timeout)
            if result is not None:
                self._warned = False
                code, wait_ms = int(result[0]), int(result[1])
                if code == 2:
                    return self._over_budget(quota, end - wall)
                if code == 0:
                    return self._over_window(quota, _LIMITS[int(result[2])], wait_ms / 1000)
                reservation = None
                if quota.window is not None:  # local counts too, for an outage
                    reservation = quota.window.try_reserve(now, tokens)
                return Ticket(quota, reservation, member, tokens)
            self.local_decisions += 1
            if not self._warned:
                self._warned = True
                log.warning(
                    "tenant quotas are counted locally: Redis did not answer (each instance "
                    "enforces the limits alone until it does)"
                )
        if quota.budget is not None and quota.spent_in(period) >= quota.budget:
            return self._over_budget(quota, end - wall)
        reservation = None
        if quota.window is not None:
            reservation = quota.window.try_reserve(now, tokens)
            if reservation is None:
                window = quota.window
                requests, _ = window.remaining(now)
                limit = "rpm" if requests is not None and requests <= 0 else "tpm"
                return self._over_window(quota, limit, window.available_at(now, tokens) - now)
        return Ticket(quota, reservation, None, tokens)

    def _over_budget(self, quota: _KeyQuota, left: float) -> Refusal:
        cfg = quota.config
        return Refusal(
            "budget",
            max(1.0, left),
            f"gateway key {quota.id!r} has spent its budget of ${cfg.budget_usd:g} for this "
            f"{cfg.budget_period} (UTC)",
        )

    def _over_window(self, quota: _KeyQuota, limit: str, wait: float) -> Refusal:
        cfg = quota.config
        value = cfg.rpm if limit == "rpm" else cfg.tpm
        what = "requests" if limit == "rpm" else "tokens"
        return Refusal(
            limit,
            max(1.0, wait),
            f"gateway key {quota.id!r} is over its limit of {value} {what} per minute",
        )

    def settle(self, ticket: Ticket, actual: int | None, cost: float | None) -> None:
        """The request ended: its tokens are the reported usage, `actual` (kept at the
        estimate when None: nothing was reported), its cost is charged to the budget."""
        quota = ticket.quota
        shared = self.shared
        if actual is not None:
            if ticket.reservation is not None and quota.window is not None:
                quota.window.reconcile(ticket.reservation, actual, self.clock.now())
            if ticket.member is not None and shared is not None and quota.config.tpm is not None:
                keys = self._keys(quota, "")[:3]
                shared.call_later(_RECONCILE, keys, [ticket.member, actual])
        if cost is None or not cost > 0 or not math.isfinite(cost):
            return
        wall = self.clock.wall()
        period, end = period_of(wall, quota.config.budget_period)
        quota.spent_in(period)
        quota.spent += cost
        if shared is not None and quota.budget is not None:
            expires = int((end + 86_400.0) * 1000)
            shared.call_later(_SPEND, [self._keys(quota, period)[3]], [repr(cost), expires])

    # -- usage totals shared through Redis (``/v1/router/usage``) -------------------------

    def add_usage(self, tenant: str | None, model: str, usage: Usage, cost: float | None) -> None:
        """Add one answer to the shared usage totals (a no-op without Redis). Summed
        here and written at most every `_FLUSH_EVERY` seconds, off the request path."""
        shared = self.shared
        if shared is None:
            return
        row = self._usage.get((tenant or "", model))
        if row is None:
            if len(self._usage) >= 10_000:
                return
            row = self._usage[tenant or "", model] = [0, 0, 0, 0, 0.0]
        row[0] += 1
        row[1] += usage.prompt_tokens
        row[2] += usage.completion_tokens
        row[3] += usage.cached_tokens
        if cost is not None and math.isfinite(cost):
            row[4] += cost
        if self._ticking is not shared:
            self._ticking = shared
            shared.tickers.append(self.flush_usage)

    def flush_usage(self) -> None:
        """Queue the summed usage for Redis if `_FLUSH_EVERY` has passed (called by the
        shared state's monitor task)."""
        shared = self.shared
        now = self.clock.now()
        if shared is None or not self._usage or now - self._flushed < _FLUSH_EVERY:
            return
        if not shared.reachable:
            return  # kept (bounded) until Redis is back
        self._flushed = now
        shared.call_later(_USAGE_ADD, [shared.key("usage", "totals")], self._take_usage())

    def _take_usage(self) -> list[Any]:
        args: list[Any] = []
        for (tenant, model), row in self._usage.items():
            args.append(_SEP.join((tenant, model)) + _SEP)
            args += [int(n) for n in row[:4]]
            args.append(repr(row[4]))
        self._usage.clear()
        return args

    async def read_shared(self) -> tuple[list[dict[str, Any]], dict[str, float]] | None:
        """The shared usage totals as rows (tenant, model, counts) and each quota key's
        spend in its current period, or None when Redis does not answer."""
        shared = self.shared
        if shared is None:
            return None
        if self._usage:  # what this instance has not written yet
            self._flushed = self.clock.now()
            pending = self._take_usage()
            await shared.call(_USAGE_ADD, [shared.key("usage", "totals")], pending, 1.0)
        wall = self.clock.wall()
        quotas = [q for q in self._quotas.values() if q.budget is not None]
        keys = [shared.key("usage", "totals")]
        keys += [self._keys(q, period_of(wall, q.config.budget_period)[0])[3] for q in quotas]
        result = await shared.call(_READ, keys, [], max(self.shared_timeout, 1.0))
        if result is None:
            return None
        flat, spends = result[0], result[1]
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for i in range(0, len(flat) - 1, 2):
            field = _text(flat[i])
            tenant, model, name = field.split(_SEP, 2)
            row = rows.setdefault(
                (tenant, model), {"tenant": tenant or None, "model": model, "cost_usd": 0.0}
            )
            value = _text(flat[i + 1])
            row[name] = float(value) if name == "cost_usd" else int(value)
        spent = {q.id: float(_text(s)) for q, s in zip(quotas, spends, strict=True)}
        return list(rows.values()), spent

    def local_spend(self) -> dict[str, float]:
        """Each budgeted key's spend in its current period, counted by this instance."""
        wall = self.clock.wall()
        return {
            q.id: q.spent_in(period_of(wall, q.config.budget_period)[0])
            for q in self._quotas.values()
            if q.budget is not None
        }

    def limits(self, spent: dict[str, float]) -> list[dict[str, Any]]:
        """Each key's limits and its spend in the current period (no secrets)."""
        out = []
        for q in self._quotas.values():
            c = q.config
            out.append(
                {
                    "key_id": c.id,
                    "tenant": c.tenant if c.tenant is not None else c.id,
                    "rpm": c.rpm,
                    "tpm": c.tpm,
                    "budget_usd": c.budget_usd,
                    "budget_period": c.budget_period,
                    "spent_usd": spent.get(c.id) if c.budget_usd is not None else None,
                }
            )
        return out


_TOTALS: Final = ("requests", "input_tokens", "output_tokens", "cached_input_tokens", "cost_usd")


def usage_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows of (tenant, model, totals) summed per tenant (with its models) and per
    model, for ``/v1/router/usage``."""
    tenants: dict[str | None, dict[str, Any]] = {}
    models: dict[str, dict[str, Any]] = {}
    for row in rows:
        tenant = tenants.setdefault(
            row["tenant"], {"tenant": row["tenant"], **_zero(), "models": {}}
        )
        for into in (tenant, tenant["models"].setdefault(row["model"], _zero())):
            _add(into, row)
        _add(models.setdefault(row["model"], _zero()), row)
    return {"tenants": list(tenants.values()), "models": models}


def _zero() -> dict[str, Any]:
    return {name: 0.0 if name == "cost_usd" else 0 for name in _TOTALS}


def _add(into: dict[str, Any], row: dict[str, Any]) -> None:
    for name in _TOTALS:
        into[name] += row.get(name, 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
