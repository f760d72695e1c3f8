"""The HTTP providers end to end: a real `Router` over real loopback sockets to the
provider emulator, for each wire protocol (OpenAI, Anthropic, Gemini).

Real time throughout (real sockets), so every timeout is small: attempt and first-token
timeouts 0.5 s, idle timeout 0.4 s, retry backoff 10 ms.
"""

from __future__ import annotations

import email.utils
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from router import (
    ChainExhaustedError,
    ChatRequest,
    ChatResponse,
    KeySnapshot,
    LaneSnapshot,
    Message,
    ModelSnapshot,
    ProviderError,
    Router,
    RouterClosedError,
    RouterConfig,
    StreamChunk,
    StreamInterruptedError,
    Tool,
    ToolCall,
    _transport,
)
from router.emulator import Emulator, Fault

KINDS = ["openai", "anthropic", "gemini"]
by_kind = pytest.mark.parametrize("kind", KINDS)

SECRET_A = "sk-test-a-123"
SECRET_B = "sk-test-b-456"
SECRET_F = "sk-test-f-789"
UP = "up-main"
FB_UP = "up-fb"
FALLBACK = f"fb/{FB_UP}"

SETTINGS: dict[str, Any] = {
    "timeout": 5.0,
    "attempt_timeout": 0.5,
    "first_token_timeout": 0.5,
    "idle_timeout": 0.4,
    "transient_retries": 2,
    "retry_backoff": [0.01],
    "retry_jitter": 0.0,
    "seed": 7,
}


def base_url(kind: str, url: str) -> str:
    return f"{url}/v1" if kind == "openai" else url


def make_config(
    kind: str,
    url: str,
    *,
    main_url: str | None = None,
    secrets: tuple[str, str, str] = (SECRET_A, SECRET_B, SECRET_F),
    **settings: Any,
) -> RouterConfig:
    """Provider `p` (keys a, b) serves model `main` (upstream up-main); provider `fb`
    (key f) serves the fallback `fb/up-fb`."""
    return RouterConfig.from_dict(
        {
            "router": SETTINGS | settings,
            "providers": [
                {
                    "name": "p",
                    "kind": kind,
                    "base_url": main_url or base_url(kind, url),
                    "keys": [{"id": "a", "secret": secrets[0]}, {"id": "b", "secret": secrets[1]}],
                },
                {
                    "name": "fb",
                    "kind": kind,
                    "base_url": base_url(kind, url),
                    "keys": [{"id": "f", "secret": secrets[2]}],
                },
            ],
            "models": [{"name": "main", "provider": "p", "upstream": UP, "fallbacks": [FALLBACK]}],
        }
    )


@asynccontextmanager
async def rig(
    kind: str,
    *,
    main_url: str | None = None,
    secrets: tuple[str, str, str] = (SECRET_A, SECRET_B, SECRET_F),
    **settings: Any,
) -> AsyncIterator[tuple[Emulator, Router]]:
    async with Emulator.serve(port=0) as emu:
        config = make_config(kind, emu.url, main_url=main_url, secrets=secrets, **settings)
        async with Router.open(config) as router:
            yield emu, router
        assert emu.errors == []


def req(text: str = "hello world", **extra: Any) -> ChatRequest:
    return ChatRequest(model="main", messages=[Message("user", text)], **extra)


def key(router: Router, provider: str, key_id: str) -> KeySnapshot:
    for k in router.snapshot().keys:
        if k.provider == provider and k.key_id == key_id:
            return k
    raise AssertionError(f"no key {provider}/{key_id}")


def lane(router: Router, provider: str, key_id: str, upstream: str = UP) -> LaneSnapshot:
    for x in key(router, provider, key_id).lanes:
        if x.model == upstream:
            return x
    raise AssertionError(f"no lane {provider}/{key_id}/{upstream}")


def model(router: Router, name: str) -> ModelSnapshot:
    for m in router.snapshot().models:
        if m.name == name:
            return m
    raise AssertionError(f"no model {name}")


def calls(emu: Emulator, *, secret: str | None = None, upstream: str | None = None) -> list[Any]:
    return [
        c
        for c in emu.calls
        if (secret is None or c.key == secret) and (upstream is None or c.model == upstream)
    ]


