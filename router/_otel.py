"""OpenTelemetry traces of requests: one span per request, one child span per attempt.

Imported only when tracing is asked for (`[router.tracing]`, or a `tracer_provider`
given to `Router.open`), so the router imports and runs without the `otel` extra; with
tracing off the request path pays one attribute check (`Router._tracing is None`).

Why the attempt spans are built afterwards. An attempt runs in a key actor's worker
task, not the caller's, and the actor already records what a span needs (`Attempt`:
model, provider, key, outcome, status, duration, backoff and `started`, its offset from
the request's start). So nothing is traced inside the actors: when the request ends,
the caller's task opens the attempt spans with explicit start and end times and ends
them at once. The request's own span is opened when the request begins, under the
caller's current OpenTelemetry context (a library user's span, or the gateway's
incoming ``traceparent``), so it is the parent. Times come from trio's clock, anchored
to the wall clock once per request, so the tree is consistent under any trio clock.

Attributes follow OpenTelemetry's GenAI semantic conventions (``gen_ai.operation.name``,
``gen_ai.request.*``, ``gen_ai.response.model``, ``gen_ai.usage.*``,
``gen_ai.provider.name``, ``error.type``); the router's own are ``llm_router.*``.

What this module must never do: put message content, a provider key's secret or an
exporter header into a span or a log line, or let a tracing failure fail a request.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import trio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._config import RouterConfig, TracingConfig, resolve_headers
from ._errors import RouterError
from ._stream import ChatStream
from ._types import (
    Attempt,
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    Usage,
)

__all__ = ["Tracing", "open_tracing"]

log = logging.getLogger("router.tracing")

_WELL_KNOWN: Final = {"anthropic": "anthropic", "gemini": "gcp.gemini"}
"""`gen_ai.provider.name` of a provider kind (OpenAI's depends on its host)."""
_FLUSH_LIMIT: Final = 5.0
"""Seconds the router's close waits for its last spans to be exported."""
_SERVED: Final = frozenset({"ok", "hedge_won"})
_NOT_FAILED: Final = frozenset({"ok", "hedge_won", "hedge_cancelled", "cancelled"})
"""Attempt outcomes that are no failure of the attempt (its span's status stays unset)."""

Route = Callable[[ChatRequest, bool], Awaitable["ChatResponse | ChatStream"]]
Embed = Callable[[EmbeddingRequest], Awaitable[EmbeddingResponse]]
Headers = Sequence[tuple[bytes, bytes]]
T = TypeVar("T")
Entered = tuple[contextvars.Token[Context], contextvars.Token[str | None]]


class _AsgiHeaders(Getter[Headers]):
    """Reads propagation headers (``traceparent``, ``tracestate``) from ASGI headers."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        found = [bytes(v).decode("latin-1") for k, v in carrier if k == name]
        return found or None

    def keys(self, carrier: Headers) -> list[str]:
        return [bytes(k).decode("latin-1") for k, _ in carrier]


_ASGI_HEADERS: Final = _AsgiHeaders()


class _Call:
    """One traced request: its span and the moment it began, on both clocks."""

    __slots__ = ("begun", "span", "wall")

    def __init__(self, span: trace.Span, wall: int, begun: float) -> None:
        self.span = span
        self.wall = wall
        """`time.time_ns()` when the request began."""
        self.begun = begun
        """`trio.current_time()` when the request began."""

    def at(self, offset: float) -> int:
        """Wall-clock nanoseconds `offset` seconds after the request began."""
        return self.wall + int(offset * 1e9)

    def now(self) -> float:
        return trio.current_time() - self.begun


class _Endpoint:
    """What the spans say about a configured provider."""

    __slots__ = ("address", "port", "system")

    def __init__(self, system: str, address: str | None, port: int | None) -> None:
        self.system = system
        self.address = address
        self.port = port


class Tracing:
    """The tracer of one router. Built by `open_tracing` when the router opens."""

    def __init__(
        self,
        provider: trace.TracerProvider,
        config: RouterConfig,
        upstream_of: Callable[[str], str],
        owned: bool = False,
    ) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("llm-router")
        self._owned = owned
        """The provider was built here from `[router.tracing]`: flushed and shut down
        when the router closes (a caller's own provider is the caller's to close)."""
        self._upstream_of = upstream_of
        self._endpoints = {p.name: _endpoint(p.name, p.kind, p.base_url) for p in config.providers}
        self._trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
            "llm_router_trace_id", default=None
        )

    # -- the router's calls ---------------------------------------------------------------

    async def submit(self, route: Route, request: ChatRequest) -> ChatResponse:
        call = self._begin("chat", request.model, _chat_attributes(request, False))
        try:
            result = await route(request, False)
        except BaseException as exc:
            self._failed(call, "chat", exc)
            raise
        assert type(result) is ChatResponse
        self._guarded(self._answered, call, result)
        return result

    @asynccontextmanager
    async def stream(self, route: Route, request: ChatRequest) -> AsyncIterator[ChatStream]:
        call = self._begin("chat", request.model, _chat_attributes(request, True))
        try:
            stream = await route(request, True)
        except BaseException as exc:
            self._failed(call, "chat", exc)
            raise
        assert isinstance(stream, ChatStream)
        first = call.now()
        before = len(stream.attempts)
        escaped: BaseException | None = None
        try:
            yield stream
        except BaseException as exc:
            escaped = exc
            raise
        finally:
            try:
                await stream.aclose()
            finally:
                self._guarded(self._streamed, call, stream, first, before, escaped)

    async def embed(self, embed: Embed, request: EmbeddingRequest) -> EmbeddingResponse:
        attributes: dict[str, Any] = {
            "gen_ai.request.encoding_formats": [request.encoding_format],
        }
        if request.dimensions is not None:
            attributes["gen_ai.embeddings.dimension.count"] = request.dimensions
        if request.tenant is not None:
            attributes["llm_router.tenant"] = request.tenant
        call = self._begin("embeddings", request.model, attributes)
        try:
            result = await embed(request)
        except BaseException as exc:
            self._failed(call, "embeddings", exc)
            raise
        self._guarded(self._embedded, call, result)
        return result

    # -- the gateway's calls --------------------------------------------------------------

    def enter(self, headers: Headers) -> Entered:
        """Make an incoming request's trace context (W3C ``traceparent`` and
        ``tracestate``, or whatever the configured propagators read) the current one,
        so the request span is its child. Pair with `leave`."""
        parent = propagate.extract(headers, getter=_ASGI_HEADERS)
        return otel_context.attach(parent), self._trace_id.set(None)

    def leave(self, entered: Entered) -> str | None:
        """Undo `enter`; the trace id of the request span made meanwhile (hex), if any."""
        token, trace_token = entered
        trace_id = self._trace_id.get()
        self._trace_id.reset(trace_token)
        otel_context.detach(token)
        return trace_id

    # -- the asyncio bridge's calls (`router.aio`) -------------------------------------------

    def current(self) -> Context:
        """The caller's current trace context (in an asyncio task), for `under`."""
        return otel_context.get_current()

    def attach(self, parent: Context) -> None:
        """Make `parent` current in this (trio) task."""
        otel_context.attach(parent)

    async def under(self, parent: Context, call: Awaitable[T]) -> T:
        """Await `call` with `parent` as the current trace context."""
        token = otel_context.attach(parent)
        try:
            return await call
        finally:
            otel_context.detach(token)

    async def aclose(self) -> None:
        """Flush and stop a provider built from the config (its export is a blocking
        HTTP call: run off the event loop)."""
        if self._owned:
            shutdown = getattr(self.provider, "shutdown", None)
            if shutdown is not None:
                with trio.move_on_after(_FLUSH_LIMIT):  # a collector that is down
                    await trio.to_thread.run_sync(shutdown, abandon_on_cancel=True)

    # -- spans --------------------------------------------------------------------------

    def _begin(self, operation: str, model: str, attributes: dict[str, Any]) -> _Call:
        attributes["gen_ai.operation.name"] = operation
        attributes["gen_ai.request.model"] = model
        wall, begun = time.time_ns(), trio.current_time()
        span = self._tracer.start_span(
            f"{operation} {model}", kind=SpanKind.CLIENT, attributes=attributes, start_time=wall
        )
        ctx = span.get_span_context()
        if ctx.is_valid:
            self._trace_id.set(trace.format_trace_id(ctx.trace_id))
        return _Call(span, wall, begun)

    def _guarded(self, finish: Callable[..., None], call: _Call, *args: Any) -> None:
        """End the request's spans; a tracing bug is logged, never the request's."""
        try:
            finish(call, *args)
        except Exception:
            log.exception("could not record the trace of a request")
            if call.span.is_recording():
                call.span.end()

    def _answered(self, call: _Call, response: ChatResponse) -> None:
        span = call.span
        if span.is_recording():
            attributes = self._served(response.model, response.upstream_model, response.provider)
            attributes["llm_router.key_id"] = response.key_id
            _usage(attributes, response.usage)
            reasons = [c.finish_reason for c in response.choices or ()] or [response.finish_reason]
            attributes["gen_ai.response.finish_reasons"] = reasons
            if response.dropped_params:
                attributes["llm_router.dropped_params"] = response.dropped_params
            self._attempts(call, attributes, "chat", response.attempts)
        span.end(call.at(call.now()))

    def _embedded(self, call: _Call, response: EmbeddingResponse) -> None:
        span = call.span
        if span.is_recording():
            attributes = self._served(response.model, response.upstream_model, response.provider)
            attributes["llm_router.key_id"] = response.key_id
            attributes["gen_ai.usage.input_tokens"] = response.usage.prompt_tokens
            if response.embeddings:
                attributes["gen_ai.embeddings.dimension.count"] = len(response.embeddings[0])
            self._attempts(call, attributes, "embeddings", response.attempts)
        span.end(call.at(call.now()))

    def _streamed(
        self,
        call: _Call,
        stream: ChatStream,
        first: float,
        before: int,
        escaped: BaseException | None,
    ) -> None:
        span = call.span
        end = call.now()
        if span.is_recording():
            attributes = self._served(stream.model, stream.upstream_model, stream.provider)
            attributes["llm_router.key_id"] = stream.key_id
            attributes["gen_ai.response.time_to_first_chunk"] = first
            if stream.usage is not None:
                _usage(attributes, stream.usage)
            if stream.finish_reason is not None:
                attributes["gen_ai.response.finish_reasons"] = [stream.finish_reason]
            if len(stream.segments) > 1:
                attributes["llm_router.segments"] = len(stream.segments)
                last = stream.segments[-1]
                attributes["llm_router.provider"] = last.provider
                attributes["llm_router.key_id"] = last.key_id
            if stream.dropped_params:
                attributes["llm_router.dropped_params"] = stream.dropped_params
            error = stream.error
            if error is not None:
                _error(span, attributes, error)
            elif isinstance(escaped, trio.Cancelled):
                attributes["llm_router.cancelled"] = True
            self._attempts(call, attributes, "chat", stream.attempts, before, end, bool(error))
        span.end(call.at(end))

    def _failed(self, call: _Call, operation: str, exc: BaseException) -> None:
        try:
            span = call.span
            if span.is_recording():
                attributes: dict[str, Any] = {}
                if isinstance(exc, trio.Cancelled):
                    attributes["llm_router.cancelled"] = True
                else:
                    _error(span, attributes, exc)
                attempts: list[Attempt] = list(getattr(exc, "attempts", None) or ())
                self._attempts(call, attributes, operation, attempts)
            span.end(call.at(call.now()))
        except Exception:
            log.exception("could not record the trace of a failed request")

    def _served(self, model: str, upstream: str, provider: str) -> dict[str, Any]:
        endpoint = self._endpoints.get(provider)
        return {
            "gen_ai.response.model": upstream or model,
            "gen_ai.provider.name": endpoint.system if endpoint else provider,
            "llm_router.model": model,
            "llm_router.provider": provider,
        }

    def _attempts(
        self,
        call: _Call,
        attributes: dict[str, Any],
        operation: str,
        attempts: Sequence[Attempt],
        before: int | None = None,
        end: float = 0.0,
        interrupted: bool = False,
    ) -> None:
        """One child span per attempt. For a stream (`before`: the attempts made before
        it started), the attempt that served a segment lasts until the segment ended
        (the next continuation's first attempt, or the stream's end), and the attempts
        after `before` are marked with the continuation they belong to. `attributes`:
        the request span's own, set here with the count (one call: each costs a lock)."""
        attributes["llm_router.attempts"] = len(attempts)
        call.span.set_attributes(attributes)
        ends: dict[int, float] = {}
        continuation = [0] * len(attempts)
        if before is not None:
            serving = None
            for i in range(before):
                if attempts[i].outcome in _SERVED:
                    serving = i
            number = 1
            for i in range(before, len(attempts)):
                if serving is not None:
                    ends[serving] = attempts[i].started
                    serving = None
                continuation[i] = number
                if attempts[i].outcome in _SERVED:
                    serving = i
                    number += 1
            if serving is not None:
                ends[serving] = end
        parent = trace.set_span_in_context(call.span)
        tracer = self._tracer
        for i, a in enumerate(attempts):
            attributes = {
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": self._upstream(a.model),
                "llm_router.model": a.model,
                "llm_router.provider": a.provider,
                "llm_router.key_id": a.key_id,
                "llm_router.attempt.number": i + 1,
                "llm_router.attempt.outcome": a.outcome,
            }
            endpoint = self._endpoints.get(a.provider)
            if endpoint is not None:
                attributes["gen_ai.provider.name"] = endpoint.system
                if endpoint.address is not None:
                    attributes["server.address"] = endpoint.address
                if endpoint.port is not None:
                    attributes["server.port"] = endpoint.port
            if a.status is not None:
                attributes["http.response.status_code"] = a.status
            if a.backoff:
                attributes["llm_router.attempt.backoff"] = a.backoff
            if continuation[i]:
                attributes["llm_router.attempt.continuation"] = continuation[i]
            finish = a.started + a.duration
            if i in ends:
                attributes["gen_ai.response.time_to_first_chunk"] = a.duration
                finish = max(finish, ends[i])
                last = i == max(ends)
                if not last or interrupted:
                    attributes["llm_router.attempt.interrupted"] = True
            failed = a.outcome not in _NOT_FAILED
            if failed:
                attributes["error.type"] = a.outcome
            span = tracer.start_span(
                f"{operation} {attributes['gen_ai.request.model']}",
                context=parent,
                kind=SpanKind.CLIENT,
                attributes=attributes,
                start_time=call.at(a.started),
            )
            if failed:
                span.set_status(Status(StatusCode.ERROR, a.outcome))
            span.end(call.at(finish))

    def _upstream(self, model: str) -> str:
        try:
            return self._upstream_of(model)
        except Exception:  # a model the config no longer names: its own name
            return model


