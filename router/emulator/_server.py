"""The emulator's HTTP/1.1 server (h11 on trio) and its `Emulator` handle.

Each accepted connection runs in its own task and serves requests one after another
(keep-alive). While a response is being produced, a watcher task reads the socket: when
the client goes away it cancels the response and marks the call `disconnected`.

A path that is no API route gets a route 404 (a JSON error naming no model, or with
`html_404` an HTML page, as a web server behind a wrong base_url answers). API paths
are matched by their ending, so any base-path prefix is accepted, unless
`strict_paths`: then only the providers' own paths are routes.
"""

from __future__ import annotations

import html
import logging
import random
import re
import socket
import struct
import traceback
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import msgspec
import trio

from router.emulator._faults import EmulatorCall, Fault
from router.emulator._protocols import (
    Answer,
    BadRequest,
    Frame,
    Framer,
    Json,
    Parsed,
    Protocol,
    answer_json,
    build_answer,
    embed_json,
    error_body,
    error_frame,
    next_id,
    parse_anthropic,
    parse_gemini,
    parse_gemini_embed,
    parse_openai,
    parse_openai_embed,
    reason,
    stream_frames,
)

__all__ = ["Emulator"]

log = logging.getLogger("router.emulator")

_encode = msgspec.json.Encoder().encode
_READ_SIZE = 65536
_MAX_BODY = 64 * 1024 * 1024
_NO_FAULT = Fault()
_JSON = b"application/json"
_GEMINI_PATH = re.compile(
    r"/models/([^:]+):(generateContent|streamGenerateContent|batchEmbedContents)$"
)
_STRICT_GEMINI_PATH = re.compile(
    r"/v1(?:beta)?/models/([^:/]+):(generateContent|streamGenerateContent|batchEmbedContents)"
)
_STRICT_ROUTES: dict[str, Protocol] = {
    "/v1/chat/completions": "openai",
    "/v1/embeddings": "openai_embed",
    "/v1/messages": "anthropic",
    "/v1/messages/count_tokens": "anthropic_count",
}
_HTML = b"text/html; charset=utf-8"
Headers = list[tuple[bytes, bytes]]
ScriptKey = tuple[str | None, str | None]


class _ScriptBody(msgspec.Struct, kw_only=True):
    key: str | None = None
    model: str | None = None
    faults: list[Fault] = msgspec.field(default_factory=list)


class _KeysBody(msgspec.Struct, kw_only=True):
    keys: list[str] | None = None


class _TooLarge(Exception):
    pass


class _Connection:
    """One client connection: its stream, its h11 state and the call being answered."""

    __slots__ = ("call", "h11", "out", "peer_closed", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER)
        self.call: EmulatorCall | None = None
        self.peer_closed = False
        self.out = bytearray()

    def queue(self, event: h11.Response | h11.Data | h11.EndOfMessage) -> None:
        data = self.h11.send(event)
        if data:
            self.out += data

    async def flush(self) -> None:
        if self.out:
            data = bytes(self.out)
            self.out.clear()
            await self.stream.send_all(data)


def _route(path: str, *, strict: bool = False) -> tuple[Protocol, str, bool] | None:
    """(protocol, model named by the path, gemini stream method) for an API path. Any
    prefix is accepted unless `strict` (then only the providers' own paths)."""
    if strict:
        protocol = _STRICT_ROUTES.get(path)
        if protocol is not None:
            return protocol, "", False
        match = _STRICT_GEMINI_PATH.fullmatch(path)
        if match is None:
            return None
        return _gemini_route(match)
    if path.endswith("/chat/completions"):
        return "openai", "", False
    if path.endswith("/embeddings"):
        return "openai_embed", "", False
    if path.endswith("/v1/messages/count_tokens"):
        return "anthropic_count", "", False
    if path.endswith("/v1/messages"):
        return "anthropic", "", False
    match = _GEMINI_PATH.search(path)
    if match is not None:
        return _gemini_route(match)
    return None


def _gemini_route(match: re.Match[str]) -> tuple[Protocol, str, bool]:
    if match.group(2) == "batchEmbedContents":
        return "gemini_embed", match.group(1), False
    return "gemini", match.group(1), match.group(2) == "streamGenerateContent"


