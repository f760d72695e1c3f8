"""Usage and cost: what each answer cost, and the running totals per model, key and tenant.

Two pieces, both plain objects the router owns:

- `PriceBook` turns a response's usage into US dollars. Prices come from the
  `genai-prices` table (kept current upstream for the major providers), looked up by
  the serving provider and the upstream model id, unless the model's own `price`
  (USD per million tokens on `[[models]]`) overrides it. Which table row prices a
  provider: its `pricing` setting (a genai-prices provider id, or "none"), else the
  provider whose API its `base_url` points at (matched by genai-prices's own URL
  patterns). A base_url no table provider claims (a vLLM server, a company proxy in
  front of OpenAI, the emulator on loopback) is not priced as OpenAI just because it
  speaks OpenAI's protocol: it has no price unless configured. Simulated and custom
  providers likewise. No price means `cost_usd = None`, never a guess.
- `UsageLedger` sums tokens and cost per (model, provider, key, tenant) since the
  router opened: the gateway's Prometheus counters and ``/v1/router/usage`` read it.

Cost per request must be cheap: the price of a (provider, upstream) pair is resolved
once and cached (bounded). A table row with flat per-token prices is reduced to four
floats, read off genai-prices's own calculation of one million tokens of each kind, so
that its rules (prompt tokens include cache reads and writes, an absent cache price
falls back as the table says) carry over exactly; a request then costs four
multiplications. Rows with tiered (by prompt size) or dated prices are priced by
genai-prices itself per request. Only token prices count: per-request and tool fees
(web searches) are not reported by the providers' usage and are left out.

What this module must never do: invent a price, raise into the request path (a table
error means no price), or grow without bound (ledger rows and cached prices are capped).
"""

from __future__ import annotations

import functools
import ipaddress
import math
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec

from ._config import PriceConfig, ProviderConfig, RouterConfig
from ._types import Usage

__all__ = [
    "PriceBook",
    "Rate",
    "UsageLedger",
    "UsageRow",
    "UsageSnapshot",
    "known_price_table",
    "load_table",
    "needs_table",
]

_MTOK: Final = 1_000_000
_MAX_PRICES: Final = 4096
"""(provider, upstream) pairs whose price is cached (ad-hoc names are unbounded)."""
_MAX_ROWS: Final = 10_000
"""Ledger rows kept; past it new combinations are summed into one `OTHER` row."""
OTHER: Final = "(other)"


class Rate:
    """Flat prices in USD per token: prompt tokens not from the cache, cache reads,
    cache writes, and completion tokens."""

    __slots__ = ("cache_write", "cached", "input", "output")

    def __init__(self, input: float, cached: float, cache_write: float, output: float) -> None:
        self.input = input
        self.cached = cached
        self.cache_write = cache_write
        self.output = output

    @classmethod
    def per_million(cls, price: PriceConfig) -> Rate:
        cached = price.cached_input if price.cached_input is not None else price.input
        write = price.cache_write if price.cache_write is not None else price.input
        return cls(price.input / _MTOK, cached / _MTOK, write / _MTOK, price.output / _MTOK)

    def cost(self, prompt: int, cached: int, written: int, completion: int) -> float:
        fresh = max(0, prompt - cached - written)
        return (
            fresh * self.input
            + cached * self.cached
            + written * self.cache_write
            + completion * self.output
        )

    def __repr__(self) -> str:
        m = _MTOK
        return (
            f"Rate(input={self.input * m:g}, cached={self.cached * m:g}, "
            f"cache_write={self.cache_write * m:g}, output={self.output * m:g} per MTok)"
        )


class _TablePrice:
    """A table row genai-prices must price itself (tiers by prompt size, dated prices)."""

    __slots__ = ("model", "provider")

    def __init__(self, provider: Any, model: Any) -> None:
        self.provider = provider
        self.model = model

    def cost(self, prompt: int, cached: int, written: int, completion: int) -> float | None:
        from genai_prices import Usage as TableUsage

        usage = TableUsage(
            input_tokens=prompt,
            cache_read_tokens=cached,
            cache_write_tokens=written,
            output_tokens=completion,
        )
        try:
            return float(self.model.calc_price(usage, self.provider).total_price)
        except Exception:  # a row the table cannot price for this usage: no price
            return None


Pricer = Rate | _TablePrice


@functools.cache
def _table() -> Any:
    """genai-prices's bundled snapshot (imported on first use: it is a large module)."""
    from genai_prices import data_snapshot

    return data_snapshot.get_snapshot()


def known_price_table(provider_id: str) -> bool:
    """Whether `provider_id` names a provider of the price table."""
    return any(p.id == provider_id for p in _table().providers)


def _may_be_priced(config: ProviderConfig) -> bool:
    """Whether the table may price a provider: named by `pricing`, or an HTTP provider
    whose base_url is a public host name (every provider of the table is; a loopback,
    an IP address or a single-label host never is, so the table is not even loaded)."""
    if config.pricing is not None:
        return config.pricing != "none"
    if config.kind not in ("openai", "anthropic", "gemini") or not config.base_url:
        return False
    host = (urlsplit(config.base_url).hostname or "").lower()
    if "." not in host or host.endswith((".local", ".internal", ".localhost")):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def needs_table(config: RouterConfig) -> bool:
    """Whether pricing `config`'s answers may need the price table (about a second to
    load: the router loads it in a thread when it opens)."""
    return any(_may_be_priced(p) for p in config.providers)


def load_table() -> None:
    _table()


