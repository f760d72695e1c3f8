"""Anthropic Messages ingress (``POST /v1/messages``): a real `llm-router serve` process
with the emulator behind it, called by the official `anthropic` SDK and plain httpx.

One Anthropic-kind model ("claude") and one OpenAI-kind model ("gpt"): an
Anthropic-format request is served by either, and answers in Anthropic's shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from test_gateway import Proc, script

KEY = "msg-secret-0001"
ADMIN = "msg-admin-0002"
UP_KEY = "sk-msg-openai-0003"
ANT_KEY = "sk-msg-anthropic-0004"
SECRETS = (KEY, ADMIN, UP_KEY, ANT_KEY)
MODELS = ("claude", "gpt")


def _config(emulator_url: str) -> str:
    return f"""
[router]
timeout = 5.0
attempt_timeout = 2.0
first_token_timeout = 2.0
idle_timeout = 2.0
transient_retries = 0
retry_jitter = 0.0
seed = 7

[router.breaker]
failure_threshold = 1000
minimum_calls = 1000
window = 1000

[gateway]
admin_key = "{ADMIN}"
api_keys = [{{ id = "alice", secret = "{KEY}" }}]

[[providers]]
name = "emu"
kind = "openai"
base_url = "{emulator_url}/v1"
keys = [{{ id = "k1", secret = "{UP_KEY}" }}]

[[providers]]
name = "ant"
kind = "anthropic"
base_url = "{emulator_url}"
keys = [{{ id = "a1", secret = "{ANT_KEY}" }}]

[[models]]
name = "gpt"
provider = "emu"
upstream = "gpt-main"

