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
    "AudioPart",
    "ChatRequest",
    "ChatResponse",
    "Choice",
    "ContentPart",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingUsage",
    "FilePart",
    "ImagePart",
    "Message",
    "ResponseFormat",
    "StreamChunk",
    "TextPart",
    "ThinkingBlock",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "message_text",
]

Role = Literal["system", "user", "assistant", "tool"]

# An attempt's outcome: "ok", one of the error kinds, "timeout" folded into
# "transient", "cancelled" (the caller went away) / "deadline", or after a hedge race
# "hedge_won" / "hedge_cancelled".
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
    cache_control: dict[str, Any] | None = None
    """Anthropic prompt caching of the tool definitions up to this one."""
    strict: bool | None = None
    """OpenAI strict function calling (arguments always match `parameters`)."""


class TextPart(msgspec.Struct, frozen=True, kw_only=True, tag="text", tag_field="type"):
    """Text inside a message's content parts."""

    text: str
    cache_control: dict[str, Any] | None = None
    """Anthropic prompt caching (``{"type": "ephemeral"}``): passed through to Anthropic;
    other providers cache by themselves and ignore it."""


class ImagePart(msgspec.Struct, frozen=True, kw_only=True, tag="image", tag_field="type"):
    """An image, by `url` (http(s)) or inline as base64 `data` with its `media_type`."""

    url: str | None = None
    data: str | None = None
    """Base64, without a ``data:`` prefix."""
    media_type: str | None = None
    """image/png, image/jpeg, image/gif or image/webp."""
    detail: str | None = None
    """OpenAI's low / high / auto."""
    cache_control: dict[str, Any] | None = None


class FilePart(msgspec.Struct, frozen=True, kw_only=True, tag="file", tag_field="type"):
    """A document (a PDF, a text file), inline as base64 `data`, by `url`, or by a
    provider's own `file_id`."""

    data: str | None = None
    url: str | None = None
    file_id: str | None = None
    media_type: str | None = None
    filename: str | None = None
    cache_control: dict[str, Any] | None = None


class AudioPart(msgspec.Struct, frozen=True, kw_only=True, tag="audio", tag_field="type"):
    """Audio input, base64 `data` in `format` (wav, mp3, ...)."""

    data: str
    format: str


ContentPart = TextPart | ImagePart | FilePart | AudioPart
"""One part of a message's content (``{"type": ...}`` tells which)."""


class ThinkingBlock(msgspec.Struct, frozen=True, kw_only=True):
    """A model's visible reasoning, as its provider returned it. Anthropic signs its
    thinking blocks and requires them back, unchanged, in the next turn of a tool-use
    exchange; `protocol` records who made a block so that it is sent back only to the
    same kind of provider (and dropped, by rule, when the next turn goes elsewhere)."""

    text: str = ""
    signature: str | None = None
    redacted: str | None = None
    """An encrypted (redacted) thinking block's data."""
    protocol: str = ""
    """The wire protocol that produced it: "anthropic", "gemini", "openai"."""


class Message(msgspec.Struct, frozen=True):
    """One chat message.

    `content` is a string or a list of parts (text, image, file, audio). An assistant
    message may carry `tool_calls` (its `content` may then be empty), its `reasoning`
    text and its provider's `thinking` blocks; a ``role="tool"`` message answers the
    call named by `tool_call_id`.
    """

    role: Role
    content: str | list[ContentPart]
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None
    """An assistant message's reasoning text (OpenAI-compatible `reasoning_content`)."""
    thinking: list[ThinkingBlock] | None = None
    cache_control: dict[str, Any] | None = None
    """Anthropic prompt caching for a string `content` (parts carry their own)."""


def message_text(message: Message) -> str:
    """The text of a message: its string content, or its text parts joined."""
    content = message.content
    if type(content) is str:
        return content
    return "".join(p.text for p in content if isinstance(p, TextPart))


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True):
    """Structured output: ``type`` is "text", "json_object" (any JSON object) or
    "json_schema" with `json_schema` = ``{"name", "schema", "strict", "description"}``
    as in OpenAI's API."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


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
    """The caller's own annotations, kept with the request (never sent upstream; an
    OpenAI `metadata` for stored completions goes in `extra`)."""
    tools: list[Tool] | None = None
    tool_choice: str | None = None
    """"auto", "none", "required", or the name of one tool."""
    response_format: ResponseFormat | None = None
    seed: int | None = None
    n: int | None = None
    """Choices to generate (providers that cannot: refused, see `router._params`)."""
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    """The end user, for the provider's abuse monitoring."""
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    """"minimal", "low", "medium" or "high": OpenAI natively, Anthropic as a thinking
    budget, Gemini as a thinking budget (see `router._params`)."""
    service_tier: str | None = None
    prediction: dict[str, Any] | None = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    """Fields the router does not know, sent unchanged to OpenAI-compatible upstreams
    (like the SDK's `extra_body`); refused for other protocols unless dropped."""
    drop_params: bool | None = None
    """Drop (rather than refuse) what the serving provider cannot take; None: the
    router's (or the model's) `drop_params`."""


