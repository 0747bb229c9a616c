"""The two records of a request agree: the HttpRequest event the edge publishes on its bus and the
HttpRequestLog given to `on_request` (driven through ClientConnection and UpstreamConnection with
in-memory transports)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from edgeward.config.loader import validate
from edgeward.config.schema import HttpSettings
from edgeward.config.units import parse_target
from edgeward.events import EventBus, HttpRequest, Peer
from edgeward.http import HttpProxy, HttpRequestLog, HttpRoute, HttpRoutes, HttpUpstream
from edgeward.http.exchange import ClientConnection
from edgeward.http.upstream import UpstreamConnection
from edgeward.upstream.pool import Pool, Server


class MemoryTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        for p in parts:
            self.out += p

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: t\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
            b"Connection: keep-alive\r\n\r\nhello")


@pytest.mark.parametrize("peer_given", [True, False])
def test_event_and_log_agree(loop: asyncio.AbstractEventLoop, peer_given: bool) -> None:
    server = Server(parse_target("http://127.0.0.1:9"))
    upstream = HttpUpstream("web", Pool("web", [server]), "http")
    routes = HttpRoutes([HttpRoute(upstream, ("a.test",))])
    bus = EventBus()
    events: list[HttpRequest] = []
    bus.subscribe(HttpRequest, events.append)
    logs: list[HttpRequestLog] = []
    proxy = HttpProxy(routes, validate(HttpSettings, {}), on_request=logs.append, events=bus, loop=loop)
    peer = Peer("192.0.2.7", 4321, False)
    conn = ClientConnection(proxy, routes, ("192.0.2.7", 4321), ("127.0.0.1", 8080), scheme="http", redirect=False,
                            https_port=443, via_proxy=False, listener="web-in", peer=peer if peer_given else None)
    client = MemoryTransport()
    conn.connection_made(client)  # type: ignore[arg-type]
    up = UpstreamConnection(proxy, server, upstream)
    up.connection_made(MemoryTransport())  # type: ignore[arg-type]
    proxy.put_idle(up)

    conn.data_received(b"GET /x?y=1 HTTP/1.1\r\nHost: a.test\r\n\r\n")
    up.data_received(RESPONSE)
    conn.data_received(b"POST /nowhere HTTP/1.1\r\nHost: b.test\r\nContent-Length: 0\r\n\r\n")
    conn.data_received(b"GET /bad HTTP/1.1\r\n\r\n")  # no Host: 400, then closed

    assert [e.status for e in events] == [200, 404, 400]
    assert len(logs) == 3
    for ev, rec in zip(events, logs, strict=True):
        assert ev == HttpRequest(rec.listener or rec.local, Peer(rec.client, rec.client_port, rec.via_proxy),
                                 rec.service or "", rec.scheme, rec.host or "", rec.method, rec.path, rec.query,
                                 rec.status, rec.bytes_in, rec.bytes_out, rec.duration, rec.upstream or "",
                                 rec.upgraded, rec.error or "")
    first = events[0]
    assert (first.listener, first.service, first.host, first.method, first.path, first.query, first.upstream) == (
        "web-in", "web", "a.test", "GET", "/x", "y=1", server.name)
    assert first.peer == peer and (first.peer is peer) == peer_given
    assert events[1].error == "no_route" and events[1].service == ""
    assert client.closed


def test_no_event_built_without_subscribers(loop: asyncio.AbstractEventLoop) -> None:
    routes = HttpRoutes()
    bus = EventBus()
    proxy = HttpProxy(routes, validate(HttpSettings, {}), events=bus, loop=loop)
    conn = ClientConnection(proxy, routes, ("192.0.2.7", 1), ("127.0.0.1", 80), scheme="http", redirect=False,
                            https_port=443, via_proxy=False)
    conn.connection_made(MemoryTransport())  # type: ignore[arg-type]
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert proxy.counters["responses_4xx"] == 1
    assert conn.peer_ is None  # nothing asked for the Peer: no event was made


def test_a_closed_connection_is_no_cycle_garbage(loop: asyncio.AbstractEventLoop) -> None:
    """Closed client and upstream connections are freed by reference counting, not left to the
    cycle collector (whose runs cost every new connection, TLS ones most)."""
    server = Server(parse_target("http://127.0.0.1:9"))
    upstream = HttpUpstream("web", Pool("web", [server]), "http")
    routes = HttpRoutes([HttpRoute(upstream)])
    proxy = HttpProxy(routes, validate(HttpSettings, {}), loop=loop)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            conn = ClientConnection(proxy, routes, ("192.0.2.7", 1), ("127.0.0.1", 80), scheme="http",
                                    redirect=False, https_port=443, via_proxy=False)
            conn.connection_made(MemoryTransport())  # type: ignore[arg-type]
            up = UpstreamConnection(proxy, server, upstream)
            up.connection_made(MemoryTransport())  # type: ignore[arg-type]
            proxy.put_idle(up)
            conn.data_received(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            up.data_received(RESPONSE)
            conn.close()
            conn.connection_lost(None)
            up.close()
            up.connection_lost(None)
            del conn, up
        gc.collect()
        leaked = [type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith(("edgeward", "httptools"))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert leaked == []
