"""The OpenAI Chat Completions wire protocol (also spoken by most "OpenAI-compatible"
servers: vLLM, Groq, Together, OpenRouter, DeepSeek, ...).

`OpenAIProtocol` builds ``POST {base_url}/chat/completions`` (base_url like
``https://api.openai.com/v1``) with ``Authorization: Bearer``, parses the answer,
classifies errors with the shared table of `_classify`, and decodes the SSE stream
(``data: {chunk}`` ... ``data: [DONE]``). `build_embed` / `parse_embed` do the same for
``POST {base_url}/embeddings`` (float vectors asked for; base64 ones decoded too).

Choices made here:

- the output ceiling is sent as ``max_tokens`` (still accepted by OpenAI's chat
  models and understood by every compatible server; OpenAI's reasoning models answer
  "use max_completion_tokens" with a 400, classified bad_request);
- a streamed request asks for ``stream_options.include_usage``, so the last chunk
  (with empty ``choices``) carries usage: it arrives after the finish reason, so read
  until `done`, not `finished`;
- caller headers are merged last and win (names compared case-insensitively);
- content parts go out in OpenAI's shapes: text; an image as ``image_url`` (its URL, or
  base64 data as a ``data:`` URL with its media type, sniffed from the bytes when the
  part does not say; `detail` passed); a file as ``file`` (``file_data`` as a ``data:``
  URL, ``filename``, ``file_id``; a file by http(s) URL cannot be sent: 400); audio as
  ``input_audio`` (``data``, ``format``). Anthropic's `cache_control` is not sent
  (OpenAI caches by itself and strict servers refuse unknown keys);
- every OpenAI field of the request is sent under its own name (response_format, seed,
  n, penalties, logprobs, top_logprobs, logit_bias, user, parallel_tool_calls,
  reasoning_effort, service_tier, prediction); `ChatRequest.extra` (fields the router
  does not know) is merged into the body last, so it wins over everything but
  ``model``, ``messages``, ``stream`` and ``stream_options``, which it never replaces;
- an assistant message's `reasoning` is never sent back: DeepSeek documents that
  ``reasoning_content`` in an input message is a 400, and OpenAI has no such field;
- ``n > 1`` cannot be streamed (a 400 before anything is sent; a stream that carries
  a choice other than 0 anyway raises a clear error rather than mixing the choices);
- answers: ``reasoning_content`` (DeepSeek, vLLM) or ``reasoning`` (vLLM, Groq,
  OpenRouter) becomes `reasoning`; ``refusal``, ``system_fingerprint`` and ``logprobs``
  are carried; a refusal is an answer (OpenAI's structured outputs return one), not an
  error; with ``n > 1`` every choice lands in `ChatResponse.choices` (the first also
  fills the response itself); usage carries ``prompt_tokens_details.cached_tokens``
  (or DeepSeek's ``prompt_cache_hit_tokens``) and
  ``completion_tokens_details.reasoning_tokens``; ``service_tier``, ``annotations``
  and ``audio`` of an answer go to `provider_fields`. In a stream the deltas'
  reasoning, refusal and logprobs are carried likewise, and the first chunk emitted
  after a ``system_fingerprint`` is seen carries it in `provider_fields`.

What this module must never do: put the secret anywhere but the Authorization header
(never in a URL, a repr or an error message), do I/O, or read a clock.
"""

from __future__ import annotations

import array
import base64
import binascii
import sys
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
    AudioPart,
    ChatRequest,
    ChatResponse,
    Choice,
    ContentPart,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    FilePart,
    ImagePart,
    Message,
    StreamChunk,
    TextPart,
    Tool,
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

# Request fields sent as they are, under their own names, when set.
_NATIVE: Final = (
    "seed",
    "n",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "user",
    "parallel_tool_calls",
    "reasoning_effort",
    "service_tier",
    "prediction",
)
# Body keys `ChatRequest.extra` never replaces.
_RESERVED: Final = frozenset({"model", "messages", "stream", "stream_options"})

# Leading bytes of the formats a base64 payload may be sniffed as.
_MAGIC: Final = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
)

_encode = msgspec.json.encode


# ----------------------------------------------------------------------- wire shapes
# Decoded from JSON, these are trees that never hold a cycle: `gc=False` keeps the
# garbage collector from tracking the few made per streamed event.


