"""The few bytes the edge says itself to a client it will not serve, in the client's protocol.

A TLS client gets a fatal alert (its library then reports why, e.g. curl's "tlsv1
unrecognized name"), an HTTP client a minimal response with a status code; both
are complete messages, so the client can tell "refused" from "network failure".
"""

from __future__ import annotations

import struct

# TLS AlertDescription values (RFC 8446 section 6)
UNRECOGNIZED_NAME = 112
INTERNAL_ERROR = 80
HANDSHAKE_FAILURE = 40


def tls_alert(description: int) -> bytes:
    """A fatal alert record, readable by a client that has sent its ClientHello (TLS 1.0-1.3)."""
    if not 0 <= description <= 255:
        raise ValueError(f"alert description {description} is not a byte")
    return b"\x15\x03\x03\x00\x02\x02" + struct.pack("!B", description)


def http_response(status: int, reason: str, body: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection (no details leaked: the body is ours)."""
    if not 100 <= status <= 599 or not all(" " <= c <= "~" for c in reason):
        raise ValueError("bad status line: the reason phrase is printable ASCII")
    payload = body.encode("utf-8", "replace")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n").encode() + payload
