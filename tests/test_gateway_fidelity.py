"""Request and response fidelity through the gateway: a real `llm-router serve` process
(the emulator process behind it), called by the official `openai` SDK and plain httpx.

Content parts reach the upstream in its own shapes; structured outputs work with the
SDK's `parse()`; every sampling field reaches an OpenAI-compatible upstream; fields the
gateway does not know pass through unchanged (refused by an Anthropic model unless
`drop_params`, and then named in `x-router-dropped-params`); reasoning, thinking blocks,
usage details, n choices, system_fingerprint and the `x_router` extension come back.

One gateway and one emulator serve the whole module.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest
from test_gateway import Proc, script

KEY = "fid-secret-0001"
ADMIN = "fid-admin-0002"
UP_KEY = "sk-fid-openai-0003"
UP_KEY2 = "sk-fid-openai-0006"
ANT_KEY = "sk-fid-anthropic-0004"
GEM_KEY = "fid-gemini-0005"
SECRETS = (KEY, ADMIN, UP_KEY, UP_KEY2, ANT_KEY, GEM_KEY)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
PNG_B64 = base64.b64encode(PNG).decode()
DATA_URL = f"data:image/png;base64,{PNG_B64}"
HTTP_URL = "https://example.com/cat.png"


def _config(emulator_url: str) -> str:
    return f"""
[router]
timeout = 5.0
attempt_timeout = 2.0
first_token_timeout = 2.0
idle_timeout = 2.0
transient_retries = 0
retry_jitter = 0.0
seed = 11

[router.breaker]
failure_threshold = 1000
minimum_calls = 1000
window = 1000

[gateway]
admin_key = "{ADMIN}"
max_body_bytes = 262144
api_keys = [{{ id = "alice", secret = "{KEY}" }}]

[[providers]]
name = "emu"
kind = "openai"
base_url = "{emulator_url}/v1"
keys = [{{ id = "k1", secret = "{UP_KEY}" }}]

[[providers]]
name = "emu2"
kind = "openai"
base_url = "{emulator_url}/v1"
keys = [{{ id = "k2", secret = "{UP_KEY2}" }}]

[[providers]]
name = "ant"
kind = "anthropic"
base_url = "{emulator_url}"
keys = [{{ id = "a1", secret = "{ANT_KEY}" }}]

[[providers]]
name = "gem"
kind = "gemini"
base_url = "{emulator_url}"
keys = [{{ id = "g1", secret = "{GEM_KEY}" }}]

[[models]]
name = "smart"
provider = "emu"
upstream = "gpt-main"

[[models]]
name = "replayable"
provider = "emu"
upstream = "gpt-replay"
fallbacks = ["emu2/gpt-replay"]