def _table_provider(config: ProviderConfig) -> Any | None:
    """The price table's provider for a configured provider (see the module docstring)."""
    if not _may_be_priced(config):
        return None
    snapshot = _table()
    if config.pricing is not None:
        return next((p for p in snapshot.providers if p.id == config.pricing), None)
    try:
        return snapshot.find_provider(None, None, config.base_url)
    except Exception:  # no table provider claims this URL
        return None


def _table_price(provider: Any, upstream: str) -> Pricer | None:
    from genai_prices import Usage as TableUsage
    from genai_prices.types import ModelPrice, TieredPrices

    try:
        model = provider.find_model(upstream.lower(), all_providers=_table().providers)
    except Exception:
        return None
    if model is None:
        return None
    prices = model.prices
    if not isinstance(prices, ModelPrice) or any(
        isinstance(v, TieredPrices) for v in vars(prices).values()
    ):
        return _TablePrice(provider, model)
    if getattr(prices, "input_mtok", None) is None and getattr(prices, "output_mtok", None) is None:
        return None  # priced by something other than tokens
    try:

        def of(**counts: int) -> float:
            return float(prices.calc_price(TableUsage(**counts))["total_price"]) / _MTOK

        fresh = of(input_tokens=_MTOK)
        return Rate(
            fresh,
            of(input_tokens=_MTOK, cache_read_tokens=_MTOK),
            of(input_tokens=_MTOK, cache_write_tokens=_MTOK),
            of(output_tokens=_MTOK),
        )
    except Exception:
        return _TablePrice(provider, model)


class PriceBook:
    """Prices of the configured providers' models (see the module docstring)."""

    __slots__ = ("_cache", "_configs", "_overrides", "_providers")

    def __init__(self, config: RouterConfig) -> None:
        self._overrides: dict[str, Rate] = {
            m.name: Rate.per_million(m.price) for m in config.models if m.price is not None
        }
        self._configs: dict[str, ProviderConfig] = {p.name: p for p in config.providers}
        self._providers: dict[str, Any] = {}
        """Provider name -> its table provider (None: unpriced), resolved on first use."""
        self._cache: dict[tuple[str, str], Pricer | None] = {}

    def pricer(self, model: str, provider: str, upstream: str) -> Pricer | None:
        """How to price an answer of `upstream` served by `provider` for the chain entry
        `model` (a configured model's own price wins), or None: no price."""
        rate = self._overrides.get(model)
        if rate is not None:
            return rate
        key = (provider, upstream)
        cache = self._cache
        if key in cache:
            return cache[key]
        if provider in self._providers:
            table_provider = self._providers[provider]
        else:
            config = self._configs.get(provider)
            table_provider = _table_provider(config) if config is not None else None
            self._providers[provider] = table_provider
        found = _table_price(table_provider, upstream) if table_provider is not None else None
        if len(cache) >= _MAX_PRICES:
            del cache[next(iter(cache))]
        cache[key] = found
        return found

    def cost(self, model: str, provider: str, upstream: str, usage: Usage) -> float | None:
        """The answer's cost in USD, or None when the model has no price."""
        pricer = self.pricer(model, provider, upstream)
        if pricer is None:
            return None
        return pricer.cost(
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.cache_creation_tokens,
            usage.completion_tokens,
        )


class UsageRow(msgspec.Struct, frozen=True, kw_only=True):
    """Totals of one (model, provider, key, tenant) since the ledger began."""

    model: str
    """The chain entry that served (a configured name or `provider/upstream`)."""
    provider: str
    key_id: str
    tenant: str | None
    """The request's tenant (the gateway key's); None: no tenant."""
    requests: int
    """Answers counted (a continued stream counts once per segment that reported usage)."""
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    """Prompt tokens read from the provider's cache (part of `input_tokens`)."""
    cost_usd: float
    """The summed cost of the priced answers."""
    unpriced: int
    """Answers whose model had no price (counted in the tokens, not in the cost)."""


class UsageSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    since: float
    """Wall-clock time (Unix seconds) the totals start from."""
    rows: list[UsageRow]


class _Tally:
    __slots__ = ("cached", "cost", "input", "output", "requests", "unpriced")

    def __init__(self) -> None:
        self.requests = 0
        self.input = 0
        self.output = 0
        self.cached = 0
        self.cost = 0.0
        self.unpriced = 0


class UsageLedger:
    """Token and cost totals per (model, provider, key, tenant), in this process.

    `record` is called once per answer (per stream segment that reported usage) with
    its usage and cost."""

    __slots__ = ("_rows", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self._rows: dict[tuple[str, str, str, str | None], _Tally] = {}

    def record(
        self,
        model: str,
        provider: str,
        key_id: str,
        tenant: str | None,
        usage: Usage,
        cost: float | None,
    ) -> None:
        rows = self._rows
        key = (model, provider, key_id, tenant)
        tally = rows.get(key)
        if tally is None:
            if len(rows) >= _MAX_ROWS:
                key = (OTHER, OTHER, OTHER, OTHER)
                tally = rows.get(key)
            if tally is None:
                tally = rows[key] = _Tally()
        tally.requests += 1
        tally.input += usage.prompt_tokens
        tally.output += usage.completion_tokens
        tally.cached += usage.cached_tokens
        if cost is None:
            tally.unpriced += 1
        elif math.isfinite(cost):
            tally.cost += cost

    def snapshot(self) -> UsageSnapshot:
        return UsageSnapshot(
            since=self.since,
            rows=[
                UsageRow(
                    model=model,
                    provider=provider,
                    key_id=key_id,
                    tenant=tenant,
                    requests=t.requests,
                    input_tokens=t.input,
                    output_tokens=t.output,
                    cached_input_tokens=t.cached,
                    cost_usd=t.cost,
                    unpriced=t.unpriced,
                )
                for (model, provider, key_id, tenant), t in self._rows.items()
            ],
        )
