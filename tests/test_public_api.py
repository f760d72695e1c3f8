"""The public surface: `router.__all__` and the error taxonomy."""

from __future__ import annotations

import inspect

import pytest

import router
from router import (
    ERROR_KINDS,
    ChainExhaustedError,
    ConfigError,
    DeadlineExceededError,
    InvalidRequestError,
    ProviderError,
    RouterClosedError,
    RouterError,
    StreamInterruptedError,
    UnknownModelError,
)

EXPECTED_ALL = [
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

EXPECTED_KINDS = {
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


def test_all_is_exactly_the_intended_set() -> None:
    assert list(router.__all__) == EXPECTED_ALL
    assert len(set(router.__all__)) == len(router.__all__), "duplicates in __all__"


def test_every_name_in_all_resolves() -> None:
    for name in router.__all__:
        assert hasattr(router, name), name


def test_star_import_gives_exactly_all() -> None:
    ns: dict[str, object] = {}
    exec("from router import *", ns)
    ns.pop("__builtins__", None)
    assert sorted(ns) == sorted(EXPECTED_ALL)


def test_error_kinds_literal() -> None:
    assert set(ERROR_KINDS) == EXPECTED_KINDS
    assert isinstance(ERROR_KINDS, frozenset)


def test_every_error_class_derives_from_router_error() -> None:
    error_classes = [
        obj
        for name in router.__all__
        if inspect.isclass(obj := getattr(router, name)) and issubclass(obj, BaseException)
    ]
    names = {c.__name__ for c in error_classes}
    assert names == {
        "RouterError",
        "ConfigError",
        "ContextWindowError",
        "InvalidRequestError",
        "UnknownModelError",
        "ProviderError",
        "ChainExhaustedError",
        "DeadlineExceededError",
        "RouterClosedError",
        "StreamInterruptedError",
    }
    for cls in error_classes:
        assert issubclass(cls, RouterError), cls
        assert issubclass(cls, Exception), cls
    assert issubclass(UnknownModelError, InvalidRequestError)


def _instances() -> list[RouterError]:
    pe = ProviderError("transient", "boom")
    return [
        RouterError("unknown", "x"),
        ConfigError("router.timeout", "bad"),
        InvalidRequestError("model", "bad"),
        UnknownModelError("nope"),
        pe,
        *(ProviderError(k, "m") for k in sorted(EXPECTED_KINDS)),  # type: ignore[arg-type]
        ChainExhaustedError(2, [], pe, None),
        ChainExhaustedError(2, [], None, 3.0),
        ChainExhaustedError(2, [], None, None),
        StreamInterruptedError(pe, "partial", []),
        DeadlineExceededError(5.0, []),
        RouterClosedError(),
    ]


@pytest.mark.parametrize("err", _instances(), ids=repr)
def test_each_error_has_a_known_kind(err: RouterError) -> None:
    assert isinstance(err, RouterError)
    assert err.kind in ERROR_KINDS
    assert str(err) == err.message


def test_specific_kinds() -> None:
    assert ConfigError("f", "m").kind == "bad_request"
    assert ConfigError("f", "m").field == "f"
    assert InvalidRequestError("f", "m").kind == "bad_request"
    assert UnknownModelError("x").kind == "model_missing"
    assert ChainExhaustedError(1, [], ProviderError("auth", "m"), None).kind == "auth"
    assert ChainExhaustedError(1, [], None, 2.0).kind == "rate_limit"
    assert ChainExhaustedError(1, [], None, None).kind == "unknown"
    assert DeadlineExceededError(1.0, []).kind == "transient"


@pytest.mark.parametrize("kind", ["timeout", "", "Transient", "rate-limit", None])
def test_provider_error_rejects_unknown_kind(kind: object) -> None:
    with pytest.raises(ValueError, match="unknown error kind"):
        ProviderError(kind, "message")  # type: ignore[arg-type]


def test_router_error_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError):
        RouterError("oops", "message")  # type: ignore[arg-type]


def test_provider_error_fields() -> None:
    e = ProviderError("rate_limit", "slow down", retry_after=3.5, status=429)
    assert (e.kind, e.message, e.retry_after, e.status) == ("rate_limit", "slow down", 3.5, 429)
    assert e.provider is None and e.key_id is None and e.attempts == []
