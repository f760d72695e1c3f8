"""The sans-IO wire protocols: build, parse, classify and stream decoding, no network.

Every upstream body here is shaped like the provider's documented answers; streams go
through `SseParser` split at awkward byte boundaries, as a socket would deliver them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import msgspec
import pytest

from router._anthropic import DEFAULT_MAX_TOKENS, AnthropicProtocol
from router._classify import (
    classify_failure,
    mentions_context_overflow,
    mentions_max_tokens_ceiling,
    names_missing_model,
    parse_duration,
    redact,
    retry_after_from_headers,
)
from router._errors import ProviderError
from router._gemini import GeminiProtocol
from router._openai import OpenAIProtocol
from router._sse import SseParser
from router._types import ChatRequest, Message, StreamChunk, Tool, ToolCall, Usage
from router._wire import SseEvent, StreamDecoder, WireProtocol, WireRequest

SECRET = "sk-TESTSECRET-0123456789abcdef"
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z

OPENAI = OpenAIProtocol()
ANTHROPIC = AnthropicProtocol()
GEMINI = GeminiProtocol()
PROTOCOLS: dict[str, WireProtocol] = {"openai": OPENAI, "anthropic": ANTHROPIC, "gemini": GEMINI}
BASE_URLS = {
    "openai": "https://api.openai.com/v1/",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com/",
}

WEATHER = Tool(
    name="get_weather",
    description="Current weather for a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
)


def conversation(**overrides: Any) -> ChatRequest:
    fields: dict[str, Any] = {
        "model": "test-model",
        "messages": [
            Message("system", "You are terse."),
            Message("user", "Weather in Paris?"),
            Message(
                "assistant",
                "",
                tool_calls=[
                    ToolCall(id="call_abc", name="get_weather", arguments='{"city": "Paris"}')
                ],
            ),
            Message("tool", '{"temp_c": 21}', tool_call_id="call_abc"),
            Message("assistant", "21 C and sunny."),
            Message("user", "And tomorrow?"),
        ],
        "tools": [WEATHER],
        "tool_choice": "auto",
        "stop": ["END"],
        "max_tokens": 256,
        "temperature": 0.2,
        "top_p": 0.9,
    }
    fields.update(overrides)
    return ChatRequest(**fields)


def build(
    kind: str,
    request: ChatRequest,
    *,
    stream: bool = False,
    headers: dict[str, str] | None = None,
) -> WireRequest:
    return PROTOCOLS[kind].build(
        request, base_url=BASE_URLS[kind], secret=SECRET, stream=stream, headers=headers or {}
    )


def body_of(wire: WireRequest) -> Any:
    return msgspec.json.decode(wire.body)


def js(value: Any) -> bytes:
    return msgspec.json.encode(value)


# =========================================================================== build


def test_openai_build() -> None:
    wire = build("openai", conversation(), headers={"X-Trace": "t1"})
    assert wire.method == "POST"
    assert wire.url == "https://api.openai.com/v1/chat/completions"
    assert wire.headers["authorization"] == f"Bearer {SECRET}"
    assert wire.headers["content-type"] == "application/json"
    assert wire.headers["x-trace"] == "t1"
    body = body_of(wire)
    assert body["model"] == "test-model"
    assert body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "21 C and sunny."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city",
                "parameters": WEATHER.parameters,
            },
        }
    ]
    assert body["tool_choice"] == "auto"
    assert body["stop"] == ["END"]
    assert body["max_tokens"] == 256
    assert body["temperature"] == 0.2
    assert body["top_p"] == 0.9
    assert "stream" not in body


def test_openai_build_stream_and_named_tool_choice() -> None:
    wire = build("openai", conversation(tool_choice="get_weather", max_tokens=None), stream=True)
    body = body_of(wire)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert "max_tokens" not in body
    assert wire.headers["accept"] == "text/event-stream"


def test_anthropic_build() -> None:
    request = conversation(
        messages=[
            Message("system", "You are terse."),
            Message("system", "Answer in English."),
            *conversation().messages[1:],
        ]
    )
    wire = build("anthropic", request, headers={"anthropic-beta": "tools-2024"})
    assert wire.url == "https://api.anthropic.com/v1/messages"
    assert wire.headers["x-api-key"] == SECRET
    assert wire.headers["anthropic-version"] == "2023-06-01"
    assert wire.headers["content-type"] == "application/json"
    assert wire.headers["anthropic-beta"] == "tools-2024"
    assert "authorization" not in wire.headers
    body = body_of(wire)
    assert body["system"] == "You are terse.\n\nAnswer in English."
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_abc",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_abc", "content": '{"temp_c": 21}'}
            ],
        },
        {"role": "assistant", "content": "21 C and sunny."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": WEATHER.parameters,
        }
    ]
    assert body["tool_choice"] == {"type": "auto"}
    assert body["stop_sequences"] == ["END"]
    assert body["max_tokens"] == 256
    assert body["temperature"] == 0.2
    assert body["top_p"] == 0.9
    assert "stream" not in body


def test_anthropic_build_defaults_and_merges_parallel_tool_results() -> None:
    request = ChatRequest(
        model="claude-x",
        messages=[
            Message("user", "Paris and Rome?"),
            Message(
                "assistant",
                "Checking both.",
                tool_calls=[
                    ToolCall(id="t1", name="get_weather", arguments='{"city":"Paris"}'),
                    ToolCall(id="t2", name="get_weather", arguments='{"city":"Rome"}'),
                ],
            ),
            Message("tool", "21", tool_call_id="t1"),
            Message("tool", "25", tool_call_id="t2"),
        ],
        tool_choice="required",
    )
    body = body_of(build("anthropic", request, stream=True))
    assert body["max_tokens"] == DEFAULT_MAX_TOKENS == 4096
    assert body["stream"] is True
    assert "system" not in body
    assert body["tool_choice"] == {"type": "any"}
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"][0] == {"type": "text", "text": "Checking both."}
    assert [b["tool_use_id"] for b in body["messages"][2]["content"]] == ["t1", "t2"]


def test_anthropic_build_rejects_non_object_tool_arguments() -> None:
    request = conversation(
        messages=[
            Message("user", "hi"),
            Message("assistant", "", tool_calls=[ToolCall(id="x", name="f", arguments="[1")]),
        ]
    )
    with pytest.raises(ProviderError) as info:
        build("anthropic", request)
    assert info.value.kind == "bad_request"


def test_gemini_build() -> None:
    wire = build("gemini", conversation())
    assert (
        wire.url
        == "https://generativelanguage.googleapis.com/v1beta/models/test-model:generateContent"
    )
    assert wire.headers["x-goog-api-key"] == SECRET
    assert wire.headers["content-type"] == "application/json"
    assert SECRET not in wire.url
    body = body_of(wire)
    assert body["systemInstruction"] == {"parts": [{"text": "You are terse."}]}
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {
            "role": "model",
            "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
        },
        {
            "role": "user",
            "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}],
        },
        {"role": "model", "parts": [{"text": "21 C and sunny."}]},
        {"role": "user", "parts": [{"text": "And tomorrow?"}]},
    ]
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Current weather for a city",
                    "parameters": WEATHER.parameters,
                }
            ]
        }
    ]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    assert body["generationConfig"] == {
        "stopSequences": ["END"],
        "temperature": 0.2,
        "topP": 0.9,
        "maxOutputTokens": 256,
    }


def test_gemini_build_stream_url_text_tool_result_and_named_choice() -> None:
    request = ChatRequest(
        model="models/gemini-2.0-flash",
        messages=[
            Message("user", "q"),
            Message("assistant", "", tool_calls=[ToolCall(id="c9", name="lookup")]),
            Message("tool", "plain text result", tool_call_id="c9"),
        ],
        tool_choice="lookup",
    )
    wire = build("gemini", request, stream=True)
    assert wire.url == (
        "https://generativelanguage.googleapis.com/v1beta/models/"
        "gemini-2.0-flash:streamGenerateContent?alt=sse"
    )
    body = body_of(wire)
    assert body["contents"][2]["parts"] == [
        {"functionResponse": {"name": "lookup", "response": {"content": "plain text result"}}}
    ]
    assert body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["lookup"]}
    }
    assert "generationConfig" not in body and "systemInstruction" not in body


def test_gemini_build_rejects_orphan_tool_result() -> None:
    request = ChatRequest(
        model="g", messages=[Message("user", "q"), Message("tool", "r", tool_call_id="nope")]
    )
    with pytest.raises(ProviderError) as info:
        build("gemini", request)
    assert info.value.kind == "bad_request"


@pytest.mark.parametrize("kind", sorted(PROTOCOLS))
def test_secret_only_in_auth_header_never_in_repr(kind: str) -> None:
    wire = build(kind, conversation(), stream=True)
    assert SECRET not in repr(wire)
    assert SECRET not in str(wire)
    assert SECRET not in wire.url
    assert SECRET.encode() not in wire.body
    assert sum(SECRET in value for value in wire.headers.values()) == 1


# =========================================================================== parse


def test_openai_parse_text() -> None:
    body = js(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-2024-08-06",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello!", "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
        }
    )
    response = OPENAI.parse(200, {}, body)
    assert response.content == "Hello!"
    assert response.finish_reason == "stop"
    assert response.usage == Usage(prompt_tokens=9, completion_tokens=3, total_tokens=12)
    assert response.upstream_model == "gpt-4o-2024-08-06"
    assert response.tool_calls == []


def test_openai_parse_tool_calls_and_length() -> None:
    body = js(
        {
            "model": "gpt-4o",
            "choices": [
                {
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                            }
                        ],
                    },
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27},
        }
    )
    response = OPENAI.parse(200, {}, body)
    assert response.content == ""
    assert response.finish_reason == "tool_calls"
    assert response.tool_calls == [
        ToolCall(id="call_1", name="get_weather", arguments='{"city":"Oslo"}')
    ]
    cut = js(
        {
            "model": "m",
            "choices": [{"message": {"content": "Once upon"}, "finish_reason": "length"}],
        }
    )
    assert OPENAI.parse(200, {}, cut).finish_reason == "length"


def test_error_object_in_a_2xx_body_is_classified() -> None:
    body = openai_error("Upstream provider overloaded", "server_error")
    with pytest.raises(ProviderError) as info:
        OPENAI.parse(200, {}, body)
    assert info.value.kind == "transient"
    assert info.value.message.startswith("openai error in a 2xx body (server_error)")


def test_openai_parse_content_filter_and_malformed() -> None:
    filtered = js({"choices": [{"message": {"content": None}, "finish_reason": "content_filter"}]})
    with pytest.raises(ProviderError) as info:
        OPENAI.parse(200, {}, filtered)
    assert info.value.kind == "content_filter"
    partial = js({"choices": [{"message": {"content": "Part"}, "finish_reason": "content_filter"}]})
    assert OPENAI.parse(200, {}, partial).finish_reason == "content_filter"
    for bad in (
        b"<html>502 Bad Gateway</html>",
        b'{"choices": []}',
        b'{"choices": [{"message": {"content": 5}}]}',
    ):
        with pytest.raises(ProviderError) as info:
            OPENAI.parse(200, {}, bad)
        assert info.value.kind == "transient"
        assert "malformed" in info.value.message


def test_anthropic_parse_text_and_tool_use() -> None:
    body = js(
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-3-5-sonnet-20241022",
            "content": [
                {"type": "text", "text": "Let me check."},
                {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
            "stop_reason": "tool_use",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 100,
                "output_tokens": 30,
                "cache_read_input_tokens": 50,
                "cache_creation_input_tokens": 0,
            },
        }
    )
    response = ANTHROPIC.parse(200, {}, body)
    assert response.content == "Let me check."
    assert response.finish_reason == "tool_calls"
    assert response.tool_calls == [
        ToolCall(id="toolu_01", name="get_weather", arguments='{"city":"Paris"}')
    ]
    assert response.usage == Usage(
        prompt_tokens=150, completion_tokens=30, total_tokens=180, cached_tokens=50
    )
    assert response.upstream_model == "claude-3-5-sonnet-20241022"


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length")],
)
def test_anthropic_parse_stop_reasons(stop_reason: str, finish: str) -> None:
    body = js(
        {
            "type": "message",
            "model": "claude",
            "content": [{"type": "text", "text": "Hi"}],
            "stop_reason": stop_reason,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
    )
    assert ANTHROPIC.parse(200, {}, body).finish_reason == finish


def test_anthropic_parse_refusal_and_malformed() -> None:
    refusal = js({"type": "message", "content": [], "stop_reason": "refusal"})
    with pytest.raises(ProviderError) as info:
        ANTHROPIC.parse(200, {}, refusal)
    assert info.value.kind == "content_filter"
    with pytest.raises(ProviderError) as info:
        ANTHROPIC.parse(200, {}, b'{"type": "message", "content": "not a list"}')
    assert info.value.kind == "transient"
    assert "malformed" in info.value.message


def test_gemini_parse_text_tool_calls_and_usage() -> None:
    body = js(
        {
            "candidates": [
                {
                    "content": {
                        "role": "model",
                        "parts": [
                            {"text": "thinking...", "thought": True},
                            {"text": "Checking."},
                            {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
                            {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
                        ],
                    },
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": 40,
                "candidatesTokenCount": 12,
                "thoughtsTokenCount": 5,
                "totalTokenCount": 57,
            },
            "modelVersion": "gemini-2.0-flash-001",
        }
    )
    response = GEMINI.parse(200, {}, body)
    assert response.content == "Checking."
    assert response.finish_reason == "tool_calls"
    assert response.tool_calls == [
        ToolCall(id="call_0", name="get_weather", arguments='{"city":"Rome"}'),
        ToolCall(id="call_1", name="get_weather", arguments='{"city":"Oslo"}'),
    ]
    assert response.usage == Usage(
        prompt_tokens=40, completion_tokens=17, total_tokens=57, reasoning_tokens=5
    )
    assert response.reasoning == "thinking..."
    assert response.upstream_model == "gemini-2.0-flash-001"


def test_gemini_parse_length_and_blocks() -> None:
    cut = js(
        {"candidates": [{"content": {"parts": [{"text": "Once"}]}, "finishReason": "MAX_TOKENS"}]}
    )
    assert GEMINI.parse(200, {}, cut).finish_reason == "length"
    prompt_blocked = js({"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []}})
    answer_blocked = js({"candidates": [{"finishReason": "SAFETY", "safetyRatings": []}]})
    for body in (prompt_blocked, answer_blocked):
        with pytest.raises(ProviderError) as info:
            GEMINI.parse(200, {}, body)
        assert info.value.kind == "content_filter"
    for bad in (b"{}", b"not json", b'{"candidates": {"x": 1}}'):
        with pytest.raises(ProviderError) as info:
            GEMINI.parse(200, {}, bad)
        assert info.value.kind == "transient"


# =========================================================================== round trip
#
# A minimal emulated upstream per protocol reads the request that build() produced, the
# way the real API would, and answers with what it understood. parse() must bring it back.


def _understood(system: str, tools: list[str], stop: list[str], max_tokens: int) -> str:
    return js({"system": system, "tools": tools, "stop": stop, "max_tokens": max_tokens}).decode()


def openai_upstream(wire: WireRequest) -> bytes:
    request = body_of(wire)
    system = "\n".join(m["content"] for m in request["messages"] if m["role"] == "system")
    tools = [t["function"]["name"] for t in request.get("tools", [])]
    content = _understood(system, tools, request["stop"], request["max_tokens"])
    return js(
        {
            "model": request["model"] + "-0613",
            "choices": [
                {"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
        }
    )


def anthropic_upstream(wire: WireRequest) -> bytes:
    request = body_of(wire)
    tools = [t["name"] for t in request.get("tools", [])]
    content = _understood(
        request["system"], tools, request["stop_sequences"], request["max_tokens"]
    )
    return js(
        {
            "type": "message",
            "role": "assistant",
            "model": request["model"],
            "content": [{"type": "text", "text": content}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 5, "output_tokens": 6},
        }
    )


def gemini_upstream(wire: WireRequest) -> bytes:
    request = body_of(wire)
    config = request["generationConfig"]
    system = "".join(p["text"] for p in request["systemInstruction"]["parts"])
    tools = [d["name"] for t in request["tools"] for d in t["functionDeclarations"]]
    content = _understood(system, tools, config["stopSequences"], config["maxOutputTokens"])
    return js(
        {
            "candidates": [
                {"content": {"role": "model", "parts": [{"text": content}]}, "finishReason": "STOP"}
            ],
            "usageMetadata": {
                "promptTokenCount": 5,
                "candidatesTokenCount": 6,
                "totalTokenCount": 11,
            },
            "modelVersion": "test-model-001",
        }
    )


@pytest.mark.parametrize(
    ("kind", "upstream"),
    [("openai", openai_upstream), ("anthropic", anthropic_upstream), ("gemini", gemini_upstream)],
)
def test_round_trip_keeps_system_tools_stop_and_max_tokens(
    kind: str, upstream: Callable[[WireRequest], bytes]
) -> None:
    request = conversation(stop=["END", "\n\n"], max_tokens=333)
    response = PROTOCOLS[kind].parse(200, {}, upstream(build(kind, request)))
    assert msgspec.json.decode(response.content) == {
        "system": "You are terse.",
        "tools": ["get_weather"],
        "stop": ["END", "\n\n"],
        "max_tokens": 333,
    }
    assert response.finish_reason == "stop"
    assert response.usage.total_tokens == 11
    assert response.upstream_model.startswith("test-model")


# =========================================================================== retry headers


def test_parse_duration() -> None:
    assert parse_duration("1s") == 1.0
    assert parse_duration("6m0s") == 360.0
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_duration("2.5") == 2.5
    assert parse_duration("") is None
    assert parse_duration("soon") is None
    assert parse_duration("5s later") is None


def test_retry_after_seconds_date_and_ms() -> None:
    assert retry_after_from_headers({"Retry-After": "7"}, NOW) == 7.0
    date = format_datetime(datetime.fromtimestamp(NOW + 30, tz=UTC), usegmt=True)
    assert retry_after_from_headers({"retry-after": date}, NOW) == pytest.approx(30.0)
    past = format_datetime(datetime.fromtimestamp(NOW - 30, tz=UTC), usegmt=True)
    assert retry_after_from_headers({"retry-after": past}, NOW) == 0.0
    assert retry_after_from_headers({"retry-after-ms": "1500"}, NOW) == 1.5
    # Retry-After wins over retry-after-ms and the reset headers.
    both = {"retry-after": "3", "retry-after-ms": "9000", "x-ratelimit-reset-tokens": "1m"}
    assert retry_after_from_headers(both, NOW) == 3.0
    assert retry_after_from_headers({"retry-after": "garbage"}, NOW) is None
    assert retry_after_from_headers({}, NOW) is None
    assert retry_after_from_headers({"retry-after": "-4"}, NOW) == 0.0


def test_retry_after_openai_reset_durations() -> None:
    headers = {"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-reset-tokens": "1s"}
    assert retry_after_from_headers(headers, NOW) == 360.0  # none says exhausted: the longest
    exhausted_tokens = headers | {
        "x-ratelimit-remaining-requests": "12",
        "x-ratelimit-remaining-tokens": "0",
    }
    assert retry_after_from_headers(exhausted_tokens, NOW) == 1.0
    assert retry_after_from_headers(headers, NOW, explicit_only=True) is None


def test_retry_after_anthropic_rfc3339_resets() -> None:
    headers = {
        "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:50Z",  # NOW + 30
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-tokens-reset": "2023-11-14T22:14:20.5+00:00",  # NOW + 60.5
        "anthropic-ratelimit-tokens-remaining": "1000",
        "anthropic-ratelimit-output-tokens-reset": "2023-11-14T22:13:10Z",  # in the past
    }
    assert retry_after_from_headers(headers, NOW) == pytest.approx(30.0)
    no_remaining = {"anthropic-ratelimit-input-tokens-reset": "2023-11-14T22:13:10Z"}
    assert retry_after_from_headers(no_remaining, NOW) == 0.0


# =========================================================================== text predicates


@pytest.mark.parametrize(
    "text",
    [
        "max_tokens: 30000 > 8192, which is the maximum allowed number of output tokens for claude",
        "max_tokens is too large: 30000. This model supports at most 4096 completion tokens",
        "max_tokens=30000 exceeds tier ceiling",
        "Requested maximum output tokens is not available for this model",
        "Unable to submit request because it has a maxOutputTokens value of 100000 but the "
        "supported range is from 1 (inclusive) to 8193 (exclusive).",
    ],
)
def test_max_tokens_ceiling_wording(text: str) -> None:
    assert mentions_max_tokens_ceiling(text)
    assert not mentions_context_overflow(text)


@pytest.mark.parametrize(
    "text",
    [
        "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens "
        "(1000 in the messages, 8000 in the completion). Please reduce the length of the messages "
        "or completion.",
        "prompt is too long: 210000 tokens > 200000 maximum",
        "input length and `max_tokens` exceed context limit: 195000 + 8192 > 200000",
        "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
        "Input is too long for requested model.",
        "The request exceeds the context window of this model",
        "context_length_exceeded",
        "Too many tokens in the prompt",
    ],
)
def test_context_overflow_is_not_a_max_tokens_ceiling(text: str) -> None:
    assert mentions_context_overflow(text)
    assert not mentions_max_tokens_ceiling(text)


def test_rate_limit_wording_is_not_a_max_tokens_ceiling() -> None:
    text = (
        "This request would exceed the rate limit for your organization of 8,000 output "
        "tokens per minute. Max tokens per minute exceeded."
    )
    assert not mentions_max_tokens_ceiling(text)
    assert not mentions_max_tokens_ceiling("Unsupported parameter: 'max_tokens' is not supported")


# =========================================================================== classify


def openai_error(message: str, type_: str, code: str | None = None) -> bytes:
    return js({"error": {"message": message, "type": type_, "param": None, "code": code}})


def anthropic_error(type_: str, message: str) -> bytes:
    return js({"type": "error", "error": {"type": type_, "message": message}, "request_id": "r"})


def gemini_error(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return js({"error": error})


CASES: list[tuple[str, str, int, dict[str, str], bytes, str, float | None]] = [
    # (id, protocol, status, headers, body, kind, retry_after)
    # ---- OpenAI
    (
        "openai-429-rate-limit",
        "openai",
        429,
        {
            "x-ratelimit-reset-tokens": "1s",
            "x-ratelimit-reset-requests": "6m0s",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-remaining-requests": "99",
        },
        openai_error(
            "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): "
            "Limit 30000, Used 29000, Requested 2000. Please try again in 2s.",
            "tokens",
            "rate_limit_exceeded",
        ),
        "rate_limit",
        1.0,
    ),
    (
        "openai-429-try-again-in-body",
        "openai",
        429,
        {},
        openai_error(
            "Rate limit reached on requests per min (RPM). Please try again in 20ms.",
            "requests",
            "rate_limit_exceeded",
        ),
        "rate_limit",
        0.02,
    ),
    (
        "openai-429-requests-reset",
        "openai",
        429,
        {"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-remaining-requests": "0"},
        openai_error(
            "Rate limit reached on requests per day (RPD).", "requests", "rate_limit_exceeded"
        ),
        "rate_limit",
        360.0,
    ),
    (
        "openai-429-insufficient-quota",
        "openai",
        429,
        {"retry-after": "20"},
        openai_error(
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        ),
        "balance",
        20.0,
    ),
    (
        "openai-429-max-tokens-ceiling",
        "openai",
        429,
        {"retry-after": "1"},
        openai_error("max_tokens=30000 exceeds tier ceiling of 16384", "invalid_request_error"),
        "max_tokens",
        1.0,
    ),
    (
        "openai-401",
        "openai",
        401,
        {},
        openai_error(
            f"Incorrect API key provided: {SECRET}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            "invalid_api_key",
        ),
        "auth",
        None,
    ),
    (
        "openai-403-country",
        "openai",
        403,
        {},
        openai_error(
            "Country, region, or territory not supported",
            "request_forbidden",
            "unsupported_country_region_territory",
        ),
        "auth",
        None,
    ),
    (
        "openai-402",
        "openai",
        402,
        {},
        openai_error("Insufficient Balance", "unknown_error"),
        "balance",
        None,
    ),
    (
        "openai-404-model",
        "openai",
        404,
        {},
        openai_error(
            "The model `gpt-9` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        ),
        "model_missing",
        None,
    ),
    (
        "openai-400-context",
        "openai",
        400,
        {"x-ratelimit-reset-tokens": "1s"},
        openai_error(
            "This model's maximum context length is 128000 tokens. However, you requested "
            "140000 tokens (132000 in the messages, 8000 in the completion). Please reduce the "
            "length of the messages or completion.",
            "invalid_request_error",
            "context_length_exceeded",
        ),
        "context_exceeded",
        None,
    ),
    (
        "openai-400-max-tokens",
        "openai",
        400,
        {},
        openai_error(
            "max_tokens is too large: 30000. This model supports at most 16384 completion "
            "tokens, whereas you provided 30000.",
            "invalid_request_error",
        ),
        "max_tokens",
        None,
    ),
    (
        "openai-400-content-policy",
        "openai",
        400,
        {},
        openai_error(
            "Your request was rejected as a result of our safety system.",
            "invalid_request_error",
            "content_policy_violation",
        ),
        "content_filter",
        None,
    ),
    (
        "openai-400-bad",
        "openai",
        400,
        {},
        openai_error(
            "Invalid value for 'temperature': expected a number <= 2.", "invalid_request_error"
        ),
        "bad_request",
        None,
    ),
    (
        "openai-422",
        "openai",
        422,
        {},
        js({"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}),
        "bad_request",
        None,
    ),
    (
        "openai-500",
        "openai",
        500,
        {},
        openai_error("The server had an error while processing your request.", "server_error"),
        "transient",
        None,
    ),
    (
        "openai-503-retry-after",
        "openai",
        503,
        {"Retry-After": "5"},
        b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>",
        "transient",
        5.0,
    ),
    ("openai-408", "openai", 408, {}, b"request timeout", "transient", None),
    ("openai-418", "openai", 418, {}, b"I'm a teapot", "unknown", None),
    # ---- Anthropic
    (
        "anthropic-429",
        "anthropic",
        429,
        {
            "retry-after": "12",
            "anthropic-ratelimit-requests-reset": "2023-11-14T22:14:20Z",
        },
        anthropic_error(
            "rate_limit_error",
            "This request would exceed the rate limit for your organization of 50,000 input "
            "tokens per minute.",
        ),
        "rate_limit",
        12.0,
    ),
    (
        "anthropic-429-rfc3339-reset",
        "anthropic",
        429,
        {
            "anthropic-ratelimit-tokens-reset": "2023-11-14T22:14:20Z",
            "anthropic-ratelimit-tokens-remaining": "0",
            "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:21Z",
            "anthropic-ratelimit-requests-remaining": "40",
        },
        anthropic_error("rate_limit_error", "Number of request tokens has exceeded your limit."),
        "rate_limit",
        60.0,
    ),
    (
        "anthropic-401",
        "anthropic",
        401,
        {},
        anthropic_error("authentication_error", "invalid x-api-key"),
        "auth",
        None,
    ),
    (
        "anthropic-403-permission",
        "anthropic",
        403,
        {},
        anthropic_error(
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
        ),
        "auth",
        None,
    ),
    (
        "anthropic-403-policy",
        "anthropic",
        403,
        {},
        anthropic_error(
            "permission_error",
            "This request triggered restrictions due to our Usage Policy (content policy).",
        ),
        "content_filter",
        None,
    ),
    (
        "anthropic-400-credit",
        "anthropic",
        400,
        {},
        anthropic_error(
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
            "Billing to upgrade or purchase credits.",
        ),
        "balance",
        None,
    ),
    (
        "anthropic-404",
        "anthropic",
        404,
        {},
        anthropic_error("not_found_error", "model: claude-9-opus"),
        "model_missing",
        None,
    ),
    (
        "anthropic-400-prompt-too-long",
        "anthropic",
        400,
        {},
        anthropic_error(
            "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"
        ),
        "context_exceeded",
        None,
    ),
    (
        "anthropic-400-prompt-plus-max-tokens",
        "anthropic",
        400,
        {},
        anthropic_error(
            "invalid_request_error",
            "input length and `max_tokens` exceed context limit: 195000 + 8192 > 200000, "
            "decrease input length or `max_tokens` and try again",
        ),
        "context_exceeded",
        None,
    ),
    (
        "anthropic-400-max-tokens",
        "anthropic",
        400,
        {},
        anthropic_error(
            "invalid_request_error",
            "max_tokens: 30000 > 8192, which is the maximum allowed number of output tokens "
            "for claude-3-5-sonnet-20241022",
        ),
        "max_tokens",
        None,
    ),
    (
        "anthropic-400-bad",
        "anthropic",
        400,
        {},
        anthropic_error("invalid_request_error", "messages: roles must alternate"),
        "bad_request",
        None,
    ),
    (
        "anthropic-413",
        "anthropic",
        413,
        {},
        anthropic_error(
            "request_too_large", "Request exceeds the maximum allowed number of bytes."
        ),
        "bad_request",
        None,
    ),
    (
        "anthropic-529",
        "anthropic",
        529,
        {},
        anthropic_error("overloaded_error", "Overloaded"),
        "transient",
        None,
    ),
    (
        "anthropic-500",
        "anthropic",
        500,
        {},
        anthropic_error("api_error", "Internal server error"),
        "transient",
        None,
    ),
    # ---- Gemini
    (
        "gemini-429-retry-info",
        "gemini",
        429,
        {},
        gemini_error(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details.",
            [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}
                    ],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"},
            ],
        ),
        "rate_limit",
        37.0,
    ),
    (
        "gemini-400-invalid-key",
        "gemini",
        400,
        {},
        gemini_error(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
        ),
        "auth",
        None,
    ),
    (
        "gemini-403",
        "gemini",
        403,
        {},
        gemini_error(403, "PERMISSION_DENIED", "Your API key was reported as leaked."),
        "auth",
        None,
    ),
    (
        "gemini-401",
        "gemini",
        401,
        {},
        gemini_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."),
        "auth",
        None,
    ),
    (
        "gemini-400-billing",
        "gemini",
        400,
        {},
        gemini_error(
            400,
            "FAILED_PRECONDITION",
            "Gemini API free tier is not available in your country. Please enable billing on "
            "your project in Google AI Studio.",
        ),
        "balance",
        None,
    ),
    (
        "gemini-404",
        "gemini",
        404,
        {},
        gemini_error(
            404,
            "NOT_FOUND",
            "models/gemini-9 is not found for API version v1beta, or is not supported for "
            "generateContent.",
        ),
        "model_missing",
        None,
    ),
    (
        "gemini-400-context",
        "gemini",
        400,
        {},
        gemini_error(
            400,
            "INVALID_ARGUMENT",
            "The input token count (1200000) exceeds the maximum number of tokens allowed "
            "(1048576).",
        ),
        "context_exceeded",
        None,
    ),
    (
        "gemini-400-max-output",
        "gemini",
        400,
        {},
        gemini_error(
            400,
            "INVALID_ARGUMENT",
            "Unable to submit request because it has a maxOutputTokens value of 100000 but the "
            "supported range is from 1 (inclusive) to 8193 (exclusive). Update the value and "
            "try again.",
        ),
        "max_tokens",
        None,
    ),
    (
        "gemini-400-bad",
        "gemini",
        400,
        {},
        gemini_error(400, "INVALID_ARGUMENT", 'Invalid JSON payload received. Unknown name "foo".'),
        "bad_request",
        None,
    ),
    (
        "gemini-503",
        "gemini",
        503,
        {},
        gemini_error(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
        "transient",
        None,
    ),
    (
        "gemini-504",
        "gemini",
        504,
        {},
        gemini_error(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
        "transient",
        None,
    ),
    (
        "gemini-500-list-body",
        "gemini",
        500,
        {},
        js(
            [
                {
                    "error": {
                        "code": 500,
                        "message": "An internal error has occurred.",
                        "status": "INTERNAL",
                    }
                }
            ]
        ),
        "transient",
        None,
    ),
]


@pytest.mark.parametrize(
    ("protocol", "status", "headers", "body", "kind", "retry_after"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_classify(
    protocol: str,
    status: int,
    headers: dict[str, str],
    body: bytes,
    kind: str,
    retry_after: float | None,
) -> None:
    error = PROTOCOLS[protocol].classify(status, headers, body, NOW)
    assert isinstance(error, ProviderError)
    assert error.kind == kind, error.message
    assert error.status == status
    if retry_after is None:
        assert error.retry_after is None
    else:
        assert error.retry_after == pytest.approx(retry_after)
    assert error.message.startswith(f"{protocol} HTTP {status}")
    assert SECRET not in error.message
    assert len(error.message) < 400


def test_every_failure_kind_is_covered_by_the_classify_table() -> None:
    kinds = {case[5] for case in CASES}
    assert kinds == {
        "transient",
        "rate_limit",
        "auth",
        "balance",
        "model_missing",
        "max_tokens",
        "context_exceeded",
        "bad_request",
        "content_filter",
        "unknown",
    }


def test_classify_message_quotes_upstream_and_trims_text_bodies() -> None:
    error = OPENAI.classify(502, {}, b"  <html>\n  Bad   Gateway " + b"x" * 2000, NOW)
    assert error.kind == "transient"
    assert "Bad Gateway xxx" in error.message
    assert "<" not in error.message  # an HTML page is reduced to its text
    assert len(error.message) <= 330
    page = (
        b"<html><head><style>a{}</style></head>"
        b"<body>Billing | 503 Service Unavailable</body></html>"
    )
    error = OPENAI.classify(503, {}, page, NOW)
    assert error.kind == "transient"  # a "Billing" link on a 5xx page is not a balance error
    assert error.message == "openai HTTP 503: Billing | 503 Service Unavailable"
    error = ANTHROPIC.classify(429, {}, anthropic_error("rate_limit_error", "slow down"), NOW)
    assert error.message == "anthropic HTTP 429 (rate_limit_error): slow down"


@pytest.mark.parametrize(
    "leaky",
    [
        f"Incorrect API key provided: {SECRET}.",
        "API key not valid: AIzaSyA-1234567890abcdefghijklmnop",
        "bad header Authorization: Bearer abc.def-ghi",
        "invalid x-api-key: sk-ant-api03-AAAAAAAAAAAAAAAA",
    ],
)
def test_classify_never_echoes_key_like_text(leaky: str) -> None:
    for kind, body in (
        ("openai", openai_error(leaky, "invalid_request_error", "invalid_api_key")),
        ("anthropic", anthropic_error("authentication_error", leaky)),
        ("gemini", gemini_error(400, "INVALID_ARGUMENT", leaky)),
        ("openai", leaky.encode()),
    ):
        error = PROTOCOLS[kind].classify(401, {}, body, NOW)
        for secret in (SECRET, "AIzaSyA-1234567890", "abc.def-ghi", "sk-ant-api03"):
            assert secret not in error.message
            assert secret not in repr(error)
    assert redact("token x-custom-secret here", "x-custom-secret") == "token [redacted] here"


def test_classify_failure_in_stream_uses_codes() -> None:
    assert classify_failure(None, "Overloaded", {"overloaded_error"}) == "transient"
    assert classify_failure(None, "slow down", {"rate_limit_error"}) == "rate_limit"
    assert classify_failure(None, "too long", {"context_length_exceeded"}) == "context_exceeded"
    assert classify_failure(None, "what", set()) == "unknown"


# --------------------------------------------------------------------------- 404: model or route

MODEL_404S = [
    pytest.param(
        "openai",
        openai_error(
            "The model `gpt-9` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        ),
        id="openai-model_not_found",
    ),
    pytest.param(
        "openai",
        js({"object": "error", "message": "The model `m` does not exist.", "code": 404}),
        id="vllm-model-does-not-exist",
    ),
    pytest.param(
        "openai",
        js({"error": 'model "llama9" not found, try pulling it first'}),
        id="ollama-model-not-found",
    ),
    pytest.param("openai", b"model 'gpt-9' does not exist", id="plain-text-model"),
    pytest.param(
        "anthropic", anthropic_error("not_found_error", "model: claude-9-opus"), id="anthropic"
    ),
    pytest.param(
        "gemini",
        gemini_error(
            404,
            "NOT_FOUND",
            "models/gemini-9 is not found for API version v1beta, or is not supported for "
            "generateContent. Call ListModels to see the list of available models.",
        ),
        id="gemini",
    ),
]

ROUTE_404S = [
    pytest.param(
        "gemini",
        b"<!DOCTYPE html><html><title>Error 404 (Not Found)!!1</title><p>The requested URL "
        b"<code>/v1beta/v1beta/models/gemini-pro:generateContent</code> was not found on "
        b"this server.</p></html>",
        id="html-page-naming-models-path",
    ),
    pytest.param("openai", b"<html><body><h1>404 Not Found</h1>nginx</body></html>", id="nginx"),
    pytest.param("openai", b"404 page not found", id="plain-text"),
    pytest.param("anthropic", b"", id="empty"),
    pytest.param(
        "openai",
        openai_error("Invalid URL (POST /v1/chat/completion)", "invalid_request_error"),
        id="openai-invalid-url",
    ),
    pytest.param(
        "anthropic", anthropic_error("not_found_error", "Not Found"), id="anthropic-not-found"
    ),
    pytest.param("openai", js({"detail": "Not Found"}), id="json-no-error"),
    pytest.param("gemini", gemini_error(404, "NOT_FOUND", "Not Found"), id="gemini-not-found"),
    pytest.param(
        "openai",
        openai_error(
            "Unknown path: /wrong/v1beta/models/x:generateContent", "invalid_request_error"
        ),
        id="unknown-path-naming-models",
    ),
]


@pytest.mark.parametrize(("protocol", "body"), MODEL_404S)
def test_a_404_naming_a_missing_model_is_model_missing(protocol: str, body: bytes) -> None:
    error = PROTOCOLS[protocol].classify(404, {}, body, NOW)
    assert error.kind == "model_missing", error.message
    assert not error.key_wide and not error.timed_out
    assert error.status == 404


@pytest.mark.parametrize(("protocol", "body"), ROUTE_404S)
def test_a_route_404_is_transient_and_key_wide(protocol: str, body: bytes) -> None:
    error = PROTOCOLS[protocol].classify(404, {"retry-after": "3"}, body, NOW)
    assert error.kind == "transient", error.message
    assert error.key_wide and not error.timed_out
    assert error.status == 404
    assert error.retry_after == 3.0
    assert error.message.startswith(f"{protocol} HTTP 404")
    assert "base_url is probably wrong" in error.message
    assert "<" not in error.message


def test_names_missing_model_rules() -> None:
    assert names_missing_model("anything", {"model_not_found"})
    assert names_missing_model("model: claude-x", {"not_found_error"})
    assert names_missing_model("The model `x` does not exist", set())
    assert names_missing_model("Unknown model gpt-9", set())
    assert not names_missing_model("model: claude-x", set())  # no not-found word or code
    assert not names_missing_model("Not Found", {"not_found_error"})  # names no model
    assert not names_missing_model("<html>Model not found</html>", set())  # a web page
    assert not names_missing_model("", set())


def test_classify_failure_404_and_not_found_codes() -> None:
    assert classify_failure(404, "model: x", {"not_found_error"}) == "model_missing"
    assert classify_failure(404, "Not Found", {"not_found_error"}) == "transient"
    assert classify_failure(404, "", set()) == "transient"
    # Billing wording still wins on a 4xx; not-found codes still mean a model in-stream.
    assert classify_failure(404, "please add credits", set()) == "balance"
    assert classify_failure(None, "gone", {"not_found"}) == "model_missing"
    assert classify_failure(None, "gone", {"model_not_found"}) == "model_missing"


def test_only_a_404_is_a_route_404() -> None:
    for status, kind in ((500, "transient"), (503, "transient"), (400, "bad_request")):
        error = OPENAI.classify(status, {}, b"<html>oops</html>", NOW)
        assert error.kind == kind
        assert not error.key_wide


# =========================================================================== SSE parser


def feed_in_pieces(raw: bytes, cuts: Iterable[int]) -> list[SseEvent]:
    parser = SseParser()
    events: list[SseEvent] = []
    start = 0
    for cut in [*cuts, len(raw)]:
        events += parser.feed(raw[start:cut])
        start = cut
    events += parser.close()
    return events


def test_sse_line_endings_fields_and_comments() -> None:
    raw = (
        b": keep-alive\r\n\r\n"
        b"event: greeting\r\ndata: hello\r\ndata:  world\r\n\r\n"
        b"data:no-space\n\n"
        b"id: 7\rdata: cr only\r\r"
        b"event: empty\ndata\n\n"
        b"event: ignored-no-data\n\n"
        b"retry: 100\nunknown: x\ndata: last\n\n"
    )
    expected = [
        SseEvent(event="greeting", data="hello\n world"),
        SseEvent(event="message", data="no-space"),
        SseEvent(event="message", data="cr only"),
        SseEvent(event="empty", data=""),
        SseEvent(event="message", data="last"),
    ]
    assert feed_in_pieces(raw, []) == expected
    # Every single split point, and byte-at-a-time, give the same events.
    for cut in range(1, len(raw)):
        assert feed_in_pieces(raw, [cut]) == expected, cut
    assert feed_in_pieces(raw, range(1, len(raw))) == expected


def test_sse_crlf_split_between_pieces_is_one_line_ending() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # the LF pairs with the CR: not a blank line
    assert parser.feed(b"\r") == [SseEvent(data="a")]
    assert parser.feed(b"\ndata: b\n\n") == [SseEvent(data="b")]


def test_sse_bom_utf8_split_and_last_event_id() -> None:
    raw = "\ufeffid: 42\ndata: caf\u00e9 \u2603\n\n".encode()
    for cut in range(1, len(raw)):
        parser = SseParser()
        events = parser.feed(raw[:cut]) + parser.feed(raw[cut:])
        assert events == [SseEvent(data="caf\u00e9 \u2603")], cut
        assert parser.last_event_id == "42"


def test_sse_incomplete_event_at_eof_is_discarded() -> None:
    parser = SseParser()
    assert parser.feed(b"data: one\n\ndata: two\n") == [SseEvent(data="one")]
    assert parser.pending
    assert parser.close() == []
    assert not parser.pending


# =========================================================================== streams


def run_stream(
    kind: str, raw: bytes, cuts: Iterable[int] = ()
) -> tuple[list[StreamChunk], StreamDecoder]:
    decoder = PROTOCOLS[kind].stream_decoder()
    chunks: list[StreamChunk] = []
    for event in feed_in_pieces(raw, cuts):
        chunks += decoder.feed(event)
    return chunks, decoder


def assemble(chunks: list[StreamChunk]) -> dict[str, Any]:
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in chunk.tool_calls:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] = delta.name or call["name"]
            call["arguments"] += delta.arguments
    finishes = [c.finish_reason for c in chunks if c.finish_reason is not None]
    usages = [c.usage for c in chunks if c.usage is not None]
    return {
        "text": "".join(c.text for c in chunks),
        "calls": [calls[i] for i in sorted(calls)],
        "finish": finishes,
        "usage": usages[-1] if usages else None,
    }


def sse(*events: tuple[str | None, Any], comment_every: int = 0) -> bytes:
    out = bytearray()
    for n, (name, data) in enumerate(events):
        if comment_every and n % comment_every == 0:
            out += b": keep-alive\r\n\r\n"
        if name is not None:
            out += f"event: {name}\r\n".encode()
        text = data if isinstance(data, str) else js(data).decode()
        out += f"data: {text}\r\n\r\n".encode()
    return bytes(out)


def awkward_cuts(raw: bytes) -> list[list[int]]:
    """Byte-at-a-time, every 7 bytes, and cuts inside every CRLF pair."""
    inside_crlf = [i + 1 for i in range(len(raw) - 1) if raw[i : i + 2] == b"\r\n"]
    return [list(range(1, len(raw))), list(range(7, len(raw), 7)), inside_crlf]


OPENAI_STREAM = sse(
    (
        None,
        {
            "id": "c",
            "model": "gpt-4o",
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ],
            "usage": None,
        },
    ),
    (None, {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}),
    (None, {"choices": [{"index": 0, "delta": {"content": "lo ☃"}, "finish_reason": None}]}),
    (
        None,
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": ""},
                            }
                        ]
                    },
                }
            ]
        },
    ),
    (
        None,
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]},
                }
            ]
        },
    ),
    (
        None,
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ': "Oslo"}'}}]},
                }
            ]
        },
    ),
    (None, {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
    (
        None,
        {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}},
    ),
    (None, "[DONE]"),
    comment_every=3,
)


def test_openai_stream() -> None:
    for cuts in [[], *awkward_cuts(OPENAI_STREAM)]:
        chunks, decoder = run_stream("openai", OPENAI_STREAM, cuts)
        assert assemble(chunks) == {
            "text": "Hello ☃",
            "calls": [{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}],
            "finish": ["tool_calls"],
            "usage": Usage(prompt_tokens=10, completion_tokens=4, total_tokens=14),
        }
        assert decoder.done and decoder.finished
        assert chunks[0].text == "Hel"  # the role-only delta produced no chunk


def test_openai_stream_finished_before_done_and_errors() -> None:
    decoder = OPENAI.stream_decoder()
    decoder.feed(
        SseEvent(
            data=js({"choices": [{"delta": {"content": "x"}, "finish_reason": "length"}]}).decode()
        )
    )
    assert decoder.finished and not decoder.done
    with pytest.raises(ProviderError) as info:
        OPENAI.stream_decoder().feed(SseEvent(data='{"choices": [{"delta": '))
    assert info.value.kind == "transient"
    assert "malformed stream event" in info.value.message
    in_stream_error = js({"error": {"message": "The server had an error", "type": "server_error"}})
    with pytest.raises(ProviderError) as info:
        OPENAI.stream_decoder().feed(SseEvent(data=in_stream_error.decode()))
    assert info.value.kind == "transient"


ANTHROPIC_STREAM = sse(
    (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-3-5",
                "content": [],
                "stop_reason": None,
                "usage": {"input_tokens": 25, "output_tokens": 1},
            },
        },
    ),
    (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    ("ping", {"type": "ping"}),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Let me "},
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "check."},
        },
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "get_weather",
                "input": {},
            },
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": ""},
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'},
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": 'ris"}'},
        },
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    (
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
        },
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 2}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 42},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
    comment_every=4,
)


def test_anthropic_stream() -> None:
    for cuts in [[], *awkward_cuts(ANTHROPIC_STREAM)]:
        chunks, decoder = run_stream("anthropic", ANTHROPIC_STREAM, cuts)
        assert assemble(chunks) == {
            "text": "Let me check.",
            "calls": [
                {"id": "toolu_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"id": "toolu_2", "name": "now", "arguments": "{}"},
            ],
            "finish": ["tool_calls"],
            "usage": Usage(prompt_tokens=25, completion_tokens=42, total_tokens=67),
        }
        assert decoder.done and decoder.finished


def test_anthropic_stream_error_event_and_malformed() -> None:
    decoder = ANTHROPIC.stream_decoder()
    decoder.feed(
        SseEvent(
            event="message_start",
            data=js({"type": "message_start", "message": {"usage": {"input_tokens": 3}}}).decode(),
        )
    )
    assert not decoder.finished
    overloaded = js(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    with pytest.raises(ProviderError) as info:
        decoder.feed(SseEvent(event="error", data=overloaded.decode()))
    assert info.value.kind == "transient"
    assert info.value.status is None
    assert "Overloaded" in info.value.message
    rate = js({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}})
    with pytest.raises(ProviderError) as info:
        ANTHROPIC.stream_decoder().feed(SseEvent(event="error", data=rate.decode()))
    assert info.value.kind == "rate_limit"
    with pytest.raises(ProviderError) as info:
        ANTHROPIC.stream_decoder().feed(SseEvent(event="content_block_delta", data="{not json"))
    assert info.value.kind == "transient"
    assert "malformed stream event" in info.value.message


GEMINI_STREAM = sse(
    (
        None,
        {
            "candidates": [{"content": {"role": "model", "parts": [{"text": "Sun"}]}}],
            "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
            "modelVersion": "gemini-2.0-flash",
        },
    ),
    (
        None,
        {
            "candidates": [
                {
                    "content": {
                        "role": "model",
                        "parts": [
                            {"text": "ny, "},
                            {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
                        ],
                    }
                }
            ]
        },
    ),
    (
        None,
        {
            "candidates": [
                {
                    "content": {
                        "role": "model",
                        "parts": [{"functionCall": {"name": "get_time", "args": {}}}],
                    },
                    "finishReason": "STOP",
                }
            ],
            "usageMetadata": {
                "promptTokenCount": 8,
                "candidatesTokenCount": 6,
                "totalTokenCount": 14,
            },
        },
    ),
    comment_every=2,
)


def test_gemini_stream() -> None:
    for cuts in [[], *awkward_cuts(GEMINI_STREAM)]:
        chunks, decoder = run_stream("gemini", GEMINI_STREAM, cuts)
        assert assemble(chunks) == {
            "text": "Sunny, ",
            "calls": [
                {"id": "call_0", "name": "get_weather", "arguments": '{"city":"Rome"}'},
                {"id": "call_1", "name": "get_time", "arguments": "{}"},
            ],
            "finish": ["tool_calls"],
            "usage": Usage(prompt_tokens=8, completion_tokens=6, total_tokens=14),
        }
        assert decoder.done and decoder.finished
        assert chunks[-1].usage is not None  # usage rides on the last chunk


def test_gemini_stream_blocks_and_malformed() -> None:
    blocked = js({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}})
    with pytest.raises(ProviderError) as info:
        GEMINI.stream_decoder().feed(SseEvent(data=blocked.decode()))
    assert info.value.kind == "content_filter"
    # A safety stop after content was streamed is a finish reason, not an error.
    decoder = GEMINI.stream_decoder()
    decoder.feed(
        SseEvent(data=js({"candidates": [{"content": {"parts": [{"text": "Hi"}]}}]}).decode())
    )
    [last] = decoder.feed(SseEvent(data=js({"candidates": [{"finishReason": "SAFETY"}]}).decode()))
    assert last.finish_reason == "content_filter"
    assert decoder.done
    with pytest.raises(ProviderError) as info:
        GEMINI.stream_decoder().feed(SseEvent(data='{"candidates": [ '))
    assert info.value.kind == "transient"
    assert "malformed stream event" in info.value.message
    error = gemini_error(503, "UNAVAILABLE", "The model is overloaded.")
    with pytest.raises(ProviderError) as info:
        GEMINI.stream_decoder().feed(SseEvent(data=error.decode()))
    assert info.value.kind == "transient"


@pytest.mark.parametrize("kind", sorted(PROTOCOLS))
def test_stream_events_after_the_end_are_ignored(kind: str) -> None:
    raw = {"openai": OPENAI_STREAM, "anthropic": ANTHROPIC_STREAM, "gemini": GEMINI_STREAM}[kind]
    chunks, decoder = run_stream(kind, raw)
    assert decoder.done
    assert decoder.feed(SseEvent(data='{"late": true}')) == []
    assert chunks


def test_truncated_stream_is_neither_done_nor_finished() -> None:
    for kind, raw in (
        ("openai", OPENAI_STREAM),
        ("anthropic", ANTHROPIC_STREAM),
        ("gemini", GEMINI_STREAM),
    ):
        cut = raw.rfind(b"data:")  # drop the last event mid-way
        _, decoder = run_stream(kind, raw[: cut + 8])
        assert not decoder.done
        if kind == "gemini":
            assert not decoder.finished
    # Every decoder satisfies the protocol's shape.
    for protocol in PROTOCOLS.values():
        decoder = protocol.stream_decoder()
        assert (decoder.done, decoder.finished) == (False, False)
