"""`router._transport` as a library of its own: `RouterTransport` under an
`httpx.AsyncClient`, against real servers on loopback.

The server reads requests with h11 and answers with bytes the test chooses (so it can
send HTTP/1.0, cut a body short or split an answer anywhere), optionally over TLS with
`trustme` certificates. It counts the connections it accepted: keep-alive reuse and
discarded connections are asserted by that count. Times are virtual (`autojump_clock`)
wherever a deadline is asserted.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import h11
import httpx
import pytest
import trio
import trio.testing
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import router._transport
from router import ApiKey, ChatRequest, ConfigError, Message, Router, RouterConfig
from router._http import HttpProvider, protocol_for
from router._provider import STREAM_CUT, ReadCut
from router._transport import IDLE_CHECK_AFTER, LeanClient, RouterTransport, _Connection


@dataclass
class Reply:
    """What the server sends for one request: `pieces` in order, `delay` seconds apart,
    then closes the connection if `close` (or stalls forever if `stall`)."""

    pieces: list[bytes]
    delay: float = 0.0
    close: bool = False
    stall: bool = False


def ok(body: bytes = b"hello", *extra: bytes) -> Reply:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), b"".join(extra))
    return Reply([head + body])


Handler = Callable[[h11.Request, bytes], Awaitable[Reply]]


@dataclass
class Server:
    handler: Handler
    idle_close: float | None = None
    """Close a connection that waited this long for its next request."""
    accepted: int = 0
    requests: list[tuple[h11.Request, bytes]] = field(default_factory=list)
    open_now: int = 0
    open_most: int = 0
    port: int = 0

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.accepted += 1
        self.open_now += 1
        self.open_most = max(self.open_most, self.open_now)
        try:
            await self._serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.open_now -= 1
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.abc.Stream) -> None:
        first = True
        while True:
            conn = h11.Connection(h11.SERVER)
            body = b""
            request: h11.Request | None = None
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    with trio.move_on_after(
                        self.idle_close
                        if self.idle_close and not first and request is None
                        else float("inf")
                    ):
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                        continue
                    return  # idle too long: close
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            first = False
            assert request is not None
            self.requests.append((request, body))
            reply = await self.handler(request, body)
            for i, piece in enumerate(reply.pieces):
                if i and reply.delay:
                    await trio.sleep(reply.delay)
                await stream.send_all(piece)
            if reply.stall:
                await trio.sleep_forever()
            if reply.close:
                return


def answer(*replies: Reply) -> Handler:
    """A handler sending `replies` in turn, then the last one again."""
    queue = list(replies)

    async def handle(request: h11.Request, body: bytes) -> Reply:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return handle


@pytest.fixture
async def serve(nursery: trio.Nursery) -> Callable[..., Awaitable[Server]]:
    async def start(
        handler: Handler, *, idle_close: float | None = None, tls: ssl.SSLContext | None = None
    ) -> Server:
        server = Server(handler, idle_close)
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(
            await trio.open_tcp_listeners(0, host="127.0.0.1")
        )
        server.port = listeners[0].socket.getsockname()[1]  # type: ignore[attr-defined]
        if tls is not None:
            listeners = [trio.SSLListener(lst, tls, https_compatible=True) for lst in listeners]
        nursery.start_soon(trio.serve_listeners, server.serve, listeners)
        return server

    return start


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


def client(
    server: Server, transport: RouterTransport | None = None, **kwargs: object
) -> LeanClient:
    return LeanClient(
        transport=transport or RouterTransport(max_connections=8),
        base_url=f"http://127.0.0.1:{server.port}",
        **kwargs,  # type: ignore[arg-type]
    )


# keep-alive and reuse


async def test_keep_alive_reuses_one_connection(serve):
    server = await serve(answer(ok(b"answer")))
    transport = RouterTransport()
    async with client(server, transport) as http:
        for i in range(5):
            response = await http.post("/v1/x", content=b"request %d" % i)
            assert response.status_code == 200
            assert response.content == b"answer"
            assert response.http_version == "HTTP/1.1"
            assert response.reason_phrase == "OK"
    assert server.accepted == 1
    assert transport.opened == 1
    assert [body for _, body in server.requests] == [b"request %d" % i for i in range(5)]


async def test_server_closing_an_idle_connection_is_noticed_on_reuse(serve, autojump_clock):
    server = await serve(answer(ok()), idle_close=5.0)
    async with client(server) as http:
        assert (await http.post("/", content=b"1")).content == b"hello"
        await trio.sleep(10.0)  # the server closed it meanwhile; idle > IDLE_CHECK_AFTER
        assert (await http.post("/", content=b"2")).content == b"hello"
    assert server.accepted == 2
    assert len(server.requests) == 2


async def test_only_connections_idle_past_the_threshold_are_polled(
    serve, autojump_clock, monkeypatch
):
    polls: list[float] = []
    looks_closed = _Connection.looks_closed

    def counting(connection: _Connection) -> bool:
        polls.append(trio.current_time())
        return looks_closed(connection)

    monkeypatch.setattr(_Connection, "looks_closed", counting)
    server = await serve(answer(ok()))
    async with client(server) as http:
        for _ in range(5):
            await http.post("/", content=b"x")
            await trio.sleep(IDLE_CHECK_AFTER / 2)
        assert polls == []  # no syscall on the hot path
        await trio.sleep(IDLE_CHECK_AFTER)
        await http.post("/", content=b"x")
        assert len(polls) == 1
    assert server.accepted == 1  # polled, found alive, reused


async def test_stale_connection_retried_once_for_a_get(serve, autojump_clock):
    # closed by the server within IDLE_CHECK_AFTER: no poll, the GET meets the EOF
    server = await serve(answer(ok()), idle_close=IDLE_CHECK_AFTER / 4)
    async with client(server) as http:
        assert (await http.get("/")).status_code == 200
        await trio.sleep(IDLE_CHECK_AFTER / 2)
        assert (await http.get("/")).status_code == 200
    assert server.accepted == 2


async def test_stale_connection_is_not_retried_for_a_post(serve, autojump_clock):
    """The server may have read a POST before the connection ended: never sent twice."""
    server = await serve(answer(ok()), idle_close=IDLE_CHECK_AFTER / 4)
    async with client(server) as http:
        await http.post("/", content=b"first")
        await trio.sleep(IDLE_CHECK_AFTER / 2)
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await http.post("/", content=b"second")
        assert (await http.post("/", content=b"third")).status_code == 200
    assert [body for _, body in server.requests] == [b"first", b"third"]


async def test_connection_close_from_the_server(serve):
    server = await serve(answer(ok(b"x", b"Connection: close\r\n")))
    async with client(server) as http:
        for _ in range(3):
            assert (await http.get("/")).content == b"x"
    assert server.accepted == 3


async def test_connection_close_from_the_client(serve):
    server = await serve(answer(ok()))
    async with client(server) as http:
        for _ in range(3):
            await http.get("/", headers={"Connection": "close"})
    assert server.accepted == 3


@pytest.mark.parametrize("extra", [b"", b"Connection: keep-alive\r\n"])
async def test_http_1_0_answers_are_not_reused(serve, extra):
    head = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n" + extra
    server = await serve(answer(Reply([head + b"\r\nok"])))
    async with client(server) as http:
        for _ in range(2):
            response = await http.get("/")
            assert response.content == b"ok"
            assert response.http_version == "HTTP/1.0"
    assert server.accepted == 2


async def test_body_until_close(serve):
    server = await serve(
        answer(Reply([b"HTTP/1.0 200 OK\r\n\r\n", b"part one, ", b"part two"], close=True))
    )
    async with client(server) as http:
        assert (await http.get("/")).content == b"part one, part two"
        assert (await http.get("/")).content == b"part one, part two"
    assert server.accepted == 2


async def test_no_body_answers_are_reused(serve):
    server = await serve(
        answer(
            Reply([b"HTTP/1.1 204 No Content\r\n\r\n"]),
            Reply([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"]),  # for the HEAD
            ok(),
        )
    )
    async with client(server) as http:
        assert (await http.get("/")).status_code == 204
        head = await http.head("/")
        assert head.headers["content-length"] == "5"
        assert head.content == b""
        assert (await http.get("/")).content == b"hello"
    assert server.accepted == 1


async def test_interim_answer_is_skipped(serve):
    server = await serve(answer(Reply([b"HTTP/1.1 100 Continue\r\n\r\n" + ok().pieces[0]])))
    async with client(server) as http:
        response = await http.post("/", content=b"x")
        assert (response.status_code, response.content) == (200, b"hello")


async def test_bytes_after_the_message_forbid_reuse(serve):
    server = await serve(answer(Reply([ok().pieces[0] + b"HTTP/1.1 200 OK\r\n"])))
    async with client(server) as http:
        assert (await http.get("/")).content == b"hello"
        assert (await http.get("/")).content == b"hello"
    assert server.accepted == 2


# truncated, malformed and slow answers


@pytest.mark.parametrize(
    "cut",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly fifty bytes",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nonly part",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwhole\r\n",
    ],
    ids=["content-length", "chunk-cut", "no-last-chunk"],
)
async def test_truncated_bodies_fail_and_are_not_reused(serve, cut):
    server = await serve(answer(Reply([cut], close=True), ok()))
    async with client(server) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/")
        assert (await http.get("/")).content == b"hello"
    assert server.accepted == 2


async def test_server_closing_before_the_head(serve):
    server = await serve(answer(Reply([], close=True)))
    async with client(server) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await http.post("/", content=b"x")


async def test_malformed_answer(serve):
    server = await serve(answer(Reply([b"HTTP/1.1 abc\r\n\r\n"], close=True)))
    async with client(server) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="malformed"):
            await http.get("/")


async def test_slow_body_arrives_piece_by_piece(serve, autojump_clock):
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces = [head, b"3\r\none\r\n", b"3\r\ntwo\r\n", b"5\r\nthree\r\n0\r\n\r\n"]
    server = await serve(answer(Reply(pieces, delay=1.0)))
    async with client(server) as http:
        start = trio.current_time()
        seen = []
        async with http.stream("GET", "/", timeout=httpx.Timeout(5.0, read=None)) as response:
            async for data in response.aiter_raw():
                seen.append((trio.current_time() - start, data))
        assert seen == [(1.0, b"one"), (2.0, b"two"), (3.0, b"three")]
        # each read may take 1.5 s: the whole 3 s body is within it
        response = await http.get("/", timeout=httpx.Timeout(1.5))
        assert response.content == b"onetwothree"
    assert server.accepted == 1


async def test_the_chunks_of_one_read_come_as_one_piece(serve, autojump_clock):
    # An SSE upstream sends one HTTP chunk per event; a burst of them in one write is
    # handed over as one piece, so the stream's parser sees the burst at once.
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    burst = b"3\r\none\r\n3\r\ntwo\r\n5\r\nthree\r\n"
    pieces = [head, burst, b"4\r\nfour\r\n0\r\n\r\n"]
    server = await serve(answer(Reply(pieces, delay=1.0)))
    async with client(server) as http:
        async with http.stream("GET", "/", timeout=httpx.Timeout(5.0, read=None)) as response:
            seen = [data async for data in response.aiter_raw()]
        assert seen == [b"onetwothree", b"four"]
    assert server.accepted == 1


async def test_a_body_larger_than_one_read(serve):
    # Reads that fill the buffer are followed by a read at once, the last short one by
    # a wait for readability: the body arrives whole either way.
    body = bytes(range(256)) * 1200  # 300 KiB
    server = await serve(answer(ok(body)))
    async with client(server) as http:
        response = await http.get("/")
        assert response.content == body
        again = await http.get("/")
        assert again.content == body
    assert server.accepted == 1


async def test_read_timeout_in_the_body(serve, autojump_clock):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    server = await serve(answer(Reply([head + b"12345"], stall=True), ok()))
    async with client(server) as http:
        start = trio.current_time()
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/", timeout=httpx.Timeout(2.0))
        assert trio.current_time() - start == 2.0
        assert (await http.get("/")).content == b"hello"
    assert server.accepted == 2


async def test_one_deadline_for_the_head(serve, autojump_clock):
    server = await serve(answer(Reply([], stall=True)))
    async with client(server) as http:
        start = trio.current_time()
        with pytest.raises(httpx.ReadTimeout, match="timed out reading"):
            await http.post("/", content=b"x", timeout=httpx.Timeout(10.0, read=3.0))
        assert trio.current_time() - start == 3.0


async def test_pool_timeout_when_the_cap_is_reached(serve, autojump_clock):
    server = await serve(
        answer(Reply([b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"], stall=True))
    )
    transport = RouterTransport(max_connections=1)
    async with client(server, transport) as http, http.stream("GET", "/"):
        start = trio.current_time()
        with pytest.raises(httpx.PoolTimeout):
            await http.get("/", timeout=httpx.Timeout(5.0, pool=2.0))
        assert trio.current_time() - start == 2.0


async def test_pool_cap_respected_under_concurrency(serve, autojump_clock):
    async def slow(request: h11.Request, body: bytes) -> Reply:
        await trio.sleep(1.0)
        return ok(body)

    server = await serve(slow)
    transport = RouterTransport(max_connections=3)
    results: list[bytes] = []
    async with client(server, transport, timeout=30.0) as http:

        async def one(i: int) -> None:
            results.append((await http.post("/", content=b"%d" % i)).content)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
    assert sorted(results) == sorted(b"%d" % i for i in range(20))
    assert server.accepted == 3
    assert server.open_most == 3
    assert trio.current_time() >= 7.0  # 20 requests, 3 at a time, 1 s each


# cancellation


async def test_cancellation_mid_body_discards_the_connection(serve, autojump_clock):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n"
    server = await serve(answer(Reply([head + b"abc", b"def"], delay=5.0), ok()))
    transport = RouterTransport(max_connections=1)
    async with client(server, transport) as http:
        with trio.move_on_after(1.0):
            async with http.stream("GET", "/") as response:
                async for _ in response.aiter_raw():
                    pass
        (origin,) = transport._origins.values()
        assert (origin.open, origin.idle) == (0, [])
        assert (await http.get("/")).content == b"hello"  # the cap of 1 is free again
    assert server.accepted == 2


@pytest.mark.parametrize("limit", [5.0, None])
async def test_cancellation_before_the_head_discards_the_connection(serve, autojump_clock, limit):
    """With timeouts (the request's own cancel scope) or none (no scope of its own)."""

    async def late(request: h11.Request, body: bytes) -> Reply:
        if len(server.requests) == 1:
            await trio.sleep(5.0)
        return ok()

    server = await serve(late)
    transport = RouterTransport(max_connections=1)
    async with client(server, transport, timeout=limit) as http:
        with trio.move_on_after(1.0):
            await http.get("/")
        (origin,) = transport._origins.values()
        assert (origin.open, origin.idle) == (0, [])
        assert (await http.get("/")).content == b"hello"
    assert server.accepted == 2


async def test_closing_a_response_early_discards_the_connection(serve):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n"
    server = await serve(answer(Reply([head + b"abc", b"def"], delay=0.05)))
    async with client(server) as http:
        async with http.stream("GET", "/") as response:
            async for _ in response.aiter_raw():
                break
        async with http.stream("GET", "/") as response:
            await response.aread()
    assert server.accepted == 2


# request bodies, headers, errors


async def test_chunked_and_sized_request_bodies(serve):
    server = await serve(answer(ok()))

    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"one ", b"", b"two"):
            yield piece

    async with client(server) as http:
        await http.post("/", content=pieces())
        await http.post("/", content=b"x" * 100_000)
    assert [len(body) for _, body in server.requests] == [7, 100_000]
    assert server.requests[0][1] == b"one two"
    assert server.accepted == 1


