"""Rules shared by the wire protocols for turning an upstream failure into a kind.

What lives here:

- `retry_after_from_headers`: the upstream's "try again in" hint, from whichever
  header the provider uses (see its docstring for the precedence rule);
- `parse_duration`: Go-style durations ("1s", "6m0s", "20ms", "1h2m3.5s");
- text predicates over an error message: `mentions_context_overflow`,
  `mentions_max_tokens_ceiling`, `mentions_content_policy`, `mentions_billing`,
  `mentions_invalid_key`, and `names_missing_model` (over message and codes);
- `classify_failure`: the one decision table from (status, message, error codes) to
  an `ErrorKind`, which every protocol calls after pulling those three out of its
  own error body; the table is spelled out in its docstring;
- `error_snippet` and `redact`: a short, secret-free text for an error message
  (known secrets, from the caller or the active `router._secrets.scrubbing` block,
  are scrubbed whole and in part before any cut).

What this module must never do: read a clock (time comes in as `now`, epoch
seconds), do I/O, or let anything that looks like an API key into a message.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import Final

from ._errors import ErrorKind, ProviderError
from ._secrets import Scrubber, active_scrubber, scrubber_for

__all__ = [
    "classified_error",
    "classify_failure",
    "describe",
    "error_snippet",
    "mentions_billing",
    "mentions_content_policy",
    "mentions_context_overflow",
    "mentions_invalid_key",
    "mentions_max_tokens_ceiling",
    "names_missing_model",
    "parse_duration",
    "redact",
    "retry_after_from_headers",
]

SNIPPET_LIMIT: Final = 300

# --------------------------------------------------------------------------- headers


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup that also works on a plain dict."""
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate
    return value


_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration ("1s", "6m0s", "20ms", "1h2m3.5s"), or in a bare
    number of seconds ("2", "0.5"). None when the text is neither."""
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(text):
        return None
    return total


def _retry_after_value(text: str, now: float) -> float | None:
    """`Retry-After`: delta-seconds or an HTTP date."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - now


def _rfc3339_delta(text: str, now: float) -> float | None:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - now


# (reset header, remaining header, parser)
_OPENAI_RESETS: Final = (
    ("x-ratelimit-reset-requests", "x-ratelimit-remaining-requests"),
    ("x-ratelimit-reset-tokens", "x-ratelimit-remaining-tokens"),
)
_ANTHROPIC_RESETS: Final = (
    ("anthropic-ratelimit-requests-reset", "anthropic-ratelimit-requests-remaining"),
    ("anthropic-ratelimit-tokens-reset", "anthropic-ratelimit-tokens-remaining"),
    ("anthropic-ratelimit-input-tokens-reset", "anthropic-ratelimit-input-tokens-remaining"),
    ("anthropic-ratelimit-output-tokens-reset", "anthropic-ratelimit-output-tokens-remaining"),
)


def _reset_windows(headers: Mapping[str, str], now: float) -> float | None:
    exhausted: list[float] = []
    present: list[float] = []
    for resets, as_duration in ((_OPENAI_RESETS, True), (_ANTHROPIC_RESETS, False)):
        for reset_name, remaining_name in resets:
            raw = _header(headers, reset_name)
            if raw is None:
                continue
            seconds = parse_duration(raw) if as_duration else _rfc3339_delta(raw, now)
            if seconds is None:
                continue
            present.append(seconds)
            if (_header(headers, remaining_name) or "").strip() == "0":
                exhausted.append(seconds)
    windows = exhausted or present
    return max(windows) if windows else None


def retry_after_from_headers(
    headers: Mapping[str, str], now: float, *, explicit_only: bool = False
) -> float | None:
    """The upstream's hint, in seconds from `now`, of when to try again; None if none.

    Precedence (the first that is present and parses wins):

    1. ``Retry-After``: delta-seconds, or an HTTP date taken relative to `now`;
    2. ``retry-after-ms``: milliseconds;
    3. the rate-limit reset headers, unless `explicit_only`: OpenAI's
       ``x-ratelimit-reset-requests`` / ``-tokens`` (Go durations) and Anthropic's
       ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset``
       (RFC 3339 timestamps, relative to `now`). Of these, the ones whose matching
       ``...-remaining`` header is "0" apply (those are the limits that were hit); if
       no remaining header says 0, all present ones apply. The longest applicable
       window is returned, since the request cannot pass before every exhausted limit
       has reset.

    Negative results (a date in the past, clock skew) clamp to 0.
    """
    seconds: float | None = None
    raw = _header(headers, "retry-after")
    if raw is not None:
        seconds = _retry_after_value(raw, now)
    if seconds is None:
        raw = _header(headers, "retry-after-ms")
        if raw is not None:
            try:
                seconds = float(raw.strip()) / 1000.0
            except ValueError:
                seconds = None
    if seconds is None and not explicit_only:
        seconds = _reset_windows(headers, now)
    if seconds is None:
        return None
    return max(0.0, seconds)


