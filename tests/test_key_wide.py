"""Where a failure belongs, at the `HttpProvider` level over real loopback sockets:
connection-level failures are `key_wide`, a silent upstream is `timed_out`, a route 404
(wrong base_url) is a key-wide transient error logged once, a model 404 stays
model_missing, and a stream that sent its finish reason before the connection broke
ends normally.

Real time throughout (real sockets), so every timeout is small.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from router import ChatRequest, Message, ProviderError, StreamChunk, _http
from router._config import KeyConfig, ProviderConfig
from router._http import HttpProvider, protocol_for
from router._types import ApiKey
from router.emulator import Emulator, Fault

KINDS = ["openai", "anthropic", "gemini"]
by_kind = pytest.mark.parametrize("kind", KINDS)
SECRET = "sk-test-keywide-123"
UP = "up-main"
KEY = ApiKey("p", "a", SECRET)


def base_url(kind: str, url: str) -> str:
    return f"{url}/v1" if kind == "openai" else url


def provider_for(kind: str, url: str) -> HttpProvider:
    config = ProviderConfig(
        name="p",
        kind=kind,  # type: ignore[arg-type]
        base_url=url,
        keys=[KeyConfig(id="a", secret=SECRET)],
    )
    return HttpProvider(config, protocol_for(kind), {"a": 4})


def req(text: str = "hello world", **extra: Any) -> ChatRequest:
    return ChatRequest(model=UP, messages=[Message("user", text)], max_tokens=100, **extra)


async def failure(provider: HttpProvider, *, stream: bool = False) -> ProviderError:
    """The `ProviderError` one call raises (the provider is closed afterwards)."""
    try:
        with pytest.raises(ProviderError) as info:
            if stream:
                async for _ in provider.stream(req(), KEY):
                    pass
            else:
                await provider.complete(req(), KEY)
    finally:
        await provider.aclose()
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    return info.value


async def collect(provider: HttpProvider) -> list[StreamChunk]:
    try:
        return [chunk async for chunk in provider.stream(req(), KEY)]
    finally:
        await provider.aclose()


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator.serve(port=0) as emulator:
        yield emulator
        assert emulator.errors == []


# --------------------------------------------------------------------------- connection level


@by_kind
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_connection_refused_is_key_wide(kind: str, stream: bool) -> None:
    url = base_url(kind, f"http://127.0.0.1:{_closed_port()}")
    error = await failure(provider_for(kind, url), stream=stream)
    assert error.kind == "transient"
    assert error.key_wide and not error.timed_out
    assert "connection failed" in error.message


@by_kind
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_reset_before_the_head_is_key_wide(emu: Emulator, kind: str, stream: bool) -> None:
    emu.script(Fault(reset_before_head=True))
    error = await failure(provider_for(kind, base_url(kind, emu.url)), stream=stream)
    assert error.kind == "transient"
    assert error.key_wide and not error.timed_out
    assert "before the response head" in error.message
    assert len(emu.calls) == 1 and emu.calls[0].status == 0


async def _close_without_answer(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.receive_some(65536)  # the request; then close (FIN), no answer


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_close_before_the_head_is_key_wide(stream: bool) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, _close_without_answer, 0, host="127.0.0.1")
        )
        listener = listeners[0]
        port = listener.socket.getsockname()[1]
        error = await failure(provider_for("openai", f"http://127.0.0.1:{port}/v1"), stream=stream)
        nursery.cancel_scope.cancel()
    assert error.kind == "transient"
    assert error.key_wide and not error.timed_out


@by_kind
async def test_a_silent_upstream_timed_out_not_key_wide(
    emu: Emulator, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No trio deadline: httpx's own timeout (the attempt's time left) cuts the wait.
    # (A stream has no httpx read timeout: the key actor's first-token timeout cuts it.)
    monkeypatch.setattr(_http, "_DEFAULT_TIMEOUT", 0.3)
    emu.script(Fault(hang=True))
    start = trio.current_time()
    error = await failure(provider_for(kind, base_url(kind, emu.url)))
    assert 0.25 <= trio.current_time() - start < 2.0
    assert error.kind == "transient"
    assert error.timed_out and not error.key_wide


@by_kind
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_5xx_is_not_key_wide(emu: Emulator, kind: str, stream: bool) -> None:
    emu.script(Fault(status=503))
    error = await failure(provider_for(kind, base_url(kind, emu.url)), stream=stream)
    assert error.kind == "transient" and error.status == 503
    assert not error.key_wide and not error.timed_out


@by_kind
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_a_body_cut_after_the_head_is_not_key_wide(
    emu: Emulator, kind: str, stream: bool
) -> None:
    emu.script(Fault(close_mid_body=True, reply="a fairly long answer to cut in half"))
    error = await failure(provider_for(kind, base_url(kind, emu.url)), stream=stream)
    assert error.kind == "transient"
    assert not error.key_wide and not error.timed_out


# --------------------------------------------------------------------------- 404s


def _route_404_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "router.http" and r.levelno == logging.ERROR]


@by_kind
@pytest.mark.parametrize("html", [True, False], ids=["html", "json"])
async def test_route_404_is_key_wide_and_logged_once(
    kind: str, html: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="router.http")
    async with Emulator.serve(port=0, strict_paths=True, html_404=html) as emu:
        wrong = f"{base_url(kind, emu.url)}/oops"  # a base_url with a path too many
        provider = provider_for(kind, wrong)
        try:
            errors: list[ProviderError] = []
            for stream in (False, False, True):
                with pytest.raises(ProviderError) as info:
                    if stream:
                        async for _ in provider.stream(req(), KEY):
                            pass
                    else:
                        await provider.complete(req(), KEY)
                errors.append(info.value)
        finally:
            await provider.aclose()
        assert emu.calls == []  # no API route was reached
    first = errors[0]
    complete_url = f"{wrong}/chat/completions" if kind == "openai" else None
    for error in errors:
        assert error.kind == "transient" and error.status == 404
        assert error.key_wide and not error.timed_out
        assert "404" in error.message and "base_url" in error.message
        assert wrong in error.message
        assert SECRET not in error.message
    if complete_url is not None:
        assert complete_url in first.message
    # Logged loudly once per URL: the two complete() calls share one URL (one line);
    # the stream has its own URL for Gemini (streamGenerateContent), not for the others.
    records = _route_404_records(caplog)
    assert len(records) == (2 if kind == "gemini" else 1)
    line = records[0].getMessage()
    assert "provider p" in line and wrong in line and "base_url" in line
    assert SECRET not in caplog.text


async def test_a_second_route_404_does_not_log_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="router.http")
    async with Emulator.serve(port=0, strict_paths=True, html_404=True) as emu:
        provider = provider_for("openai", f"{emu.url}/wrong")
        try:
            for _ in range(3):
                with pytest.raises(ProviderError):
                    await provider.complete(req(), KEY)
        finally:
            await provider.aclose()
        # A second provider with the same wrong URL logs its own line once.
        other = provider_for("openai", f"{emu.url}/wrong")
        try:
            with pytest.raises(ProviderError):
                await other.complete(req(), KEY)
        finally:
            await other.aclose()
    records = _route_404_records(caplog)
    assert len(records) == 2
    assert all(f"{emu.url}/wrong/chat/completions" in r.getMessage() for r in records)


@by_kind
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_model_404_stays_model_missing(
    kind: str, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="router.http")
    async with Emulator.serve(port=0, strict_paths=True) as emu:
        emu.script(Fault(status=404), model=UP)
        error = await failure(provider_for(kind, base_url(kind, emu.url)), stream=stream)
        assert [c.model for c in emu.calls] == [UP]
    assert error.kind == "model_missing" and error.status == 404
    assert not error.key_wide
    assert _route_404_records(caplog) == []


# --------------------------------------------------------------------------- finish, then close


@by_kind
async def test_finish_then_drop_completes(emu: Emulator, kind: str) -> None:
    emu.script(Fault(reply="all of the answer", finish_then_drop=True))
    chunks = await collect(provider_for(kind, base_url(kind, emu.url)))
    assert "".join(c.text for c in chunks) == "all of the answer"
    assert chunks[-1].finish_reason == "stop"
    [call] = emu.calls
    assert call.completed and call.stream


@by_kind
async def test_drop_before_the_finish_is_still_transient(emu: Emulator, kind: str) -> None:
    emu.script(Fault(reply="one two three four", close_mid_body=True))
    error = await failure(provider_for(kind, base_url(kind, emu.url)), stream=True)
    assert error.kind == "transient" and not error.key_wide
