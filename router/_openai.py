"""The OpenAI Chat Completions wire protocol (also spoken by most "OpenAI-compatible"
servers: vLLM, Groq, Together, OpenRouter, DeepSeek, ...).

`OpenAIProtocol` builds ``POST {base_url}/chat/completions`` (base_url like
``https://api.openai.com/v1``) with ``Authorization: Bearer``, parses the answer,
classifies errors with the shared table of `_classify`, and decodes the SSE stream
(``data: {chunk}`` ... ``data: [DONE]``).

Choices made here:

- the output ceiling is sent as ``max_tokens`` (still accepted by OpenAI's chat
  models and understood by every compatible server; OpenAI's reasoning models answer
  "use max_completion_tokens" with a 400, classified bad_request);
- a streamed request asks for ``stream_options.include_usage``, so the last chunk
  (with empty ``choices``) carries usage: it arrives after the finish reason, so read
  until `done`, not `finished`;
- caller headers are merged last and win (names compared case-insensitively).

What this module must never do: put the secret anywhere but the Authorization header
(never in a URL, a repr or an error message), do I/O, or read a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

from ._classify import (
    classified_error,
    error_snippet,
    parse_duration,
)
from ._errors import ProviderError
from ._types import (
    ChatRequest,
    ChatResponse,
    Message,
    StreamChunk,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from ._wire import SseEvent, WireRequest

__all__ = ["OpenAIProtocol", "OpenAIStreamDecoder"]

_FINISH: Final = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}

_encode = msgspec.json.encode


# ----------------------------------------------------------------------- wire shapes


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    id: str | None = None
    function: _Function | None = None
    index: int | None = None


class _Message(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None
    refusal: str | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    delta: _Message | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice] | None = None
    model: str | None = None
    usage: _Usage | None = None
    error: Any = None


_decode_completion: Final = msgspec.json.Decoder(_Completion)


def _usage(raw: _Usage | None) -> Usage | None:
    if raw is None:
        return None
    prompt = raw.prompt_tokens or 0
    completion = raw.completion_tokens or 0
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=raw.total_tokens or prompt + completion,
    )


def _message(message: Message) -> dict[str, Any]:
    if message.role == "tool":
        return {
            "role": "tool",
            "tool_call_id": message.tool_call_id or "",
            "content": message.content,
        }
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name:
        out["name"] = message.name
    if message.role == "assistant" and message.tool_calls:
        out["content"] = message.content or None
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments or "{}"},
            }
            for call in message.tool_calls
        ]
    return out


def _tool_choice(choice: str) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _error_fields(body: bytes) -> tuple[str, str | None, set[str]]:
    """(message, code to show, lower-cased codes) from an OpenAI-style error body."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body.decode("utf-8", "replace"), None, set()
    if isinstance(data, list) and data:
        data = data[0]
    error = data.get("error", data) if isinstance(data, dict) else None
    if isinstance(error, str):
        return error, None, set()
    if not isinstance(error, dict):
        return body.decode("utf-8", "replace"), None, set()
    message = error.get("message")
    codes = {
        str(value).lower()
        for value in (error.get("code"), error.get("type"))
        if isinstance(value, str | int) and value != ""
    }
    shown = error.get("code") or error.get("type")
    text = message if isinstance(message, str) else str(message or "")
    return text, str(shown) if shown else None, codes


def _try_again_in(message: str) -> float | None:
    """OpenAI's "Please try again in 6.5s." / "in 20ms" inside a rate-limit message."""
    marker = "try again in "
    at = message.find(marker)
    if at < 0:
        return None
    word = message[at + len(marker) :].split(" ", 1)[0].rstrip(".,;")
    return parse_duration(word)


def _classified(
    status: int | None,
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    where: str | None = None,
) -> ProviderError:
    message, code, codes = _error_fields(body)
    return classified_error(
        "openai",
        status,
        headers,
        now,
        message,
        code,
        codes,
        where,
        body_retry_after=_try_again_in(message),
    )


# ----------------------------------------------------------------------- protocol


