"""The loopback provider emulator, driven over real sockets with plain httpx.

Real time throughout (real sockets are involved), so latencies are kept tiny.
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import h11
import httpx
import pytest
import trio

from router._types import ToolCall, Usage
from router.emulator import Emulator, EmulatorCall, Fault

Json = dict[str, Any]


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator.serve(host="127.0.0.1", port=0) as emulator:
        yield emulator
        assert emulator.errors == []


@pytest.fixture
async def client(emu: Emulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emu.url, timeout=5.0) as http:
        yield http


# --------------------------------------------------------------------------- protocol helpers


@dataclass
class Streamed:
    """A stream as a client sees it."""

    text: str = ""
    finish: str | None = None
    end_marker: bool = False
    usage: Json | None = None
    comments: list[str] = field(default_factory=list)
    events: list[tuple[str | None, str]] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    errors: list[Json] = field(default_factory=list)
    tool_args: dict[int, str] = field(default_factory=dict)


class Proto:
    name: str
    model: str
    headers: dict[str, str]

    def path(self, stream: bool = False) -> str:
        raise NotImplementedError

    def body(self, text: str = "hello world", stream: bool = False, **extra: Any) -> Json:
        raise NotImplementedError

    def text(self, answer: Json) -> str:
        raise NotImplementedError

    def finish(self, answer: Json) -> str:
        raise NotImplementedError

    def absorb(self, out: Streamed, event: str | None, data: Json) -> None:
        raise NotImplementedError


class OpenAI(Proto):
    name, model = "openai", "gpt-x"
    headers = {"authorization": "Bearer k1"}  # noqa: RUF012

    def path(self, stream: bool = False) -> str:
        return "/v1/chat/completions"

    def body(self, text: str = "hello world", stream: bool = False, **extra: Any) -> Json:
        body: Json = {"model": self.model, "messages": [{"role": "user", "content": text}]}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body | extra

    def text(self, answer: Json) -> str:
        return str(answer["choices"][0]["message"]["content"])

    def finish(self, answer: Json) -> str:
        return str(answer["choices"][0]["finish_reason"])

    def absorb(self, out: Streamed, event: str | None, data: Json) -> None:
        if "error" in data:
            out.errors.append(data)
            return
        if data.get("usage"):
            out.usage = data["usage"]
        for choice in data["choices"]:
            delta = choice["delta"]
            out.text += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                args = call.get("function", {}).get("arguments", "")
                out.tool_args[call["index"]] = out.tool_args.get(call["index"], "") + args
            if choice["finish_reason"] is not None:
                out.finish = choice["finish_reason"]


class Anthropic(Proto):
    name, model = "anthropic", "claude-x"
    headers = {"x-api-key": "k1", "anthropic-version": "2023-06-01"}  # noqa: RUF012

    def path(self, stream: bool = False) -> str:
        return "/v1/messages"

    def body(self, text: str = "hello world", stream: bool = False, **extra: Any) -> Json:
        body: Json = {
            "model": self.model,
            "max_tokens": 100,
            "messages": [{"role": "user", "content": text}],
        }
        if stream:
            body["stream"] = True
        return body | extra

    def text(self, answer: Json) -> str:
        return "".join(b["text"] for b in answer["content"] if b["type"] == "text")

    def finish(self, answer: Json) -> str:
        return str(answer["stop_reason"])

    def absorb(self, out: Streamed, event: str | None, data: Json) -> None:
        assert event == data["type"]
        if event == "error":
            out.errors.append(data)
        elif event == "content_block_delta":
            delta = data["delta"]
            if delta["type"] == "text_delta":
                out.text += delta["text"]
            else:
                index = data["index"]
                out.tool_args[index] = out.tool_args.get(index, "") + delta["partial_json"]
        elif event == "message_delta":
            out.finish = data["delta"]["stop_reason"]
            out.usage = data["usage"]
        elif event == "message_stop":
            out.end_marker = True


class Gemini(Proto):
    name, model = "gemini", "gem-x"
    headers = {"x-goog-api-key": "k1"}  # noqa: RUF012

    def path(self, stream: bool = False) -> str:
        if stream:
            return f"/v1beta/models/{self.model}:streamGenerateContent?alt=sse"
        return f"/v1beta/models/{self.model}:generateContent"

    def body(self, text: str = "hello world", stream: bool = False, **extra: Any) -> Json:
        return {"contents": [{"role": "user", "parts": [{"text": text}]}]} | extra

    def text(self, answer: Json) -> str:
        parts = answer["candidates"][0]["content"]["parts"]
        return "".join(p.get("text", "") for p in parts)

    def finish(self, answer: Json) -> str:
        return str(answer["candidates"][0]["finishReason"])

    def absorb(self, out: Streamed, event: str | None, data: Json) -> None:
        if "error" in data:
            out.errors.append(data)
            return
        candidate = data["candidates"][0]
        out.text += self.text(data)
        if "finishReason" in candidate:
            out.finish = candidate["finishReason"]
        if "usageMetadata" in data:
            out.usage = data["usageMetadata"]


OPENAI, ANTHROPIC, GEMINI = OpenAI(), Anthropic(), Gemini()
PROTOS = [OPENAI, ANTHROPIC, GEMINI]
by_name = pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)


async def post(client: httpx.AsyncClient, proto: Proto, **body: Any) -> httpx.Response:
    return await client.post(proto.path(), headers=proto.headers, json=proto.body(**body))


async def read_stream(response: httpx.Response, proto: Proto) -> Streamed:
    """Parse an SSE response the way a careful client does (comments skipped)."""
    out = Streamed()
    event: str | None = None
    data_lines: list[str] = []

    def dispatch() -> None:
        nonlocal event
        if data_lines:
            data = "\n".join(data_lines)
            out.events.append((event, data))
            if data == "[DONE]":
                out.end_marker = True
            else:
                try:
                    decoded = json.loads(data)
                except json.JSONDecodeError:
                    out.invalid.append(data)
                else:
                    proto.absorb(out, event, decoded)
        event = None
        data_lines.clear()

    async for line in response.aiter_lines():
        if line == "":
            dispatch()
        elif line.startswith(":"):
            out.comments.append(line[1:].strip())
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data_lines.append(line[5:].strip())
    dispatch()
    return out


async def stream(
    client: httpx.AsyncClient, proto: Proto, text: str = "hello world", **extra: Any
) -> tuple[httpx.Response, Streamed]:
    body = proto.body(text, stream=True, **extra)
    async with client.stream("POST", proto.path(True), headers=proto.headers, json=body) as r:
        return r, await read_stream(r, proto)


async def wait_for(predicate: Any) -> None:
    """Poll the emulator's records (they are plain attributes, not events) for up to 2 s."""
    with trio.fail_after(2.0):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


