"""The Google Gemini (Generative Language API) wire protocol.

`GeminiProtocol` builds ``POST {base_url}/v1beta/models/{model}:generateContent`` (or
``:streamGenerateContent?alt=sse``; base_url like
``https://generativelanguage.googleapis.com``) with ``x-goog-api-key``, parses the
GenerateContentResponse, classifies errors (google.rpc.Status bodies) with the shared
table of `_classify`, and decodes the SSE stream, whose every event is a whole
GenerateContentResponse.

Translation choices:

- system messages are joined (blank line between) into ``systemInstruction``;
- roles: assistant -> "model", user and tool results -> "user"; consecutive turns of
  the same role are merged, so parallel function responses share one turn;
- a tool result becomes a ``functionResponse`` part whose name is looked up from the
  earlier assistant tool call with that id (falling back to the message's `name`);
  its ``response`` is the content when that is a JSON object, else
  ``{"content": <text>}``;
- Gemini has no call ids: parsed function calls get ``call_<n>``, n counting the
  calls of the answer (or of the stream) from 0, so ids are stable across retries;
- finishReason STOP with function calls is reported as "tool_calls"; SAFETY,
  RECITATION, BLOCKLIST, PROHIBITED_CONTENT, SPII and IMAGE_SAFETY as
  "content_filter", and raise content_filter when nothing was produced;
- usage: completion tokens are ``candidatesTokenCount`` plus ``thoughtsTokenCount``;
- the stream has no end marker: the event with a finishReason sets both `finished`
  and `done`; usage is the last usageMetadata seen, attached to that event;
- a 429 RESOURCE_EXHAUSTED stays rate_limit even for a per-day quota (it resets; the
  RetryInfo detail's retryDelay becomes retry_after when no header says otherwise).

What this module must never do: put the secret anywhere but the x-goog-api-key
header (never the ``?key=`` query parameter, a repr or an error message), do I/O, or
read a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote

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
    message_text,
)
from ._wire import SseEvent, WireRequest

__all__ = ["GeminiProtocol", "GeminiStreamDecoder"]

_BLOCKED: Final = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)
_FINISH: Final = {"STOP": "stop", "MAX_TOKENS": "length"} | dict.fromkeys(
    _BLOCKED, "content_filter"
)

_encode = msgspec.json.encode


# ----------------------------------------------------------------------- wire shapes


class _FunctionCall(msgspec.Struct, rename="camel"):
    name: str = ""
    args: Any = None


class _Part(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool | None = None
    function_call: _FunctionCall | None = None


class _Content(msgspec.Struct, rename="camel"):
    parts: list[_Part] | None = None
    role: str | None = None


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None


class _UsageMetadata(msgspec.Struct, rename="camel"):
    prompt_token_count: int | None = None
    candidates_token_count: int | None = None
    thoughts_token_count: int | None = None
    total_token_count: int | None = None


class _PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None


class _Response(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] | None = None
    prompt_feedback: _PromptFeedback | None = None
    usage_metadata: _UsageMetadata | None = None
    model_version: str | None = None
    error: Any = None


_decode_response: Final = msgspec.json.Decoder(_Response)


def _usage(raw: _UsageMetadata) -> Usage:
    prompt = raw.prompt_token_count or 0
    completion = (raw.candidates_token_count or 0) + (raw.thoughts_token_count or 0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=raw.total_token_count or prompt + completion,
    )


def _function_args(call: ToolCall) -> Any:
    try:
        value = msgspec.json.decode(call.arguments or "{}")
    except msgspec.DecodeError:
        value = None
    if not isinstance(value, dict):
        raise ProviderError(
            "bad_request",
            f"gemini: arguments of tool call {call.id!r} ({call.name}) are not a JSON object",
        )
    return value


def _function_response(content: str) -> Any:
    try:
        value = msgspec.json.decode(content)
    except msgspec.DecodeError:
        value = None
    return value if isinstance(value, dict) else {"content": content}


def _contents(messages: list[Message]) -> tuple[str | None, list[dict[str, Any]]]:
    system: list[str] = []
    names: dict[str, str] = {}  # tool call id -> function name
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            system.append(message_text(message))
            continue
        parts: list[dict[str, Any]] = []
        if message.role == "tool":
            call_id = message.tool_call_id or ""
            name = names.get(call_id) or message.name
            if not name:
                raise ProviderError(
                    "bad_request",
                    f"gemini: tool result for call {call_id!r} answers no earlier tool call "
                    "(Gemini needs the function's name)",
                )
            parts.append(
                {
                    "functionResponse": {
                        "name": name,
                        "response": _function_response(message_text(message)),
                    }
                }
            )
            role = "user"
        else:
            if message.content:
                parts.append({"text": message.content})
            if message.role == "assistant":
                for call in message.tool_calls or ():
                    names[call.id] = call.name
                    parts.append(
                        {"functionCall": {"name": call.name, "args": _function_args(call)}}
                    )
            role = "model" if message.role == "assistant" else "user"
        if not parts:
            parts.append({"text": ""})
        if turns and turns[-1]["role"] == role:
            turns[-1]["parts"].extend(parts)
        else:
            turns.append({"role": role, "parts": parts})
    return ("\n\n".join(system) if system else None), turns


def _tool_config(choice: str) -> dict[str, Any]:
    if choice in ("auto", "none", "required"):
        mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}[choice]
        return {"functionCallingConfig": {"mode": mode}}
    return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [choice]}}


def _error_fields(body: bytes) -> tuple[str, str | None, set[str], float | None]:
    """(message, status name, lower-cased codes, RetryInfo delay) of a google.rpc.Status."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body.decode("utf-8", "replace"), None, set(), None
    if isinstance(data, list) and data:  # the streaming endpoint wraps it in a list
        data = data[0]
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return body.decode("utf-8", "replace"), None, set(), None
    message = error.get("message")
    status_name = error.get("status")
    codes: set[str] = set()
    if isinstance(status_name, str) and status_name:
        codes.add(status_name.lower())
    delay: float | None = None
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if not isinstance(detail, dict):
            continue
        reason = detail.get("reason")
        if isinstance(reason, str) and reason:
            codes.add(reason.lower())
        retry_delay = detail.get("retryDelay")
        if isinstance(retry_delay, str):
            delay = parse_duration(retry_delay)
    return (
        message if isinstance(message, str) else str(message or ""),
        status_name if isinstance(status_name, str) and status_name else None,
        codes,
        delay,
    )


