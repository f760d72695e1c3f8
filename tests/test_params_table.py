"""README's request-field table and `router/_params.py` read the same, and `check`
does what the table says: carried, refused with a 400 naming the field, or dropped
(and named) with drop_params. Through the Router too: a fallback that cannot honour a
request is skipped; the model asked for refuses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from scripted import ScriptedProvider, make_config

from router import (
    ChatRequest,
    ChatResponse,
    InvalidRequestError,
    Message,
    Router,
)
from router._params import PARAMS, PART_SUPPORT, PROTOCOLS, check
from router._types import AudioPart, ImagePart, ResponseFormat, TextPart

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_rows() -> dict[str, tuple[str, str, str]]:
    text = README.read_text()
    start = text.index("### What each request field does")
    section = text[start : text.index("\n### ", start + 10)]
    rows: dict[str, tuple[str, str, str]] = {}
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| field") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        rows[name] = (cells[1], cells[2], cells[3])
    return rows


def test_readme_table_is_the_code_table() -> None:
    assert readme_rows() == dict(PARAMS)


def test_every_chat_request_field_is_in_the_table() -> None:
    # The fields a caller can set on ChatRequest that reach upstreams, by table name.
    # tenant and metadata are the caller's own (never sent upstream); extra is "other
    # fields"; drop_params is the router's switch.
    internal = {"tenant", "metadata", "drop_params", "extra"}
    named = {f.name for f in msgspec.structs.fields(ChatRequest)} - internal
    table = set(PARAMS) | {"max_tokens"}
    assert named - table == set()


# Values that make each refusable field "set".
VALUES: dict[str, Any] = {
    "seed": 7,
    "n": 2,
    "frequency_penalty": 0.5,
    "presence_penalty": 0.5,
    "logprobs": True,
    "top_logprobs": 3,
    "logit_bias": {"50256": -100.0},
    "user": "u-1",
    "parallel_tool_calls": False,
    "reasoning_effort": "low",
    "service_tier": "auto",
    "prediction": {"type": "content", "content": "x"},
    "response_format": ResponseFormat(type="json_object"),
    "top_p": 0.5,
    "temperature": 0.5,
    "stop": ["x"],
}


def base(**fields: Any) -> ChatRequest:
    fields.setdefault("messages", [Message("user", "hi")])
    return ChatRequest(model="m", **fields)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("field", sorted(VALUES))
def test_check_follows_the_table(protocol: str, field: str) -> None:
    support = PARAMS[field][PROTOCOLS.index(protocol)]
    request = base(**{field: VALUES[field]})
    if support == "refused":
        with pytest.raises(InvalidRequestError) as info:
            check(request, protocol, "m", drop=False)
        assert info.value.field == field
        assert field in str(info.value) and protocol in str(info.value)
        dropped_request, dropped = check(request, protocol, "m", drop=True)
        assert dropped == (field,)
        assert getattr(dropped_request, field) is None
    else:
        assert check(request, protocol, "m", drop=False) == (request, ())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_fields_go_to_openai_compatible_upstreams_only(protocol: str) -> None:
    request = base(extra={"store": True, "verbosity": "low"})
    if protocol == "openai":
        assert check(request, protocol, "m", drop=False) == (request, ())
        return
    with pytest.raises(InvalidRequestError) as info:
        check(request, protocol, "m", drop=False)
    assert info.value.field == "store"
    dropped_request, dropped = check(request, protocol, "m", drop=True)
    assert dropped == ("store, verbosity",)
    assert dropped_request.extra == {}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_content_parts_follow_the_part_table(protocol: str) -> None:
    index = PROTOCOLS.index(protocol)
    parts = [TextPart(text="look"), ImagePart(url="https://example.test/a.png")]
    audio = AudioPart(data="UklGRg==", format="wav")
    request = base(messages=[Message("user", [*parts, audio])])
    if PART_SUPPORT["audio"][index]:
        assert check(request, protocol, "m", drop=False) == (request, ())
        return
    with pytest.raises(InvalidRequestError) as info:
        check(request, protocol, "m", drop=False)
    assert "audio" in str(info.value)
    kept, dropped = check(request, protocol, "m", drop=True)
    assert dropped == ("audio content",)
    assert kept.messages[0].content == parts


def test_custom_providers_see_the_whole_request() -> None:
    request = base(seed=1, extra={"anything": 1})
    assert check(request, "custom", "m", drop=False) == (request, ())


CHAIN = """
[[providers]]
name = "oa"
kind = "custom"
keys = [{ id = "k" }]
[[models]]
name = "first"
provider = "oa"
upstream = "u1"
fallbacks = ["second"]
[[models]]
name = "second"
provider = "oa"
upstream = "u2"
"""


async def test_the_router_enforces_the_table_per_model(autojump_clock, monkeypatch) -> None:
    # Custom providers are not checked; pretend this one speaks Anthropic's protocol.
    sp = ScriptedProvider()
    async with Router.open(make_config(CHAIN), providers={"oa": sp}) as router:
        monkeypatch.setattr(router._runtimes["oa"], "kind", "anthropic")
        with pytest.raises(InvalidRequestError) as info:
            await router.submit(
                ChatRequest(model="first", messages=[Message("user", "hi")], seed=3)
            )
        assert info.value.field == "seed"
        assert sp.calls == []
        resp = await router.submit(
            ChatRequest(model="first", messages=[Message("user", "hi")], seed=3, drop_params=True)
        )
        assert isinstance(resp, ChatResponse)
        assert resp.dropped_params == ["seed"]
        assert sp.calls[-1].model == "u1"


def test_readme_names_the_table_module() -> None:
    text = README.read_text()
    assert re.search(r"`router/_params\.py`", text)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_strict_tools_follow_the_table(protocol: str) -> None:
    from router import Tool

    request = base(tools=[Tool(name="f", strict=True), Tool(name="g")])
    if protocol == "openai":
        assert check(request, protocol, "m", drop=False) == (request, ())
        return
    with pytest.raises(InvalidRequestError) as info:
        check(request, protocol, "m", drop=False)
    assert info.value.field == "tools[].strict"
    kept, dropped = check(request, protocol, "m", drop=True)
    assert dropped == ("tools[].strict",)
    assert kept.tools is not None and all(t.strict is None for t in kept.tools)