class _Function(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct, gc=False):
    id: str | None = None
    function: _Function | None = None
    index: int | None = None


class _Message(msgspec.Struct, gc=False):
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: Any = None
    """vLLM, Groq and OpenRouter name the reasoning text so (a string; anything else
    is not reasoning text and is ignored)."""
    annotations: Any = None
    audio: Any = None


class _Choice(msgspec.Struct, gc=False):
    message: _Message | None = None
    delta: _Message | None = None
    finish_reason: str | None = None
    index: int | None = None
    logprobs: Any = None


class _PromptDetails(msgspec.Struct, gc=False):
    cached_tokens: int | None = None


class _CompletionDetails(msgspec.Struct, gc=False):
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct, gc=False):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None
    prompt_cache_hit_tokens: int | None = None
    """DeepSeek's name for the cached prompt tokens."""


class _Completion(msgspec.Struct, gc=False):
    choices: list[_Choice] | None = None
    model: str | None = None
    usage: _Usage | None = None
    error: Any = None
    system_fingerprint: str | None = None
    service_tier: Any = None


_decode_completion: Final = msgspec.json.Decoder(_Completion)


def _usage(raw: _Usage | None) -> Usage | None:
    if raw is None:
        return None
    prompt = raw.prompt_tokens or 0
    completion = raw.completion_tokens or 0
    details = raw.prompt_tokens_details
    cached = details.cached_tokens if details is not None else None
    if cached is None:
        cached = raw.prompt_cache_hit_tokens
    reasoning = raw.completion_tokens_details
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=raw.total_tokens or prompt + completion,
        cached_tokens=cached or 0,
        reasoning_tokens=(reasoning.reasoning_tokens if reasoning is not None else None) or 0,
    )


def _reasoning(message: _Message) -> str:
    """The reasoning text of a message or delta, under whichever name the server uses."""
    if message.reasoning_content:
        return message.reasoning_content
    reasoning = message.reasoning
    return reasoning if isinstance(reasoning, str) else ""


# ----------------------------------------------------------------------- request shapes


def _sniffed(data: str) -> str | None:
    """The media type of base64 `data`, from its first bytes (None: not recognised)."""
    try:
        head = binascii.a2b_base64(data[:24])
    except (binascii.Error, ValueError):
        return None
    for magic, media_type in _MAGIC:
        if head.startswith(magic):
            return media_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _data_url(data: str, media_type: str | None, fallback: str) -> str:
    """A ``data:`` URL for base64 `data` (as is when it already is one)."""
    if data.startswith("data:"):
        return data
    return f"data:{media_type or _sniffed(data) or fallback};base64,{data}"


