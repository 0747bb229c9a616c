"""A realistic TLS 1.3 ClientHello for the short-connection case.

edgeward's own test builder (`edgeward.codec.testing.build_client_hello`) is
used when it exists, so the bench sends what the codec tests send; otherwise a
builder here makes a hello shaped like a modern browser's (SNI, ALPN,
supported_versions, key_share, ...), about 250-300 bytes in one record.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence


def _u8(b: bytes) -> bytes:
    return struct.pack("!B", len(b)) + b


def _u16(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def _ext(kind: int, body: bytes) -> bytes:
    return struct.pack("!H", kind) + _u16(body)


def own_client_hello(sni: str, alpn: Sequence[str] = ("h2", "http/1.1")) -> bytes:
    """A TLS 1.3 ClientHello record, as HAProxy's req.ssl_sni and nginx's
    ssl_preread parse it (both read only the first record)."""
    host = sni.encode("ascii")
    extensions = b"".join(
        [
            # server_name: one host_name entry.
            _ext(0x0000, _u16(b"\x00" + _u16(host))),
            # extended_master_secret, renegotiation_info, as browsers send.
            _ext(0x0017, b""),
            _ext(0xFF01, b"\x00"),
            # supported_groups: x25519, secp256r1, secp384r1.
            _ext(0x000A, _u16(struct.pack("!3H", 0x001D, 0x0017, 0x0018))),
            # ec_point_formats: uncompressed.
            _ext(0x000B, _u8(b"\x00")),
            # session_ticket (empty).
            _ext(0x0023, b""),
            # ALPN.
            _ext(0x0010, _u16(b"".join(_u8(p.encode("ascii")) for p in alpn))),
            # status_request (OCSP).
            _ext(0x0005, b"\x01\x00\x00\x00\x00"),
            # signature_algorithms.
            _ext(
                0x000D,
                _u16(
                    struct.pack(
                        "!8H", 0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601
                    )
                ),
            ),
            # key_share: one x25519 share (random bytes: nobody completes the handshake).
            _ext(0x0033, _u16(struct.pack("!H", 0x001D) + _u16(os.urandom(32)))),
            # psk_key_exchange_modes: psk_dhe_ke.
            _ext(0x002D, _u8(b"\x01")),
            # supported_versions: TLS 1.3, 1.2.
            _ext(0x002B, _u8(struct.pack("!2H", 0x0304, 0x0303))),
        ]
    )
    suites = struct.pack("!5H", 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F)
    body = b"".join(
        [
            b"\x03\x03",  # legacy_version TLS 1.2, as TLS 1.3 requires
            os.urandom(32),  # random
            _u8(os.urandom(32)),  # legacy_session_id (middlebox compatibility)
            _u16(suites),
            _u8(b"\x00"),  # compression: null
            _u16(extensions),
        ]
    )
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + _u16(handshake)


def client_hello(sni: str, alpn: Sequence[str] = ("h2", "http/1.1")) -> tuple[bytes, str]:
    """(hello bytes, which builder made it)."""
    try:
        from edgeward.codec.testing import build_client_hello  # type: ignore[import-not-found]
    except ImportError:
        return own_client_hello(sni, alpn), "bench.hello"
    try:
        hello = build_client_hello(sni, list(alpn))
    except TypeError:
        hello = build_client_hello(sni=sni, alpn=list(alpn))
    return bytes(hello), "edgeward.codec.testing"
