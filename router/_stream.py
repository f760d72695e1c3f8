"""Streams as the caller sees them: `ChatStream`, fed by the key actor's worker.

The worker that served the first content chunk keeps pumping the upstream stream into
a small memory channel; the caller iterates `ChatStream`. The worker puts `STREAM_END`
into the channel after a whole answer, or a `StreamFailure` when the upstream broke;
a channel that ends with neither (the router closed) is an interruption too. So a cut
answer can never look whole: `ChatStream` raises `StreamInterruptedError` with the
text received so far.

Closing the `ChatStream` early (or cancelling its consumer) cancels the worker's pump,
which closes the upstream connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import trio

from ._errors import ProviderError, RouterClosedError, StreamInterruptedError
from ._types import Attempt, StreamChunk, Usage

if TYPE_CHECKING:
    from ._actor import Job

__all__ = ["STREAM_END", "ChatStream", "StreamFailure", "StreamStart"]


class _End:
    def __repr__(self) -> str:
        return "STREAM_END"


STREAM_END: Final = _End()


class StreamFailure:
    """Put in the channel by the worker when the upstream stream broke."""

    __slots__ = ("error",)

    def __init__(self, error: ProviderError) -> None:
        self.error = error


StreamItem = StreamChunk | StreamFailure | _End


class StreamStart:
    """A job's result when a stream has produced its first content: the chunks so far
    and the channel the rest will come through."""

    __slots__ = ("first", "job", "receive")

    def __init__(
        self,
        first: list[StreamChunk],
        receive: trio.MemoryReceiveChannel[StreamItem],
        job: Job,
    ) -> None:
        self.first = first
        self.receive = receive
        self.job = job


class ChatStream:
    """An answer arriving in chunks. Iterate it with ``async for chunk in stream``.

    `model`, `provider`, `key_id` and `attempts` say who serves it (the attempts
    before it include any failover that happened before the first chunk). `text`,
    `finish_reason` and `usage` accumulate as chunks arrive.
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
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self._pending = list(start.first)
        self._receive = start.receive
        self._job = start.job
        self._ended = False

    def __repr__(self) -> str:
        return (
            f"<ChatStream model={self.model!r} provider={self.provider!r} "
            f"key_id={self.key_id!r} received={len(self.text)} chars>"
        )

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._pending:
            return self._take(self._pending.pop(0))
        if self._ended:
            raise StopAsyncIteration
        try:
            item = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._ended = True
            failure = self._job.failure  # a failure the full channel had no room for
            raise StreamInterruptedError(
                failure
                if failure is not None
                else RouterClosedError("the stream was closed before it finished"),
                self.text,
                self.attempts,
            ) from None
        if isinstance(item, StreamChunk):
            return self._take(item)
        self._ended = True
        if isinstance(item, StreamFailure):
            raise StreamInterruptedError(item.error, self.text, self.attempts)
        raise StopAsyncIteration

    def _take(self, chunk: StreamChunk) -> StreamChunk:
        if chunk.text:
            self.text += chunk.text
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage
        return chunk

    async def aclose(self) -> None:
        """Stop reading: the worker stops pumping and closes the upstream connection."""
        self._ended = True
        pump = self._job.scope
        if pump is not None:
            pump.cancel()
        self._receive.close()
        await trio.lowlevel.checkpoint()
