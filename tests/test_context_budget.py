"""Context-window pre-checks, per-key RPM/TPM budgets and the exact token counter,
through the router (virtual time)."""

from __future__ import annotations

import pytest
import trio
from scripted import Fail, Reply, ScriptedProvider, make_config

from router import (
    ApiKey,
    ChainExhaustedError,
    ChatRequest,
    ChatResponse,
    ContextWindowError,
    Message,
    ProviderError,
    Router,
    Usage,
)

WINDOWS = """
[router]
transient_retries = 0
[[providers]]
name = "p"
kind = "custom"
keys = [{ id = "k" }]
[[models]]
name = "small"
provider = "p"
upstream = "up-small"
context_window = 50
fallbacks = ["medium", "large"]
[[models]]
name = "medium"
provider = "p"
upstream = "up-medium"
context_window = 200
[[models]]
name = "large"
provider = "p"
upstream = "up-large"
context_window = 5000
[[models]]
name = "huge"
provider = "p"
upstream = "up-huge"
context_window = 100000
"""


def req(model: str, words: int, max_tokens: int | None = None) -> ChatRequest:
    return ChatRequest(
        model=model, messages=[Message("user", "hello " * words)], max_tokens=max_tokens
    )


async def test_a_prompt_too_large_for_a_model_skips_it_without_an_upstream_call(
    autojump_clock,
):
    sp = ScriptedProvider()
    async with Router.open(make_config(WINDOWS), providers={"p": sp}) as router:
        # ~100 tokens: too big for small (50), fits medium (200).
        resp = await router.submit(req("small", 100))
        assert resp.model == "medium"
        assert [c.model for c in sp.calls] == ["up-medium"]
        # max_tokens counts too: 100 + 150 > 200, so large serves.
        resp = await router.submit(req("small", 100, max_tokens=150))
        assert resp.model == "large"
        assert [c.model for c in sp.calls][-1] == "up-large"
        # A short prompt still goes to the first model.
        resp = await router.submit(req("small", 5))
        assert resp.model == "small"


async def test_no_model_large_enough_raises_context_exceeded_before_any_call(autojump_clock):
    sp = ScriptedProvider()
    async with Router.open(make_config(WINDOWS), providers={"p": sp}) as router:
        with pytest.raises(ContextWindowError) as info:
            await router.submit(req("small", 6000))
        err = info.value
        assert err.kind == "context_exceeded"
        assert err.windows == {"small": 50, "medium": 200, "large": 5000}
        assert err.prompt_tokens > 5000
        assert str(err.prompt_tokens) in err.message and "large (5000)" in err.message
        assert sp.calls == []


async def test_context_window_fallbacks_route_to_a_larger_model(autojump_clock):
    cfg = make_config(
        WINDOWS.replace("[router]\n", '[router]\ncontext_window_fallbacks = { large = "huge" }\n')
    )
    sp = ScriptedProvider()
    async with Router.open(cfg, providers={"p": sp}) as router:
        resp = await router.submit(req("large", 6000))
        assert resp.model == "huge"
        assert [c.model for c in sp.calls] == ["up-huge"]
        # Without the map entry the same prompt on "medium" has nowhere to go.
        with pytest.raises(ContextWindowError):
            await router.submit(req("medium", 6000))


BUDGETS = """
[router]
transient_retries = 0
[[providers]]
name = "p"
kind = "custom"
keys = [{{ id = "a", rpm = {rpm} }}, {{ id = "b" }}]
[[models]]
name = "m"
provider = "p"
upstream = "u"
"""


async def test_an_rpm_budget_of_n_sends_exactly_n_to_the_key_per_minute(autojump_clock):
    sp = ScriptedProvider()
    async with Router.open(make_config(BUDGETS.format(rpm=5)), providers={"p": sp}) as router:
        served = [(await router.submit(req("m", 3))).key_id for _ in range(6)]
        assert served == ["a"] * 5 + ["b"]
        assert sp.calls_to("a") == 5
        key_a = next(k for k in router.snapshot().keys if k.key_id == "a")
        assert key_a.rpm_remaining == 0
        assert key_a.tpm_remaining is None
        # The window slides: 60 s after the first request, a has room again.
        await trio.sleep(60)
        assert (await router.submit(req("m", 3))).key_id == "a"


