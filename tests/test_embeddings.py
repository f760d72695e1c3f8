"""Embeddings end to end: `Router.embed` over real loopback sockets to the provider
emulator (OpenAI-compatible ``/embeddings`` and Gemini ``batchEmbedContents``), and the
gateway's ``POST /v1/embeddings`` driven by the official `openai` SDK against a real
``llm-router serve`` process."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from test_gateway import Proc

from router import (
    ChainExhaustedError,
    ChatRequest,
    DeadlineExceededError,
    InvalidRequestError,
    Message,
    Router,
    RouterConfig,
)
from router._openai import decode_float32, encode_float32
from router._simulated import embed_vector
from router._types import EmbeddingRequest, EmbeddingResponse
from router.emulator import Emulator, Fault

SETTINGS: dict[str, Any] = {
    "timeout": 5.0,
    "attempt_timeout": 1.0,
    "transient_retries": 0,
    "retry_backoff": [0.01],
    "retry_jitter": 0.0,
    "seed": 3,
}


def make_config(kind: str, url: str, **settings: Any) -> RouterConfig:
    """Provider `p` (keys a, b) serves embedding model `emb` (upstream up-emb), with
    `fb` (key f, upstream up-fb) as its fallback; `chat` is a chat model."""
    base = f"{url}/v1" if kind == "openai" else url
    return RouterConfig.from_dict(
        {
            "router": SETTINGS | settings,
            "providers": [
                {
                    "name": "p",
                    "kind": kind,
                    "base_url": base,
                    "keys": [{"id": "a", "secret": "sk-a-1"}, {"id": "b", "secret": "sk-b-2"}],
                },
                {
                    "name": "fb",
                    "kind": kind,
                    "base_url": base,
                    "keys": [{"id": "f", "secret": "sk-f-3"}],
                },
            ],
            "models": [
                {
                    "name": "emb",
                    "provider": "p",
                    "upstream": "up-emb",
                    "mode": "embedding",
                    "fallbacks": ["emb-fb", "chat"],
                },
                {"name": "emb-fb", "provider": "fb", "upstream": "up-fb", "mode": "embedding"},
                {"name": "chat", "provider": "p", "upstream": "up-chat"},
            ],
        }
    )


@asynccontextmanager
async def rig(kind: str, **settings: Any) -> AsyncIterator[tuple[Emulator, Router]]:
    async with Emulator.serve(port=0) as emu:
        async with Router.open(make_config(kind, emu.url, **settings)) as router:
            yield emu, router
        assert emu.errors == []


by_kind = pytest.mark.parametrize("kind", ["openai", "gemini"])
TEXTS = ["the quick brown fox", "jumps over", "the lazy dog"]


@by_kind
async def test_a_batch_is_embedded_in_order(kind: str) -> None:
    async with rig(kind) as (emu, router):
        result = await router.embed(EmbeddingRequest(model="emb", input=TEXTS, dimensions=8))
    assert isinstance(result, EmbeddingResponse)
    assert result.embeddings == [embed_vector(t, 8) for t in TEXTS]
    assert (result.model, result.provider, result.key_id) == ("emb", "p", "a")
    assert result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens
    assert [a.outcome for a in result.attempts] == ["ok"]
    [call] = emu.calls
    if kind == "openai":
        assert call.path == "/v1/embeddings"
        assert call.body == {
            "model": "up-emb",
            "input": TEXTS,
            "encoding_format": "float",
            "dimensions": 8,
        }
    else:
        assert call.path == "/v1beta/models/up-emb:batchEmbedContents"
        assert call.headers["x-goog-api-key"] == "sk-a-1"
        assert [r["content"]["parts"][0]["text"] for r in call.body["requests"]] == TEXTS
        assert call.body["requests"][0]["outputDimensionality"] == 8


@by_kind
async def test_a_single_string_is_a_batch_of_one(kind: str) -> None:
    async with rig(kind) as (_emu, router):
        result = await router.embed(EmbeddingRequest(model="emb", input="hello"))
    assert result.embeddings == [embed_vector("hello", 16)]
    assert math.isclose(sum(v * v for v in result.embeddings[0]), 1.0, rel_tol=1e-5)


@by_kind
async def test_a_429_on_one_key_fails_over_to_the_other_key(kind: str) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(status=429, headers={"retry-after": "30"}), key="sk-a-1")
        result = await router.embed(EmbeddingRequest(model="emb", input=TEXTS))
        snap = {(k.provider, k.key_id): k for k in router.snapshot().keys}
    assert result.key_id == "b"
    assert [(a.key_id, a.outcome) for a in result.attempts] == [("a", "rate_limit"), ("b", "ok")]
    lane = next(x for x in snap["p", "a"].lanes if x.model == "up-emb")
    assert lane.cooling_for > 20  # the lane learned the Retry-After, like chat


@by_kind
async def test_a_503_goes_to_the_fallback_model(kind: str) -> None:
    async with rig(kind) as (emu, router):
        emu.script(Fault(status=503), model="up-emb")
        result = await router.embed(EmbeddingRequest(model="emb", input=TEXTS))
    assert (result.model, result.provider, result.key_id) == ("emb-fb", "fb", "f")
    assert [(a.model, a.outcome) for a in result.attempts] == [
        ("emb", "transient"),
        ("emb-fb", "ok"),
    ]
    assert result.embeddings == [embed_vector(t, 16) for t in TEXTS]
    # The chat model later in the chain is never sent an embedding request.
    assert all(c.model != "up-chat" for c in emu.calls)


async def test_every_model_failing_exhausts_the_chain() -> None:
    async with rig("openai") as (emu, router):
        emu.script([Fault(status=503)] * 2)
        with pytest.raises(ChainExhaustedError) as info:
            await router.embed(EmbeddingRequest(model="emb", input="x"))
    assert [(a.model, a.outcome) for a in info.value.attempts] == [
        ("emb", "transient"),
        ("emb-fb", "transient"),
    ]


async def test_mode_mismatch_is_a_400_before_any_upstream_call() -> None:
    async with rig("openai") as (emu, router):
        with pytest.raises(InvalidRequestError, match="embedding model"):
            await router.submit(ChatRequest(model="emb", messages=[Message("user", "hi")]))
        with pytest.raises(InvalidRequestError, match="chat model"):
            await router.embed(EmbeddingRequest(model="chat", input="hi"))
        assert emu.calls == []
        # A chat chain passes over an embedding model among its fallbacks.
        answer = await router.submit(
            ChatRequest(model="chat", messages=[Message("user", "hi")], fallbacks=["emb"])
        )
        assert answer.model == "chat"


async def test_bad_inputs_are_refused_clearly() -> None:
    async with rig("openai") as (emu, router):
        with pytest.raises(InvalidRequestError, match="token arrays"):
            await router.embed(EmbeddingRequest(model="emb", input=[[1, 2, 3]]))  # type: ignore[list-item]
        with pytest.raises(InvalidRequestError, match="empty"):
            await router.embed(EmbeddingRequest(model="emb", input=[]))
        with pytest.raises(InvalidRequestError, match="dimensions"):
            await router.embed(EmbeddingRequest(model="emb", input="x", dimensions=0))
        assert emu.calls == []


async def test_the_deadline_is_respected() -> None:
    async with rig("openai", attempt_timeout=5.0) as (emu, router):
        emu.script(Fault(hang=True), model="up-emb")
        started = trio.current_time()
        with pytest.raises(DeadlineExceededError):
            await router.embed(EmbeddingRequest(model="emb", input="x", timeout=0.3))
        assert trio.current_time() - started < 1.0
        # The caller's deadline is not the key's fault: both keys stay callable.
        assert router.callable_keys() == 3


async def test_tpm_budget_counts_input_tokens() -> None:
    async with Emulator.serve(port=0) as emu:
        config = make_config("openai", emu.url)
        raw = msgspec_to_dict(config)
        raw["providers"][0]["tpm"] = 30
        config = RouterConfig.from_dict(raw)
        async with Router.open(config) as router:
            text = " ".join(["word"] * 20)
            first = await router.embed(EmbeddingRequest(model="emb", input=text))
            second = await router.embed(EmbeddingRequest(model="emb", input=text))
    # 20-odd tokens each: the second does not fit key a's minute, nor key b's after it.
    assert first.key_id == "a"
    assert second.key_id == "b"


def msgspec_to_dict(config: RouterConfig) -> dict[str, Any]:
    import msgspec

    out: dict[str, Any] = msgspec.to_builtins(config)
    return out


def test_base64_codec_round_trips_float32() -> None:
    vector = embed_vector("round trip", 12)
    assert decode_float32(encode_float32(vector)) == vector


# ----------------------------------------------------------------------- the gateway

GW_KEY = "emb-gw-secret-01"


def _gateway_config(emulator_url: str) -> str:
    return f"""
