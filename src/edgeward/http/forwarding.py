"""The heads the edge writes: the request to the upstream, the response to the client.

Sans-I/O. Both are rebuilt from checked values rather than copied, so each carries exactly one
framing the edge chose, and no hop-by-hop field of the other connection (RFC 9110 7.6.1:
Connection, the fields it names, Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding,
Upgrade; and Proxy-Authenticate/-Authorization, which are for a proxy the client chose, not for us).

Forwarded headers: from a client the edge does not trust (not in [http] trusted_proxies), every
X-Forwarded-* field, X-Real-IP and Forwarded are removed and replaced by what the edge saw. From a
trusted proxy they are kept: X-Forwarded-For and Forwarded get this hop appended, X-Forwarded-Proto,
-Host and X-Real-IP keep the first proxy's values (set when missing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus

from .request import _SLOTS, Headers, Rejected, RequestHead, connection_tokens

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authenticate", b"proxy-authorization",
})
# Framing is chosen by the edge, never copied.
_FRAMING = frozenset({b"content-length"})
_FORWARDED_EXACT = frozenset({b"forwarded", b"x-real-ip"})
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DIGITS = re.compile(rb"[0-9]{1,18}")


def _is_forwarded(name: bytes) -> bool:
    return name in _FORWARDED_EXACT or name.startswith(b"x-forwarded-")


def _forwarded_node(ip: str) -> bytes:
    # RFC 7239 6: an IPv6 node is bracketed, and then must be a quoted-string.
    return f'"[{ip}]"'.encode() if ":" in ip else ip.encode()


_FORWARDED_VALUES: dict[bytes, bytes] = {}  # Host values repeat: quoted once (bounded)


def _forwarded_value(value: bytes) -> bytes:
    out = _FORWARDED_VALUES.get(value)
    if out is None:
        out = value if _TOKEN.fullmatch(value) else b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        if len(_FORWARDED_VALUES) < 4096:
            _FORWARDED_VALUES[value] = out
    return out


def upstream_request_head(req: RequestHead, *, client_ip: str, scheme: str, trusted: bool) -> bytes:
    """The request head sent upstream (HTTP/1.1, keep-alive): request line, end-to-end fields,
    framing, Upgrade when switching, forwarded headers."""
    drop = HOP_BY_HOP | req.connection_tokens
    out = [req.method, b" ", req.target, b" HTTP/1.1\r\n"]
    xff: list[bytes] = []
    fwd: list[bytes] = []
    kept = {b"x-forwarded-proto": False, b"x-forwarded-host": False, b"x-real-ip": False}
    for name, value in req.headers:
        n = name.lower()
        if n in drop or n in _FRAMING:
            continue
        if n == b"expect" and not req.expect_continue:
            continue  # an HTTP/1.0 client's Expect is ignored (RFC 9110 10.1.1), so not passed on
        if _is_forwarded(n):
            if not trusted:
                continue
            if n == b"x-forwarded-for":
                xff.append(value)
                continue
            if n == b"forwarded":
                fwd.append(value)
                continue
            if n in kept:
                kept[n] = True
        out += (name, b": ", value, b"\r\n")
    if req.chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif req.content_length is not None:
        out += (b"Content-Length: ", str(req.content_length).encode(), b"\r\n")
    if req.upgrade is not None:
        out += (b"Connection: upgrade\r\nUpgrade: ", req.upgrade, b"\r\n")
    ip = client_ip.encode()
    xff.append(ip)
    out += (b"X-Forwarded-For: ", b", ".join(xff), b"\r\n")
    if not kept[b"x-forwarded-proto"]:
        out += (b"X-Forwarded-Proto: ", scheme.encode(), b"\r\n")
    if not kept[b"x-forwarded-host"] and req.authority:
        out += (b"X-Forwarded-Host: ", req.authority, b"\r\n")
    if not kept[b"x-real-ip"]:
        out += (b"X-Real-IP: ", ip, b"\r\n")
    element = b"for=" + _forwarded_node(client_ip)
    if req.authority:
        element += b";host=" + _forwarded_value(req.authority)
    element += b";proto=" + scheme.encode()
    fwd.append(element)
    out += (b"Forwarded: ", b", ".join(fwd), b"\r\n\r\n")
    return b"".join(out)


# --- responses ---------------------------------------------------------------------------------

LENGTH, CHUNKED, UNTIL_CLOSE, NO_BODY = range(4)  # how a response body is delimited


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: Headers
    framing: int  # of the upstream's body: LENGTH, CHUNKED, UNTIL_CLOSE or NO_BODY
    content_length: int | None
    upstream_keep_alive: bool  # the upstream lets this connection be reused
    connection_tokens: frozenset[bytes]


def validate_response(status: int, reason: bytes, headers: Headers, *, version: str, request_method: bytes,
                      parser_keep_alive: bool) -> ResponseHead:
    """Check an upstream's final response head (llhttp checked the bytes); Rejected(502) if unusable."""
    if not 200 <= status <= 599:
        raise Rejected(502, f"upstream status {status}")
    if version not in ("1.1", "1.0"):
        raise Rejected(502, f"upstream HTTP/{version}")
    found: tuple[list[bytes], ...] = ([], [], [], [], [], [])
    slot = _SLOTS.get
    for name, value in headers:
        i = slot(name)
        if i is None:
            i = slot(name.lower())
            if i is None:
                continue
        found[i].append(value)
    _, cl_values, te_values, conn_values, _, _ = found
    tokens = connection_tokens(conn_values)
    content_length: int | None = None
    if te_values and cl_values:
        raise Rejected(502, "upstream sent both Content-Length and Transfer-Encoding")
    if len(cl_values) > 1:
        raise Rejected(502, "upstream sent more than one Content-Length")
    if cl_values:
        cl = cl_values[0].strip(b" \t")
        if not _DIGITS.fullmatch(cl):
            raise Rejected(502, "upstream sent a bad Content-Length")
        content_length = int(cl)
    if request_method == b"HEAD" or status in (204, 304):
        framing = NO_BODY
    elif te_values:
        codings = [t.strip(b" \t").lower() for v in te_values for t in v.split(b",") if t.strip(b" \t")]
        if codings != [b"chunked"]:
            raise Rejected(502, "upstream transfer coding other than chunked")
        framing = CHUNKED
    elif content_length is not None:
        framing = LENGTH
    else:
        framing = UNTIL_CLOSE
    keep_alive = parser_keep_alive and framing != UNTIL_CLOSE and b"close" not in tokens
    return ResponseHead(status, reason, headers, framing, content_length, keep_alive, tokens)


