"""UDP forwarding by session: client address → its own connected upstream socket.

One `UdpListener` per bound port (a port range is one listener per port, like TCP).
A datagram from a client address the listener has no session for opens one: ban
and limit checks, a route chosen by source address only (UDP is never sniffed),
a server picked from the route's pool with the client address (so source-hash
keeps a client's datagrams and connections on one server), and a new UDP socket
connect()ed to that server. The upstream then sees one stable source port per
client and its replies arrive on that socket alone; they are sent back to the
client with the *listener's* socket, so the client sees replies come from the
address and port it sent to. On a wildcard bind (0.0.0.0 / ::) the destination
address of each client's first datagram is learnt with IP_PKTINFO/IPV6_PKTINFO
and used as the source of the replies, so a multi-homed host answers from the
address the client used.

Descriptors: one socket per bound port plus one per live session (a session is
one client address on one port); nothing per port per client beyond live
sessions. Sessions end after `udp_idle_timeout` without a datagram in either
direction (swept once a second by the edge), when a ban starts, or when their
listener goes away.

The data plane reads into one preallocated buffer (single-threaded loop),
drains up to BATCH datagrams per wakeup and never allocates per datagram
beyond the memoryview slice handed to send().
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..admission import peer_from_sockaddr
from ..events import ConnRefused, Peer, UdpSessionEnded, UdpSessionStarted
from ..routing import Facts, Route
from ..upstream.pool import Pool, Server
from . import sockets
from .forward import Forward
from .sockets import IP_PKTINFO, is_wildcard
from .transparent import pick_same_family

if TYPE_CHECKING:
    from ..runtime import ListenerRuntime
    from .plane import DataPlane

log = logging.getLogger("edgeward.udp")

BATCH = 64  # datagrams read per wakeup, per socket: bounded so one busy client cannot starve the loop
BUF_SIZE = 65536  # larger than any UDP payload (65507 over IPv4, 65527 over IPv6 without jumbograms)

_ANC_SIZE = socket.CMSG_SPACE(20)  # in6_pktinfo (20 bytes) is larger than in_pktinfo (12)
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

_buf = bytearray(BUF_SIZE)
_view = memoryview(_buf)

Cmsg = list[tuple[int, int, bytes]]


def reply_cmsg(anc: list[tuple[int, int, bytes]]) -> Cmsg | None:
    """The ancillary data that makes replies leave from the address a datagram was sent to."""
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            dst = data[8:12]
            if ipaddress.IPv4Address(dst).is_multicast or dst == b"\xff\xff\xff\xff":
                return None
            return [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("@i4s4s", 0, dst, b"\0\0\0\0"))]
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            dst = data[:16]
            a6 = ipaddress.IPv6Address(dst)
            if a6.is_multicast or (a6.ipv4_mapped is not None and (a6.ipv4_mapped.is_multicast or dst[12:] == b"\xff" * 4)):
                return None
            # Keep the interface only where the address needs it (link-local).
            ifindex = struct.unpack("@i", data[16:20])[0] if a6.is_link_local else 0
            return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, dst + struct.pack("@i", ifindex))]
    return None


class UdpListener:
    """One bound UDP port and the sessions of the clients that sent to it."""

    __slots__ = ("host", "key", "name", "paused", "pktinfo", "plane", "port", "rt", "sessions", "sock")

    def __init__(self, plane: DataPlane, host: str, port: int, rt: ListenerRuntime, sock: socket.socket) -> None:
        self.plane = plane
        self.host = host
        self.port = port
        self.key = ("udp", host, port)
        self.rt = rt  # swapped on reload; each session keeps the route and server it was opened with
        self.name = rt.name
        self.sock = sock
        self.sessions: dict[object, UdpSession] = {}
        self.pktinfo = is_wildcard(host)
        self.paused = True

    @property
    def active(self) -> int:
        return len(self.sessions)

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.plane.loop.add_reader(self.sock.fileno(), self._on_readable_msg if self.pktinfo else self._on_readable)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.plane.loop.remove_reader(self.sock.fileno())

    def close(self, reason: str = "listener_closed") -> None:
        """Close the port and every session on it (replies could no longer reach their clients)."""
        self.pause()
        for s in list(self.sessions.values()):
            s.close(reason)
        self.sock.close()

    def rebind(self, make: Callable[[], socket.socket]) -> None:
        """A reload changed a socket option: free the port, bind it again; sessions stay.
        If binding fails the old socket is gone too: the caller closes this listener."""
        was_paused = self.paused
        self.pause()
        self.sock.close()
        self.sock = make()
        if not was_paused:
            self.resume()

    def sweep(self, idle_since: float) -> int:
        """Close sessions idle longer than their timeout as of `idle_since` (the sweeper's clock less
        the step its stamps may lag by: net/plane.py, CLOCK_STEP); returns how many."""
        idle = [s for s in self.sessions.values() if idle_since - s.last > s.idle]
        for s in idle:
            s.close("udp_idle")
        return len(idle)

    # ------------------------------------------------------------------ client → upstream
    def _on_readable(self) -> None:
        sock = self.sock
        view = _view
        sessions = self.sessions
        now = self.plane.now
        for _ in range(BATCH):
            try:
                n, addr = sock.recvfrom_into(view)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                self._read_error(e)
                return
            s = sessions.get(addr)
            if s is None:
                s = self._open(addr, None)
                if s is None:
                    continue
            elif not s.server.healthy or s.server.down_until > now:
                s = self._move(s)
                if s is None:
                    continue
            try:
                s.up.send(view[:n])
            except OSError as e:
                s.send_error(e)
                continue
            s.bytes_in += n
            s.dgrams_in += 1
            s.last = now

    def _on_readable_msg(self) -> None:
        """The same on a wildcard bind, also learning each new client's destination address."""
        sock = self.sock
        view = _view
        bufs = (view,)
        sessions = self.sessions
        now = self.plane.now
        for _ in range(BATCH):
            try:
                n, anc, flags, addr = sock.recvmsg_into(bufs, _ANC_SIZE)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                self._read_error(e)
                return
            if flags & socket.MSG_TRUNC:
                self.plane.counters.inc("udp_dropped", self.name, "oversized")
                continue
            s = sessions.get(addr)
            if s is None:
                s = self._open(addr, reply_cmsg(anc))
                if s is None:
                    continue
            elif not s.server.healthy or s.server.down_until > now:
                s = self._move(s)
                if s is None:
                    continue
            try:
                s.up.send(view[:n])
            except OSError as e:
                s.send_error(e)
                continue
            s.bytes_in += n
            s.dgrams_in += 1
            s.last = now

    def _read_error(self, e: OSError) -> None:
        # An unconnected UDP socket reports no ICMP errors on Linux; anything here is unusual.
        self.plane.counters.inc("udp_dropped", self.name, "read_error")
        log.debug("recv on udp %s:%d: %s", self.host, self.port, e)

    def _open(self, addr: tuple[str, int] | tuple[str, int, int, int], cmsg: Cmsg | None,
              exclude: tuple[Server, ...] = ()) -> UdpSession | None:
        """A new session for `addr`, or None (the datagram is dropped and the reason counted)."""
        plane = self.plane
        peer = peer_from_sockaddr(addr)
        reason = plane.admission.refusal("udp", self.name, len(self.sessions), self.rt.settings.max_connections,
                                         peer.ip)
        if reason is not None:
            plane.bus.publish(ConnRefused(self.name, peer, reason))
            return None
        try:
            a: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(peer.ip)
        except ValueError:
            a = ipaddress.IPv4Address(0)
        rt = self.rt
        route = rt.table.lookup(Facts(None, None, (), a))
        pool = route.action.pool if route is not None else None
        if route is None or pool is None:
            plane.bus.publish(ConnRefused(self.name, peer, "no_route"))
            return None
        now = plane.clock()
        key = peer.ip.encode()
        tried = exclude
        # Transparent: the upstream socket takes the client's own address (the route's Forward says).
        transparent = isinstance(route.action, Forward) and route.action.transparent
        skipped = False
        while len(tried) - len(exclude) <= pool.retries:
            if transparent:
                server, skipped = pick_same_family(pool, peer.ip, tried, now)
            else:
                server = pool.pick(key, tried, now)
            if server is None:
                break
            tried += (server,)
            try:
                up = sockets.upstream_udp(server.target, self.port, peer.ip if transparent else None)
            except OSError as e:
                if e.errno in _OUT_OF_FDS:
                    plane.bus.publish(ConnRefused(self.name, peer, "upstream_socket"))
                    log.error("cannot open an upstream UDP socket: %s", e)
                    return None
                pool.connect_failed(server, now)
                plane.counters.inc("connect_failures", pool.name, server.name)
                continue
            s = UdpSession(self, addr, peer, route, pool, server, up, cmsg, rt.settings.udp_idle_timeout)
            self.sessions[addr] = s
            plane.loop.add_reader(up.fileno(), s.on_reply)
            plane.admission.add_udp(s)
            server.udp_sessions += 1
            plane.bus.publish(UdpSessionStarted(self.name, peer, route.service, server.name))
            return s
        if skipped and len(tried) == len(exclude):
            reason = "transparent_family"  # servers of the other address family only
        else:
            reason = "no_server" if len(tried) == len(exclude) else "upstream_unreachable"
        plane.bus.publish(ConnRefused(self.name, peer, reason))
        return None

    def _move(self, s: UdpSession) -> UdpSession | None:
        """The session's server went down: move the client to another one if there is one."""
        other = s.pool.pick(s.peer.ip.encode(), (s.server,), self.plane.clock())
        if other is None:
            return s  # nowhere better to go: keep trying the old one
        addr, cmsg = s.client, s.cmsg
        s.close("udp_moved")
        return self._open(addr, cmsg, (s.server,))