[[models]]
name = "claude"
provider = "ant"
upstream = "claude-sonnet-4-5"
"""


@pytest.fixture(scope="module")
def gateway(emulator: Proc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    config: Path = tmp_path_factory.mktemp("fidelity") / "router.toml"
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
def client(gateway: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0, timeout=10)


def calls(emu: httpx.Client) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = emu.get("/_emulator/calls").json()
    return result


def last_body(emu: httpx.Client) -> dict[str, Any]:
    body: dict[str, Any] = calls(emu)[-1]["body"]
    return body


def post(gateway: Proc, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEY}"},
        timeout=10,
    )


HELLO: Any = [{"role": "user", "content": "hello fidelity"}]


# --------------------------------------------------------------------------- content parts


def test_images_reach_each_upstream_in_its_own_shape(
    client: openai.OpenAI, emu: httpx.Client
) -> None:
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is in these?"},
                {"type": "image_url", "image_url": {"url": DATA_URL, "detail": "low"}},
                {"type": "image_url", "image_url": {"url": HTTP_URL}},
            ],
        }
    ]
    answer = client.chat.completions.create(model="smart", messages=messages)
    assert answer.choices[0].message.content == "echo: what is in these?"
    assert last_body(emu)["messages"][0]["content"] == [
        {"type": "text", "text": "what is in these?"},
        {"type": "image_url", "image_url": {"url": DATA_URL, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": HTTP_URL}},
    ]
    client.chat.completions.create(model="claude", messages=messages)
    sent = last_body(emu)["messages"][0]["content"]
    assert sent[0] == {"type": "text", "text": "what is in these?"}
    assert sent[1]["source"] == {"type": "base64", "media_type": "image/png", "data": PNG_B64}
    assert sent[2]["source"] == {"type": "url", "url": HTTP_URL}


def test_audio_file_and_cache_control_parts(
    client: openai.OpenAI, emu: httpx.Client, gateway: Proc
) -> None:
    pdf = base64.b64encode(b"%PDF-1.4 fake").decode()
    messages: Any = [
        {"role": "system", "content": "be brief", "cache_control": {"type": "ephemeral"}},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "read it", "cache_control": {"type": "ephemeral"}},
                {"type": "input_audio", "input_audio": {"data": PNG_B64, "format": "wav"}},
                {
                    "type": "file",
                    "file": {"file_data": f"data:application/pdf;base64,{pdf}", "filename": "a"},
                },
            ],
        },
    ]
    client.chat.completions.create(model="smart", messages=messages)
    content = last_body(emu)["messages"][1]["content"]
    assert content[1] == {"type": "input_audio", "input_audio": {"data": PNG_B64, "format": "wav"}}
    assert content[2] == {
        "type": "file",
        "file": {"file_data": f"data:application/pdf;base64,{pdf}", "filename": "a"},
    }
    # Anthropic takes no audio: a 400 naming it, or dropped (and said) with drop_params
    body = {"model": "claude", "messages": messages}
    refused = post(gateway, body)
    assert refused.status_code == 400, refused.text
    assert "audio" in refused.json()["error"]["message"]
    tool = {
        "type": "function",
        "function": {"name": "look", "parameters": {"type": "object", "properties": {}}},
        "cache_control": {"type": "ephemeral"},
    }
    dropped = post(gateway, {**body, "tools": [tool], "drop_params": True})
    assert dropped.status_code == 200, dropped.text
    assert dropped.headers["x-router-dropped-params"] == "audio content"
    sent = last_body(emu)
    assert sent["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert sent["tools"][0]["cache_control"] == {"type": "ephemeral"}
    user = sent["messages"][0]["content"]
    assert user[0] == {"type": "text", "text": "read it", "cache_control": {"type": "ephemeral"}}
    assert [block["type"] for block in user] == ["text", "document"]


# --------------------------------------------------------------------------- structured output


class City(pydantic.BaseModel):
    name: str
    population: int


def test_structured_output_with_the_sdks_parse(client: openai.OpenAI, emu: httpx.Client) -> None:
    script(emu, [{"reply": '{"name": "Paris", "population": 2100000}'}])
    completion = client.chat.completions.parse(model="smart", messages=HELLO, response_format=City)
    parsed = completion.choices[0].message.parsed
    assert parsed == City(name="Paris", population=2100000)
    sent = last_body(emu)["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["name"] == "City"
    assert sent["json_schema"]["strict"] is True
    assert sent["json_schema"]["schema"]["properties"]["population"] == {
        "title": "Population",
        "type": "integer",
    }


# --------------------------------------------------------------------------- fields


def test_sampling_fields_reach_the_upstream(client: openai.OpenAI, emu: httpx.Client) -> None:
    client.chat.completions.create(
        model="smart",
        messages=HELLO,
        seed=42,
        frequency_penalty=0.5,
        presence_penalty=-0.25,
        logprobs=True,
        top_logprobs=3,
        logit_bias={"50256": -100},
        user="end-user-7",
        reasoning_effort="low",
        service_tier="flex",
        max_completion_tokens=30,
        stop="never-said",
        prediction={"type": "content", "content": "hello"},
    )
    sent = last_body(emu)
    expected = {
        "seed": 42,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.25,
        "logprobs": True,
        "top_logprobs": 3,
        "logit_bias": {"50256": -100},
        "user": "end-user-7",
        "reasoning_effort": "low",
        "service_tier": "flex",
        "max_tokens": 30,
        "stop": ["never-said"],
        "prediction": {"type": "content", "content": "hello"},
    }
    assert {name: sent.get(name) for name in expected} == expected


def test_unknown_fields_pass_through_refused_or_dropped(
    client: openai.OpenAI, emu: httpx.Client
) -> None:
    extra = {"store": True, "metadata": {"run": "r1"}, "verbosity": "low"}
    raw = client.chat.completions.with_raw_response.create(
        model="smart", messages=HELLO, extra_body=extra
    )
    assert "x-router-dropped-params" not in raw.headers
    sent = last_body(emu)
    assert {name: sent.get(name) for name in extra} == extra
    # an Anthropic model cannot take them: 400 naming them, nothing sent upstream
    before = len(calls(emu))
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="claude", messages=HELLO, extra_body=extra)
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["param"] == "metadata"
    for name in extra:
        assert name in error["message"]
    assert len(calls(emu)) == before
    # with drop_params: dropped, and named in the header (a stream's too)
    raw = client.chat.completions.with_raw_response.create(
        model="claude", messages=HELLO, seed=7, extra_body={**extra, "drop_params": True}
    )
    assert raw.parse().choices[0].message.content == "echo: hello fidelity"
    assert set(raw.headers["x-router-dropped-params"].split(",")) == {
        "seed",
        "metadata",
        "store",
        "verbosity",
    }
    sent = last_body(emu)
    assert "store" not in sent and "verbosity" not in sent and "seed" not in sent
    with client.chat.completions.with_streaming_response.create(
        model="claude", messages=HELLO, stream=True, extra_body={"store": True, "drop_params": True}
    ) as response:
        assert response.headers["x-router-dropped-params"] == "store"
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    assert text == "echo: hello fidelity"


# --------------------------------------------------------------------------- answers


def test_reasoning_usage_details_and_fingerprint(client: openai.OpenAI, emu: httpx.Client) -> None:
    usage = {"prompt_tokens": 20, "completion_tokens": 9, "cached_tokens": 12}
    usage["reasoning_tokens"] = 4
    script(emu, [{"reasoning": "think it through", "usage": usage}] * 2)
    completion = client.chat.completions.create(model="smart", messages=HELLO)
    message = completion.choices[0].message
    assert message.content == "echo: hello fidelity"
    assert getattr(message, "reasoning_content", None) == "think it through"
    assert completion.system_fingerprint == "fp_emulator"
    assert completion.usage is not None
    details = completion.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == 12
    reasoning = completion.usage.completion_tokens_details
    assert reasoning is not None and reasoning.reasoning_tokens == 4

    thoughts = text = ""
    final_usage = None
    fingerprints = set()
    for chunk in client.chat.completions.create(
        model="smart", messages=HELLO, stream=True, stream_options={"include_usage": True}
    ):
        fingerprints.add(chunk.system_fingerprint)
        if chunk.usage is not None:
            final_usage = chunk.usage
        for choice in chunk.choices:
            thoughts += getattr(choice.delta, "reasoning_content", None) or ""
            text += choice.delta.content or ""
    assert thoughts == "think it through"
    assert text == "echo: hello fidelity"
    assert "fp_emulator" in fingerprints
    assert final_usage is not None
    assert final_usage.prompt_tokens_details is not None
    assert final_usage.prompt_tokens_details.cached_tokens == 12
    assert final_usage.completion_tokens_details is not None
    assert final_usage.completion_tokens_details.reasoning_tokens == 4


def test_plain_usage_has_no_empty_details(gateway: Proc, emu: httpx.Client) -> None:
    answer = post(gateway, {"model": "smart", "messages": HELLO}).json()
    assert set(answer["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert answer["choices"][0]["message"]["refusal"] is None
    assert "x_router" not in answer


def test_anthropic_thinking_blocks_round_trip_and_stop_sequence(
    gateway: Proc, emu: httpx.Client
) -> None:
    script(emu, [{"reasoning": "weigh both"}])
    first = post(
        gateway,
        {"model": "claude", "messages": [{"role": "user", "content": "one two three four"}],
         "stop": ["three"]},
    )  # fmt: skip
    assert first.status_code == 200, first.text
    answer = first.json()
    message = answer["choices"][0]["message"]
    assert message["content"] == "echo: one two "
    assert message["reasoning_content"] == "weigh both"
    blocks = message["thinking_blocks"]
    assert [b["type"] for b in blocks] == ["thinking"]
    assert blocks[0]["thinking"] == "weigh both" and blocks[0]["signature"]
    assert answer["x_router"] == {"stop_sequence": "three"}
    # the blocks go back, unchanged, with the assistant turn (the emulator checks the
    # signature as Anthropic does)
    follow = post(
        gateway,
        {
            "model": "claude",
            "messages": [
                {"role": "user", "content": "one two three four"},
                {"role": "assistant", "content": "echo: one two", "thinking_blocks": blocks},
                {"role": "user", "content": "go on"},
            ],
        },
    )
    assert follow.status_code == 200, follow.text
    sent = last_body(emu)["messages"][1]["content"]
    assert sent[0] == {"type": "thinking", "thinking": "weigh both", "signature": blocks[0][
        "signature"]}  # fmt: skip


RATINGS = [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}]
GEMINI_ANSWER = {
    "candidates": [
        {
            "content": {"role": "model", "parts": [{"text": "rated"}]},
            "finishReason": "STOP",
            "index": 0,
            "safetyRatings": RATINGS,
        }
    ],
    "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4},
}


def test_provider_fields_under_x_router(client: openai.OpenAI, emu: httpx.Client) -> None:
    script(emu, [{"body": GEMINI_ANSWER}, {"raw_stream": [json.dumps(GEMINI_ANSWER)]}])
    completion = client.chat.completions.create(model="gem/gemini-2.5-flash", messages=HELLO)
    assert completion.choices[0].message.content == "rated"
    assert (completion.model_extra or {})["x_router"] == {"safety_ratings": RATINGS}
    extensions = [
        (chunk.model_extra or {}).get("x_router")
        for chunk in client.chat.completions.create(
            model="gem/gemini-2.5-flash", messages=HELLO, stream=True
        )
    ]
    assert {"safety_ratings": RATINGS} in extensions


def _choice(index: int, text: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "refusal": None}
    return {"index": index, "message": message, "finish_reason": "stop", "logprobs": None}


def test_n_choices_and_n_with_stream(client: openai.OpenAI, emu: httpx.Client) -> None:
    body = {
        "id": "chatcmpl-n",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-main",
        "choices": [_choice(0, "first"), _choice(1, "second")],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    script(emu, [{"body": body}])
    completion = client.chat.completions.create(model="smart", messages=HELLO, n=2)
    assert [(c.index, c.message.content) for c in completion.choices] == [
        (0, "first"),
        (1, "second"),
    ]
    assert last_body(emu)["n"] == 2
    before = len(calls(emu))
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="smart", messages=HELLO, n=2, stream=True)
    assert isinstance(refused.value.body, dict) and refused.value.body["param"] == "n"
    assert len(calls(emu)) == before


# --------------------------------------------------------------------------- bad input

_USER_PARTS = "messages[0].content[0]"
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("image-ftp", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
     f"{_USER_PARTS}.image_url.url"),
    ("image-data-not-image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:text/plain;base64,{PNG_B64}"}}]}]},
     f"{_USER_PARTS}.image_url.url"),
    ("image-bad-base64", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
     f"{_USER_PARTS}.image_url.url"),
    ("image-detail", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": HTTP_URL, "detail": "max"}}]}]},
     f"{_USER_PARTS}.image_url.detail"),
    ("part-type", {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
     f"{_USER_PARTS}.type"),
    ("file-empty", {"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]},
     f"{_USER_PARTS}.file"),
    ("thinking-block-type", {"messages": [{"role": "assistant", "content": "x",
     "thinking_blocks": [{"type": "text"}]}]}, "messages[0].thinking_blocks[0].type"),
    ("reasoning-on-user", {"messages": [{"role": "user", "content": "x",
     "reasoning_content": "r"}]}, "messages[0].reasoning_content"),
    ("message-unknown-key", {"prefix": None, "messages": [{"role": "user", "content": "x",
     "prefix": True}]}, "messages[0].prefix"),
    ("response-format-type", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("json-schema-name", {"response_format": {"type": "json_schema",
     "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ("json-schema-strict", {"response_format": {"type": "json_schema",
     "json_schema": {"name": "x", "strict": "yes"}}}, "response_format.json_schema.strict"),
    ("seed-float", {"seed": 1.5}, "seed"),
    ("penalty-range", {"frequency_penalty": 3}, "frequency_penalty"),
    ("logprobs-type", {"logprobs": "yes"}, "logprobs"),
    ("top-logprobs-alone", {"top_logprobs": 2}, "top_logprobs"),
    ("top-logprobs-range", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("logit-bias-range", {"logit_bias": {"1": 101}}, "logit_bias.1"),
    ("logit-bias-key", {"logit_bias": {"word": 1}}, "logit_bias.word"),
    ("n-zero", {"n": 0}, "n"),
    ("parallel-tool-calls", {"parallel_tool_calls": 1}, "parallel_tool_calls"),
    ("reasoning-effort", {"reasoning_effort": 3}, "reasoning_effort"),
    ("drop-params", {"drop_params": "yes"}, "drop_params"),
    ("prediction", {"prediction": "text"}, "prediction"),
    ("cache-control", {"messages": [{"role": "user", "content": "x", "cache_control": "on"}]},
     "messages[0].cache_control"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_fields_are_400_naming_the_field(
    gateway: Proc, emu: httpx.Client, body: dict[str, Any], param: str
) -> None:
    r = post(gateway, {"model": "smart", "messages": HELLO, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, r.text
    assert error["message"]
    assert calls(emu) == []


def test_an_unknown_field_name_must_be_plain(gateway: Proc, emu: httpx.Client) -> None:
    r = post(gateway, {"model": "smart", "messages": HELLO, "bad\r\nname": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_field_name"
    assert json.dumps(calls(emu)) == "[]"


def test_a_stream_cut_mid_answer_is_replayed_on_the_fallback_and_traced(
    emu: httpx.Client, gateway: Proc
) -> None:
    faults = [{"cut_after_chunks": 2}]
    emu.post(
        "/_emulator/script", json={"key": UP_KEY, "model": "gpt-replay", "faults": faults}
    ).raise_for_status()
    text = "one two three four five six seven"
    body = {
        "model": "replayable",
        "messages": [{"role": "user", "content": text}],
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEY}"},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        events = [
            line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")
        ]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = "".join(
        (c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"]
    )
    assert content == f"echo: {text}"  # one whole answer: no gap, no repetition
    traces = [c["x_router"] for c in chunks if "x_router" in c]
    segments = traces[-1]["segments"]
    assert [(s["key_id"], s["mode"]) for s in segments] == [("k1", "first"), ("k2", "replay")]
    assert [c["model"] for c in calls(emu)] == ["gpt-replay", "gpt-replay"]
