"""TCP listeners and the life of one connection: accept → admit → sniff → route → action → close.

Listening sockets are watched with the event loop's add_reader; connection sockets
on the data plane's own epoll (net/poller.py), each added once and left there until it
is closed. Plain non-blocking sockets, no asyncio streams or transports: a connection
costs a few small objects, and relayed bytes move with splice() without entering Python.
Accepted sockets are the C-level `_socket.socket` (from `_accept()`, which returns a bare
descriptor), never the Python `socket.socket` wrapper: nothing here needs what it adds.

Sniffing peeks (MSG_PEEK): the client's first bytes stay in the kernel, so the
upstream (or the local server a socket is handed to, or the TLS terminator)
receives them byte for byte. While a peeked prefix is incomplete, SO_RCVLOWAT
is raised above what is already queued so that the socket only becomes
readable again when more bytes arrive (no busy loop on level-triggered
polling); readable with nothing new means the client half-closed, and it is
closed at once. A trusted PROXY header is the one thing read for real, because
it is the edge's to consume.

Once routed, the route's action owns the connection (`route.action.start`):
forwarding (net/forward.py) keeps it in this object; other actions take the
socket away with `detach()`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from _socket import socket as RawSocket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import codec
from ..admission import normalise_ip, peer_from_sockaddr
from ..events import ConnAccepted, ConnClosed, ConnRefused, Peer
from ..routing import Facts, Route
from ..upstream.pool import Server
from . import refusal
from .flow import Flow
from .forward import CLOSED, CONNECTING, RELAYING, SNIFFING, Forwarding
from .poller import ERR, IN, Handler

if TYPE_CHECKING:
    from ..config.schema import ListenerSettings
    from ..runtime import ListenerRuntime
    from .plane import DataPlane

log = logging.getLogger("edgeward.tcp")

_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class TcpListener:
    """One bound TCP port. Survives reloads when its address and socket options stay the same."""

    __slots__ = ("accept", "active", "family", "host", "key", "name", "paused", "plane", "port", "rt", "sock")

    def __init__(self, plane: DataPlane, host: str, port: int, rt: ListenerRuntime, sock: socket.socket) -> None:
        self.plane = plane
        self.host = host
        self.port = port
        self.key = ("tcp", host, port)
        self.rt = rt  # swapped on reload; each connection keeps the one it started with
        self.name = rt.name
        self.sock = sock
        self.family = sock.family
        # socket.accept() without its Python wrapper: (descriptor, address).
        self.accept: Callable[[], tuple[int, Any]] = sock._accept  # type: ignore[attr-defined]
        self.active = 0
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.plane.loop.add_reader(self.sock.fileno(), self._on_accept)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.plane.loop.remove_reader(self.sock.fileno())

    def close(self) -> None:
        self.pause()
        self.sock.close()

    def _on_accept(self) -> None:
        plane = self.plane
        accept = self.accept
        family = self.family
        for _ in range(64):
            try:
                fd, addr = accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in _OUT_OF_FDS:
                    # Out of descriptors: stop accepting briefly rather than spin on the ready socket.
                    plane.counters.inc("accept_errors", self.name, errno.errorcode.get(e.errno or 0, "?"))
                    self.pause()
                    plane.loop.call_later(0.1, self._retry_accept)
                    log.error("accept on %s:%d failed: %s; pausing 100ms", self.host, self.port, e)
                return
            sock = RawSocket(family, socket.SOCK_STREAM, 0, fd)
            ip = addr[0]
            # The Peer of this client, built once (admission.peer_from_sockaddr, inlined: hot path).
            peer = Peer(normalise_ip(ip) if "%" in ip or ip.startswith("::ffff:") else ip, addr[1])
            self._admit(sock, peer)

    def _admit(self, sock: RawSocket, peer: Peer) -> None:
        plane = self.plane
        admission = plane.admission
        reason = admission.refusal("tcp", self.name, self.active, self.rt.settings.max_connections, peer.ip)
        if reason is not None:
            plane.bus.publish(ConnRefused(self.name, peer, reason))
            refusal.reset(sock)
            return
        sock.setblocking(False)
        conn = TcpConn(plane, self, sock, peer)
        plane.conns.add(conn)
        admission.add_tcp(conn)
        self.active += 1
        bus = plane.bus
        if ConnAccepted in bus.kinds:
            bus.publish(ConnAccepted(self.name, peer))
        conn.start()

    def _retry_accept(self) -> None:
        if not self.plane.admission.draining and self.sock.fileno() >= 0:
            self.resume()


class TcpConn(Forwarding):
    """One client connection: sniffed here, then owned by its route's action."""

    __slots__ = ("armed", "client", "listener", "lowat", "peeked", "peer", "plane", "proxy_in", "route", "rt",
                 "shared", "sniffed", "t0")

    def __init__(self, plane: DataPlane, listener: TcpListener, sock: RawSocket, peer: Peer) -> None:
        self.plane = plane
        self.listener = listener
        self.rt: ListenerRuntime = listener.rt
        self.client = sock
        self.cfd = sock.fileno()
        self.cmask = -1
        self.ufd = -1
        self.umask = -1
        # The client's open file may be held elsewhere too (sent to a handoff endpoint): then it
        # stays in the epoll set after close() and is taken out explicitly.
        self.shared = False
        self.peer = peer
        self.local: tuple[str, int] | None = None
        self.up: RawSocket | None = None
        self.fwd = None
        self.deadline = 0
        self.state = SNIFFING
        self.route: Route | None = None
        self.server: Server | None = None
        self.tried: tuple[Server, ...] = ()
        self.timer: asyncio.TimerHandle | None = None  # the sniff deadline, then the connect deadline
        self.sniffed: codec.Sniffed | None = None
        self.proxy_in: codec.ProxyHeader | None = None
        self.flows: tuple[Flow, Flow] | None = None
        self.peeked = 0
        self.lowat = False
        self.armed = False
        self.last = plane.now
        self.t0 = plane.loop.time()  # same clock as the sniff timers

    # ------------------------------------------------------------------ sniff
    def start(self) -> None:
        rt = self.rt
        # A listener that expects PROXY headers peeks every client, so that a header forged by an
        # untrusted client is refused rather than passed to an upstream that might believe it.
        if not rt.table.needs_sniff and not rt.trusted:
            self._route(None, None, ())
            return
        # Clients that speak first have usually sent their hello by the time the handshake is
        # accepted: try it now and skip registering a reader and a timer at all.
        try:
            data = self.client.recv(rt.settings.sniff_bytes, socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        except OSError:
            self.fail("client_error")
            return
        if data == b"":
            self.fail("closed_during_sniff")
            return
        if data is None:
            self._arm()
        else:
            self._sniff(data, final=False)

    def _arm(self) -> None:
        """Wait for (more) first bytes: a reader on the client and the sniff deadline."""
        self.armed = True
        loop = self.plane.loop
        self.cmask = self._watch(self.cfd, self.cmask, IN)
        s = self.rt.settings
        first = s.server_first_wait if 0 < s.server_first_wait < s.sniff_timeout else s.sniff_timeout
        self.timer = loop.call_later(first, self._on_sniff_timer)

    def _stop_sniffing(self) -> None:
        if self.armed:
            self.armed = False
            # Out of the set until the relay (if any) watches it again: while connecting, a reset
            # client must not report its error on every round.
            self.cmask = self._watch(self.cfd, self.cmask, -1)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.lowat:
            self.lowat = False
            try:
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass

    def _on_sniff_event(self, events: int) -> None:
        if not events & (IN | ERR):
            return
        try:
            data = self.client.recv(self.rt.settings.sniff_bytes, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self.fail("client_error")
            return
        if not data:
            self.fail("closed_during_sniff")
            return
        if len(data) <= self.peeked and (self.lowat or events & ERR):
            # Readable with SO_RCVLOWAT above what is queued, yet nothing new: the client sent FIN
            # (a shut-down socket is readable whatever the low-water mark says). Its prefix can
            # never complete, and polling again would wake at once, forever: close it now.
            self._protocol_error("sniff_half_closed")
            return
        self._sniff(data, final=False)

    def _sniff(self, data: bytes, final: bool) -> None:
        rt = self.rt
        if self.proxy_in is None and codec.looks_like_proxy(data):
            if not rt.trusts(self.peer.ip):
                self._protocol_error("proxy_untrusted")
                return
            try:
                hdr = codec.parse_proxy(data)
            except codec.CodecError:
                self._protocol_error("proxy_invalid")
                return
            if hdr is codec.NEED_MORE:
                self._wait_more(len(data), final)
                return
            assert isinstance(hdr, codec.ProxyHeader)
            self._consume_proxy(hdr)
            return
        if not rt.table.needs_sniff:
            self._stop_sniffing()
            self._route(None, None, ())
            return
        try:
            res = codec.sniff(data, final=final or len(data) >= rt.settings.sniff_bytes)
        except codec.CodecError:
            # Malformed input of a known protocol: counted and reported, then treated as unknown
            # so a listener's default route may still take it.
            self.plane.protocol_error(self.listener.name, self.peer, "bad_" + _kind_of(data))
            res = codec.Sniffed("unknown", None, (), None)
        if res is codec.NEED_MORE:
            self._wait_more(len(data), final)
            return
        assert isinstance(res, codec.Sniffed)
        self._stop_sniffing()
        self.sniffed = res
        self._route(res.protocol, res.name, res.alpn)

    def _wait_more(self, have: int, final: bool) -> None:
        if final:
            self.fail("sniff_timeout")
            return
        # Readable again only once more than `have` bytes are queued.
        self.peeked = have
        if not self.armed:
            self._arm()
        try:
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, have + 1)
            self.lowat = True
        except OSError:
            self.fail("client_error")

    def _consume_proxy(self, hdr: codec.ProxyHeader) -> None:
        # The header belongs to the edge: read it for real so the upstream never sees it.
        try:
            got = self.client.recv(hdr.length)
        except OSError:
            self.fail("client_error")
            return
        if len(got) != hdr.length:
            self.fail("proxy_invalid")
            return
        self.proxy_in = hdr
        if hdr.command == "PROXY" and hdr.src is not None:
            # The real client: account, limit, ban and log by it from now on.
            old = self.peer
            self.peer = peer_from_sockaddr(hdr.src, via_proxy=True)
            refusal = self.plane.admission.rebind_tcp(self, old, self.listener.name)
            if refusal is not None:
                self.fail(refusal)
                return
            self.local = hdr.dst
        self.peeked = 0
        if self.lowat:
            self.lowat = False
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        if not self.rt.table.needs_sniff:
            self._stop_sniffing()
            self._route(None, None, ())
        elif not self.armed:
            self._arm()  # level-triggered: fires at once if the hello is already queued

    def _on_sniff_timer(self) -> None:
        self.timer = None
        s = self.rt.settings
        elapsed = self.plane.loop.time() - self.t0
        server_first = 0 < s.server_first_wait <= elapsed + 0.001 or not self.rt.table.needs_sniff
        if self.peeked == 0 and server_first:
            # A silent client on a server-speaks-first listener: route it by its listener's default.
            try:
                data = self.client.recv(s.sniff_bytes, socket.MSG_PEEK)
            except BlockingIOError:
                data = b""
            except OSError:
                self.fail("client_error")
                return
            if not data:
                self._stop_sniffing()
                self._route("unknown", None, ())
                return
        if elapsed + 0.001 < s.sniff_timeout:
            self.timer = self.plane.loop.call_later(s.sniff_timeout - elapsed, self._on_sniff_timer)
            return
        # Bytes are queued but never completed a message (a complete or unrecognisable one would
        # have been routed already): a stalled client, closed rather than sent to a default route.
        self._protocol_error("sniff_timeout")

    def _protocol_error(self, kind: str) -> None:
        self.plane.protocol_error(self.listener.name, self.peer, kind)
        self.fail(kind)

    # ------------------------------------------------------------------ route
    def _route(self, protocol: str | None, name: str | None, alpn: tuple[str, ...]) -> None:
        self.state = CONNECTING
        table = self.rt.table
        ip = None
        if table.uses_source:  # parsing the address costs; only source routes need it
            try:
                ip = ipaddress.ip_address(self.peer.ip)
            except ValueError:
                ip = ipaddress.ip_address("0.0.0.0")
        route = table.lookup(Facts(protocol, name, alpn, ip))
        if route is None:
            self.fail("no_route")
            return
        self.route = route
        route.action.start(self)

    # ------------------------------------------------------------------ end
    def fail(self, reason: str) -> None:
        """Refuse: count why, tell the client as net/refusal.py decides for `reason`, close."""
        if self.state == CLOSED:
            return
        self.plane.bus.publish(ConnRefused(self.listener.name, self.peer, reason))
        if reason in refusal.RESET:
            try:
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, refusal.LINGER_RESET)
            except OSError:
                pass
        else:
            sniffed = self.sniffed
            refusal.answer(self.client, reason, sniffed.protocol if sniffed is not None else None,
                           self.rt.settings.sniff_bytes)
        self.close(reason)

    def detach(self) -> socket.socket:
        """Hand the client socket to another owner (a non-forward action): this object lets go of it
        without closing it, and stops counting it (the new owner registers what it keeps)."""
        self._stop_sniffing()
        self.state = CLOSED
        self._unregister()
        if self.cmask >= 0:
            self.cmask = self._watch(self.cfd, self.cmask, -1)
        # The new owner gets the full socket.socket (asyncio and uvloop expect one), non-blocking
        # as before (SOCK_NONBLOCK in the type only sets its timeout to 0: no system call).
        c = self.client
        return socket.socket(c.family, c.type | socket.SOCK_NONBLOCK, c.proto, c.detach())

    def close(self, reason: str = "closed") -> None:
        if self.state == CLOSED:
            return
        was = self.state
        self.state = CLOSED
        plane = self.plane
        poller = plane.poller
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._drop_deadline()
        flows = self.flows
        if flows is not None:
            for f in flows:
                f.stop()
        if self.up is not None:
            poller.close(self.up)
        if self.shared and self.cmask >= 0:
            self.cmask = self._watch(self.cfd, self.cmask, -1)
        if was == RELAYING and reason.startswith("upstream_"):
            # The upstream died under a live client: a clean close (FIN after what was already
            # sent), not the reset a close with the client's bytes unread would be.
            _Lingering(plane, self.client, self.cmask, self.shared)
        else:
            poller.close(self.client)
        plane.conns.discard(self)
        plane.admission.remove_tcp(self)
        self.listener.active -= 1
        bi = bo = 0
        upstream = service = ""
        server = self.server
        if was == RELAYING and server is not None:
            server.active -= 1
            upstream = server.name
            if flows is not None:
                bi, bo = flows[0].nbytes, flows[1].nbytes
                server.bytes_in += bi
                server.bytes_out += bo
        if self.route is not None:
            service = self.route.service
        sniffed = self.sniffed
        if sniffed is None:
            plane.bus.publish(ConnClosed(self.listener.name, self.peer, service, upstream, bi, bo,
                                         plane.loop.time() - self.t0, reason))
        else:
            plane.bus.publish(ConnClosed(self.listener.name, self.peer, service, upstream, bi, bo,
                                         plane.loop.time() - self.t0, reason, sniffed.protocol, sniffed.name or "",
                                         ",".join(sniffed.alpn)))
        # The flows point back at this connection: let go of them, so that it is freed now by
        # reference counting rather than later by the cycle collector.
        self.flows = None

    def _unregister(self) -> None:
        plane = self.plane
        plane.conns.discard(self)
        plane.admission.remove_tcp(self)
        self.listener.active -= 1