async def test_a_line_break_in_a_header_is_refused(serve):
    server = await serve(answer(ok()))
    async with client(server) as http:
        with pytest.raises(httpx.LocalProtocolError, match="line break"):
            await http.get("/", headers={"x-note": "a\r\nx-injected: 1"})
    assert server.requests == []


async def test_connection_refused_is_a_connect_error():
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    async with LeanClient(transport=RouterTransport()) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")


async def test_unsupported_scheme():
    async with LeanClient(transport=RouterTransport()) as http:
        with pytest.raises(httpx.UnsupportedProtocol):
            await http.get("ftp://127.0.0.1/")


def test_bad_cap():
    with pytest.raises(ValueError, match="max_connections"):
        RouterTransport(max_connections=0)


# TLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _server_context(ca: trustme.CA, host: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host).configure_cert(context)
    context.set_alpn_protocols(["http/1.1"])
    return context


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_tls_with_verification_and_reuse(serve, ca):
    server = await serve(answer(ok(b"secure")), tls=_server_context(ca, "localhost"))
    transport = RouterTransport(ssl_context=_client_context(ca))
    async with LeanClient(transport=transport) as http:
        for _ in range(3):
            response = await http.get(f"https://localhost:{server.port}/")
            assert response.content == b"secure"
    assert server.accepted == 1


