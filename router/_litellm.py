"""Import a LiteLLM proxy ``config.yaml`` as an llm-router TOML config.

`import_litellm(text)` reads LiteLLM's four sections and writes the TOML an operator
would have written by hand, with a comment on every setting that does not carry over
(named, with the reason) and on every one that carries over only approximately. Nothing
is dropped silently: each section is read through a `_Reader` that remembers which
keys were used, and every key left unread ends as a ``# not carried over`` line.

How LiteLLM's shapes map onto ours:

- **Deployments.** A LiteLLM deployment is (model_name, endpoint, upstream model, key).
  Ours: a model names one provider (kind + base_url + headers) and one upstream, and a
  provider holds keys. Deployments of one `model_name` on the same endpoint, upstream
  and `order` become the keys of one provider (balanced by `[router] balancing`); the
  others become the model's first fallbacks, as `provider/upstream` names, in
  LiteLLM's `order`. A provider is shared between models only when its keys carry no
  rpm/tpm: LiteLLM counts those per deployment, we count them per key.
- **Fallbacks.** LiteLLM's `fallbacks: [{A: [B, C]}]` moves a request to another model
  group after the group's retries; ours is a chain walked on every failure the failure
  table does not propagate (a bad request is the caller's and is not retried
  elsewhere). B's own extra deployments are spliced in after B, since our chain uses
  only the requested model's fallbacks. `default_fallbacks` (and a ``"*"`` entry) go
  to every model without fallbacks of its own, as LiteLLM does.
- **Retries, timeouts, cooldowns.** `num_retries` becomes `transient_retries` (in place
  on a key; other keys and models are tried anyway), LiteLLM's per-call `timeout`
  becomes `attempt_timeout` and sizes our end-to-end `timeout`, `allowed_fails` and
  `cooldown_time` become the breaker's threshold and open time (consecutive failures,
  not failures per minute) and the first rate-limit cooldown.

What this module must never do: put a secret into a comment, a warning or an error
(only setting names, model names and environment variable names appear there), or
write a TOML that `RouterConfig` would refuse (the tests load every output).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final
from urllib.parse import quote, urlsplit

import yaml

from ._errors import ConfigError
from ._secrets import header_is_secret

__all__ = ["ImportResult", "import_litellm"]


# -- what each LiteLLM provider prefix becomes ------------------------------------------


class _Kind:
    """One LiteLLM provider prefix served by one of our protocols."""

    __slots__ = ("base_env", "base_url", "key_env", "kind", "note", "suffix")

    def __init__(
        self,
        kind: str,
        base_url: str,
        key_env: str | None,
        *,
        base_env: str | None = None,
        suffix: str = "",
        note: str = "",
    ) -> None:
        self.kind = kind
        self.base_url = base_url
        """Used when the deployment has no api_base ("" means api_base is required)."""
        self.key_env = key_env
        """The variable LiteLLM reads when a deployment has no api_key (None: no key)."""
        self.base_env = base_env
        self.suffix = suffix
        """Appended to a deployment's api_base (Ollama's OpenAI-compatible /v1)."""
        self.note = note


_OPENAI_COMPATIBLE: Final = "openai"

_KINDS: Final[dict[str, _Kind]] = {
    "openai": _Kind("openai", "https://api.openai.com/v1", "OPENAI_API_KEY"),
    "custom_openai": _Kind("openai", "", "OPENAI_API_KEY"),
    "azure": _Kind(
        "openai",
        "",
        "AZURE_API_KEY",
        base_env="AZURE_API_BASE",
        note="served over Azure OpenAI's v1 API (api_base + /openai/v1, the key as Bearer, "
        "the deployment name as model), which takes no api_version",
    ),
    "azure_ai": _Kind("openai", "", "AZURE_AI_API_KEY", base_env="AZURE_AI_API_BASE"),
    "anthropic": _Kind("anthropic", "https://api.anthropic.com", "ANTHROPIC_API_KEY"),
    "gemini": _Kind("gemini", "https://generativelanguage.googleapis.com", "GEMINI_API_KEY"),
    "ollama_chat": _Kind(
        "openai",
        "http://localhost:11434",
        None,
        base_env="OLLAMA_API_BASE",
        suffix="/v1",
        note="LiteLLM speaks Ollama's native API; llm-router its OpenAI-compatible /v1",
    ),
    "ollama": _Kind(
        "openai",
        "http://localhost:11434",
        None,
        base_env="OLLAMA_API_BASE",
        suffix="/v1",
        note="LiteLLM speaks Ollama's native API; llm-router its OpenAI-compatible /v1",
    ),
    "hosted_vllm": _Kind("openai", "", None, base_env="HOSTED_VLLM_API_BASE"),
    "lm_studio": _Kind("openai", "http://localhost:1234/v1", None),
    "llamafile": _Kind("openai", "http://127.0.0.1:8080/v1", None),
    "litellm_proxy": _Kind("openai", "", "LITELLM_PROXY_API_KEY"),
    "groq": _Kind("openai", "https://api.groq.com/openai/v1", "GROQ_API_KEY"),
    "mistral": _Kind("openai", "https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
    "deepseek": _Kind("openai", "https://api.deepseek.com/v1", "DEEPSEEK_API_KEY"),
    "xai": _Kind("openai", "https://api.x.ai/v1", "XAI_API_KEY"),
    "openrouter": _Kind("openai", "https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
    "together_ai": _Kind("openai", "https://api.together.xyz/v1", "TOGETHERAI_API_KEY"),
    "fireworks_ai": _Kind(
        "openai", "https://api.fireworks.ai/inference/v1", "FIREWORKS_AI_API_KEY"
    ),
    "perplexity": _Kind("openai", "https://api.perplexity.ai", "PERPLEXITYAI_API_KEY"),
    "deepinfra": _Kind("openai", "https://api.deepinfra.com/v1/openai", "DEEPINFRA_API_KEY"),
    "cerebras": _Kind("openai", "https://api.cerebras.ai/v1", "CEREBRAS_API_KEY"),
}

_UNSERVED: Final[dict[str, str]] = {
    "bedrock": "AWS Bedrock needs SigV4-signed requests with AWS credentials",
    "bedrock_converse": "AWS Bedrock needs SigV4-signed requests with AWS credentials",
    "sagemaker": "SageMaker needs SigV4-signed requests with AWS credentials",
    "vertex_ai": "Vertex AI needs Google Cloud OAuth credentials (use gemini/ with an API "
    "key for the Gemini API)",
    "vertex_ai_beta": "Vertex AI needs Google Cloud OAuth credentials",
    "vllm": "vllm/ runs the model inside the LiteLLM process (use hosted_vllm/ or openai/ "
    "with api_base for a vLLM server)",
    "text-completion-openai": "the legacy completions API; llm-router speaks chat",
    "huggingface": "Hugging Face's inference API has its own protocol",
    "cohere": "Cohere's chat API has its own protocol",
    "replicate": "Replicate's prediction API has its own protocol",
}

_REQUEST_DEFAULT: Final = (
    "a default request parameter: llm-router sends what each request asks for and has "
    "no per-model defaults"
)

# Why a known setting does not carry over; anything else gets _UNKNOWN.
_WHY: Final[dict[str, str]] = {
    **{
        p: _REQUEST_DEFAULT
        for p in [
            "temperature",
            "top_p",
            "max_tokens",
            "max_completion_tokens",
            "stop",
            "seed",
            "n",
            "frequency_penalty",
            "presence_penalty",
            "response_format",
            "tools",
            "tool_choice",
            "user",
            "reasoning_effort",
            "thinking",
            "logit_bias",
            "extra_body",
            "parallel_tool_calls",
        ]
    },
    "timeout": "a per-deployment timeout: llm-router's attempt_timeout is router-wide",
    "stream_timeout": "a per-deployment timeout: llm-router's first_token_timeout is router-wide",
    "max_retries": "per-deployment SDK retries: llm-router's transient_retries are router-wide",
    "num_retries": "per-deployment retries: llm-router's transient_retries are router-wide",
    "weight": "weighted shuffle: balancing over a model's keys is unweighted",
    "tags": "tag-based routing: llm-router has none",
    "input_cost_per_token": "a price override: not in this importer's output",
    "output_cost_per_token": "a price override: not in this importer's output",
    "base_model": "LiteLLM's cost lookup name",
    "max_output_tokens": "an output ceiling: the upstream enforces it",
    "region_name": "region routing: llm-router has none",
    "use_in_pass_through": "pass-through endpoints: llm-router has none",
    "merge_reasoning_content_in_choices": "llm-router returns reasoning_content separately",
    "supports": "a capability flag: llm-router needs none (a field a protocol cannot "
    "take is refused or dropped per drop_params)",
    "callbacks": "logging callbacks: llm-router has /metrics, the access log and "
    "OpenTelemetry traces instead",
    "cache": "response caching: llm-router has none",
    "cache_params": "response caching: llm-router has none",
    "set_verbose": "debug logging: use Python logging levels",
    "json_logs": "log format: the gateway's access log is JSON by default ([gateway] access_log)",
    "content_policy_fallbacks": "llm-router returns a content-filter refusal to the caller "
    "rather than trying another model",
    "retry_policy": "per-error retry counts: llm-router's failure table decides per kind "
    "(auth, balance and bad requests are never retried in place)",
    "allowed_fails_policy": "per-error failure counts: llm-router's breaker counts "
    "availability failures only",
    "model_group_retry_policy": "per-model retry policies: retries are router-wide",
    "disable_cooldowns": "llm-router always honours rate limits and breakers",
    "routing_strategy_args": "arguments of LiteLLM's routing strategies",
    "max_fallbacks": "llm-router bounds a chain with max_chain and max_attempts instead",
    "default_litellm_params": _REQUEST_DEFAULT,
    "enable_tag_filtering": "tag-based routing: llm-router has none",
    "database_url": "virtual keys, teams and spend in a database: llm-router's gateway "
    "keys live in the config ([gateway] api_keys)",
    "store_model_in_db": "models in a database: llm-router's models live in the config",
    "alerting": "alerting: scrape /metrics instead",
    "environment_variables": "LiteLLM sets these variables itself; set them in the "
    "environment of llm-router",
    "include": "included files: import each file and merge the TOML by hand",
    "turn_off_message_logging": "nothing to turn off: llm-router never logs message content",
    "redact_user_api_key_info": "nothing to redact: no secret appears in llm-router's logs",
    "background_health_checks": "llm-router learns health from live traffic (breakers, "
    "cooldowns, /readyz) rather than probe calls",
    "health_check_interval": "llm-router learns health from live traffic rather than probes",
}
_UNKNOWN: Final = "no equivalent in llm-router"

_ENV_PREFIX: Final = "os.environ/"
_SLUG: Final = re.compile(r"[^a-z0-9]+")
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


class ImportResult:
    """The TOML text and the warnings for stderr (literal secrets, actions needed)."""

    __slots__ = ("toml", "warnings")

    def __init__(self, toml: str, warnings: list[str]) -> None:
        self.toml = toml
        self.warnings = warnings

    def __repr__(self) -> str:
        return f"ImportResult({len(self.toml)} chars, {len(self.warnings)} warnings)"


# -- reading --------------------------------------------------------------------------


class _Reader:
    """A mapping of the input whose unread keys become ``not carried over`` notes."""

    __slots__ = ("data", "path", "used")

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"must be a mapping, not {type(data).__name__}")
        self.data: Mapping[Any, Any] = data
        self.path = path
        self.used: set[Any] = set()

    def get(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def unread(self) -> Iterator[tuple[str, str]]:
        """(setting path, reason) for each key nobody read."""
        for key in self.data:
            if key in self.used:
                continue
            name = str(key)
            why = _WHY.get(name)
            if why is None and name.startswith("supports_"):
                why = _WHY["supports"]
            if why is None and "callback" in name:
                why = _WHY["callbacks"]
            yield f"{self.path}.{name}" if self.path else name, why or _UNKNOWN


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(text: object) -> str:
    """Text from the input made safe for one TOML comment line."""
    return _CONTROL.sub("?", " ".join(str(text).split()))


class _Out:
    """Notes (TOML comments) and warnings gathered while importing."""

    __slots__ = ("header", "warnings")

    def __init__(self) -> None:
        self.header: list[str] = []
        self.warnings: list[str] = []

    def drop(self, notes: list[str], setting: str, why: str) -> None:
        notes.append(f"not carried over: {_one_line(setting)}: {_one_line(why)}")

    def unread(self, notes: list[str], reader: _Reader) -> None:
        for setting, why in reader.unread():
            self.drop(notes, setting, why)


def _secret(value: Any, field: str, out: _Out) -> str:
    """LiteLLM's ``os.environ/X`` as ``env:X``; a literal secret is carried over with a
    warning (never echoed)."""
    if isinstance(value, str) and value.startswith(_ENV_PREFIX):
        var = value[len(_ENV_PREFIX) :].strip()
        if not var:
            raise ConfigError(field, "`os.environ/` needs a variable name")
        return f"env:{var}"
    if value is None or value == "":
        return ""
    if not isinstance(value, str | int):
        raise ConfigError(field, f"must be a string, not {type(value).__name__}")
    out.warnings.append(
        f"{field} is a literal secret in the LiteLLM file; it is carried over as is, but "
        "an environment variable is safer: write `env:VAR` in the TOML and export VAR"
    )
    return str(value)


def _env_ref(value: Any) -> str:
    """A non-secret value (a header, an organization), ``os.environ/X`` as ``env:X``."""
    text = str(value)
    return f"env:{text[len(_ENV_PREFIX) :]}" if text.startswith(_ENV_PREFIX) else text


def _env_value(value: Any, field: str) -> tuple[Any, str | None]:
    """A plain value, or for ``os.environ/X`` the variable's value at import time (and
    the variable's name); an unset variable is (None, name)."""
    if isinstance(value, str) and value.startswith(_ENV_PREFIX):
        var = value[len(_ENV_PREFIX) :].strip()
        if not var:
            raise ConfigError(field, "`os.environ/` needs a variable name")
        return os.environ.get(var), var
    return value, None