# --------------------------------------------------------------------------- normal answers


async def test_openai_answer(emu: Emulator, client: httpx.AsyncClient) -> None:
    r = await post(client, OPENAI, text="hello world")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "gpt-x"
    assert answer["id"].startswith("chatcmpl-")
    assert isinstance(answer["created"], int)
    choice = answer["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "echo: hello world"
    assert choice["finish_reason"] == "stop"
    assert answer["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}

    [call] = emu.calls
    assert isinstance(call, EmulatorCall)
    assert (call.protocol, call.path, call.key, call.model) == (
        "openai",
        "/v1/chat/completions",
        "k1",
        "gpt-x",
    )
    assert call.stream is False
    assert call.body["messages"][0]["content"] == "hello world"
    assert call.completed and not call.disconnected
    assert call.status == 200
    assert call.time <= trio.current_time()


async def test_openai_prompt_counts_all_messages_and_echoes_last_user(
    client: httpx.AsyncClient,
) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "tool says hi"},
    ]
    r = await client.post(
        "/proxy/v1/chat/completions",  # a base-path prefix is accepted
        headers=OPENAI.headers,
        json={"model": "m", "messages": messages, "max_completion_tokens": 50},
    )
    answer = r.json()
    assert answer["choices"][0]["message"]["content"] == "echo: first question"
    assert answer["usage"]["prompt_tokens"] == (2 + 4) + (2 + 4) + 4 + (3 + 4)


