"""The Anthropic Messages wire protocol.

`AnthropicProtocol` builds ``POST {base_url}/v1/messages`` (base_url like
``https://api.anthropic.com``) with ``x-api-key`` and ``anthropic-version: 2023-06-01``
(and ``POST {base_url}/v1/messages/count_tokens`` for exact prompt counts: `build_count`,
`parse_count`), parses the answer, classifies errors with the shared table of
`_classify`, and decodes the SSE stream (message_start, content_block_*, message_delta,
message_stop, ping, error).

Translation choices:

- every ``system`` message, wherever it sits, is lifted into the top-level ``system``:
  a string (several joined with a blank line), or, as soon as one of them carries
  ``cache_control`` or content parts, a list of text blocks (the only shape that can
  carry ``cache_control``); a system message can hold text only;
- consecutive messages that map to the same role are merged into one turn (tool
  results become ``tool_result`` blocks of a user turn; several results of parallel
  calls share that turn, as the API requires); empty text blocks are not sent;
- content parts: text -> ``text`` block; image -> ``image`` block with a ``base64``
  source (data and media_type; a ``data:`` URL is split, a missing media type is read
  from the data's first bytes) or a ``url`` source; file -> ``document`` block: PDF
  data as a ``base64`` source, ``text/*`` data as a plain-text source (decoded),
  ``url`` as a url source, ``file_id`` as a ``file`` source (the Files API: the provider
  must send its ``anthropic-beta`` header), ``filename`` as the document's title. A part's
  ``cache_control`` goes on its block; a message's ``cache_control`` goes on the
  message's last block (its text for a string content). OpenAI's image ``detail`` has
  no Anthropic counterpart (the API sizes images itself) and is not sent. Tools carry
  ``cache_control`` when the `Tool` record has one;
- ``max_tokens`` is required by the API: 4096 (`DEFAULT_MAX_TOKENS`) when the request
  has none (plus the thinking budget when reasoning is asked for, see below);
- tool_choice "required" is ``{"type": "any"}``, a tool name is ``{"type": "tool"}``;
  ``parallel_tool_calls=False`` adds ``disable_parallel_tool_use: true`` (to ``auto``
  when the request names no tool choice);
- ``user`` is ``metadata.user_id``; ``service_tier`` "auto", "priority" and "scale" are
  ``auto`` (Priority Tier capacity when the organisation has it, standard otherwise),
  "default" is ``standard_only``; "flex" has no Anthropic tier and is refused; the
  tier that served the answer (``usage.service_tier``) is reported in
  ``provider_fields["service_tier"]``;
- ``stop`` is ``stop_sequences``; the sequence that matched comes back in
  ``stop_sequence``;
- response_format ``json_schema``: Anthropic's structured outputs
  (``output_config.format = {"type": "json_schema", "schema": ...}``) on the models
  documented to have it (Claude Opus 4.5 / 4.6, Sonnet 4.5 / 4.6, Haiku 4.5); on any
  other model, and for ``json_object`` (any JSON object, which structured outputs
  cannot express), a forced tool named ``json_response`` (`JSON_TOOL`) whose
  ``input_schema`` is the schema (``{"type": "object"}`` for json_object): its input
  is returned as the answer's JSON text, finish reason "stop" (streamed as text
  deltas). With the caller's own tools as well, both are sent: tool_choice becomes
  ``any`` (the model calls one of the caller's tools or answers through json_response;
  a named tool choice stays, "none" forces json_response). `JSON_TOOL` is reserved:
  a caller tool of that name is refused;
- reasoning_effort: on Claude 4.6 and later (Anthropic: budget_tokens is deprecated on
  4.6 and rejected from 4.7 on) ``thinking = {"type": "adaptive"}`` with
  ``output_config.effort`` (minimal and low -> low, medium, high, xhigh -> max);
  on earlier models ``thinking = {"type": "enabled", "budget_tokens": N}`` with N =
  1024 (minimal; the API's minimum), 2048 (low), 8192 (medium), 16384 (high), 32768
  (xhigh). The budget must stay below max_tokens and thinking counts against
  max_tokens: without max_tokens, max_tokens is the budget + 4096; with one, the budget
  is at most half of it (never under 1024), and a max_tokens of 1024 or less is refused.
  "none" sends no thinking. Thinking mode allows no temperature but 1, top_p only in
  [0.95, 1] and no forced tool use (tool_choice "required" or a named tool, and the
  json_response tool): such requests are refused (400) rather than changed.
  Thinking cannot begin in the middle of a tool-use turn: when the conversation ends
  with tool results whose turn began without an Anthropic thinking block (it was
  served by another provider, or without reasoning), thinking is not enabled for that
  request (Anthropic's own rule; it thinks again from the next user turn);
- thinking blocks: answers' ``thinking`` / ``redacted_thinking`` blocks become
  `ChatResponse.reasoning` (the thinking text joined) and `ChatResponse.thinking`
  (`ThinkingBlock`s with signature or redacted data, protocol "anthropic"); streams
  relay ``thinking_delta`` as `StreamChunk.reasoning` and give each finished block,
  with its signature, in `StreamChunk.thinking`. An assistant `Message`'s thinking
  blocks are sent back first in its content, unchanged, **only when their protocol is
  "anthropic"** and they are signed (or redacted): a block's signature can be verified
  only by the provider that made it, so blocks from other protocols (and unsigned
  ones, and `Message.reasoning` text) are dropped by rule;
- usage: prompt tokens are ``input_tokens`` plus cache creation and cache read tokens
  (Anthropic counts those apart; OpenAI's prompt_tokens includes cached tokens, and so
  does ours), ``cached_tokens`` is ``cache_read_input_tokens``,
  ``cache_creation_tokens`` is ``cache_creation_input_tokens``, completion tokens are
  ``output_tokens`` (thinking included: Anthropic does not report thinking tokens
  apart, so ``reasoning_tokens`` stays 0);
- a ``refusal`` stop reason is finish reason "content_filter" (an error when nothing
  was answered);
- error codes: ``error.type`` and, when present, ``error.details.error_code`` (the
  spend-limit 429's ``enforced_spend_limit_reached``) go to the classifier;
- stream tool-call deltas are indexed by tool-call ordinal (0, 1, ...), not by the
  content-block index, so they assemble like OpenAI's.

What this module must never do: put the secret anywhere but the x-api-key header
(never in a URL, a repr or an error message), do I/O, or read a clock.
"""

