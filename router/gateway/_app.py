"""The gateway's ASGI application: OpenAI-compatible endpoints over one `Router`.

Plain ASGI (no framework): the request path is short and every byte of it is ours.
The app does not open the router itself; `router.gateway.serve` opens it around
Hypercorn's trio worker in the same trio run and sets `app.router`.

What this module must never do: echo a secret (gateway keys, the admin key, provider
keys) into a response or a log line; buffer more than `max_body_bytes` of a body, or
wait longer than `body_timeout` for one; keep an upstream attempt running after its
client has gone away; let one request's input become a 500.

Limits (`[gateway]`): a body must arrive within `body_timeout` of the app being called
(408); at most `max_in_flight` chat requests and streams run at once (503 with
Retry-After past it); a request that waited longer than `max_queue_delay` before the app
could start on it is refused (503). What "waited" can mean here: Hypercorn parses a
request's head in its connection task and only then starts the app in a new task, so
the app can see (a) how long ago Hypercorn parsed the head (its stream's `start_time`,
read when the `send` callable carries it; not part of ASGI) and (b) how late the event
loop runs a task that is ready (`watch_event_loop`). The wait for the connection task
itself to run is (b) again; time spent in the kernel's accept queue or socket buffer is
not visible to the process at all. The refusal uses the larger of (a) and (b).

Reload (`reload`, POST /v1/router/reload with the admin key): the config (file) is
applied to the router first, then to the gateway's own settings (api_keys, tenants and
their models lists, admin_key, limits), in one step with no await between, so a
request sees one config or the other; a refused config changes neither.

Draining (`begin_drain`): chat requests that arrive are refused with 503; those
running get until `shutdown_grace`, then end with 503 (or, for a stream already under
way, an error event) rather than a dropped connection.
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import msgspec
import trio

from .._config import RouterConfig, resolve_secret
from .._errors import (
    ConfigError,
    InvalidRequestError,
    RouterClosedError,
    RouterError,
    StreamInterruptedError,
    UnknownModelError,
)
from .._router import ReloadResult, Router, RouterSnapshot
from .._stream import ChatStream, Segment
from .._tokens import OfflineTokenCounter, get_encoding
from .._types import (
    Attempt,
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingUsage,
    StreamChunk,
    Usage,
)
from .._usage import UsageSnapshot
from . import _access, _quota
from ._embeddings import embeddings_json, parse_embeddings_body
from ._messages import (
    MessageEvents,
    MessagesOptions,
    anthropic_error,
    error_event,
    message_json,
    parse_messages_body,
)
from ._metrics import CONTENT_TYPE, GatewayMetrics
from ._shapes import (
    BadBody,
    ChatOptions,
    ErrorReply,
    NotAllowed,
    chunk_json,
    completion_id,
    completion_json,
    decode_body,
    dropped_header,
    error_body,
    error_reply,
    has_news,
    parse_chat_body,
    usage_json,
)

__all__ = ["GatewayApp"]

log = logging.getLogger("router.gateway")

Scope = dict[str, Any]
Event = dict[str, Any]
T = TypeVar("T")
Receive = Callable[[], Awaitable[Event]]
Send = Callable[[Event], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_encode = msgspec.json.Encoder().encode
_JSON: Final = (b"content-type", b"application/json")
_SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_DONE: Final = b"data: [DONE]\n\n"
_CLOSE: Final = ("connection", "close")
_LOOP_TICK: Final = 0.05
"""How often `watch_event_loop` measures how late the event loop runs a ready task."""
_MESSAGES_PATHS: Final = ("/v1/messages", "/v1/messages/count_tokens")
_anthropic_shape: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "anthropic_shape", default=False
)
"""Set while serving an Anthropic Messages endpoint: `_error` (and `_cut_short`) answer
in Anthropic's error shape and statuses."""


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    """The client disconnected while we were reading its body."""


class _Stalled(Exception):
    """The body did not arrive within `body_timeout`."""


class _GatewayKey:
    """One `[gateway] api_keys` entry, resolved."""

    __slots__ = ("id", "models", "models_json", "secret", "tenant")

    def __init__(
        self, secret: bytes, tenant: str, key_id: str, models: frozenset[str] | None
    ) -> None:
        self.secret = secret
        self.tenant = tenant
        self.id = key_id
        self.models = models
        """The models this key may name (as its model or a fallback); None: any."""
        self.models_json: bytes | None = None
        """The key's own /v1/models answer when it has a `models` list."""


class _Exchange:
    """What one HTTP exchange has sent so far (kept by `_tracked`), so a request cut
    short by draining can still be answered properly."""

    __slots__ = ("done", "request", "request_id", "started", "status")

    def __init__(self) -> None:
        self.request_id: bytes | None = None
        """Sent as ``x-request-id`` with the response head (logged endpoints)."""
        self.status = 0
        self.started = False
        """The response head is out."""
        self.done = False
        """The last body message is out."""
        self.request: ChatRequest | None = None


class _ResetBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    provider: str | None = None
    key_id: str | None = None
    model: str | None = None
    upstream: str | None = None
    """One lane: the upstream model id on `key_id` (or on every key of `provider`)."""


class ClientConnection:
    """What the server (`_serve._Connection`) tells the app of one client connection:
    when reading from it is over (the client closed it, or it broke). The calls
    `_unless_gone` runs on it are cancelled then, without a watching task per request.
    The server sets it in `CONNECTION` for the connection's tasks (the app's included)."""

    __slots__ = ("calls", "closed")

    def __init__(self) -> None:
        self.closed = False
        self.calls: set[_Call] = set()

    def close(self) -> None:
        self.closed = True
        calls, self.calls = self.calls, set()
        for call in calls:
            call.gone = True
            call.scope.cancel()


class _Call:
    __slots__ = ("gone", "scope")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.gone = False


CONNECTION: Final[contextvars.ContextVar[ClientConnection | None]] = contextvars.ContextVar(
    "llm_router_client_connection", default=None
)


async def _unless_gone(
    receive: Receive, call: Callable[[], Awaitable[T]]
) -> T | RouterError | None:
    """`call()`'s result (or the `RouterError` it raised) while watching the client:
    None when the client went away first (the call is cancelled then, which the router
    never counts against a key). Under `serve` the connection says when the client
    left (`CONNECTION`); otherwise (another ASGI server) a task watches `receive` for
    ``http.disconnect``."""
    result: T | RouterError | None = None
    connection = CONNECTION.get()
    if connection is not None:
        if connection.closed:
            return None
        with trio.CancelScope() as scope:
            entry = _Call(scope)
            connection.calls.add(entry)
            try:
                result = await call()
            except RouterError as exc:
                result = exc
            finally:
                connection.calls.discard(entry)
        return None if entry.gone else result
    watch = _Watch()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run, receive, nursery.cancel_scope)
        try:
            result = await call()
        except RouterError as exc:
            result = exc
        nursery.cancel_scope.cancel()
    return None if watch.gone else result