async def test_openai_stream_shape(emu: Emulator, client: httpx.AsyncClient) -> None:
    r, out = await stream(client, OPENAI)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert out.comments == ["keep-alive"]
    chunks = [json.loads(d) for _, d in out.events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:4]]
    assert pieces == ["echo: ", "hello ", "world"]
    assert chunks[4]["choices"][0]["finish_reason"] == "stop"
    assert chunks[5]["choices"] == []
    assert chunks[5]["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}
    assert out.events[-1] == (None, "[DONE]")
    assert out.text == "echo: hello world" and out.finish == "stop" and out.end_marker
    assert emu.calls[-1].stream and emu.calls[-1].completed

    # Without stream_options.include_usage there is no usage chunk.
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        out = await read_stream(r, OPENAI)
    assert out.usage is None and out.end_marker
    assert all(json.loads(d)["choices"] for _, d in out.events[:-1])


async def test_openai_max_tokens_and_stop(client: httpx.AsyncClient) -> None:
    answer = (await post(client, OPENAI, text="one two three", max_tokens=2)).json()
    assert OPENAI.text(answer) == "echo: one"
    assert OPENAI.finish(answer) == "length"
    assert answer["usage"]["completion_tokens"] == 2

    answer = (await post(client, OPENAI, text="one two three", stop=["thr"])).json()
    assert OPENAI.text(answer) == "echo: one two "
    assert OPENAI.finish(answer) == "stop"

    _, out = await stream(client, OPENAI, text="one two three", max_tokens=3)
    assert out.text == "echo: one two" and out.finish == "length" and out.end_marker


async def test_openai_tool_calls(emu: Emulator, client: httpx.AsyncClient) -> None:
    calls = [
        ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),
        ToolCall(id="call_2", name="get_time", arguments="{}"),
    ]
    emu.script([Fault(tool_calls=calls), Fault(tool_calls=calls)])
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    answer = (await post(client, OPENAI, tools=tools, tool_choice="auto")).json()
    message = answer["choices"][0]["message"]
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    assert message["content"] is None
    assert message["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]

    _, out = await stream(client, OPENAI, tools=tools)
    assert out.finish == "tool_calls" and out.end_marker
    assert out.tool_args == {0: '{"city": "Paris"}', 1: "{}"}
    chunks = [json.loads(d) for _, d in out.events[:-1]]
    deltas = [choice["delta"] for chunk in chunks for choice in chunk["choices"]]
    pieces = [c for delta in deltas for c in delta.get("tool_calls", [])]
    firsts = [c for c in pieces if "id" in c]
    assert [(f["index"], f["id"], f["type"], f["function"]["name"]) for f in firsts] == [
        (0, "call_1", "function", "get_weather"),
        (1, "call_2", "function", "get_time"),
    ]


async def test_anthropic_answer(emu: Emulator, client: httpx.AsyncClient) -> None:
    body = ANTHROPIC.body(system=[{"type": "text", "text": "be brief"}], temperature=0.2)
    r = await client.post("/v1/messages", headers=ANTHROPIC.headers, json=body)
    assert r.status_code == 200 and "request-id" in r.headers
    answer = r.json()
    assert answer["type"] == "message" and answer["role"] == "assistant"
    assert answer["id"].startswith("msg_")
    assert answer["model"] == "claude-x"
    assert answer["content"] == [{"type": "text", "text": "echo: hello world"}]
    assert answer["stop_reason"] == "end_turn" and answer["stop_sequence"] is None
    assert answer["usage"] == {"input_tokens": 12, "output_tokens": 3}
    call = emu.calls[-1]
    assert (call.protocol, call.key, call.model, call.stream) == (
        "anthropic",
        "k1",
        "claude-x",
        False,
    )

    answer = (await post(client, ANTHROPIC, text="a b c", max_tokens=2)).json()
    assert ANTHROPIC.text(answer) == "echo: a" and answer["stop_reason"] == "max_tokens"

    answer = (await post(client, ANTHROPIC, text="a b STOP c", stop_sequences=["STOP"])).json()
    assert ANTHROPIC.text(answer) == "echo: a b "
    assert answer["stop_reason"] == "stop_sequence" and answer["stop_sequence"] == "STOP"

    # Tool results in the last user turn: the echo is of the last user *text*.
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "weather please"}]},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}],
        },
    ]
    body = {"model": "c", "max_tokens": 10, "messages": messages}
    answer = (await client.post("/v1/messages", headers=ANTHROPIC.headers, json=body)).json()
    assert ANTHROPIC.text(answer) == "echo: weather please"
    assert answer["usage"]["input_tokens"] == (2 + 4) + 4 + (1 + 4)


async def test_anthropic_stream_shape(emu: Emulator, client: httpx.AsyncClient) -> None:
    r, out = await stream(client, ANTHROPIC)
    assert r.headers["content-type"] == "text/event-stream"
    assert out.comments == ["keep-alive"]
    names = [name for name, _ in out.events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = json.loads(out.events[0][1])["message"]
    assert start["role"] == "assistant" and start["content"] == []
    assert start["usage"]["input_tokens"] == 6
    assert out.text == "echo: hello world" and out.finish == "end_turn" and out.end_marker
    assert out.usage == {"output_tokens": 3}


async def test_anthropic_tool_use(emu: Emulator, client: httpx.AsyncClient) -> None:
    call = ToolCall(id="toolu_1", name="lookup", arguments='{"q": "trio"}')
    emu.script([Fault(reply="Let me look.", tool_calls=[call])] * 2)
    tools = [{"name": "lookup", "description": "d", "input_schema": {"type": "object"}}]
    answer = (await post(client, ANTHROPIC, tools=tools)).json()
    assert answer["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "trio"}},
    ]
    assert answer["stop_reason"] == "tool_use"

    _, out = await stream(client, ANTHROPIC, tools=tools)
    assert out.text == "Let me look." and out.finish == "tool_use" and out.end_marker
    assert json.loads(out.tool_args[1]) == {"q": "trio"}
    starts = [json.loads(d) for name, d in out.events if name == "content_block_start"]
    assert starts[1]["content_block"] == {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "lookup",
        "input": {},
    }


async def test_anthropic_validation_and_count_tokens(
    emu: Emulator, client: httpx.AsyncClient
) -> None:
    r = await client.post("/v1/messages", headers={"x-api-key": "k1"}, json=ANTHROPIC.body())
    assert r.status_code == 400
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "anthropic-version" in error["error"]["message"]

    body = ANTHROPIC.body()
    del body["max_tokens"]
    r = await client.post("/v1/messages", headers=ANTHROPIC.headers, json=body)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]

    body = {
        "model": "claude-x",
        "system": "be brief",
        "messages": [ANTHROPIC.body()["messages"][0]],
    }
    r = await client.post("/v1/messages/count_tokens", headers=ANTHROPIC.headers, json=body)
    assert r.status_code == 200 and r.json() == {"input_tokens": 12}
    call = emu.calls[-1]
    assert (call.protocol, call.model, call.key) == ("anthropic_count", "claude-x", "k1")

    emu.script(Fault(status=529), model="claude-x")
    r = await client.post("/v1/messages/count_tokens", headers=ANTHROPIC.headers, json=body)
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"


