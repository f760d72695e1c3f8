"""The provider interface: how the router talks to one upstream API.

A provider turns a `ChatRequest` (whose `model` is already the upstream id) into a
`ChatResponse` for one key, or raises `ProviderError` with the failure classified.
It never retries, sleeps between attempts, or tracks health: the key actor that calls
it does all of that. It must be safe to call concurrently for the same key.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Final, Protocol, runtime_checkable

from ._types import ApiKey, ChatRequest, ChatResponse

__all__ = ["Provider"]

IN_KEY_ACTOR: Final[ContextVar[bool]] = ContextVar("router_in_key_actor", default=False)
"""True in a key actor's worker task, whose attempts the actor's own timer ends (at
`attempt_timeout`): a built-in provider called there adds no fallback timeout of its own
when no trio deadline is set (see `router._http`)."""


class ReadCut:
    """How to end a stream's pending body read from another task, without a cancel
    scope around every read (see `STREAM_CUT`)."""

    __slots__ = ("cut",)

    def __init__(self) -> None:
        self.cut: Callable[[], None] | None = None
        """Set by the transport once the response head is in: makes the reader's pending
        (or next parked) read fail with a read error, and the connection is discarded."""


STREAM_CUT: Final[ContextVar[ReadCut | None]] = ContextVar("router_stream_cut", default=None)
"""Set by the key actor while it opens a stream: a transport able to cut a pending read
of the response body from outside (`router._transport` can, for plain TCP and TLS)
fills the `ReadCut` in, and the stream's idle timeout then costs the reader no cancel
scope per read."""


@runtime_checkable
class Provider(Protocol):
    """Implement `complete` to plug an in-house model (or a fault injector) in.

    Register an instance by name with ``Router.open(config, providers={"name": p})``
    for a ``[[providers]]`` entry of ``kind = "custom"``. Raise
    ``ProviderError(kind, message, retry_after=None, status=None)`` for a failure:
    the kind decides what the router does (DESIGN.md's failure table). Any other
    exception is treated as an ``unknown`` failure. Never put `key.secret` into an
    error message.

    A provider may also define ``async def aclose(self) -> None``; the router calls
    it once when it closes, and ``async def embed(self, request: EmbeddingRequest,
    key: ApiKey) -> EmbeddingResponse`` to serve `Router.embed` (one vector per input,
    in order; failures raised as for `complete`). Without it, an embedding request
    sent to the provider fails as ``bad_request``.

    To stream, define ``async def stream(self, request, key)``, an async generator
    of `StreamChunk`; or ``stream_batches``, an async generator of ``list[StreamChunk]``
    whose every list holds the chunks that arrived together (one upstream read): the
    router relays each list as one batch, and the gateway writes it as one body
    message. Without either, a stream is the `complete` answer as one chunk.
    """

    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse: ...
