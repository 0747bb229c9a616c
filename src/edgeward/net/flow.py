"""One direction of a relayed connection: bytes from `src` to `dst`.

Two implementations with the same surface:
- SpliceFlow: socket → pooled pipe → socket with splice(); bytes never enter Python.
- BufferedFlow: recv_into a fixed buffer, send; for systems without splice.

The owning connection (`Relay`: net/tcp.py's TcpConn) watches both sockets on the data
plane's epoll (net/poller.py) and calls `readable` / `writable`; it derives what each socket
waits for from the two flows (`wants_read`, `pending`), and a flow asks it to look again
(`rearm`) when that changes.

Backpressure: when `dst` cannot take more, the flow stops reading `src` and
waits for `dst` to become writable, so at most one pipe (or one buffer) of data
is held per direction, whatever the peers do.

Half-close: when `src` sends FIN, the flow finishes writing what it holds, then
shuts down `dst` for writing; the other direction keeps flowing until it ends
too. The owning connection is told through `flow_done` / `flow_error` (with the socket that
failed, so it can tell an upstream reset from a client's).
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Protocol

from .pipes import SPLICE_FLAGS, PipePool

if TYPE_CHECKING:
    from _socket import socket as RawSocket

# How many read/write rounds one readiness event may run before yielding to other
# connections; level-triggered polling brings us back if more is waiting.
ROUNDS = 8
BUF_SIZE = 64 * 1024


class Relay(Protocol):
    """What a flow needs of the connection that owns it."""

    last: float

    def rearm(self) -> None: ...
    def flow_done(self) -> None: ...
    def flow_error(self, exc: OSError, sock: RawSocket) -> None: ...


class _Clock(Protocol):
    now: float


class Flow:
    __slots__ = ("clock", "dfd", "dst", "eof", "nbytes", "other", "owner", "pending", "sfd", "src", "stopped")

    other: Flow

    def __init__(self, owner: Relay, clock: _Clock, src: RawSocket, dst: RawSocket) -> None:
        self.owner = owner
        self.clock = clock
        self.src = src
        self.dst = dst
        self.sfd = src.fileno()
        self.dfd = dst.fileno()
        self.pending = 0
        self.nbytes = 0
        self.eof = False
        self.stopped = False

    @property
    def wants_read(self) -> bool:
        return not (self.eof or self.pending or self.stopped)

    def stop(self) -> None:
        """Let go of buffers (the connection closes the sockets)."""
        if not self.stopped:
            self.stopped = True
            self._release()

    def _release(self) -> None:
        pass

    def _finish(self) -> None:
        # src said FIN and everything is written: pass the FIN on, unless the other way is over too
        # and the connection is about to close both sockets (close() says FIN just the same).
        other = self.other
        if other.eof and not other.pending:
            self.owner.flow_done()
            return
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other side may already be gone; the connection notices on its own
        self.owner.rearm()  # src is no longer read

    def readable(self) -> None:
        raise NotImplementedError

    def writable(self) -> None:
        raise NotImplementedError


class SpliceFlow(Flow):
    __slots__ = ("pipe", "pipes")

    def __init__(self, owner: Relay, clock: _Clock, src: RawSocket, dst: RawSocket, pipes: PipePool) -> None:
        super().__init__(owner, clock, src, dst)
        self.pipes = pipes
        self.pipe: tuple[int, int] | None = None

    def _release(self) -> None:
        if self.pipe is not None:
            if self.pending:
                self.pipes.discard(self.pipe)
            else:
                self.pipes.put(self.pipe)
            self.pipe = None

    def readable(self) -> None:
        self.owner.last = self.clock.now
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = self.pipes.get()
        splice = os.splice
        sfd, dfd = self.sfd, self.dfd
        cap = self.pipes.capacity
        for _ in range(ROUNDS):
            try:
                n = splice(sfd, pipe[1], cap, None, None, SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError as e:
                self.owner.flow_error(e, self.src)
                return
            if n == 0:
                self.eof = True
                break
            self.nbytes += n
            try:
                m = splice(pipe[0], dfd, n, None, None, SPLICE_FLAGS)
            except BlockingIOError:
                m = 0
            except OSError as e:
                self.pending = n
                self.owner.flow_error(e, self.dst)
                return
            if m < n:
                # dst is full: stop reading src until dst drains (bounded memory per connection).
                self.pending = n - m
                self.owner.rearm()
                return
            if n < cap:
                break  # a short read drained the socket: skip the call that would only say EAGAIN
        # Empty pipe: give it back so an idle connection holds none.
        self.pipes.put(pipe)
        self.pipe = None
        if self.eof:
            self._finish()

    def writable(self) -> None:
        pipe = self.pipe
        assert pipe is not None
        try:
            m = os.splice(pipe[0], self.dfd, self.pending, None, None, SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            self.owner.flow_error(e, self.dst)
            return
        self.owner.last = self.clock.now
        self.pending -= m
        if self.pending == 0:
            self.pipes.put(pipe)
            self.pipe = None
            if self.eof:
                self._finish()
            else:
                self.owner.rearm()


class BufferedFlow(Flow):
    __slots__ = ("buf", "start_at", "view")

    def __init__(self, owner: Relay, clock: _Clock, src: RawSocket, dst: RawSocket) -> None:
        super().__init__(owner, clock, src, dst)
        self.buf: bytearray | None = None
        self.view: memoryview | None = None
        self.start_at = 0

    def _release(self) -> None:
        if self.view is not None:
            self.view.release()
        self.view = None
        self.buf = None

    def readable(self) -> None:
        self.owner.last = self.clock.now
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
                self.owner.flow_error(e, self.src)
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
                self.owner.flow_error(e, self.dst)
                return
            if m < n:
                self.start_at = m
                self.pending = n - m
                self.owner.rearm()
                return
            if n < BUF_SIZE:
                break  # drained: skip the call that would only say EAGAIN
        # Drop the buffer while idle: idle connections cost no 64 KiB each.
        self._release()
        if self.eof:
            self._finish()

    def writable(self) -> None:
        view = self.view
        assert view is not None
        try:
            m = self.dst.send(view[self.start_at : self.start_at + self.pending])
        except BlockingIOError:
            return
        except OSError as e:
            self.owner.flow_error(e, self.dst)
            return
        self.owner.last = self.clock.now
        self.pending -= m
        self.start_at += m
        if self.pending == 0:
            self.start_at = 0
            self._release()
            if self.eof:
                self._finish()
            else:
                self.owner.rearm()
