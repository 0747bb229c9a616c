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
from http import HTTPStatus

from .request import Headers, Rejected, RequestHead, collect_fields, connection_tokens, length_value

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authenticate", b"proxy-authorization",
})
# Framing is chosen by the edge, never copied.
_FRAMING = frozenset({b"content-length"})
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

# What a field of the client's request becomes upstream, by its lowercased name.
_PASS, _DROP, _EXPECT, _XFF, _FORWARDED, _XF_PROTO, _XF_HOST, _REAL_IP, _XF_OTHER = range(9)
_KINDS = {b"expect": _EXPECT, b"x-forwarded-for": _XFF, b"forwarded": _FORWARDED, b"x-forwarded-proto": _XF_PROTO,
          b"x-forwarded-host": _XF_HOST, b"x-real-ip": _REAL_IP}
# Field name as received → (kind, lowercased name): after the first request a field costs one
# dict lookup. Bounded, and only short names (the usual ones) are remembered.
_REQUEST_FIELDS: dict[bytes, tuple[int, bytes]] = {}
_FIELDS_MAX = 4096


def _request_field(name: bytes) -> tuple[int, bytes]:
    n = name.lower()
    if n in HOP_BY_HOP or n in _FRAMING:
        kind = _DROP
    else:
        kind = _KINDS.get(n, _XF_OTHER if n.startswith(b"x-forwarded-") else _PASS)
    entry = (kind, n)
    if len(_REQUEST_FIELDS) < _FIELDS_MAX and len(name) <= 64:
        _REQUEST_FIELDS[name] = entry
    return entry


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


# The forwarded fields an untrusted client's request ends with depend only on its address, the
# scheme and the Host it sent: built once per such triple (bounded; cleared when full).
_UNTRUSTED_TAILS: dict[tuple[str, str, bytes | None], bytes] = {}
_EXTRA_HOPS: dict[frozenset[bytes], frozenset[bytes]] = {}  # Connection tokens beyond HOP_BY_HOP


def _untrusted_tail(client_ip: str, scheme: str, authority: bytes | None) -> bytes:
    key = (client_ip, scheme, authority)
    tail = _UNTRUSTED_TAILS.get(key)
    if tail is None:
        tail = _forwarded_tail([], [], client_ip, scheme, authority, keep_proto=False, keep_host=False,
                               keep_real_ip=False)
        if len(_UNTRUSTED_TAILS) >= 1024:
            _UNTRUSTED_TAILS.clear()
        _UNTRUSTED_TAILS[key] = tail
    return tail


def _forwarded_tail(xff: list[bytes], fwd: list[bytes], client_ip: str, scheme: str, authority: bytes | None, *,
                    keep_proto: bool, keep_host: bool, keep_real_ip: bool) -> bytes:
    ip = client_ip.encode()
    proto = scheme.encode()
    xff.append(ip)
    out = [b"X-Forwarded-For: ", b", ".join(xff), b"\r\n"]
    if not keep_proto:
        out += (b"X-Forwarded-Proto: ", proto, b"\r\n")
    if not keep_host and authority:
        out += (b"X-Forwarded-Host: ", authority, b"\r\n")
    if not keep_real_ip:
        out += (b"X-Real-IP: ", ip, b"\r\n")
    element = b"for=" + _forwarded_node(client_ip)
    if authority:
        element += b";host=" + _forwarded_value(authority)
    element += b";proto=" + proto
    fwd.append(element)
    out += (b"Forwarded: ", b", ".join(fwd), b"\r\n\r\n")
    return b"".join(out)


def upstream_request_head(req: RequestHead, *, client_ip: str, scheme: str, trusted: bool) -> bytes:
    """The request head sent upstream (HTTP/1.1, keep-alive): request line, end-to-end fields,
    framing, Upgrade when switching, forwarded headers."""
    tokens = req.connection_tokens
    extra: frozenset[bytes] | None = None
    if tokens:
        extra = _EXTRA_HOPS.get(tokens)
        if extra is None:
            extra = tokens - HOP_BY_HOP
            if len(_EXTRA_HOPS) < 1024:
                _EXTRA_HOPS[tokens] = extra
    out = [req.method, b" ", req.target, b" HTTP/1.1\r\n"]
    xff: list[bytes] = []
    fwd: list[bytes] = []
    keep_proto = keep_host = keep_real_ip = False
    for name, value in req.headers:
        field = _REQUEST_FIELDS.get(name)  # (compiled: a native dict lookup; a local alias of .get would be a Python call)
        if field is None:
            field = _request_field(name)
        kind, n = field
        if extra and n in extra:
            continue
        if kind:
            if kind == _DROP:
                continue
            if kind == _EXPECT:
                if not req.expect_continue:
                    continue  # an HTTP/1.0 client's Expect is ignored (RFC 9110 10.1.1), so not passed on
            elif not trusted:
                continue  # a forwarded field from a client the edge does not trust
            elif kind == _XFF:
                xff.append(value)
                continue
            elif kind == _FORWARDED:
                fwd.append(value)
                continue
            elif kind == _XF_PROTO:
                keep_proto = True
            elif kind == _XF_HOST:
                keep_host = True
            elif kind == _REAL_IP:
                keep_real_ip = True
        out.append(name)  # (four appends: compiled, cheaper than extending the list by a new tuple)
        out.append(b": ")
        out.append(value)
        out.append(b"\r\n")
    if req.chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif req.content_length is not None:
        out += (b"Content-Length: ", b"%d" % req.content_length, b"\r\n")
    if req.upgrade is not None:
        out += (b"Connection: upgrade\r\nUpgrade: ", req.upgrade, b"\r\n")
    if trusted:
        out.append(_forwarded_tail(xff, fwd, client_ip, scheme, req.authority, keep_proto=keep_proto,
                                   keep_host=keep_host, keep_real_ip=keep_real_ip))
    elif req.authority is None or len(req.authority) <= 255:
        out.append(_untrusted_tail(client_ip, scheme, req.authority))
    else:
        out.append(_forwarded_tail(xff, fwd, client_ip, scheme, req.authority, keep_proto=False, keep_host=False,
                                   keep_real_ip=False))
    return b"".join(out)


