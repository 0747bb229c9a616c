"""Request heads: from the fields httptools (llhttp, strict mode) parsed to a request the edge may forward.

Sans-I/O: values in, a `RequestHead` or a `Rejected` (status + reason) out. llhttp in strict mode
already refuses the byte-level tricks (bare CR or LF, obs-fold, CL+TE, duplicate or malformed
Content-Length, bad chunk sizes, spaces in the method or target). This module checks the rest and
repeats the framing checks, so that it is the one place that decides, and can be fuzzed alone:

- HTTP/1.0 and HTTP/1.1 only; origin-form targets only (absolute-form, authority-form (CONNECT) and
  asterisk-form are refused, so the edge can never be asked to relay to a place it does not serve);
- exactly one valid Host on HTTP/1.1;
- one framing: a single decimal Content-Length, or Transfer-Encoding exactly "chunked" (RFC 9112 6.3);
  Transfer-Encoding on HTTP/1.0 is refused (RFC 9112 6.1);
- Expect other than 100-continue gets 417; an Upgrade request carries no body; h2c is never
  upgraded to (it would tunnel past the edge's path routes).

The edge then writes a new, canonical head for the upstream (forwarding.py), so what the upstream
reads is exactly what was checked here.
"""

from __future__ import annotations

import ipaddress
import re

from ..codec._names import normalize_hostname

Headers = list[tuple[bytes, bytes]]

_PORT = re.compile(rb"[0-9]{0,5}")
# Origin-form, no fragment ('#', 0x23); llhttp refuses CTLs, spaces and non-ASCII already. One match
# checks all of it: the usual request pays for no other call (bytes.find/startswith are slow calls).
_TARGET = re.compile(rb"/[\x21\x22\x24-\x7e]*")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_COMMON_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"})  # tokens


_SLOTS = {b"host": 0, b"content-length": 1, b"transfer-encoding": 2, b"connection": 3, b"expect": 4, b"upgrade": 5}
_NO_TOKENS: frozenset[bytes] = frozenset()

# Field name as received → its slot above, or -1. Clients and upstreams repeat the same few
# spellings, so after the first request a field costs one dict lookup, not a lower() and two.
_NAME_SLOTS: dict[bytes, int] = {**_SLOTS, **{k.title(): v for k, v in _SLOTS.items()}}
_NAME_SLOTS_MAX = 4096


def length_value(value: bytes) -> int:
    """A Content-Length value (1 to 18 ASCII digits) as a number; -1 for anything else. Compiled,
    this loop costs less than a regex match and int() of bytes, once per request and response."""
    if not 0 < len(value) <= 18:
        return -1
    n = 0
    for b in value:
        if not 48 <= b <= 57:
            return -1
        n = n * 10 + (b - 48)
    return n


def field_slot(name: bytes) -> int:
    """The slot (0 host, 1 content-length, 2 transfer-encoding, 3 connection, 4 expect, 5 upgrade)
    of a field name in any case, -1 for any other field."""
    i = _NAME_SLOTS.get(name)
    if i is None:
        i = _SLOTS.get(name.lower(), -1)
        if len(_NAME_SLOTS) < _NAME_SLOTS_MAX and len(name) <= 64:
            _NAME_SLOTS[name] = i
    return i


def collect_fields(headers: Headers) -> list[list[bytes] | None]:
    """The values of the six fields that decide framing, routing and the connection, by slot
    (None where absent), in one pass."""
    found: list[list[bytes] | None] = [None, None, None, None, None, None]
    for name, value in headers:
        i = _NAME_SLOTS.get(name)  # (compiled: a native dict lookup; a local alias of .get would be a Python call)
        if i is None:
            i = field_slot(name)
        if i >= 0:
            values = found[i]
            if values is None:
                found[i] = [value]
            else:
                values.append(value)
    return found


class Rejected(Exception):
    """The request cannot be forwarded; answer `status` and close (reason is for the log only)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class RequestHead:
    """A checked request head. A plain class rather than a dataclass: compiled (mypyc), its
    constructor is native; a dataclass's generated __init__ stays interpreted (~0.4 µs a request)."""

    __slots__ = ("authority", "chunked", "connection_tokens", "content_length", "expect_continue", "headers", "host",
                 "keep_alive", "method", "path", "query", "target", "upgrade", "version")

    def __init__(self, method: bytes, target: bytes, version: bytes, headers: Headers, host: str | None,
                 authority: bytes | None, path: bytes, query: bytes, content_length: int | None, chunked: bool,
                 keep_alive: bool, expect_continue: bool, upgrade: bytes | None,
                 connection_tokens: frozenset[bytes]) -> None:
        self.method = method
        self.target = target  # as received (origin-form)
        self.version = version  # b"1.1" or b"1.0"
        self.headers = headers  # as received, names in their original case
        # From Host: lowercased, no port, no trailing dot; None = no or empty Host (HTTP/1.0).
        self.host = host
        self.authority = authority  # the Host value as received (X-Forwarded-Host, Forwarded host=)
        self.path = path  # target before '?'
        self.query = query  # after '?', without it
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive  # what the client asked for
        self.expect_continue = expect_continue
        self.upgrade = upgrade  # the Upgrade value to forward when the client asks to switch protocols
        self.connection_tokens = connection_tokens  # lowercased; the names they list are hop-by-hop too

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r} {self.target!r} HTTP/{self.version.decode()} host={self.host!r})"

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


