"""The handoff record: what the edge tells a local server about a client socket it hands over.

The edge passes the client's socket over a Unix stream socket (SCM_RIGHTS, attached to the
record's first byte) together with this record, and the receiving server answers with a
one-byte acknowledgement. docs/handoff-protocol.md is the specification for other languages;
this module is the reference implementation of both messages, sans-I/O.

Record::

    magic "EWHO" | version u8 (1) | flags u8 | body length u16 | body: TLVs
    TLV: type u8 | length u16 | value        (integers big-endian)

Types: 0x01 service (UTF-8, required), 0x02 client address (required), 0x03 listener address,
0x04 protocol, 0x05 name (SNI / Host / XMPP to=), 0x06 ALPN id (repeated, client order),
0x07 listener name, 0x08 handoff id (u64). Addresses: 4-byte IPv4 or 16-byte IPv6, then a
u16 port. Unknown types are skipped (forward compatibility); a known one given twice (ALPN
excepted) is an error. Flag bit 0: the client address came from a trusted PROXY header
(the socket's own peer is that proxy).

Acknowledgement: one byte, 0x00 = accepted (the server owns the socket from now on), any
other value = refused (the edge serves the client another way).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass, field

from edgeward.codec.errors import NEED_MORE, CodecError, NeedMore

MAGIC = b"EWHO"
VERSION = 1
HEAD_LEN = 8
MAX_RECORD = 4096  # head + body; a record never needs more, and a receiver may refuse more
MAX_BODY = MAX_RECORD - HEAD_LEN
MAX_TEXT = 255  # service, name, listener name, protocol, ALPN id: each at most this many bytes
FLAG_VIA_PROXY = 0x01
KNOWN_FLAGS = FLAG_VIA_PROXY

T_SERVICE = 0x01
T_CLIENT = 0x02
T_LISTENER = 0x03
T_PROTOCOL = 0x04
T_NAME = 0x05
T_ALPN = 0x06
T_LISTENER_NAME = 0x07
T_ID = 0x08

_HEAD = struct.Struct("!4sBBH")
_TL = struct.Struct("!BH")
_PORT = struct.Struct("!H")
_ID = struct.Struct("!Q")

Address = tuple[str, int]


class HandoffError(CodecError):
    """A malformed handoff record or acknowledgement, or a value that cannot be encoded."""


class Ack(enum.IntEnum):
    """The receiver's answer. Anything but ACCEPTED leaves the client with the edge."""

    ACCEPTED = 0
    BUSY = 1  # the server takes no more connections now
    UNKNOWN_SERVICE = 2  # the server does not serve this service
    BAD_RECORD = 3  # the record could not be read
    REFUSED = 4  # any other reason


@dataclass(frozen=True, slots=True)
class HandoffRecord:
    service: str
    client: Address  # the client as the edge saw it (or as a trusted PROXY header said)
    listener: Address | None = None  # the address the client connected to
    protocol: str | None = None  # what the edge sniffed: tls, http, xmpp, ssh, unknown
    name: str | None = None  # SNI, HTTP Host or XMPP to=
    alpn: tuple[str, ...] = ()  # ALPN ids the client offered, latin-1 (lossless for opaque bytes)
    listener_name: str = ""
    via_proxy: bool = False
    handoff_id: int = 0
    length: int = field(default=0, compare=False)  # bytes consumed by parse_record (0 when built)


def _address(addr: Address, what: str) -> bytes:
    host, port = addr
    if not 0 <= port <= 0xFFFF:
        raise HandoffError(f"{what} port {port} out of range")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise HandoffError(f"{what} address {host!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.packed + _PORT.pack(port)


def _text(value: str, what: str, encoding: str = "utf-8") -> bytes:
    try:
        raw = value.encode(encoding)
    except UnicodeEncodeError:
        raise HandoffError(f"{what} {value!r} cannot be encoded") from None
    if not 0 < len(raw) <= MAX_TEXT:
        raise HandoffError(f"{what} must be 1 to {MAX_TEXT} bytes, not {len(raw)}")
    return raw


def _tlv(t: int, value: bytes) -> bytes:
    return _TL.pack(t, len(value)) + value


def build_record(rec: HandoffRecord) -> bytes:
    """The wire form of `rec`. Raises HandoffError for a value the format cannot carry."""
    parts = [_tlv(T_SERVICE, _text(rec.service, "service")), _tlv(T_CLIENT, _address(rec.client, "client"))]
    if rec.listener is not None:
        parts.append(_tlv(T_LISTENER, _address(rec.listener, "listener")))
    if rec.protocol is not None:
        parts.append(_tlv(T_PROTOCOL, _text(rec.protocol, "protocol", "ascii")))
    if rec.name is not None:
        parts.append(_tlv(T_NAME, _text(rec.name, "name")))
    parts.extend(_tlv(T_ALPN, _text(a, "ALPN id", "latin-1")) for a in rec.alpn)
    if rec.listener_name:
        parts.append(_tlv(T_LISTENER_NAME, _text(rec.listener_name, "listener name")))
    if rec.handoff_id:
        if not 0 < rec.handoff_id < 1 << 64:
            raise HandoffError("handoff id out of range")
        parts.append(_tlv(T_ID, _ID.pack(rec.handoff_id)))
    body = b"".join(parts)
    if len(body) > MAX_BODY:
        raise HandoffError(f"record of {HEAD_LEN + len(body)} bytes exceeds {MAX_RECORD}")
    return _HEAD.pack(MAGIC, VERSION, FLAG_VIA_PROXY if rec.via_proxy else 0, len(body)) + body


def _read_address(value: bytes, what: str) -> Address:
    if len(value) == 6:
        return str(ipaddress.IPv4Address(value[:4])), _PORT.unpack_from(value, 4)[0]
    if len(value) == 18:
        ip = ipaddress.IPv6Address(value[:16])
        host = str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)
        return host, _PORT.unpack_from(value, 16)[0]
    raise HandoffError(f"{what} address of {len(value)} bytes (6 or 18 expected)")