# --------------------------------------------------------------------------- text

_CONTEXT: Final = re.compile(
    r"context[_ ]length[_ ]exceeded|maximum context length|context[_ ]length"
    r"|context[_ ]window|context[_ ]limit|prompt is too long|input is too long"
    r"|too many tokens|too many input tokens|input token count"
    r"|reduce the length of the (?:messages|prompt|input)"
)
_OUTPUT_LIMIT_NAME: Final = re.compile(
    r"max(?:imum)?[_ \-]?(?:number[_ ]of[_ ])?(?:allowed[_ ])?"
    r"(?:completion[_ ]|output[_ ]|new[_ ])?tokens"
    r"|maxoutputtokens|max_output_tokens|output[_ ]tokens?[_ ]limit"
)
_CEILING_WORDING: Final = re.compile(
    r"too (?:large|high|big)|exceed|ceiling|maximum|at most|greater than|more than"
    r"|larger than|above|limit|supported range|allowed|>\s*\d"
)
_RATE_WORDING: Final = re.compile(r"rate[_ ]limit|per (?:minute|hour|day)|\b[rt]p[md]\b")
_CONTENT_POLICY: Final = re.compile(
    r"content[_ ]policy|content management policy|content[_ ]filter|usage polic(?:y|ies)"
    r"|responsible ai|prohibited content|safety (?:system|filter|reasons?|polic(?:y|ies))"
    r"|(?:due to|for|by) safety|flagged (?:by|as)"
)
# A quota spent for a long period (a spend limit, a month's or a billing period's
# budget): no retry helps before it resets, days away. Anthropic: the tier's monthly
# spend cap (429 enforced_spend_limit_reached) and a spend limit the organisation or
# workspace set ("You have reached your specified API usage limits. You will regain
# access on ..."); OpenAI: organization / project spend limits. A per-day *request*
# quota (Gemini's free tier) is not one: it is a rate limit that says when it resets.
_LONG_QUOTA: Final = (
    r"spend(?:ing)?[_ ](?:limit|cap)"
    r"|specified (?:workspace )?api usage limits|regain access on"
    r"|(?:monthly|daily|weekly|yearly|annual) (?:spend|spending|budget|cost|usage limit)"
    r"|(?:for|of|in) (?:the|this|your) (?:current )?billing (?:period|cycle)"
)
_BILLING: Final = re.compile(
    r"billing|credit balance|insufficient[_ ](?:quota|balance|credits?|funds)"
    r"|out of credits|payment required|purchase credits|add credits|" + _LONG_QUOTA
)
# Inside a 429 only unambiguous wording counts: Gemini ends every quota message with
# "please check your plan and billing details", per-minute limits included.
_BILLING_IN_429: Final = re.compile(
    r"credit balance|insufficient[_ ](?:quota|balance|credits?|funds)|out of credits"
    r"|billing hard limit|payment required|purchase credits|" + _LONG_QUOTA
)
_INVALID_KEY: Final = re.compile(
    r"api[_ ]key not valid|invalid[_ ]api[_ ]key|invalid x-api-key|incorrect api key"
    r"|api[_ ]key[_ ]invalid|api key (?:is )?(?:invalid|expired|missing)"
)


def mentions_context_overflow(message: str) -> bool:
    """The prompt (or prompt + requested output) does not fit the context window."""
    return _CONTEXT.search(message.lower()) is not None


def mentions_max_tokens_ceiling(message: str) -> bool:
    """The requested *output* ceiling (max_tokens) is above what the model or tier
    allows. A context overflow ("maximum context length ... reduce the length") is
    not one, even when it names max_tokens, and neither is a per-minute token limit."""
    text = message.lower()
    if _CONTEXT.search(text) or _RATE_WORDING.search(text):
        return False
    if "maximum output tokens" in text:
        return True
    return _OUTPUT_LIMIT_NAME.search(text) is not None and _CEILING_WORDING.search(text) is not None


