"""The router's one error taxonomy.

Every error the router raises derives from `RouterError` and carries a `.kind`
that says what went wrong in the terms of DESIGN.md's failure table::

    RouterError                     .kind is one of ERROR_KINDS
    ├── ConfigError                 a bad configuration; .field names the offending field
    ├── InvalidRequestError         a malformed ChatRequest; .field names the field
    │   ├── UnknownModelError       a model name that no config entry or provider resolves
    │   └── ContextWindowError      the prompt fits no model of the chain (counted before
    │                               any upstream call); .prompt_tokens, .windows
    ├── ProviderError               one upstream answer, classified; providers raise it
    │                               (.retry_after, .status); propagated to the caller as is
    │                               for bad_request / context_exceeded / content_filter /
    │                               max_tokens, with .attempts filled in
    ├── ChainExhaustedError         every model in the chain was tried or skipped;
    │                               .attempts, .last_error, .retry_after, .models_tried
    ├── DeadlineExceededError       the request's end-to-end deadline passed; .attempts
    ├── StreamInterruptedError      a stream failed after its first chunk reached the
    │                               caller; .partial_text, .cause, .attempts
    └── RouterClosedError           submitted to a router that is not open

What this module must never do: put a secret into a message. Errors are built from
key ids, provider names and upstream messages; a provider adapter that echoes a key
into its message must scrub it before raising.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from ._types import Attempt

__all__ = [
    "ERROR_KINDS",
    "ChainExhaustedError",
    "ConfigError",
    "ContextWindowError",
    "DeadlineExceededError",
    "ErrorKind",
    "InvalidRequestError",
    "ProviderError",
    "RouterClosedError",
    "RouterError",
    "StreamInterruptedError",
    "UnknownModelError",
]

ErrorKind = Literal[
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
]

ERROR_KINDS: Final[frozenset[str]] = frozenset(ErrorKind.__args__)  # type: ignore[attr-defined]


class RouterError(Exception):
    """Base of every error the router raises. `.kind` is one of `ERROR_KINDS`."""

    kind: ErrorKind

    def __init__(self, kind: ErrorKind, message: str) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}; expected one of {sorted(ERROR_KINDS)}")
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, message={self.message!r})"


class ConfigError(RouterError):
    """The configuration is invalid. `.field` is the path of the offending field,
    such as ``providers[1].keys[0].secret``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__("bad_request", f"invalid config at `{field}`: {message}")
        self.field = field


class InvalidRequestError(RouterError):
    """The request itself is malformed; nothing was sent upstream."""

    def __init__(self, field: str, message: str, kind: ErrorKind = "bad_request") -> None:
        super().__init__(kind, f"invalid request at `{field}`: {message}")
        self.field = field


class UnknownModelError(InvalidRequestError):
    """A model name that is neither a configured alias nor `provider/upstream-id`
    with a configured provider."""

    def __init__(self, model: str, field: str = "model") -> None:
        super().__init__(field, f"unknown model {model!r}", kind="model_missing")
        self.model = model


class ContextWindowError(InvalidRequestError):
    """The prompt plus `max_tokens` fits the `context_window` of no model in the chain.
    Raised before any upstream call; `.windows` maps each model to its window."""

    def __init__(self, prompt_tokens: int, max_tokens: int, windows: dict[str, int]) -> None:
        listed = ", ".join(f"{name} ({window})" for name, window in windows.items())
        super().__init__(
            "messages",
            f"the prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}: "
            f"{prompt_tokens + max_tokens} tokens fit the context window of no model in the "
            f"chain: {listed}",
            kind="context_exceeded",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.windows = windows


class ProviderError(RouterError):
    """One classified upstream failure.

    Providers raise it from `complete()`; the router decides from `.kind` what to do
    next (retry in place, cool the key, advance the chain or propagate). `retry_after`
    is the upstream's own hint in seconds, `status` its HTTP status when there was one.
    `provider`, `key_id` and `model` are filled in by the router, and `attempts` when
    the error is propagated to the caller.

    `key_wide` says the failure belongs to the key (or its host), not to the model it
    was asked for: a refused connection, a DNS or TLS failure, a reset before any
    response byte, a 404 from a URL that is not an API route. Such a failure stops the
    key for every model; any other transient or rate-limit failure stops only the
    (key, model) lane. `timed_out` says the attempt ended because the upstream said
    nothing in time (a silent upstream), which is never retried in place while
    somewhere else remains to try.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        retry_after: float | None = None,
        status: int | None = None,
        *,
        key_wide: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(kind, message)
        self.retry_after = retry_after
        self.status = status
        self.key_wide = key_wide
        self.timed_out = timed_out
        self.provider: str | None = None
        self.key_id: str | None = None
        self.model: str | None = None
        self.attempts: list[Attempt] = []

    def __repr__(self) -> str:
        return (
            f"ProviderError(kind={self.kind!r}, message={self.message!r}, "
            f"retry_after={self.retry_after!r}, status={self.status!r}, "
            f"provider={self.provider!r}, key_id={self.key_id!r})"
        )


class ChainExhaustedError(RouterError):
    """Every model of the chain failed or was skipped.

    `retry_after` is set when nothing was callable at the end (every key or model
    cooling, or open): the shortest time in seconds until something is callable again.
    """

    def __init__(
        self,
        models_tried: int,
        attempts: list[Attempt],
        last_error: RouterError | None,
        retry_after: float | None,
        *,
        chain_length: int | None = None,
        gave_up: str | None = None,
    ) -> None:
        self.models_tried = models_tried
        """Models of the chain that got at least one attempt."""
        self.chain_length = chain_length if chain_length is not None else models_tried
        self.attempts = attempts
        self.last_error = last_error
        self.retry_after = retry_after
        tried = f"{models_tried} of {self.chain_length} models tried, {len(attempts)} attempts"
        if gave_up:
            tried += f", {gave_up}"
        if last_error is not None:
            message = (
                f"model chain exhausted ({tried}); "
                f"last error: [{last_error.kind}] {last_error.message}"
            )
            kind: ErrorKind = last_error.kind
        else:
            message = f"model chain exhausted ({tried}): no model had a callable key"
            kind = "rate_limit" if retry_after is not None else "unknown"
        if retry_after is not None:
            message += f"; everything is cooling, next callable in {retry_after:.2f}s"
        super().__init__(kind, message)


class DeadlineExceededError(RouterError):
    """The request's end-to-end deadline (`timeout`) passed across retries and
    fallbacks."""

    def __init__(self, timeout: float, attempts: list[Attempt]) -> None:
        super().__init__(
            "transient",
            f"request deadline of {timeout:g}s exceeded after {len(attempts)} attempts",
        )
        self.timeout = timeout
        self.attempts = attempts


class StreamInterruptedError(RouterError):
    """A stream broke after its first chunk had reached the caller, so it could not
    fail over: the answer is incomplete. `.partial_text` is the text received so far,
    `.cause` the failure (its kind is this error's kind)."""

    def __init__(self, cause: RouterError, partial_text: str, attempts: list[Attempt]) -> None:
        super().__init__(
            cause.kind,
            f"stream interrupted after {len(partial_text)} characters: {cause.message}",
        )
        self.cause = cause
        self.partial_text = partial_text
        self.attempts = attempts


class RouterClosedError(RouterError):
    """The router is not open (not yet started, or shutting down)."""

    def __init__(self, message: str = "router is closed") -> None:
        super().__init__("unknown", message)
