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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .. import codec
from ..events import ConnOpened, Peer
from ..upstream.pool import Pool, Server
from . import sockets
from .flow import BufferedFlow, Flow, SpliceFlow
from .transparent import pick_same_family

if TYPE_CHECKING:
    from ..routing import Route
    from .plane import DataPlane

log = logging.getLogger("edgeward.forward")

# States of a connection (shared with net/tcp.py)
SNIFFING, CONNECTING, RELAYING, CLOSED = 1, 2, 3, 4


class _Listener(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def port(self) -> int: ...


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


class Forwarding:
    """Connect + PROXY header + relay, for a TcpConn (whose slots hold the state used here)."""

    # The connection state this half reads and writes; TcpConn adds the sniffing state.
    __slots__ = ("flows", "last", "local", "server", "state", "timer", "tried", "up")

    state: int
    timer: asyncio.TimerHandle | None  # the sniff deadline, then the connect deadline
    up: socket.socket | None
    server: Server | None
    tried: tuple[Server, ...]
    flows: tuple[Flow, Flow] | None
    local: tuple[str, int] | None
    last: float

    # Set by TcpConn, read here:
    plane: DataPlane
    listener: _Listener
    client: socket.socket
    peer: Peer
    route: Route | None
    sniffed: codec.Sniffed | None

    def fail(self, reason: str) -> None:
        raise NotImplementedError

    def close(self, reason: str = "closed") -> None:
        raise NotImplementedError

    def forward(self, action: Forward) -> None:
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
            up, addr = sockets.upstream_tcp(server.target, self.listener.port,
                                            self.peer.ip if action.transparent else None)
        except OSError as e:
            log.warning("cannot make upstream socket: %s", e)
            self.fail("upstream_socket")
            return
        self.up = up
        err = up.connect_ex(addr)  # type: ignore[arg-type]
        if err in (0, errno.EINPROGRESS, errno.EAGAIN):
            plane.loop.add_writer(up.fileno(), self._on_connected, action)
            self.timer = plane.loop.call_later(action.connect_timeout, self._on_connect_timeout, action)
        else:
            self._connect_failed(action, err)

    def _on_connect_timeout(self, action: Forward) -> None:
        self.timer = None
        self._connect_failed(action, errno.ETIMEDOUT)

    def _connect_failed(self, action: Forward, err: int) -> None:
        plane = self.plane
        up = self.up
        if up is not None:
            plane.loop.remove_writer(up.fileno())
            up.close()
            self.up = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        server = self.server
        assert server is not None
        action.pool.connect_failed(server, plane.clock())
        plane.counters.inc("connect_failures", action.pool.name, server.name)
        log.debug("connect to %s failed: %s", server.name, errno.errorcode.get(err, err))
        self.server = None
        self._connect_next(action)

    def _on_connected(self, action: Forward) -> None:
        up = self.up
        assert up is not None
        err = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(action, err)
            return
        plane = self.plane
        plane.loop.remove_writer(up.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        server = self.server
        route = self.route
        assert server is not None and route is not None
        action.pool.connect_succeeded(server)
        if action.proxy_protocol != "off":
            try:
                up.send(self._proxy_header(action.proxy_protocol))
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

    def _start_relay(self, up: socket.socket) -> None:
        plane = self.plane
        loop, client = plane.loop, self.client
        if plane.splice:
            c2u: Flow = SpliceFlow(loop, client, up, self._flow_done, self._flow_error, self._touch, plane.pipes)
            u2c: Flow = SpliceFlow(loop, up, client, self._flow_done, self._flow_error, self._touch, plane.pipes)
        else:
            c2u = BufferedFlow(loop, client, up, self._flow_done, self._flow_error, self._touch)
            u2c = BufferedFlow(loop, up, client, self._flow_done, self._flow_error, self._touch)
        self.flows = (c2u, u2c)
        c2u.start()
        u2c.start()

    def _touch(self) -> None:
        self.last = self.plane.now

    def _flow_done(self) -> None:
        flows = self.flows
        if flows is not None and flows[0].eof and flows[1].eof and not flows[0].pending and not flows[1].pending:
            self.close("done")

    def _flow_error(self, exc: BaseException, sock: socket.socket) -> None:
        side = "upstream" if sock is self.up else "client"
        self.close(f"{side}_reset" if isinstance(exc, ConnectionResetError) else f"{side}_error")