async def test_tls_wrong_hostname_fails_clearly(serve, ca):
    server = await serve(answer(ok()), tls=_server_context(ca, "elsewhere.example"))
    transport = RouterTransport(ssl_context=_client_context(ca))
    async with LeanClient(transport=transport) as http:
        with pytest.raises(
            httpx.ConnectError, match=r"TLS handshake with localhost failed.*[Hh]ostname mismatch"
        ):
            await http.get(f"https://localhost:{server.port}/")


async def test_tls_untrusted_ca_fails_clearly(serve, ca):
    server = await serve(answer(ok()), tls=_server_context(ca, "localhost"))
    async with LeanClient(transport=RouterTransport()) as http:  # certifi's CAs only
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await http.get(f"https://localhost:{server.port}/")


# the lean client


async def test_lean_client_keeps_cookies_and_caches_urls(serve, monkeypatch):
    server = await serve(answer(ok(b"", b"Set-Cookie: session=abc; Path=/\r\n"), ok(b"no cookie")))
    async with client(server) as http:
        await http.get("/a")
        assert http.cookies["session"] == "abc"
        merged: list[object] = []
        merge = httpx.AsyncClient._merge_url

        def counting(self: httpx.AsyncClient, url: httpx.URL | str) -> httpx.URL:
            merged.append(url)
            return merge(self, url)

        monkeypatch.setattr(httpx.AsyncClient, "_merge_url", counting)
        await http.get("/a")  # merged before, not again
        assert str(http.build_request("GET", "/b?q=1").url).endswith("/b?q=1")
        assert str(http.build_request("GET", "/b?q=1").url).endswith("/b?q=1")
        assert merged == ["/b?q=1"]
    assert server.requests[1][0].headers.count((b"cookie", b"session=abc")) == 1