def _number(value: Any, field: str, *, integer: bool, minimum: float) -> float | int:
    if isinstance(value, str):
        try:
            value = float(value) if not integer else int(value.strip())
        except ValueError:
            raise ConfigError(field, f"{value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(field, f"must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(field, f"{value!r} is out of range (at least {minimum:g})")
    if integer:
        if value != int(value):
            raise ConfigError(field, f"{value!r} must be a whole number")
        return int(value)
    return float(value)


def _str_list(value: Any, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(field, "must be a list of model names")
    return [v.strip() for v in value if v.strip()]


def _fallback_map(value: Any, field: str) -> dict[str, list[str]]:
    """LiteLLM's ``[{"a": ["b", "c"]}, ...]`` (or one mapping) as {a: [b, c]}."""
    if value is None:
        return {}
    items = [value] if isinstance(value, Mapping) else value
    if not isinstance(items, list):
        raise ConfigError(field, "must be a list of {model: [fallbacks]} mappings")
    out: dict[str, list[str]] = {}
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ConfigError(f"{field}[{i}]", "must be a mapping {model: [fallbacks]}")
        for name, targets in item.items():
            out.setdefault(str(name).strip(), []).extend(_str_list(targets, f"{field}[{i}].{name}"))
    return out


# -- the model we build ---------------------------------------------------------------


class _Key:
    __slots__ = ("id", "max_concurrency", "rpm", "secret", "tpm")

    def __init__(
        self, id: str, secret: str, rpm: int | None, tpm: int | None, conc: int | None
    ) -> None:
        self.id = id
        self.secret = secret
        self.rpm = rpm
        self.tpm = tpm
        self.max_concurrency = conc


class _Deployment:
    __slots__ = (
        "base_url",
        "context_window",
        "drop_params",
        "headers",
        "index",
        "key",
        "key_hint",
        "kind",
        "mode",
        "model_name",
        "notes",
        "order",
        "prefix",
        "upstream",
    )

    def __init__(self, index: int, model_name: str) -> None:
        self.index = index
        self.model_name = model_name
        self.prefix = ""
        self.kind = ""
        self.base_url = ""
        self.upstream = ""
        self.headers: dict[str, str] = {}
        self.key = _Key("", "", None, None, None)
        self.key_hint = ""
        self.order = math.inf
        self.mode = "chat"
        self.context_window: int | None = None
        self.drop_params: bool | None = None
        self.notes: list[str] = []

    def endpoint(self) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        return (self.kind, self.base_url, tuple(sorted(self.headers.items())))


class _Provider:
    __slots__ = ("base_url", "headers", "keys", "kind", "name", "notes")

    def __init__(self, name: str, kind: str, base_url: str, headers: dict[str, str]) -> None:
        self.name = name
        self.kind = kind
        self.base_url = base_url
        self.headers = headers
        self.keys: list[_Key] = []
        self.notes: list[str] = []

    def signature(self) -> tuple[Any, ...]:
        keys = tuple((k.secret, k.rpm, k.tpm, k.max_concurrency) for k in self.keys)
        return (self.kind, self.base_url, tuple(sorted(self.headers.items())), keys)

    def shareable(self) -> bool:
        return all(k.rpm is None and k.tpm is None for k in self.keys)


class _Model:
    __slots__ = (
        "context_window",
        "drop_params",
        "extra",
        "fallbacks",
        "mode",
        "name",
        "notes",
        "provider",
        "upstream",
    )

    def __init__(self, name: str, provider: _Provider, upstream: str) -> None:
        self.name = name
        self.provider = provider
        self.upstream = upstream
        self.extra: list[str] = []
        """`provider/upstream` names of the model_name's deployments on other endpoints."""
        self.fallbacks: list[str] = []
        self.context_window: int | None = None
        self.drop_params: bool | None = None
        self.mode = "chat"
        self.notes: list[str] = []


# -- deployments ----------------------------------------------------------------------


def _split_model(model: str, params: _Reader) -> tuple[str, str]:
    """(provider prefix, upstream id) of a LiteLLM model string."""
    custom = params.get("custom_llm_provider")
    if isinstance(custom, str) and custom.strip():
        prefix = custom.strip()
        return prefix, model.removeprefix(prefix + "/")
    prefix, sep, rest = model.partition("/")
    if sep and (prefix in _KINDS or prefix in _UNSERVED):
        return prefix, rest
    if model.startswith(("gpt-", "o1", "o3", "o4", "chatgpt-", "text-embedding-", "ft:gpt")):
        return "openai", model
    if model.startswith("claude-"):
        return "anthropic", model
    if model.startswith("gemini-"):
        return "vertex_ai", model  # LiteLLM sends a bare gemini-* to Vertex AI
    return (prefix, rest) if sep else ("", model)


def _base_url(d: _Deployment, spec: _Kind, api_base: Any, field: str, out: _Out) -> str | None:
    """The provider base_url of a deployment; None (with a note) when it cannot be known."""
    value, var = _env_value(api_base, field)
    if var is not None:  # an explicit os.environ/X
        if value is None:
            out.warnings.append(
                f"{field}: ${var} is not set, so the deployment's base URL is unknown; "
                "set it and import again"
            )
            return None
        d.notes.append(f"{field}: read from ${var} at import time (base_url takes no env:)")
    elif value is None:
        from_env = os.environ.get(spec.base_env) if spec.base_env else None
        if from_env:
            value = from_env
            d.notes.append(f"base_url: read from ${spec.base_env} at import time, as LiteLLM would")
        elif spec.base_url:
            value = spec.base_url
        else:
            also = f" (or ${spec.base_env} at import time)" if spec.base_env else ""
            raise ConfigError(field, f"required for {d.prefix}/ deployments{also}")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(field, "must be a URL")
    url = value.strip().rstrip("/")
    if urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(field, "must be an http(s) URL")
    if d.prefix == "azure":
        path = urlsplit(url).path.rstrip("/")
        if path.endswith("/openai"):
            url += "/v1"
        elif not path.endswith("/openai/v1"):
            url += "/openai/v1"
    elif d.prefix == "anthropic":
        url = url.removesuffix("/v1/messages").removesuffix("/v1")
    elif d.prefix == "gemini":
        url = url.removesuffix("/v1beta")
    elif spec.suffix and not url.endswith(spec.suffix):
        url += spec.suffix
    return url


def _deployment(i: int, entry: Any, out: _Out, pre_call_checks: bool) -> _Deployment | None:
    where = f"model_list[{i}]"
    top = _Reader(entry, where)
    name = top.get("model_name")
    if not isinstance(name, str | int) or not str(name).strip():
        raise ConfigError(f"{where}.model_name", "missing: every deployment needs a model_name")
    model_name = str(name).strip()
    label = f"{where} (model_name {model_name!r})"
    params = _Reader(top.get("litellm_params"), f"{where}.litellm_params")
    model = params.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(
            f"{where}.litellm_params.model", f"missing: deployment {model_name!r} names no model"
        )
    info = _Reader(top.get("model_info"), f"{where}.model_info")
    d = _Deployment(i, model_name)
    d.prefix, d.upstream = _split_model(model.strip(), params)
    spec = _KINDS.get(d.prefix)
    if spec is None:
        why = _UNSERVED.get(d.prefix) or (
            f"provider {d.prefix!r} is not one llm-router can serve"
            if d.prefix
            else "no provider prefix (write openai/<model> with api_base for an "
            "OpenAI-compatible server)"
        )
        out.drop(out.header, f"{label}, {model.strip()}", why)
        return None
    if not d.upstream:
        raise ConfigError(f"{where}.litellm_params.model", f"{model!r} names no model")
    d.kind = spec.kind
    if spec.note:
        d.notes.append(f"{d.prefix}/: {spec.note}")
    if d.prefix == "azure":
        params.get("api_version")  # Azure's v1 API takes none (the note says so)
        for field in ("azure_ad_token", "tenant_id", "client_id", "client_secret"):
            if field in params and params.get(field) is not None and "api_key" not in params:
                out.drop(out.header, label, "Microsoft Entra ID auth: llm-router sends API keys")
                return None
    base = _base_url(d, spec, params.get("api_base"), f"{where}.litellm_params.api_base", out)
    if base is None:
        out.drop(out.header, label, "its api_base is unknown at import time")
        return None
    d.base_url = base
    raw_key = params.get("api_key")
    if raw_key is None and spec.key_env:
        d.key.secret = f"env:{spec.key_env}"
        d.notes.append(f"key of {label}: ${spec.key_env}, the variable LiteLLM reads")
    else:
        d.key.secret = _secret(raw_key, f"{where}.litellm_params.api_key", out)
    if isinstance(raw_key, str) and raw_key.startswith(_ENV_PREFIX):
        d.key_hint = raw_key[len(_ENV_PREFIX) :].strip()
    org = params.get("organization")
    if org is not None:
        d.headers["OpenAI-Organization"] = _env_ref(org)
    for hdr_field in ("extra_headers", "headers"):
        hdrs = params.get(hdr_field)
        if hdrs is None:
            continue
        if not isinstance(hdrs, Mapping):
            raise ConfigError(f"{where}.litellm_params.{hdr_field}", "must be a mapping")
        for h, v in hdrs.items():
            value = d.headers[str(h)] = _env_ref(v)
            if header_is_secret(str(h), value) and not value.startswith("env:"):
                out.warnings.append(
                    f"{where}.litellm_params.{hdr_field}.{h} is a literal credential in the "
                    "LiteLLM file; it is carried over as is, but `env:VAR` is safer"
                )
    for limit in ("rpm", "tpm"):
        raw, outer = params.get(limit), top.get(limit)
        if raw is None:
            raw = outer
        elif outer is not None and outer != raw:
            out.drop(d.notes, f"{where}.{limit}", f"{where}.litellm_params.{limit} wins")
        if raw is not None:
            setattr(d.key, limit, int(_number(raw, f"{where}.{limit}", integer=True, minimum=1)))
    conc = params.get("max_parallel_requests")
    if conc is not None:
        d.key.max_concurrency = int(
            _number(conc, f"{where}.litellm_params.max_parallel_requests", integer=True, minimum=1)
        )
    order = params.get("order")
    if order is not None:
        d.order = _number(order, f"{where}.litellm_params.order", integer=True, minimum=0)
    drop = params.get("drop_params")
    if drop is not None:
        d.drop_params = bool(drop)
    ident = info.get("id")
    if ident is not None:
        d.key_hint = str(ident)
    mode = info.get("mode")
    if mode in (None, "chat", "completion", "responses"):
        if mode is None and "embed" in d.upstream.lower():
            d.mode = "embedding"
            d.notes.append(f"{label}: mode embedding, inferred from the model id")
    elif mode == "embedding":
        d.mode = "embedding"
    else:
        out.drop(
            out.header,
            f"{label} (model_info.mode {mode!r})",
            "llm-router serves chat and embeddings only",
        )
        return None
    if d.mode == "embedding" and d.kind == "anthropic":
        out.drop(out.header, label, "Anthropic serves no embeddings")
        return None
    window = info.get("max_input_tokens")
    if window is not None:
        d.context_window = int(
            _number(window, f"{where}.model_info.max_input_tokens", integer=True, minimum=1)
        )
        if not pre_call_checks:
            d.notes.append(
                f"{where}.model_info.max_input_tokens: context_window (approximate: LiteLLM "
                "checks it only with enable_pre_call_checks; llm-router always does)"
            )
    out.unread(d.notes, top)
    out.unread(d.notes, params)
    out.unread(d.notes, info)
    return d


# -- the TOML -------------------------------------------------------------------------


def _toml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_str(key)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


class _Table:
    """One TOML table: ordered fields, each with the comment lines above it."""

    __slots__ = ("fields", "notes")

    def __init__(self) -> None:
        self.fields: dict[str, tuple[Any, list[str]]] = {}
        self.notes: list[str] = []

    def set(self, name: str, value: Any, *comments: str) -> None:
        self.fields[name] = (value, [_one_line(c) for c in comments])

    def lines(self, header: str) -> list[str]:
        if not self.fields:  # no table (an empty [router.shared] would not load): notes only
            return ["", *(f"# {n}" for n in self.notes)] if self.notes else []
        out = ["", header]
        out += [f"# {n}" for n in self.notes]
        for name, (value, comments) in self.fields.items():
            out += [f"# {c}" for c in comments]
            out.append(f"{name} = {_toml(value)}")
        return out


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _slug(text: str) -> str:
    return _SLUG.sub("-", text.lower()).strip("-") or "x"


# -- the whole import -----------------------------------------------------------------


def import_litellm(text: str | bytes, source: str = "config.yaml") -> ImportResult:
    """Translate a LiteLLM proxy config into llm-router TOML.

    Raises `ConfigError` (naming the entry) when the input is not YAML, has no
    `model_list`, has a deployment without `model_name` or `litellm_params.model`,
    or has no deployment llm-router can serve."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Only the problem and its position: PyYAML's own message quotes the line, which
        # may hold a key.
        problem = getattr(exc, "problem", None) or "cannot parse"
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError("<document>", f"not valid YAML: {problem}{where}") from None
    root = _Reader(data, "<document>")
    out = _Out()
    router_r = _Reader(root.get("router_settings"), "router_settings")
    lset = _Reader(root.get("litellm_settings"), "litellm_settings")
    general = _Reader(root.get("general_settings"), "general_settings")
    entries = root.get("model_list")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            "model_list", "missing or empty: a LiteLLM config lists its deployments there"
        )
    pre_checks = bool(router_r.get("enable_pre_call_checks"))
    deployments = [
        d for i, e in enumerate(entries) if (d := _deployment(i, e, out, pre_checks)) is not None
    ]
    if not deployments:
        reasons = "; ".join(n.removeprefix("not carried over: ") for n in out.header)
        raise ConfigError("model_list", f"no deployment can be served by llm-router: {reasons}")

    router = _Table()
    breaker = _Table()
    cooldown = _Table()
    shared = _Table()
    gateway = _Table()
    providers, models = _build(deployments, out)
    by_name = {m.name: m for m in models}

    def both(name: str) -> tuple[Any, str]:
        """A setting LiteLLM takes in router_settings or litellm_settings (the first wins)."""
        r, ls = router_r.get(name), lset.get(name)
        if r is not None and ls is not None:
            out.drop(router.notes, f"litellm_settings.{name}", f"router_settings.{name} wins")
        return (r, f"router_settings.{name}") if r is not None else (ls, f"litellm_settings.{name}")

    _fallbacks(both, by_name, out, router)
    _router_settings(both, router_r, lset, out, router, breaker, cooldown)
    _redis(router_r, out, shared)
    _model_aliases(router_r, models, out)
    _general(general, out, gateway, providers)
    drop, where = lset.get("drop_params"), "litellm_settings.drop_params"
    if drop is not None:
        router.set(
            "drop_params", bool(drop), f"{where}: drop (not refuse) what a protocol cannot take"
        )
    _chain_limits(models, router)
    for reader in (router_r, lset, general):
        out.unread(router.notes if reader is not general else gateway.notes, reader)
    for key in root.data:
        if key not in root.used:
            out.drop(out.header, str(key), _WHY.get(str(key), _UNKNOWN))
    return ImportResult(
        _render(source, out, router, breaker, cooldown, shared, gateway, providers, models),
        out.warnings,
    )


def _build(deployments: list[_Deployment], out: _Out) -> tuple[list[_Provider], list[_Model]]:
    groups: dict[str, list[_Deployment]] = {}
    for d in deployments:
        groups.setdefault(d.model_name, []).append(d)
    providers: list[_Provider] = []
    names: set[str] = set()
    shared: dict[tuple[Any, ...], _Provider] = {}
    models: list[_Model] = []
    for model_name, deps in groups.items():
        deps.sort(key=lambda d: (d.order, d.index))
        if "*" in model_name or deps[0].upstream.endswith("*"):
            _wildcard(model_name, deps, out, providers, names)
            continue
        endpoints: dict[tuple[Any, ...], list[_Deployment]] = {}
        mode = deps[0].mode
        for d in deps:
            if d.mode != mode:
                out.drop(
                    out.header,
                    f"model_list[{d.index}] (model_name {model_name!r})",
                    f"mode {d.mode} in a model group of mode {mode}",
                )
                continue
            # a different `order` is a different tier: a fallback, not a sibling key
            endpoints.setdefault((*d.endpoint(), d.upstream, d.order), []).append(d)
        routes: list[tuple[_Provider, str]] = []
        for group in endpoints.values():
            first = group[0]
            prov = _Provider("", first.kind, first.base_url, dict(first.headers))
            key_ids: set[str] = set()
            for n, d in enumerate(group, 1):
                hint = d.key_hint or ("default" if not d.key.secret else f"key-{n}")
                k = d.key
                prov.keys.append(
                    _Key(_unique(_slug(hint), key_ids), k.secret, k.rpm, k.tpm, k.max_concurrency)
                )
                prov.notes += d.notes
            sig = prov.signature()
            if prov.shareable() and sig in shared:
                shared[sig].notes += [n for n in prov.notes if n not in shared[sig].notes]
                prov = shared[sig]
            else:
                canonical = first.base_url == _KINDS[first.prefix].base_url
                base = first.prefix if canonical else f"{first.prefix}-{_slug(model_name)}"
                prov.name = _unique(base, names)
                providers.append(prov)
                if prov.shareable():
                    shared[sig] = prov
            routes.append((prov, first.upstream))
        if not routes:
            continue
        model = _Model(model_name, *routes[0])
        model.mode = mode
        model.extra = [f"{p.name}/{u}" for p, u in routes[1:]]
        if len(routes) > 1:
            orders = [group[0].order for group in endpoints.values()]
            tiers = all(math.isfinite(o) for o in orders) and len(set(orders)) == len(orders)
            model.notes.append(
                f"{model_name}: its deployments on other endpoints are its first fallbacks, "
                "in LiteLLM's `order` ("
                + (
                    "as in LiteLLM, a higher order serves only when the lower ones fail)"
                    if tiers
                    else "approximate: LiteLLM balances across them)"
                )
            )
        windows = [d.context_window for d in deps if d.context_window is not None]
        if windows:
            model.context_window = min(windows)
        drops = [d.drop_params for d in deps if d.drop_params is not None]
        if drops:
            model.drop_params = any(drops)
        models.append(model)
    return providers, models


def _wildcard(
    model_name: str,
    deps: list[_Deployment],
    out: _Out,
    providers: list[_Provider],
    names: set[str],
) -> None:
    d = deps[0]
    prov = _Provider("", d.kind, d.base_url, dict(d.headers))
    ids: set[str] = set()
    for n, dep in enumerate(deps, 1):
        hint = dep.key_hint or (f"key-{n}" if dep.key.secret else "default")
        prov.keys.append(
            _Key(
                _unique(_slug(hint), ids),
                dep.key.secret,
                dep.key.rpm,
                dep.key.tpm,
                dep.key.max_concurrency,
            )
        )
        prov.notes += dep.notes
    prov.name = _unique(d.prefix, names)
    prov.notes.append(
        f"wildcard model_name {model_name!r}: callers ask for `{prov.name}/<model>` "
        "(a provider/upstream name needs no [[models]] entry)"
    )
    providers.append(prov)


def _fallbacks(
    both: Callable[[str], tuple[Any, str]], by_name: dict[str, _Model], out: _Out, router: _Table
) -> None:
    raw, where = both("fallbacks")
    table = _fallback_map(raw, where)
    generic = table.pop("*", [])
    dflt, dwhere = both("default_fallbacks")
    generic += _str_list(dflt, dwhere) if dflt is not None else []
    if generic:
        router.notes.append(
            f"{dwhere if dflt is not None else where}: given to each model without fallbacks "
            "of its own, as LiteLLM does"
        )
    for name in table:
        if name not in by_name:
            out.drop(router.notes, f"{where}: {name}", "no carried-over model of that name")
    for model in by_name.values():
        own = model.name in table
        targets = [t for t in table.get(model.name, generic) if t != model.name]
        source = where if own else dwhere if dflt is not None else where
        chain = [model.name, *model.extra]
        seen = {f"{model.provider.name}/{model.upstream}", *chain}
        for t in targets:
            target = by_name.get(t)
            if target is None:
                out.drop(
                    model.notes,
                    f"{source}: {model.name} -> {t}",
                    "no carried-over model of that name",
                )
                continue
            for name in (t, *target.extra):
                resolved = f"{target.provider.name}/{target.upstream}" if name == t else name
                if name not in seen and resolved not in seen:
                    chain.append(name)
                    seen.update((name, resolved))
        model.fallbacks = chain[1:]
        if targets:
            model.notes.append(
                f"{source}: {model.name} -> {', '.join(targets)} (approximate: walked on every "
                "failure the failure table does not return to the caller)"
            )
    raw, where = both("context_window_fallbacks")
    windows: dict[str, str] = {}
    for name, targets in _fallback_map(raw, where).items():
        usable = [t for t in targets if t in by_name and t != name]
        if name not in by_name or not usable:
            out.drop(router.notes, f"{where}: {name}", "no carried-over model of that name")
            continue
        windows[name] = usable[0]
        rest = [t for t in targets if t != usable[0]]
        if rest:
            out.drop(
                router.notes,
                f"{where}: {name} -> {', '.join(rest)}",
                f"llm-router sends an overflowing prompt to one larger model ({usable[0]})",
            )
    if windows:
        router.set(
            "context_window_fallbacks",
            windows,
            f"{where}: a prompt over the model's context_window, or an upstream context-length "
            "error, goes to this larger model once",
        )


def _router_settings(
    both: Callable[[str], tuple[Any, str]],
    router_r: _Reader,
    lset: _Reader,
    out: _Out,
    router: _Table,
    breaker: _Table,
    cooldown: _Table,
) -> None:
    strategy = router_r.get("routing_strategy")
    mapping = {
        None: (
            "round_robin",
            "LiteLLM's default simple-shuffle spreads requests at random "
            "(approximate: round_robin rotates; weights are not carried)",
        ),
        "simple-shuffle": ("round_robin", "approximate: round_robin rotates over the keys"),
        "least-busy": ("least_busy", "the key with the fewest requests in flight"),
        "usage-based-routing": (
            "round_robin",
            "approximate: rotation, and rpm/tpm budgets skip a key out of budget",
        ),
        "usage-based-routing-v2": (
            "round_robin",
            "approximate: rotation, and rpm/tpm budgets skip a key out of budget",
        ),
        "latency-based-routing": (
            "least_busy",
            "approximate: a faster key has fewer requests in flight",
        ),
    }
    if (strategy is None or isinstance(strategy, str)) and strategy in mapping:
        value, why = mapping[strategy]
        router.set(
            "balancing", value, f"router_settings.routing_strategy {strategy or '(unset)'}: {why}"
        )
    else:
        out.drop(
            router.notes,
            f"router_settings.routing_strategy {strategy!r}",
            "no such balancing in llm-router; keys are tried in order",
        )
    timeout, where = both("timeout")
    if timeout is None:
        timeout, where = lset.get("request_timeout"), "litellm_settings.request_timeout"
    else:
        if lset.get("request_timeout") is not None:
            out.drop(router.notes, "litellm_settings.request_timeout", f"{where} wins")
    if timeout is not None:
        t = float(_number(timeout, where, integer=False, minimum=0.001))
        router.set(
            "timeout",
            max(90.0, 3 * t),
            f"{where} is per call; llm-router's `timeout` bounds the whole request "
            "across retries and fallbacks (approximate: 3 calls' worth, at least 90 s)",
        )
        router.set("attempt_timeout", t, f"{where}: one upstream call")
        router.set(
            "first_token_timeout",
            t,
            f"{where}: also the wait for a stream's first chunk and between chunks",
        )
        router.set("idle_timeout", t)
    else:
        router.notes.append(
            "no timeout in the LiteLLM file: LiteLLM waits up to 10 minutes per call; "
            "llm-router's defaults apply (attempt_timeout 30 s, timeout 90 s): raise them "
            "for long generations"
        )
    stream, where = both("stream_timeout")
    if stream is not None:
        first = float(_number(stream, where, integer=False, minimum=0.001))
        router.set(
            "first_token_timeout",
            first,
            f"{where}: a stream's first chunk and the pauses between chunks",
        )
        router.set("idle_timeout", first)
    retries, where = both("num_retries")
    if retries is not None:
        router.set(
            "transient_retries",
            int(_number(retries, where, integer=True, minimum=0)),
            f"{where} (approximate: in-place retries of a transient failure; another "
            "key and the fallbacks are tried anyway, auth and bad requests never retried)",
        )
    after = router_r.get("retry_after")
    if after is not None:
        wait = float(_number(after, "router_settings.retry_after", integer=False, minimum=0))
        if wait > 0:
            router.set(
                "retry_backoff",
                [wait],
                "router_settings.retry_after (approximate: the "
                "wait before each in-place retry; Retry-After still wins)",
            )
    fails, where = both("allowed_fails")
    if fails is not None:
        n = int(_number(fails, where, integer=True, minimum=0))
        breaker.set(
            "failure_threshold",
            n + 1,
            f"{where} {n}: LiteLLM cools a deployment after "
            "more failures than this in a minute (approximate: consecutive failures)",
        )
    cool, where = both("cooldown_time")
    if cool is not None:
        c = float(_number(cool, where, integer=False, minimum=0.001))
        breaker.set("open_for", c, f"{where}: how long a failing key rests")
        breaker.set("open_for_max", max(c, 300.0))
        cooldown.set(
            "min",
            c,
            f"{where}: the first rate-limit cooldown (approximate: doubling "
            "on repeated 429s, never shorter than Retry-After)",
        )
        cooldown.set("max", max(c, 300.0))


def _redis(router_r: _Reader, out: _Out, shared: _Table) -> None:
    url = router_r.get("redis_url")
    host, port = router_r.get("redis_host"), router_r.get("redis_port")
    password, db = router_r.get("redis_password"), router_r.get("redis_db")
    if url is None and host is None:
        for name, value in (("redis_port", port), ("redis_password", password), ("redis_db", db)):
            if value is not None:
                out.drop(shared.notes, f"router_settings.{name}", "no redis_host")
        return
    why = (
        "router_settings redis: cooldowns, breakers and rpm/tpm budgets shared by every "
        "instance (LiteLLM shares its usage counts and cooldowns the same way)"
    )
    if url is not None:
        text = str(url).strip()
        secret = "@" in text or text.startswith(_ENV_PREFIX)
        value = _secret(text, "router_settings.redis_url", out) if secret else text
        if not value.startswith(("redis://", "rediss://", "unix://", "env:")):
            raise ConfigError(
                "router_settings.redis_url", "must start with redis://, rediss:// or unix://"
            )
        shared.set("redis_url", value, why)
        for name, v in (("redis_host", host), ("redis_port", port), ("redis_password", password)):
            if v is not None:
                out.drop(shared.notes, f"router_settings.{name}", "redis_url wins")
        return
    parts = [
        ("redis_host", host),
        ("redis_port", port),
        ("redis_password", password),
        ("redis_db", db),
    ]
    envs = [
        (n, str(v)[len(_ENV_PREFIX) :])
        for n, v in parts
        if isinstance(v, str) and v.startswith(_ENV_PREFIX)
    ]
    if envs:
        shown = ", ".join(f"{n} from ${v}" for n, v in envs)
        shared.set(
            "redis_url",
            "env:REDIS_URL",
            why,
            f"{shown}: a redis_url is one value, so export REDIS_URL as "
            "redis://:PASSWORD@HOST:PORT/DB",
        )
        out.warnings.append(
            f"router_settings redis ({shown}): export REDIS_URL=redis://:PASSWORD@HOST:PORT/DB "
            "for [router.shared]"
        )
        return
    auth = ""
    if password:
        auth = f":{quote(_secret(password, 'router_settings.redis_password', out), safe='')}@"
    tail = f"/{int(_number(db, 'router_settings.redis_db', integer=True, minimum=0))}" if db else ""
    p = int(_number(port, "router_settings.redis_port", integer=True, minimum=1)) if port else 6379
    shared.set("redis_url", f"redis://{auth}{host}:{p}{tail}", why)


def _model_aliases(router_r: _Reader, models: list[_Model], out: _Out) -> None:
    aliases = router_r.get("model_group_alias")
    if aliases is None:
        return
    if not isinstance(aliases, Mapping):
        raise ConfigError("router_settings.model_group_alias", "must be a mapping")
    by_name = {m.name: m for m in models}
    for alias, target in aliases.items():
        hidden = isinstance(target, Mapping) and bool(target.get("hidden"))
        name = target.get("model") if isinstance(target, Mapping) else target
        setting = f"router_settings.model_group_alias.{alias}"
        model = by_name.get(str(name))
        if model is None or str(alias) in by_name:
            out.drop(
                out.header,
                setting,
                "its model is not carried over" if model is None else "a model of that name exists",
            )
            continue
        copy = _Model(str(alias), model.provider, model.upstream)
        copy.fallbacks = list(model.fallbacks)
        copy.context_window, copy.drop_params, copy.mode = (
            model.context_window,
            model.drop_params,
            model.mode,
        )
        copy.notes.append(
            f"{setting}: an alias of {model.name}"
            + (" (hidden: not carried, /v1/models lists it)" if hidden else "")
        )
        models.append(copy)
        by_name[copy.name] = copy


def _general(general: _Reader, out: _Out, gateway: _Table, providers: list[_Provider]) -> None:
    master = general.get("master_key")
    if master is not None:
        secret = _secret(master, "general_settings.master_key", out)
        gateway.set(
            "admin_key",
            secret,
            "general_settings.master_key: the admin key of /v1/router/state and /v1/router/reset",
        )
        gateway.set(
            "api_keys",
            [{"id": "master", "secret": secret}],
            "general_settings.master_key: also a key callers may present, as in LiteLLM",
        )
    gateway.set(
        "port",
        4000,
        "LiteLLM proxy's default port, so clients keep their base URL "
        '(host stays 127.0.0.1: set host = "0.0.0.0" to listen on every interface)',
    )
    per = general.get("max_parallel_requests")
    if per is not None:
        n = int(_number(per, "general_settings.max_parallel_requests", integer=True, minimum=1))
        for p in providers:
            p.notes.append("general_settings.max_parallel_requests: each key's max_concurrency")
            for k in p.keys:
                k.max_concurrency = k.max_concurrency or n
    total = general.get("global_max_parallel_requests")
    if total is not None:
        gateway.set(
            "max_in_flight",
            int(
                _number(
                    total, "general_settings.global_max_parallel_requests", integer=True, minimum=1
                )
            ),
            "general_settings.global_max_parallel_requests (approximate: past it 503, not 429)",
        )


def _chain_limits(models: list[_Model], router: _Table) -> None:
    longest = max((1 + len(m.fallbacks) for m in models), default=1)
    if longest > 8:
        router.set(
            "max_chain",
            longest,
            "the longest imported chain (model, its other deployments and fallbacks)",
        )
    if longest > 12:
        router.set("max_attempts", longest, "at least one attempt per model of that chain")


def _render(
    source: str,
    out: _Out,
    router: _Table,
    breaker: _Table,
    cooldown: _Table,
    shared: _Table,
    gateway: _Table,
    providers: list[_Provider],
    models: list[_Model],
) -> str:
    lines = [
        f"# llm-router config imported from the LiteLLM config {_one_line(source)} by",
        "# `llm-router import-litellm`. Read the notes, then: llm-router check --config FILE",
    ]
    lines += [f"# {n}" for n in out.header]
    lines += router.lines("[router]")
    lines += breaker.lines("[router.breaker]")
    lines += cooldown.lines("[router.cooldown]")
    lines += shared.lines("[router.shared]")
    lines += gateway.lines("[gateway]")
    for p in providers:
        lines += ["", "[[providers]]"]
        lines += [f"# {_one_line(n)}" for n in dict.fromkeys(p.notes)]
        lines += [
            f"name = {_toml(p.name)}",
            f"kind = {_toml(p.kind)}",
            f"base_url = {_toml(p.base_url)}",
        ]
        if p.headers:
            lines.append(f"headers = {_toml(p.headers)}")
        lines.append("keys = [")
        for k in p.keys:
            fields: dict[str, Any] = {"id": k.id, "secret": k.secret}
            for name in ("rpm", "tpm", "max_concurrency"):
                if getattr(k, name) is not None:
                    fields[name] = getattr(k, name)
            lines.append(f"  {_toml(fields)},")
        lines.append("]")
    for m in models:
        lines += ["", "[[models]]"]
        lines += [f"# {_one_line(n)}" for n in dict.fromkeys(m.notes)]
        lines += [
            f"name = {_toml(m.name)}",
            f"provider = {_toml(m.provider.name)}",
            f"upstream = {_toml(m.upstream)}",
        ]
        if m.fallbacks:
            lines.append(f"fallbacks = {_toml(m.fallbacks)}")
        if m.context_window is not None:
            lines.append(f"context_window = {m.context_window}")
        if m.drop_params is not None:
            lines.append(f"drop_params = {_toml(m.drop_params)}")
        if m.mode != "chat":
            lines.append(f"mode = {_toml(m.mode)}")
    return "\n".join(lines) + "\n"
