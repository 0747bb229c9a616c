"""A client connection and the request/response exchanges on it.

`ClientConnection` is the asyncio Protocol of one client (plain or TLS, the transport decrypts).
httptools (llhttp, strict) parses requests; every request becomes an `Exchange` that routes it,
gets an upstream connection (idle keep-alive or new), streams the body both ways, and ends with one
`HttpRequestLog`. Requests a client pipelines are parsed while the one before is answered and then
wait, with reading paused, so at most one read's worth of them is held.

Backpressure, both directions: when the upstream's write buffer is full the client is not read,
and when the client's is full the upstream is not read. Memory per exchange is bounded by the
transports' high-water marks plus one read, however large the body (a 2 GB upload is never held).

Timeouts (one timer each side, see timer.py): keep-alive and header (absolute), body (the client
stalls while the edge waits for it), response (the upstream stalls while the edge waits for it),
stall (the client does not read what the edge writes), upgraded (no byte either way in a tunnel).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import ssl
import time
from typing import TYPE_CHECKING, Literal, cast

import httptools

from ..events import EventBus, HttpRequest, Peer
from ..net.sockets import upstream_tcp
from ..upstream.pool import Server
from . import forwarding, pages
from .log import HttpRequestLog
from .outbox import Sender
from .paths import routing_path
from .request import Headers, Rejected, RequestHead, validate_request
from .routes import HttpRoutes, HttpUpstream, IPAddress, certificate_pin
from .timer import Timer
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from .proxy import HttpProxy

log = logging.getLogger("edgeward.http")

# Why a client is not being read (bits; reading resumes when none is left).
PAUSE_UPSTREAM = 1  # the upstream's write buffer is full
PAUSE_BUFFER = 2  # body bytes wait for an upstream connection
PAUSE_QUEUE = 4  # a pipelined request waits for the one before it
PAUSE_TUNNEL = 8  # bytes after an upgrade request wait for the upstream's 101

HIGH_WATER = 64 * 1024  # body bytes held while no upstream connection can take them
RELEASE_AFTER = 1.0  # an idle keep-alive client connection keeps its parser this long (seconds)
LINGER = 5.0  # after an early final response, how long the rest of a request body is read and dropped
DISCARD_LIMIT = 64 * 1024  # a body rest this small is read and dropped after a local answer, keeping the connection
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_CHUNK_END = b"\r\n"
_STATUS_KEYS = {i: f"responses_{i}xx" for i in range(1, 6)}
_LAST_CHUNK = b"0\r\n\r\n"
_new_tuple = tuple.__new__
_METHODS = {m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE")}


def line_version(line: bytes, method: bytes, target: bytes) -> str | None:
    """The version of the request whose line begins `line` ("METHOD SP target SP HTTP/1.x CRLF")
    when llhttp parsed `method` and `target` from those bytes: read off them with native compiled
    operations, cheaper than httptools' get_http_version() (a str.format). None when `line` does
    not hold that whole line (a head cut across reads, leading empty lines): llhttp is asked."""
    m = len(method)
    i = m + len(target) + 2  # where "HTTP/1.x" starts
    if len(line) < i + 10 or line[m] != 32 or line[i - 1] != 32 or line[i + 8] != 13 or line[:m] != method:
        return None
    if line[i:i + 7] != b"HTTP/1.":
        return None
    d = line[i + 7]
    return "1.1" if d == 49 else "1.0" if d == 48 else None


def _client_address(host: str) -> tuple[str, IPAddress | None]:
    try:
        a = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host, None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    text = str(a)
    return (host if text == host else text), a


def _client_ip(host: str) -> str:
    """The client's address as the logs and the forwarded headers spell it (IPv4-mapped reduced,
    zone id dropped, IPv6 compressed). An IPv4 address is already spelled so (ipaddress accepts
    only the canonical dotted form): no parsing, and no address object kept per connection."""
    if ":" not in host and "%" not in host:
        return host
    return _client_address(host)[0]


class Exchange:
    """One request and its response."""

    __slots__ = (
        "body_buf",
        "body_buf_size",
        "body_in",
        "bytes_out",
        "client",
        "client_framing",
        "close_after",
        "connect_task",
        "continued",
        "error",
        "excluded",
        "finished",
        "head",
        "head_bytes",
        "headers",
        "held",
        "is_head",
        "local",
        "req_done",
        "req_sent",
        "resp_done",
        "resp_started",
        "retried",
        "reused",
        "route",
        "server",
        "started",
        "status",
        "switched",
        "trailer_bytes",
        "tunnel_buf",
        "tunnel_buf_size",
        "tunnel_eof",
        "upstream",
        "upstream_bytes",
        "upstream_framing",
        "upstream_reusable",
        "url",
        "wrote_upstream",
    )

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.started = client.loop.time()  # (the wall-clock start, for the access log, is derived from it at the end)
        self.url: list[bytes] = []
        self.headers: Headers = []
        self.head: RequestHead | None = None
        self.head_bytes = 0
        self.trailer_bytes = 0
        self.is_head = False
        self.route: HttpUpstream | None = None
        self.server: Server | None = None
        self.upstream: UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.excluded: tuple[Server, ...] = ()
        self.reused = False
        self.retried = False
        self.local = False  # the edge answers itself
        self.body_buf: list[bytes] = []
        self.body_buf_size = 0
        self.body_in = 0
        self.req_done = False  # the client sent the whole request
        self.req_sent = False  # ... and the upstream got all of it
        self.continued = False  # a 100 Continue reached the client
        self.resp_started = False
        self.resp_done = False
        self.client_framing = forwarding.NO_BODY
        self.upstream_framing = forwarding.NO_BODY
        self.upstream_reusable = False
        self.upstream_bytes = 0
        self.close_after = False
        self.status = 0
        self.bytes_out = 0
        self.error: str | None = None
        self.finished = False
        self.switched = False
        self.tunnel_buf: list[bytes] = []
        self.tunnel_buf_size = 0
        self.tunnel_eof = 0  # bit 1: client sent EOF, bit 2: upstream sent EOF
        self.held: tuple[bytes, ...] = ()  # for the upstream, until the client's bytes carrying it parsed cleanly
        self.wrote_upstream = False

    # --- request side (called by the client's parser) ---------------------------------------

    def request_body(self, data: bytes) -> None:
        self.body_in += len(data)
        c = self.client
        if c.read_timer.kind == "body":
            c.read_timer.touch()
        elif not c.read_timer.kind and self is c.current and not self.resp_done:
            # Body bytes after Expect: 100-continue without waiting for the 100: the client drives now.
            c.read_timer.start("body", c.settings.body_timeout, idle=True)
            up = self.upstream
            if up is not None and up.timer.kind == "response" and not up.write_paused:
                up.timer.stop()
        if self.resp_done or self.local:
            return  # answered already; the rest of the body is dropped
        up = self.upstream
        if up is not None:
            self._send_body(up, data)
        else:
            self.body_buf.append(data)
            self.body_buf_size += len(data)
            if self.body_buf_size > HIGH_WATER:
                c.pause(PAUSE_BUFFER)

    def _send(self, up: UpstreamConnection, *parts: bytes) -> None:
        """Write to the upstream; while the client's bytes are being parsed, hold it until they all
        parsed cleanly, so that nothing of a request rejected in the same read is forwarded."""
        if self.client.feeding:
            self.held += parts
            self.client.held = self
            return
        if up.transport is None or up.closed:
            return
        self.wrote_upstream = True
        up.write_parts(parts)

    def flush_held(self) -> None:
        up = self.upstream
        held = self.held
        self.held = ()
        if held and up is not None and up.transport is not None and not up.closed:
            self.wrote_upstream = True
            up.write_parts(held)

    def _send_body(self, up: UpstreamConnection, data: bytes) -> None:
        assert self.head is not None
        if self.head.chunked:
            self._send(up, b"%x\r\n" % len(data), data, _CHUNK_END)
        else:
            self._send(up, data)

    def request_complete(self) -> None:
        self.req_done = True
        c = self.client
        if c.read_timer.kind == "body" and self is c.current:
            c.read_timer.stop()
        up = self.upstream
        if up is not None and not self.resp_done:
            self._send_end(up)
        self.maybe_finish()

    def _send_end(self, up: UpstreamConnection) -> None:
        assert self.head is not None
        if self.head.chunked:
            self._send(up, _LAST_CHUNK)
        self.req_sent = True
        if not up.timer.kind:
            up.timer.start("response", self.client.settings.response_timeout, idle=True)

    # --- routing and the upstream connection ------------------------------------------------

    def start(self) -> None:
        """The request head is complete and this is the client's current exchange: answer it."""
        head = self.head
        assert head is not None
        c = self.client
        if head.has_body and not head.expect_continue and not self.req_done:
            c.read_timer.start("body", c.settings.body_timeout, idle=True)
        else:
            c.read_timer.stop()
        proxy = c.proxy
        if c.scheme == "http" and proxy.acme_http01 is not None:
            token = pages.acme_token(head.path)
            if token is not None:
                try:
                    answer = proxy.acme_http01(token)
                except Exception:
                    log.exception("ACME HTTP-01 responder failed")
                    answer = None
                if answer is not None:
                    proxy.counters["acme_http01_answered"] += 1
                    self.local_response(200, answer.encode(), content_type=b"text/plain")
                    return
                if c.redirect:
                    proxy.counters["acme_http01_unknown"] += 1
                    self.local_response(404, error="acme:unknown_token")
                    return
        routes = c.routes
        route = None if c.redirect else routes.lookup(head.host, routing_path(head.path) if routes.uses_paths else head.path,
                                                        c.client_addr if routes.uses_source else None)
        if route is None:
            if head.host is not None and ((c.redirect and routes.serves(head.host)) or routes.redirects(head.host)):
                self.redirect_response(head)
            elif routes.serves(head.host) or c.scheme == "http":
                self.local_response(404, error="no_route")
            else:
                self.local_response(421, error="no_route")  # a name this TLS listener does not serve
            return
        self.route = route
        if route.service is not c.service:  # a connection moving to another service: rare
            c.service = route.service
            if proxy.on_service is not None:
                proxy.on_service(c, route.service)
        self.acquire()

    def redirect_response(self, head: RequestHead) -> None:
        host = head.host or ""
        authority = f"[{host}]" if ":" in host else host
        port = self.client.https_port
        location = b"https://" + authority.encode() + (b":%d" % port if port != 443 else b"") + head.target
        self.client.proxy.counters["redirects"] += 1
        self.local_response(0, redirect=location)

    def acquire(self) -> None:
        """Pick a server and get a connection to it (idle first)."""
        route = self.route
        assert route is not None
        c = self.client
        pool = route.pool
        # Only source-hash balancing reads the client's key (Pool.pick).
        server = pool.pick(c.client_key() if pool.balance == "source-hash" else b"", self.excluded, time.monotonic())
        if server is None:
            if not self.excluded:
                self.local_response(503, error="upstream:no_server")
            else:
                timed_out = self.error == "upstream:connect_timeout"
                self.local_response(504 if timed_out else 502, error=self.error)
            return
        if not self.retried:
            conn = c.idle.take(server, route)
            if conn is not None:
                c.counters["upstream_reused"] += 1
                self.attach(conn, server, reused=True)
                return
        self.server = server
        self.connect_task = c.loop.create_task(self._connect(server))

    async def _connect(self, server: Server) -> None:
        route = self.route
        assert route is not None
        c = self.client
        proxy = c.proxy
        target = server.target
        assert target.host is not None and target.port is not None  # http(s):// targets always have both
        sni = (route.server_name or target.host) if route.ssl is not None else None
        timed_out = False
        try:
            async with asyncio.timeout(route.connect_timeout):
                # The socket comes from net/sockets.py, where every upstream socket is made.
                sock, addr = upstream_tcp(target, target.port)
                try:
                    await c.loop.sock_connect(sock, addr)  # type: ignore[arg-type]
                    _, proto = await c.loop.create_connection(
                        lambda: cast(asyncio.BaseProtocol, UpstreamConnection(proxy, server, route)), sock=sock,
                        ssl=route.ssl, server_hostname=sni)
                    conn = cast(UpstreamConnection, proto)
                except BaseException:
                    sock.close()
                    raise
            if route.pin is not None and not _pin_matches(conn, route.pin):
                conn.close()
                proxy.counters["upstream_pin_mismatch"] += 1
                log.warning("HTTP upstream %s of service %s: certificate does not match upstream_tls.pin",
                            server.name, route.service)
                raise ssl.SSLError("certificate pin mismatch")
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, ssl.SSLError, ssl.CertificateError) as e:
            timed_out = isinstance(e, TimeoutError)
            self.connect_task = None
            route.pool.connect_failed(server, time.monotonic())
            proxy.counters["upstream_connect_failed"] += 1
            log.info("HTTP upstream %s of service %s: connect failed: %s", server.name, route.service,
                     "timeout" if timed_out else e)
            if self.finished:
                return
            self.excluded += (server,)
            self.error = "upstream:connect_timeout" if timed_out else "upstream:connect"
            if len(self.excluded) <= route.pool.retries:
                self.acquire()
            else:
                self.local_response(504 if timed_out else 502, error=self.error)
            return
        self.connect_task = None
        route.pool.connect_succeeded(server)
        proxy.counters["upstream_connected"] += 1
        if self.finished or self.resp_done:
            proxy.idle.put(conn)  # the client left meanwhile; the connection is fresh and useful
            return
        self.attach(conn, server, reused=False)

    def attach(self, conn: UpstreamConnection, server: Server, *, reused: bool) -> None:
        head = self.head
        assert head is not None
        c = self.client
        self.upstream = conn
        self.server = server
        self.reused = reused
        conn.exchange = self
        conn.requests += 1
        server.active += 1
        server.total += 1
        if conn.read_paused:
            conn.resume_reading()
        self._send(conn, forwarding.upstream_request_head(head, client_ip=c.client_ip, scheme=c.scheme, trusted=c.trusted))
        if self.body_buf:
            for chunk in self.body_buf:
                self._send_body(conn, chunk)
            self.body_buf = []
            self.body_buf_size = 0
        if c.pause_bits & PAUSE_BUFFER:
            c.resume(PAUSE_BUFFER)
        if self.req_done:
            self._send_end(conn)
        elif head.expect_continue and not self.body_in:
            conn.timer.start("response", c.settings.response_timeout, idle=True)
        if head.upgrade is not None and not conn.timer.kind:
            conn.timer.start("response", c.settings.response_timeout, idle=True)

    def release_upstream(self, *, reuse: bool) -> None:
        conn = self.upstream
        if conn is None:
            return
        self.upstream = None
        if self.server is not None:
            self.server.active -= 1
            self.server.bytes_in += self.body_in
            self.server.bytes_out += self.upstream_bytes
        conn.exchange = None
        conn.timer.stop()
        self.held = ()
        if (reuse or not self.wrote_upstream) and not conn.closed:
            # Reusable, or never written to (the request was refused before anything went out).
            if conn.feeding:
                conn.idle_after_feed = True
            else:
                self.client.idle.put(conn)
        elif self.resp_done:
            conn.close()
        else:
            conn.abort()

    # --- response side (called by the upstream's parser) ------------------------------------

    def response_interim(self, status: int, reason: bytes, headers: Headers) -> None:
        c = self.client
        assert self.head is not None
        if self.head.version == b"1.1" and not self.resp_started and not c.closed:
            data = forwarding.interim_response_head(status, reason, headers)
            c.write(data)
            self.bytes_out += len(data)
        if status == 100 and not self.continued:
            self.continued = True
            up = self.upstream
            if not self.req_done:
                if not c.read_timer.kind:
                    c.read_timer.start("body", c.settings.body_timeout, idle=True)
                if up is not None and up.timer.kind == "response" and not up.write_paused:
                    up.timer.stop()

    def response_head(self, status: int, reason: bytes, headers: Headers, version: str, keep_alive: bool) -> None:
        head = self.head
        assert head is not None
        c = self.client
        resp = forwarding.validate_response(status, reason, headers, version=version, request_method=head.method,
                                            parser_keep_alive=keep_alive)
        client_keep_alive = (head.keep_alive and (self.req_done or not (head.chunked or head.content_length))
                             and head.upgrade is None and not c.closing and not c.proxy.closing)
        data, framing = forwarding.client_response_head(resp, client_v11=head.version == b"1.1",
                                                        keep_alive=client_keep_alive)
        self.status = status
        self.client_framing = framing
        self.upstream_framing = resp.framing
        self.upstream_reusable = resp.upstream_keep_alive
        if not client_keep_alive or framing == forwarding.UNTIL_CLOSE:
            self.close_after = True
        self.resp_started = True
        c.write(data)
        self.bytes_out += len(data)

    def response_body(self, data: bytes) -> None:
        c = self.client
        if c.closed:
            return
        self.bytes_out += len(data)
        if self.client_framing == forwarding.CHUNKED:
            c.write_parts((b"%x\r\n" % len(data), data, _CHUNK_END))
        elif self.client_framing != forwarding.NO_BODY:
            c.write(data)

    def response_complete(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        if self.resp_done or conn is not self.upstream:
            return
        if self.client_framing == forwarding.CHUNKED:
            self.client.write(_LAST_CHUNK)
            self.bytes_out += len(_LAST_CHUNK)
        self.resp_done = True
        if not self.req_done:
            self.close_after = True  # the client is still sending a body nobody reads
        self.release_upstream(reuse=reusable and self.upstream_reusable and self.req_sent and not conn.eof)
        self.maybe_finish()

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        """The upstream connection closed while this exchange used it."""
        if conn is not self.upstream:
            return
        c = self.client
        if self.switched:
            self.upstream = None
            if self.server is not None:
                self.server.active -= 1
            c.close()
            self.finish()
            return
        if self.resp_started:
            if self.upstream_framing == forwarding.UNTIL_CLOSE and conn.eof:
                self.response_complete(conn, reusable=False)  # a body delimited by the upstream's close
                return
            self.release_upstream(reuse=False)
            self.error = "upstream:closed_early"
            c.proxy.counters["upstream_closed_early"] += 1
            self.abort()
            return
        self.release_upstream(reuse=False)
        head = self.head
        assert head is not None
        if (self.reused and not self.retried and not self.upstream_bytes and head.method in IDEMPOTENT
                and not head.has_body and head.upgrade is None):
            # A kept-alive connection the upstream closed as it was reused: the request never
            # reached it, so it is safe to send again, on a new connection.
            self.retried = True
            c.proxy.counters["upstream_retried"] += 1
            self.acquire()
            return
        c.proxy.counters["upstream_closed_early"] += 1
        self.local_response(502, error="upstream:closed")

    def upstream_failed(self, conn: UpstreamConnection, status: int, reason: str) -> None:
        """The upstream sent something the edge will not pass on."""
        if conn is not self.upstream:
            conn.abort()
            return
        self.client.proxy.counters["upstream_bad_response"] += 1
        log.info("HTTP upstream %s: %s", conn.server.name, reason)
        self.release_upstream(reuse=False)
        if self.resp_started:
            self.error = reason
            self.abort()
        else:
            self.local_response(status, error=reason)

    def upstream_timeout(self, conn: UpstreamConnection) -> None:
        if conn is not self.upstream:
            return
        self.client.proxy.counters["timeout_response"] += 1
        self.release_upstream(reuse=False)
        if self.resp_started:
            self.error = "timeout:response"
            self.abort()
        else:
            self.local_response(504, error="timeout:response")

    def upstream_write_paused(self) -> None:
        self.client.pause(PAUSE_UPSTREAM)
        up = self.upstream
        if up is not None and not up.timer.kind and not self.switched:
            # The edge now waits for the upstream to take the body.
            up.timer.start("response", self.client.settings.response_timeout, idle=True)

    def upstream_write_resumed(self) -> None:
        self.client.resume(PAUSE_UPSTREAM)
        up = self.upstream
        if up is not None and up.timer.kind == "response":
            if self.req_sent or self.resp_started:
                up.timer.touch()
            else:
                up.timer.stop()  # the client drives the body again

    # --- upgraded connections ---------------------------------------------------------------

    def switch_protocols(self, reason: bytes, headers: Headers, rest: bytes) -> None:
        head = self.head
        assert head is not None
        conn = self.upstream
        assert conn is not None
        c = self.client
        if head.upgrade is None or c.tunnel is not self:
            self.upstream_failed(conn, 502, "upstream: switched protocols unasked")
            return
        self.switched = True
        self.status = 101
        self.resp_started = True
        conn.tunnel = True
        conn.timer.stop()
        data = forwarding.switching_protocols_head(reason, headers)
        # Raw bytes from now on, for hours maybe: what only parsing needed is let go of (the
        # parsers and both heads' fields, about 3.5 KiB of a websocket's memory).
        conn.parser = None
        headers.clear()
        head.headers.clear()
        c.write(data)
        self.bytes_out += len(data)
        c.proxy.counters["upgraded"] += 1
        c.read_timer.start("upgraded", c.settings.upgraded_timeout, idle=True)
        for chunk in self.tunnel_buf:
            conn.write(chunk)
        self.tunnel_buf = []
        self.tunnel_buf_size = 0
        c.resume(PAUSE_TUNNEL)
        if rest:
            self.tunnel_from_upstream(rest)
        if self.tunnel_eof & 1:
            self._tunnel_write_eof(conn)

    def tunnel_from_client(self, data: bytes) -> None:
        c = self.client
        self.body_in += len(data)
        conn = self.upstream
        if self.switched and conn is not None:
            c.read_timer.touch()
            conn.write(data)
            return
        if self.finished or self.resp_started:
            return  # the upgrade was refused: the connection closes after the response
        self.tunnel_buf.append(data)
        self.tunnel_buf_size += len(data)
        if self.tunnel_buf_size > HIGH_WATER:
            c.pause(PAUSE_TUNNEL)

    def tunnel_from_upstream(self, data: bytes) -> None:
        c = self.client
        self.bytes_out += len(data)
        self.upstream_bytes += len(data)
        if c.read_timer.kind:
            c.read_timer.touch()
        c.write(data)

    def tunnel_eof_from_client(self) -> bool:
        """The client half-closed a tunnel: pass the EOF on; keep reading the other way if possible."""
        self.tunnel_eof |= 1
        conn = self.upstream
        if not self.switched or conn is None:
            return True  # waiting for the 101: the EOF is passed on after it
        return self._tunnel_write_eof(conn)

    def _tunnel_write_eof(self, conn: UpstreamConnection) -> bool:
        t = conn.transport
        if self.tunnel_eof & 2 or t is None or not t.can_write_eof():
            self.client.close()
            conn.close()
            return False
        conn.send_out()
        t.write_eof()
        return True

    def tunnel_eof_from_upstream(self) -> bool:
        self.tunnel_eof |= 2
        c = self.client
        t = c.transport
        conn = self.upstream
        if self.tunnel_eof & 1 or t is None or not t.can_write_eof():
            c.close()
            if conn is not None:
                conn.close()
            return False
        c.send_out()
        t.write_eof()
        return True

    # --- the edge's own answers and the end -------------------------------------------------

    def local_response(self, status: int, body: bytes | None = None, *, error: str | None = None,
                       content_type: bytes = b"text/plain", redirect: bytes | None = None) -> None:
        """Answer without an upstream: an error page, a redirect, an ACME key authorization."""
        c = self.client
        head = self.head
        self.release_upstream(reuse=False)
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self.local = True
        self.error = error
        is_head = head is not None and head.method == b"HEAD"
        # A small rest of a Content-Length body is read and dropped so the connection stays usable;
        # a large or chunked one (or one held back by Expect) means closing after the answer.
        unread_body = head is not None and head.has_body and not self.req_done and not (
            head.content_length is not None and not head.expect_continue
            and head.content_length - self.body_in <= DISCARD_LIMIT)
        close = (head is None or not head.keep_alive or unread_body or c.closing or c.proxy.closing
                 or head.upgrade is not None)
        if redirect is not None:
            assert head is not None
            data = pages.redirect(redirect, permanent_method_safe=head.method in (b"GET", b"HEAD"), close=close, head=is_head)
            status = 301 if head.method in (b"GET", b"HEAD") else 308
        elif body is not None:
            data = pages.response(status, body, content_type=content_type, close=close, head=is_head)
        else:
            data = pages.error_page(status, close=close, head=is_head)
        if head is not None and head.version == b"1.0" and not close:
            data = data.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n", 1)
        self.status = status
        self.resp_started = True
        self.resp_done = True
        self.close_after = self.close_after or close
        c.write(data)
        self.bytes_out += len(data)
        self.maybe_finish()

    def server_name(self) -> str | None:
        if self.server is None or self.route is None:
            return None
        names = self.client.proxy.server_names
        name = names.get(self.server)
        if name is None:
            name = names[self.server] = self.server.name
        return name

    def abort(self) -> None:
        """Give up on the exchange: the client connection closes (a response may be cut short)."""
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self.release_upstream(reuse=False)
        self.close_after = True
        self.client.close()
        self.finish()

    def maybe_finish(self) -> None:
        if not self.finished and self.resp_done and (self.req_done or self.close_after):
            self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        c = self.client
        status = self.status if self.resp_started else 499
        c.counters[_STATUS_KEYS[status // 100] if 1 <= status // 100 <= 5 else "responses_other"] += 1
        services = c.service_stats
        if services is not None:
            # Counted here rather than by a subscriber of HttpRequest: with no access log and no
            # jail reading HTTP statuses, no request builds an event at all.
            route = self.route
            st = services[route.service if route is not None and route.service else "-"]
            st.requests += 1
            st.bytes_in += self.head_bytes + self.body_in
            st.bytes_out += self.bytes_out
        events = c.events
        if (events is not None and events.wants(HttpRequest)) or c.on_request is not None:
            self._report(status, events)
        c.exchange_done(self)

    def _report(self, status: int, events: EventBus | None) -> None:
        """The request's record: an HttpRequest event on the bus (when someone subscribed), and an
        HttpRequestLog for `on_request`."""
        c = self.client
        proxy = c.proxy
        head = self.head
        if head is not None:
            method = _METHODS.get(head.method) or head.method.decode("latin-1")
            path = head.path.decode("latin-1")
            query = head.query.decode("latin-1") if head.query else ""
            host = head.host
        else:
            url = b"".join(self.url)
            method, path, query, host = "-", url[:1024].decode("latin-1") or "-", "", None
        route = self.route
        service = route.service if route is not None else None
        bytes_in = self.head_bytes + self.body_in
        duration = c.loop.time() - self.started
        upstream = self.server_name()
        if events is not None and events.wants(HttpRequest):
            try:
                # Built as the tuple it is: a NamedTuple's own __new__ is interpreted code (~0.2 µs).
                events.publish(_new_tuple(HttpRequest, (
                    c.listener, c.peer(), service or "", c.scheme, host or "", method, path, query, status, bytes_in,
                    self.bytes_out, duration, upstream or "", self.switched, self.error or "")))
            except Exception:
                log.exception("HttpRequest subscriber failed")
        if proxy.on_request is not None:
            try:
                proxy.on_request(HttpRequestLog(
                    time.time() - duration, c.client_ip, c.client_port, c.via_proxy, c.local, c.scheme, service, host,
                    method, path, query, status, bytes_in, self.bytes_out, duration, upstream, self.switched,
                    self.error, c.listener))
            except Exception:
                log.exception("on_request callback failed")


class _StopParsing(Exception):
    """Raised from a parser callback to stop reading a connection that is closing."""


def _pin_matches(conn: UpstreamConnection, pin: bytes) -> bool:
    t = conn.transport
    sslobj = t.get_extra_info("ssl_object") if t is not None else None
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    return der is not None and hmac.compare_digest(certificate_pin(der), pin)


class ClientConnection(Sender):
    """The asyncio protocol of one client connection. Not a subclass of asyncio.Protocol (the loops
    only call its methods): so mypyc compiles it to a native class (see setup.py). Its writes go
    out at the end of the loop's turn (outbox.py)."""

    __slots__ = (
        "addr_",
        "client_ip",
        "client_port",
        "closing",
        "counters",
        "current",
        "events",
        "fed",
        "feeding",
        "head_size",
        "held",
        "https_port",
        "idle",
        "last_parsed",
        "line",
        "lingering",
        "listener",
        "local",
        "loop",
        "on_request",
        "parser",
        "parsing",
        "pause_bits",
        "peer_",
        "proxy",
        "queue",
        "read_timer",
        "redirect",
        "rejected",
        "routes",
        "scheme",
        "service",
        "service_stats",
        "settings",
        "trusted",
        "tunnel",
        "via_proxy",
        "write_timer",
    )

    def __init__(self, proxy: HttpProxy, routes: HttpRoutes, client: tuple[str, int], local: tuple[str, int], *,
                 scheme: str, redirect: bool, https_port: int, via_proxy: bool, listener: str = "",
                 peer: Peer | None = None) -> None:
        super().__init__(proxy.outbox)
        self.proxy = proxy
        self.settings = proxy.settings
        self.loop = proxy.loop
        # What every request reaches for, held here: the proxy is an interpreted object, each of
        # its attributes a dict lookup, and these never change in its lifetime.
        self.counters = proxy.counters
        self.idle = proxy.idle
        self.service_stats = proxy.service_stats
        self.events = proxy.events
        self.on_request = proxy.on_request
        self.routes = routes
        self.client_ip = _client_ip(client[0])
        self.client_port = client[1]
        self.addr_: IPAddress | Literal[False] | None = False  # False: not parsed yet (see client_addr)
        self.trusted = proxy.trusts(self.client_addr) if proxy.trusts_anyone else False
        self.local = proxy.local_name(local)
        self.listener = listener or self.local  # the edge's name for the listener, for the logs
        self.scheme = scheme
        self.redirect = redirect
        self.service = ""  # the service of its latest routed request (who is on: proxy.on_service)
        self.https_port = https_port
        self.via_proxy = via_proxy
        # The edge's Peer of this client, for the HttpRequest events (built on first use otherwise).
        self.peer_ = peer if peer == (self.client_ip, self.client_port, via_proxy) else None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.parsing: Exchange | None = None
        self.last_parsed: Exchange | None = None
        self.current: Exchange | None = None
        self.queue: list[Exchange] | None = None  # pipelined requests waiting (rare, short)
        self.pause_bits = 0
        self.read_timer = Timer(proxy.wheel, self, ClientConnection._read_timeout)
        self.write_timer: Timer[ClientConnection] | None = None  # made when the client first stops reading what the edge writes
        self.fed = 0
        self.head_size = 0
        self.tunnel: Exchange | None = None
        self.closing = False
        self.lingering = False
        self.rejected: tuple[int, str, Exchange | None] | None = None
        self.feeding = False  # inside parser.feed_data: writes upstream are held (Exchange._send)
        self.held: Exchange | None = None  # the exchange holding such writes
        # The read a request began in at its first byte, while it is parsed (see line_version).
        self.line: bytes | None = None

    @property
    def client_addr(self) -> IPAddress | None:
        """The client's address as an object (source routes, trusted proxies), parsed when first
        needed: most connections never need it."""
        a = self.addr_
        if a is False:
            a = self.addr_ = _client_address(self.client_ip)[1]
        return a

    def client_key(self) -> bytes:
        """The client for source-hash balancing (packed address)."""
        a = self.client_addr
        return a.packed if a is not None else self.client_ip.encode()

    def peer(self) -> Peer:
        p = self.peer_
        if p is None:
            p = self.peer_ = Peer(self.client_ip, self.client_port, self.via_proxy)
        return p

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's. Both loops set TCP_NODELAY themselves.
        self.transport = cast(asyncio.Transport, transport)
        self.proxy.connection_made(self)
        if self.closed:  # closed (a ban reached admission) before the loop handed the transport over
            transport.close()
            return
        self.read_timer.start("header", self.settings.header_timeout, idle=False)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.tunnel_from_client(data)
            return
        if self.lingering or self.closed or self.rejected is not None:
            return
        self.fed += len(data)
        if self.parsing is None:
            self.line = data  # a request starting here starts at its first byte (or after empty lines)
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpRequestParser(self)
        while True:
            self.feeding = True
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade as e:
                self.line = None
                self.feeding = False
                self._flush_held()
                ex = self.last_parsed
                if ex is None or ex.head is None or ex.head.upgrade is None:
                    # llhttp saw an upgrade the edge does not do (h2c): the bytes after it are the
                    # next request.
                    data = data[e.args[0]:]
                    if data:
                        continue
                    return
                self.tunnel = ex
                self.last_parsed = None
                self.parser = None  # never parses again: a tunnel, or closed after a refused upgrade
                rest = data[e.args[0]:]
                if rest:
                    ex.tunnel_from_client(rest)
            except httptools.HttpParserCallbackError as e:
                self.line = None
                self._drop_held()
                cause = e.__context__
                if isinstance(cause, _StopParsing):
                    pass
                elif isinstance(cause, Rejected):
                    self.reject(cause.status, cause.reason)
                else:
                    log.error("HTTP client %s: error while handling its request", self.client_ip, exc_info=cause)
                    self.reject(500, "edge error")
            except httptools.HttpParserError as e:
                self.line = None
                self._drop_held()
                self.reject(400, f"malformed request: {e}")
            else:
                self.line = None  # not kept past its read: a head cut across reads asks llhttp
                self.feeding = False
                if self.fed > self.settings.max_header_bytes:
                    # llhttp is collecting one field (or trailer) that never ends.
                    self._drop_held()
                    self.reject(431, "header field too large")
                else:
                    held = self.held
                    if held is not None:
                        self.held = None
                        held.flush_held()
                    self.last_parsed = None  # only the upgrade case above needs it; idle connections keep nothing
                    p = self.parsing
                    if p is not None and p.head is None and p is self.current and self.read_timer.kind != "header":
                        # A head left incomplete by this read: from now on it has header_timeout.
                        self.read_timer.start("header", self.settings.header_timeout, idle=False)
            return

    def _flush_held(self) -> None:
        ex = self.held
        if ex is not None:
            self.held = None
            ex.flush_held()

    def _drop_held(self) -> None:
        """A parse error: what the failing request would have sent upstream is dropped; what an
        earlier, complete request of the same read holds goes out."""
        self.feeding = False
        ex = self.held
        if ex is not None:
            self.held = None
            if ex is self.parsing or not ex.req_done:
                ex.held = ()
            else:
                ex.flush_held()

    def eof_received(self) -> bool | None:
        ex = self.tunnel
        if ex is not None:
            return ex.tunnel_eof_from_client()
        cur = self.current
        if cur is not None and cur.head is not None and cur.req_done and not cur.finished and self.parsing is None:
            # The client half-closed after its request: it may still read the response.
            self.closing = True
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.out = None
        self.read_timer.cancel()
        if self.write_timer is not None:
            self.write_timer.cancel()
        self.proxy.connection_lost(self)
        for ex in (self.current, *(self.queue or ())):
            if ex is not None and not ex.finished:
                if ex.connect_task is not None:
                    ex.connect_task.cancel()
                    ex.connect_task = None
                if not ex.resp_done and not ex.switched:
                    ex.error = "client_closed"
                ex.release_upstream(reuse=False)
                ex.finish()
        self.queue = None
        self.current = None
        self.tunnel = None
        # The parser's callbacks are bound methods of this connection: without it, nothing here
        # is a reference cycle, and the connection is freed at once rather than by the collector.
        self.parser = None

    def pause_writing(self) -> None:
        ex = self.current
        timeout = self.settings.upgraded_timeout if self.tunnel is not None else self.settings.body_timeout
        if self.write_timer is None:
            self.write_timer = Timer(self.proxy.wheel, self, ClientConnection._write_timeout)
        self.write_timer.start("stall", timeout, idle=False)
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.write_timer is not None:
            self.write_timer.stop()
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()
            if ex.upstream.timer.kind:
                ex.upstream.timer.touch()

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.lingering or self.closed or self.rejected is not None:
            # The connection ends after what was answered: bytes after it in the same read are
            # not another request.
            raise _StopParsing()
        ex = Exchange(self)
        if self.parsing is not None or self.last_parsed is not None:
            self.line = None  # not the read's first request: its line is not at the read's start
        self.parsing = ex
        self.head_size = 0
        self.fed = 0
        if self.current is None:
            self.current = ex
        else:
            if self.queue is None:
                self.queue = [ex]
            else:
                self.queue.append(ex)
            self.pause(PAUSE_QUEUE)

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        self.fed = 0
        ex.url.append(url)
        self.head_size += len(url)
        if self.head_size > self.settings.max_header_bytes:
            raise Rejected(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        self.fed = 0
        size = len(name) + len(value) + 4
        if ex.head is not None:
            # A trailer field: dropped (the body is re-chunked; RFC 9110 6.5.1 lets a recipient
            # discard trailers), but bounded like the head.
            ex.trailer_bytes += size
            if ex.trailer_bytes > self.settings.max_header_bytes:
                raise Rejected(431, "trailer too large")
            return
        self.head_size += size
        ex.headers.append((name, value))
        if self.head_size > self.settings.max_header_bytes:
            raise Rejected(431, "request head too large")
        if len(ex.headers) > self.settings.max_headers:
            raise Rejected(431, "too many header fields")

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        self.fed = 0
        ex.head_bytes = self.head_size + 16
        parser = self.parser
        assert parser is not None  # called by it
        method = parser.get_method()
        target = b"".join(ex.url)
        line = self.line
        version = None
        if line is not None:
            self.line = None
            version = line_version(line, method, target)
        head = validate_request(method, target, version or parser.get_http_version(), ex.headers)
        ex.head = head
        ex.is_head = head.method == b"HEAD"
        if ex is self.current:
            ex.start()

    def on_body(self, body: bytes) -> None:
        self.fed = 0
        ex = self.parsing
        assert ex is not None
        if not ex.finished:
            ex.request_body(body)

    def on_message_complete(self) -> None:
        self.fed = 0
        ex = self.parsing
        assert ex is not None
        self.parsing = None
        self.last_parsed = ex
        if not ex.finished:
            ex.request_complete()

    # --- used by exchanges (write and write_parts: Sender's) -----------------------------------

    def pause(self, bit: int) -> None:
        if not self.pause_bits and not self.closed and self.transport is not None:
            self.transport.pause_reading()
        self.pause_bits |= bit

    def resume(self, bit: int) -> None:
        if self.pause_bits & bit:
            self.pause_bits &= ~bit
            if not self.pause_bits and not self.closed and self.transport is not None:
                self.transport.resume_reading()
                if self.read_timer.kind:
                    self.read_timer.touch()

    def close(self) -> None:
        if not self.closed:
            self.send_out()
            self.closed = True
            self.read_timer.cancel()
            if self.write_timer is not None:
                self.write_timer.cancel()
            if self.transport is not None:
                self.transport.close()

    def reject(self, status: int, reason: str) -> None:
        """A request the edge will not forward: answer `status` and close. If an earlier pipelined
        request is still being answered, that answer is finished first."""
        proxy = self.proxy
        proxy.counters["bad_requests"] += 1
        log.debug("HTTP client %s: %d %s", self.client_ip, status, reason)
        if self.lingering or self.closed:
            self.close()  # already answered and closing: the rest was only being drained
            return
        ex = self.parsing
        cur = self.current
        self.parsing = None
        if cur is not None and ex is not cur and not cur.finished:
            # Answer the requests before this one first; this one (queued or partial) waits.
            self.rejected = (status, reason, ex)
            self.pause(PAUSE_QUEUE)
            return
        self.closing = True
        if cur is not None and not cur.finished:
            if cur.resp_started:
                cur.error = reason
                cur.abort()
                return
            cur.local_response(status, error=reason)
            cur.finish()
            return
        self._reject_now(status, reason, ex if ex is not None and not ex.finished else None)

    def _reject_now(self, status: int, reason: str, ex: Exchange | None) -> None:
        """Answer `status` for `ex` (a request whose head never completed, or None) and close."""
        if ex is None:
            ex = Exchange(self)
        self.current = ex
        self.queue = None
        self.closing = True
        ex.local_response(status, error=reason)
        ex.finish()

    def exchange_done(self, ex: Exchange) -> None:
        if ex is not self.current:
            return
        self.current = None
        if self.tunnel is ex:
            self.tunnel = None
        if self.closed:
            return
        if self.rejected is not None:
            status, reason, failed = self.rejected
            self.rejected = None
            self._reject_now(status, reason, failed)
            return
        if ex.close_after or self.closing or ex.switched:
            t = self.transport
            if (ex.head is not None and ex.head.has_body and not ex.req_done and not ex.switched
                    and (ex.error is None or ex.error == "no_route")
                    and t is not None and t.can_write_eof() and not t.is_closing()):
                self.send_out()
                # Lingering close: the client may still be sending the body; reading and dropping it
                # for a moment lets it see the response instead of a reset.
                t.write_eof()
                self.lingering = True
                self.pause_bits = PAUSE_QUEUE
                self.resume(PAUSE_QUEUE)
                self.read_timer.start("linger", LINGER, idle=False)
            else:
                self.close()
            return
        queue = self.queue
        if queue:
            nxt = queue.pop(0)
            self.current = nxt
            if not queue:
                self.resume(PAUSE_QUEUE)
            if nxt.head is None:
                self.read_timer.start("header", self.settings.header_timeout, idle=False)
            else:
                nxt.start()
                if nxt.req_done:
                    nxt.maybe_finish()
            return
        if self.proxy.closing:
            self.close()
            return
        timeout = self.settings.keepalive_timeout
        if timeout > RELEASE_AFTER:
            # Idle for RELEASE_AFTER first: then the parser is let go of ("rest" in _read_timeout).
            self.read_timer.start("rest", RELEASE_AFTER, idle=False)
        else:
            self.read_timer.start("keepalive", timeout, idle=False)

    # --- timeouts ---------------------------------------------------------------------------

    def _read_timeout(self, kind: str) -> None:
        if self.closed:
            return
        if kind == "rest":
            if self.current is None and self.parsing is None and not self.queue and self.tunnel is None:
                # Idle between requests for a while: the parser (llhttp's state and the callbacks it
                # holds, about 900 bytes) is made again when the next request comes.
                self.parser = None
            self.read_timer.start("keepalive", self.settings.keepalive_timeout - RELEASE_AFTER, idle=False)
            return
        proxy = self.proxy
        if kind in ("body", "upgraded") and self.pause_bits & ~PAUSE_QUEUE:
            # Not reading on purpose (the upstream is slow): not the client's fault.
            self.read_timer.start(kind, self.read_timer.timeout, idle=True)
            return
        proxy.counters[f"timeout_{kind}"] += 1
        ex = self.current
        if kind == "header" and self.parsing is not None:
            # Part of a request came, not all of its head: 408 (nothing at all: just close).
            failed = self.parsing
            self.parsing = None
            self.closing = True
            self._reject_now(408, "timeout:header", failed)
            return
        if kind == "body" and ex is not None and not ex.finished:
            self.closing = True
            if ex.resp_started:
                ex.error = "timeout:body"
                ex.abort()
            else:
                ex.local_response(408, error="timeout:body")
                ex.finish()
            return
        if kind == "upgraded" and ex is not None and not ex.finished:
            ex.error = "timeout:upgraded"
            ex.abort()
            return
        self.close()  # keep-alive, header (nothing sent), linger

    def _write_timeout(self, kind: str) -> None:
        if self.closed:
            return
        self.proxy.counters["timeout_stall"] += 1
        ex = self.current
        if ex is not None and not ex.finished:
            ex.error = "timeout:stall"
            ex.abort()
        else:
            self.close()
