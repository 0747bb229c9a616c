"""Short-connection client: connect, send a ClientHello, read its echo, close.

`python -m bench.connrate --port P --concurrency 50 --duration 5` runs
`concurrency` loops, each doing one connection after another, for at most
`duration` seconds and `max_connections` connections, then prints one JSON line.
The fallback for bench/tools/connrate.c (same output keys) where no C compiler
exists; Protocol-based on uvloop to keep its own cost low. The harness pins it
to the same CPU for every contestant.
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


class OneShot(asyncio.Protocol):
    """Send the hello on connect, resolve when all of it came back."""

    __slots__ = ("done", "got", "hello", "transport")

    def __init__(self, hello: bytes, done: asyncio.Future[bool]) -> None:
        self.hello = hello
        self.done = done
        self.got = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(self.hello)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= len(self.hello) and not self.done.done():
            self.done.set_result(True)
            self.transport.close()

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(False)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(False)


async def run(
    host: str, port: int, concurrency: int, duration: float, max_connections: int, sni: str
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    hello, builder = client_hello(sni)
    ok = 0
    failed = 0
    errors: dict[str, int] = {}
    started = 0
    deadline = time.monotonic() + duration

    async def worker() -> None:
        nonlocal ok, failed, started
        while started < max_connections and time.monotonic() < deadline:
            started += 1
            done: asyncio.Future[bool] = loop.create_future()
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(partial(OneShot, hello, done), host, port), 5
                )
                good = await asyncio.wait_for(done, 5)
            except (OSError, TimeoutError) as e:
                failed += 1
                key = type(e).__name__ + (f"[{e.errno}]" if getattr(e, "errno", None) else "")
                errors[key] = errors.get(key, 0) + 1
                # Refused/reset storms must not spin the loop at 100% and inflate "rate".
                await asyncio.sleep(0.01)
                continue
            if good:
                ok += 1
            else:
                failed += 1
                errors["short_echo"] = errors.get("short_echo", 0) + 1
                transport.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {
        "connections": ok,
        "failed": failed,
        "errors": errors,
        "elapsed_s": elapsed,
        "conn_per_s": ok / elapsed if elapsed > 0 else 0.0,
        "concurrency": concurrency,
        "hello_bytes": len(hello),
        "hello_builder": builder,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--max-connections", type=int, default=500_000)
    ap.add_argument("--sni", default="bench.example.org")
    args = ap.parse_args(argv)
    uvloop.install()
    # Resolve once: a name lookup per connection would measure the resolver.
    host = socket.gethostbyname(args.host)
    result = asyncio.run(
        run(host, args.port, args.concurrency, args.duration, args.max_connections, args.sni)
    )
    print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
