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
from .._types import ChatRequest, ChatResponse, Message, StreamChunk, Tool, ToolCall, Usage

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
    "error_body",
    "error_reply",
    "parse_chat_body",
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


def _content(value: object, field: str, nullable: bool) -> str:
    if value is None:
        if nullable:
            return ""
        raise BadBody(field, f"`{field}` is required", "missing_field")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts: list[str] = []
        for i, part in enumerate(value):
            pf = f"{field}[{i}]"
            part = _want(part, dict, pf, "a content part object")
            if part.get("type") != "text":
                raise BadBody(
                    f"{pf}.type", f"`{pf}.type` must be 'text' (only text content is supported)"
                )
            text = part.get("text")
            text = _want(text, str, f"{pf}.text", "a string")
            parts.append(text)
        return "".join(parts)
    raise BadBody(
        field,
        f"`{field}` must be a string or an array of text parts, got {_type_name(value)}",
        "invalid_type",
    )


def _tool_calls(value: object, field: str) -> list[ToolCall] | None:
    if value is None:
        return None
    value = _want(value, list, field, "an array")
    calls: list[ToolCall] = []
    for i, raw in enumerate(value):
        f = f"{field}[{i}]"
        raw = _want(raw, dict, f, "an object")
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
    tool_calls = _tool_calls(raw.get("tool_calls"), f"{field}.tool_calls")
    content = _content(
        raw.get("content"), f"{field}.content", nullable=mapped == "assistant" and bool(tool_calls)
    )
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
    return Message(mapped, content, name, tool_calls or None, tool_call_id)  # type: ignore[arg-type]


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
        tools.append(Tool(name=name, description=description, parameters=parameters))
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
    n = body.get("n")
    if n is not None:
        n = _want(n, int, "n", "an integer")
        if n != 1:
            raise BadBody("n", "`n` must be 1 (the gateway returns one choice)")
    stop_raw = body.get("stop")
    stop: list[str] | None = None
    if stop_raw is not None:
        if isinstance(stop_raw, str):
            stop = [stop_raw]
        else:
            stop_raw = _want(stop_raw, list, "stop", "a string or an array of strings")
            for i, s in enumerate(stop_raw):
                s = _want(s, str, f"stop[{i}]", "a string")
            stop = list(stop_raw)
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
    user = body.get("user")
    if user is not None:
        user = _want(user, str, "user", "a string")
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
        metadata={"user": user} if user else {},
        tools=_tools(body.get("tools")),
        tool_choice=_tool_choice(body.get("tool_choice")),
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


def usage_json(usage: Usage | None) -> dict[str, int]:
    u = usage or Usage()
    total = u.total_tokens or (u.prompt_tokens + u.completion_tokens)
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": total,
    }


def _tool_call_json(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def completion_json(response: ChatResponse) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": response.content}
    if response.tool_calls:
        message["tool_calls"] = [_tool_call_json(c) for c in response.tool_calls]
        if not response.content:
            message["content"] = None
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": response.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": response.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage_json(response.usage),
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
    out["choices"] = [
        {"index": 0, "delta": delta, "finish_reason": chunk.finish_reason, "logprobs": None}
    ]
    if include_usage:
        out["usage"] = None
    return out


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
