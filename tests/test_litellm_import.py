"""`llm-router import-litellm`: LiteLLM proxy configs in, TOML that loads out.

The fixtures in tests/data/litellm/ have the shapes LiteLLM's own docs show (the proxy
quick start, the reliability guide, load balancing with Redis, a provider mix, local
servers). Every output must load with `RouterConfig`, pass `llm-router check` with its
variables set, name every setting it cannot carry over, and never echo a secret outside
the key it belongs to. One test routes real requests through an imported config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from router import ChatRequest, ConfigError, Message, Router, RouterConfig
from router.__main__ import main
from router._litellm import _KINDS, _UNSERVED, import_litellm
from router.emulator import Emulator, Fault

DATA = Path(__file__).parent / "data" / "litellm"
FIXTURES = sorted(DATA.glob("*.yaml"))


def imported(name: str) -> tuple[str, RouterConfig, list[str]]:
    result = import_litellm((DATA / name).read_text(), source=name)
    return result.toml, RouterConfig.from_toml(result.toml), result.warnings


def provider(config: RouterConfig, name: str) -> Any:
    return next(p for p in config.providers if p.name == name)


def model(config: RouterConfig, name: str) -> Any:
    return next(m for m in config.models if m.name == name)


def comments(toml: str) -> str:
    return "\n".join(line for line in toml.splitlines() if line.lstrip().startswith("#"))


# -- every fixture --------------------------------------------------------------------


def test_there_are_at_least_five_real_world_fixtures() -> None:
    assert len(FIXTURES) >= 5


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_every_fixture_imports_to_a_config_that_loads(path: Path, tmp_path: Path) -> None:
    out = tmp_path / "router.toml"
    assert main(["import-litellm", str(path), "-o", str(out)]) == 0
    config = RouterConfig.load(out)
    assert config.providers and config.models


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_every_fixture_passes_check_once_its_variables_are_set(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "router.toml"
    assert main(["import-litellm", str(path), "-o", str(out)]) == 0
    text = out.read_text()
    for var in sorted(set(re.findall(r'"env:([A-Za-z_][A-Za-z0-9_]*)"', text))):
        monkeypatch.setenv(var, "redis://127.0.0.1:6379/0" if var == "REDIS_URL" else "sk-x")
    capsys.readouterr()
    assert main(["check", "--config", str(out)]) == 0, capsys.readouterr().err
    assert f"config {out}: ok" in capsys.readouterr().out


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_every_setting_of_every_fixture_is_named_in_the_output(path: Path) -> None:
    """Each key of the LiteLLM file either becomes a field or is named in a comment:
    the structural keys (which become providers, keys and models) are listed here;
    every other key must appear in the TOML text by name."""
    structural = {
        "model_list", "model_name", "litellm_params", "model_info", "model", "api_base",
        "api_key", "rpm", "tpm", "id", "mode", "order", "max_input_tokens",
        "max_parallel_requests", "organization", "drop_params", "master_key",
        "redis_host", "redis_port", "redis_password", "routing_strategy",
        "enable_pre_call_checks", "model_group_alias", "router_settings",
        "litellm_settings", "general_settings", "api_version",
    }  # fmt: skip
    data = yaml.safe_load(path.read_text())
    toml = import_litellm(path.read_text()).toml
    names: set[str] = set()
    for section in ("router_settings", "litellm_settings", "general_settings"):
        names |= set(data.get(section) or {})
    for i, entry in enumerate(data["model_list"]):
        if entry["litellm_params"]["model"].partition("/")[0] in _UNSERVED:
            assert f"not carried over: model_list[{i}] (model_name" in toml  # as a whole
            continue
        names |= set(entry) | set(entry.get("litellm_params") or {})
        names |= set(entry.get("model_info") or {})
    names |= set(data)
    for name in sorted(names - structural):
        assert name in toml, f"{path.name}: {name} is not named in the output"


# -- each fixture's content -----------------------------------------------------------


def test_quickstart_azure_regions_become_a_model_and_its_fallback() -> None:
    toml, config, warnings = imported("quickstart.yaml")
    gpt = model(config, "gpt-4o")
    west = provider(config, gpt.provider)
    assert west.kind == "openai"
    assert west.base_url == "https://contoso-westeurope.openai.azure.com/openai/v1"
    assert [(k.id, k.secret) for k in west.keys] == [
        ("azure-key-westeurope", "env:AZURE_KEY_WESTEUROPE")
    ]
    assert gpt.upstream == "prod-gpt4o-westeurope"
    (other,) = gpt.fallbacks
    east_name, _, east_upstream = other.partition("/")
    east = provider(config, east_name)
    assert east.base_url == "https://contoso-canadaeast.openai.azure.com/openai/v1"
    assert east_upstream == "prod-gpt4o-canadaeast"
    assert east.keys[0].secret == "env:AZURE_KEY_CANADAEAST"
    assert "LiteLLM balances across them" in toml
    assert "takes no api_version" in toml
    qwen = model(config, "qwen-coder")
    assert qwen.upstream == "Qwen/Qwen2.5-Coder-32B-Instruct"
    assert provider(config, qwen.provider).base_url == "http://gpu-box.internal:8000/v1"
    assert config.router.drop_params is True
    assert config.router.balancing == "round_robin"
    assert config.gateway.admin_key == "env:LITELLM_MASTER_KEY"
    assert [(k.id, k.secret) for k in config.gateway.api_keys] == [
        ("master", "env:LITELLM_MASTER_KEY")
    ]
    assert config.gateway.port == 4000
    assert config.router.attempt_timeout == 30.0  # ours, and the comment says so
    assert "no timeout in the LiteLLM file: LiteLLM waits up to 10 minutes per call" in toml
    notes = comments(toml)
    assert "not carried over: litellm_settings.success_callback: logging callbacks" in notes
    assert "not carried over: general_settings.database_url: virtual keys" in notes
    assert "not carried over: model_list[2].litellm_params.temperature: a default request" in notes
    assert warnings == []


def test_reliability_fallbacks_retries_timeouts_and_cooldowns() -> None:
    toml, config, _ = imported("reliability.yaml")
    r = config.router
    small = model(config, "llama-small")
    assert small.fallbacks[1:] == ["gpt-4o-mini", "claude-sonnet"]
    assert small.fallbacks[0].endswith("/meta-llama/Llama-3.1-8B-Instruct")
    assert provider(config, small.fallbacks[0].partition("/")[0]).base_url == (
        "http://10.0.0.12:8000/v1"
    )
    assert small.context_window == 8192
    # default_fallbacks go to every model without fallbacks of its own, never to itself
    assert model(config, "gpt-4o-mini").fallbacks == ["claude-sonnet"]
    assert model(config, "gpt-4o").fallbacks == ["claude-sonnet"]
    assert model(config, "claude-sonnet").fallbacks == []
    assert r.fallbacks == []
    assert r.context_window_fallbacks == {"llama-small": "gpt-4o-mini"}
    assert r.transient_retries == 3
    assert r.attempt_timeout == 20.0 and r.first_token_timeout == 20.0
    assert r.timeout == 90.0
    assert r.breaker.failure_threshold == 3 and r.breaker.open_for == 45.0
    assert r.cooldown.min == 45.0
    notes = comments(toml)
    assert "not carried over: router_settings.retry_policy: per-error retry counts" in notes
    assert "not carried over: litellm_settings.content_policy_fallbacks" in notes
    assert "not carried over: litellm_settings.context_window_fallbacks: llama-small -> gpt-4o" in (
        notes
    )
    assert "model_list[4].litellm_params.max_tokens: a default request parameter" in notes
    assert "allowed_fails 2: LiteLLM cools a deployment" in notes
    assert "(approximate: consecutive failures)" in notes


def test_load_balancing_keys_of_one_deployment_group_carry_their_budgets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    toml, config, warnings = imported("load_balancing.yaml")
    gpt = model(config, "gpt-4.1")
    azure = provider(config, gpt.provider)
    assert azure.base_url == "https://acme-eastus.openai.azure.com/openai/v1"
    assert [(k.id, k.secret, k.rpm, k.tpm) for k in azure.keys] == [
        ("eastus", "env:AZURE_EASTUS_KEY", 600, 100000),
        ("eastus-second", "env:AZURE_EASTUS_KEY_2", 600, 100000),
    ]
    assert gpt.fallbacks == ["openai/gpt-4.1"]  # the self-fallback adds nothing
    openai = provider(config, "openai")
    assert openai.headers == {"OpenAI-Organization": "org-acme"}
    assert [(k.secret, k.rpm) for k in openai.keys] == [("env:OPENAI_API_KEY", 1000)]
    embed = model(config, "text-embedding")
    assert embed.mode == "embedding"
    # a budgeted key is not shared: LiteLLM counts rpm per deployment, we per key
    assert embed.provider != "openai"
    assert provider(config, embed.provider).keys[0].rpm is None
    assert config.router.balancing == "round_robin"
    assert config.router.transient_retries == 2 and config.router.attempt_timeout == 30.0
    assert config.router.shared is not None
    assert config.router.shared.redis_url == "env:REDIS_URL"
    assert config.gateway.admin_key == "sk-1234"
    notes = comments(toml)
    assert "usage-based-routing-v2: approximate" in notes
    assert "not carried over: model_list[2].litellm_params.weight" in notes
    assert "not carried over: general_settings.alerting" in notes
    assert "export REDIS_URL as redis://:PASSWORD@HOST:PORT/DB" in notes
    assert any("general_settings.master_key is a literal secret" in w for w in warnings)
    assert any("REDIS_URL" in w for w in warnings)
    assert not any("sk-1234" in w for w in warnings)
    assert "sk-1234" not in notes


def test_provider_mix_serves_what_it_can_and_names_the_rest() -> None:
    toml, config, _ = imported("providers_mix.yaml")
    assert {p.kind for p in config.providers} == {"anthropic", "gemini"}
    claude = model(config, "claude")
    assert provider(config, claude.provider).base_url == "https://api.anthropic.com"
    assert claude.fallbacks == ["gemini-flash"]
    assert model(config, "claude-latest").fallbacks == ["gemini-flash"]
    assert model(config, "claude-latest").upstream == "claude-sonnet-4-5"
    assert model(config, "flash").upstream == "gemini-2.5-flash"
    embed = model(config, "gemini-embed")
    assert embed.mode == "embedding"
    assert provider(config, embed.provider).keys[0].secret == "env:GEMINI_API_KEY"
    assert {m.name for m in config.models} == {
        "claude", "gemini-flash", "gemini-embed", "claude-latest", "flash",
    }  # fmt: skip
    assert config.router.balancing == "least_busy"
    notes = comments(toml)
    assert "not carried over: model_list[1] (model_name 'claude'), bedrock/" in notes
    assert "AWS Bedrock needs SigV4" in notes
    assert "not carried over: model_list[2] (model_name 'gemini-pro'), vertex_ai/" in notes
    assert "not carried over: model_list[5] (model_name 'llama-bedrock')" in notes
    assert "router_settings.fallbacks: claude -> gemini-pro: no carried-over model" in notes
    assert "router_settings.fallbacks: llama-bedrock: no carried-over model" in notes
    assert "not carried over: router_settings.routing_strategy_args" in notes
    assert "model_list[0].model_info.supports_vision: a capability flag" in notes
    assert "hidden: not carried" in notes


def test_local_servers_ollama_lm_studio_wildcards_order_and_literal_secrets() -> None:
    toml, config, warnings = imported("local_servers.yaml")
    llama = model(config, "llama3")
    assert provider(config, llama.provider).base_url == "http://localhost:11434/v1"
    assert provider(config, llama.provider).keys[0].secret == ""
    phi = model(config, "phi")
    assert provider(config, phi.provider).base_url == "http://localhost:11434/v1"
    studio = provider(config, model(config, "studio").provider)
    assert studio.base_url == "http://localhost:1234/v1"
    assert studio.keys[0].max_concurrency == 4
    # the wildcard is a provider named as the prefix: callers ask for openai/<model>
    assert provider(config, "openai").keys[0].secret == "sk-literal-openai-key-000000"
    assert "openai/*" not in {m.name for m in config.models}
    # `order`: the groq deployment (order 1) first, deepseek (order 2) its fallback
    deepseek = model(config, "deepseek")
    assert provider(config, deepseek.provider).base_url == "https://api.groq.com/openai/v1"
    assert deepseek.fallbacks == ["deepseek/deepseek-chat"]
    assert "as in LiteLLM, a higher order serves only when the lower ones fail" in toml
    r = config.router
    assert (r.attempt_timeout, r.first_token_timeout, r.idle_timeout, r.timeout) == (
        120.0, 15.0, 15.0, 360.0,
    )  # fmt: skip
    assert r.balancing == "least_busy"
    assert r.shared is not None and r.shared.redis_url == "redis://:hunter2-redis@127.0.0.1:6380"
    notes = comments(toml)
    assert "not carried over: environment_variables" in notes
    assert "wildcard model_name 'openai/*'" in notes
    assert len(warnings) == 3
    for secret in ("sk-literal-openai-key-000000", "lm-studio", "hunter2-redis"):
        assert not any(secret in w for w in warnings)
        assert secret not in notes
        assert toml.count(secret) == 1  # its own field, nowhere else
    assert any("model_list[3].litellm_params.api_key is a literal secret" in w for w in warnings)


def test_production_limits_shared_redis_and_what_a_proxy_database_did() -> None:
    toml, config, warnings = imported("production.yaml")
    mini = model(config, "gpt-4o-mini")
    azure = provider(config, mini.provider)
    assert azure.base_url == "https://fabrikam-prod.openai.azure.com/openai/v1"
    assert [(k.id, k.secret, k.max_concurrency) for k in azure.keys] == [
        ("prod-mini", "env:AZURE_PROD_KEY", 50)
    ]
    embed = model(config, "embeddings")
    assert (embed.provider, embed.upstream, embed.mode) == (
        mini.provider, "text-embedding-3-large", "embedding",
    )  # fmt: skip
    assert {m.name for m in config.models} == {"gpt-4o-mini", "embeddings"}
    assert config.router.shared is not None and config.router.shared.redis_url == "env:REDIS_URL"
    assert config.gateway.max_in_flight == 400
    assert config.gateway.admin_key == "env:PROXY_MASTER_KEY"
    notes = comments(toml)
    for setting in (
        "model_list[2] (model_name 'dall-e-3') (model_info.mode 'image_generation')",
        "litellm_settings.cache: response caching",
        "litellm_settings.cache_params: response caching",
        "litellm_settings.callbacks: logging callbacks",
        "router_settings.max_fallbacks",
        "router_settings.disable_cooldowns",
        "general_settings.store_model_in_db",
        "general_settings.background_health_checks: llm-router learns health",
        "model_list[0].litellm_params.timeout: a per-deployment timeout",
        "model_list[0].litellm_params.stream_timeout: a per-deployment timeout",
        "model_list[0].model_info.base_model",
    ):
        assert f"not carried over: {setting}" in notes
    assert warnings == []


def test_unknown_settings_everywhere_are_named_with_their_path() -> None:
    text = """