async def test_lean_client_send_keeps_what_httpx_send_does(serve):
    """`LeanClient.send` skips httpx's auth, redirect and hook layers only when none of
    them has work: each of them still works, and the response is httpx's."""
    redirect = Reply([b"HTTP/1.1 302 Found\r\nLocation: /b\r\nContent-Length: 0\r\n\r\n"])

    async def by_path(request: h11.Request, body: bytes) -> Reply:
        return {b"/a": redirect, b"/b": ok(b"b")}.get(request.target, ok(b"plain"))

    server = await serve(by_path)
    seen: list[str] = []

    async def hook(request: httpx.Request) -> None:
        seen.append(request.url.path)

    async with client(server) as http:
        response = await http.get("/a")  # not followed, as httpx would not
        assert response.status_code == 302
        assert response.request.url.path == "/a"
        assert response.next_request is not None and response.next_request.url.path == "/b"
        assert response.history == []
        followed = await http.get("/a", follow_redirects=True)
        assert followed.content == b"b" and [r.status_code for r in followed.history] == [302]
        http.follow_redirects = True
        assert (await http.get("/a")).content == b"b"
        http.follow_redirects = False
        http.event_hooks = {"request": [hook]}
        await http.get("/hooked")
        http.event_hooks = {}
        await http.get("/x", auth=("user", "pw"))
        http.auth = ("client", "pw")
        await http.get("/y")
        http.auth = None
        await http.get(f"http://who:pw@127.0.0.1:{server.port}/z")
        async with http.stream("GET", "/s") as streamed:
            assert await streamed.aread() == b"plain"
    assert seen == ["/hooked"]
    authorization = {r.target: dict(r.headers).get(b"authorization") for r, _ in server.requests}
    assert authorization[b"/x"] == b"Basic dXNlcjpwdw=="
    assert authorization[b"/y"] == b"Basic Y2xpZW50OnB3"
    assert authorization[b"/z"] == b"Basic d2hvOnB3"
    assert authorization[b"/s"] is None
    with pytest.raises(RuntimeError, match="closed"):
        await http.get("/late")