_SCRATCH = bytearray(65536)


class _Lingering(Handler):
    """A client socket closed cleanly: FIN now, then what the client still sends is read and dropped
    until it closes too, LINGER_BYTES were dropped or LINGER_TIME passed (nginx's lingering_close)."""

    LINGER_TIME = 2.0
    LINGER_BYTES = 64 << 20

    __slots__ = ("left", "poller", "shared", "sock", "timer")

    def __init__(self, plane: DataPlane, sock: RawSocket, mask: int, shared: bool) -> None:
        self.poller = poller = plane.poller
        self.sock = sock
        self.shared = shared
        self.left = self.LINGER_BYTES
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            poller.close(sock)
            return
        fd = sock.fileno()
        # The socket stays in the epoll set: this object takes its events from now on.
        if mask < 0:
            poller.add(fd, IN, self)
        else:
            poller.handlers[fd] = self
            if mask != IN:
                poller.modify(fd, IN)
        self.timer = plane.loop.call_later(self.LINGER_TIME, self._done)

    def on_event(self, fd: int, events: int) -> None:
        self._drain()

    def _drain(self) -> None:
        view = memoryview(_SCRATCH)
        while self.left > 0:
            try:
                n = self.sock.recv_into(view)
            except BlockingIOError:
                return
            except OSError:
                break
            if n == 0:
                break
            self.left -= n
        self.timer.cancel()
        self._done()

    def _done(self) -> None:
        if self.shared and self.sock.fileno() >= 0:
            self.poller.remove(self.sock.fileno())  # a handoff endpoint may still hold the file
        self.poller.close(self.sock)


def _kind_of(data: bytes) -> str:
    b = data[:1]
    if b == b"\x16":
        return "tls"
    if b == b"<":
        return "xmpp"
    if data[:4] == b"SSH-":
        return "ssh"
    return "http"


def listener_settings_summary(s: ListenerSettings) -> tuple[object, ...]:
    """The socket options that force a new socket when they change on reload."""
    return (s.backlog, s.reuseport)