async def test_everything_out_of_budget_reports_when_it_frees_up(autojump_clock):
    cfg = make_config(BUDGETS.format(rpm=2).replace('{ id = "b" }', '{ id = "b", rpm = 1 }'))
    sp = ScriptedProvider()
    async with Router.open(cfg, providers={"p": sp}) as router:
        t0 = trio.current_time()
        for _ in range(3):
            await router.submit(req("m", 3))
        await trio.sleep(10)
        with pytest.raises(ChainExhaustedError) as info:
            await router.submit(req("m", 3))
        assert info.value.retry_after == pytest.approx(60 - (trio.current_time() - t0))
        assert len(sp.calls) == 3  # no 429 round trip was wasted


class UsageProvider:
    """Answers with a fixed reported usage."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.calls: list[str] = []

    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse:
        self.calls.append(key.id)
        return ChatResponse(content="ok", usage=Usage(total_tokens=self.total))


async def test_tpm_reservations_reconcile_to_the_reported_usage(autojump_clock):
    text = BUDGETS.format(rpm=1000).replace("rpm = 1000", "tpm = 1000")
    cfg = make_config(text)
    # Each request reserves its prompt (a few tokens) + max_tokens 400.
    provider = UsageProvider(total=20)
    async with Router.open(cfg, providers={"p": provider}) as router:
        for _ in range(6):
            await router.submit(req("m", 3, max_tokens=400))
        # Reconciled to 20 tokens each, so all six fit in a's 1000 tokens.
        assert provider.calls == ["a"] * 6
        key_a = next(k for k in router.snapshot().keys if k.key_id == "a")
        assert key_a.tpm_remaining == 1000 - 6 * 20
    # Without reconciliation (no usage reported) the estimates fill the budget.
    provider = UsageProvider(total=0)
    async with Router.open(cfg, providers={"p": provider}) as router:
        for _ in range(4):
            await router.submit(req("m", 3, max_tokens=400))
        assert provider.calls == ["a", "a", "b", "b"]


class CountingProvider(ScriptedProvider):
    """A custom provider that can also count tokens exactly (or fail to)."""

    def __init__(self, count: int | None) -> None:
        super().__init__(default=Reply())
        self.count = count
        self.count_calls = 0

    async def count_tokens(self, request: ChatRequest, key: ApiKey) -> int:
        self.count_calls += 1
        if self.count is None:
            raise ProviderError("transient", "count endpoint down")
        return self.count


EXACT = """
[router]
transient_retries = 0
[router.tokens]
exact_provider = "p"
[[providers]]
name = "p"
kind = "custom"
keys = [{ id = "k" }]
[[models]]
name = "small"
provider = "p"
upstream = "up-small"
context_window = 1000
fallbacks = ["big"]
[[models]]
name = "big"
provider = "p"
upstream = "up-big"
context_window = 100000
"""


async def test_the_exact_counter_goes_through_the_key_actors(autojump_clock):
    # The offline count of this prompt is tiny; the exact count says 5000.
    provider = CountingProvider(count=5000)
    async with Router.open(make_config(EXACT), providers={"p": provider}) as router:
        resp = await router.submit(req("small", 3))
        assert resp.model == "big"
        assert provider.count_calls == 1
        counter = router.token_counter("small")
        assert counter.is_exact and counter.backend == "cascading"


async def test_a_failing_exact_counter_falls_back_offline_and_stays_labelled(autojump_clock):
    provider = CountingProvider(count=None)
    async with Router.open(make_config(EXACT), providers={"p": provider}) as router:
        resp = await router.submit(req("small", 3))
        assert resp.model == "small"  # the offline count fits
        counter = router.token_counter("small")
        assert not counter.is_exact
        assert counter.backend == "cascading_degraded"
        # The count failures never touched the key's own breaker or cooldown.
        key = router.snapshot().keys[0]
        assert (key.breaker, key.cooling_for, key.failures) == ("closed", 0.0, 0)


async def test_rate_limited_key_is_skipped_by_budget_not_by_a_429(autojump_clock):
    """With the budget in place, the key is never asked past it, so its 429 script
    is never reached."""
    sp = ScriptedProvider()
    sp.script("a", [Reply(), Reply(), Fail("rate_limit", retry_after=30)])
    async with Router.open(make_config(BUDGETS.format(rpm=2)), providers={"p": sp}) as router:
        served = [(await router.submit(req("m", 3))).key_id for _ in range(4)]
        assert served == ["a", "a", "b", "b"]
        key_a = next(k for k in router.snapshot().keys if k.key_id == "a")
        assert key_a.cooling_for == 0
