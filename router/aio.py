"""The router for asyncio callers: the real trio `Router`, run in trio's guest mode on
the caller's asyncio loop (same thread, no worker thread, no second event loop).

    async with AsyncioRouter.open(config) as router:
        response = await router.submit(request)
        async with router.stream(request) as stream:
            async for chunk in stream:
                print(chunk.text, end="")

How the two schedulers meet. `AsyncioRouter.open` starts a guest run of trio
(`trio.lowlevel.start_guest_run`) whose host callbacks are the asyncio loop's
`call_soon_threadsafe` / `call_soon`; the trio side opens `Router.open(...)` and a
nursery for requests. A call from asyncio is a small job: the caller creates an
`asyncio.Future` and appends a callable to a queue; the first job of a batch asks trio
to drain the queue (one `TrioToken.run_sync_soon` per batch, so a thousand callers
arriving together cost one wake-up of trio, not a thousand). The drain runs inside
trio and starts one trio task per job; that task runs `router.submit` (or serves a
stream) and completes the Future with a direct `set_result` / `set_exception`: both
schedulers run on the one thread, so no `call_soon_threadsafe` is needed on the way
back.

Cancellation both ways. An asyncio task cancelled while it waits cancels its job's
trio `CancelScope`: the trio request sees an ordinary cancellation (the router never
counts a caller's cancellation against a key) and the caller gets `CancelledError`.
Any error of the trio side reaches the asyncio caller as the same exception object
(a `RouterError` subclass). A request still in flight when the router closes gets
`RouterClosedError`. Leaving `AsyncioRouter.open` cancels the trio run, waits for
the guest run to complete (actors stopped, providers closed) and re-raises any error
of the trio run.

Every method must be called from the thread that runs the asyncio loop (as with any
asyncio object). `snapshot()`, `reset()` and `callable_keys()` are synchronous: trio
allows sync trio calls from the host loop during a guest run.

What this module must never do: leave the guest run running after `open` exits, or
let a job end without completing its Future (exactly one response or one error).
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import outcome
import trio

from ._config import RouterConfig
from ._errors import RouterClosedError
from ._provider import Provider
from ._router import ReloadResult, Router, RouterSnapshot
from ._stream import ChatStream, Segment
from ._types import Attempt, ChatRequest, ChatResponse, StreamChunk, Usage
from ._usage import UsageSnapshot

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import TracerProvider

__all__ = ["AsyncioChatStream", "AsyncioRouter"]

T = TypeVar("T")

_CLOSED_IN_FLIGHT = "the router closed while the request was in flight"


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class AsyncioRouter:
    """The trio `Router` for asyncio code. Make one with `AsyncioRouter.open(...)`;
    see the module docstring. `router` is the trio `Router` itself (use its
    attributes only from this thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: collections.deque[tuple[Callable[[], object], asyncio.Future[Any] | None]] = (
            collections.deque()
        )
        self._wakeup_pending = False
        self._closing = False
        self._run_scope = trio.CancelScope()
        self._token: trio.lowlevel.TrioToken | None = None
        self._router: Router | None = None
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"<AsyncioRouter {self._router!r}>"

    @property
    def router(self) -> Router:
        if self._router is None:
            raise RouterClosedError()
        return self._router

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: Any,
        providers: Mapping[str, Provider] | None = None,
        *,
        tracer_provider: TracerProvider | None = None,
    ) -> AsyncIterator[AsyncioRouter]:
        """Start trio in guest mode on the running asyncio loop and open `Router.open(config,
        providers, tracer_provider=...)` in it; leaving the block stops it and waits for
        the run to end."""
        loop = asyncio.get_running_loop()
        self = cls(loop)
        opened: asyncio.Future[None] = loop.create_future()
        finished: asyncio.Future[outcome.Outcome[None]] = loop.create_future()

        def done_callback(result: outcome.Outcome[None]) -> None:
            self._closing = True
            self._router = self._nursery = None
            while self._queue:  # posted, never run: the run ended first
                _, future = self._queue.popleft()
                if future is not None:
                    _fail(future, RouterClosedError(_CLOSED_IN_FLIGHT))
            if not finished.done():
                finished.set_result(result)

        trio.lowlevel.start_guest_run(
            self._main,
            config,
            providers,
            tracer_provider,
            opened,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=loop.call_soon,
            done_callback=done_callback,
            host_uses_signal_set_wakeup_fd=True,
        )
        self._token = trio.lowlevel.current_trio_token()
        body_error = False
        try:
            either: list[asyncio.Future[Any]] = [opened, finished]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if opened.done():
                try:
                    yield self
                except BaseException:
                    body_error = True
                    raise
        finally:
            cancelled = await self._shutdown(finished)
            result = finished.result()
            if not body_error:
                result.unwrap()  # an error of the trio run (or of Router.open) surfaces here
                if cancelled:
                    raise asyncio.CancelledError()

    async def _main(
        self,
        config: Any,
        providers: Mapping[str, Provider] | None,
        tracer_provider: TracerProvider | None,
        opened: asyncio.Future[None],
    ) -> None:
        with self._run_scope:
            opening = Router.open(config, providers, tracer_provider=tracer_provider)
            async with opening as router, trio.open_nursery() as nursery:
                self._router = router
                self._nursery = nursery
                if not opened.done():
                    opened.set_result(None)
                await trio.sleep_forever()

    async def _shutdown(self, finished: asyncio.Future[outcome.Outcome[None]]) -> bool:
        """Cancel the trio run and wait for it to finish, even if this task is cancelled
        meanwhile (returns whether it was)."""
        self._closing = True
        if not finished.done():
            self._post(self._run_scope.cancel)
        cancelled = False
        while not finished.done():
            try:
                await asyncio.shield(finished)
            except asyncio.CancelledError:
                cancelled = True
        self._router = None
        self._nursery = None
        return cancelled

    # -- the hand-off -----------------------------------------------------------------------

    def _post(self, fn: Callable[[], object], future: asyncio.Future[Any] | None = None) -> None:
        """Run `fn` inside trio soon (if the run ends first, `future` fails instead).
        One `run_sync_soon` wakes trio per batch."""
        self._queue.append((fn, future))
        if not self._wakeup_pending:
            assert self._token is not None
            self._wakeup_pending = True
            try:
                self._token.run_sync_soon(self._drain)
            except trio.RunFinishedError:
                self._queue.pop()
                if future is not None:
                    _fail(future, RouterClosedError())

    def _drain(self) -> None:
        # Runs in trio (its run_sync_soon task); every posted callable is exception-safe.
        self._wakeup_pending = False
        queue = self._queue
        while queue:
            fn, future = queue.popleft()
            try:
                fn()
            except Exception as exc:  # a nursery closing under a late start
                if future is None:
                    raise
                _fail(future, exc)

    def _start(
        self, future: asyncio.Future[Any], fn: Callable[..., Awaitable[object]], *args: object
    ) -> None:
        """Post the start of a trio task in the request nursery."""
        nursery = self._nursery
        if self._closing or nursery is None:
            raise RouterClosedError()
        self._post(lambda: nursery.start_soon(fn, *args), future)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await `fn()` in trio from asyncio: the result, the same error, or (cancelled
        here) the trio side cancelled too."""
        future: asyncio.Future[T] = self._loop.create_future()
        scope = trio.CancelScope()
        self._start(future, _job, fn, future, scope)
        try:
            return await future
        except asyncio.CancelledError:
            if future.cancelled() and not self._closing:
                self._post(scope.cancel)
            raise

    # -- the request path -------------------------------------------------------------------

    async def submit(self, request: ChatRequest) -> ChatResponse:
        """`Router.submit` from asyncio: the response, or the same `RouterError`."""
        router = self.router
        tracing = router._tracing
        if tracing is not None:  # the caller's span (asyncio's context) is the parent
            parent = tracing.current()
            return await self._call(lambda: tracing.under(parent, router.submit(request)))
        return await self._call(lambda: router.submit(request))

    @asynccontextmanager
    async def stream(self, request: ChatRequest) -> AsyncIterator[AsyncioChatStream]:
        """`Router.stream` from asyncio; leaving the block closes the upstream stream."""
        loop = self._loop
        opened: asyncio.Future[ChatStream] = loop.create_future()
        ended: asyncio.Future[None] = loop.create_future()
        send, receive = trio.open_memory_channel[asyncio.Future[StreamChunk | None]](math.inf)
        scope = trio.CancelScope()
        tracing = self.router._tracing
        parent = tracing.current() if tracing is not None else None
        self._start(opened, self._serve_stream, request, opened, ended, receive, scope, parent)
        try:
            inner = await opened
        except asyncio.CancelledError:
            if not self._closing:
                self._post(scope.cancel)
            raise
        stream = AsyncioChatStream(self, inner, send, scope, ended)
        try:
            yield stream
        finally:
            await stream.aclose()

    async def _serve_stream(
        self,
        request: ChatRequest,
        opened: asyncio.Future[ChatStream],
        ended: asyncio.Future[None],
        pulls: trio.MemoryReceiveChannel[asyncio.Future[StreamChunk | None]],
        scope: trio.CancelScope,
        parent: Context | None,
    ) -> None:
        """The trio task that owns one stream: opens it, then answers each pull with the
        next chunk (None at the end) until the asyncio side closes `pulls`."""
        pull: asyncio.Future[StreamChunk | None] | None = None
        tracing = self.router._tracing
        if tracing is not None and parent is not None:
            tracing.attach(parent)  # this task's own context: it ends with the task
        try:
            with scope:
                async with self.router.stream(request) as stream:
                    if opened.done():  # the asyncio caller gave up meanwhile
                        return
                    opened.set_result(stream)
                    async for pull in pulls:
                        try:
                            chunk: StreamChunk | None = await stream.__anext__()
                        except StopAsyncIteration:
                            chunk = None
                        except Exception as exc:
                            _fail(pull, exc)
                            continue
                        if not pull.done():
                            pull.set_result(chunk)
                    pull = None
        except Exception as exc:
            _fail(opened, exc)
        finally:
            closed = RouterClosedError(_CLOSED_IN_FLIGHT)
            _fail(opened, closed)
            if pull is not None:
                _fail(pull, closed)
            while True:
                try:
                    _fail(pulls.receive_nowait(), closed)
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            pulls.close()
            if not ended.done():
                ended.set_result(None)

    async def reload(
        self, config: RouterConfig, providers: Mapping[str, Provider] | None = None
    ) -> ReloadResult:
        """`Router.reload` from asyncio: what changed, or the same `ConfigError` (and
        nothing changed)."""
        router = self.router
        return await self._call(lambda: router.reload(config, providers))

    # -- state ----------------------------------------------------------------------------

    def snapshot(self) -> RouterSnapshot:
        """`Router.snapshot()`: every key's state and every model's health."""
        return self.router.snapshot()

    def reset(
        self,
        *,
        provider: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        upstream: str | None = None,
    ) -> None:
        """`Router.reset(...)`: clear state an operator knows to be stale."""
        self.router.reset(provider=provider, key_id=key_id, model=model, upstream=upstream)

    def callable_keys(self) -> int:
        """`Router.callable_keys()`."""
        return self.router.callable_keys()

    def usage(self) -> UsageSnapshot:
        """`Router.usage()`: tokens and cost per model, provider, key and tenant."""
        return self.router.usage()


async def _job(
    fn: Callable[[], Awaitable[T]], future: asyncio.Future[T], scope: trio.CancelScope
) -> None:
    """The trio task of one call: completes `future` exactly once."""
    try:
        with scope:
            result = await fn()
            if not future.done():
                future.set_result(result)
    except Exception as exc:
        _fail(future, exc)
    finally:
        _fail(future, RouterClosedError(_CLOSED_IN_FLIGHT))


class AsyncioChatStream:
    """A `ChatStream` for asyncio code: iterate it with ``async for chunk in stream``.
    Its attributes are those of the trio `ChatStream` it relays (`text`, `usage`, ... as
    of the chunks received so far); `stream` is that `ChatStream`."""

    def __init__(
        self,
        owner: AsyncioRouter,
        stream: ChatStream,
        pulls: trio.MemorySendChannel[asyncio.Future[StreamChunk | None]],
        scope: trio.CancelScope,
        ended: asyncio.Future[None],
    ) -> None:
        self.stream = stream
        self._owner = owner
        self._pulls = pulls
        self._scope = scope
        self._ended = ended
        self._done = False

    def __repr__(self) -> str:
        return f"<AsyncioChatStream {self.stream!r}>"

    def __aiter__(self) -> AsyncioChatStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._done:
            raise StopAsyncIteration
        if self._ended.done() or self._owner._closing:
            self._done = True
            raise RouterClosedError("the stream was closed before it finished")
        future: asyncio.Future[StreamChunk | None] = self._owner._loop.create_future()
        pulls = self._pulls

        def pull() -> None:
            try:
                pulls.send_nowait(future)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                _fail(future, RouterClosedError("the stream was closed before it finished"))

        self._owner._post(pull, future)
        try:
            chunk = await future
        except asyncio.CancelledError:
            self._done = True
            if not self._owner._closing:
                self._owner._post(self._scope.cancel)
            raise
        except BaseException:
            self._done = True
            raise
        if chunk is None:
            self._done = True
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        """Stop reading: the trio side closes the stream (and the upstream connection);
        returns once it has."""
        self._done = True
        if not self._ended.done() and not self._owner._closing:
            self._owner._post(self._pulls.close)
        try:
            await asyncio.shield(self._ended)
        except asyncio.CancelledError:
            if not self._owner._closing:
                self._owner._post(self._scope.cancel)
            raise

    # The trio ChatStream's state, read on this (the same) thread.

    @property
    def model(self) -> str:
        return self.stream.model

    @property
    def provider(self) -> str:
        return self.stream.provider

    @property
    def key_id(self) -> str:
        return self.stream.key_id

    @property
    def upstream_model(self) -> str:
        return self.stream.upstream_model

    @property
    def attempts(self) -> list[Attempt]:
        return self.stream.attempts

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def finish_reason(self) -> str | None:
        return self.stream.finish_reason

    @property
    def usage(self) -> Usage | None:
        return self.stream.usage

    @property
    def cost_usd(self) -> float | None:
        return self.stream.cost_usd

    @property
    def segments(self) -> list[Segment]:
        return self.stream.segments

    @property
    def dropped_params(self) -> list[str]:
        return self.stream.dropped_params