# any split of a valid answer parses to the same answer


@st.composite
def answers(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], list[int]]:
    body = draw(st.binary(max_size=3000))
    headers = [(b"x-test-%d" % i, draw(st.sampled_from([b"a", b"b c", b""]))) for i in range(3)]
    if draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=5)))
        chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        framed = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks if c)
        trailer = b"x-trailer: t\r\n" if draw(st.booleans()) else b""
        head = [(b"Transfer-Encoding", b"chunked"), *headers]
        wire_body = framed + b"0\r\n" + trailer + b"\r\n"
    else:
        head = [(b"Content-Length", b"%d" % len(body)), *headers]
        wire_body = body
    wire = b"HTTP/1.1 200 OK\r\n" + b"".join(b"%s: %s\r\n" % h for h in head) + b"\r\n"
    wire += wire_body
    splits = sorted(draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=8)))
    return wire, body, head, splits


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(answers())
def test_any_chunking_of_a_valid_answer(case):
    wire, body, head, splits = case
    pieces = [wire[a:b] for a, b in zip([0, *splits], [*splits, len(wire)], strict=True)]
    pieces = [p for p in pieces if p]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = Server(answer(Reply(pieces, delay=0.01)))
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            server.port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, server.serve, listeners)
            async with client(server) as http:
                for _ in range(2):
                    response = await http.get("/")
                    assert response.content == body
                    assert [(k.lower(), v) for k, v in response.headers.raw] == [
                        (k.lower(), v) for k, v in head
                    ]
            assert server.accepted == 1
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# the providers' clients


