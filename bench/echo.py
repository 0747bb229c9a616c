"""TCP echo server: the upstream of the short-connection and idle cases.

Run as its own process (`python -m bench.echo --port P`) so its CPU and
descriptors are apart from the proxy's and the client's. The fallback for
bench/tools/tcpecho.c where no C compiler exists; Protocol-based on uvloop to
keep its own cost low.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

import uvloop  # an edgeward dependency: always in the venv


class Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        # The client is done: close our side too (returning False closes).
        return False


async def serve(host: str, ports: list[int], backlog: int) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
        servers.append(await loop.create_server(Echo, sock=sock, backlog=backlog))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--backlog", type=int, default=4096)
    args = ap.parse_args(argv)
    uvloop.install()
    asyncio.run(serve(args.host, args.port, args.backlog))
    sys.exit(0)


if __name__ == "__main__":
    main()
