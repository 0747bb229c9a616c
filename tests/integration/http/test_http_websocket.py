"""WebSockets (the `websockets` library on both ends) through the HTTP layer: echo, long idle
periods past every HTTP timeout, early bytes, refused upgrades, TLS, and a reload."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from http_peers import HttpEdge, closed_by_peer, read_response, wss_exchange
from support import free_port, wait_until, write_cert


class WsServer:
    """A websockets echo server on its own thread and loop; counts open connections."""

    def __init__(self) -> None:
        self.port = free_port()
        self.open = 0
        self.headers: list[dict[str, str]] = []
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        assert self._ready.wait(10)

    async def _echo(self, ws: ServerConnection) -> None:
        self.open += 1
        assert ws.request is not None
        self.headers.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        try:
            async for msg in ws:
                await ws.send(msg)
        except ConnectionClosed:
            pass
        finally:
            self.open -= 1

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = self.loop.create_future()
            async with serve(self._echo, "127.0.0.1", self.port, ping_interval=None, max_size=None):
                self._ready.set()
                await self._stop
        self.loop.run_until_complete(main())

    def close(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set_result, None)
        self._t.join(5)


@dataclass
class Env:
    edge: HttpEdge
    ws: WsServer
    port: int
    tls_port: int
    ca: Path
    tmp: Path
    config: str


SHORT = """
[http]
redirect = "off"
header_timeout = "1s"
body_timeout = "1s"
response_timeout = "1s"
keepalive_timeout = "1s"
upgraded_timeout = "{upgraded}"
"""


def config(port: int, tls_port: int, ws_port: int, upgraded: str = "1h") -> str:
    return SHORT.format(upgraded=upgraded) + f"""
[services.ws]
listen = ["127.0.0.1:{port}", "127.0.0.1:{tls_port}"]
names = ["meet.test"]
paths = ["/xmpp-websocket", "/colibri-ws"]
to = "http://127.0.0.1:{ws_port}"
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("ws")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    write_cert(ca, tmp, "edge", "meet.test")
    ws = WsServer()
    port, tls_port = free_port(), free_port()
    text = config(port, tls_port, ws.port)
    edge = HttpEdge(tmp, text, tls=[f"127.0.0.1:{tls_port}"], cert=tmp / "edge.pem", key=tmp / "edge.key",
                    wait=[port, tls_port])
    try:
        yield Env(edge, ws, port, tls_port, tmp / "ca.pem", tmp, text)
    finally:
        edge.stop()
        ws.close()


def ws(env: Env, path: str = "/xmpp-websocket", **kw: object) -> ClientConnection:
    """A websocket to meet.test through the edge's plain listener."""
    return connect(f"ws://meet.test:{env.port}{path}", sock=socket.create_connection(("127.0.0.1", env.port)),
                   ping_interval=None, **kw)  # type: ignore[arg-type]


def test_echo_text_binary_and_large(env: Env) -> None:
    with ws(env, max_size=None) as c:
        c.send("hello")
        assert c.recv(5) == "hello"
        blob = os.urandom(3 << 20)
        c.send(blob)
        assert c.recv(10) == blob
        for i in range(200):
            c.send(f"m{i}")
        assert [c.recv(5) for _ in range(200)] == [f"m{i}" for i in range(200)]
    seen = env.ws.headers[-1]
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["upgrade"] == "websocket"


def test_idle_past_every_http_timeout(env: Env) -> None:
    with ws(env, "/colibri-ws/x/y") as c:
        c.send("before")
        assert c.recv(5) == "before"
        time.sleep(3.5)  # header, body, response and keep-alive timeouts are all 1s here
        c.send("after")
        assert c.recv(5) == "after"


def test_over_tls(env: Env) -> None:
    import ssl
    ctx = ssl.create_default_context(cafile=str(env.ca))
    # (websockets' asyncio client: its sync client is not safe over TLS, see wss_exchange.)
    assert wss_exchange(env.tls_port, f"wss://meet.test:{env.tls_port}/xmpp-websocket", ctx, "meet.test",
                        ["secure", b"\x01" * 70000]) == ["secure", b"\x01" * 70000]
    assert env.ws.headers[-1]["x-forwarded-proto"] == "https"


def _frame(payload: bytes) -> bytes:
    """A masked client text frame (RFC 6455 5.2), for raw tests."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


def test_bytes_sent_right_after_the_upgrade_request_arrive(env: Env) -> None:
    key = base64.b64encode(os.urandom(16))
    with socket.create_connection(("127.0.0.1", env.port)) as s:
        s.sendall(b"GET /xmpp-websocket HTTP/1.1\r\nHost: meet.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n" + _frame(b"early"))
        s.settimeout(5)
        buf = b""
        while b"early" not in buf:
            d = s.recv(4096)
            assert d, buf
            buf += d
        assert buf.startswith(b"HTTP/1.1 101 ") and b"\r\nConnection: upgrade\r\n" in buf
        assert b"Sec-WebSocket-Accept: " in buf


def test_refused_upgrade_is_answered_and_closed(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port)) as s:
        # No Sec-WebSocket-Key: the websockets server refuses with 400.
        s.sendall(b"GET /xmpp-websocket HTTP/1.1\r\nHost: meet.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        r = read_response(s)
        assert r is not None and r.status == 400
        assert closed_by_peer(s)


def test_upgrade_to_a_path_not_routed_is_404(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port)) as s:
        s.sendall(b"GET /elsewhere HTTP/1.1\r\nHost: meet.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n")
        r = read_response(s)
        assert r is not None and r.status == 404


def test_closing_either_side_frees_both(env: Env) -> None:
    env.edge.stats()  # (the first signal also opens uvloop's wakeup pair)
    base = env.edge.fds()
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(ws(env)) for _ in range(10)]
        for c in conns:
            c.send("x")
            assert c.recv(5) == "x"
        assert env.edge.stats()["upgraded"] == 10
    assert wait_until(lambda: env.ws.open == 0 and env.edge.stats()["upgraded"] == 0)
    assert wait_until(lambda: env.edge.fds() <= base + 1), (base, env.edge.fds())
    recs = [r for r in env.edge.records() if r["upgraded"]]
    assert recs and all(r["status"] == 101 and r["service"] == "ws" for r in recs)


def test_survives_a_reload_and_the_upgraded_timeout_applies(env: Env) -> None:
    with ws(env) as c:
        c.send("one")
        assert c.recv(5) == "one"
        # A reload with a short upgraded_timeout: the live connection keeps the proxy (and the
        # settings) it started with; new connections get the new ones.
        env.edge.config_path.write_text(env.config.replace('upgraded_timeout = "1h"', 'upgraded_timeout = "2s"'))
        env.edge.proc.send_signal(1)  # SIGHUP
        assert wait_until(lambda: "reloaded" in env.edge.output())
        assert env.edge.stats()["retired"][-1]["upgraded"] == 1
        time.sleep(3)
        c.send("two")
        assert c.recv(5) == "two"
        with ws(env) as new:
            new.send("a")
            assert new.recv(5) == "a"
            time.sleep(3.5)
            with pytest.raises(ConnectionClosed):
                new.send("b")
                new.recv(5)
    reloads = env.edge.output().count("reloaded")
    env.edge.config_path.write_text(env.config)
    env.edge.proc.send_signal(1)  # back to the module's settings, before the next test starts
    assert wait_until(lambda: env.edge.output().count("reloaded") == reloads + 1)
