"""OpenTelemetry traces: one span per request with a child span per attempt (retries,
fallbacks, hedges and stream continuations included), GenAI attributes, the caller's
span as parent, the gateway honouring ``traceparent`` over real HTTP, an OTLP export
from a served process to a local collector, and no spans (and no OTel import) when
tracing is off. Spans are read from the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from scripted import (
    Action,
    Fail,
    Reply,
    ScriptedProvider,
    StreamingScriptedProvider,
    StreamScript,
    make_config,
)
from test_gateway import Proc

from router import (
    ApiKey,
    ChainExhaustedError,
    ChatRequest,
    ConfigError,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    Message,
    Router,
    RouterConfig,
    StreamInterruptedError,
)
from router._otel import _endpoint, open_tracing
from router.aio import AsyncioRouter
from router.gateway import serve

CFG = """
[router]
transient_retries = {retries}
retry_backoff = [0.5]
{extra}
[[providers]]
name = "p"
kind = "custom"
keys = [{{ id = "a" }}, {{ id = "b" }}]
[[models]]
name = "m"
provider = "p"
upstream = "up-m"
fallbacks = ["m2"]
continuation = true
[[models]]
name = "m2"
provider = "p"
upstream = "up-m2"
"""

SECRET_MESSAGE = "the secret plan is in the prompt"


def config(retries: int = 0, extra: str = "") -> RouterConfig:
    return make_config(CFG.format(retries=retries, extra=extra))


def req(**kw: Any) -> ChatRequest:
    return ChatRequest(model="m", messages=[Message("user", SECRET_MESSAGE)], **kw)


class Spans:
    """A tracer provider writing into memory, and the finished spans by kind."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def all(self) -> Sequence[ReadableSpan]:
        return self.exporter.get_finished_spans()

    def request(self) -> ReadableSpan:
        (span,) = [s for s in self.all if "llm_router.attempt.number" not in (s.attributes or {})]
        return span

    def attempts(self) -> list[ReadableSpan]:
        found = [s for s in self.all if "llm_router.attempt.number" in (s.attributes or {})]
        return sorted(found, key=lambda s: attr(s, "llm_router.attempt.number"))


def attr(span: ReadableSpan, name: str) -> Any:
    assert span.attributes is not None
    return span.attributes.get(name)


@pytest.fixture
def spans() -> Spans:
    return Spans()


def check_tree(spans: Spans) -> None:
    """Every attempt span is a child of the request span, inside its time."""
    request = spans.request()
    assert request.kind is SpanKind.CLIENT
    assert request.start_time is not None and request.end_time is not None
    for span in spans.attempts():
        assert span.parent is not None
        assert span.parent.span_id == request.context.span_id
        assert span.context.trace_id == request.context.trace_id
        assert span.start_time is not None and span.end_time is not None
        # (1 µs of slack: the request's own start is read just before the router's.)
        assert request.start_time - 1000 <= span.start_time <= span.end_time
        assert span.end_time <= request.end_time + 1000


def no_content(spans: Spans) -> None:
    for span in spans.all:
        assert SECRET_MESSAGE not in json.dumps(dict(span.attributes or {}), default=str)
        assert SECRET_MESSAGE not in (span.status.description or "")


async def test_a_success_is_one_request_span_with_one_attempt(spans: Spans, autojump_clock):
    p = ScriptedProvider(default=Reply(latency=0.25))
    async with Router.open(config(), {"p": p}, tracer_provider=spans.provider) as router:
        resp = await router.submit(req(max_tokens=50, temperature=0.2, top_p=0.9, stop=["x"]))
    assert resp.key_id == "a"
    check_tree(spans)
    request, (attempt,) = spans.request(), spans.attempts()
    assert request.name == "chat m"
    expected = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "m",
        "gen_ai.request.max_tokens": 50,
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.stop_sequences": ("x",),
        "gen_ai.request.stream": False,
        "gen_ai.response.model": "up-m",
        "gen_ai.provider.name": "p",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 0,
        "gen_ai.usage.output_tokens": 0,
        "llm_router.model": "m",
        "llm_router.provider": "p",
        "llm_router.key_id": "a",
        "llm_router.attempts": 1,
    }
    assert {name: attr(request, name) for name in expected} == expected
    assert request.status.status_code is StatusCode.UNSET
    assert attempt.name == "chat up-m"
    assert attempt.kind is SpanKind.CLIENT
    assert attr(attempt, "gen_ai.request.model") == "up-m"
    assert attr(attempt, "llm_router.model") == "m"
    assert attr(attempt, "llm_router.key_id") == "a"
    assert attr(attempt, "llm_router.attempt.outcome") == "ok"
    assert attempt.status.status_code is StatusCode.UNSET
    assert attempt.end_time is not None and attempt.start_time is not None
    # The trio clock (virtual here) places the attempt: 0.25 s long.
    assert attempt.end_time - attempt.start_time == pytest.approx(0.25e9, abs=1e6)
    no_content(spans)


