"""Anthropic Messages shapes <-> the router's records (``POST /v1/messages``).

`parse_messages_body` turns a decoded Messages body into a `ChatRequest` (served by any
provider of the router) plus `MessagesOptions`, raising `BadBody` naming the field.
`message_json` renders a `ChatResponse` as a Messages answer, `MessageEvents` renders a
stream as Anthropic's SSE event sequence, and `anthropic_error` turns the gateway's
(OpenAI-shaped) error reply into Anthropic's error shape and status.

Translation rules (README, "Anthropic clients"):

- ``system`` (a string or text blocks) is a system message; ``tool_use`` blocks are the
  assistant message's `tool_calls`; each ``tool_result`` block is a ``role="tool"``
  message (its text blocks joined; ``is_error`` has no carrying field and is dropped);
  ``thinking`` / ``redacted_thinking`` blocks are `Message.thinking` with protocol
  "anthropic" (sent back to Anthropic models, dropped by rule for the others);
- ``tool_choice`` auto / any / tool / none is "auto" / "required" / the tool's name /
  "none"; ``disable_parallel_tool_use`` is ``parallel_tool_calls = False``;
- ``thinking: {"type": "enabled", "budget_tokens": N}`` is a `reasoning_effort`: N below
  4096 "low", below 16384 "medium", else "high" (an Anthropic model then gets the budget
  of that effort, see `router._anthropic`); ``adaptive`` is "medium"; ``disabled`` none;
- ``metadata.user_id`` is `user`; ``service_tier`` auto / standard_only is auto / default;
- ``top_k`` has no field in a `ChatRequest` (no other protocol takes it): refused, 400;
- other unknown top-level fields are ignored and named in ``x-router-dropped-params``;
- answers: thinking blocks only when an Anthropic model served (other providers'
  reasoning is dropped), then text, then ``tool_use`` blocks (arguments parsed as JSON;
  arguments that are not a JSON object come back as ``{"arguments": "<raw text>"}``).
"""

from __future__ import annotations

import secrets
from typing import Any, Final

import msgspec

from .._types import (
    ChatRequest,
    ChatResponse,
    ContentPart,
    FilePart,
    ImagePart,
    Message,
    StreamChunk,
    TextPart,
    ThinkingBlock,
    Tool,
    ToolCall,
    Usage,
)
from ._shapes import (
    BadBody,
    ChatOptions,
    _base64,
    _cache_control,
    _model_name,
    _names,
    _num,
    _want,
)

__all__ = [
    "MessageEvents",
    "MessagesOptions",
    "anthropic_error",
    "message_json",
    "parse_messages_body",
    "sse",
]

_MAX_TOKENS: Final = 100_000_000
_KNOWN: Final = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "metadata",
        "stream",
        "thinking",
        "tools",
        "tool_choice",
        "service_tier",
        # gateway extensions, as on /v1/chat/completions
        "fallbacks",
        "timeout",
        "drop_params",
    }
)
_TIERS: Final = {"auto": "auto", "standard_only": "default"}
_STOP: Final = {
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}
_THINKING: Final = {"type": "thinking", "thinking": "", "signature": ""}
_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode


class MessagesOptions(ChatOptions, kw_only=True):
    ignored: list[str] = msgspec.field(default_factory=list)
    """Top-level fields the gateway does not know (ignored, named in a header)."""


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# -------------------------------------------------------------------------- requests


def _text_block(block: dict[str, Any], bf: str) -> TextPart:
    text = _want(block.get("text"), str, f"{bf}.text", "a string")
    return TextPart(text=text, cache_control=_cache_control(block.get("cache_control"), bf))