async def test_gemini_answer(emu: Emulator, client: httpx.AsyncClient) -> None:
    body = GEMINI.body(
        systemInstruction={"parts": [{"text": "be brief"}]},
        generationConfig={"temperature": 0.1, "topP": 0.9},
    )
    r = await client.post(GEMINI.path(), headers=GEMINI.headers, json=body)
    answer = r.json()
    candidate = answer["candidates"][0]
    assert candidate["content"] == {"role": "model", "parts": [{"text": "echo: hello world"}]}
    assert candidate["finishReason"] == "STOP"
    assert answer["usageMetadata"] == {
        "promptTokenCount": 12,
        "candidatesTokenCount": 3,
        "totalTokenCount": 15,
    }
    call = emu.calls[-1]
    assert (call.protocol, call.key, call.model, call.stream) == ("gemini", "k1", "gem-x", False)

    # Key in the query string; maxOutputTokens truncates.
    r = await client.post(
        "/v1beta/models/gem-y:generateContent?key=qkey",
        json=GEMINI.body("a b c", generationConfig={"maxOutputTokens": 1}),
    )
    answer = r.json()
    assert GEMINI.text(answer) == "echo:" and GEMINI.finish(answer) == "MAX_TOKENS"
    assert (emu.calls[-1].key, emu.calls[-1].model) == ("qkey", "gem-y")

    emu.script(Fault(tool_calls=[ToolCall(id="x", name="f", arguments='{"a": [1]}')]))
    answer = (await post(client, GEMINI)).json()
    assert answer["candidates"][0]["content"]["parts"] == [
        {"functionCall": {"name": "f", "args": {"a": [1]}}}
    ]
    assert GEMINI.finish(answer) == "STOP"


async def test_gemini_stream_shape(emu: Emulator, client: httpx.AsyncClient) -> None:
    async with client.stream(
        "POST", GEMINI.path(True), headers=GEMINI.headers, json=GEMINI.body()
    ) as r:
        raw = await r.aread()
    assert r.headers["content-type"] == "text/event-stream"
    blocks = raw.split(b"\r\n\r\n")
    assert blocks[0] == b": keep-alive" and blocks[-1] == b""
    chunks = [json.loads(b.removeprefix(b"data: ")) for b in blocks[1:-1]]
    assert [GEMINI.text(c) for c in chunks] == ["echo: ", "hello ", "world", ""]
    assert all("finishReason" not in c["candidates"][0] for c in chunks[:-1])
    assert all("usageMetadata" not in c for c in chunks[:-1])
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert chunks[-1]["usageMetadata"]["totalTokenCount"] == 9
    assert emu.calls[-1].stream

    # Without alt=sse, Gemini streams one JSON array.
    path = "/v1beta/models/gem-x:streamGenerateContent"
    r = await client.post(path, headers=GEMINI.headers, json=GEMINI.body())
    array = r.json()
    assert [GEMINI.text(c) for c in array] == ["echo: ", "hello ", "world", ""]


# --------------------------------------------------------------------------- faults: errors

ERROR_CASES = [
    (OPENAI, 429, None, lambda b: b["error"]["code"] == "rate_limit_exceeded"),
    (OPENAI, 429, "quota", lambda b: b["error"]["code"] == "insufficient_quota"),
    (OPENAI, 402, None, lambda b: b["error"]["code"] == "insufficient_quota"),
    (OPENAI, 404, None, lambda b: b["error"]["code"] == "model_not_found"),
    (OPENAI, 401, None, lambda b: b["error"]["code"] == "invalid_api_key"),
    (OPENAI, 400, "context_length", lambda b: b["error"]["code"] == "context_length_exceeded"),
    (OPENAI, 500, None, lambda b: b["error"]["type"] == "server_error"),
    (ANTHROPIC, 429, None, lambda b: b["error"]["type"] == "rate_limit_error"),
    (ANTHROPIC, 529, None, lambda b: b["error"]["type"] == "overloaded_error"),
    (ANTHROPIC, 401, None, lambda b: b["error"]["type"] == "authentication_error"),
    (ANTHROPIC, 404, None, lambda b: b["error"]["type"] == "not_found_error"),
    (
        ANTHROPIC,
        400,
        "context_length",
        lambda b: (
            b["error"]["type"] == "invalid_request_error"
            and "prompt is too long" in b["error"]["message"]
        ),
    ),
    (GEMINI, 429, None, lambda b: b["error"]["status"] == "RESOURCE_EXHAUSTED"),
    (GEMINI, 401, None, lambda b: b["error"]["status"] == "UNAUTHENTICATED"),
    (GEMINI, 404, None, lambda b: b["error"]["status"] == "NOT_FOUND"),
    (GEMINI, 400, None, lambda b: b["error"]["status"] == "INVALID_ARGUMENT"),
    (GEMINI, 503, None, lambda b: b["error"]["status"] == "UNAVAILABLE"),
]


