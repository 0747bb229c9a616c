from __future__ import annotations

import ssl
import struct

import pytest
from codec_samples import handshake_of, openssl_hello, python_client_hello, reframe
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward.codec import NEED_MORE, ClientHello, CodecError, TLSError, parse_client_hello
from edgeward.codec.testing import build_client_hello
from edgeward.codec.tls import MAX_HELLO, MAX_STREAM

TLS13, TLS12 = 0x0304, 0x0303


def records(msg: bytes, version: bytes = b"\x03\x01") -> bytes:
    return b"\x16" + version + len(msg).to_bytes(2, "big") + msg


def hello_message(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(3, "big") + body


def hello_body(extensions: list[tuple[int, bytes]] | None) -> bytes:
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    if extensions is None:
        return body
    exts = b"".join(struct.pack("!HH", t, len(v)) + v for t, v in extensions)
    return body + len(exts).to_bytes(2, "big") + exts


def sni_ext(name: bytes) -> tuple[int, bytes]:
    entry = b"\x00" + len(name).to_bytes(2, "big") + name
    return 0, len(entry).to_bytes(2, "big") + entry


def parse_exts(extensions: list[tuple[int, bytes]] | None) -> ClientHello:
    result = parse_client_hello(records(hello_message(hello_body(extensions))))
    assert isinstance(result, ClientHello)
    return result


class TestGenuineHellos:
    def test_python_ssl_sni_and_alpn(self) -> None:
        data = python_client_hello("Cloud.Example.ORG", ["h2", "http/1.1"])
        hello = parse_client_hello(data)
        assert hello == ClientHello(
            sni="cloud.example.org",
            alpn=("h2", "http/1.1"),
            legacy_version=TLS12,
            supported_versions=hello.supported_versions,  # type: ignore[union-attr]
            length=len(data),
        )
        assert isinstance(hello, ClientHello)
        assert TLS13 in hello.supported_versions

    def test_python_ssl_trailing_dot_is_stripped(self) -> None:
        hello = parse_client_hello(python_client_hello("example.org."))
        assert isinstance(hello, ClientHello)
        assert hello.sni == "example.org"

    def test_python_ssl_without_sni(self) -> None:
        hello = parse_client_hello(python_client_hello(None, ["xmpp-client"]))
        assert isinstance(hello, ClientHello)
        assert (hello.sni, hello.alpn) == (None, ("xmpp-client",))

    def test_python_ssl_ip_address_sends_no_sni(self) -> None:
        # OpenSSL (via Python) omits SNI for IP literals, as RFC 6066 requires.
        hello = parse_client_hello(python_client_hello("192.0.2.1"))
        assert isinstance(hello, ClientHello)
        assert hello.sni is None

    def test_python_ssl_tls12_only(self) -> None:
        data = python_client_hello("old.example", maximum_version=ssl.TLSVersion.TLSv1_2)
        hello = parse_client_hello(data)
        assert isinstance(hello, ClientHello)
        assert (hello.sni, hello.supported_versions) == ("old.example", ())

    @pytest.mark.parametrize(
        ("name", "sni", "alpn", "tls13"),
        [
            ("openssl_tls13_alpn", "mail.example.net", ("h2", "http/1.1"), True),
            ("openssl_tls12", "legacy.example.org", (), False),
            ("openssl_nosni", None, ("xmpp-client",), True),
        ],
    )
    def test_openssl_s_client(
        self, name: str, sni: str | None, alpn: tuple[str, ...], tls13: bool
    ) -> None:
        data = openssl_hello(name)
        hello = parse_client_hello(data)
        assert isinstance(hello, ClientHello)
        assert (hello.sni, hello.alpn, hello.length) == (sni, alpn, len(data))
        assert (TLS13 in hello.supported_versions) is tls13

    def test_every_prefix_needs_more(self) -> None:
        data = python_client_hello("example.org", ["h2"])
        for n in range(len(data)):
            assert parse_client_hello(data[:n]) is NEED_MORE, n

    @pytest.mark.parametrize("sizes", [[1], [2], [3], [4, 1000], [5, 7], [100], [1, 16384]])
    def test_reassembled_across_records(self, sizes: list[int]) -> None:
        data = reframe(python_client_hello("split.example", ["h2"]), sizes)
        hello = parse_client_hello(data)
        assert isinstance(hello, ClientHello)
        assert (hello.sni, hello.alpn, hello.length) == ("split.example", ("h2",), len(data))
        for n in range(0, len(data), 7):
            assert parse_client_hello(data[:n]) is NEED_MORE

    def test_following_bytes_are_not_consumed(self) -> None:
        data = openssl_hello("openssl_tls13_alpn")
        early = b"\x17\x03\x03\x00\x05hello"  # e.g. 0-RTT data right behind the hello
        hello = parse_client_hello(data + early)
        assert isinstance(hello, ClientHello)
        assert hello.length == len(data)


class TestBuilder:
    def test_round_trip(self) -> None:
        hello = parse_client_hello(build_client_hello("a.example", ["h2", "http/1.1"]))
        assert isinstance(hello, ClientHello)
        assert (hello.sni, hello.alpn) == ("a.example", ("h2", "http/1.1"))
        assert hello.supported_versions == (TLS13, TLS12)  # GREASE removed

    def test_record_split(self) -> None:
        whole = build_client_hello("b.example", ["h2"])
        split = build_client_hello("b.example", ["h2"], record_split=64)
        assert handshake_of(split) == handshake_of(whole)
        assert split.count(b"\x16\x03\x01") >= len(handshake_of(whole)) // 64
        hello = parse_client_hello(split)
        assert isinstance(hello, ClientHello)
        assert (hello.sni, hello.length) == ("b.example", len(split))

    def test_is_accepted_by_a_real_tls_server(self) -> None:
        # The builder's bytes must be a hello OpenSSL itself accepts, or tests built
        # on it would prove nothing.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = ctx.wrap_bio(incoming, outgoing, server_side=True)
        incoming.write(build_client_hello("real.example", ["h2"], record_split=100))
        with pytest.raises(ssl.SSLError) as info:
            server.do_handshake()
        # No certificate is loaded, so the server fails after parsing the hello.
        assert "NO_SHARED_CIPHER" in str(info.value) or "NO_CERTIFICATE" in str(
            info.value
        ).upper().replace(" ", "_"), info.value


class TestMalformed:
    @pytest.mark.parametrize(
        "data",
        [
            b"\x17\x03\x03\x00\x10",  # application data
            b"\x15",  # alert, decided from the first byte
            b"\x16\x02",  # SSLv2-ish version
            b"\x16\x03\x01\x00\x00",  # empty handshake record
            b"\x16\x03\x01\x40\x01",  # record over 2^14
            b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # ServerHello first
            b"\x16\x03\x01\x00\x04\x01\x00\x40\x01",  # hello longer than the bound
        ],
    )
    def test_rejected_early(self, data: bytes) -> None:
        with pytest.raises(TLSError):
            parse_client_hello(data)

    def test_second_record_not_handshake(self) -> None:
        msg = hello_message(hello_body([]))
        data = records(msg[:10]) + b"\x17\x03\x03\x00\x01x"
        with pytest.raises(TLSError):
            parse_client_hello(data)

    def test_oversized_hello_rejected_before_it_arrives(self) -> None:
        data = records(b"\x01" + (MAX_HELLO + 1).to_bytes(3, "big") + bytes(100))
        with pytest.raises(TLSError, match="exceeds"):
            parse_client_hello(data)

    def test_tiny_records_bounded(self) -> None:
        msg = hello_message(hello_body([(0xFFFF, bytes(10000))]))
        data = b"".join(records(msg[i : i + 1]) for i in range(len(msg)))
        with pytest.raises(TLSError, match="records exceed"):
            parse_client_hello(data)
        assert len(data) > MAX_STREAM

    def test_no_extensions_is_fine(self) -> None:
        hello = parse_exts(None)
        assert (hello.sni, hello.alpn, hello.supported_versions) == (None, (), ())

    @pytest.mark.parametrize(
        "name",
        [
            b"",
            b"exa mple.org",
            b"-bad.example",
            b"a..b",
            b"caf\xc3\xa9.example",
            b"x" * 64 + b".example",
            b"a\x00b",
            b"a" * 254,
            b".",
        ],
    )
    def test_bad_sni(self, name: bytes) -> None:
        with pytest.raises(TLSError):
            parse_exts([sni_ext(name)])

    def test_sni_normalised(self) -> None:
        assert parse_exts([sni_ext(b"WWW.Example.COM.")]).sni == "www.example.com"
        assert parse_exts([sni_ext(b"_acme.xn--bcher-kva.de")]).sni == "_acme.xn--bcher-kva.de"

    @pytest.mark.parametrize(
        "extensions",
        [
            [sni_ext(b"a.example"), sni_ext(b"b.example")],  # duplicate extension
            [(0, b"\x00\x06\x00\x00\x02ab")],  # list length mismatch
            [(0, b"")],  # empty server_name from a client
            [(0, b"\x00\x0a" + b"\x00\x00\x02ab" + b"\x00\x00\x02cd")],  # two host_names
            [(16, b"\x00\x03\x00h2")],  # empty protocol name
            [(16, b"\x00\x03\x05h2")],  # protocol name past the list
            [(16, b"")],
            [(43, b"\x03\x03\x04\x03")],  # odd versions length
            [(43, b"\x04\x03\x04")],
        ],
    )
    def test_bad_extensions(self, extensions: list[tuple[int, bytes]]) -> None:
        with pytest.raises(TLSError):
            parse_exts(extensions)

    @pytest.mark.parametrize(
        "body",
        [
            b"\x03\x03" + bytes(30),  # shorter than version + random
            b"\x03\x03" + bytes(32) + b"\x21" + bytes(40),  # session id over 32
            b"\x03\x03" + bytes(32) + b"\x00\x00\x03\x13\x01\x00\x01\x00",  # odd suites
            b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01",  # no compression list
            b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x00",  # empty compression
            b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00\x00\x05\x00",  # ext len
            b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00\x00\x02\x00\x00",
        ],
    )
    def test_bad_body(self, body: bytes) -> None:
        with pytest.raises(TLSError):
            parse_client_hello(records(hello_message(body)))

    def test_unknown_name_types_are_skipped(self) -> None:
        entries = b"\x07\x00\x02zz" + b"\x00\x00\x09a.example"
        ext = (0, len(entries).to_bytes(2, "big") + entries)
        assert parse_exts([ext]).sni == "a.example"


_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
hostnames = st.lists(_labels, min_size=1, max_size=5).map(".".join)
alpns = st.lists(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20),
    max_size=5,
)


