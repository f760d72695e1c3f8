"""The one config loader: TOML or JSON into typed, validated msgspec Structs.

`RouterConfig.load(path)`, `RouterConfig.from_toml(text)`, `RouterConfig.from_json(text)`
and `RouterConfig.from_dict(data)` all end in the same validation, and every problem
becomes a `ConfigError` whose `.field` is the path of the offending field
(``providers[0].keys[1].secret``). Unknown fields are errors, so a typo never
silently falls back to a default.

Secrets may be given as ``env:VAR``; they are resolved by `resolve_secret()` when the
router opens, and no repr in this module shows a secret.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from ._errors import ConfigError
from ._secrets import mask_url

__all__ = [
    "BreakerConfig",
    "CooldownConfig",
    "GatewayConfig",
    "GatewayKey",
    "HealthConfig",
    "KeyConfig",
    "ModelConfig",
    "PriceConfig",
    "ProviderConfig",
    "RouterConfig",
    "RouterSettings",
    "SharedConfig",
    "SimulationConfig",
    "TokensConfig",
    "TracingConfig",
    "capped_growth",
    "mask_url",
    "resolve_headers",
    "resolve_secret",
]

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(min_length=1)]

ProviderKind = Literal["simulated", "custom", "openai", "anthropic", "gemini"]
Balancing = Literal["ordered", "round_robin", "least_busy"]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class BreakerConfig(_Section):
    """Per-key circuit breaker settings (see `router._breaker`)."""

    failure_threshold: PositiveInt = 5
    """Consecutive availability failures that open the breaker."""
    failure_rate: Fraction = 0.5
    """Failure rate over the last `window` calls that opens it (0 disables)."""
    window: PositiveInt = 20
    minimum_calls: PositiveInt = 10
    """Calls in the window before the failure rate is judged."""
    open_for: Positive = 30.0
    open_for_max: Positive = 300.0
    open_growth: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    """Each re-trip without a full recovery multiplies `open_for` by this."""
    jitter: Fraction = 0.1
    """Open durations are stretched by up to this fraction at random."""
    half_open_probes: PositiveInt = 1
    """Probes allowed in flight at once while half-open."""
    success_threshold: PositiveInt = 2
    """Consecutive probe successes that close the breaker."""
    adaptive: bool = False
    """Also open on latency anomalies and slow-call rate; close by sampled success rate."""
    latency_z_threshold: Positive = 2.5
    latency_window: PositiveInt = 200
    latency_min_samples: PositiveInt = 20
    latency_anomalies_to_open: PositiveInt = 3
    """Consecutive latency anomalies that open an adaptive breaker."""
    slow_call_seconds: NonNegative = 0.0
    """A call slower than this is slow (0 disables the slow-call trigger)."""
    slow_call_rate: Fraction = 0.5
    half_open_sample: PositiveInt = 10
    """Adaptive mode: probes sampled while half-open before deciding."""
    half_open_success_rate: Fraction = 0.8


class CooldownConfig(_Section):
    """Per-key cooldown settings (see `router._cooldown`)."""

    min: Positive = 5.0
    max: Positive = 300.0
    factor: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    auth: Positive = 600.0
    """Cooldown after an auth failure."""
    balance: Positive = 3600.0
    """Cooldown after a balance/quota failure (the key is out of credit)."""


class HealthConfig(_Section):
    """Per-model health settings (see `router._health`). A model cools only while none
    of its keys can serve it (their lanes' and keys' own cooldowns and breakers say for
    how long), so cooling has no settings of its own."""

    disabled_for: Positive = 3600.0
    """How long a model stays disabled after a model-missing answer."""


class TokensConfig(_Section):
    """How prompts are counted (context-window pre-checks and TPM budgets)."""

    exact_provider: str | None = None
    """An `anthropic` provider whose count-tokens endpoint gives exact counts, behind a
    breaker, with the offline tiktoken count as fallback. None: offline counts only."""
    exact_model: str | None = None
    """The upstream model id to count for (default: the request's model when it is on
    that provider, else this)."""
    completion_estimate: NonNegativeInt = 256
    """Tokens reserved from a TPM budget for the answer of a request without max_tokens
    (reconciled with the reported usage afterwards)."""


class GatewayKey(_Section):
    """A key that callers of the HTTP gateway present; it selects their tenant. Its
    quotas (`rpm`, `tpm`, `budget_usd`) are this key's own (see `router.gateway._quota`)."""

    id: Name
    secret: str
    tenant: str | None = None
    models: list[str] | None = None
    """The models (configured names or `provider/upstream` ids) this key may call, as
    the request's model or a fallback; None: any the gateway allows."""
    rpm: PositiveInt | None = None
    """Requests per minute this key may make (sliding 60 s window); None: no limit."""
    tpm: PositiveInt | None = None
    """Tokens per minute: the prompt estimate is counted up front, then replaced by the
    usage the provider reported (prompt + completion)."""
    budget_usd: Positive | None = None
    """US dollars this key may spend per `budget_period` (priced requests only)."""
    budget_period: Literal["day", "month"] = "day"
    """The budget's window: the UTC calendar day or month."""

    def __repr__(self) -> str:
        return (
            f"GatewayKey(id={self.id!r}, secret='***', tenant={self.tenant!r}, "
            f"models={self.models!r})"
        )