model_list:
  - model_name: m
    frobnicate_a: 1
    litellm_params: {model: openai/gpt-4o, frobnicate_b: 2}
    model_info: {frobnicate_c: 3}
router_settings: {frobnicate_d: 4}
litellm_settings: {frobnicate_e: 5}
general_settings: {frobnicate_f: 6}
frobnicate_g: 7
"""
    toml = import_litellm(text).toml
    RouterConfig.from_toml(toml)
    for path in (
        "model_list[0].frobnicate_a",
        "model_list[0].litellm_params.frobnicate_b",
        "model_list[0].model_info.frobnicate_c",
        "router_settings.frobnicate_d",
        "litellm_settings.frobnicate_e",
        "general_settings.frobnicate_f",
        "frobnicate_g",
    ):
        assert f"# not carried over: {path}: no equivalent in llm-router" in toml


def test_headers_and_organization_carry_over_with_env_references() -> None:
    text = """
model_list:
  - model_name: m
    litellm_params:
      model: openai/gpt-4o
      organization: os.environ/OPENAI_ORG
      extra_headers: {X-Team: search, X-Gateway-Token: tok-literal-77, X-Api-Key: os.environ/GW}
"""
    result = import_litellm(text)
    config = RouterConfig.from_toml(result.toml)
    assert config.providers[0].headers == {
        "OpenAI-Organization": "env:OPENAI_ORG",
        "X-Team": "search",
        "X-Gateway-Token": "tok-literal-77",
        "X-Api-Key": "env:GW",
    }
    (warning,) = result.warnings
    assert "extra_headers.X-Gateway-Token is a literal credential" in warning
    assert "tok-literal-77" not in warning


def test_keys_of_one_endpoint_in_two_order_tiers_become_a_fallback() -> None:
    text = """