@pytest.mark.parametrize(
    ("proto", "status", "kind", "check"),
    ERROR_CASES,
    ids=[f"{p.name}-{s}-{k}" for p, s, k, _ in ERROR_CASES],
)
async def test_default_error_bodies(
    emu: Emulator,
    client: httpx.AsyncClient,
    proto: Proto,
    status: int,
    kind: str | None,
    check: Any,
) -> None:
    emu.script(Fault(status=status, error=kind, headers={"retry-after": "7"}))
    r = await post(client, proto)
    assert r.status_code == status
    assert r.headers["retry-after"] == "7"
    body = r.json()
    assert check(body), body
    if proto is ANTHROPIC:
        assert body["type"] == "error"
    elif proto is GEMINI:
        assert body["error"]["code"] == status
    else:
        assert set(body["error"]) >= {"message", "type", "code"}
    # The fault was consumed: the next request is answered normally.
    assert (await post(client, proto)).status_code == 200


@by_name
async def test_error_on_a_stream_request_is_a_plain_error_response(
    emu: Emulator, client: httpx.AsyncClient, proto: Proto
) -> None:
    emu.script(Fault(status=429))
    body = proto.body(stream=True)
    async with client.stream("POST", proto.path(True), headers=proto.headers, json=body) as r:
        assert r.status_code == 429
        assert r.headers["content-type"] == "application/json"
        assert "error" in json.loads(await r.aread())


async def test_custom_bodies(emu: Emulator, client: httpx.AsyncClient) -> None:
    emu.script(
        [
            Fault(status=503, body={"error": {"message": "custom"}}),
            Fault(status=502, body="<html>bad gateway</html>"),
            Fault(status=200, body={"anything": True}),
        ]
    )
    r = await post(client, OPENAI)
    assert (r.status_code, r.json()) == (503, {"error": {"message": "custom"}})
    r = await post(client, OPENAI)
    assert r.status_code == 502 and r.text == "<html>bad gateway</html>"
    assert r.headers["content-type"].startswith("text/plain")
    r = await post(client, OPENAI)
    assert (r.status_code, r.json()) == (200, {"anything": True})


async def test_reply_usage_and_finish_reason_overrides(
    emu: Emulator, client: httpx.AsyncClient
) -> None:
    emu.script(
        Fault(reply="scripted words here", usage=Usage(prompt_tokens=10, completion_tokens=5))
    )
    answer = (await post(client, OPENAI)).json()
    assert OPENAI.text(answer) == "scripted words here"
    assert answer["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}

    emu.script(Fault(finish_reason="SAFETY"))
    answer = (await post(client, GEMINI)).json()
    assert GEMINI.finish(answer) == "SAFETY"


# --------------------------------------------------------------------------- faults: timing


async def test_latency_and_jitter(emu: Emulator, client: httpx.AsyncClient) -> None:
    emu.script([Fault(latency=0.15), Fault(latency=0.05, jitter=0.1)])
    start = trio.current_time()
    assert (await post(client, OPENAI)).status_code == 200
    assert trio.current_time() - start >= 0.15
    start = trio.current_time()
    assert (await post(client, OPENAI)).status_code == 200
    assert 0.05 <= trio.current_time() - start < 0.5


@by_name
async def test_hang_is_cut_by_the_client_timeout(
    emu: Emulator, client: httpx.AsyncClient, proto: Proto
) -> None:
    emu.script(Fault(hang=True))
    start = trio.current_time()
    with pytest.raises(httpx.ReadTimeout):
        await client.post(proto.path(), headers=proto.headers, json=proto.body(), timeout=0.2)
    assert trio.current_time() - start < 1.0
    call = emu.calls[-1]
    await wait_for(lambda: call.disconnected)
    assert not call.completed and call.status == 0
    assert (await post(client, proto)).status_code == 200


async def test_stall_and_chunk_interval(emu: Emulator, client: httpx.AsyncClient) -> None:
    emu.script(Fault(stall_after_chunks=1, stall_seconds=0.4))
    arrivals: list[float] = []
    body = OPENAI.body("a b c", stream=True)
    async with client.stream("POST", OPENAI.path(), headers=OPENAI.headers, json=body) as r:
        async for line in r.aiter_lines():
            if '"content":"' in line and '"content":""' not in line:
                arrivals.append(trio.current_time())
    assert len(arrivals) == 4
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Measured at the client, so allow for scheduling noise on a shared machine.
    assert gaps[0] >= 0.3
    assert max(gaps[1:]) < 0.2

    emu.script(Fault(chunk_interval=0.05))
    start = trio.current_time()
    r, out = await stream(client, ANTHROPIC, "a b c")
    # four content chunks: three gaps between them, one before the finish
    assert trio.current_time() - start >= 0.2
    assert out.text == "echo: a b c" and out.end_marker


# --------------------------------------------------------------------------- faults: broken bodies


@by_name
async def test_close_mid_body(emu: Emulator, client: httpx.AsyncClient, proto: Proto) -> None:
    emu.script([Fault(close_mid_body=True), Fault(close_mid_body=True)])
    with pytest.raises(httpx.RemoteProtocolError):
        await post(client, proto, text="a fairly long sentence to cut in half")
    assert emu.calls[-1].completed

    received: list[str] = []
    body = proto.body("a fairly long sentence to cut in half", stream=True)
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", proto.path(True), headers=proto.headers, json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                received.append(line)
    assert any(line.startswith("data:") for line in received)
    assert (await post(client, proto)).status_code == 200


@by_name
async def test_cut_after_chunks(emu: Emulator, client: httpx.AsyncClient, proto: Proto) -> None:
    emu.script(Fault(cut_after_chunks=2))
    r, out = await stream(client, proto, "one two three")
    assert r.status_code == 200
    assert out.text == "echo: one "
    assert out.finish is None and not out.end_marker and out.usage is None
    assert emu.calls[-1].completed
    assert (await post(client, proto)).status_code == 200


@by_name
async def test_error_in_the_middle_of_a_stream(
    emu: Emulator, client: httpx.AsyncClient, proto: Proto
) -> None:
    emu.script(Fault(status=529 if proto is ANTHROPIC else 503, cut_after_chunks=1))
    r, out = await stream(client, proto, "one two three")
    assert r.status_code == 200
    assert out.text == "echo: " and out.finish is None and not out.end_marker
    [error] = out.errors
    if proto is ANTHROPIC:
        assert out.events[-1][0] == "error"
        assert error["error"]["type"] == "overloaded_error"
    elif proto is GEMINI:
        assert error["error"]["status"] == "UNAVAILABLE"
    else:
        assert error["error"]["type"] == "server_error"


@by_name
async def test_malformed_json(emu: Emulator, client: httpx.AsyncClient, proto: Proto) -> None:
    emu.script([Fault(malformed_json=True), Fault(malformed_json=True)])
    r = await post(client, proto)
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.text)

    r, out = await stream(client, proto)
    assert len(out.invalid) == 1
    assert out.text == "echo: hello world"  # the rest of the stream is intact


