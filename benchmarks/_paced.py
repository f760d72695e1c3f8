"""Two small programs for the concurrent-streams benchmark (`scaling.py --sections streams`).

``python benchmarks/_paced.py upstream --port P --events 200 --interval 0.1``
    A minimal OpenAI-compatible upstream: every POST is answered with a stream of
    `--events` chat.completion.chunk events, one per `--interval` seconds, each in its
    own write (one token per upstream read, like a model decoding), then a finish
    event and ``data: [DONE]``; chunked transfer encoding, keep-alive. It is a single
    thread on `selectors` with non-blocking sockets and one timer heap, so 3,000 open
    streams (30,000 writes/s) cost it little CPU: the process under test, not the
    upstream, is what saturates. ``GET /stats`` returns the connections it accepted
    and the streams it started.

``python benchmarks/_paced.py client --url U --streams N --ramp S [--token T]``
    Opens N streams at once (their starts spread over S seconds) to an HTTP endpoint
    (the gateway, LiteLLM's proxy), one connection each, and reports as JSON the
    streams completed, events received, time to first event and the largest gap
    between two reads that carried events. It parses as little as it can (it counts
    ``data: {`` frames), so its own CPU stays small.
"""

from __future__ import annotations

import argparse
import heapq
import json
import selectors
import socket
import sys
import time
from typing import Any

# --------------------------------------------------------------------------- upstream