class OpenAIProtocol:
    """The OpenAI Chat Completions protocol. Stateless; one instance serves every key."""

    name = "openai"

    def build(
        self,
        request: ChatRequest,
        *,
        base_url: str,
        secret: str,
        stream: bool,
        headers: Mapping[str, str],
    ) -> WireRequest:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [_message(message) for message in request.messages],
        }
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description,
                        "parameters": tool.parameters or {"type": "object", "properties": {}},
                    },
                }
                for tool in request.tools
            ]
        if request.tool_choice:
            body["tool_choice"] = _tool_choice(request.tool_choice)
        if request.stop:
            body["stop"] = request.stop
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        wire_headers = {
            "authorization": f"Bearer {secret}",
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
        }
        wire_headers.update({name.lower(): value for name, value in headers.items()})
        return WireRequest(
            method="POST",
            url=base_url.rstrip("/") + "/chat/completions",
            headers=wire_headers,
            body=_encode(body),
        )

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> ChatResponse:
        try:
            completion = _decode_completion.decode(body)
        except msgspec.DecodeError as exc:
            snippet = error_snippet(body.decode("utf-8", "replace"), 120)
            raise ProviderError(
                "transient", f"openai: malformed response body ({exc}): {snippet}", status=status
            ) from None
        if completion.error is not None:  # an error object inside a 2xx answer
            raise _classified(None, {}, body, 0.0, "error in a 2xx body")
        if not completion.choices or completion.choices[0].message is None:
            raise ProviderError(
                "transient", "openai: malformed response body (no choices)", status=status
            )
        choice = completion.choices[0]
        message = choice.message or _Message()
        content = message.content or ""
        calls = [
            ToolCall(
                id=call.id or f"call_{index}",
                name=(call.function.name if call.function else None) or "",
                arguments=(call.function.arguments if call.function else None) or "{}",
            )
            for index, call in enumerate(message.tool_calls or ())
        ]
        finish = _FINISH.get(choice.finish_reason or "", "tool_calls" if calls else "stop")
        if not content and not calls:
            if finish == "content_filter":
                raise ProviderError(
                    "content_filter",
                    "openai: the answer was withheld by the content filter",
                    status=status,
                )
            if message.refusal:
                raise ProviderError(
                    "content_filter",
                    f"openai: the model refused: {error_snippet(message.refusal)}",
                    status=status,
                )
        return ChatResponse(
            content=content,
            finish_reason=finish,
            usage=_usage(completion.usage) or Usage(),
            tool_calls=calls,
            upstream_model=completion.model or "",
        )

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float
    ) -> ProviderError:
        return _classified(status, headers, body, now)

    def stream_decoder(self) -> OpenAIStreamDecoder:
        return OpenAIStreamDecoder()


class OpenAIStreamDecoder:
    """Decodes one OpenAI chat-completion stream: ``data: {chunk}`` events, then
    ``data: [DONE]``. An ``{"error": ...}`` chunk raises the classified error."""

    __slots__ = ("_done", "_finished")

    def __init__(self) -> None:
        self._done = False
        self._finished = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def finished(self) -> bool:
        return self._finished

    def feed(self, event: SseEvent) -> list[StreamChunk]:
        if self._done:
            return []
        data = event.data.strip()
        if data == "[DONE]":
            self._done = True
            return []
        if event.event == "error":
            raise _classified(None, {}, data.encode(), 0.0)
        try:
            chunk = _decode_completion.decode(data)
        except msgspec.DecodeError as exc:
            raise ProviderError(
                "transient", f"openai: malformed stream event ({exc}): {error_snippet(data, 120)}"
            ) from None
        if chunk.error is not None:
            raise _classified(None, {}, data.encode(), 0.0)
        usage = _usage(chunk.usage)
        out: list[StreamChunk] = []
        for choice in chunk.choices or ():
            delta = choice.delta or choice.message or _Message()
            calls = [
                ToolCallDelta(
                    index=call.index if call.index is not None else position,
                    id=call.id,
                    name=call.function.name if call.function else None,
                    arguments=(call.function.arguments if call.function else None) or "",
                )
                for position, call in enumerate(delta.tool_calls or ())
            ]
            finish = None
            if choice.finish_reason is not None:
                finish = _FINISH.get(choice.finish_reason, "stop")
                self._finished = True
            if delta.content or calls or finish is not None:
                out.append(
                    StreamChunk(text=delta.content or "", tool_calls=calls, finish_reason=finish)
                )
        if usage is not None:
            if out:
                last = out[-1]
                out[-1] = StreamChunk(
                    text=last.text,
                    tool_calls=last.tool_calls,
                    finish_reason=last.finish_reason,
                    usage=usage,
                )
            else:
                out.append(StreamChunk(usage=usage))
        return out