from __future__ import annotations

import base64
import binascii
import re
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
    ContentPart,
    FilePart,
    ImagePart,
    Message,
    StreamChunk,
    TextPart,
    ThinkingBlock,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from ._wire import SseEvent, WireRequest

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "EFFORT_BUDGETS",
    "JSON_TOOL",
    "AnthropicProtocol",
    "AnthropicStreamDecoder",
]

DEFAULT_MAX_TOKENS: Final = 4096
API_VERSION: Final = "2023-06-01"
JSON_TOOL: Final = "json_response"
"""The forced tool that carries response_format on models without structured outputs."""
MIN_THINKING_BUDGET: Final = 1024
EFFORT_BUDGETS: Final = {
    "minimal": 1024,
    "low": 2048,
    "medium": 8192,
    "high": 16384,
    "xhigh": 32768,
}
"""reasoning_effort -> thinking budget_tokens (models before Claude 4.6)."""
_ADAPTIVE_EFFORT: Final = {
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "max",
}
"""reasoning_effort -> output_config.effort with adaptive thinking (Claude 4.6 on)."""
_SERVICE_TIERS: Final = {
    "auto": "auto",
    "priority": "auto",
    "scale": "auto",
    "default": "standard_only",
}
# Models documented with structured outputs (output_config.format).
_NATIVE_JSON: Final = frozenset(
    {("opus", 4, 5), ("opus", 4, 6), ("sonnet", 4, 5), ("sonnet", 4, 6), ("haiku", 4, 5)}
)
_MODEL_VERSION: Final = re.compile(r"claude-(opus|sonnet|haiku)-(\d+)(?:-(\d{1,2}))?(?!\d)")

