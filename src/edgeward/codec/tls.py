"""TLS ClientHello: SNI, ALPN and versions, reassembled across records.

Only the plaintext records before the first server byte are read, so every
record is a handshake record and the ClientHello is the first message.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeward.codec._names import normalize_hostname
from edgeward.codec.errors import NEED_MORE, NeedMore, TLSError

MAX_HELLO = 16 * 1024  # handshake body bound; real hellos (even with PQ key shares) are < 2KiB
MAX_RECORD = 16 * 1024  # RFC 8446 5.1: plaintext fragments are at most 2^14 bytes
# Record headers add 5 bytes per fragment; a hello cut into tiny records must not
# make the edge buffer much more than the hello itself.
MAX_STREAM = 2 * MAX_HELLO

CONTENT_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43



@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str | None
    alpn: tuple[str, ...]
    legacy_version: int
    supported_versions: tuple[int, ...]  # as offered, GREASE values removed
    length: int  # bytes of `data` consumed: every record up to the one ending the hello


def _is_grease(value: int) -> bool:
    # RFC 8701: 0x0a0a, 0x1a1a, ... 0xfafa
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


def parse_client_hello(data: bytes) -> ClientHello | NeedMore:
    """Parse a ClientHello from the first bytes a client sent.

    Returns NEED_MORE while `data` is a valid prefix; raises TLSError as soon as
    no continuation could make it valid.
    """
    size = len(data)
    fragments: list[bytes] = []
    have = 0  # handshake bytes gathered so far
    needed = -1  # total handshake bytes (header + body) once the header is known
    pos = 0
    while True:
        if size - pos < 5:
            _check_record_prefix(data, pos)
            return NEED_MORE
        # Fields read by indexing, not struct: ints the compiled module keeps native (mypyc).
        ctype = data[pos]
        major = data[pos + 1]
        rlen = (data[pos + 3] << 8) | data[pos + 4]
        if ctype != CONTENT_HANDSHAKE:
            raise TLSError(f"expected a handshake record, got content type {ctype}")
        if major != 3:
            raise TLSError(f"bad record version major {major}")
        if rlen == 0:
            raise TLSError("empty handshake record")  # RFC 8446 5.1 forbids them
        if rlen > MAX_RECORD:
            raise TLSError(f"record of {rlen} bytes exceeds 2^14")
        start = pos + 5
        end = start + rlen
        if end > MAX_STREAM:
            raise TLSError(f"ClientHello records exceed {MAX_STREAM} bytes")
        # Take what is there of this record so the header checks below run early.
        frag = data[start:end]
        fragments.append(frag)
        have += len(frag)
        if needed < 0 and have >= 4:
            head = frag if len(fragments) == 1 else b"".join(fragments)[:4]
            if head[0] != HANDSHAKE_CLIENT_HELLO:
                raise TLSError(f"first handshake message is type {head[0]}, not ClientHello")
            body_len = int.from_bytes(head[1:4], "big")
            if body_len > MAX_HELLO:
                raise TLSError(f"ClientHello of {body_len} bytes exceeds {MAX_HELLO}")
            needed = 4 + body_len
        if end > size:
            return NEED_MORE
        pos = end
        if needed >= 0 and have >= needed:
            break
    msg = fragments[0] if len(fragments) == 1 else b"".join(fragments)
    return _parse_body(msg[4:needed], pos)


def _check_record_prefix(data: bytes, pos: int) -> None:
    rest = data[pos : pos + 5]
    if rest and rest[0] != CONTENT_HANDSHAKE:
        raise TLSError(f"expected a handshake record, got content type {rest[0]}")
    if len(rest) > 1 and rest[1] != 3:
        raise TLSError(f"bad record version major {rest[1]}")


def _parse_body(body: bytes, consumed: int) -> ClientHello:
    end = len(body)
    if end < 38:
        raise TLSError("ClientHello too short")
    legacy_version = (body[0] << 8) | body[1]
    pos = 34  # version + random
    sid_len = body[pos]
    if sid_len > 32:
        raise TLSError("session id longer than 32 bytes")
    pos += 1 + sid_len
    cs_len = _read_u16(body, pos)
    if cs_len < 2 or cs_len % 2:
        raise TLSError("bad cipher suite list length")
    pos += 2 + cs_len
    if pos >= end:
        raise TLSError("ClientHello truncated before compression methods")
    comp_len = body[pos]
    if comp_len < 1:
        raise TLSError("empty compression method list")
    pos += 1 + comp_len
    if pos > end:
        raise TLSError("ClientHello truncated in compression methods")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    if pos == end:  # extensions are optional (pre-TLS 1.2 clients)
        return ClientHello(sni, alpn, legacy_version, versions, consumed)
    ext_total = _read_u16(body, pos)
    pos += 2
    if pos + ext_total != end:
        raise TLSError("extensions length does not match ClientHello length")
    seen: set[int] = set()
    while pos < end:
        if end - pos < 4:
            raise TLSError("truncated extension header")
        etype = (body[pos] << 8) | body[pos + 1]
        elen = (body[pos + 2] << 8) | body[pos + 3]
        pos += 4
        if pos + elen > end:
            raise TLSError("truncated extension")
        if etype in seen:
            raise TLSError(f"duplicate extension {etype}")  # RFC 8446 4.2
        seen.add(etype)
        if etype == EXT_SERVER_NAME:
            sni = _parse_sni(body[pos : pos + elen])
        elif etype == EXT_ALPN:
            alpn = _parse_alpn(body[pos : pos + elen])
        elif etype == EXT_SUPPORTED_VERSIONS:
            versions = _parse_versions(body[pos : pos + elen])
        pos += elen
    return ClientHello(sni, alpn, legacy_version, versions, consumed)


def _read_u16(buf: bytes, pos: int) -> int:
    if pos + 2 > len(buf):
        raise TLSError("ClientHello truncated")
    return (buf[pos] << 8) | buf[pos + 1]


def _parse_sni(ext: bytes) -> str:
    # RFC 6066 3: ServerNameList<1..2^16-1> of (NameType, opaque HostName<1..2^16-1>)
    if len(ext) < 2 or ((ext[0] << 8) | ext[1]) != len(ext) - 2:
        raise TLSError("bad server_name list length")
    pos, end = 2, len(ext)
    host: bytes | None = None
    while pos < end:
        if end - pos < 3:
            raise TLSError("truncated server_name entry")
        name_type = ext[pos]
        nlen = (ext[pos + 1] << 8) | ext[pos + 2]
        pos += 3
        if nlen == 0 or pos + nlen > end:
            raise TLSError("bad server_name entry length")
        if name_type == 0:
            if host is not None:
                raise TLSError("more than one host_name in server_name")
            host = ext[pos : pos + nlen]
        pos += nlen
    if host is None:
        raise TLSError("server_name without host_name")
    name = normalize_hostname(host)
    if name is None:
        raise TLSError(f"invalid SNI host name {host[:64]!r}")
    return name


def _parse_alpn(ext: bytes) -> tuple[str, ...]:
    # RFC 7301 3.1: ProtocolNameList<2..2^16-1> of opaque ProtocolName<1..2^8-1>
    if len(ext) < 3 or ((ext[0] << 8) | ext[1]) != len(ext) - 2:
        raise TLSError("bad ALPN list length")
    pos, end = 2, len(ext)
    names: list[str] = []
    while pos < end:
        plen = ext[pos]
        pos += 1
        if plen == 0 or pos + plen > end:
            raise TLSError("bad ALPN protocol name length")
        # Names are opaque bytes; latin-1 keeps every one of them, lossless and total.
        names.append(ext[pos : pos + plen].decode("latin-1"))
        pos += plen
    return tuple(names)


def _parse_versions(ext: bytes) -> tuple[int, ...]:
    # RFC 8446 4.2.1: ProtocolVersion versions<2..254> (client form)
    if len(ext) < 3 or ext[0] != len(ext) - 1 or ext[0] % 2:
        raise TLSError("bad supported_versions length")
    versions: list[int] = []
    for i in range(1, len(ext), 2):
        v = (ext[i] << 8) | ext[i + 1]
        if not _is_grease(v):
            versions.append(v)
    return tuple(versions)
