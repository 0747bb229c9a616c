"""HttpProxy driven in-process, the way the edge drives it: serve() per accepted socket on uvloop;
retire() on reload, close_idle_clients() on SIGTERM."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import uvloop

from edgeward.config.loader import validate
from edgeward.config.schema import HttpSettings
from edgeward.config.units import parse_target
from edgeward.http import HttpProxy, HttpRequestLog, HttpRoute, HttpRoutes, HttpUpstream
from edgeward.upstream.pool import Pool, Server
from support import ThreadServer


def slow_upstream(delay: float) -> ThreadServer:
    def handle(c: socket.socket) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d:
                    return
                buf += d
            head, _, buf = buf.partition(b"\r\n\r\n")
            if b"/slow" in head:
                time.sleep(delay)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return ThreadServer(handle)


def run_with_proxy(up_port: int, body: Callable[[HttpProxy, int], Awaitable[None]]) -> list[HttpRequestLog]:
    logs: list[HttpRequestLog] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = Server(parse_target(f"http://127.0.0.1:{up_port}"))
        routes = HttpRoutes([HttpRoute(HttpUpstream("s", Pool("p", [server]), "http"))])
        proxy = HttpProxy(routes, validate(HttpSettings, {"redirect": "off"}), on_request=logs.append)
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(64)
        ls.setblocking(False)

        def accept() -> None:
            c, addr = ls.accept()
            c.setblocking(False)
            proxy.serve(c, addr, c.getsockname(), ssl_context=None, scheme="http")
        loop.add_reader(ls.fileno(), accept)
        try:
            await body(proxy, ls.getsockname()[1])
        finally:
            loop.remove_reader(ls.fileno())
            ls.close()
            proxy.close_idle_clients()
    uvloop.run(main())
    return logs


async def request(r: asyncio.StreamReader, w: asyncio.StreamWriter, path: str) -> bytes:
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await r.readuntil(b"\r\n\r\n")
    return head + await r.readexactly(2)


def test_retire_and_drain() -> None:
    up = slow_upstream(0.5)

    async def body(proxy: HttpProxy, port: int) -> None:
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        assert (await request(idle_r, idle_w, "/a")).endswith(b"ok")
        assert proxy.stats()["upstream_idle"] == 1
        proxy.retire()  # a reload replaced it: no upstream connection kept idle any more
        assert proxy.stats()["upstream_idle"] == 0
        assert (await request(idle_r, idle_w, "/b")).endswith(b"ok")  # the client connection carries on
        assert proxy.stats()["upstream_idle"] == 0

        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
        busy_w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.1)
        proxy.close_idle_clients()  # SIGTERM: idle ones now, busy ones after their response
        assert await idle_r.read() == b""
        head = await busy_r.readuntil(b"\r\n\r\n")
        assert b"Connection: close" in head and await busy_r.readexactly(2) == b"ok"
        assert await busy_r.read() == b""
        assert proxy.stats()["clients"] == 0
        idle_w.close()
        busy_w.close()

    try:
        logs = run_with_proxy(up.port, body)
    finally:
        up.close()
    assert [(x.path, x.status) for x in logs] == [("/a", 200), ("/b", 200), ("/slow", 200)]
    assert logs[0].upstream == f"http://127.0.0.1:{up.port}" and logs[0].service == "s"
