"""The Google Gemini (Generative Language API) wire protocol.

`GeminiProtocol` builds ``POST {base_url}/v1beta/models/{model}:generateContent`` (or
``:streamGenerateContent?alt=sse``; base_url like
``https://generativelanguage.googleapis.com``) with ``x-goog-api-key``, parses the
GenerateContentResponse, classifies errors (google.rpc.Status bodies) with the shared
table of `_classify`, and decodes the SSE stream, whose every event is a whole
GenerateContentResponse.
`build_embed` / `parse_embed` speak ``:batchEmbedContents`` for embeddings.

Translation choices:

- system messages are joined (blank line between) into ``systemInstruction``; they
  may carry text parts only (anything else is refused: bad_request);
- roles: assistant -> "model", user and tool results -> "user"; consecutive turns of
  the same role are merged, so parallel function responses share one turn;
- content parts, in order: text -> ``{"text"}``; an image, file or audio part with
  base64 data (or a ``data:`` URL) -> ``inlineData {mimeType, data}``; one with an
  http(s) or gs:// URL -> ``fileData {mimeType, fileUri}`` (the Gemini API fetches
  public and signed HTTPS URLs itself, and takes its own Files API URIs); a file part's
  `file_id` is taken only as a Files API name (``files/...``). The MIME type is the
  part's `media_type`, else guessed from the URL's or filename's extension, else the
  part is refused (Gemini requires it). Audio ``format`` x -> ``audio/x``. OpenAI's
  image ``detail`` and Anthropic's ``cache_control`` have no generateContent
  equivalent and are not sent (Gemini caches implicitly);
- a tool result becomes a ``functionResponse`` part whose name is looked up from the
  earlier assistant tool call with that id (falling back to the message's `name`);
  its ``response`` is the content when that is a JSON object, else
  ``{"content": <text>}``; it may carry text parts only;
- Gemini has no call ids: parsed function calls get ``call_<n>``, n counting the
  calls of the answer (or of the stream) from 0, so ids are stable across retries;
- response_format: json_object -> ``responseMimeType: application/json``;
  json_schema -> that plus ``responseJsonSchema`` (the JSON Schema as given, which the
  API documents as accepted whole: $ref/$defs, anyOf, additionalProperties, ...; the
  format's description becomes the schema's when it has none; ``strict`` is implied,
  Gemini's schema output is always constrained);
- reasoning_effort -> ``thinkingConfig.thinkingBudget`` by Google's own documented
  mapping for its OpenAI-compatible endpoint (none 0, low 1,024, medium 8,192, high
  24,576; minimal as low), with ``includeThoughts`` so thought summaries come back
  (not with "none");
- seed, n, frequency/presence penalties -> ``seed``, ``candidateCount``,
  ``frequencyPenalty``, ``presencePenalty``; logprobs / top_logprobs ->
  ``responseLogprobs`` / ``logprobs``; a stream with n > 1 is refused (a stream chunk
  has no choice index);
- thought parts (``thought: true``) are reasoning, never content: `reasoning` and a
  `ThinkingBlock(protocol="gemini")` each (with its ``thoughtSignature``); a signature
  on another part (a function call's, or the answer's last part) is a block with no
  text. Sent back with an assistant turn: thought blocks as thought parts (first, with
  their signatures); text-less blocks' signatures on the turn's function calls in
  order (the docs: a step's first functionCall part carries it), else on its last
  part, as received. Blocks of other protocols, and a bare `reasoning`, are dropped
  (a signature only means something to the provider that made it);
- candidates: every candidate is a `Choice` (when there are several); the first fills
  the response's own fields. logprobsResult -> OpenAI's ``{"content": [{token,
  logprob, bytes, top_logprobs}]}``; safetyRatings -> ``provider_fields
  ["safety_ratings"]`` (the first candidate's; with several candidates, every one's
  in ``choice_safety_ratings``) and promptFeedback's ->
  ``provider_fields["prompt_safety_ratings"]``, as Gemini wrote them;
- finishReason STOP with function calls is reported as "tool_calls"; SAFETY,
  RECITATION, BLOCKLIST, PROHIBITED_CONTENT, SPII and IMAGE_SAFETY as
  "content_filter", and raise content_filter when no candidate produced anything;
- usage: completion tokens are ``candidatesTokenCount`` plus ``thoughtsTokenCount``
  (reasoning_tokens); cached_tokens is ``cachedContentTokenCount`` (part of the
  prompt count);
- the stream has no end marker: the event with a finishReason sets both `finished`
  and `done`; usage is the last usageMetadata seen, attached to that event;
- a 429 RESOURCE_EXHAUSTED stays rate_limit even for a per-day quota (it resets; the
  RetryInfo detail's retryDelay becomes retry_after when no header says otherwise).

What this module must never do: put the secret anywhere but the x-goog-api-key
header (never the ``?key=`` query parameter, a repr or an error message), do I/O, or
read a clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote, urlsplit

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
    FilePart,
    ImagePart,
    Message,
    StreamChunk,
    TextPart,
    ThinkingBlock,
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
_THINKING_BUDGET: Final = {"none": 0, "minimal": 1024, "low": 1024, "medium": 8192, "high": 24576}
"""reasoning_effort -> thinkingBudget, as Google maps it for its OpenAI-compatible
endpoint (low 1K, medium 8K, high 24K; "none" disables thinking)."""

# Extensions -> MIME types Gemini takes (a table, not `mimetypes`, which reads files).
_EXTENSIONS: Final = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "heic": "image/heic",
    "heif": "image/heif",
    "gif": "image/gif",
    "pdf": "application/pdf",
    "txt": "text/plain",
    "md": "text/md",
    "html": "text/html",
    "htm": "text/html",
    "csv": "text/csv",
    "xml": "text/xml",
    "json": "application/json",
    "wav": "audio/wav",
    "mp3": "audio/mp3",
    "aiff": "audio/aiff",
    "aac": "audio/aac",
    "ogg": "audio/ogg",
    "flac": "audio/flac",
    "mp4": "video/mp4",
    "mpeg": "video/mpeg",
    "mov": "video/mov",
    "webm": "video/webm",
}

_encode = msgspec.json.encode


# ----------------------------------------------------------------------- wire shapes


class _FunctionCall(msgspec.Struct, rename="camel"):
    name: str = ""
    args: Any = None


class _Part(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool | None = None
    thought_signature: str | None = None
    function_call: _FunctionCall | None = None


class _Content(msgspec.Struct, rename="camel"):
    parts: list[_Part] | None = None
    role: str | None = None


class _LogprobsCandidate(msgspec.Struct, rename="camel"):
    token: str | None = None
    token_id: int | None = None
    log_probability: float | None = None


class _TopCandidates(msgspec.Struct, rename="camel"):
    candidates: list[_LogprobsCandidate] | None = None


class _LogprobsResult(msgspec.Struct, rename="camel"):
    top_candidates: list[_TopCandidates] | None = None
    chosen_candidates: list[_LogprobsCandidate] | None = None


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None
    safety_ratings: list[Any] | None = None
    logprobs_result: _LogprobsResult | None = None


class _UsageMetadata(msgspec.Struct, rename="camel"):
    prompt_token_count: int | None = None
    candidates_token_count: int | None = None
    thoughts_token_count: int | None = None
    cached_content_token_count: int | None = None
    total_token_count: int | None = None


class _PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None
    safety_ratings: list[Any] | None = None


class _Response(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] | None = None
    prompt_feedback: _PromptFeedback | None = None
    usage_metadata: _UsageMetadata | None = None
    model_version: str | None = None
    error: Any = None


_decode_response: Final = msgspec.json.Decoder(_Response)


def _usage(raw: _UsageMetadata) -> Usage:
    prompt = raw.prompt_token_count or 0
    thoughts = raw.thoughts_token_count or 0
    completion = (raw.candidates_token_count or 0) + thoughts
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=raw.total_token_count or prompt + completion,
        cached_tokens=raw.cached_content_token_count or 0,
        reasoning_tokens=thoughts,
    )


def _token_logprob(candidate: _LogprobsCandidate) -> dict[str, Any]:
    token = candidate.token or ""
    return {
        "token": token,
        "logprob": candidate.log_probability if candidate.log_probability is not None else 0.0,
        "bytes": list(token.encode()),
    }


def _logprobs(raw: _LogprobsResult | None) -> dict[str, Any] | None:
    """Gemini's logprobsResult in OpenAI's shape: a list of chosen tokens, each with its
    top alternatives (the step's topCandidates)."""
    if raw is None or not raw.chosen_candidates:
        return None
    tops = raw.top_candidates or []
    content: list[dict[str, Any]] = []
    for step, chosen in enumerate(raw.chosen_candidates):
        alternatives = (tops[step].candidates if step < len(tops) else None) or []
        entry = _token_logprob(chosen)
        entry["top_logprobs"] = [_token_logprob(a) for a in alternatives]
        content.append(entry)
    return {"content": content, "refusal": None}


# ----------------------------------------------------------------------- request


def _refuse(message: str) -> ProviderError:
    return ProviderError("bad_request", f"gemini: {message}")


def _function_args(call: ToolCall) -> Any:
    try:
        value = msgspec.json.decode(call.arguments or "{}")
    except msgspec.DecodeError:
        value = None
    if not isinstance(value, dict):
        raise _refuse(f"arguments of tool call {call.id!r} ({call.name}) are not a JSON object")
    return value


def _function_response(content: str) -> Any:
    try:
        value = msgspec.json.decode(content)
    except msgspec.DecodeError:
        value = None
    return value if isinstance(value, dict) else {"content": content}


def _guess_type(*names: str | None) -> str | None:
    for name in names:
        if not name or name.startswith("data:"):
            continue
        path = urlsplit(name).path if "://" in name else name
        extension = path.rpartition("/")[2].rpartition(".")[2].lower()
        if extension in _EXTENSIONS:
            return _EXTENSIONS[extension]
    return None


def _media_part(part: ImagePart | FilePart | AudioPart, base_url: str) -> dict[str, Any]:
    """One image, file or audio part as Gemini ``inlineData`` or ``fileData``."""
    if isinstance(part, AudioPart):
        mime = part.format if "/" in part.format else f"audio/{part.format.lower()}"
        return {"inlineData": {"mimeType": mime, "data": part.data}}
    kind = "image" if isinstance(part, ImagePart) else "file"
    filename = part.filename if isinstance(part, FilePart) else None
    data: str | None = part.data
    url: str | None = part.url
    media_type: str | None = part.media_type
    if not data and not url and isinstance(part, FilePart) and part.file_id:
        if part.file_id.startswith("files/"):
            url = f"{base_url.rstrip('/')}/v1beta/{part.file_id}"
        elif part.file_id.startswith(("https://", "http://")):
            url = part.file_id
        else:
            raise _refuse(
                f"file_id {part.file_id!r} is not a Gemini Files API name (files/...); "
                "send the file's data or a URL"
            )
    if not data and url and url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        if not comma or not header.endswith(";base64"):
            raise _refuse(f"a {kind} part's data: URL is not base64 (data:<type>;base64,...)")
        media_type = media_type or header.removesuffix(";base64") or None
    if data:
        media_type = media_type or _guess_type(filename)
        if not media_type:
            raise _refuse(
                f"a base64 {kind} part needs its media_type (Gemini requires a MIME type)"
            )
        return {"inlineData": {"mimeType": media_type, "data": data}}
    if not url:
        raise _refuse(f"a {kind} part has neither data nor url")
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("https", "http", "gs"):
        raise _refuse(f"a {kind} part's URL scheme {scheme!r} is not http(s) or gs")
    media_type = media_type or _guess_type(url, filename)
    if not media_type:
        raise _refuse(
            f"a {kind} part's URL has no known file extension: give its media_type "
            "(Gemini requires a MIME type)"
        )
    return {"fileData": {"mimeType": media_type, "fileUri": url}}


def _content_parts(content: str | list[ContentPart], base_url: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, TextPart):
            if part.text:
                parts.append({"text": part.text})
        else:
            parts.append(_media_part(part, base_url))
    return parts


def _text_only(message: Message, what: str) -> str:
    content = message.content
    if not isinstance(content, str):
        for part in content:
            if not isinstance(part, TextPart):
                raise _refuse(f"{what} can carry text only, not a {type(part).__name__}")
    return message_text(message)


def _assistant_parts(
    message: Message, base_url: str, names: dict[str, str]
) -> list[dict[str, Any]]:
    """An assistant turn: its Gemini thought parts, content, then function calls, with
    each thought signature where Gemini put it (see the module's notes)."""
    blocks = [b for b in message.thinking or () if b.protocol == "gemini"]
    parts: list[dict[str, Any]] = []
    for block in blocks:
        if block.text:
            thought: dict[str, Any] = {"text": block.text, "thought": True}
            if block.signature:
                thought["thoughtSignature"] = block.signature
            parts.append(thought)
    body = _content_parts(message.content, base_url)
    calls: list[dict[str, Any]] = []
    for call in message.tool_calls or ():
        names[call.id] = call.name
        calls.append({"functionCall": {"name": call.name, "args": _function_args(call)}})
    signatures = [b.signature for b in blocks if not b.text and b.signature]
    targets = calls or body[-1:]
    for target, signature in zip(targets, signatures, strict=False):
        target["thoughtSignature"] = signature
    extra = [{"text": "", "thoughtSignature": s} for s in signatures[len(targets) :]]
    return parts + body + calls + extra


def _contents(messages: list[Message], base_url: str) -> tuple[str | None, list[dict[str, Any]]]:
    system: list[str] = []
    names: dict[str, str] = {}  # tool call id -> function name
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            system.append(_text_only(message, "a system message"))
            continue
        parts: list[dict[str, Any]]
        if message.role == "tool":
            call_id = message.tool_call_id or ""
            name = names.get(call_id) or message.name
            if not name:
                raise _refuse(
                    f"tool result for call {call_id!r} answers no earlier tool call "
                    "(Gemini needs the function's name)"
                )
            text = _text_only(message, "a tool result")
            parts = [{"functionResponse": {"name": name, "response": _function_response(text)}}]
            role = "user"
        elif message.role == "assistant":
            parts = _assistant_parts(message, base_url, names)
            role = "model"
        else:
            parts = _content_parts(message.content, base_url)
            role = "user"
        if not parts:
            parts.append({"text": ""})
        if turns and turns[-1]["role"] == role:
            turns[-1]["parts"].extend(parts)
        else:
            turns.append({"role": role, "parts": parts})
    return ("\n\n".join(system) if system else None), turns


def _response_format(request: ChatRequest, generation: dict[str, Any]) -> None:
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return
    generation["responseMimeType"] = "application/json"
    if response_format.type != "json_schema":
        return
    spec = response_format.json_schema or {}
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise _refuse("response_format json_schema has no `schema` object")
    description = spec.get("description")
    if isinstance(description, str) and description and "description" not in schema:
        schema = {**schema, "description": description}
    generation["responseJsonSchema"] = schema


def _thinking(effort: str) -> dict[str, Any]:
    budget = _THINKING_BUDGET.get(effort.lower())
    if budget is None:
        raise _refuse(
            f"reasoning_effort {effort!r} has no thinking budget; use one of "
            + ", ".join(_THINKING_BUDGET)
        )
    if budget == 0:
        return {"thinkingBudget": 0}
    return {"thinkingBudget": budget, "includeThoughts": True}


def _generation_config(request: ChatRequest, stream: bool) -> dict[str, Any]:
    generation: dict[str, Any] = {}
    if request.stop:
        generation["stopSequences"] = request.stop
    if request.temperature is not None:
        generation["temperature"] = request.temperature
    if request.top_p is not None:
        generation["topP"] = request.top_p
    if request.max_tokens is not None:
        generation["maxOutputTokens"] = request.max_tokens
    if request.n is not None:
        if stream and request.n > 1:
            raise _refuse("n > 1 cannot be streamed (ask for the choices without stream)")
        generation["candidateCount"] = request.n
    if request.seed is not None:
        generation["seed"] = request.seed
    if request.frequency_penalty is not None:
        generation["frequencyPenalty"] = request.frequency_penalty
    if request.presence_penalty is not None:
        generation["presencePenalty"] = request.presence_penalty
    if request.logprobs or request.top_logprobs is not None:
        generation["responseLogprobs"] = True
    if request.top_logprobs is not None:
        generation["logprobs"] = request.top_logprobs
    _response_format(request, generation)
    if request.reasoning_effort is not None:
        generation["thinkingConfig"] = _thinking(request.reasoning_effort)
    return generation


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


class _Read(msgspec.Struct):
    """What one candidate's parts say."""

    text: str
    reasoning: str
    calls: list[ToolCall]
    thinking: list[ThinkingBlock]


def _read(parts: Sequence[_Part]) -> _Read:
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    blocks: list[ThinkingBlock] = []
    for part in parts:
        if part.function_call is not None:
            args = part.function_call.args if part.function_call.args is not None else {}
            calls.append(
                ToolCall(
                    id=f"call_{len(calls)}",
                    name=part.function_call.name,
                    arguments=_encode(args).decode(),
                )
            )
        elif part.thought:
            thoughts.append(part.text or "")
            blocks.append(
                ThinkingBlock(
                    text=part.text or "", signature=part.thought_signature, protocol="gemini"
                )
            )
            continue
        elif part.text:
            texts.append(part.text)
        if part.thought_signature:
            blocks.append(ThinkingBlock(signature=part.thought_signature, protocol="gemini"))
    return _Read("".join(texts), "".join(thoughts), calls, blocks)


def _finish(reason: str, calls: bool) -> str:
    finish = _FINISH.get(reason, "stop")
    return "tool_calls" if calls and finish == "stop" else finish


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
        system, contents = _contents(request.messages, base_url)
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
        generation = _generation_config(request, stream)
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
        feedback = response.prompt_feedback
        if not response.candidates:
            if feedback is not None and feedback.block_reason:
                raise _blocked(feedback.block_reason, status)
            raise ProviderError(
                "transient", "gemini: malformed response body (no candidates)", status=status
            )
        choices: list[Choice] = []
        reads: list[_Read] = []
        blocked: list[str] = []
        for index, candidate in enumerate(response.candidates):
            read = _read((candidate.content.parts if candidate.content else None) or ())
            reason = candidate.finish_reason or "STOP"
            if reason in _BLOCKED and not read.text and not read.calls:
                blocked.append(reason)
            reads.append(read)
            choices.append(
                Choice(
                    index=index,
                    content=read.text,
                    finish_reason=_finish(reason, bool(read.calls)),
                    tool_calls=read.calls,
                    reasoning=read.reasoning or None,
                    logprobs=_logprobs(candidate.logprobs_result),
                )
            )
        if len(blocked) == len(choices):
            raise _blocked(blocked[0], status)
        first, read = choices[0], reads[0]
        fields: dict[str, Any] = {}
        if response.candidates[0].safety_ratings:
            fields["safety_ratings"] = response.candidates[0].safety_ratings
        if feedback is not None and feedback.safety_ratings:
            fields["prompt_safety_ratings"] = feedback.safety_ratings
        if len(choices) > 1 and any(c.safety_ratings for c in response.candidates):
            fields["choice_safety_ratings"] = [c.safety_ratings for c in response.candidates]
        return ChatResponse(
            content=first.content,
            finish_reason=first.finish_reason,
            usage=_usage(response.usage_metadata) if response.usage_metadata else Usage(),
            tool_calls=first.tool_calls,
            reasoning=first.reasoning,
            thinking=read.thinking or None,
            logprobs=first.logprobs,
            choices=choices if len(choices) > 1 else None,
            provider_fields=fields,
            upstream_model=response.model_version or "",
        )

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float
    ) -> ProviderError:
        return _classified(status, headers, body, now)

    def stream_decoder(self) -> GeminiStreamDecoder:
        return GeminiStreamDecoder()

    def build_embed(
        self,
        request: EmbeddingRequest,
        *,
        base_url: str,
        secret: str,
        headers: Mapping[str, str],
    ) -> WireRequest:
        """``POST {base_url}/v1beta/models/{model}:batchEmbedContents``: one request per
        input, ``dimensions`` as ``outputDimensionality`` (``user`` has no equivalent
        and is not sent)."""
        model = request.model.removeprefix("models/")
        one: dict[str, Any] = {"model": f"models/{model}"}
        if request.dimensions is not None:
            one["outputDimensionality"] = request.dimensions
        body = {"requests": [{**one, "content": {"parts": [{"text": t}]}} for t in request.inputs]}
        wire_headers = {
            "x-goog-api-key": secret,
            "content-type": "application/json",
            "accept": "application/json",
        }
        wire_headers.update({name.lower(): value for name, value in headers.items()})
        path = f"/v1beta/models/{quote(model, safe='-._~')}:batchEmbedContents"
        return WireRequest(
            method="POST",
            url=base_url.rstrip("/") + path,
            headers=wire_headers,
            body=_encode(body),
        )

    def parse_embed(
        self, status: int, headers: Mapping[str, str], body: bytes
    ) -> EmbeddingResponse:
        """A batchEmbedContents answer: ``embeddings[i].values``, in request order. It
        reports no usage (the router estimates it)."""
        try:
            answer = _decode_embeddings.decode(body)
        except msgspec.DecodeError as exc:
            raise _malformed(
                "embeddings body", exc, body.decode("utf-8", "replace"), status
            ) from None
        if answer.error is not None:
            raise _classified(None, {}, body, 0.0, "error in a 2xx body")
        if not answer.embeddings:
            raise ProviderError(
                "transient", "gemini: malformed embeddings body (no embeddings)", status=status
            )
        return EmbeddingResponse(embeddings=[e.values for e in answer.embeddings])


