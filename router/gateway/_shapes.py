"""OpenAI wire shapes <-> the router's records, and the gateway's error mapping.

`decode_body` turns a request body into plain JSON values, refusing (with `BadBody`,
never anything else) what is not JSON or nests deeper than `MAX_DEPTH`.
`parse_chat_body` turns a decoded ``/v1/chat/completions`` body into a `ChatRequest`
plus the gateway-only options (stream, include_usage), raising `BadBody` that names
the offending field. `completion_json` / `chunk_json` render answers in OpenAI's
shapes; `error_status` maps any router error to an HTTP status and an OpenAI error body.

What this module must never do: put a secret into an error body. Router errors are
already scrubbed by the key actors; everything else here is built from the caller's
own input.
"""

from __future__ import annotations

import binascii
import math
import re
import secrets
import time
from typing import Any, Final, TypeVar

import msgspec

from .._errors import (
    ChainExhaustedError,
    DeadlineExceededError,
    InvalidRequestError,
    ProviderError,
    RouterClosedError,
    RouterError,
    StreamInterruptedError,
    UnknownModelError,
)
from .._types import (
    AudioPart,
    ChatRequest,
    ChatResponse,
    Choice,
    ContentPart,
    FilePart,
    ImagePart,
    Message,
    ResponseFormat,
    StreamChunk,
    TextPart,
    ThinkingBlock,
    Tool,
    ToolCall,
    Usage,
)

__all__ = [
    "MAX_DEPTH",
    "BadBody",
    "ChatOptions",
    "ErrorReply",
    "NotAllowed",
    "chunk_json",
    "completion_id",
    "completion_json",
    "decode_body",
    "dropped_header",
    "error_body",
    "error_reply",
    "has_news",
    "parse_chat_body",
    "thinking_blocks_json",
    "usage_json",
]

_ROLES: Final = {"system": "system", "developer": "system", "user": "user"} | {
    "assistant": "assistant",
    "tool": "tool",
}
T = TypeVar("T")
_TOOL_CHOICES: Final = frozenset({"auto", "none", "required"})
MAX_DEPTH: Final = 64
"""Arrays and objects a body may nest inside each other (a tool's JSON schema included)."""
_MAX_NAME: Final = 256
"""The longest model name a request may give (a configured name or `provider/upstream`)."""
_MAX_TOKENS: Final = 100_000_000
_MAX_N: Final = 128
"""The most choices a request may ask for (OpenAI's own limit)."""
_DETAILS: Final = frozenset({"auto", "low", "high"})
_SCHEMA_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FIELD_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
"""What the name of a field the gateway does not know may be: it is echoed in errors
and in the ``x-router-dropped-params`` header."""
_NATIVE_FIELDS: Final = frozenset({"system_fingerprint", "service_tier", "annotations", "audio"})
"""Provider fields with a place of their own in OpenAI's answer shapes (the rest go
under the ``x_router`` extension object)."""
_KNOWN: Final = frozenset(
    {
        # consumed by the gateway itself
        "model",
        "messages",
        "stream",
        "stream_options",
        "timeout",
        "fallbacks",
        "drop_params",
        # ChatRequest fields
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "tools",
        "tool_choice",
        "response_format",
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
    }
)
"""Request fields the gateway validates; every other field goes to `ChatRequest.extra`."""
_MESSAGE_KEYS: Final = frozenset(
    {
        "role",
        "content",
        "name",
        "tool_calls",
        "tool_call_id",
        "refusal",
        "reasoning_content",
        "reasoning",
        "thinking_blocks",
        "cache_control",
        "annotations",  # an earlier answer's citations: output only, not sent back
        "audio",
        "function_call",
    }
)
_decode = msgspec.json.Decoder().decode


