"""The three wire protocols: request parsing, answers, stream frames and error bodies.

Pure functions, no I/O. A request is parsed into a `Parsed` summary; an `Answer` is built
from it (and the fault, if any); renderers turn the answer into a JSON body or a list of
stream `Frame`s for the protocol.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
from http import HTTPStatus
from typing import Any, Literal, NamedTuple

import msgspec

from router._simulated import embed_vector
from router._types import ToolCall, Usage
from router.emulator._faults import Fault

Json = dict[str, Any]
Protocol = Literal[
    "openai", "anthropic", "anthropic_count", "gemini", "openai_embed", "gemini_embed"
]
FrameKind = Literal["meta", "content", "finish", "usage", "end"]

_encode = msgspec.json.Encoder().encode
_ids = itertools.count(1)
_WORD_CHUNK = re.compile(r"\s*\S+\s*")


class BadRequest(Exception):
    """The request is invalid: answered with `status` and the protocol's error shape."""

    def __init__(self, message: str, *, status: int = 400, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind


class Parsed(NamedTuple):
    """What the emulator needs to know about a request."""

    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int
    last_user_text: str
    max_tokens: int | None
    stop: list[str]
    inputs: tuple[str, ...] = ()
    """An embedding request's texts."""
    dimensions: int | None = None


class Answer(NamedTuple):
    text: str
    tool_calls: list[ToolCall]
    finish: str
    """Normalised: stop, stop_sequence, length or tool_calls."""
    stop_sequence: str | None
    usage: Usage
    finish_override: str | None
    reasoning: str | None = None
    """Reasoning (thinking) text to put in the answer, in the protocol's own shape."""


class Frame(NamedTuple):
    kind: FrameKind
    event: str | None
    """The SSE event name (Anthropic), else None."""
    data: bytes


def next_id() -> int:
    return next(_ids)


def words(text: str) -> int:
    return len(text.split())


def word_chunks(text: str) -> list[str]:
    """Split text into chunks of one word plus its following whitespace.

    Leading whitespace stays with the first chunk, so the chunks join back to `text`.
    """
    return _WORD_CHUNK.findall(text)


# --------------------------------------------------------------------------- parsing


def _int_field(body: Json, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"Invalid value for '{name}': expected a non-negative integer.")
    return value


def _str_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise BadRequest(f"Invalid value for '{name}': expected a string or a list of strings.")


def _text_blocks(content: Any) -> str:
    """Text of an OpenAI/Anthropic content value: a string or a list of text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            block["text"]
            for block in content
            if isinstance(block, dict)
            and block.get("type") == "text"
            and isinstance(block.get("text"), str)
        )
    return ""


def _model(body: Json) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: Field required")
    return model


_OPENAI_PARTS = ("text", "image_url", "input_audio", "refusal", "file")


def _openai_part(part: Any, where: str) -> None:
    """Check one content part against OpenAI's published shapes (BadRequest if not)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in _OPENAI_PARTS:
        raise BadRequest(
            f"Invalid value: {kind!r} at '{where}.type'. Supported values are: 'text', "
            "'image_url', 'input_audio', 'refusal', and 'file'."
        )
    inner = part.get(kind)
    if kind in ("text", "refusal"):
        if not isinstance(inner, str):
            raise BadRequest(f"Missing required parameter: '{where}.{kind}'.")
    elif not isinstance(inner, dict):
        raise BadRequest(f"Missing required parameter: '{where}.{kind}'.")
    elif kind == "image_url":
        url = inner.get("url")
        ok = isinstance(url, str) and (
            url.startswith(("http://", "https://"))
            or (url.startswith("data:image/") and ";base64," in url)
        )
        if not ok:
            raise BadRequest(
                f"Invalid '{where}.image_url.url': expected an http(s) URL or a base64 "
                "data: URL of an image."
            )
        if inner.get("detail", "auto") not in ("low", "high", "auto"):
            raise BadRequest(f"Invalid value for '{where}.image_url.detail'.")
    elif kind == "input_audio":
        if not isinstance(inner.get("data"), str) or not isinstance(inner.get("format"), str):
            raise BadRequest(f"Missing required parameter: '{where}.input_audio.data/format'.")
    else:  # file
        data = inner.get("file_data")
        if data is not None and not (isinstance(data, str) and data.startswith("data:")):
            raise BadRequest(f"Invalid '{where}.file.file_data': expected a base64 data: URL.")
        if data is None and not isinstance(inner.get("file_id"), str):
            raise BadRequest(f"Missing required parameter: '{where}.file.file_data' or 'file_id'.")


def _openai_content(message: Json, i: int) -> str:
    """The text of an OpenAI message's content (its text parts, every part checked).
    An input message carrying reasoning_content is refused, as DeepSeek documents."""
    if "reasoning_content" in message:
        raise BadRequest(f"messages[{i}]: reasoning_content is not allowed in input messages.")
    content = message.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            _openai_part(part, f"messages[{i}].content[{j}]")
    return _text_blocks(content)


def parse_openai(body: Json) -> Parsed:
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("Missing required parameter: 'messages'.")
    prompt = 0
    last_user = ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"Invalid type for 'messages[{i}]': expected an object with a role.")
        text = _openai_content(message, i)
        prompt += words(text) + 4
        if message["role"] == "user":
            last_user = text
    max_tokens = _int_field(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens")
    options = body.get("stream_options")
    return Parsed(
        model=model,
        stream=body.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        prompt_tokens=prompt,
        last_user_text=last_user,
        max_tokens=max_tokens,
        stop=_str_list(body.get("stop"), "stop"),
    )


_ANTHROPIC_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_ANTHROPIC_SIGNATURE = "emu-sig-"
# Block types each place accepts (the rest is answered 400, as the API does).
_ANTHROPIC_USER_BLOCKS = frozenset(
    {"text", "image", "document", "tool_result", "search_result", "container_upload"}
)
_ANTHROPIC_ASSISTANT_BLOCKS = frozenset(
    {"text", "tool_use", "thinking", "redacted_thinking", "server_tool_use"}
)
_ANTHROPIC_RESULT_BLOCKS = frozenset({"text", "image", "document", "search_result"})


def anthropic_signature(thinking: str) -> str:
    """The emulator's (fake) signature of a thinking block's text: the emulator checks
    it when the block comes back, as the API checks its own."""
    return _ANTHROPIC_SIGNATURE + hashlib.sha256(thinking.encode()).hexdigest()[:40]


def _anthropic_str(block: Json, name: str, where: str) -> str:
    value = block.get(name)
    if not isinstance(value, str):
        raise BadRequest(f"{where}.{name}: Field required")
    return value


def _anthropic_cache_control(block: Json, where: str) -> None:
    if "cache_control" not in block or block["cache_control"] is None:
        return
    cache = block["cache_control"]
    if not isinstance(cache, dict) or cache.get("type") != "ephemeral":
        raise BadRequest(f"{where}.cache_control.type: Input should be 'ephemeral'")
    if cache.get("ttl", "5m") not in ("5m", "1h"):
        raise BadRequest(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")


def _anthropic_source(block: Json, where: str, kinds: tuple[str, ...]) -> None:
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") not in kinds:
        raise BadRequest(f"{where}.source.type: Input should be one of {', '.join(kinds)}")
    kind = source["type"]
    if kind == "url":
        _anthropic_str(source, "url", f"{where}.source")
    elif kind == "file":
        _anthropic_str(source, "file_id", f"{where}.source")
    elif kind == "content":
        if not isinstance(source.get("content"), (str, list)):
            raise BadRequest(f"{where}.source.content: Field required")
    else:  # base64, text
        media_type = _anthropic_str(source, "media_type", f"{where}.source")
        _anthropic_str(source, "data", f"{where}.source")
        allowed = {
            "base64": _ANTHROPIC_IMAGE_TYPES if block["type"] == "image" else {"application/pdf"},
            "text": {"text/plain"},
        }[kind]
        if media_type not in allowed:
            raise BadRequest(
                f"{where}.source.media_type: Input should be {' or '.join(sorted(allowed))}"
            )


def _anthropic_block(block: Any, where: str, allowed: frozenset[str]) -> int:
    """Check one content block as the API would; the words it adds to the prompt."""
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise BadRequest(f"{where}: Input should be an object with a type")
    kind = block["type"]
    if kind not in allowed:
        raise BadRequest(
            f"{where}: Input tag '{kind}' found using 'type' does not match any of the "
            f"expected tags: {', '.join(sorted(allowed))}"
        )
    if kind not in ("thinking", "redacted_thinking"):
        _anthropic_cache_control(block, where)
    elif "cache_control" in block:
        raise BadRequest(f"{where}.cache_control: thinking blocks cannot be cached")
    if kind == "text":
        return words(_anthropic_str(block, "text", where))
    if kind == "image":
        _anthropic_source(block, where, ("base64", "url", "file"))
        return 0
    if kind == "document":
        _anthropic_source(block, where, ("base64", "text", "url", "file", "content"))
        return 0
    if kind == "thinking":
        thinking = _anthropic_str(block, "thinking", where)
        signature = _anthropic_str(block, "signature", where)
        if signature.startswith(_ANTHROPIC_SIGNATURE) and signature != anthropic_signature(
            thinking
        ):
            raise BadRequest(f"{where}: Invalid `signature` in `thinking` block")
        return words(thinking)
    if kind == "redacted_thinking":
        _anthropic_str(block, "data", where)
        return 0
    if kind == "tool_use":
        _anthropic_str(block, "id", where)
        _anthropic_str(block, "name", where)
        if not isinstance(block.get("input"), dict):
            raise BadRequest(f"{where}.input: Input should be a valid dictionary")
        return 0
    if kind == "tool_result":
        _anthropic_str(block, "tool_use_id", where)
        content = block.get("content")
        if isinstance(content, list):
            return sum(
                _anthropic_block(inner, f"{where}.content.{j}", _ANTHROPIC_RESULT_BLOCKS)
                for j, inner in enumerate(content)
            )
        return words(content) if isinstance(content, str) else 0
    return 0


def _anthropic_system(system: Any) -> int:
    if system is None or isinstance(system, str):
        return words(system or "")
    if not isinstance(system, list):
        raise BadRequest("system: Input should be a valid string or a list of text blocks")
    return sum(
        _anthropic_block(block, f"system.{i}", frozenset({"text"}))
        for i, block in enumerate(system)
    )


def parse_anthropic(body: Json, *, count: bool) -> Parsed:
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: Field required")
    max_tokens = _int_field(body, "max_tokens")
    if max_tokens is None and not count:
        raise BadRequest("max_tokens: Field required")
    prompt = 0
    system = _anthropic_system(body.get("system"))
    if system:
        prompt += system + 4
    for i, tool in enumerate(body.get("tools") or ()):
        if isinstance(tool, dict):
            _anthropic_cache_control(tool, f"tools.{i}")
    last_user = ""
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise BadRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, list):
            allowed = _ANTHROPIC_USER_BLOCKS if role == "user" else _ANTHROPIC_ASSISTANT_BLOCKS
            for j, block in enumerate(content):
                _anthropic_block(block, f"messages.{i}.content.{j}", allowed)
        text = _text_blocks(content)
        counted = words(text)
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    counted += words(_text_blocks(block.get("content")))
        prompt += counted + 4
        if role == "user" and (isinstance(content, str) or text):
            last_user = text
    return Parsed(
        model=model,
        stream=body.get("stream") is True and not count,
        include_usage=True,
        prompt_tokens=prompt,
        last_user_text=last_user,
        max_tokens=max_tokens,
        stop=_str_list(body.get("stop_sequences"), "stop_sequences"),
    )


def _gemini_text(content: Any) -> str:
    if not isinstance(content, dict):
        return ""
    parts = content.get("parts")
    if not isinstance(parts, list):
        return ""
    return "\n".join(
        part["text"]
        for part in parts
        if isinstance(part, dict) and isinstance(part.get("text"), str)
    )


_GEMINI_MEDIA_TOKENS = 258
"""Tokens counted per inline or file-referenced media part (Gemini's documented count
for a small image; the emulator does not look inside the data)."""


def _gemini_field(value: dict[str, Any], camel: str, snake: str) -> Any:
    """A field by its JSON (camelCase) or proto (snake_case) name: the API takes both."""
    return value[camel] if camel in value else value.get(snake)


def _gemini_media(parts: list[Any], where: str) -> int:
    """Checks the inline_data / file_data parts of one content; returns their count."""
    media = 0
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            raise BadRequest(f"* GenerateContentRequest.{where}.parts[{j}]: expected an object")
        inline = _gemini_field(part, "inlineData", "inline_data")
        if inline is not None:
            if not isinstance(inline, dict) or not isinstance(inline.get("data"), str):
                raise BadRequest(
                    f"* GenerateContentRequest.{where}.parts[{j}].inline_data.data: "
                    "required field is not specified"
                )
            if not isinstance(_gemini_field(inline, "mimeType", "mime_type"), str):
                raise BadRequest(
                    f"* GenerateContentRequest.{where}.parts[{j}].inline_data.mime_type: "
                    "required field is not specified"
                )
            media += 1
        file_data = _gemini_field(part, "fileData", "file_data")
        if file_data is not None:
            if not isinstance(file_data, dict) or not isinstance(
                _gemini_field(file_data, "fileUri", "file_uri"), str
            ):
                raise BadRequest(
                    f"* GenerateContentRequest.{where}.parts[{j}].file_data.file_uri: "
                    "required field is not specified"
                )
            media += 1
    return media


def parse_gemini(body: Json, model: str, *, stream: bool) -> Parsed:
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise BadRequest("* GenerateContentRequest.contents: contents is not specified")
    prompt = 0
    system = _gemini_text(body.get("systemInstruction") or body.get("system_instruction"))
    if system:
        prompt += words(system) + 4
    last_user = ""
    for i, content in enumerate(contents):
        if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
            raise BadRequest(f"* GenerateContentRequest.contents[{i}].parts: parts is required")
        media = _gemini_media(content["parts"], f"contents[{i}]")
        text = _gemini_text(content)
        prompt += words(text) + 4 + media * _GEMINI_MEDIA_TOKENS
        has_text = any(isinstance(p, dict) and "text" in p for p in content["parts"])
        if content.get("role", "user") == "user" and has_text:
            last_user = text
    config = body.get("generationConfig") or body.get("generation_config") or {}
    if not isinstance(config, dict):
        raise BadRequest("* GenerateContentRequest.generation_config: expected an object")
    schema = _gemini_field(config, "responseSchema", "response_schema")
    json_schema = _gemini_field(config, "responseJsonSchema", "response_json_schema")
    if schema is not None and json_schema is not None:
        raise BadRequest(
            "* GenerateContentRequest.generation_config: response_schema and "
            "response_json_schema cannot both be set"
        )
    mime = _gemini_field(config, "responseMimeType", "response_mime_type")
    if (schema is not None or json_schema is not None) and mime != "application/json":
        raise BadRequest(
            "* GenerateContentRequest.generation_config.response_mime_type: a response schema "
            "needs response_mime_type application/json"
        )
    return Parsed(
        model=model,
        stream=stream,
        include_usage=True,
        prompt_tokens=prompt,
        last_user_text=last_user,
        max_tokens=_int_field(config, "maxOutputTokens"),
        stop=_str_list(config.get("stopSequences"), "stopSequences"),
    )


# --------------------------------------------------------------------------- answers


def build_answer(parsed: Parsed, fault: Fault | None) -> Answer:
    reply = fault.reply if fault is not None else None
    tool_calls = list(fault.tool_calls) if fault is not None and fault.tool_calls else []
    echo = "" if tool_calls else f"echo: {parsed.last_user_text}"
    text = reply if reply is not None else echo
    finish = "tool_calls" if tool_calls else "stop"
    stop_sequence: str | None = None
    if not tool_calls:
        cut = len(text)
        for stop in parsed.stop:
            at = text.find(stop) if stop else -1
            if 0 <= at < cut:
                cut, stop_sequence = at, stop
        if stop_sequence is not None:
            text, finish = text[:cut], "stop_sequence"
        if parsed.max_tokens is not None and words(text) > parsed.max_tokens:
            text = "".join(word_chunks(text)[: parsed.max_tokens]).rstrip()
            finish, stop_sequence = "length", None
    if fault is not None and fault.usage is not None:
        usage = fault.usage
        if usage.total_tokens == 0 and (usage.prompt_tokens or usage.completion_tokens):
            usage = msgspec.structs.replace(
                usage, total_tokens=usage.prompt_tokens + usage.completion_tokens
            )
    else:
        completion = words(text) + sum(words(c.name) + words(c.arguments) for c in tool_calls)
        usage = Usage(
            prompt_tokens=parsed.prompt_tokens,
            completion_tokens=completion,
            total_tokens=parsed.prompt_tokens + completion,
        )
    override = fault.finish_reason if fault is not None else None
    reasoning = fault.reasoning if fault is not None else None
    return Answer(text, tool_calls, finish, stop_sequence, usage, override, reasoning)


def _json_args(arguments: str) -> Any:
    try:
        return msgspec.json.decode(arguments) if arguments else {}
    except msgspec.DecodeError:
        return {"_raw": arguments}


def _split_args(arguments: str) -> list[str]:
    if len(arguments) < 2:
        return [arguments] if arguments else []
    half = len(arguments) // 2
    return [arguments[:half], arguments[half:]]


_OPENAI_FINISH = {"stop": "stop", "stop_sequence": "stop", "length": "length"}
_ANTHROPIC_FINISH = {"stop": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens"}
_GEMINI_FINISH = {"stop": "STOP", "stop_sequence": "STOP", "length": "MAX_TOKENS"}


def _finish(answer: Answer, table: dict[str, str], tool: str) -> str:
    if answer.finish_override is not None:
        return answer.finish_override
    return table.get(answer.finish, tool)


def _openai_usage(usage: Usage) -> Json:
    out: Json = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens, "audio_tokens": 0}
    if usage.reasoning_tokens:
        out["completion_tokens_details"] = {
            "reasoning_tokens": usage.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return out


def _gemini_usage(answer: Answer) -> Json:
    usage = answer.usage
    metadata: Json = {
        "promptTokenCount": usage.prompt_tokens,
        "candidatesTokenCount": usage.completion_tokens,
        "totalTokenCount": usage.total_tokens,
    }
    if answer.reasoning:  # thought tokens are counted apart, and in the total
        thoughts = words(answer.reasoning)
        metadata["thoughtsTokenCount"] = thoughts
        metadata["totalTokenCount"] = usage.total_tokens + thoughts
    return metadata


def openai_json(answer: Answer, model: str) -> Json:
    message: Json = {
        "role": "assistant",
        "content": answer.text if answer.text or not answer.tool_calls else None,
        "refusal": None,
    }
    if answer.reasoning is not None:
        message["reasoning_content"] = answer.reasoning
    if answer.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in answer.tool_calls
        ]
    return {
        "id": f"chatcmpl-emu{next_id()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_emulator",
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish(answer, _OPENAI_FINISH, "tool_calls"),
            }
        ],
        "usage": _openai_usage(answer.usage),
    }


