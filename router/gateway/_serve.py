"""Running the gateway: one `Router` per process, opened around Hypercorn's trio worker
in the same trio run, and the `serve` / `check` commands of the CLI.

``serve --workers N`` (N > 1): the parent process binds the listening socket once and
starts N worker processes that inherit it (each serves it with its own Router, so
accepted connections spread over the workers); the parent forwards SIGTERM/SIGINT to
them, restarts a worker that dies, and exits when all have stopped. A worker whose
parent disappears drains and stops by itself. Workers share breaker, cooldown, health
and budget state only through `[router.shared]` (Redis); without it each has its own.

Reload: SIGHUP (and the admin endpoint POST /v1/router/reload) reads the config file
`serve` was started with again and applies it (`GatewayApp.reload`, `Router.reload`):
requests in flight finish, nothing is refused meanwhile, and a file that does not load
or validate is one error line with the running config kept. Under ``--workers`` the
supervisor forwards SIGHUP to every worker, and each reloads the file itself; the admin
endpoint reaches one worker, which reloads and then signals the supervisor so that the
others do too (it answers with its own result; the others log theirs). SIGHUP is ignored
until the gateway runs, so an early one never kills a starting process. The listen
address cannot change without a restart.

Connections: the accept loop is ours (`_serve_http`), each accepted connection is
served by Hypercorn's own connection handler (`TCPServer`, HTTP/1.1 and h2c). Hypercorn
has no connection limit, so the loop keeps `gateway.max_connections`: past it a new
connection gets a 503 (OpenAI error shape) and is closed. Its `read_timeout` is not
used: it bounds every read on a connection, also while a long answer is being
computed, so it would cut legitimate requests; the app bounds the body instead
(`gateway.body_timeout`, 408). An unfinished request head is bounded by Hypercorn's
keep-alive timeout (the connection counts as idle until the head is complete) and by
`h11_max_incomplete_size` (16 KiB, 431). Hypercorn answers a request it cannot parse
with an empty body; `_protocol_errors_as_json` gives those answers the OpenAI shape.
Hypercorn's writes have no deadline; ours (`_Connection._send_within`) give a client that
stops reading `gateway.send_timeout` to take the next 64 KiB, then close its connection
and cancel its requests (an unread stream would otherwise hold its upstream key's slot).

Shutdown (SIGTERM or SIGINT, or `shutdown_trigger` returning): the listening socket
closes at once (new connections are refused, not accepted and dropped), idle
keep-alive connections close, chat requests arriving on open connections get 503, and
in-flight requests get `gateway.shutdown_grace` seconds to finish; one still running
then is answered 503 (a stream under way ends with an error event). Then the router
closes and `serve` returns. With ``--workers`` the parent closes its copy of the
listening socket as soon as it is told to stop, before it signals the workers.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import h11
import msgspec
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from .._chain import ModelChain
from .._config import (
    ProviderConfig,
    RouterConfig,
    TracingConfig,
    resolve_headers,
    resolve_secret,
)
from .._errors import ConfigError, RouterClosedError
from .._gc import tune_gc
from .._provider import Provider
from .._router import Router
from .._secrets import header_is_secret, mask_url
from ._app import CONNECTION, ClientConnection, GatewayApp, _changes

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider
from ._shapes import error_body

__all__ = ["add_check_arguments", "add_serve_arguments", "check_command", "serve", "serve_command"]

log = logging.getLogger("router.gateway")


async def serve(
    config: RouterConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    providers: Mapping[str, Provider] | None = None,
    fd: int | None = None,
    tracer_provider: TracerProvider | None = None,
    config_path: str | os.PathLike[str] | None = None,
    reload_on_sighup: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the gateway until `shutdown_trigger` returns (forever when None).

    `task_status.started` gets the bound URLs (``http://127.0.0.1:PORT``), so
    ``await nursery.start(partial(serve, config, port=0))`` tells the free port chosen.
    `fd`: serve an inherited listening socket instead of binding (a `--workers` worker).
    `tracer_provider`: trace requests into it (see `Router.open`).
    `config_path`: the file `config` came from, which POST /v1/router/reload (and, with
    `reload_on_sighup`, SIGHUP: main thread only) reads again and applies.
    """
    gw = config.gateway
    app = GatewayApp(config)  # resolves the gateway secrets first: a bad one fails fast
    app.config_path = str(config_path) if config_path is not None else None
    if fd is not None:
        parent = os.getppid()
        app.fan_out = partial(os.kill, parent, signal.SIGHUP)
    hc = HypercornConfig()
    bind_host = host if host is not None else gw.host
    bind_port = port if port is not None else gw.port
    if fd is not None:
        hc.bind = [f"fd://{fd}"]
    else:
        hc.bind = [_bind_address(bind_host, bind_port)]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("router.gateway.hypercorn")
    hc.keep_alive_timeout = 30.0
    # Hypercorn's default listen backlog (100) drops connection bursts (1,024 clients
    # at once measured 15 errors and a 56 s p99); the kernel caps it at somaxconn.
    hc.backlog = gw.backlog
    _protocol_errors_as_json()
    _one_write_per_response_head()
    sockets = hc.create_sockets().insecure_sockets
    try:
        for sock in sockets:
            sock.listen(hc.backlog)
        async with Router.open(config, providers, tracer_provider=tracer_provider) as router:
            app.router = router
            try:
                async with trio.open_nursery() as nursery:
                    if reload_on_sighup:
                        await nursery.start(_reload_on_sighup, app)

                    async def http(task_status: trio.TaskStatus[list[str]]) -> None:
                        await _serve_http(app, hc, sockets, shutdown_trigger, task_status)
                        nursery.cancel_scope.cancel()  # the SIGHUP watcher too

                    binds: list[str] = await nursery.start(http)
                    task_status.started(binds)
            finally:
                app.accepting = False
                app.router = None
    finally:
        for sock in sockets:
            sock.close()