def outcomes(response: Any) -> list[tuple[str, str, str]]:
    return [(a.model, a.key_id, a.outcome) for a in response.attempts]


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Poll plain attributes (the emulator's records, a snapshot) for up to 2 s."""
    with trio.fail_after(2.0):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def read_all(router: Router, request: ChatRequest) -> tuple[Any, list[StreamChunk]]:
    chunks: list[StreamChunk] = []
    async with router.stream(request) as stream:
        async for chunk in stream:
            chunks.append(chunk)
    return stream, chunks


# --------------------------------------------------------------------------- plain completion


@by_kind
async def test_plain_completion(kind: str) -> None:
    async with rig(kind) as (emu, router):
        response = await router.submit(req("hello world"))
        assert type(response) is ChatResponse
        assert response.content == "echo: hello world"
        assert response.finish_reason == "stop"
        # The emulator counts words: prompt = 2 words + 4 per message, completion = 3.
        assert response.usage.prompt_tokens == 6
        assert response.usage.completion_tokens == 3
        assert response.usage.total_tokens == 9
        assert (response.model, response.provider, response.key_id) == ("main", "p", "a")
        assert response.upstream_model == UP
        assert outcomes(response) == [("main", "a", "ok")]
        [call] = emu.calls
        assert call.protocol == kind
        assert call.key == SECRET_A
        assert call.model == UP
        assert call.stream is False
        assert call.completed and not call.disconnected
        snap = key(router, "p", "a")
        assert (snap.requests, snap.successes, snap.failures, snap.in_flight) == (1, 1, 0, 0)


# --------------------------------------------------------------------------- failure table


@by_kind
async def test_429_cools_the_key_and_the_next_key_serves(kind: str) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(status=429), key=SECRET_A, model=UP)
        response = await router.submit(req())
        assert response.key_id == "b"
        assert response.content == "echo: hello world"
        assert outcomes(response) == [("main", "a", "rate_limit"), ("main", "b", "ok")]
        assert response.attempts[0].status == 429
        a = lane(router, "p", "a")
        assert a.rate_limit_hits == 1
        # No usable hint in the default bodies (OpenAI's "try again in 120ms" is below
        # the 5 s backoff): the lane's cooldown is the 5 s minimum; the key is not cooling.
        assert 4.0 < a.cooling_for <= 5.0
        assert a.failures == 1
        assert key(router, "p", "a").cooling_for == 0
        assert lane(router, "p", "b").cooling_for == 0
        assert [c.key for c in emu.calls] == [SECRET_A, SECRET_B]
        # While a cools, the next request goes straight to b.
        again = await router.submit(req())
        assert again.key_id == "b"
        assert outcomes(again) == [("main", "b", "ok")]
        assert len(calls(emu, secret=SECRET_A)) == 1


def _http_date(ahead: float) -> str:
    return email.utils.formatdate(time.time() + ahead, usegmt=True)


def _rfc3339(ahead: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=ahead)).strftime("%Y-%m-%dT%H:%M:%SZ")


HEADER_CASES: list[tuple[str, str, Callable[[], dict[str, str]], float, float]] = []
for _kind in KINDS:
    HEADER_CASES += [
        (_kind, "retry-after-seconds", lambda: {"retry-after": "7"}, 6.5, 7.0),
        (_kind, "retry-after-date", lambda: {"retry-after": _http_date(10)}, 8.5, 10.0),
        (_kind, "retry-after-ms", lambda: {"retry-after-ms": "7500"}, 7.0, 7.5),
    ]
HEADER_CASES += [
    (
        "openai",
        "x-ratelimit-reset-requests",
        # The exhausted limit (requests) decides, not the longer tokens window.
        lambda: {
            "x-ratelimit-reset-requests": "6m0s",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-tokens": "8m0s",
            "x-ratelimit-remaining-tokens": "5000",
        },
        359.0,
        360.0,
    ),
    (
        "anthropic",
        "anthropic-ratelimit-requests-reset",
        lambda: {
            "anthropic-ratelimit-requests-reset": _rfc3339(20),
            "anthropic-ratelimit-requests-remaining": "0",
        },
        18.5,
        20.0,
    ),
]


@pytest.mark.parametrize(
    ("kind", "form", "headers", "low", "high"),
    HEADER_CASES,
    ids=[f"{c[0]}-{c[1]}" for c in HEADER_CASES],
)
async def test_retry_headers_set_the_cooldown(
    kind: str, form: str, headers: Callable[[], dict[str, str]], low: float, high: float
) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(status=429, headers=headers()), key=SECRET_A, model=UP)
        response = await router.submit(req())
        assert response.key_id == "b"
        a = lane(router, "p", "a")
        assert a.rate_limit_hits == 1
        assert low <= a.cooling_for <= high + 0.05, (form, a.cooling_for)


@by_kind
async def test_401_cools_the_key_for_auth_and_the_next_key_serves(kind: str) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(status=401), key=SECRET_A, model=UP)
        response = await router.submit(req())
        assert response.key_id == "b"
        assert outcomes(response) == [("main", "a", "auth"), ("main", "b", "ok")]
        a = key(router, "p", "a")
        assert a.cooling_reason == "auth"
        assert 599.0 < a.cooling_for <= 600.0
        assert a.failures == 1
        assert [c.key for c in emu.calls] == [SECRET_A, SECRET_B]


BALANCE_CASES = [
    ("openai", 402, None),
    ("anthropic", 402, None),
    ("gemini", 402, None),
    ("openai", 429, "quota"),  # insufficient_quota comes as a 429 from OpenAI
    ("anthropic", 400, "quota"),  # "Your credit balance is too low ..."
]


