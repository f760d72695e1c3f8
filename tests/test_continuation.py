"""Streams that survive an interruption past their first chunk: continued on another
key or model after a prefill, or replayed and spliced on an exact prefix; never a
truncated answer that looks whole, never the fallback's error in place of the real
one."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
from scripted import make_config

from router import (
    ApiKey,
    ChatRequest,
    ChatResponse,
    Message,
    ProviderError,
    Router,
    StreamChunk,
    StreamInterruptedError,
    ToolCallDelta,
    Usage,
)

REFERENCE = "".join(f"word{i} " for i in range(80))
PIECES = [f"word{i} " for i in range(80)]


@dataclass
class Answering:
    """Streams REFERENCE (after any assistant prefill) in word chunks. `plan[key]` says
    how each call on that key ends: "ok", "cut@N" (transient error after N chunks),
    "stall@N" (silence after N chunks), "diverge" (another answer), "refuse" (a 400
    for a prefill), "tools@N" (a tool-call delta, then a cut)."""

    plan: dict[str, list[str]]
    calls: list[tuple[str, str]] = field(default_factory=list)
    """(key id, the prefill it was sent, "" for none)."""

    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse:
        return ChatResponse(content=REFERENCE)

    async def stream(self, request: ChatRequest, key: ApiKey):  # type: ignore[no-untyped-def]
        last = request.messages[-1]
        prefill = last.content if last.role == "assistant" else ""
        assert isinstance(prefill, str)
        assert prefill == prefill.rstrip()  # never a prefill ending in whitespace
        if prefill:
            prefill += " "  # the model goes on after the space the prefill left out
        self.calls.append((key.id, prefill))
        steps = self.plan.get(key.id) or ["ok"]
        how = steps.pop(0) if len(steps) > 1 else steps[0]
        if how == "refuse" and prefill:
            raise ProviderError("bad_request", "this model does not take a prefill", status=400)
        if how == "diverge":
            pieces = ["something ", "else ", "entirely "]
        else:
            assert REFERENCE.startswith(prefill)
            pieces = _rest(prefill)
        mode, _, at = how.partition("@")
        stop_at = int(at) if at else None
        # The prompt's usage first (as Anthropic's message_start), the whole at the end.
        yield StreamChunk(usage=Usage(prompt_tokens=5, total_tokens=5))
        for i, piece in enumerate(pieces):
            if stop_at is not None and i == stop_at:
                if mode == "cut":
                    raise ProviderError("transient", f"connection reset after {i} chunks")
                if mode == "stall":
                    await trio.sleep_forever()
                if mode == "tools":
                    yield StreamChunk(tool_calls=[ToolCallDelta(index=0, id="c", name="f")])
                    raise ProviderError("transient", "cut during a tool call")
            yield StreamChunk(text=piece)
        yield StreamChunk(finish_reason="stop", usage=Usage(prompt_tokens=5, total_tokens=15))


def _rest(prefill: str) -> list[str]:
    rest = REFERENCE[len(prefill) :]
    return [w + " " for w in rest.split(" ") if w]


CFG = """
[router]
idle_timeout = 5.0
[[providers]]
name = "p"
kind = "custom"
keys = [{ id = "a" }, { id = "b" }]
[[providers]]
name = "q"
kind = "custom"
keys = [{ id = "c" }]
[[models]]
name = "m"
provider = "p"
upstream = "um"
continuation = true
fallbacks = ["m2"]
[[models]]
name = "m2"
provider = "q"
upstream = "um2"
continuation = false
"""


def req() -> ChatRequest:
    return ChatRequest(model="m", messages=[Message("user", "count")])


async def read(router: Router) -> tuple[str, object, list[tuple[str, str, int]]]:
    async with router.stream(req()) as stream:
        try:
            text = "".join([c.text async for c in stream])
        except StreamInterruptedError as exc:
            return stream.text, exc, []
    segments = [(s.key_id, s.mode, s.chars) for s in stream.segments]
    return text, stream, segments


async def test_a_cut_after_40_chunks_is_continued_exactly_after_a_prefill(autojump_clock):
    p = Answering({"a": ["cut@40"]})
    async with Router.open(make_config(CFG), providers={"p": p, "q": Answering({})}) as router:
        text, stream, segments = await read(router)
        assert text == REFERENCE  # no gap, no repetition
        assert stream.finish_reason == "stop"  # type: ignore[attr-defined]
        assert segments == [
            ("a", "first", _chars(40)),
            ("b", "prefill", len(REFERENCE) - _chars(40)),
        ]
        assert p.calls == [("a", ""), ("b", "".join(PIECES[:40]))]  # (as the model saw it)
        # The usage of both segments is summed (the cut one reported its prompt only).
        assert stream.usage.total_tokens == 5 + 15  # type: ignore[attr-defined]


def _chars(n: int) -> int:
    return len("".join(PIECES[:n]))


async def test_without_prefill_a_replay_that_repeats_the_prefix_completes_exactly(autojump_clock):
    # Model m's other key cannot help (it is cut as well); m2 takes no prefill: replay.
    p = Answering({"a": ["cut@30"], "b": ["cut@0"]})
    q = Answering({"c": ["ok"]})
    async with Router.open(make_config(CFG), providers={"p": p, "q": q}) as router:
        text, _stream, segments = await read(router)
        assert text == REFERENCE
        assert q.calls == [("c", "")]  # never sent a prefill
        assert segments[0] == ("a", "first", _chars(30))
        assert segments[-1] == ("c", "replay", len(REFERENCE) - _chars(30))


async def test_a_replay_that_diverges_ends_in_the_original_interruption(autojump_clock):
    cfg = make_config(CFG)
    p = Answering({"a": ["cut@12"], "b": ["refuse"]})
    q = Answering({"c": ["diverge"]})
    async with Router.open(cfg, providers={"p": p, "q": q}) as router:
        text, error, _ = await read(router)
        assert isinstance(error, StreamInterruptedError)
        assert text == error.partial_text == "".join(PIECES[:12])
        assert "connection reset after 12 chunks" in str(error)  # the original, not the 400
        assert error.cause.key_id == "a"  # type: ignore[attr-defined]


async def test_a_stall_past_idle_timeout_is_continued(autojump_clock):
    p = Answering({"a": ["stall@20"]})
    async with Router.open(make_config(CFG), providers={"p": p, "q": Answering({})}) as router:
        t0 = trio.current_time()
        text, _, segments = await read(router)
        assert text == REFERENCE
        assert trio.current_time() - t0 == pytest.approx(5.0, abs=0.5)
        assert [s[:2] for s in segments] == [("a", "first"), ("b", "prefill")]


async def test_a_malformed_event_mid_stream_is_continued(autojump_clock):
    class Malformed(Answering):
        async def stream(self, request, key):  # type: ignore[no-untyped-def]
            if key.id == "a":
                self.calls.append((key.id, ""))
                for piece in PIECES[:7]:
                    yield StreamChunk(text=piece)
                raise ProviderError("transient", "malformed event: not JSON")
            async for chunk in super().stream(request, key):
                yield chunk

    p = Malformed({})
    async with Router.open(make_config(CFG), providers={"p": p, "q": Answering({})}) as router:
        text, _, _ = await read(router)
        assert text == REFERENCE


async def test_tool_call_deltas_in_flight_are_not_continued(autojump_clock):
    p = Answering({"a": ["tools@5"]})
    async with Router.open(make_config(CFG), providers={"p": p, "q": Answering({})}) as router:
        _text, error, _ = await read(router)
        assert isinstance(error, StreamInterruptedError)
        assert [k for k, _ in p.calls] == ["a"]


async def test_at_most_max_continuations(autojump_clock):
    p = Answering({"a": ["cut@10"], "b": ["cut@10"]})
    q = Answering({"c": ["ok"]})
    async with Router.open(make_config(CFG), providers={"p": p, "q": q}) as router:
        _text, error, _ = await read(router)
        assert isinstance(error, StreamInterruptedError)
        assert error.partial_text == "".join(PIECES[:20])
        assert "connection reset after 10 chunks" in str(error)
        assert q.calls == []  # one continuation (b) was all that was allowed


async def test_continuation_can_be_switched_off(autojump_clock):
    cfg = make_config(CFG)
    cfg.router.max_continuations = 0
    p = Answering({"a": ["cut@3"]})
    async with Router.open(cfg, providers={"p": p, "q": Answering({})}) as router:
        _, error, _ = await read(router)
        assert isinstance(error, StreamInterruptedError)
        assert [k for k, _ in p.calls] == ["a"]


async def test_a_continuation_that_restores_the_trailing_space_does_not_double_it(
    autojump_clock,
):
    class SpaceFirst(Answering):
        async def stream(self, request, key):  # type: ignore[no-untyped-def]
            prefilled = request.messages[-1].role == "assistant"
            first = True
            async for chunk in super().stream(request, key):
                if prefilled and first and chunk.text:
                    first = False
                    chunk = StreamChunk(text=" " + chunk.text)
                yield chunk

    p = SpaceFirst({"a": ["cut@25"]})
    async with Router.open(make_config(CFG), providers={"p": p, "q": Answering({})}) as router:
        text, _, _ = await read(router)
        assert text == REFERENCE
