"""XMPP stream header (RFC 6120 4.2): the opening <stream:stream> tag only.

A small tokenizer instead of an XML library: the header is one start tag, and
no DTD, comment, processing instruction (other than the XML declaration) or
entity other than the predefined ones may appear (RFC 6120 11.1), so nothing
here can expand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from edgeward.codec._names import normalize_hostname
from edgeward.codec.errors import NEED_MORE, NeedMore, XMPPError

MAX_HEADER = 4 * 1024  # declaration + start tag; real ones are ~200 bytes
STREAMS_NS = "http://etherx.jabber.org/streams"

Kind = Literal["client", "server", "component", "unknown"]
_KINDS: dict[str, Kind] = {
    "jabber:client": "client",
    "jabber:server": "server",
    "jabber:component:accept": "component",  # XEP-0114
    "jabber:component:connect": "component",
}

_WS = re.compile(rb"[ \t\r\n]*")
_NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9_.-]*(?::[A-Za-z_][A-Za-z0-9_.-]*)?")
_DECL = re.compile(rb"<\?xml[ \t\r\n][^<>?]*\?>")
_DECL_PREFIX = re.compile(rb"<\?(?:x(?:m(?:l(?:[ \t\r\n][^<>?]*\??)?)?)?)?")
_REF = re.compile(r"&(?:(lt|gt|amp|apos|quot)|#([0-9]{1,7})|#x([0-9A-Fa-f]{1,6}));")
_BAD_AMP = re.compile(r"&(?!(?:lt|gt|amp|apos|quot|#[0-9]{1,7}|#x[0-9A-Fa-f]{1,6});)")
_PREDEFINED = {"lt": "<", "gt": ">", "amp": "&", "apos": "'", "quot": '"'}


@dataclass(frozen=True, slots=True)
class XMPPHeader:
    to: str | None  # domain, lowercased, IDNA A-label form
    namespace: str  # default namespace ("jabber:client", ...); "" when absent
    kind: Kind
    length: int  # bytes up to and including the start tag's ">"


def _literal(data: bytes, pos: int, lit: bytes) -> bool:
    """True if `lit` is at pos; False if data ends inside it; XMPPError on mismatch."""
    got = data[pos : pos + len(lit)]
    if got == lit:
        return True
    if lit.startswith(got) and pos + len(got) == len(data):
        return False
    raise XMPPError(f"expected {lit!r} at byte {pos}")


def _name_may_continue(data: bytes, end: int) -> bool:
    # "stream" followed by a lone ":" at the end of data may still become "stream:stream".
    return end == len(data) or (end + 1 == len(data) and data[end] == 0x3A)


def parse_xmpp_header(data: bytes) -> XMPPHeader | NeedMore:
    """Parse `[<?xml ...?>] <stream:stream ...>` at the start of `data`."""
    if len(data) > MAX_HEADER:
        data = data[:MAX_HEADER]
        bounded = True
    else:
        bounded = False
    result = _parse(data)
    if result is NEED_MORE and bounded:
        raise XMPPError(f"stream header exceeds {MAX_HEADER} bytes")
    return result


def _parse(data: bytes) -> XMPPHeader | NeedMore:
    size = len(data)
    pos = 0
    if data.startswith(b"<?"):
        m = _DECL.match(data)
        if m is None:
            if _DECL_PREFIX.fullmatch(data) is None:
                raise XMPPError("bad XML declaration")
            return NEED_MORE
        pos = _WS.match(data, m.end()).end()  # type: ignore[union-attr]
    if pos == size:
        return NEED_MORE
    if not _literal(data, pos, b"<"):
        return NEED_MORE
    pos += 1
    name_m = _NAME.match(data, pos)
    if name_m is None:
        if pos == size:
            return NEED_MORE
        raise XMPPError("bad element name")
    if _name_may_continue(data, name_m.end()):
        return NEED_MORE
    qname = name_m.group().decode("ascii")
    prefix, _, local = qname.rpartition(":")
    if local != "stream":
        raise XMPPError(f"first element is <{qname}>, not a stream header")
    pos = name_m.end()
    attrs: dict[str, str] = {}
    while True:
        ws_end = _WS.match(data, pos).end()  # type: ignore[union-attr]
        if ws_end == size:
            return NEED_MORE
        c = data[ws_end]
        if c == 0x3E:  # ">"
            pos = ws_end + 1
            break
        if c == 0x2F:  # "/": an empty stream is not a stream
            raise XMPPError("self-closing stream header")
        if ws_end == pos:
            raise XMPPError(f"expected whitespace or '>' at byte {pos}")
        pos = ws_end
        name_m = _NAME.match(data, pos)
        if name_m is None:
            raise XMPPError(f"bad attribute name at byte {pos}")
        if _name_may_continue(data, name_m.end()):
            return NEED_MORE
        pos = _WS.match(data, name_m.end()).end()  # type: ignore[union-attr]
        if not _literal(data, pos, b"="):
            return NEED_MORE
        pos = _WS.match(data, pos + 1).end()  # type: ignore[union-attr]
        if pos == size:
            return NEED_MORE
        quote = data[pos]
        if quote not in (0x22, 0x27):
            raise XMPPError(f"attribute value not quoted at byte {pos}")
        close = data.find(quote, pos + 1)
        raw = data[pos + 1 : size if close < 0 else close]
        if b"<" in raw:
            raise XMPPError("'<' in attribute value")
        if close < 0:
            return NEED_MORE
        name = name_m.group().decode("ascii")
        if name in attrs:
            raise XMPPError(f"duplicate attribute {name}")
        attrs[name] = _unescape(raw)
        pos = close + 1
    ns_attr = f"xmlns:{prefix}" if prefix else "xmlns"
    if attrs.get(ns_attr) != STREAMS_NS:
        raise XMPPError(f"<{qname}> is not in the {STREAMS_NS} namespace")
    namespace = attrs.get("xmlns", "") if prefix else ""
    return XMPPHeader(_domain(attrs.get("to")), namespace, _KINDS.get(namespace, "unknown"), pos)


def _unescape(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise XMPPError("attribute value is not UTF-8") from None
    if "&" not in text:
        return text

    def ref(m: re.Match[str]) -> str:
        if m.group(1):
            return _PREDEFINED[m.group(1)]
        code = int(m.group(2)) if m.group(2) else int(m.group(3), 16)
        if code > 0x10FFFF:
            raise XMPPError("character reference out of range")
        return chr(code)

    if _BAD_AMP.search(text) is not None:
        raise XMPPError("undefined entity or bare '&' in attribute value")
    return _REF.sub(ref, text)


def _domain(value: str | None) -> str | None:
    if not value:
        return None
    try:
        raw = value.encode("ascii") if value.isascii() else value.encode("idna")
    except UnicodeError:
        raise XMPPError(f"bad domain in 'to': {value[:100]!r}") from None
    name = normalize_hostname(raw)
    if name is None:
        raise XMPPError(f"bad domain in 'to': {value[:100]!r}")
    return name
