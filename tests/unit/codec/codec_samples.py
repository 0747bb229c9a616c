"""Genuine client bytes for the codec tests (imported by the test modules)."""

from __future__ import annotations

import ssl
from pathlib import Path

DATA = Path(__file__).parent / "data"


def python_client_hello(
    server_hostname: str | None,
    alpn: list[str] | None = None,
    *,
    maximum_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The first flight of a real Python/OpenSSL client, taken from a MemoryBIO."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def openssl_hello(name: str) -> bytes:
    """A ClientHello captured from `openssl s_client` (see data/README)."""
    return bytes.fromhex((DATA / f"{name}.hex").read_text())


def handshake_of(records: bytes) -> bytes:
    """The handshake bytes carried by a run of TLS records."""
    out, pos = [], 0
    while pos < len(records):
        size = int.from_bytes(records[pos + 3 : pos + 5], "big")
        out.append(records[pos + 5 : pos + 5 + size])
        pos += 5 + size
    return b"".join(out)


def reframe(records: bytes, sizes: list[int]) -> bytes:
    """The same handshake bytes cut into records of the given sizes (last size repeats)."""
    msg = handshake_of(records)
    out, pos, i = [], 0, 0
    while pos < len(msg):
        step = sizes[min(i, len(sizes) - 1)]
        chunk = msg[pos : pos + step]
        out.append(b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk)
        pos += step
        i += 1
    return b"".join(out)
