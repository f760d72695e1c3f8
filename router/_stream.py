"""Streams as the caller sees them: `ChatStream`, fed through a `StreamSource`.

After the first content chunk the stream is the caller's. Its source is either the
upstream itself, read in the caller's task (`router._actor._Pull`, for the built-in
HTTP kinds), or a small memory channel the key actor's worker pumps the upstream
into. Both end with `STREAM_END` after a whole answer, or a `StreamFailure` when the
upstream broke; a source that ends with neither (the router closed) is an interruption
too. So a cut answer can never look whole: `ChatStream` raises
`StreamInterruptedError` with the text received so far.

Closing the `ChatStream` early (or cancelling its consumer) stops the source and
closes the upstream connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Final, NoReturn, Protocol

import msgspec
import trio

from ._errors import ProviderError, RouterClosedError, RouterError, StreamInterruptedError
from ._types import Attempt, StreamChunk, Usage

if TYPE_CHECKING:
    from ._actor import Job

__all__ = [
    "STREAM_END",
    "ChatStream",
    "Continuation",
    "Continuer",
    "Segment",
    "StreamFailure",
    "StreamStart",
]


class _End:
    def __repr__(self) -> str:
        return "STREAM_END"


STREAM_END: Final = _End()


class StreamFailure:
    """Put in the channel by the worker when the upstream stream broke."""

    __slots__ = ("error",)

    def __init__(self, error: ProviderError) -> None:
        self.error = error


StreamItem = list[StreamChunk] | StreamFailure | _End
"""One channel item: a batch (the chunks one upstream read produced), or the end."""


class StreamSource(Protocol):
    """Where a handed-over stream's batches come from: a memory channel the worker
    pumps into, or the caller's own reads (`router._actor`'s pull relay). Both end
    with `STREAM_END` or a `StreamFailure`; `EndOfChannel` or `ClosedResourceError`
    mean the worker let go first."""

    async def receive(self) -> StreamItem: ...

    def close(self) -> None: ...


class StreamStart:
    """A job's result when a stream has produced its first content: the chunks so far
    and where the rest will come from."""

    __slots__ = ("first", "job", "receive")

    def __init__(
        self,
        first: list[StreamChunk],
        receive: StreamSource,
        job: Job,
    ) -> None:
        self.first = first
        self.receive = receive
        self.job = job


class Continuation:
    """A stream resumed after an interruption (see `Router._continuation`): its start,
    who serves it, and whether it continues a prefill (new text only) or replays the
    request (the answer must begin with the text already sent)."""

    __slots__ = ("key_id", "model", "prefill", "provider", "start", "upstream_model")

    def __init__(
        self,
        start: StreamStart,
        model: str,
        provider: str,
        key_id: str,
        upstream_model: str,
        prefill: bool,
    ) -> None:
        self.start = start
        self.model = model
        self.provider = provider
        self.key_id = key_id
        self.upstream_model = upstream_model
        self.prefill = prefill


class Segment:
    """One upstream answer a stream relayed: who served it and how many characters of
    the text came from it (a continued stream has several)."""

    __slots__ = ("chars", "key_id", "mode", "model", "provider", "upstream")

    def __init__(
        self, model: str, provider: str, key_id: str, mode: str, upstream: str = ""
    ) -> None:
        self.model = model
        self.provider = provider
        self.key_id = key_id
        self.mode = mode
        """"first", "prefill" (continued after a prefill) or "replay"."""
        self.upstream = upstream
        """The upstream model id that served it (prices it)."""
        self.chars = 0

    def __repr__(self) -> str:
        return f"Segment({self.mode} {self.model} {self.key_id}: {self.chars} chars)"


Continuer = Callable[[str], Awaitable[Continuation | None]]
Meter = Callable[[Segment, Usage], float | None]
"""Prices one segment's final usage and counts it (the router's ledger): its cost or None."""


class ChatStream:
    """An answer arriving in chunks. Iterate it with ``async for chunk in stream``.

    `model`, `provider`, `key_id` and `attempts` say who serves it (the attempts
    before it include any failover that happened before the first chunk). `text`,
    `finish_reason` and `usage` accumulate as chunks arrive.

    When the upstream breaks after text reached the caller, the stream is continued
    (at most `max_continuations` times, within the request's deadline) on another key
    or model: with the text so far as an assistant prefill where the model takes one
    (only the new text is relayed), else by a replay of the request that is accepted
    only if it begins with exactly the text already sent. The caller sees one answer;
    `segments` says who served which part; `usage` sums them. A continuation that
    cannot start, diverges or fails never hides the interruption: the caller gets the
    original `StreamInterruptedError` with its partial text. Tool-call deltas cannot be
    continued.
    """

    def __init__(
        self,
        start: StreamStart,
        *,
        model: str,
        provider: str,
        key_id: str,
        upstream_model: str,
        dropped_params: list[str] | None = None,
        continuer: Continuer | None = None,
        max_continuations: int = 0,
        meter: Meter | None = None,
    ) -> None:
        self.model = model
        self.dropped_params = list(dropped_params or [])
        """Request fields dropped for the serving model (see `router._params`), and any
        its protocol had to leave out (`WireRequest.dropped`)."""
        for chunk in start.first:
            fields = chunk.provider_fields
            if fields and "dropped_params" in fields:
                self.dropped_params.extend(fields["dropped_params"])
        self.provider = provider
        self.key_id = key_id
        self.upstream_model = upstream_model
        self.attempts: list[Attempt] = start.job.attempts
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.segments: list[Segment] = [Segment(model, provider, key_id, "first", upstream_model)]
        self._meter = meter
        self._segment_usage: Usage | None = None
        """The current segment's usage, until it is priced (when the segment ends)."""
        self._cost: float | None = None
        self._unpriced = False
        self.error: StreamInterruptedError | None = None
        """The interruption the stream ended with, once raised (a caller that caught it
        and the trace of the request both read it here)."""
        self._text: list[str] = []
        """The text so far, in pieces (`text` joins them when read)."""
        self._pending = start.first
        self._at = 0
        """The next chunk of `_pending` to hand out."""
        self._receive = start.receive
        self._job = start.job
        self._ended = False
        self._continuer = continuer
        self._continuations_left = max_continuations
        self._tool_calls = False
        self._skip = ""
        """A replay's text still to match against what was already sent."""
        self._usage_before: Usage | None = None
        """The usage of the segments before this one."""
        self._cause: RouterError | None = None
        """The interruption a continuation is answering (raised if it fails)."""
        self._trim = ""
        """Whitespace the text so far ends with, left out of a prefill: a continuation
        that starts with it again does not repeat it."""

    @property
    def cost_usd(self) -> float | None:
        """What the answer cost in USD once the stream has ended (the sum over its
        segments); None before that, or when a segment's model has no price."""
        return None if self._unpriced or not self._ended else self._cost

    def _settle(self) -> None:
        """The current segment is over: price its usage (once) and count it."""
        usage = self._segment_usage
        if usage is None or self._meter is None:
            return
        self._segment_usage = None
        cost = self._meter(self.segments[-1], usage)
        if cost is None:
            self._unpriced = True
        else:
            self._cost = cost + (self._cost or 0.0)

    def __repr__(self) -> str:
        return (
            f"<ChatStream model={self.model!r} provider={self.provider!r} "
            f"key_id={self.key_id!r} received={len(self.text)} chars>"
        )

    @property
    def text(self) -> str:
        """The text received so far."""
        parts = self._text
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> StreamChunk:
        while True:
            pending = self._pending
            at = self._at
            if at < len(pending):
                self._at = at + 1
                chunk = self._match(pending[at]) if self._skip or self._trim else pending[at]
                if chunk is not None:
                    return self._take(chunk)
                continue
            # The next batch (`_refill`, inlined for the common case: one frame fewer
            # parked per stream and per event).
            if self._ended:
                raise StopAsyncIteration
            try:
                item = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                await self._channel_ended()
                continue
            if type(item) is list:
                self._pending = item
                self._at = 0
            else:
                await self._arrived(item)

    def batches(self) -> AsyncIterator[list[StreamChunk]]:
        """The same chunks, as they arrived together: each batch holds the chunks one
        upstream read produced (never empty), so a relay can write them at once::

            async for batch in stream.batches():
                out.write(b"".join(render(chunk) for chunk in batch))

        Iterating the stream and its batches can be mixed; each chunk is handed out
        once. Failures, continuations and the end behave as for ``async for chunk``."""
        return _Batches(self)

    async def _next_batch(self) -> list[StreamChunk]:
        while True:
            pending = self._pending
            at = self._at
            if at < len(pending):
                self._at = len(pending)
                if at == 0 and not self._skip and not self._trim:
                    out = pending  # the common case: the batch as it came
                    for chunk in out:
                        self._take(chunk)
                    return out
                out = []
                for chunk in pending[at:]:
                    matched = self._match(chunk)
                    if matched is not None:
                        out.append(self._take(matched))
                if out:
                    return out
                continue
            await self._refill()

    async def _refill(self) -> None:
        """The next batch into `_pending`, or the end (raises StopAsyncIteration), or
        the interruption (continued, or raised)."""
        if self._ended:
            raise StopAsyncIteration
        try:
            item = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            await self._channel_ended()
            return
        await self._arrived(item)

    async def _channel_ended(self) -> None:
        """The source ended without an end item: the worker let go first."""
        failure = self._job.failure  # a failure the full channel had no room for
        cause: RouterError = (
            failure
            if failure is not None
            else RouterClosedError("the stream was closed before it finished")
        )
        await self._interrupted(cause)

    async def _arrived(self, item: StreamItem) -> None:
        """A batch (into `_pending`), the end (raises StopAsyncIteration) or a failure
        (continued, or raised)."""
        if type(item) is list:
            self._pending = item
            self._at = 0
            return
        if isinstance(item, StreamFailure):
            await self._interrupted(item.error)
            return
        if self._skip:  # a replay that ended before it caught up: not the answer
            self._diverged()
        self._ended = True
        self._settle()
        raise StopAsyncIteration

    async def _interrupted(self, cause: RouterError) -> None:
        """The upstream broke: continue elsewhere if allowed, else raise the original
        interruption (a failed continuation never replaces it)."""
        if self._skip and self._cause is not None:
            cause = self._cause  # a replay that broke before catching up: the original
        if (
            self._continuer is None
            or self._continuations_left <= 0
            or self._tool_calls
            or not self.text
            or not isinstance(cause, ProviderError)
        ):
            raise self._interruption(cause)
        self._continuations_left -= 1
        self._stop_pump()
        self._settle()
        resumed = await self._continuer(self.text)
        if resumed is None:
            raise self._interruption(cause)
        self._cause = cause
        if self.usage is not None:
            self._usage_before = self.usage
        start = resumed.start
        self._receive = start.receive
        self._job = start.job
        self._pending = start.first
        self._at = 0
        self._skip = "" if resumed.prefill else self.text
        self._trim = self.text[len(self.text.rstrip()) :] if resumed.prefill else ""
        mode = "prefill" if resumed.prefill else "replay"
        self.segments.append(
            Segment(resumed.model, resumed.provider, resumed.key_id, mode, resumed.upstream_model)
        )
        self.attempts.extend(a for a in start.job.attempts if a not in self.attempts)

    def _match(self, chunk: StreamChunk) -> StreamChunk | None:
        """A replay's chunks must repeat the text already sent before anything new is
        relayed; the first difference abandons the replay (the original interruption
        stands). Returns what is left to relay of `chunk`, if anything."""
        skip = self._skip
        if not skip:
            trim = self._trim
            if trim and chunk.text:
                self._trim = ""
                if chunk.text.startswith(trim):
                    return msgspec.structs.replace(chunk, text=chunk.text[len(trim) :])
            return chunk
        if chunk.tool_calls:
            self._diverged()
        text = chunk.text
        if len(text) <= len(skip):
            if not skip.startswith(text):
                self._diverged()
            self._skip = skip[len(text) :]
            if chunk.finish_reason or chunk.usage is not None:
                return msgspec.structs.replace(chunk, text="") if not self._skip else None
            return None
        if not text.startswith(skip):
            self._diverged()
        self._skip = ""
        return msgspec.structs.replace(chunk, text=text[len(skip) :])

    def _diverged(self) -> NoReturn:
        self._stop_pump()
        raise self._interruption(
            self._cause or RouterClosedError("the replay did not repeat the answer")
        )

    def _interruption(self, cause: RouterError) -> StreamInterruptedError:
        self._ended = True
        self._settle()
        self.error = StreamInterruptedError(cause, self.text, self.attempts)
        return self.error

    def _stop_pump(self) -> None:
        pump = self._job.scope
        if pump is not None:
            pump.cancel()
        self._receive.close()

    def _take(self, chunk: StreamChunk) -> StreamChunk:
        text = chunk.text
        if text:
            self._text.append(text)
            self.segments[-1].chars += len(text)
        if chunk.tool_calls:
            self._tool_calls = True
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self._segment_usage = chunk.usage
            before = self._usage_before
            self.usage = chunk.usage if before is None else _sum_usage(before, chunk.usage)
        return chunk

    async def aclose(self) -> None:
        """Stop reading: the worker stops pumping and closes the upstream connection."""
        self._ended = True
        self._stop_pump()
        self._settle()  # usage reported before the caller stopped reading still counts
        await trio.lowlevel.checkpoint()


class _Batches:
    """`ChatStream.batches()`: the stream's chunks a batch at a time."""

    __slots__ = ("_stream",)

    def __init__(self, stream: ChatStream) -> None:
        self._stream = stream

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> list[StreamChunk]:
        return await self._stream._next_batch()


def _sum_usage(a: Usage, b: Usage) -> Usage:
    return Usage(
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        completion_tokens=a.completion_tokens + b.completion_tokens,
        total_tokens=a.total_tokens + b.total_tokens,
        cached_tokens=a.cached_tokens + b.cached_tokens,
        cache_creation_tokens=a.cache_creation_tokens + b.cache_creation_tokens,
        reasoning_tokens=a.reasoning_tokens + b.reasoning_tokens,
    )
