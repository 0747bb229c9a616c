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

from ..routing import Facts, Route
from ..upstream.pool import Server

if TYPE_CHECKING:
    from ..server import Edge, ListenerRuntime

log = logging.getLogger("edgeward.udp")

BATCH = 64  # datagrams read per wakeup, per socket: bounded so one busy client cannot starve the loop
BUF_SIZE = 65536  # larger than any UDP payload (65507 over IPv4, 65527 over IPv6 without jumbograms)

IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)  # Linux value; Python 3.11 does not export it
_ANC_SIZE = socket.CMSG_SPACE(20)  # in6_pktinfo (20 bytes) is larger than in_pktinfo (12)
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

_buf = bytearray(BUF_SIZE)
_view = memoryview(_buf)

Cmsg = list[tuple[int, int, bytes]]


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def make_udp_socket(host: str, port: int, reuseport: bool) -> socket.socket:
    """A bound non-blocking UDP socket. No SO_REUSEADDR: for UDP it would let a second socket
    (another process, a stale edge) silently share the port and steal datagrams."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if is_wildcard(host):
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        s.bind((host, port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


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


def client_ip(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """The client's address as bans and limits spell it (IPv4-mapped reduced, zone dropped)."""
    ip = addr[0]
    if ip.startswith("::ffff:"):
        ip = ip[7:]
    if "%" in ip:
        ip = ip.split("%", 1)[0]
    return ip


class UdpListener:
    """One bound UDP port and the sessions of the clients that sent to it."""

    __slots__ = ("edge", "host", "key", "name", "paused", "pktinfo", "port", "rt", "sessions", "sock")

    def __init__(self, edge: Edge, host: str, port: int, rt: ListenerRuntime, sock: socket.socket) -> None:
        self.edge = edge
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
            self.edge.loop.add_reader(self.sock.fileno(), self._on_readable_msg if self.pktinfo else self._on_readable)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.edge.loop.remove_reader(self.sock.fileno())

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

    def sweep(self, now: float) -> int:
        """Close sessions idle longer than their timeout; returns how many."""
        idle = [s for s in self.sessions.values() if now - s.last > s.idle]
        for s in idle:
            self.edge.count("closed", self.name, "udp_idle")
            s.close("idle")
        return len(idle)

    # ------------------------------------------------------------------ client → upstream
    def _on_readable(self) -> None:
        sock = self.sock
        view = _view
        sessions = self.sessions
        now = self.edge.now
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
        now = self.edge.now
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
                self.edge.count("udp_dropped", self.name, "oversized")
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
        self.edge.count("udp_dropped", self.name, "read_error")
        log.debug("recv on udp %s:%d: %s", self.host, self.port, e)

    def _open(self, addr: tuple[str, int] | tuple[str, int, int, int], cmsg: Cmsg | None,
              exclude: tuple[Server, ...] = ()) -> UdpSession | None:
        """A new session for `addr`, or None (the datagram is dropped and the reason counted)."""
        edge = self.edge
        ip = client_ip(addr)
        reason = edge.udp_refusal(self, ip)
        if reason is not None:
            edge.count("refused", self.name, reason)
            return None
        try:
            a: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(ip)
        except ValueError:
            a = ipaddress.IPv4Address(0)
        rt = self.rt
        route = rt.table.lookup(Facts(None, None, (), a))
        if route is None:
            edge.count("refused", self.name, "no_route")
            return None
        pool = route.pool
        now = edge.clock()
        key = edge.client_key(ip)
        tried = exclude
        while len(tried) - len(exclude) <= pool.retries:
            server = pool.pick(key, tried, now)
            if server is None:
                break
            tried += (server,)
            try:
                up = connect_upstream(server, self.port)
            except OSError as e:
                if e.errno in _OUT_OF_FDS:
                    edge.count("refused", self.name, "upstream_socket")
                    log.error("cannot open an upstream UDP socket: %s", e)
                    return None
                pool.connect_failed(server, now)
                edge.count("connect_failures", pool.name, server.name)
                continue
            s = UdpSession(self, addr, ip, route, server, up, cmsg, rt.settings.udp_idle_timeout)
            self.sessions[addr] = s
            edge.loop.add_reader(up.fileno(), s.on_reply)
            edge.udp_started(s)
            return s
        edge.count("refused", self.name, "no_server" if len(tried) == len(exclude) else "upstream_unreachable")
        return None

    def _move(self, s: UdpSession) -> UdpSession | None:
        """The session's server went down: move the client to another one if there is one."""
        other = s.route.pool.pick(self.edge.client_key(s.client_ip), (s.server,), self.edge.clock())
        if other is None:
            return s  # nowhere better to go: keep trying the old one
        addr, cmsg = s.client, s.cmsg
        s.close("moved")
        self.edge.count("closed", self.name, "udp_moved")
        return self._open(addr, cmsg, (s.server,))


def connect_upstream(server: Server, listen_port: int) -> socket.socket:
    """A non-blocking UDP socket connected to `server` (no port: the port the datagram came to)."""
    t = server.target
    if t.host is None:  # unix: targets are refused for UDP by the config check
        raise OSError(errno.EAFNOSUPPORT, "UDP cannot go to a unix socket")
    host = t.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    up = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    try:
        up.connect((host, t.port or listen_port))
    except BaseException:
        up.close()
        raise
    return up


class UdpSession:
    """One client address on one UDP port, and its connected upstream socket."""

    __slots__ = ("bytes_in", "bytes_out", "client", "client_ip", "closed", "cmsg", "dgrams_in", "dgrams_out",
                 "idle", "last", "listener", "route", "server", "up")

    def __init__(self, listener: UdpListener, client: tuple[str, int] | tuple[str, int, int, int], ip: str,
                 route: Route, server: Server, up: socket.socket, cmsg: Cmsg | None, idle: float) -> None:
        self.listener = listener
        self.client = client
        self.client_ip = ip
        self.route = route
        self.server = server
        self.up = up
        self.cmsg = cmsg
        self.idle = idle
        self.last = listener.edge.now
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
                lst.edge.count("udp_dropped", lst.name, "client_buffer_full" if isinstance(e, BlockingIOError)
                               else "client_send_error")
                continue
            got += 1
            nbytes += n
        if got:
            self.dgrams_out += got
            self.bytes_out += nbytes
            self.last = lst.edge.now

    def send_error(self, e: OSError) -> None:
        lst = self.listener
        if isinstance(e, BlockingIOError):
            lst.edge.count("udp_dropped", lst.name, "upstream_buffer_full")
        else:
            self.upstream_error(e)

    def upstream_error(self, e: OSError) -> None:
        edge = self.listener.edge
        pool = self.route.pool
        if e.errno == errno.ECONNREFUSED:
            # Nothing listens on the upstream port: passive health, like a refused TCP connect.
            pool.connect_failed(self.server, edge.clock())
            edge.count("connect_failures", pool.name, self.server.name)
        edge.count("udp_dropped", self.listener.name, "upstream_" + (errno.errorcode.get(e.errno or 0, "error").lower()))

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        lst = self.listener
        edge = lst.edge
        edge.loop.remove_reader(self.up.fileno())
        self.up.close()
        if lst.sessions.get(self.client) is self:
            del lst.sessions[self.client]
        edge.udp_ended(self)
