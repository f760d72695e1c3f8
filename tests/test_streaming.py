"""Streaming through the real Router: failover before the first chunk, the first-token
and idle timeouts, interruptions after the first chunk, and cancellation.

Every test drives real key actors with scripted custom providers (or the simulated
one) under a virtual clock (`autojump_clock`), so every time asserted is exact.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from scripted import (
    Fail,
    Hang,
    Reply,
    ScriptedProvider,
    StreamingScriptedProvider,
    StreamScript,
    make_config,
    reading_both_ways,
)

from router import (
    ApiKey,
    ChainExhaustedError,
    ChatRequest,
    DeadlineExceededError,
    KeySnapshot,
    Message,
    ProviderError,
    Router,
    RouterClosedError,
    RouterConfig,
    RouterError,
    StreamChunk,
    StreamInterruptedError,
    Usage,
)

stream_reading = reading_both_ways(StreamingScriptedProvider)

FTT = 5.0
"""first_token_timeout of the default config."""
IDLE = 3.0
"""idle_timeout of the default config."""

# Provider p has keys a and b and serves model m; model m falls back to m2 on
# provider q (key c), which falls back to m3 on provider r (key d).
BASE = f"""
[router]
transient_retries = 2
retry_backoff = [0.5, 2.0]
first_token_timeout = {FTT}
idle_timeout = {IDLE}
timeout = 60.0
[[providers]]
name = "p"
kind = "custom"
keys = [{{ id = "a" }}, {{ id = "b" }}]
[[providers]]
name = "q"
kind = "custom"
keys = [{{ id = "c" }}]
[[providers]]
name = "r"
kind = "custom"
keys = [{{ id = "d" }}]
[[models]]
name = "m"
provider = "p"
upstream = "up-m"
fallbacks = ["m2"]
[[models]]
name = "m2"
provider = "q"
upstream = "up-m2"
fallbacks = ["m3"]
[[models]]
name = "m3"
provider = "r"
upstream = "up-m3"
"""

GOOD = StreamScript(pieces=("one ", "two ", "three"), interval=0.5)
GOOD_CHUNKS = [("one ", None), ("two ", None), ("three", None), ("", "stop")]


def config(**router: object) -> RouterConfig:
    cfg = make_config(BASE)
    for name, value in router.items():
        setattr(cfg.router, name, value)
    return cfg


def req(model: str = "m", **kw: object) -> ChatRequest:
    return ChatRequest(model=model, messages=[Message("user", "hi")], **kw)  # type: ignore[arg-type]


def providers(
    p: ScriptedProvider | None = None,
    q: ScriptedProvider | None = None,
    r: ScriptedProvider | None = None,
) -> dict[str, ScriptedProvider]:
    return {
        "p": p if p is not None else StreamingScriptedProvider(),
        "q": q if q is not None else StreamingScriptedProvider(),
        "r": r if r is not None else StreamingScriptedProvider(),
    }


def key(router: Router, key_id: str) -> KeySnapshot:
    (snap,) = [k for k in router.snapshot().keys if k.key_id == key_id]
    return snap


def outcomes(attempts: list) -> list[tuple[str, str]]:
    return [(a.key_id, a.outcome) for a in attempts]


def all_idle(router: Router) -> bool:
    return all(k.in_flight == 0 and k.queued == 0 for k in router.snapshot().keys)


# -- failover before the first chunk ------------------------------------------------------


@pytest.mark.parametrize(
    ("a_actions", "served_by", "model", "a_outcomes"),
    [
        pytest.param(
            [Fail("rate_limit", retry_after=7.0, status=429)],
            "b",
            "m",
            ["rate_limit"],
            id="rate_limit-next-key",
        ),
        pytest.param([Fail("auth", status=401)], "b", "m", ["auth"], id="auth-next-key"),
        pytest.param(
            [Fail("transient", status=503)] * 3,
            "c",
            "m2",
            ["transient"] * 3,
            id="transient-after-retries-next-model",
        ),
        # A silent upstream is not retried in place while a fallback is callable.
        pytest.param([Hang()], "c", "m2", ["transient"], id="hang-ttft-next-model"),
        pytest.param(
            [StreamScript(latency=FTT + 1)],
            "c",
            "m2",
            ["transient"],
            id="slow-first-chunk-next-model",
        ),
        pytest.param(
            # A chunk without content, then a cut: nothing of a's reached the caller.
            [StreamScript(pieces=("",), ending="cut")] * 3,
            "c",
            "m2",
            ["transient"] * 3,
            id="cut-before-content-next-model",
        ),
    ],
)
async def test_failover_before_first_chunk_is_invisible(
    autojump_clock, a_actions, served_by, model, a_outcomes
):
    p, q = StreamingScriptedProvider(), StreamingScriptedProvider()
    p.script("a", a_actions)
    p.set_default("b", GOOD)
    q.set_default("c", GOOD)
    async with Router.open(config(), providers=providers(p, q)) as router:
        async with router.stream(req()) as stream:
            chunks = [(c.text, c.finish_reason) async for c in stream]
        assert chunks == GOOD_CHUNKS
        assert stream.text == "one two three"
        assert stream.finish_reason == "stop"
        assert stream.usage == Usage(total_tokens=2)
        assert (stream.key_id, stream.model) == (served_by, model)
        assert outcomes(stream.attempts) == [("a", o) for o in a_outcomes] + [(served_by, "ok")]
        assert p.calls_to("a") == len(a_actions)
        # a's stream was closed, every time it was opened.
        assert p.closed.count("a") == len(a_actions)
        assert (p.closed + q.closed).count(served_by) == 1
        assert all_idle(router)


async def test_failover_before_first_chunk_with_complete_only_provider(autojump_clock):
    p = ScriptedProvider()
    p.script("a", [Fail("rate_limit", status=429)])
    p.set_default("b", Reply("whole"))
    async with Router.open(config(), providers=providers(p)) as router:
        async with router.stream(req()) as stream:
            chunks = [(c.text, c.finish_reason) async for c in stream]
        assert chunks == [("whole from b", "stop")]
        assert outcomes(stream.attempts) == [("a", "rate_limit"), ("b", "ok")]


# -- the first-token timeout ------------------------------------------------------------


@pytest.mark.parametrize(
    "slow",
    [
        StreamScript(latency=FTT + 2),
        Hang(),
        # Chunks without content every second do not stop the first-token clock.
        StreamScript(pieces=("",) * 100, interval=1.0, ending="stall"),
    ],
    ids=["slow", "hang", "keepalives"],
)
async def test_ttft_timeout_fails_at_exactly_ttft_and_retries_in_place(autojump_clock, slow):
    # m3 has no fallback: a silent first token is retried in place, each attempt cut at
    # exactly the first-token timeout.
    r = StreamingScriptedProvider()
    r.script("d", [slow, slow, GOOD])
    async with Router.open(config(), providers=providers(r=r)) as router:
        t0 = trio.current_time()
        async with router.stream(req("m3")) as stream:
            t_first = trio.current_time() - t0
            chunks = [(c.text, c.finish_reason) async for c in stream]
        assert chunks == GOOD_CHUNKS
        # Three attempts on d (the first and two in-place retries after 0.5 s and 2 s).
        assert [c.time - t0 for c in r.calls] == [0.0, FTT + 0.5, 2 * FTT + 2.5]
        assert t_first == 2 * FTT + 2.5
        d_attempts = stream.attempts[:2]
        assert [(a.outcome, a.duration) for a in d_attempts] == [("transient", FTT)] * 2
        assert r.closed == ["d"] * 3
        snap = key(router, "d")
        assert (snap.failures, snap.in_flight) == (2, 0)


async def test_ttft_timeout_with_a_fallback_moves_on_after_one_attempt(autojump_clock):
    p, q = StreamingScriptedProvider(), StreamingScriptedProvider()
    p.set_default("a", Hang())
    q.set_default("c", GOOD)
    async with Router.open(config(), providers=providers(p, q)) as router:
        t0 = trio.current_time()
        async with router.stream(req()) as stream:
            assert trio.current_time() - t0 == FTT
            assert [(c.text, c.finish_reason) async for c in stream] == GOOD_CHUNKS
        assert [c.key_id for c in p.calls] == ["a"]
        # b was not tried: a model's failure advances the model.
        assert p.calls_to("b") == 0
        assert stream.model == "m2"


async def test_first_chunk_just_inside_ttft_is_not_cut(autojump_clock):
    p = StreamingScriptedProvider()
    p.set_default("a", StreamScript(pieces=("late ", "but fine"), latency=FTT - 0.01))
    async with Router.open(config(), providers=providers(p)) as router:
        async with router.stream(req()) as stream:
            text = "".join([c.text async for c in stream])
        assert text == "late but fine"
        assert outcomes(stream.attempts) == [("a", "ok")]
        assert p.calls_to("a") == 1


async def test_ttft_retries_follow_transient_retries_setting(autojump_clock):
    p, q = StreamingScriptedProvider(), StreamingScriptedProvider()
    p.set_default("a", StreamScript(latency=100.0))
    q.set_default("c", GOOD)
    async with Router.open(config(transient_retries=0), providers=providers(p, q)) as router:
        t0 = trio.current_time()
        async with router.stream(req()) as stream:
            assert trio.current_time() - t0 == FTT
            async for _ in stream:
                pass
        assert outcomes(stream.attempts) == [("a", "transient"), ("c", "ok")]
        assert p.calls_to("a") == 1


async def test_request_timeout_bounds_first_chunk_wait_across_failover(autojump_clock):
    p, q = StreamingScriptedProvider(), StreamingScriptedProvider()
    p.set_default("a", StreamScript(latency=100.0))
    q.set_default("c", StreamScript(latency=100.0))
    cfg = config(transient_retries=0, first_token_timeout=6.0)
    async with Router.open(cfg, providers=providers(p, q)) as router:
        t0 = trio.current_time()
        with pytest.raises(DeadlineExceededError) as info:
            async with router.stream(req(timeout=10.0)):
                pytest.fail("the stream must not start")
        assert trio.current_time() - t0 == 10.0
        # a timed out on its first token at 6 s; c was cut by the deadline at 10 s.
        assert [c.time - t0 for c in p.calls + q.calls] == [0.0, 6.0]
        assert outcomes(info.value.attempts) == [("a", "transient"), ("c", "deadline")]
        assert p.closed == ["a"]
        assert q.closed == ["c"]
        # The deadline is the caller's: c is not charged.
        c = key(router, "c")
        assert (c.failures, c.breaker, c.in_flight) == (0, "closed", 0)
        assert all_idle(router)


# -- after the first chunk: no failover, explicit interruption --------------------------


async def test_cut_after_first_chunk_raises_stream_interrupted_without_failover(
    autojump_clock,
):
    p, q = StreamingScriptedProvider(), StreamingScriptedProvider()
    p.set_default("a", StreamScript(pieces=("alpha ", "beta "), interval=1.0, ending="cut"))
    # (Continuation is off here: tests/test_continuation.py covers it.)
    async with Router.open(config(max_continuations=0), providers=providers(p, q)) as router:
        received = []
        async with router.stream(req()) as stream:
            with pytest.raises(StreamInterruptedError) as info:
                async for chunk in stream:
                    received.append(chunk.text)
        err = info.value
        assert received == ["alpha ", "beta "]
        assert err.partial_text == "alpha beta " == stream.text
        assert err.kind == "transient"
        assert isinstance(err.cause, ProviderError)
        assert err.cause.key_id == "a"
        assert stream.finish_reason is None
        await trio.sleep(30.0)  # give any (wrong) failover time to happen
        assert [c.key_id for c in p.calls] == ["a"]
        assert q.calls == []
        assert p.closed == ["a"]
        assert outcomes(err.attempts) == [("a", "ok")]
        assert all_idle(router)


async def test_idle_timeout_interrupts_after_exactly_idle_timeout(autojump_clock):
    p = StreamingScriptedProvider()
    p.set_default("a", StreamScript(pieces=("x ", "y ", "z "), interval=1.0, ending="stall"))
    async with Router.open(config(max_continuations=0), providers=providers(p)) as router:
        t0 = trio.current_time()
        times = []
        async with router.stream(req()) as stream:
            with pytest.raises(StreamInterruptedError) as info:
                async for _ in stream:
                    times.append(trio.current_time() - t0)
            t_err = trio.current_time() - t0
        assert times == [0.0, 1.0, 2.0]
        assert t_err == 2.0 + IDLE
        assert info.value.partial_text == "x y z "
        assert info.value.kind == "transient"
        assert p.closed == ["a"]
        assert p.calls_to("b") == 0
        assert all_idle(router)


async def test_stall_before_idle_timeout_is_not_an_interruption(autojump_clock):
    p = StreamingScriptedProvider()
    p.set_default("a", StreamScript(pieces=("slow ", "but ", "steady"), interval=IDLE - 0.01))
    async with Router.open(config(), providers=providers(p)) as router:
        async with router.stream(req()) as stream:
            text = "".join([c.text async for c in stream])
        assert text == "slow but steady"
        assert stream.finish_reason == "stop"


async def test_request_timeout_does_not_cut_a_stream_that_has_started(autojump_clock):
    # The request deadline bounds the wait for the first chunk; after it, only the
    # idle timeout (or an upstream failure) may interrupt the stream.
    pieces = tuple(f"{i} " for i in range(20))
    p = StreamingScriptedProvider()
    p.set_default("a", StreamScript(pieces=pieces, interval=1.0))
    async with Router.open(config(), providers=providers(p)) as router:
        t0 = trio.current_time()
        async with router.stream(req(timeout=10.0)) as stream:
            async for _ in stream:
                pass
        assert trio.current_time() - t0 == 19.0
        assert stream.text == "".join(pieces)
        assert stream.finish_reason == "stop"
        assert outcomes(stream.attempts) == [("a", "ok")]
        a = key(router, "a")
        assert (a.failures, a.in_flight) == (0, 0)


@dataclass
class BrokenMidStream(StreamingScriptedProvider):
    """A provider with a bug: raises a plain exception after its first chunk."""

    async def stream(self, request: ChatRequest, key: ApiKey) -> AsyncIterator[StreamChunk]:
        try:
            yield StreamChunk(text="partial ")
            await trio.sleep(1.0)
            raise RuntimeError("provider bug")
        finally:
            self.closed.append(key.id)


async def test_provider_bug_after_first_chunk_is_an_unknown_interruption(autojump_clock):
    p = BrokenMidStream()
    async with Router.open(config(max_continuations=0), providers=providers(p)) as router:
        async with router.stream(req()) as stream:
            with pytest.raises(StreamInterruptedError) as info:
                async for _ in stream:
                    pass
        assert info.value.kind == "unknown"
        assert info.value.partial_text == "partial "
        assert "RuntimeError" in str(info.value)
        assert p.closed == ["a"]
        assert all_idle(router)


@dataclass
class FinishThenStall:
    """Streams `pieces`, the finish reason (on the last piece, or as its own chunk),
    then never ends the stream."""

    pieces: tuple[str, ...]
    separate_finish: bool
    closed: list[float] = field(default_factory=list)

    async def complete(self, request: ChatRequest, key: ApiKey):  # pragma: no cover
        raise AssertionError("the router must call stream()")

    async def stream(self, request: ChatRequest, key: ApiKey) -> AsyncIterator[StreamChunk]:
        try:
            for i, piece in enumerate(self.pieces):
                last = i == len(self.pieces) - 1
                finish = "stop" if last and not self.separate_finish else None
                yield StreamChunk(text=piece, finish_reason=finish)
                await trio.sleep(0.5)
            if self.separate_finish:
                yield StreamChunk(finish_reason="stop")
            await trio.sleep_forever()
        finally:
            self.closed.append(trio.current_time())


@pytest.mark.parametrize(
    ("pieces", "separate_finish"),
    [
        (("only",), False),
        (("first ", "second"), False),
        (("first ", "second"), True),
    ],
)
async def test_finish_then_stall_completes_after_short_grace(
    autojump_clock, pieces, separate_finish
):
    p = FinishThenStall(pieces, separate_finish)
    cfg = config(idle_timeout=30.0)
    async with Router.open(cfg, providers=providers(p)) as router:  # type: ignore[arg-type]
        async with router.stream(req()) as stream:
            t_finish = None
            async for chunk in stream:
                if chunk.finish_reason:
                    t_finish = trio.current_time()
            t_end = trio.current_time()
        assert stream.finish_reason == "stop"
        assert stream.text == "".join(pieces)
        assert t_finish is not None
        assert 0 < t_end - t_finish <= 1.0
        assert p.closed == [t_end]
        assert key(router, "a").failures == 0
        assert all_idle(router)


# -- the caller leaves ------------------------------------------------------------------

LONG = StreamScript(pieces=("1 ", "2 ", "3 ", "4 ", "5 "), interval=1.0)


async def _serves_again(router: Router, p: StreamingScriptedProvider) -> None:
    p.script("a", [GOOD])
    async with router.stream(req()) as stream:
        chunks = [(c.text, c.finish_reason) async for c in stream]
    assert chunks == GOOD_CHUNKS
    assert stream.key_id == "a"


async def _assert_left_cleanly(router: Router, p: StreamingScriptedProvider, t_left: float):
    await trio.testing.wait_all_tasks_blocked()
    assert trio.current_time() == t_left  # at once, not after some timeout
    assert p.closed == ["a"]
    a = key(router, "a")
    assert (a.in_flight, a.failures, a.breaker, a.cooling_for) == (0, 0, "closed", 0.0)
    assert all_idle(router)


async def test_break_out_of_stream_closes_upstream(autojump_clock):
    p = StreamingScriptedProvider()
    p.set_default("a", LONG)
    cfg = config()
    cfg.router.breaker.failure_threshold = 1  # one charged failure would open it
    async with Router.open(cfg, providers=providers(p)) as router:
        async with router.stream(req()) as stream:
            async for chunk in stream:
                if chunk.text == "2 ":
                    break
            assert key(router, "a").in_flight == 1
        t_left = trio.current_time()
        assert stream.text == "1 2 "
        await _assert_left_cleanly(router, p, t_left)
        assert key(router, "a").successes == 1
        await _serves_again(router, p)


async def test_error_in_consumer_body_closes_upstream_and_propagates(autojump_clock):
    p = StreamingScriptedProvider()
    p.set_default("a", LONG)
    cfg = config()
    cfg.router.breaker.failure_threshold = 1
    async with Router.open(cfg, providers=providers(p)) as router:
        with pytest.raises(ValueError, match="consumer gave up"):
            async with router.stream(req()) as stream:
                async for _ in stream:
                    raise ValueError("consumer gave up")
        t_left = trio.current_time()
        assert stream.text == "1 "
        await _assert_left_cleanly(router, p, t_left)
        await _serves_again(router, p)


@pytest.mark.parametrize(
    ("script", "leave_at"),
    [(LONG, 2.5), (StreamScript(latency=FTT - 1.0), 2.0)],
    ids=["mid-stream", "before-first-chunk"],
)
async def test_cancelled_consumer_closes_upstream(autojump_clock, script, leave_at):
    p = StreamingScriptedProvider()
    p.script("a", [script])
    cfg = config()
    cfg.router.breaker.failure_threshold = 1
    async with Router.open(cfg, providers=providers(p)) as router:
        t0 = trio.current_time()
        received = []
        with trio.move_on_after(leave_at) as scope:
            async with router.stream(req()) as stream:
                async for chunk in stream:
                    received.append(chunk.text)
        assert scope.cancelled_caught
        assert trio.current_time() - t0 == leave_at
        assert "".join(received) == ("1 2 3 " if script is LONG else "")
        await _assert_left_cleanly(router, p, t0 + leave_at)
        assert p.calls_to("b") == 0
        await _serves_again(router, p)


async def test_closing_from_another_task_while_the_reader_waits(autojump_clock):
    # The consumer is parked waiting for the next piece when another task closes the
    # stream: the wait ends at once (pulled: the read is cut; pumped: the pump stops),
    # the consumer learns the stream was closed, and nothing is charged to the key.
    p = StreamingScriptedProvider()
    p.set_default("a", LONG)
    cfg = config()
    cfg.router.breaker.failure_threshold = 1
    errors: list[StreamInterruptedError] = []
    async with Router.open(cfg, providers=providers(p)) as router:
        async with router.stream(req()) as stream:

            async def consume() -> None:
                try:
                    async for _ in stream:
                        pass
                except StreamInterruptedError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                await trio.sleep(1.5)  # "1 " and "2 " are in; the consumer waits for "3 "
                await stream.aclose()
                t_closed = trio.current_time()
        (err,) = errors
        assert err.partial_text == "1 2 "
        assert isinstance(err.cause, RouterClosedError)
        await _assert_left_cleanly(router, p, t_closed)
        await _serves_again(router, p)


async def test_a_pulled_stream_is_read_by_the_callers_own_task(autojump_clock, stream_reading):
    # Once handed over, the caller's task reads the provider itself (one task step per
    # chunk); a pumped stream is read by the key's worker.
    readers: list[trio.lowlevel.Task] = []

    class Recording(StreamingScriptedProvider):
        async def stream(self, request: ChatRequest, key: ApiKey) -> AsyncIterator[StreamChunk]:
            async for chunk in super().stream(request, key):
                yield chunk
                readers.append(trio.lowlevel.current_task())  # who asks for the next one

    p = Recording()
    p.set_default("a", GOOD)
    async with (
        Router.open(config(), providers=providers(p)) as router,
        router.stream(req()) as stream,
    ):
        chunks = [(c.text, c.finish_reason) async for c in stream]
    assert chunks == GOOD_CHUNKS
    me = trio.lowlevel.current_task()
    # (the worker read the first chunk, before the hand-over; each entry is who asked
    # for the chunk after one)
    assert len(readers) == len(GOOD_CHUNKS)
    if stream_reading == "pull":
        assert readers == [me] * len(GOOD_CHUNKS)
    else:
        assert me not in readers


# -- providers without stream(), and the simulated provider -----------------------------


async def test_complete_only_provider_streams_one_chunk(autojump_clock):
    p = ScriptedProvider()
    p.set_default("a", Reply("the whole answer", latency=1.0))
    async with Router.open(config(), providers=providers(p)) as router:
        async with router.stream(req()) as stream:
            chunks = [c async for c in stream]
        assert [(c.text, c.finish_reason) for c in chunks] == [("the whole answer from a", "stop")]
        assert stream.text == "the whole answer from a"
        assert stream.finish_reason == "stop"
        assert outcomes(stream.attempts) == [("a", "ok")]
        assert key(router, "a").in_flight == 0


SIMULATED = """
[router]
first_token_timeout = 5.0
idle_timeout = 5.0
[[providers]]
name = "sim"
kind = "simulated"
seed = 7
keys = [{ id = "k1" }, { id = "k2" }]
simulate = { latency = 0.25, chunk_interval = 0.2 }
[[models]]
name = "s"
provider = "sim"
upstream = "sim-model"
"""


async def test_simulated_stream_matches_submit(autojump_clock):
    request = ChatRequest(
        model="s", messages=[Message("user", "tell me a story about routers please")]
    )
    async with Router.open(make_config(SIMULATED)) as router:
        response = await router.submit(request)
    async with Router.open(make_config(SIMULATED)) as router:
        t0 = trio.current_time()
        times = []
        async with router.stream(request) as stream:
            chunks = []
            async for chunk in stream:
                chunks.append(chunk)
                times.append(trio.current_time() - t0)
    words = response.content.split(" ")
    assert len(words) > 3
    assert [c.text for c in chunks] == [w + " " for w in words[:-1]] + [words[-1]]
    assert stream.text == response.content
    assert [c.finish_reason for c in chunks] == [None] * (len(words) - 1) + ["stop"]
    assert [c.usage for c in chunks[:-1]] == [None] * (len(words) - 1)
    assert chunks[-1].usage == response.usage
    assert stream.usage == response.usage
    assert stream.finish_reason == response.finish_reason == "stop"
    assert (stream.key_id, stream.model) == (response.key_id, response.model)
    assert times == pytest.approx([0.25 + 0.2 * i for i in range(len(words))])


# -- exactly one outcome ------------------------------------------------------------------


@dataclass
class ChaosProvider(StreamingScriptedProvider):
    """Every call draws its behaviour at random: a whole stream, a cut, a stall, a slow
    first chunk, a stall after the finish reason, an error or a hang."""

    rng: random.Random = field(default_factory=lambda: random.Random(0))

    async def stream(self, request: ChatRequest, key: ApiKey) -> AsyncIterator[StreamChunk]:
        n = self.rng.randint(1, 6)
        pieces = tuple(f"<{key.id}:{i}/{n}>" for i in range(n))
        interval = self.rng.choice([0.0, 0.5, 2.0, IDLE + 1.0])
        latency = self.rng.choice([0.0, 1.0, FTT + 1.0])
        action = self.rng.choice(
            [
                StreamScript(pieces, latency, interval, "finish"),
                StreamScript(pieces, latency, interval, "finish"),
                StreamScript(pieces, latency, interval, "finish"),
                StreamScript(pieces, latency, interval, "finish"),
                StreamScript(pieces, latency, interval, "cut"),
                StreamScript(pieces, latency, interval, "stall"),
                Fail("transient"),
                Fail("rate_limit", retry_after=0.2),
                Fail("auth"),
                Fail("unknown"),
                Hang(),
            ]
        )
        self.script(key.id, [action])
        async for chunk in super().stream(request, key):
            yield chunk


def whole_text(key_id: str, text: str) -> bool:
    if not text.startswith(f"<{key_id}:0/"):
        return False
    n = int(text.split("/", 1)[1].split(">", 1)[0])
    return text == "".join(f"<{key_id}:{i}/{n}>" for i in range(n))


async def test_exactly_one_outcome_under_mixed_faults(autojump_clock):
    p = ChaosProvider(rng=random.Random(1))
    q = ChaosProvider(rng=random.Random(2))
    r = ChaosProvider(rng=random.Random(3))
    cfg = config(timeout=40.0)
    cfg.providers[0].keys[1].max_concurrency = 3  # b queues
    # Keep keys and models mostly callable, so that most requests get to stream.
    cfg.router.cooldown.min = cfg.router.cooldown.auth = 0.2
    cfg.router.breaker.failure_threshold = 50
    cfg.router.breaker.failure_rate = 0.0
    results: dict[int, tuple[str, object]] = {}
    count = 300

    async def one(i: int, router: Router) -> None:
        await trio.sleep(i * 0.3)
        if i % 7 == 0:  # some callers give up after a while
            with trio.move_on_after(1.0 + i % 5):
                await consume(i, router)
                return
            results[i] = ("cancelled", None)
            return
        await consume(i, router)

    async def consume(i: int, router: Router) -> None:
        try:
            async with router.stream(req(fallbacks=["m3"])) as stream:
                async for _ in stream:
                    pass
        except StreamInterruptedError as exc:
            assert exc.partial_text, "an interruption comes after content only"
            results[i] = ("interrupted", exc)
            return
        except RouterError as exc:
            assert isinstance(exc, ChainExhaustedError | DeadlineExceededError), exc
            results[i] = ("failed", exc)
            return
        assert stream.finish_reason == "stop", "a stream ended without its finish reason"
        assert whole_text(stream.key_id, stream.text), stream.text
        results[i] = ("whole", stream)

    with trio.fail_after(600):
        async with Router.open(cfg, providers=providers(p, q, r)) as router:
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(one, i, router)
            assert all_idle(router)
    assert len(results) == count
    kinds = {kind for kind, _ in results.values()}
    assert kinds == {"whole", "interrupted", "failed", "cancelled"}  # the mix was mixed
    opened = sum(len(x.calls) for x in (p, q, r))
    closed = sum(len(x.closed) for x in (p, q, r))
    assert opened == closed


# -- the router closes under a stream ---------------------------------------------------


async def test_router_closing_interrupts_a_stream_being_consumed(autojump_clock):
    p = StreamingScriptedProvider()
    p.set_default("a", LONG)
    got: list[str] = []
    errors: list[BaseException] = []
    two_chunks = trio.Event()

    async def consume(router: Router) -> None:
        async with router.stream(req()) as stream:
            try:
                async for chunk in stream:
                    got.append(chunk.text)
                    if len(got) == 2:
                        two_chunks.set()
            except StreamInterruptedError as exc:
                errors.append(exc)
        got.append(f"finish_reason={stream.finish_reason}")

    async with trio.open_nursery() as outer:
        async with Router.open(config(), providers=providers(p)) as router:
            outer.start_soon(consume, router)
            await two_chunks.wait()
        t_closed = trio.current_time()
    assert got == ["1 ", "2 ", "finish_reason=None"]
    (err,) = errors
    assert isinstance(err, StreamInterruptedError)
    assert err.partial_text == "1 2 "
    assert p.closed == ["a"]
    assert trio.current_time() == t_closed


async def test_router_closing_before_first_chunk_raises_router_closed(autojump_clock):
    p = StreamingScriptedProvider()
    p.set_default("a", StreamScript(latency=FTT - 1.0))
    errors: list[BaseException] = []

    async def consume(router: Router) -> None:
        try:
            async with router.stream(req()):
                pytest.fail("the stream must not start")
        except RouterClosedError as exc:
            errors.append(exc)

    async with (
        trio.open_nursery() as outer,
        Router.open(config(), providers=providers(p)) as router,
    ):
        outer.start_soon(consume, router)
        await trio.sleep(1.0)
    assert len(errors) == 1
    assert p.closed == ["a"]