def _source_part(block: dict[str, Any], bf: str, kind: str) -> ContentPart:
    cache = _cache_control(block.get("cache_control"), f"{bf}.cache_control")
    source = _want(block.get("source"), dict, f"{bf}.source", "an object")
    stype = source.get("type")
    sf = f"{bf}.source"
    if stype == "base64":
        media = _want(source.get("media_type"), str, f"{sf}.media_type", "a string")
        data = _base64(_want(source.get("data"), str, f"{sf}.data", "a string"), f"{sf}.data")
        if kind == "image":
            return ImagePart(data=data, media_type=media, cache_control=cache)
        return FilePart(data=data, media_type=media, cache_control=cache)
    if stype == "url":
        url = _want(source.get("url"), str, f"{sf}.url", "a string")
        if not url.startswith(("http://", "https://")):
            raise BadBody(f"{sf}.url", f"`{sf}.url` must be an http(s) URL")
        if kind == "image":
            return ImagePart(url=url, cache_control=cache)
        return FilePart(url=url, cache_control=cache)
    if stype == "text" and kind == "document":
        text = _want(source.get("data"), str, f"{sf}.data", "a string")
        return TextPart(text=text, cache_control=cache)
    raise BadBody(
        f"{sf}.type",
        f"`{sf}.type` {stype!r} is not supported here (base64 or url"
        + (", or text for a document)" if kind == "document" else ")"),
        "unsupported_content",
    )


def _tool_result(block: dict[str, Any], bf: str) -> Message:
    tool_use_id = _want(block.get("tool_use_id"), str, f"{bf}.tool_use_id", "a string")
    cache = _cache_control(block.get("cache_control"), f"{bf}.cache_control")
    content = block.get("content", "")
    if content is None:
        content = ""
    if isinstance(content, str):
        return Message("tool", content, tool_call_id=tool_use_id, cache_control=cache)
    content = _want(content, list, f"{bf}.content", "a string or an array of blocks")
    parts: list[ContentPart] = []
    for j, inner in enumerate(content):
        f = f"{bf}.content[{j}]"
        inner = _want(inner, dict, f, "an object")
        kind = inner.get("type")
        if kind == "text":
            parts.append(_text_block(inner, f))
        elif kind in ("image", "document"):
            parts.append(_source_part(inner, f, kind))
        else:
            raise BadBody(
                f"{f}.type", f"`{f}.type` {kind!r} is not supported in a tool_result",
                "unsupported_content",
            )  # fmt: skip
    if all(isinstance(p, TextPart) and p.cache_control is None for p in parts):
        text = "".join(p.text for p in parts if isinstance(p, TextPart))
        return Message("tool", text, tool_call_id=tool_use_id, cache_control=cache)
    return Message("tool", parts, tool_call_id=tool_use_id, cache_control=cache)


def _plain(parts: list[ContentPart]) -> str | list[ContentPart]:
    """A string for text parts without cache_control, else the parts."""
    if all(isinstance(p, TextPart) and p.cache_control is None for p in parts):
        return "".join(p.text for p in parts if isinstance(p, TextPart))
    return parts


def _user_turn(content: object, field: str) -> list[Message]:
    if isinstance(content, str):
        return [Message("user", content)]
    content = _want(content, list, field, "a string or an array of content blocks")
    out: list[Message] = []
    parts: list[ContentPart] = []
    for j, block in enumerate(content):
        bf = f"{field}[{j}]"
        block = _want(block, dict, bf, "an object")
        kind = block.get("type")
        if kind == "tool_result":
            if parts:
                out.append(Message("user", _plain(parts)))
                parts = []
            out.append(_tool_result(block, bf))
        elif kind == "text":
            parts.append(_text_block(block, bf))
        elif kind in ("image", "document"):
            parts.append(_source_part(block, bf, kind))
        else:
            raise BadBody(
                f"{bf}.type",
                f"`{bf}.type` {kind!r} is not a content block this gateway takes in a user "
                "turn (text, image, document, tool_result)",
                "unsupported_content",
            )
    if parts or not out:
        out.append(Message("user", _plain(parts)))
    return out


