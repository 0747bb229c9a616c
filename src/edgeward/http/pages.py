"""Responses the edge writes itself: error pages, redirects to https, ACME HTTP-01 answers.

Error pages say the status and nothing else (no server name, version, upstream address or reason),
so a probe learns nothing from them. Sans-I/O.
"""

from __future__ import annotations

from http import HTTPStatus


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def response(status: int, body: bytes = b"", *, content_type: bytes = b"text/plain; charset=utf-8",
             close: bool = False, head: bool = False, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    out = [b"HTTP/1.1 %d %s\r\n" % (status, _phrase(status))]
    for name, value in extra:
        out += (name, b": ", value, b"\r\n")
    if body:
        out += (b"Content-Type: ", content_type, b"\r\n")
    out.append(b"Content-Length: %d\r\n" % len(body))
    if close:
        out.append(b"Connection: close\r\n")
    out.append(b"Cache-Control: no-store\r\n\r\n")
    if not head:
        out.append(body)
    return b"".join(out)


def error_page(status: int, *, close: bool, head: bool = False) -> bytes:
    return response(status, b"%d %s\n" % (status, _phrase(status)), close=close, head=head)


def redirect(location: bytes, *, permanent_method_safe: bool, close: bool, head: bool = False) -> bytes:
    """301 for GET/HEAD (understood and cached by every client), 308 for other methods (the client
    repeats the method and body, RFC 9110 15.4.9)."""
    status = 301 if permanent_method_safe else 308
    return response(status, b"", close=close, head=head, extra=((b"Location", location),))


ACME_PREFIX = b"/.well-known/acme-challenge/"


def acme_token(path: bytes) -> str | None:
    """The token of an ACME HTTP-01 challenge path (RFC 8555 8.3: base64url characters), else None."""
    if not path.startswith(ACME_PREFIX):
        return None
    token = path[len(ACME_PREFIX):]
    if not token or len(token) > 256 or not all(c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in token):
        return None
    return token.decode("ascii")
