"""Request and response fidelity on the Gemini protocol (issue 12).

Unit tests on the sans-IO `GeminiProtocol` for each carried field (content parts,
structured outputs, reasoning and thought signatures, sampling fields, candidates,
logprobs, safety ratings, usage), the emulator's Gemini shapes, and a few requests end
to end through a real `Router` to the emulator over loopback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest

from router import ChatRequest, Message, ProviderError, Router, RouterConfig, StreamChunk
from router._gemini import GeminiProtocol
from router._types import (
    AudioPart,
    FilePart,
    ImagePart,
    ResponseFormat,
    TextPart,
    ThinkingBlock,
    ToolCall,
    Usage,
)
from router._wire import SseEvent
from router.emulator import Emulator, Fault
from router.emulator._protocols import (
    Answer,
    BadRequest,
    gemini_frames,
    gemini_json,
    parse_gemini,
)

GEMINI = GeminiProtocol()
BASE = "https://generativelanguage.googleapis.com"
PNG = "iVBORw0KGgo="
SIG_CALL = "c2lnLWNhbGw="
SIG_THOUGHT = "c2lnLXRob3VnaHQ="
SIG_TEXT = "c2lnLXRleHQ="


def build(request: ChatRequest, *, stream: bool = False) -> dict[str, Any]:
    wire = GEMINI.build(request, base_url=BASE, secret="k", stream=stream, headers={})
    body: dict[str, Any] = msgspec.json.decode(wire.body)
    return body


def ask(*messages: Message, **fields: Any) -> ChatRequest:
    return ChatRequest(model="gemini-2.5-flash", messages=list(messages), **fields)


def user(*parts: Any) -> Message:
    return Message("user", list(parts))


def parse(body: dict[str, Any]) -> Any:
    return GEMINI.parse(200, {}, msgspec.json.encode(body))


def refused(request: ChatRequest, *, stream: bool = False) -> str:
    with pytest.raises(ProviderError) as info:
        build(request, stream=stream)
    assert info.value.kind == "bad_request"
    return info.value.message


def feed(events: list[dict[str, Any]]) -> list[StreamChunk]:
    decoder = GEMINI.stream_decoder()
    chunks: list[StreamChunk] = []
    for event in events:
        chunks += decoder.feed(SseEvent(data=msgspec.json.encode(event).decode()))
    assert decoder.done
    return chunks


# --------------------------------------------------------------------------- content parts


def test_parts_become_inline_data_and_file_data_in_order() -> None:
    body = build(
        ask(
            user(
                TextPart(text="What is in these?"),
                ImagePart(data=PNG, media_type="image/png", detail="high"),
                ImagePart(url="https://example.com/cat.JPG?size=large"),
                ImagePart(url=f"data:image/webp;base64,{PNG}"),
                FilePart(data="JVBERi0=", filename="report.pdf"),
                FilePart(url="gs://bucket/doc", media_type="application/pdf"),
                FilePart(file_id="files/abc123", media_type="video/mp4"),
                AudioPart(data="UklGRg==", format="wav"),
            )
        )
    )
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "What is in these?"},
                {"inlineData": {"mimeType": "image/png", "data": PNG}},
                {
                    "fileData": {
                        "mimeType": "image/jpeg",
                        "fileUri": "https://example.com/cat.JPG?size=large",
                    }
                },
                {"inlineData": {"mimeType": "image/webp", "data": PNG}},
                {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
                {"fileData": {"mimeType": "application/pdf", "fileUri": "gs://bucket/doc"}},
                {
                    "fileData": {
                        "mimeType": "video/mp4",
                        "fileUri": f"{BASE}/v1beta/files/abc123",
                    }
                },
                {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
            ],
        }
    ]


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        (user(ImagePart(url="https://example.com/photo")), "media_type"),
        (user(ImagePart(data=PNG)), "media_type"),
        (user(ImagePart()), "neither data nor url"),
        (user(ImagePart(url="ftp://example.com/a.png")), "scheme"),
        (user(ImagePart(url="data:image/png,notbase64")), "base64"),
        (user(FilePart(file_id="file-openai-123")), "Files API"),
        (Message("system", [ImagePart(data=PNG, media_type="image/png")]), "text only"),
        (Message("tool", [ImagePart(data=PNG, media_type="image/png")]), "text only"),
    ],
)
def test_parts_gemini_cannot_take_are_refused_clearly(message: Message, needle: str) -> None:
    messages = [message]
    if message.role == "tool":
        call = ToolCall(id="c1", name="look")
        messages = [Message("user", "q"), Message("assistant", "", tool_calls=[call])]
        messages.append(Message("tool", message.content, tool_call_id="c1"))
    assert needle in refused(ask(*messages))


def test_signed_url_query_is_not_echoed_in_a_refusal() -> None:
    message = refused(ask(user(ImagePart(url="https://s3.example.com/x?X-Amz-Signature=SECRET"))))
    assert "SECRET" not in message


def test_text_parts_of_system_and_tool_messages_are_text() -> None:
    body = build(
        ask(
            Message("system", [TextPart(text="Be "), TextPart(text="brief.")]),
            Message("user", "q"),
            Message("assistant", "", tool_calls=[ToolCall(id="c1", name="look")]),
            Message("tool", [TextPart(text='{"ok": true}')], tool_call_id="c1"),
        )
    )
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["contents"][2]["parts"] == [
        {"functionResponse": {"name": "look", "response": {"ok": True}}}
    ]


# --------------------------------------------------------------------------- structured output


def test_json_object_sets_the_json_mime_type() -> None:
    body = build(ask(Message("user", "q"), response_format=ResponseFormat(type="json_object")))
    assert body["generationConfig"] == {"responseMimeType": "application/json"}
    body = build(ask(Message("user", "q"), response_format=ResponseFormat(type="text")))
    assert "generationConfig" not in body


def test_json_schema_is_sent_whole_as_response_json_schema() -> None:
    schema = {
        "type": "object",
        "properties": {"step": {"$ref": "#/$defs/step"}},
        "required": ["step"],
        "additionalProperties": False,
        "$defs": {"step": {"type": "string"}},
    }
    response_format = ResponseFormat(
        type="json_schema",
        json_schema={"name": "plan", "strict": True, "schema": schema, "description": "A plan"},
    )
    body = build(ask(Message("user", "q"), response_format=response_format))
    assert body["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseJsonSchema": {**schema, "description": "A plan"},
    }
    assert "responseSchema" not in body["generationConfig"]
    missing = ResponseFormat(type="json_schema", json_schema={"name": "x"})
    assert "schema" in refused(ask(Message("user", "q"), response_format=missing))


# --------------------------------------------------------------------------- reasoning


@pytest.mark.parametrize(
    ("effort", "config"),
    [
        ("none", {"thinkingBudget": 0}),
        ("minimal", {"thinkingBudget": 1024, "includeThoughts": True}),
        ("low", {"thinkingBudget": 1024, "includeThoughts": True}),
        ("medium", {"thinkingBudget": 8192, "includeThoughts": True}),
        ("high", {"thinkingBudget": 24576, "includeThoughts": True}),
    ],
)
def test_reasoning_effort_is_a_thinking_budget(effort: str, config: dict[str, Any]) -> None:
    body = build(ask(Message("user", "q"), reasoning_effort=effort))
    assert body["generationConfig"] == {"thinkingConfig": config}


def test_an_unknown_reasoning_effort_is_refused() -> None:
    assert "reasoning_effort" in refused(ask(Message("user", "q"), reasoning_effort="extreme"))


def thinking_answer() -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "The user wants ", "thought": True},
                        {"text": "the weather.", "thought": True, "thoughtSignature": SIG_THOUGHT},
                        {"text": "Looking it up."},
                        {
                            "functionCall": {"name": "weather", "args": {"city": "Rome"}},
                            "thoughtSignature": SIG_CALL,
                        },
                        {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}},
                    ],
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 100,
            "candidatesTokenCount": 10,
            "thoughtsTokenCount": 30,
            "cachedContentTokenCount": 64,
            "totalTokenCount": 140,
        },
    }


def test_thought_parts_are_reasoning_with_signed_thinking_blocks() -> None:
    response = parse(thinking_answer())
    assert response.content == "Looking it up."
    assert response.reasoning == "The user wants the weather."
    assert response.thinking == [
        ThinkingBlock(text="The user wants ", protocol="gemini"),
        ThinkingBlock(text="the weather.", signature=SIG_THOUGHT, protocol="gemini"),
        ThinkingBlock(signature=SIG_CALL, protocol="gemini"),
    ]
    assert [c.name for c in response.tool_calls] == ["weather", "weather"]
    assert response.finish_reason == "tool_calls"
    assert response.usage == Usage(
        prompt_tokens=100,
        completion_tokens=40,
        total_tokens=140,
        cached_tokens=64,
        reasoning_tokens=30,
    )


def test_signatures_go_back_where_gemini_put_them_in_a_function_call_round_trip() -> None:
    answer = parse(thinking_answer())
    turn = Message(
        "assistant",
        answer.content,
        tool_calls=answer.tool_calls,
        reasoning=answer.reasoning,
        thinking=[
            *answer.thinking,
            ThinkingBlock(text="other", signature="x", protocol="anthropic"),
        ],
    )
    body = build(
        ask(
            Message("user", "Weather in Rome and Oslo?"),
            turn,
            Message("tool", '{"c": 20}', tool_call_id="call_0"),
            Message("tool", '{"c": 5}', tool_call_id="call_1"),
        )
    )
    assert body["contents"][1] == {
        "role": "model",
        "parts": [
            {"text": "The user wants ", "thought": True},
            {"text": "the weather.", "thought": True, "thoughtSignature": SIG_THOUGHT},
            {"text": "Looking it up."},
            {
                "functionCall": {"name": "weather", "args": {"city": "Rome"}},
                "thoughtSignature": SIG_CALL,
            },
            {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}},
        ],
    }
    assert [p["functionResponse"]["name"] for p in body["contents"][2]["parts"]] == [
        "weather",
        "weather",
    ]


def test_a_text_answers_signature_goes_back_on_its_last_part() -> None:
    answer = parse(
        {
            "candidates": [
                {
                    "content": {"parts": [{"text": "Hello.", "thoughtSignature": SIG_TEXT}]},
                    "finishReason": "STOP",
                }
            ]
        }
    )
    assert answer.thinking == [ThinkingBlock(signature=SIG_TEXT, protocol="gemini")]
    turn = Message("assistant", answer.content, thinking=answer.thinking)
    body = build(ask(Message("user", "hi"), turn, Message("user", "and?")))
    assert body["contents"][1]["parts"] == [{"text": "Hello.", "thoughtSignature": SIG_TEXT}]


def test_reasoning_and_blocks_of_other_protocols_are_not_sent_to_gemini() -> None:
    turn = Message(
        "assistant",
        "Hi.",
        reasoning="mine",
        thinking=[ThinkingBlock(text="t", signature="s", protocol="anthropic")],
    )
    body = build(ask(Message("user", "hi"), turn, Message("user", "and?")))
    assert body["contents"][1]["parts"] == [{"text": "Hi."}]


# --------------------------------------------------------------------------- sampling fields


def test_seed_n_penalties_and_logprobs_are_generation_config() -> None:
    body = build(
        ask(
            Message("user", "q"),
            seed=42,
            n=3,
            frequency_penalty=0.5,
            presence_penalty=-0.25,
            logprobs=True,
            top_logprobs=4,
        )
    )
    assert body["generationConfig"] == {
        "candidateCount": 3,
        "seed": 42,
        "frequencyPenalty": 0.5,
        "presencePenalty": -0.25,
        "responseLogprobs": True,
        "logprobs": 4,
    }


def test_n_above_one_cannot_be_streamed() -> None:
    assert "n > 1" in refused(ask(Message("user", "q"), n=2), stream=True)
    body = build(ask(Message("user", "q"), n=1), stream=True)
    assert body["generationConfig"] == {"candidateCount": 1}


RATING = {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}
PROMPT_RATING = {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "LOW"}


def candidates_answer() -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": "Hi"}]},
                "finishReason": "STOP",
                "safetyRatings": [RATING],
                "avgLogprobs": -0.1,
                "logprobsResult": {
                    "topCandidates": [
                        {
                            "candidates": [
                                {"token": "Hi", "tokenId": 1, "logProbability": -0.1},
                                {"token": "Hey", "tokenId": 2, "logProbability": -2.5},
                            ]
                        }
                    ],
                    "chosenCandidates": [{"token": "Hi", "tokenId": 1, "logProbability": -0.1}],
                },
            },
            {
                "content": {"role": "model", "parts": [{"text": "Hello"}]},
                "finishReason": "MAX_TOKENS",
                "index": 1,
            },
            {"finishReason": "SAFETY", "index": 2, "safetyRatings": [RATING]},
        ],
        "promptFeedback": {"safetyRatings": [PROMPT_RATING]},
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5},
    }


def test_every_candidate_is_a_choice_and_the_first_fills_the_response() -> None:
    response = parse(candidates_answer())
    assert [(c.index, c.content, c.finish_reason) for c in response.choices] == [
        (0, "Hi", "stop"),
        (1, "Hello", "length"),
        (2, "", "content_filter"),
    ]
    assert (response.content, response.finish_reason) == ("Hi", "stop")
    hi = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}
    hey = {"token": "Hey", "logprob": -2.5, "bytes": [72, 101, 121]}
    expected = {"content": [{**hi, "top_logprobs": [hi, hey]}], "refusal": None}
    assert response.logprobs == expected
    assert response.choices[0].logprobs == expected
    assert response.choices[1].logprobs is None
    assert response.provider_fields == {
        "safety_ratings": [RATING],
        "prompt_safety_ratings": [PROMPT_RATING],
        "choice_safety_ratings": [[RATING], None, [RATING]],
    }


def test_one_candidate_is_no_choices_list_and_all_blocked_is_content_filter() -> None:
    response = parse({"candidates": [{"content": {"parts": [{"text": "x"}]}}]})
    assert response.choices is None
    assert response.provider_fields == {}
    with pytest.raises(ProviderError) as info:
        parse({"candidates": [{"finishReason": "SAFETY"}, {"finishReason": "RECITATION"}]})
    assert info.value.kind == "content_filter"


# --------------------------------------------------------------------------- streams


def test_stream_thoughts_signatures_logprobs_ratings_and_usage() -> None:
    chunks = feed(
        [
            {"promptFeedback": {"safetyRatings": [PROMPT_RATING]}},
            {"candidates": [{"content": {"parts": [{"text": "Plan: ", "thought": True}]}}]},
            {
                "candidates": [
                    {
                        "content": {
                            "parts": [
                                {"text": "look.", "thought": True, "thoughtSignature": SIG_THOUGHT}
                            ]
                        }
                    }
                ]
            },
            {
                "candidates": [
                    {
                        "content": {"parts": [{"text": "Sunny"}]},
                        "safetyRatings": [RATING],
                        "logprobsResult": {
                            "chosenCandidates": [{"token": "Sunny", "logProbability": -0.5}]
                        },
                    }
                ]
            },
            {
                "candidates": [
                    {
                        "content": {"parts": [{"text": "", "thoughtSignature": SIG_TEXT}]},
                        "safetyRatings": [RATING],
                        "finishReason": "STOP",
                    }
                ],
                "usageMetadata": {
                    "promptTokenCount": 5,
                    "candidatesTokenCount": 1,
                    "thoughtsTokenCount": 3,
                    "cachedContentTokenCount": 2,
                    "totalTokenCount": 9,
                },
            },
        ]
    )
    assert "".join(c.text for c in chunks) == "Sunny"
    assert "".join(c.reasoning for c in chunks) == "Plan: look."
    assert [b for c in chunks for b in c.thinking or ()] == [
        ThinkingBlock(text="Plan: look.", signature=SIG_THOUGHT, protocol="gemini"),
        ThinkingBlock(signature=SIG_TEXT, protocol="gemini"),
    ]
    assert [c.logprobs for c in chunks if c.logprobs] == [
        {
            "content": [
                {"token": "Sunny", "logprob": -0.5, "bytes": list(b"Sunny"), "top_logprobs": []}
            ],
            "refusal": None,
        }
    ]
    # Provider fields come once each, when they first appear (or change).
    assert [c.provider_fields for c in chunks if c.provider_fields] == [
        {"prompt_safety_ratings": [PROMPT_RATING]},
        {"safety_ratings": [RATING]},
    ]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage == Usage(
        prompt_tokens=5, completion_tokens=4, total_tokens=9, cached_tokens=2, reasoning_tokens=3
    )


def test_stream_unsigned_thoughts_become_a_block_at_the_end() -> None:
    chunks = feed(
        [
            {"candidates": [{"content": {"parts": [{"text": "Hm.", "thought": True}]}}]},
            {"candidates": [{"content": {"parts": [{"text": "Yes"}]}, "finishReason": "STOP"}]},
        ]
    )
    assert chunks[0].reasoning == "Hm." and chunks[0].text == "" and chunks[0].has_content
    assert chunks[-1].thinking == [ThinkingBlock(text="Hm.", protocol="gemini")]


# --------------------------------------------------------------------------- emulator shapes


def test_emulator_parse_takes_media_and_thought_parts() -> None:
    body = {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "look at this"},
                    {"inlineData": {"mimeType": "image/png", "data": PNG}},
                    {"file_data": {"mime_type": "application/pdf", "file_uri": "gs://b/d"}},
                ],
            },
            {"role": "model", "parts": [{"text": "hm", "thought": True, "thoughtSignature": "s"}]},
            {"role": "user", "parts": [{"text": "well?"}]},
        ],
        "generationConfig": {
            "responseMimeType": "application/json",
            "responseJsonSchema": {"type": "object"},
        },
    }
    parsed = parse_gemini(body, "m", stream=False)
    assert parsed.last_user_text == "well?"
    assert parsed.prompt_tokens > 2 * 258


@pytest.mark.parametrize(
    "body",
    [
        {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png"}}]}]},
        {"contents": [{"parts": [{"inline_data": {"data": PNG}}]}]},
        {"contents": [{"parts": [{"fileData": {"mimeType": "image/png"}}]}]},
        {
            "contents": [{"parts": [{"text": "q"}]}],
            "generationConfig": {"responseJsonSchema": {"type": "object"}},
        },
    ],
)
def test_emulator_refuses_malformed_media_and_schema_without_json(body: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        parse_gemini(body, "m", stream=False)


def test_emulator_renders_reasoning_as_a_thought_part_first() -> None:
    usage = Usage(prompt_tokens=2, completion_tokens=1, total_tokens=3)
    answer = Answer("Hi", [], "stop", None, usage, None, "deep thought")
    payload = gemini_json(answer, "m")
    assert payload["candidates"][0]["content"]["parts"] == [
        {"text": "deep thought", "thought": True},
        {"text": "Hi"},
    ]
    assert payload["usageMetadata"]["thoughtsTokenCount"] == 2
    assert payload["usageMetadata"]["totalTokenCount"] == 5
    frames = [msgspec.json.decode(f.data) for f in gemini_frames(answer, "m")]
    parts = [p for f in frames for p in f["candidates"][0]["content"]["parts"]]
    assert parts[:3] == [
        {"text": "deep ", "thought": True},
        {"text": "thought", "thought": True},
        {"text": "Hi"},
    ]


# --------------------------------------------------------------------------- end to end


@asynccontextmanager
async def rig() -> AsyncIterator[tuple[Emulator, Router]]:
    async with Emulator.serve(port=0) as emu:
        config = RouterConfig.from_dict(
            {
                "router": {"timeout": 5.0, "attempt_timeout": 2.0, "retry_jitter": 0.0},
                "providers": [
                    {
                        "name": "g",
                        "kind": "gemini",
                        "base_url": emu.url,
                        "keys": [{"id": "a", "secret": "gk-test"}],
                    }
                ],
                "models": [{"name": "main", "provider": "g", "upstream": "gemini-2.5-flash"}],
            }
        )
        async with Router.open(config) as router:
            yield emu, router
        assert emu.errors == []


def req(*messages: Message, **fields: Any) -> ChatRequest:
    return ChatRequest(model="main", messages=list(messages), **fields)


async def test_an_image_part_reaches_gemini_as_inline_data() -> None:
    async with rig() as (emu, router):
        image = ImagePart(data=PNG, media_type="image/png")
        response = await router.submit(req(user(TextPart(text="What is it?"), image)))
        assert response.content == "echo: What is it?"
        [call] = emu.calls
        assert call.body["contents"][0]["parts"] == [
            {"text": "What is it?"},
            {"inlineData": {"mimeType": "image/png", "data": PNG}},
        ]


async def test_a_json_schema_request_carries_the_mime_type_and_the_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    response_format = ResponseFormat(
        type="json_schema", json_schema={"name": "s", "schema": schema}
    )
    async with rig() as (emu, router):
        emu.script(Fault(reply='{"a": 1}'))
        response = await router.submit(req(Message("user", "q"), response_format=response_format))
        assert response.content == '{"a": 1}'
        config = emu.calls[0].body["generationConfig"]
        assert config["responseMimeType"] == "application/json"
        assert config["responseJsonSchema"] == schema


async def test_a_thought_part_comes_back_as_reasoning_not_content() -> None:
    async with rig() as (emu, router):
        emu.script(Fault(reply="Paris.", reasoning="The capital of France"))
        response = await router.submit(req(Message("user", "Capital?"), reasoning_effort="low"))
        assert response.content == "Paris."
        assert response.reasoning == "The capital of France"
        assert response.usage.reasoning_tokens == 4
        config = emu.calls[0].body["generationConfig"]
        assert config["thinkingConfig"] == {"thinkingBudget": 1024, "includeThoughts": True}

        emu.script(Fault(reply="Paris.", reasoning="The capital of France"))
        chunks: list[StreamChunk] = []
        async with router.stream(req(Message("user", "Capital?"))) as stream:
            async for chunk in stream:
                chunks.append(chunk)
        assert "".join(c.text for c in chunks) == "Paris."
        assert "".join(c.reasoning for c in chunks) == "The capital of France"


async def test_candidate_count_two_gives_two_choices() -> None:
    body = {
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": "One"}]}, "finishReason": "STOP"},
            {
                "content": {"role": "model", "parts": [{"text": "Two"}]},
                "finishReason": "STOP",
                "index": 1,
            },
        ],
        "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": 2, "totalTokenCount": 4},
        "modelVersion": "gemini-2.5-flash",
    }
    async with rig() as (emu, router):
        emu.script(Fault(body=body))
        response = await router.submit(req(Message("user", "q"), n=2, seed=7))
        assert emu.calls[0].body["generationConfig"] == {"candidateCount": 2, "seed": 7}
        assert response.choices is not None
        assert [c.content for c in response.choices] == ["One", "Two"]
        assert response.content == "One"


async def test_a_thought_signature_survives_a_tool_round_trip_through_the_router() -> None:
    signed = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"functionCall": {"name": "look", "args": {}}, "thoughtSignature": SIG_CALL}
                    ],
                },
                "finishReason": "STOP",
            }
        ]
    }
    async with rig() as (emu, router):
        emu.script(Fault(body=signed))
        first = await router.submit(req(Message("user", "q")))
        assert first.thinking == [ThinkingBlock(signature=SIG_CALL, protocol="gemini")]
        turn = Message("assistant", "", tool_calls=first.tool_calls, thinking=first.thinking)
        result = Message("tool", "found", tool_call_id=first.tool_calls[0].id)
        await router.submit(req(Message("user", "q"), turn, result))
        assert emu.calls[1].body["contents"][1]["parts"] == [
            {"functionCall": {"name": "look", "args": {}}, "thoughtSignature": SIG_CALL}
        ]