_TOKEN_SETS: dict[bytes, frozenset[bytes]] = {}  # Connection values repeat: parsed once (bounded)


def connection_tokens(values: list[bytes] | None) -> frozenset[bytes]:
    """The lowercased tokens of Connection fields (names listed there are hop-by-hop too)."""
    if not values:
        return _NO_TOKENS
    if len(values) == 1:
        out = _TOKEN_SETS.get(values[0])
        if out is None:
            out = frozenset(_comma_tokens(values))
            if len(_TOKEN_SETS) < 1024 and len(values[0]) <= 256:
                _TOKEN_SETS[values[0]] = out
        return out
    return frozenset(_comma_tokens(values))


def _comma_tokens(values: list[bytes]) -> list[bytes]:
    out = []
    for v in values:
        for part in v.split(b","):
            t = part.strip(b" \t").lower()
            if t:
                out.append(t)
    return out


_HOSTS: dict[bytes, str | None] = {}  # Host values repeat: parsed once (bounded)


def parse_host(value: bytes) -> str | None:
    """Host header value → normalized name (no port), None for an empty value; Rejected when invalid."""
    try:
        return _HOSTS[value]
    except KeyError:
        pass
    host = _parse_host(value)
    if len(_HOSTS) < 4096:
        _HOSTS[value] = host
    return host


def _parse_host(value: bytes) -> str | None:
    if not value:
        return None
    if value.startswith(b"["):
        close = value.find(b"]")
        port = value[close + 1 :] if close > 0 else b""
        if close < 0 or (port and (port[:1] != b":" or not _PORT.fullmatch(port, 1))):
            raise Rejected(400, "bad Host")
        try:
            return str(ipaddress.IPv6Address(value[1:close].decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            raise Rejected(400, "bad Host") from None
    name, _, port = value.partition(b":")
    if not name or not _PORT.fullmatch(port) or value.find(b"@") >= 0:
        raise Rejected(400, "bad Host")
    host = normalize_hostname(name)
    if host is None:
        raise Rejected(400, "bad Host")
    return host


def validate_request(method: bytes, target: bytes, version: str, headers: Headers) -> RequestHead:
    """Check a parsed request head; raises Rejected with the status to answer."""
    if version == "1.1":
        v11 = True
    elif version == "1.0":
        v11 = False
    elif version.startswith(("0.", "1.")):
        raise Rejected(400, f"HTTP/{version} request")
    else:
        raise Rejected(505, f"HTTP/{version} request")
    if method not in _COMMON_METHODS:
        if method == b"CONNECT":
            raise Rejected(405, "CONNECT refused: the edge is not a forward proxy")
        if not _TOKEN.fullmatch(method):
            raise Rejected(400, "bad method")
    if _TARGET.fullmatch(target) is None:
        if target[:1] != b"/":
            if target == b"*":
                raise Rejected(400, "asterisk-form target")
            raise Rejected(400, "absolute-form target refused: the edge is not a forward proxy")
        raise Rejected(400, "bad request target")

    # One pass; only the fields that decide framing, routing and the connection are collected.
    host_values, cl_values, te_values, conn_values, expect_values, upgrade_values = collect_fields(headers)

    if host_values is None:
        if v11:
            raise Rejected(400, "HTTP/1.1 request without Host")
        authority = host = None
    else:
        if len(host_values) > 1:
            raise Rejected(400, "more than one Host")
        authority = host_values[0].strip(b" \t")
        host = parse_host(authority)

    content_length: int | None = None
    chunked = False
    if te_values:
        if not v11:
            raise Rejected(400, "Transfer-Encoding in an HTTP/1.0 request")
        if cl_values:
            raise Rejected(400, "both Content-Length and Transfer-Encoding")
        codings = _comma_tokens(te_values)
        if codings != [b"chunked"]:
            if codings.count(b"chunked") == 1 and codings[-1] == b"chunked":
                raise Rejected(501, "transfer coding other than chunked")
            raise Rejected(400, "Transfer-Encoding not ending in one chunked")  # RFC 9112 7: chunked once, last
        chunked = True
    elif cl_values:
        if len(cl_values) > 1:
            raise Rejected(400, "more than one Content-Length")
        cl = cl_values[0].strip(b" \t")
        content_length = length_value(cl)
        if content_length < 0:
            raise Rejected(400, "bad Content-Length")

    tokens = connection_tokens(conn_values)
    keep_alive = (b"close" not in tokens) if v11 else (b"keep-alive" in tokens and b"close" not in tokens)

    expect_continue = False
    if expect_values and v11:  # RFC 9110 10.1.1: ignore Expect in an HTTP/1.0 request
        if [e.strip(b" \t").lower() for e in expect_values] != [b"100-continue"]:
            raise Rejected(417, "unsupported Expect")
        expect_continue = True

    upgrade: bytes | None = None
    if upgrade_values and b"upgrade" in tokens and v11:
        protocols = [p.strip(b" \t") for v in upgrade_values for p in v.split(b",") if p.strip(b" \t")]
        # h2c would leave the edge relaying an HTTP/2 connection whose requests it never routes.
        protocols = [p for p in protocols if p.lower() != b"h2c"]
        if protocols:
            if chunked or content_length:
                raise Rejected(400, "Upgrade request with a body")
            upgrade = b", ".join(protocols)

    path, _, query = target.partition(b"?")
    return RequestHead(method, target, b"1.1" if v11 else b"1.0", headers, host, authority, path, query,
                       content_length, chunked, keep_alive, expect_continue, upgrade, tokens)