@pytest.mark.parametrize("proto", [OPENAI, ANTHROPIC], ids=lambda p: p.name)
async def test_finish_without_end(emu: Emulator, client: httpx.AsyncClient, proto: Proto) -> None:
    emu.script(Fault(finish_without_end=True))
    _, out = await stream(client, proto)
    assert out.text == "echo: hello world"
    assert out.finish in ("stop", "end_turn")
    assert not out.end_marker
    assert (await post(client, proto)).status_code == 200


@by_name
async def test_finish_then_drop(emu: Emulator, client: httpx.AsyncClient, proto: Proto) -> None:
    """The finish-reason chunk arrives, then the connection drops: no usage chunk, no
    end marker, no terminating chunk (the client sees an incomplete body)."""
    emu.script(Fault(finish_then_drop=True))
    received: list[str] = []
    body = proto.body(stream=True)
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", proto.path(True), headers=proto.headers, json=body) as r:
            assert r.status_code == 200
            assert "connection" not in r.headers  # nothing announced the close
            async for line in r.aiter_lines():
                received.append(line)
    out = Streamed()
    for line in received:
        if line.startswith("data:"):
            proto.absorb(out, _event_before(received, line), json.loads(line[5:]))
    assert out.text == "echo: hello world"
    assert out.finish in ("stop", "end_turn", "STOP")
    assert not any(line in ("data: [DONE]", "event: message_stop") for line in received)
    assert emu.calls[-1].completed
    assert (await post(client, proto)).status_code == 200


def _event_before(lines: list[str], data_line: str) -> str | None:
    at = lines.index(data_line)
    previous = lines[at - 1] if at > 0 else ""
    return previous[6:].strip() if previous.startswith("event:") else None


@by_name
async def test_reset_before_head(emu: Emulator, client: httpx.AsyncClient, proto: Proto) -> None:
    emu.script(Fault(reset_before_head=True))
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        await post(client, proto)
    [call] = emu.calls
    assert call.status == 0 and call.completed
    assert (await post(client, proto)).status_code == 200


# --------------------------------------------------------------------------- route 404s


async def test_strict_paths_answer_a_route_404_for_a_prefixed_path() -> None:
    async with (
        Emulator.serve(port=0, strict_paths=True) as emu,
        httpx.AsyncClient(base_url=emu.url, timeout=5.0) as client,
    ):
        for proto in PROTOS:  # the providers' own paths are routes
            assert (await post(client, proto)).status_code == 200
        assert len(emu.calls) == 3
        for path in (
            "/proxy/v1/chat/completions",
            "/v1/v1/messages",
            "/x/v1beta/models/gem-x:generateContent",
            "/chat/completions",
        ):
            r = await client.post(path, json={"model": "m"})
            assert r.status_code == 404, path
            error = r.json()["error"]
            assert error["code"] is None and error["message"] == f"Unknown path: {path}"
        assert len(emu.calls) == 3  # a route 404 is not an API call
        # A scripted model 404 on a real route still names the model.
        emu.script(Fault(status=404))
        r = await post(client, OPENAI)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_html_404_page() -> None:
    async with (
        Emulator.serve(port=0, html_404=True) as emu,
        httpx.AsyncClient(base_url=emu.url, timeout=5.0) as client,
    ):
        r = await client.post("/v1/nothing/a&b", json={})
        assert r.status_code == 404
        assert r.headers["content-type"].startswith("text/html")
        assert r.text.startswith("<!DOCTYPE html>")
        assert "POST /v1/nothing/a&amp;b" in r.text
        assert (await post(client, OPENAI)).status_code == 200  # still keeps the connection
        assert emu.errors == []


