"""The wire-protocol interface: what an HTTP provider kind must supply.

A `WireProtocol` is sans-IO: it turns a `ChatRequest` into a `WireRequest` (method,
URL, headers, body bytes), a 2xx body into a `ChatResponse`, a non-2xx answer into a
classified `ProviderError`, and SSE events into normalised `StreamChunk`s. It never
opens a socket, sleeps or reads a clock of its own (time comes in as `now`, the wall
clock in seconds since the epoch, for HTTP-date and RFC 3339 retry headers), so each
kind is tested with plain function calls. `router._http.HttpProvider` does the I/O.

`headers` arguments are case-insensitive mappings (`httpx.Headers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import msgspec

from ._errors import ProviderError
from ._secrets import mask_url
from ._types import ChatRequest, ChatResponse, StreamChunk

__all__ = ["SseEvent", "StreamDecoder", "WireProtocol", "WireRequest"]


class WireRequest(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    dropped: tuple[str, ...] = ()
    """Request fields the protocol had to leave out by its upstream's own rules (the
    response's `dropped_params` names them, so nothing vanishes unsaid)."""

    def __repr__(self) -> str:  # headers carry the secret; the URL may carry others
        return f"WireRequest(method={self.method!r}, url={mask_url(self.url)!r})"


class SseEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One server-sent event: its `event` name ("message" when unnamed) and `data`."""

    event: str = "message"
    data: str = ""


class StreamDecoder(Protocol):
    """Turns one stream's SSE events into chunks. Raises `ProviderError` (transient)
    on a malformed event, or the classified error an in-stream error event carries."""

    def feed(self, event: SseEvent) -> list[StreamChunk]: ...

    @property
    def done(self) -> bool:
        """The stream's end marker was seen ([DONE], message_stop, ...)."""
        ...

    @property
    def finished(self) -> bool:
        """A finish reason was seen (the answer is whole even if the end marker is not)."""
        ...


class WireProtocol(Protocol):
    name: str

    def build(
        self,
        request: ChatRequest,
        *,
        base_url: str,
        secret: str,
        stream: bool,
        headers: Mapping[str, str],
    ) -> WireRequest: ...

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> ChatResponse: ...

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float
    ) -> ProviderError: ...

    def stream_decoder(self) -> StreamDecoder: ...