_FINISH: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_IMAGE_MAGIC: Final = (
    ("iVBORw0KGgo", "image/png"),
    ("/9j/", "image/jpeg"),
    ("R0lGOD", "image/gif"),
    ("UklGR", "image/webp"),
)
_PDF_MAGIC: Final = "JVBERi0"  # "%PDF-" in base64

_encode = msgspec.json.encode


# ----------------------------------------------------------------------- wire shapes


class _Block(msgspec.Struct):
    type: str = ""
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    service_tier: str | None = None


class _Message(msgspec.Struct):
    type: str = ""
    content: list[_Block] | None = None
    model: str | None = None
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: _Usage | None = None
    error: Any = None


class _Delta(msgspec.Struct):
    type: str = ""
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None
    signature: str | None = None
    stop_reason: str | None = None
    stop_sequence: str | None = None


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


def _refuse(message: str) -> ProviderError:
    """A request this protocol cannot send as asked (400 to the caller, no upstream call)."""
    return ProviderError("bad_request", f"anthropic: {message}")


def _usage(usage: _Usage) -> Usage:
    created = usage.cache_creation_input_tokens or 0
    cached = usage.cache_read_input_tokens or 0
    prompt = (usage.input_tokens or 0) + created + cached
    completion = usage.output_tokens or 0
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_tokens=cached,
        cache_creation_tokens=created,
    )


def _model_version(model: str) -> tuple[str, int, int] | None:
    """("opus" | "sonnet" | "haiku", major, minor) of a Claude model id (first-party,
    Bedrock or Vertex spelling), or None (older "claude-3-5-sonnet" ids, other names)."""
    match = _MODEL_VERSION.search(model.lower())
    if match is None:
        return None
    return match.group(1), int(match.group(2)), int(match.group(3) or 0)


def _native_json(model: str) -> bool:
    return _model_version(model) in _NATIVE_JSON


def _adaptive_thinking(model: str) -> bool:
    version = _model_version(model)
    return version is not None and version[1:] >= (4, 6)


# ----------------------------------------------------------------------- content


def _with_cache(block: dict[str, Any], cache_control: dict[str, Any] | None) -> dict[str, Any]:
    if cache_control is not None:
        block["cache_control"] = cache_control
    return block


