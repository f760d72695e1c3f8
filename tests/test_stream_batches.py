"""Streams relay batches: the chunks one upstream read produced travel together, from
the provider (`stream_batches`) through the key actor's pump (one channel item) and
`ChatStream.batches()` to the gateway (one ASGI body message per batch); and the
pump's idle timeout costs no cancel scope per chunk.

Library tests run scripted providers under `autojump_clock`; the HTTP tests use a
minimal upstream on a loopback socket that writes each group of events in one write,
and call the gateway app in process, counting the body messages it sends.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from scripted import (
    StreamingScriptedProvider,
    StreamScript,
    cuttable_reads,
    make_config,
    reading_both_ways,
)

from router import (
    ApiKey,
    ChatRequest,
    Message,
    ProviderError,
    Router,
    RouterConfig,
    StreamChunk,
    StreamInterruptedError,
    Usage,
)
from router.gateway._app import GatewayApp, _ChunkFrames
from router.gateway._messages import MessageEvents, sse
from router.gateway._shapes import chunk_json, has_news

IDLE = 3.0

CFG = f"""
[router]
first_token_timeout = 5.0
idle_timeout = {IDLE}
timeout = 60.0
max_continuations = 0
[[providers]]
name = "p"
kind = "custom"
keys = [{{ id = "a" }}]
[[models]]
name = "m"
provider = "p"
upstream = "up-m"
"""


def req() -> ChatRequest:
    return ChatRequest(model="m", messages=[Message("user", "hi")])


class Batches:
    """A custom provider with `stream_batches`: yields the given batches, sleeping
    `gap` seconds before each one after the first, then stalls if `stall`."""

    def __init__(self, batches: list[list[StreamChunk]], gap: float = 0.0, stall: bool = False):
        self.batches = batches
        self.gap = gap
        self.stall = stall
        self.closed = 0

    async def complete(self, request: ChatRequest, key: ApiKey) -> Any:
        raise AssertionError("streams only")

    async def stream_batches(
        self, request: ChatRequest, key: ApiKey
    ) -> AsyncIterator[list[StreamChunk]]:
        read = cuttable_reads(self)

        try:
            for i, batch in enumerate(self.batches):
                if i:
                    await read(self.gap)
                yield batch
            if self.stall:
                await read(math.inf)
        finally:
            self.closed += 1


stream_reading = reading_both_ways(Batches, StreamingScriptedProvider)


def texts(batch: list[StreamChunk]) -> list[str]:
    return [c.text for c in batch]


# -- the library: batches end to end -----------------------------------------------------


async def test_batches_arrive_as_the_provider_yielded_them(autojump_clock):
    first = [StreamChunk(text="a"), StreamChunk(text="b")]
    second = [StreamChunk(text="c"), StreamChunk(text="d"), StreamChunk(text="e")]
    last = [StreamChunk(finish_reason="stop", usage=Usage(total_tokens=5))]
    p = Batches([first, second, last], gap=0.5)
    async with Router.open(make_config(CFG), providers={"p": p}) as router:
        async with router.stream(req()) as stream:
            got = [batch async for batch in stream.batches()]
        assert [texts(b) for b in got] == [["a", "b"], ["c", "d", "e"], [""]]
        assert stream.text == "abcde"
        assert stream.finish_reason == "stop"
        assert stream.usage == Usage(total_tokens=5)
        # Chunk by chunk, the same answer.
        async with router.stream(req()) as stream:
            chunks = [c async for c in stream]
        assert [c.text for c in chunks] == ["a", "b", "c", "d", "e", ""]
        assert p.closed == 2


async def test_chunks_and_batches_can_be_mixed(autojump_clock):
    p = Batches([[StreamChunk(text=t) for t in "abc"], [StreamChunk(text="d")]])
    p.batches.append([StreamChunk(finish_reason="stop")])
    async with Router.open(make_config(CFG), providers={"p": p}) as router:
        async with router.stream(req()) as stream:
            one = await stream.__anext__()
            rest = await stream.batches().__anext__()  # the rest of the first batch
            more = [batch async for batch in stream.batches()]
        assert one.text == "a"
        assert texts(rest) == ["b", "c"]
        assert [texts(b) for b in more] == [["d"], [""]]
        assert stream.text == "abcd"


async def test_a_provider_yielding_single_chunks_still_streams(autojump_clock):
    p = StreamingScriptedProvider()
    p.set_default("a", StreamScript(pieces=("x ", "y ", "z"), interval=0.5))
    async with Router.open(make_config(CFG), providers={"p": p}) as router:
        async with router.stream(req()) as stream:
            got = [batch async for batch in stream.batches()]
        assert [texts(b) for b in got] == [["x "], ["y "], ["z"], [""]]
        async with router.stream(req()) as stream:
            assert "".join([c.text async for c in stream]) == "x y z"
        assert p.closed == ["a", "a"]


async def test_a_first_batch_without_content_waits_for_content(autojump_clock):
    meta = [StreamChunk(provider_fields={"system_fingerprint": "fp"})]
    p = Batches([meta, [StreamChunk(text="hi"), StreamChunk(finish_reason="stop")]], gap=1.0)
    async with Router.open(make_config(CFG), providers={"p": p}) as router:
        async with router.stream(req()) as stream:
            got = [batch async for batch in stream.batches()]
        # Both batches were read before the stream was handed over (failover stays
        # possible until content): the caller gets them together, in order.
        assert [texts(b) for b in got] == [["", "hi", ""]]
        assert got[0][0].provider_fields == {"system_fingerprint": "fp"}


# -- the idle timeout without a cancel scope per chunk ------------------------------------


async def test_the_pump_opens_no_cancel_scope_per_chunk(autojump_clock, monkeypatch):
    made = {"n": 0}
    real = trio.CancelScope

    def counting(*args: Any, **kwargs: Any) -> trio.CancelScope:
        if sys._getframe(1).f_globals["__name__"].startswith("router."):
            made["n"] += 1  # made by the router (the provider's sleeps make their own)
        return real(*args, **kwargs)

    p = StreamingScriptedProvider()
    pieces = tuple(f"{i} " for i in range(2_000))
    p.set_default("a", StreamScript(pieces=pieces, interval=0.01))
    async with Router.open(make_config(CFG), providers={"p": p}) as router:
        async with router.stream(req()) as stream:
            await stream.__anext__()
            monkeypatch.setattr(trio, "CancelScope", counting)
            rest = [c.text async for c in stream]
            monkeypatch.setattr(trio, "CancelScope", real)
        assert "".join(rest) == "".join(pieces[1:])
        # 2,000 chunks over 20 s: a few scopes of the pump's and one per wake of the
        # actor task (about once per idle timeout), not one per chunk.
        assert made["n"] <= 3 + 20 / IDLE


async def test_idle_timeout_fires_exactly_after_a_long_stream(autojump_clock):
    p = StreamingScriptedProvider()
    pieces = tuple(f"{i} " for i in range(1_000))
    p.set_default("a", StreamScript(pieces=pieces, interval=0.25, ending="stall"))
    async with Router.open(make_config(CFG), providers={"p": p}) as router:
        t0 = trio.current_time()
        last = 0.0
        async with router.stream(req()) as stream:
            with pytest.raises(StreamInterruptedError) as info:
                async for _ in stream:
                    last = trio.current_time()
            t_err = trio.current_time()
        assert last - t0 == 999 * 0.25
        assert t_err - last == IDLE
        assert info.value.partial_text == "".join(pieces)
        assert "idle" in str(info.value)


async def test_batches_just_inside_the_idle_timeout_never_time_out(autojump_clock):
    batches = [[StreamChunk(text=f"{i} ")] for i in range(50)]
    p = Batches([*batches, [StreamChunk(finish_reason="stop")]], gap=IDLE - 0.001)
    async with Router.open(make_config(CFG), providers={"p": p}) as router:
        async with router.stream(req()) as stream:
            text = "".join([c.text async for c in stream])
        assert text == "".join(f"{i} " for i in range(50))
        assert stream.finish_reason == "stop"


async def test_finish_then_stall_ends_after_the_grace_in_a_batch(autojump_clock):
    p = Batches(
        [[StreamChunk(text="a")], [StreamChunk(text="b"), StreamChunk(finish_reason="stop")]]
    )
    p.stall = True
    cfg = make_config(CFG)
    cfg.router.idle_timeout = 30.0
    async with Router.open(cfg, providers={"p": p}) as router:
        async with router.stream(req()) as stream:
            t0 = trio.current_time()
            text = "".join([c.text async for c in stream])
            waited = trio.current_time() - t0
        assert text == "ab"
        assert stream.finish_reason == "stop"
        assert waited == 1.0  # the after-finish grace, not the 30 s idle timeout


async def test_a_slow_reader_is_not_an_idle_upstream(autojump_clock):
    # The pump waits on the reader (the channel is full) far longer than the idle
    # timeout: that wait is not the upstream's, and the answer arrives whole.
    batches = [[StreamChunk(text=f"{i} ")] for i in range(40)]
    p = Batches([*batches, [StreamChunk(finish_reason="stop")]])
    async with Router.open(make_config(CFG), providers={"p": p}) as router:
        async with router.stream(req()) as stream:
            await stream.__anext__()
            await trio.sleep(10 * IDLE)
            rest = "".join([c.text async for c in stream])
        assert rest == "".join(f"{i} " for i in range(1, 40))
        assert stream.finish_reason == "stop"


@settings(max_examples=30, deadline=None)
@given(gaps=st.lists(st.sampled_from([0.0, IDLE - 0.5, IDLE, IDLE + 0.5]), min_size=1, max_size=6))
def test_no_chunk_is_lost_at_the_idle_boundary(gaps: list[float]) -> None:
    """Batches arriving exactly as the idle timer falls due (the actor task and the
    pump wake in the same tick): the caller sees every batch that arrived, in order,
    and an interruption's partial text is exactly what it was handed."""

    class Gapped(Batches):
        async def stream_batches(self, request, key):  # type: ignore[no-untyped-def]
            yield [StreamChunk(text="0 ")]
            for i, gap in enumerate(gaps, 1):
                await trio.sleep(gap)
                yield [StreamChunk(text=f"{i} ")]
            yield [StreamChunk(finish_reason="stop")]

    async def main() -> None:
        async with Router.open(make_config(CFG), providers={"p": Gapped([])}) as router:
            seen: list[str] = []
            async with router.stream(req()) as stream:
                try:
                    async for chunk in stream:
                        seen.append(chunk.text)
                except StreamInterruptedError as exc:
                    # cut in the wait after chunk k: a gap of at least the timeout,
                    # and every chunk before it was delivered
                    k = len(seen) - 1
                    assert exc.partial_text == "".join(seen)
                    assert seen == [f"{i} " for i in range(k + 1)]
                    assert k < len(gaps) and gaps[k] >= IDLE
                    assert all(gap <= IDLE for gap in gaps[:k])
                    return
            assert all(gap <= IDLE for gap in gaps)
            assert seen == [*(f"{i} " for i in range(len(gaps) + 1)), ""]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# -- the gateway's frames --------------------------------------------------------------


