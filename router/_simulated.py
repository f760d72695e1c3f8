"""The embedded simulated provider (`kind = "simulated"`).

It answers after a configured latency, or fails with a configured mix of faults
(transient 503, 429 with Retry-After, 401, 402, 404 model-missing, a hang with no
answer, an unclassified error, or a provider that is down), per key. It embeds too
(`embed`: deterministic vectors seeded by the text, after the same latency and faults). It is the
default for the demo and for tests that need many requests, and needs no network.

Deterministic under a seed: every key has its own random stream seeded from
(provider seed, provider name, key id), and every call draws exactly two numbers
from it, so the n-th call to a key always meets the same fault and latency.
"""

from __future__ import annotations

import array
import hashlib
import math
import random
import zlib
from collections.abc import AsyncIterator

import trio

from ._config import ProviderConfig, SimulationConfig
from ._errors import ProviderError
from ._types import (
    ApiKey,
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    StreamChunk,
    Usage,
    message_text,
)

__all__ = ["SimulatedProvider", "embed_vector"]


class _SimKey:
    __slots__ = ("calls", "cfg", "rng")

    def __init__(self, cfg: SimulationConfig, seed: str) -> None:
        self.cfg = cfg
        self.rng = random.Random(zlib.crc32(seed.encode()))
        self.calls = 0


class SimulatedProvider:
    """A `Provider` that simulates an upstream per the config's `simulate` tables."""

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        default = config.simulate or SimulationConfig()
        self._keys: dict[str, _SimKey] = {
            k.id: _SimKey(k.simulate or default, f"{config.seed}:{config.name}:{k.id}")
            for k in config.keys
        }

    def configure_keys(self, config: ProviderConfig) -> None:
        """A reload changed the provider's keys (its own settings are the same): new
        keys, and keys whose `simulate` changed, get a fresh random stream. Removed keys
        keep theirs, for the calls still running on them."""
        default = config.simulate or SimulationConfig()
        for k in config.keys:
            cfg = k.simulate or default
            known = self._keys.get(k.id)
            if known is None or known.cfg != cfg:
                self._keys[k.id] = _SimKey(cfg, f"{config.seed}:{config.name}:{k.id}")

    def calls(self, key_id: str) -> int:
        """How many calls this key has received."""
        return self._keys[key_id].calls

    async def stream(self, request: ChatRequest, key: ApiKey) -> AsyncIterator[StreamChunk]:
        """The same answer (or fault) as `complete`, as word chunks `chunk_interval`
        apart, the finish reason and usage on the last one."""
        response = await self.complete(request, key)
        words = response.content.split(" ")
        interval = self._keys[key.id].cfg.chunk_interval
        for i, word in enumerate(words):
            if i:
                await trio.sleep(interval)
            last = i == len(words) - 1
            yield StreamChunk(
                text=word if last else word + " ",
                finish_reason=response.finish_reason if last else None,
                usage=response.usage if last else None,
            )

    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse:
        await self._fault(request.model, key)
        last = message_text(request.messages[-1]) if request.messages else ""
        content = f"[{self.name}/{key.id}] {request.model} says: {last[:48]}"
        prompt_tokens = sum(len(message_text(m).split()) + 4 for m in request.messages)
        completion_tokens = len(content.split())
        if request.max_tokens is not None and completion_tokens > request.max_tokens:
            completion_tokens = request.max_tokens
            finish = "length"
        else:
            finish = "stop"
        return ChatResponse(
            content=content,
            finish_reason=finish,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
            upstream_model=request.model,
        )

    async def embed(self, request: EmbeddingRequest, key: ApiKey) -> EmbeddingResponse:
        """Deterministic vectors of the inputs (`embed_vector`), after the same
        simulated latency and faults as `complete`."""
        await self._fault(request.model, key)
        texts = request.inputs
        size = request.dimensions or 16
        tokens = sum(len(t.split()) for t in texts)
        return EmbeddingResponse(
            embeddings=[embed_vector(t, size) for t in texts],
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
            upstream_model=request.model,
        )

    async def _fault(self, model: str, key: ApiKey) -> None:
        """The simulated latency, then the key's simulated failure (raised), if any."""
        sim = self._keys[key.id]
        cfg = sim.cfg
        sim.calls += 1
        u_fault = sim.rng.random()
        u_latency = sim.rng.random()
        if cfg.down:
            await trio.lowlevel.checkpoint()
            raise ProviderError("transient", f"{self.name}: connection refused", key_wide=True)
        await trio.sleep(cfg.latency + cfg.jitter * u_latency)
        if cfg.models is not None and model not in cfg.models:
            raise ProviderError("model_missing", f"model {model!r} does not exist", status=404)
        edge = cfg.transient
        if u_fault < edge:
            raise ProviderError("transient", "503 service unavailable (simulated)", status=503)
        edge += cfg.rate_limit
        if u_fault < edge:
            raise ProviderError(
                "rate_limit",
                "429 rate limit exceeded (simulated)",
                retry_after=cfg.retry_after,
                status=429,
            )
        edge += cfg.auth
        if u_fault < edge:
            raise ProviderError("auth", "401 invalid api key (simulated)", status=401)
        edge += cfg.balance
        if u_fault < edge:
            raise ProviderError("balance", "402 insufficient quota (simulated)", status=402)
        edge += cfg.model_missing
        if u_fault < edge:
            raise ProviderError(
                "model_missing", f"model {model!r} not found (simulated)", status=404
            )
        edge += cfg.hang
        if u_fault < edge:
            await trio.sleep_forever()
        edge += cfg.unknown
        if u_fault < edge:
            raise ProviderError("unknown", "unexpected upstream answer (simulated)", status=520)


def embed_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for `text`: seeded by its SHA-256, every value exactly
    representable as a float32 (so float and base64 encodings carry the same numbers)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    raw = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return array.array("f", [v / norm for v in raw]).tolist()