class _Embedding(msgspec.Struct):
    values: list[float]


class _Embeddings(msgspec.Struct):
    embeddings: list[_Embedding] | None = None
    error: Any = None


_decode_embeddings: Final = msgspec.json.Decoder(_Embeddings)


class GeminiStreamDecoder:
    """Decodes one ``streamGenerateContent?alt=sse`` stream: every event is a whole
    GenerateContentResponse; the one with a finishReason ends the stream.

    Thought text is handed out as `reasoning` deltas as it comes; the thinking blocks
    (thought text with its signature, or a bare signature) come whole, when a signature
    arrives or at the end."""

    __slots__ = ("_calls", "_done", "_fields", "_produced", "_thought", "_usage")

    def __init__(self) -> None:
        self._done = False
        self._calls = 0  # function calls seen so far: the next synthesized id
        self._produced = False  # some text or call was handed out
        self._usage: Usage | None = None
        self._thought: list[str] = []  # thought text not yet in a thinking block
        self._fields: dict[str, Any] = {}  # provider fields handed out so far

    @property
    def done(self) -> bool:
        return self._done

    @property
    def finished(self) -> bool:
        return self._done

    def _flush(self, blocks: list[ThinkingBlock], signature: str | None = None) -> None:
        if self._thought or signature:
            text = "".join(self._thought)
            blocks.append(ThinkingBlock(text=text, signature=signature, protocol="gemini"))
            self._thought.clear()

    def _new_fields(self, response: _Response, candidate: _Candidate | None) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        feedback = response.prompt_feedback
        if feedback is not None and feedback.safety_ratings:
            fields["prompt_safety_ratings"] = feedback.safety_ratings
        if candidate is not None and candidate.safety_ratings:
            fields["safety_ratings"] = candidate.safety_ratings
        fresh = {k: v for k, v in fields.items() if self._fields.get(k) != v}
        self._fields.update(fresh)
        return fresh

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
            fields = self._new_fields(response, None)
            return [StreamChunk(provider_fields=fields)] if fields else []
        candidate = response.candidates[0]
        texts: list[str] = []
        reasoning: list[str] = []
        calls: list[ToolCallDelta] = []
        blocks: list[ThinkingBlock] = []
        for part in (candidate.content.parts if candidate.content else None) or ():
            if part.thought:
                reasoning.append(part.text or "")
                self._thought.append(part.text or "")
                if part.thought_signature:
                    self._flush(blocks, part.thought_signature)
                continue
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
            elif part.text:
                texts.append(part.text)
            if part.thought_signature:
                self._flush(blocks)
                blocks.append(ThinkingBlock(signature=part.thought_signature, protocol="gemini"))
        text = "".join(texts)
        if text or calls:
            self._produced = True
        finish: str | None = None
        usage: Usage | None = None
        if candidate.finish_reason:
            reason = candidate.finish_reason
            if reason in _BLOCKED and not self._produced:
                raise _blocked(reason)
            finish = _finish(reason, self._calls > 0)
            usage = self._usage
            self._flush(blocks)
            self._done = True
        logprobs = _logprobs(candidate.logprobs_result)
        fields = self._new_fields(response, candidate)
        thought = "".join(reasoning)
        if not (text or calls or thought or blocks or logprobs or fields or finish):
            return []
        return [
            StreamChunk(
                text=text,
                tool_calls=calls,
                finish_reason=finish,
                usage=usage,
                reasoning=thought,
                thinking=blocks or None,
                logprobs=logprobs,
                provider_fields=fields or None,
            )
        ]
