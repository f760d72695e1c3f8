"""HTTP providers: one `httpx.AsyncClient` per key, a `WireProtocol` for the words.

`HttpProvider` is the `Provider` behind ``kind = "openai" | "anthropic" | "gemini"``;
`HttpProvider.count_tokens` asks a protocol with a count-tokens endpoint (Anthropic's)
for an exact prompt count.
Each key gets its own client: a `router._transport.LeanClient` over a
`RouterTransport` whose pool holds up to the key's `max_concurrency` connections, so
requests queue in the key actor, never in the pool, and no key waits behind another
key's connections (taking a connection from that pool costs the same whatever its
size). With a proxy (the provider's `proxy`, or HTTP_PROXY / HTTPS_PROXY / ALL_PROXY)
the key's requests go through httpx's own transport instead, over
`max_concurrency / SHARD_SIZE` plain clients of `SHARD_SIZE` connections each (plus
headroom), the least busy taking each request: httpcore's pool does work proportional
to its connections on every request, and one pool measured 2.3x slower than separate
ones at 64 concurrent requests. httpx's timeouts are set from the time the attempt has
left (`trio.current_effective_deadline()`); the key actor's cancel scope stays the
outer bound. With no trio deadline, a request sent from a key actor's worker has no
httpx timeout (the actor's timer ends every attempt at `attempt_timeout`), and one
sent elsewhere gets `_DEFAULT_TIMEOUT`.

Failures are classified here and in the protocol: an HTTP answer by its status, body
and retry headers; refused, reset or dropped connections, DNS failures, timeouts and
malformed bodies are transient. Failures before any response byte (refused, DNS, TLS,
a reset before the response head) are `key_wide`: they belong to the key's host, not
to the model. A timeout other than a connect timeout is `timed_out` (a silent
upstream) and not key-wide. A 404 whose body names no missing model is a route 404:
base_url is wrong, so it is key-wide too, and logged once per URL. A stream that sent
its finish reason ends normally even if the connection then breaks.

Secrets: the key's, every credential header's value (`router._secrets.header_is_secret`;
``env:VAR`` values are resolved here) and the credentials in base_url. Each call into
the wire protocol runs inside `scrubbing` with all of them, so the protocol's error
snippets are scrubbed before they are cut; every error raised is scrubbed again whole
(transport errors and reworded 404s included); URLs are shown through `mask_url`, and
httpx's and httpcore's own log lines (request URLs, response headers) are masked and
scrubbed too (`_ScrubLibraryLogs`). What this module
must never do: put a secret into an error message, a log line or a repr (secrets
travel only in request headers).
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
import time
import urllib.request
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
)
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import httpx
import trio

from ._classify import redact
from ._config import ProviderConfig, resolve_headers
from ._errors import ProviderError
from ._provider import IN_KEY_ACTOR
from ._secrets import (
    Scrubber,
    header_is_secret,
    header_secret_values,
    mask_url,
    mask_urls_in,
    scrubber_for,
    scrubbing,
    url_secrets,
)
from ._sse import SseParser
from ._transport import LeanClient, RouterTransport
from ._types import (
    ApiKey,
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    StreamChunk,
)
from ._wire import StreamDecoder, WireProtocol, WireRequest

__all__ = ["HttpProvider", "protocol_for"]

_log = logging.getLogger("router.http")

SHARD_SIZE = 8
"""Connections per httpx client of a key on httpx's own transport (with a proxy)."""
# Extra connections per pool: room for connections being torn down.
_POOL_HEADROOM = 2
_DEFAULT_TIMEOUT = 600.0
T = TypeVar("T")
R = TypeVar("R")
_DRAIN_GRACE = 0.5
"""Seconds a finished stream's body may take to end (its connection is kept then)."""


_LIVE: weakref.WeakSet[HttpProvider] = weakref.WeakSet()
"""The open providers, whose secrets the filter below scrubs from library log lines."""


