"""An incremental server-sent-events parser (the WHATWG "event stream" format).

`SseParser` is fed the response body in whatever pieces the transport hands over and
returns the events completed by each piece. It follows the spec's parsing rules:

- lines end with CRLF, LF or CR; a CR that ends one piece and an LF that starts the
  next are one line ending, not two;
- a line starting with ":" is a comment (servers use them as keep-alives) and is
  skipped;
- ``field:value`` with one optional space after the colon removed; a line without a
  colon is a field with an empty value;
- ``data`` lines accumulate, joined with "\\n"; ``event`` names the event ("message"
  when unnamed); ``id`` is remembered in `last_event_id`; ``retry`` and unknown fields
  are ignored;
- a blank line dispatches the event; an event with no ``data`` line is not dispatched;
- a leading UTF-8 byte-order mark is dropped; invalid UTF-8 is replaced, not raised.

At end of stream, an event that was not followed by a blank line is incomplete and,
as the spec requires, discarded: `close()` returns no event for it (check `pending`
before closing to know whether something was dropped). Upstreams that end without the
final blank line lose at most that last event, and every decoder in this package
treats a stream without its end marker or finish reason as truncated.

This module never does I/O and never interprets event payloads; the wire protocols'
stream decoders do that.
"""

from __future__ import annotations

import re
from typing import Final

from ._wire import SseEvent

__all__ = ["SseParser"]

_LINE_END: Final = re.compile(rb"\r\n|\r|\n")
_BOM: Final = b"\xef\xbb\xbf"


class SseParser:
    """Incremental SSE parser: ``events = parser.feed(chunk)`` for every body chunk,
    then ``parser.close()`` at end of stream."""

    __slots__ = ("_buffer", "_data", "_event", "_skip_lf", "_started", "last_event_id")

    def __init__(self) -> None:
        self._buffer = b""
        self._skip_lf = False  # the previous piece ended with CR: a leading LF is its pair
        self._started = False  # the byte-order-mark check is done
        self._event = ""
        self._data: list[str] = []
        self.last_event_id = ""
        """The last ``id`` field seen (for a reconnecting client's Last-Event-ID)."""

    @property
    def pending(self) -> bool:
        """Part of an event (or of a line) has been read but not yet dispatched."""
        return bool(self._buffer or self._data or self._event)

    def feed(self, data: bytes) -> list[SseEvent]:
        """Parse the next piece of the stream; return the events it completes."""
        if not data:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        buffer = self._buffer + data if self._buffer else data
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._buffer = buffer  # might still become a byte-order mark
                return []
            self._started = True
            if buffer.startswith(_BOM):
                buffer = buffer[len(_BOM) :]
        if (  # one whole ``data:`` event and nothing else (a token, streamed alone)
            not self._data
            and buffer[:6] == b"data: "
            and buffer.find(b"\n") == len(buffer) - 2
            and buffer[-1:] == b"\n"
            and b"\r" not in buffer
        ):
            self._buffer = b""
            event = self._event or "message"
            self._event = ""
            return [SseEvent(event=event, data=buffer[6:-2].decode("utf-8", "replace"))]
        events: list[SseEvent] = []
        line = self._line
        if b"\r" not in buffer:  # LF endings only (nearly every upstream): split at once
            lines = buffer.split(b"\n")
            self._buffer = lines.pop()
            for raw in lines:
                line(raw, events)
            return events
        position = 0
        size = len(buffer)
        for match in _LINE_END.finditer(buffer):
            if match.end() == size and match.group() == b"\r":
                self._skip_lf = True
            line(buffer[position : match.start()], events)
            position = match.end()
        self._buffer = buffer[position:]
        return events

    def close(self) -> list[SseEvent]:
        """End of stream. An event not followed by a blank line is incomplete and is
        discarded (per the spec), so this returns no event; the parser is reset."""
        self._buffer = b""
        self._data = []
        self._event = ""
        self._skip_lf = False
        self._started = False
        return []

    def _line(self, raw: bytes, events: list[SseEvent]) -> None:
        if raw[:6] == b"data: ":  # the common line first
            self._data.append(raw[6:].decode("utf-8", "replace"))
            return
        if not raw:
            if self._data:
                events.append(SseEvent(event=self._event or "message", data="\n".join(self._data)))
            self._data = []
            self._event = ""
            return
        if raw[:1] == b":":
            return
        line = raw.decode("utf-8", "replace")
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self.last_event_id = value
        # "retry" and unknown fields are ignored: reconnection is not this parser's job.
