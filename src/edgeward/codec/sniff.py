"""Which protocol a client speaks, from its first bytes, and the name it asks for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgeward.codec.errors import NEED_MORE, NeedMore
from edgeward.codec.http import HTTPRequestHead, classify_http, parse_http_head
from edgeward.codec.ssh import PREFIX as SSH_PREFIX
from edgeward.codec.ssh import SSHBanner, parse_ssh_banner
from edgeward.codec.tls import ClientHello, parse_client_hello
from edgeward.codec.xmpp import XMPPHeader, parse_xmpp_header

Protocol = Literal["tls", "http", "xmpp", "ssh", "unknown"]


@dataclass(frozen=True, slots=True)
class Sniffed:
    protocol: Protocol
    name: str | None  # SNI, HTTP Host or XMPP `to`
    alpn: tuple[str, ...]
    detail: ClientHello | HTTPRequestHead | XMPPHeader | SSHBanner | None


UNKNOWN = Sniffed("unknown", None, (), None)


def sniff(data: bytes, *, final: bool = False) -> Sniffed | NeedMore:
    """Classify `data` and extract routing facts.

    Raises the protocol's CodecError when the first bytes commit to a protocol
    but the rest is malformed; returns protocol "unknown" for anything else.
    With `final`, no more bytes will come, so an undecided prefix is "unknown".
    """
    result = _sniff(data)
    if result is NEED_MORE and final:
        return UNKNOWN
    return result


def _sniff(data: bytes) -> Sniffed | NeedMore:
    if not data:
        return NEED_MORE
    first = data[0]
    if first == 0x16:
        hello = parse_client_hello(data)
        if hello is NEED_MORE:
            return NEED_MORE
        return Sniffed("tls", hello.sni, hello.alpn, hello)
    if first == 0x3C:  # "<"
        header = parse_xmpp_header(data)
        if header is NEED_MORE:
            return NEED_MORE
        return Sniffed("xmpp", header.to, (), header)
    if first == 0x53:  # "S": SSH, or an HTTP method such as SEARCH
        n = min(len(data), len(SSH_PREFIX))
        if data[:n] == SSH_PREFIX[:n]:
            if n < len(SSH_PREFIX):
                return NEED_MORE
            banner = parse_ssh_banner(data)
            if banner is NEED_MORE:
                return NEED_MORE
            return Sniffed("ssh", None, (), banner)
    verdict = classify_http(data)
    if verdict is None:
        return NEED_MORE
    if not verdict:
        return UNKNOWN
    head = parse_http_head(data)
    if head is NEED_MORE:
        return NEED_MORE
    return Sniffed("http", head.host, (), head)