def open_tracing(
    config: RouterConfig,
    provider: trace.TracerProvider | None,
    upstream_of: Callable[[str], str],
) -> Tracing:
    """The router's tracer: over `provider` when given, else over a provider built from
    `[router.tracing]` that exports over OTLP/HTTP."""
    if provider is not None:
        return Tracing(provider, config, upstream_of)
    settings = config.router.tracing
    assert settings is not None
    return Tracing(_own_provider(settings), config, upstream_of, owned=True)


def _own_provider(settings: TracingConfig) -> trace.TracerProvider:
    # The SDK and the exporter are needed only here: a caller's own provider needs
    # neither. ImportError reaches `Router.open`, which names the extra to install.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create(
        {SERVICE_NAME: settings.service_name} if settings.service_name is not None else {}
    )
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "llm-router"}))
    sampler = None
    if settings.sample_rate is not None:
        sampler = ParentBased(TraceIdRatioBased(settings.sample_rate))
    provider = TracerProvider(resource=resource, sampler=sampler)
    endpoint = settings.endpoint
    if endpoint is not None and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    headers: Mapping[str, str] | None = None
    if settings.headers:
        headers = resolve_headers(settings.headers, "router.tracing.headers")
    exporter = OTLPSpanExporter(endpoint=endpoint, headers=headers)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _endpoint(name: str, kind: str, base_url: str) -> _Endpoint:
    parts = urlsplit(base_url) if base_url else None
    host = parts.hostname if parts is not None else None
    port = parts.port if parts is not None else None
    system = _WELL_KNOWN.get(kind)
    if kind == "openai" and host is not None:
        if host == "api.openai.com":
            system = "openai"
        elif host.endswith(".openai.azure.com"):
            system = "azure.ai.openai"
    return _Endpoint(system or name, host, port)