def mentions_content_policy(message: str) -> bool:
    """A refusal by content policy or safety filter."""
    return _CONTENT_POLICY.search(message.lower()) is not None


def mentions_billing(message: str, *, strict: bool = False) -> bool:
    """Out of credit or quota, or billing not set up. `strict` accepts only wording
    that cannot describe a resetting rate limit (used inside 429 answers)."""
    pattern = _BILLING_IN_429 if strict else _BILLING
    return pattern.search(message.lower()) is not None


def mentions_invalid_key(message: str) -> bool:
    """The key is invalid (Gemini says so with a 400, not a 401)."""
    return _INVALID_KEY.search(message.lower()) is not None


def names_missing_model(message: str, codes: Collection[str]) -> bool:
    """The error (a 404's) says a *model* is missing, rather than the URL: an explicit
    ``model_not_found`` code, or a message that names a model (OpenAI "The model `x`
    does not exist", Anthropic "model: x", Gemini "models/x is not found", Ollama
    'model "x" not found') together with a not-found code or not-found wording. An
    HTML page never does (a site's 404 page may say "Page not found" next to a
    "Models" link)."""
    if "model_not_found" in codes:
        return True
    text = message[:4000].lower()
    if text.lstrip()[:1] == "<" or _MODEL_WORD.search(text) is None:
        return False
    return not _NOT_FOUND_CODES.isdisjoint(codes) or _NOT_FOUND_WORDING.search(text) is not None


# --------------------------------------------------------------------------- table

_BALANCE_CODES: Final = frozenset(
    {
        "insufficient_quota",
        "billing_error",
        "billing_not_active",
        "billing_hard_limit_reached",
        # Anthropic's monthly spend cap (error.details.error_code of a 429)
        "enforced_spend_limit_reached",
        # OpenAI's long-period limits (error.code of a 429)
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
    }
)
_RATE_CODES: Final = frozenset({"rate_limit_exceeded", "rate_limit_error", "resource_exhausted"})
_MODEL_CODES: Final = frozenset({"model_not_found", "not_found_error", "not_found"})
# A 404's codes that say "not found" without saying what (Anthropic not_found_error,
# Gemini NOT_FOUND, vLLM NotFoundError).
_NOT_FOUND_CODES: Final = frozenset({"not_found_error", "not_found", "notfounderror", "404"})
_MODEL_WORD: Final = re.compile(r"\bmodels?\b")
_NOT_FOUND_WORDING: Final = re.compile(
    r"not[_ ]found|does not exist|doesn't exist|do not exist|no such model|unknown model"
    r"|is not supported|not available|invalid model"
)
_AUTH_CODES: Final = frozenset(
    {
        "invalid_api_key",
        "authentication_error",
        "permission_error",
        "unauthenticated",
        "permission_denied",
        "api_key_invalid",
        "invalid_authentication",
    }
)
_POLICY_AUTH_CODES: Final = frozenset({"permission_error", "permission_denied"})
_REQUEST_CODES: Final = frozenset(
    {"invalid_request_error", "invalid_argument", "failed_precondition", "request_too_large"}
)
_CONTEXT_CODES: Final = frozenset({"context_length_exceeded"})
_CONTENT_CODES: Final = frozenset({"content_policy_violation", "content_filter"})
_TRANSIENT_CODES: Final = frozenset(
    {
        "overloaded_error",
        "api_error",
        "server_error",
        "unavailable",
        "internal",
        "deadline_exceeded",
        "timeout_error",
    }
)
_TRANSIENT_STATUSES: Final = frozenset({408, 409, 425, 529})
_REQUEST_STATUSES: Final = frozenset({400, 413, 422})