async def _reload_on_sighup(
    app: GatewayApp, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Reload the config file on every SIGHUP; a bad file is one log line, and the
    running config stays."""
    with trio.open_signal_receiver(signal.SIGHUP) as hups:
        task_status.started()
        async for _ in hups:
            try:
                result = await app.reload()
            except ConfigError as exc:
                log.error("SIGHUP: config reload refused, the running config is kept: %s", exc)
            except RouterClosedError:
                return
            except Exception:  # a bug in a reload must not take the serving gateway down
                log.exception("SIGHUP: config reload failed, the running config is kept")
            else:
                log.info("SIGHUP: config reloaded from %s: %s", app.config_path, _changes(result))


_FLUSH: Final = 1.0
"""Seconds past `shutdown_grace` for the answers to requests cut short to go out."""
_MAX_REFUSING: Final = 256
"""Over-limit connections answered at once; past it they are closed without a word."""
_ACCEPT_CAPACITY: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def _serve_http(
    app: GatewayApp,
    hc: HypercornConfig,
    sockets: list[socket.socket],
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections (at most `max_connections` open) and serve each with
    Hypercorn's connection handler until `shutdown_trigger` returns; then drain."""
    context = WorkerContext(None)
    asgi = ASGIWrapper(app)  # type: ignore[arg-type]
    state = ConnectionState({})
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    binds = [_url(s) for s in sockets]
    refusing = [0]
    streams: set[trio.SocketStream] = set()

    async def connection(stream: trio.SocketStream) -> None:
        streams.add(stream)
        try:
            await _Connection(app, asgi, hc, context, state, stream).run()
        except Exception:  # one connection's failure never ends the server
            log.exception("connection handler failed")
        finally:
            streams.discard(stream)
            app.connections -= 1
            app.metrics.connections.dec()

    async def close_all_at(deadline: float) -> None:
        # Hypercorn writes to a socket shielded from cancellation: a client that stopped
        # reading would hold the shutdown forever. Closing the socket ends such a write.
        await trio.sleep_until(deadline)
        for stream in list(streams):
            stream.socket.close()

    async def refuse(stream: trio.SocketStream) -> None:
        try:
            await _refuse(stream, app.max_connections)
        finally:
            refusing[0] -= 1

    async def accept(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY:
                        raise
                    log.warning("accept failed (%s): retrying", errno.errorcode[exc.errno])
                    await trio.sleep(0.1)
                    continue
                if app.connections >= app.max_connections:
                    app.metrics.rejected.labels("connections").inc()
                    if refusing[0] < _MAX_REFUSING:
                        refusing[0] += 1
                        nursery.start_soon(refuse, stream)
                    else:
                        await stream.aclose()
                    continue
                app.connections += 1
                app.metrics.connections.inc()
                nursery.start_soon(connection, stream)

    async with trio.open_nursery() as outer:
        outer.start_soon(app.watch_event_loop)
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(accept, listener, connections)
                task_status.started(binds)
                if shutdown_trigger is None:
                    await trio.sleep_forever()
                else:
                    await shutdown_trigger()
                accepting.cancel_scope.cancel()  # each listener closes as its loop ends
            for sock in sockets:
                sock.close()
            app.begin_drain()
            await context.terminated.set()  # idle keep-alive connections close now
            hard_deadline = trio.current_time() + app.shutdown_grace + _FLUSH
            connections.cancel_scope.deadline = hard_deadline
            outer.start_soon(close_all_at, hard_deadline)
        outer.cancel_scope.cancel()


class _Connection(TCPServer):
    """Hypercorn's connection handler, ending as soon as the client has closed.

    Hypercorn's own keeps a closed connection (its socket and its task) until the
    keep-alive timer (`keep_alive_timeout`, 30 s) fires, because that timer's task holds
    the connection's task group open; under connection churn closed connections would
    then fill `max_connections`. Once reading is over (end of stream, or an error),
    the timer is stopped, so the handler ends when its request task does.
    """

    def __init__(self, gateway: GatewayApp, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_task = _KeepAlive(self)  # type: ignore[assignment]
        self.client = ClientConnection()
        self.gateway = gateway

    async def run(self) -> None:
        # The app's tasks for this connection start from this task: they see it.
        CONNECTION.set(self.client)
        await super().run()

    async def _read_data(self) -> None:
        try:
            await super()._read_data()
        finally:
            self.client.close()  # calls still waiting on an answer are cancelled
            self.idle_task.end()  # type: ignore[attr-defined]

    async def protocol_send(self, event: Event) -> None:
        """Write what the socket takes at once, without a trip through the scheduler.

        Hypercorn's own send takes the connection's send lock, opens a shielded cancel
        scope and awaits `send_all`; each of the lock and the socket send yields to the
        scheduler even when the kernel takes the bytes at once, which is nearly always.
        For a stream relayed token by token that path was most of the gateway's CPU per
        event. Here, when no other send is under way on this connection (the lock is
        free), the bytes are written straight to the non-blocking socket; whatever the
        kernel did not take (a slow reader, a large body) goes through `_send_within`,
        which keeps the order since it waits for the lock. TLS connections always take
        that path."""
        if type(event) is RawData and not self.send_lock.locked():
            stream: trio.abc.Stream = self.stream
            if type(stream) is trio.SocketStream:
                data = event.data
                fd = stream.socket.fileno()
                if fd >= 0 and data:
                    try:
                        sent = os.write(fd, data)
                    except BlockingIOError:
                        sent = 0
                    except OSError:  # reset or closed by the peer: as Hypercorn handles it
                        await self.protocol.handle(Closed())
                        return
                    if sent == len(data):
                        return
                    event = RawData(data=data[sent:])
        if type(event) is RawData:
            await self._send_within(event.data)
        else:
            await super().protocol_send(event)

    async def _send_within(self, data: bytes) -> None:
        """Hypercorn's send (behind the send lock, in order, shielded from the app's
        cancellation so a write is never left half done), with a deadline: Hypercorn's
        has none, so a client that stops reading (its socket buffers full) held the
        request's task, and through it the upstream stream and the key's slot, for as
        long as it kept the connection open. When the client takes no 64 KiB of what
        waits for it within `gateway.send_timeout`, the connection is closed and the
        calls on it are cancelled, as when the client leaves."""
        timeout = self.gateway.send_timeout
        async with self.send_lock:
            with trio.CancelScope(shield=True) as scope:
                try:
                    # The deadline is for progress, not for the whole: it starts over
                    # for each 64 KiB the client takes, so a slow but steady reader of a
                    # long answer is never cut.
                    view = memoryview(data)
                    for start in range(0, len(view), _SEND_PIECE):
                        scope.deadline = trio.current_time() + timeout
                        await self.stream.send_all(view[start : start + _SEND_PIECE])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.protocol.handle(Closed())
                    return
        if scope.cancelled_caught:
            self.gateway.metrics.rejected.labels("send_timeout").inc()
            log.warning(
                "a client took no part of its answer for %g s (gateway.send_timeout): "
                "connection closed, its requests cancelled",
                timeout,
            )
            self.client.close()
            await trio.aclose_forcefully(self.stream)
            await self.protocol.handle(Closed())


_SEND_PIECE: Final = 65536
"""Bytes a blocked write gets `gateway.send_timeout` for (`_Connection._send_within`)."""


class _KeepAlive:
    """A connection's keep-alive timer: one task for the connection's whole life.

    Hypercorn's (`TrioSingleTask`) cancels its timer task and starts a new one, through
    `nursery.start`, every time a response ends: about a twentieth of the gateway's CPU
    per request, measured. This one starts its task once, and a response ending only
    moves the deadline of the scope that task waits in. Same behaviour: a connection
    idle for `keep_alive_timeout` after its last response (or at once on shutdown) is
    closed the way Hypercorn closes it; a request in progress stops the timer (and on
    shutdown Hypercorn closes that connection once its response is sent)."""

    __slots__ = ("_connection", "_due", "_ended", "_wait", "_whole")

    def __init__(self, connection: TCPServer) -> None:
        self._connection = connection
        self._due = math.inf
        self._wait: trio.CancelScope | None = None
        self._whole: trio.CancelScope | None = None
        self._ended = False

    async def restart(self, task_group: Any, action: Any) -> None:  # Hypercorn's interface
        self._due = trio.current_time() + self._connection.config.keep_alive_timeout
        if self._wait is not None:
            self._wait.deadline = self._due
        elif self._whole is None and not self._ended:
            await task_group._nursery.start(self._run)

    async def stop(self) -> None:  # a request began: no timer while it runs
        self._due = math.inf
        if self._wait is not None:
            self._wait.deadline = math.inf

    def end(self) -> None:
        """Reading is over: end the timer's task (the connection's task group can end)."""
        self._ended = True
        if self._whole is not None:
            self._whole.cancel()

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        connection = self._connection
        try:
            with trio.CancelScope() as whole:
                self._whole = whole
                task_status.started()
                while True:
                    with trio.CancelScope(deadline=self._due) as wait:
                        self._wait = wait
                        await connection.context.terminated.wait()
                    self._wait = None
                    if not wait.cancelled_caught:  # the server is shutting down
                        if self._due == math.inf:
                            return  # a request runs: Hypercorn closes after its response
                        break
                    if trio.current_time() >= self._due:
                        break  # idle past the keep-alive timeout
                with trio.CancelScope(shield=True):
                    await connection._initiate_server_close()
        finally:
            self._whole = self._wait = None


async def _refuse(stream: trio.SocketStream, limit: int) -> None:
    """Answer a connection over `max_connections` with 503 and close it, reading what
    the client sends meanwhile so the close does not reset it before it reads ours."""
    body = msgspec.json.encode(
        error_body(
            f"the gateway has its limit of {limit} connections open; retry shortly",
            "service_unavailable",
            None,
            "too_many_connections",
        )
    )
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
    )
    try:
        with trio.move_on_after(1.0):
            await stream.send_all(head + body)
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await stream.aclose()


def _url(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_INET6:
        return f"http://[{name[0]}]:{name[1]}"
    return f"http://{name[0]}:{name[1]}"


_PROTOCOL_ERRORS: Final = {
    400: ("malformed HTTP request (request line, header or body framing)", "bad_http_request"),
    431: ("the request line and headers are too large", "headers_too_large"),
    501: ("unsupported Transfer-Encoding (only chunked is supported)", "not_implemented"),
}


def _protocol_errors_as_json() -> None:
    """Give Hypercorn's answers to requests h11 cannot parse (a garbage request line, a
    bad Content-Length, headers over `h11_max_incomplete_size`) the OpenAI error body
    instead of an empty one.

    Hypercorn offers no hook for these: they are sent by `H11Protocol`'s own
    `_send_error_response`, which this replaces (process-wide, once) when it has the
    expected shape. h2 protocol errors end the connection (GOAWAY) with no response.
    """
    current = getattr(H11Protocol, "_send_error_response", None)
    if current is None or getattr(current, "_router_json", False):
        return

    async def send_error_response(self: Any, status_code: int) -> None:
        message, code = _PROTOCOL_ERRORS.get(status_code, ("HTTP protocol error", "bad_http"))
        body = msgspec.json.encode(error_body(message, "invalid_request_error", None, code))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    send_error_response._router_json = True  # type: ignore[attr-defined]
    setattr(H11Protocol, "_send_error_response", send_error_response)  # noqa: B010


def _one_write_per_response_head() -> None:
    """Send a response's head with its first body bytes, in one socket write.

    Hypercorn writes every h11 event on its own: the head, then the body, then the
    end of the message (nothing at all for a Content-Length body), each behind the
    connection's send lock, a shielded cancel scope and a `send_all`. A plain JSON
    answer thus cost three writes; measured at 64 concurrent requests these writes
    were a fifth of the gateway's CPU. This replacement of `H11Protocol._send_h11_event`
    (process-wide, once, only when it has the expected shape) holds the final response
    head until the next event of the same response, which Hypercorn always sends right
    after it (the body, or the end of the message), and skips empty writes. A stream
    still gets every chunk written as it comes: only the head waits, for the first one.
    """
    current = getattr(H11Protocol, "_send_h11_event", None)
    if current is None or getattr(current, "_router_coalesced", False):
        return

    async def send_h11_event(self: Any, event: Any) -> None:
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        held: bytes | None = getattr(self, "_router_head", None)
        if type(event) is h11.Response:
            self._router_head = data
            return
        if held is not None:
            self._router_head = None
            data = held + (data or b"")
        if data:
            await self.send(RawData(data=data))

    send_h11_event._router_coalesced = True  # type: ignore[attr-defined]
    setattr(H11Protocol, "_send_h11_event", send_h11_event)  # noqa: B010


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------- CLI


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="router config (TOML or JSON)")
    parser.add_argument("--host", default=None, help="bind address (default: [gateway] host)")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="bind port, 0 for any free one (default: [gateway] port)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes serving one port (share state with [router.shared])",
    )
    parser.add_argument(
        "--access-log",
        choices=["json", "text", "off"],
        default=None,
        help="one line per request on stderr (default: [gateway] access_log, json)",
    )
    parser.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="router config (TOML or JSON)")