async def test_usage_is_recorded_with_the_conventions_names(spans: Spans, autojump_clock):
    cfg = RouterConfig.from_toml(
        """
        [[providers]]
        name = "sim"
        kind = "simulated"
        keys = [{ id = "k" }]
        simulate = { latency = 0.1 }
        """
    )
    async with Router.open(cfg, tracer_provider=spans.provider) as router:
        resp = await router.submit(
            ChatRequest(model="sim/some-model", messages=[Message("user", "count these words")])
        )
    request = spans.request()
    assert attr(request, "gen_ai.usage.input_tokens") == resp.usage.prompt_tokens > 0
    assert attr(request, "gen_ai.usage.output_tokens") == resp.usage.completion_tokens > 0
    assert attr(request, "gen_ai.request.model") == "sim/some-model"
    assert attr(spans.attempts()[0], "gen_ai.request.model") == "some-model"


async def test_a_retry_then_success_is_two_attempt_spans(spans: Spans, autojump_clock):
    p = ScriptedProvider()
    p.script("a", [Fail("transient", status=503, latency=0.1), Reply(latency=0.2)])
    async with Router.open(config(retries=1), {"p": p}, tracer_provider=spans.provider) as router:
        resp = await router.submit(req())
    assert [a.outcome for a in resp.attempts] == ["transient", "ok"]
    check_tree(spans)
    failed, ok = spans.attempts()
    assert attr(failed, "llm_router.attempt.outcome") == "transient"
    assert attr(failed, "error.type") == "transient"
    assert attr(failed, "http.response.status_code") == 503
    assert failed.status.status_code is StatusCode.ERROR
    assert attr(ok, "llm_router.attempt.outcome") == "ok"
    assert attr(ok, "llm_router.attempt.backoff") == pytest.approx(0.5)
    assert ok.start_time is not None and failed.end_time is not None
    # The retry starts after the failure plus its backoff.
    assert ok.start_time - failed.end_time == pytest.approx(0.5e9, abs=1e6)
    assert resp.attempts[1].started == pytest.approx(0.6)
    assert spans.request().status.status_code is StatusCode.UNSET
    assert attr(spans.request(), "llm_router.attempts") == 2


async def test_a_fallback_to_the_next_model_names_both_models(spans: Spans, autojump_clock):
    p = ScriptedProvider()
    p.script("a/up-m", [Fail("transient")])  # a transient failure moves to the next model
    async with Router.open(config(), {"p": p}, tracer_provider=spans.provider) as router:
        resp = await router.submit(req())
    assert resp.model == "m2"
    check_tree(spans)
    attempts = spans.attempts()
    assert [(attr(s, "gen_ai.request.model"), attr(s, "llm_router.key_id")) for s in attempts] == [
        ("up-m", "a"),
        ("up-m2", "a"),
    ]
    assert [s.status.status_code for s in attempts] == [StatusCode.ERROR, StatusCode.UNSET]
    request = spans.request()
    assert attr(request, "gen_ai.request.model") == "m"
    assert attr(request, "gen_ai.response.model") == "up-m2"
    assert attr(request, "llm_router.model") == "m2"


async def test_a_hedge_race_marks_the_winner_and_the_cancelled(spans: Spans, autojump_clock):
    p = ScriptedProvider()
    p.script("a", [Reply(latency=20.0)])
    p.set_default("b", Reply(latency=0.5))
    cfg = config(extra="hedge_after = 2.0")
    async with Router.open(cfg, {"p": p}, tracer_provider=spans.provider) as router:
        resp = await router.submit(req())
    assert resp.key_id == "b"
    check_tree(spans)
    outcomes = {attr(s, "llm_router.key_id"): s for s in spans.attempts()}
    loser, winner = outcomes["a"], outcomes["b"]
    assert attr(loser, "llm_router.attempt.outcome") == "hedge_cancelled"
    assert attr(winner, "llm_router.attempt.outcome") == "hedge_won"
    assert loser.status.status_code is StatusCode.UNSET  # a cancelled racer is no failure
    assert winner.start_time is not None and loser.start_time is not None
    assert winner.start_time - loser.start_time == pytest.approx(2e9, abs=1e6)
    assert loser.end_time is not None and winner.end_time is not None
    assert loser.end_time == pytest.approx(winner.end_time, abs=1e6)  # cut when b answered


