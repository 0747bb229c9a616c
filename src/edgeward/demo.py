"""Built-in demo upstreams for `make run` (examples/demo.toml): two tiny web apps and an echo.

They let a newcomer see traffic flow through the edge with nothing else installed.
"""

from __future__ import annotations

import asyncio
import functools

DEMO_APPS = {18081: "app A", 18082: "app B"}
DEMO_ECHO = 18007


async def _web(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        body = f"hello from {name}\n{head.decode('latin-1')}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def start_demo_upstreams() -> list[asyncio.AbstractServer]:
    servers: list[asyncio.AbstractServer] = []
    for port, name in DEMO_APPS.items():
        servers.append(await asyncio.start_server(functools.partial(_web, name), "127.0.0.1", port))
    servers.append(await asyncio.start_server(_echo, "127.0.0.1", DEMO_ECHO))
    print(f"demo upstreams: web apps on 127.0.0.1:{', '.join(map(str, DEMO_APPS))}, echo on 127.0.0.1:{DEMO_ECHO}")
    print("try:  curl -H 'Host: a.localhost' http://127.0.0.1:8080/   curl http://b.localhost:8080/ "
          "--resolve b.localhost:8080:127.0.0.1   nc 127.0.0.1 8007\n"
          "      .venv/bin/edgeward status -c examples/demo.toml   .venv/bin/edgeward top -c examples/demo.toml\n"
          "      the dashboard: http://127.0.0.1:9901/")
    return servers