async def _serve_until_signal(
    config: RouterConfig,
    host: str | None,
    port: int | None,
    fd: int | None = None,
    config_path: str | None = None,
) -> None:
    parent = os.getppid()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def on_signal() -> None:
            async with trio.open_nursery() as watch:
                if fd is not None:
                    watch.start_soon(_until_orphaned, parent, watch.cancel_scope)
                async for signum in signals:
                    log.info("received %s: draining", signal.Signals(signum).name)
                    break
                watch.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(
                    serve,
                    config,
                    host=host,
                    port=port,
                    shutdown_trigger=on_signal,
                    fd=fd,
                    config_path=config_path,
                    reload_on_sighup=True,
                )
            )
            if fd is None:
                for url in binds:
                    print(f"llm-router gateway listening on {url}", flush=True)
            else:
                log.info("worker %d serving", os.getpid())
    log.info("gateway stopped")


async def _until_orphaned(parent: int, scope: trio.CancelScope) -> None:
    """A worker: return (draining it) once the supervising parent is gone."""
    while True:
        if os.getppid() != parent:
            break
        await trio.sleep(0.5)
    log.warning("worker %d: supervisor gone: draining", os.getpid())
    scope.cancel()


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


async def _supervise(args: argparse.Namespace, config: RouterConfig, workers: int) -> None:
    """The parent of `serve --workers N`: bind once, run N workers on the socket."""
    gw = config.gateway
    host = args.host if args.host is not None else gw.host
    port = args.port if args.port is not None else gw.port
    sock = _listen(host, port, gw.backlog)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"llm-router gateway ({workers} workers) listening on http://{shown}:{bound}", flush=True)
    command = [
        sys.executable,
        "-m",
        "router",
        "serve",
        "--config",
        str(args.config),
        "--log-level",
        args.log_level,
        "--access-log",
        config.gateway.access_log,
        "--worker-fd",
        str(sock.fileno()),
    ]
    stopping = False
    procs: dict[int, trio.Process] = {}

    async def worker(n: int) -> None:
        while not stopping:
            proc = await trio.lowlevel.open_process(command, pass_fds=(sock.fileno(),))
            procs[n] = proc
            code = await proc.wait()
            if stopping:
                return
            log.warning("worker %d (pid %d) exited with %s: restarting", n, proc.pid, code)
            await trio.sleep(1.0)

    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                for n in range(workers):
                    nursery.start_soon(worker, n)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        # Each worker reloads the file itself (and logs how it went).
                        log.info("received SIGHUP: telling %d workers to reload", len(procs))
                        for proc in procs.values():
                            if proc.returncode is None:
                                proc.send_signal(signal.SIGHUP)
                        continue
                    log.info("received %s: stopping the workers", signal.Signals(signum).name)
                    stopping = True
                    # Stop listening first: the kernel queues connections for as long
                    # as any process holds the socket, and a queue nobody accepts from
                    # is reset when the last copy closes. The workers close theirs as
                    # they begin to drain.
                    sock.close()
                    for proc in procs.values():
                        if proc.returncode is None:
                            proc.send_signal(signal.SIGTERM)
                    break
    finally:
        sock.close()
    log.info("gateway stopped")


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every upstream URL at INFO: keep it (and anything it might carry) out.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # SIGHUP reloads the config once the gateway runs; until then (and in the
    # supervisor of --workers, which forwards it) it must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        config = RouterConfig.load(args.config)
        if args.access_log is not None:
            gateway = msgspec.structs.replace(config.gateway, access_log=args.access_log)
            config = msgspec.structs.replace(config, gateway=gateway)
        _setup_access_log(config.gateway.access_log)
        if config.gateway.gc_threshold is not None:
            tune_gc(config.gateway.gc_threshold)
        if args.workers < 1:
            raise ConfigError("--workers", "must be at least 1")
        if args.workers > 1 and args.worker_fd is None:
            GatewayApp(config)  # a bad gateway secret fails here, not in every worker
            trio.run(_supervise, args, config, args.workers)
        else:
            trio.run(
                _serve_until_signal, config, args.host, args.port, args.worker_fd, str(args.config)
            )
    except ConfigError as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"llm-router: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _setup_access_log(fmt: str) -> None:
    """The ``router.access`` logger: its own lines on stderr, bare (each line is the
    whole record), at INFO whatever `--log-level` says; none with "off"."""
    access = logging.getLogger("router.access")
    access.propagate = False
    if fmt == "off":
        access.disabled = True
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)


