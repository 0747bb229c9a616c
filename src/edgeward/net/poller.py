"""The data plane's own epoll: connection sockets registered once, watched through one reader.

asyncio's add_reader/remove_reader (uvloop: a libuv poll handle per descriptor) costs an
epoll_ctl, a handle object and a callback object each time a connection starts or stops
watching a socket, and a connection used to do that a dozen times (sniff, connect, relay,
backpressure, half-close), several of the removals failing with ENOENT. Here each socket is
added to an epoll of the data plane's own (EPOLL_CTL_ADD) when it is first watched, its
interest changed with EPOLL_CTL_MOD only when what it waits for changes, and never removed:
close() takes it out of the epoll set. The event loop watches that epoll's descriptor with a
single add_reader, and `_poll` hands each ready descriptor's events to its handler.

Level-triggered, like add_reader: a handler that stops before EAGAIN (a bounded batch) is
called again on the next round, and a short read is proof enough that a socket is drained.

Two rules keep a descriptor number from reaching the wrong handler:
- While a batch of events is dispatched, sockets are not closed but queued (`close`) and
  closed once the batch is done, so a number that appears later in the same batch cannot
  belong to a socket created meanwhile (the kernel cannot reuse an open number).
- A socket whose open file another process may hold (one sent with SCM_RIGHTS, one handed
  to another owner) stays in the epoll set after close(): it is removed explicitly (`remove`).
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable
from typing import Protocol, TypeVar

_T = TypeVar("_T")

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # only the build needs it (mypyc reads it); without it, nothing to do
    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[_T], _T]:  # type: ignore[misc]
        return lambda cls: cls

IN: int = select.EPOLLIN
OUT: int = select.EPOLLOUT
ERR: int = select.EPOLLERR | select.EPOLLHUP

# Events handed out per round; more stay ready (level-triggered) for the next round.
MAX_EVENTS = 256


class Closable(Protocol):
    def fileno(self) -> int: ...
    def close(self) -> None: ...


@mypyc_attr(allow_interpreted_subclasses=True)
class Handler:
    """What receives a descriptor's events (a connection, a lingering close). A base class rather
    than a protocol: compiled, the poller then calls `on_event` directly, not by name."""

    __slots__ = ()

    def on_event(self, fd: int, events: int) -> None:
        raise NotImplementedError

    def on_deadline(self) -> None:
        """Its deadline (`Deadlines.add`) passed."""


class Deadlines:
    """Deadlines of many handlers (connects), in 0.1 s buckets: one event-loop timer per bucket
    in use instead of one per handler, and adding or dropping one is a set operation. A deadline
    fires up to 0.1 s late."""

    __slots__ = ("buckets", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buckets: dict[int, set[Handler]] = {}

    def add(self, handler: Handler, at: float) -> int:
        """`handler.on_deadline()` at `at` (the loop's clock) unless dropped; returns its key."""
        key = int(at * 10.0) + 1
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = set()
            self.loop.call_at(key / 10.0, self._fire, key)
        bucket.add(handler)
        return key

    def drop(self, handler: Handler, key: int) -> None:
        bucket = self.buckets.get(key)
        if bucket is not None:
            bucket.discard(handler)

    def _fire(self, key: int) -> None:
        bucket = self.buckets.pop(key, None)
        if bucket:
            for h in list(bucket):
                h.on_deadline()


class Poller:
    __slots__ = ("dispatching", "doomed", "ep", "fd", "handlers", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ep = select.epoll()
        self.fd = self.ep.fileno()
        self.handlers: dict[int, Handler] = {}
        self.dispatching = False
        self.doomed: list[Closable] = []
        loop.add_reader(self.fd, self._poll)

    def add(self, fd: int, mask: int, handler: Handler) -> None:
        """Watch `fd` for `mask` (IN, OUT), its events going to `handler`."""
        self.ep.register(fd, mask)
        self.handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self.ep.modify(fd, mask)

    def remove(self, fd: int) -> None:
        """Stop watching `fd` now (for a socket that another owner, or process, may keep open)."""
        if self.handlers.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except OSError:
                pass

    def close(self, sock: Closable) -> None:
        """Close `sock`: it leaves the epoll set with its last descriptor (see the module doc)."""
        fd = sock.fileno()
        if fd < 0:
            return
        self.handlers.pop(fd, None)
        if self.dispatching:
            self.doomed.append(sock)
        else:
            sock.close()

    def _poll(self) -> None:
        handlers = self.handlers
        self.dispatching = True
        try:
            for fd, events in self.ep.poll(0, MAX_EVENTS):
                h = handlers.get(fd)
                if h is not None:
                    h.on_event(fd, events)
        finally:
            self.dispatching = False
            doomed = self.doomed
            if doomed:
                for s in doomed:
                    s.close()
                doomed.clear()

    def shutdown(self) -> None:
        self.loop.remove_reader(self.fd)
        self.handlers.clear()
        self.ep.close()
