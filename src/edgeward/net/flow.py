"""One direction of a relayed connection: bytes from `src` to `dst`.

Two implementations with the same surface:
- SpliceFlow: socket → pooled pipe → socket with splice(); bytes never enter Python.
- BufferedFlow: recv_into a fixed buffer, send; for systems without splice.

Backpressure: when `dst` cannot take more, the flow stops reading `src` and
waits for `dst` to become writable, so at most one pipe (or one buffer) of data
is held per direction, whatever the peers do.

Half-close: when `src` sends FIN, the flow finishes writing what it holds, then
shuts down `dst` for writing; the other direction keeps flowing until it ends
too. The owning connection is told through `on_done` / `on_error` (with the socket that
failed, so it can tell an upstream reset from a client's).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from .pipes import SPLICE_FLAGS, PipePool

# How many read/write rounds one readiness event may run before yielding to other
# connections; level-triggered polling brings us back if more is waiting.
ROUNDS = 8
BUF_SIZE = 64 * 1024


class Flow:
    __slots__ = ("dfd", "dst", "eof", "loop", "nbytes", "on_activity", "on_done", "on_error",
                 "pending", "sfd", "src", "stopped")

    def __init__(self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket,
                 on_done: Callable[[], None], on_error: Callable[[BaseException, socket.socket], None],
                 on_activity: Callable[[], None]) -> None:
        self.loop = loop
        self.src = src
        self.dst = dst
        self.sfd = src.fileno()
        self.dfd = dst.fileno()
        self.pending = 0
        self.nbytes = 0
        self.eof = False
        self.stopped = False
        self.on_done = on_done
        self.on_error = on_error
        self.on_activity = on_activity

    def start(self) -> None:
        self.loop.add_reader(self.sfd, self._readable)

    def stop(self) -> None:
        """Unregister from the loop (the connection closes the sockets)."""
        if not self.stopped:
            self.stopped = True
            self.loop.remove_reader(self.sfd)
            self.loop.remove_writer(self.dfd)
            self._release()

    def _release(self) -> None:
        pass

    def _finish(self) -> None:
        # src said FIN and everything is written: pass the FIN on.
        self.loop.remove_reader(self.sfd)
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other side may already be gone; the connection notices on its own
        self.on_done()

    def _readable(self) -> None:
        raise NotImplementedError

    def _writable(self) -> None:
        raise NotImplementedError

    def _blocked(self) -> None:
        # dst is full: stop reading src until dst drains (bounded memory per connection).
        self.loop.remove_reader(self.sfd)
        self.loop.add_writer(self.dfd, self._writable)

    def _unblocked(self) -> None:
        self.loop.remove_writer(self.dfd)
        if self.eof:
            self._finish()
        else:
            self.loop.add_reader(self.sfd, self._readable)


class SpliceFlow(Flow):
    __slots__ = ("pipe", "pipes")

    def __init__(self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket,
                 on_done: Callable[[], None], on_error: Callable[[BaseException, socket.socket], None],
                 on_activity: Callable[[], None], pipes: PipePool) -> None:
        super().__init__(loop, src, dst, on_done, on_error, on_activity)
        self.pipes = pipes
        self.pipe: tuple[int, int] | None = None

    def _release(self) -> None:
        if self.pipe is not None:
            if self.pending:
                self.pipes.discard(self.pipe)
            else:
                self.pipes.put(self.pipe)
            self.pipe = None

    def _readable(self) -> None:
        self.on_activity()
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = self.pipes.get()
        splice = os.splice
        sfd, dfd = self.sfd, self.dfd
        cap = self.pipes.capacity
        for _ in range(ROUNDS):
            try:
                n = splice(sfd, pipe[1], cap, flags=SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError as e:
                self.on_error(e, self.src)
                return
            if n == 0:
                self.eof = True
                break
            self.nbytes += n
            try:
                m = splice(pipe[0], dfd, n, flags=SPLICE_FLAGS)
            except BlockingIOError:
                m = 0
            except OSError as e:
                self.pending = n
                self.on_error(e, self.dst)
                return
            if m < n:
                self.pending = n - m
                self._blocked()
                return
            if n < cap:
                break  # a short read drained the socket: skip the call that would only say EAGAIN
        # Empty pipe: give it back so an idle connection holds none.
        self.pipes.put(pipe)
        self.pipe = None
        if self.eof:
            self._finish()

    def _writable(self) -> None:
        pipe = self.pipe
        assert pipe is not None
        try:
            m = os.splice(pipe[0], self.dfd, self.pending, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            self.on_error(e, self.dst)
            return
        self.on_activity()
        self.pending -= m
        if self.pending == 0:
            self.pipes.put(pipe)
            self.pipe = None
            self._unblocked()


class BufferedFlow(Flow):
    __slots__ = ("buf", "start_at", "view")

    def __init__(self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket,
                 on_done: Callable[[], None], on_error: Callable[[BaseException, socket.socket], None],
                 on_activity: Callable[[], None]) -> None:
        super().__init__(loop, src, dst, on_done, on_error, on_activity)
        self.buf: bytearray | None = None
        self.view: memoryview | None = None
        self.start_at = 0

    def _release(self) -> None:
        if self.view is not None:
            self.view.release()
        self.view = None
        self.buf = None

    def _readable(self) -> None:
        self.on_activity()
        if self.buf is None:
            self.buf = bytearray(BUF_SIZE)
            self.view = memoryview(self.buf)
        view = self.view
        assert view is not None
        for _ in range(ROUNDS):
            try:
                n = self.src.recv_into(view)
            except BlockingIOError:
                break
            except OSError as e:
                self.on_error(e, self.src)
                return
            if n == 0:
                self.eof = True
                break
            self.nbytes += n
            try:
                m = self.dst.send(view[:n])
            except BlockingIOError:
                m = 0
            except OSError as e:
                self.on_error(e, self.dst)
                return
            if m < n:
                self.start_at = m
                self.pending = n - m
                self._blocked()
                return
            if n < BUF_SIZE:
                break  # drained: skip the call that would only say EAGAIN
        # Drop the buffer while idle: idle connections cost no 64 KiB each.
        self._release()
        if self.eof:
            self._finish()

    def _writable(self) -> None:
        view = self.view
        assert view is not None
        try:
            m = self.dst.send(view[self.start_at : self.start_at + self.pending])
        except BlockingIOError:
            return
        except OSError as e:
            self.on_error(e, self.dst)
            return
        self.on_activity()
        self.pending -= m
        self.start_at += m
        if self.pending == 0:
            self.start_at = 0
            self._unblocked()