class _Watch:
    """Cancels `scope` when the client disconnects (``http.disconnect``)."""

    __slots__ = ("finishing", "gone")

    def __init__(self) -> None:
        self.gone = False
        self.finishing = False
        """Set just before the last body message: a disconnect after it is the normal
        end of the response, not the client going away."""

    async def run(self, receive: Receive, scope: trio.CancelScope) -> None:
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                if self.finishing:
                    return
                self.gone = True
                scope.cancel()
                return


class _Served:
    """Who served a request, for the x-router-* headers and the metrics."""

    __slots__ = ("attempts", "cost", "dropped", "key_id", "model", "overhead", "provider")

    def __init__(
        self,
        model: str,
        provider: str,
        key_id: str,
        attempts: list[Attempt],
        dropped: list[str] | None = None,
    ) -> None:
        self.model = model
        self.provider = provider
        self.key_id = key_id
        self.attempts = attempts
        self.dropped = dropped_header(dropped) if dropped else ""
        """The ``x-router-dropped-params`` value ("": no such header)."""
        self.overhead: float | None = None
        """Seconds of our own time up to the response head (set by `headers`)."""
        self.cost: float | None = None
        """The answer's cost in USD (``x-router-cost-usd``; None: no price)."""

    @classmethod
    def from_attempts(cls, attempts: list[Attempt], model: str = "") -> _Served:
        if attempts:
            last = attempts[-1]
            return cls(last.model, last.provider, last.key_id, attempts)
        return cls(model, "", "", attempts)

    def headers(self, started: float) -> Headers:
        upstream = sum(a.duration + a.backoff for a in self.attempts)
        overhead = max(0.0, time.perf_counter() - started - upstream)
        if self is not _NOBODY:
            self.overhead = overhead
        entry = _access.current.get()
        if entry is not None:
            entry.overhead = overhead
        headers = [
            (b"x-router-model", self.model.encode()),
            (b"x-router-provider", self.provider.encode()),
            (b"x-router-key-id", self.key_id.encode()),
            (b"x-router-attempts", str(len(self.attempts)).encode()),
            (b"x-router-overhead-ms", f"{overhead * 1000.0:.3f}".encode()),
        ]
        if self.dropped:
            headers.append((b"x-router-dropped-params", self.dropped.encode()))
        if self.cost is not None:
            headers.append((b"x-router-cost-usd", usd(self.cost).encode()))
        return headers


_NOBODY: Final = _Served("", "", "", [])


def usd(cost: float) -> str:
    """A cost as a plain decimal (no exponent), to the 1e-10 dollar."""
    text = f"{cost:.10f}".rstrip("0").rstrip(".")
    return text or "0"


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return bytes(v).decode("latin-1")
    return None