model_list:
  - {model_name: m, litellm_params: {model: openai/gpt-4o, api_key: os.environ/B, order: 2}}
  - {model_name: m, litellm_params: {model: openai/gpt-4o, api_key: os.environ/A, order: 1}}
  - {model_name: m, litellm_params: {model: openai/gpt-4o, api_key: os.environ/C, order: 1}}
"""
    toml = import_litellm(text).toml
    config = RouterConfig.from_toml(toml)
    m = model(config, "m")
    assert [k.secret for k in provider(config, m.provider).keys] == ["env:A", "env:C"]
    (tier2,) = m.fallbacks
    name, _, upstream = tier2.partition("/")
    assert upstream == "gpt-4o"
    assert [k.secret for k in provider(config, name).keys] == ["env:B"]
    assert "a higher order serves only when the lower ones fail" in toml


@pytest.mark.parametrize(
    ("settings", "url", "note"),
    [
        ({"redis_url": "os.environ/MY_REDIS"}, "env:MY_REDIS", None),
        (
            {"redis_url": "rediss://cache.example:6380/2", "redis_host": "ignored"},
            "rediss://cache.example:6380/2",
            "not carried over: router_settings.redis_host: redis_url wins",
        ),
        ({"redis_host": "10.1.2.3", "redis_db": 4}, "redis://10.1.2.3:6379/4", None),
        (
            {"redis_host": "r", "redis_port": "6390", "redis_password": "p@ss/word"},
            "redis://:p%40ss%2Fword@r:6390",
            None,
        ),
        (
            {"redis_port": 6379},
            None,
            "not carried over: router_settings.redis_port: no redis_host",
        ),
    ],
)
def test_redis_settings_become_one_shared_url(
    settings: dict[str, Any], url: str | None, note: str | None
) -> None:
    data = {
        "model_list": [{"model_name": "m", "litellm_params": {"model": "openai/gpt-4o"}}],
        "router_settings": settings,
    }
    toml = import_litellm(yaml.safe_dump(data)).toml
    shared = RouterConfig.from_toml(toml).router.shared
    assert (shared.redis_url if shared else None) == url
    if note:
        assert note in toml


def test_a_redis_url_the_router_cannot_use_is_an_input_error() -> None:
    text = "model_list: [{model_name: m, litellm_params: {model: openai/x}}]\n"
    with pytest.raises(ConfigError) as info:
        import_litellm(text + "router_settings: {redis_url: 'localhost:6379'}\n")
    assert info.value.field == "router_settings.redis_url"


@pytest.mark.parametrize(
    ("params", "served"),
    [
        ({"model": "gpt-4o"}, ("openai", "https://api.openai.com/v1", "gpt-4o")),
        (
            {"model": "claude-3-5-haiku"},
            ("anthropic", "https://api.anthropic.com", "claude-3-5-haiku"),
        ),
        (
            {"model": "my-model", "custom_llm_provider": "openai", "api_base": "http://h:1/v1"},
            ("openai", "http://h:1/v1", "my-model"),
        ),
        (
            {"model": "openrouter/anthropic/claude-3.5-sonnet"},
            ("openai", "https://openrouter.ai/api/v1", "anthropic/claude-3.5-sonnet"),
        ),
        (
            {"model": "anthropic/claude-x", "api_base": "https://proxy.example/v1/messages"},
            ("anthropic", "https://proxy.example", "claude-x"),
        ),
        (
            {"model": "gemini/gemini-2.5-pro", "api_base": "https://g.example/v1beta/"},
            ("gemini", "https://g.example", "gemini-2.5-pro"),
        ),
        ({"model": "gemini-1.5-pro"}, "Vertex AI needs Google Cloud OAuth"),
        ({"model": "cohere/command-r"}, "Cohere's chat API has its own protocol"),
        ({"model": "acme/thing"}, "provider 'acme' is not one llm-router can serve"),
        ({"model": "plain-local-model"}, "no provider prefix"),
    ],
)
def test_model_strings_map_to_our_kinds_or_say_why_not(
    params: dict[str, Any], served: tuple[str, str, str] | str
) -> None:
    data = {
        "model_list": [
            {"model_name": "probe", "litellm_params": params},
            {"model_name": "other", "litellm_params": {"model": "openai/gpt-4o-mini"}},
        ]
    }
    toml = import_litellm(yaml.safe_dump(data)).toml
    config = RouterConfig.from_toml(toml)
    if isinstance(served, str):
        assert "probe" not in {m.name for m in config.models}
        assert f"not carried over: model_list[0] (model_name 'probe'), {params['model']}" in toml
        assert served in toml
        return
    probe = model(config, "probe")
    p = provider(config, probe.provider)
    assert (p.kind, p.base_url, probe.upstream) == served


def test_star_and_default_fallbacks_go_to_models_without_their_own() -> None:
    data = {
        "model_list": [
            {"model_name": n, "litellm_params": {"model": f"openai/{n}"}} for n in "abcd"
        ],
        "router_settings": {"fallbacks": [{"a": ["b"]}, {"*": ["d"]}]},
        "litellm_settings": {"default_fallbacks": ["c"]},
    }
    config = RouterConfig.from_toml(import_litellm(yaml.safe_dump(data)).toml)
    assert [model(config, n).fallbacks for n in "abcd"] == [["b"], ["d", "c"], ["d"], ["c"]]


def test_router_settings_win_over_litellm_settings_and_say_so() -> None:
    text = """