def _anthropic_blocks(answer: Answer) -> list[Json]:
    blocks: list[Json] = []
    if answer.reasoning is not None:
        blocks.append(
            {
                "type": "thinking",
                "thinking": answer.reasoning,
                "signature": anthropic_signature(answer.reasoning),
            }
        )
    if answer.text or not answer.tool_calls:
        blocks.append({"type": "text", "text": answer.text})
    for call in answer.tool_calls:
        blocks.append(
            {
                "type": "tool_use",
                "id": call.id,
                "name": call.name,
                "input": _json_args(call.arguments),
            }
        )
    return blocks


def anthropic_json(answer: Answer, model: str) -> Json:
    return {
        "id": f"msg_emu{next_id()}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _anthropic_blocks(answer),
        "stop_reason": _finish(answer, _ANTHROPIC_FINISH, "tool_use"),
        "stop_sequence": answer.stop_sequence,
        "usage": {
            "input_tokens": answer.usage.prompt_tokens,
            "output_tokens": answer.usage.completion_tokens,
        },
    }


def _gemini_parts(answer: Answer) -> list[Json]:
    parts: list[Json] = []
    if answer.reasoning:
        parts.append({"text": answer.reasoning, "thought": True})
    if answer.text or not answer.tool_calls:
        parts.append({"text": answer.text})
    for call in answer.tool_calls:
        parts.append({"functionCall": {"name": call.name, "args": _json_args(call.arguments)}})
    return parts