def _classified(
    status: int | None,
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    where: str | None = None,
) -> ProviderError:
    message, code, codes, delay = _error_fields(body)
    return classified_error(
        "gemini",
        status,
        headers,
        now,
        message,
        code,
        codes,
        where,
        body_retry_after=delay,
    )


def _malformed(what: str, exc: Exception, data: str, status: int | None = None) -> ProviderError:
    return ProviderError(
        "transient", f"gemini: malformed {what} ({exc}): {error_snippet(data, 120)}", status=status
    )


def _blocked(reason: str, status: int | None = None) -> ProviderError:
    return ProviderError(
        "content_filter", f"gemini: the answer was blocked (reason {reason})", status=status
    )


# ----------------------------------------------------------------------- protocol


class GeminiProtocol:
    """The Gemini generateContent protocol. Stateless; one instance serves every key."""

    name = "gemini"

    def build(
        self,
        request: ChatRequest,
        *,
        base_url: str,
        secret: str,
        stream: bool,
        headers: Mapping[str, str],
    ) -> WireRequest:
        system, contents = _contents(request.messages)
        body: dict[str, Any] = {"contents": contents}
        if system is not None:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        if request.tools:
            declarations: list[dict[str, Any]] = []
            for tool in request.tools:
                declaration: dict[str, Any] = {"name": tool.name}
                if tool.description:
                    declaration["description"] = tool.description
                if tool.parameters:
                    declaration["parameters"] = tool.parameters
                declarations.append(declaration)
            body["tools"] = [{"functionDeclarations": declarations}]
        if request.tool_choice:
            body["toolConfig"] = _tool_config(request.tool_choice)
        generation: dict[str, Any] = {}
        if request.stop:
            generation["stopSequences"] = request.stop
        if request.temperature is not None:
            generation["temperature"] = request.temperature
        if request.top_p is not None:
            generation["topP"] = request.top_p
        if request.max_tokens is not None:
            generation["maxOutputTokens"] = request.max_tokens
        if generation:
            body["generationConfig"] = generation
        model = request.model.removeprefix("models/")
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        wire_headers = {
            "x-goog-api-key": secret,
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
        }
        wire_headers.update({name.lower(): value for name, value in headers.items()})
        return WireRequest(
            method="POST",
            url=f"{base_url.rstrip('/')}/v1beta/models/{quote(model, safe='-._~')}:{method}",
            headers=wire_headers,
            body=_encode(body),
        )

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> ChatResponse:
        try:
            response = _decode_response.decode(body)
        except msgspec.DecodeError as exc:
            raise _malformed(
                "response body", exc, body.decode("utf-8", "replace"), status
            ) from None
        if response.error is not None:
            raise _classified(None, {}, body, 0.0, "error in a 2xx body")
        if not response.candidates:
            feedback = response.prompt_feedback
            if feedback is not None and feedback.block_reason:
                raise _blocked(feedback.block_reason, status)
            raise ProviderError(
                "transient", "gemini: malformed response body (no candidates)", status=status
            )
        candidate = response.candidates[0]
        texts: list[str] = []
        calls: list[ToolCall] = []
        for part in (candidate.content.parts if candidate.content else None) or ():
            if part.function_call is not None:
                args = part.function_call.args if part.function_call.args is not None else {}
                calls.append(
                    ToolCall(
                        id=f"call_{len(calls)}",
                        name=part.function_call.name,
                        arguments=_encode(args).decode(),
                    )
                )
            elif part.text and not part.thought:
                texts.append(part.text)
        content = "".join(texts)
        reason = candidate.finish_reason or "STOP"
        if reason in _BLOCKED and not content and not calls:
            raise _blocked(reason, status)
        finish = _FINISH.get(reason, "stop")
        if calls and finish == "stop":
            finish = "tool_calls"
        return ChatResponse(
            content=content,
            finish_reason=finish,
            usage=_usage(response.usage_metadata) if response.usage_metadata else Usage(),
            tool_calls=calls,
            upstream_model=response.model_version or "",
        )

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float
    ) -> ProviderError:
        return _classified(status, headers, body, now)

    def stream_decoder(self) -> GeminiStreamDecoder:
        return GeminiStreamDecoder()