model_list: [{model_name: m, litellm_params: {model: openai/gpt-4o}}]
router_settings: {num_retries: 1, timeout: 5}
litellm_settings: {num_retries: 4, request_timeout: 50}
"""
    toml = import_litellm(text).toml
    config = RouterConfig.from_toml(toml)
    assert config.router.transient_retries == 1 and config.router.attempt_timeout == 5.0
    assert "not carried over: litellm_settings.num_retries: router_settings.num_retries wins" in (
        toml
    )
    assert "not carried over: litellm_settings.request_timeout: router_settings.timeout wins" in (
        toml
    )


def test_a_long_chain_raises_max_chain_and_max_attempts() -> None:
    names = [f"m{i}" for i in range(14)]
    text = yaml.safe_dump(
        {
            "model_list": [
                {"model_name": n, "litellm_params": {"model": f"openai/{n}"}} for n in names
            ],
            "router_settings": {"fallbacks": [{"m0": names[1:]}]},
        }
    )
    config = RouterConfig.from_toml(import_litellm(text).toml)
    assert config.router.max_chain == 14 and config.router.max_attempts == 14


# -- input errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("model_list: [unclosed", "<document>", "not valid YAML"),
        ("- just\n- a list\n", "<document>", "must be a mapping"),
        ("router_settings: {}\n", "model_list", "missing or empty"),
        ("model_list: []\n", "model_list", "missing or empty"),
        (
            "model_list: [{litellm_params: {model: openai/x}}]",
            "model_list[0].model_name",
            "missing",
        ),
        (
            "model_list: [{model_name: a, litellm_params: {model: openai/x}}, {model_name: b}]",
            "model_list[1].litellm_params.model",
            "deployment 'b' names no model",
        ),
        (
            "model_list: [{model_name: a, litellm_params: {model: openai/x, rpm: lots}}]",
            "model_list[0].rpm",
            "not a number",
        ),
        ("model_list: [oops]", "model_list[0]", "must be a mapping"),
        (
            "model_list: [{model_name: a, litellm_params: {model: openai/x}}]\n"
            "router_settings: {timeout: [1], routing_strategy: [x]}",
            "router_settings.timeout",
            "must be a number",
        ),
        (
            "model_list: [{model_name: a, litellm_params: {model: openai/x}}]\n"
            "router_settings: {fallbacks: [gpt]}",
            "router_settings.fallbacks[0]",
            "must be a mapping",
        ),
        (
            "model_list: [{model_name: a, litellm_params: {model: bedrock/x}}]",
            "model_list",
            "no deployment can be served by llm-router",
        ),
        (
            "model_list: [{model_name: a, litellm_params: {model: azure/x}}]",
            "model_list[0].litellm_params.api_base",
            "required for azure/ deployments",
        ),
    ],
)
def test_input_errors_name_the_entry_and_exit_2(
    text: str,
    field: str,
    words: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AZURE_API_BASE", raising=False)
    with pytest.raises(ConfigError) as info:
        import_litellm(text)
    assert info.value.field == field
    assert words in str(info.value)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert main(["import-litellm", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"`{field}`" in captured.err and words in captured.err
    assert "Traceback" not in captured.err


def test_a_yaml_error_does_not_quote_the_line_it_is_on() -> None:
    text = (
        "model_list:\n  - model_name: a\n    litellm_params: {api_key: sk-secret-0099, model: [}\n"
    )
    with pytest.raises(ConfigError) as info:
        import_litellm(text)
    assert "not valid YAML" in str(info.value) and "line 3" in str(info.value)
    assert "sk-secret" not in str(info.value)


def test_cli_prints_to_stdout_and_warns_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["import-litellm", str(DATA / "local_servers.yaml")]) == 0
    captured = capsys.readouterr()
    RouterConfig.from_toml(captured.out)
    assert captured.err.count("llm-router import-litellm: warning:") == 3
    assert "hunter2-redis" not in captured.err
    assert main(["import-litellm", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_api_base_from_the_environment_is_read_at_import_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = """
