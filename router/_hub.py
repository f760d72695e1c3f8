"""One wakeup for many sockets: edge-triggered readiness for the transport's body reads.

A task that waits for its socket with `trio.lowlevel.wait_readable` costs trio two
``epoll_ctl`` calls per wait (trio registers one-shot, arms the descriptor before the
wait and disarms it after) and parks ten more fresh objects than a bare
`wait_task_rescheduled`: three coroutine frames, a closure with its cells, the
registration record. For a request that waits once that is nothing. A streamed answer
waits once per token: at 3,000 open streams of 10 tokens a second, that is 60,000
syscalls a second, and the parked objects are what CPython's collector walks again
and again (they live ~100 ms, long enough to be promoted, short enough to die old).

`ReadHub` keeps a private epoll set in which each watched socket is registered once,
edge-triggered, for as long as the connection lives. One system task per trio run
waits for that set's descriptor (one `wait_readable` for every socket in it), and
when it wakes it drains the ready list, marks each socket ready and reschedules the
task parked on it, if any. A reader therefore:

- reads straight away while its socket is marked ready, and marks it not ready when
  the read says the socket is drained (``EAGAIN``, or fewer bytes than asked for:
  whatever arrives after that raises a new edge);
- otherwise parks with `trio.lowlevel.wait_task_rescheduled` and a per-socket abort
  function made once, so a wait allocates no closure.

A wakeup serves every event that arrived in the meantime (about 10 per wakeup at
1,000 paced streams of `benchmarks/scaling.py`), and a socket costs two ``epoll_ctl``
calls in its whole life instead of two per event. Where there is no epoll (`HUB` is
False: not Linux), the transport's reads wait in trio as before.

Cutting a parked read from another task (a stream's idle timeout) and closing a
watched socket wake the reader with `trio.ClosedResourceError`, as
`trio.lowlevel.notify_closing` does for trio's own waits.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Callable
from typing import Final

import outcome
import trio

__all__ = ["HUB", "ReadHub", "Watch", "current_hub"]

HUB: Final = hasattr(select, "epoll")
"""Whether this platform has the epoll the hub needs (Linux)."""

_FLAGS: Final = (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET) if HUB else 0
_BATCH: Final = 1024


class Watch:
    """One socket in a hub: whether it may have bytes to read, and who waits for them."""

    __slots__ = ("abort", "fd", "hub", "reader", "ready")

    def __init__(self, hub: ReadHub, fd: int) -> None:
        self.hub = hub
        self.fd = fd
        self.ready = True
        """Maybe readable: the last read did not find the socket drained, or an edge
        came since. (Starts True: bytes may already be waiting.)"""
        self.reader: trio.lowlevel.Task | None = None
        """The task parked in `wait`, if any."""

        def abort(_: object) -> trio.lowlevel.Abort:
            self.reader = None
            return trio.lowlevel.Abort.SUCCEEDED

        self.abort: Final[Callable[[object], trio.lowlevel.Abort]] = abort

    async def wait(self) -> None:
        """Park until the socket may be readable (`ready`), or raise
        `trio.ClosedResourceError` when the watch is cut or closed meanwhile."""
        if self.reader is not None:
            raise trio.BusyResourceError("another task is already reading this socket")
        if self.hub.closed:
            raise trio.ClosedResourceError("the read hub has stopped (its trio run ended)")
        self.reader = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self.abort)

    def cut(self, why: str) -> bool:
        """Wake a parked reader with `trio.ClosedResourceError`; whether one was."""
        reader = self.reader
        if reader is None:
            return False
        self.reader = None
        trio.lowlevel.reschedule(reader, outcome.Error(trio.ClosedResourceError(why)))
        return True

    def close(self) -> None:
        """The socket is about to close: leave the hub (before the descriptor number
        can be reused) and wake a parked reader."""
        self.cut("the connection was closed")
        self.hub.forget(self)


class ReadHub:
    """A private edge-triggered epoll set and the system task that serves it."""

    __slots__ = ("_epoll", "_watched", "closed", "wakeups")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watched: dict[int, Watch] = {}
        self.closed = False
        self.wakeups = 0
        """How many times the hub woke (tests and benchmarks read it)."""

    def watch(self, fd: int) -> Watch:
        """Register socket `fd` (edge-triggered, until `Watch.close`)."""
        if self.closed:
            raise trio.ClosedResourceError("the read hub has stopped (its trio run ended)")
        watch = Watch(self, fd)
        stale = self._watched.pop(fd, None)
        if stale is not None:  # (a descriptor closed without its watch: it left epoll then)
            stale.cut("the connection was closed")
        try:
            self._epoll.register(fd, _FLAGS)
        except FileExistsError:
            self._epoll.modify(fd, _FLAGS)
        self._watched[fd] = watch
        return watch

    def forget(self, watch: Watch) -> None:
        if self._watched.get(watch.fd) is watch:
            del self._watched[watch.fd]
            if not self.closed:
                with contextlib.suppress(OSError):  # (closed already: the kernel dropped it)
                    self._epoll.unregister(watch.fd)

    async def run(self) -> None:
        epoll = self._epoll
        watched = self._watched
        reschedule = trio.lowlevel.reschedule
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                self.wakeups += 1
                while True:
                    events = epoll.poll(0, _BATCH)
                    for fd, _flags in events:
                        watch = watched.get(fd)
                        if watch is None:
                            continue
                        watch.ready = True
                        reader = watch.reader
                        if reader is not None:
                            watch.reader = None
                            reschedule(reader)
                    if len(events) < _BATCH:
                        break
        finally:
            self.closed = True
            for watch in list(watched.values()):
                watch.cut("the read hub has stopped (its trio run ended)")
            watched.clear()
            epoll.close()


_HUB: Final[trio.lowlevel.RunVar[ReadHub]] = trio.lowlevel.RunVar("router_read_hub")


def current_hub() -> ReadHub:
    """This trio run's hub, started on first use (a system task: it ends with the run)."""
    try:
        return _HUB.get()
    except LookupError:
        hub = ReadHub()
        trio.lowlevel.spawn_system_task(hub.run, name="router read hub")
        _HUB.set(hub)
        return hub