def _part(part: ContentPart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        if part.url:
            url = part.url
        elif part.data:
            url = _data_url(part.data, part.media_type, "image/png")
        else:
            raise ProviderError("bad_request", "openai: an image part has neither url nor data")
        image: dict[str, Any] = {"url": url}
        if part.detail:
            image["detail"] = part.detail
        return {"type": "image_url", "image_url": image}
    if isinstance(part, FilePart):
        file: dict[str, Any] = {}
        if part.data:
            file["file_data"] = _data_url(part.data, part.media_type, "application/octet-stream")
        elif part.url and part.url.startswith("data:"):
            file["file_data"] = part.url
        if part.file_id:
            file["file_id"] = part.file_id
        if not file:
            what = "by URL" if part.url else "with neither data nor file_id"
            raise ProviderError(
                "bad_request",
                f"openai: a file part {what} cannot be sent; the OpenAI protocol takes a "
                "file inline (base64 data) or by file_id",
            )
        if part.filename:
            file["filename"] = part.filename
        return {"type": "file", "file": file}
    if isinstance(part, AudioPart):
        data = part.data
        if data.startswith("data:"):
            data = data.partition(",")[2]
        return {"type": "input_audio", "input_audio": {"data": data, "format": part.format}}
    raise ProviderError("bad_request", f"openai: cannot send a {type(part).__name__} part")


def _content(content: str | list[ContentPart]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    return [_part(part) for part in content]


def _message(message: Message) -> dict[str, Any]:
    # message.reasoning is deliberately not sent (see the module's docstring).
    content = _content(message.content)
    if message.role == "tool":
        return {
            "role": "tool",
            "tool_call_id": message.tool_call_id or "",
            "content": content,
        }
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.name:
        out["name"] = message.name
    if message.role == "assistant" and message.tool_calls:
        out["content"] = content or None
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
        if stream and request.n is not None and request.n > 1:
            raise ProviderError(
                "bad_request", "openai: n > 1 cannot be streamed; ask without stream"
            )
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [_message(message) for message in request.messages],
        }
        if request.tools:
            body["tools"] = [_tool(tool) for tool in request.tools]
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
        response_format = request.response_format
        if response_format is not None:
            shape: dict[str, Any] = {"type": response_format.type}
            if response_format.json_schema is not None:
                shape["json_schema"] = response_format.json_schema
            body["response_format"] = shape
        for name in _NATIVE:
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        for name, value in request.extra.items():
            if name not in _RESERVED:
                body[name] = value
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
        raw = completion.choices
        if not raw or any(choice.message is None for choice in raw):
            raise ProviderError(
                "transient", "openai: malformed response body (no choices)", status=status
            )
        if len(raw) > 1:
            raw = sorted(raw, key=lambda c: c.index if c.index is not None else 0)
        choices = [_answer(choice, position) for position, choice in enumerate(raw)]
        first = choices[0]
        withheld = not first.content and not first.tool_calls and not first.refusal
        if withheld and first.finish_reason == "content_filter":
            raise ProviderError(
                "content_filter",
                "openai: the answer was withheld by the content filter",
                status=status,
            )
        fields: dict[str, Any] = {}
        if completion.service_tier is not None:
            fields["service_tier"] = completion.service_tier
        message = raw[0].message
        assert message is not None
        if message.annotations:
            fields["annotations"] = message.annotations
        if message.audio is not None:
            fields["audio"] = message.audio
        return ChatResponse(
            content=first.content,
            finish_reason=first.finish_reason,
            usage=_usage(completion.usage) or Usage(),
            tool_calls=first.tool_calls,
            reasoning=first.reasoning,
            refusal=first.refusal,
            system_fingerprint=completion.system_fingerprint,
            logprobs=first.logprobs,
            choices=choices if len(choices) > 1 else None,
            provider_fields=fields,
            upstream_model=completion.model or "",
        )

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float
    ) -> ProviderError:
        return _classified(status, headers, body, now)

    def stream_decoder(self) -> OpenAIStreamDecoder:
        return OpenAIStreamDecoder()

    def build_embed(
        self,
        request: EmbeddingRequest,
        *,
        base_url: str,
        secret: str,
        headers: Mapping[str, str],
    ) -> WireRequest:
        """``POST {base_url}/embeddings``. Floats are asked for (every compatible
        server speaks them; base64 is the gateway's own business on the way out)."""
        body: dict[str, Any] = {
            "model": request.model,
            "input": request.input,
            "encoding_format": "float",
        }
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        if request.user is not None:
            body["user"] = request.user
        wire_headers = {
            "authorization": f"Bearer {secret}",
            "content-type": "application/json",
            "accept": "application/json",
        }
        wire_headers.update({name.lower(): value for name, value in headers.items()})
        return WireRequest(
            method="POST",
            url=base_url.rstrip("/") + "/embeddings",
            headers=wire_headers,
            body=_encode(body),
        )

    def parse_embed(
        self, status: int, headers: Mapping[str, str], body: bytes
    ) -> EmbeddingResponse:
        """An embeddings answer: its vectors in `index` order (float arrays, or base64
        little-endian float32 from a server that sends those anyway)."""
        try:
            answer = _decode_embeddings.decode(body)
        except msgspec.DecodeError as exc:
            snippet = error_snippet(body.decode("utf-8", "replace"), 120)
            raise ProviderError(
                "transient", f"openai: malformed embeddings body ({exc}): {snippet}", status=status
            ) from None
        if answer.error is not None:
            raise _classified(None, {}, body, 0.0, "error in a 2xx body")
        if not answer.data:
            raise ProviderError(
                "transient", "openai: malformed embeddings body (no data)", status=status
            )
        items = sorted(answer.data, key=lambda d: d.index)
        vectors: list[list[float]] = []
        for item in items:
            raw = item.embedding
            if isinstance(raw, str):
                try:
                    vectors.append(decode_float32(raw))
                except ValueError as exc:
                    raise ProviderError(
                        "transient", f"openai: malformed base64 embedding: {exc}", status=status
                    ) from None
            else:
                vectors.append(raw)
        usage = answer.usage
        prompt = usage.prompt_tokens if usage is not None else 0
        total = usage.total_tokens if usage is not None and usage.total_tokens else prompt
        return EmbeddingResponse(
            embeddings=vectors,
            usage=EmbeddingUsage(prompt_tokens=prompt, total_tokens=total),
            upstream_model=answer.model or "",
        )


