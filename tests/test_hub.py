"""`router._hub`: the read hub the transport parks streamed body reads on.

Real sockets (socket pairs, and the transport against a real server on loopback): the
hub's edge-triggered bookkeeping is only worth anything if no byte is ever left unread
with its reader asleep. Times are virtual (`autojump_clock`): a reader left asleep
shows as a timeout, not as a hung suite.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable, Iterator

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import router._hub
import router._transport
from router._hub import ReadHub, Watch, current_hub
from router._transport import _READ_SIZE, LeanClient, RouterTransport

READ = 4096


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def pair(made: list[tuple[socket.socket, socket.socket]]) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    made.append((a, b))
    return a, b


class RequestHeads:
    """A test server's view of bodiless requests (GET) on one connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> bool:
        """Wait for the next request's head; False once the client closed."""
        while b"\r\n\r\n" not in self._buffer:
            data = await self._stream.receive_some(65536)
            if not data:
                return False
            self._buffer += data
        self._buffer = self._buffer.split(b"\r\n\r\n", 1)[1]
        return True


async def read_once(watch: Watch) -> bytes:
    """What the transport does: read while marked ready, park when drained."""
    while True:
        if not watch.ready:
            await watch.wait()
        try:
            data = os.read(watch.fd, READ)
        except BlockingIOError:
            watch.ready = False
            continue
        if len(data) < READ:
            watch.ready = False
        return data


async def test_one_wakeup_serves_every_socket_that_became_readable(pairs, autojump_clock):
    hub = current_hub()
    sockets = [pair(pairs) for _ in range(20)]
    got: dict[int, bytes] = {}

    async def reader(i: int, watch: Watch) -> None:
        got[i] = await read_once(watch)

    async with trio.open_nursery() as nursery:
        for i, (a, _b) in enumerate(sockets):
            watch = hub.watch(a.fileno())
            watch.ready = False  # (nothing sent yet: park at once)
            nursery.start_soon(reader, i, watch)
        await trio.testing.wait_all_tasks_blocked()
        before = hub.wakeups
        for i, (_a, b) in enumerate(sockets):
            b.send(b"token %d" % i)
    assert got == {i: b"token %d" % i for i in range(20)}
    assert hub.wakeups == before + 1  # twenty readers, one wakeup of the hub


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.tuples(st.integers(1, 3 * _READ_SIZE), st.sampled_from([0.0, 0.0, 0.001, 0.05])),
        min_size=1,
        max_size=10,
    )
)
def test_no_byte_of_a_streamed_body_is_left_unread(writes):
    # The transport's own body reads through the hub: pieces of any size (some larger
    # than one read, so the socket is not drained by it) written back to back, or after
    # a pause (the reader parked), or while the reader is busy with the last piece.
    # Every byte arrives, in order, and the connection is reused.
    body = b"".join(bytes([n % 251]) * size for n, (size, _) in enumerate(writes))

    accepted = 0

    async def serve(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        requests = RequestHeads(stream)
        while await requests.next():
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
            for n, (size, pause) in enumerate(writes):
                if pause:
                    await trio.sleep(pause)
                await stream.send_all(bytes([n % 251]) * size)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, serve, 0)
            port = listeners[0].socket.getsockname()[1]
            transport = RouterTransport(max_connections=1)
            async with LeanClient(transport=transport) as http:
                for _ in range(2):
                    received = bytearray()
                    with trio.fail_after(60):
                        async with http.stream(
                            "GET", f"http://127.0.0.1:{port}/", timeout=httpx.Timeout(5, read=None)
                        ) as response:
                            async for piece in response.aiter_raw():
                                received += piece
                                await trio.lowlevel.checkpoint()  # busy: the next edge may come now
                    assert received == body
            assert accepted == 1  # one connection, reused
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def parked_then(watch: Watch, end: Callable[[], object]) -> list[BaseException]:
    """Park a reader on `watch`, call `end()` once it waits; what the reader raised."""
    watch.ready = False
    failed: list[BaseException] = []

    async def reader() -> None:
        try:
            await watch.wait()
        except trio.ClosedResourceError as exc:
            failed.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert end() is not False
    return failed