def _read_text(value: bytes, what: str, encoding: str = "utf-8") -> str:
    if not 0 < len(value) <= MAX_TEXT:
        raise HandoffError(f"{what} of {len(value)} bytes (1 to {MAX_TEXT} expected)")
    try:
        return value.decode(encoding)
    except UnicodeDecodeError:
        raise HandoffError(f"{what} is not {encoding}") from None


def parse_record(data: bytes) -> HandoffRecord | NeedMore:
    """Read a record at the start of `data` (what arrived so far); `length` says where it ended."""
    n = min(len(data), 4)
    if data[:n] != MAGIC[:n]:
        raise HandoffError("not a handoff record (bad magic)")
    if len(data) < HEAD_LEN:
        return NEED_MORE
    _, version, flags, body_len = _HEAD.unpack_from(data, 0)
    if version != VERSION:
        raise HandoffError(f"handoff record version {version} (this side speaks {VERSION})")
    if flags & ~KNOWN_FLAGS:
        raise HandoffError(f"unknown flags {flags:#04x}")
    if body_len > MAX_BODY:
        raise HandoffError(f"record body of {body_len} bytes exceeds {MAX_BODY}")
    end = HEAD_LEN + body_len
    if len(data) < end:
        return NEED_MORE
    seen: set[int] = set()
    values: dict[int, bytes] = {}
    alpn: list[str] = []
    pos = HEAD_LEN
    while pos < end:
        if pos + 3 > end:
            raise HandoffError("truncated TLV header")
        t, vlen = _TL.unpack_from(data, pos)
        pos += 3
        if pos + vlen > end:
            raise HandoffError(f"TLV {t:#04x} of {vlen} bytes overruns the record")
        value = data[pos : pos + vlen]
        pos += vlen
        if t == T_ALPN:
            alpn.append(_read_text(value, "ALPN id", "latin-1"))
            continue
        if t in seen and t <= T_ID:
            raise HandoffError(f"TLV {t:#04x} given twice")
        seen.add(t)
        values[t] = value
    if T_SERVICE not in values or T_CLIENT not in values:
        raise HandoffError("record without service or client address")
    handoff_id = 0
    if T_ID in values:
        if len(values[T_ID]) != 8:
            raise HandoffError("handoff id is not 8 bytes")
        handoff_id = _ID.unpack(values[T_ID])[0]
    protocol = _read_text(values[T_PROTOCOL], "protocol", "ascii") if T_PROTOCOL in values else None
    return HandoffRecord(
        service=_read_text(values[T_SERVICE], "service"),
        client=_read_address(values[T_CLIENT], "client"),
        listener=_read_address(values[T_LISTENER], "listener") if T_LISTENER in values else None,
        protocol=protocol,
        name=_read_text(values[T_NAME], "name") if T_NAME in values else None,
        alpn=tuple(alpn),
        listener_name=_read_text(values[T_LISTENER_NAME], "listener name") if T_LISTENER_NAME in values else "",
        via_proxy=bool(flags & FLAG_VIA_PROXY),
        handoff_id=handoff_id,
        length=end,
    )


def build_ack(status: Ack) -> bytes:
    return bytes((int(status),))


def parse_ack(data: bytes) -> Ack | NeedMore:
    """The receiver's answer (its first byte); an unassigned refusal code reads as REFUSED."""
    if not data:
        return NEED_MORE
    b = data[0]
    try:
        return Ack(b)
    except ValueError:
        return Ack.REFUSED
