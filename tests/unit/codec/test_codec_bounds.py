"""Plausible inputs that never end: every parser must give up at its bound."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward.codec import (
    NEED_MORE,
    CodecError,
    http,
    parse_client_hello,
    parse_http_head,
    parse_proxy,
    parse_ssh_banner,
    parse_xmpp_header,
    proxy,
    sniff,
    ssh,
    tls,
    xmpp,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
Parser = Callable[[bytes], object]

# (parser, bound, prefix, filler): prefix + filler * n stays a valid prefix as long as it can
ENDLESS: list[tuple[str, Parser, int, bytes, bytes]] = [
    ("http-target", parse_http_head, http.MAX_HEAD, b"GET /", b"a"),
    ("http-fields", parse_http_head, http.MAX_HEAD, b"GET / HTTP/1.1\r\n", b"X-A: b\r\n"),
    ("xmpp-attrs", parse_xmpp_header, xmpp.MAX_HEADER + 1, b"<stream:stream", b" a='b'"),
    ("xmpp-value", parse_xmpp_header, xmpp.MAX_HEADER + 1, b"<stream:stream a='", b"b"),
    ("xmpp-decl", parse_xmpp_header, xmpp.MAX_HEADER + 1, b"<?xml ", b"v"),
    ("ssh", parse_ssh_banner, ssh.MAX_BANNER, b"SSH-2.0-", b"a"),
    ("proxy-v1", parse_proxy, proxy.V1_MAX, b"PROXY UNKNOWN ", b"a"),
    ("proxy-v2", parse_proxy, proxy.V2_MAX, SIG + b"\x21\x11\xff\xff", b"\x00"),
    (
        "tls-1-byte-records",
        parse_client_hello,
        tls.MAX_STREAM + 5,
        b"\x16\x03\x01\x00\x04\x01\x00\x40\x00",
        b"\x16\x03\x01\x00\x01\x00",
    ),
    (
        "tls-big-record",
        parse_client_hello,
        tls.MAX_STREAM + 5,
        b"\x16\x03\x01\x40\x00\x01\x00\x40\x00",
        b"\x00",
    ),
]


@pytest.mark.parametrize(
    ("parser", "bound", "prefix", "filler"), [e[1:] for e in ENDLESS], ids=[e[0] for e in ENDLESS]
)
@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 8000))
def test_endless_input_is_cut_off(
    parser: Parser, bound: int, prefix: bytes, filler: bytes, n: int
) -> None:
    data = prefix + filler * n
    # sniff() must stay as bounded as the parser it delegates to (PROXY is not sniffed).
    parsers = [parser] if parser is parse_proxy else [parser, sniff]
    for parse in parsers:
        try:
            result = parse(data)
        except CodecError:
            continue
        assert result is NEED_MORE, result
        assert len(data) < bound


@pytest.mark.parametrize(
    ("parser", "bound", "prefix", "filler"), [e[1:] for e in ENDLESS], ids=[e[0] for e in ENDLESS]
)
def test_past_the_bound_is_an_error(
    parser: Parser, bound: int, prefix: bytes, filler: bytes
) -> None:
    data = prefix + filler * (bound // len(filler) + 1)
    with pytest.raises(CodecError):
        parser(data)