def _data_url(url: str) -> tuple[str | None, str] | None:
    """(media type, base64 data) of a ``data:...;base64,`` URL, else None."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise _refuse("a data: URL must be base64-encoded (data:<type>;base64,<data>)")
    media_type = head[: -len(";base64")] or None
    return media_type, data


def _sniff_image(data: str) -> str | None:
    for magic, media_type in _IMAGE_MAGIC:
        if data.startswith(magic):
            return media_type
    return None


def _image_block(data: str | None, url: str | None, media_type: str | None) -> dict[str, Any]:
    if data is None and url is not None:
        inline = _data_url(url)
        if inline is None:
            return {"type": "image", "source": {"type": "url", "url": url}}
        media_type, data = media_type or inline[0], inline[1]
    if data is None:
        raise _refuse("an image part needs a url or base64 data")
    media_type = media_type or _sniff_image(data)
    if media_type is None:
        raise _refuse(
            "an inline image needs its media_type (image/jpeg, image/png, image/gif or image/webp)"
        )
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _document_block(part: FilePart) -> dict[str, Any]:
    data, media_type = part.data, part.media_type
    source: dict[str, Any]
    if part.file_id is not None:
        source = {"type": "file", "file_id": part.file_id}
    elif data is None and part.url is not None and not part.url.startswith("data:"):
        source = {"type": "url", "url": part.url}
    else:
        if data is None and part.url is not None:
            inline = _data_url(part.url)
            assert inline is not None
            media_type, data = media_type or inline[0], inline[1]
        if data is None:
            raise _refuse("a file part needs data, a url or a file_id")
        if media_type is None and data.startswith(_PDF_MAGIC):
            media_type = "application/pdf"
        if media_type is not None and media_type.startswith("image/"):
            return _image_block(data, None, media_type)
        if media_type == "application/pdf":
            source = {"type": "base64", "media_type": "application/pdf", "data": data}
        elif media_type is not None and media_type.startswith("text/"):
            try:
                text = base64.b64decode(data, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise _refuse(
                    f"file {part.filename or ''!r} ({media_type}): data is not base64 UTF-8 text"
                ) from None
            source = {"type": "text", "media_type": "text/plain", "data": text}
        else:
            raise _refuse(
                f"file {part.filename or ''!r} of type {media_type or 'unknown'}: Anthropic "
                "documents are PDF (application/pdf) or plain text (text/*)"
            )
    block: dict[str, Any] = {"type": "document", "source": source}
    if part.filename:
        block["title"] = part.filename
    return block


def _part_block(part: ContentPart) -> dict[str, Any] | None:
    """The content block of one part (None for empty text)."""
    if isinstance(part, TextPart):
        if not part.text:
            return None
        return _with_cache({"type": "text", "text": part.text}, part.cache_control)
    if isinstance(part, ImagePart):
        return _with_cache(_image_block(part.data, part.url, part.media_type), part.cache_control)
    if isinstance(part, FilePart):
        return _with_cache(_document_block(part), part.cache_control)
    raise _refuse(f"{type(part).__name__} content cannot be sent to Anthropic")


def _content_blocks(message: Message) -> list[dict[str, Any]]:
    content = message.content
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return [block for part in content if (block := _part_block(part)) is not None]


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


def _signed_thinking(message: Message) -> list[dict[str, Any]]:
    """The message's Anthropic thinking blocks, unchanged, to send back (see the module
    docstring: other protocols' blocks and unsigned ones cannot be verified)."""
    blocks: list[dict[str, Any]] = []
    for block in message.thinking or ():
        if block.protocol != "anthropic":
            continue
        if block.redacted is not None:
            blocks.append({"type": "redacted_thinking", "data": block.redacted})
        elif block.signature:
            blocks.append(
                {"type": "thinking", "thinking": block.text, "signature": block.signature}
            )
    return blocks


def _turn(message: Message) -> tuple[str, list[dict[str, Any]]]:
    if message.role == "tool":
        content = message.content
        result: Any = content if isinstance(content, str) else _content_blocks(message)
        block = {
            "type": "tool_result",
            "tool_use_id": message.tool_call_id or "",
            "content": result,
        }
        return "user", [_with_cache(block, message.cache_control)]
    blocks: list[dict[str, Any]] = []
    if message.role == "assistant":
        blocks.extend(_signed_thinking(message))
    blocks.extend(_content_blocks(message))
    if message.role == "assistant":
        for call in message.tool_calls or ():
            blocks.append(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": _tool_input(call)}
            )
    if message.cache_control is not None and blocks and "thinking" not in blocks[-1]["type"]:
        blocks[-1].setdefault("cache_control", message.cache_control)
    return ("assistant" if message.role == "assistant" else "user"), blocks


def _system(messages: list[Message]) -> str | list[dict[str, Any]] | None:
    systems = [m for m in messages if m.role == "system"]
    if not systems:
        return None
    if all(isinstance(m.content, str) and m.cache_control is None for m in systems):
        return "\n\n".join(m.content for m in systems if isinstance(m.content, str))
    blocks: list[dict[str, Any]] = []
    for message in systems:
        if not isinstance(message.content, str):
            for part in message.content:
                if not isinstance(part, TextPart):
                    raise _refuse(
                        f"the system prompt takes text only, not {type(part).__name__} content"
                    )
        own = _content_blocks(message)
        if message.cache_control is not None and own:
            own[-1].setdefault("cache_control", message.cache_control)
        blocks.extend(own)
    return blocks


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for message in messages:
        if message.role == "system":
            continue
        role, blocks = _turn(message)
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    out: list[dict[str, Any]] = []
    for role, blocks in turns:
        if (
            len(blocks) == 1
            and blocks[0].keys() == {"type", "text"}
            and blocks[0]["type"] == "text"
        ):
            out.append({"role": role, "content": blocks[0]["text"]})
        else:
            # A turn with no block at all (an empty user message) is sent as "" and
            # left for the API to judge.
            out.append({"role": role, "content": blocks or ""})
    return out


