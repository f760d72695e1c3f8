"""OpenAI's embeddings shapes for ``POST /v1/embeddings``: the body in, the list out.

In: ``model``, ``input`` (a string or an array of strings; token arrays are refused),
``encoding_format`` ("float" or "base64"), ``dimensions``, ``user``, and the gateway's
own ``fallbacks`` / ``timeout`` as for chat. Out: ``{"object": "list", "data":
[{"object": "embedding", "index", "embedding"}], "model", "usage"}``, each vector a
float array or, for "base64", little-endian float32 bytes in base64 (what OpenAI sends,
and what the official SDKs ask for by default).
"""

from __future__ import annotations

from typing import Any, Literal

from .._openai import encode_float32
from .._types import EmbeddingRequest, EmbeddingResponse
from ._shapes import BadBody, ChatOptions, _model_name, _names, _num, _type_name, _want

__all__ = ["embeddings_json", "parse_embeddings_body"]

_KNOWN = frozenset(
    {"model", "input", "encoding_format", "dimensions", "user", "fallbacks", "timeout"}
)


def parse_embeddings_body(
    body: object,
    tenant: str | None,
    header_fallbacks: str | None,
    *,
    max_timeout: float | None = None,
    default_timeout: float | None = None,
) -> tuple[EmbeddingRequest, ChatOptions]:
    """Validate an OpenAI embeddings body; raise `BadBody` naming the field. The
    options carry where each fallback came from (for the model policy's errors)."""
    if not isinstance(body, dict):
        raise BadBody(None, f"the body must be a JSON object, got {_type_name(body)}")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise BadBody(unknown[0], f"unknown field `{unknown[0]}`", "unknown_field")
    if body.get("model") is None:
        raise BadBody("model", "`model` is required", "missing_field")
    model = _model_name(body["model"], "model")
    raw = body.get("input")
    if raw is None:
        raise BadBody("input", "`input` is required", "missing_field")
    texts: str | list[str]
    if isinstance(raw, str):
        if not raw:
            raise BadBody("input", "`input` must not be empty")
        texts = raw
    else:
        items = _want(raw, list, "input", "a string or an array of strings")
        if not items:
            raise BadBody("input", "`input` must not be empty")
        for i, item in enumerate(items):
            if isinstance(item, int | list) and not isinstance(item, bool):
                raise BadBody(
                    "input",
                    "token arrays are not supported as `input`: send the text",
                    "unsupported_input",
                )
            _want(item, str, f"input[{i}]", "a string")
            if not item:
                raise BadBody(f"input[{i}]", f"`input[{i}]` must not be empty")
        texts = list(items)
    given = body.get("encoding_format")
    if given is not None and given not in ("float", "base64"):
        raise BadBody("encoding_format", '`encoding_format` must be "float" or "base64"')
    fmt: Literal["float", "base64"] = "base64" if given == "base64" else "float"
    dimensions = body.get("dimensions")
    if dimensions is not None:
        dimensions = _want(dimensions, int, "dimensions", "an integer")
        if dimensions < 1:
            raise BadBody("dimensions", "`dimensions` must be a positive integer")
    user = body.get("user")
    if user is not None:
        user = _want(user, str, "user", "a string") or None
    timeout: Any = body.get("timeout")
    if timeout is not None:
        timeout = _num(timeout, "timeout", "a number of seconds")
        if not timeout > 0:
            raise BadBody("timeout", "`timeout` must be a positive, finite number of seconds")
        if max_timeout is not None:
            timeout = min(timeout, max_timeout)
    elif max_timeout is not None and default_timeout is not None and max_timeout < default_timeout:
        timeout = max_timeout
    fallbacks = _names(body.get("fallbacks"), "fallbacks")
    if header_fallbacks:
        fallbacks += _names(header_fallbacks, "x-router-fallbacks")
    request = EmbeddingRequest(
        model=model,
        input=texts,
        dimensions=dimensions,
        encoding_format=fmt,
        user=user,
        fallbacks=[name for name, _ in fallbacks],
        timeout=float(timeout) if timeout is not None else None,
        tenant=tenant,
    )
    return request, ChatOptions(fallback_fields=[where for _, where in fallbacks])


def embeddings_json(response: EmbeddingResponse, encoding_format: str) -> dict[str, Any]:
    """The answer in OpenAI's shape; `model` is the chain entry that served it."""
    b64 = encoding_format == "base64"
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": encode_float32(vector) if b64 else vector,
            }
            for i, vector in enumerate(response.embeddings)
        ],
        "model": response.model,
        "usage": {
            "prompt_tokens": response.usage.prompt_tokens,
            "total_tokens": response.usage.total_tokens,
        },
    }
