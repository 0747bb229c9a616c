"""New TLS handshakes per second through `CertStore.server_context()` (ECDSA P-256).

`python -m bench.tls_handshakes [--seconds 5]`: a uvloop server process serving one ECDSA P-256
certificate through the store's SNI-switching context, measured with two clients in turn:
`openssl s_time -new` (C client, no SNI: the default certificate path) and a Python client
sending SNI (the by-name path). Prints handshakes/s and the server's handshakes per CPU-second,
which depends less on what else the machine is running. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import trustme

NAME = "bench.test"


def _serve(port: int, chain: bytes, key: bytes, mode: str, ready: mp.synchronize.Event) -> None:
    import uvloop

    from edgeward.tls.certstore import CertStore, certificate_from_pem, context_with_certificate

    store = CertStore(default_name=NAME)
    store.put("bench", certificate_from_pem(chain, key, source="bench"))
    ctx = store.server_context()
    if mode == "plain":  # the same policy and certificate, no SNI callback: the floor
        ctx = context_with_certificate(chain, key, ssl.TLSVersion.TLSv1_2, ("http/1.1",))
    elif mode == "challenge":  # a TLS-ALPN-01 challenge pending for another name: hellos are read
        store.set_challenge("other.test", chain, key)

    class Close(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.close()  # the handshake is done: that is all we measure

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Close, "127.0.0.1", port, ssl=ctx, backlog=1024)
        ready.set()
        await server.serve_forever()

    uvloop.run(main())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _python_client(port: int, ca_pem: str, seconds: float, out: mp.Queue[int]) -> None:
    ctx = ssl.create_default_context(cadata=ca_pem)
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw, server_hostname=NAME):
            n += 1
    out.put(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--mode", choices=["store", "plain", "challenge"], default="store",
                    help="store: server_context(); plain: one context, no SNI callback; "
                    "challenge: server_context() while a TLS-ALPN-01 challenge is pending")
    args = ap.parse_args()
    ca = trustme.CA()
    leaf = ca.issue_cert(NAME, key_type=trustme.KeyType.ECDSA)
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = mp.Event()
    server = mp.Process(target=_serve, args=(port, chain, leaf.private_key_pem.bytes(), args.mode, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(20):
            raise SystemExit("server did not start")
        assert server.pid is not None
        openssl = shutil.which("openssl")
        if openssl:
            with tempfile.NamedTemporaryFile(suffix=".pem") as caf:
                caf.write(ca.cert_pem.bytes())
                caf.flush()
                cpu0 = _cpu_seconds(server.pid)
                out = subprocess.run([openssl, "s_time", "-connect", f"127.0.0.1:{port}", "-new",
                                      "-time", str(int(args.seconds)), "-CAfile", caf.name],
                                     capture_output=True, text=True, timeout=args.seconds + 30).stdout
                cpu = _cpu_seconds(server.pid) - cpu0
            m = re.search(r"(\d+) connections in ([\d.]+) real seconds", out)
            if m:
                n, secs = int(m.group(1)), float(m.group(2))
                print(f"openssl s_time -new (TLS 1.3, default certificate): {n / secs:.0f} handshakes/s, "
                      f"{n / cpu if cpu else float('nan'):.0f} per server CPU-second")
        q: mp.Queue[int] = mp.Queue()
        cpu0 = _cpu_seconds(server.pid)
        t0 = time.monotonic()
        client = mp.Process(target=_python_client, args=(port, ca.cert_pem.bytes().decode(), args.seconds, q))
        client.start()
        n = q.get(timeout=args.seconds + 30)
        client.join(10)
        secs = time.monotonic() - t0
        cpu = _cpu_seconds(server.pid) - cpu0
        print(f"Python client with SNI (TLS 1.3, by name): {n / secs:.0f} handshakes/s, "
              f"{n / cpu if cpu else float('nan'):.0f} per server CPU-second")
    finally:
        server.terminate()
        server.join(5)


if __name__ == "__main__":
    main()