class UdpSession:
    """One client address on one UDP port, and its connected upstream socket."""

    __slots__ = ("bytes_in", "bytes_out", "client", "closed", "cmsg", "dgrams_in", "dgrams_out", "idle", "last",
                 "listener", "peer", "pool", "route", "server", "t0", "up")

    def __init__(self, listener: UdpListener, client: tuple[str, int] | tuple[str, int, int, int], peer: Peer,
                 route: Route, pool: Pool, server: Server, up: socket.socket, cmsg: Cmsg | None, idle: float) -> None:
        self.listener = listener
        self.client = client  # the address as the socket gave it: replies go back to exactly this
        self.peer = peer
        self.route = route
        self.pool = pool
        self.server = server
        self.up = up
        self.cmsg = cmsg
        self.idle = idle
        self.last = listener.plane.now
        self.t0 = listener.plane.loop.time()
        self.bytes_in = 0  # client → upstream
        self.bytes_out = 0  # upstream → client
        self.dgrams_in = 0
        self.dgrams_out = 0
        self.closed = False

    def on_reply(self) -> None:
        """Upstream → client, from the listener's socket."""
        up = self.up
        lst = self.listener
        sock = lst.sock
        view = _view
        addr = self.client
        cmsg = self.cmsg
        got = nbytes = 0
        for _ in range(BATCH):
            try:
                n = up.recv_into(view)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                # ECONNREFUSED: an ICMP port unreachable from the upstream for an earlier datagram.
                self.upstream_error(e)
                break
            try:
                if cmsg is None:
                    sock.sendto(view[:n], addr)
                else:
                    sock.sendmsg((view[:n],), cmsg, 0, addr)
            except OSError as e:
                lst.plane.counters.inc("udp_dropped", lst.name, "client_buffer_full" if isinstance(e, BlockingIOError)
                                       else "client_send_error")
                continue
            got += 1
            nbytes += n
        if got:
            self.dgrams_out += got
            self.bytes_out += nbytes
            self.last = lst.plane.now

    def send_error(self, e: OSError) -> None:
        lst = self.listener
        if isinstance(e, BlockingIOError):
            lst.plane.counters.inc("udp_dropped", lst.name, "upstream_buffer_full")
        else:
            self.upstream_error(e)

    def upstream_error(self, e: OSError) -> None:
        plane = self.listener.plane
        pool = self.pool
        if e.errno == errno.ECONNREFUSED:
            # Nothing listens on the upstream port: passive health, like a refused TCP connect.
            pool.connect_failed(self.server, plane.clock())
            plane.counters.inc("connect_failures", pool.name, self.server.name)
        plane.counters.inc("udp_dropped", self.listener.name,
                           "upstream_" + (errno.errorcode.get(e.errno or 0, "error").lower()))

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        lst = self.listener
        plane = lst.plane
        plane.loop.remove_reader(self.up.fileno())
        self.up.close()
        if lst.sessions.get(self.client) is self:
            del lst.sessions[self.client]
        plane.admission.remove_udp(self)
        srv = self.server
        srv.udp_sessions -= 1
        srv.bytes_in += self.bytes_in
        srv.bytes_out += self.bytes_out
        plane.bus.publish(UdpSessionEnded(lst.name, self.peer, self.route.service, srv.name, self.bytes_in,
                                          self.bytes_out, self.dgrams_in, self.dgrams_out,
                                          plane.loop.time() - self.t0, reason))
