from __future__ import annotations

import pytest
from codec_samples import openssl_hello, python_client_hello
from hypothesis import given
from hypothesis import strategies as st

from edgeward.codec import (
    NEED_MORE,
    ClientHello,
    CodecError,
    HTTPError,
    HTTPRequestHead,
    Sniffed,
    SSHBanner,
    SSHError,
    TLSError,
    XMPPError,
    XMPPHeader,
    build_proxy_v2,
    sniff,
)
from edgeward.codec.testing import build_client_hello

NS = "http://etherx.jabber.org/streams"
XMPP = f"<stream:stream to='Example.org' xmlns='jabber:client' xmlns:stream='{NS}'>".encode()
HTTP = b"GET / HTTP/1.1\r\nHost: Cloud.Example.org:443\r\n\r\n"
SSH = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"


def sniffed(data: bytes) -> Sniffed:
    result = sniff(data)
    assert isinstance(result, Sniffed)
    return result


def test_tls() -> None:
    s = sniffed(python_client_hello("Cloud.Example.org", ["h2", "http/1.1"]))
    assert (s.protocol, s.name, s.alpn) == ("tls", "cloud.example.org", ("h2", "http/1.1"))
    assert isinstance(s.detail, ClientHello)
    assert sniffed(openssl_hello("openssl_nosni")).name is None


def test_tls_split() -> None:
    s = sniffed(build_client_hello("meet.example", ["h2"], record_split=50))
    assert (s.protocol, s.name) == ("tls", "meet.example")


def test_http() -> None:
    s = sniffed(HTTP)
    assert (s.protocol, s.name, s.alpn) == ("http", "cloud.example.org", ())
    assert isinstance(s.detail, HTTPRequestHead)


def test_http_method_starting_with_s() -> None:
    s = sniffed(b"SEARCH /x HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert (s.protocol, s.name) == ("http", "a.example")


def test_xmpp() -> None:
    s = sniffed(XMPP)
    assert (s.protocol, s.name) == ("xmpp", "example.org")
    assert isinstance(s.detail, XMPPHeader)


def test_ssh() -> None:
    s = sniffed(SSH)
    assert (s.protocol, s.name) == ("ssh", None)
    assert isinstance(s.detail, SSHBanner)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x10",
        b"CAP LS 302\r\n",  # IRC
        b"*1\r\n$4\r\nPING\r\n",  # Redis
        b"\x80\x2e\x01\x00\x02",  # SSLv2-compatible hello
        b"hello world\n",
        build_proxy_v2(("192.0.2.1", 1), ("192.0.2.2", 2)),  # PROXY is not sniffed here
        b"GET /\r\n",  # HTTP/0.9
    ],
)
def test_unknown(data: bytes) -> None:
    assert sniff(data) == Sniffed("unknown", None, (), None)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", TLSError),
        (b"<html><body>", XMPPError),
        (b"SSH-2.0-\r\n", SSHError),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", HTTPError),
        (b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n", HTTPError),
    ],
)
def test_malformed_recognised_protocol_raises(data: bytes, error: type[CodecError]) -> None:
    with pytest.raises(error):
        sniff(data)
    with pytest.raises(error):
        sniff(data, final=True)


@pytest.mark.parametrize("message", [XMPP, HTTP, SSH, build_client_hello("a.example")])
def test_prefixes_need_more_until_final(message: bytes) -> None:
    for n in range(len(message)):
        assert sniff(message[:n]) is NEED_MORE, n
        assert sniff(message[:n], final=True) == Sniffed("unknown", None, (), None)


def test_empty() -> None:
    assert sniff(b"") is NEED_MORE
    assert sniff(b"", final=True).protocol == "unknown"  # type: ignore[union-attr]


@pytest.mark.parametrize("data", [b"S", b"SS", b"SSH", b"GET", b"<", b"\x16"])
def test_ambiguous_first_bytes_wait(data: bytes) -> None:
    assert sniff(data) is NEED_MORE


@given(st.binary(max_size=400), st.booleans())
def test_any_bytes(data: bytes, final: bool) -> None:
    for candidate in (data, b"\x16\x03\x01" + data, b"<" + data, b"SSH-" + data, b"GET " + data):
        try:
            result = sniff(candidate, final=final)
        except CodecError:
            continue
        assert result is NEED_MORE or isinstance(result, Sniffed)
        if final:
            assert result is not NEED_MORE
