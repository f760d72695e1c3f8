"""Shared test tools: a scripted custom provider that injects exact faults, and a
config builder. Tests use the real Router, real key actors and the real trio clock
(virtual under `autojump_clock`)."""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import pytest
import trio

from router import (
    ApiKey,
    ChatRequest,
    ChatResponse,
    ErrorKind,
    ProviderError,
    RouterConfig,
    StreamChunk,
    Usage,
)
from router._provider import STREAM_CUT


@dataclass(frozen=True)
class Reply:
    """Answer after `latency` seconds."""

    content: str = "ok"
    latency: float = 0.0


@dataclass(frozen=True)
class Fail:
    """Raise ProviderError(kind) after `latency` seconds."""

    kind: ErrorKind
    retry_after: float | None = None
    status: int | None = None
    latency: float = 0.0
    message: str = ""
    key_wide: bool = False
    timed_out: bool = False


@dataclass(frozen=True)
class Hang:
    """Never answer."""


Action = Reply | Fail | Hang


@dataclass(frozen=True)
class Call:
    time: float
    key_id: str
    model: str
    max_tokens: int | None


@dataclass
class ScriptedProvider:
    """A custom provider whose every call follows a per-key script.

    `script(key_id, actions)` queues actions for that key; a key with an empty queue
    uses `default` (a plain reply). `script("key/model", ...)` scripts only the calls
    for that upstream model on that key (taken before the key's own script).
    `calls` records every call, in order.
    `on_call(key_id)` runs at the start of each call, before any sleeping.
    """

    default: Action = field(default_factory=Reply)
    calls: list[Call] = field(default_factory=list)
    on_call: Callable[[str], None] | None = None
    _scripts: dict[str, deque[Action]] = field(default_factory=lambda: defaultdict(deque))
    _defaults: dict[str, Action] = field(default_factory=dict)

    def script(self, key_id: str, actions: Iterable[Action]) -> None:
        self._scripts[key_id].extend(actions)

    def set_default(self, key_id: str, action: Action) -> None:
        self._defaults[key_id] = action

    def calls_to(self, key_id: str, model: str | None = None) -> int:
        return sum(
            1 for c in self.calls if c.key_id == key_id and (model is None or c.model == model)
        )

    def _next(self, key_id: str, model: str) -> Action:
        lane = self._scripts.get(f"{key_id}/{model}")
        if lane:
            return lane.popleft()
        queue = self._scripts[key_id]
        return queue.popleft() if queue else self._defaults.get(key_id, self.default)

    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse:
        self.calls.append(Call(trio.current_time(), key.id, request.model, request.max_tokens))
        if self.on_call is not None:
            self.on_call(key.id)
        action = self._next(key.id, request.model)
        if isinstance(action, Hang):
            await trio.sleep_forever()
        assert isinstance(action, Reply | Fail)
        if action.latency:
            await trio.sleep(action.latency)
        if isinstance(action, Fail):
            raise ProviderError(
                action.kind,
                action.message or f"scripted {action.kind}",
                retry_after=action.retry_after,
                status=action.status,
                key_wide=action.key_wide,
                timed_out=action.timed_out,
            )
        return ChatResponse(content=f"{action.content} from {key.id}")


@dataclass(frozen=True)
class StreamScript:
    """Stream `pieces` with `interval` seconds between them (the first after `latency`);
    then end as `ending` says: "finish" (finish reason, then end), "cut" (raise a
    transient error), "stall" (hang forever)."""

    pieces: tuple[str, ...] = ("hello ", "world")
    latency: float = 0.0
    interval: float = 0.0
    ending: str = "finish"


def cuttable_reads(provider: object) -> Callable[[float], Awaitable[None]]:
    """A stream's waits for its next piece, made cuttable from outside as the router's
    HTTP transport makes its socket reads: when the stream may be read from any task
    (`reads_anywhere` on `provider`), the key actor gets a way to cut a pending read
    (`STREAM_CUT`), and the cut read fails as a broken connection would. Call it where
    the stream starts (the actor's context)."""
    cut = STREAM_CUT.get() if getattr(provider, "reads_anywhere", False) else None
    reading: list[trio.CancelScope] = []
    if cut is not None:
        cut.cut = lambda: reading[-1].cancel() if reading else None

    async def read(seconds: float) -> None:
        with trio.CancelScope() as scope:
            reading.append(scope)
            try:
                await trio.sleep(seconds)
            finally:
                reading.pop()
        if scope.cancelled_caught:
            raise ProviderError("transient", "the read was cut")

    return read


@dataclass
class StreamingScriptedProvider(ScriptedProvider):
    """A ScriptedProvider that also streams: a StreamScript action streams, other
    actions behave as in `complete` before the first chunk. Records closed streams."""

    closed: list[str] = field(default_factory=list)

    async def stream(self, request: ChatRequest, key: ApiKey) -> AsyncIterator[StreamChunk]:
        self.calls.append(Call(trio.current_time(), key.id, request.model, request.max_tokens))
        action = self._next(key.id, request.model)
        read = cuttable_reads(self)
        try:
            if not isinstance(action, StreamScript):
                self._scripts[f"{key.id}/{request.model}"].appendleft(action)
                self.calls.pop()
                response = await self.complete(request, key)
                yield StreamChunk(text=response.content, finish_reason="stop")
                return
            await read(action.latency)
            for i, piece in enumerate(action.pieces):
                if i:
                    await read(action.interval)
                yield StreamChunk(text=piece)
            if action.ending == "finish":
                yield StreamChunk(finish_reason="stop", usage=Usage(total_tokens=2))
            elif action.ending == "cut":
                raise ProviderError("transient", "stream cut")
            else:
                await read(math.inf)
        finally:
            self.closed.append(key.id)


def make_config(text: str) -> RouterConfig:
    """RouterConfig from TOML, with jitter off so timings are exact."""
    cfg = RouterConfig.from_toml(text)
    cfg.router.retry_jitter = 0.0
    cfg.router.breaker.jitter = 0.0
    return cfg


def reading_both_ways(*classes: type) -> Callable[..., str]:
    """A fixture that runs each test of a module twice, once for each way a handed-over
    stream is read: "pump" (the key's worker reads the provider and feeds the caller
    through a channel) and "pull" (the caller's own task reads the provider, as it does
    the built-in HTTP ones: `reads_anywhere`). It sets the flag on `classes` (their
    streams hold no cancel scope across a yield, so both ways are valid for them)."""

    @pytest.fixture(params=["pump", "pull"], autouse=True)
    def stream_reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
        for cls in classes:
            monkeypatch.setattr(cls, "reads_anywhere", request.param == "pull", raising=False)
        return str(request.param)

    return stream_reading