def _old_frames(chunks: list[StreamChunk], model: str, include_usage: bool, first: bool) -> bytes:
    """The frames as the gateway wrote them before batching: one `chunk_json` each."""
    out = b""
    for chunk in chunks:
        if not (first or has_news(chunk)):
            continue
        payload = chunk_json("cid-1", 17, model, chunk, first=first, include_usage=include_usage)
        first = False
        out += b"data: " + msgspec.json.encode(payload) + b"\n\n"
    return out


_chunks = st.builds(
    StreamChunk,
    text=st.text(max_size=12),
    finish_reason=st.none() | st.sampled_from(["stop", "length"]),
    reasoning=st.sampled_from(["", "hmm"]),
    refusal=st.sampled_from(["", "no"]),
    usage=st.none() | st.just(Usage(total_tokens=3)),
    stop_sequence=st.none() | st.just("END"),
)


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(st.lists(_chunks, max_size=5), max_size=4),
    model=st.text(min_size=1, max_size=10),
    include_usage=st.booleans(),
)
def test_openai_frames_are_byte_for_byte_the_per_chunk_ones(
    batches: list[list[StreamChunk]], model: str, include_usage: bool
) -> None:
    frames = _ChunkFrames("cid-1", 17, model, include_usage)
    got = b"".join(frames.render(batch) for batch in batches)
    flat = [chunk for batch in batches for chunk in batch]
    assert got == _old_frames(flat, model, include_usage, first=True)


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(_chunks, max_size=8), thinking=st.booleans())
def test_messages_text_deltas_are_byte_for_byte_the_encoded_events(
    chunks: list[StreamChunk], thinking: bool
) -> None:
    fast = MessageEvents("m", thinking=thinking)
    reference = MessageEvents("m", thinking=thinking)
    for chunk in chunks:
        assert fast.chunk(chunk) == reference._render(chunk)  # every delta via `sse`
    assert fast.end(None) == reference.end(None)