[router]
timeout = 5.0
attempt_timeout = 2.0
transient_retries = 0
retry_jitter = 0.0

[gateway]
api_keys = [{{ id = "alice", secret = "{GW_KEY}" }}]

[[providers]]
name = "emu"
kind = "openai"
base_url = "{emulator_url}/v1"
keys = [{{ id = "k1", secret = "sk-emb-up-1" }}]

[[providers]]
name = "gem"
kind = "gemini"
base_url = "{emulator_url}"
keys = [{{ id = "g1", secret = "gem-emb-up-2" }}]

[[models]]
name = "embed"
provider = "emu"
upstream = "text-embedding-3-small"
mode = "embedding"
fallbacks = ["gembed"]

[[models]]
name = "gembed"
provider = "gem"
upstream = "gemini-embedding-001"
mode = "embedding"

[[models]]
name = "smart"
provider = "emu"
upstream = "gpt-main"
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc]]:
    emulator = Proc(["-m", "router.emulator", "--port", "0"], "http://")
    try:
        config: Path = tmp_path_factory.mktemp("embeddings") / "router.toml"
        config.write_text(_gateway_config(emulator.url))
        proc = Proc(
            ["-m", "router", "serve", "--config", str(config), "--port", "0"], "listening on"
        )
        try:
            yield proc, emulator
        finally:
            proc.kill()
            log = proc.stderr()
            assert "Traceback" not in log, log[-3000:]
    finally:
        emulator.kill()