@pytest.mark.parametrize(
    ("kind", "status", "error"), BALANCE_CASES, ids=[f"{k}-{s}" for k, s, _ in BALANCE_CASES]
)
async def test_balance_disables_the_key_and_the_next_key_serves(
    kind: str, status: int, error: str | None
) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(status=status, error=error), key=SECRET_A, model=UP)
        response = await router.submit(req())
        assert response.key_id == "b"
        assert outcomes(response) == [("main", "a", "balance"), ("main", "b", "ok")]
        a = key(router, "p", "a")
        assert a.cooling_reason == "balance"
        assert 3599.0 < a.cooling_for <= 3600.0
        assert [c.key for c in emu.calls] == [SECRET_A, SECRET_B]


@by_kind
async def test_404_disables_the_model_and_the_fallback_serves(kind: str) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(status=404), key=SECRET_A, model=UP)
        response = await router.submit(req())
        assert (response.model, response.provider, response.key_id) == (FALLBACK, "fb", "f")
        assert outcomes(response) == [("main", "a", "model_missing"), (FALLBACK, "f", "ok")]
        # The model is gone on that provider: key b is not tried, no key cools.
        assert len(calls(emu, upstream=UP)) == 1
        assert model(router, "main").health == "disabled"
        assert key(router, "p", "a").cooling_for == 0
        assert key(router, "p", "b").cooling_for == 0
        # The next request skips the disabled model without calling it.
        again = await router.submit(req())
        assert again.model == FALLBACK
        assert len(calls(emu, upstream=UP)) == 1


@by_kind
async def test_context_exceeded_is_propagated_after_one_call(kind: str) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(status=400, error="context_length"), key=SECRET_A, model=UP)
        with pytest.raises(ProviderError) as info:
            await router.submit(req())
        exc = info.value
        assert exc.kind == "context_exceeded"
        assert exc.status == 400
        assert (exc.provider, exc.key_id) == ("p", "a")
        assert [a.outcome for a in exc.attempts] == ["context_exceeded"]
        if kind == "anthropic":
            assert "prompt is too long" in str(exc)
        assert len(emu.calls) == 1
        assert key(router, "p", "a").cooling_for == 0
        assert model(router, "main").health == "healthy"


async def test_anthropic_prompt_is_too_long_explicit_body() -> None:
    body = {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "prompt is too long: 215000 tokens > 200000 maximum",
        },
    }
    async with rig("anthropic") as (emu, router):
        emu.script(Fault(status=400, body=body), key=SECRET_A, model=UP)
        with pytest.raises(ProviderError) as info:
            await router.submit(req())
        assert info.value.kind == "context_exceeded"
        assert len(emu.calls) == 1


@by_kind
async def test_other_400_is_propagated_as_bad_request_after_one_call(kind: str) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(status=400), key=SECRET_A, model=UP)
        with pytest.raises(ProviderError) as info:
            await router.submit(req())
        assert info.value.kind == "bad_request"
        assert info.value.status == 400
        assert [a.outcome for a in info.value.attempts] == ["bad_request"]
        assert len(emu.calls) == 1
        a = key(router, "p", "a")
        assert (a.cooling_for, a.failures, a.breaker) == (0, 1, "closed")


TRANSIENT_CASES = [(k, s) for k in KINDS for s in (500, 503)] + [("anthropic", 529)]


@pytest.mark.parametrize(
    ("kind", "status"), TRANSIENT_CASES, ids=[f"{k}-{s}" for k, s in TRANSIENT_CASES]
)
async def test_5xx_is_retried_in_place_then_the_next_model_serves(kind: str, status: int) -> None:
    async with rig(kind) as (emu, router):
        emu.script([Fault(status=status)] * 3, key=SECRET_A, model=UP)
        response = await router.submit(req())
        assert (response.model, response.key_id) == (FALLBACK, "f")
        assert response.content == "echo: hello world"
        # transient_retries = 2: three calls on key a, none on key b, then the next model.
        assert len(calls(emu, secret=SECRET_A, upstream=UP)) == 3
        assert calls(emu, secret=SECRET_B) == []
        assert outcomes(response) == [("main", "a", "transient")] * 3 + [(FALLBACK, "f", "ok")]
        assert [a.status for a in response.attempts[:3]] == [status] * 3
        assert key(router, "p", "a").cooling_for == 0


@by_kind
async def test_max_tokens_ceiling_in_a_429_is_retried_once_without_max_tokens(kind: str) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(status=429, error="max_tokens_limit"), key=SECRET_A, model=UP)
        response = await router.submit(req(max_tokens=1_000_000))
        assert response.key_id == "a"
        assert response.content == "echo: hello world"
        assert [a.outcome for a in response.attempts] == ["max_tokens", "ok"]
        first, second = emu.calls
        assert first.key == second.key == SECRET_A
        if kind == "openai":
            assert first.body["max_tokens"] == 1_000_000
            assert "max_tokens" not in second.body
        elif kind == "anthropic":
            assert first.body["max_tokens"] == 1_000_000
            assert second.body["max_tokens"] == 4096  # required by the API: the default
        else:
            assert first.body["generationConfig"]["maxOutputTokens"] == 1_000_000
            assert "maxOutputTokens" not in second.body.get("generationConfig", {})
        # Not a rate limit: the key does not cool.
        assert key(router, "p", "a").cooling_for == 0