COMPLETION = (
    b'{"id":"c1","object":"chat.completion","created":1,"model":"up",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi there"},'
    b'"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
)


def provider_config(port: int, **extra: object) -> RouterConfig:
    provider = {
        "name": "p",
        "kind": "openai",
        "base_url": f"http://127.0.0.1:{port}/v1",
        "keys": [{"id": "a", "secret": "sk-test-secret-a"}],
        "max_concurrency": 4,
    }
    return RouterConfig.from_dict(
        {
            "providers": [provider | extra],
            "models": [{"name": "m", "provider": "p", "upstream": "up"}],
        }
    )


async def test_router_requests_share_one_keep_alive_connection(serve):
    server = await serve(answer(ok(COMPLETION, b"Content-Type: application/json\r\n")))
    request = ChatRequest(model="m", messages=[Message("user", "hello")])
    async with Router.open(provider_config(server.port)) as router:
        for _ in range(5):
            assert (await router.submit(request)).content == "hi there"
    assert server.accepted == 1
    assert len(server.requests) == 5


def _client_of(config: RouterConfig) -> httpx.AsyncClient:
    provider = HttpProvider(config.providers[0], protocol_for("openai"), {"a": 4})
    with provider._shards_for(ApiKey("p", "a", "sk-test-secret-a")).lease() as http:
        return http


def test_providers_default_to_the_router_transport():
    http = _client_of(provider_config(1))
    assert isinstance(http, LeanClient)
    transport = http._transport
    assert isinstance(transport, RouterTransport)
    assert transport.max_connections == 4  # the key's max_concurrency