async def test_a_continued_stream_has_a_span_per_segment(spans: Spans, autojump_clock):
    p = StreamingScriptedProvider()
    p.script("a", [StreamScript(pieces=("hello ", "wor"), interval=1.0, ending="cut")])
    p.set_default("b", StreamScript(pieces=("ld",), latency=0.5))
    router_cm = Router.open(config(), {"p": p}, tracer_provider=spans.provider)
    async with router_cm as router, router.stream(req()) as stream:
        text = "".join([c.text async for c in stream])
        await trio.sleep(3.0)  # the caller holds the stream open: part of the request
    assert text == "hello world"
    assert [s.key_id for s in stream.segments] == ["a", "b"]
    check_tree(spans)
    first, second = spans.attempts()
    assert attr(first, "llm_router.key_id") == "a"
    assert attr(first, "llm_router.attempt.interrupted") is True
    assert attr(first, "llm_router.attempt.continuation") is None
    assert attr(second, "llm_router.key_id") == "b"
    assert attr(second, "llm_router.attempt.continuation") == 1
    assert attr(second, "llm_router.attempt.interrupted") is None
    assert attr(second, "gen_ai.response.time_to_first_chunk") == pytest.approx(0.5)
    # A segment's span lasts while it streamed: the first until the cut, the
    # continuation until the stream ended.
    assert first.end_time == second.start_time
    request = spans.request()
    assert second.end_time == request.end_time
    assert attr(request, "gen_ai.request.stream") is True
    assert attr(request, "llm_router.segments") == 2
    assert attr(request, "llm_router.key_id") == "b"
    assert attr(request, "gen_ai.response.finish_reasons") == ("stop",)
    assert request.start_time is not None and request.end_time is not None
    assert request.end_time - request.start_time == pytest.approx(4.5e9, abs=1e6)
    assert request.status.status_code is StatusCode.UNSET
    no_content(spans)


async def test_a_continuation_that_could_not_start_is_traced(spans: Spans, autojump_clock):
    p = StreamingScriptedProvider()
    p.script("a", [StreamScript(pieces=("hello ",), ending="cut")])
    p.set_default("b", Fail("transient", status=502))
    p.script("a/up-m2", [Fail("transient", status=503)])
    router_cm = Router.open(config(), {"p": p}, tracer_provider=spans.provider)
    async with router_cm as router, router.stream(req()) as stream:
        with pytest.raises(StreamInterruptedError) as caught:
            async for _ in stream:
                pass
    # The failed continuation attempts are the request's too (the original error stands).
    assert [(a.key_id, a.outcome) for a in caught.value.attempts] == [
        ("a", "ok"),
        ("b", "transient"),
        ("a", "transient"),
        ("b", "transient"),
    ]
    check_tree(spans)
    first, *continued = spans.attempts()
    assert attr(first, "llm_router.attempt.interrupted") is True
    assert [attr(s, "llm_router.attempt.continuation") for s in continued] == [1, 1, 1]
    assert [attr(s, "http.response.status_code") for s in continued] == [502, 503, 502]
    assert {s.status.status_code for s in continued} == {StatusCode.ERROR}
    assert spans.request().status.status_code is StatusCode.ERROR


async def test_an_interrupted_stream_ends_its_span_in_error(spans: Spans, autojump_clock):
    p = StreamingScriptedProvider()
    p.script("a", [StreamScript(pieces=("hello ",), ending="cut")])
    cfg = config(extra="max_continuations = 0")
    router_cm = Router.open(cfg, {"p": p}, tracer_provider=spans.provider)
    async with router_cm as router, router.stream(req()) as stream:
        with pytest.raises(StreamInterruptedError):
            async for _ in stream:
                pass
    request = spans.request()
    assert request.status.status_code is StatusCode.ERROR
    assert attr(request, "error.type") == "transient"
    assert attr(request, "llm_router.error.class") == "StreamInterruptedError"
    (attempt,) = spans.attempts()
    assert attr(attempt, "llm_router.attempt.interrupted") is True


