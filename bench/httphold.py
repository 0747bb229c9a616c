"""Open N idle HTTP keep-alive connections or N idle websockets through a proxy.

`python -m bench.httphold --port P --count 9000 --mode http` opens N
connections (bounded concurrency, so no listen backlog overflows); on each it
makes one `GET /` and reads the whole response (status 200, keep-alive), then
leaves the connection idle. `--mode ws` upgrades each connection to a websocket
instead (the `websockets` library's client), sends one message and waits for
its echo, then leaves it idle. Either way the proxy has relayed real traffic on
every connection before it is weighed. Prints `READY {json}`, holds every
connection until a line (or EOF) arrives on stdin, then prints
`DONE {"still_open": K}` (how many the proxy had not closed meanwhile), closes
them all and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from functools import partial
from typing import Any

import httptools
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.protocol import State

WS_MESSAGE = "edgeward bench: one message per idle websocket"


class OneRequest(asyncio.Protocol):
    """Send one GET, read its response with httptools, then stay open."""

    def __init__(self, request: bytes, done: asyncio.Future[str | None]) -> None:
        self.request = request
        self.done = done
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    # httptools callback
    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if self.done.done():
            return
        if status != 200:
            self.done.set_result(f"status {status}")
        elif not self.parser.should_keep_alive():
            self.done.set_result("not keep-alive")
        else:
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if not self.done.done():
                self.done.set_result(f"bad response: {e}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.done.done():
            self.done.set_result("closed before the response")


async def hold(
    host: str, port: int, count: int, mode: str, concurrency: int, timeout: float
) -> None:
    loop = asyncio.get_running_loop()
    request = b"GET / HTTP/1.1\r\nHost: bench.test\r\nUser-Agent: bench-httphold\r\n\r\n"
    http_held: list[OneRequest] = []
    ws_held: list[ClientConnection] = []
    errors: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    t0 = time.monotonic()

    def fail(why: str) -> None:
        errors[why] = errors.get(why, 0) + 1

    async def one_http() -> None:
        done: asyncio.Future[str | None] = loop.create_future()
        try:
            transport, proto = await asyncio.wait_for(
                loop.create_connection(partial(OneRequest, request, done), host, port), timeout
            )
        except (OSError, TimeoutError) as e:
            fail(type(e).__name__)
            return
        try:
            why = await asyncio.wait_for(done, timeout)
        except TimeoutError:
            why = "response timeout"
        if why is None:
            http_held.append(proto)
        else:
            fail(why)
            transport.close()

    async def one_ws() -> None:
        try:
            ws = await connect(
                f"ws://{host}:{port}/",
                open_timeout=timeout,
                ping_interval=None,
                compression=None,
                close_timeout=1,
                proxy=None,  # never an http_proxy from the environment
                max_queue=1,
            )
        except (OSError, TimeoutError) as e:
            fail(type(e).__name__)
            return
        except Exception as e:  # the library's handshake errors (InvalidStatus, ...)
            fail(f"handshake: {type(e).__name__}")
            return
        try:
            await ws.send(WS_MESSAGE)
            echoed = await asyncio.wait_for(ws.recv(), timeout)
        except Exception as e:  # closed or timed out: counted, never fatal
            fail(f"echo: {type(e).__name__}")
            ws.transport.abort()
            return
        if echoed != WS_MESSAGE:
            fail("wrong echo")
            ws.transport.abort()
            return
        ws_held.append(ws)

    async def one() -> None:
        async with sem:
            await (one_ws() if mode == "ws" else one_http())

    await asyncio.gather(*(one() for _ in range(count)))
    held = len(ws_held) if mode == "ws" else len(http_held)
    report: dict[str, Any] = {
        "mode": mode,
        "open": held,
        "failed": count - held,
        "errors": errors,
        "open_s": time.monotonic() - t0,
    }
    print("READY " + json.dumps(report), flush=True)
    # Hold until the harness says so (a line or EOF on stdin).
    await loop.run_in_executor(None, sys.stdin.readline)
    if mode == "ws":
        still_open = sum(1 for ws in ws_held if ws.state is State.OPEN)
        for ws in ws_held:
            # A plain TCP close: the proxy's cleanup is not what is measured.
            ws.transport.close()
    else:
        still_open = sum(1 for p in http_held if not p.closed)
        for p in http_held:
            if p.transport is not None:
                p.transport.close()
    await asyncio.sleep(0.2)
    print("DONE " + json.dumps({"still_open": still_open}), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=9000)
    ap.add_argument("--mode", choices=("http", "ws"), default="http")
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=15.0)
    args = ap.parse_args(argv)
    uvloop.run(hold(args.host, args.port, args.count, args.mode, args.concurrency, args.timeout))


if __name__ == "__main__":
    main()