# ----------------------------------------------------------------------- request fields


def _tool(tool: Tool) -> dict[str, Any]:
    if tool.name == JSON_TOOL:
        raise _refuse(
            f"the tool name {JSON_TOOL!r} is reserved (it carries response_format); rename the tool"
        )
    spec = {
        "name": tool.name,
        "description": tool.description,
        "input_schema": tool.parameters or {"type": "object", "properties": {}},
    }
    return _with_cache(spec, tool.cache_control)


def _tool_choice(choice: str) -> dict[str, Any]:
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    return {"type": "tool", "name": choice}


def _json_format(request: ChatRequest) -> tuple[str | None, dict[str, Any]]:
    """How response_format is carried: (None | "native" | "tool", the JSON schema)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None, {}
    if fmt.type == "json_object":
        return "tool", {"type": "object", "additionalProperties": True}
    spec = fmt.json_schema or {}
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise _refuse("response_format json_schema needs json_schema.schema, a JSON schema object")
    return ("native" if _native_json(request.model) else "tool"), schema


def _json_tool(request: ChatRequest, schema: dict[str, Any]) -> dict[str, Any]:
    spec = request.response_format.json_schema if request.response_format else None
    name = spec.get("name") if spec else None
    about = spec.get("description") if spec else None
    description = "Give your whole answer as this tool's input"
    description += f" (the {name!s} object)." if name else "."
    if about:
        description += f" {about!s}"
    return {"name": JSON_TOOL, "description": description, "input_schema": schema}


def _tools_and_choice(
    request: ChatRequest, json_mode: str | None, schema: dict[str, Any]
) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    tools = [_tool(t) for t in request.tools] if request.tools else []
    choice = _tool_choice(request.tool_choice) if request.tool_choice else None
    if json_mode == "tool":
        if not tools or request.tool_choice == "none":
            choice = {"type": "tool", "name": JSON_TOOL}
        elif choice is None or choice["type"] == "auto":
            choice = {"type": "any"}
        tools.append(_json_tool(request, schema))
    if request.parallel_tool_calls is False and tools:
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    return tools or None, choice


def _turn_began_without_thinking(messages: list[Message]) -> bool:
    """The conversation ends inside a tool-use turn (tool results last) whose first
    assistant message carries no Anthropic thinking block to send back."""
    if not messages or messages[-1].role != "tool":
        return False
    start = 0
    for i, message in enumerate(messages):
        if message.role == "user":
            start = i + 1
    for message in messages[start:]:
        if message.role == "assistant":
            return not _signed_thinking(message)
    return False


def _reasoning(
    request: ChatRequest, forced_tool: bool
) -> tuple[dict[str, Any] | None, str | None, int]:
    """(thinking, adaptive effort, max_tokens) for reasoning_effort (module docstring)."""
    effort = request.reasoning_effort
    max_tokens = request.max_tokens
    budget = EFFORT_BUDGETS.get(effort or "none")
    if budget is None and effort is not None and effort != "none":
        known = ", ".join(["none", *EFFORT_BUDGETS])
        raise _refuse(f"reasoning_effort {effort!r} is not one of {known}")
    if effort is None or budget is None or _turn_began_without_thinking(request.messages):
        return None, None, max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS
    if forced_tool:
        raise _refuse(
            "reasoning_effort cannot be combined with a forced tool (tool_choice 'required' "
            f"or a named tool, or response_format on a model without structured outputs, "
            f"{request.model!r}): Anthropic's thinking mode allows tool_choice auto or none only"
        )
    if request.temperature is not None and request.temperature != 1:
        raise _refuse(
            f"temperature {request.temperature} cannot be combined with reasoning_effort: "
            "Anthropic's thinking mode takes temperature 1 only (omit it)"
        )
    if request.top_p is not None and not 0.95 <= request.top_p <= 1:
        raise _refuse(
            f"top_p {request.top_p} cannot be combined with reasoning_effort: Anthropic's "
            "thinking mode takes top_p between 0.95 and 1 only"
        )
    if max_tokens is None:
        max_tokens = budget + DEFAULT_MAX_TOKENS
    if _adaptive_thinking(request.model):
        return {"type": "adaptive"}, _ADAPTIVE_EFFORT[effort], max_tokens
    if max_tokens <= MIN_THINKING_BUDGET:
        raise _refuse(
            f"reasoning_effort needs max_tokens above {MIN_THINKING_BUDGET} (got {max_tokens}): "
            "thinking counts against max_tokens and its smallest budget is "
            f"{MIN_THINKING_BUDGET} tokens"
        )
    if request.max_tokens is not None:
        budget = min(budget, max(MIN_THINKING_BUDGET, max_tokens // 2))
    return {"type": "enabled", "budget_tokens": budget}, None, max_tokens


def _service_tier(tier: str) -> str:
    mapped = _SERVICE_TIERS.get(tier)
    if mapped is None:
        raise _refuse(
            f"service_tier {tier!r}: Anthropic has the tiers auto (priority when available) "
            "and standard_only; send auto, priority, scale or default"
        )
    return mapped


# ----------------------------------------------------------------------- errors


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
    codes = {code.lower()} if code else set()
    details = error.get("details")
    if isinstance(details, dict):
        detail_code = details.get("error_code")
        if isinstance(detail_code, str) and detail_code:
            codes.add(detail_code.lower())
            code = f"{code}: {detail_code}" if code else detail_code
    return message if isinstance(message, str) else str(message or ""), code, codes


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


def _prompt_body(request: ChatRequest) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """What a messages request and a count-tokens request share: model, system,
    messages, tools and tool choice; and how response_format is carried."""
    json_mode, schema = _json_format(request)
    body: dict[str, Any] = {"model": request.model, "messages": _messages(request.messages)}
    system = _system(request.messages)
    if system is not None:
        body["system"] = system
    tools, choice = _tools_and_choice(request, json_mode, schema)
    if tools:
        body["tools"] = tools
    if choice is not None:
        body["tool_choice"] = choice
    return body, json_mode, schema


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
        body, json_mode, schema = _prompt_body(request)
        choice = body.get("tool_choice")
        forced = choice is not None and choice["type"] in ("any", "tool")
        thinking, effort, max_tokens = _reasoning(request, forced)
        body["max_tokens"] = max_tokens
        output_config: dict[str, Any] = {}
        if json_mode == "native":
            output_config["format"] = {"type": "json_schema", "schema": schema}
        if thinking is not None:
            body["thinking"] = thinking
        if effort is not None:
            output_config["effort"] = effort
        if output_config:
            body["output_config"] = output_config
        if request.stop:
            body["stop_sequences"] = request.stop
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.user:
            body["metadata"] = {"user_id": request.user}
        if request.service_tier is not None:
            body["service_tier"] = _service_tier(request.service_tier)
        if stream:
            body["stream"] = True
        accept = "text/event-stream" if stream else "application/json"
        wire = _wire(base_url, "/v1/messages", body, secret, headers, accept)
        if request.reasoning_effort not in (None, "none") and thinking is None and effort is None:
            # Thinking cannot begin inside a tool-use turn (module docstring): said so.
            wire = msgspec.structs.replace(wire, dropped=("reasoning_effort",))
        return wire

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
        body, _, _ = _prompt_body(request)
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
        thinking: list[ThinkingBlock] = []
        answer_json: str | None = None
        for block in message.content:
            if block.type == "text":
                texts.append(block.text or "")
            elif block.type == "tool_use":
                arguments = _encode(block.input if block.input is not None else {}).decode()
                if block.name == JSON_TOOL:
                    answer_json = arguments
                    continue
                calls.append(
                    ToolCall(
                        id=block.id or f"call_{len(calls)}",
                        name=block.name or "",
                        arguments=arguments,
                    )
                )
            elif block.type == "thinking":
                thinking.append(
                    ThinkingBlock(
                        text=block.thinking or "", signature=block.signature, protocol="anthropic"
                    )
                )
            elif block.type == "redacted_thinking":
                thinking.append(ThinkingBlock(redacted=block.data or "", protocol="anthropic"))
        # The json_response tool's input is the answer (a forced tool emits no text).
        content = answer_json if answer_json is not None else "".join(texts)
        finish = _FINISH.get(message.stop_reason or "", "tool_calls" if calls else "stop")
        if finish == "tool_calls" and not calls:
            finish = "stop"
        if finish == "content_filter" and not content and not calls:
            raise ProviderError(
                "content_filter", "anthropic: the model refused to answer", status=status
            )
        usage = _usage(message.usage) if message.usage is not None else Usage()
        tier = message.usage.service_tier if message.usage is not None else None
        reasoning = "".join(b.text for b in thinking) if thinking else None
        return ChatResponse(
            content=content,
            finish_reason=finish,
            usage=usage,
            tool_calls=calls,
            reasoning=reasoning or None,
            thinking=thinking or None,
            stop_sequence=message.stop_sequence,
            provider_fields={"service_tier": tier} if tier else {},
            upstream_model=message.model or "",
        )

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float
    ) -> ProviderError:
        return _classified(status, headers, body, now)

    def stream_decoder(self) -> AnthropicStreamDecoder:
        return AnthropicStreamDecoder()


class _OpenThinking:
    __slots__ = ("redacted", "signature", "text")

    def __init__(self, text: str, redacted: str | None) -> None:
        self.text = [text] if text else []
        self.signature: str | None = None
        self.redacted = redacted


class AnthropicStreamDecoder:
    """Decodes one Anthropic Messages stream. Input tokens come with message_start,
    the stop reason and output tokens with message_delta (-> `finished`),
    message_stop ends it (-> `done`); ``event: error`` raises the classified error.
    Thinking deltas are `StreamChunk.reasoning`; each thinking block, once stopped, is
    given whole (with its signature) in `StreamChunk.thinking`. The json_response
    tool's argument deltas are text deltas (see the module docstring)."""

    __slots__ = (
        "_args_seen",
        "_done",
        "_finished",
        "_json",
        "_json_args",
        "_start_usage",
        "_thinking",
        "_tools",
    )

    def __init__(self) -> None:
        self._done = False
        self._finished = False
        self._start_usage = _Usage()
        self._tools: dict[int, int] = {}  # content-block index -> tool-call ordinal
        self._args_seen: set[int] = set()  # ordinals that received argument text
        self._json: set[int] = set()  # content-block indexes of json_response blocks
        self._json_args: set[int] = set()  # ... that received argument text
        self._thinking: dict[int, _OpenThinking] = {}

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
            return self._block_stop(parsed.index if parsed.index is not None else -1)
        if kind == "message_start":
            if parsed.message is not None and parsed.message.usage is not None:
                self._start_usage = parsed.message.usage
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
        index = parsed.index if parsed.index is not None else -1 - len(self._tools)
        if block.type == "tool_use" and block.name == JSON_TOOL:
            self._json.add(index)
            if block.input:
                self._json_args.add(index)
                return [StreamChunk(text=_encode(block.input).decode())]
            return []
        if block.type == "tool_use":
            ordinal = len(self._tools)
            self._tools[index] = ordinal
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
        if block.type == "thinking":
            self._thinking[index] = _OpenThinking(block.thinking or "", None)
            if block.signature:
                self._thinking[index].signature = block.signature
            return [StreamChunk(reasoning=block.thinking)] if block.thinking else []
        if block.type == "redacted_thinking":
            self._thinking[index] = _OpenThinking("", block.data or "")
            return []
        if block.type == "text" and block.text:
            return [StreamChunk(text=block.text)]
        return []

    def _block_stop(self, index: int) -> list[StreamChunk]:
        open_thinking = self._thinking.pop(index, None)
        if open_thinking is not None:
            finished = ThinkingBlock(
                text="".join(open_thinking.text),
                signature=open_thinking.signature,
                redacted=open_thinking.redacted,
                protocol="anthropic",
            )
            return [StreamChunk(thinking=[finished])]
        if index in self._json and index not in self._json_args:
            self._json_args.add(index)
            return [StreamChunk(text="{}")]
        ordinal = self._tools.get(index)
        if ordinal is not None and ordinal not in self._args_seen:
            self._args_seen.add(ordinal)  # a tool without arguments: say "{}"
            return [StreamChunk(tool_calls=[ToolCallDelta(index=ordinal, arguments="{}")])]
        return []

    def _delta(self, parsed: _Event) -> list[StreamChunk]:
        delta = parsed.delta
        if delta is None:
            return []
        index = parsed.index if parsed.index is not None else -1
        if delta.type == "text_delta" and delta.text:
            return [StreamChunk(text=delta.text)]
        if delta.type == "thinking_delta":
            open_thinking = self._thinking.get(index)
            if open_thinking is None:
                raise self._misplaced("thinking_delta", parsed.index, "a thinking")
            if not delta.thinking:
                return []
            open_thinking.text.append(delta.thinking)
            return [StreamChunk(reasoning=delta.thinking)]
        if delta.type == "signature_delta":
            open_thinking = self._thinking.get(index)
            if open_thinking is None:
                raise self._misplaced("signature_delta", parsed.index, "a thinking")
            open_thinking.signature = (open_thinking.signature or "") + (delta.signature or "")
            return []
        if delta.type == "input_json_delta":
            if index in self._json:
                if not delta.partial_json:
                    return []
                self._json_args.add(index)
                return [StreamChunk(text=delta.partial_json)]
            ordinal = self._tools.get(index)
            if ordinal is None:
                raise self._misplaced("input_json_delta", parsed.index, "a tool_use")
            if not delta.partial_json:
                return []
            self._args_seen.add(ordinal)
            return [
                StreamChunk(tool_calls=[ToolCallDelta(index=ordinal, arguments=delta.partial_json)])
            ]
        return []  # citations_delta and later delta types: not part of the answer

    @staticmethod
    def _misplaced(what: str, index: int | None, kind: str) -> ProviderError:
        return ProviderError(
            "transient",
            f"anthropic: malformed stream: {what} for block {index} which is not {kind} block",
        )

    def _message_delta(self, parsed: _Event) -> list[StreamChunk]:
        delta = parsed.delta
        stop_reason = delta.stop_reason if delta is not None else None
        stop_sequence = delta.stop_sequence if delta is not None else None
        usage = None
        fields = None
        if parsed.usage is not None:
            start, end = self._start_usage, parsed.usage
            # Newer servers repeat the input and cache counts here (cumulative).
            merged = _Usage(
                input_tokens=_later(start.input_tokens, end.input_tokens),
                output_tokens=end.output_tokens,
                cache_creation_input_tokens=_later(
                    start.cache_creation_input_tokens, end.cache_creation_input_tokens
                ),
                cache_read_input_tokens=_later(
                    start.cache_read_input_tokens, end.cache_read_input_tokens
                ),
            )
            usage = _usage(merged)
            tier = end.service_tier or start.service_tier
            fields = {"service_tier": tier} if tier else None
        finish = None
        if stop_reason is not None:
            finish = _FINISH.get(stop_reason, "stop")
            if finish == "tool_calls" and not self._tools:
                finish = "stop"  # the json_response tool alone: the answer is its text
            self._finished = True
        if finish is None and usage is None and stop_sequence is None:
            return []
        return [
            StreamChunk(
                finish_reason=finish,
                usage=usage,
                stop_sequence=stop_sequence,
                provider_fields=fields,
            )
        ]


def _later(first: int | None, second: int | None) -> int | None:
    return second if second is not None else first