async def test_a_failure_sets_the_request_span_to_error(spans: Spans, autojump_clock):
    p = ScriptedProvider(default=Fail("rate_limit", status=429, message=SECRET_MESSAGE))
    async with Router.open(config(), {"p": p}, tracer_provider=spans.provider) as router:
        with pytest.raises(ChainExhaustedError) as caught:
            await router.submit(req())
    check_tree(spans)
    request = spans.request()
    assert request.status.status_code is StatusCode.ERROR
    assert request.status.description == caught.value.kind
    assert attr(request, "error.type") == caught.value.kind
    assert attr(request, "llm_router.error.kind") == caught.value.kind
    assert attr(request, "llm_router.error.class") == "ChainExhaustedError"
    assert attr(request, "gen_ai.response.model") is None
    attempts = spans.attempts()
    assert len(attempts) == len(caught.value.attempts) == 4
    assert {attr(s, "error.type") for s in attempts} == {"rate_limit"}
    assert {attr(s, "http.response.status_code") for s in attempts} == {429}
    assert not request.events  # no exception event: its message may quote the request
    no_content(spans)


async def test_a_bad_request_is_traced_without_attempts(spans: Spans):
    async with Router.open(
        config(), {"p": ScriptedProvider()}, tracer_provider=spans.provider
    ) as router:
        with pytest.raises(Exception, match="unknown model"):
            await router.submit(ChatRequest(model="nope", messages=[Message("user", "x")]))
    request = spans.request()
    assert request.status.status_code is StatusCode.ERROR
    assert attr(request, "llm_router.attempts") == 0
    assert spans.attempts() == []


class Embedder(ScriptedProvider):
    async def embed(self, request: EmbeddingRequest, key: ApiKey) -> EmbeddingResponse:
        await trio.sleep(0.1)
        return EmbeddingResponse(
            embeddings=[[0.5, 0.5, 0.0] for _ in request.inputs],
            usage=EmbeddingUsage(prompt_tokens=7, total_tokens=7),
        )


async def test_an_embedding_is_traced(spans: Spans, autojump_clock):
    cfg = make_config(
        """
        [[providers]]
        name = "p"
        kind = "custom"
        keys = [{ id = "a" }]
        [[models]]
        name = "emb"
        provider = "p"
        upstream = "up-emb"
        mode = "embedding"
        """
    )
    async with Router.open(cfg, {"p": Embedder()}, tracer_provider=spans.provider) as router:
        await router.embed(EmbeddingRequest(model="emb", input=["one", "two"], tenant="t1"))
    check_tree(spans)
    request = spans.request()
    assert request.name == "embeddings emb"
    assert attr(request, "gen_ai.operation.name") == "embeddings"
    assert attr(request, "gen_ai.usage.input_tokens") == 7
    assert attr(request, "gen_ai.embeddings.dimension.count") == 3
    assert attr(request, "gen_ai.request.encoding_formats") == ("float",)
    assert attr(request, "gen_ai.response.model") == "up-emb"
    assert attr(request, "llm_router.tenant") == "t1"
    (attempt,) = spans.attempts()
    assert attempt.name == "embeddings up-emb"


async def test_the_callers_span_is_the_parent(spans: Spans, autojump_clock):
    tracer = spans.provider.get_tracer("caller")
    async with Router.open(
        config(), {"p": ScriptedProvider()}, tracer_provider=spans.provider
    ) as router:
        with tracer.start_as_current_span("my-handler") as mine:
            await router.submit(req())
            async with router.stream(req()) as stream:
                async for _ in stream:
                    pass
    traced = [s for s in spans.all if s.name == "chat m"]
    assert len(traced) == 2
    for span in traced:
        assert span.parent is not None
        assert span.parent.span_id == mine.get_span_context().span_id
        assert span.context.trace_id == mine.get_span_context().trace_id


async def test_a_cancelled_request_is_marked_and_not_an_error(spans: Spans, autojump_clock):
    p = ScriptedProvider(default=Reply(latency=10.0))
    async with Router.open(config(), {"p": p}, tracer_provider=spans.provider) as router:
        with trio.move_on_after(1.0):
            await router.submit(req())
    request = spans.request()
    assert attr(request, "llm_router.cancelled") is True
    assert request.status.status_code is StatusCode.UNSET