def gemini_json(answer: Answer, model: str) -> Json:
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": _gemini_parts(answer)},
                "finishReason": _finish(answer, _GEMINI_FINISH, "STOP"),
                "index": 0,
            }
        ],
        "usageMetadata": _gemini_usage(answer),
        "modelVersion": model,
        "responseId": f"emu{next_id()}",
    }


def answer_json(protocol: Protocol, answer: Answer, model: str) -> Json:
    if protocol == "openai":
        return openai_json(answer, model)
    if protocol == "anthropic":
        return anthropic_json(answer, model)
    return gemini_json(answer, model)


# --------------------------------------------------------------------------- streams


def openai_frames(answer: Answer, model: str, include_usage: bool) -> list[Frame]:
    base: Json = {
        "id": f"chatcmpl-emu{next_id()}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_emulator",
    }

    def chunk(kind: FrameKind, delta: Json, finish: str | None = None) -> Frame:
        payload = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return Frame(kind, None, _encode(payload))

    content = "" if answer.text or not answer.tool_calls else None
    first: Json = {"role": "assistant", "content": content}
    frames = [chunk("meta", first)]
    for piece in word_chunks(answer.reasoning or ""):
        frames.append(chunk("content", {"content": None, "reasoning_content": piece}))
    frames += [chunk("content", {"content": piece}) for piece in word_chunks(answer.text)]
    for index, call in enumerate(answer.tool_calls):
        head = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        frames.append(chunk("content", {"tool_calls": [head]}))
        for piece in _split_args(call.arguments):
            delta = {"index": index, "function": {"arguments": piece}}
            frames.append(chunk("content", {"tool_calls": [delta]}))
    frames.append(chunk("finish", {}, _finish(answer, _OPENAI_FINISH, "tool_calls")))
    if include_usage:
        payload = {**base, "choices": [], "usage": _openai_usage(answer.usage)}
        frames.append(Frame("usage", None, _encode(payload)))
    frames.append(Frame("end", None, b"[DONE]"))
    return frames