def test_a_text_delta_spliced_in_is_the_encoded_event() -> None:
    events = MessageEvents("m", thinking=False)
    events.chunk(StreamChunk(text="a"))
    delta = {"type": "text_delta", "text": 'é\n"\\'}
    want = sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
    assert events.chunk(StreamChunk(text='é\n"\\')) == want


# -- over HTTP: an upstream read is one batch, and one gateway body message --------------


def _event(i: int) -> bytes:
    payload = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


_FINISH = (
    b"data: "
    + json.dumps(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "up",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 9, "total_tokens": 11},
        }
    ).encode()
    + b"\n\n"
    + b"data: [DONE]\n\n"
)


@asynccontextmanager
async def upstream(writes: list[bytes]) -> AsyncIterator[str]:
    """An OpenAI-compatible upstream on loopback whose streamed body goes out in
    `writes` (one `send_all` each, 50 ms apart; the first with the response head)."""

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        while len(body) < length:
            body += await stream.receive_some(65536)
        total = sum(len(w) for w in writes)
        response = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"content-length: %d\r\n\r\n" % total
        )
        for i, piece in enumerate(writes):
            if i:
                await trio.sleep(0.05)
            await stream.send_all(response + piece if i == 0 else piece)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}/v1"
        nursery.cancel_scope.cancel()


