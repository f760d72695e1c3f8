"""What each wire protocol does with each field of an OpenAI chat request.

Nothing a caller asks for may vanish: every field of a valid OpenAI chat-completions
request is either carried to the upstream (as is, or translated into the protocol's
own terms) or refused with a clear 400 naming it. With ``drop_params`` (per request,
per model, or ``[router]``) a refusal becomes "drop it, log once, and say so" (the
gateway's ``x-router-dropped-params`` header). README.md's parameter table is this
table; ``tests/test_params_table.py`` keeps the two in step.

The words of the table:

- ``native``: sent as is (OpenAI-compatible upstreams).
- ``translated``: sent in the protocol's own terms (the protocol module says how).
- ``refused``: the protocol has no way to honour it: 400, or dropped with drop_params.
- ``router``: the router or gateway itself honours it (never sent upstream).

Custom and simulated providers receive the whole `ChatRequest` and are not checked:
their code sees every field.

What this module must never do: change a request silently. `check` either returns it
unchanged, returns a copy without the fields it was allowed to drop (and names them),
or raises.
"""

from __future__ import annotations

import logging
from typing import Final, Literal

import msgspec

from ._errors import InvalidRequestError
from ._types import AudioPart, ChatRequest, ContentPart, FilePart, ImagePart, Message

__all__ = ["PARAMS", "PART_SUPPORT", "PROTOCOLS", "check"]

log = logging.getLogger("router.params")

Support = Literal["native", "translated", "refused", "router"]
PROTOCOLS: Final = ("openai", "anthropic", "gemini")
_INDEX: Final = {name: i for i, name in enumerate(PROTOCOLS)}

# field: (openai, anthropic, gemini). Fields the router honours itself are "router".
PARAMS: Final[dict[str, tuple[Support, Support, Support]]] = {
    "model": ("translated", "translated", "translated"),
    "messages": ("translated", "translated", "translated"),
    "max_tokens": ("native", "translated", "translated"),
    "max_completion_tokens": ("native", "translated", "translated"),
    "temperature": ("native", "native", "translated"),
    "top_p": ("native", "native", "translated"),
    "stop": ("native", "translated", "translated"),
    "tools": ("native", "translated", "translated"),
    "tools[].strict": ("native", "refused", "refused"),
    "tool_choice": ("native", "translated", "translated"),
    "parallel_tool_calls": ("native", "translated", "refused"),
    "response_format": ("native", "translated", "translated"),
    "seed": ("native", "refused", "translated"),
    "n": ("native", "refused", "translated"),
    "frequency_penalty": ("native", "refused", "translated"),
    "presence_penalty": ("native", "refused", "translated"),
    "logprobs": ("native", "refused", "translated"),
    "top_logprobs": ("native", "refused", "translated"),
    "logit_bias": ("native", "refused", "refused"),
    "user": ("native", "translated", "refused"),
    "reasoning_effort": ("native", "translated", "translated"),
    "service_tier": ("native", "translated", "refused"),
    "prediction": ("native", "refused", "refused"),
    "stream": ("router", "router", "router"),
    "stream_options": ("router", "router", "router"),
    "timeout": ("router", "router", "router"),
    "fallbacks": ("router", "router", "router"),
    "other fields": ("native", "refused", "refused"),
}
"""README.md's parameter table. "other fields" are the ones the router does not model
(`ChatRequest.extra`: `store`, `metadata`, `modalities`, `audio`, `verbosity`,
`web_search_options`, `prompt_cache_key`, `safety_identifier`, and any newer field):
passed through unchanged to OpenAI-compatible upstreams, refused by the others."""

# The ChatRequest attribute each checked field lives in (a few are named differently).
_ATTRIBUTE: Final = {
    "max_completion_tokens": None,  # folded into max_tokens by the gateway
    "tools[].strict": None,  # checked on each tool
    "other fields": "extra",
}
_CHECKED: Final = tuple(
    tuple(
        (name, attribute)
        for name, row in PARAMS.items()
        if row[i] == "refused" and (attribute := _ATTRIBUTE.get(name, name)) is not None
    )
    for i in range(3)
)
"""Per protocol: the (field, ChatRequest attribute) pairs it refuses."""

PART_SUPPORT: Final[dict[str, tuple[bool, bool, bool]]] = {
    "text": (True, True, True),
    "image": (True, True, True),
    "file": (True, True, True),
    "audio": (True, False, True),
}
"""Content part types each protocol can carry (openai, anthropic, gemini)."""

_PART_NAMES: Final[dict[type, str]] = {ImagePart: "image", FilePart: "file", AudioPart: "audio"}
_logged: set[tuple[str, str, str]] = set()


def _is_set(name: str, value: object) -> bool:
    return value is not None and value != {} and not (value is False and name == "logprobs")


def check(
    request: ChatRequest, protocol: str, where: str, drop: bool
) -> tuple[ChatRequest, tuple[str, ...]]:
    """`request` as the `protocol` can serve it for model `where`, and what was dropped:
    unchanged (and nothing) when it can; else, with `drop`, a copy without what it
    cannot take (each logged once per field and model); else `InvalidRequestError`
    naming the first field or content part it cannot take."""
    index = _INDEX.get(protocol)
    if index is None:
        return request, ()  # custom and simulated providers see the whole request
    refused = [
        name for name, attribute in _CHECKED[index] if _is_set(name, getattr(request, attribute))
    ]
    tools = request.tools
    if index != 0 and tools is not None and any(t.strict for t in tools):
        refused.append("tools[].strict")
    parts: list[str] = []
    for message in request.messages:
        content = message.content
        if type(content) is not str:
            for part in content:
                kind = _PART_NAMES.get(type(part))
                if kind is not None and not PART_SUPPORT[kind][index] and kind not in parts:
                    parts.append(kind)
    if not refused and not parts:
        return request, ()
    unknown = ", ".join(sorted(request.extra))
    if not drop:
        if refused:
            field = refused[0]
            shown = f"unknown field(s) {unknown}" if field == "other fields" else f"`{field}`"
            raise InvalidRequestError(
                sorted(request.extra)[0] if field == "other fields" else field,
                f"{shown}: model {where!r} ({protocol} protocol) cannot take it; remove it, "
                "choose another model, or set drop_params",
            )
        raise InvalidRequestError(
            "messages",
            f"{parts[0]} content: model {where!r} ({protocol} protocol) cannot take it",
        )
    changes: dict[str, object] = {}
    for name in refused:
        if name == "tools[].strict":
            assert tools is not None
            changes["tools"] = [msgspec.structs.replace(t, strict=None) for t in tools]
            continue
        attribute = _ATTRIBUTE.get(name, name)
        assert attribute is not None
        changes[attribute] = {} if attribute == "extra" else None
    dropped = [unknown if name == "other fields" else name for name in refused]
    if parts:
        dropped += [f"{p} content" for p in parts]
        changes["messages"] = [_without_parts(m, index) for m in request.messages]
    for name in dropped:
        if (protocol, where, name) not in _logged and len(_logged) < 10_000:
            _logged.add((protocol, where, name))
            log.warning(
                "dropping %s for model %r (the %s protocol cannot take it)", name, where, protocol
            )
    return msgspec.structs.replace(request, **changes), tuple(dropped)


def _without_parts(message: Message, index: int) -> Message:
    content = message.content
    if isinstance(content, str):
        return message
    kept: list[ContentPart] = [
        p for p in content if (k := _PART_NAMES.get(type(p))) is None or PART_SUPPORT[k][index]
    ]
    return msgspec.structs.replace(message, content=kept)
