"""TCP listeners and the life of one connection: admit → sniff → route → connect → relay.

Everything here runs on the event loop through add_reader/add_writer on plain
non-blocking sockets (no asyncio streams or transports): a connection costs a
few small objects, and relayed bytes move with splice() without entering Python.

Sniffing peeks (MSG_PEEK): the client's first bytes stay in the kernel, so the
upstream receives them byte for byte. While a peeked prefix is incomplete,
SO_RCVLOWAT is raised above what is already queued so that the socket only
becomes readable again when more bytes arrive (no busy loop on level-triggered
polling). A trusted PROXY header is the one thing read for real, because it is
the edge's to consume.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING

from .. import codec
from ..routing import Facts, Route
from ..upstream.pool import Server
from .flow import BufferedFlow, Flow, SpliceFlow

if TYPE_CHECKING:
    from ..config.schema import ListenerSettings
    from ..server import Edge, ListenerRuntime

log = logging.getLogger("edgeward.tcp")

# States of a connection
SNIFFING, CONNECTING, RELAYING, CLOSED = 1, 2, 3, 4


def make_listen_socket(host: str, port: int, backlog: int, reuseport: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class TcpListener:
    """One bound TCP port. Survives reloads when its address and socket options stay the same."""

    __slots__ = ("active", "edge", "host", "key", "name", "paused", "port", "rt", "sock")

    def __init__(self, edge: Edge, host: str, port: int, rt: ListenerRuntime, sock: socket.socket) -> None:
        self.edge = edge
        self.host = host
        self.port = port
        self.key = ("tcp", host, port)
        self.rt = rt  # swapped on reload; each connection keeps the one it started with
        self.name = rt.name
        self.sock = sock
        self.active = 0
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.edge.loop.add_reader(self.sock.fileno(), self._on_accept)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.edge.loop.remove_reader(self.sock.fileno())

    def close(self) -> None:
        self.pause()
        self.sock.close()

    def _on_accept(self) -> None:
        edge = self.edge
        for _ in range(64):
            try:
                sock, peer = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting briefly rather than spin on the ready socket.
                    edge.count("accept_errors", self.name, errno.errorcode.get(e.errno or 0, "?"))
                    self.pause()
                    edge.loop.call_later(0.1, self._retry_accept)
                    log.error("accept on %s:%d failed: %s; pausing 100ms", self.host, self.port, e)
                return
            edge.admit(self, sock, peer)

    def _retry_accept(self) -> None:
        if not self.edge.draining and self.sock.fileno() >= 0:
            self.resume()


class TcpConn:
    """One client connection and, once routed, its upstream connection."""

    __slots__ = (
        "armed",
        "client",
        "client_ip",
        "client_port",
        "edge",
        "flows",
        "last",
        "listener",
        "local",
        "lowat",
        "peeked",
        "proxy_in",
        "route",
        "rt",
        "server",
        "sniff_timer",
        "sniffed",
        "state",
        "t0",
        "tried",
        "up",
    )

    def __init__(self, edge: Edge, listener: TcpListener, sock: socket.socket, ip: str, port: int) -> None:
        self.edge = edge
        self.listener = listener
        self.rt: ListenerRuntime = listener.rt
        self.client = sock
        self.client_ip = ip
        self.client_port = port
        self.local: tuple[str, int] | None = None
        self.up: socket.socket | None = None
        self.state = SNIFFING
        self.route: Route | None = None
        self.server: Server | None = None
        self.tried: tuple[Server, ...] = ()
        self.sniff_timer: asyncio.TimerHandle | None = None
        self.sniffed: codec.Sniffed | None = None
        self.proxy_in: codec.ProxyHeader | None = None
        self.flows: tuple[Flow, Flow] | None = None
        self.peeked = 0
        self.lowat = False
        self.armed = False
        self.last = edge.now
        self.t0 = edge.loop.time()  # same clock as the sniff timers

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
            self._fail("client_error")
            return
        if data == b"":
            self._fail("closed_during_sniff")
            return
        if data is None:
            self._arm()
        else:
            self._sniff(data, final=False)

    def _arm(self) -> None:
        """Wait for (more) first bytes: a reader on the client and the sniff deadline."""
        self.armed = True
        self.edge.loop.add_reader(self.client.fileno(), self._on_sniff_readable)
        s = self.rt.settings
        first = s.server_first_wait if 0 < s.server_first_wait < s.sniff_timeout else s.sniff_timeout
        self.sniff_timer = self.edge.loop.call_later(first, self._on_sniff_timer)

    def _stop_sniffing(self) -> None:
        if self.armed:
            self.armed = False
            self.edge.loop.remove_reader(self.client.fileno())
        if self.sniff_timer is not None:
            self.sniff_timer.cancel()
            self.sniff_timer = None
        if self.lowat:
            self.lowat = False
            try:
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass

    def _on_sniff_readable(self) -> None:
        try:
            data = self.client.recv(self.rt.settings.sniff_bytes, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self._fail("client_error")
            return
        if not data:
            self._fail("closed_during_sniff")
            return
        if self.lowat and len(data) <= self.peeked:
            # Readable with SO_RCVLOWAT above what is queued, yet nothing new: the client sent FIN
            # (a shut-down socket is readable whatever the low-water mark says). Its prefix can
            # never complete, and polling again would wake at once, forever: close it now.
            self.edge.report(self, "sniff_half_closed")
            self._fail("sniff_half_closed")
            return
        self._sniff(data, final=False)

    def _sniff(self, data: bytes, final: bool) -> None:
        if self.proxy_in is None and codec.looks_like_proxy(data):
            if not self.rt.trusts(self.client_ip):
                self.edge.report(self, "proxy_untrusted")
                self._fail("proxy_untrusted")
                return
            try:
                hdr = codec.parse_proxy(data)
            except codec.CodecError:
                self.edge.report(self, "proxy_invalid")
                self._fail("proxy_invalid")
                return
            if hdr is codec.NEED_MORE:
                self._wait_more(len(data), final)
                return
            assert isinstance(hdr, codec.ProxyHeader)
            self._consume_proxy(hdr)
            return
        if not self.rt.table.needs_sniff:
            self._stop_sniffing()
            self._route(None, None, ())
            return
        try:
            res = codec.sniff(data, final=final or len(data) >= self.rt.settings.sniff_bytes)
        except codec.CodecError:
            # Malformed input of a known protocol: counted and reported, then treated as unknown
            # so a listener's default route may still take it.
            self.edge.report(self, "bad_" + _kind_of(data))
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
            self._fail("sniff_timeout")
            return
        # Readable again only once more than `have` bytes are queued.
        self.peeked = have
        if not self.armed:
            self._arm()
        try:
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, have + 1)
            self.lowat = True
        except OSError:
            self._fail("client_error")

    def _consume_proxy(self, hdr: codec.ProxyHeader) -> None:
        # The header belongs to the edge: read it for real so the upstream never sees it.
        try:
            got = self.client.recv(hdr.length)
        except OSError:
            self._fail("client_error")
            return
        if len(got) != hdr.length:
            self._fail("proxy_invalid")
            return
        self.proxy_in = hdr
        if hdr.command == "PROXY" and hdr.src is not None:
            self.edge.rebind_client(self, hdr.src[0], hdr.src[1])
            if self.state == CLOSED:
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
        self.sniff_timer = None
        s = self.rt.settings
        elapsed = self.edge.loop.time() - self.t0
        server_first = 0 < s.server_first_wait <= elapsed + 0.001 or not self.rt.table.needs_sniff
        if self.peeked == 0 and server_first:
            # A silent client on a server-speaks-first listener: route it by its listener's default.
            try:
                data = self.client.recv(s.sniff_bytes, socket.MSG_PEEK)
            except BlockingIOError:
                data = b""
            except OSError:
                self._fail("client_error")
                return
            if not data:
                self._stop_sniffing()
                self._route("unknown", None, ())
                return
        if elapsed + 0.001 < s.sniff_timeout:
            self.sniff_timer = self.edge.loop.call_later(s.sniff_timeout - elapsed, self._on_sniff_timer)
            return
        # Bytes are queued but never completed a message (a complete or unrecognisable one would
        # have been routed already): a stalled client, closed rather than sent to a default route.
        self.edge.report(self, "sniff_timeout")
        self._fail("sniff_timeout")

    # ------------------------------------------------------------------ route + connect
    def _route(self, protocol: str | None, name: str | None, alpn: tuple[str, ...]) -> None:
        self.state = CONNECTING
        ip = None
        if self.rt.table.uses_source:  # parsing the address costs; only source routes need it
            try:
                ip = ipaddress.ip_address(self.client_ip)
            except ValueError:
                ip = ipaddress.ip_address("0.0.0.0")
        route = self.rt.table.lookup(Facts(protocol, name, alpn, ip))
        if route is None:
            self._fail("no_route")
            return
        self.route = route
        self._connect_next()

    def _connect_next(self) -> None:
        route = self.route
        assert route is not None
        pool = route.pool
        if len(self.tried) > pool.retries:
            self._fail("upstream_unreachable")
            return
        server = pool.pick(self.edge.client_key(self.client_ip), self.tried, self.edge.clock())
        if server is None:
            self._fail("no_server" if not self.tried else "upstream_unreachable")
            return
        self.tried += (server,)
        self.server = server
        t = server.target
        try:
            if t.unix_path is not None:
                up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                addr: object = t.unix_path
            else:
                host = t.host
                assert host is not None
                port = t.port or self.listener.port
                up = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                   socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                addr = (host, port)
        except OSError as e:
            log.warning("cannot make upstream socket: %s", e)
            self._fail("upstream_socket")
            return
        self.up = up
        err = up.connect_ex(addr)  # type: ignore[arg-type]
        if err in (0, errno.EINPROGRESS, errno.EAGAIN):
            self.edge.loop.add_writer(up.fileno(), self._on_connected)
            self.sniff_timer = self.edge.loop.call_later(route.connect_timeout, self._on_connect_timeout)
        else:
            self._connect_failed(err)

    def _on_connect_timeout(self) -> None:
        self.sniff_timer = None
        self._connect_failed(errno.ETIMEDOUT)

    def _connect_failed(self, err: int) -> None:
        up = self.up
        if up is not None:
            self.edge.loop.remove_writer(up.fileno())
            up.close()
            self.up = None
        if self.sniff_timer is not None:
            self.sniff_timer.cancel()
            self.sniff_timer = None
        route, server = self.route, self.server
        assert route is not None and server is not None
        route.pool.connect_failed(server, self.edge.clock())
        self.edge.count("connect_failures", route.pool.name, server.name)
        log.debug("connect to %s failed: %s", server.name, errno.errorcode.get(err, err))
        self.server = None
        self._connect_next()

    def _on_connected(self) -> None:
        up = self.up
        assert up is not None
        err = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(err)
            return
        self.edge.loop.remove_writer(up.fileno())
        if self.sniff_timer is not None:
            self.sniff_timer.cancel()
            self.sniff_timer = None
        route, server = self.route, self.server
        assert route is not None and server is not None
        route.pool.connect_succeeded(server)
        if route.proxy_protocol != "off":
            try:
                up.send(self._proxy_header(route.proxy_protocol))
            except OSError:
                self._fail("upstream_error")
                return
        server.active += 1
        server.total += 1
        self.state = RELAYING
        self.edge.started(self)
        self._start_relay()

    def _proxy_header(self, version: str) -> bytes:
        if self.local is None:
            try:
                la = self.client.getsockname()
                self.local = (la[0], la[1])
            except OSError:
                self.local = ("0.0.0.0", 0)
        src = (self.client_ip, self.client_port)
        if version == "v1":
            return codec.build_proxy_v1(src, self.local)
        sn = self.sniffed
        alpn = sn.alpn[0] if sn is not None and sn.protocol == "tls" and sn.alpn else None
        authority = sn.name if sn is not None else None
        return codec.build_proxy_v2(src, self.local, alpn=alpn, authority=authority)

    # ------------------------------------------------------------------ relay
    def _start_relay(self) -> None:
        up = self.up
        assert up is not None
        edge = self.edge
        if edge.splice:
            c2u: Flow = SpliceFlow(edge.loop, self.client, up, self._flow_done, self._flow_error, self._touch, edge.pipes)
            u2c: Flow = SpliceFlow(edge.loop, up, self.client, self._flow_done, self._flow_error, self._touch, edge.pipes)
        else:
            c2u = BufferedFlow(edge.loop, self.client, up, self._flow_done, self._flow_error, self._touch)
            u2c = BufferedFlow(edge.loop, up, self.client, self._flow_done, self._flow_error, self._touch)
        self.flows = (c2u, u2c)
        c2u.start()
        u2c.start()

    def _touch(self) -> None:
        self.last = self.edge.now

    def _flow_done(self) -> None:
        flows = self.flows
        if flows is not None and flows[0].eof and flows[1].eof and not flows[0].pending and not flows[1].pending:
            self.close("done")

    def _flow_error(self, exc: BaseException) -> None:
        self.close("reset")

    # ------------------------------------------------------------------ end
    def _fail(self, reason: str) -> None:
        self.edge.count("refused", self.listener.name, reason)
        self.close(reason)

    def close(self, reason: str = "closed") -> None:
        if self.state == CLOSED:
            return
        was = self.state
        self.state = CLOSED
        loop = self.edge.loop
        if self.sniff_timer is not None:
            self.sniff_timer.cancel()
            self.sniff_timer = None
        if self.flows is not None:
            # The flows own every registration of both sockets while relaying.
            for f in self.flows:
                f.stop()
        else:
            if self.armed:
                loop.remove_reader(self.client.fileno())
            if self.up is not None:
                loop.remove_writer(self.up.fileno())
        if self.up is not None:
            self.up.close()
        self.client.close()
        if was == RELAYING and self.server is not None:
            self.server.active -= 1
        self.edge.ended(self, was == RELAYING)


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
