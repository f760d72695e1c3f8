"""The gateway's writes: a response head goes out together with its first body bytes
(`router.gateway._serve._one_write_per_response_head`, a replacement of Hypercorn's
`H11Protocol._send_h11_event`): one socket write for a JSON answer instead of three,
and a stream's chunks still each written as they come. A write the client does not
take within `gateway.send_timeout` closes its connection and ends its request."""

from __future__ import annotations

import functools
from typing import Any

import h11
import httpx
import pytest
import trio
from hypercorn.events import Closed, RawData
from hypercorn.protocol.h11 import H11Protocol

from router import RouterConfig
from router.gateway._app import ClientConnection, GatewayApp, _Call
from router.gateway._serve import _Connection, _one_write_per_response_head, serve


class _Protocol:
    """The two attributes of `H11Protocol` the replaced method uses."""

    def __init__(self) -> None:
        self.connection = h11.Connection(h11.SERVER)
        self.connection.receive_data(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n")
        assert isinstance(self.connection.next_event(), h11.Request)
        assert type(self.connection.next_event()) is h11.EndOfMessage
        self.writes: list[bytes] = []

    async def send(self, event: Any) -> None:
        assert isinstance(event, RawData)
        self.writes.append(event.data)


async def _send(protocol: _Protocol, event: Any) -> None:
    await H11Protocol._send_h11_event(protocol, event)  # type: ignore[arg-type]


async def test_json_answer_is_one_write() -> None:
    _one_write_per_response_head()
    _one_write_per_response_head()  # applied once, whatever the number of calls
    assert getattr(H11Protocol._send_h11_event, "_router_coalesced", False)
    p = _Protocol()
    body = b'{"ok":true}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
    await _send(p, h11.Response(status_code=200, headers=headers))
    assert p.writes == []  # the head waits for the body
    await _send(p, h11.Data(data=body))
    await _send(p, h11.EndOfMessage())  # nothing left to write with Content-Length
    assert len(p.writes) == 1
    assert p.writes[0].startswith(b"HTTP/1.1 200 ")
    assert p.writes[0].endswith(b"\r\n\r\n" + body)
    assert p.connection.our_state is h11.DONE


async def test_stream_chunks_are_written_as_they_come() -> None:
    _one_write_per_response_head()
    p = _Protocol()
    headers = [(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")]
    await _send(p, h11.Response(status_code=200, headers=headers))
    await _send(p, h11.Data(data=b"data: 1\n\n"))
    assert len(p.writes) == 1 and p.writes[0].startswith(b"HTTP/1.1 200 ")
    await _send(p, h11.Data(data=b"data: 2\n\n"))
    await _send(p, h11.EndOfMessage())
    assert p.writes[1:] == [b"9\r\ndata: 2\n\n\r\n", b"0\r\n\r\n"]


async def test_empty_answer_flushes_the_head_at_the_end() -> None:
    _one_write_per_response_head()
    p = _Protocol()
    await _send(p, h11.Response(status_code=204, headers=[]))
    assert p.writes == []
    await _send(p, h11.EndOfMessage())
    assert len(p.writes) == 1 and p.writes[0].startswith(b"HTTP/1.1 204 ")


class _Wrapper:
    def __init__(self) -> None:
        self.events: list[object] = []

    async def handle(self, event: object) -> None:
        self.events.append(event)


async def _connection_over(sock: trio.socket.SocketType, send_timeout: float = 30.0) -> Any:
    """A `_Connection` with just what `protocol_send` uses (Hypercorn builds the rest
    when it serves a connection)."""
    conn = _Connection.__new__(_Connection)
    conn.stream = trio.SocketStream(sock)  # type: ignore[assignment]
    conn.send_lock = trio.Lock()
    conn.protocol = _Wrapper()  # type: ignore[assignment]
    conn.client = ClientConnection()
    conn.gateway = GatewayApp(RouterConfig.from_toml(KEEPALIVE_CONFIG))
    conn.gateway.send_timeout = send_timeout
    return conn


async def test_writes_the_kernel_refuses_go_through_hypercorns_path_in_order() -> None:
    a, b = trio.socket.socketpair()
    conn = await _connection_over(a)
    pieces = [bytes([65 + i]) * 300_000 for i in range(4)]  # far over the socket buffer
    received = bytearray()
    async with trio.open_nursery() as nursery:

        async def read_slowly() -> None:
            while len(received) < sum(map(len, pieces)):
                await trio.sleep(0.001)
                received.extend(await b.recv(65536))

        nursery.start_soon(read_slowly)
        for piece in pieces:  # the first fills the buffer; the rest wait their turn
            await conn.protocol_send(RawData(data=piece))
    assert bytes(received) == b"".join(pieces)
    assert conn.protocol.events == []


async def test_a_client_that_stops_reading_loses_its_connection_after_send_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    a, b = trio.socket.socketpair()
    conn = await _connection_over(a, send_timeout=5.0)
    cancelled = trio.CancelScope()
    conn.client.calls.add(_Call(cancelled))  # a request running on this connection
    start = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def watchdog() -> None:  # (without the deadline: the write ends at 60 s)
            await trio.sleep(60)
            b.close()

        nursery.start_soon(watchdog)
        await conn.protocol_send(RawData(data=b"x" * 4_000_000))  # b never reads
        nursery.cancel_scope.cancel()
    assert trio.current_time() - start == pytest.approx(5.0, abs=0.1)
    assert conn.client.closed and cancelled.cancel_called  # its request is cancelled
    assert any(isinstance(e, Closed) for e in conn.protocol.events)
    assert a.fileno() == -1  # the connection is closed
    rejected = conn.gateway.metrics.rejected.labels("send_timeout")._value.get()
    assert rejected == 1


async def test_a_slow_reader_within_send_timeout_keeps_its_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The deadline is for progress: a client that keeps taking its answer (64 KiB a
    # second here), however long the whole takes, is never cut.
    a, b = trio.socket.socketpair()
    conn = await _connection_over(a, send_timeout=5.0)
    pieces = [bytes([65 + i]) * 1_000_000 for i in range(3)]
    received = bytearray()
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:

            async def read_slowly() -> None:
                while len(received) < sum(map(len, pieces)):
                    await trio.sleep(1.0)  # 64 KiB a second: the whole answer takes ~46 s
                    received.extend(await b.recv(65536))

            nursery.start_soon(read_slowly)
            for piece in pieces:
                await conn.protocol_send(RawData(data=piece))
    assert bytes(received) == b"".join(pieces)
    assert trio.current_time() > 30  # far longer than send_timeout in all
    assert not conn.client.closed and conn.protocol.events == []


async def test_a_write_to_a_closed_peer_reports_the_connection_closed() -> None:
    a, b = trio.socket.socketpair()
    conn = await _connection_over(a)
    b.close()
    await conn.protocol_send(RawData(data=b"x" * 10))
    await conn.protocol_send(RawData(data=b"x" * 10))  # the second write sees the reset
    assert any(isinstance(e, Closed) for e in conn.protocol.events)


KEEPALIVE_CONFIG = """
[[providers]]
name = "sim"
kind = "simulated"
keys = [{ id = "k1", secret = "sk-sim-1" }]
[[models]]
name = "m"
provider = "sim"
upstream = "sim-1"
"""


async def _get_health(stream: trio.SocketStream) -> None:
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        piece = await stream.receive_some(65536)
        assert piece, "closed before the answer"
        data += piece
    assert data.startswith(b"HTTP/1.1 200 ")


async def _closed_at(stream: trio.SocketStream) -> float:
    with trio.fail_after(120):  # clock time (autojump): a timer that never fires fails
        while await stream.receive_some(65536):
            pass
    return trio.current_time()


async def test_keep_alive_closes_an_idle_connection_and_a_request_moves_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    config = RouterConfig.from_toml(KEEPALIVE_CONFIG)
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(functools.partial(serve, config, port=0))
        port = int(urls[0].rsplit(":", 1)[1])
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        await _get_health(idle)
        start = trio.current_time()
        assert await _closed_at(idle) - start == pytest.approx(30.0, abs=0.5)

        busy = await trio.open_tcp_stream("127.0.0.1", port)
        await _get_health(busy)
        await trio.sleep(20.0)
        await _get_health(busy)  # still open at 20 s: its timer starts over
        again = trio.current_time()
        assert await _closed_at(busy) - again == pytest.approx(30.0, abs=0.5)
        nursery.cancel_scope.cancel()


# -- end to end: a client that never reads its stream -----------------------------------

_EVENT_TEXT = "a" * 32_768
_EVENT = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"up",'
    b'"choices":[{"index":0,"delta":{"content":"' + _EVENT_TEXT.encode() + b'"},'
    b'"finish_reason":null}]}\n\n'
)


class _EndlessUpstream:
    """An OpenAI-shaped upstream whose streamed answer never ends: 32 KiB events as
    fast as the gateway takes them. Records when the gateway dropped each stream."""

    def __init__(self) -> None:
        self.opened = 0
        self.dropped: list[float] = []
        self.first_drop = trio.Event()

    async def serve(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = await stream.receive_some(65536)
            if not piece:
                return
            data += piece
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += await stream.receive_some(65536)
        self.opened += 1
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%b\r\n" % (len(_EVENT), _EVENT)
        try:
            while True:
                await stream.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.dropped.append(trio.current_time())
            self.first_drop.set()


async def test_a_stream_the_client_never_reads_is_ended_upstream_after_send_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    upstream = _EndlessUpstream()
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, upstream.serve, 0, host="127.0.0.1")
        )
        up_port = listener.socket.getsockname()[1]
        config = RouterConfig.from_toml(
            f"""
[router]
idle_timeout = 600.0
[gateway]
send_timeout = 10.0
[[providers]]
name = "up"
kind = "openai"
base_url = "http://127.0.0.1:{up_port}/v1"
keys = [{{ id = "k1", secret = "sk-up-1", max_concurrency = 1 }}]
[[models]]
name = "m"
provider = "up"
upstream = "up"
"""
        )
        urls = await nursery.start(functools.partial(serve, config, port=0))
        port = int(urls[0].rsplit(":", 1)[1])
        body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
            b"\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
        )
        sock = trio.socket.socket()
        try:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", port))
            await sock.send(request)
            head = b""
            while b"\r\n\r\n" not in head:  # the answer starts, then the client stops reading
                head += await sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 200 ")
            start = trio.current_time()
            with trio.fail_after(120):
                await upstream.first_drop.wait()
            # The gateway ended the request once the client took nothing for 10 s: the
            # upstream stream was closed, and with it the key's only slot is free again.
            assert upstream.dropped[0] - start == pytest.approx(10.0, abs=2.0)
            with trio.fail_after(30):
                while True:  # the client's connection was closed (after what was buffered)
                    try:
                        if not await sock.recv(65536):
                            break
                    except OSError:
                        break
        finally:
            sock.close()  # (also what ends a write stuck without the deadline)
        async with httpx.AsyncClient(base_url=urls[0]) as client:
            with trio.fail_after(30):
                async with client.stream(
                    "POST", "/v1/chat/completions", content=body, timeout=None
                ) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if "aaaa" in line:
                            break  # the key served a new stream
        assert upstream.opened == 2
        nursery.cancel_scope.cancel()