class TestProperties:
    @given(st.binary(max_size=600))
    def test_any_bytes(self, data: bytes) -> None:
        try:
            result = parse_client_hello(data)
        except CodecError:
            return
        assert result is NEED_MORE or (
            isinstance(result, ClientHello) and result.length <= len(data)
        )

    @given(st.binary(max_size=300))
    def test_bytes_behind_a_record_header(self, payload: bytes) -> None:
        for data in (
            records(payload),
            records(b"\x01" + len(payload).to_bytes(3, "big") + payload),
        ):
            try:
                parse_client_hello(data)
            except TLSError:
                pass

    @settings(max_examples=60)
    @given(hostnames.filter(lambda h: len(h) <= 253), alpns, st.integers(1, 600), st.data())
    def test_split_hellos_round_trip(
        self, sni: str, alpn: list[str], split: int, data: st.DataObject
    ) -> None:
        wire = build_client_hello(sni, alpn, record_split=split)
        hello = parse_client_hello(wire)
        assert isinstance(hello, ClientHello)
        assert (hello.sni, hello.alpn, hello.length) == (sni, tuple(alpn), len(wire))
        cut = data.draw(st.integers(0, len(wire) - 1))
        assert parse_client_hello(wire[:cut]) is NEED_MORE

    @settings(max_examples=50)
    @given(st.integers(0, 6 * (MAX_HELLO + 4)))
    def test_need_more_is_bounded(self, size: int) -> None:
        msg = b"\x01" + MAX_HELLO.to_bytes(3, "big") + bytes(MAX_HELLO)
        data = b"".join(records(msg[i : i + 1]) for i in range(len(msg)))
        try:
            result = parse_client_hello(data[:size])
        except TLSError:
            assert size > MAX_STREAM
        else:
            assert result is NEED_MORE
            assert size <= MAX_STREAM + 5