class GatewayApp:
    """The ASGI app. `router` must be set (by `serve`) before requests arrive."""

    def __init__(self, config: RouterConfig, router: Router | None = None) -> None:
        self.quotas = _quota.TenantQuotas([])
        """Tenant quotas of the gateway keys (`_configure` sets their limits)."""
        self._configure(config)
        self.router = router
        self.config_path: str | None = None
        """The file `reload` reads again (set by `serve`)."""
        self.fan_out: Callable[[], None] | None = None
        """After a reload through the admin endpoint: tell the other workers (set by a
        `--workers` worker: it signals the supervisor, which forwards SIGHUP)."""
        self._reloading = trio.Lock()
        self.accepting = True
        """False once shutdown began: /readyz answers 503."""
        self.draining = False
        self._drain_deadline = math.inf
        self._active: set[trio.CancelScope] = set()
        """Every running exchange's cancel scope: draining gives each a deadline."""
        self.in_flight = 0
        """Chat requests and streams being served (admission control)."""
        self.connections = 0
        """Open client connections (kept by the server loop in `_serve`)."""
        self._lag = 0.0
        self._lag_due = math.inf
        self._counter = OfflineTokenCounter()
        self._encoding_loaded = False
        self.metrics = GatewayMetrics(self._snapshot, self._usage, self.quotas)

    def _configure(self, config: RouterConfig) -> None:
        """Set everything `config` determines (at startup and on reload). Resolves the
        gateway's secrets before it sets anything, so a bad one changes nothing."""
        gw = config.gateway
        secrets = [
            resolve_secret(k.secret, f"gateway.api_keys[{i}].secret").encode()
            for i, k in enumerate(gw.api_keys)
        ]
        admin = resolve_secret(gw.admin_key, "gateway.admin_key") if gw.admin_key else ""
        self.config = config
        self.max_body = gw.max_body_bytes
        self.body_timeout = gw.body_timeout
        self.send_timeout = gw.send_timeout
        self.max_in_flight = gw.max_in_flight
        self.max_queue_delay = gw.max_queue_delay
        self.max_connections = gw.max_connections
        self.shutdown_grace = gw.shutdown_grace
        self._configured = {m.name: m.provider for m in config.models}
        self._providers = {p.name for p in config.providers}
        self._kinds = {p.name: p.kind for p in config.providers}
        self._fallback_policy = gw.allow_request_fallbacks
        self._max_chain = config.router.max_chain
        self._default_timeout = config.router.timeout
        self._max_timeout = (
            gw.max_request_timeout if gw.max_request_timeout is not None else config.router.timeout
        )
        keys: list[_GatewayKey] = []
        for k, secret in zip(gw.api_keys, secrets, strict=True):
            models = frozenset(m.strip() for m in k.models) if k.models is not None else None
            key = _GatewayKey(secret, k.tenant if k.tenant is not None else k.id, k.id, models)
            if k.models is not None:
                key.models_json = self._models_json([m.strip() for m in k.models])
            keys.append(key)
        self._keys = keys
        self._admin: bytes | None = admin.encode() if admin else None
        self.quotas.reconfigure(gw.api_keys)
        if config.router.shared is not None:
            self.quotas.shared_timeout = config.router.shared.budget_timeout
        self._models = self._models_json([m.name for m in config.models])
        self._access_format = gw.access_log

    async def reload(self, config: RouterConfig | None = None) -> ReloadResult:
        """Apply `config` (default: `config_path` read again) to the router and the
        gateway, or raise `ConfigError` having changed nothing. Live: the router's
        keys, models and live settings (`Router.reload`), the gateway's api_keys (their
        tenants and models lists), admin_key, limits and fallback policy. Not live: the
        listen address and `gc_threshold` (logged when they changed) and the access-log
        format."""
        router = self.router
        if router is None:
            raise RouterClosedError()
        async with self._reloading:
            if config is None:
                if self.config_path is None:
                    raise ConfigError("<file>", "the gateway was not started from a config file")
                config = RouterConfig.load(self.config_path)
            old = self.config.gateway
            gw = config.gateway
            if gw.access_log != old.access_log or gw.gc_threshold != old.gc_threshold:
                if gw.gc_threshold != old.gc_threshold:
                    log.warning(
                        "gateway.gc_threshold changed to %s: it is applied only at startup "
                        "(the running process keeps %s)",
                        gw.gc_threshold,
                        old.gc_threshold,
                    )
                gw = msgspec.structs.replace(
                    gw, access_log=old.access_log, gc_threshold=old.gc_threshold
                )
                config = msgspec.structs.replace(config, gateway=gw)
            for i, k in enumerate(gw.api_keys):  # the gateway's secrets, before any change
                resolve_secret(k.secret, f"gateway.api_keys[{i}].secret")
            if gw.admin_key:
                resolve_secret(gw.admin_key, "gateway.admin_key")
            result = await router.reload(config)
            self._configure(config)
            if (gw.host, gw.port) != (old.host, old.port):
                log.warning(
                    "gateway.host/port changed to %s:%s: the listen address changes only on "
                    "restart (still serving the old one)",
                    gw.host,
                    gw.port,
                )
            return result

    def _models_json(self, names: list[str]) -> bytes:
        data = []
        for name in names:
            owner = self._configured.get(name)
            if owner is None:
                prov, sep, upstream = name.partition("/")
                if not (sep and upstream and prov in self._providers):
                    continue  # names nothing this gateway serves
                owner = prov
            data.append({"id": name, "object": "model", "created": 0, "owned_by": owner})
        return _encode({"object": "list", "data": data})

    def _snapshot(self) -> RouterSnapshot | None:
        return self.router.snapshot() if self.router is not None else None

    def _usage(self) -> UsageSnapshot | None:
        return self.router.usage() if self.router is not None else None

    # ------------------------------------------------------------------ ASGI entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                self.accepting = False
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, raw_send: Send) -> None:
        started = time.perf_counter()
        path = scope["path"]
        exchange = _Exchange()
        entry: _access.Access | None = None
        if path not in _UNLOGGED:
            rid = _access.request_id(_header(scope, b"x-request-id"))
            exchange.request_id = rid.encode()
            entry = _access.Access(rid, scope["method"], path, time.time())
        token = _access.current.set(entry)
        send = _tracked(raw_send, exchange)
        status = 500
        # Traced: the request span is a child of the client's `traceparent`, if any.
        tracing = self.router._tracing if self.router is not None and entry is not None else None
        traced = tracing.enter(scope["headers"]) if tracing is not None else None
        try:
            with trio.CancelScope(deadline=self._drain_deadline) as cut:
                self._active.add(cut)
                try:
                    status = await self._route(scope, receive, send, raw_send, started, exchange)
                finally:
                    self._active.discard(cut)
            if cut.cancelled_caught:  # shutdown_grace ended while this request was running
                status = await self._cut_short(send, exchange, started)
        finally:
            _access.current.reset(token)
            if traced is not None:
                assert tracing is not None and entry is not None
                entry.trace_id = tracing.leave(traced)
        endpoint = path if path in _ENDPOINTS else "other"
        self.metrics.http_responses.labels(endpoint, str(status)).inc()
        if (
            entry is not None
            and self._access_format != "off"
            and _access.access_log.isEnabledFor(logging.INFO)
        ):
            if entry.error is None and status >= 400:
                entry.error = "cancelled" if status == 499 else "http_error"
            latency = time.perf_counter() - started
            _access.access_log.info(_access.line(entry, status, latency, self._access_format))

    async def _route(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        raw_send: Send,
        started: float,
        exchange: _Exchange,
    ) -> int:
        method = scope["method"]
        path = scope["path"]
        try:
            if _has(scope, b"transfer-encoding") and _has(scope, b"content-length"):
                # Which one frames the body? Servers and proxies disagree (request
                # smuggling): refuse at once, reading nothing, and close.
                body = error_body(
                    "a request may not carry both Content-Length and Transfer-Encoding",
                    "invalid_request_error",
                    None,
                    "ambiguous_framing",
                )
                status = await self._error(send, 400, body, _NOBODY, started, [_CLOSE])
            elif path == "/v1/chat/completions":
                if method != "POST":
                    status = await self._method_not_allowed(send, started)
                else:
                    status = await self._chat(scope, receive, send, raw_send, started, exchange)
            elif path == "/v1/embeddings":
                if method != "POST":
                    status = await self._method_not_allowed(send, started)
                else:
                    status = await self._embeddings(scope, receive, send, raw_send, started)
            elif path in _MESSAGES_PATHS:
                status = await self._messages(scope, receive, send, raw_send, started, exchange)
            elif path == "/v1/models":
                status = await self._authed(scope, send, started, self._list_models, method)
            elif path == "/healthz":
                status = await self._json(send, 200, {"status": "ok"}, _NOBODY, started)
            elif path == "/readyz":
                status = await self._ready(send, started)
            elif path == "/metrics":
                status = await self._send(
                    send,
                    200,
                    [(b"content-type", CONTENT_TYPE.encode())],
                    self.metrics.render(),
                    _NOBODY,
                    started,
                )
            elif path == "/v1/router/state":
                status = await self._admin_call(scope, receive, send, started, "GET")
            elif path == "/v1/router/reset":
                status = await self._admin_call(scope, receive, send, started, "POST")
            elif path == "/v1/router/usage":
                status = await self._admin_call(
                    scope, receive, send, started, "GET", self._usage_report
                )
            elif path == "/v1/router/reload":
                status = await self._admin_call(scope, receive, send, started, "POST", reload=True)
            else:
                status = await self._error(
                    send,
                    404,
                    error_body(f"no route {method} {path}", "invalid_request_error", None, None),
                    _NOBODY,
                    started,
                )
        except _Gone:
            status = 499
        except _TooLarge:
            status = await self._too_large(send, started)
        except _Stalled:
            status = await self._stalled(send, started)
        except Exception:
            endpoint = path if path in _ENDPOINTS else "other"
            log.exception("gateway error on %s %s", method, endpoint)
            status = 500
            # The head may already be out; then there is nothing more to say.
            if not exchange.started:
                with contextlib.suppress(Exception):
                    await self._error(
                        send,
                        500,
                        error_body("internal gateway error", "server_error", None, "internal"),
                        _NOBODY,
                        started,
                    )
        return status

    async def _cut_short(self, send: Send, exchange: _Exchange, started: float) -> int:
        """Answer a request that draining ended: 503 if nothing was sent yet, an error
        event ending a stream under way, nothing if the response was complete."""
        if exchange.done:
            return exchange.status
        message = "the gateway shut down before the request completed; retry it"
        if exchange.request is not None:
            self._record(exchange.request, _NOBODY, "shutdown", started)
        try:
            if not exchange.started:
                body = error_body(message, "service_unavailable", None, "shutting_down")
                headers = [("retry-after", "1"), _CLOSE]
                return await self._error(send, 503, body, _NOBODY, started, headers)
            cut = error_body(message, "service_unavailable", None, "shutting_down")
            event: Event
            if _anthropic_shape.get():
                event = {"type": "http.response.body", "body": error_event(503, cut)}
            else:
                event = _event(cut)
            event["more_body"] = False
            await send(event)
        except Exception:  # the client is gone, or the server would take nothing more
            log.debug("could not answer a request cut short by shutdown", exc_info=True)
        return exchange.status or 503

    # ------------------------------------------------------------------ draining and load

    def begin_drain(self) -> None:
        """Shutdown began: refuse new chat requests; give the running ones until
        `shutdown_grace` from now (then `_cut_short` answers them)."""
        if self.draining:
            return
        self.draining = True
        self.accepting = False
        deadline = trio.current_time() + self.shutdown_grace
        self._drain_deadline = deadline
        for scope in self._active:
            scope.deadline = min(scope.deadline, deadline)

    async def watch_event_loop(self) -> None:
        """Measure, forever, how late the event loop runs a task that is ready: a task
        due at T that runs at T + lag would have kept a new request waiting as long."""
        while True:
            due = trio.current_time() + _LOOP_TICK
            self._lag_due = due
            await trio.sleep_until(due)
            self._lag = max(0.0, trio.current_time() - due)

    def loop_lag(self) -> float:
        """How late the event loop runs ready tasks now (the last measurement, or the
        watcher's own lateness when it is overdue)."""
        return max(self._lag, trio.current_time() - self._lag_due)

    def queue_delay(self, send: Send) -> float:
        """How long this request waited before the app could start on it (see the
        module's docstring for what is measurable)."""
        delay = self.loop_lag()
        parsed = getattr(getattr(send, "__self__", None), "start_time", None)
        if type(parsed) is float:
            delay = max(delay, time.time() - parsed)
        return delay

    def overload(self) -> str | None:
        """Why a new chat request would be refused now, or None."""
        if self.in_flight >= self.max_in_flight:
            return "in_flight"
        if self.loop_lag() > self.max_queue_delay:
            return "queue_delay"
        return None

    async def _unavailable(
        self, send: Send, started: float, reason: str, message: str, close: bool = False
    ) -> int:
        self.metrics.rejected.labels(reason).inc()
        code = "shutting_down" if reason == "draining" else "overloaded"
        body = error_body(message, "service_unavailable", None, code)
        headers = [("retry-after", "1"), *([_CLOSE] if close else [])]
        return await self._error(send, 503, body, _NOBODY, started, headers)

    # ------------------------------------------------------------------ sending

    async def _send(
        self,
        send: Send,
        status: int,
        headers: Headers,
        body: bytes,
        served: _Served,
        started: float,
    ) -> int:
        # With its length the answer needs no chunked framing (and no separate write
        # for the end of the body).
        length = (b"content-length", b"%d" % len(body))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, length, *served.headers(started)],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return status

    async def _json(
        self, send: Send, status: int, payload: Any, served: _Served, started: float
    ) -> int:
        return await self._send(send, status, [_JSON], _encode(payload), served, started)

    async def _error(
        self,
        send: Send,
        status: int,
        body: dict[str, Any],
        served: _Served,
        started: float,
        headers: list[tuple[str, str]] | None = None,
    ) -> int:
        entry = _access.current.get()
        if entry is not None and entry.error is None:
            error = body.get("error")
            if isinstance(error, dict):
                entry.error = error.get("code") or error.get("type")
        if _anthropic_shape.get():
            status, body, headers = anthropic_error(status, body, headers)
        extra = [(k.encode(), v.encode()) for k, v in headers or ()]
        return await self._send(send, status, [_JSON, *extra], _encode(body), served, started)

    async def _method_not_allowed(self, send: Send, started: float) -> int:
        body = error_body("method not allowed", "invalid_request_error", None, None)
        return await self._error(send, 405, body, _NOBODY, started)

    # ------------------------------------------------------------------ auth

    def _tenant(self, scope: Scope) -> tuple[bool, _GatewayKey | None]:
        """(authorized, the caller's key) from the bearer token, in constant time; the
        key is None when the gateway has no keys (no auth)."""
        if not self._keys:
            return True, None
        token = _bearer(scope) or _header(scope, b"x-api-key")
        if not token:
            return False, None
        given = token.strip().encode()
        found: _GatewayKey | None = None
        for key in self._keys:  # compare against every key: no early exit
            if hmac.compare_digest(given, key.secret) and found is None:
                found = key
        if found is not None:
            entry = _access.current.get()
            if entry is not None:
                entry.tenant = found.tenant
        return found is not None, found

    async def _unauthorized(self, send: Send, started: float, what: str = "API key") -> int:
        body = error_body(
            f"missing or invalid {what} (send it as `Authorization: Bearer <key>`"
            + (")" if what != "API key" else " or `x-api-key: <key>`)"),
            "invalid_request_error",
            None,
            "invalid_api_key",
        )
        return await self._error(send, 401, body, _NOBODY, started)

    async def _authed(
        self,
        scope: Scope,
        send: Send,
        started: float,
        handler: Callable[[Send, float, _GatewayKey | None], Awaitable[int]],
        method: str,
    ) -> int:
        if method != "GET":
            return await self._method_not_allowed(send, started)
        ok, key = self._tenant(scope)
        if not ok:
            return await self._unauthorized(send, started)
        return await handler(send, started, key)

    # ------------------------------------------------------------------ small endpoints

    async def _list_models(self, send: Send, started: float, key: _GatewayKey | None) -> int:
        models = key.models_json if key is not None and key.models_json is not None else None
        body = models if models is not None else self._models
        return await self._send(send, 200, [_JSON], body, _NOBODY, started)

    async def _ready(self, send: Send, started: float) -> int:
        snap = self._snapshot()
        callable_keys = 0
        if snap is not None and self.router is not None:
            callable_keys = self.router.callable_keys()
        overload = self.overload()
        if self.draining or not self.accepting:
            status = "draining"
        elif snap is None or callable_keys == 0:
            status = "unavailable"
        elif overload is not None:
            status = "overloaded"
        else:
            status = "ready"
        payload = {
            "status": status,
            "callable_keys": callable_keys,
            "keys": len(snap.keys) if snap is not None else 0,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "loop_lag_seconds": round(self.loop_lag(), 4),
        }
        if overload is not None:
            payload["overload"] = overload
        code = 200 if status == "ready" else 503
        return await self._json(send, code, payload, _NOBODY, started)

    async def _admin_call(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        started: float,
        method: str,
        report: Callable[[Router], Awaitable[bytes]] | None = None,
        reload: bool = False,
    ) -> int:
        if scope["method"] != method:
            return await self._method_not_allowed(send, started)
        token = _bearer(scope)
        if self._admin is None:
            body = error_body(
                "admin endpoints are disabled (no gateway.admin_key configured)",
                "invalid_request_error",
                None,
                "admin_disabled",
            )
            return await self._error(send, 401, body, _NOBODY, started)
        if token is None or not hmac.compare_digest(token.encode(), self._admin):
            return await self._unauthorized(send, started, "admin key")
        router = self.router
        if router is None:
            body = error_body("router is not running", "service_unavailable", None, "closed")
            return await self._error(send, 503, body, _NOBODY, started)
        if method == "GET":
            raw = await report(router) if report is not None else _encode(router.snapshot())
            return await self._send(send, 200, [_JSON], raw, _NOBODY, started)
        if reload:
            return await self._reload_reply(send, started)
        raw_body = await self._read_body(scope, receive)
        try:
            data = decode_body(raw_body) if raw_body.strip() else {}
            reset = msgspec.convert(data, type=_ResetBody)
            router.reset(
                provider=reset.provider,
                key_id=reset.key_id,
                model=reset.model,
                upstream=reset.upstream,
            )
        except BadBody as exc:
            reply = error_reply(exc)
            body = error_body(f"invalid reset body: {exc.message}", "invalid_request_error")
            body["error"]["code"] = exc.code
            return await self._error(send, reply.status, body, _NOBODY, started)
        except msgspec.ValidationError as exc:
            body = error_body(f"invalid reset body: {exc}", "invalid_request_error", None, None)
            return await self._error(send, 400, body, _NOBODY, started)
        except InvalidRequestError as exc:
            reply = error_reply(exc)
            return await self._error(send, reply.status, reply.body, _NOBODY, started)
        log.info(
            "router reset provider=%s key_id=%s model=%s upstream=%s",
            reset.provider,
            reset.key_id,
            reset.model,
            reset.upstream,
        )
        payload = {
            "ok": True,
            "provider": reset.provider,
            "key_id": reset.key_id,
            "model": reset.model,
            "upstream": reset.upstream,
        }
        return await self._json(send, 200, payload, _NOBODY, started)

    async def _reload_reply(self, send: Send, started: float) -> int:
        """POST /v1/router/reload: the config file read again and applied; what changed,
        or 400 with the config error (which never holds a secret's value)."""
        try:
            result = await self.reload()
        except ConfigError as exc:
            log.error("config reload refused, the running config is kept: %s", exc)
            body = error_body(f"config reload refused: {exc}", "invalid_request_error")
            body["error"]["code"] = "invalid_config"
            body["error"]["param"] = exc.field
            return await self._error(send, 400, body, _NOBODY, started)
        log.info("config reloaded (admin endpoint): %s", _changes(result))
        workers = "this one"
        if self.fan_out is not None:
            self.fan_out()
            workers = "all"
        payload = {"ok": True, "workers": workers, **msgspec.structs.asdict(result)}
        return await self._json(send, 200, payload, _NOBODY, started)

    # ------------------------------------------------------------------ body

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, refusing (without reading further) once over the limit, and
        giving up (`_Stalled`) when it has not all arrived within `body_timeout`."""
        limit = self.max_body
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise _TooLarge
            except ValueError:
                pass
        body = bytearray()
        with trio.move_on_after(self.body_timeout):
            while True:
                event = await receive()
                if event["type"] == "http.disconnect":
                    raise _Gone
                chunk = event.get("body", b"")
                if len(body) + len(chunk) > limit:
                    raise _TooLarge
                body += chunk
                if not event.get("more_body", False):
                    return bytes(body)
        raise _Stalled

    async def _usage_report(self, router: Router) -> bytes:
        """``GET /v1/router/usage``: tokens and spend per tenant and per model, and each
        quota key's spend this period. From Redis (every instance, since the shared
        totals began) with `[router.shared]`; else (or while Redis does not answer) this
        process's own since it started."""
        quotas = self.quotas
        quotas.shared = router.shared_state
        shared = await quotas.read_shared()
        if shared is not None:
            rows, spent = shared
            report = _quota.usage_report(rows)
            report = {"source": "shared", "since": None, **report}
        else:
            snap = router.usage()
            rows = [msgspec.structs.asdict(r) for r in snap.rows]
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snap.since))
            report = {"source": "local", "since": since, **_quota.usage_report(rows)}
            spent = quotas.local_spend()
        report["quotas"] = quotas.limits(spent)
        return _encode(report)

    async def _too_large(self, send: Send, started: float) -> int:
        body = error_body(
            f"request body is larger than the limit of {self.max_body} bytes",
            "invalid_request_error",
            None,
            "request_too_large",
        )
        return await self._error(send, 413, body, _NOBODY, started, [_CLOSE])

    async def _stalled(self, send: Send, started: float) -> int:
        self.metrics.rejected.labels("body_timeout").inc()
        body = error_body(
            f"the request body did not arrive within {self.body_timeout:g} seconds",
            "invalid_request_error",
            None,
            "request_timeout",
        )
        return await self._error(send, 408, body, _NOBODY, started, [_CLOSE])

    # ------------------------------------------------------------------ chat

    async def _chat(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        raw_send: Send,
        started: float,
        exchange: _Exchange,
        anthropic: bool = False,
    ) -> int:
        """Serve a chat request: OpenAI's chat completions, or (`anthropic`) Anthropic's
        Messages through the same admission control, limits and model checks."""
        parse = parse_messages_body if anthropic else parse_chat_body
        admitted = await self._admit(scope, receive, send, raw_send, started, parse)
        if isinstance(admitted, int):
            return admitted
        router, request, options = admitted
        metrics = self.metrics
        exchange.request = request
        entry = _access.current.get()
        if entry is not None:
            entry.model_asked = request.model
            entry.stream = options.stream
        self.in_flight += 1
        metrics.in_flight.inc()
        try:
            if options.stream:
                pump = self._pump_messages if anthropic else self._pump_stream
                return await self._chat_stream(
                    router, request, options, receive, send, started, pump
                )
            return await self._chat_once(
                router, request, receive, send, started, options, anthropic
            )
        finally:
            self.in_flight -= 1
            metrics.in_flight.dec()

    async def _embeddings(
        self, scope: Scope, receive: Receive, send: Send, raw_send: Send, started: float
    ) -> int:
        """``POST /v1/embeddings``: the same auth, admission, body limits and model /
        fallback policy as chat, then `Router.embed` (see `router.gateway._embeddings`)."""
        admitted = await self._admit(scope, receive, send, raw_send, started, parse_embeddings_body)
        if isinstance(admitted, int):
            return admitted
        router, request, _ = admitted
        assert isinstance(request, EmbeddingRequest)
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            result = await _unless_gone(receive, lambda: router.embed(request))
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
        if result is None:
            self._record(request, _NOBODY, "cancelled", started)
            return 499
        if isinstance(result, RouterError):
            return await self._fail(request, result, send, started)
        served = _Served(result.model, result.provider, result.key_id, result.attempts, [])
        served.cost = result.cost_usd
        self._record(request, served, "ok", started, result.usage, cost=result.cost_usd)
        answer = embeddings_json(result, request.encoding_format)
        if result.cost_usd is not None:
            answer["x_router"] = {"cost_usd": result.cost_usd}
        return await self._json(send, 200, answer, served, started)

    async def _admit(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        raw_send: Send,
        started: float,
        parse: Callable[..., tuple[Any, ChatOptions]],
    ) -> tuple[Router, Any, ChatOptions] | int:
        """Admission for every model endpoint: draining, auth, load shedding (before the
        body is read: an overloaded gateway does the least work), the body within its
        limits, `parse` (a body parser of `_shapes`, `_messages` or `_embeddings`), the
        key's model and fallback policy. Returns the router and the parsed request, or
        the status of the error answer already sent."""
        if self.draining:
            return await self._unavailable(
                send, started, "draining", "the gateway is shutting down; retry", close=True
            )
        ok, key = self._tenant(scope)
        if not ok:
            return await self._unauthorized(send, started)
        if self.in_flight >= self.max_in_flight:
            return await self._overloaded(send, started, "in_flight")
        if self.queue_delay(raw_send) > self.max_queue_delay:
            return await self._overloaded(send, started, "queue_delay")
        raw = await self._read_body(scope, receive)
        try:
            request, options = parse(
                decode_body(raw),
                key.tenant if key is not None else None,
                _header(scope, b"x-router-fallbacks"),
                max_timeout=self._max_timeout,
                default_timeout=self._default_timeout,
            )
            self._check_models(request, options, key)
        except (BadBody, NotAllowed) as exc:
            reply = error_reply(exc)
            return await self._error(send, reply.status, reply.body, _NOBODY, started)
        router = self.router
        if router is None:
            body = error_body("router is not running", "service_unavailable", None, "closed")
            return await self._error(send, 503, body, _NOBODY, started)
        if self.in_flight >= self.max_in_flight:  # others got in while the body arrived
            return await self._overloaded(send, started, "in_flight")
        self.quotas.shared = router.shared_state
        if key is not None and self.quotas:
            refused = await self._quota(key, request, send, started)
            if refused is not None:
                return refused
        return router, request, options

    async def _quota(
        self,
        key: _GatewayKey,
        request: ChatRequest | EmbeddingRequest,
        send: Send,
        started: float,
    ) -> int | None:
        """The key's quota (see `_quota`): None when admitted (its ticket is kept for
        `_record`), else the status of the 429 sent."""
        quotas = self.quotas
        tokens = 0
        if quotas.needs_tokens(key.id):
            if not self._encoding_loaded:
                await trio.to_thread.run_sync(get_encoding)
                self._encoding_loaded = True
            if isinstance(request, EmbeddingRequest):
                tokens = sum(self._counter.count_text(t) for t in request.inputs)
            else:
                counter = self._counter
                tokens = await counter.count_messages(
                    request.model, request.messages, request.tools
                )
        verdict = await quotas.admit(key.id, tokens)
        if isinstance(verdict, _quota.Refusal):
            entry = _access.current.get()
            if entry is not None:
                entry.model_asked = request.model
            self.metrics.quota_rejected.labels(key.id, verdict.limit).inc()
            seconds = str(max(1, math.ceil(verdict.retry_after)))
            code = f"{verdict.limit}_quota_exceeded"
            body = error_body(verdict.message, "rate_limit_error", None, code)
            return await self._error(send, 429, body, _NOBODY, started, [("retry-after", seconds)])
        _quota.current.set(verdict)
        return None

    async def _overloaded(self, send: Send, started: float, reason: str) -> int:
        if reason == "in_flight":
            message = (
                f"the gateway is serving its limit of {self.max_in_flight} requests; retry shortly"
            )
        else:
            message = (
                f"the gateway is overloaded (requests wait more than "
                f"{self.max_queue_delay:g} s to start); retry shortly"
            )
        # The body was not read: close rather than reuse the connection.
        return await self._unavailable(send, started, reason, message, close=True)

    def _check_models(
        self,
        request: ChatRequest | EmbeddingRequest,
        options: ChatOptions,
        key: _GatewayKey | None,
    ) -> None:
        """What a tenant may name: request fallbacks as `allow_request_fallbacks` says,
        and only the models of its key's `models` list (if it has one)."""
        fallbacks = request.fallbacks
        fields = options.fallback_fields
        if fallbacks:
            policy = self._fallback_policy
            if policy == "none":
                raise BadBody(
                    fields[0],
                    "this gateway takes no per-request fallbacks "
                    "(`fallbacks` field or `x-router-fallbacks` header)",
                    "fallbacks_not_allowed",
                )
            if len(fallbacks) > self._max_chain:
                raise BadBody(
                    "fallbacks",
                    f"{len(fallbacks)} fallbacks; a chain holds at most "
                    f"max_chain = {self._max_chain} models",
                    "too_many_fallbacks",
                )
            if policy == "configured":
                for name, field in zip(fallbacks, fields, strict=True):
                    if name not in self._configured and "/" in name:
                        raise BadBody(
                            field,
                            f"`{field}` names {name!r}: request fallbacks may name only "
                            "configured models, not `provider/upstream` ids",
                            "fallbacks_not_allowed",
                        )
        if key is not None and key.models is not None:
            allowed = key.models
            if request.model not in allowed:
                raise NotAllowed("model", request.model)
            for name, field in zip(fallbacks, fields, strict=True):
                if name not in allowed:
                    raise NotAllowed(field, name)

    def _interrupted(
        self,
        request: ChatRequest,
        served: _Served,
        started: float,
        stream: ChatStream,
        exc: StreamInterruptedError,
    ) -> ErrorReply:
        """A stream cut after its head went out: record it (attempts, usage, cost so
        far) and give the error to end the body with."""
        served.attempts = exc.attempts
        self._record(
            request, served, exc.kind, started, stream.usage, stream.segments, stream.cost_usd
        )
        log.warning("stream for model %r interrupted: %s", stream.model, exc.message)
        return error_reply(exc)

    def _record(
        self,
        request: ChatRequest | EmbeddingRequest,
        served: _Served,
        outcome: str,
        started: float,
        usage: Usage | EmbeddingUsage | None = None,
        segments: list[Segment] | None = None,
        cost: float | None = None,
    ) -> None:
        self._account(request, served, usage, cost)
        entry = _access.current.get()
        if entry is not None:
            entry.model_asked = request.model
            if served is not _NOBODY:
                entry.model = served.model
                entry.provider = served.provider
                entry.key_id = served.key_id
                entry.attempts = served.attempts
                entry.dropped = served.dropped
            if outcome != "ok":
                entry.error = outcome
            entry.usage = usage
            entry.segments = segments
            entry.cost = cost
        m = self.metrics
        model = served.model or request.model
        m.requests.labels(model, served.provider, served.key_id, outcome).inc()
        m.observe_attempts(served.attempts)
        total = time.perf_counter() - started
        m.latency.labels(model).observe(total)
        if outcome == "ok":
            overhead = served.overhead
            if overhead is None:
                overhead = max(0.0, total - sum(a.duration + a.backoff for a in served.attempts))
            m.overhead.observe(overhead)

    def _account(
        self,
        request: ChatRequest | EmbeddingRequest,
        served: _Served,
        usage: Usage | EmbeddingUsage | None,
        cost: float | None,
    ) -> None:
        """Settle the request's quota ticket, and add its usage to the shared totals."""
        if isinstance(usage, EmbeddingUsage):
            usage = Usage(prompt_tokens=usage.prompt_tokens, total_tokens=usage.total_tokens)
        ticket = _quota.current.get()
        if ticket is not None:
            _quota.current.set(None)
            tokens = usage.prompt_tokens + usage.completion_tokens if usage is not None else None
            self.quotas.settle(ticket, tokens, cost)
        if usage is not None and served is not _NOBODY:
            self.quotas.add_usage(request.tenant, served.model, usage, cost)

    async def _fail(
        self,
        request: ChatRequest | EmbeddingRequest,
        exc: RouterError,
        send: Send,
        started: float,
    ) -> int:
        attempts: list[Attempt] = list(getattr(exc, "attempts", None) or [])
        served = _Served.from_attempts(attempts, "")
        reply = error_reply(exc)
        self._record(request, served, exc.kind, started)
        if reply.status >= 500 or reply.status == 429:
            log.warning("chat request for model %r failed: %s", request.model, exc.message)
        return await self._error(send, reply.status, reply.body, served, started, reply.headers)

    async def _chat_once(
        self,
        router: Router,
        request: ChatRequest,
        receive: Receive,
        send: Send,
        started: float,
        options: ChatOptions | None = None,
        anthropic: bool = False,
    ) -> int:
        result = await _unless_gone(receive, lambda: router.submit(request))
        if result is None:
            self._record(request, _NOBODY, "cancelled", started)
            return 499
        if isinstance(result, RouterError):
            return await self._fail(request, result, send, started)
        served = _Served(
            result.model, result.provider, result.key_id, result.attempts, _dropped(result, options)
        )
        served.cost = result.cost_usd
        self._record(request, served, "ok", started, result.usage, cost=result.cost_usd)
        payload = message_json(result) if anthropic else completion_json(result)
        if result.cost_usd is not None:
            payload.setdefault("x_router", {})["cost_usd"] = result.cost_usd
        return await self._json(send, 200, payload, served, started)

    async def _chat_stream(
        self,
        router: Router,
        request: ChatRequest,
        options: ChatOptions,
        receive: Receive,
        send: Send,
        started: float,
        pump: _Pump | None = None,
    ) -> int:
        watch = _Watch()
        status = 499
        pump = pump or self._pump_stream
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run, receive, nursery.cancel_scope)
            try:
                status = await pump(router, request, options, send, started, watch)
            except RouterError as exc:  # before the first chunk: a plain error answer
                status = await self._fail(request, exc, send, started)
            nursery.cancel_scope.cancel()
        if watch.gone:
            self._record(request, _NOBODY, "cancelled", started)
            return 499
        return status

    async def _pump_stream(
        self,
        router: Router,
        request: ChatRequest,
        options: ChatOptions,
        send: Send,
        started: float,
        watch: _Watch,
    ) -> int:
        async with router.stream(request) as stream:
            served = _Served(
                stream.model, stream.provider, stream.key_id, stream.attempts, stream.dropped_params
            )
            self.metrics.ttft.labels(stream.model).observe(time.perf_counter() - started)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [*_SSE_HEADERS, *served.headers(started)],
                }
            )
            cid = completion_id()
            created = int(time.time())
            include_usage = options.include_usage
            frames = _ChunkFrames(cid, created, stream.model, include_usage)
            try:
                # One body message per batch (what one upstream read produced).
                async for batch in stream.batches():
                    body = frames.render(batch)
                    if body:
                        await send({"type": "http.response.body", "body": body, "more_body": True})
            except StreamInterruptedError as exc:
                reply = self._interrupted(request, served, started, stream, exc)
                await send(_event(reply.body))
                watch.finishing = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return 200
            if len(stream.segments) > 1:  # continued: say who served which part
                trace = chunk_json(
                    cid, created, stream.model, None, first=False, include_usage=False
                )
                trace["x_router"] = {
                    "segments": [
                        {
                            "model": s.model,
                            "provider": s.provider,
                            "key_id": s.key_id,
                            "mode": s.mode,
                            "chars": s.chars,
                        }
                        for s in stream.segments
                    ]
                }
                await send(_event(trace))
            if include_usage:
                tail = chunk_json(cid, created, stream.model, None, first=False, include_usage=True)
                tail["usage"] = usage_json(stream.usage)
                if stream.cost_usd is not None:
                    tail["x_router"] = {"cost_usd": stream.cost_usd}
                await send(_event(tail))
            self._record(
                request, served, "ok", started, stream.usage, stream.segments, stream.cost_usd
            )
            watch.finishing = True
            await send({"type": "http.response.body", "body": _DONE, "more_body": False})
            return 200

    # ------------------------------------------------------------------ Anthropic Messages

    async def _messages(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        raw_send: Send,
        started: float,
        exchange: _Exchange,
    ) -> int:
        """``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's shapes
        (see `_messages`), errors included (`_error` reads `_anthropic_shape`)."""
        token = _anthropic_shape.set(True)
        try:
            if scope["method"] != "POST":
                return await self._method_not_allowed(send, started)
            if scope["path"] == "/v1/messages":
                return await self._chat(
                    scope, receive, send, raw_send, started, exchange, anthropic=True
                )
            return await self._count_tokens(scope, receive, send, started)
        finally:
            _anthropic_shape.reset(token)

    async def _count_tokens(
        self, scope: Scope, receive: Receive, send: Send, started: float
    ) -> int:
        """The router's token count for a Messages body's prompt (the model's counter:
        exact where `[router.tokens]` configures it, else the offline estimate)."""
        ok, key = self._tenant(scope)
        if not ok:
            return await self._unauthorized(send, started)
        raw = await self._read_body(scope, receive)
        try:
            request, options = parse_messages_body(
                decode_body(raw), key.tenant if key is not None else None, None, count_only=True
            )
            self._check_models(request, options, key)
        except (BadBody, NotAllowed) as exc:
            reply = error_reply(exc)
            return await self._error(send, reply.status, reply.body, _NOBODY, started)
        prov, sep, upstream = request.model.partition("/")
        if request.model not in self._configured and not (
            sep and upstream and prov in self._providers
        ):
            reply = error_reply(UnknownModelError(request.model))
            return await self._error(send, reply.status, reply.body, _NOBODY, started)
        router = self.router
        if router is None:
            body = error_body("router is not running", "service_unavailable", None, "closed")
            return await self._error(send, 503, body, _NOBODY, started)
        try:
            counter = router.token_counter(request.model)
            count = await counter.count_messages(request.model, request.messages, request.tools)
        except RouterError as exc:
            reply = error_reply(exc)
            return await self._error(send, reply.status, reply.body, _NOBODY, started)
        return await self._json(send, 200, {"input_tokens": count}, _NOBODY, started)

    async def _pump_messages(
        self,
        router: Router,
        request: ChatRequest,
        options: ChatOptions,
        send: Send,
        started: float,
        watch: _Watch,
    ) -> int:
        """A stream as Anthropic's SSE events; after a cut an ``error`` event and no
        ``message_stop``."""
        async with router.stream(request) as stream:
            served = _Served(
                stream.model,
                stream.provider,
                stream.key_id,
                stream.attempts,
                _dropped(stream, options),
            )
            self.metrics.ttft.labels(stream.model).observe(time.perf_counter() - started)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [*_SSE_HEADERS, *served.headers(started)],
                }
            )
            thinking = self._kinds.get(stream.provider) == "anthropic"
            events = MessageEvents(stream.model, thinking=thinking)
            await send({"type": "http.response.body", "body": events.start(), "more_body": True})
            try:
                # One body message per batch (what one upstream read produced).
                async for batch in stream.batches():
                    if len(batch) == 1:
                        out = events.chunk(batch[0])
                    else:
                        out = b"".join([events.chunk(chunk) for chunk in batch])
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
            except StreamInterruptedError as exc:
                reply = self._interrupted(request, served, started, stream, exc)
                watch.finishing = True
                body = error_event(reply.status, reply.body)
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return 200
            self._record(
                request, served, "ok", started, stream.usage, stream.segments, stream.cost_usd
            )
            watch.finishing = True
            tail = events.end(stream.usage)
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            return 200


