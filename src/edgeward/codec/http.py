"""HTTP/1.x request head: request line and Host, nothing more.

The head is forwarded byte for byte, so this only has to agree with the
upstream on which name the request is for; it rejects what an upstream would
read differently (duplicate Host, obs-fold, space before the colon, bare LF).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from edgeward.codec._names import normalize_hostname
from edgeward.codec.errors import NEED_MORE, HTTPError, NeedMore

MAX_HEAD = 16 * 1024
MAX_METHOD = 32  # longest registered method is 17 bytes (UPDATEREDIRECTREF)

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_VCHAR = rb"[\x21-\x7e\x80-\xff]"  # obs-text allowed: common in raw UTF-8 targets
_METHOD_SP = re.compile(_TOKEN + rb"{1,%d} " % MAX_METHOD)
_TOKEN_RUN = re.compile(_TOKEN + rb"*")
_TARGET_RUN = re.compile(_VCHAR + rb"*")
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb"+) (" + _VCHAR + rb"+) (HTTP/[0-9]\.[0-9])\r\n")
_FIELD = re.compile(
    rb"(" + _TOKEN + rb"+):[ \t]*((?:" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*)?)[ \t]*"
)
_ABSOLUTE = re.compile(rb"[hH][tT][tT][pP][sS]?://([^/?#]*)")
_PORT = re.compile(rb"[0-9]{0,5}")


@dataclass(frozen=True, slots=True)
class HTTPRequestHead:
    method: str
    target: str
    version: str  # "HTTP/1.1"
    host: str | None  # lowercased, no port, no trailing dot; IPv6 without brackets
    length: int  # bytes of the head, final CRLFCRLF included


def parse_http_head(data: bytes) -> HTTPRequestHead | NeedMore:
    """Parse the request head at the start of `data`."""
    if _METHOD_SP.match(data) is None:
        n = _TOKEN_RUN.match(data, 0, MAX_METHOD + 1).end()  # type: ignore[union-attr]
        if n == len(data) and n <= MAX_METHOD:
            return NEED_MORE
        raise HTTPError("not an HTTP request line")
    end = data.find(b"\r\n\r\n", 0, MAX_HEAD)
    line_end = data.find(b"\r\n", 0, MAX_HEAD) + 2
    if line_end == 1:
        if b"\n" in data or len(data) >= MAX_HEAD:
            raise HTTPError("request line not ended by CRLF within bound")
        return NEED_MORE
    line = _REQUEST_LINE.fullmatch(data, 0, line_end)
    if line is None:
        raise HTTPError(f"bad request line {data[: min(line_end, 200)]!r}")
    if end < 0:
        if len(data) >= MAX_HEAD:
            raise HTTPError(f"request head exceeds {MAX_HEAD} bytes")
        return NEED_MORE
    method, target, version = line.group(1), line.group(2), line.group(3)
    host_value: bytes | None = None
    if line_end < end + 2:
        for field in data[line_end:end].split(b"\r\n"):
            m = _FIELD.fullmatch(field)
            if m is None:
                raise HTTPError(f"bad header field {field[:200]!r}")
            if m.group(1).lower() == b"host":
                if host_value is not None:
                    raise HTTPError("more than one Host header")  # RFC 9112 3.2
                host_value = m.group(2)
    # RFC 9112 3.2.2: an absolute-form target's authority wins over Host.
    absolute = _ABSOLUTE.match(target)
    if absolute is not None:
        host_value = absolute.group(1)
    elif method == b"CONNECT":
        host_value = target
    host = _host_of(host_value) if host_value else None
    return HTTPRequestHead(
        method.decode("ascii"), target.decode("latin-1"), version.decode("ascii"), host, end + 4
    )


def _host_of(authority: bytes) -> str | None:
    authority = authority.rpartition(b"@")[2]  # userinfo: deprecated, never part of the name
    if authority.startswith(b"["):
        close = authority.find(b"]")
        port = authority[close + 1 :]
        if close < 0 or (port and (port[:1] != b":" or not _PORT.fullmatch(port, 1))):
            raise HTTPError(f"bad IPv6 literal host {authority[:100]!r}")
        try:
            return str(ipaddress.IPv6Address(authority[1:close].decode("ascii")))
        except ValueError:
            raise HTTPError(f"bad IPv6 literal host {authority[:100]!r}") from None
    name, _, port = authority.partition(b":")
    if not _PORT.fullmatch(port):
        raise HTTPError(f"bad port in host {authority[:100]!r}")
    if not name:
        return None
    host = normalize_hostname(name)
    if host is None:
        raise HTTPError(f"bad host {authority[:100]!r}")
    return host


def classify_http(data: bytes) -> bool | None:
    """Whether `data` starts like an HTTP/1.x request line: True, False, or None (undecided).

    Stricter than parse_http_head's quick check so that line protocols such as
    IRC ("CAP LS 302") fall to the default route instead of failing as HTTP.
    """
    m = _METHOD_SP.match(data)
    if m is None:
        n = _TOKEN_RUN.match(data, 0, MAX_METHOD + 1).end()  # type: ignore[union-attr]
        return None if n == len(data) and n <= MAX_METHOD else False
    pos = m.end()
    t_end = _TARGET_RUN.match(data, pos, MAX_HEAD).end()  # type: ignore[union-attr]
    if t_end == len(data):
        return None if t_end < MAX_HEAD else False
    if t_end == pos or data[t_end] != 0x20:
        return False
    rest = data[t_end + 1 : t_end + 6]
    if rest != b"HTTP/"[: len(rest)]:
        return False
    return True if len(rest) == 5 else None