model_list:
  - model_name: a
    litellm_params: {model: azure/dep-a, api_key: os.environ/AZ_KEY}
  - model_name: b
    litellm_params: {model: openai/m, api_base: os.environ/MY_BASE}
"""
    monkeypatch.setenv("AZURE_API_BASE", "https://res.openai.azure.com/openai")
    monkeypatch.delenv("MY_BASE", raising=False)
    result = import_litellm(text)
    config = RouterConfig.from_toml(result.toml)
    assert provider(config, model(config, "a").provider).base_url == (
        "https://res.openai.azure.com/openai/v1"
    )
    assert "not carried over: model_list[1] (model_name 'b'): its api_base is unknown" in (
        result.toml
    )
    assert any("$MY_BASE is not set" in w for w in result.warnings)


# -- an imported config routes real requests ------------------------------------------


async def test_an_imported_config_fails_over_across_keys_and_fallbacks_over_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LT_KEY_A", "sk-lt-aaaa-0001")
    monkeypatch.setenv("LT_KEY_B", "sk-lt-bbbb-0002")
    monkeypatch.setenv("LT_ANTHROPIC", "sk-lt-anth-0003")
    async with Emulator.serve(port=0) as emu:

        def deployment(name: str, model: str, base: str, var: str) -> dict[str, Any]:
            params = {"model": model, "api_base": base, "api_key": f"os.environ/{var}"}
            return {"model_name": name, "litellm_params": params}

        text = yaml.safe_dump(
            {
                "model_list": [
                    deployment("smart", "openai/gpt-big", f"{emu.url}/v1", "LT_KEY_A"),
                    deployment("smart", "openai/gpt-big", f"{emu.url}/v1/", "LT_KEY_B"),
                    deployment("claude", "anthropic/claude-x", f"{emu.url}/v1", "LT_ANTHROPIC"),
                ],
                "router_settings": {"num_retries": 0, "fallbacks": [{"smart": ["claude"]}]},
            }
        )
        config = RouterConfig.from_toml(import_litellm(text).toml)
        smart = model(config, "smart")
        assert [k.id for k in provider(config, smart.provider).keys] == ["lt-key-a", "lt-key-b"]
        emu.script(Fault(status=401), key="sk-lt-aaaa-0001")
        emu.script(Fault(status=503), key="sk-lt-bbbb-0002")
        async with Router.open(config) as router:
            response = await router.submit(
                ChatRequest(model="smart", messages=[Message("user", "hello")])
            )
        assert response.model == "claude"
        assert response.key_id == "lt-anthropic"
        assert [(c.key, c.model) for c in emu.calls] == [
            ("sk-lt-aaaa-0001", "gpt-big"),
            ("sk-lt-bbbb-0002", "gpt-big"),
            ("sk-lt-anth-0003", "claude-x"),
        ]
        assert emu.errors == []


# -- any valid model_list -------------------------------------------------------------

_PREFIXES = ["openai", "anthropic", "gemini", "groq", "azure", "hosted_vllm", "ollama", "mistral"]
_NEEDS_BASE = {"azure", "hosted_vllm"}


@st.composite
def deployments(draw: st.DrawFn) -> dict[str, Any]:
    names = st.sampled_from(["alpha", "beta", "gamma", "delta"]) | st.text(
        min_size=1, max_size=6
    ).filter(lambda t: bool(t.strip()) and "*" not in t)
    prefix = draw(st.sampled_from(_PREFIXES))
    params: dict[str, Any] = {
        "model": f"{prefix}/{draw(st.from_regex(r'm[a-d0-9.-]{0,8}', fullmatch=True))}"
    }
    if prefix in _NEEDS_BASE or draw(st.booleans()):
        params["api_base"] = draw(
            st.sampled_from(["http://h1:8000/v1", "https://h2.example.com", "http://h3"])
        )
    key = draw(st.sampled_from([None, "os.environ/K1", "os.environ/K2", "sk-literal-1"]))
    if key is not None:
        params["api_key"] = key
    for limit in ("rpm", "tpm"):
        if draw(st.booleans()):
            params[limit] = draw(st.integers(1, 100_000))
    if draw(st.booleans()):
        params["order"] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        model_info = {"max_input_tokens": draw(st.integers(1, 200_000))}
        return {"model_name": draw(names), "litellm_params": params, "model_info": model_info}
    return {"model_name": draw(names), "litellm_params": params}


@st.composite
def litellm_configs(draw: st.DrawFn) -> dict[str, Any]:
    model_list = draw(st.lists(deployments(), min_size=1, max_size=10))
    names = ["alpha", "beta", "gamma", "delta", "unknown"]
    router: dict[str, Any] = {}
    if draw(st.booleans()):
        router["fallbacks"] = [
            {n: draw(st.lists(st.sampled_from(names), max_size=4))}
            for n in draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
        ]
    if draw(st.booleans()):
        router["context_window_fallbacks"] = [
            {draw(st.sampled_from(names)): draw(st.lists(st.sampled_from(names), max_size=2))}
        ]
    if draw(st.booleans()):
        router["default_fallbacks"] = draw(st.lists(st.sampled_from(names), max_size=2))
    if draw(st.booleans()):
        router["model_group_alias"] = {
            draw(st.sampled_from(["alias", "alpha", "omega"])): draw(st.sampled_from(names))
        }
    for name, values in (
        ("num_retries", st.integers(0, 5)),
        ("timeout", st.floats(0.5, 900)),
        ("allowed_fails", st.integers(0, 10)),
        ("cooldown_time", st.floats(0.5, 900)),
        ("routing_strategy", st.sampled_from(["simple-shuffle", "least-busy", "cost-based"])),
    ):
        if draw(st.booleans()):
            router[name] = draw(values)
    for name, values in (
        ("redis_host", st.sampled_from(["10.0.0.5", "os.environ/REDIS_HOST"])),
        ("redis_port", st.sampled_from([6379, "6380", "os.environ/REDIS_PORT"])),
        ("redis_password", st.sampled_from(["pw:/@x", "os.environ/REDIS_PASSWORD"])),
        ("redis_db", st.integers(0, 15)),
        ("redis_url", st.sampled_from(["redis://r:6379/0", "os.environ/REDIS_URL"])),
    ):
        if draw(st.integers(0, 3)) == 0:
            router[name] = draw(values)
    general: dict[str, Any] = {}
    for name, values in (
        ("master_key", st.sampled_from(["os.environ/MASTER", "sk-literal-1"])),
        ("max_parallel_requests", st.integers(1, 100)),
        ("global_max_parallel_requests", st.integers(1, 1000)),
    ):
        if draw(st.booleans()):
            general[name] = draw(values)
    return {"model_list": model_list, "router_settings": router, "general_settings": general}


def _expected_secret(params: dict[str, Any]) -> str:
    key = params.get("api_key")
    if key is None:
        env = _KINDS[params["model"].partition("/")[0]].key_env
        return f"env:{env}" if env else ""
    return f"env:{key[len('os.environ/') :]}" if key.startswith("os.environ/") else key


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(litellm_configs())
def test_any_valid_model_list_imports_to_a_config_that_loads_with_every_deployment(
    data: dict[str, Any],
) -> None:
    result = import_litellm(yaml.safe_dump(data))
    config = RouterConfig.from_toml(result.toml)
    assert "sk-literal-1" not in comments(result.toml) + "".join(result.warnings)
    providers = {p.name: p for p in config.providers}
    models = {m.name: m for m in config.models}
    for entry in data["model_list"]:
        params = entry["litellm_params"]
        m = models[entry["model_name"].strip()]
        routes = [(m.provider, m.upstream)] + [
            (f.partition("/")[0], f.partition("/")[2])
            for f in m.fallbacks
            if "/" in f and f.partition("/")[0] in providers
        ]
        upstream = params["model"].partition("/")[2]
        wanted = (_expected_secret(params), params.get("rpm"), params.get("tpm"))
        assert any(
            up == upstream and wanted in [(k.secret, k.rpm, k.tpm) for k in providers[p].keys]
            for p, up in routes
        ), (entry, result.toml)


_ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _some(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    plausible = st.sampled_from(
        [1, 30, "6379", "openai/m", "os.environ/V", "http://h/v1", True, ["m"], [{"m": ["n"]}]]
    )
    return st.dictionaries(st.sampled_from(keys), plausible | _ANY, max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "model_name": st.sampled_from(["a", "b", "c"])
                | st.text(min_size=1, max_size=5).filter(str.strip)
                | _ANY,
                "litellm_params": st.builds(
                    lambda model, extra: {**extra, "model": model},
                    st.sampled_from(["openai/m", "anthropic/c", "ollama/l", "azure/d", "x/y"])
                    | _ANY,
                    _some(
                        [
                            "api_key",
                            "api_base",
                            "rpm",
                            "tpm",
                            "order",
                            "organization",
                            "extra_headers",
                            "max_parallel_requests",
                            "drop_params",
                            "custom_llm_provider",
                            "timeout",
                        ]
                    ),
                ),
            },
            optional={"model_info": _some(["id", "mode", "max_input_tokens"])},
        ),
        min_size=1,
        max_size=4,
    ),
    _some(
        [
            "fallbacks",
            "context_window_fallbacks",
            "default_fallbacks",
            "num_retries",
            "timeout",
            "stream_timeout",
            "allowed_fails",
            "cooldown_time",
            "routing_strategy",
            "redis_host",
            "redis_port",
            "redis_password",
            "redis_url",
            "model_group_alias",
            "retry_after",
        ]
    ),
    _some(["master_key", "max_parallel_requests", "global_max_parallel_requests"]),
)
def test_any_input_either_imports_to_a_config_that_loads_or_is_a_config_error(
    model_list: list[dict[str, Any]], router: dict[str, Any], general: dict[str, Any]
) -> None:
    text = yaml.safe_dump(
        {"model_list": model_list, "router_settings": router, "general_settings": general}
    )
    try:
        result = import_litellm(text)
    except ConfigError:
        event("refused with a ConfigError")
        return
    event("imported")
    RouterConfig.from_toml(result.toml)
