"""llm-router: an actor-based LLM request router on trio.

Layout (every implementation module is private; this file re-exports the public names):

- `_types.py`     request/response records (msgspec Structs) and the ApiKey handle
- `_errors.py`    the one error taxonomy, with its tree at the top
- `_config.py`    the one config loader (TOML/JSON -> validated Structs)
- `_breaker.py`   circuit breaker state machine (pure, clock injected)
- `_cooldown.py`  key cooldown state machine (pure, clock injected)
- `_health.py`    per-model health state machine (pure, clock injected)
- `_provider.py`  the Provider interface that custom providers implement
- `_simulated.py` the embedded simulated provider (kind = "simulated")
- `_actor.py`     KeyActor: one trio task per (provider, key), owning the state above
- `_stream.py`    ChatStream: a streamed answer as the caller iterates it
- `_wire.py`      the WireProtocol interface of HTTP provider kinds
- `_sse.py`       incremental server-sent-events parser
- `_classify.py`  retry headers and error-text rules shared by the wire protocols
- `_openai.py`, `_anthropic.py`, `_gemini.py`  the wire protocols (sans-IO)
- `_http.py`      HttpProvider: one httpx.AsyncClient per key, over a WireProtocol
- `emulator/`     a loopback HTTP server speaking the three protocols, with faults
- `gateway/`      the OpenAI-compatible HTTP gateway (`llm-router serve`, `check`)
- `_tokens.py`    token counters: offline (tiktoken), exact (a provider), cascading
- `_budget.py`    per-key RPM/TPM budget state machine (pure, clock injected)
- `gateway/`      the OpenAI-compatible HTTP gateway (`llm-router serve`)
- `_chain.py`     ModelChain: request -> ordered, de-duplicated models to try
- `_router.py`    Router: the supervisor that walks the chain over the actors
- `_otel.py`      OpenTelemetry traces of requests (imported only when tracing is on)
- `_gc.py`        `tune_gc`: the garbage collector set for many open streams
- `_demo.py`      the `llm-router demo` command
"""

import msgspec as _msgspec

from ._breaker import CircuitBreaker
from ._config import (
    BreakerConfig,
    CooldownConfig,
    HealthConfig,
    KeyConfig,
    ModelConfig,
    ProviderConfig,
    RouterConfig,
    RouterSettings,
    SimulationConfig,
)
from ._cooldown import Cooldown
from ._errors import (
    ERROR_KINDS,
    ChainExhaustedError,
    ConfigError,
    ContextWindowError,
    DeadlineExceededError,
    ErrorKind,
    InvalidRequestError,
    ProviderError,
    RouterClosedError,
    RouterError,
    StreamInterruptedError,
    UnknownModelError,
)
from ._gc import tune_gc
from ._health import ModelHealth
from ._provider import Provider
from ._router import (
    KeySnapshot,
    LaneSnapshot,
    ModelSnapshot,
    ReloadResult,
    Router,
    RouterSnapshot,
)
from ._simulated import SimulatedProvider
from ._stream import ChatStream
from ._tokens import CascadingTokenCounter, ExactTokenCounter, OfflineTokenCounter, TokenCounter
from ._types import (
    ApiKey,
    Attempt,
    AudioPart,
    ChatRequest,
    ChatResponse,
    Choice,
    ContentPart,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    FilePart,
    ImagePart,
    Message,
    ResponseFormat,
    StreamChunk,
    TextPart,
    ThinkingBlock,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)

__all__ = [
    "ERROR_KINDS",
    "ApiKey",
    "Attempt",
    "AudioPart",
    "BreakerConfig",
    "CascadingTokenCounter",
    "ChainExhaustedError",
    "ChatRequest",
    "ChatResponse",
    "ChatStream",
    "Choice",
    "CircuitBreaker",
    "ConfigError",
    "ContentPart",
    "ContextWindowError",
    "Cooldown",
    "CooldownConfig",
    "DeadlineExceededError",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingUsage",
    "ErrorKind",
    "ExactTokenCounter",
    "FilePart",
    "HealthConfig",
    "ImagePart",
    "InvalidRequestError",
    "KeyConfig",
    "KeySnapshot",
    "LaneSnapshot",
    "Message",
    "ModelConfig",
    "ModelHealth",
    "ModelSnapshot",
    "OfflineTokenCounter",
    "Provider",
    "ProviderConfig",
    "ProviderError",
    "ReloadResult",
    "ResponseFormat",
    "Router",
    "RouterClosedError",
    "RouterConfig",
    "RouterError",
    "RouterSettings",
    "RouterSnapshot",
    "SimulatedProvider",
    "SimulationConfig",
    "StreamChunk",
    "StreamInterruptedError",
    "TextPart",
    "ThinkingBlock",
    "TokenCounter",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "UnknownModelError",
    "Usage",
    "tune_gc",
]

# Show `router.X` in reprs and tracebacks, as httpx does. msgspec Structs keep their
# real module: msgspec resolves their annotations through it.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and not issubclass(_obj, _msgspec.Struct):
        _obj.__module__ = "router"
del _name, _obj