class Usage(msgspec.Struct, kw_only=True):
    """Token usage as the provider reported it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens read from the provider's cache (part of `prompt_tokens`)."""
    cache_creation_tokens: int = 0
    """Prompt tokens written to the provider's cache (Anthropic)."""
    reasoning_tokens: int = 0
    """Completion tokens spent on reasoning (part of `completion_tokens`)."""


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
    started: float = 0.0
    """Seconds from the request's start to this attempt's send (its backoff comes
    before it). Traces place each attempt by it."""


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
    reasoning: str | None = None
    """The model's reasoning text, where the provider returns it."""
    thinking: list[ThinkingBlock] | None = None
    """The provider's thinking blocks (send them back with the assistant turn)."""
    refusal: str | None = None
    system_fingerprint: str | None = None
    logprobs: Any = None
    """The provider's log probabilities, in OpenAI's shape."""
    stop_sequence: str | None = None
    """The stop sequence that ended the answer, where the provider says."""
    choices: list[Choice] | None = None
    """With ``n > 1``: every choice (the first is also this response's own fields)."""
    provider_fields: dict[str, Any] = msgspec.field(default_factory=dict)
    """Provider-specific extras (Gemini `safety_ratings`, ...), under their own names."""
    dropped_params: list[str] = msgspec.field(default_factory=list)
    """Request fields (or content part types) dropped because the serving model's
    protocol cannot take them and drop_params allowed it (see `router._params`)."""
    model: str = ""
    upstream_model: str = ""
    provider: str = ""
    key_id: str = ""
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    cost_usd: float | None = None
    """What the answer cost in USD, by the serving model's price (see `router._usage`);
    None when the model has no price."""


class Choice(msgspec.Struct, kw_only=True):
    """One of several choices (``n > 1``)."""

    index: int
    content: str
    finish_reason: str = "stop"
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)
    reasoning: str | None = None
    refusal: str | None = None
    logprobs: Any = None


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
    reasoning: str = ""
    """A delta of the model's reasoning text."""
    thinking: list[ThinkingBlock] | None = None
    """Complete thinking blocks (with their signatures), when the provider ends one."""
    refusal: str = ""
    logprobs: Any = None
    stop_sequence: str | None = None
    provider_fields: dict[str, Any] | None = None

    @property
    def has_content(self) -> bool:
        return bool(self.text or self.tool_calls or self.reasoning or self.refusal)


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """An embedding request: one text (`input` a string) or a batch (a list of strings).

    `model`, `fallbacks`, `timeout` and `tenant` mean what they mean for `ChatRequest`;
    the chain's models must be configured with ``mode = "embedding"`` (or named as
    `provider/upstream-id`). `dimensions` asks for shorter vectors where the model
    can give them. `encoding_format` is how the gateway writes the vectors back
    ("float", or "base64": little-endian float32); the library always returns floats.
    Token-array inputs are refused.
    """

    model: str
    input: str | list[str]
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    fallbacks: list[str] = msgspec.field(default_factory=list)
    timeout: float | None = None
    tenant: str | None = None

    @property
    def inputs(self) -> list[str]:
        """`input` as a list (a single string is a batch of one)."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingUsage(msgspec.Struct, kw_only=True):
    """Input tokens an embedding request used (an embedding has no output tokens)."""

    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingResponse(msgspec.Struct, kw_only=True):
    """The vectors, one per input and in input order. Providers fill `embeddings` and
    `usage`; the router fills `model`, `provider`, `key_id` and `attempts`."""

    embeddings: list[list[float]]
    usage: EmbeddingUsage = msgspec.field(default_factory=EmbeddingUsage)
    model: str = ""
    upstream_model: str = ""
    provider: str = ""
    key_id: str = ""
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    cost_usd: float | None = None
    """What the input cost in USD (None: the model has no price)."""


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
