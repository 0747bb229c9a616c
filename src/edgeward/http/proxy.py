"""HttpProxy: the HTTP/1.1 reverse proxy the edge hands accepted connections to.

One per runtime: a reload builds a new one and `retire()`s the old, whose live connections
(upgraded WebSockets included) carry on with the routes they started with. It owns the idle
keep-alive connections to upstream servers, its counters, and the set of client connections.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import ssl
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, cast

from ..config.schema import HttpSettings
from ..events import EventBus, Peer
from ..stats import ServiceStats
from ..upstream.pool import Server
from .exchange import ClientConnection
from .log import HttpRequestLog
from .outbox import Outbox
from .routes import HttpRoutes, HttpUpstream, IPAddress
from .timer import TimerWheel
from .tls_transport import TlsTransport
from .upstream import IdleUpstreams

if TYPE_CHECKING:
    from .upstream import UpstreamConnection

log = logging.getLogger("edgeward.http")


class HttpProxy:
    def __init__(self, routes: HttpRoutes, settings: HttpSettings, *,
                 on_request: Callable[[HttpRequestLog], None] | None = None,
                 acme_http01: Callable[[str], str | None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, events: EventBus | None = None) -> None:
        self.routes = routes
        self.settings = settings
        self.on_request = on_request
        # Called when a client connection's request goes to another service than its previous one
        # (its first included): the edge counts who is on per service (webfront.py).
        self.on_service: Callable[[ClientConnection, str], None] | None = None
        self.events = events  # gets an HttpRequest per request, when someone subscribed to them
        self.acme_http01 = acme_http01
        self._loop = loop
        self._wheel: TimerWheel | None = None
        self.outbox = Outbox(loop)  # writes of this proxy's connections, sent at the end of each turn
        self.counters: dict[str, int] = defaultdict(int)
        self.clients: set[ClientConnection] = set()
        self.closing = False
        self.retired = False
        self.idle = IdleUpstreams(settings.upstream_keepalive, settings.upstream_idle_timeout)
        self._accepting: set[asyncio.Task[tuple[asyncio.Transport, asyncio.BaseProtocol]]] = set()
        self._trusted = tuple(ipaddress.ip_network(c, strict=False) for c in settings.trusted_proxies)
        self._trust_cache: dict[IPAddress, bool] = {}
        self._local_names: dict[tuple[str, int], str] = {}
        self.server_names: dict[Server, str] = {}  # the servers of this runtime's pools, named once
        # Requests and bytes per service, counted by each exchange as it ends (the edge's
        # stats.Stats.services; no event needed for them, see Exchange.finish).
        self.service_stats: defaultdict[str, ServiceStats] | None = None
        # (Each client connection keeps its own reference to events, on_request, service_stats,
        # counters and idle, taken when it is made: set them before the proxy serves.)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def wheel(self) -> TimerWheel:
        """The timeouts of this proxy's connections."""
        if self._wheel is None:
            self._wheel = TimerWheel(self.loop)
        return self._wheel

    # --- the entry point --------------------------------------------------------------------

    def serve(self, sock: socket.socket, client: tuple[str, int], local: tuple[str, int], *,
              ssl_context: ssl.SSLContext | None, scheme: Literal["http", "https"],
              redirect_to_https: bool = False, client_from_trusted_proxy: bool = False,
              routes: HttpRoutes | None = None, https_port: int = 443, listener: str = "",
              peer: Peer | None = None) -> ClientConnection:
        """Run one accepted client connection (non-blocking socket; unread bytes, the TLS
        ClientHello included, may still be in it). Takes ownership of `sock`.

        `client` is the real client address; `redirect_to_https` makes this a port-80 connection
        (names the routes serve are redirected to https://name[:https_port]/..., ACME HTTP-01
        challenges answered); `routes` overrides the proxy's routes for this listener."""
        conn = ClientConnection(self, routes if routes is not None else self.routes, client, local, scheme=scheme,
                                redirect=redirect_to_https, https_port=https_port, via_proxy=client_from_trusted_proxy,
                                listener=listener, peer=peer)
        loop = self.loop
        try:
            protocol: object = conn
            if ssl_context is not None:
                # TLS is terminated by the edge's own layer over the plain transport (tls_transport.py).
                protocol = TlsTransport(self, conn, ssl_context)
            coro = loop.connect_accepted_socket(lambda: cast(asyncio.BaseProtocol, protocol), sock=sock)
            task = loop.create_task(coro)
        except Exception:
            sock.close()
            raise
        self._accepting.add(task)
        task.add_done_callback(functools.partial(self._accepted, sock, conn))
        return conn

    def _accepted(self, sock: socket.socket, conn: ClientConnection,
                  task: asyncio.Task[tuple[asyncio.Transport, asyncio.BaseProtocol]]) -> None:
        self._accepting.discard(task)
        if task.cancelled():
            sock.close()
            self.connection_failed(conn)
            return
        exc = task.exception()
        if exc is not None:
            # The client gone before the loop took the socket: nothing to answer.
            self.counters["accept_failed"] += 1
            log.debug("HTTP client connection failed before its first request: %r", exc)
            sock.close()
            self.connection_failed(conn)

    def tls_failed(self, conn: ClientConnection, exc: BaseException) -> None:
        """`conn`'s TLS handshake failed, timed out, or its client left during it (TlsTransport)."""
        self.counters["tls_handshake_failed" if isinstance(exc, ssl.SSLError | TimeoutError | OSError | ValueError)
                      else "accept_failed"] += 1
        log.debug("HTTP client connection failed before its first request: %r", exc)
        self.connection_failed(conn)

    # --- bookkeeping used by connections ----------------------------------------------------

    def connection_made(self, conn: ClientConnection) -> None:
        self.clients.add(conn)
        self.counters["connections"] += 1

    def connection_lost(self, conn: ClientConnection) -> None:
        self.clients.discard(conn)

    def connection_failed(self, conn: ClientConnection) -> None:
        """`conn` never started: its TLS handshake failed or the client left first (a hook for the edge)."""

    @property
    def trusts_anyone(self) -> bool:
        return bool(self._trusted)

    def local_name(self, local: tuple[str, int]) -> str:
        """"address:port" of a listening address, one string shared by its connections."""
        name = self._local_names.get(local)
        if name is None:
            host, port = local
            name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if len(self._local_names) < 1024:
                self._local_names[local] = name
        return name

    def trusts(self, addr: IPAddress | None) -> bool:
        if addr is None or not self._trusted:
            return False
        hit = self._trust_cache.get(addr)
        if hit is None:
            hit = any(addr in n for n in self._trusted)
            if len(self._trust_cache) < 4096:
                self._trust_cache[addr] = hit
        return hit

    def take_idle(self, server: Server, route: HttpUpstream) -> UpstreamConnection | None:
        return self.idle.take(server, route)

    def put_idle(self, conn: UpstreamConnection) -> None:
        self.idle.put(conn)

    def drop_idle(self, conn: UpstreamConnection) -> None:
        self.idle.drop(conn)

    # --- lifecycle --------------------------------------------------------------------------

    def retire(self) -> None:
        """A reload replaced this proxy: keep no upstream connection idle any more. Live client
        connections (upgraded ones included) carry on."""
        self.retired = True
        self.idle.close_all()

    def close_idle_clients(self) -> None:
        """Draining (SIGTERM): close client connections between requests now, the others after
        their current response (keep-alive off). Upgraded connections are left alone."""
        self.closing = True
        self.retire()
        for conn in list(self.clients):
            if conn.tunnel is None and conn.current is None and conn.parsing is None:
                conn.close()
            else:
                conn.closing = True

    def stats(self) -> dict[str, object]:
        return {
            "clients": len(self.clients),
            "upgraded": sum(1 for c in self.clients if c.tunnel is not None),
            "upstream_idle": len(self.idle),
            "counters": dict(self.counters),
        }
