"""Open N relayed connections, prove each one relays, then hold them idle.

`python -m bench.idlehold --port P --count 9000` opens the connections
(bounded concurrency, so no listen backlog overflows), sends each a small
ClientHello and waits for its echo (so the upstream leg really exists), prints
`READY {json}` and then holds every socket until its stdin closes or a line
arrives; then it closes them all, prints `DONE` and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from functools import partial

import uvloop  # an edgeward dependency: always in the venv

from bench.hello import client_hello


class Held(asyncio.Protocol):
    __slots__ = ("echoed", "got", "need", "transport")

    def __init__(self, need: int, echoed: asyncio.Future[bool]) -> None:
        self.need = need
        self.got = 0
        self.echoed = echoed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= self.need and not self.echoed.done():
            self.echoed.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.echoed.done():
            self.echoed.set_result(False)


async def hold(host: str, port: int, count: int, concurrency: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    hello, _ = client_hello("bench.example.org")
    transports: list[asyncio.Transport] = []
    failed = 0
    sem = asyncio.Semaphore(concurrency)
    t0 = time.monotonic()

    async def one() -> None:
        nonlocal failed
        async with sem:
            echoed: asyncio.Future[bool] = loop.create_future()
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(partial(Held, len(hello), echoed), host, port), timeout
                )
            except (OSError, TimeoutError):
                failed += 1
                return
            transport.write(hello)
            try:
                good = await asyncio.wait_for(echoed, timeout)
            except TimeoutError:
                good = False
            if good:
                transports.append(transport)
            else:
                failed += 1
                transport.close()

    await asyncio.gather(*(one() for _ in range(count)))
    report = {"open": len(transports), "failed": failed, "open_s": time.monotonic() - t0}
    print("READY " + json.dumps(report), flush=True)
    # Hold until the harness says so (a line or EOF on stdin).
    await loop.run_in_executor(None, sys.stdin.readline)
    for t in transports:
        t.close()
    await asyncio.sleep(0.2)
    print("DONE", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=9000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args(argv)
    uvloop.install()
    host = socket.gethostbyname(args.host)
    asyncio.run(hold(host, args.port, args.count, args.concurrency, args.timeout))


if __name__ == "__main__":
    main()
