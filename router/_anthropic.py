"""The Anthropic Messages wire protocol.

`AnthropicProtocol` builds ``POST {base_url}/v1/messages`` (base_url like
``https://api.anthropic.com``) with ``x-api-key`` and ``anthropic-version: 2023-06-01``
(and ``POST {base_url}/v1/messages/count_tokens`` for exact prompt counts: `build_count`,
`parse_count`), parses the answer, classifies errors with the shared table of
`_classify`, and decodes the SSE stream (message_start, content_block_*, message_delta,
message_stop, ping, error).

Translation choices:

- every ``system`` message, wherever it sits, is lifted into the top-level ``system``
  string, several joined with a blank line;
- consecutive messages that map to the same role are merged into one turn (tool
  results become ``tool_result`` blocks of a user turn; several results of parallel
  calls share that turn, as the API requires); empty text blocks are not sent;
- ``max_tokens`` is required by the API: 4096 (`DEFAULT_MAX_TOKENS`) when the request
  has none;
- tool_choice "required" is ``{"type": "any"}``, a tool name is ``{"type": "tool"}``;
- usage: prompt tokens are ``input_tokens`` plus cache creation and cache read tokens
  (Anthropic counts those apart), completion tokens are ``output_tokens``;
- stream tool-call deltas are indexed by tool-call ordinal (0, 1, ...), not by the
  content-block index, so they assemble like OpenAI's.

What this module must never do: put the secret anywhere but the x-api-key header
(never in a URL, a repr or an error message), do I/O, or read a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

from ._classify import (
    classified_error,
    error_snippet,
)
from ._errors import ProviderError
from ._types import (
    ChatRequest,
    ChatResponse,
    Message,
    StreamChunk,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
    message_text,
)
from ._wire import SseEvent, WireRequest

__all__ = ["DEFAULT_MAX_TOKENS", "AnthropicProtocol", "AnthropicStreamDecoder"]

DEFAULT_MAX_TOKENS: Final = 4096
API_VERSION: Final = "2023-06-01"

_FINISH: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_encode = msgspec.json.encode


# ----------------------------------------------------------------------- wire shapes


class _Block(msgspec.Struct):
    type: str = ""
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Message(msgspec.Struct):
    type: str = ""
    content: list[_Block] | None = None
    model: str | None = None
    stop_reason: str | None = None
    usage: _Usage | None = None
    error: Any = None


class _Delta(msgspec.Struct):
    type: str = ""
    text: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None


class _Event(msgspec.Struct):
    type: str = ""
    index: int | None = None
    message: _Message | None = None
    content_block: _Block | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    error: Any = None


class _Count(msgspec.Struct):
    type: str = ""
    input_tokens: int | None = None
    error: Any = None


_decode_message: Final = msgspec.json.Decoder(_Message)
_decode_count: Final = msgspec.json.Decoder(_Count)
_decode_event: Final = msgspec.json.Decoder(_Event)


def _prompt_tokens(usage: _Usage) -> int:
    return (
        (usage.input_tokens or 0)
        + (usage.cache_creation_input_tokens or 0)
        + (usage.cache_read_input_tokens or 0)
    )


def _tool_input(call: ToolCall) -> Any:
    try:
        value = msgspec.json.decode(call.arguments or "{}")
    except msgspec.DecodeError:
        value = None
    if not isinstance(value, dict):
        raise ProviderError(
            "bad_request",
            f"anthropic: arguments of tool call {call.id!r} ({call.name}) are not a JSON object",
        )
    return value


def _turn(message: Message) -> tuple[str, list[dict[str, Any]]]:
    if message.role == "tool":
        return "user", [
            {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id or "",
                "content": message.content,
            }
        ]
    blocks: list[dict[str, Any]] = []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    if message.role == "assistant":
        for call in message.tool_calls or ():
            blocks.append(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": _tool_input(call)}
            )
    return ("assistant" if message.role == "assistant" else "user"), blocks


def _messages(messages: list[Message]) -> tuple[str | None, list[dict[str, Any]]]:
    system: list[str] = []
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for message in messages:
        if message.role == "system":
            system.append(message_text(message))
            continue
        role, blocks = _turn(message)
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    out: list[dict[str, Any]] = []
    for role, blocks in turns:
        if len(blocks) == 1 and blocks[0]["type"] == "text":
            out.append({"role": role, "content": blocks[0]["text"]})
        else:
            # A turn with no block at all (an empty user message) is sent as "" and
            # left for the API to judge.
            out.append({"role": role, "content": blocks or ""})
    return ("\n\n".join(system) if system else None), out


def _tools(tools: list[Tool]) -> list[dict[str, Any]]:
    return [
        {
            "name": tool.name,
            "description": tool.description,
            "input_schema": tool.parameters or {"type": "object", "properties": {}},
        }
        for tool in tools
    ]


def _tool_choice(choice: str) -> dict[str, str]:
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    return {"type": "tool", "name": choice}


def _error_fields(body: bytes) -> tuple[str, str | None, set[str]]:
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body.decode("utf-8", "replace"), None, set()
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return body.decode("utf-8", "replace"), None, set()
    kind = error.get("type")
    message = error.get("message")
    code = kind if isinstance(kind, str) and kind else None
    return (
        message if isinstance(message, str) else str(message or ""),
        code,
        {code.lower()} if code else set(),
    )


def _classified(
    status: int | None,
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    where: str | None = None,
) -> ProviderError:
    message, code, codes = _error_fields(body)
    return classified_error(
        "anthropic",
        status,
        headers,
        now,
        message,
        code,
        codes,
        where,
    )


def _malformed(what: str, exc: Exception, data: str, status: int | None = None) -> ProviderError:
    return ProviderError(
        "transient",
        f"anthropic: malformed {what} ({exc}): {error_snippet(data, 120)}",
        status=status,
    )


# ----------------------------------------------------------------------- protocol


def _prompt_body(request: ChatRequest) -> dict[str, Any]:
    """What a messages request and a count-tokens request share: model, system,
    messages, tools and tool choice."""
    system, messages = _messages(request.messages)
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    if system is not None:
        body["system"] = system
    if request.tools:
        body["tools"] = _tools(request.tools)
    if request.tool_choice:
        body["tool_choice"] = _tool_choice(request.tool_choice)
    return body


def _wire(
    base_url: str,
    path: str,
    body: dict[str, Any],
    secret: str,
    headers: Mapping[str, str],
    accept: str = "application/json",
) -> WireRequest:
    wire_headers = {
        "x-api-key": secret,
        "anthropic-version": API_VERSION,
        "content-type": "application/json",
        "accept": accept,
    }
    wire_headers.update({name.lower(): value for name, value in headers.items()})
    return WireRequest(
        method="POST", url=base_url.rstrip("/") + path, headers=wire_headers, body=_encode(body)
    )


class AnthropicProtocol:
    """The Anthropic Messages protocol. Stateless; one instance serves every key."""

    name = "anthropic"

    def build(
        self,
        request: ChatRequest,
        *,
        base_url: str,
        secret: str,
        stream: bool,
        headers: Mapping[str, str],
    ) -> WireRequest:
        body = _prompt_body(request)
        body["max_tokens"] = (
            request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS
        )
        if request.stop:
            body["stop_sequences"] = request.stop
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if stream:
            body["stream"] = True
        accept = "text/event-stream" if stream else "application/json"
        return _wire(base_url, "/v1/messages", body, secret, headers, accept)

    def build_count(
        self,
        request: ChatRequest,
        *,
        base_url: str,
        secret: str,
        headers: Mapping[str, str],
    ) -> WireRequest:
        """``POST {base_url}/v1/messages/count_tokens``: the body of a messages request
        (model, system, messages, tools, tool_choice) without max_tokens, stream, stop
        sequences or sampling parameters."""
        body = _prompt_body(request)
        return _wire(base_url, "/v1/messages/count_tokens", body, secret, headers)

    def parse_count(self, status: int, headers: Mapping[str, str], body: bytes) -> int:
        """The ``input_tokens`` of a 2xx count-tokens answer."""
        try:
            answer = _decode_count.decode(body)
        except msgspec.DecodeError as exc:
            raise _malformed(
                "count_tokens body", exc, body.decode("utf-8", "replace"), status
            ) from None
        if answer.type == "error" or answer.error is not None:
            raise _classified(None, {}, body, 0.0, "error in a 2xx body")
        if answer.input_tokens is None or answer.input_tokens < 0:
            raise ProviderError(
                "transient",
                "anthropic: malformed count_tokens body (no input_tokens)",
                status=status,
            )
        return answer.input_tokens

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> ChatResponse:
        try:
            message = _decode_message.decode(body)
        except msgspec.DecodeError as exc:
            raise _malformed(
                "response body", exc, body.decode("utf-8", "replace"), status
            ) from None
        if message.type == "error" or message.error is not None:
            raise _classified(None, {}, body, 0.0, "error in a 2xx body")
        if message.content is None:
            raise ProviderError(
                "transient", "anthropic: malformed response body (no content)", status=status
            )
        texts: list[str] = []
        calls: list[ToolCall] = []
        for block in message.content:
            if block.type == "text":
                texts.append(block.text or "")
            elif block.type == "tool_use":
                calls.append(
                    ToolCall(
                        id=block.id or f"call_{len(calls)}",
                        name=block.name or "",
                        arguments=_encode(block.input if block.input is not None else {}).decode(),
                    )
                )
        content = "".join(texts)
        finish = _FINISH.get(message.stop_reason or "", "tool_calls" if calls else "stop")
        if finish == "content_filter" and not content and not calls:
            raise ProviderError(
                "content_filter", "anthropic: the model refused to answer", status=status
            )
        usage = Usage()
        if message.usage is not None:
            prompt = _prompt_tokens(message.usage)
            completion = message.usage.output_tokens or 0
            usage = Usage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            )
        return ChatResponse(
            content=content,
            finish_reason=finish,
            usage=usage,
            tool_calls=calls,
            upstream_model=message.model or "",
        )

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float
    ) -> ProviderError:
        return _classified(status, headers, body, now)

    def stream_decoder(self) -> AnthropicStreamDecoder:
        return AnthropicStreamDecoder()


class AnthropicStreamDecoder:
    """Decodes one Anthropic Messages stream. Input tokens come with message_start,
    the stop reason and output tokens with message_delta (-> `finished`),
    message_stop ends it (-> `done`); ``event: error`` raises the classified error."""

    __slots__ = ("_args_seen", "_done", "_finished", "_prompt_tokens", "_tools")

    def __init__(self) -> None:
        self._done = False
        self._finished = False
        self._prompt_tokens = 0
        self._tools: dict[int, int] = {}  # content-block index -> tool-call ordinal
        self._args_seen: set[int] = set()  # ordinals that received argument text

    @property
    def done(self) -> bool:
        return self._done

    @property
    def finished(self) -> bool:
        return self._finished

    def feed(self, event: SseEvent) -> list[StreamChunk]:
        if self._done:
            return []
        try:
            parsed = _decode_event.decode(event.data)
        except msgspec.DecodeError as exc:
            raise _malformed(f"stream event {event.event!r}", exc, event.data) from None
        kind = event.event if event.event != "message" else parsed.type
        if kind == "error" or parsed.type == "error":
            raise _classified(None, {}, event.data.encode(), 0.0)
        if kind == "content_block_delta":
            return self._delta(parsed)
        if kind == "content_block_start":
            return self._block_start(parsed)
        if kind == "content_block_stop":
            ordinal = self._tools.get(parsed.index if parsed.index is not None else -1)
            if ordinal is not None and ordinal not in self._args_seen:
                self._args_seen.add(ordinal)  # a tool without arguments: say "{}"
                return [StreamChunk(tool_calls=[ToolCallDelta(index=ordinal, arguments="{}")])]
            return []
        if kind == "message_start":
            if parsed.message is not None and parsed.message.usage is not None:
                self._prompt_tokens = _prompt_tokens(parsed.message.usage)
            return []
        if kind == "message_delta":
            return self._message_delta(parsed)
        if kind == "message_stop":
            self._done = True
            return []
        return []  # ping, and event types added after this was written

    def _block_start(self, parsed: _Event) -> list[StreamChunk]:
        block = parsed.content_block
        if block is None:
            return []
        if block.type == "tool_use":
            ordinal = len(self._tools)
            self._tools[parsed.index if parsed.index is not None else -1 - ordinal] = ordinal
            arguments = ""
            if block.input:  # normally {} with the arguments in input_json_delta events
                arguments = _encode(block.input).decode()
                self._args_seen.add(ordinal)
            return [
                StreamChunk(
                    tool_calls=[
                        ToolCallDelta(
                            index=ordinal, id=block.id, name=block.name, arguments=arguments
                        )
                    ]
                )
            ]
        if block.type == "text" and block.text:
            return [StreamChunk(text=block.text)]
        return []

    def _delta(self, parsed: _Event) -> list[StreamChunk]:
        delta = parsed.delta
        if delta is None:
            return []
        if delta.type == "text_delta" and delta.text:
            return [StreamChunk(text=delta.text)]
        if delta.type == "input_json_delta":
            ordinal = self._tools.get(parsed.index if parsed.index is not None else -1)
            if ordinal is None:
                raise ProviderError(
                    "transient",
                    f"anthropic: malformed stream: input_json_delta for block {parsed.index} "
                    "which is not a tool_use block",
                )
            if not delta.partial_json:
                return []
            self._args_seen.add(ordinal)
            return [
                StreamChunk(tool_calls=[ToolCallDelta(index=ordinal, arguments=delta.partial_json)])
            ]
        return []  # thinking_delta, signature_delta, citations: not part of the answer

    def _message_delta(self, parsed: _Event) -> list[StreamChunk]:
        stop_reason = parsed.delta.stop_reason if parsed.delta is not None else None
        usage = None
        if parsed.usage is not None:
            completion = parsed.usage.output_tokens or 0
            prompt = self._prompt_tokens
            if parsed.usage.input_tokens is not None:  # newer servers repeat it here
                prompt = max(prompt, _prompt_tokens(parsed.usage))
            usage = Usage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            )
        finish = None
        if stop_reason is not None:
            finish = _FINISH.get(stop_reason, "stop")
            self._finished = True
        if finish is None and usage is None:
            return []
        return [StreamChunk(finish_reason=finish, usage=usage)]