def _chat_attributes(request: ChatRequest, stream: bool) -> dict[str, Any]:
    """The request's parameters, as the conventions name them (never its messages)."""
    attributes: dict[str, Any] = {"gen_ai.request.stream": stream}
    if request.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = request.max_tokens
    if request.temperature is not None:
        attributes["gen_ai.request.temperature"] = request.temperature
    if request.top_p is not None:
        attributes["gen_ai.request.top_p"] = request.top_p
    if request.stop:
        attributes["gen_ai.request.stop_sequences"] = list(request.stop)
    if request.seed is not None:
        attributes["gen_ai.request.seed"] = request.seed
    if request.frequency_penalty is not None:
        attributes["gen_ai.request.frequency_penalty"] = request.frequency_penalty
    if request.presence_penalty is not None:
        attributes["gen_ai.request.presence_penalty"] = request.presence_penalty
    if request.n is not None and request.n != 1:
        attributes["gen_ai.request.choice.count"] = request.n
    if request.response_format is not None:
        kind = request.response_format.type
        attributes["gen_ai.output.type"] = "text" if kind == "text" else "json"
    if request.tenant is not None:
        attributes["llm_router.tenant"] = request.tenant
    return attributes


def _usage(attributes: dict[str, Any], usage: Usage) -> None:
    attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
    attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
    if usage.cached_tokens:
        attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
    if usage.cache_creation_tokens:
        attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_creation_tokens
    if usage.reasoning_tokens:
        attributes["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens


def _error(span: trace.Span, attributes: dict[str, Any], exc: BaseException) -> None:
    """The request failed: status ERROR with its error kind (never its message, which
    may quote the request)."""
    kind = exc.kind if isinstance(exc, RouterError) else type(exc).__name__
    attributes["error.type"] = kind
    attributes["llm_router.error.kind"] = kind
    attributes["llm_router.error.class"] = type(exc).__name__
    span.set_status(Status(StatusCode.ERROR, kind))