# --------------------------------------------------------------------------- scripts and keys


async def test_script_precedence_and_fifo(emu: Emulator, client: httpx.AsyncClient) -> None:
    emu.script(Fault(reply="any"))
    emu.script(Fault(reply="model"), model="gpt-x")
    emu.script(Fault(reply="key"), key="k1")
    emu.script([Fault(reply="exact 1"), Fault(reply="exact 2")], key="k1", model="gpt-x")

    async def ask(key: str = "k1", model: str = "gpt-x") -> str:
        body = OPENAI.body(model=model)
        r = await client.post(OPENAI.path(), headers={"authorization": f"Bearer {key}"}, json=body)
        return OPENAI.text(r.json())

    assert await ask(key="k2", model="other") == "any"
    assert await ask(key="k2", model="other") == "echo: hello world"
    assert await ask(model="other") == "key"
    assert await ask(key="k2") == "model"
    assert await ask() == "exact 1"
    assert await ask() == "exact 2"
    assert await ask() == "echo: hello world"
    assert emu.pending(key="k1", model="gpt-x") == 0

    emu.script(Fault(status=500))
    emu.reset()
    assert emu.calls == []
    assert await ask() == "echo: hello world"


@by_name
async def test_valid_keys(emu: Emulator, client: httpx.AsyncClient, proto: Proto) -> None:
    emu.valid_keys = {"good"}
    r = await post(client, proto)  # the protocol helpers send "k1"
    assert r.status_code == 401
    body = r.json()
    if proto is OPENAI:
        assert body["error"]["code"] == "invalid_api_key"
    elif proto is ANTHROPIC:
        assert body["error"]["type"] == "authentication_error"
    else:
        assert body["error"]["status"] == "UNAUTHENTICATED"
    assert emu.calls[-1].key == "k1" and emu.calls[-1].status == 401

    r = await client.post(proto.path(), json=proto.body())  # no key at all
    assert r.status_code == 401 and emu.calls[-1].key is None

    emu.valid_keys = {"k1"}
    assert (await post(client, proto)).status_code == 200


@by_name
async def test_bad_requests(client: httpx.AsyncClient, proto: Proto) -> None:
    headers = proto.headers | {"content-type": "application/json"}
    r = await client.post(proto.path(), headers=headers, content=b'{"model": "x", "mess')
    assert r.status_code == 400
    body = r.json()
    if proto is ANTHROPIC:
        assert body["error"]["type"] == "invalid_request_error"
    elif proto is GEMINI:
        assert body["error"]["status"] == "INVALID_ARGUMENT"
    else:
        assert body["error"]["type"] == "invalid_request_error"

    r = await client.get(proto.path(), headers=proto.headers)
    assert r.status_code == 405


async def test_unknown_path(emu: Emulator, client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/nothing/here", json={})
    assert r.status_code == 404 and "error" in r.json()
    assert emu.calls == []


# --------------------------------------------------------------------------- admin


async def test_admin_endpoints(emu: Emulator, client: httpx.AsyncClient) -> None:
    script = {
        "key": "k1",
        "model": "claude-x",
        "faults": [
            {"status": 429, "headers": {"retry-after": "3"}},
            {"tool_calls": [{"id": "t", "name": "f", "arguments": "{}"}]},
        ],
    }
    r = await client.post("/_emulator/script", json=script)
    assert r.status_code == 200 and r.json() == {"ok": True, "queued": 2}

    r = await post(client, ANTHROPIC)
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    r = await post(client, ANTHROPIC)
    assert r.json()["content"][-1]["type"] == "tool_use"

    calls = (await client.get("/_emulator/calls")).json()
    assert [c["status"] for c in calls] == [429, 200]
    assert calls[0]["protocol"] == "anthropic" and calls[0]["key"] == "k1"
    assert calls[0]["fault"]["status"] == 429 and calls[0]["completed"] is True

    r = await client.post("/_emulator/script", json={"faults": [{"status": "oops"}]})
    assert r.status_code == 400

    assert (await client.post("/_emulator/valid_keys", json={"keys": ["z"]})).status_code == 200
    assert (await post(client, GEMINI)).status_code == 401
    assert (await client.post("/_emulator/valid_keys", json={"keys": None})).status_code == 200

    emu.script(Fault(status=500))
    assert (await client.post("/_emulator/reset")).json() == {"ok": True}
    assert (await client.get("/_emulator/calls")).json() == []
    assert (await post(client, OPENAI)).status_code == 200
    assert (await client.get("/_emulator/nope")).status_code == 404


# --------------------------------------------------------------------------- connections


async def test_keep_alive_and_pipelining(emu: Emulator) -> None:
    """Two requests written back to back on one socket get two responses, in order."""

    def raw_request(text: str) -> bytes:
        data = json.dumps(OPENAI.body(text)).encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nhost: emu\r\n"
            f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
        )
        return head.encode() + data

    host, port = emu.url.removeprefix("http://").split(":")
    answers: list[str] = []
    async with await trio.open_tcp_stream(host, int(port)) as sock:
        await sock.send_all(raw_request("first") + raw_request("second"))
        reader = h11.Connection(h11.CLIENT)
        for _ in range(2):
            # The reader only parses responses; tell it a request went out.
            reader.send(h11.Request(method="POST", target="/", headers=[("host", "emu")]))
            reader.send(h11.EndOfMessage())
            body = b""
            while True:
                event = reader.next_event()
                if event is h11.NEED_DATA:
                    reader.receive_data(await sock.receive_some(65536))
                elif isinstance(event, h11.Response):
                    assert event.status_code == 200
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            answers.append(OPENAI.text(json.loads(body)))
            reader.start_next_cycle()
    assert answers == ["echo: first", "echo: second"]
    assert [c.completed for c in emu.calls] == [True, True]