async def test_a_cut_wakes_the_parked_reader_and_only_it(pairs, autojump_clock):
    a, _b = pair(pairs)
    watch = current_hub().watch(a.fileno())
    assert watch.cut("nobody waits") is False  # no reader: nothing happens
    failed = await parked_then(watch, lambda: watch.cut("idle for 1s"))
    assert [str(exc) for exc in failed] == ["idle for 1s"]
    assert watch.reader is None


async def test_closing_wakes_the_reader_and_frees_the_descriptor_number(pairs, autojump_clock):
    hub = current_hub()
    a, b = pair(pairs)
    fd = a.fileno()
    watch = hub.watch(fd)

    def close() -> None:
        watch.close()
        a.close()

    assert len(await parked_then(watch, close)) == 1
    # The same descriptor number, reused by a new socket, is watched afresh.
    c, d = pair(pairs)
    again = hub.watch(c.fileno())
    again.ready = False
    d.send(b"fresh")
    with trio.fail_after(5):
        assert await read_once(again) == b"fresh"
    b.close()


async def test_a_second_reader_is_refused_and_a_cancelled_one_leaves_cleanly(pairs, autojump_clock):
    a, b = pair(pairs)
    watch = current_hub().watch(a.fileno())
    watch.ready = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.wait)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await watch.wait()
        nursery.cancel_scope.cancel()
    assert watch.reader is None  # the cancelled wait took itself off
    b.send(b"after")
    with trio.fail_after(5):
        assert await read_once(watch) == b"after"


def test_a_hub_ends_with_its_run_and_a_connection_moves_to_the_next():
    # A transport (and its idle connection) outlives one trio run: the next run's
    # body reads park on that run's hub, not on the stopped one.
    async def serve(stream: trio.SocketStream) -> None:
        requests = RequestHeads(stream)
        while await requests.next():
            await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await trio.sleep(0.05)  # the body comes later: the reader has to park
            await stream.send_all(b"4\r\nbody\r\n0\r\n\r\n")

    transport = RouterTransport(max_connections=1)
    hubs: list[ReadHub] = []
    ports: list[int] = []

    async def one_run() -> bytes:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, serve, 0)
            ports.append(listeners[0].socket.getsockname()[1])
            client = LeanClient(transport=transport)
            response = await client.get(
                f"http://127.0.0.1:{ports[-1]}/", timeout=httpx.Timeout(5.0, read=None)
            )
            hubs.append(current_hub())
            nursery.cancel_scope.cancel()
            return response.content

    assert trio.run(one_run) == b"body"
    assert hubs[0].closed
    assert trio.run(one_run) == b"body"  # (a new server: the old connection is stale)
    assert hubs[1] is not hubs[0]
    assert hubs[1].wakeups >= 1


async def test_without_epoll_a_streamed_body_waits_in_trio(monkeypatch, autojump_clock):
    # Where `select.epoll` is missing (`HUB` False) the transport never starts a hub.
    monkeypatch.setattr(router._transport, "HUB", False)

    async def serve(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"one", b"two"):
            await trio.sleep(1.0)
            await stream.send_all(b"3\r\n%b\r\n" % piece)
        await stream.send_all(b"0\r\n\r\n")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0))
        port = listeners[0].socket.getsockname()[1]
        async with (
            LeanClient(transport=RouterTransport()) as http,
            http.stream(
                "GET", f"http://127.0.0.1:{port}/", timeout=httpx.Timeout(5, read=None)
            ) as response,
        ):
            assert [piece async for piece in response.aiter_raw()] == [b"one", b"two"]
        with pytest.raises(LookupError):
            router._hub._HUB.get()  # no hub was started in this run
        nursery.cancel_scope.cancel()
