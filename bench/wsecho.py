"""WebSocket echo server: the upstream of the idle-websocket measurement.

`python -m bench.wsecho --port P` serves every path with the `websockets`
library (RFC 6455 handshake, echo of every message) on uvloop, in its own
process so that its memory and descriptors are apart from the proxy's. No
keepalive pings and no compression: an idle websocket stays idle (nothing
crosses the proxy while the harness weighs it) and the echo costs no zlib
state on either side.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop
from websockets.asyncio.server import ServerConnection, serve


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def run(host: str, port: int, backlog: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(
        echo,
        host,
        port,
        ping_interval=None,
        compression=None,
        # Idle connections are closed by the client when the harness says so; the
        # server never gives up on them first.
        close_timeout=1,
        backlog=backlog,
    ):
        print("READY", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backlog", type=int, default=4096)
    args = ap.parse_args(argv)
    uvloop.run(run(args.host, args.port, args.backlog))


if __name__ == "__main__":
    main()
