"""Config loading and validation: every problem is a ConfigError naming its field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from scripted import ScriptedProvider

from router import (
    ApiKey,
    ChatRequest,
    ChatResponse,
    ConfigError,
    Message,
    Router,
    RouterConfig,
    RouterError,
)

BASE_TOML = """
[router]
timeout = 12.5
attempt_timeout = 3.0
transient_retries = 1
fallbacks = ["sim/backup"]

[router.breaker]
failure_threshold = 2

[[providers]]
name = "sim"
kind = "simulated"
keys = [{ id = "k1", secret = "s1" }, { id = "k2", max_concurrency = 3 }]

[[providers]]
name = "mine"
kind = "custom"
keys = [{ id = "only" }]

[[models]]
name = "fast"
provider = "sim"
upstream = "fast-1"
fallbacks = ["slow", "mine/other"]

[[models]]
name = "slow"
provider = "mine"
upstream = "slow-1"
"""


def base_dict() -> dict[str, Any]:
    return {
        "router": {
            "timeout": 12.5,
            "attempt_timeout": 3.0,
            "transient_retries": 1,
            "fallbacks": ["sim/backup"],
            "breaker": {"failure_threshold": 2},
        },
        "providers": [
            {
                "name": "sim",
                "kind": "simulated",
                "keys": [{"id": "k1", "secret": "s1"}, {"id": "k2", "max_concurrency": 3}],
            },
            {"name": "mine", "kind": "custom", "keys": [{"id": "only"}]},
        ],
        "models": [
            {
                "name": "fast",
                "provider": "sim",
                "upstream": "fast-1",
                "fallbacks": ["slow", "mine/other"],
            },
            {"name": "slow", "provider": "mine", "upstream": "slow-1"},
        ],
    }


def check_base(cfg: RouterConfig) -> None:
    assert isinstance(cfg, RouterConfig)
    assert cfg.router.timeout == 12.5
    assert cfg.router.attempt_timeout == 3.0
    assert cfg.router.transient_retries == 1
    assert cfg.router.fallbacks == ["sim/backup"]
    assert cfg.router.breaker.failure_threshold == 2
    assert cfg.router.breaker.open_for == 30.0  # default kept
    assert [p.name for p in cfg.providers] == ["sim", "mine"]
    assert [p.kind for p in cfg.providers] == ["simulated", "custom"]
    assert [k.id for k in cfg.providers[0].keys] == ["k1", "k2"]
    assert cfg.providers[0].keys[0].secret == "s1"
    assert cfg.providers[0].keys[1].max_concurrency == 3
    assert cfg.providers[0].max_concurrency == 64
    assert [m.name for m in cfg.models] == ["fast", "slow"]
    assert cfg.models[0].fallbacks == ["slow", "mine/other"]


# -- the four loaders agree -------------------------------------------------------------


def test_from_toml() -> None:
    check_base(RouterConfig.from_toml(BASE_TOML))


def test_from_toml_bytes() -> None:
    check_base(RouterConfig.from_toml(BASE_TOML.encode()))


def test_from_json() -> None:
    check_base(RouterConfig.from_json(json.dumps(base_dict())))


def test_from_dict() -> None:
    check_base(RouterConfig.from_dict(base_dict()))


def test_load_toml(tmp_path: Path) -> None:
    p = tmp_path / "router.toml"
    p.write_text(BASE_TOML)
    check_base(RouterConfig.load(p))
    check_base(RouterConfig.load(str(p)))


def test_load_json(tmp_path: Path) -> None:
    p = tmp_path / "router.json"
    p.write_text(json.dumps(base_dict()))
    check_base(RouterConfig.load(p))


def test_load_all_equal(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(BASE_TOML)
    (tmp_path / "a.json").write_text(json.dumps(base_dict()))
    a = RouterConfig.load(tmp_path / "a.toml")
    b = RouterConfig.load(tmp_path / "a.json")
    c = RouterConfig.from_dict(base_dict())
    assert a == b == c


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        RouterConfig.load(tmp_path / "nope.toml")
    assert ei.value.field == "<file>"


def test_load_json_file_with_toml_content_fails(tmp_path: Path) -> None:
    p = tmp_path / "router.json"
    p.write_text('providers = [{ name = "a" }]\n')
    with pytest.raises(ConfigError) as ei:
        RouterConfig.load(p)
    assert ei.value.field == "<document>"


# -- field-naming errors -------------------------------------------------------------------


def expect_field(data: dict[str, Any], field: str) -> ConfigError:
    """Every loader reports the same field for the same bad document."""
    errors = []
    for load in (
        lambda: RouterConfig.from_dict(data),
        lambda: RouterConfig.from_json(json.dumps(data)),
    ):
        with pytest.raises(ConfigError) as ei:
            load()
        err = ei.value
        assert isinstance(err, RouterError)
        assert err.kind == "bad_request"
        assert err.field == field, (err.field, str(err))
        assert f"`{field}`" in str(err)
        errors.append(err)
    return errors[0]


def test_unknown_field_typo_in_key() -> None:
    d = base_dict()
    d["providers"][0]["keys"][0]["secrt"] = "x"
    err = expect_field(d, "providers[0].keys[0].secrt")
    assert "unknown field" in str(err)


def test_unknown_field_in_router_table() -> None:
    d = base_dict()
    d["router"]["timout"] = 3
    expect_field(d, "router.timout")


def test_unknown_top_level_field() -> None:
    d = base_dict()
    d["modles"] = []
    expect_field(d, "modles")


def test_unknown_field_toml() -> None:
    text = BASE_TOML.replace('{ id = "k1", secret = "s1" }', '{ id = "k1", secrt = "s1" }')
    with pytest.raises(ConfigError) as ei:
        RouterConfig.from_toml(text)
    assert ei.value.field == "providers[0].keys[0].secrt"


def test_wrong_type() -> None:
    d = base_dict()
    d["router"]["timeout"] = "soon"
    err = expect_field(d, "router.timeout")
    assert "Expected" in str(err)


def test_wrong_type_nested() -> None:
    d = base_dict()
    d["providers"][0]["keys"][1]["max_concurrency"] = "many"
    expect_field(d, "providers[0].keys[1].max_concurrency")


def test_wrong_kind_literal() -> None:
    d = base_dict()
    d["providers"][1]["kind"] = "martian"
    expect_field(d, "providers[1].kind")


def test_missing_required_field() -> None:
    d = base_dict()
    del d["providers"][0]["keys"][1]["id"]
    err = expect_field(d, "providers[0].keys[1].id")
    assert "missing required field" in str(err)


def test_missing_providers() -> None:
    d = base_dict()
    del d["providers"]
    expect_field(d, "providers")


def test_empty_providers() -> None:
    d = base_dict()
    d["providers"] = []
    d["models"] = []
    d["router"]["fallbacks"] = []
    expect_field(d, "providers")


def test_negative_timeout() -> None:
    d = base_dict()
    d["router"]["timeout"] = -1
    expect_field(d, "router.timeout")


def test_zero_attempt_timeout() -> None:
    d = base_dict()
    d["router"]["attempt_timeout"] = 0
    expect_field(d, "router.attempt_timeout")


def test_negative_timeout_toml() -> None:
    with pytest.raises(ConfigError) as ei:
        RouterConfig.from_toml(BASE_TOML.replace("timeout = 12.5", "timeout = -12.5"))
    assert ei.value.field == "router.timeout"


def test_duplicate_provider_name() -> None:
    d = base_dict()
    d["providers"][1]["name"] = "sim"
    err = expect_field(d, "providers[1].name")
    assert "duplicate" in str(err)


def test_duplicate_key_id() -> None:
    d = base_dict()
    d["providers"][0]["keys"][1]["id"] = "k1"
    err = expect_field(d, "providers[0].keys[1].id")
    assert "duplicate" in str(err)


def test_same_key_id_on_two_providers_is_fine() -> None:
    d = base_dict()
    d["providers"][1]["keys"][0]["id"] = "k1"
    RouterConfig.from_dict(d)


def test_model_with_unknown_provider() -> None:
    d = base_dict()
    d["models"][1]["provider"] = "ghost"
    err = expect_field(d, "models[1].provider")
    assert "ghost" in str(err)


def test_fallback_referencing_unknown_model() -> None:
    d = base_dict()
    d["models"][0]["fallbacks"] = ["slow", "nonexistent"]
    err = expect_field(d, "models[0].fallbacks[1]")
    assert "nonexistent" in str(err)


def test_fallback_with_unknown_provider_prefix() -> None:
    d = base_dict()
    d["models"][0]["fallbacks"] = ["ghost/x"]
    expect_field(d, "models[0].fallbacks[0]")


def test_global_fallback_referencing_unknown_model() -> None:
    d = base_dict()
    d["router"]["fallbacks"] = ["nope"]
    expect_field(d, "router.fallbacks[0]")


def test_malformed_toml() -> None:
    with pytest.raises(ConfigError) as ei:
        RouterConfig.from_toml("[router\ntimeout = = 3")
    assert ei.value.kind == "bad_request"
    assert ei.value.field == "<document>"
    assert "TOML" in str(ei.value)


def test_malformed_json() -> None:
    with pytest.raises(ConfigError) as ei:
        RouterConfig.from_json('{"providers": [')
    assert ei.value.field == "<document>"
    assert "JSON" in str(ei.value)


def test_from_dict_not_a_dict() -> None:
    with pytest.raises(ConfigError) as ei:
        RouterConfig.from_dict([1, 2])  # type: ignore[arg-type]
    assert ei.value.field == "<root>"


# -- errors found when the router opens -----------------------------------------------------


def simple(kind: str, secret: str = "") -> RouterConfig:
    return RouterConfig.from_dict(
        {"providers": [{"name": "p", "kind": kind, "keys": [{"id": "k", "secret": secret}]}]}
    )


async def open_error(cfg: RouterConfig, providers: dict[str, Any] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        async with Router.open(cfg, providers=providers):
            pytest.fail("Router.open should have refused this config")
    assert isinstance(ei.value, RouterError)
    assert ei.value.kind == "bad_request"
    return ei.value


async def test_custom_provider_without_instance() -> None:
    err = await open_error(simple("custom"))
    assert err.field == "providers[0].kind"
    assert "'p'" in str(err)


async def test_instance_for_non_custom_provider() -> None:
    err = await open_error(simple("simulated"), {"p": ScriptedProvider()})
    assert err.field == "providers[0].kind"
    assert "custom" in str(err)


async def test_instance_for_unknown_provider_name() -> None:
    err = await open_error(simple("custom"), {"p": ScriptedProvider(), "q": ScriptedProvider()})
    assert "q" in err.field


async def test_instance_without_complete() -> None:
    err = await open_error(simple("custom"), {"p": object()})
    assert err.field.startswith("providers[0]")


async def test_env_secret_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROUTER_TEST_SECRET_VAR", raising=False)
    err = await open_error(
        simple("custom", "env:ROUTER_TEST_SECRET_VAR"), {"p": ScriptedProvider()}
    )
    assert err.field == "providers[0].keys[0].secret"
    assert "ROUTER_TEST_SECRET_VAR" in str(err)


def test_env_with_empty_name_rejected_at_load() -> None:
    with pytest.raises(ConfigError) as ei:
        simple("custom", "env:")
    assert ei.value.field == "providers[0].keys[0].secret"


class SecretSeer(ScriptedProvider):
    seen: list[str]

    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse:
        self.seen.append(key.secret)
        return await super().complete(request, key)


async def test_env_secret_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_TEST_SECRET_VAR", "sk-from-env-123")
    cfg = simple("custom", "env:ROUTER_TEST_SECRET_VAR")
    assert cfg.providers[0].keys[0].secret == "env:ROUTER_TEST_SECRET_VAR"  # resolved at open
    prov = SecretSeer()
    prov.seen = []
    async with Router.open(cfg, providers={"p": prov}) as r:
        resp = await r.submit(ChatRequest(model="p/m", messages=[Message("user", "hi")]))
    assert resp.content == "ok from k"
    assert prov.seen == ["sk-from-env-123"]


async def test_literal_secret_passed_as_is() -> None:
    prov = SecretSeer()
    prov.seen = []
    async with Router.open(simple("custom", "literal-secret"), providers={"p": prov}) as r:
        await r.submit(ChatRequest(model="p/m", messages=[Message("user", "hi")]))
    assert prov.seen == ["literal-secret"]


async def test_open_rejects_non_config() -> None:
    with pytest.raises(ConfigError):
        async with Router.open({"providers": []}):  # type: ignore[arg-type]
            pass
    await trio.lowlevel.checkpoint()