async def test_tracing_off_makes_no_spans(spans: Spans, autojump_clock):
    tracer = spans.provider.get_tracer("caller")
    cfg = config(extra="[router.tracing]\nenabled = false")
    async with Router.open(cfg, {"p": ScriptedProvider()}) as router:
        assert router._tracing is None
        with tracer.start_as_current_span("my-handler"):
            await router.submit(req())
            async with router.stream(req()) as stream:
                async for _ in stream:
                    pass
    assert [s.name for s in spans.all] == ["my-handler"]


def test_an_asyncio_callers_span_is_the_parent(spans: Spans) -> None:
    tracer = spans.provider.get_tracer("caller")

    async def main() -> None:
        opening = AsyncioRouter.open(
            config(), {"p": ScriptedProvider()}, tracer_provider=spans.provider
        )
        async with opening as router:
            with tracer.start_as_current_span("fastapi-handler"):
                await router.submit(req())
                async with router.stream(req()) as stream:
                    async for _ in stream:
                        pass

    asyncio.run(main())
    (mine,) = [s for s in spans.all if s.name == "fastapi-handler"]
    traced = [s for s in spans.all if s.name == "chat m"]
    assert len(traced) == 2
    for span in traced:
        assert span.parent is not None and span.parent.span_id == mine.context.span_id


@given(
    st.lists(
        st.sampled_from(
            [Reply(latency=0.1), Fail("transient", latency=0.2), Fail("rate_limit"), Fail("auth")]
        ),
        max_size=8,
    )
)
@settings(max_examples=40, deadline=None)
def test_every_attempt_has_one_span_inside_its_request(script: list[Action]) -> None:
    async def scenario() -> None:
        spans = Spans()
        p = ScriptedProvider()
        p.script("a", script[::2])
        p.script("b", script[1::2])
        async with Router.open(
            config(retries=1), {"p": p}, tracer_provider=spans.provider
        ) as router:
            try:
                resp = await router.submit(req())
                attempts = resp.attempts
                failed = False
            except ChainExhaustedError as exc:
                attempts, failed = exc.attempts, True
        check_tree(spans)
        traced = spans.attempts()
        assert [attr(s, "llm_router.attempt.outcome") for s in traced] == [
            a.outcome for a in attempts
        ]
        for span, a in zip(traced, attempts, strict=True):
            assert span.start_time is not None and span.end_time is not None
            assert (span.end_time - span.start_time) / 1e9 == pytest.approx(a.duration, abs=1e-6)
        status = spans.request().status.status_code
        assert status is (StatusCode.ERROR if failed else StatusCode.UNSET)

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


# -- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "base_url", "system", "address", "port"),
    [
        ("openai", "https://api.openai.com/v1", "openai", "api.openai.com", None),
        (
            "openai",
            "https://x.openai.azure.com/openai/deployments/d",
            "azure.ai.openai",
            None,
            None,
        ),
        ("openai", "http://127.0.0.1:8000/v1", "local", "127.0.0.1", 8000),
        ("anthropic", "https://api.anthropic.com", "anthropic", "api.anthropic.com", None),
        ("gemini", "https://generativelanguage.googleapis.com", "gcp.gemini", None, None),
        ("custom", "", "local", None, None),
    ],
)
def test_the_provider_name_follows_the_conventions(
    kind: str, base_url: str, system: str, address: str | None, port: int | None
) -> None:
    endpoint = _endpoint("local", kind, base_url)
    assert endpoint.system == system
    if address is not None:
        assert (endpoint.address, endpoint.port) == (address, port)


def test_the_tracing_table_is_parsed_and_its_headers_never_shown() -> None:
    cfg = RouterConfig.from_toml(
        """
        [router.tracing]
        service_name = "gw"
        endpoint = "http://user:hunter2-password@collector:4318"
        headers = { "x-api-key" = "abc-very-secret-123" }
        sample_rate = 0.25
        [[providers]]
        name = "p"
        kind = "custom"
        keys = [{ id = "a" }]
        """
    )
    tracing = cfg.router.tracing
    assert tracing is not None
    assert (tracing.enabled, tracing.service_name, tracing.sample_rate) == (True, "gw", 0.25)
    shown = repr(cfg)
    assert "abc-very-secret-123" not in shown and "hunter2-password" not in shown


