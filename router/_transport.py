"""A trio-native HTTP/1.1 transport for httpx, and the lean client the providers use.

`RouterTransport` is an `httpx.AsyncBaseTransport`: callers keep `httpx.AsyncClient`
(requests, responses, streaming, exceptions), and only the work below the client
changes. Why: at 64 concurrent requests against a local nginx, httpcore and httpx cost
~700 µs of CPU per request and trio another ~490 µs on their behalf (a fresh cancel
scope around every read and write, a `select.poll` syscall on every connection reuse, a
pool lock); on this transport a routed request measured 141 µs (642 µs before it,
`benchmarks/throughput.py --rows router --levels 64`).

How a request travels, and why this way:

- Connections live in one `_Origin` per (scheme, host, port): a list of idle
  connections (last in, first out, so the warm ones are reused and the rest go quiet)
  and a count of open ones, capped at `max_connections`; a request beyond the cap
  parks until one is released. Taking and giving back a connection is a list pop and
  append, whatever the pool size (httpcore's pool does work per connection).
- One cancel scope per request covers the pool wait, the connect (TCP, then TLS), the
  write and the wait for the response head (a request with no timeout at all, as the
  router's are when no trio deadline bounds them, gets none); its deadline moves from phase to phase
  (httpx's ``pool``, ``connect``, ``write`` and ``read`` timeouts), and which phase
  it fired in names the `httpx.TimeoutException` raised. The body bytes that came with
  the head (a whole small answer usually does) are handed out with no further I/O;
  each later body read gets a scope of its own only when ``read`` is finite (``read=None``,
  as streams use, means none at all).
- `httptools` (llhttp) parses the response; the request head is written by hand, in one
  `send_all` with the body when the body is given as bytes.
- Keep-alive: a connection goes back to the pool only when the response was read to its
  end, neither side said ``Connection: close`` (llhttp's `should_keep_alive`), the
  answer was HTTP/1.1 (an HTTP/1.0 server is not trusted with keep-alive), and no byte
  followed the message. Everything else (errors, truncated bodies, a response closed
  early, the caller's cancellation at any point) closes the socket at once: a
  connection is never returned dirty.
- A peer that closed an idle connection is found without a syscall per request: a
  connection reused within `IDLE_CHECK_AFTER` seconds of its last use is trusted
  (servers keep idle connections for seconds to minutes, so under load no request pays
  for a check), and one idle longer gets one zero-timeout poll of its socket: any
  readability there (EOF, a reset, stray bytes) discards it. What gets past this (a
  server closing within the second, or a close racing the reuse) meets the retry rule
  below.
- Retry on a stale connection, once, on a freshly opened one, only when the failure
  proves the server never acted on the request: on a reused connection, the write
  itself failed (the peer was gone before it had the whole request), or the method is
  idempotent (GET, HEAD, PUT, DELETE, OPTIONS, TRACE) and the connection ended or was
  reset before any response byte. A POST whose write went through and then saw the
  connection end is not retried here: the server may have read it (LLM calls cost
  money), and the caller's classification decides (the router counts it as a transient
  failure before the head).
- TLS is `trio.SSLStream` with SNI and the ssl context given (certificate verification
  as that context says; ALPN is set to ``http/1.1`` on it), HTTP/1.1 only.
- Errors are httpx's own types, as httpx's transport raises them: `httpx.ConnectError`
  / `ConnectTimeout` (DNS, refused, TLS), `WriteError` / `WriteTimeout`, `ReadError` /
  `ReadTimeout`, `RemoteProtocolError` (closed before or during the response, a malformed
  answer), `PoolTimeout`, `LocalProtocolError` (a header value with a line break).

`LeanClient` is an `httpx.AsyncClient` that skips what a browser needs and an API client
does not: the cookie jar is not consulted for responses without ``Set-Cookie``, the
merged URL of a URL string seen before is reused instead of parsed again, and `send`
goes straight to the transport when httpx's auth, redirect and event-hook layers would
have nothing to do (each is a coroutine frame every request in flight keeps alive).

What this module must never do: return a connection to the pool that has unread bytes
or an unfinished message, retry a request the server may have acted on, or put a
request header (credentials travel there) into an error message.
"""

from __future__ import annotations

import logging
import math
import os
import select
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final

import httptools
import httpx
import trio

from ._hub import HUB, Watch, current_hub
from ._provider import STREAM_CUT

__all__ = ["IDLE_CHECK_AFTER", "LeanClient", "RouterTransport"]

