"""Request and response records (msgspec Structs), and the API key handle.

These are plain data: no I/O, no routing logic. `ApiKey` is the only place a secret
lives after config loading, and its repr never shows it.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "ApiKey",
    "Attempt",
    "ChatRequest",
    "ChatResponse",
    "Message",
    "StreamChunk",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
]

Role = Literal["system", "user", "assistant", "tool"]

# An attempt's outcome: "ok", one of the error kinds, "timeout" folded into
# "transient", or "cancelled" (the caller went away) / "deadline".
AttemptOutcome = str


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A function call the model asked for."""

    id: str
    name: str
    arguments: str = "{}"
    """The arguments as JSON text, as the model wrote them."""


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    """A function the model may call: its name, description and JSON-schema parameters."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class Message(msgspec.Struct, frozen=True):
    """One chat message.

    An assistant message may carry `tool_calls` (its `content` may then be empty); a
    ``role="tool"`` message answers the call named by `tool_call_id`.
    """

    role: Role
    content: str
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ChatRequest(msgspec.Struct, kw_only=True):
    """A chat request as the caller submits it.

    `model` is a configured model alias or `provider/upstream-id`. `fallbacks` extends
    the chain for this request only. `timeout` is the end-to-end deadline in seconds
    across every retry and fallback (defaults to the router's `timeout`). `tenant`
    selects per-tenant breakers when they are enabled.
    """

    model: str
    messages: list[Message]
    fallbacks: list[str] = msgspec.field(default_factory=list)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    timeout: float | None = None
    tenant: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    tools: list[Tool] | None = None
    tool_choice: str | None = None
    """"auto", "none", "required", or the name of one tool."""


class Usage(msgspec.Struct, kw_only=True):
    """Token usage as the provider reported it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One upstream call made (or abandoned) while serving a request."""

    model: str
    """The chain entry (alias or `provider/upstream-id`) this attempt served."""
    provider: str
    key_id: str
    outcome: AttemptOutcome
    """"ok", an error kind, "cancelled" or "deadline"."""
    duration: float
    """Seconds from sending to the outcome."""
    status: int | None = None
    backoff: float = 0.0
    """Seconds the key actor waited before this attempt (a retry's backoff)."""


class ChatResponse(msgspec.Struct, kw_only=True):
    """A completed chat answer.

    Providers fill `content`, `finish_reason`, `usage` (and may fill `upstream_model`);
    the router fills `model`, `provider`, `key_id` and `attempts`.
    """

    content: str
    finish_reason: str = "stop"
    """stop, length, tool_calls or content_filter."""
    usage: Usage = msgspec.field(default_factory=Usage)
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)
    model: str = ""
    upstream_model: str = ""
    provider: str = ""
    key_id: str = ""
    attempts: list[Attempt] = msgspec.field(default_factory=list)


class ToolCallDelta(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of a streamed tool call; pieces with the same `index` concatenate."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class StreamChunk(msgspec.Struct, frozen=True, kw_only=True):
    """One normalised piece of a streamed answer.

    `text` and `tool_calls` are deltas; `finish_reason` comes once, near the end;
    `usage`, when the provider reports it, comes with the last chunk.
    """

    text: str = ""
    tool_calls: list[ToolCallDelta] = msgspec.field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None

    @property
    def has_content(self) -> bool:
        return bool(self.text or self.tool_calls)


class ApiKey:
    """A provider key: its public `id` and its secret.

    The secret is only handed to providers through `.secret`; `repr()` and `str()`
    show the id alone so that a key can be logged or put in an error safely.
    """

    __slots__ = ("_secret", "id", "provider")

    def __init__(self, provider: str, id: str, secret: str) -> None:
        self.provider = provider
        self.id = id
        self._secret = secret

    @property
    def secret(self) -> str:
        return self._secret

    def __repr__(self) -> str:
        return f"ApiKey(provider={self.provider!r}, id={self.id!r}, secret='***')"

    __str__ = __repr__