async def test_garbage_and_expect_continue(emu: Emulator) -> None:
    host, port = emu.url.removeprefix("http://").split(":")
    async with await trio.open_tcp_stream(host, int(port)) as sock:
        await sock.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        reply = b""
        while data := await sock.receive_some(65536):
            reply += data
    assert reply.startswith(b"HTTP/1.1 400 ")  # then the server closed the connection

    data = json.dumps(OPENAI.body("patient")).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: emu\r\nexpect: 100-continue\r\n"
    async with await trio.open_tcp_stream(host, int(port)) as sock:
        await sock.send_all(head + b"content-length: %d\r\n\r\n" % len(data))
        assert (await sock.receive_some(65536)).startswith(b"HTTP/1.1 100")
        await sock.send_all(data)
        reply = b""
        while not reply.endswith(b"}}"):
            reply += await sock.receive_some(65536)
    assert reply.startswith(b"HTTP/1.1 200 OK") and b"echo: patient" in reply
    assert emu.errors == []


async def test_many_concurrent_connections(emu: Emulator) -> None:
    emu.script([Fault(latency=0.2)] * 40)
    limits = httpx.Limits(max_connections=100)
    results: list[int] = []
    async with httpx.AsyncClient(base_url=emu.url, limits=limits, timeout=5) as http:

        async def one(i: int) -> None:
            r = await post(http, OPENAI, text=f"n{i}")
            assert OPENAI.text(r.json()) == f"echo: n{i}"
            results.append(r.status_code)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)
        assert trio.current_time() - start < 1.5  # concurrently, not 40 x 0.2 s
    assert results == [200] * 40


async def test_client_disconnect_mid_stream(emu: Emulator, client: httpx.AsyncClient) -> None:
    emu.script(Fault(chunk_interval=0.1))
    body = OPENAI.body("a b c d e f g h", stream=True)
    async with client.stream("POST", OPENAI.path(), headers=OPENAI.headers, json=body) as r:
        async for line in r.aiter_lines():
            if '"content":"echo: "' in line:
                break
    call = emu.calls[-1]
    await wait_for(lambda: call.disconnected)
    assert not call.completed
    assert (await post(client, OPENAI)).status_code == 200


async def test_shutdown_with_open_connections() -> None:
    """Leaving the serve block closes idle and hanging connections; nothing is left running."""
    failures: list[BaseException] = []
    with trio.fail_after(3):
        async with (
            httpx.AsyncClient(timeout=5) as http,
            trio.open_nursery() as nursery,
            Emulator.serve() as emulator,
        ):
            url = emulator.url + OPENAI.path()
            r = await http.post(url, headers=OPENAI.headers, json=OPENAI.body())
            assert r.status_code == 200  # leaves an idle keep-alive connection
            emulator.script(Fault(hang=True))

            async def hanging() -> None:
                try:
                    await http.post(url, headers=OPENAI.headers, json=OPENAI.body())
                except httpx.TransportError as exc:
                    failures.append(exc)

            nursery.start_soon(hanging)
            await wait_for(lambda: len(emulator.calls) == 2)
            assert emulator.errors == []
            # Leaving the block: the emulator closes first, then the nursery waits for
            # `hanging`, which must fail promptly.
    assert len(failures) == 1


# --------------------------------------------------------------------------- as a process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_runs_as_a_process() -> None:
    port = free_port()
    command = [sys.executable, "-m", "router.emulator", "--port", str(port)]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(10):
            while not line.endswith(b"\n"):
                data = await process.stdout.receive_some(1024)
                assert data, "the emulator exited before printing its URL"
                line += data
        url = line.decode().strip()
        assert url == f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            script = {"model": "gem-x", "faults": [{"status": 429}]}
            assert (await http.post("/_emulator/script", json=script)).status_code == 200
            assert (await post(http, GEMINI)).status_code == 429
            answer = (await post(http, GEMINI, text="from afar")).json()
            assert GEMINI.text(answer) == "echo: from afar"
            calls = (await http.get("/_emulator/calls")).json()
            assert [c["status"] for c in calls] == [429, 200]
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            code = await process.wait()
        assert code == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