@by_kind
async def test_route_404_does_not_disable_the_model(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong base_url (an HTML 404 page naming no model) is a transient, key-wide
    failure, not a missing model: the model stays healthy and the fallback serves."""
    caplog.set_level(logging.ERROR, logger="router.http")
    async with Emulator.serve(port=0) as emu:
        emu.strict_paths = emu.html_404 = True
        wrong = base_url(kind, emu.url) + "/api"
        config = make_config(kind, emu.url, main_url=wrong)
        async with Router.open(config) as router:
            response = await router.submit(req())
            assert (response.model, response.key_id) == (FALLBACK, "f")
            first = response.attempts[0]
            assert (first.model, first.outcome) == ("main", "transient")
            assert model(router, "main").health != "disabled"
        assert [c.model for c in emu.calls] == [FB_UP]  # the wrong URL reached no route
        assert emu.errors == []
    lines = [r.getMessage() for r in caplog.records if r.name == "router.http"]
    assert lines and all(wrong in line for line in lines)
    assert len(lines) == len(set(lines))  # once per URL
    assert SECRET_A not in caplog.text and SECRET_B not in caplog.text


@by_kind
async def test_stream_finish_then_drop_completes(kind: str) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(reply=LONG, finish_then_drop=True), key=SECRET_A, model=UP)
        stream, _ = await read_all(router, req())
        assert stream.text == LONG
        assert stream.finish_reason == "stop"
        assert [a.outcome for a in stream.attempts] == ["ok"]
        assert len(emu.calls) == 1


@by_kind
async def test_hang_is_cut_by_the_attempt_timeout_and_the_fallback_serves(kind: str) -> None:
    # A silent upstream is not retried in place while the fallback can take the request.
    async with rig(kind) as (emu, router):
        emu.script(Fault(hang=True), key=SECRET_A, model=UP)
        response = await router.submit(req())
        assert (response.model, response.key_id) == (FALLBACK, "f")
        assert [a.outcome for a in response.attempts] == ["transient", "ok"]
        assert 0.45 <= response.attempts[0].duration < 1.0
        hung = emu.calls[0]
        await wait_for(lambda: hung.disconnected)
        assert not hung.completed
        assert key(router, "p", "a").in_flight == 0


@by_kind
async def test_hang_is_retried_in_place_when_nothing_else_can_serve(kind: str) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(hang=True), key=SECRET_A, model=UP)
        only = ChatRequest(model="p/" + UP, messages=[Message("user", "hello world")])
        response = await router.submit(only)
        assert response.key_id in ("a", "b")
        assert [a.outcome for a in response.attempts] == ["transient", "ok"]


@by_kind
@pytest.mark.parametrize(
    "fault",
    [Fault(close_mid_body=True), Fault(malformed_json=True)],
    ids=["close_mid_body", "malformed_json"],
)
async def test_broken_bodies_are_transient(kind: str, fault: Fault) -> None:
    async with rig(kind) as (emu, router):
        emu.script(fault, key=SECRET_A, model=UP)
        response = await router.submit(req())
        assert response.key_id == "a"
        assert response.content == "echo: hello world"
        assert [a.outcome for a in response.attempts] == ["transient", "ok"]
        assert len(emu.calls) == 2


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@by_kind
async def test_connection_refused_is_transient_and_the_fallback_serves(kind: str) -> None:
    dead = base_url(kind, f"http://127.0.0.1:{_closed_port()}")
    async with rig(kind, main_url=dead) as (emu, router):
        response = await router.submit(req())
        assert (response.model, response.key_id) == (FALLBACK, "f")
        # Connection-level: the key's failure, so the next key of the model is tried
        # (each retried in place: a refusal is fast), then the fallback.
        assert outcomes(response) == [("main", "a", "transient")] * 3 + [
            ("main", "b", "transient")
        ] * 3 + [(FALLBACK, "f", "ok")]
        assert [c.key for c in emu.calls] == [SECRET_F]
        assert key(router, "p", "a").failures == 3
        assert lane(router, "p", "a").failures == 3
        assert lane(router, "p", "a").breaker == "closed"  # not the model's failure


# --------------------------------------------------------------------------- streaming

LONG = "alpha beta gamma delta epsilon zeta"


@by_kind
async def test_stream_matches_the_plain_answer(kind: str) -> None:
    async with rig(kind) as (emu, router):
        plain = await router.submit(req("the quick brown fox"))
        stream, chunks = await read_all(router, req("the quick brown fox"))
        assert len([c for c in chunks if c.text]) > 1  # really streamed
        assert "".join(c.text for c in chunks) == plain.content == "echo: the quick brown fox"
        assert stream.text == plain.content
        assert stream.finish_reason == "stop"
        assert stream.usage is not None
        assert stream.usage == plain.usage
        assert (stream.model, stream.provider, stream.key_id) == ("main", "p", "a")
        assert emu.calls[-1].stream is True
        assert emu.calls[-1].protocol == kind


STREAM_FAILOVER = ["503", "429", "cut_before_first_chunk"]


@by_kind
@pytest.mark.parametrize("failure", STREAM_FAILOVER)
async def test_stream_failover_before_the_first_chunk_is_invisible(kind: str, failure: str) -> None:
    async with rig(kind) as (emu, router):
        if failure == "429":
            emu.script(Fault(status=429), key=SECRET_A, model=UP)
            emu.script(Fault(reply="served by key b"), key=SECRET_B, model=UP)
            expected_key, expected_text = "b", "served by key b"
            failed = [("main", "a", "rate_limit")]
        else:
            bad = (
                Fault(status=503)
                if failure == "503"
                else Fault(reply="WRONG WRONG WRONG", cut_after_chunks=0)
            )
            emu.script([bad] * 3, key=SECRET_A, model=UP)
            emu.script(Fault(reply="served by the fallback"), key=SECRET_F, model=FB_UP)
            expected_key, expected_text = "f", "served by the fallback"
            failed = [("main", "a", "transient")] * 3
        stream, chunks = await read_all(router, req())
        assert stream.key_id == expected_key
        assert "".join(c.text for c in chunks) == expected_text
        assert stream.text == expected_text
        assert stream.finish_reason == "stop"
        assert outcomes(stream)[:-1] == failed
        assert outcomes(stream)[-1][1:] == (expected_key, "ok")


@by_kind
async def test_stream_cut_after_two_chunks_is_interrupted_with_partial_text(kind: str) -> None:
    async with rig(kind, max_continuations=0) as (emu, router):
        emu.script(Fault(reply=LONG, cut_after_chunks=2), key=SECRET_A, model=UP)
        got: list[str] = []
        with pytest.raises(StreamInterruptedError) as info:
            async with router.stream(req()) as stream:
                async for chunk in stream:
                    got.append(chunk.text)
        assert info.value.partial_text == "alpha beta "
        assert "".join(got) == "alpha beta "
        assert info.value.kind == "transient"
        assert len(emu.calls) == 1  # no failover after the first chunk
        assert key(router, "p", "a").in_flight == 0


@by_kind
async def test_stream_stall_is_interrupted_after_the_idle_timeout(kind: str) -> None:
    async with rig(kind, max_continuations=0) as (emu, router):
        emu.script(
            Fault(reply=LONG, stall_after_chunks=2, stall_seconds=2.0), key=SECRET_A, model=UP
        )
        got: list[str] = []
        last = 0.0
        with pytest.raises(StreamInterruptedError) as info:
            async with router.stream(req()) as stream:
                async for chunk in stream:
                    got.append(chunk.text)
                    last = trio.current_time()
        gap = trio.current_time() - last
        assert 0.35 <= gap < 1.0, gap
        assert info.value.partial_text == "alpha beta "
        assert "".join(got) == "alpha beta "
        assert "idle" in str(info.value)
        assert len(emu.calls) == 1


@by_kind
async def test_stream_is_read_by_the_callers_task(kind: str, monkeypatch) -> None:
    # On the router's transport, once the stream is handed over, the caller's own task
    # reads the socket: no worker step and no channel hop per event.
    readers: list[trio.lowlevel.Task] = []
    real = _transport._Connection.feed

    def recording(self: Any, data: bytes) -> None:  # every socket read that brought bytes
        readers.append(trio.lowlevel.current_task())
        real(self, data)

    monkeypatch.setattr(_transport._Connection, "feed", recording)
    async with rig(kind) as (emu, router):
        emu.script(Fault(reply=LONG, chunk_interval=0.02), key=SECRET_A, model=UP)
        me = trio.lowlevel.current_task()
        async with router.stream(req()) as stream:
            await stream.__anext__()
            handed = len(readers)  # (the head and the first chunk: the worker's reads)
            rest = [chunk.text async for chunk in stream]
        assert stream.text == LONG and "".join(rest)
        assert readers[:handed] and me not in readers[:handed]
        assert len(readers) - handed >= 3
        assert set(readers[handed:]) == {me}
        assert key(router, "p", "a").in_flight == 0


@by_kind
async def test_stream_closed_by_another_task_mid_read_drops_the_connection(kind: str) -> None:
    # The consumer is parked on the socket when another task closes the stream: its
    # read is cut at once, the connection is discarded (never reused mid-body), and
    # the next request works on a fresh one.
    async with rig(kind, max_continuations=0) as (emu, router):
        emu.script(
            Fault(reply=LONG, stall_after_chunks=2, stall_seconds=3.0), key=SECRET_A, model=UP
        )
        errors: list[StreamInterruptedError] = []
        async with router.stream(req()) as stream:
            two = trio.Event()

            async def consume() -> None:
                try:
                    async for _ in stream:
                        if stream.text == "alpha beta ":
                            two.set()
                except StreamInterruptedError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                await two.wait()
                await trio.sleep(0.05)  # parked on the stalled socket
                start = trio.current_time()
                await stream.aclose()
            assert trio.current_time() - start < 0.5  # not after the 3 s stall
        (err,) = errors
        assert err.partial_text == "alpha beta "
        assert isinstance(err.cause, RouterClosedError)
        assert key(router, "p", "a").in_flight == 0
        before = emu.connections_accepted
        again, _ = await read_all(router, req("again"))
        assert again.text == "echo: again"
        assert emu.connections_accepted - before == 1  # the cut one was not reused


@by_kind
async def test_a_second_task_reading_the_same_stream_is_refused(kind: str) -> None:
    # Two tasks iterating one stream at once is the caller's mistake: the second gets
    # BusyResourceError, the first reads the whole answer, and the key is not charged.
    async with rig(kind) as (emu, router):
        emu.script(Fault(reply=LONG, chunk_interval=0.05), key=SECRET_A, model=UP)
        refused: list[BaseException] = []
        async with router.stream(req()) as stream:
            first = await stream.__anext__()

            async def second() -> None:
                try:
                    await stream.__anext__()
                except trio.BusyResourceError as exc:
                    refused.append(exc)

            rest: list[str] = []
            async with trio.open_nursery() as nursery:

                async def reader() -> None:
                    rest.extend([chunk.text async for chunk in stream])

                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()  # the reader waits on the socket
                nursery.start_soon(second)
        assert len(refused) == 1
        assert first.text + "".join(rest) == LONG
        assert stream.finish_reason == "stop"
        snap = key(router, "p", "a")
        assert (snap.failures, snap.in_flight, snap.breaker) == (0, 0, "closed")


@by_kind
async def test_stream_slow_first_token_fails_over(kind: str) -> None:
    async with rig(kind, transient_retries=0) as (emu, router):
        emu.script(Fault(latency=1.5, reply="too late"), key=SECRET_A, model=UP)
        stream, _ = await read_all(router, req())
        assert (stream.model, stream.key_id) == (FALLBACK, "f")
        assert stream.text == "echo: hello world"
        assert outcomes(stream) == [("main", "a", "transient"), (FALLBACK, "f", "ok")]
        assert 0.45 <= stream.attempts[0].duration < 1.0


@by_kind
async def test_stream_finish_without_end_marker_completes(kind: str) -> None:
    # A long idle timeout: completing "at once" must not mean waiting it out.
    async with rig(kind, idle_timeout=5.0) as (emu, router):
        emu.script(Fault(reply=LONG, finish_without_end=True), key=SECRET_A, model=UP)
        start = trio.current_time()
        stream, _ = await read_all(router, req())
        assert trio.current_time() - start < 2.0  # no wait for the 5 s idle timeout
        assert stream.text == LONG
        assert stream.finish_reason == "stop"
        assert stream.usage is not None and stream.usage.completion_tokens == 6
        assert len(emu.calls) == 1


def _malformed_sse(kind: str) -> str:
    """A 200 stream with two good content events, then one invalid JSON data line."""
    if kind == "openai":

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            payload = {
                "id": "chatcmpl-x",
                "object": "chat.completion.chunk",
                "model": UP,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(payload)}\n\n"

        return (
            chunk({"role": "assistant", "content": ""})
            + chunk({"content": "alpha "})
            + chunk({"content": "beta "})
            + 'data: {"id": "chatcmpl-x", "choices": [{"delta": {"content": "gam\n\n'
            + chunk({}, "stop")
            + "data: [DONE]\n\n"
        )
    if kind == "anthropic":

        def event(name: str, payload: dict[str, Any]) -> str:
            return f"event: {name}\ndata: {json.dumps({'type': name, **payload})}\n\n"

        message: dict[str, Any] = {
            "id": "msg_x",
            "type": "message",
            "role": "assistant",
            "model": UP,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": 6, "output_tokens": 1},
        }
        text = {"type": "text_delta"}
        return (
            event("message_start", {"message": message})
            + event(
                "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
            )
            + event("content_block_delta", {"index": 0, "delta": text | {"text": "alpha "}})
            + event("content_block_delta", {"index": 0, "delta": text | {"text": "beta "}})
            + 'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
            '"delta": {"type": "text_de\n\n'
            + event("content_block_stop", {"index": 0})
            + event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {}})
            + event("message_stop", {})
        )

    def part(text: str, finish: str | None = None) -> str:
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}}
        if finish:
            candidate["finishReason"] = finish
        return f"data: {json.dumps({'candidates': [candidate]})}\r\n\r\n"

    return (
        part("alpha ")
        + part("beta ")
        + 'data: {"candidates": [{"content": {"role": "model", "parts": [{"text": "gam\r\n\r\n'
        + part("", "STOP")
    )


@by_kind
async def test_stream_malformed_json_after_the_first_chunk_is_interrupted(kind: str) -> None:
    async with rig(kind, max_continuations=0) as (emu, router):
        emu.script(Fault(body=_malformed_sse(kind)), key=SECRET_A, model=UP)
        got: list[str] = []
        with pytest.raises(StreamInterruptedError) as info:
            async with router.stream(req()) as stream:
                async for chunk in stream:
                    got.append(chunk.text)
        assert info.value.partial_text == "alpha beta "
        assert "".join(got) == "alpha beta "
        assert info.value.kind == "transient"
        assert "malformed" in str(info.value)
        assert len(emu.calls) == 1


IN_STREAM_ERRORS = [("openai", 500), ("anthropic", 529), ("gemini", 503)]


@pytest.mark.parametrize(("kind", "status"), IN_STREAM_ERRORS, ids=[k for k, _ in IN_STREAM_ERRORS])
async def test_stream_error_event_after_the_first_chunk_is_interrupted(
    kind: str, status: int
) -> None:
    async with rig(kind, max_continuations=0) as (emu, router):
        emu.script(Fault(status=status, reply=LONG, cut_after_chunks=2), key=SECRET_A, model=UP)
        got: list[str] = []
        with pytest.raises(StreamInterruptedError) as info:
            async with router.stream(req()) as stream:
                async for chunk in stream:
                    got.append(chunk.text)
        assert info.value.partial_text == "".join(got) == "alpha beta "
        assert info.value.kind == "transient"
        assert "in-stream error" in str(info.value)
        assert len(emu.calls) == 1


@by_kind
async def test_stream_malformed_json_before_the_first_chunk_is_retried_invisibly(
    kind: str,
) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(reply=LONG, malformed_json=True), key=SECRET_A, model=UP)
        stream, _ = await read_all(router, req())
        assert stream.text == "echo: hello world"
        assert [a.outcome for a in stream.attempts] == ["transient", "ok"]
        assert len(emu.calls) == 2


@by_kind
@pytest.mark.parametrize("how", ["break", "cancel"])
async def test_leaving_a_stream_early_closes_the_upstream_connection(kind: str, how: str) -> None:
    words = " ".join(f"w{i}" for i in range(40))
    async with rig(kind) as (emu, router):
        emu.script(Fault(reply=words, chunk_interval=0.05), key=SECRET_A, model=UP)
        got: list[str] = []
        if how == "break":
            async with router.stream(req()) as stream:
                async for chunk in stream:
                    got.append(chunk.text)
                    if len(got) == 2:
                        break
            assert "".join(got) == "w0 w1 "
        else:
            # Cancelled 0.2 s into the answer (from its first chunk, however long a
            # loaded machine took to get there), with most of the 40 words to come.
            with trio.CancelScope() as cancelled:
                async with router.stream(req()) as stream:
                    async for chunk in stream:
                        got.append(chunk.text)
                        if len(got) == 1:
                            cancelled.deadline = trio.current_time() + 0.2
            assert cancelled.cancelled_caught
            assert 1 <= len(got) < 40
        call = emu.calls[-1]
        await wait_for(lambda: call.disconnected)
        assert not call.completed
        await wait_for(lambda: key(router, "p", "a").in_flight == 0)
        a = key(router, "p", "a")
        assert (a.failures, a.breaker, a.cooling_for) == (0, "closed", 0)
        # The key still serves.
        assert (await router.submit(req())).key_id == "a"


# --------------------------------------------------------------------------- translation

WEATHER = Tool(
    name="get_weather",
    description="Weather for a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}, "day": {"type": "string"}},
        "required": ["city"],
    },
)
ASKED = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
REPLY_CALL = ToolCall(
    id="call_9", name="get_weather", arguments='{"city": "Paris", "day": "tomorrow"}'
)


def conversation() -> ChatRequest:
    return ChatRequest(
        model="main",
        messages=[
            Message("system", "Be brief."),
            Message("user", "Weather in Paris?"),
            Message("assistant", "", tool_calls=[ASKED]),
            Message("tool", '{"temp": 21}', tool_call_id="call_1"),
            Message("user", "And tomorrow?"),
        ],
        tools=[WEATHER],
        stop=["END"],
        max_tokens=123,
    )


def _check_openai_body(body: dict[str, Any]) -> None:
    assert body["model"] == UP
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER.parameters,
            },
        }
    ]
    assert body["stop"] == ["END"]
    assert body["max_tokens"] == 123


def _check_anthropic_body(body: dict[str, Any]) -> None:
    assert body["model"] == UP
    assert body["system"] == "Be brief."
    assert all(m["role"] != "system" for m in body["messages"])
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": '{"temp": 21}'},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": WEATHER.parameters,
        }
    ]
    assert body["stop_sequences"] == ["END"]
    assert body["max_tokens"] == 123


def _check_gemini_body(body: dict[str, Any]) -> None:
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {
            "role": "model",
            "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
                {"text": "And tomorrow?"},
            ],
        },
    ]
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": WEATHER.parameters,
                }
            ]
        }
    ]
    assert body["generationConfig"]["stopSequences"] == ["END"]
    assert body["generationConfig"]["maxOutputTokens"] == 123


CHECK_BODY = {
    "openai": _check_openai_body,
    "anthropic": _check_anthropic_body,
    "gemini": _check_gemini_body,
}


@by_kind
async def test_request_translation_and_tool_call_round_trip(kind: str) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(tool_calls=[REPLY_CALL]), key=SECRET_A, model=UP)
        response = await router.submit(conversation())
        [call] = emu.calls
        assert call.model == UP
        CHECK_BODY[kind](call.body)
        assert response.finish_reason == "tool_calls"
        [got] = response.tool_calls
        assert got.name == "get_weather"
        assert json.loads(got.arguments) == {"city": "Paris", "day": "tomorrow"}
        if kind != "gemini":  # Gemini has no call ids: the adapter makes them up
            assert got.id == "call_9"


@by_kind
async def test_streamed_tool_call_round_trip(kind: str) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(tool_calls=[REPLY_CALL]), key=SECRET_A, model=UP)
        stream, chunks = await read_all(router, conversation())
        CHECK_BODY[kind](emu.calls[0].body)
        assert emu.calls[0].stream is True
        deltas = [d for c in chunks for d in c.tool_calls]
        assert {d.index for d in deltas} == {0}
        assert [d.name for d in deltas if d.name] == ["get_weather"]
        assert json.loads("".join(d.arguments for d in deltas)) == {
            "city": "Paris",
            "day": "tomorrow",
        }
        assert stream.finish_reason == "tool_calls"


# --------------------------------------------------------------------------- secrets


def _echoing_401(kind: str, secret: str) -> dict[str, Any]:
    """A 401 whose message echoes the key it was sent, as some upstreams do."""
    if kind == "openai":
        return {
            "error": {
                "message": f"Incorrect API key provided: {secret}. You can find your API key "
                "at https://platform.openai.com/account/api-keys.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    if kind == "anthropic":
        return {
            "type": "error",
            "error": {"type": "authentication_error", "message": f"invalid x-api-key {secret}"},
        }
    return {
        "error": {
            "code": 401,
            "message": f"API key not valid ({secret}). Please pass a valid API key.",
            "status": "UNAUTHENTICATED",
        }
    }


# The second set does not look like an API key, so the generic redaction of key-like
# text cannot hide it: only scrubbing of the exact secret can.
SECRET_SETS = {
    "sk-style": (SECRET_A, SECRET_B, SECRET_F),
    "plain": ("plain-secret-a-123", "plain-secret-b-456", "plain-secret-f-789"),
}


@by_kind
@pytest.mark.parametrize("style", list(SECRET_SETS))
async def test_no_secret_in_errors_logs_or_snapshot_after_401(
    kind: str, style: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = list(SECRET_SETS[style])
    async with rig(kind, secrets=SECRET_SETS[style]) as (emu, router):
        for secret in secrets:
            emu.script(Fault(status=401, body=_echoing_401(kind, secret)), key=secret)
        with pytest.raises(ChainExhaustedError) as info:
            await router.submit(req())
        exc = info.value
        assert exc.kind == "auth"
        assert isinstance(exc.last_error, ProviderError)
        assert exc.last_error.kind == "auth"
        assert [(a.key_id, a.outcome) for a in exc.attempts] == [
            ("a", "auth"),
            ("b", "auth"),
            ("f", "auth"),
        ]
        # The upstream's message did reach the error (so the check below is not vacuous),
        # and every key was really sent to the emulator.
        assert sorted(str(c.key) for c in emu.calls) == sorted(secrets)
        assert exc.last_error.status == 401
        shown = {"openai": "Incorrect API key", "anthropic": "invalid x-api-key"}
        assert shown.get(kind, "API key not valid") in str(exc.last_error)
        snapshot = msgspec.json.encode(router.snapshot()).decode()
        assert all(k.cooling_reason == "auth" for k in router.snapshot().keys)

    texts = [str(exc), repr(exc), str(exc.last_error), repr(exc.last_error), snapshot]
    texts += [repr(a) for a in exc.attempts]
    texts += [str(exc.last_error.args)]
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(repr(record.args))
        texts.append(record.exc_text or "")
    texts.append(caplog.text)
    assert caplog.records, "expected some log records at DEBUG (httpx logs every request)"
    for secret in secrets:
        for text in texts:
            assert secret not in text
            assert secret.removeprefix("sk-") not in text


@by_kind
async def test_sequential_streams_reuse_one_connection(kind: str) -> None:
    async with rig(kind) as (emu, router):
        await router.submit(req("warm up"))  # the pool's first connection
        before = emu.connections_accepted
        for i in range(20):
            stream, _chunks = await read_all(router, req(f"stream number {i}"))
            assert stream.finish_reason == "stop"
        # Every stream read its body to the end and gave the connection back.
        assert emu.connections_accepted - before <= 1
