"""Sans-I/O codecs: bytes in, typed values out; no sockets, no event loop.

Every parser takes the bytes received so far (from the first byte of the
connection) and returns a value, NEED_MORE, or raises a CodecError subclass.
"""

from edgeward.codec.errors import (
    NEED_MORE,
    CodecError,
    HTTPError,
    Incomplete,
    NeedMore,
    ProxyError,
    SSHError,
    TLSError,
    XMPPError,
)
from edgeward.codec.http import HTTPRequestHead, parse_http_head
from edgeward.codec.proxy import (
    ProxyHeader,
    build_proxy_v1,
    build_proxy_v2,
    build_proxy_v2_local,
    looks_like_proxy,
    parse_proxy,
)
from edgeward.codec.sniff import Sniffed, sniff
from edgeward.codec.ssh import SSHBanner, parse_ssh_banner
from edgeward.codec.tls import ClientHello, parse_client_hello
from edgeward.codec.xmpp import XMPPHeader, parse_xmpp_header

__all__ = [
    "NEED_MORE",
    "ClientHello",
    "CodecError",
    "HTTPError",
    "HTTPRequestHead",
    "Incomplete",
    "NeedMore",
    "ProxyError",
    "ProxyHeader",
    "SSHBanner",
    "SSHError",
    "Sniffed",
    "TLSError",
    "XMPPError",
    "XMPPHeader",
    "build_proxy_v1",
    "build_proxy_v2",
    "build_proxy_v2_local",
    "looks_like_proxy",
    "parse_client_hello",
    "parse_http_head",
    "parse_proxy",
    "parse_ssh_banner",
    "parse_xmpp_header",
    "sniff",
]
