"""A TLS server that takes its clients from edgeward by socket handoff (no port of its own).

    python examples/handoff_tls_server.py --socket /run/site-a/handoff.sock \\
        --cert /etc/site-a/fullchain.pem --key /etc/site-a/key.pem --name site-a

edgeward (see README, "Socket handoff") hands it each client whose SNI routes to this
endpoint. The TLS handshake happens here, with this server's own certificate: the edge
never sees a key or a decrypted byte, and after the handoff no byte passes through it.
Every HTTP request is answered with who served it and who the client is, as the socket
says (`getpeername()`) and as the edge's record says (the latter differs when a trusted
PROXY header in front of the edge named the client).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable

from edgeward.handoff import HandoffRecord, start_handoff_server


def _address(addr: tuple[str, int] | None) -> str:
    if addr is None:
        return "-"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, HandoffRecord], Awaitable[None]]


def make_handler(name: str) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, meta: HandoffRecord) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                keep = b"connection: close" not in head.lower() and not head.startswith(b"GET / HTTP/1.0")
                body = (f"served-by: {name}\npeer: {_address(peer)}\nclient: {_address(meta.client)}\n"
                        f"via-proxy: {str(meta.via_proxy).lower()}\nsni: {meta.name or '-'}\n"
                        f"alpn: {','.join(meta.alpn) or '-'}\nservice: {meta.service}\n"
                        f"listener: {_address(meta.listener)}\n").encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
                             % (len(body), b"" if keep else b"Connection: close\r\n", body))
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    return handle


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, help="Unix socket path the edge hands clients to")
    ap.add_argument("--cert", required=True, help="PEM certificate chain")
    ap.add_argument("--key", required=True, help="PEM private key")
    ap.add_argument("--name", default="handoff-example", help="name put in every answer")
    ap.add_argument("--mode", default="660", help="permissions of the socket file (octal)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["http/1.1"])
    server = await start_handoff_server(make_handler(args.name), args.socket, ssl=ctx, mode=int(args.mode, 8))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.close)
    print(f"{args.name}: receiving handoffs on {args.socket}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
