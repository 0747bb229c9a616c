"""The forward action: connect to a server of the route's pool, send a PROXY header, relay.

`Forward` is what a route to an address or a pool does. The work is done by
`Forwarding`, the half of a `TcpConn` (net/tcp.py) that talks to upstreams:
it lives on the connection object itself rather than in one more object per
connection, because forwarding is the edge's hottest path and an idle relayed
connection should cost as little memory as possible.

Connect: a non-blocking connect to the picked server, bounded by the route's
connect timeout; a failure marks the server (passive health) and tries the next
one, up to the pool's retries. Relay: two flows (net/flow.py), splice() where
the OS has it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from _socket import socket as RawSocket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import codec
from ..events import ConnOpened, Peer
from ..upstream.pool import Pool, Server
from . import sockets
from .flow import BufferedFlow, Flow, SpliceFlow
from .poller import ERR, IN, OUT, Handler
from .transparent import pick_same_family

if TYPE_CHECKING:
    from ..routing import Route
    from .plane import DataPlane
    from .tcp import TcpListener

log = logging.getLogger("edgeward.forward")

# States of a connection (shared with net/tcp.py)
SNIFFING, CONNECTING, RELAYING, CLOSED = 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class Forward:
    """Relay to a server of `pool`, telling it the client address with PROXY `proxy_protocol`."""

    pool: Pool
    proxy_protocol: str  # off | v1 | v2
    connect_timeout: float
    transparent: bool = False  # connect from the client's own address (IP_TRANSPARENT)
    kind: str = "forward"
    needs_sniff: bool = False  # bytes are relayed as they come: only the route's own fields need sniffing

    def start(self, conn: Forwarding) -> None:
        conn.forward(self)


class Forwarding(Handler):
    """Connect + PROXY header + relay, for a TcpConn (whose slots hold the state used here)."""

    # The connection state this half reads and writes; TcpConn adds the sniffing state.
    __slots__ = ("cfd", "cmask", "deadline", "flows", "fwd", "last", "local", "server", "state", "timer", "tried",
                 "ufd", "umask", "up")

    state: int
    timer: asyncio.TimerHandle | None  # the sniff deadline
    deadline: int  # the connect deadline's key in plane.deadlines (0: none)
    up: RawSocket | None
    # The descriptors and what the data plane's epoll watches them for (-1: not in its set).
    cfd: int
    cmask: int
    ufd: int
    umask: int
    server: Server | None
    tried: tuple[Server, ...]
    fwd: Forward | None  # the forward being connected (a route's, or a handoff's fallback)
    flows: tuple[Flow, Flow] | None
    local: tuple[str, int] | None
    last: float

    # Set by TcpConn, read here:
    plane: DataPlane
    listener: TcpListener
    client: RawSocket
    peer: Peer
    route: Route | None
    sniffed: codec.Sniffed | None

    def fail(self, reason: str) -> None:
        raise NotImplementedError

    def close(self, reason: str = "closed") -> None:
        raise NotImplementedError

    def _watch(self, fd: int, old: int, new: int) -> int:
        """Have the epoll watch `fd` for `new` instead of `old` (-1: not at all); returns `new`."""
        if new != old:
            poller = self.plane.poller
            if old < 0:
                poller.add(fd, new, self)
            elif new < 0:
                poller.remove(fd)
            else:
                poller.modify(fd, new)
        return new

    def forward(self, action: Forward) -> None:
        self.fwd = action
        self._connect_next(action)

    def _connect_next(self, action: Forward) -> None:
        pool = action.pool
        if len(self.tried) > pool.retries:
            self.fail("upstream_unreachable")
            return
        plane = self.plane
        if action.transparent:
            server, skipped = pick_same_family(pool, self.peer.ip, self.tried, plane.clock())
            if server is None and skipped and not self.tried:
                self.fail("transparent_family")
                return
        else:
            server = pool.pick(self.peer.ip.encode(), self.tried, plane.clock())
        if server is None:
            self.fail("no_server" if not self.tried else "upstream_unreachable")
            return
        self.tried += (server,)
        self.server = server
        try:
            up, addr = sockets.upstream_tcp_raw(server.target, self.listener.port,
                                                self.peer.ip if action.transparent else None)
        except OSError as e:
            log.warning("cannot make upstream socket: %s", e)
            self.fail("upstream_socket")
            return
        self.up = up
        err = up.connect_ex(addr)  # type: ignore[arg-type]
        if err in (0, errno.EINPROGRESS, errno.EAGAIN):
            self.ufd = fd = up.fileno()
            self.umask = OUT
            plane.poller.add(fd, OUT, self)
            self.deadline = plane.deadlines.add(self, plane.loop.time() + action.connect_timeout)
        else:
            self._connect_failed(action, err)

    def on_deadline(self) -> None:
        self.deadline = 0
        action = self.fwd
        if self.state == CONNECTING and self.up is not None and action is not None:
            self._connect_failed(action, errno.ETIMEDOUT)

    def _drop_deadline(self) -> None:
        if self.deadline:
            self.plane.deadlines.drop(self, self.deadline)
            self.deadline = 0

    def _connect_failed(self, action: Forward, err: int) -> None:
        plane = self.plane
        up = self.up
        if up is not None:
            plane.poller.close(up)
            self.up = None
            self.umask = -1
        self._drop_deadline()
        server = self.server
        assert server is not None
        action.pool.connect_failed(server, plane.clock())
        plane.counters.inc("connect_failures", action.pool.name, server.name)
        log.debug("connect to %s failed: %s", server.name, errno.errorcode.get(err, err))
        self.server = None
        self._connect_next(action)

    def _on_connected(self, events: int) -> None:
        up = self.up
        action = self.fwd
        assert up is not None and action is not None
        if events & ERR:
            # Only a failed connect reports an error or a hang-up here: SO_ERROR says which.
            err = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or not events & OUT:
                self._connect_failed(action, err or errno.ECONNREFUSED)
                return
        elif not events & OUT:
            return
        plane = self.plane
        self._drop_deadline()
        server = self.server
        route = self.route
        assert server is not None and route is not None
        action.pool.connect_succeeded(server)
        if action.proxy_protocol != "off":
            try:
                up.send(self._proxy_header(action.proxy_protocol), socket.MSG_NOSIGNAL)
            except OSError:
                self.fail("upstream_error")
                return
        server.active += 1
        server.total += 1
        self.state = RELAYING
        plane.bus.publish(ConnOpened(self.listener.name, self.peer, route.service, server.name))
        self._start_relay(up)

    def _proxy_header(self, version: str) -> bytes:
        if self.local is None:
            try:
                la = self.client.getsockname()
                self.local = (la[0], la[1])
            except OSError:
                self.local = ("0.0.0.0", 0)
        src = (self.peer.ip, self.peer.port)
        if version == "v1":
            return codec.build_proxy_v1(src, self.local)
        sn = self.sniffed
        alpn = sn.alpn[0] if sn is not None and sn.protocol == "tls" and sn.alpn else None
        authority = sn.name if sn is not None else None
        return codec.build_proxy_v2(src, self.local, alpn=alpn, authority=authority)

    def _start_relay(self, up: RawSocket) -> None:
        plane = self.plane
        client = self.client
        if plane.splice:
            c2u: Flow = SpliceFlow(self, plane, client, up, plane.pipes)
            u2c: Flow = SpliceFlow(self, plane, up, client, plane.pipes)
        else:
            c2u = BufferedFlow(self, plane, client, up)
            u2c = BufferedFlow(self, plane, up, client)
        c2u.other = u2c
        u2c.other = c2u
        self.flows = (c2u, u2c)
        # The upstream now waits for bytes to read, no longer for its connect.
        self.umask = self._watch(self.ufd, self.umask, IN)
        if self.cmask < 0:
            # Added now, the client is reported at once if its first bytes are waiting (they
            # usually are: sniffing left them in the kernel).
            self.cfd = client.fileno()
            self.cmask = self._watch(self.cfd, -1, IN)
        else:
            self.cmask = self._watch(self.cfd, self.cmask, IN)
            c2u.readable()

    def rearm(self) -> None:
        """What the flows now wait for: reading a socket unless its flow ended or is blocked,
        writing one while the flow into it is blocked."""
        flows = self.flows
        if flows is None or self.state != RELAYING:
            return
        c2u, u2c = flows
        cm = (IN if c2u.wants_read else 0) | (OUT if u2c.pending else 0)
        um = (IN if u2c.wants_read else 0) | (OUT if c2u.pending else 0)
        if cm != self.cmask:
            self.cmask = self._watch(self.cfd, self.cmask, cm)
        if um != self.umask:
            self.umask = self._watch(self.ufd, self.umask, um)

    def on_event(self, fd: int, events: int) -> None:
        """The data plane's epoll reports `events` on one of this connection's sockets."""
        state = self.state
        if state == RELAYING:
            flows = self.flows
            assert flows is not None
            if fd == self.cfd:
                reader, writer = flows
            else:
                writer, reader = flows
            handled = False
            if writer.pending and events & (OUT | ERR):
                writer.writable()
                handled = True
            if self.state == RELAYING and reader.wants_read and events & (IN | ERR):
                reader.readable()
                handled = True
            if not handled and events & ERR and self.state == RELAYING:
                self._park(fd)
        elif fd == self.ufd:
            if state == CONNECTING:
                self._on_connected(events)
        elif state == SNIFFING:
            self._on_sniff_event(events)
        elif events & ERR:
            self._park(fd)

    def _park(self, fd: int) -> None:
        """A socket reports an error or hang-up that nothing here waits for (yet): stop watching it
        rather than hear it again on every round; whoever uses it next meets the error."""
        if fd == self.cfd:
            self.cmask = self._watch(fd, self.cmask, -1)
        elif fd == self.ufd:
            self.umask = self._watch(fd, self.umask, -1)

    def _on_sniff_event(self, events: int) -> None:
        raise NotImplementedError

    def flow_done(self) -> None:
        flows = self.flows
        if flows is not None and flows[0].eof and flows[1].eof and not flows[0].pending and not flows[1].pending:
            self.close("done")

    def flow_error(self, exc: OSError, sock: RawSocket) -> None:
        side = "upstream" if sock is self.up else "client"
        self.close(f"{side}_reset" if isinstance(exc, ConnectionResetError) else f"{side}_error")