def _not_found_page(method: str, path: str) -> bytes:
    """A web server's 404 page (Google's front end answers a wrong path like this)."""
    shown = html.escape(f"{method} {path}")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<title>Error 404 (Not Found)!!1</title></head><body>"
        f"<p><b>404.</b> <ins>That's an error.</ins></p><p>The requested URL <code>{shown}"
        "</code> was not found on this server. <ins>That's all we know.</ins></p>"
        "</body></html>\n"
    ).encode()


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else value


def _key(protocol: Protocol, headers: dict[str, str], query: dict[str, list[str]]) -> str | None:
    if protocol in ("openai", "openai_embed"):
        key = _bearer(headers)
        return key if key is not None else headers.get("api-key")
    if protocol in ("gemini", "gemini_embed"):
        key = headers.get("x-goog-api-key")
        if key is None and query.get("key"):
            key = query["key"][0]
        return key
    key = headers.get("x-api-key")
    return key if key is not None else _bearer(headers)


class Emulator:
    """A loopback server speaking the OpenAI, Anthropic and Gemini APIs, with faults.

    Start it with ``async with Emulator.serve() as emu:``; point clients at `emu.url`;
    queue faults with `script`; inspect `calls`.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.calls: list[EmulatorCall] = []
        self.valid_keys: set[str] | None = None
        self.strict_paths = False
        """Only the providers' own API paths are routes (/v1/chat/completions,
        /v1/messages, /v1/messages/count_tokens, /v1beta/models/M:generateContent ...);
        by default any base-path prefix before them is accepted."""
        self.html_404 = False
        """Answer a path that is no route with an HTML page instead of a JSON error."""
        self.errors: list[str] = []
        self.connections_accepted = 0
        """TCP connections accepted so far (to check that clients reuse them)."""
        """Tracebacks of unexpected server errors (a healthy run leaves this empty)."""
        self._scripts: dict[ScriptKey, deque[Fault]] = {}
        self._random = random.Random()

    @classmethod
    @asynccontextmanager
    async def serve(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        valid_keys: Iterable[str] | None = None,
        strict_paths: bool = False,
        html_404: bool = False,
    ) -> AsyncIterator[Emulator]:
        """Listen on host:port (0 = any free port) and serve until the block exits.
        `strict_paths` and `html_404` set the attributes of the same names."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        for extra in listeners[1:]:
            await extra.aclose()
        listener = listeners[0]
        bound: Any = listener.socket.getsockname()
        shown = f"[{host}]" if ":" in host else host
        emulator = cls(f"http://{shown}:{int(bound[1])}")
        if valid_keys is not None:
            emulator.valid_keys = set(valid_keys)
        emulator.strict_paths = strict_paths
        emulator.html_404 = html_404
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, emulator._handle, [listener])
            try:
                yield emulator
            finally:
                nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------ scripting

    def script(
        self, faults: Fault | Iterable[Fault], *, key: str | None = None, model: str | None = None
    ) -> None:
        """Append faults to the FIFO queue for (key, model); None matches any."""
        queue = self._scripts.setdefault((key, model), deque())
        if isinstance(faults, Fault):
            queue.append(faults)
        else:
            queue.extend(faults)

    def pending(self, *, key: str | None = None, model: str | None = None) -> int:
        """How many faults are still queued for exactly (key, model)."""
        return len(self._scripts.get((key, model), ()))

    def reset(self) -> None:
        """Forget every scripted fault and every recorded call."""
        self._scripts.clear()
        self.calls.clear()

    def _take_fault(self, key: str | None, model: str) -> Fault | None:
        if not self._scripts:
            return None
        for candidate in ((key, model), (key, None), (None, model), (None, None)):
            queue = self._scripts.get(candidate)
            if queue:
                return queue.popleft()
        return None

    # ------------------------------------------------------------------ connections

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections_accepted += 1
        conn = _Connection(stream)
        try:
            async with stream:
                while await self._cycle(conn):
                    conn.h11.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            self.errors.append(traceback.format_exc())
            log.exception("emulator connection failed")

    async def _cycle(self, conn: _Connection) -> bool:
        """Serve one request on the connection; True to keep the connection open."""
        try:
            received = await self._read_request(conn)
        except (h11.RemoteProtocolError, _TooLarge) as exc:
            status = 413 if isinstance(exc, _TooLarge) else exc.error_status_hint
            if conn.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                error = error_body("openai", status, None, "", str(exc) or "Request too large.")
                await self._send_body(conn, None, status, _encode(error), [], close=True)
            return False
        if received is None:
            return False
        request, body = received
        conn.call = None
        keep = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, conn, nursery.cancel_scope)
            try:
                keep = await self._respond(conn, request, body)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if conn.call is not None and not conn.call.completed:
                    conn.call.disconnected = True
            nursery.cancel_scope.cancel()
        if conn.peer_closed or not keep:
            return False
        return conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE

    async def _read_request(self, conn: _Connection) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                if conn.h11.they_are_waiting_for_100_continue:
                    continue_event = h11.InformationalResponse(status_code=100, headers=[])
                    await conn.stream.send_all(conn.h11.send(continue_event) or b"")
                try:
                    data = await conn.stream.receive_some(_READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                conn.h11.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > _MAX_BODY:
                    raise _TooLarge
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, b"".join(chunks)
            else:  # ConnectionClosed, or PAUSED (which cannot happen before a request)
                return None

    async def _watch(self, conn: _Connection, scope: trio.CancelScope) -> None:
        """Read the socket while a response is produced; cancel it if the client leaves."""
        while True:
            try:
                data = await conn.stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                conn.peer_closed = True
                if conn.call is not None and not conn.call.completed:
                    conn.call.disconnected = True
                scope.cancel()
                return
            conn.h11.receive_data(data)  # a pipelined request, kept for the next cycle

    # ------------------------------------------------------------------ requests

    async def _respond(self, conn: _Connection, request: h11.Request, raw: bytes) -> bool:
        split = urlsplit(request.target.decode("latin-1"))
        path = split.path
        method = request.method.decode("latin-1")
        if path.startswith("/_emulator/"):
            return await self._admin(conn, method, path, raw)
        route = _route(path, strict=self.strict_paths)
        if route is None:  # a route 404: its answer names no model
            if self.html_404:
                page = _not_found_page(method, path)
                return await self._send_body(conn, None, 404, page, [], content_type=_HTML)
            body = error_body("openai", 404, "bad_request", "", f"Unknown path: {path}")
            return await self._send_body(conn, None, 404, _encode(body), [])
        protocol, path_model, gemini_stream = route
        if method != "POST":
            body = error_body(protocol, 405, "bad_request", "", f"Method {method} not allowed.")
            return await self._send_body(conn, None, 405, _encode(body), [])

        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in request.headers
        }
        query = parse_qs(split.query)
        key = _key(protocol, headers, query)
        try:
            decoded = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            decoded = None
        body_json: Json = decoded if isinstance(decoded, dict) else {}
        model = path_model or body_json.get("model") or ""
        if not isinstance(model, str):
            model = ""
        stream = (
            gemini_stream
            if protocol in ("gemini", "gemini_embed")
            else body_json.get("stream") is True and protocol != "openai_embed"
        )
        call = EmulatorCall(
            protocol=protocol,
            path=path,
            key=key,
            model=model,
            stream=stream and protocol != "anthropic_count",
            body=body_json,
            time=trio.current_time(),
            headers=headers,
        )
        self.calls.append(call)
        conn.call = call

        if self.valid_keys is not None and key not in self.valid_keys:
            return await self._error(conn, call, protocol, 401, "auth", None)
        if protocol in ("anthropic", "anthropic_count") and "anthropic-version" not in headers:
            message = "anthropic-version: header is required"
            return await self._error(conn, call, protocol, 400, "bad_request", message)
        if not isinstance(decoded, dict):
            message = (
                "We could not parse the JSON body of your request: expected a JSON object."
                if protocol in ("openai", "openai_embed")
                else "There was an error parsing the body of your request: invalid JSON."
                if protocol not in ("gemini", "gemini_embed")
                else "Invalid JSON payload received."
            )
            return await self._error(conn, call, protocol, 400, "bad_request", message)
        try:
            if protocol == "openai":
                parsed = parse_openai(body_json)
            elif protocol == "openai_embed":
                parsed = parse_openai_embed(body_json)
            elif protocol == "gemini_embed":
                parsed = parse_gemini_embed(body_json, model)
            elif protocol == "gemini":
                parsed = parse_gemini(body_json, model, stream=stream)
            else:
                parsed = parse_anthropic(body_json, count=protocol == "anthropic_count")
        except BadRequest as exc:
            return await self._error(conn, call, protocol, exc.status, exc.kind, exc.message)

        fault = self._take_fault(key, model)
        call.fault = fault
        sse = protocol != "gemini" or query.get("alt", [""])[0] == "sse"
        return await self._answer(conn, call, protocol, parsed, fault, sse)

    def _base_headers(self, protocol: Protocol) -> Headers:
        if protocol in ("openai", "openai_embed"):
            return [(b"x-request-id", b"req_emu%d" % next_id())]
        if protocol in ("anthropic", "anthropic_count"):
            return [(b"request-id", b"req_emu%d" % next_id())]
        return []

    async def _error(
        self,
        conn: _Connection,
        call: EmulatorCall,
        protocol: Protocol,
        status: int,
        kind: str,
        message: str | None,
    ) -> bool:
        body = error_body(protocol, status, kind, call.model, message)
        headers = self._base_headers(protocol)
        return await self._send_body(conn, call, status, _encode(body), headers)

    async def _answer(
        self,
        conn: _Connection,
        call: EmulatorCall,
        protocol: Protocol,
        parsed: Parsed,
        fault: Fault | None,
        sse: bool,
    ) -> bool:
        f = fault or _NO_FAULT
        headers = self._base_headers(protocol)
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in f.headers.items()]
        delay = f.latency + (self._random.uniform(0.0, f.jitter) if f.jitter > 0 else 0.0)
        if delay > 0:
            await trio.sleep(delay)
        if f.hang:
            await trio.sleep_forever()
        if f.reset_before_head:
            # Linger 0: closing the socket (when this returns False) sends an RST.
            linger = struct.pack("ii", 1, 0)
            conn.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            call.completed = True
            return False

        in_stream_error = parsed.stream and f.status >= 400 and f.cut_after_chunks is not None
        if (f.status >= 400 and not in_stream_error) or f.body is not None:
            if isinstance(f.body, str):
                data = f.body.encode()
                is_json = f.body.lstrip()[:1] in ("{", "[")
                content_type = _JSON if is_json else b"text/plain; charset=utf-8"
            else:
                payload = f.body or error_body(protocol, f.status, f.error, parsed.model)
                data, content_type = _encode(payload), _JSON
            return await self._send_body(
                conn,
                call,
                f.status,
                data,
                headers,
                close_mid=f.close_mid_body,
                content_type=content_type,
            )

        if protocol == "anthropic_count":
            payload = {"input_tokens": parsed.prompt_tokens}
        elif protocol in ("openai_embed", "gemini_embed"):
            payload = embed_json(protocol, parsed)
        else:
            answer = build_answer(parsed, fault)
            if parsed.stream:
                error: Json | None = None
                if in_stream_error:
                    error = error_body(protocol, f.status, f.error, parsed.model)
                return await self._send_stream(
                    conn, call, protocol, answer, parsed, f, headers, sse, error
                )
            payload = answer_json(protocol, answer, parsed.model)
        data = _encode(payload)
        if f.malformed_json:
            data = data[: len(data) // 2]
        return await self._send_body(
            conn, call, f.status, data, headers, close_mid=f.close_mid_body
        )

    # ------------------------------------------------------------------ writing

    async def _send_body(
        self,
        conn: _Connection,
        call: EmulatorCall | None,
        status: int,
        data: bytes,
        headers: Headers,
        *,
        close_mid: bool = False,
        close: bool = False,
        content_type: bytes = _JSON,
    ) -> bool:
        """Send a whole response (or, with close_mid, its head and half its body)."""
        all_headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(data)).encode()),
            *headers,
        ]
        if close_mid or close:
            all_headers.append((b"connection", b"close"))
        if call is not None:
            call.status = status
        conn.queue(h11.Response(status_code=status, headers=all_headers, reason=reason(status)))
        if close_mid:
            conn.queue(h11.Data(data=data[: len(data) // 2]))
        else:
            conn.queue(h11.Data(data=data))
            conn.queue(h11.EndOfMessage())
        await conn.flush()
        if call is not None:
            call.completed = True
        return not (close_mid or close)

    async def _send_stream(
        self,
        conn: _Connection,
        call: EmulatorCall,
        protocol: Protocol,
        answer: Answer,
        parsed: Parsed,
        f: Fault,
        headers: Headers,
        sse: bool,
        error: Json | None,
    ) -> bool:
        if f.raw_stream is not None:
            frames = [_raw_frame(item) for item in f.raw_stream]
        else:
            frames = stream_frames(protocol, answer, parsed)
        if not sse:
            frames.append(Frame("end", None, b""))
        framer = Framer(sse=sse, crlf=protocol == "gemini")
        cut = f.cut_after_chunks
        abort_at = sum(fr.kind == "content" for fr in frames) // 2 if f.close_mid_body else None
        closing = f.close_mid_body or cut is not None or f.finish_without_end
        all_headers = [
            (b"content-type", b"text/event-stream" if sse else _JSON),
            (b"cache-control", b"no-cache"),
            *headers,
        ]
        if closing:
            all_headers.append((b"connection", b"close"))
        call.status = 200
        conn.queue(h11.Response(status_code=200, headers=all_headers, reason=b"OK"))
        start = framer.start()
        if start:
            conn.queue(h11.Data(data=start))

        sent = 0
        stalled = False
        malformed = f.malformed_json
        for frame in frames:
            if frame.kind != "meta":
                if abort_at is not None and (frame.kind != "content" or sent >= abort_at):
                    await conn.flush()  # no terminating chunk: the body is cut short
                    call.completed = True
                    return False
                if cut is not None and (frame.kind != "content" or sent >= cut):
                    if error is not None:
                        conn.queue(h11.Data(data=framer.frame(error_frame(protocol, error))))
                    break
                if frame.kind in ("content", "finish"):
                    stall_at = f.stall_after_chunks
                    if stall_at is not None and not stalled and sent >= stall_at:
                        stalled = True
                        await conn.flush()
                        await trio.sleep(f.stall_seconds)
                    if f.chunk_interval > 0 and (sent > 0 or frame.kind == "finish"):
                        await conn.flush()
                        await trio.sleep(f.chunk_interval)
                    if malformed:
                        malformed = False
                        bad = Frame("content", frame.event, frame.data[: len(frame.data) // 2])
                        conn.queue(h11.Data(data=framer.frame(bad)))
                if frame.kind == "end" and f.finish_without_end:
                    continue
            conn.queue(h11.Data(data=framer.frame(frame)))
            if frame.kind == "content":
                sent += 1
            elif frame.kind == "finish" and f.finish_then_drop:
                await conn.flush()  # then close: no end marker, no terminating chunk
                call.completed = True
                return False
        conn.queue(h11.EndOfMessage())
        await conn.flush()
        call.completed = True
        return not closing

    # ------------------------------------------------------------------ admin

    async def _admin(self, conn: _Connection, method: str, path: str, raw: bytes) -> bool:
        status = 200
        payload: Any
        try:
            if path == "/_emulator/calls" and method == "GET":
                payload = self.calls
            elif path == "/_emulator/script" and method == "POST":
                script = msgspec.json.decode(raw, type=_ScriptBody)
                self.script(script.faults, key=script.key, model=script.model)
                queued = self.pending(key=script.key, model=script.model)
                payload = {"ok": True, "queued": queued}
            elif path == "/_emulator/reset" and method == "POST":
                self.reset()
                payload = {"ok": True}
            elif path == "/_emulator/valid_keys" and method == "POST":
                keys = msgspec.json.decode(raw, type=_KeysBody).keys
                self.valid_keys = None if keys is None else set(keys)
                payload = {"ok": True}
            else:
                status, payload = 404, {"error": f"unknown admin endpoint: {method} {path}"}
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            status, payload = 400, {"error": str(exc)}
        return await self._send_body(conn, None, status, _encode(payload), [])


def _raw_frame(item: str) -> Frame:
    """A scripted SSE event: "payload", or "event-name|payload" (Anthropic)."""
    name, bar, payload = item.partition("|")
    if bar and name and " " not in name and not name.startswith("{"):
        return Frame("content", name, payload.encode())
    return Frame("content", None, item.encode())
