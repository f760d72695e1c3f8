"""The gateway writes a response head together with its first body bytes
(`router.gateway._serve._one_write_per_response_head`, a replacement of Hypercorn's
`H11Protocol._send_h11_event`): one socket write for a JSON answer instead of three,
and a stream's chunks still each written as they come."""

from __future__ import annotations

import functools
from typing import Any

import h11
import pytest
import trio
from hypercorn.events import Closed, RawData
from hypercorn.protocol.h11 import H11Protocol

from router import RouterConfig
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


async def _connection_over(sock: trio.socket.SocketType) -> Any:
    """A `_Connection` with just what `protocol_send` uses (Hypercorn builds the rest
    when it serves a connection)."""
    conn = _Connection.__new__(_Connection)
    conn.stream = trio.SocketStream(sock)  # type: ignore[assignment]
    conn.send_lock = trio.Lock()
    conn.protocol = _Wrapper()  # type: ignore[assignment]
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