def _assistant_turn(content: object, field: str) -> Message:
    if isinstance(content, str):
        return Message("assistant", content)
    content = _want(content, list, field, "a string or an array of content blocks")
    parts: list[ContentPart] = []
    calls: list[ToolCall] = []
    thinking: list[ThinkingBlock] = []
    for j, block in enumerate(content):
        bf = f"{field}[{j}]"
        block = _want(block, dict, bf, "an object")
        kind = block.get("type")
        if kind == "text":
            parts.append(_text_block(block, bf))
        elif kind == "tool_use":
            call_id = _want(block.get("id"), str, f"{bf}.id", "a string")
            name = _want(block.get("name"), str, f"{bf}.name", "a string")
            args = block.get("input", {})
            args = _want({} if args is None else args, dict, f"{bf}.input", "an object")
            calls.append(ToolCall(id=call_id, name=name, arguments=_encode(args).decode()))
        elif kind == "thinking":
            text = _want(block.get("thinking", ""), str, f"{bf}.thinking", "a string")
            sig = block.get("signature")
            sig = _want(sig, str, f"{bf}.signature", "a string") if sig is not None else None
            thinking.append(ThinkingBlock(text=text, signature=sig, protocol="anthropic"))
        elif kind == "redacted_thinking":
            data = _want(block.get("data"), str, f"{bf}.data", "a string")
            thinking.append(ThinkingBlock(redacted=data, protocol="anthropic"))
        else:
            raise BadBody(
                f"{bf}.type",
                f"`{bf}.type` {kind!r} is not a content block this gateway takes in an "
                "assistant turn (text, tool_use, thinking, redacted_thinking)",
                "unsupported_content",
            )
    return Message("assistant", _plain(parts), tool_calls=calls or None, thinking=thinking or None)


def _system(value: object) -> Message | None:
    if value is None:
        return None
    if isinstance(value, str):
        return Message("system", value) if value else None
    value = _want(value, list, "system", "a string or an array of text blocks")
    parts: list[ContentPart] = []
    for j, block in enumerate(value):
        bf = f"system[{j}]"
        block = _want(block, dict, bf, "an object")
        if block.get("type") != "text":
            raise BadBody(f"{bf}.type", f"`{bf}.type` must be text", "unsupported_content")
        parts.append(_text_block(block, bf))
    return Message("system", _plain(parts)) if parts else None


def _tools(value: object) -> list[Tool] | None:
    if value is None:
        return None
    value = _want(value, list, "tools", "an array")
    tools: list[Tool] = []
    for i, raw in enumerate(value):
        f = f"tools[{i}]"
        raw = _want(raw, dict, f, "an object")
        kind = raw.get("type")
        if kind not in (None, "custom"):
            raise BadBody(
                f"{f}.type",
                f"`{f}.type` {kind!r}: Anthropic server tools cannot be served by any "
                "provider; only custom tools (name, description, input_schema) translate",
                "unsupported_tool",
            )
        name = _want(raw.get("name"), str, f"{f}.name", "a string")
        schema = raw.get("input_schema")
        schema = _want(schema, dict, f"{f}.input_schema", "an object")
        description = raw.get("description") or ""
        tools.append(
            Tool(
                name=name,
                description=_want(description, str, f"{f}.description", "a string"),
                parameters=schema,
                cache_control=_cache_control(raw.get("cache_control"), f"{f}.cache_control"),
            )
        )
    return tools or None


def _tool_choice(value: object) -> tuple[str | None, bool | None]:
    if value is None:
        return None, None
    value = _want(value, dict, "tool_choice", "an object")
    kind = value.get("type")
    parallel = value.get("disable_parallel_tool_use")
    no_parallel = None
    if parallel is not None:
        f = "tool_choice.disable_parallel_tool_use"
        no_parallel = False if _want(parallel, bool, f, "a boolean") else None
    if kind == "auto":
        return "auto", no_parallel
    if kind == "any":
        return "required", no_parallel
    if kind == "none":
        return "none", None
    if kind == "tool":
        return _want(value.get("name"), str, "tool_choice.name", "a string"), no_parallel
    raise BadBody("tool_choice.type", "`tool_choice.type` must be auto, any, tool or none")


def _effort(value: object) -> str | None:
    if value is None:
        return None
    value = _want(value, dict, "thinking", "an object")
    kind = value.get("type")
    if kind == "disabled":
        return None
    if kind == "adaptive":
        return "medium"
    if kind != "enabled":
        raise BadBody("thinking.type", "`thinking.type` must be enabled, adaptive or disabled")
    budget = _want(value.get("budget_tokens"), int, "thinking.budget_tokens", "an integer")
    if budget < 1024:
        raise BadBody("thinking.budget_tokens", "`thinking.budget_tokens` must be at least 1024")
    return "low" if budget < 4096 else "medium" if budget < 16384 else "high"


