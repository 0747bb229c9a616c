"""Builders of realistic client bytes for tests and benchmarks (not used by the edge)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

_CIPHER_SUITES: tuple[int, ...] = (0x5A5A, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C)
_CIPHER_SUITES += (0xC030, 0xCCA9, 0xCCA8, 0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035)
_SIGNATURE_ALGORITHMS = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)


def _u16s(values: tuple[int, ...]) -> bytes:
    return _vec16(struct.pack(f"!{len(values)}H", *values))


def _vec8(body: bytes) -> bytes:
    return bytes([len(body)]) + body


def _vec16(body: bytes) -> bytes:
    return struct.pack("!H", len(body)) + body


def _ext(etype: int, body: bytes) -> bytes:
    return struct.pack("!H", etype) + _vec16(body)


def build_client_hello(
    sni: str | None,
    alpn: Sequence[str] = (),
    *,
    record_split: int | None = None,
) -> bytes:
    """A TLS 1.3 ClientHello shaped like a modern browser's (GREASE, x25519 key share).

    Random, session id and key share are derived from `sni` so the output is
    deterministic. `record_split` cuts the handshake message into records of at
    most that many bytes, as some clients and middleboxes do.
    """
    seed = hashlib.sha512((sni or "").encode() + b"|" + ",".join(alpn).encode()).digest()
    grease_share = struct.pack("!HHB", 0x3A3A, 1, 0)
    exts = [_ext(0x2A2A, b"")]  # GREASE
    if sni is not None:
        name = sni.encode("ascii")
        exts.append(_ext(0, _vec16(b"\x00" + _vec16(name))))
    exts += [
        _ext(23, b""),  # extended_master_secret
        _ext(65281, b"\x00"),  # renegotiation_info
        _ext(10, _vec16(struct.pack("!4H", 0x3A3A, 0x001D, 0x0017, 0x0018))),  # groups
        _ext(11, _vec8(b"\x00")),  # ec_point_formats
        _ext(35, b""),  # session_ticket
    ]
    if alpn:
        exts.append(_ext(16, _vec16(b"".join(_vec8(p.encode("latin-1")) for p in alpn))))
    exts += [
        _ext(5, b"\x01\x00\x00\x00\x00"),  # status_request
        _ext(13, _u16s(_SIGNATURE_ALGORITHMS)),
        _ext(18, b""),  # signed_certificate_timestamp
        _ext(51, _vec16(grease_share + struct.pack("!HH", 0x001D, 32) + seed[32:64])),
        _ext(45, _vec8(b"\x01")),  # psk_key_exchange_modes: psk_dhe_ke
        _ext(43, _vec8(struct.pack("!3H", 0x4A4A, 0x0304, 0x0303))),  # supported_versions
        _ext(27, _vec8(b"\x02\x00\x02")),  # compress_certificate: brotli
        _ext(0x1A1A, b"\x00"),  # GREASE
    ]
    body = (
        b"\x03\x03"
        + seed[:32]
        + _vec8(seed[32:64])
        + _u16s(_CIPHER_SUITES)
        + _vec8(b"\x00")
        + _vec16(b"".join(exts))
    )
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    step = record_split if record_split is not None else len(msg)
    if step < 1:
        raise ValueError("record_split must be at least 1")
    return b"".join(b"\x16\x03\x01" + _vec16(msg[i : i + step]) for i in range(0, len(msg), step))