def test_the_built_in_provider_follows_the_table_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def built(table: str) -> Any:
        cfg = RouterConfig.from_toml(
            f'[router.tracing]\n{table}\n[[providers]]\nname = "p"\nkind = "custom"\n'
            'keys = [{ id = "a" }]'
        )
        tracing = open_tracing(cfg, None, lambda name: name)
        provider = tracing.provider
        (processor,) = provider._active_span_processor._span_processors  # type: ignore[attr-defined]
        exporter = processor._batch_processor._exporter
        provider.shutdown()
        return provider, exporter

    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("COLLECTOR_KEY", "k-123")
    provider, exporter = built(
        'endpoint = "http://collector:4318/"\nsample_rate = 0.25\n'
        'headers = { "x-key" = "env:COLLECTOR_KEY" }'  # (sent: see the served test)
    )
    assert provider.resource.attributes["service.name"] == "llm-router"
    assert exporter._endpoint == "http://collector:4318/v1/traces"
    assert "0.25" in provider.sampler.get_description()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env-collector:4318")
    provider, exporter = built("")
    assert provider.resource.attributes["service.name"] == "from-env"
    assert exporter._endpoint == "http://env-collector:4318/v1/traces"
    provider, _ = built('service_name = "gw"')
    assert provider.resource.attributes["service.name"] == "gw"


def test_check_shows_tracing_without_its_header_values(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text(
        GATEWAY_CFG
        + """
[router.tracing]
endpoint = "https://user:pw-in-url-9@collector.example:4318"
headers = { "x-collector-key" = "env:COLLECTOR_KEY", "x-plain" = "literal-secret-42" }
"""
    )
    run = partial(
        subprocess.run,
        [sys.executable, "-m", "router", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    missing = run(env={k: v for k, v in os.environ.items() if k != "COLLECTOR_KEY"})
    assert missing.returncode == 2
    assert "router.tracing.headers.x-collector-key" in missing.stderr
    done = run(env={**os.environ, "COLLECTOR_KEY": "value-never-shown-1"})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "tracing: OTLP/HTTP to https://user:***@collector.example:4318" in out
    assert "header x-collector-key: env:COLLECTOR_KEY" in out
    assert "header x-plain: ***" in out
    for secret in ("value-never-shown-1", "literal-secret-42", "pw-in-url-9"):
        assert secret not in out + done.stderr


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ('endpoint = "collector:4318"', "router.tracing.endpoint"),
        ('headers = { "x-key" = "env:" }', "router.tracing.headers.x-key"),
        ("sample_rate = 1.5", "router.tracing.sample_rate"),
        ("sampling = 1", "router.tracing.sampling"),
    ],
)
def test_a_bad_tracing_table_names_its_field(table: str, field: str) -> None:
    text = f'[router.tracing]\n{table}\n[[providers]]\nname = "p"\nkind = "custom"\n'
    with pytest.raises(ConfigError) as caught:
        RouterConfig.from_toml(text + 'keys = [{ id = "a" }]')
    assert caught.value.field == field


async def test_tracing_without_the_packages_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "router._otel", raising=False)
    cfg = config(extra="[router.tracing]")
    with pytest.raises(ConfigError, match=r"llm-router\[otel\]") as caught:
        async with Router.open(cfg, {"p": ScriptedProvider()}):
            pass
    assert caught.value.field == "router.tracing"