def anthropic_frames(answer: Answer, model: str) -> list[Frame]:
    def event(kind: FrameKind, name: str, payload: Json) -> Frame:
        return Frame(kind, name, _encode({"type": name, **payload}))

    message: Json = {
        "id": f"msg_emu{next_id()}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": answer.usage.prompt_tokens, "output_tokens": 1},
    }
    frames = [event("meta", "message_start", {"message": message})]
    index = 0

    def block(start: Json, deltas: list[Json]) -> None:
        nonlocal index
        frames.append(
            event("meta", "content_block_start", {"index": index, "content_block": start})
        )
        if index == 0:
            frames.append(event("meta", "ping", {}))
        for delta in deltas:
            frames.append(event("content", "content_block_delta", {"index": index, "delta": delta}))
        frames.append(event("meta", "content_block_stop", {"index": index}))
        index += 1

    if answer.reasoning is not None:
        block(
            {"type": "thinking", "thinking": ""},
            [{"type": "thinking_delta", "thinking": p} for p in word_chunks(answer.reasoning)]
            + [{"type": "signature_delta", "signature": anthropic_signature(answer.reasoning)}],
        )
    if answer.text or not answer.tool_calls:
        pieces = word_chunks(answer.text)
        block(
            {"type": "text", "text": ""},
            [{"type": "text_delta", "text": piece} for piece in pieces],
        )
    for call in answer.tool_calls:
        block(
            {"type": "tool_use", "id": call.id, "name": call.name, "input": {}},
            [
                {"type": "input_json_delta", "partial_json": piece}
                for piece in _split_args(call.arguments)
            ],
        )
    delta = {
        "delta": {
            "stop_reason": _finish(answer, _ANTHROPIC_FINISH, "tool_use"),
            "stop_sequence": answer.stop_sequence,
        },
        "usage": {"output_tokens": answer.usage.completion_tokens},
    }
    frames.append(event("finish", "message_delta", delta))
    frames.append(event("end", "message_stop", {}))
    return frames