class GeminiStreamDecoder:
    """Decodes one ``streamGenerateContent?alt=sse`` stream: every event is a whole
    GenerateContentResponse; the one with a finishReason ends the stream."""

    __slots__ = ("_calls", "_done", "_produced", "_usage")

    def __init__(self) -> None:
        self._done = False
        self._calls = 0  # function calls seen so far: the next synthesized id
        self._produced = False  # some text or call was handed out
        self._usage: Usage | None = None

    @property
    def done(self) -> bool:
        return self._done

    @property
    def finished(self) -> bool:
        return self._done

    def feed(self, event: SseEvent) -> list[StreamChunk]:
        if self._done:
            return []
        try:
            response = _decode_response.decode(event.data)
        except msgspec.DecodeError as exc:
            raise _malformed("stream event", exc, event.data) from None
        if response.error is not None:
            raise _classified(None, {}, event.data.encode(), 0.0)
        if response.usage_metadata is not None:
            self._usage = _usage(response.usage_metadata)
        if not response.candidates:
            feedback = response.prompt_feedback
            if feedback is not None and feedback.block_reason:
                raise _blocked(feedback.block_reason)
            return []
        candidate = response.candidates[0]
        texts: list[str] = []
        calls: list[ToolCallDelta] = []
        for part in (candidate.content.parts if candidate.content else None) or ():
            if part.function_call is not None:
                args = part.function_call.args if part.function_call.args is not None else {}
                calls.append(
                    ToolCallDelta(
                        index=self._calls,
                        id=f"call_{self._calls}",
                        name=part.function_call.name,
                        arguments=_encode(args).decode(),
                    )
                )
                self._calls += 1
            elif part.text and not part.thought:
                texts.append(part.text)
        text = "".join(texts)
        if text or calls:
            self._produced = True
        finish: str | None = None
        usage: Usage | None = None
        if candidate.finish_reason:
            reason = candidate.finish_reason
            if reason in _BLOCKED and not self._produced:
                raise _blocked(reason)
            finish = _FINISH.get(reason, "stop")
            if finish == "stop" and self._calls:
                finish = "tool_calls"
            usage = self._usage
            self._done = True
        if not text and not calls and finish is None:
            return []
        return [StreamChunk(text=text, tool_calls=calls, finish_reason=finish, usage=usage)]