_ENDPOINTS: Final = frozenset(
    {
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/router/state",
        "/v1/router/reset",
        "/v1/router/usage",
        "/v1/router/reload",
        *_MESSAGES_PATHS,
    }
)


_UNLOGGED: Final = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/router/state",
        "/v1/router/reset",
        "/v1/router/usage",
        "/v1/router/reload",
    }
)
"""Paths without an access-log line or ``x-request-id`` (probes, metrics, admin)."""


_Pump = Callable[[Router, ChatRequest, ChatOptions, Send, float, _Watch], Awaitable[int]]


def _changes(result: ReloadResult) -> str:
    """A reload's changes in one log line (key and model names, never a secret)."""
    parts = []
    for label, names in (
        ("keys added", result.keys_added),
        ("keys removed", result.keys_removed),
        ("models added", result.models_added),
        ("models removed", result.models_removed),
        ("providers replaced", result.providers_replaced),
        ("settings changed", result.settings_changed),
    ):
        if names:
            parts.append(f"{label}: {', '.join(names)}")
    parts.append(f"{len(result.keys_kept)} keys kept")
    return "; ".join(parts)


def _dropped(source: ChatResponse | Any, options: ChatOptions | None) -> list[str]:
    """What the serving provider dropped, and (Messages) the top-level fields ignored."""
    dropped = list(source.dropped_params or [])
    if isinstance(options, MessagesOptions):
        dropped += options.ignored
    return dropped