def _frame(payload: bytes) -> bytes:
    """One chunked-encoding chunk carrying `payload`."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(delta: str, finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-paced",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "delta": json.loads(delta), "finish_reason": finish},
        ],
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
)
FIRST = _frame(_event('{"role":"assistant","content":""}'))
TOKEN = _frame(_event('{"content":"tok "}'))
LAST = (
    _frame(
        _event("{}", "stop")
        + b'data: {"id":"chatcmpl-paced","object":"chat.completion.chunk","created":0,'
        b'"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":9,'
        b'"completion_tokens":200,"total_tokens":209}}\n\n' + b"data: [DONE]\n\n"
    )
    + b"0\r\n\r\n"
)


COMPLETION = json.dumps(
    {
        "id": "chatcmpl-held",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    },
    separators=(",", ":"),
).encode()
HELD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(COMPLETION),
    COMPLETION,
)


class _Conn:
    __slots__ = ("inbuf", "left", "outbuf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        self.left = 0  # token events still to send on the current stream


def upstream(port: int, events: int, interval: float, hold: float) -> None:
    sel = selectors.DefaultSelector()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(8192)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    timers: list[tuple[float, int, _Conn]] = []
    seq = 0
    stats = {"connections": 0, "streams": 0, "held": 0}

    def close(conn: _Conn) -> None:
        if conn.sock.fileno() >= 0:
            sel.unregister(conn.sock)
            conn.sock.close()

    def send(conn: _Conn, data: bytes) -> None:
        if conn.outbuf:
            conn.outbuf += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            close(conn)
            return
        if sent < len(data):
            conn.outbuf = data[sent:]
            sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def on_request(conn: _Conn) -> None:
        nonlocal seq
        while True:
            end = conn.inbuf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = conn.inbuf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(conn.inbuf) < end + 4 + length:
                return
            body = conn.inbuf[end + 4 : end + 4 + length]
            conn.inbuf = conn.inbuf[end + 4 + length :]
            if head.startswith("GET /stats"):
                body = json.dumps(stats).encode()
                send(
                    conn,
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body),
                )
                continue
            if b'"stream":true' not in body.replace(b" ", b""):
                stats["held"] += 1
                conn.left = -1  # one fixed answer when its timer fires
                seq += 1
                heapq.heappush(timers, (time.monotonic() + hold, seq, conn))
                continue
            stats["streams"] += 1
            conn.left = events
            send(conn, HEAD + FIRST)
            seq += 1
            heapq.heappush(timers, (time.monotonic() + interval, seq, conn))

    while True:
        timeout = max(0.0, timers[0][0] - time.monotonic()) if timers else None
        for key, mask in sel.select(timeout):
            if key.data is None:
                while True:
                    try:
                        sock, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    stats["connections"] += 1
                    sel.register(sock, selectors.EVENT_READ, _Conn(sock))
                continue
            conn = key.data
            if mask & selectors.EVENT_WRITE and conn.outbuf:
                try:
                    sent = conn.sock.send(conn.outbuf)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    close(conn)
                    continue
                conn.outbuf = conn.outbuf[sent:]
                if not conn.outbuf:
                    sel.modify(conn.sock, selectors.EVENT_READ, conn)
            if mask & selectors.EVENT_READ:
                try:
                    data = conn.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    close(conn)
                    continue
                conn.inbuf += data
                on_request(conn)
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            due, _, conn = heapq.heappop(timers)
            if conn.sock.fileno() < 0:
                continue
            if conn.left < 0:
                conn.left = 0
                send(conn, HELD)
                continue
            conn.left -= 1
            if conn.left > 0:
                send(conn, TOKEN)
                seq += 1
                heapq.heappush(timers, (due + interval, seq, conn))
            else:
                send(conn, TOKEN + LAST)


# --------------------------------------------------------------------------- client


async def _one_stream(
    host: str, port: int, request: bytes, delay: float, out: list[dict[str, Any]]
) -> None:
    import trio

    await trio.sleep(delay)
    rec: dict[str, Any] = {"events": 0, "ttfe": None, "gap": 0.0, "done": False}
    out.append(rec)
    try:
        sock = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        rec["error"] = f"connect: {exc}"
        return
    async with sock:
        start = time.monotonic()
        last = None
        await sock.send_all(request)
        tail = b""
        while True:
            try:
                data = await sock.receive_some(65536)
            except (trio.BrokenResourceError, OSError) as exc:
                rec["error"] = f"read: {exc}"
                return
            if not data:
                if not rec["done"]:
                    rec["error"] = "closed before [DONE]"
                return
            now = time.monotonic()
            seen = tail + data
            n = seen.count(b"data: {")
            if n:
                if last is None:
                    rec["ttfe"] = now - start
                else:
                    rec["gap"] = max(rec["gap"], now - last)
                last = now
                rec["events"] += n
            if b"[DONE]" in seen or b"message_stop" in seen:
                rec["done"] = True
                return
            tail = data[-16:]


async def _client(url: str, streams: int, ramp: float, token: str, model: str) -> dict[str, Any]:
    import trio

    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    body = json.dumps(
        {
            "model": model,
            "stream": True,
            "messages": [{"role": "user", "content": "Say hello."}],
        }
    ).encode()
    auth = f"authorization: Bearer {token}\r\n".encode() if token else b""
    request = (
        f"POST /{path} HTTP/1.1\r\nhost: {hostport}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n".encode()
        + auth
        + b"\r\n"
        + body
    )
    records: list[dict[str, Any]] = []
    cpu0 = time.process_time()
    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        for i in range(streams):
            nursery.start_soon(_one_stream, host, int(port), request, ramp * i / streams, records)
    errors = [r["error"] for r in records if "error" in r]
    return {
        "elapsed": time.monotonic() - t0,
        "client_cpu": time.process_time() - cpu0,
        "completed": sum(1 for r in records if r["done"]),
        "events": sum(r["events"] for r in records),
        "ttfe": sorted(r["ttfe"] for r in records if r["ttfe"] is not None),
        "gaps": sorted(r["gap"] for r in records if r["ttfe"] is not None),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    up = sub.add_parser("upstream")
    up.add_argument("--port", type=int, required=True)
    up.add_argument("--events", type=int, default=200)
    up.add_argument("--interval", type=float, default=0.1)
    up.add_argument("--hold", type=float, default=1.5)
    cl = sub.add_parser("client")
    cl.add_argument("--url", required=True)
    cl.add_argument("--streams", type=int, required=True)
    cl.add_argument("--ramp", type=float, default=2.0)
    cl.add_argument("--token", default="")
    cl.add_argument("--model", default="m")
    args = parser.parse_args()
    if args.role == "upstream":
        upstream(args.port, args.events, args.interval, args.hold)
    else:
        import trio

        report = trio.run(_client, args.url, args.streams, args.ramp, args.token, args.model)
        print(json.dumps(report))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