def gemini_frames(answer: Answer, model: str) -> list[Frame]:
    response_id = f"emu{next_id()}"

    def chunk(kind: FrameKind, parts: list[Json], extra: Json) -> Frame:
        candidate = {"content": {"role": "model", "parts": parts}, **extra, "index": 0}
        payload: Json = {"candidates": [candidate]}
        if kind == "finish":
            payload["usageMetadata"] = _gemini_usage(answer)
        payload["modelVersion"] = model
        payload["responseId"] = response_id
        return Frame(kind, None, _encode(payload))

    thoughts = word_chunks(answer.reasoning or "")
    frames = [chunk("content", [{"text": piece, "thought": True}], {}) for piece in thoughts]
    frames += [chunk("content", [{"text": piece}], {}) for piece in word_chunks(answer.text)]
    for call in answer.tool_calls:
        function_call = {"name": call.name, "args": _json_args(call.arguments)}
        frames.append(chunk("content", [{"functionCall": function_call}], {}))
    finish = {"finishReason": _finish(answer, _GEMINI_FINISH, "STOP")}
    frames.append(chunk("finish", [{"text": ""}], finish))
    return frames


def stream_frames(protocol: Protocol, answer: Answer, parsed: Parsed) -> list[Frame]:
    if protocol == "openai":
        return openai_frames(answer, parsed.model, parsed.include_usage)
    if protocol == "anthropic":
        return anthropic_frames(answer, parsed.model)
    return gemini_frames(answer, parsed.model)