def _tracked(send: Send, exchange: _Exchange) -> Send:
    """`send` that records what went out in `exchange`. Each send that changes the
    record (the head, the last body message) is shielded from cancellation, so a
    response is never left half-sent in our own bookkeeping (Hypercorn shields its
    socket writes the same way)."""

    async def tracked(event: Event) -> None:
        if event.get("more_body", False):
            # A stream's body message: nothing to record, and Hypercorn shields its
            # socket write, so a cancellation (only ever before the write) cannot
            # leave it half-sent. No shield of ours per message.
            await send(event)
            return
        if event["type"] == "http.response.start" and exchange.request_id is not None:
            rid = (b"x-request-id", exchange.request_id)
            event = {**event, "headers": [*event["headers"], rid]}
        with trio.CancelScope(shield=True):
            await send(event)
        if event["type"] == "http.response.start":
            exchange.started = True
            exchange.status = event["status"]
        elif event["type"] == "http.response.body" and not event.get("more_body", False):
            exchange.done = True

    return tracked


def _has(scope: Scope, name: bytes) -> bool:
    return any(k == name for k, _ in scope["headers"])


class _ChunkFrames:
    """Renders one stream's chunks as ``chat.completion.chunk`` SSE frames. A chunk
    that carries only text (nearly all of them) is spliced into bytes made once per
    stream, byte for byte what `chunk_json` would give, without building and encoding
    a dict per chunk; every other chunk goes through `chunk_json`."""

    __slots__ = ("_cid", "_created", "_first", "_head", "_include_usage", "_model", "_tail")

    def __init__(self, cid: str, created: int, model: str, include_usage: bool) -> None:
        self._cid = cid
        self._created = created
        self._model = model
        self._include_usage = include_usage
        self._first = True
        self._head = (
            b'data: {"id":'
            + _encode(cid)
            + b',"object":"chat.completion.chunk","created":'
            + _encode(created)
            + b',"model":'
            + _encode(model)
            + b',"choices":[{"index":0,"delta":{"content":'
        )
        usage = b',"usage":null' if include_usage else b""
        self._tail = b'},"finish_reason":null,"logprobs":null}]' + usage + b"}\n\n"

    def render(self, batch: list[StreamChunk]) -> bytes:
        """The frames of `batch`, concatenated (empty when none has news)."""
        head, tail = self._head, self._tail
        parts: list[bytes] = []
        for chunk in batch:
            if (
                chunk.text
                and not self._first
                and chunk.finish_reason is None
                and not chunk.tool_calls
                and not chunk.reasoning
                and not chunk.refusal
                and not chunk.thinking
                and chunk.logprobs is None
                and chunk.stop_sequence is None
                and not chunk.provider_fields
            ):
                parts.append(head + _encode(chunk.text) + tail)
            elif self._first or has_news(chunk):
                payload = chunk_json(
                    self._cid,
                    self._created,
                    self._model,
                    chunk,
                    first=self._first,
                    include_usage=self._include_usage,
                )
                self._first = False
                parts.append(b"data: " + _encode(payload) + b"\n\n")
        return parts[0] if len(parts) == 1 else b"".join(parts)


def _event(payload: Any) -> Event:
    return {
        "type": "http.response.body",
        "body": b"data: " + _encode(payload) + b"\n\n",
        "more_body": True,
    }


def _bearer(scope: Scope) -> str | None:
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
