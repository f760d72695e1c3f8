"""Request fidelity on the Anthropic Messages protocol (issue 12): content parts,
cache_control, structured outputs, reasoning and thinking blocks, metadata, tool
choice, service tier, stop sequences, cache usage, and the spend-limit 429.

Sans-IO tests call `AnthropicProtocol` directly; the end-to-end ones run a real
`Router` over loopback sockets to the provider emulator.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest

from router import ChatRequest, Message, Router, RouterConfig, StreamChunk, Tool, ToolCall
from router._anthropic import (
    DEFAULT_MAX_TOKENS,
    EFFORT_BUDGETS,
    JSON_TOOL,
    AnthropicProtocol,
)
from router._classify import classify_failure
from router._errors import ProviderError
from router._types import (
    FilePart,
    ImagePart,
    ResponseFormat,
    TextPart,
    ThinkingBlock,
    Usage,
)
from router._wire import SseEvent
from router.emulator import Emulator, Fault
from router.emulator._protocols import (
    Answer,
    BadRequest,
    anthropic_frames,
    anthropic_json,
    anthropic_signature,
    parse_anthropic,
)

ANTHROPIC = AnthropicProtocol()
SECRET = "sk-ant-TEST-0123456789"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 8).decode()
PDF = base64.b64encode(b"%PDF-1.7 tiny").decode()
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "temp_c": {"type": "number"}},
    "required": ["city", "temp_c"],
    "additionalProperties": False,
}
WEATHER = Tool(
    name="get_weather",
    description="Current weather",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)
EPHEMERAL = {"type": "ephemeral"}


def js(value: Any) -> bytes:
    return msgspec.json.encode(value)


def request(*messages: Message, model: str = "claude-x", **fields: Any) -> ChatRequest:
    return ChatRequest(model=model, messages=list(messages or [Message("user", "hi")]), **fields)


def body(req: ChatRequest, *, stream: bool = False) -> dict[str, Any]:
    wire = ANTHROPIC.build(
        req, base_url="https://api.anthropic.com", secret=SECRET, stream=stream, headers={}
    )
    decoded: dict[str, Any] = msgspec.json.decode(wire.body)
    return decoded


def refused(req: ChatRequest, *words: str) -> str:
    with pytest.raises(ProviderError) as info:
        body(req)
    assert info.value.kind == "bad_request"
    for word in words:
        assert word in info.value.message
    return info.value.message


def answer(**fields: Any) -> bytes:
    message = {"type": "message", "role": "assistant", "model": "claude-x", "content": []}
    message.update(fields)
    return js(message)


def sse(*events: tuple[str, dict[str, Any]]) -> list[StreamChunk]:
    decoder = ANTHROPIC.stream_decoder()
    chunks: list[StreamChunk] = []
    for name, data in events:
        chunks += decoder.feed(SseEvent(event=name, data=js({"type": name, **data}).decode()))
    assert decoder.done
    return chunks


def start(index: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "content_block_start", {"index": index, "content_block": block}


def delta(index: int, value: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "content_block_delta", {"index": index, "delta": value}


def stop(index: int) -> tuple[str, dict[str, Any]]:
    return "content_block_stop", {"index": index}


def message_start(**usage: Any) -> tuple[str, dict[str, Any]]:
    usage = {"input_tokens": 10, "output_tokens": 1, **usage}
    return "message_start", {"message": {"type": "message", "content": [], "usage": usage}}


def message_end(
    stop_reason: str, output: int = 5, stop_sequence: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    return [
        (
            "message_delta",
            {
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": output},
            },
        ),
        ("message_stop", {}),
    ]


# ----------------------------------------------------------------------- 1. content parts


def test_image_parts_base64_url_data_url_and_sniffed_type() -> None:
    parts: list[Any] = [
        TextPart(text="What is in these?"),
        ImagePart(data=PNG, media_type="image/png"),
        ImagePart(url="https://example.com/cat.jpg", detail="high"),
        ImagePart(url=f"data:image/png;base64,{PNG}"),
        ImagePart(data=PNG),  # no media type: read from the PNG signature
    ]
    content = body(request(Message("user", parts)))["messages"][0]["content"]
    png = {"type": "base64", "media_type": "image/png", "data": PNG}
    assert content == [
        {"type": "text", "text": "What is in these?"},
        {"type": "image", "source": png},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "image", "source": png},
        {"type": "image", "source": png},
    ]


def test_an_inline_image_of_unknown_type_is_refused() -> None:
    raw = base64.b64encode(b"not an image").decode()
    refused(request(Message("user", [ImagePart(data=raw)])), "media_type")
    refused(request(Message("user", [ImagePart()])), "url or base64 data")


def test_file_parts_become_document_blocks() -> None:
    text = base64.b64encode(b"plain words").decode()
    parts: list[Any] = [
        FilePart(data=PDF, media_type="application/pdf", filename="report.pdf"),
        FilePart(data=PDF),  # a PDF by its signature
        FilePart(url="https://example.com/paper.pdf"),
        FilePart(data=text, media_type="text/plain", filename="notes.txt"),
        FilePart(file_id="file_011CNha8iCJcU1wXNR6q4V8w"),
        FilePart(url=f"data:application/pdf;base64,{PDF}"),
    ]
    content = body(request(Message("user", parts)))["messages"][0]["content"]
    pdf = {"type": "base64", "media_type": "application/pdf", "data": PDF}
    assert content == [
        {"type": "document", "source": pdf, "title": "report.pdf"},
        {"type": "document", "source": pdf},
        {"type": "document", "source": {"type": "url", "url": "https://example.com/paper.pdf"}},
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": "plain words"},
            "title": "notes.txt",
        },
        {
            "type": "document",
            "source": {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"},
        },
        {"type": "document", "source": pdf},
    ]


def test_unsupported_documents_are_refused() -> None:
    sheet = FilePart(data=PDF, media_type="application/vnd.ms-excel", filename="x.xls")
    refused(request(Message("user", [sheet])), "x.xls", "PDF")
    bad_text = FilePart(data="@@@", media_type="text/plain")
    refused(request(Message("user", [bad_text])), "not base64")


def test_cache_control_on_parts_messages_system_and_tool_results() -> None:
    class CachedTool(Tool, frozen=True, kw_only=True):
        cache_control: dict[str, Any] | None = None

    req = request(
        Message("system", "You are terse.", cache_control=EPHEMERAL),
        Message(
            "system",
            [TextPart(text="Long rules.", cache_control={"type": "ephemeral", "ttl": "1h"})],
        ),
        Message("user", [TextPart(text="Doc", cache_control=EPHEMERAL), TextPart(text="Q?")]),
        Message(
            "assistant", "", tool_calls=[ToolCall(id="t1", name="get_weather", arguments="{}")]
        ),
        Message("tool", "sunny", tool_call_id="t1", cache_control=EPHEMERAL),
        Message("user", "And now?", cache_control=EPHEMERAL),
        tools=[WEATHER, CachedTool(name="lookup", cache_control=EPHEMERAL)],
    )
    sent = body(req)
    assert sent["system"] == [
        {"type": "text", "text": "You are terse.", "cache_control": EPHEMERAL},
        {
            "type": "text",
            "text": "Long rules.",
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        },
    ]
    messages = sent["messages"]
    assert messages[0]["content"] == [
        {"type": "text", "text": "Doc", "cache_control": EPHEMERAL},
        {"type": "text", "text": "Q?"},
    ]
    assert messages[2]["content"] == [
        {
            "type": "tool_result",
            "tool_use_id": "t1",
            "content": "sunny",
            "cache_control": EPHEMERAL,
        },
        {"type": "text", "text": "And now?", "cache_control": EPHEMERAL},
    ]
    assert "cache_control" not in sent["tools"][0]
    assert sent["tools"][1]["cache_control"] == EPHEMERAL


def test_plain_system_stays_a_string_and_images_in_system_are_refused() -> None:
    sent = body(request(Message("system", "a"), Message("system", "b"), Message("user", "hi")))
    assert sent["system"] == "a\n\nb"
    assert sent["messages"] == [{"role": "user", "content": "hi"}]
    refused(
        request(Message("system", [ImagePart(data=PNG)]), Message("user", "hi")),
        "system prompt takes text only",
    )


def test_tool_results_with_parts_carry_blocks() -> None:
    req = request(
        Message("user", "Draw it"),
        Message("assistant", "", tool_calls=[ToolCall(id="t1", name="render", arguments="{}")]),
        Message("tool", [TextPart(text="done"), ImagePart(data=PNG)], tool_call_id="t1"),
    )
    result = body(req)["messages"][2]["content"][0]
    assert result["content"] == [
        {"type": "text", "text": "done"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
    ]


# ----------------------------------------------------------------------- 2. structured outputs


def json_schema(**extra: Any) -> ResponseFormat:
    return ResponseFormat(
        type="json_schema", json_schema={"name": "weather", "schema": SCHEMA, **extra}
    )


@pytest.mark.parametrize(
    "model",
    [
        "claude-sonnet-4-5-20250929",
        "claude-opus-4-6",
        "claude-haiku-4-5@20251001",
        "anthropic.claude-opus-4-5-20251101-v1:0",
    ],
)
def test_json_schema_uses_structured_outputs_where_documented(model: str) -> None:
    sent = body(request(model=model, response_format=json_schema(strict=True)))
    assert sent["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
    assert "tools" not in sent and "tool_choice" not in sent


@pytest.mark.parametrize("model", ["claude-3-7-sonnet-20250219", "claude-opus-4-1", "up-main"])
def test_json_schema_elsewhere_is_a_forced_tool(model: str) -> None:
    sent = body(request(model=model, response_format=json_schema(description="Today's weather")))
    assert "output_config" not in sent
    assert sent["tools"] == [
        {
            "name": JSON_TOOL,
            "description": "Give your whole answer as this tool's input (the weather object). "
            "Today's weather",
            "input_schema": SCHEMA,
        }
    ]
    assert sent["tool_choice"] == {"type": "tool", "name": JSON_TOOL}


def test_json_object_is_a_forced_tool_with_a_permissive_schema() -> None:
    sent = body(
        request(model="claude-sonnet-4-5", response_format=ResponseFormat(type="json_object"))
    )
    assert sent["tools"][0]["name"] == JSON_TOOL
    assert sent["tools"][0]["input_schema"] == {"type": "object", "additionalProperties": True}
    assert sent["tool_choice"] == {"type": "tool", "name": JSON_TOOL}


def test_json_tool_together_with_the_callers_tools() -> None:
    fmt = json_schema()
    sent = body(request(response_format=fmt, tools=[WEATHER]))
    assert [t["name"] for t in sent["tools"]] == ["get_weather", JSON_TOOL]
    assert sent["tool_choice"] == {"type": "any"}
    named = body(request(response_format=fmt, tools=[WEATHER], tool_choice="get_weather"))
    assert named["tool_choice"] == {"type": "tool", "name": "get_weather"}
    none = body(request(response_format=fmt, tools=[WEATHER], tool_choice="none"))
    assert none["tool_choice"] == {"type": "tool", "name": JSON_TOOL}
    native = body(request(model="claude-sonnet-4-6", response_format=fmt, tools=[WEATHER]))
    assert [t["name"] for t in native["tools"]] == ["get_weather"]
    assert "tool_choice" not in native and "format" in native["output_config"]


def test_json_tool_name_is_reserved_and_a_schema_is_required() -> None:
    refused(request(tools=[Tool(name=JSON_TOOL)]), "reserved")
    empty = ResponseFormat(type="json_schema", json_schema={"name": "x"})
    refused(request(response_format=empty), "json_schema.schema")


def test_text_response_format_changes_nothing() -> None:
    sent = body(request(response_format=ResponseFormat(type="text")))
    assert "tools" not in sent and "output_config" not in sent


def test_json_tool_answer_is_unwrapped_into_content() -> None:
    response = ANTHROPIC.parse(
        200,
        {},
        answer(
            content=[
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": JSON_TOOL,
                    "input": {"city": "Oslo", "temp_c": 3},
                }
            ],
            stop_reason="tool_use",
            usage={"input_tokens": 5, "output_tokens": 9},
        ),
    )
    assert msgspec.json.decode(response.content) == {"city": "Oslo", "temp_c": 3}
    assert response.finish_reason == "stop"
    assert response.tool_calls == []


def test_json_tool_next_to_a_real_tool_call() -> None:
    response = ANTHROPIC.parse(
        200,
        {},
        answer(
            content=[
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Oslo"},
                },
            ],
            stop_reason="tool_use",
        ),
    )
    assert response.finish_reason == "tool_calls"
    assert [c.name for c in response.tool_calls] == ["get_weather"]


def test_json_tool_stream_is_relayed_as_text() -> None:
    chunks = sse(
        message_start(),
        start(0, {"type": "tool_use", "id": "toolu_1", "name": JSON_TOOL, "input": {}}),
        delta(0, {"type": "input_json_delta", "partial_json": ""}),
        delta(0, {"type": "input_json_delta", "partial_json": '{"city": "Os'}),
        delta(0, {"type": "input_json_delta", "partial_json": 'lo", "temp_c": 3}'}),
        stop(0),
        *message_end("tool_use"),
    )
    assert "".join(c.text for c in chunks) == '{"city": "Oslo", "temp_c": 3}'
    assert not any(c.tool_calls for c in chunks)
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]


def test_json_tool_stream_without_arguments_says_an_empty_object() -> None:
    chunks = sse(
        message_start(),
        start(0, {"type": "tool_use", "id": "toolu_1", "name": JSON_TOOL, "input": {}}),
        stop(0),
        *message_end("tool_use"),
    )
    assert "".join(c.text for c in chunks) == "{}"


# ----------------------------------------------------------------------- 3. reasoning


@pytest.mark.parametrize(("effort", "budget"), sorted(EFFORT_BUDGETS.items()))
def test_reasoning_effort_is_a_thinking_budget(effort: str, budget: int) -> None:
    sent = body(request(reasoning_effort=effort))
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert sent["max_tokens"] == budget + DEFAULT_MAX_TOKENS
    assert "output_config" not in sent


def test_thinking_budget_fits_the_callers_max_tokens() -> None:
    sent = body(request(reasoning_effort="high", max_tokens=6000))
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 3000}
    assert sent["max_tokens"] == 6000
    small = body(request(reasoning_effort="medium", max_tokens=1500))
    assert small["thinking"]["budget_tokens"] == 1024 < small["max_tokens"]
    roomy = body(request(reasoning_effort="low", max_tokens=64000))
    assert roomy["thinking"]["budget_tokens"] == 2048
    refused(request(reasoning_effort="low", max_tokens=1024), "max_tokens above 1024")


@pytest.mark.parametrize(
    ("effort", "level"),
    [("minimal", "low"), ("low", "low"), ("medium", "medium"), ("high", "high")],
)
def test_claude_4_6_and_later_use_adaptive_thinking(effort: str, level: str) -> None:
    for model in ("claude-opus-4-6", "claude-sonnet-4-6", "claude-opus-4-7"):
        sent = body(request(model=model, reasoning_effort=effort, max_tokens=2000))
        assert sent["thinking"] == {"type": "adaptive"}
        assert sent["output_config"] == {"effort": level}
        assert sent["max_tokens"] == 2000


def test_adaptive_thinking_with_structured_outputs() -> None:
    sent = body(
        request(model="claude-sonnet-4-6", reasoning_effort="high", response_format=json_schema())
    )
    assert sent["output_config"] == {
        "format": {"type": "json_schema", "schema": SCHEMA},
        "effort": "high",
    }


def test_no_or_none_effort_sends_no_thinking() -> None:
    assert "thinking" not in body(request())
    sent = body(request(reasoning_effort="none", temperature=0.2))
    assert "thinking" not in sent and sent["temperature"] == 0.2
    assert sent["max_tokens"] == DEFAULT_MAX_TOKENS
    refused(request(reasoning_effort="extreme"), "'extreme'", "minimal")


def test_thinking_mode_constraints_are_refused_clearly() -> None:
    refused(request(reasoning_effort="low", temperature=0.2), "temperature 0.2", "temperature 1")
    assert body(request(reasoning_effort="low", temperature=1.0))["temperature"] == 1.0
    refused(request(reasoning_effort="low", top_p=0.5), "top_p 0.5")
    assert body(request(reasoning_effort="low", top_p=0.97))["top_p"] == 0.97
    refused(request(reasoning_effort="low", tools=[WEATHER], tool_choice="required"), "forced tool")
    refused(
        request(reasoning_effort="low", tools=[WEATHER], tool_choice="get_weather"), "forced tool"
    )
    refused(request(reasoning_effort="low", response_format=json_schema()), "forced tool")
    sent = body(request(reasoning_effort="low", tools=[WEATHER], tool_choice="auto"))
    assert sent["thinking"]["type"] == "enabled"


def signed(text: str = "Let me check.", sig: str = "EqQBCgIYAhIM") -> ThinkingBlock:
    return ThinkingBlock(text=text, signature=sig, protocol="anthropic")


def tool_loop(thinking: list[ThinkingBlock] | None) -> list[Message]:
    call = ToolCall(id="toolu_1", name="get_weather", arguments='{"city": "Oslo"}')
    return [
        Message("user", "Weather in Oslo?"),
        Message("assistant", "", tool_calls=[call], thinking=thinking, reasoning="Let me check."),
        Message("tool", "3 C", tool_call_id="toolu_1"),
    ]


def test_anthropic_thinking_blocks_go_back_first_in_the_assistant_turn() -> None:
    blocks = [signed(), ThinkingBlock(redacted="EmwKAhgBEgy", protocol="anthropic")]
    sent = body(request(*tool_loop(blocks), tools=[WEATHER], reasoning_effort="low"))
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert sent["messages"][1]["content"] == [
        {"type": "thinking", "thinking": "Let me check.", "signature": "EqQBCgIYAhIM"},
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy"},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
    ]


def test_other_protocols_and_unsigned_thinking_blocks_are_dropped() -> None:
    blocks = [
        ThinkingBlock(text="gemini thought", signature="c2ln", protocol="gemini"),
        ThinkingBlock(text="unsigned", protocol="anthropic"),
    ]
    sent = body(request(*tool_loop(blocks), tools=[WEATHER]))
    assert [b["type"] for b in sent["messages"][1]["content"]] == ["tool_use"]


def test_thinking_does_not_begin_in_the_middle_of_a_tool_use_turn() -> None:
    # The turn was served elsewhere (no Anthropic block to send back): no thinking now,
    # even with temperature set (thinking mode would refuse it).
    foreign = [ThinkingBlock(text="x", signature="y", protocol="openai")]
    sent = body(
        request(*tool_loop(foreign), tools=[WEATHER], reasoning_effort="high", temperature=0.3)
    )
    assert "thinking" not in sent and sent["temperature"] == 0.3
    # A new user turn after the loop: thinking again.
    later = [*tool_loop(foreign), Message("assistant", "3 C."), Message("user", "And Rome?")]
    assert (
        body(request(*later, tools=[WEATHER], reasoning_effort="high"))["thinking"]["type"]
        == "enabled"
    )


def test_thinking_answer_becomes_reasoning_and_thinking_blocks() -> None:
    response = ANTHROPIC.parse(
        200,
        {},
        answer(
            content=[
                {"type": "thinking", "thinking": "Step one. ", "signature": "sig-1"},
                {"type": "redacted_thinking", "data": "enc-2"},
                {"type": "thinking", "thinking": "Step two.", "signature": "sig-3"},
                {"type": "text", "text": "Answer."},
            ],
            stop_reason="end_turn",
        ),
    )
    assert response.content == "Answer."
    assert response.reasoning == "Step one. Step two."
    assert response.thinking == [
        ThinkingBlock(text="Step one. ", signature="sig-1", protocol="anthropic"),
        ThinkingBlock(redacted="enc-2", protocol="anthropic"),
        ThinkingBlock(text="Step two.", signature="sig-3", protocol="anthropic"),
    ]
    plain = ANTHROPIC.parse(200, {}, answer(content=[{"type": "text", "text": "x"}]))
    assert plain.reasoning is None and plain.thinking is None


def test_thinking_stream_relays_reasoning_and_the_signed_block() -> None:
    chunks = sse(
        message_start(),
        start(0, {"type": "thinking", "thinking": ""}),
        delta(0, {"type": "thinking_delta", "thinking": "Let me "}),
        delta(0, {"type": "thinking_delta", "thinking": "think."}),
        delta(0, {"type": "signature_delta", "signature": "EqQBCgIY"}),
        stop(0),
        start(1, {"type": "redacted_thinking", "data": "enc"}),
        stop(1),
        start(2, {"type": "text", "text": ""}),
        delta(2, {"type": "text_delta", "text": "Hi."}),
        stop(2),
        *message_end("end_turn"),
    )
    assert "".join(c.reasoning for c in chunks) == "Let me think."
    assert "".join(c.text for c in chunks) == "Hi."
    blocks = [b for c in chunks for b in c.thinking or ()]
    assert blocks == [
        ThinkingBlock(text="Let me think.", signature="EqQBCgIY", protocol="anthropic"),
        ThinkingBlock(redacted="enc", protocol="anthropic"),
    ]


def test_a_signature_delta_outside_a_thinking_block_is_malformed() -> None:
    decoder = ANTHROPIC.stream_decoder()
    event = {
        "type": "content_block_delta",
        "index": 3,
        "delta": {"type": "signature_delta", "signature": "x"},
    }
    with pytest.raises(ProviderError) as info:
        decoder.feed(SseEvent(event="content_block_delta", data=js(event).decode()))
    assert info.value.kind == "transient"


# ----------------------------------------------------------------------- 4. the other fields


def test_user_is_metadata_user_id() -> None:
    assert body(request(user="user-42"))["metadata"] == {"user_id": "user-42"}
    assert "metadata" not in body(request(metadata={"tenant": "x"}))


def test_parallel_tool_calls_false_disables_parallel_tool_use() -> None:
    assert body(request(tools=[WEATHER], parallel_tool_calls=False))["tool_choice"] == {
        "type": "auto",
        "disable_parallel_tool_use": True,
    }
    required = body(request(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False))
    assert required["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    none = body(request(tools=[WEATHER], tool_choice="none", parallel_tool_calls=False))
    assert none["tool_choice"] == {"type": "none"}
    assert "tool_choice" not in body(request(tools=[WEATHER], parallel_tool_calls=True))


@pytest.mark.parametrize(
    ("tier", "sent"),
    [("auto", "auto"), ("priority", "auto"), ("scale", "auto"), ("default", "standard_only")],
)
def test_service_tier_mapping(tier: str, sent: str) -> None:
    assert body(request(service_tier=tier))["service_tier"] == sent


def test_flex_service_tier_is_refused() -> None:
    refused(request(service_tier="flex"), "'flex'")


def test_stop_sequences_and_the_one_that_matched() -> None:
    assert body(request(stop=["END", "\n\n"]))["stop_sequences"] == ["END", "\n\n"]
    response = ANTHROPIC.parse(
        200,
        {},
        answer(
            content=[{"type": "text", "text": "a b"}],
            stop_reason="stop_sequence",
            stop_sequence="END",
        ),
    )
    assert (response.finish_reason, response.stop_sequence) == ("stop", "END")
    chunks = sse(
        message_start(),
        start(0, {"type": "text", "text": "a b"}),
        stop(0),
        *message_end("stop_sequence", stop_sequence="END"),
    )
    assert [c.stop_sequence for c in chunks if c.finish_reason] == ["END"]


def test_cache_usage_and_service_tier_in_answers() -> None:
    usage = {
        "input_tokens": 20,
        "output_tokens": 7,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 1000,
        "service_tier": "priority",
    }
    response = ANTHROPIC.parse(
        200, {}, answer(content=[{"type": "text", "text": "x"}], usage=usage)
    )
    assert response.usage == Usage(
        prompt_tokens=1120,
        completion_tokens=7,
        total_tokens=1127,
        cached_tokens=1000,
        cache_creation_tokens=100,
    )
    assert response.provider_fields == {"service_tier": "priority"}


def test_cache_usage_in_streams() -> None:
    chunks = sse(
        message_start(
            input_tokens=20, cache_creation_input_tokens=100, cache_read_input_tokens=1000
        ),
        start(0, {"type": "text", "text": "x"}),
        stop(0),
        *message_end("end_turn", output=7),
    )
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage == [
        Usage(
            prompt_tokens=1120,
            completion_tokens=7,
            total_tokens=1127,
            cached_tokens=1000,
            cache_creation_tokens=100,
        )
    ]


# ----------------------------------------------------------------------- 5. refusal (kept)


def test_refusal_is_content_filter() -> None:
    partial = answer(content=[{"type": "text", "text": "I can"}], stop_reason="refusal")
    assert ANTHROPIC.parse(200, {}, partial).finish_reason == "content_filter"
    with pytest.raises(ProviderError) as info:
        ANTHROPIC.parse(200, {}, answer(content=[], stop_reason="refusal"))
    assert info.value.kind == "content_filter"


# ----------------------------------------------------------------------- 6. emulator


def test_emulator_accepts_every_block_the_protocol_sends() -> None:
    blocks = [signed("Checked.", anthropic_signature("Checked."))]
    req = request(
        Message("system", [TextPart(text="Rules.", cache_control=EPHEMERAL)]),
        Message(
            "user",
            [
                TextPart(text="Look at these", cache_control=EPHEMERAL),
                ImagePart(data=PNG, media_type="image/png"),
                ImagePart(url="https://example.com/a.png"),
                FilePart(data=PDF, media_type="application/pdf"),
                FilePart(data=base64.b64encode(b"notes").decode(), media_type="text/plain"),
                FilePart(file_id="file_1"),
            ],
        ),
        Message(
            "assistant", "", tool_calls=[ToolCall(id="t1", name="get_weather")], thinking=blocks
        ),
        Message("tool", [TextPart(text="sunny"), ImagePart(data=PNG)], tool_call_id="t1"),
        tools=[WEATHER],
        reasoning_effort="low",
    )
    parsed = parse_anthropic(body(req), count=False)
    assert parsed.last_user_text == "Look at these"


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": "x"}},
            "media_type",
        ),
        ({"type": "document", "source": {"type": "url"}}, "url"),
        ({"type": "text", "text": "x", "cache_control": {"type": "forever"}}, "ephemeral"),
        ({"type": "video", "source": {}}, "does not match"),
        ({"type": "thinking", "thinking": "x"}, "signature"),
    ],
)
def test_emulator_rejects_malformed_blocks(block: dict[str, Any], message: str) -> None:
    role = "assistant" if block["type"] == "thinking" else "user"
    messages = [{"role": "user", "content": "hi"}, {"role": role, "content": [block]}]
    if role == "user":
        messages = messages[1:]
    with pytest.raises(BadRequest) as info:
        parse_anthropic({"model": "m", "max_tokens": 5, "messages": messages}, count=False)
    assert message in info.value.message


def test_emulator_checks_its_own_signatures() -> None:
    thinking = {"type": "thinking", "thinking": "changed", "signature": anthropic_signature("orig")}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [thinking, {"type": "text", "text": "x"}]},
        {"role": "user", "content": "again"},
    ]
    with pytest.raises(BadRequest) as info:
        parse_anthropic({"model": "m", "max_tokens": 5, "messages": messages}, count=False)
    assert "Invalid `signature`" in info.value.message


def test_emulator_renders_reasoning_as_a_signed_thinking_block() -> None:
    ans = Answer(
        "Hi.", [], "stop", None, Usage(prompt_tokens=1, completion_tokens=1), None, "Hmm, ok."
    )
    rendered = anthropic_json(ans, "claude-x")
    assert rendered["content"][0] == {
        "type": "thinking",
        "thinking": "Hmm, ok.",
        "signature": anthropic_signature("Hmm, ok."),
    }
    assert rendered["content"][1] == {"type": "text", "text": "Hi."}
    response = ANTHROPIC.parse(200, {}, js(rendered))
    assert response.reasoning == "Hmm, ok." and response.content == "Hi."
    decoder = ANTHROPIC.stream_decoder()
    chunks: list[StreamChunk] = []
    for frame in anthropic_frames(ans, "claude-x"):
        chunks += decoder.feed(SseEvent(event=frame.event or "message", data=frame.data.decode()))
    assert "".join(c.reasoning for c in chunks) == "Hmm, ok."
    assert [b for c in chunks for b in c.thinking or ()] == [
        ThinkingBlock(
            text="Hmm, ok.", signature=anthropic_signature("Hmm, ok."), protocol="anthropic"
        )
    ]


# ----------------------------------------------------------------------- 7. classification


def spend_limit_body() -> bytes:
    return js(
        {
            "type": "error",
            "error": {
                "type": "rate_limit_error",
                "message": "You have reached your organization's monthly usage limit.",
                "details": {"error_code": "enforced_spend_limit_reached"},
            },
        }
    )


def test_spend_limit_429_is_balance() -> None:
    error = ANTHROPIC.classify(429, {}, spend_limit_body(), 0.0)
    assert error.kind == "balance"
    assert "enforced_spend_limit_reached" in error.message
    plain = js(
        {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": "Too many requests per minute."},
        }
    )
    assert ANTHROPIC.classify(429, {"retry-after": "3"}, plain, 0.0).kind == "rate_limit"


def test_spend_limits_by_wording_are_balance() -> None:
    own_limit = (
        "You have reached your specified API usage limits. You will regain access on "
        "2025-09-01 at 00:00 UTC."
    )
    assert classify_failure(400, own_limit, {"invalid_request_error"}) == "balance"
    assert classify_failure(429, own_limit, {"rate_limit_error"}) == "balance"
    monthly = "Your workspace has exhausted its monthly spend limit."
    assert classify_failure(429, monthly, {"rate_limit_error"}) == "balance"
    period = "Quota exhausted for the current billing period."
    assert classify_failure(429, period, set()) == "balance"
    # Daily *request* quotas reset and say when: still rate limits.
    daily = (
        "Quota exceeded for metric: requests per day. Please check your plan and billing details."
    )
    assert classify_failure(429, daily, {"resource_exhausted"}) == "rate_limit"
    assert classify_failure(429, "x", {"organization_spend_limit_exceeded"}) == "balance"


def test_spend_limit_in_a_stream_is_balance() -> None:
    decoder = ANTHROPIC.stream_decoder()
    with pytest.raises(ProviderError) as info:
        decoder.feed(SseEvent(event="error", data=spend_limit_body().decode()))
    assert info.value.kind == "balance"


# ----------------------------------------------------------------------- end to end

UP = "up-main"


@asynccontextmanager
async def rig(upstream: str = UP) -> AsyncIterator[tuple[Emulator, Router]]:
    async with Emulator.serve(port=0) as emu:
        config = RouterConfig.from_dict(
            {
                "router": {
                    "timeout": 5.0,
                    "attempt_timeout": 1.0,
                    "first_token_timeout": 1.0,
                    "idle_timeout": 1.0,
                    "retry_backoff": [0.01],
                    "retry_jitter": 0.0,
                },
                "providers": [
                    {
                        "name": "p",
                        "kind": "anthropic",
                        "base_url": emu.url,
                        "keys": [{"id": "a", "secret": "sk-a-1"}, {"id": "b", "secret": "sk-b-2"}],
                    }
                ],
                "models": [{"name": "main", "provider": "p", "upstream": upstream}],
            }
        )
        async with Router.open(config) as router:
            yield emu, router
        assert emu.errors == []


async def test_e2e_image_reaches_the_upstream_as_an_image_block() -> None:
    async with rig() as (emu, router):
        parts: list[Any] = [
            TextPart(text="What is this?"),
            ImagePart(data=PNG, media_type="image/png"),
        ]
        response = await router.submit(ChatRequest(model="main", messages=[Message("user", parts)]))
        assert response.content == "echo: What is this?"
        content = emu.calls[0].body["messages"][0]["content"]
        assert content[1] == {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": PNG},
        }


async def test_e2e_json_schema_comes_back_as_json_content() -> None:
    call = ToolCall(id="toolu_9", name=JSON_TOOL, arguments='{"city": "Oslo", "temp_c": 3}')
    req = ChatRequest(
        model="main", messages=[Message("user", "Weather?")], response_format=json_schema()
    )
    async with rig() as (emu, router):
        emu.script([Fault(tool_calls=[call])] * 2)
        response = await router.submit(req)
        assert msgspec.json.decode(response.content) == {"city": "Oslo", "temp_c": 3}
        assert response.finish_reason == "stop" and response.tool_calls == []
        sent = emu.calls[0].body
        assert sent["tool_choice"] == {"type": "tool", "name": JSON_TOOL}
        assert sent["tools"][0]["input_schema"] == SCHEMA

        text = ""
        finish = None
        async with router.stream(req) as stream:
            async for chunk in stream:
                assert not chunk.tool_calls
                text += chunk.text
                finish = chunk.finish_reason or finish
        assert msgspec.json.decode(text) == {"city": "Oslo", "temp_c": 3}
        assert finish == "stop"


async def test_e2e_native_structured_output_request() -> None:
    async with rig("claude-sonnet-4-5") as (emu, router):
        emu.script(Fault(reply='{"city": "Oslo", "temp_c": 3}'))
        req = ChatRequest(
            model="main", messages=[Message("user", "Weather?")], response_format=json_schema()
        )
        response = await router.submit(req)
        assert msgspec.json.decode(response.content) == {"city": "Oslo", "temp_c": 3}
        assert emu.calls[0].body["output_config"]["format"]["schema"] == SCHEMA


async def test_e2e_thinking_round_trip() -> None:
    call = ToolCall(id="toolu_1", name="get_weather", arguments='{"city": "Oslo"}')
    first = ChatRequest(
        model="main",
        messages=[Message("user", "Weather in Oslo?")],
        tools=[WEATHER],
        reasoning_effort="low",
    )
    async with rig() as (emu, router):
        emu.script(Fault(reasoning="I should call the tool.", tool_calls=[call]))
        response = await router.submit(first)
        assert emu.calls[0].body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
        assert response.reasoning == "I should call the tool."
        assert response.finish_reason == "tool_calls"
        assert response.thinking is not None and response.thinking[0].signature
        follow_up = msgspec.structs.replace(
            first,
            messages=[
                *first.messages,
                Message(
                    "assistant",
                    response.content,
                    tool_calls=response.tool_calls,
                    thinking=response.thinking,
                    reasoning=response.reasoning,
                ),
                Message("tool", "3 C", tool_call_id="toolu_1"),
            ],
        )
        second = await router.submit(follow_up)
        assert second.finish_reason == "stop"
        assistant = emu.calls[1].body["messages"][1]
        assert assistant["content"][0] == {
            "type": "thinking",
            "thinking": "I should call the tool.",
            "signature": response.thinking[0].signature,
        }
        assert assistant["content"][-1]["type"] == "tool_use"
        assert emu.calls[1].body["thinking"]["type"] == "enabled"

        # A tampered block is refused by the upstream, which verifies its signatures.
        tampered = [
            ThinkingBlock(
                text="edited", signature=response.thinking[0].signature, protocol="anthropic"
            )
        ]
        bad = msgspec.structs.replace(
            follow_up,
            messages=[
                *first.messages,
                msgspec.structs.replace(follow_up.messages[1], thinking=tampered),
                follow_up.messages[2],
            ],
        )
        with pytest.raises(ProviderError) as info:
            await router.submit(bad)
        assert info.value.kind == "bad_request"


async def test_e2e_thinking_stream_round_trip() -> None:
    async with rig() as (emu, router):
        emu.script(Fault(reasoning="Thinking hard.", reply="Done."))
        req = ChatRequest(
            model="main", messages=[Message("user", "hi")], reasoning_effort="minimal"
        )
        chunks: list[StreamChunk] = []
        async with router.stream(req) as stream:
            async for chunk in stream:
                chunks.append(chunk)
        assert "".join(c.reasoning for c in chunks) == "Thinking hard."
        assert "".join(c.text for c in chunks) == "Done."
        blocks = [b for c in chunks for b in c.thinking or ()]
        assert blocks == [
            ThinkingBlock(
                text="Thinking hard.",
                signature=anthropic_signature("Thinking hard."),
                protocol="anthropic",
            )
        ]


async def test_e2e_spend_limit_cools_the_key_as_balance() -> None:
    body_ = msgspec.json.decode(spend_limit_body())
    async with rig() as (emu, router):
        emu.script(Fault(status=429, body=body_), key="sk-a-1")
        response = await router.submit(ChatRequest(model="main", messages=[Message("user", "hi")]))
        assert response.key_id == "b"
        assert [(a.key_id, a.outcome) for a in response.attempts] == [("a", "balance"), ("b", "ok")]
        snapshot = {k.key_id: k for k in router.snapshot().keys}
        assert snapshot["a"].cooling_reason == "balance"
        assert snapshot["a"].cooling_for > 600


async def test_reasoning_left_off_mid_tool_turn_is_named_in_dropped_params() -> None:
    from router import Router, RouterConfig, ToolCall
    from router.emulator import Emulator

    async with Emulator.serve(port=0) as emu:
        config = RouterConfig.from_dict(
            {
                "providers": [
                    {
                        "name": "a",
                        "kind": "anthropic",
                        "base_url": emu.url,
                        "keys": [{"id": "k", "secret": "sk-ant-test-000000"}],
                    }
                ],
            }
        )
        # The tool-use turn began on another provider: no Anthropic thinking block.
        messages = [
            Message("user", "weather?"),
            Message(
                "assistant",
                "",
                tool_calls=[ToolCall(id="c1", name="weather", arguments="{}")],
            ),
            Message("tool", "sunny", tool_call_id="c1"),
        ]
        request = ChatRequest(
            model="a/claude-sonnet-4-5", messages=messages, reasoning_effort="high"
        )
        async with Router.open(config) as router:
            response = await router.submit(request)
            assert response.dropped_params == ["reasoning_effort"]
            assert "thinking" not in emu.calls[-1].body
            async with router.stream(request) as stream:
                async for _ in stream:
                    pass
            assert stream.dropped_params == ["reasoning_effort"]