class BadBody(Exception):
    """The body is malformed or invalid; `field` names the offending field."""

    def __init__(self, field: str | None, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code


class NotAllowed(Exception):
    """The caller's gateway key may not use `model` (named at `field`)."""

    def __init__(self, field: str, model: str) -> None:
        super().__init__(model)
        self.field = field
        self.model = model


class ChatOptions(msgspec.Struct, kw_only=True):
    stream: bool = False
    include_usage: bool = False
    fallback_fields: list[str] = msgspec.field(default_factory=list)
    """Where each of the request's fallbacks came from (``fallbacks[i]`` or the
    ``x-router-fallbacks`` header), to name it in an error."""


class ErrorReply(msgspec.Struct, kw_only=True):
    """An HTTP error answer: status, OpenAI error body, extra headers."""

    status: int
    body: dict[str, Any]
    headers: list[tuple[str, str]] = msgspec.field(default_factory=list)


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error JSON shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -------------------------------------------------------------------------- decoding

_AT_BYTE: Final = re.compile(r"\(byte (\d+)\)")
_KEY_BEFORE: Final = re.compile(rb'"([A-Za-z_][A-Za-z0-9_]{0,63})"\s*:\s*-?$')
_HUGE_NUMBER: Final = re.compile(
    rb'"([A-Za-z_][A-Za-z0-9_]{0,63})"\s*:\s*-?(?:\d{300}|[\d.]+[eE]\+?\d{3})'
)


def decode_body(raw: bytes) -> Any:
    """`raw` as JSON values; `BadBody` for anything that is not JSON, a number JSON
    cannot carry, or nesting deeper than `MAX_DEPTH` (never any other exception: a
    body nested thousands of levels deep makes msgspec raise RecursionError)."""
    try:
        value = _decode(raw)
    except RecursionError:
        raise _too_deep() from None
    except msgspec.DecodeError as exc:
        raise _not_json(raw, str(exc)) from None
    except Exception as exc:  # whatever the decoder may raise is the body's fault
        message = f"the body is not valid JSON ({type(exc).__name__})"
        raise BadBody(None, message, "invalid_json") from None
    # Only a body with that many brackets can nest that deep: most never need the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise _too_deep()
    return value


def _too_deep() -> BadBody:
    return BadBody(
        None,
        f"the body nests arrays and objects more than {MAX_DEPTH} levels deep",
        "nesting_too_deep",
    )


def _not_json(raw: bytes, message: str) -> BadBody:
    """A decode error, naming the field when the culprit is a number JSON has no room
    for (NaN, Infinity, 1e999)."""
    field: str | None = None
    at = _AT_BYTE.search(message)
    if at is not None and raw[int(at.group(1)) : int(at.group(1)) + 1] in (b"N", b"I"):
        before = _KEY_BEFORE.search(raw[max(0, int(at.group(1)) - 80) : int(at.group(1))])
        field = before.group(1).decode() if before is not None else None
    elif "out of range" in message:
        huge = _HUGE_NUMBER.search(raw)
        field = huge.group(1).decode() if huge is not None else None
    if field is not None:
        return BadBody(
            field,
            f"`{field}` must be a finite number (JSON has no NaN or Infinity, and the "
            f"gateway takes no number out of a double's range): {message}",
            "invalid_json",
        )
    return BadBody(None, f"the body is not valid JSON: {message}", "invalid_json")


def _deeper_than(value: object, limit: int) -> bool:
    """Whether `value` nests lists and dicts more than `limit` deep (iterative)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, list | dict))
    return False


# -------------------------------------------------------------------------- parsing


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _want(value: object, kind: type[T], field: str, what: str) -> T:
    """`value` if it is a `kind` (a bool is not an int here), else `BadBody`."""
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise BadBody(field, f"`{field}` must be {what}, got {_type_name(value)}", "invalid_type")


def _num(value: object, field: str, what: str = "a number") -> float:
    """`value` as a finite float (a bool is not a number; nor is NaN, infinity or an
    integer too large for a float)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            return number
        raise BadBody(field, f"`{field}` must be a finite number")
    raise BadBody(field, f"`{field}` must be {what}, got {_type_name(value)}", "invalid_type")


def _model_name(value: object, field: str) -> str:
    """A model name: a non-empty printable string of at most `_MAX_NAME` characters
    (it is echoed in response headers, so no control character may pass)."""
    name = _want(value, str, field, "a string").strip()
    if not name:
        raise BadBody(field, f"`{field}` must not be empty")
    if len(name) > _MAX_NAME or not name.isprintable():
        raise BadBody(
            field, f"`{field}` must be a printable model name of at most {_MAX_NAME} characters"
        )
    return name


def _cache_control(value: object, field: str) -> dict[str, Any] | None:
    """An Anthropic ``cache_control`` object (``{"type": "ephemeral", "ttl"?}``)."""
    if value is None:
        return None
    value = _want(value, dict, field, "an object")
    _want(value.get("type"), str, f"{field}.type", "a string")
    return value


def _base64(data: str, field: str) -> str:
    """`data` if it is strict base64 (padding included, no whitespace), else `BadBody`."""
    if not data:
        raise BadBody(field, f"`{field}` must not be empty")
    try:
        binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        raise BadBody(field, f"`{field}` is not valid base64") from None
    return data


def _data_url(url: str, field: str) -> tuple[str | None, str]:
    """(media type or None, base64 data) of a ``data:[type][;...];base64,DATA`` URL."""
    head, comma, data = url[5:].partition(",")
    params = [p.strip().lower() for p in head.split(";")]
    if not comma or "base64" not in params[1:]:
        raise BadBody(field, f"`{field}` must be a base64 data: URL (data:TYPE;base64,DATA)")
    return params[0] or None, _base64(data, field)


def _image_part(part: dict[str, Any], pf: str, cache: dict[str, Any] | None) -> ImagePart:
    image = part.get("image_url")
    f = f"{pf}.image_url"
    if image is None:
        raise BadBody(f, f"`{f}` is required", "missing_field")
    if isinstance(image, str):  # a bare URL, as some clients send it
        image = {"url": image}
    image = _want(image, dict, f, "an object")
    url = _want(image.get("url"), str, f"{f}.url", "a string")
    detail = image.get("detail")
    if detail is not None and detail not in _DETAILS:
        raise BadBody(f"{f}.detail", f"`{f}.detail` must be auto, low or high")
    if url.startswith(("http://", "https://")):
        return ImagePart(url=url, detail=detail, cache_control=cache)
    if url.startswith("data:"):
        media_type, data = _data_url(url, f"{f}.url")
        if media_type is None or not media_type.startswith("image/"):
            raise BadBody(f"{f}.url", f"`{f}.url` must be a data: URL of an image (image/...)")
        return ImagePart(data=data, media_type=media_type, detail=detail, cache_control=cache)
    raise BadBody(f"{f}.url", f"`{f}.url` must be an http(s) URL or a base64 data: URL")


def _file_part(part: dict[str, Any], pf: str, cache: dict[str, Any] | None) -> FilePart:
    f = f"{pf}.file"
    file = _want(part.get("file"), dict, f, "an object")
    data: str | None = None
    media_type: str | None = None
    file_data = file.get("file_data")
    if file_data is not None:
        file_data = _want(file_data, str, f"{f}.file_data", "a string")
        if file_data.startswith("data:"):
            media_type, data = _data_url(file_data, f"{f}.file_data")
        else:  # bare base64: the protocol sniffs the type
            data = _base64(file_data, f"{f}.file_data")
    file_id = file.get("file_id")
    if file_id is not None:
        file_id = _want(file_id, str, f"{f}.file_id", "a string")
    filename = file.get("filename")
    if filename is not None:
        filename = _want(filename, str, f"{f}.filename", "a string")
    if data is None and not file_id:
        raise BadBody(f, f"`{f}` needs `file_data` (a base64 data: URL) or `file_id`")
    return FilePart(
        data=data, media_type=media_type, file_id=file_id, filename=filename, cache_control=cache
    )


def _part(part: object, pf: str, role: str) -> ContentPart:
    part = _want(part, dict, pf, "a content part object")
    kind = part.get("type")
    if kind is None:
        raise BadBody(f"{pf}.type", f"`{pf}.type` is required", "missing_field")
    kind = _want(kind, str, f"{pf}.type", "a string")
    cache = _cache_control(part.get("cache_control"), f"{pf}.cache_control")
    if kind == "text":
        text = _want(part.get("text"), str, f"{pf}.text", "a string")
        return TextPart(text=text, cache_control=cache)
    if kind == "refusal" and role == "assistant":  # an earlier answer's refusal, as text
        text = _want(part.get("refusal"), str, f"{pf}.refusal", "a string")
        return TextPart(text=text, cache_control=cache)
    if kind == "image_url":
        return _image_part(part, pf, cache)
    if kind == "file":
        return _file_part(part, pf, cache)
    if kind == "input_audio":
        if cache is not None:
            raise BadBody(f"{pf}.cache_control", f"`{pf}.cache_control`: audio is not cached")
        audio = _want(part.get("input_audio"), dict, f"{pf}.input_audio", "an object")
        data = _want(audio.get("data"), str, f"{pf}.input_audio.data", "a string of base64")
        if data.startswith("data:"):
            _, data = _data_url(data, f"{pf}.input_audio.data")
        else:
            _base64(data, f"{pf}.input_audio.data")
        fmt = _want(audio.get("format"), str, f"{pf}.input_audio.format", "a string")
        if not fmt:
            raise BadBody(f"{pf}.input_audio.format", f"`{pf}.input_audio.format` is empty")
        return AudioPart(data=data, format=fmt)
    raise BadBody(
        f"{pf}.type",
        f"`{pf}.type` must be text, image_url, input_audio or file; got {kind!r}",
    )


def _content(value: object, field: str, nullable: bool, role: str) -> str | list[ContentPart]:
    if value is None:
        if nullable:
            return ""
        raise BadBody(field, f"`{field}` is required", "missing_field")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return [_part(part, f"{field}[{i}]", role) for i, part in enumerate(value)]
    raise BadBody(
        field,
        f"`{field}` must be a string or an array of content parts, got {_type_name(value)}",
        "invalid_type",
    )


def _thinking_blocks(value: object, field: str) -> list[ThinkingBlock] | None:
    """LiteLLM's ``thinking_blocks``: Anthropic's signed thinking blocks, sent back."""
    if value is None:
        return None
    value = _want(value, list, field, "an array of thinking blocks")
    blocks: list[ThinkingBlock] = []
    for i, raw in enumerate(value):
        f = f"{field}[{i}]"
        raw = _want(raw, dict, f, "an object")
        kind = raw.get("type")
        if kind == "thinking":
            text = _want(raw.get("thinking"), str, f"{f}.thinking", "a string")
            signature = _want(raw.get("signature"), str, f"{f}.signature", "a string")
            blocks.append(ThinkingBlock(text=text, signature=signature, protocol="anthropic"))
        elif kind == "redacted_thinking":
            data = _want(raw.get("data"), str, f"{f}.data", "a string")
            blocks.append(ThinkingBlock(redacted=data, protocol="anthropic"))
        else:
            raise BadBody(f"{f}.type", f"`{f}.type` must be thinking or redacted_thinking")
    return blocks or None


def _tool_calls(value: object, field: str) -> list[ToolCall] | None:
    if value is None:
        return None
    value = _want(value, list, field, "an array")
    calls: list[ToolCall] = []
    for i, raw in enumerate(value):
        f = f"{field}[{i}]"
        raw = _want(raw, dict, f, "an object")
        if raw.get("type", "function") != "function":
            raise BadBody(f"{f}.type", f"`{f}.type` must be 'function'")
        call_id = raw.get("id")
        call_id = _want(call_id, str, f"{f}.id", "a string")
        fn = raw.get("function")
        fn = _want(fn, dict, f"{f}.function", "an object")
        name = fn.get("name")
        name = _want(name, str, f"{f}.function.name", "a string")
        arguments = fn.get("arguments", "{}")
        arguments = _want(arguments, str, f"{f}.function.arguments", "a string of JSON")
        calls.append(ToolCall(id=call_id, name=name, arguments=arguments))
    return calls


def _message(raw: object, i: int) -> Message:
    field = f"messages[{i}]"
    raw = _want(raw, dict, field, "an object")
    role = raw.get("role")
    if role is None:
        raise BadBody(f"{field}.role", f"`{field}.role` is required", "missing_field")
    role = _want(role, str, f"{field}.role", "a string")
    mapped = _ROLES.get(role)
    if mapped is None:
        raise BadBody(
            f"{field}.role",
            f"`{field}.role` must be one of system, developer, user, assistant, tool; got {role!r}",
        )
    for key, value in raw.items():
        if key not in _MESSAGE_KEYS and value is not None:
            raise BadBody(
                f"{field}.{key}",
                f"`{field}.{key}` is not a message field the gateway can carry; remove it",
                "unsupported_field",
            )
    if raw.get("function_call") is not None:
        raise BadBody(
            f"{field}.function_call",
            f"`{field}.function_call` is the deprecated function-call shape; use `tool_calls`",
            "unsupported_field",
        )
    if raw.get("audio") is not None:
        raise BadBody(
            f"{field}.audio",
            f"`{field}.audio` (an earlier audio answer) cannot be sent back through the gateway",
            "unsupported_field",
        )
    assistant = mapped == "assistant"
    tool_calls = _tool_calls(raw.get("tool_calls"), f"{field}.tool_calls")
    refusal = raw.get("refusal")
    if refusal is not None:
        refusal = _want(refusal, str, f"{field}.refusal", "a string")
    content = _content(
        raw.get("content"),
        f"{field}.content",
        nullable=assistant and bool(tool_calls or refusal),
        role=mapped,
    )
    if refusal and assistant:  # an earlier answer's refusal: carried as its text
        if isinstance(content, str):
            content = content + refusal if content else refusal
        else:
            content = [*content, TextPart(text=refusal)]
    name = raw.get("name")
    if name is not None:
        name = _want(name, str, f"{field}.name", "a string")
    tool_call_id = raw.get("tool_call_id")
    if tool_call_id is not None:
        tool_call_id = _want(tool_call_id, str, f"{field}.tool_call_id", "a string")
    elif mapped == "tool":
        raise BadBody(
            f"{field}.tool_call_id", f"`{field}.tool_call_id` is required", "missing_field"
        )
    reasoning: str | None = None
    for key in ("reasoning_content", "reasoning"):
        value = raw.get(key)
        if value is not None:
            reasoning = _want(value, str, f"{field}.{key}", "a string")
            break
    thinking = _thinking_blocks(raw.get("thinking_blocks"), f"{field}.thinking_blocks")
    if not assistant:
        for key, given in (
            ("reasoning_content", reasoning),
            ("thinking_blocks", thinking),
            ("refusal", refusal),
        ):
            if given is not None:
                raise BadBody(
                    f"{field}.{key}", f"`{field}.{key}` belongs to assistant messages only"
                )
    return Message(
        mapped,  # type: ignore[arg-type]
        content,
        name=name,
        tool_calls=tool_calls or None,
        tool_call_id=tool_call_id,
        reasoning=reasoning or None,
        thinking=thinking,
        cache_control=_cache_control(raw.get("cache_control"), f"{field}.cache_control"),
    )


def _tools(value: object) -> list[Tool] | None:
    if value is None:
        return None
    value = _want(value, list, "tools", "an array")
    tools: list[Tool] = []
    for i, raw in enumerate(value):
        f = f"tools[{i}]"
        raw = _want(raw, dict, f, "an object")
        if raw.get("type", "function") != "function":
            raise BadBody(f"{f}.type", f"`{f}.type` must be 'function'")
        fn = raw.get("function")
        fn = _want(fn, dict, f"{f}.function", "an object")
        name = fn.get("name")
        name = _want(name, str, f"{f}.function.name", "a string")
        description = fn.get("description", "")
        description = _want(description, str, f"{f}.function.description", "a string")
        parameters = fn.get("parameters", {})
        parameters = _want(parameters, dict, f"{f}.function.parameters", "a JSON schema object")
        strict = fn.get("strict")
        if strict is not None:
            strict = _want(strict, bool, f"{f}.function.strict", "a boolean")
        cache = _cache_control(raw.get("cache_control"), f"{f}.cache_control")
        tools.append(
            Tool(
                name=name,
                description=description,
                parameters=parameters,
                cache_control=cache,
                strict=strict,
            )
        )
    return tools


def _tool_choice(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in _TOOL_CHOICES:
            raise BadBody("tool_choice", "`tool_choice` must be auto, none, required or a tool")
        return value
    if isinstance(value, dict):
        fn = value.get("function")
        fn = _want(fn, dict, "tool_choice.function", "an object")
        name = fn.get("name")
        name = _want(name, str, "tool_choice.function.name", "a string")
        return name
    raise BadBody(
        "tool_choice", f"`tool_choice` must be a string or an object, got {_type_name(value)}"
    )


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    number = _num(value, name)
    if not (lo <= number <= hi):
        raise BadBody(name, f"`{name}` must be between {lo:g} and {hi:g}")
    return number


def _response_format(value: object) -> ResponseFormat | None:
    if value is None:
        return None
    value = _want(value, dict, "response_format", "an object")
    for key in value:
        if key not in ("type", "json_schema"):
            raise BadBody(
                f"response_format.{key}",
                f"`response_format.{key}` is not a response_format field (type, json_schema)",
            )
    kind = value.get("type")
    if kind is None:
        raise BadBody("response_format.type", "`response_format.type` is required", "missing_field")
    if kind not in ("text", "json_object", "json_schema"):
        raise BadBody(
            "response_format.type",
            "`response_format.type` must be text, json_object or json_schema",
        )
    if kind != "json_schema":
        if value.get("json_schema") is not None:
            raise BadBody(
                "response_format.json_schema",
                "`response_format.json_schema` goes with type json_schema only",
            )
        return ResponseFormat(type=kind)
    f = "response_format.json_schema"
    raw = value.get("json_schema")
    if raw is None:
        raise BadBody(f, f"`{f}` is required with type json_schema", "missing_field")
    raw = _want(raw, dict, f, "an object")
    schema: dict[str, Any] = {}
    for key, item in raw.items():
        if key not in ("name", "schema", "strict", "description"):
            raise BadBody(
                f"{f}.{key}",
                f"`{f}.{key}` is not a json_schema field (name, schema, strict, description)",
            )
        if item is None:
            continue
        if key == "schema":
            item = _want(item, dict, f"{f}.schema", "a JSON schema object")
        elif key == "strict":
            item = _want(item, bool, f"{f}.strict", "a boolean")
        else:
            item = _want(item, str, f"{f}.{key}", "a string")
        schema[key] = item
    name = schema.get("name")
    if name is None:
        raise BadBody(f"{f}.name", f"`{f}.name` is required", "missing_field")
    if not _SCHEMA_NAME.fullmatch(name):
        raise BadBody(
            f"{f}.name", f"`{f}.name` must be 1 to 64 letters, digits, underscores or dashes"
        )
    return ResponseFormat(type="json_schema", json_schema=schema)


def _optional(body: dict[str, Any], name: str, kind: type[T], what: str) -> T | None:
    value = body.get(name)
    return None if value is None else _want(value, kind, name, what)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = _optional(body, name, int, "an integer")
    if value is not None and not lo <= value <= hi:
        raise BadBody(name, f"`{name}` must be an integer from {lo} to {hi}")
    return value


def _logit_bias(value: object) -> dict[str, float] | None:
    if value is None:
        return None
    value = _want(value, dict, "logit_bias", "an object of token ids to numbers")
    out: dict[str, float] = {}
    for token, bias in value.items():
        f = f"logit_bias.{token}" if _FIELD_NAME.fullmatch(token) else "logit_bias"
        if not token.isdigit() or not token.isascii():
            raise BadBody(f, "`logit_bias` keys must be token ids (decimal integers)")
        number = _num(bias, f)
        if not -100 <= number <= 100:
            raise BadBody(f, f"`{f}` must be between -100 and 100")
        out[token] = bias
    return out or None


def _extra(body: dict[str, Any]) -> dict[str, Any]:
    """The fields the gateway does not know, for OpenAI-compatible upstreams (a field
    given as null is absent)."""
    extra: dict[str, Any] = {}
    for name, value in body.items():
        if name in _KNOWN or value is None:
            continue
        if not _FIELD_NAME.fullmatch(name):
            raise BadBody(
                None,
                "an unknown field's name must be 1 to 64 letters, digits, underscores, dots "
                "or dashes",
                "invalid_field_name",
            )
        extra[name] = value
    return extra


def _names(value: object, field: str) -> list[tuple[str, str]]:
    """(name, where it was given) for each non-empty name of a `fallbacks` array, or of
    the comma-separated `x-router-fallbacks` header when `value` is a str."""
    if value is None:
        return []
    if isinstance(value, str):
        names = [v for v in value.split(",") if v.strip()]
        return [(_model_name(v, field), field) for v in names]
    value = _want(value, list, field, "an array of model names")
    out: list[tuple[str, str]] = []
    for i, v in enumerate(value):
        v = _want(v, str, f"{field}[{i}]", "a string")
        if v.strip():
            out.append((_model_name(v, f"{field}[{i}]"), f"{field}[{i}]"))
    return out


def parse_chat_body(
    body: object,
    tenant: str | None,
    header_fallbacks: str | None,
    *,
    max_timeout: float | None = None,
    default_timeout: float | None = None,
) -> tuple[ChatRequest, ChatOptions]:
    """Validate an OpenAI chat-completions body; raise `BadBody` naming the field.

    Every field is either consumed by the gateway (stream, stream_options, timeout,
    fallbacks), validated into its `ChatRequest` field, or (when the gateway does not
    know it) carried in `ChatRequest.extra` for OpenAI-compatible upstreams. A value that
    asks for the default (``n`` 1, a penalty 0) is not forwarded.

    A `timeout` is clamped to `max_timeout`; without one the request gets `max_timeout`
    when that is shorter than `default_timeout` (the router's own deadline)."""
    if not isinstance(body, dict):
        raise BadBody(None, f"the body must be a JSON object, got {_type_name(body)}")
    model = body.get("model")
    if model is None:
        raise BadBody("model", "`model` is required", "missing_field")
    model = _model_name(model, "model")
    messages = body.get("messages")
    if messages is None:
        raise BadBody("messages", "`messages` is required", "missing_field")
    messages = _want(messages, list, "messages", "an array")
    if not messages:
        raise BadBody("messages", "`messages` must not be empty")
    parsed = [_message(m, i) for i, m in enumerate(messages)]

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    stream = _want(stream, bool, "stream", "a boolean")
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        stream_options = _want(stream_options, dict, "stream_options", "an object")
        include_usage = stream_options.get("include_usage", False)
        include_usage = _want(include_usage, bool, "stream_options.include_usage", "a boolean")

    max_tokens: int | None = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        value = _want(value, int, name, "an integer")
        if not 1 <= value <= _MAX_TOKENS:
            raise BadBody(name, f"`{name}` must be an integer from 1 to {_MAX_TOKENS}")
        max_tokens = value
        break
    n = _integer(body, "n", 1, _MAX_N)
    if n is not None and n > 1 and stream:
        raise BadBody("n", "`n` above 1 cannot be streamed; ask without `stream`")
    stop_raw = body.get("stop")
    stop: list[str] | None = None
    if stop_raw is not None:
        if isinstance(stop_raw, str):
            stop = [stop_raw]
        else:
            stop_raw = _want(stop_raw, list, "stop", "a string or an array of strings")
            for i, s in enumerate(stop_raw):
                s = _want(s, str, f"stop[{i}]", "a string")
            stop = list(stop_raw) or None
    timeout = body.get("timeout")
    if timeout is not None:
        timeout = _num(timeout, "timeout", "a number of seconds")
        if not timeout > 0:
            raise BadBody("timeout", "`timeout` must be a positive, finite number of seconds")
        if max_timeout is not None:
            timeout = min(timeout, max_timeout)  # a request may shorten, never extend
    elif max_timeout is not None and default_timeout is not None and max_timeout < default_timeout:
        timeout = max_timeout
    fallbacks = _names(body.get("fallbacks"), "fallbacks")
    if header_fallbacks:
        fallbacks += _names(header_fallbacks, "x-router-fallbacks")
    logprobs = _optional(body, "logprobs", bool, "a boolean")
    top_logprobs = _integer(body, "top_logprobs", 0, 20)
    if top_logprobs is not None and not logprobs:
        raise BadBody("top_logprobs", "`top_logprobs` needs `logprobs: true`")
    prediction = _optional(body, "prediction", dict, "an object")
    request = ChatRequest(
        model=model,
        messages=parsed,
        fallbacks=[name for name, _ in fallbacks],
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        stop=stop,
        timeout=float(timeout) if timeout is not None else None,
        tenant=tenant,
        tools=_tools(body.get("tools")),
        tool_choice=_tool_choice(body.get("tool_choice")),
        response_format=_response_format(body.get("response_format")),
        seed=_integer(body, "seed", -(2**63), 2**63 - 1),
        n=n if n != 1 else None,
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0) or None,
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0) or None,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        logit_bias=_logit_bias(body.get("logit_bias")),
        user=_optional(body, "user", str, "a string") or None,
        parallel_tool_calls=_optional(body, "parallel_tool_calls", bool, "a boolean"),
        reasoning_effort=_optional(body, "reasoning_effort", str, "a string") or None,
        service_tier=_optional(body, "service_tier", str, "a string") or None,
        prediction=prediction,
        extra=_extra(body),
        drop_params=_optional(body, "drop_params", bool, "a boolean"),
    )
    if request.top_p is not None and request.top_p <= 0:
        raise BadBody("top_p", "`top_p` must be in (0, 1]")
    options = ChatOptions(
        stream=stream,
        include_usage=include_usage,
        fallback_fields=[where for _, where in fallbacks],
    )
    return request, options