IDLE_CHECK_AFTER: Final = 1.0
"""Seconds a connection may sit idle and still be reused without a liveness poll."""
_READ_SIZE: Final = 65536
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
_DEFAULT_PORT: Final = {b"http": 80, b"https": 443}
_POOL, _CONNECT, _WRITE, _READ = range(4)
_TIMEOUT_ERRORS: Final = (
    httpx.PoolTimeout,
    httpx.ConnectTimeout,
    httpx.WriteTimeout,
    httpx.ReadTimeout,
)
_PHASE_NAMES: Final = ("waiting for a connection", "connecting", "writing", "reading")
_TIMEOUT_KEYS: Final = ("pool", "connect", "write", "read")
_OPENED: Final = httpx._client.ClientState.OPENED
_httpx_log: Final = logging.getLogger("httpx")


class _Connection:
    """One socket (and its TLS layer) and the exchange it is carrying: the httptools
    callbacks land here and the body stream reads through it. One parser per
    connection (llhttp starts over after each message), and the per-response state is
    reset by `start`, so a request allocates no parser and no exchange object."""

    __slots__ = (
        "body",
        "complete",
        "dirty",
        "fd",
        "generation",
        "headers",
        "headers_done",
        "idle_since",
        "keep_alive",
        "origin",
        "parser",
        "plain",
        "read_timeout",
        "reason",
        "received",
        "request",
        "skip_body",
        "socket",
        "stream",
        "watch",
    )

    def __init__(
        self, stream: trio.abc.Stream, socket: trio.socket.SocketType, origin: _Origin
    ) -> None:
        self.stream = stream
        self.socket = socket
        self.fd = socket.fileno()
        """The socket's descriptor, -1 once `close` ran (never a stale number)."""
        self.plain = type(stream) is trio.SocketStream
        """Plain TCP, read from the socket's descriptor (else TLS, through the stream)."""
        self.origin = origin
        self.idle_since = 0.0
        self.generation = 0
        self.parser = httptools.HttpResponseParser(self)
        self.request: httpx.Request | None = None
        self.keep_alive = False
        self.read_timeout: float | None = None
        self.skip_body = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.body: list[bytes] = []
        self.received = 0
        self.headers_done = self.complete = self.dirty = False
        self.watch: Watch | None = None
        """Its place in the run's `ReadHub` once a body read had to wait (plain TCP)."""

    def start(self, request: httpx.Request, keep_alive: bool, read_timeout: float | None) -> int:
        """Take `request`'s exchange; returns its generation (a stale body stream holds
        an older one and then touches nothing)."""
        self.generation += 1
        self.request = request
        self.keep_alive = keep_alive
        self.read_timeout = read_timeout
        self.skip_body = request.method == "HEAD"
        self.headers = []
        self.reason = b""
        self.body = []
        self.received = 0
        self.headers_done = self.complete = self.dirty = False
        return self.generation

    def looks_closed(self) -> bool:
        """An idle HTTP/1.1 connection has nothing to read: readable means EOF, a reset
        or stray bytes, and in all three it cannot carry another request."""
        try:
            poller = select.poll()
            poller.register(self.socket.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        """Close at once, without a TLS close_notify (a discarded connection owes the
        peer nothing, and this must work inside a cancelled scope)."""
        self.fd = -1
        watch = self.watch
        if watch is not None:
            self.watch = None
            watch.close()
        self.socket.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:  # bytes after the message: never reuse this connection
            self.dirty = True

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:  # later ones are chunked trailers: dropped, as httpx does
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue, 103): wait for the real one
            self.headers = []
            self.reason = b""
            return
        self.headers_done = True
        if self.skip_body or status in (204, 304):
            self.complete = True

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body.append(body)

    def on_message_complete(self) -> None:
        # (after an interim answer, llhttp goes on to the real one by itself)
        if self.headers_done and not self.complete:
            self.complete = True
            parser = self.parser
            # an HTTP/1.0 server is never trusted with a second request, keep-alive or not
            self.keep_alive = (
                self.keep_alive
                and parser.should_keep_alive()
                and parser.get_http_version() == "1.1"
            )

    def feed(self, data: bytes | bytearray) -> None:
        self.received += len(data)
        if self.complete:
            self.dirty = True
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise httpx.RemoteProtocolError(
                "the server switched protocols (upgrade), which this transport does not speak",
                request=self.request,
            ) from None
        except httptools.HttpParserError as exc:
            if self.complete:  # garbage after a whole message: the message stands
                self.dirty = True
                return
            raise httpx.RemoteProtocolError(
                f"malformed HTTP response: {exc}", request=self.request
            ) from None

    def eof(self) -> None:
        """The peer closed: the message ends here if its length is "until close"."""
        if self.complete:
            return
        self.keep_alive = False
        if not self.headers_done:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response."
                if self.received == 0
                else "Server disconnected in the middle of the response head.",
                request=self.request,
            )
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body",
                    request=self.request,
                )
        self.complete = True

    async def receive(self) -> None:
        """Read once and parse what came. A plain TCP connection is read straight from
        its descriptor once trio says it is readable (`read_ready`): no first read is
        tried that fails with EAGAIN (a syscall and an exception per streamed event, as
        in `trio.SocketStream.receive_some`), and a task parked here holds four
        coroutine frames fewer (each kept alive by every request in flight)."""
        try:
            if self.plain:
                while True:
                    fd = self.fd
                    if fd < 0:
                        raise trio.ClosedResourceError("the connection was closed")
                    await trio.lowlevel.wait_readable(fd)
                    if self.read_ready():
                        return
            data = await self.stream.receive_some(_READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(_describe(exc), request=self.request) from None
        if data:
            self.feed(data)
        else:
            self.eof()

    def read_ready(self) -> bool:
        """Read the readable descriptor of a plain TCP connection and parse what came;
        False when there was nothing after all (a spurious wakeup)."""
        fd = self.fd  # after every wait: -1 once closed
        if fd < 0:
            raise httpx.ReadError("the connection was closed", request=self.request)
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise httpx.ReadError(_describe(exc), request=self.request) from None
        if data:
            self.feed(data)
        else:
            self.eof()
        return True

    def finish(self, generation: int, *, broken: bool = False) -> None:
        """End exchange `generation` (if it is still the current one): back to the pool
        when it ended cleanly, else closed."""
        if generation != self.generation or self.request is None:
            return
        self.request = None
        self.body = []
        self.headers = []  # the response has its own copy; an idle connection keeps none
        reusable = self.complete and self.keep_alive and not self.dirty and not broken
        if reusable and self.skip_body:
            # llhttp still expects the body a HEAD answer announced: start it over
            self.parser = httptools.HttpResponseParser(self)
        self.origin.release(self, reusable=reusable)


class _Origin:
    """The connections of one (scheme, host, port): the idle ones and how many exist."""

    __slots__ = ("closed", "idle", "lot", "open")

    def __init__(self) -> None:
        self.idle: list[_Connection] = []
        self.open = 0
        self.lot = trio.lowlevel.ParkingLot()
        self.closed = False
        """The transport was closed: connections coming back are closed too."""

    def release(self, connection: _Connection, *, reusable: bool) -> None:
        if reusable and not self.closed:
            connection.idle_since = trio.current_time()
            self.idle.append(connection)
        else:
            connection.close()
            self.open -= 1
        if self.lot:
            self.lot.unpark()

    def free_slot(self) -> None:
        """A connection that was never made gives its slot back."""
        self.open -= 1
        if self.lot:
            self.lot.unpark()


class _Body(httpx.AsyncByteStream):
    """The response body as it arrives; closing it settles the connection."""

    __slots__ = ("_connection", "_generation")

    def __init__(self, connection: _Connection, generation: int) -> None:
        self._connection = connection
        self._generation = generation

    async def read(self) -> bytes:
        """The next piece of the body: what one socket read brought (a chunked body
        parses into one piece per HTTP chunk, joined here), so a stream's parser sees
        a whole burst and its events travel together; b"" at the end. A coroutine, not
        an async generator: a streamed event passes no generator layers on its way
        (the response's ``extensions["router.read_body"]``)."""
        connection, generation = self._connection, self._generation
        try:
            while connection.generation == generation and connection.request is not None:
                body = connection.body
                if body:
                    data = body[0] if len(body) == 1 else b"".join(body)
                    body.clear()  # (the same list again: none made per read)
                    return data
                if connection.complete:
                    break
                timeout = connection.read_timeout
                if timeout is not None:
                    with trio.move_on_after(timeout) as scope:
                        await connection.receive()
                    if scope.cancelled_caught:
                        raise httpx.ReadTimeout(
                            f"no body data within {timeout} s", request=connection.request
                        )
                elif HUB and connection.plain and connection.fd >= 0:
                    # Through the run's read hub (`router._hub`): one epoll wakeup for
                    # all streams, no syscall to arm the socket per read, and nothing
                    # allocated to park (inlined: this runs once per streamed token).
                    watch = connection.watch
                    if watch is None or watch.hub.closed:
                        watch = connection.watch = current_hub().watch(connection.fd)
                    try:
                        if not watch.ready:  # park (`Watch.wait`, without its frame)
                            if watch.reader is not None:
                                raise trio.BusyResourceError("another task is reading this body")
                            watch.reader = trio.lowlevel.current_task()
                            await trio.lowlevel.wait_task_rescheduled(watch.abort)
                        data = os.read(connection.fd, _READ_SIZE)
                    except BlockingIOError:
                        watch.ready = False  # drained: the next edge says when to read
                        continue
                    except (trio.ClosedResourceError, OSError) as exc:
                        raise httpx.ReadError(_describe(exc), request=connection.request) from None
                    if len(data) < _READ_SIZE:
                        watch.ready = False  # a short read drained it (more raises an edge)
                    if data:
                        connection.feed(data)
                    else:
                        connection.eof()
                else:
                    await connection.receive()
        except BaseException:
            connection.finish(generation, broken=True)
            raise
        connection.finish(generation)
        return b""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = self.read
        while data := await read():
            yield data

    async def aclose(self) -> None:
        self._connection.finish(self._generation)

    def cut(self) -> None:
        """End a pending read of this body from another task (a stream's idle timeout):
        the reader gets a `ReadError` and the connection is closed. A reader that is
        not parked on the socket right now is not affected."""
        connection = self._connection
        if (
            connection.generation == self._generation
            and connection.request is not None
            and connection.fd >= 0
        ):
            watch = connection.watch
            if watch is None or not watch.cut("the read was cut (stream idle)"):
                trio.lowlevel.notify_closing(connection.fd)  # (a read parked in trio)


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)) and cause:
        exc = cause
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Unbounded:
    """The request's cancel scope when none of its timeouts is set: it would never fire,
    so none is opened (a scope and its status cost about 0.6 KB per request in
    flight, and entering one costs CPU); deadlines set on it are all infinite."""

    __slots__ = ()
    cancelled_caught: Final = False

    def __enter__(self) -> _Unbounded:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    @property
    def deadline(self) -> float:
        return math.inf

    @deadline.setter
    def deadline(self, value: float) -> None:
        assert math.isinf(value), "a request with no timeouts has no deadline"