class Framer:
    """Puts frames on the wire: SSE (optionally CRLF, as Gemini does) or a JSON array."""

    def __init__(self, *, sse: bool = True, crlf: bool = False) -> None:
        self.sse = sse
        self.sep = b"\r\n\r\n" if crlf else b"\n\n"
        self.started = False

    def start(self) -> bytes:
        return b": keep-alive" + self.sep if self.sse else b""

    def frame(self, frame: Frame) -> bytes:
        if self.sse:
            head = b"event: " + frame.event.encode() + b"\n" if frame.event else b""
            return head + b"data: " + frame.data + self.sep
        if frame.kind == "end":
            return b"]" if self.started else b"[]"
        prefix = b",\r\n" if self.started else b"["
        self.started = True
        return prefix + frame.data


def error_frame(protocol: Protocol, body: Json) -> Frame:
    if protocol == "anthropic":
        return Frame("meta", "error", _encode(body))
    return Frame("meta", None, _encode(body))


# --------------------------------------------------------------------------- errors

_KIND_BY_STATUS = {
    400: "bad_request",
    401: "auth",
    402: "quota",
    403: "permission",
    404: "model_not_found",
    405: "bad_request",
    408: "timeout",
    413: "too_large",
    422: "bad_request",
    429: "rate_limit",
    500: "server",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
    529: "overloaded",
}


