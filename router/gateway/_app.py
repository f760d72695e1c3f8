"""The gateway's ASGI application: OpenAI-compatible endpoints over one `Router`.

Plain ASGI (no framework): the request path is short and every byte of it is ours.
The app does not open the router itself; `router.gateway.serve` opens it around
Hypercorn's trio worker in the same trio run and sets `app.router`.

What this module must never do: echo a secret (gateway keys, the admin key, provider
keys) into a response or a log line; buffer more than `max_body_bytes` of a body; keep
an upstream attempt running after its client has gone away.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
import trio

from .._config import RouterConfig, resolve_secret
from .._errors import InvalidRequestError, RouterError, StreamInterruptedError
from .._router import Router, RouterSnapshot
from .._types import Attempt, ChatRequest, ChatResponse
from ._metrics import CONTENT_TYPE, GatewayMetrics
from ._shapes import (
    BadBody,
    ChatOptions,
    chunk_json,
    completion_id,
    completion_json,
    error_body,
    error_reply,
    parse_chat_body,
    usage_json,
)

__all__ = ["GatewayApp"]

log = logging.getLogger("router.gateway")

Scope = dict[str, Any]
Event = dict[str, Any]
Receive = Callable[[], Awaitable[Event]]
Send = Callable[[Event], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_JSON: Final = (b"content-type", b"application/json")
_SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_DONE: Final = b"data: [DONE]\n\n"


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    """The client disconnected while we were reading its body."""


class _ResetBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    provider: str | None = None
    key_id: str | None = None
    model: str | None = None
    upstream: str | None = None
    """One lane: the upstream model id on `key_id` (or on every key of `provider`)."""


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

    __slots__ = ("attempts", "key_id", "model", "overhead", "provider")

    def __init__(self, model: str, provider: str, key_id: str, attempts: list[Attempt]) -> None:
        self.model = model
        self.provider = provider
        self.key_id = key_id
        self.attempts = attempts
        self.overhead: float | None = None
        """Seconds of our own time up to the response head (set by `headers`)."""

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
        return [
            (b"x-router-model", self.model.encode()),
            (b"x-router-provider", self.provider.encode()),
            (b"x-router-key-id", self.key_id.encode()),
            (b"x-router-attempts", str(len(self.attempts)).encode()),
            (b"x-router-overhead-ms", f"{overhead * 1000.0:.3f}".encode()),
        ]


_NOBODY: Final = _Served("", "", "", [])


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return bytes(v).decode("latin-1")
    return None


class GatewayApp:
    """The ASGI app. `router` must be set (by `serve`) before requests arrive."""

    def __init__(self, config: RouterConfig, router: Router | None = None) -> None:
        self.config = config
        gw = config.gateway
        self.max_body = gw.max_body_bytes
        self._keys: list[tuple[bytes, str | None, str]] = [
            (
                resolve_secret(k.secret, f"gateway.api_keys[{i}].secret").encode(),
                k.tenant,
                k.id,
            )
            for i, k in enumerate(gw.api_keys)
        ]
        admin = resolve_secret(gw.admin_key, "gateway.admin_key") if gw.admin_key else ""
        self._admin: bytes | None = admin.encode() if admin else None
        self.router = router
        self.accepting = True
        """False once shutdown began: /readyz answers 503."""
        self.metrics = GatewayMetrics(self._snapshot)
        self._models = _encode(
            {
                "object": "list",
                "data": [
                    {"id": m.name, "object": "model", "created": 0, "owned_by": m.provider}
                    for m in config.models
                ],
            }
        )

    def _snapshot(self) -> RouterSnapshot | None:
        return self.router.snapshot() if self.router is not None else None

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

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method = scope["method"]
        path = scope["path"]
        endpoint = path
        try:
            if path == "/v1/chat/completions":
                if method != "POST":
                    status = await self._method_not_allowed(send, started)
                else:
                    status = await self._chat(scope, receive, send, started)
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
            else:
                endpoint = "other"
                status = await self._error(
                    send,
                    404,
                    error_body(f"no route {method} {path}", "invalid_request_error", None, None),
                    _NOBODY,
                    started,
                )
        except _Gone:
            status = 499
        except Exception:
            log.exception("gateway error on %s %s", method, endpoint)
            status = 500
            # The head may already be out; then there is nothing more to say.
            with contextlib.suppress(Exception):
                await self._error(
                    send,
                    500,
                    error_body("internal gateway error", "server_error", None, "internal"),
                    _NOBODY,
                    started,
                )
        self.metrics.http_responses.labels(endpoint, str(status)).inc()

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
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, *served.headers(started)],
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
        extra = [(k.encode(), v.encode()) for k, v in headers or ()]
        return await self._send(send, status, [_JSON, *extra], _encode(body), served, started)

    async def _method_not_allowed(self, send: Send, started: float) -> int:
        body = error_body("method not allowed", "invalid_request_error", None, None)
        return await self._error(send, 405, body, _NOBODY, started)

    # ------------------------------------------------------------------ auth

    def _tenant(self, scope: Scope) -> tuple[bool, str | None]:
        """(authorized, tenant) from the bearer token; constant-time comparisons."""
        if not self._keys:
            return True, None
        token = _bearer(scope)
        if token is None:
            return False, None
        given = token.encode()
        found: tuple[bytes, str | None, str] | None = None
        for key in self._keys:  # compare against every key: no early exit
            if hmac.compare_digest(given, key[0]) and found is None:
                found = key
        if found is None:
            return False, None
        return True, found[1] if found[1] is not None else found[2]

    async def _unauthorized(self, send: Send, started: float, what: str = "API key") -> int:
        body = error_body(
            f"missing or invalid {what} (send it as `Authorization: Bearer <key>`)",
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
        handler: Callable[[Send, float], Awaitable[int]],
        method: str,
    ) -> int:
        if method != "GET":
            return await self._method_not_allowed(send, started)
        ok, _ = self._tenant(scope)
        if not ok:
            return await self._unauthorized(send, started)
        return await handler(send, started)

    # ------------------------------------------------------------------ small endpoints

    async def _list_models(self, send: Send, started: float) -> int:
        return await self._send(send, 200, [_JSON], self._models, _NOBODY, started)

    async def _ready(self, send: Send, started: float) -> int:
        snap = self._snapshot()
        callable_keys = 0
        if snap is not None and self.router is not None:
            callable_keys = self.router.callable_keys()
        ready = snap is not None and self.accepting and callable_keys > 0
        payload = {
            "status": "ready" if ready else "unavailable",
            "callable_keys": callable_keys,
            "keys": len(snap.keys) if snap is not None else 0,
        }
        return await self._json(send, 200 if ready else 503, payload, _NOBODY, started)

    async def _admin_call(
        self, scope: Scope, receive: Receive, send: Send, started: float, method: str
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
            raw = msgspec.json.encode(router.snapshot())
            return await self._send(send, 200, [_JSON], raw, _NOBODY, started)
        try:
            raw_body = await self._read_body(scope, receive)
        except _TooLarge:
            return await self._too_large(send, started)
        try:
            reset = (
                msgspec.json.decode(raw_body, type=_ResetBody) if raw_body.strip() else _ResetBody()
            )
            router.reset(
                provider=reset.provider,
                key_id=reset.key_id,
                model=reset.model,
                upstream=reset.upstream,
            )
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
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

    # ------------------------------------------------------------------ body

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, refusing (without reading further) once over the limit."""
        limit = self.max_body
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise _TooLarge
            except ValueError:
                pass
        body = bytearray()
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

    async def _too_large(self, send: Send, started: float) -> int:
        body = error_body(
            f"request body is larger than the limit of {self.max_body} bytes",
            "invalid_request_error",
            None,
            "request_too_large",
        )
        return await self._error(send, 413, body, _NOBODY, started, [("connection", "close")])

    # ------------------------------------------------------------------ chat

    async def _chat(self, scope: Scope, receive: Receive, send: Send, started: float) -> int:
        ok, tenant = self._tenant(scope)
        if not ok:
            return await self._unauthorized(send, started)
        try:
            raw = await self._read_body(scope, receive)
        except _TooLarge:
            return await self._too_large(send, started)
        try:
            try:
                data = _decode(raw)
            except msgspec.DecodeError as exc:
                raise BadBody(None, f"the body is not valid JSON: {exc}", "invalid_json") from None
            request, options = parse_chat_body(data, tenant, _header(scope, b"x-router-fallbacks"))
        except BadBody as exc:
            reply = error_reply(exc)
            return await self._error(send, reply.status, reply.body, _NOBODY, started)
        router = self.router
        if router is None:
            body = error_body("router is not running", "service_unavailable", None, "closed")
            return await self._error(send, 503, body, _NOBODY, started)
        metrics = self.metrics
        metrics.in_flight.inc()
        try:
            if options.stream:
                return await self._chat_stream(router, request, options, receive, send, started)
            return await self._chat_once(router, request, receive, send, started)
        finally:
            metrics.in_flight.dec()

    def _record(self, request: ChatRequest, served: _Served, outcome: str, started: float) -> None:
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

    async def _fail(
        self,
        request: ChatRequest,
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
    ) -> int:
        watch = _Watch()
        result: ChatResponse | RouterError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run, receive, nursery.cancel_scope)
            try:
                result = await router.submit(request)
            except RouterError as exc:
                result = exc
            nursery.cancel_scope.cancel()
        if watch.gone or result is None:
            self._record(request, _NOBODY, "cancelled", started)
            return 499
        if isinstance(result, RouterError):
            return await self._fail(request, result, send, started)
        served = _Served(result.model, result.provider, result.key_id, result.attempts)
        self._record(request, served, "ok", started)
        return await self._json(send, 200, completion_json(result), served, started)

    async def _chat_stream(
        self,
        router: Router,
        request: ChatRequest,
        options: ChatOptions,
        receive: Receive,
        send: Send,
        started: float,
    ) -> int:
        watch = _Watch()
        status = 499
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run, receive, nursery.cancel_scope)
            try:
                status = await self._pump_stream(router, request, options, send, started, watch)
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
            served = _Served(stream.model, stream.provider, stream.key_id, stream.attempts)
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
            first = True
            try:
                async for chunk in stream:
                    if not (chunk.has_content or chunk.finish_reason or first):
                        continue
                    payload = chunk_json(
                        cid, created, stream.model, chunk, first=first, include_usage=include_usage
                    )
                    first = False
                    await send(_event(payload))
            except StreamInterruptedError as exc:
                reply = error_reply(exc)
                served.attempts = exc.attempts
                self._record(request, served, exc.kind, started)
                log.warning("stream for model %r interrupted: %s", stream.model, exc.message)
                await send(_event(reply.body))
                watch.finishing = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return 200
            if include_usage:
                tail = chunk_json(cid, created, stream.model, None, first=False, include_usage=True)
                tail["usage"] = usage_json(stream.usage)
                await send(_event(tail))
            self._record(request, served, "ok", started)
            watch.finishing = True
            await send({"type": "http.response.body", "body": _DONE, "more_body": False})
            return 200


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
