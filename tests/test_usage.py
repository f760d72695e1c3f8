"""Usage and cost in the library: `cost_usd` on answers, streams (a continued one
included) and embeddings, prices from genai-prices or a model's own `price`, no price
(None) rather than a guess, the ledger behind the gateway's counters, and the config
errors of prices."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from genai_prices import Usage as TableUsage
from genai_prices import calc_price
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from router import (
    ApiKey,
    ChatRequest,
    ChatResponse,
    ConfigError,
    Message,
    ProviderError,
    Router,
    RouterConfig,
    StreamChunk,
    StreamInterruptedError,
    Usage,
    _usage,
)
from router._types import EmbeddingRequest
from router._usage import PriceBook, Rate, UsageLedger, needs_table
from router.emulator import Emulator
from router.gateway._metrics import GatewayMetrics

ANSWER = Usage(prompt_tokens=1000, completion_tokens=100, total_tokens=1100, cached_tokens=200)


class Metered:
    """A custom provider that answers with a fixed usage per key; streams report their
    usage in the last chunk, and a key listed in `cut_after_usage` then drops the
    stream (usage reported, answer unfinished)."""

    def __init__(self, usage: dict[str, Usage] | None = None) -> None:
        self.usage = usage or {}
        self.cut_after_usage: set[str] = set()
        self.calls = 0

    def _usage(self, key: ApiKey) -> Usage:
        return self.usage.get(key.id, ANSWER)

    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        return ChatResponse(content="answer", usage=self._usage(key))

    async def stream(self, request: ChatRequest, key: ApiKey) -> AsyncIterator[StreamChunk]:
        self.calls += 1
        yield StreamChunk(text=f"from {key.id} ")
        if key.id in self.cut_after_usage:
            yield StreamChunk(usage=self._usage(key))
            raise ProviderError("transient", "connection reset mid-answer")
        yield StreamChunk(finish_reason="stop", usage=self._usage(key))


def config(
    *, pricing: str | None = "openai", upstream: str = "gpt-4o", **model: Any
) -> RouterConfig:
    provider: dict[str, Any] = {
        "name": "p",
        "kind": "custom",
        "keys": [{"id": "a"}, {"id": "b"}],
    }
    if pricing is not None:
        provider["pricing"] = pricing
    return RouterConfig.from_dict(
        {
            "router": {"max_continuations": 1},
            "providers": [
                provider,
                {"name": "free", "kind": "custom", "keys": [{"id": "f"}]},
            ],
            "models": [
                {"name": "m", "provider": "p", "upstream": upstream, **model},
                {"name": "local", "provider": "free", "upstream": "llama"},
            ],
        }
    )


def table_cost(usage: Usage, model: str = "gpt-4o", provider: str = "openai") -> float:
    priced = calc_price(
        TableUsage(
            input_tokens=usage.prompt_tokens,
            cache_read_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_creation_tokens,
            output_tokens=usage.completion_tokens,
        ),
        model,
        provider_id=provider,
    )
    return float(priced.total_price)


def ask(model: str = "m", tenant: str | None = None) -> ChatRequest:
    return ChatRequest(model=model, messages=[Message("user", "hi")], tenant=tenant)


async def test_cost_from_the_price_table_equals_genai_prices() -> None:
    async with Router.open(config(), {"p": Metered(), "free": Metered()}) as router:
        response = await router.submit(ask())
    assert response.cost_usd is not None
    assert response.cost_usd == pytest.approx(table_cost(ANSWER), rel=1e-12)
    # 800 fresh input at $2.50, 200 cached at $1.25, 100 output at $10 per MTok
    assert response.cost_usd == pytest.approx(0.00325, rel=1e-12)


async def test_a_tiered_price_is_priced_by_the_table_itself() -> None:
    big = Usage(prompt_tokens=300_000, completion_tokens=2000, cache_creation_tokens=1000)
    cfg = config(pricing="anthropic", upstream="claude-sonnet-4-5")
    async with Router.open(cfg, {"p": Metered({"a": big}), "free": Metered()}) as router:
        response = await router.submit(ask())
    expected = table_cost(big, "claude-sonnet-4-5", "anthropic")
    assert response.cost_usd == pytest.approx(expected, rel=1e-12)
    assert isinstance(router.prices.pricer("m", "p", "claude-sonnet-4-5"), _usage._TablePrice)


async def test_a_models_own_price_overrides_the_table() -> None:
    cfg = config(price={"input": 1.0, "output": 4.0, "cached_input": 0.5})
    async with Router.open(cfg, {"p": Metered(), "free": Metered()}) as router:
        response = await router.submit(ask())
    assert response.cost_usd == pytest.approx((800 * 1.0 + 200 * 0.5 + 100 * 4.0) / 1e6)


async def test_unknown_prices_give_none_never_a_guess() -> None:
    async with Router.open(
        config(upstream="no-such-model-anywhere"), {"p": Metered(), "free": Metered()}
    ) as router:
        unknown = await router.submit(ask())
        unpriced = await router.submit(ask("local"))
    assert unknown.cost_usd is None
    assert unpriced.cost_usd is None
    rows = {r.model: r for r in router.usage().rows}
    assert rows["m"].unpriced == 1 and rows["m"].cost_usd == 0.0
    assert rows["m"].input_tokens == 1000  # tokens still count


def _book(**provider: Any) -> PriceBook:
    return PriceBook(
        RouterConfig.from_dict(
            {"providers": [{"name": "p", "keys": [{"id": "k"}], **provider}], "models": []}
        )
    )


def test_which_provider_prices_a_base_url() -> None:
    official = _book(kind="openai", base_url="https://api.openai.com/v1")
    assert isinstance(official.pricer("p/gpt-4o", "p", "gpt-4o"), Rate)
    groq = _book(kind="openai", base_url="https://api.groq.com/openai/v1")
    assert groq.pricer("p/x", "p", "llama-3.3-70b-versatile") is not None
    # an OpenAI-compatible private deployment is not OpenAI: no price unless configured
    private = _book(kind="openai", base_url="http://10.0.0.5:8000/v1")
    assert private.pricer("p/gpt-4o", "p", "gpt-4o") is None
    said = _book(kind="openai", base_url="http://10.0.0.5:8000/v1", pricing="openai")
    assert said.pricer("p/gpt-4o", "p", "gpt-4o") is not None
    off = _book(kind="openai", base_url="https://api.openai.com/v1", pricing="none")
    assert off.pricer("p/gpt-4o", "p", "gpt-4o") is None
    assert _book(kind="simulated").pricer("p/gpt-4o", "p", "gpt-4o") is None


@pytest.mark.parametrize(
    ("base_url", "needed"),
    [
        ("https://api.openai.com/v1", True),
        ("https://gateway.example.com/v1", True),  # a public name: the table may know it
        ("http://127.0.0.1:8900/v1", False),
        ("http://[::1]:8900/v1", False),
        ("http://vllm:8000/v1", False),
        ("https://llm.corp.internal/v1", False),
    ],
)
def test_the_table_is_loaded_only_when_it_may_price(base_url: str, needed: bool) -> None:
    cfg = RouterConfig.from_dict(
        {
            "providers": [
                {"name": "p", "kind": "openai", "base_url": base_url, "keys": [{"id": "k"}]}
            ]
        }
    )
    assert needs_table(cfg) is needed


async def test_a_stream_has_its_cost_when_it_ends() -> None:
    async with Router.open(config(), {"p": Metered(), "free": Metered()}) as router:
        async with router.stream(ask()) as stream:
            async for _ in stream:
                assert stream.cost_usd is None  # not before the end
        assert stream.cost_usd == pytest.approx(table_cost(ANSWER), rel=1e-12)


async def test_a_continued_stream_costs_the_sum_of_its_segments() -> None:
    second = Usage(prompt_tokens=1200, completion_tokens=50)
    provider = Metered({"b": second})
    provider.cut_after_usage.add("a")
    cfg = config(continuation=True)
    async with Router.open(cfg, {"p": provider, "free": Metered()}) as router:
        async with router.stream(ask(tenant="t1")) as stream:
            text = "".join([c.text async for c in stream])
        assert text == "from a from b "
        assert [s.key_id for s in stream.segments] == ["a", "b"]
        assert stream.usage is not None and stream.usage.prompt_tokens == 2200
        assert stream.cost_usd == pytest.approx(table_cost(ANSWER) + table_cost(second))
        rows = {r.key_id: r for r in router.usage().rows}
    assert rows["a"].cost_usd == pytest.approx(table_cost(ANSWER))
    assert rows["b"].cost_usd == pytest.approx(table_cost(second))
    assert rows["b"].tenant == "t1" and rows["b"].output_tokens == 50


async def test_a_continuation_on_an_unpriced_model_leaves_the_cost_unknown() -> None:
    provider = Metered()
    provider.cut_after_usage.update({"a", "b"})
    cfg = config(continuation=True, fallbacks=["local"])
    async with (
        Router.open(cfg, {"p": provider, "free": Metered()}) as router,
        router.stream(ask()) as stream,
    ):
        with pytest.raises(StreamInterruptedError):  # cut twice, one continuation
            _ = [c async for c in stream]
        # both segments reported usage before their cut: an interrupted answer still costs
        assert stream.cost_usd == pytest.approx(2 * table_cost(ANSWER))
    cfg.providers[0].keys = cfg.providers[0].keys[:1]  # continued on the next model
    cfg.models[1].continuation = True  # which takes the text so far as a prefill
    async with Router.open(cfg, {"p": provider, "free": Metered()}) as router:
        async with router.stream(ask()) as stream:
            _ = [c async for c in stream]
        assert [s.model for s in stream.segments] == ["m", "local"]
    assert stream.cost_usd is None


async def test_embeddings_are_priced_by_their_input() -> None:
    async with Emulator.serve(port=0) as emu:
        cfg = RouterConfig.from_dict(
            {
                "providers": [
                    {
                        "name": "oa",
                        "kind": "openai",
                        "base_url": f"{emu.url}/v1",
                        "pricing": "openai",
                        "keys": [{"id": "k", "secret": "sk-test-emb"}],
                    }
                ],
                "models": [
                    {
                        "name": "emb",
                        "provider": "oa",
                        "upstream": "text-embedding-3-small",
                        "mode": "embedding",
                    }
                ],
            }
        )
        async with Router.open(cfg) as router:
            result = await router.embed(EmbeddingRequest(model="emb", input=["a b c", "d e"]))
    tokens = result.usage.prompt_tokens
    assert tokens > 0
    expected = table_cost(Usage(prompt_tokens=tokens), "text-embedding-3-small")
    assert result.cost_usd == pytest.approx(expected, rel=1e-12)


async def test_the_ledger_counts_per_model_key_and_tenant_and_the_counters_move() -> None:
    cfg = config()
    async with Router.open(cfg, {"p": Metered(), "free": Metered()}) as router:
        metrics = GatewayMetrics(lambda: None, router.usage)

        def sample(name: str, **labels: str) -> float:
            for family in text_string_to_metric_families(metrics.render().decode()):
                for s in family.samples:
                    if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                        return float(s.value)
            return 0.0

        assert sample("llm_router_tokens_total", direction="input") == 0.0
        await router.submit(ask(tenant="t1"))
        await router.submit(ask(tenant="t2"))
        await router.submit(ask("local", tenant="t1"))
        rows = {(r.model, r.tenant): r for r in router.usage().rows}
        assert rows["m", "t1"].requests == 1 and rows["m", "t2"].requests == 1
        assert rows["local", "t1"].unpriced == 1
        key = {"model": "m", "provider": "p", "key_id": "a"}
        assert sample("llm_router_tokens_total", direction="input", **key) == 2000
        assert sample("llm_router_tokens_total", direction="output", **key) == 200
        assert sample("llm_router_tokens_total", direction="cached_input", **key) == 400
        cost = sample("llm_router_cost_usd_total", **key)
        assert cost == pytest.approx(2 * table_cost(ANSWER))
        assert sample("llm_router_tenant_tokens_total", direction="input", tenant="t1") == 2000
        assert sample("llm_router_tenant_cost_usd_total", tenant="t2") == pytest.approx(
            table_cost(ANSWER)
        )


def test_the_ledger_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_usage, "_MAX_ROWS", 5)
    ledger = UsageLedger(0.0)
    for i in range(20):
        ledger.record("m", "p", "k", f"tenant-{i}", ANSWER, 0.5)
    rows = ledger.snapshot().rows
    assert len(rows) == 6
    other = [r for r in rows if r.tenant == _usage.OTHER]
    assert other[0].requests == 15 and other[0].cost_usd == pytest.approx(7.5)


counts = st.integers(min_value=0, max_value=10**7)


@given(counts, counts, counts, counts, counts, counts)
def test_a_flat_price_is_linear_in_usage(
    p1: int, c1: int, p2: int, c2: int, o1: int, o2: int
) -> None:
    rate = Rate(2.5e-6, 1.25e-6, 3e-6, 1e-5)
    c1, c2 = min(c1, p1), min(c2, p2)
    whole = rate.cost(p1 + p2, c1 + c2, 0, o1 + o2)
    parts = rate.cost(p1, c1, 0, o1) + rate.cost(p2, c2, 0, o2)
    assert whole == pytest.approx(parts, rel=1e-9, abs=1e-12)
    assert whole >= 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"providers": [{"pricing": "no-such-table"}]}, "providers[0].pricing"),
        ({"models": [{"price": {"input": -1, "output": 1}}]}, "models[0].price.input"),
        ({"models": [{"price": {"input": 1}}]}, "models[0].price.output"),
    ],
)
def test_price_config_errors_name_the_field(change: dict[str, Any], field: str) -> None:
    data: dict[str, Any] = {
        "providers": [{"name": "p", "kind": "custom", "keys": [{"id": "k"}]}],
        "models": [{"name": "m", "provider": "p", "upstream": "u"}],
    }
    for section, [patch] in change.items():
        data[section][0].update(patch)
    with pytest.raises(ConfigError) as info:
        RouterConfig.from_dict(data)
    assert info.value.field == field