def classify_failure(status: int | None, message: str, codes: Collection[str]) -> ErrorKind:
    """The failure table, first matching row wins. `codes` are the error body's
    machine-readable tokens, lower-cased (OpenAI ``error.type`` and ``error.code``,
    Anthropic ``error.type`` and ``error.details.error_code``, Gemini ``error.status``
    and detail ``reason``s); `status` is None for an error that arrived inside a stream.

    1. 402, or a balance code (``insufficient_quota``, ``billing_error``, Anthropic's
       spend-cap ``enforced_spend_limit_reached``, OpenAI's ``credit_balance_exhausted``
       and ``*_spend_limit_exceeded``) -> balance
    2. 429 or a rate code (``rate_limit_exceeded``, ``RESOURCE_EXHAUSTED``):
       max_tokens if the text is about the output ceiling; balance if the text is
       unambiguously about credit ("credit balance", "insufficient quota") or about a
       quota spent for a long period (a spend limit, a monthly or daily spend, a
       billing period, "regain access on ..."); else rate_limit (Gemini's daily
       free-tier request quota included: it resets, and its RetryInfo says when)
    3. billing / credit / spend-limit wording in any other 4xx (or in-stream) error
       -> balance (Anthropic's 400 "You have reached your specified API usage limits")
    4. a 404 whose body names a missing model (`names_missing_model`: OpenAI
       ``model_not_found``, Anthropic ``not_found_error`` about a model, Gemini
       ``NOT_FOUND`` "models/... is not found", "model ... does not exist") ->
       model_missing; any other 404 (an HTML page, plain text, an empty body, an error
       naming no model) is a route 404, a wrong base_url -> transient (and
       `classified_error` makes it key-wide). Without a 404 status (an in-stream
       error), ``model_not_found`` / ``not_found_error`` / ``NOT_FOUND`` -> model_missing
    5. 401 / 403 or an auth code -> auth, except a 403 / permission error whose text
       is a content-policy refusal -> content_filter
    6. invalid-key wording on a 400 (Gemini ``API_KEY_INVALID``) -> auth
    7. 400 / 413 / 422 (or, in a stream, a request-error code): context_exceeded if
       the text mentions context overflow; max_tokens if it mentions the output
       ceiling; content_filter if it mentions content policy or safety; else
       bad_request
    8. 408, 409, 425, 5xx, 529, or a server code (``overloaded_error``,
       ``UNAVAILABLE``, ``INTERNAL``, ``DEADLINE_EXCEEDED``) -> transient
    9. anything else -> unknown
    """
    text = message[:4000].lower()
    if status == 402 or not _BALANCE_CODES.isdisjoint(codes):
        return "balance"
    if status == 429 or not _RATE_CODES.isdisjoint(codes):
        if mentions_max_tokens_ceiling(text):
            return "max_tokens"
        if mentions_billing(text, strict=True):
            return "balance"
        return "rate_limit"
    client_error = status is None or 400 <= status <= 499
    if client_error and mentions_billing(text):  # not 5xx: an HTML error page may link "Billing"
        return "balance"
    if status == 404:
        return "model_missing" if names_missing_model(text, codes) else "transient"
    if not _MODEL_CODES.isdisjoint(codes):
        return "model_missing"
    if status in (401, 403) or not _AUTH_CODES.isdisjoint(codes):
        policy_refusal = status == 403 or not _POLICY_AUTH_CODES.isdisjoint(codes)
        if policy_refusal and mentions_content_policy(text):
            return "content_filter"
        return "auth"
    if status in (None, 400) and mentions_invalid_key(text):
        return "auth"
    if status in _REQUEST_STATUSES or (
        status is None
        and not (_REQUEST_CODES.isdisjoint(codes) and _CONTEXT_CODES.isdisjoint(codes))
    ):
        if not _CONTEXT_CODES.isdisjoint(codes) or mentions_context_overflow(text):
            return "context_exceeded"
        if mentions_max_tokens_ceiling(text):
            return "max_tokens"
        if not _CONTENT_CODES.isdisjoint(codes) or mentions_content_policy(text):
            return "content_filter"
        return "bad_request"
    if (
        status in _TRANSIENT_STATUSES
        or (status is not None and 500 <= status <= 599)
        or not _TRANSIENT_CODES.isdisjoint(codes)
    ):
        return "transient"
    return "unknown"


# --------------------------------------------------------------------------- messages

_KEY_LIKE: Final = re.compile(
    r"sk-[A-Za-z0-9_*.\-]{6,}|AIza[0-9A-Za-z_\-]{10,}"
    r"|(?i:bearer|basic)\s+[^\s,;\"']+"
    r"|(?i:x-api-key|x-goog-api-key|api[_-]?key|authorization|password)[=:]\s*"
    r"(?:(?i:bearer|basic)\s+)?[^\s,;\"'&]+"
)
REDACTED: Final = "[redacted]"