def _mask(raw: str) -> str:
    if not raw:
        return "(none)"
    if raw.startswith("env:"):
        return raw  # the variable's name, never its value
    return "***"


def _tracing_lines(tracing: TracingConfig) -> list[str]:
    """`check`'s account of `[router.tracing]`: what `serve` would need (the `otel` extra,
    every header's variable), header values never shown."""
    resolve_headers(tracing.headers, "router.tracing.headers")
    if not tracing.enabled:
        return ["tracing: off"]
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise ConfigError(
            "router.tracing",
            "tracing needs the OpenTelemetry packages: pip install 'llm-router[otel]'",
        ) from None
    where = mask_url(tracing.endpoint) if tracing.endpoint else "(OTEL_EXPORTER_OTLP_* or default)"
    service = tracing.service_name or "(OTEL_SERVICE_NAME or llm-router)"
    lines = [f"tracing: OTLP/HTTP to {where} service={service}"]
    lines += [f"  header {name}: {_mask(value)}" for name, value in tracing.headers.items()]
    return lines


def check_command(args: argparse.Namespace) -> int:
    """Validate a config and print every model's resolved chain, secrets masked."""
    out = sys.stdout
    try:
        config = RouterConfig.load(args.config)
        # Every secret must resolve, as `serve` would need it (values are never printed).
        for i, p in enumerate(config.providers):
            for j, k in enumerate(p.keys):
                if k.secret:
                    resolve_secret(k.secret, f"providers[{i}].keys[{j}].secret")
            resolve_headers(p.headers, f"providers[{i}].headers")
        gw = config.gateway
        for i, gk in enumerate(gw.api_keys):
            resolve_secret(gk.secret, f"gateway.api_keys[{i}].secret")
        if gw.admin_key:
            resolve_secret(gw.admin_key, "gateway.admin_key")
        providers: dict[str, ProviderConfig] = {p.name: p for p in config.providers}
        chain: ModelChain[ProviderConfig] = ModelChain(config, providers)
        lines = [f"config {args.config}: ok", "", "providers:"]
        for p in config.providers:
            where = f" {mask_url(p.base_url)}" if p.base_url else ""
            lines.append(f"  {p.name} ({p.kind}){where}")
            for name, value in p.headers.items():
                shown = _mask(value) if header_is_secret(name, value) else value
                lines.append(f"    header {name}: {shown}")
            for k in p.keys:
                limit = k.max_concurrency or p.max_concurrency
                lines.append(f"    key {k.id}: secret={_mask(k.secret)} max_concurrency={limit}")
        lines += ["", "models (chain in the order tried):"]
        names = [m.name for m in config.models]
        if not names:
            lines.append("  (no [[models]]; use `provider/upstream-id` names)")
        for name in names:
            routes = chain.build(name, [])
            lines.append(f"  {name}:")
            for n, route in enumerate(routes, 1):
                keys = ", ".join(k.id for k in route.provider.keys)
                target = f"{route.provider.name}/{route.upstream}"
                lines.append(f"    {n}. {route.name} -> {target} [keys: {keys}]")
        shared = config.router.shared
        if shared is not None:
            lines += ["", f"shared state: {mask_url(shared.redis_url)} prefix={shared.key_prefix}"]
        tracing = config.router.tracing
        if tracing is not None:
            lines += ["", *_tracing_lines(tracing)]
        lines += [
            "",
            f"gateway: {gw.host}:{gw.port} api_keys={len(gw.api_keys)} "
            f"admin_key={_mask(gw.admin_key)} max_body_bytes={gw.max_body_bytes} "
            f"shutdown_grace={gw.shutdown_grace:g}s",
        ]
        for gk in gw.api_keys:
            lines.append(
                f"  api key {gk.id}: secret={_mask(gk.secret)} tenant={gk.tenant or gk.id}"
            )
    except ConfigError as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines), file=out)
    return 0