def _status_line(status: int, reason: bytes) -> bytes:
    if not reason:
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def client_response_head(resp: ResponseHead, *, client_v11: bool, keep_alive: bool) -> tuple[bytes, int]:
    """The response head for the client and how its body is delimited to the client
    (LENGTH, CHUNKED, UNTIL_CLOSE or NO_BODY). A body the upstream delimits by chunks or by closing
    goes to an HTTP/1.1 client chunked (so its connection stays open), to HTTP/1.0 until close."""
    drop = HOP_BY_HOP | resp.connection_tokens
    out = [_status_line(resp.status, resp.reason)]
    for name, value in resp.headers:
        n = name.lower()
        if n in drop or (n in _FRAMING and resp.status != 304 and resp.framing != NO_BODY):
            continue
        if n in _FRAMING and resp.status == 204:
            continue
        out += (name, b": ", value, b"\r\n")
    framing = resp.framing
    if framing == LENGTH:
        out += (b"Content-Length: ", str(resp.content_length).encode(), b"\r\n")
    elif framing in (CHUNKED, UNTIL_CLOSE):
        if client_v11:
            out.append(b"Transfer-Encoding: chunked\r\n")
            framing = CHUNKED
        else:
            framing = UNTIL_CLOSE
            keep_alive = False
    if not keep_alive:
        out.append(b"Connection: close\r\n")
    elif not client_v11:
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out), framing


def interim_response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """A 1xx response passed on to an HTTP/1.1 client (100 Continue, 103 Early Hints)."""
    out = [_status_line(status, reason)]
    for name, value in headers:
        if name.lower() not in HOP_BY_HOP:
            out += (name, b": ", value, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def switching_protocols_head(reason: bytes, headers: Headers) -> bytes:
    """The 101 passed on to the client: end-to-end fields (Sec-WebSocket-Accept, ...), the upstream's
    Upgrade, and Connection: upgrade."""
    out = [_status_line(101, reason)]
    upgrade = b""
    for name, value in headers:
        n = name.lower()
        if n == b"upgrade":
            upgrade = value
        elif n not in HOP_BY_HOP and n not in _FRAMING:
            out += (name, b": ", value, b"\r\n")
    out += (b"Upgrade: ", upgrade, b"\r\nConnection: upgrade\r\n\r\n")
    return b"".join(out)