def redact(text: str, secrets: str | Iterable[str] | Scrubber | None = None) -> str:
    """`text` with every known secret hidden, whole or as a long piece (`secrets`: the
    ones the caller knows, plus those of the active `scrubbing` block; see
    `router._secrets.Scrubber`), then anything else that looks like an API key or a
    credential, each replaced by "[redacted]"."""
    for scrubber in _scrubbers(secrets):
        text = scrubber.scrub(text)
    return _KEY_LIKE.sub(REDACTED, text)


def _scrubbers(secrets: str | Iterable[str] | Scrubber | None) -> list[Scrubber]:
    found: list[Scrubber] = []
    if isinstance(secrets, Scrubber):
        found.append(secrets)
    elif isinstance(secrets, str):
        found.append(scrubber_for((secrets,), REDACTED))
    elif secrets is not None:
        found.append(scrubber_for(secrets, REDACTED))
    active = active_scrubber()
    if active is not None and active not in found:
        found.append(active)
    return [scrubber for scrubber in found if scrubber]


_TAG: Final = re.compile(r"<(?:script|style)\b.*?</(?:script|style)>|<[^>]*>", re.S | re.I)


def error_snippet(
    text: str, limit: int = SNIPPET_LIMIT, secrets: str | Iterable[str] | Scrubber | None = None
) -> str:
    """Whitespace-collapsed, redacted (`redact`, with `secrets` and the active
    `scrubbing` block's), at most `limit` characters; an HTML error page is reduced to
    its text. Secrets are scrubbed *before* the text is cut to `limit`, so a secret
    across the cut never leaves a piece behind."""
    text = text[:20_000]
    if text.lstrip()[:1] == "<":
        text = _TAG.sub(" ", text)
    text = " ".join(text.split())
    text = _scrub_head(text, limit, _scrubbers(secrets))
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _scrub_head(text: str, limit: int, scrubbers: list[Scrubber]) -> str:
    """`text` redacted (known secrets, then key-like runs), or a redacted head of it
    whose first `limit` characters are those of the whole text redacted. Only what can
    show needs redacting, but a head cut from the raw text may end inside a secret, and
    redacting shrinks a text: the head grows until `margin` characters past `limit`
    remain, so its cut end is never shown."""
    margin = max((s.longest for s in scrubbers), default=0) + 64
    window = limit + 2 * margin
    while True:
        head = text[:window]
        for scrubber in scrubbers:
            head = scrubber.scrub(head)
        head = _KEY_LIKE.sub(REDACTED, head)
        if window >= len(text) or len(head) >= limit + margin:
            return head
        window *= 2


def describe(
    protocol: str, status: int | None, code: str | None, detail: str, where: str | None = None
) -> str:
    """The message of a classified error: who answered, how, and what they said."""
    if where is None:
        where = f"HTTP {status}" if status is not None else "in-stream error"
    label = f" ({code})" if code else ""
    return f"{protocol} {where}{label}: {error_snippet(detail) or 'no error message'}"


def classified_error(
    protocol: str,
    status: int | None,
    headers: Mapping[str, str],
    now: float,
    message: str,
    code: str | None,
    codes: Collection[str],
    where: str | None = None,
    body_retry_after: float | None = None,
) -> ProviderError:
    """The one way a protocol turns an error answer into a `ProviderError`.

    The kind comes from `classify_failure`. A rate limit takes its wait from every retry
    header (then from the body's own hint, `body_retry_after`); any other kind only from
    an explicit Retry-After, so the reset headers sent with every answer do not cool a
    key that failed for another reason. A route 404 (one that names no missing model)
    is transient and `key_wide`: the URL, hence base_url, is wrong for every model.
    """
    kind = classify_failure(status, message, codes)
    retry_after = retry_after_from_headers(headers, now, explicit_only=kind != "rate_limit")
    if retry_after is None and kind == "rate_limit" and body_retry_after is not None:
        retry_after = max(0.0, body_retry_after)
    text = describe(protocol, status, code, message, where)
    route_404 = status == 404 and kind == "transient"
    if route_404:
        text += " (not an API route, no missing model named: base_url is probably wrong)"
    return ProviderError(kind, text, retry_after=retry_after, status=status, key_wide=route_404)
