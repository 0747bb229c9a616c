"""A connection to an upstream HTTP server: response parsing, keep-alive, the raw tunnel after 101.

One exchange at a time (the edge never pipelines to upstreams). Between exchanges the connection
waits in its HttpProxy's idle list, still read so that a close by the upstream is seen at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

import httptools

from ..upstream.pool import Server
from .outbox import Sender
from .request import Headers, Rejected
from .timer import Timer

if TYPE_CHECKING:
    from .exchange import Exchange
    from .proxy import HttpProxy
    from .routes import HttpUpstream

log = logging.getLogger("edgeward.http")

# Bounds on an upstream's response head: generous (Set-Cookie, CSP) but finite.
MAX_RESPONSE_HEAD = 256 * 1024
MAX_RESPONSE_FIELDS = 500


class IdleUpstreams:
    """Keep-alive connections to upstream servers waiting for a request, by (server, route), one
    set per HttpProxy. Here rather than in proxy.py so that it is compiled with the exchange that
    takes and returns a connection for every request."""

    __slots__ = ("_by_key", "closed", "idle_timeout", "keepalive")

    def __init__(self, keepalive: int, idle_timeout: float) -> None:
        self.keepalive = keepalive  # at most this many per (server, route)
        self.idle_timeout = idle_timeout
        self.closed = False  # the proxy retired or is draining: nothing is kept
        self._by_key: dict[tuple[Server, HttpUpstream], list[UpstreamConnection]] = {}

    def take(self, server: Server, route: HttpUpstream) -> UpstreamConnection | None:
        conns = self._by_key.get((server, route))
        while conns:
            conn = conns.pop()  # most recently used first: the others may time out
            t = conn.transport
            if not conn.closed and t is not None and not t.is_closing():
                conn.timer.stop()
                return conn
        return None

    def put(self, conn: UpstreamConnection) -> None:
        conn.exchange = None
        if self.closed or conn.closed:
            conn.close()
            return
        conns = self._by_key.get(conn.key)
        if conns is None:
            conns = self._by_key[conn.key] = []
        if len(conns) >= self.keepalive:
            conn.close()
            return
        if conn.read_paused:
            conn.resume_reading()  # an idle connection is read, so that its close is seen
        conn.timer.start("idle", self.idle_timeout, idle=False)
        conns.append(conn)

    def drop(self, conn: UpstreamConnection) -> None:
        conns = self._by_key.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def close_all(self) -> None:
        """Close every idle connection, and keep none from now on."""
        self.closed = True
        for conns in list(self._by_key.values()):
            for conn in list(conns):
                conn.close()
        self._by_key.clear()

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())


class _HeadResponseDone(Exception):
    """Raised from on_headers_complete to stop llhttp after a HEAD response's head.

    httptools cannot tell llhttp that a response has no body (HEAD), so llhttp would wait for
    Content-Length bytes that never come; the parser is replaced instead."""


class _Unsolicited(Exception):
    """A response begins where none was asked for (the edge never pipelines to upstreams)."""


class UpstreamConnection(Sender):
    """The asyncio protocol of one upstream connection (not a subclass of asyncio.Protocol, like
    ClientConnection: a native class when compiled). Its writes go out at the end of the loop's
    turn (outbox.py)."""

    __slots__ = ("eof", "exchange", "fed", "feeding", "fresh", "head_size", "headers", "idle", "idle_after_feed", "key",
                 "parser", "proxy",
                 "read_paused", "reason", "requests", "route", "server", "status", "timer",
                 "tunnel", "version", "write_paused")

    def __init__(self, proxy: HttpProxy, server: Server, route: HttpUpstream) -> None:
        super().__init__(proxy.outbox)
        self.proxy = proxy
        self.idle = proxy.idle  # (held: the proxy's attributes are dict lookups, this one is per response)
        self.server = server
        self.route = route
        self.key = (server, route)
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)  # None in a tunnel
        self.exchange: Exchange | None = None
        self.timer = Timer(proxy.wheel, self, UpstreamConnection._timeout)
        self.read_paused = False
        self.write_paused = False
        self.eof = False
        self.tunnel = False
        self.requests = 0
        self.feeding = False  # inside parser.feed_data
        self.idle_after_feed = False  # reusable: goes to the idle list once the read is parsed
        self.fed = 0
        self.status = 0
        self.reason = b""
        self.headers: Headers = []
        self.head_size = 0
        self.fresh = True  # no byte of the next response has arrived
        self.version: str | None = None  # the response's version, read off its first bytes (see data_received)

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # An idle keep-alive connection has nothing to say; bytes here would desynchronize the
            # next response.
            self.close()
            return
        if self.tunnel:
            ex.tunnel_from_upstream(data)
            return
        ex.upstream_bytes += len(data)
        self.fed += len(data)
        if self.fresh:
            # A response's first bytes are its status line: its version is there, and reading it
            # costs less than httptools' get_http_version() (a str.format). llhttp parses and
            # checks the same bytes; anything else (a first read shorter than this) asks llhttp.
            self.fresh = False
            head = data[:9]
            self.version = "1.1" if head == b"HTTP/1.1 " else "1.0" if head == b"HTTP/1.0 " else None
        parser = self.parser
        assert parser is not None  # only a tunnel has none, and its bytes are relayed above
        self.feeding = True
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._feed_failed(ex, data, e)
        else:
            if self.fed > MAX_RESPONSE_HEAD and self.exchange is ex:
                ex.upstream_failed(self, 502, "upstream: response head too large")
        finally:
            self.feeding = False
        timer = self.timer
        if timer.kind and timer.idle:
            # Still waiting for the rest of the response (a whole response in this read stopped its
            # timer already: no clock read for it).
            timer.touch()
        if self.idle_after_feed:
            # Pooled only now that the whole read is parsed: nothing in it may pass for the
            # response to another request.
            self.idle_after_feed = False
            if not self.closed:
                self.idle.put(self)

    def _feed_failed(self, ex: Exchange, data: bytes, e: Exception) -> None:
        """llhttp stopped: an upgrade, a callback's exception, or a malformed response."""
        if isinstance(e, httptools.HttpParserUpgrade):
            if self.status != 101:
                ex.upstream_failed(self, 502, "upstream: unexpected protocol switch")
                return
            ex.switch_protocols(self.reason, self.headers, data[e.args[0]:])
        elif isinstance(e, httptools.HttpParserCallbackError):
            cause = e.__context__
            if isinstance(cause, _Unsolicited):
                self.proxy.counters["upstream_unsolicited"] += 1
                self.idle_after_feed = False
                self.close()
            elif isinstance(cause, _HeadResponseDone):
                self.parser = httptools.HttpResponseParser(self)
                self.fed = 0
                self.fresh = True
                # Nothing may follow a HEAD response's head: the edge sends no other request yet.
                ex.response_complete(self, reusable=data.endswith(b"\r\n\r\n"))
            elif isinstance(cause, Rejected):
                ex.upstream_failed(self, cause.status, f"upstream: {cause.reason}")
            else:
                log.error("HTTP upstream %s: error while handling its response", self.server.name, exc_info=cause)
                ex.upstream_failed(self, 502, "upstream: edge error")
        else:
            ex.upstream_failed(self, 502, f"upstream: malformed response ({e})")

    def eof_received(self) -> bool | None:
        self.eof = True
        ex = self.exchange
        if self.tunnel and ex is not None:
            return ex.tunnel_eof_from_upstream()
        return None  # close; connection_lost says what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.out = None
        self.timer.cancel()
        self.parser = None  # bound to this connection: freed at once, not by the cycle collector
        ex = self.exchange
        if ex is not None:
            ex.upstream_lost(self)
        else:
            self.proxy.idle.drop(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.exchange
        if ex is not None:
            ex.upstream_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.exchange
        if ex is not None:
            ex.upstream_write_resumed()

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.exchange is None:
            raise _Unsolicited()  # bytes after the response, in the same read
        self.fresh = False  # (a final response in the same read as a 100 Continue: llhttp tells its version)
        self.status = 0
        self.reason = b""
        self.headers = []
        self.head_size = 0

    def on_status(self, reason: bytes) -> None:
        self.reason += reason
        self.fed = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fed = 0
        self.head_size += len(name) + len(value) + 4
        self.headers.append((name, value))
        if self.head_size > MAX_RESPONSE_HEAD or len(self.headers) > MAX_RESPONSE_FIELDS:
            raise Rejected(502, "response head too large")

    def on_headers_complete(self) -> None:
        self.fed = 0
        ex = self.exchange
        assert ex is not None
        parser = self.parser
        assert parser is not None  # called by it
        status = parser.get_status_code()
        self.status = status
        version = self.version
        self.version = None  # read off the first response of a read only (an interim one's, maybe)
        if status < 200:
            if status != 101:  # 101 continues in data_received (HttpParserUpgrade)
                ex.response_interim(status, self.reason, self.headers)
            return
        ex.response_head(status, self.reason, self.headers, version or parser.get_http_version(),
                         parser.should_keep_alive())
        if ex.is_head:
            raise _HeadResponseDone()

    def on_body(self, body: bytes) -> None:
        self.fed = 0
        ex = self.exchange
        assert ex is not None
        ex.response_body(body)

    def on_message_complete(self) -> None:
        self.fed = 0
        self.fresh = True
        if self.status < 200:
            return
        ex = self.exchange
        assert ex is not None
        ex.response_complete(self, reusable=True)

    # --- used by the exchange and the proxy -------------------------------------------------

    def pause_reading(self) -> None:
        if not self.read_paused and not self.closed and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.closed and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.send_out()
            self.closed = True
            self.timer.cancel()
            if self.transport is not None:
                self.transport.close()
            self.proxy.idle.drop(self)

    def abort(self) -> None:
        """Close at once, dropping unsent bytes (the exchange on it failed)."""
        if not self.closed:
            self.out = None
            self.closed = True
            self.timer.cancel()
            if self.transport is not None:
                self.transport.abort()
            self.proxy.idle.drop(self)

    def _timeout(self, kind: str) -> None:
        ex = self.exchange
        if kind == "idle" or ex is None:
            self.proxy.counters["upstream_idle_closed"] += 1
            self.close()
            return
        if self.read_paused:
            # The client is not reading the response: its own stall timer decides.
            self.timer.start(kind, self.timer.timeout, idle=True)
            return
        ex.upstream_timeout(self)