def test_the_router_imports_and_routes_without_opentelemetry() -> None:
    code = """
import sys
sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
import trio
import router, router.aio, router.gateway
from router import ChatRequest, Message, Router, RouterConfig
cfg = RouterConfig.from_toml('''
[[providers]]
name = "sim"
kind = "simulated"
keys = [{ id = "k" }]
simulate = { latency = 0.0 }
''')
async def main():
    async with Router.open(cfg) as r:
        await r.submit(ChatRequest(model="sim/x", messages=[Message("user", "hi")]))
trio.run(main)
assert not any(m.startswith("opentelemetry") and sys.modules[m] for m in sys.modules)
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- the gateway ------------------------------------------------------------------------

GATEWAY_CFG = """
[[providers]]
name = "sim"
kind = "simulated"
keys = [{ id = "k1", secret = "sk-provider-secret-0001" }]
simulate = { latency = 0.01, chunk_interval = 0.0 }
[[models]]
name = "smart"
provider = "sim"
upstream = "sim-large"
"""

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


async def test_the_gateway_honours_traceparent(spans: Spans, caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger="router.access")
    cfg = RouterConfig.from_toml(GATEWAY_CFG)
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(partial(serve, cfg, port=0, tracer_provider=spans.provider))
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            body = {"model": "smart", "messages": [{"role": "user", "content": SECRET_MESSAGE}]}
            headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=1", "x-request-id": "r1"}
            r = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200, r.text
            r = await client.post(
                "/v1/chat/completions",
                json={**body, "stream": True},
                headers={"x-request-id": "r2"},
            )
            assert r.status_code == 200 and "[DONE]" in r.text
            r = await client.post(
                "/v1/embeddings",
                json={"model": "sim/emb", "input": "x"},
                headers={"traceparent": TRACEPARENT, "x-request-id": "r3"},
            )
            assert r.status_code == 200, r.text
        nursery.cancel_scope.cancel()
    requests = [s for s in spans.all if "llm_router.attempt.number" not in (s.attributes or {})]
    assert [s.name for s in requests] == ["chat smart", "chat smart", "embeddings sim/emb"]
    chat, streamed, embedded = requests
    for span in (chat, embedded):  # children of the caller's trace
        assert trace.format_trace_id(span.context.trace_id) == TRACE_ID
        assert span.parent is not None and span.parent.is_remote
        assert trace.format_span_id(span.parent.span_id) == PARENT_ID
    assert chat.context.trace_state.get("vendor") == "1"  # tracestate carried on
    assert streamed.parent is None  # no traceparent: a trace of its own
    assert trace.format_trace_id(streamed.context.trace_id) != TRACE_ID
    assert attr(streamed, "gen_ai.request.stream") is True
    logged = {
        e["request_id"]: e
        for e in (json.loads(r.getMessage()) for r in caplog.records if r.name == "router.access")
    }
    assert logged["r1"]["trace_id"] == TRACE_ID
    assert logged["r2"]["trace_id"] == trace.format_trace_id(streamed.context.trace_id)
    assert logged["r3"]["trace_id"] == TRACE_ID
    no_content(spans)


class Collector:
    """A tiny OTLP/HTTP collector: decodes each export and keeps its spans."""

    def __init__(self) -> None:
        self.exports: list[ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                export = ExportTraceServiceRequest()
                export.ParseFromString(body)
                collector.exports.append(export)
                collector.headers.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[str, Any, dict[str, Any]]]:
        """(service name, span, attributes) of every span received."""
        found = []
        for export in self.exports:
            for rs in export.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        attributes = {a.key: a.value for a in span.attributes}
                        found.append((resource.get("service.name"), span, attributes))
        return found


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()


def test_serve_exports_its_spans_to_an_otlp_collector(collector: Collector, tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text(
        GATEWAY_CFG
        + f"""
[router.tracing]
service_name = "team-gateway"
endpoint = "{collector.url}"
headers = {{ "x-collector-key" = "env:COLLECTOR_KEY" }}
"""
    )
    key = "collector-secret-value-77"
    proc = Proc(
        ["-m", "router", "serve", "--config", str(path), "--port", "0"],
        "listening on",
        env={"COLLECTOR_KEY": key, "OTEL_BSP_SCHEDULE_DELAY": "50"},
    )
    try:
        body = {"model": "smart", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(
            f"{proc.url}/v1/chat/completions",
            json=body,
            headers={"traceparent": TRACEPARENT},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while len(collector.spans()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.kill()
    received = collector.spans()
    assert len(received) == 2, received
    by_name = {span.name: (service, span, attributes) for service, span, attributes in received}
    service, request, attributes = by_name["chat smart"]
    assert service == "team-gateway"
    assert request.trace_id.hex() == TRACE_ID
    assert request.parent_span_id.hex() == PARENT_ID
    assert attributes["gen_ai.provider.name"].string_value == "sim"
    assert attributes["gen_ai.response.model"].string_value == "sim-large"
    assert attributes["gen_ai.usage.output_tokens"].int_value > 0
    _, attempt, attempt_attributes = by_name["chat sim-large"]
    assert attempt.parent_span_id == request.span_id
    assert attempt_attributes["llm_router.key_id"].string_value == "k1"
    assert all(h.get("x-collector-key") == key for h in collector.headers)
    log = proc.stderr()
    assert key not in log and "sk-provider-secret-0001" not in log
    entry = next(json.loads(line) for line in log.splitlines() if line.startswith("{"))
    assert entry["trace_id"] == TRACE_ID