def error_kind(status: int) -> str:
    kind = _KIND_BY_STATUS.get(status)
    if kind is not None:
        return kind
    return "server" if status >= 500 else "bad_request"


def _openai_error(kind: str, model: str, message: str | None) -> Json:
    table: dict[str, tuple[str, str | None, str | None, str]] = {
        # kind: (type, code, param, message)
        "bad_request": ("invalid_request_error", None, None, "Invalid request."),
        "auth": (
            "invalid_request_error",
            "invalid_api_key",
            None,
            "Incorrect API key provided. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
        ),
        "permission": (
            "invalid_request_error",
            "unsupported_country_region_territory",
            None,
            "Country, region, or territory not supported",
        ),
        "quota": (
            "insufficient_quota",
            "insufficient_quota",
            None,
            "You exceeded your current quota, please check your plan and billing details.",
        ),
        "model_not_found": (
            "invalid_request_error",
            "model_not_found",
            None,
            f"The model `{model}` does not exist or you do not have access to it.",
        ),
        "context_length": (
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
            "This model's maximum context length is 128000 tokens. However, your messages "
            "resulted in 131072 tokens. Please reduce the length of the messages.",
        ),
        "max_tokens_limit": (
            "invalid_request_error",
            "invalid_value",
            "max_tokens",
            "max_tokens is too large: 1000000. This model supports at most 16384 "
            "completion tokens, whereas you provided 1000000.",
        ),
        "content_filter": (
            "invalid_request_error",
            "content_filter",
            "prompt",
            "The response was filtered due to the prompt triggering the content management policy.",
        ),
        "too_large": ("invalid_request_error", None, None, "Request too large."),
        "rate_limit": (
            "requests",
            "rate_limit_exceeded",
            None,
            f"Rate limit reached for {model} in organization org-emulator on requests per "
            "min (RPM): Limit 500, Used 500, Requested 1. Please try again in 120ms.",
        ),
        "server": (
            "server_error",
            None,
            None,
            "The server had an error while processing your request. Sorry about that!",
        ),
        "bad_gateway": ("server_error", None, None, "Bad gateway."),
        "unavailable": (
            "server_error",
            None,
            None,
            "The engine is currently overloaded, please try again later.",
        ),
        "overloaded": (
            "server_error",
            None,
            None,
            "The engine is currently overloaded, please try again later.",
        ),
        "timeout": ("server_error", "timeout", None, "Request timed out."),
    }
    type_, code, param, default = table.get(kind, table["bad_request"])
    return {"error": {"message": message or default, "type": type_, "param": param, "code": code}}


_ANTHROPIC_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_ANTHROPIC_MESSAGE = {
    "bad_request": "Invalid request.",
    "auth": "invalid x-api-key",
    "permission": "Your API key does not have permission to use the specified resource.",
    "quota": "Your credit balance is too low to access the Anthropic API. Please go to "
    "Plans & Billing to upgrade or purchase credits.",
    "context_length": "prompt is too long: 210000 tokens > 200000 maximum",
    "max_tokens_limit": "max_tokens: 1000000 > 64000, which is the maximum allowed number "
    "of output tokens for this model",
    "content_filter": "Output blocked by content filtering policy",
    "too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit": "This request would exceed the rate limit for your organization of 50 "
    "requests per minute. Please try again later.",
    "server": "Internal server error",
    "bad_gateway": "Internal server error",
    "unavailable": "Overloaded",
    "overloaded": "Overloaded",
    "timeout": "Request timed out",
}


def _anthropic_error(kind: str, status: int, model: str, message: str | None) -> Json:
    type_ = _ANTHROPIC_TYPE.get(status)
    if type_ is None:
        type_ = "api_error" if status >= 500 else "invalid_request_error"
    if kind == "model_not_found":
        default = f"model: {model}"
    else:
        default = _ANTHROPIC_MESSAGE.get(kind, "Invalid request.")
    return {"type": "error", "error": {"type": type_, "message": message or default}}