class GatewayConfig(_Section):
    """The `[gateway]` table of `llm-router serve`."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    api_keys: list[GatewayKey] = msgspec.field(default_factory=list)
    """Keys callers must present (Authorization: Bearer). Empty: no auth (loopback use)."""
    admin_key: str = ""
    """Secret (or ``env:VAR``) for /v1/router/state and /v1/router/reset; empty disables them."""
    max_body_bytes: PositiveInt = 1_048_576
    backlog: PositiveInt = 4096
    """Listen backlog: connections the kernel queues before the gateway accepts them."""
    shutdown_grace: Positive = 30.0
    """Seconds in-flight requests get to finish after SIGTERM."""
    allow_request_fallbacks: Literal["none", "configured", "any"] = "configured"
    """What a request may name in `fallbacks` (or `x-router-fallbacks`): nothing, only
    configured model names, or also arbitrary `provider/upstream` ids."""
    max_request_timeout: Positive | None = None
    """The longest deadline a request may ask for with `timeout` (default: the router's
    `timeout`); a request may shorten its deadline, never extend it past this."""
    body_timeout: Positive = 30.0
    """Seconds a client has to send the whole request body once its headers are in."""
    send_timeout: Positive = 30.0
    """Seconds a client may go without taking any of its answer while the gateway has
    bytes waiting for it (the socket's buffers full: the client stopped reading); each
    64 KiB it takes starts the time over. Past it the connection is closed and its
    requests end, upstream streams included, which frees their keys' slots."""
    max_connections: PositiveInt = 4096
    """Concurrent client connections; past it new connections are refused."""
    max_in_flight: PositiveInt = 512
    """Requests and streams served at once; past it the gateway answers 503 with
    Retry-After (and /readyz reports overload)."""
    max_queue_delay: Positive = 2.0
    """A request that waited longer than this before the gateway could start on it is
    refused with 503 rather than served late."""
    access_log: Literal["json", "text", "off"] = "json"
    """One line per request on the ``router.access`` logger (stderr under `serve`): JSON,
    a readable line, or none. `serve --access-log` overrides it."""
    gc_threshold: PositiveInt | None = 10_000
    """``llm-router serve`` sets CPython's generation-0 collection threshold to this at
    startup and freezes the objects made so far (`router.tune_gc`): with thousands of
    streams open, the default (700) spends a large share of the CPU walking parked
    coroutine frames. None leaves the interpreter's settings alone."""

    def __repr__(self) -> str:
        return (
            f"GatewayConfig(host={self.host!r}, port={self.port!r}, "
            f"api_keys={self.api_keys!r}, admin_key='***')"
        )


class SharedConfig(_Section):
    """The `[router.shared]` table: state shared with other router instances (gateway
    workers, or gateways on other hosts) through Redis (see `router._shared`)."""

    redis_url: Name
    """``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS) or ``unix:///path``;
    the password may be given as ``env:VAR`` in place of the whole URL."""
    key_prefix: Name = "llm-router"
    """Prefix of every Redis key and of the pub/sub channel: routers that share a prefix
    (and the same providers, keys and models) act as one."""
    timeout: Positive = 0.5
    """The longest a Redis operation off the request path (and a health ping) may take
    before Redis counts as unreachable and the instance goes local-only."""
    budget_timeout: Positive = 0.1
    """The longest a request waits for a shared RPM/TPM reservation; past it the key's
    local budget alone decides."""
    ping_interval: Positive = 0.25
    """How often Redis's health is checked (and, while down, its return)."""
    probe_lease: Positive = 2.0
    """Seconds an instance holds a half-open key's probe lease after its last probe."""

    def __repr__(self) -> str:
        url = mask_url(self.redis_url)
        return f"SharedConfig(redis_url={url!r}, key_prefix={self.key_prefix!r})"


class TracingConfig(_Section):
    """The `[router.tracing]` table: OpenTelemetry traces, exported over OTLP/HTTP (the
    `otel` extra; see `router._otel`). Unset fields fall back to the standard
    ``OTEL_EXPORTER_OTLP_*`` and ``OTEL_SERVICE_NAME`` environment variables."""

    enabled: bool = True
    """Trace every request (a table with ``enabled = false`` traces nothing)."""
    service_name: str | None = None
    """The ``service.name`` of the spans (default: ``OTEL_SERVICE_NAME``, else
    ``llm-router``)."""
    endpoint: str | None = None
    """The collector's OTLP/HTTP base URL (``http://collector:4318``; spans go to its
    ``/v1/traces``). Default: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_ENDPOINT``, else ``http://localhost:4318``."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Headers sent with each export (a collector's API key, say); values may be
    ``env:VAR``. They are secrets: never printed. Default: ``OTEL_EXPORTER_OTLP_HEADERS``."""
    sample_rate: Fraction | None = None
    """Fraction of new traces recorded (a request whose caller's trace is sampled, or
    not, follows its caller). Default: ``OTEL_TRACES_SAMPLER``, else every trace."""

    def __repr__(self) -> str:  # header values, and any password in the URL, are secrets
        endpoint = mask_url(self.endpoint) if self.endpoint is not None else None
        return (
            f"TracingConfig(enabled={self.enabled!r}, service_name={self.service_name!r}, "
            f"endpoint={endpoint!r}, headers={ {k: '***' for k in self.headers}!r})"
        )


class RouterSettings(_Section):
    """The `[router]` table."""

    timeout: Positive = 90.0
    """End-to-end deadline of a request across retries and fallbacks. The default holds
    a fast-failing attempt's in-place retries plus one attempt timeout elsewhere (an
    in-place retry needs its backoff plus two attempt timeouts left while a fallback
    is callable), and a silent primary's attempt timeout plus its fallback's."""
    attempt_timeout: Positive = 30.0
    """Deadline of one upstream attempt."""
    first_token_timeout: Positive = 30.0
    """Streams: the first content chunk must arrive within this; else the attempt fails
    (transient) and the stream fails over."""
    idle_timeout: Positive = 30.0
    """Streams: the longest pause between chunks once the stream has started."""
    transient_retries: NonNegativeInt = 2
    retry_backoff: list[NonNegative] = msgspec.field(default_factory=lambda: [0.5, 2.0])
    """Sleep before the n-th in-place retry; the last value repeats."""
    retry_jitter: Fraction = 0.1
    rate_limit_wait: NonNegative = 3.0
    """A 429 whose Retry-After is at most this many seconds, with no other key of the
    model callable, is waited out and retried once on the same key instead of falling
    to another model (0 disables)."""
    lanes_per_key: PositiveInt = 256
    """Upstream models whose failure state a key keeps (least recently used dropped)."""
    drop_params: bool = False
    """Drop, rather than refuse with 400, request fields and content parts the serving
    model's protocol cannot take (logged once, named in `dropped_params`); a model's
    own `drop_params` and a request's win over this."""
    hedge_after: Positive | Literal["auto"] | None = None
    """Hedging (off by default: it spends money): when an attempt has no answer (or no
    first content, for a stream) after this many seconds, race another attempt on the
    next candidate. "auto": the 95th percentile of the lane's recent latencies, never
    under `hedge_floor` (no hedge until the lane has some history)."""
    hedge_floor: Positive = 1.0
    max_hedges: NonNegativeInt = 1
    """Attempts raced against the first one, at most."""
    max_continuations: NonNegativeInt = 1
    """Times one stream may be continued (or replayed) on another key or model after
    an interruption past its first chunk (0: never; the caller gets the interruption)."""
    max_chain: PositiveInt = 8
    """Models a request's chain may hold (its model, its fallbacks, the model's and the
    global fallbacks); a longer one is refused before any upstream call."""
    max_attempts: PositiveInt = 12
    """Upstream attempts one request may make, retries included; then it ends."""
    adhoc_models: PositiveInt = 1024
    """`provider/upstream` names (not configured models) whose health the router keeps,
    least recently used dropped first."""
    fallbacks: list[str] = msgspec.field(default_factory=list)
    """Global fallbacks, appended to every chain."""
    balancing: Balancing = "ordered"
    per_tenant_breakers: bool = False
    seed: int | None = None
    """Seeds the router's jitter, for reproducible runs."""
    context_window_fallbacks: dict[str, str] = msgspec.field(default_factory=dict)
    """model -> a larger model to route to when a prompt does not fit the model's
    `context_window` (opt-in; without it such a request fails with context_exceeded)."""
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    cooldown: CooldownConfig = msgspec.field(default_factory=CooldownConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    tokens: TokensConfig = msgspec.field(default_factory=lambda: TokensConfig())
    shared: SharedConfig | None = None
    """Shared state through Redis; None (the default): this process alone."""
    tracing: TracingConfig | None = None
    """OpenTelemetry traces; None (the default): none."""


class SimulationConfig(_Section):
    """Behaviour of a simulated key: latency and a fault mix (probabilities per call)."""

    latency: NonNegative = 0.05
    jitter: NonNegative = 0.0
    """Uniform extra latency in [0, jitter)."""
    transient: Fraction = 0.0
    rate_limit: Fraction = 0.0
    retry_after: NonNegative = 1.0
    auth: Fraction = 0.0
    balance: Fraction = 0.0
    model_missing: Fraction = 0.0
    hang: Fraction = 0.0
    """The call never answers (the attempt timeout ends it)."""
    unknown: Fraction = 0.0
    down: bool = False
    """Every call fails at once as a refused connection (transient)."""
    models: list[str] | None = None
    """Upstream ids served; any other answers model-missing. None serves all."""
    chunk_interval: NonNegative = 0.01
    """Streams: the pause between word chunks."""


class KeyConfig(_Section):
    id: Name
    secret: str = ""
    max_concurrency: PositiveInt | None = None
    rpm: PositiveInt | None = None
    """Requests per minute this key may send (default: the provider's `rpm`, else none)."""
    tpm: PositiveInt | None = None
    """Tokens per minute (prompt estimate + max_tokens reserved, reconciled with usage)."""
    simulate: SimulationConfig | None = None

    def __repr__(self) -> str:
        return f"KeyConfig(id={self.id!r}, secret='***', max_concurrency={self.max_concurrency!r})"


class PriceConfig(_Section):
    """A model's own price in USD per million tokens (overrides the price table)."""

    input: NonNegative
    output: NonNegative
    cached_input: NonNegative | None = None
    """Prompt tokens read from the provider's cache (default: `input`)."""
    cache_write: NonNegative | None = None
    """Prompt tokens written to the provider's cache (Anthropic; default: `input`)."""


class ProviderConfig(_Section):
    name: Name
    kind: ProviderKind
    keys: list[KeyConfig]
    base_url: str = ""
    pricing: str | None = None
    """Whose price table prices this provider's models (a `genai-prices` provider id
    such as "openai"), or "none". None: the provider whose API `base_url` points at
    (api.openai.com, api.anthropic.com, ...); a base_url of no known provider (a
    private deployment, a proxy) gets no price unless configured."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra HTTP headers sent with every request (HTTP kinds). A value may be given as
    ``env:VAR``. Values given so, and those of credential headers (``api-key``,
    ``authorization``, ``x-api-key``, ``proxy-authorization``, ``cookie``, names
    ending in ``-key``, ``-token``, ``-secret``), are secrets: scrubbed like a key's."""
    max_concurrency: PositiveInt = 64
    rpm: PositiveInt | None = None
    """Default requests-per-minute budget of each key."""
    tpm: PositiveInt | None = None
    """Default tokens-per-minute budget of each key."""
    simulate: SimulationConfig | None = None
    seed: int = 0
    proxy: str | None = None
    """An HTTP(S) proxy URL for this provider's requests (HTTP kinds), e.g.
    ``http://user:pass@proxy:3128``; its credentials are secrets. With a proxy (this one
    or one from HTTP_PROXY / HTTPS_PROXY / ALL_PROXY) requests go through httpx's own
    transport instead of the router's."""

    def __repr__(self) -> str:  # header values, base_url and proxy may hold credentials
        proxy = "" if self.proxy is None else f", proxy={mask_url(self.proxy)!r}"
        return (
            f"ProviderConfig(name={self.name!r}, kind={self.kind!r}, "
            f"base_url={mask_url(self.base_url)!r}{proxy}, "
            f"keys={self.keys!r}, headers={ {k: '***' for k in self.headers}!r})"
        )


class ModelConfig(_Section):
    name: Name
    provider: Name
    upstream: Name
    fallbacks: list[str] = msgspec.field(default_factory=list)
    context_window: PositiveInt | None = None
    drop_params: bool | None = None
    """This model's `drop_params` (None: the router's)."""
    hedge_after: Positive | Literal["auto"] | None = None
    """This model's `hedge_after` (None: the router's)."""
    continuation: bool | None = None
    """Whether an interrupted stream may be continued on this model with the text so
    far as an assistant prefill (None: only for ``anthropic`` providers, whose API
    continues a prefill natively). Models without it get a replay instead."""
    mode: Literal["chat", "embedding"] = "chat"
    """What the model serves: chat requests (`Router.submit`, `Router.stream`) or
    embedding requests (`Router.embed`); a request of the other kind is a 400."""
    price: PriceConfig | None = None
    """This model's price (None: the price table's, by provider and upstream id)."""


_ERR_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_ERR_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]+)`")


def _config_error_from_msgspec(exc: msgspec.ValidationError) -> ConfigError:
    text = str(exc)
    m = _ERR_PATH.match(text)
    msg, path = (m.group("msg"), m.group("path") or "") if m else (text, "")
    fm = _ERR_FIELD.search(msg)
    if fm:
        path = f"{path}.{fm.group(1)}"
    return ConfigError(path.lstrip(".") or "<root>", msg)


class RouterConfig(_Section):
    """The whole configuration: `[router]`, `[[providers]]`, `[[models]]`."""

    providers: list[ProviderConfig]
    router: RouterSettings = msgspec.field(default_factory=RouterSettings)
    models: list[ModelConfig] = msgspec.field(default_factory=list)
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)

    # -- loading --------------------------------------------------------------

    @classmethod
    def from_toml(cls, text: str | bytes) -> RouterConfig:
        try:
            cfg = msgspec.toml.decode(text, type=cls)
        except msgspec.ValidationError as exc:
            raise _config_error_from_msgspec(exc) from None
        except msgspec.DecodeError as exc:
            raise ConfigError("<document>", f"not valid TOML: {exc}") from None
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, text: str | bytes) -> RouterConfig:
        try:
            cfg = msgspec.json.decode(text, type=cls)
        except msgspec.ValidationError as exc:
            raise _config_error_from_msgspec(exc) from None
        except msgspec.DecodeError as exc:
            raise ConfigError("<document>", f"not valid JSON: {exc}") from None
        cfg.validate()
        return cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterConfig:
        try:
            cfg = msgspec.convert(data, type=cls)
        except msgspec.ValidationError as exc:
            raise _config_error_from_msgspec(exc) from None
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RouterConfig:
        """Load a `.toml` or `.json` file (by its suffix; anything else is read as TOML)."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise ConfigError("<file>", f"cannot read {str(p)!r}: {exc.strerror}") from None
        if p.suffix.lower() == ".json":
            return cls.from_json(data)
        return cls.from_toml(data)

    # -- cross-field validation -------------------------------------------------

    def validate(self) -> None:
        """Check what the schema cannot: uniqueness and references between entries."""
        if not self.providers:
            raise ConfigError("providers", "at least one provider is required")
        providers: dict[str, ProviderConfig] = {}
        for i, p in enumerate(self.providers):
            if "/" in p.name:
                raise ConfigError(f"providers[{i}].name", f"{p.name!r} must not contain '/'")
            if p.name in providers:
                raise ConfigError(f"providers[{i}].name", f"duplicate provider {p.name!r}")
            providers[p.name] = p
            if not p.keys:
                raise ConfigError(f"providers[{i}].keys", "at least one key is required")
            seen: set[str] = set()
            for j, k in enumerate(p.keys):
                if k.id in seen:
                    raise ConfigError(f"providers[{i}].keys[{j}].id", f"duplicate key id {k.id!r}")
                seen.add(k.id)
                if k.secret.startswith("env:") and not k.secret[4:]:
                    raise ConfigError(
                        f"providers[{i}].keys[{j}].secret", "`env:` needs a variable name"
                    )
                if k.simulate is not None and p.kind != "simulated":
                    raise ConfigError(
                        f"providers[{i}].keys[{j}].simulate",
                        f"only simulated providers take `simulate` (kind is {p.kind!r})",
                    )
            for header, value in p.headers.items():
                if value.startswith("env:") and not value[4:]:
                    raise ConfigError(
                        f"providers[{i}].headers.{header}", "`env:` needs a variable name"
                    )
            if p.simulate is not None and p.kind != "simulated":
                raise ConfigError(
                    f"providers[{i}].simulate",
                    f"only simulated providers take `simulate` (kind is {p.kind!r})",
                )
            if p.kind in ("openai", "anthropic", "gemini") and not p.base_url:
                raise ConfigError(f"providers[{i}].base_url", f"required for kind {p.kind!r}")
            if p.pricing is not None and p.pricing != "none":
                from ._usage import known_price_table

                if not known_price_table(p.pricing):
                    raise ConfigError(
                        f"providers[{i}].pricing",
                        f"{p.pricing!r} is no provider of the price table (genai-prices); "
                        'use its provider id (e.g. "openai") or "none"',
                    )
            if p.proxy is not None and not p.proxy.startswith(("http://", "https://")):
                raise ConfigError(
                    f"providers[{i}].proxy", "must be an http:// or https:// proxy URL"
                )
        models: set[str] = set()
        for i, m in enumerate(self.models):
            if m.name in models:
                raise ConfigError(f"models[{i}].name", f"duplicate model {m.name!r}")
            models.add(m.name)
            if m.provider not in providers:
                raise ConfigError(f"models[{i}].provider", f"unknown provider {m.provider!r}")

        def check_ref(field: str, name: str) -> None:
            name = name.strip()
            if not name or name in models:
                return
            prov, sep, upstream = name.partition("/")
            if sep and prov in providers and upstream:
                return
            raise ConfigError(
                field, f"{name!r} is neither a configured model nor `provider/upstream-id`"
            )

        for i, m in enumerate(self.models):
            for j, f in enumerate(m.fallbacks):
                check_ref(f"models[{i}].fallbacks[{j}]", f)
        for j, f in enumerate(self.router.fallbacks):
            check_ref(f"router.fallbacks[{j}]", f)
        global_fallbacks = [f.strip() for f in self.router.fallbacks if f.strip()]
        for i, m in enumerate(self.models):
            chain = dict.fromkeys(
                [m.name, *(f.strip() for f in m.fallbacks if f.strip()), *global_fallbacks]
            )
            if len(chain) > self.router.max_chain:
                raise ConfigError(
                    f"models[{i}].fallbacks",
                    f"the chain of {m.name!r} holds {len(chain)} models with the global "
                    f"fallbacks; router.max_chain is {self.router.max_chain}",
                )
        r = self.router
        for name, target in r.context_window_fallbacks.items():
            check_ref(f"router.context_window_fallbacks.{name}", name)
            check_ref(f"router.context_window_fallbacks.{name}", target)
        exact = r.tokens.exact_provider
        if exact is not None:
            if exact not in providers:
                raise ConfigError("router.tokens.exact_provider", f"unknown provider {exact!r}")
            if providers[exact].kind not in ("anthropic", "custom"):
                raise ConfigError(
                    "router.tokens.exact_provider",
                    f"provider {exact!r} is of kind {providers[exact].kind!r}; exact counts "
                    "need an anthropic (or custom, with count_tokens) provider",
                )
        seen_gateway: set[str] = set()
        for i, gk in enumerate(self.gateway.api_keys):
            if gk.id in seen_gateway:
                raise ConfigError(f"gateway.api_keys[{i}].id", f"duplicate key id {gk.id!r}")
            seen_gateway.add(gk.id)
        if not r.retry_backoff:
            raise ConfigError("router.retry_backoff", "needs at least one delay")
        if r.breaker.open_for_max < r.breaker.open_for:
            raise ConfigError("router.breaker.open_for_max", "must be >= open_for")
        if r.cooldown.max < r.cooldown.min:
            raise ConfigError("router.cooldown.max", "must be >= min")
        if r.tracing is not None:
            endpoint = r.tracing.endpoint
            if endpoint is not None and not endpoint.startswith(("http://", "https://")):
                raise ConfigError("router.tracing.endpoint", "must be an http:// or https:// URL")
            for header, value in r.tracing.headers.items():
                if value.startswith("env:") and not value[4:]:
                    raise ConfigError(
                        f"router.tracing.headers.{header}", "`env:` needs a variable name"
                    )
        if r.shared is not None:
            url = r.shared.redis_url
            if not url.startswith(("redis://", "rediss://", "unix://", "env:")):
                raise ConfigError(
                    "router.shared.redis_url",
                    "must start with redis://, rediss:// or unix:// (or be env:VAR)",
                )


def capped_growth(base: float, factor: float, times: int, cap: float) -> float:
    """``min(base * factor ** times, cap)`` without overflowing for huge `times`."""
    if base >= cap or factor <= 1.0:
        return min(base, cap)
    if times >= math.log(cap / base, factor):
        return cap
    return min(base * factor**times, cap)


def resolve_secret(raw: str, field: str) -> str:
    """Turn ``env:VAR`` into the variable's value; other strings are literal secrets."""
    if raw.startswith("env:"):
        var = raw[4:]
        value = os.environ.get(var)
        if value is None:
            raise ConfigError(field, f"environment variable {var!r} is not set")
        return value
    return raw


def resolve_headers(headers: Mapping[str, str], field: str) -> dict[str, str]:
    """A provider's `headers` with every ``env:VAR`` value resolved (`resolve_secret`;
    a missing variable is a `ConfigError` at ``{field}.{name}``)."""
    return {name: resolve_secret(value, f"{field}.{name}") for name, value in headers.items()}