# -------------------------------------------------------------------------- answers


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def usage_json(usage: Usage | None) -> dict[str, Any]:
    """OpenAI's usage object; the cache and reasoning details only when non-zero, and
    Anthropic's cache writes under its own name (an extension)."""
    u = usage or Usage()
    total = u.total_tokens or (u.prompt_tokens + u.completion_tokens)
    out: dict[str, Any] = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": total,
    }
    if u.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": u.cached_tokens}
    if u.reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": u.reasoning_tokens}
    if u.cache_creation_tokens:
        out["cache_creation_input_tokens"] = u.cache_creation_tokens
    return out


def _tool_call_json(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def thinking_blocks_json(blocks: list[ThinkingBlock] | None) -> list[dict[str, Any]]:
    """Anthropic thinking blocks in LiteLLM's ``thinking_blocks`` shape (what a client
    sends back, unchanged, with the assistant turn); other protocols' blocks are not
    returned (their text is the reasoning)."""
    out: list[dict[str, Any]] = []
    for block in blocks or ():
        if block.protocol != "anthropic":
            continue
        if block.redacted is not None:
            out.append({"type": "redacted_thinking", "data": block.redacted})
        else:
            out.append({"type": "thinking", "thinking": block.text, "signature": block.signature})
    return out


def _split_fields(fields: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the provider fields OpenAI's shapes have a place for, the rest for `x_router`)."""
    native: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for name, value in (fields or {}).items():
        (native if name in _NATIVE_FIELDS else rest)[name] = value
    return native, rest


def _message_json(
    content: str,
    tool_calls: list[ToolCall],
    reasoning: str | None,
    refusal: str | None,
    thinking: list[ThinkingBlock] | None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": refusal}
    if tool_calls:
        message["tool_calls"] = [_tool_call_json(c) for c in tool_calls]
        if not content:
            message["content"] = None
    elif refusal and not content:
        message["content"] = None
    if reasoning:
        message["reasoning_content"] = reasoning
    blocks = thinking_blocks_json(thinking)
    if blocks:
        message["thinking_blocks"] = blocks
    return message


def completion_json(response: ChatResponse) -> dict[str, Any]:
    """``chat.completion``: every choice (``n > 1``), reasoning and Anthropic thinking
    blocks, refusal, logprobs, system_fingerprint and usage details; provider fields
    OpenAI has no place for (and the matched stop sequence) under ``x_router``."""
    native, rest = _split_fields(response.provider_fields)
    message = _message_json(
        response.content,
        response.tool_calls,
        response.reasoning,
        response.refusal,
        response.thinking,
    )
    for name in ("annotations", "audio"):
        if name in native:
            message[name] = native[name]
    choices = [
        {
            "index": 0,
            "message": message,
            "finish_reason": response.finish_reason,
            "logprobs": response.logprobs,
        }
    ]
    choices.extend(_choice_json(c) for c in (response.choices or ())[1:])
    out: dict[str, Any] = {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": response.model,
        "choices": choices,
        "usage": usage_json(response.usage),
    }
    if response.system_fingerprint is not None:
        out["system_fingerprint"] = response.system_fingerprint
    if "service_tier" in native:
        out["service_tier"] = native["service_tier"]
    if response.stop_sequence is not None:
        rest["stop_sequence"] = response.stop_sequence
    if rest:
        out["x_router"] = rest
    return out


def _choice_json(choice: Choice) -> dict[str, Any]:
    message = _message_json(
        choice.content, choice.tool_calls, choice.reasoning, choice.refusal, None
    )
    return {
        "index": choice.index,
        "message": message,
        "finish_reason": choice.finish_reason,
        "logprobs": choice.logprobs,
    }


def chunk_json(
    cid: str,
    created: int,
    model: str,
    chunk: StreamChunk | None,
    *,
    first: bool,
    include_usage: bool,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; `chunk` None renders the trailing usage chunk."""
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
    }
    if chunk is None:
        out["choices"] = []
        return out
    delta: dict[str, Any] = {}
    if first:
        delta["role"] = "assistant"
    if chunk.text or first:
        delta["content"] = chunk.text
    if chunk.reasoning:
        delta["reasoning_content"] = chunk.reasoning
    blocks = thinking_blocks_json(chunk.thinking)
    if blocks:
        delta["thinking_blocks"] = blocks
    if chunk.refusal:
        delta["refusal"] = chunk.refusal
    if chunk.tool_calls:
        calls = []
        for d in chunk.tool_calls:
            call: dict[str, Any] = {"index": d.index}
            if d.id is not None:
                call["id"] = d.id
                call["type"] = "function"
            fn: dict[str, Any] = {"arguments": d.arguments}
            if d.name is not None:
                fn["name"] = d.name
            call["function"] = fn
            calls.append(call)
        delta["tool_calls"] = calls
    native, rest = _split_fields(chunk.provider_fields)
    for name in ("annotations", "audio"):
        if name in native:
            delta[name] = native[name]
    out["choices"] = [
        {
            "index": 0,
            "delta": delta,
            "finish_reason": chunk.finish_reason,
            "logprobs": chunk.logprobs,
        }
    ]
    for name in ("system_fingerprint", "service_tier"):
        if name in native:
            out[name] = native[name]
    if chunk.stop_sequence is not None:
        rest["stop_sequence"] = chunk.stop_sequence
    if rest:
        out["x_router"] = rest
    if include_usage:
        out["usage"] = None
    return out


def has_news(chunk: StreamChunk) -> bool:
    """Whether a chunk carries anything a client would see (not just usage)."""
    return bool(
        chunk.has_content
        or chunk.finish_reason
        or chunk.thinking
        or chunk.logprobs is not None
        or chunk.provider_fields
        or chunk.stop_sequence is not None
    )


def dropped_header(dropped: list[str]) -> str:
    """The ``x-router-dropped-params`` value: the dropped names, comma-separated."""
    names: list[str] = []
    for entry in dropped:
        for name in entry.split(","):
            name = name.strip()
            if name and name.isprintable() and name.isascii() and name not in names:
                names.append(name)
    return ",".join(names)


# -------------------------------------------------------------------------- errors

_PASS_THROUGH_CODES: Final = {
    "bad_request": "invalid_request",
    "context_exceeded": "context_length_exceeded",
    "content_filter": "content_filter",
    "max_tokens": "max_tokens_exceeded",
}


def error_reply(exc: BaseException) -> ErrorReply:
    """The HTTP status and OpenAI error body for an error raised by the router."""
    if isinstance(exc, BadBody):
        return ErrorReply(
            status=400,
            body=error_body(exc.message, "invalid_request_error", exc.field, exc.code),
        )
    if isinstance(exc, NotAllowed):
        return ErrorReply(
            status=403,
            body=error_body(
                f"this API key may not use the model {exc.model!r} (at `{exc.field}`)",
                "permission_error",
                exc.field,
                "model_not_allowed",
            ),
        )
    if isinstance(exc, UnknownModelError):
        return ErrorReply(
            status=404,
            body=error_body(
                f"The model {exc.model!r} (at `{exc.field}`) does not exist: it is neither "
                "a configured model nor `provider/upstream-id` of a configured provider",
                "invalid_request_error",
                exc.field,
                "model_not_found",
            ),
        )
    if isinstance(exc, InvalidRequestError):
        return ErrorReply(
            status=400,
            body=error_body(exc.message, "invalid_request_error", exc.field, "invalid_value"),
        )
    if isinstance(exc, ChainExhaustedError):
        if exc.retry_after is not None:
            seconds = max(1, math.ceil(exc.retry_after))
            return ErrorReply(
                status=429,
                body=error_body(exc.message, "rate_limit_error", None, "rate_limit_exceeded"),
                headers=[("retry-after", str(seconds))],
            )
        return ErrorReply(
            status=502,
            body=error_body(
                exc.message,
                "upstream_error",
                None,
                exc.last_error.kind if exc.last_error is not None else "chain_exhausted",
            ),
        )
    if isinstance(exc, DeadlineExceededError):
        return ErrorReply(
            status=504, body=error_body(exc.message, "timeout_error", None, "deadline_exceeded")
        )
    if isinstance(exc, StreamInterruptedError):
        return ErrorReply(
            status=502, body=error_body(exc.message, "upstream_error", None, exc.kind)
        )
    if isinstance(exc, ProviderError):
        code = _PASS_THROUGH_CODES.get(exc.kind)
        if code is not None:
            return ErrorReply(
                status=400, body=error_body(exc.message, "invalid_request_error", None, code)
            )
        return ErrorReply(
            status=502, body=error_body(exc.message, "upstream_error", None, exc.kind)
        )
    if isinstance(exc, RouterClosedError):
        return ErrorReply(
            status=503, body=error_body(exc.message, "service_unavailable", None, "closed")
        )
    if isinstance(exc, RouterError):
        if exc.kind == "bad_request":  # a limit of the router's own (not an upstream's)
            return ErrorReply(
                status=400,
                body=error_body(exc.message, "invalid_request_error", None, "invalid_request"),
            )
        return ErrorReply(
            status=502, body=error_body(exc.message, "upstream_error", None, exc.kind)
        )
    return ErrorReply(
        status=500, body=error_body("internal gateway error", "server_error", None, "internal")
    )