def _http_config(url: str) -> RouterConfig:
    return RouterConfig.from_dict(
        {
            "router": {"idle_timeout": 5.0, "first_token_timeout": 5.0, "max_continuations": 0},
            "providers": [
                {
                    "name": "up",
                    "kind": "openai",
                    "base_url": url,
                    "keys": [{"id": "k", "secret": "sk-batch-test-1234"}],
                }
            ],
            "models": [{"name": "m", "provider": "up", "upstream": "up-model"}],
        }
    )


WRITES = [
    b"".join(_event(i) for i in range(5)),
    b"".join(_event(i) for i in range(5, 12)) + _FINISH,
]


async def test_one_upstream_read_is_one_batch_over_http() -> None:
    async with (
        upstream(WRITES) as url,
        Router.open(_http_config(url)) as router,
        router.stream(req()) as stream,
    ):
        got = [batch async for batch in stream.batches()]
    assert [texts(b) for b in got] == [
        [f"t{i} " for i in range(5)],
        [*(f"t{i} " for i in range(5, 12)), ""],
    ]
    assert stream.usage is not None and stream.usage.total_tokens == 11


async def test_a_malformed_event_in_a_read_comes_after_the_chunks_before_it() -> None:
    broken = [b"".join(_event(i) for i in range(3)) + b"data: {not json\n\n" + _event(3)]
    async with (
        upstream(broken) as url,
        Router.open(_http_config(url)) as router,
        router.stream(req()) as stream,
    ):
        with pytest.raises(StreamInterruptedError) as info:
            async for _ in stream:
                pass
    assert info.value.partial_text == "t0 t1 t2 "
    assert "malformed" in str(info.value)


async def _gateway_call(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    config = _http_config(url)
    app = GatewayApp(config)
    sent: list[dict[str, Any]] = []
    pending = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await trio.sleep_forever()
        raise AssertionError

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-type", b"application/json")],
    }
    async with Router.open(config) as router:
        app.router = router
        await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    return [e for e in sent[1:] if e["type"] == "http.response.body"]


async def test_the_gateway_writes_one_body_message_per_upstream_read() -> None:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with upstream(WRITES) as url:
        messages = await _gateway_call(url, "/v1/chat/completions", body)
    # One message per upstream read, then [DONE]: not one per chunk.
    assert len(messages) == 3
    assert [m["more_body"] for m in messages] == [True, True, False]
    assert messages[-1]["body"] == b"data: [DONE]\n\n"
    frames = [m["body"].split(b"\n\n")[:-1] for m in messages[:2]]
    assert [len(f) for f in frames] == [5, 8]  # 5 chunks; 7 chunks and the finish
    deltas = [json.loads(f.removeprefix(b"data: "))["choices"][0] for f in frames[0] + frames[1]]
    assert "".join(d["delta"].get("content", "") for d in deltas) == "".join(
        f"t{i} " for i in range(12)
    )
    assert deltas[0]["delta"]["role"] == "assistant"
    assert deltas[-1]["finish_reason"] == "stop"