class _ScrubLibraryLogs(logging.Filter):
    """httpx logs every request's URL (userinfo and query included) at INFO, and
    httpcore every response's headers at DEBUG (an upstream may repeat a credential
    in one): mask the URLs (`mask_urls_in`) and scrub every live provider's secrets
    from those records. Runs only for records that are emitted (DEBUG or INFO on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        secrets: list[str] = []
        for provider in list(_LIVE):
            secrets += provider.all_secrets()
        clean = scrubber_for(secrets, "[redacted]").scrub(mask_urls_in(message))
        if clean != message:
            record.msg, record.args = clean, ()
        return True


_LIBRARY_LOGGERS = (
    "httpx",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
)
for _name in _LIBRARY_LOGGERS:
    _library_log = logging.getLogger(_name)
    if not any(isinstance(f, _ScrubLibraryLogs) for f in _library_log.filters):
        _library_log.addFilter(_ScrubLibraryLogs())


def protocol_for(kind: str) -> WireProtocol:
    if kind == "openai":
        from ._openai import OpenAIProtocol

        return OpenAIProtocol()
    if kind == "anthropic":
        from ._anthropic import AnthropicProtocol

        return AnthropicProtocol()
    if kind == "gemini":
        from ._gemini import GeminiProtocol

        return GeminiProtocol()
    raise ValueError(f"no wire protocol for provider kind {kind!r}")


@runtime_checkable
class _CountingProtocol(Protocol):
    """A wire protocol with a count-tokens endpoint (Anthropic's)."""

    def build_count(
        self,
        request: ChatRequest,
        *,
        base_url: str,
        secret: str,
        headers: Mapping[str, str],
    ) -> WireRequest: ...

    def parse_count(self, status: int, headers: Mapping[str, str], body: bytes) -> int: ...


@runtime_checkable
class _EmbeddingProtocol(Protocol):
    """A wire protocol with an embeddings endpoint (OpenAI's, Gemini's)."""

    def build_embed(
        self,
        request: EmbeddingRequest,
        *,
        base_url: str,
        secret: str,
        headers: Mapping[str, str],
    ) -> WireRequest: ...

    def parse_embed(
        self, status: int, headers: Mapping[str, str], body: bytes
    ) -> EmbeddingResponse: ...


_SSL: list[ssl.SSLContext] = []


def _ssl_context() -> ssl.SSLContext:
    """One TLS context for every client: building one loads the CA bundle (~35 ms
    here), which a client per shard must not pay again."""
    if not _SSL:
        _SSL.append(httpx.create_ssl_context())
    return _SSL[0]


def _remaining() -> float | None:
    """httpx's timeout for a request: the time left before the current trio deadline.
    Without one: none in a key actor's worker (the actor's timer ends every attempt,
    and a request with no timeout at all costs the router's transport no cancel scope,
    about 0.6 KB per request in flight), else `_DEFAULT_TIMEOUT`."""
    deadline = trio.current_effective_deadline()
    if math.isinf(deadline):
        return None if IN_KEY_ACTOR.get() else _DEFAULT_TIMEOUT
    return max(0.001, deadline - trio.current_time())


def _transport_error(
    exc: httpx.HTTPError, provider: str, *, before_head: bool, scrubber: Scrubber | None = None
) -> ProviderError:
    """A transport failure as a transient `ProviderError`. `before_head`: no response
    byte had arrived (raised while connecting, sending or awaiting the head)."""
    # httpx messages name the host and the error, never headers; keep them short.
    key_wide = before_head
    timed_out = False
    if isinstance(exc, httpx.ConnectTimeout):
        what = f"connection timed out ({type(exc).__name__})"
    elif isinstance(exc, httpx.TimeoutException):
        # A silent upstream (read / write / pool timeout) is the model's problem.
        what = f"upstream timed out ({type(exc).__name__})"
        key_wide = False
        timed_out = True
    elif isinstance(exc, httpx.ConnectError):
        what = f"connection failed: {exc}"
    elif before_head:
        what = f"connection reset or closed before the response head ({type(exc).__name__}): {exc}"
    elif isinstance(exc, httpx.RemoteProtocolError):
        what = f"upstream closed the connection or broke the protocol: {exc}"
    else:
        what = f"{type(exc).__name__}: {exc}"
    message = f"{provider}: {what}"
    if scrubber is not None:
        message = scrubber.scrub(message)  # before the cut
    return ProviderError("transient", message[:400], key_wide=key_wide, timed_out=timed_out)


class HttpProvider:
    """A `Provider` speaking one wire protocol over HTTP, with one client per key."""

    reads_anywhere: Final = True
    """`stream_batches` holds no cancel scope or nursery across a yield: once the
    stream is handed over, the caller's task may read it (see `router._actor._Pull`)."""

    def __init__(
        self,
        config: ProviderConfig,
        protocol: WireProtocol,
        max_concurrency: Mapping[str, int],
    ) -> None:
        self.name = config.name
        self._protocol = protocol
        self._base_url = config.base_url.rstrip("/")
        self._shown_url = mask_url(self._base_url)
        self._headers = resolve_headers(config.headers, f"providers[{config.name!r}].headers")
        secrets = url_secrets(self._base_url)
        for name, value in self._headers.items():
            if header_is_secret(name, config.headers[name]):
                secrets += header_secret_values(value)
        self.known_secrets: tuple[str, ...] = tuple(dict.fromkeys(secrets))
        """Credentials of this provider other than the keys' secrets (header values,
        base_url's); the key actor scrubs them from every error too."""
        self._scrubbers: dict[str, tuple[str, Scrubber]] = {}
        """key id -> (its secret, the scrubber of its requests)"""
        _LIVE.add(self)
        self._max_concurrency = dict(max_concurrency)
        self._proxy = config.proxy
        if config.proxy is not None:
            self.known_secrets = tuple(
                dict.fromkeys((*self.known_secrets, *url_secrets(config.proxy)))
            )
        self._shards: dict[str, _Shards] = {}
        self._route_404_logged: set[str] = set()
        _ssl_context()  # built now, at Router.open, not on the first request

    def __repr__(self) -> str:
        return f"HttpProvider(name={self.name!r}, protocol={self._protocol.name!r})"

    def _scrubber(self, key: ApiKey) -> Scrubber:
        """What hides the secrets one request of `key` carries: the key's own and the
        provider's (`known_secrets`)."""
        known = self._scrubbers.get(key.id)
        if known is None or known[0] != key.secret:
            known = (key.secret, scrubber_for((key.secret, *self.known_secrets), "[redacted]"))
            self._scrubbers[key.id] = known
        return known[1]

    def all_secrets(self) -> list[str]:
        """`known_secrets` and the secret of every key that has made a request."""
        return [*self.known_secrets, *(secret for secret, _ in list(self._scrubbers.values()))]

    def _scrubbed(self, error: ProviderError, scrubber: Scrubber) -> ProviderError:
        message = scrubber.scrub(error.message)
        if message != error.message:
            error.message = message
            error.args = (message,)
        return error

    def _shards_for(self, key: ApiKey) -> _Shards:
        shards = self._shards.get(key.id)
        if shards is None:
            limit = self._max_concurrency.get(key.id, 64)
            if self._proxy is None and not _environment_proxies():
                shards = _Shards(1, limit, lambda: _lean_client(limit))
            else:
                proxy = self._proxy
                shards = _Shards(-(-limit // SHARD_SIZE), SHARD_SIZE, lambda: _httpx_client(proxy))
            self._shards[key.id] = shards
        return shards

    def complete(self, request: ChatRequest, key: ApiKey) -> Coroutine[Any, Any, ChatResponse]:
        """The answer (`_exchange`'s coroutine itself: a plain method, so a request in
        flight keeps one coroutine frame fewer alive)."""
        return self._exchange(key, self._build_chat, request, self._protocol.parse)

    def _build_chat(
        self, request: ChatRequest, *, base_url: str, secret: str, headers: Mapping[str, str]
    ) -> WireRequest:
        return self._protocol.build(
            request, base_url=base_url, secret=secret, stream=False, headers=headers
        )

    async def count_tokens(self, request: ChatRequest, key: ApiKey) -> int:
        """The upstream's exact prompt-token count for `request` (its model, system,
        messages and tools), from the protocol's count-tokens endpoint. A protocol
        without one raises a ``bad_request`` `ProviderError`; failures are classified
        as for `complete`."""
        protocol = self._protocol
        if not isinstance(protocol, _CountingProtocol):
            raise ProviderError(
                "bad_request", f"{self.name}: the {protocol.name} protocol cannot count tokens"
            )

        return await self._exchange(key, protocol.build_count, request, protocol.parse_count)

    async def embed(self, request: EmbeddingRequest, key: ApiKey) -> EmbeddingResponse:
        """The vectors of `request`'s inputs from the protocol's embeddings endpoint
        (a protocol without one raises ``bad_request``); failures are classified as for
        `complete`."""
        protocol = self._protocol
        if not isinstance(protocol, _EmbeddingProtocol):
            raise ProviderError(
                "bad_request", f"{self.name}: the {protocol.name} protocol has no embeddings"
            )

        return await self._exchange(key, protocol.build_embed, request, protocol.parse_embed)

    async def _exchange(
        self,
        key: ApiKey,
        build: Callable[..., WireRequest],
        request: R,
        parse: Callable[[int, Mapping[str, str], bytes], T],
    ) -> T:
        """Build (``build(request, base_url=, secret=, headers=)``) and send one request
        and `parse` a 2xx answer (a chat answer gets the protocol's dropped params); any
        other answer becomes its classified `ProviderError`. The protocol runs inside
        `scrubbing`, and every error leaving is scrubbed of the key's and the provider's
        secrets. Sending is inline, not a helper coroutine, and the wire request's
        headers are let go once the httpx request holds them: a request in flight keeps
        its frames and their locals alive. `client.send(stream=True)` then `aread()`
        (what `client.request` does inside) tells a failure before the head from one in
        the body."""
        scrubber = self._scrubber(key)
        try:
            wire = build(request, base_url=self._base_url, secret=key.secret, headers=self._headers)
            method, url, dropped = wire.method, wire.url, wire.dropped
            with self._shards_for(key).lease() as client:
                sent = client.build_request(
                    method,
                    url,
                    headers=wire.headers,
                    content=wire.body,
                    timeout=httpx.Timeout(_remaining()),
                )
                del wire
                try:
                    response = await client.send(sent, stream=True)
                except httpx.HTTPError as exc:
                    raise _transport_error(
                        exc, self.name, before_head=True, scrubber=scrubber
                    ) from None
                try:
                    try:
                        await response.aread()
                    except BaseException:
                        await response.aclose()
                        raise
                except httpx.HTTPError as exc:
                    raise _transport_error(
                        exc, self.name, before_head=False, scrubber=scrubber
                    ) from None
            with scrubbing(scrubber):
                if 200 <= response.status_code < 300:
                    answer = parse(response.status_code, response.headers, response.content)
                    if dropped and isinstance(answer, ChatResponse):
                        answer.dropped_params.extend(dropped)
                    return answer
                raise self._failure(
                    response.status_code, response.headers, response.content, method, url, key
                )
        except ProviderError as exc:
            raise self._scrubbed(exc, scrubber) from None

    async def stream(self, request: ChatRequest, key: ApiKey) -> AsyncIterator[StreamChunk]:
        """The answer's chunks one by one (`stream_batches`, flattened)."""
        batches = self.stream_batches(request, key)
        try:
            async for batch in batches:
                for chunk in batch:
                    yield chunk
        finally:
            await batches.aclose()

    async def stream_batches(
        self, request: ChatRequest, key: ApiKey
    ) -> AsyncGenerator[list[StreamChunk], None]:
        """Yield the answer's chunks, all those one read of the body produced together
        (the key actor relays them as one batch). Ends normally after the upstream's
        end marker or its finish reason (even when the connection breaks after the
        finish reason); anything else raises a (transient) `ProviderError`."""
        scrubber = self._scrubber(key)
        try:
            wire = self._protocol.build(
                request,
                base_url=self._base_url,
                secret=key.secret,
                stream=True,
                headers=self._headers,
            )
            if wire.dropped:  # said before any content (`ChatStream.dropped_params`)
                yield [StreamChunk(provider_fields={"dropped_params": list(wire.dropped)})]
            remaining = _remaining()
            decoder: StreamDecoder | None = None
            head = False
            with self._shards_for(key).lease() as client:
                try:
                    async with client.stream(
                        wire.method,
                        wire.url,
                        headers=wire.headers,
                        content=wire.body,
                        timeout=httpx.Timeout(remaining, read=None),
                    ) as response:
                        head = True
                        if not 200 <= response.status_code < 300:
                            body = await response.aread()
                            with scrubbing(scrubber):
                                error = self._failure(
                                    response.status_code,
                                    response.headers,
                                    body,
                                    wire.method,
                                    wire.url,
                                    key,
                                )
                            raise error
                        feed = SseParser().feed
                        decoder = self._protocol.stream_decoder()
                        decode = decoder.feed
                        read = _body_reader(response)
                        scrub = scrubbing(scrubber)  # (one per stream: entered per read)
                        while data := await read():
                            events = feed(data)
                            if not events:
                                continue
                            broken: ProviderError | None = None
                            with scrub:  # no await or yield inside
                                if len(events) == 1:
                                    batch = decode(events[0])
                                else:
                                    batch = []
                                    try:
                                        for event in events:
                                            batch += decode(event)
                                    except ProviderError as exc:
                                        broken = exc  # after the chunks before it
                            del events  # (not parked with the reader until the next read)
                            if batch:
                                yield batch
                            if broken is not None:
                                raise broken
                            if decoder.done:
                                # Read the body to its end (briefly) so the connection
                                # goes back to the pool for the next request instead of
                                # being dropped.
                                with trio.move_on_after(_DRAIN_GRACE):
                                    while await read():
                                        pass
                                return
                        if not decoder.finished:
                            raise ProviderError(
                                "transient", f"{self.name}: stream ended before its finish reason"
                            )
                except httpx.HTTPError as exc:
                    if decoder is not None and decoder.finished:
                        return  # the answer is whole; only the end marker or last chunk was lost
                    raise _transport_error(
                        exc, self.name, before_head=not head, scrubber=scrubber
                    ) from None
        except ProviderError as exc:
            raise self._scrubbed(exc, scrubber) from None

    def _failure(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        method: str,
        url: str,
        key: ApiKey,
    ) -> ProviderError:
        """A non-2xx answer, classified by the protocol; a route 404 (key-wide: the
        answer names no missing model) is reworded to name the URL, and logged once."""
        error = self._protocol.classify(status, headers, body, time.time())
        if status == 404 and error.key_wide:
            error = self._route_404(error, method, url, key.secret)
        return error

    def _route_404(self, error: ProviderError, method: str, url: str, secret: str) -> ProviderError:
        scrubber = scrubber_for((secret, *self.known_secrets), "[redacted]")
        url = redact(mask_url(url), scrubber)
        base_url = redact(self._shown_url, scrubber)
        if url not in self._route_404_logged:
            self._route_404_logged.add(url)
            _log.error(
                "provider %s: %s %s answered HTTP 404 with no missing model named: "
                "not an API route, base_url %r of provider %s is probably wrong; "
                "every key of this provider fails until it is fixed",
                self.name,
                method,
                url,
                base_url,
                self.name,
            )
        message = scrubber.scrub(
            f"{self.name}: {method} {url} answered HTTP 404 (not an API route, no missing "
            f"model named): base_url {base_url!r} is probably wrong; {error.message}"
        )
        return ProviderError(
            "transient",
            message[:800],
            retry_after=error.retry_after,
            status=404,
            key_wide=True,
        )

    def configure_keys(self, config: ProviderConfig) -> None:
        """A reload changed the provider's keys (its own settings are the same): the
        connection limits of new keys."""
        for k in config.keys:
            self._max_concurrency[k.id] = k.max_concurrency or config.max_concurrency

    async def close_key(self, key_id: str) -> None:
        """Close the connections of a key a reload removed (once its last call ended)."""
        shards = self._shards.pop(key_id, None)
        self._max_concurrency.pop(key_id, None)
        if shards is not None:
            await shards.aclose()

    async def aclose(self) -> None:
        shards, self._shards = self._shards, {}
        for group in shards.values():
            await group.aclose()


def _body_reader(response: httpx.Response) -> Callable[[], Awaitable[bytes]]:
    """The response body's next piece, b"" at its end: straight from the router's
    transport (a coroutine per read, no generator layers), else through httpx."""
    read: Callable[[], Awaitable[bytes]] | None = response.extensions.get("router.read_body")
    if read is not None:
        return read
    pieces = response.aiter_raw()

    async def next_piece() -> bytes:
        try:
            return await pieces.__anext__()  # (never b"": httpx yields no empty pieces)
        except StopAsyncIteration:
            return b""

    return next_piece


def _environment_proxies() -> bool:
    """Whether httpx would send through a proxy taken from the environment."""
    proxies = urllib.request.getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


def _lean_client(connections: int) -> httpx.AsyncClient:
    transport = RouterTransport(max_connections=connections, ssl_context=_ssl_context())
    return LeanClient(transport=transport, timeout=_DEFAULT_TIMEOUT, follow_redirects=False)


def _httpx_client(proxy: str | None) -> httpx.AsyncClient:
    size = SHARD_SIZE + _POOL_HEADROOM
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
        timeout=_DEFAULT_TIMEOUT,
        follow_redirects=False,
        verify=_ssl_context(),
        proxy=proxy,
    )


class _Shards:
    """A key's httpx clients (made by `make` as load needs them, up to `limit`, each
    carrying up to `size` requests before another is made) and how many requests each
    is carrying. On the router's transport a key has one client (`limit` 1), and
    leasing it costs no allocation (a reusable `nullcontext`)."""

    __slots__ = ("busy", "clients", "limit", "make", "single", "size")

    def __init__(self, limit: int, size: int, make: Callable[[], httpx.AsyncClient]) -> None:
        self.limit = limit
        self.size = size
        self.make = make
        self.clients: list[httpx.AsyncClient] = []
        self.busy: list[int] = []
        self.single: contextlib.AbstractContextManager[httpx.AsyncClient] | None = None

    def lease(self) -> contextlib.AbstractContextManager[httpx.AsyncClient]:
        """The least busy client, held for one request; a new one when all are full."""
        if self.single is not None:
            return self.single
        if self.limit == 1:
            self.clients.append(self.make())
            self.single = contextlib.nullcontext(self.clients[0])
            return self.single
        return self._least_busy()

    @contextlib.contextmanager
    def _least_busy(self) -> Iterator[httpx.AsyncClient]:
        busy = self.busy
        index = busy.index(min(busy)) if busy else -1
        if index < 0 or (busy[index] >= self.size and len(busy) < self.limit):
            self.clients.append(self.make())
            busy.append(0)
            index = len(busy) - 1
        busy[index] += 1
        try:
            yield self.clients[index]
        finally:
            busy[index] -= 1

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