def _metadata(value: object) -> str | None:
    if value is None:
        return None
    value = _want(value, dict, "metadata", "an object")
    for key in value:
        if key != "user_id":
            raise BadBody(f"metadata.{key}", f"`metadata.{key}`: metadata takes user_id only")
    user = value.get("user_id")
    return _want(user, str, "metadata.user_id", "a string") or None if user is not None else None


def _range(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    number = _num(value, name)
    if not lo <= number <= hi:
        raise BadBody(name, f"`{name}` must be between {lo:g} and {hi:g}")
    return number


def parse_messages_body(
    body: object,
    tenant: str | None,
    header_fallbacks: str | None,
    *,
    max_timeout: float | None = None,
    default_timeout: float | None = None,
    count_only: bool = False,
) -> tuple[ChatRequest, MessagesOptions]:
    """Validate an Anthropic Messages body; raise `BadBody` naming the field.
    `count_only` (``/v1/messages/count_tokens``): `max_tokens` is not required."""
    if not isinstance(body, dict):
        raise BadBody(None, "the body must be a JSON object")
    if body.get("model") is None:
        raise BadBody("model", "model: Field required", "missing_field")
    model = _model_name(body["model"], "model")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        if not count_only:
            raise BadBody("max_tokens", "max_tokens: Field required", "missing_field")
    else:
        max_tokens = _want(max_tokens, int, "max_tokens", "an integer")
        if not 1 <= max_tokens <= _MAX_TOKENS:
            raise BadBody("max_tokens", f"`max_tokens` must be from 1 to {_MAX_TOKENS}")
    raw_messages = body.get("messages")
    if raw_messages is None:
        raise BadBody("messages", "messages: Field required", "missing_field")
    raw_messages = _want(raw_messages, list, "messages", "an array")
    messages: list[Message] = []
    system = _system(body.get("system"))
    if system is not None:
        messages.append(system)
    for i, raw in enumerate(raw_messages):
        f = f"messages[{i}]"
        raw = _want(raw, dict, f, "an object")
        role = raw.get("role")
        content = raw.get("content")
        if content is None:
            raise BadBody(f"{f}.content", f"{f}.content: Field required", "missing_field")
        if role == "user":
            messages.extend(_user_turn(content, f"{f}.content"))
        elif role == "assistant":
            messages.append(_assistant_turn(content, f"{f}.content"))
        else:
            raise BadBody(f"{f}.role", f"`{f}.role` must be user or assistant")
    if not raw_messages:
        raise BadBody("messages", "`messages` must not be empty")
    if body.get("top_k") is not None:
        raise BadBody(
            "top_k",
            "`top_k` cannot be carried: the router's requests have no top_k (no provider "
            "other than Anthropic and Gemini takes it); omit it",
            "unsupported_parameter",
        )
    stream = body.get("stream", False)
    stream = False if stream is None else _want(stream, bool, "stream", "a boolean")
    stop: list[str] | None = None
    if body.get("stop_sequences") is not None:
        raw_stop = _want(body["stop_sequences"], list, "stop_sequences", "an array of strings")
        stop = [_want(s, str, f"stop_sequences[{i}]", "a string") for i, s in enumerate(raw_stop)]
    tool_choice, parallel = _tool_choice(body.get("tool_choice"))
    tier = body.get("service_tier")
    if tier is not None:
        tier = _TIERS.get(_want(tier, str, "service_tier", "a string"))
        if tier is None:
            raise BadBody("service_tier", "`service_tier` must be auto or standard_only")
    timeout = body.get("timeout")
    if timeout is not None:
        timeout = _num(timeout, "timeout", "a number of seconds")
        if not timeout > 0:
            raise BadBody("timeout", "`timeout` must be a positive number of seconds")
        if max_timeout is not None:
            timeout = min(timeout, max_timeout)
    elif max_timeout is not None and default_timeout is not None and max_timeout < default_timeout:
        timeout = max_timeout
    fallbacks = _names(body.get("fallbacks"), "fallbacks")
    if header_fallbacks:
        fallbacks += _names(header_fallbacks, "x-router-fallbacks")
    drop = body.get("drop_params")
    request = ChatRequest(
        model=model,
        messages=messages,
        fallbacks=[name for name, _ in fallbacks],
        max_tokens=max_tokens,
        temperature=_range(body, "temperature", 0.0, 1.0),
        top_p=_range(body, "top_p", 0.0, 1.0),
        stop=stop or None,
        timeout=float(timeout) if timeout is not None else None,
        tenant=tenant,
        tools=_tools(body.get("tools")),
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        user=_metadata(body.get("metadata")),
        reasoning_effort=_effort(body.get("thinking")),
        service_tier=tier,
        drop_params=_want(drop, bool, "drop_params", "a boolean") if drop is not None else None,
    )
    if request.top_p is not None and request.top_p <= 0:
        raise BadBody("top_p", "`top_p` must be in (0, 1]")
    options = MessagesOptions(
        stream=stream,
        fallback_fields=[where for _, where in fallbacks],
        ignored=sorted(k for k in body if k not in _KNOWN),
    )
    return request, options


# -------------------------------------------------------------------------- answers


def stop_reason(finish: str | None, stop_sequence: str | None) -> str:
    if finish == "stop" or finish is None:
        return "stop_sequence" if stop_sequence else "end_turn"
    return _STOP.get(finish, "end_turn")


def usage_json(usage: Usage | None) -> dict[str, Any]:
    """Anthropic's usage: input_tokens excludes cache reads and writes (our
    prompt_tokens includes them)."""
    if usage is None:
        usage = Usage()
    cached, created = usage.cached_tokens, usage.cache_creation_tokens
    return {
        "input_tokens": max(0, usage.prompt_tokens - cached - created),
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": created,
    }


def _thinking_json(block: ThinkingBlock) -> dict[str, Any]:
    if block.redacted is not None:
        return {"type": "redacted_thinking", "data": block.redacted}
    return {"type": "thinking", "thinking": block.text, "signature": block.signature or ""}


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = _decode(arguments or "{}")
    except msgspec.DecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": arguments}


def message_json(response: ChatResponse) -> dict[str, Any]:
    """A `ChatResponse` as an Anthropic Messages answer."""
    content: list[dict[str, Any]] = [
        _thinking_json(b) for b in response.thinking or () if b.protocol == "anthropic"
    ]
    text = response.content or response.refusal or ""
    if text or not response.tool_calls:
        content.append({"type": "text", "text": text})
    for call in response.tool_calls:
        content.append(
            {
                "type": "tool_use",
                "id": call.id or _new_id("toolu_"),
                "name": call.name,
                "input": _tool_input(call.arguments),
            }
        )
    return {
        "id": _new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": response.model,
        "content": content,
        "stop_reason": stop_reason(response.finish_reason, response.stop_sequence),
        "stop_sequence": response.stop_sequence,
        "usage": usage_json(response.usage),
    }


def sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encode(payload) + b"\n\n"


class MessageEvents:
    """Renders one stream's `StreamChunk`s as Anthropic's SSE events.

    Blocks open and close as the kind of delta changes (thinking, text, each tool call).
    Reasoning becomes thinking blocks only when `thinking` (an Anthropic model serves);
    the thinking block's signature is sent as a ``signature_delta`` when the provider's
    finished block arrives."""

    def __init__(self, model: str, *, thinking: bool) -> None:
        self.model = model
        self.thinking = thinking
        self.index = -1
        self.open: str | None = None
        """The open block: "thinking", "text", "tool:<n>" or None."""
        self.finish: str | None = None
        self.stop_sequence: str | None = None
        self._text_head = b""
        """The bytes before the text of a ``text_delta`` of the open text block."""

    def start(self) -> bytes:
        message: dict[str, Any] = {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_json(None),
        }
        return sse("message_start", {"type": "message_start", "message": message}) + sse(
            "ping", {"type": "ping"}
        )

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return sse("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _begin(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.index += 1
        self.open = kind
        if kind == "text":
            self._text_head = (
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                + str(self.index).encode()
                + b',"delta":{"type":"text_delta","text":'
            )
        payload = {"type": "content_block_start", "index": self.index, "content_block": block}
        return out + sse("content_block_start", payload)

    def _delta(self, delta: dict[str, Any]) -> bytes:
        payload = {"type": "content_block_delta", "index": self.index, "delta": delta}
        return sse("content_block_delta", payload)

    def chunk(self, chunk: StreamChunk) -> bytes:
        text = chunk.text
        if (
            text
            and self.open == "text"
            and not chunk.refusal
            and not chunk.reasoning
            and not chunk.thinking
            and not chunk.tool_calls
            and chunk.finish_reason is None
            and chunk.stop_sequence is None
        ):
            # More text for the open text block (nearly every chunk): spliced into
            # bytes made when the block opened, as `_delta` would encode them.
            return self._text_head + _encode(text) + b"}}\n\n"
        return self._render(chunk)

    def _render(self, chunk: StreamChunk) -> bytes:
        out = b""
        if chunk.reasoning and self.thinking:
            if self.open != "thinking":
                out += self._begin("thinking", dict(_THINKING))
            out += self._delta({"type": "thinking_delta", "thinking": chunk.reasoning})
        for block in (chunk.thinking or ()) if self.thinking else ():
            if block.redacted is not None:
                redacted = {"type": "redacted_thinking", "data": block.redacted}
                out += self._begin("redacted", redacted)
            elif self.open != "thinking":
                out += self._begin("thinking", dict(_THINKING))
                if block.text:
                    out += self._delta({"type": "thinking_delta", "thinking": block.text})
            if block.signature:
                out += self._delta({"type": "signature_delta", "signature": block.signature})
            out += self._close()
        text = chunk.text + chunk.refusal
        if text:
            if self.open != "text":
                out += self._begin("text", {"type": "text", "text": ""})
            out += self._delta({"type": "text_delta", "text": text})
        for call in chunk.tool_calls:
            kind = f"tool:{call.index}"
            if self.open != kind:
                opening: dict[str, Any] = {
                    "type": "tool_use",
                    "id": call.id or _new_id("toolu_"),
                    "name": call.name or "",
                    "input": {},
                }
                out += self._begin(kind, opening)
            if call.arguments:
                out += self._delta({"type": "input_json_delta", "partial_json": call.arguments})
        if chunk.finish_reason is not None:
            self.finish = chunk.finish_reason
        if chunk.stop_sequence is not None:
            self.stop_sequence = chunk.stop_sequence
        return out

    def end(self, usage: Usage | None) -> bytes:
        delta = {
            "type": "message_delta",
            "delta": {
                "stop_reason": stop_reason(self.finish, self.stop_sequence),
                "stop_sequence": self.stop_sequence,
            },
            "usage": usage_json(usage),
        }
        return (
            self._close()
            + sse("message_delta", delta)
            + sse("message_stop", {"type": "message_stop"})
        )


# -------------------------------------------------------------------------- errors


def anthropic_error(
    status: int, body: dict[str, Any], headers: list[tuple[str, str]] | None
) -> tuple[int, dict[str, Any], list[tuple[str, str]] | None]:
    """The gateway's OpenAI-shaped error reply in Anthropic's shape and statuses.

    529 overloaded_error: upstream availability is exhausted (the chain ended on
    transient failures: 5xx, overloaded, timeouts) or the gateway sheds load
    (max_in_flight, max_queue_delay). 502 api_error: the chain ended on anything else
    (upstream auth, balance, missing model). 503 api_error: draining or no router.
    429 rate_limit_error (with retry-after): everything is cooling. 504 timeout_error:
    the request's deadline passed."""
    error = body.get("error", {})
    message = str(error.get("message", ""))
    code = error.get("code")
    if status == 400 or status == 405 or status == 408:
        kind = "invalid_request_error"
    elif status == 401:
        message = message.replace("`Authorization: Bearer <key>`", "`x-api-key: <key>`")
        kind = "authentication_error"
    elif status == 403:
        kind = "permission_error"
    elif status == 404:
        kind = "not_found_error"
    elif status == 413:
        kind = "request_too_large"
    elif status == 429:
        kind = "rate_limit_error"
    elif (status, code) in ((502, "transient"), (503, "overloaded")):
        status, kind = 529, "overloaded_error"
    elif status == 504:
        kind = "timeout_error"
    else:
        kind = "api_error"
    return status, {"type": "error", "error": {"type": kind, "message": message}}, headers


def error_event(status: int, body: dict[str, Any]) -> bytes:
    """An ``event: error`` for a stream that fails after its head went out."""
    _, shaped, _ = anthropic_error(status, body, None)
    return sse("error", shaped)