async def test_the_messages_shape_writes_one_body_message_per_upstream_read() -> None:
    body = {
        "model": "m",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with upstream(WRITES) as url:
        messages = await _gateway_call(url, "/v1/messages", body)
    # message_start, one message per upstream read, then the end.
    assert len(messages) == 4
    events = [m["body"] for m in messages]
    assert events[0].startswith(b"event: message_start")
    assert events[1].count(b"event: content_block_delta") == 5
    assert events[1].startswith(b"event: content_block_start")
    assert events[2].count(b"event: content_block_delta") == 7
    assert events[3].endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    text = ""
    for raw in b"".join(events).split(b"\n\n")[:-1]:
        name, data = raw.split(b"\n", 1)
        payload = json.loads(data.removeprefix(b"data: "))
        if name == b"event: content_block_delta":
            text += payload["delta"]["text"]
    assert text == "".join(f"t{i} " for i in range(12))


async def test_a_provider_error_before_any_batch_is_still_a_failover(autojump_clock):
    class Broken(Batches):
        async def stream_batches(self, request, key):  # type: ignore[no-untyped-def]
            raise ProviderError("transient", "refused")
            yield []  # pragma: no cover

    cfg = make_config(CFG)
    cfg.router.transient_retries = 0
    async with Router.open(cfg, providers={"p": Broken([])}) as router:
        with pytest.raises(Exception) as info:
            async with router.stream(req()):
                pass
    assert "refused" in str(info.value)


# -- the SSE parser's fast path (LF-only pieces) agrees with its general path -------------

_lines = st.lists(
    st.sampled_from(
        [
            b'data: {"a": 1}',
            b"data:x",
            b"data",
            b"event: e",
            b": ping",
            b"id: 9",
            b"",
            b"data: \xc3\xa9",
        ]
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(
    lines=_lines,
    endings=st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=12, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_sse_pieces_give_the_events_of_the_whole(
    lines: list[bytes], endings: list[bytes], cuts: list[int]
) -> None:
    from router._sse import SseParser

    raw = b"".join(line + end for line, end in zip(lines, endings, strict=False)) + b"\n\n"
    whole = SseParser().feed(raw)
    parser = SseParser()
    got = []
    start = 0
    for cut in [*sorted({min(c, len(raw)) for c in cuts}), len(raw)]:
        got += parser.feed(raw[start:cut])
        start = cut
    assert got == whole
    lf_only = b"".join(line + b"\n" for line in lines) + b"\n\n"
    crlf = lf_only.replace(b"\n", b"\r\n")
    assert SseParser().feed(lf_only) == SseParser().feed(crlf)  # both paths, same events


async def test_usage_in_the_first_batch_reconciles_the_token_budget(autojump_clock):
    # A short answer whose text, finish and usage all come in the first read.
    whole = [
        StreamChunk(text="hi"),
        StreamChunk(finish_reason="stop", usage=Usage(prompt_tokens=3, total_tokens=5)),
    ]
    cfg = make_config(CFG.replace('{ id = "a" }', '{ id = "a", tpm = 10000 }'))
    async with Router.open(cfg, providers={"p": Batches([whole])}) as router:
        (actor,) = router._runtimes["p"].actors
        request = ChatRequest(model="m", messages=[Message("user", "hi")], max_tokens=500)
        async with router.stream(request) as stream:
            assert "".join([c.text async for c in stream]) == "hi"
        assert actor.budget is not None
        assert actor.budget.remaining(trio.current_time()) == (None, 10000 - 5)


def test_a_batch_that_arrives_as_the_idle_timer_falls_due_is_relayed() -> None:
    """The upstream's data arrives (the pump is woken with it) in the same tick as the
    actor task finds the idle timer due. Whichever of the two trio runs first, the
    caller is handed every batch that arrived, and a batch that did arrive is never
    followed by a spurious idle cut: either the wait was cut before the data came
    (the timeout stands, "0 " is all), or the stream goes on to its end."""

    class Boundary(Batches):
        nursery: trio.Nursery

        async def stream_batches(self, request, key):  # type: ignore[no-untyped-def]
            yield [StreamChunk(text="0 ")]
            arrived = trio.Event()

            async def data_comes() -> None:
                await trio.sleep(IDLE)  # exactly when the idle timer falls due
                arrived.set()

            self.nursery.start_soon(data_comes)
            await arrived.wait()
            yield [StreamChunk(text="1 ")]
            await trio.sleep(1.0)
            yield [StreamChunk(text="2 "), StreamChunk(finish_reason="stop")]

    async def once() -> str:
        provider = Boundary([])
        async with trio.open_nursery() as nursery:
            provider.nursery = nursery
            async with Router.open(make_config(CFG), providers={"p": provider}) as router:
                seen: list[str] = []
                async with router.stream(req()) as stream:
                    try:
                        async for chunk in stream:
                            seen.append(chunk.text)
                    except StreamInterruptedError as exc:
                        assert seen == ["0 "]
                        assert exc.partial_text == "0 "
                        return "cut"
                assert seen == ["0 ", "1 ", "2 ", ""]
                return "whole"

    outcomes = {
        trio.run(once, clock=trio.testing.MockClock(autojump_threshold=0)) for _ in range(40)
    }
    assert outcomes <= {"cut", "whole"}
