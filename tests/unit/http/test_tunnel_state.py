"""An upgraded connection keeps only what relaying needs: after the 101 both parsers and both
heads' fields are let go of, and bytes still flow both ways (in-memory transports)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from edgeward.config.loader import validate
from edgeward.config.schema import HttpSettings
from edgeward.config.units import parse_target
from edgeward.http import HttpProxy, HttpRoute, HttpRoutes, HttpUpstream
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


def test_tunnel_keeps_no_parser_and_no_head_fields(loop: asyncio.AbstractEventLoop) -> None:
    server = Server(parse_target("http://127.0.0.1:9"))
    upstream = HttpUpstream("ws", Pool("ws", [server]), "http")
    routes = HttpRoutes([HttpRoute(upstream)])
    proxy = HttpProxy(routes, validate(HttpSettings, {}), loop=loop)
    conn = ClientConnection(proxy, routes, ("192.0.2.7", 4321), ("127.0.0.1", 8080), scheme="http", redirect=False,
                            https_port=443, via_proxy=False)
    client = MemoryTransport()
    conn.connection_made(client)  # type: ignore[arg-type]
    up = UpstreamConnection(proxy, server, upstream)
    up_t = MemoryTransport()
    up.connection_made(up_t)  # type: ignore[arg-type]
    proxy.put_idle(up)

    conn.data_received(b"GET /chat HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nearly")
    proxy.outbox.flush()  # the end of the loop's turn (http/outbox.py)
    assert b"Upgrade: websocket\r\n" in up_t.out and b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" in up_t.out
    assert conn.parser is None and not up_t.out.endswith(b"early")  # held until the 101
    up.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello")
    proxy.outbox.flush()  # the end of the loop's turn (http/outbox.py)
    assert client.out.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in client.out and client.out.endswith(b"hello")
    assert up_t.out.endswith(b"early")

    ex = conn.tunnel
    assert ex is not None and ex.switched and ex.head is not None
    assert up.parser is None and conn.parser is None
    assert ex.head.headers == [] and up.headers == []
    conn.data_received(b"\x81\x05ping!")
    proxy.outbox.flush()  # the end of the loop's turn (http/outbox.py)
    up.data_received(b"\x81\x05pong!")
    proxy.outbox.flush()  # the end of the loop's turn (http/outbox.py)
    assert up_t.out.endswith(b"\x81\x05ping!") and client.out.endswith(b"\x81\x05pong!")
    assert ex.head.method == b"GET" and ex.head.path == b"/chat" and ex.head.host == "a.test"