_UNBOUNDED: Final = _Unbounded()


class _StaleConnection(Exception):
    """A reused connection failed in a way that proves the server never acted on the
    request; the request is sent again once on a new connection."""

    def __init__(self, error: httpx.HTTPError) -> None:
        super().__init__(str(error))
        self.error = error


class RouterTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over trio sockets, with at most `max_connections` connections per
    origin. `ssl_context` verifies servers (default: `httpx.create_ssl_context()`,
    certifi's CA bundle); ALPN on it is set to ``http/1.1``. `opened` counts the
    connections made so far (benchmarks and tests count reuse with it)."""

    def __init__(
        self, *, max_connections: int = 64, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self.max_connections = max_connections
        self._ssl_context = ssl_context
        self._origins: dict[tuple[bytes, bytes, int], _Origin] = {}
        self._closed = False
        self.opened = 0

    def __repr__(self) -> str:
        return f"RouterTransport(max_connections={self.max_connections}, opened={self.opened})"

    def _context(self) -> ssl.SSLContext:
        context = self._ssl_context
        if context is None:
            context = self._ssl_context = httpx.create_ssl_context()
        context.set_alpn_protocols(["http/1.1"])
        return context

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        scheme = url.raw_scheme
        port = url.port or _DEFAULT_PORT.get(scheme, 0)
        if not port or not url.raw_host:
            raise httpx.UnsupportedProtocol(
                f"cannot send to {scheme.decode(errors='replace')!r} URLs over HTTP/1.1",
                request=request,
            )
        key = (scheme, url.raw_host, port)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin()
        timeouts: dict[str, float | None] = request.extensions.get("timeout") or {}
        try:
            body: bytes | None = request.content
        except httpx.RequestNotRead:
            body = None
        bounded = any(limit is not None for limit in timeouts.values())
        # One frame for the whole exchange, retry included (a parked request keeps every
        # frame of its chain alive), and the head is let go once written.
        for fresh in (False, True):
            head, keep_alive, chunked = _head(request)
            phase = _POOL
            connection: _Connection | None = None
            generation = 0
            try:
                with trio.CancelScope() if bounded else _UNBOUNDED as scope:
                    try:
                        connection = await self._acquire(origin, scope, timeouts.get("pool"), fresh)
                        reused = connection is not None
                        if connection is None:
                            phase = _CONNECT
                            scope.deadline = _deadline(timeouts.get("connect"))
                            connection = await self._connect(request, origin)
                        phase = _WRITE
                        scope.deadline = _deadline(timeouts.get("write"))
                        generation = connection.start(request, keep_alive, timeouts.get("read"))
                        try:
                            await self._write(connection.stream, head, body, request, chunked)
                        except httpx.WriteError as exc:
                            if reused and body is not None:
                                raise _StaleConnection(exc) from None
                            raise
                        head = b""
                        phase = _READ
                        scope.deadline = _deadline(timeouts.get("read"))
                        try:
                            while not connection.headers_done:
                                if not connection.plain:
                                    await connection.receive()
                                    continue
                                try:  # (`receive`, without its frame)
                                    await trio.lowlevel.wait_readable(connection.fd)
                                except (trio.ClosedResourceError, OSError) as exc:
                                    raise httpx.ReadError(_describe(exc), request=request) from None
                                connection.read_ready()
                        except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
                            if (
                                reused
                                and connection.received == 0
                                and body is not None
                                and request.method in _IDEMPOTENT
                            ):
                                raise _StaleConnection(exc) from None
                            raise
                    except BaseException:
                        # a cancelled scope (a timeout here, or the caller's) passes here too
                        if generation:
                            assert connection is not None
                            connection.finish(generation, broken=True)
                        elif connection is not None:
                            origin.release(connection, reusable=False)
                        elif phase == _CONNECT:
                            origin.free_slot()
                        raise
            except _StaleConnection as stale:
                if fresh:
                    raise stale.error from None
                continue
            if scope.cancelled_caught:
                limit = timeouts.get(_TIMEOUT_KEYS[phase])
                raise _TIMEOUT_ERRORS[phase](
                    f"timed out {_PHASE_NAMES[phase]} (after {limit} s)", request=request
                )
            assert connection is not None
            version = connection.parser.get_http_version()
            stream = _Body(connection, generation)
            cut = STREAM_CUT.get()
            if cut is not None:
                cut.cut = stream.cut
            return httpx.Response(
                connection.parser.get_status_code(),
                headers=connection.headers,
                stream=stream,
                extensions={
                    "router.read_body": stream.read,
                    "http_version": b"HTTP/1.1"
                    if version == "1.1"
                    else b"HTTP/" + version.encode(),
                    "reason_phrase": connection.reason,
                },
            )
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _acquire(
        self,
        origin: _Origin,
        scope: trio.CancelScope | _Unbounded,
        pool_timeout: float | None,
        fresh: bool,
    ) -> _Connection | None:
        """An idle connection that looks alive, or None with a slot taken for a new one
        (always the latter when `fresh`)."""
        waited = False
        while True:
            idle = origin.idle
            while idle and not fresh:
                connection = idle.pop()
                if (
                    trio.current_time() - connection.idle_since > IDLE_CHECK_AFTER
                    and connection.looks_closed()
                ):
                    origin.release(connection, reusable=False)
                    continue
                return connection
            if origin.open < self.max_connections:
                origin.open += 1
                return None
            if not waited:
                waited = True
                scope.deadline = _deadline(pool_timeout)
            await origin.lot.park()

    async def _connect(self, request: httpx.Request, origin: _Origin) -> _Connection:
        url = request.url
        host = url.host
        port = url.port or _DEFAULT_PORT[url.raw_scheme]
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise httpx.ConnectError(_describe(exc), request=request) from None
        self.opened += 1
        if url.raw_scheme != b"https":
            return _Connection(tcp, tcp.socket, origin)
        tls = trio.SSLStream(tcp, self._context(), server_hostname=host, https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException as exc:
            tcp.socket.close()
            if isinstance(exc, (trio.BrokenResourceError, OSError)):
                raise httpx.ConnectError(
                    f"TLS handshake with {host} failed: {_describe(exc)}", request=request
                ) from None
            raise
        return _Connection(tls, tcp.socket, origin)

    async def _write(
        self,
        stream: trio.abc.Stream,
        head: bytes,
        body: bytes | None,
        request: httpx.Request,
        chunked: bool,
    ) -> None:
        try:
            if body is not None:
                if chunked:
                    body = _chunk(body) + b"0\r\n\r\n" if body else b"0\r\n\r\n"
                await stream.send_all(head + body if len(body) < _READ_SIZE else head)
                if len(body) >= _READ_SIZE:
                    await stream.send_all(body)
                return
            await stream.send_all(head)
            async for piece in request.stream:  # type: ignore[union-attr]
                if piece:
                    await stream.send_all(_chunk(piece) if chunked else piece)
            if chunked:
                await stream.send_all(b"0\r\n\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.WriteError(_describe(exc), request=request) from None

    async def aclose(self) -> None:
        """Close every idle connection; connections still carrying a response close
        when their response is closed."""
        self._closed = True
        origins, self._origins = self._origins, {}
        for origin in origins.values():
            origin.closed = True
            idle, origin.idle = origin.idle, []
            for connection in idle:
                connection.close()
                origin.open -= 1


def _deadline(timeout: float | None) -> float:
    return math.inf if timeout is None else trio.current_time() + timeout


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _head(request: httpx.Request) -> tuple[bytes, bool, bool]:
    """The request line and headers, whether the request lets the connection live on
    (no ``Connection: close``), and whether its body is chunked."""
    raw: Iterable[tuple[bytes, bytes]] = request.headers.raw
    parts = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    keep_alive = True
    chunked = False
    count = 0
    for name, value in raw:
        parts += (name, b": ", value, b"\r\n")
        count += 1
        if len(name) == 10 and name.lower() == b"connection":
            keep_alive = b"close" not in value.lower()
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    parts.append(b"\r\n")
    head = b"".join(parts)
    # a line break inside a name, value or path would split one header into two
    if head.count(b"\n") != count + 2 or head.count(b"\r") != count + 2:
        raise httpx.LocalProtocolError(
            "a request header or the path contains a line break", request=request
        )
    return head, keep_alive, chunked


class _LeanCookies(httpx.Cookies):
    """A cookie jar that does no work for a response without ``Set-Cookie``."""

    def extract_cookies(self, response: httpx.Response) -> None:
        for name, _ in response.headers.raw:
            if len(name) == 10 and name.lower() == b"set-cookie":
                super().extract_cookies(response)
                return


class LeanClient(httpx.AsyncClient):
    """An `httpx.AsyncClient` for API calls: the same API, less per-request work (the
    cookie jar is skipped for responses that set no cookie; merged URLs of URL strings
    seen before are reused, up to `_URL_CACHE` of them)."""

    _URL_CACHE: Final = 256

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cookies = _LeanCookies(self._cookies)
        self._urls: dict[str, httpx.URL] = {}

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        """`httpx.AsyncClient.send`, in one coroutine frame when nothing asks for
        httpx's auth, redirect or event-hook layers (each a frame kept alive while the
        request is in flight, about 0.4 KB apiece): no client or per-call auth, no
        credentials in the URL, redirects not followed, no hooks, no mounts. The
        response is the one httpx would give (``request``, ``history``,
        ``next_request``, cookies, the ``HTTP Request`` log line), except that
        ``elapsed`` is not measured."""
        if (
            auth is not httpx.USE_CLIENT_DEFAULT
            or follow_redirects is not httpx.USE_CLIENT_DEFAULT
            or self._auth is not None
            or self.follow_redirects
            or self._mounts
            or self._event_hooks["request"]
            or self._event_hooks["response"]
            or request.url.userinfo
        ):
            return await super().send(
                request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        self._state = _OPENED
        self._set_timeout(request)
        response = await self._transport.handle_async_request(request)
        response.request = request
        self._cookies.extract_cookies(response)
        response.default_encoding = self._default_encoding
        if _httpx_log.isEnabledFor(logging.INFO):
            _httpx_log.info(
                'HTTP Request: %s %s "%s %d %s"',
                request.method,
                request.url,
                response.http_version,
                response.status_code,
                response.reason_phrase,
            )
        if response.has_redirect_location:
            response.next_request = self._build_redirect_request(request, response)
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response

    def _merge_url(self, url: httpx.URL | str) -> httpx.URL:
        if not isinstance(url, str):
            return super()._merge_url(url)
        merged = self._urls.get(url)
        if merged is None:
            merged = super()._merge_url(url)
            if len(self._urls) >= self._URL_CACHE:
                self._urls.clear()
            self._urls[url] = merged
        return merged