class _EmbeddingItem(msgspec.Struct):
    embedding: list[float] | str
    index: int = 0


class _EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int = 0
    total_tokens: int = 0


class _Embeddings(msgspec.Struct):
    data: list[_EmbeddingItem] | None = None
    model: str | None = None
    usage: _EmbeddingUsage | None = None
    error: Any = None


_decode_embeddings: Final = msgspec.json.Decoder(_Embeddings)


def decode_float32(data: str) -> list[float]:
    """A base64 string of little-endian float32 values (OpenAI's base64 embedding
    encoding) as floats."""
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not base64: {exc}") from None
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} bytes is not a whole number of float32 values")
    values = array.array("f")
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    return values.tolist()


def encode_float32(vector: list[float]) -> str:
    """`vector` as base64 little-endian float32 (the inverse of `decode_float32`)."""
    values = array.array("f", vector)
    if sys.byteorder != "little":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def _answer(choice: _Choice, position: int) -> Choice:
    """One choice of a completed answer (its `message` is there)."""
    message = choice.message or _Message()
    calls = [
        ToolCall(
            id=call.id or f"call_{index}",
            name=(call.function.name if call.function else None) or "",
            arguments=(call.function.arguments if call.function else None) or "{}",
        )
        for index, call in enumerate(message.tool_calls or ())
    ]
    return Choice(
        index=choice.index if choice.index is not None else position,
        content=message.content or "",
        finish_reason=_FINISH.get(choice.finish_reason or "", "tool_calls" if calls else "stop"),
        tool_calls=calls,
        reasoning=_reasoning(message) or None,
        refusal=message.refusal or None,
        logprobs=choice.logprobs,
    )


class OpenAIStreamDecoder:
    """Decodes one OpenAI chat-completion stream: ``data: {chunk}`` events, then
    ``data: [DONE]``. An ``{"error": ...}`` chunk raises the classified error; a chunk
    for a choice other than 0 (a stream with ``n > 1``) raises a ``bad_request``."""

    __slots__ = ("_done", "_fingerprint", "_finished")

    def __init__(self) -> None:
        self._done = False
        self._finished = False
        # A system_fingerprint seen and not yet passed on ("" once passed on).
        self._fingerprint: str | None = None

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
        if chunk.system_fingerprint and self._fingerprint is None:
            self._fingerprint = chunk.system_fingerprint
        usage = _usage(chunk.usage)
        out: list[StreamChunk] = []
        for choice in chunk.choices or ():
            if choice.index:
                raise ProviderError(
                    "bad_request",
                    f"openai: the stream carries choice {choice.index}; a stream serves one "
                    "choice (ask for n > 1 without stream)",
                )
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
            reasoning = _reasoning(delta)
            refusal = delta.refusal or ""
            logprobs = choice.logprobs
            if (
                delta.content
                or calls
                or finish is not None
                or reasoning
                or refusal
                or logprobs is not None
            ):
                out.append(
                    StreamChunk(
                        text=delta.content or "",
                        tool_calls=calls,
                        finish_reason=finish,
                        reasoning=reasoning,
                        refusal=refusal,
                        logprobs=logprobs,
                    )
                )
        if usage is not None:
            if out:
                out[-1] = msgspec.structs.replace(out[-1], usage=usage)
            else:
                out.append(StreamChunk(usage=usage))
        if out and self._fingerprint:
            fields = {"system_fingerprint": self._fingerprint}
            out[0] = msgspec.structs.replace(out[0], provider_fields=fields)
            self._fingerprint = ""
        return out


def _tool(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {
        "name": tool.name,
        "description": tool.description,
        "parameters": tool.parameters or {"type": "object", "properties": {}},
    }
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}