@pytest.fixture
def client(gateway: tuple[Proc, Proc]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway[0].url}/v1", api_key=GW_KEY, max_retries=0, timeout=10)


def test_sdk_float_and_base64_decode_to_the_same_vectors(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model="embed", input=TEXTS, encoding_format="float")
    # The SDK asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model="embed", input=TEXTS)
    expected = [embed_vector(t, 16) for t in TEXTS]
    assert [d.embedding for d in floats.data] == expected
    assert [d.embedding for d in default.data] == expected
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert floats.object == "list"
    assert floats.data[0].object == "embedding"
    assert floats.model == "embed"
    assert floats.usage.prompt_tokens > 0
    assert floats.usage.total_tokens == floats.usage.prompt_tokens
    raw = client.embeddings.with_raw_response.create(
        model="embed", input="one", encoding_format="base64", dimensions=4
    )
    body = raw.http_response.json()
    assert isinstance(body["data"][0]["embedding"], str)
    assert decode_float32(body["data"][0]["embedding"]) == embed_vector("one", 4)
    assert raw.http_response.headers["x-router-provider"] == "emu"


def test_sdk_gemini_model_and_errors(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="gembed", input="hello there", dimensions=6)
    assert result.data[0].embedding == embed_vector("hello there", 6)
    with pytest.raises(openai.BadRequestError, match="chat model"):
        client.embeddings.create(model="smart", input="x")
    with pytest.raises(openai.BadRequestError, match="token arrays"):
        client.embeddings.create(model="embed", input=[[1, 2, 3]])
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "x"}])
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="embed", input="x")