_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_GEMINI_MESSAGE = {
    "bad_request": "Request contains an invalid argument.",
    "auth": "API key not valid. Please pass a valid API key.",
    "permission": "The caller does not have permission",
    "quota": "You exceeded your current quota, please check your plan and billing details.",
    "context_length": "The input token count (1048577) exceeds the maximum number of tokens "
    "allowed (1048576).",
    "max_tokens_limit": "Unable to submit request because it has a maxOutputTokens value of "
    "1000000 but the supported range is from 1 (inclusive) to 65537 (exclusive).",
    "content_filter": "The request was blocked by the safety filters.",
    "too_large": "Request payload size exceeds the limit.",
    "rate_limit": "Resource has been exhausted (e.g. check quota).",
    "server": "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting",
    "bad_gateway": "An internal error has occurred.",
    "unavailable": "The model is overloaded. Please try again later.",
    "overloaded": "The model is overloaded. Please try again later.",
    "timeout": "The request timed out. Please try again.",
}


def _gemini_error(kind: str, status: int, model: str, message: str | None) -> Json:
    code = _GEMINI_STATUS.get(status)
    if kind == "quota":
        code = "RESOURCE_EXHAUSTED"
    if code is None:
        code = "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"
    if kind == "model_not_found":
        default = (
            f"models/{model} is not found for API version v1beta, or is not supported "
            "for generateContent."
        )
    else:
        default = _GEMINI_MESSAGE.get(kind, "Request contains an invalid argument.")
    error: Json = {"code": status, "message": message or default, "status": code}
    if kind == "auth":
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            }
        ]
    return {"error": error}


def error_body(
    protocol: Protocol, status: int, kind: str | None, model: str, message: str | None = None
) -> Json:
    """A realistic error body for the protocol, HTTP status and error kind."""
    kind = kind or error_kind(status)
    if protocol in ("openai", "openai_embed"):
        return _openai_error(kind, model, message)
    if protocol in ("anthropic", "anthropic_count"):
        return _anthropic_error(kind, status, model, message)
    return _gemini_error(kind, status, model, message)


# --------------------------------------------------------------------------- embeddings

EMBED_DIMENSIONS = 16
"""Vector length when the request asks for none."""


def _dimensions(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise BadRequest("Invalid value for 'dimensions': expected an integer in [1, 4096].")
    return value


def parse_openai_embed(body: Json) -> Parsed:
    model = _model(body)
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        inputs = list(raw)
    else:
        raise BadRequest("'input' must be a non-empty string or array of strings.")
    if any(not t for t in inputs):
        raise BadRequest("'input' cannot contain an empty string.")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'.")
    tokens = sum(max(1, words(t)) for t in inputs)
    return Parsed(
        model,
        False,
        False,
        tokens,
        "",
        None,
        [],
        tuple(inputs),
        _dimensions(body.get("dimensions")),
    )


def parse_gemini_embed(body: Json, model: str) -> Parsed:
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        raise BadRequest("* BatchEmbedContentsRequest.requests: requests is required.")
    inputs: list[str] = []
    dimensions: int | None = None
    for i, one in enumerate(requests):
        if not isinstance(one, dict):
            raise BadRequest(f"* requests[{i}]: must be an object.")
        if one.get("model") not in (f"models/{model}", None):
            raise BadRequest(
                f"* BatchEmbedContentsRequest.requests[{i}].model: the model must match "
                f"the model of the URL (models/{model})."
            )
        content = one.get("content")
        text = _gemini_text(content) if isinstance(content, dict) else ""
        if not text:
            raise BadRequest(f"* requests[{i}].content: content must have text parts.")
        inputs.append(text)
        dimensions = _dimensions(one.get("outputDimensionality"))
    tokens = sum(max(1, words(t)) for t in inputs)
    return Parsed(model, False, False, tokens, "", None, [], tuple(inputs), dimensions)


def embed_json(protocol: Protocol, parsed: Parsed) -> Json:
    size = parsed.dimensions or EMBED_DIMENSIONS
    vectors = [embed_vector(t, size) for t in parsed.inputs]
    if protocol == "gemini_embed":
        return {"embeddings": [{"values": v} for v in vectors]}
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
        ],
        "model": parsed.model,
        "usage": {"prompt_tokens": parsed.prompt_tokens, "total_tokens": parsed.prompt_tokens},
    }


def reason(status: int) -> bytes:
    if status == 529:
        return b"Site Overloaded"
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