[[models]]
name = "claude"
provider = "ant"
upstream = "claude-sonnet-4-5"
"""


@pytest.fixture(scope="module")
def gateway(emulator: Proc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    config: Path = tmp_path_factory.mktemp("messages") / "router.toml"
    config.write_text(_config(emulator.url))
    proc = Proc(["-m", "router", "serve", "--config", str(config), "--port", "0"], "listening on")
    try:
        yield proc
    finally:
        proc.kill()
        log = proc.stderr()
        assert "Traceback" not in log, log[-3000:]
        for secret in SECRETS:
            assert secret not in log


@pytest.fixture
def emu(emulator: Proc, gateway: Proc) -> Iterator[httpx.Client]:
    admin = {"authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=emulator.url, timeout=5) as client:
        client.post("/_emulator/reset").raise_for_status()
        httpx.post(f"{gateway.url}/v1/router/reset", headers=admin, timeout=5).raise_for_status()
        yield client
        client.post("/_emulator/reset").raise_for_status()


@pytest.fixture
def client(gateway: Proc) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0, timeout=10)


def last_body(emu: httpx.Client) -> dict[str, Any]:
    body: dict[str, Any] = emu.get("/_emulator/calls").json()[-1]["body"]
    return body


def post(gateway: Proc, body: dict[str, Any], key: str = KEY) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": key}, timeout=10
    )


def text_of(message: anthropic.types.Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


@pytest.mark.parametrize("model", MODELS)
def test_plain_message(client: anthropic.Anthropic, emu: httpx.Client, model: str) -> None:
    raw = client.messages.with_raw_response.create(
        model=model, max_tokens=64, messages=[{"role": "user", "content": "hello there"}]
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.model == model
    assert text_of(message) == "echo: hello there"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert raw.headers["x-router-model"] == model


@pytest.mark.parametrize("model", MODELS)
def test_system_multi_turn_and_bearer(gateway: Proc, emu: httpx.Client, model: str) -> None:
    client = anthropic.Anthropic(
        base_url=gateway.url, auth_token=KEY, api_key=None, max_retries=0, timeout=10
    )
    message = client.messages.create(
        model=model,
        max_tokens=64,
        system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": [{"type": "text", "text": "first answer"}]},
            {"role": "user", "content": [{"type": "text", "text": "second question"}]},
        ],
        stop_sequences=["never"],
        extra_body={"temperature": 0.5},
        metadata={"user_id": "u-42"},
    )
    assert text_of(message) == "echo: second question"
    sent = last_body(emu)
    if model == "gpt":
        assert sent["messages"][0]["content"] == [{"type": "text", "text": "be brief"}]
        assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
        assert sent["stop"] == ["never"] and sent["user"] == "u-42"
    else:
        assert sent["system"][0]["text"] == "be brief"
        assert sent["system"][0]["cache_control"] == {"type": "ephemeral"}
        assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
        assert sent["metadata"] == {"user_id": "u-42"}


@pytest.mark.parametrize("model", MODELS)
def test_streaming_with_the_sdk_helper(
    client: anthropic.Anthropic, emu: httpx.Client, model: str
) -> None:
    with client.messages.stream(
        model=model, max_tokens=64, messages=[{"role": "user", "content": "one two three"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: one two three"
    assert text_of(final) == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0


def test_thinking_blocks_only_from_anthropic(
    client: anthropic.Anthropic, emu: httpx.Client
) -> None:
    script(emu, [{"reasoning": "weigh it"}] * 4)
    hello: Any = [{"role": "user", "content": "think please"}]
    thinking: Any = {"type": "enabled", "budget_tokens": 2048}
    claude = client.messages.create(
        model="claude", max_tokens=4096, messages=hello, thinking=thinking
    )
    assert [b.type for b in claude.content] == ["thinking", "text"]
    block = claude.content[0]
    assert block.type == "thinking" and block.thinking == "weigh it" and block.signature
    assert last_body(emu)["thinking"]["type"] == "enabled"
    gpt = client.messages.create(model="gpt", max_tokens=4096, messages=hello, thinking=thinking)
    assert [b.type for b in gpt.content] == ["text"]
    assert last_body(emu)["reasoning_effort"] == "low"
    with client.messages.stream(
        model="claude", max_tokens=4096, messages=hello, thinking=thinking
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].type == "thinking" and final.content[0].signature


@pytest.mark.parametrize("model", MODELS)
def test_tool_use_round_trip(client: anthropic.Anthropic, emu: httpx.Client, model: str) -> None:
    script(
        emu, [{"tool_calls": [{"id": "toolu_1", "name": "lookup", "arguments": '{"q": "trio"}'}]}]
    )
    tools: Any = [
        {
            "name": "lookup",
            "description": "look something up",
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
        }
    ]
    question: Any = {"role": "user", "content": "find trio"}
    first = client.messages.create(
        model=model, max_tokens=64, messages=[question], tools=tools,
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    )  # fmt: skip
    assert first.stop_reason == "tool_use"
    use = next(b for b in first.content if b.type == "tool_use")
    assert (use.name, use.input) == ("lookup", {"q": "trio"})
    result: Any = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "trio is async"}],
    }
    second = client.messages.create(
        model=model,
        max_tokens=64,
        messages=[question, {"role": "assistant", "content": first.content}, result],  # type: ignore[list-item]
        tools=tools,
    )
    assert text_of(second) == "echo: find trio"
    sent = last_body(emu)
    if model == "gpt":
        assert sent["messages"][1]["tool_calls"][0]["function"]["name"] == "lookup"
        assert sent["messages"][2] == {
            "role": "tool", "tool_call_id": use.id, "content": "trio is async"
        }  # fmt: skip
    else:
        assert sent["messages"][1]["content"][-1]["type"] == "tool_use"
        tool_result = sent["messages"][2]["content"][0]
        assert tool_result["type"] == "tool_result" and tool_result["tool_use_id"] == use.id


def test_streamed_tool_use(client: anthropic.Anthropic, emu: httpx.Client) -> None:
    script(emu, [{"tool_calls": [{"id": "call_9", "name": "lookup", "arguments": '{"q": 1}'}]}])
    tools: Any = [{"name": "lookup", "input_schema": {"type": "object"}}]
    with client.messages.stream(
        model="gpt", max_tokens=64, messages=[{"role": "user", "content": "x"}], tools=tools
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    use = final.content[-1]
    assert use.type == "tool_use" and use.input == {"q": 1} and use.id == "call_9"


def test_max_tokens_missing_and_top_k(gateway: Proc, emu: httpx.Client) -> None:
    r = post(gateway, {"model": "gpt", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    body = {
        "model": "gpt",
        "max_tokens": 9,
        "top_k": 5,
        "messages": [{"role": "user", "content": "x"}],
    }
    r = post(gateway, body)
    assert r.status_code == 400 and "top_k" in r.json()["error"]["message"]
    r = post(gateway, {**body, "top_k": None, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_bad_key_is_401_in_anthropic_shape(gateway: Proc) -> None:
    bad = anthropic.Anthropic(base_url=gateway.url, api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(anthropic.AuthenticationError) as error:
        bad.messages.create(model="gpt", max_tokens=9, messages=[{"role": "user", "content": "x"}])
    assert error.value.status_code == 401
    body: Any = error.value.body
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"


def test_upstream_429_is_rate_limit_error(client: anthropic.Anthropic, emu: httpx.Client) -> None:
    script(emu, [{"status": 429, "headers": {"retry-after": "30"}}], key=UP_KEY)
    with pytest.raises(anthropic.RateLimitError) as error:
        client.messages.create(
            model="gpt", max_tokens=9, messages=[{"role": "user", "content": "x"}]
        )
    body: Any = error.value.body
    assert body["error"]["type"] == "rate_limit_error"
    assert int(error.value.response.headers["retry-after"]) >= 1


def test_upstream_outage_is_529_overloaded(client: anthropic.Anthropic, emu: httpx.Client) -> None:
    script(emu, [{"status": 503}], key=ANT_KEY)
    with pytest.raises(anthropic.APIStatusError) as error:
        client.messages.create(
            model="claude", max_tokens=9, messages=[{"role": "user", "content": "x"}]
        )
    assert error.value.status_code == 529
    body: Any = error.value.body
    assert body["error"]["type"] == "overloaded_error"


def test_mid_stream_cut_is_an_error_event_without_message_stop(
    gateway: Proc, client: anthropic.Anthropic, emu: httpx.Client
) -> None:
    words = [{"role": "user", "content": "a b c d e f g"}]
    script(emu, [{"status": 503, "cut_after_chunks": 1}])
    body = {"model": "gpt", "max_tokens": 64, "stream": True, "messages": words}
    with httpx.stream(
        "POST", f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=10
    ) as r:
        raw = r.read().decode()
    events = [line[7:] for line in raw.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start"
    assert "content_block_delta" in events
    assert events[-1] == "error"
    assert "message_stop" not in events
    assert '"type":"error"' in raw
    script(emu, [{"status": 503, "cut_after_chunks": 1}])
    stream = client.messages.stream(model="gpt", max_tokens=64, messages=words)  # type: ignore[arg-type]
    with pytest.raises(anthropic.APIStatusError), stream as events_:
        for _ in events_.text_stream:
            pass


def test_count_tokens(client: anthropic.Anthropic, emu: httpx.Client) -> None:
    short = client.messages.count_tokens(
        model="claude", messages=[{"role": "user", "content": "hello"}]
    )
    long = client.messages.count_tokens(
        model="gpt",
        system="you are a careful assistant",
        messages=[{"role": "user", "content": "hello " * 50}],
    )
    assert 0 < short.input_tokens < long.input_tokens
    assert emu.get("/_emulator/calls").json() == []
