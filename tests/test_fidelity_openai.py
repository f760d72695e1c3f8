"""Request and response fidelity on the OpenAI protocol (issue 12).

Three layers: the sans-IO protocol (`router._openai`), end to end through a real
`Router` to the loopback emulator, and the offline token counter's content parts
(OpenAI's image rule, estimates for files and audio).
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest

from router import ChatRequest, Message, Router, RouterConfig, StreamChunk
from router import _tokens as tokens_module
from router._errors import ProviderError
from router._openai import OpenAIProtocol
from router._tokens import (
    AUDIO_BYTES_PER_SECOND,
    AUDIO_TOKENS_PER_SECOND,
    FILE_PAGE_TOKENS,
    IMAGE_UNKNOWN_TOKENS,
    OfflineTokenCounter,
    PromptCount,
    get_encoding,
    image_size,
    image_tokens,
)
from router._types import (
    AudioPart,
    ChatResponse,
    Choice,
    FilePart,
    ImagePart,
    ResponseFormat,
    TextPart,
    Usage,
)
from router._wire import SseEvent
from router.emulator import Emulator, Fault
from router.emulator._protocols import (
    BadRequest,
    build_answer,
    openai_frames,
    openai_json,
    parse_openai,
)

OPENAI = OpenAIProtocol()
SECRET = "sk-test-fidelity-0123"
UP = "up-main"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def js(value: Any) -> bytes:
    return msgspec.json.encode(value)


# --------------------------------------------------------------------------- images


def png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def jpeg(width: int, height: int, *, app_bytes: int = 0, marker: int = 0xC0) -> bytes:
    """A JPEG's segments up to its frame header: JFIF, `app_bytes` of APP1 segments
    (EXIF-like, so the frame header lies far into the data), a table, the frame."""
    out = b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + bytes(9)
    while app_bytes > 0:
        size = min(app_bytes, 60_000)
        out += b"\xff\xe1" + struct.pack(">H", size + 2) + bytes(size)
        app_bytes -= size
    out += b"\xff\xdb" + struct.pack(">H", 67) + bytes(65)  # a quantisation table
    out += b"\xff\xff"  # a fill byte
    frame = struct.pack(">BHHB", 8, height, width, 3) + bytes(9)
    out += bytes([0xFF, marker]) + struct.pack(">H", len(frame) + 2) + frame
    return out + b"\xff\xda" + struct.pack(">H", 8) + bytes(6) + b"\x00" * 32 + b"\xff\xd9"


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b";"


def webp(width: int, height: int, kind: str) -> bytes:
    if kind == "VP8 ":
        data = b"\x10\x02\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + bytes(8)
    elif kind == "VP8L":
        data = b"\x2f" + struct.pack("<I", (width - 1) | (height - 1) << 14) + bytes(8)
    else:
        data = b"\x00" + bytes(3) + (width - 1).to_bytes(3, "little")
        data += (height - 1).to_bytes(3, "little")
    body = b"WEBP" + kind.encode() + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


PNG_1024 = b64(png(1024, 1024))


def wav(seconds: float, byte_rate: int = 32_000) -> bytes:
    data = bytes(int(seconds * byte_rate))
    fmt = struct.pack("<HHIIHH", 1, 1, byte_rate // 2, byte_rate, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


PDF = (
    b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
    b"2 0 obj << /Type /Pages /Kids [3 0 R 4 0 R 5 0 R] /Count 3 >> endobj\n"
    b"3 0 obj << /Type /Page /Parent 2 0 R >> endobj\n"
    b"4 0 obj << /Type/Page/Parent 2 0 R >> endobj\n"
    b"5 0 obj <</Type /Page /Parent 2 0 R>> endobj\n%%EOF\n"
)


# =========================================================================== build


def body_of(request: ChatRequest, *, stream: bool = False) -> dict[str, Any]:
    wire = OPENAI.build(
        request, base_url="https://api.openai.com/v1", secret=SECRET, stream=stream, headers={}
    )
    decoded: dict[str, Any] = msgspec.json.decode(wire.body)
    return decoded


def user(*parts: Any, **fields: Any) -> ChatRequest:
    return ChatRequest(model="gpt-4o", messages=[Message("user", list(parts))], **fields)


def test_content_parts_in_openai_shapes() -> None:
    audio = b64(wav(0.01))
    body = body_of(
        user(
            TextPart(text="What is in these?", cache_control={"type": "ephemeral"}),
            ImagePart(url="https://example.com/cat.png", detail="high"),
            ImagePart(data=PNG_1024),  # no media type: sniffed from the bytes
            ImagePart(data="AAAA", media_type="image/webp", detail="low"),
            ImagePart(url="data:image/gif;base64,R0lGODlh"),  # a data URL as it is
            FilePart(data=b64(PDF), filename="report.pdf"),
            FilePart(data=b64(b"plain"), media_type="text/plain"),
            FilePart(file_id="file-abc123"),
            AudioPart(data=audio, format="wav"),
        )
    )
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},  # cache_control is not sent
                {
                    "type": "image_url",
                    "image_url": {"url": "https://example.com/cat.png", "detail": "high"},
                },
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_1024}"}},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/webp;base64,AAAA", "detail": "low"},
                },
                {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGODlh"}},
                {
                    "type": "file",
                    "file": {
                        "file_data": f"data:application/pdf;base64,{b64(PDF)}",
                        "filename": "report.pdf",
                    },
                },
                {"type": "file", "file": {"file_data": f"data:text/plain;base64,{b64(b'plain')}"}},
                {"type": "file", "file": {"file_id": "file-abc123"}},
                {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
            ],
        }
    ]


@pytest.mark.parametrize(
    ("raw", "media_type"),
    [
        (png(2, 2), "image/png"),
        (jpeg(2, 2), "image/jpeg"),
        (gif(2, 2), "image/gif"),
        (webp(2, 2, "VP8L"), "image/webp"),
    ],
    ids=["png", "jpeg", "gif", "webp"],
)
def test_image_media_type_is_sniffed_when_not_given(raw: bytes, media_type: str) -> None:
    [message] = body_of(user(ImagePart(data=b64(raw))))["messages"]
    assert message["content"][0]["image_url"]["url"].startswith(f"data:{media_type};base64,")


def test_parts_in_tool_and_system_messages_and_string_content_unchanged() -> None:
    request = ChatRequest(
        model="m",
        messages=[
            Message("system", [TextPart(text="Be terse.")]),
            Message("user", "plain"),
            Message("tool", [TextPart(text='{"ok": true}')], tool_call_id="c1"),
        ],
    )
    assert body_of(request)["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": "plain"},
        {
            "role": "tool",
            "tool_call_id": "c1",
            "content": [{"type": "text", "text": '{"ok": true}'}],
        },
    ]


@pytest.mark.parametrize(
    "part",
    [
        FilePart(url="https://example.com/report.pdf"),
        FilePart(filename="nothing.pdf"),
        ImagePart(detail="low"),
    ],
)
def test_parts_openai_cannot_take_are_a_clear_bad_request(part: Any) -> None:
    with pytest.raises(ProviderError) as info:
        body_of(user(part))
    assert info.value.kind == "bad_request"
    assert info.value.message.startswith("openai: ")


def test_every_native_field_is_sent_under_its_openai_name() -> None:
    schema = {
        "name": "answer",
        "strict": True,
        "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
    }
    body = body_of(
        user(
            TextPart(text="hi"),
            response_format=ResponseFormat(type="json_schema", json_schema=schema),
            seed=42,
            n=3,
            frequency_penalty=0.5,
            presence_penalty=-0.25,
            logprobs=True,
            top_logprobs=4,
            logit_bias={"50256": -100.0},
            user="end-user-7",
            parallel_tool_calls=False,
            reasoning_effort="low",
            service_tier="flex",
            prediction={"type": "content", "content": "draft"},
            max_tokens=99,
        )
    )
    assert body["response_format"] == {"type": "json_schema", "json_schema": schema}
    assert {k: body[k] for k in body if k not in ("model", "messages", "response_format")} == {
        "seed": 42,
        "n": 3,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.25,
        "logprobs": True,
        "top_logprobs": 4,
        "logit_bias": {"50256": -100.0},
        "user": "end-user-7",
        "parallel_tool_calls": False,
        "reasoning_effort": "low",
        "service_tier": "flex",
        "prediction": {"type": "content", "content": "draft"},
        "max_tokens": 99,  # max_tokens, as before: every compatible server reads it
    }
    assert body_of(user(TextPart(text="hi"), response_format=ResponseFormat(type="json_object")))[
        "response_format"
    ] == {"type": "json_object"}


def test_unset_fields_are_not_sent() -> None:
    assert set(body_of(user(TextPart(text="hi")))) == {"model", "messages"}
    # A caller's explicit False is a value and is sent.
    assert body_of(user(TextPart(text="hi"), logprobs=False))["logprobs"] is False


def test_extra_is_merged_last_but_never_replaces_model_messages_or_stream() -> None:
    extra = {
        "model": "other",
        "messages": [],
        "stream": False,
        "stream_options": {"include_usage": False},
        "temperature": 0.9,
        "top_k": 20,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    request = ChatRequest(model="m", messages=[Message("user", "hi")], temperature=0.1, extra=extra)
    body = body_of(request, stream=True)
    assert body["model"] == "m"
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.9  # the caller's extra wins over a known field
    assert body["top_k"] == 20
    assert body["chat_template_kwargs"] == {"enable_thinking": False}


def test_assistant_reasoning_is_not_sent_back() -> None:
    request = ChatRequest(
        model="deepseek-reasoner",
        messages=[
            Message("user", "2+2?"),
            Message("assistant", "4", reasoning="Adding two and two."),
            Message("user", "And 3+3?"),
        ],
    )
    [_, assistant, _] = body_of(request)["messages"]
    assert assistant == {"role": "assistant", "content": "4"}


def test_n_above_one_cannot_be_streamed() -> None:
    with pytest.raises(ProviderError) as info:
        body_of(user(TextPart(text="hi"), n=2), stream=True)
    assert info.value.kind == "bad_request"
    assert "n > 1" in info.value.message
    assert body_of(user(TextPart(text="hi"), n=1), stream=True)["n"] == 1


# =========================================================================== parse

LOGPROBS = {
    "content": [{"token": "Hi", "logprob": -0.01, "bytes": [72, 105], "top_logprobs": []}],
    "refusal": None,
}


def completion(*choices: dict[str, Any], **fields: Any) -> bytes:
    return js(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o-2024-08-06",
            "choices": list(choices),
            **fields,
        }
    )


def test_parse_reasoning_refusal_fingerprint_logprobs_and_usage_details() -> None:
    body = completion(
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hi",
                "reasoning_content": "The user greets me.",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": LOGPROBS,
            "finish_reason": "stop",
        },
        system_fingerprint="fp_abc",
        service_tier="default",
        usage={
            "prompt_tokens": 2006,
            "completion_tokens": 300,
            "total_tokens": 2306,
            "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 256, "audio_tokens": 0},
        },
    )
    response = OPENAI.parse(200, {}, body)
    assert response.content == "Hi"
    assert response.reasoning == "The user greets me."
    assert response.refusal is None
    assert response.system_fingerprint == "fp_abc"
    assert response.logprobs == LOGPROBS
    assert response.choices is None  # one choice: the response is it
    assert response.provider_fields == {"service_tier": "default"}
    assert response.usage == Usage(
        prompt_tokens=2006,
        completion_tokens=300,
        total_tokens=2306,
        cached_tokens=1920,
        reasoning_tokens=256,
    )


def test_parse_reasoning_under_the_name_reasoning_and_deepseek_cache_hits() -> None:
    body = completion(
        {"message": {"content": "4", "reasoning": "2+2 is 4."}, "finish_reason": "stop"},
        usage={
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "prompt_cache_hit_tokens": 8,
            "prompt_cache_miss_tokens": 2,
        },
    )
    response = OPENAI.parse(200, {}, body)
    assert response.reasoning == "2+2 is 4."
    assert response.usage.cached_tokens == 8
    # A non-string `reasoning` (some servers send objects) is not reasoning text.
    odd = completion({"message": {"content": "x", "reasoning": {"effort": "low"}}})
    assert OPENAI.parse(200, {}, odd).reasoning is None


def test_a_refusal_is_an_answer_not_an_error() -> None:
    body = completion(
        {
            "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."},
            "finish_reason": "stop",
        }
    )
    response = OPENAI.parse(200, {}, body)
    assert response.content == ""
    assert response.refusal == "I can't help with that."
    assert response.finish_reason == "stop"
    withheld = completion({"message": {"content": None}, "finish_reason": "content_filter"})
    with pytest.raises(ProviderError) as info:
        OPENAI.parse(200, {}, withheld)
    assert info.value.kind == "content_filter"


def test_n_choices_are_all_carried_and_the_first_fills_the_response() -> None:
    body = completion(
        {
            "index": 1,
            "message": {
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_9",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{}"},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        },
        {
            "index": 0,
            "message": {"content": "Hello", "reasoning_content": "first"},
            "logprobs": LOGPROBS,
            "finish_reason": "length",
        },
        usage={"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12},
    )
    response = OPENAI.parse(200, {}, body)
    assert response.choices == [
        Choice(
            index=0, content="Hello", finish_reason="length", reasoning="first", logprobs=LOGPROBS
        ),
        Choice(
            index=1,
            content="",
            finish_reason="tool_calls",
            tool_calls=[response.choices[1].tool_calls[0]],
        ),
    ]
    assert response.choices[1].tool_calls[0].id == "call_9"
    assert (response.content, response.finish_reason, response.reasoning) == (
        "Hello",
        "length",
        "first",
    )
    assert response.logprobs == LOGPROBS


def test_a_choice_without_a_message_is_malformed() -> None:
    body = completion({"message": {"content": "a"}}, {"index": 1, "finish_reason": "stop"})
    with pytest.raises(ProviderError) as info:
        OPENAI.parse(200, {}, body)
    assert info.value.kind == "transient"


# =========================================================================== streams


def feed(*payloads: Any) -> list[StreamChunk]:
    decoder = OPENAI.stream_decoder()
    chunks: list[StreamChunk] = []
    for payload in payloads:
        data = payload if isinstance(payload, str) else js(payload).decode()
        chunks += decoder.feed(SseEvent(data=data))
    assert decoder.done
    return chunks


def delta(d: dict[str, Any], finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "system_fingerprint": "fp_stream",
        "choices": [{"index": 0, "delta": d, "finish_reason": finish, **fields}],
    }


def test_stream_reasoning_refusal_logprobs_fingerprint_and_usage_details() -> None:
    chunks = feed(
        delta({"role": "assistant", "content": None, "reasoning_content": ""}),
        delta({"content": None, "reasoning_content": "Think"}),
        delta({"reasoning": "ing."}),  # the other name some servers use
        delta({"content": "Hi"}, logprobs=LOGPROBS),
        delta({"refusal": "No."}),
        delta({}, "stop"),
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 50,
                "completion_tokens": 20,
                "total_tokens": 70,
                "prompt_tokens_details": {"cached_tokens": 32},
                "completion_tokens_details": {"reasoning_tokens": 12},
            },
        },
        "[DONE]",
    )
    assert "".join(c.reasoning for c in chunks) == "Thinking."
    assert "".join(c.text for c in chunks) == "Hi"
    assert "".join(c.refusal for c in chunks) == "No."
    assert [c.logprobs for c in chunks if c.logprobs is not None] == [LOGPROBS]
    assert chunks[0].provider_fields == {"system_fingerprint": "fp_stream"}
    assert all(c.provider_fields is None for c in chunks[1:])
    assert chunks[-1].usage == Usage(
        prompt_tokens=50,
        completion_tokens=20,
        total_tokens=70,
        cached_tokens=32,
        reasoning_tokens=12,
    )
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]


def test_stream_usage_on_the_finish_chunk_keeps_its_fields() -> None:
    [chunk] = feed(
        {
            "choices": [{"index": 0, "delta": {"reasoning_content": "r"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        },
        "[DONE]",
    )
    assert (chunk.reasoning, chunk.finish_reason) == ("r", "stop")
    assert chunk.usage == Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)


def test_stream_choice_other_than_zero_is_a_clear_error() -> None:
    decoder = OPENAI.stream_decoder()
    assert decoder.feed(SseEvent(data=js(delta({"content": "a"})).decode()))
    second = {"choices": [{"index": 1, "delta": {"content": "b"}, "finish_reason": None}]}
    with pytest.raises(ProviderError) as info:
        decoder.feed(SseEvent(data=js(second).decode()))
    assert info.value.kind == "bad_request"
    assert "choice 1" in info.value.message


# =========================================================================== emulator


def test_emulator_parses_every_part_type() -> None:
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look at"},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/png;base64,{PNG_1024}"},
                    },
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://x.test/a.jpg", "detail": "low"},
                    },
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}},
                    {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}},
                    {"type": "file", "file": {"file_id": "file-1"}},
                    {"type": "text", "text": "these"},
                ],
            }
        ],
    }
    parsed = parse_openai(body)
    assert parsed.last_user_text == "look at\nthese"


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image", "source": {}},
        {"type": "image_url", "image_url": {"url": "ftp://x/a.png"}},
        {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "max"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA"}},
        {"type": "file", "file": {"file_data": "JVBERi0"}},
        {"type": "file", "file": {}},
        {"type": "text"},
    ],
)
def test_emulator_refuses_malformed_parts(part: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        parse_openai({"model": "m", "messages": [{"role": "user", "content": [part]}]})


def test_emulator_refuses_reasoning_content_in_input_messages() -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "4", "reasoning_content": "r"},
    ]
    with pytest.raises(BadRequest):
        parse_openai({"model": "m", "messages": messages})


def test_emulator_renders_reasoning_content_and_usage_details() -> None:
    parsed = parse_openai(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    usage = Usage(
        prompt_tokens=9, completion_tokens=4, total_tokens=13, cached_tokens=5, reasoning_tokens=2
    )
    answer = build_answer(parsed, Fault(reasoning="deep thought", usage=usage))
    message = openai_json(answer, "m")["choices"][0]["message"]
    assert message["reasoning_content"] == "deep thought"
    assert message["content"] == "echo: hi"
    rendered = openai_json(answer, "m")["usage"]
    assert rendered["prompt_tokens_details"]["cached_tokens"] == 5
    assert rendered["completion_tokens_details"]["reasoning_tokens"] == 2
    frames = [msgspec.json.decode(f.data) for f in openai_frames(answer, "m", True)[:-1]]
    deltas = [f["choices"][0]["delta"] for f in frames if f["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "deep thought"
    assert "".join(d.get("content") or "" for d in deltas) == "echo: hi"
    plain = build_answer(parsed, None)
    assert "reasoning_content" not in openai_json(plain, "m")["choices"][0]["message"]
    assert "prompt_tokens_details" not in openai_json(plain, "m")["usage"]


# =========================================================================== end to end


@asynccontextmanager
async def rig() -> AsyncIterator[tuple[Emulator, Router]]:
    async with Emulator.serve(port=0) as emu:
        config = RouterConfig.from_dict(
            {
                "router": {
                    "timeout": 5.0,
                    "attempt_timeout": 2.0,
                    "first_token_timeout": 2.0,
                    "idle_timeout": 2.0,
                    "retry_backoff": [0.01],
                    "retry_jitter": 0.0,
                },
                "providers": [
                    {
                        "name": "p",
                        "kind": "openai",
                        "base_url": f"{emu.url}/v1",
                        "keys": [{"id": "a", "secret": SECRET}],
                    }
                ],
                "models": [{"name": "main", "provider": "p", "upstream": UP}],
            }
        )
        async with Router.open(config) as router:
            yield emu, router
        assert emu.errors == []


def ask(*content: Any, **fields: Any) -> ChatRequest:
    parts = content[0] if len(content) == 1 and isinstance(content[0], str) else list(content)
    return ChatRequest(model="main", messages=[Message("user", parts)], **fields)


async def streamed(router: Router, request: ChatRequest) -> list[StreamChunk]:
    chunks: list[StreamChunk] = []
    async with router.stream(request) as stream:
        async for chunk in stream:
            chunks.append(chunk)
    return chunks


async def test_e2e_image_part_arrives_as_image_url_with_a_data_url() -> None:
    async with rig() as (emu, router):
        response = await router.submit(
            ask(TextPart(text="describe"), ImagePart(data=PNG_1024, detail="low"))
        )
        assert response.content == "echo: describe"
        [call] = emu.calls
        assert call.body["messages"][0]["content"] == [
            {"type": "text", "text": "describe"},
            {
                "type": "image_url",
                "image_url": {"url": f"data:image/png;base64,{PNG_1024}", "detail": "low"},
            },
        ]


async def test_e2e_files_audio_native_fields_and_unknown_extra_fields_arrive_unchanged() -> None:
    extra = {"top_k": 40, "chat_template_kwargs": {"enable_thinking": True}, "min_p": 0.05}
    async with rig() as (emu, router):
        await router.submit(
            ask(
                TextPart(text="summarise"),
                FilePart(data=b64(PDF), filename="r.pdf"),
                AudioPart(data=b64(wav(0.01)), format="wav"),
                extra=extra,
                seed=3,
                response_format=ResponseFormat(type="json_object"),
                reasoning_effort="high",
                user="u-1",
            )
        )
        [call] = emu.calls
        body = call.body
        assert {k: body[k] for k in extra} == extra
        assert (body["seed"], body["reasoning_effort"], body["user"]) == (3, "high", "u-1")
        assert body["response_format"] == {"type": "json_object"}
        kinds = [p["type"] for p in body["messages"][0]["content"]]
        assert kinds == ["text", "file", "input_audio"]


async def test_e2e_reasoning_comes_back_plain_and_streamed() -> None:
    async with rig() as (emu, router):
        emu.script(Fault(reasoning="Let me think step by step."))
        response = await router.submit(ask("hi"))
        assert response.reasoning == "Let me think step by step."
        assert response.content == "echo: hi"
        emu.script(Fault(reasoning="Let me think step by step."))
        chunks = await streamed(router, ask("hi"))
        assert "".join(c.reasoning for c in chunks) == "Let me think step by step."
        assert "".join(c.text for c in chunks) == "echo: hi"
        # The assistant turn goes back without its reasoning: the emulator, like
        # DeepSeek, refuses reasoning_content in input messages.
        follow = ChatRequest(
            model="main",
            messages=[
                Message("user", "hi"),
                Message("assistant", response.content, reasoning=response.reasoning),
                Message("user", "more"),
            ],
        )
        assert (await router.submit(follow)).content == "echo: more"


async def test_e2e_n_two_gives_two_choices() -> None:
    body = {
        "id": "chatcmpl-n",
        "object": "chat.completion",
        "model": UP,
        "system_fingerprint": "fp_n",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "one"},
                "finish_reason": "stop",
            },
            {
                "index": 1,
                "message": {"role": "assistant", "content": "two"},
                "finish_reason": "stop",
            },
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
    }
    async with rig() as (emu, router):
        emu.script(Fault(body=body))
        response = await router.submit(ask("hi", n=2))
        assert emu.calls[0].body["n"] == 2
        assert type(response) is ChatResponse
        assert response.choices is not None
        assert [(c.index, c.content) for c in response.choices] == [(0, "one"), (1, "two")]
        assert response.content == "one"
        assert response.system_fingerprint == "fp_n"


async def test_e2e_cached_and_reasoning_token_counts_plain_and_streamed() -> None:
    usage = Usage(
        prompt_tokens=1200, completion_tokens=80, total_tokens=1280, cached_tokens=1024,
        reasoning_tokens=64,
    )  # fmt: skip
    async with rig() as (emu, router):
        emu.script(Fault(usage=usage))
        response = await router.submit(ask("hi"))
        assert response.usage == usage
        emu.script(Fault(usage=usage))
        chunks = await streamed(router, ask("hi"))
        assert [c.usage for c in chunks if c.usage is not None] == [usage]


async def test_e2e_refusal_and_logprobs() -> None:
    body = {
        "model": UP,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "refusal": "I can't."},
                "logprobs": LOGPROBS,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
    }
    async with rig() as (emu, router):
        emu.script(Fault(body=body))
        response = await router.submit(ask("hi", logprobs=True))
        assert (response.refusal, response.logprobs) == ("I can't.", LOGPROBS)
        emu.script(
            Fault(
                raw_stream=[
                    js(delta({"refusal": "I can't."}, logprobs=LOGPROBS)).decode(),
                    js(delta({}, "stop")).decode(),
                    "[DONE]",
                ]
            )
        )
        chunks = await streamed(router, ask("hi", logprobs=True))
        assert "".join(c.refusal for c in chunks) == "I can't."
        assert [c.logprobs for c in chunks if c.logprobs is not None] == [LOGPROBS]


# =========================================================================== token counts

offline = OfflineTokenCounter()


@pytest.fixture(autouse=True)
def _loaded_encoding() -> None:
    get_encoding()


@pytest.mark.parametrize(
    ("width", "height", "detail", "tokens"),
    [
        (1024, 1024, "high", 765),  # shrunk to 768 x 768: 4 tiles
        (2048, 4096, "high", 1105),  # 1024 x 2048, then 768 x 1536: 6 tiles
        (512, 512, "auto", 255),  # one tile
        (513, 500, None, 425),  # two tiles; small images are not enlarged
        (4096, 8192, "high", 1105),
        (5000, 1000, "high", 765),  # 2048 x 409: 4 x 1 tiles
        (2048, 768, "high", IMAGE_UNKNOWN_TOKENS),  # 8 tiles: the most there is
        (4000, 3000, "low", 85),
    ],
)
def test_image_tokens_follow_openais_rule(
    width: int, height: int, detail: str | None, tokens: int
) -> None:
    assert image_tokens(width, height, detail) == tokens


def test_no_image_costs_more_than_the_unknown_image_estimate() -> None:
    sizes = [1, 300, 511, 512, 513, 767, 768, 769, 1024, 1536, 2048, 3000, 9000]
    worst = max(image_tokens(w, h) for w in sizes for h in sizes)
    assert worst == IMAGE_UNKNOWN_TOKENS == 1445


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        (png(1920, 1080), (1920, 1080)),
        (gif(640, 421), (640, 421)),
        (jpeg(720, 477), (720, 477)),
        (jpeg(4032, 3024, app_bytes=150_000), (4032, 3024)),  # frame header far in
        (jpeg(800, 600, marker=0xC2), (800, 600)),  # progressive
        (webp(1000, 500, "VP8 "), (1000, 500)),
        (webp(1000, 500, "VP8L"), (1000, 500)),
        (webp(16383, 9000, "VP8X"), (16383, 9000)),
    ],
    ids=[
        "png",
        "gif",
        "jpeg",
        "jpeg-exif",
        "jpeg-progressive",
        "webp-vp8",
        "webp-vp8l",
        "webp-vp8x",
    ],
)
def test_image_size_from_header_bytes(raw: bytes, size: tuple[int, int]) -> None:
    assert image_size(b64(raw)) == size


@pytest.mark.parametrize(
    "data",
    [
        "",
        "not base64 at all!",
        b64(b"BM" + bytes(60)),  # a BMP: not read
        b64(png(10, 10)[:20]),  # cut inside the header
        b64(b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + bytes(10)),  # no frame header
        b64(png(0, 10)),
    ],
    ids=["empty", "not-base64", "bmp", "cut-png", "jpeg-without-frame", "zero-width"],
)
def test_unreadable_image_size_is_none(data: str) -> None:
    assert image_size(data) is None


def test_image_size_decodes_only_the_header() -> None:
    # A 3 MB JPEG whose frame header follows 150 kB of metadata: found without
    # decoding the rest (the tail is not even valid base64).
    data = b64(jpeg(3000, 2000, app_bytes=150_000)) + "!" * 4_000_000
    assert image_size(data) == (3000, 2000)


async def counted(*content: Any) -> PromptCount:
    message = Message("user", list(content))
    count = await offline.count_prompt("m", [message])
    assert await offline.count_messages("m", [message]) == count.tokens
    return count


async def text_only(text: str) -> int:
    return await offline.count_messages("m", [Message("user", text)])


async def test_count_image_parts_by_the_rule() -> None:
    base = await text_only("Hello, world!")
    assert await counted(TextPart(text="Hello, world!"), ImagePart(data=PNG_1024)) == (
        base + 765,
        0,
    )
    # A data URL in `url`, and low detail (no size needed).
    data_url = f"data:image/png;base64,{b64(png(2048, 4096))}"
    assert await counted(TextPart(text="Hello, world!"), ImagePart(url=data_url)) == (
        base + 1105,
        0,
    )
    low = ImagePart(url="https://example.com/x.png", detail="low")
    assert await counted(TextPart(text="Hello, world!"), low) == (base + 85, 0)


async def test_text_parts_count_like_string_content() -> None:
    parts = await counted(TextPart(text="Hello, "), TextPart(text="world!"))
    assert parts == (await text_only("Hello, world!"), 0)


async def test_unreadable_images_are_over_estimated_and_marked() -> None:
    base = await text_only("")
    by_url = ImagePart(url="https://example.com/cat.png")
    assert await counted(by_url) == (base + IMAGE_UNKNOWN_TOKENS, 1)
    bmp = ImagePart(data=b64(b"BM" + bytes(60)), media_type="image/bmp", detail="high")
    assert await counted(by_url, bmp) == (base + 2 * IMAGE_UNKNOWN_TOKENS, 2)


async def test_files_and_audio_are_estimated_and_marked() -> None:
    base = await text_only("")
    encoding = get_encoding()
    pdf = FilePart(data=b64(PDF), filename="report.pdf")
    name = len(encoding.encode("report.pdf"))
    assert await counted(pdf) == (base + name + 3 * FILE_PAGE_TOKENS, 1)  # 3 page objects
    text = "The quick brown fox jumps over the lazy dog. " * 20
    assert await counted(FilePart(data=b64(text.encode()))) == (
        base + len(encoding.encode(text)),
        1,
    )
    assert await counted(FilePart(file_id="file-1")) == (base + FILE_PAGE_TOKENS, 1)
    blob = bytes(range(256)) * 40  # 10,240 bytes of binary
    assert await counted(FilePart(data=b64(blob))) == (base + 10_240 // 4, 1)
    # WAV: the duration from the header's byte rate; mp3: from the size at a low rate.
    two_seconds = wav(2.0, byte_rate=32_000)
    tokens = -(-len(two_seconds) * AUDIO_TOKENS_PER_SECOND // 32_000)
    assert tokens == 21  # 2 s and a 44-byte header
    assert await counted(AudioPart(data=b64(two_seconds), format="wav")) == (base + tokens, 1)
    mp3 = bytes(AUDIO_BYTES_PER_SECOND * 3)
    assert await counted(AudioPart(data=b64(mp3), format="mp3")) == (
        base + 3 * AUDIO_TOKENS_PER_SECOND,
        1,
    )


async def test_plain_string_content_never_touches_the_parts_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(*args: Any) -> int:
        raise AssertionError("parts path taken for string content")

    monkeypatch.setattr(tokens_module, "_count_parts", boom)
    assert await text_only("Hello, world!") == 11
    assert await offline.count_prompt("m", [Message("user", "Hello, world!")]) == (11, 0)


async def test_large_inline_files_are_counted_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = FilePart(data=b64(bytes(200_000)))
    assert tokens_module._size([Message("user", [big])], None) > tokens_module.THREAD_THRESHOLD
    calls: list[int] = []
    real = tokens_module.trio.to_thread.run_sync

    async def spy(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(tokens_module.trio.to_thread, "run_sync", spy)
    count = await offline.count_prompt("m", [Message("user", [big])])
    assert calls == [1]
    assert count.estimated == 1


def test_strict_tools_keep_their_strict_flag() -> None:
    from router import Tool

    request = ChatRequest(
        model="gpt-4o",
        messages=[Message("user", "hi")],
        tools=[Tool(name="f", parameters={"type": "object"}, strict=True), Tool(name="g")],
    )
    tools = body_of(request)["tools"]
    assert tools[0]["function"]["strict"] is True
    assert "strict" not in tools[1]["function"]
