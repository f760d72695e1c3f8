"""The emulator's public records: a scripted `Fault` and a recorded `EmulatorCall`."""

from __future__ import annotations

from typing import Any

import msgspec

from router._types import ToolCall, Usage

__all__ = ["EmulatorCall", "Fault"]


class Fault(msgspec.Struct, kw_only=True):
    """What to do to one request instead of (or on top of) answering it normally.

    Every field is optional; a default `Fault()` yields the normal answer. Fields that
    make no sense for the request (stream faults on a non-stream request) are ignored.
    """

    status: int = 200
    """HTTP status. A status >= 400 answers with an error body for the protocol."""
    body: str | dict[str, Any] | None = None
    """Response body: a dict is sent as JSON, a str as is. None -> a realistic default
    error body for the protocol and status (or the normal answer for a 2xx)."""
    error: str | None = None
    """Which default error body to use, when `body` is None: rate_limit, quota, auth,
    permission, model_not_found, context_length, max_tokens_limit, content_filter,
    bad_request, too_large, server, bad_gateway, unavailable, overloaded, timeout.
    None -> derived from `status`."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra response headers (e.g. retry-after, x-ratelimit-reset-requests)."""
    latency: float = 0.0
    """Seconds to wait before the response head."""
    jitter: float = 0.0
    """Up to this many extra random seconds before the response head."""
    hang: bool = False
    """Never answer; hold the connection until the client goes away."""
    reset_before_head: bool = False
    """Never answer: reset the connection (TCP RST) once the request is read, before
    any response byte."""
    close_mid_body: bool = False
    """Send the head and part of the body, then close the connection."""
    cut_after_chunks: int | None = None
    """Stream: end after N content chunks with neither finish reason nor end marker.
    With an error `status`, an in-stream error event is sent at that point instead."""
    stall_after_chunks: int | None = None
    """Stream: pause for `stall_seconds` after N content chunks."""
    stall_seconds: float = 0.0
    chunk_interval: float = 0.0
    """Stream: seconds to sleep between chunks."""
    malformed_json: bool = False
    """A 2xx with a truncated JSON body; in a stream, one invalid JSON data line."""
    finish_without_end: bool = False
    """Stream: send the finish reason but not the end marker, then end the response
    properly (the terminating chunk) and close."""
    finish_then_drop: bool = False
    """Stream: send the finish-reason chunk, then drop the connection: no usage chunk,
    no end marker, no terminating chunk (the client sees an incomplete body)."""
    reply: str | None = None
    """Answer with this text instead of the echo."""
    tool_calls: list[ToolCall] | None = None
    """Answer with these tool calls (finish reason tool_calls / tool_use)."""
    usage: Usage | None = None
    """Report this usage instead of the word counts."""
    finish_reason: str | None = None
    """Report this protocol-native finish reason verbatim (e.g. "content_filter",
    "refusal", "SAFETY") instead of the computed one."""
    reasoning: str | None = None
    """The answer also carries this reasoning (thinking) text, in the protocol's own
    shape (OpenAI-compatible `reasoning_content`, Anthropic thinking blocks, Gemini
    thought parts)."""
    raw_stream: list[str] | None = None
    """Stream exactly these SSE data payloads (for Anthropic as `event: NAME\ndata: ...`
    pairs given as "NAME|payload"), then end the body: for published shapes the
    emulator does not build itself."""


class EmulatorCall(msgspec.Struct, kw_only=True):
    """One API request the emulator received (admin requests are not recorded)."""

    protocol: str
    """"openai", "anthropic", "anthropic_count", "gemini", "openai_embed" or
    "gemini_embed"."""
    path: str
    key: str | None
    """The API key string received, or None when the request carried none."""
    model: str
    stream: bool
    body: dict[str, Any]
    """The parsed JSON body ({} when it did not parse as a JSON object)."""
    time: float
    """`trio.current_time()` when the request was fully received."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Request headers, names lower-cased."""
    status: int = 0
    """The HTTP status answered (0 until the head is sent)."""
    fault: Fault | None = None
    """The scripted fault this request consumed, if any."""
    completed: bool = False
    """The server finished writing the response (including a deliberately cut one)."""
    disconnected: bool = False
    """The client closed the connection before the response finished."""