def test_a_proxy_falls_back_to_httpx_transport(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    config = provider_config(1, proxy="http://user:proxy-pass-1@127.0.0.1:3128")
    http = _client_of(config)
    assert not isinstance(http, LeanClient)
    assert not isinstance(http._transport, RouterTransport)
    assert "proxy-pass-1" not in repr(config.providers[0])
    provider = HttpProvider(config.providers[0], protocol_for("openai"), {"a": 4})
    assert "proxy-pass-1" in provider.known_secrets  # scrubbed from errors like a key

    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert not isinstance(_client_of(provider_config(1)), LeanClient)


def test_proxy_must_be_an_http_url():
    with pytest.raises(ConfigError) as info:
        provider_config(1, proxy="socks5://127.0.0.1:1080")
    assert info.value.field == "providers[0].proxy"


async def test_router_streams_share_one_keep_alive_connection(serve):
    events = [
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"up",'
        b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n',
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"up",'
        b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    chunks = [b"%x\r\n%b\r\n" % (len(e), e) for e in events]
    server = await serve(answer(Reply([head, *chunks, b"0\r\n\r\n"], delay=0.001)))
    request = ChatRequest(model="m", messages=[Message("user", "hello")])
    async with Router.open(provider_config(server.port)) as router:
        for _ in range(3):
            async with router.stream(request) as stream:
                assert "".join([chunk.text async for chunk in stream]) == "hi"
    assert server.accepted == 1


async def test_closing_the_transport_closes_connections_in_use_when_they_end(serve):
    server = await serve(answer(ok()))
    transport = RouterTransport()
    http = client(server, transport)
    async with http.stream("GET", "/") as response:
        (origin,) = transport._origins.values()
        await http.aclose()
        await response.aread()
    assert (origin.open, origin.idle) == (0, [])  # closed, not kept idle


# -- cutting a pending body read from another task (a stream's idle timeout) ---------------

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("hub", [True, False], ids=["read-hub", "no-epoll"])
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_pending_body_read_is_cut_from_another_task(serve, ca, scheme, hub, monkeypatch):
    # A stream's reader is parked on a stalled body; the key actor's idle timer cuts the
    # read through the cut the transport registered (`STREAM_CUT`): the read fails at
    # once with a ReadError, the connection is closed, never reused, and the next
    # request gets a new one.
    # (Without epoll, where the read hub is off, a plain read parks in trio instead.)
    monkeypatch.setattr(router._transport, "HUB", hub)
    tls = _server_context(ca, "localhost") if scheme == "https" else None
    server = await serve(
        answer(Reply([CHUNKED_HEAD + b"5\r\nfirst\r\n"], stall=True), ok(b"again")), tls=tls
    )
    transport = RouterTransport(ssl_context=_client_context(ca))
    cut = ReadCut()
    async with LeanClient(transport=transport) as http:
        token = STREAM_CUT.set(cut)
        try:
            request = http.build_request("GET", f"{scheme}://localhost:{server.port}/")
            response = await http.send(request, stream=True)
        finally:
            STREAM_CUT.reset(token)
        assert cut.cut is not None
        read = response.extensions["router.read_body"]
        assert await read() == b"first"
        failed: list[BaseException] = []

        async def reader() -> None:
            try:
                await read()
            except httpx.ReadError as exc:
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            cut.cut()
        assert trio.current_time() - start < 1.0
        assert len(failed) == 1
        await response.aclose()
        cut.cut()  # a cut after the exchange ended touches nothing
        again = await http.get(f"{scheme}://localhost:{server.port}/")
        assert again.content == b"again"
    assert server.accepted == 2


async def test_a_cut_misses_a_reader_that_is_not_parked(serve):
    # Cut while nobody waits on the socket: nothing happens, the body reads on.
    server = await serve(answer(Reply([CHUNKED_HEAD + b"3\r\none\r\n", b"3\r\ntwo\r\n0\r\n\r\n"])))
    transport = RouterTransport()
    cut = ReadCut()
    async with LeanClient(transport=transport) as http:
        token = STREAM_CUT.set(cut)
        try:
            response = await http.send(
                http.build_request("GET", f"http://127.0.0.1:{server.port}/"), stream=True
            )
        finally:
            STREAM_CUT.reset(token)
        read = response.extensions["router.read_body"]
        pieces = [await read()]
        assert cut.cut is not None
        cut.cut()
        while piece := await read():
            pieces.append(piece)
        assert b"".join(pieces) == b"onetwo"
        await response.aclose()