# --- responses ---------------------------------------------------------------------------------

LENGTH, CHUNKED, UNTIL_CLOSE, NO_BODY = range(4)  # how a response body is delimited


class ResponseHead:
    """A checked upstream response head (a plain class, for a native constructor: see RequestHead)."""

    __slots__ = ("connection_tokens", "content_length", "framing", "headers", "reason", "status", "upstream_keep_alive")

    def __init__(self, status: int, reason: bytes, headers: Headers, framing: int, content_length: int | None,
                 upstream_keep_alive: bool, connection_tokens: frozenset[bytes]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.framing = framing  # of the upstream's body: LENGTH, CHUNKED, UNTIL_CLOSE or NO_BODY
        self.content_length = content_length
        self.upstream_keep_alive = upstream_keep_alive  # the upstream lets this connection be reused
        self.connection_tokens = connection_tokens

    def __repr__(self) -> str:
        return f"ResponseHead({self.status} framing={self.framing} keep_alive={self.upstream_keep_alive})"


def validate_response(status: int, reason: bytes, headers: Headers, *, version: str, request_method: bytes,
                      parser_keep_alive: bool) -> ResponseHead:
    """Check an upstream's final response head (llhttp checked the bytes); Rejected(502) if unusable."""
    if not 200 <= status <= 599:
        raise Rejected(502, f"upstream status {status}")
    if version not in ("1.1", "1.0"):
        raise Rejected(502, f"upstream HTTP/{version}")
    _, cl_values, te_values, conn_values, _, _ = collect_fields(headers)
    tokens = connection_tokens(conn_values)
    content_length: int | None = None
    if te_values and cl_values:
        raise Rejected(502, "upstream sent both Content-Length and Transfer-Encoding")
    if cl_values:
        if len(cl_values) > 1:
            raise Rejected(502, "upstream sent more than one Content-Length")
        cl = cl_values[0].strip(b" \t")
        content_length = length_value(cl)
        if content_length < 0:
            raise Rejected(502, "upstream sent a bad Content-Length")
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


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}  # (status, reason) repeat: formatted once (bounded)


def _status_line(status: int, reason: bytes) -> bytes:
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        phrase = reason
        if not phrase:
            try:
                phrase = HTTPStatus(status).phrase.encode()
            except ValueError:
                phrase = b""
        line = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
        if len(_STATUS_LINES) < 256 and len(reason) <= 64:
            _STATUS_LINES[key] = line
    return line


# Field name of a response as received → True when the client may get it as it is (not
# hop-by-hop, not framing): after the first response a field costs one dict lookup (bounded).
_RESPONSE_FIELDS: dict[bytes, bool] = {}


def _end_to_end(name: bytes) -> tuple[bool, bytes]:
    n = name.lower()
    keep = n not in HOP_BY_HOP and n not in _FRAMING
    if len(_RESPONSE_FIELDS) < _FIELDS_MAX and len(name) <= 64:
        _RESPONSE_FIELDS[name] = keep
    return keep, n


def client_response_head(resp: ResponseHead, *, client_v11: bool, keep_alive: bool) -> tuple[bytes, int]:
    """The response head for the client and how its body is delimited to the client
    (LENGTH, CHUNKED, UNTIL_CLOSE or NO_BODY). A body the upstream delimits by chunks or by closing
    goes to an HTTP/1.1 client chunked (so its connection stays open), to HTTP/1.0 until close."""
    tokens = resp.connection_tokens
    extra: frozenset[bytes] | None = None
    if tokens:
        extra = _EXTRA_HOPS.get(tokens)
        if extra is None:
            extra = tokens - HOP_BY_HOP
            if len(_EXTRA_HOPS) < 1024:
                _EXTRA_HOPS[tokens] = extra
    # The upstream's Content-Length is passed on as it is only where it does not frame a body
    # the client reads (HEAD, 304), never on a 204.
    keep_length = resp.framing == NO_BODY and resp.status != 204
    out = [_status_line(resp.status, resp.reason)]
    for name, value in resp.headers:
        keep = _RESPONSE_FIELDS.get(name)
        if keep is None or extra:
            keep, n = _end_to_end(name)
            if extra and n in extra:
                continue
        if not keep and (not keep_length or name.lower() != b"content-length"):
            continue
        out.append(name)  # (four appends: compiled, cheaper than extending the list by a new tuple)
        out.append(b": ")
        out.append(value)
        out.append(b"\r\n")
    framing = resp.framing
    if framing == LENGTH:
        out += (b"Content-Length: ", b"%d" % (resp.content_length or 0), b"\r\n")
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
