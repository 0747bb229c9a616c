from __future__ import annotations

import ipaddress
import struct

import pytest
from codec_samples import DATA
from hypothesis import given
from hypothesis import strategies as st

from edgeward.codec import (
    NEED_MORE,
    CodecError,
    ProxyError,
    ProxyHeader,
    build_proxy_v1,
    build_proxy_v2,
    build_proxy_v2_local,
    looks_like_proxy,
    parse_proxy,
)
from edgeward.codec.proxy import V2_MAX

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def header(data: bytes) -> ProxyHeader:
    result = parse_proxy(data)
    assert isinstance(result, ProxyHeader)
    return result


def v2(ver_cmd: int, fam: int, block: bytes) -> bytes:
    return SIG + struct.pack("!BBH", ver_cmd, fam, len(block)) + block


def tlv(t: int, value: bytes) -> bytes:
    return struct.pack("!BH", t, len(value)) + value


def hexfile(name: str) -> bytes:
    return bytes.fromhex((DATA / f"{name}.hex").read_text())


class TestV1:
    def test_tcp4(self) -> None:
        data = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n"
        assert header(data) == ProxyHeader(
            1, "PROXY", "TCP", ("192.0.2.1", 56324), ("198.51.100.2", 443), (), 45
        )

    def test_spec_worst_cases(self) -> None:
        # spec 2.1: the three longest lines, each within 107 bytes
        ff6 = ":".join(["ffff"] * 8)
        tcp6 = f"PROXY TCP6 {ff6} {ff6} 65535 65535\r\n".encode()
        tcp4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
        unknown = f"PROXY UNKNOWN {ff6} {ff6} 65535 65535\r\n".encode()
        assert (len(tcp6), len(tcp4), len(unknown)) == (104, 56, 107)
        assert header(tcp6).src == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
        assert header(tcp4).dst == ("255.255.255.255", 65535)
        assert header(unknown) == ProxyHeader(1, "PROXY", "UNKNOWN", None, None, (), 107)

    def test_unknown(self) -> None:
        assert header(b"PROXY UNKNOWN\r\n") == ProxyHeader(
            1, "PROXY", "UNKNOWN", None, None, (), 15
        )

    def test_ipv4_mapped_reported_as_ipv4(self) -> None:
        assert header(b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 1 2\r\n").src == ("192.0.2.7", 1)

    def test_haproxy(self) -> None:
        h = header(hexfile("haproxy_v1"))
        assert (h.version, h.transport, h.src[0], h.dst[0]) == (  # type: ignore[index]
            1,
            "TCP",
            "127.0.0.1",
            "127.0.0.1",
        )
        h6 = header(hexfile("haproxy_v1_ipv6"))
        assert (h6.src[0], h6.length) == ("::1", len(hexfile("haproxy_v1_ipv6")))  # type: ignore[index]

    def test_prefixes_need_more(self) -> None:
        data = b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 443\r\n"
        for n in range(len(data)):
            assert parse_proxy(data[:n]) is NEED_MORE, n

    @pytest.mark.parametrize(
        "data",
        [
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",  # bare LF
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2",  # no CRLF within 107 bytes
            b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n",  # family mismatch
            b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 65536\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1  2\r\n",  # double space
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",
            b"PROXY TCP4 192.0.2.001 192.0.2.2 1 2\r\n",  # leading zeros are ambiguous
            b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n",
            b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY \r\n",
            b"proxy TCP4",
            b"PROXYTCP4",
        ],
    )
    def test_malformed(self, data: bytes) -> None:
        padded = data if data.endswith(b"\n") or len(data) < 12 else data + b" " * 107
        with pytest.raises(ProxyError):
            parse_proxy(padded)


class TestV2:
    def test_local(self) -> None:
        assert header(v2(0x20, 0x00, b"")) == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, (), 16)

    def test_local_ignores_family_and_block(self) -> None:
        assert header(v2(0x20, 0x11, bytes(12) + b"junk")).length == 32

    def test_tcp4(self) -> None:
        block = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 56324, 443)
        assert header(v2(0x21, 0x11, block) + b"\x16\x03\x01") == ProxyHeader(
            2, "PROXY", "TCP", ("192.0.2.1", 56324), ("198.51.100.2", 443), (), 28
        )

    def test_udp6(self) -> None:
        src = ipaddress.IPv6Address("2001:db8::1").packed
        dst = ipaddress.IPv6Address("::ffff:192.0.2.9").packed
        h = header(v2(0x21, 0x22, src + dst + struct.pack("!HH", 3478, 10000)))
        assert (h.transport, h.src, h.dst, h.length) == (
            "UDP",
            ("2001:db8::1", 3478),
            ("192.0.2.9", 10000),
            52,
        )

    def test_unix_and_unspec_carry_no_address(self) -> None:
        unix = header(v2(0x21, 0x31, b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")))
        assert (unix.transport, unix.src, unix.dst, unix.length) == ("UNKNOWN", None, None, 232)
        unspec = header(v2(0x21, 0x00, tlv(0x04, b"")))
        assert (unspec.src, unspec.tlvs) == (None, ((0x04, b""),))

    def test_tlvs(self) -> None:
        block = bytes(12) + tlv(0x01, b"h2") + tlv(0x02, b"example.org") + tlv(0x04, bytes(3))
        ssl_sub = b"\x07" + struct.pack("!I", 0) + tlv(0x21, b"TLSv1.3")  # PP2_TYPE_SSL
        h = header(v2(0x21, 0x11, block + tlv(0x20, ssl_sub)))
        assert h.tlvs == ((0x01, b"h2"), (0x02, b"example.org"), (0x04, bytes(3)), (0x20, ssl_sub))

    def test_haproxy_unique_id(self) -> None:
        data = hexfile("haproxy_v2_unique_id")
        h = header(data + b"hello")
        assert (h.version, h.command, h.transport, h.length) == (2, "PROXY", "TCP", len(data))
        assert h.src is not None and h.src[0] == "127.0.0.1"
        assert h.tlvs[0][0] == 0x05 and h.tlvs[0][1].startswith(b"edgeward-127.0.0.1-")

    def test_haproxy_ipv6_crc32c(self) -> None:
        data = hexfile("haproxy_v2_ipv6_crc32c")
        h = header(data)
        assert h.dst is not None and h.dst[0] == "::1"
        assert [t for t, _ in h.tlvs] == [0x03, 0x05]

    def test_prefixes_need_more(self) -> None:
        data = build_proxy_v2(("2001:db8::1", 1), ("2001:db8::2", 2), authority="a.example")
        for n in range(len(data)):
            assert parse_proxy(data[:n]) is NEED_MORE, n

    @pytest.mark.parametrize(
        "data",
        [
            v2(0x11, 0x11, bytes(12)),  # version 1 in the binary form
            v2(0x22, 0x11, bytes(12)),  # command 2
            v2(0x21, 0x13, bytes(12)),  # transport 3
            v2(0x21, 0x41, bytes(12)),  # family 4
            v2(0x21, 0x10, bytes(12)),  # INET without transport
            v2(0x21, 0x11, bytes(11)),  # block shorter than the family needs
            v2(0x21, 0x21, bytes(35)),
            v2(0x21, 0x31, bytes(215)),
            v2(0x21, 0x11, bytes(12) + b"\x01\x00"),  # truncated TLV header
            v2(0x21, 0x11, bytes(12) + b"\x01\x00\x05abc"),  # TLV past the end
            SIG[:5] + b"X",
            SIG + b"\x31",  # version 3, decided before the length arrives
        ],
    )
    def test_malformed(self, data: bytes) -> None:
        with pytest.raises(ProxyError):
            parse_proxy(data)

    def test_length_bounded_before_the_body_arrives(self) -> None:
        with pytest.raises(ProxyError, match="exceeds"):
            parse_proxy(SIG + struct.pack("!BBH", 0x21, 0x11, V2_MAX))


class TestBuilders:
    def test_v1(self) -> None:
        assert build_proxy_v1(("192.0.2.1", 5), ("192.0.2.2", 443)) == (
            b"PROXY TCP4 192.0.2.1 192.0.2.2 5 443\r\n"
        )
        assert build_proxy_v1(("2001:DB8::1", 5), ("::1", 443)) == (
            b"PROXY TCP6 2001:db8::1 ::1 5 443\r\n"
        )

    def test_mapped_emitted_as_ipv4(self) -> None:
        assert build_proxy_v1(("::ffff:192.0.2.1", 5), ("::ffff:10.0.0.1", 443)) == (
            b"PROXY TCP4 192.0.2.1 10.0.0.1 5 443\r\n"
        )
        data = build_proxy_v2(("::ffff:192.0.2.1", 5), ("10.0.0.1", 443))
        assert data[13] == 0x11 and len(data) == 28

    def test_mixed_families_use_ipv6(self) -> None:
        data = build_proxy_v1(("192.0.2.1", 5), ("2001:db8::2", 443))
        assert data == b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 5 443\r\n"
        assert header(data).src == ("192.0.2.1", 5)

    def test_v2_round_trip(self) -> None:
        data = build_proxy_v2(
            ("2001:db8::1", 40000), ("2001:db8::2", 443), alpn="h2", authority="bücher.example"
        )
        assert header(data) == ProxyHeader(
            2,
            "PROXY",
            "TCP",
            ("2001:db8::1", 40000),
            ("2001:db8::2", 443),
            ((0x01, b"h2"), (0x02, "bücher.example".encode())),
            len(data),
        )

    def test_v2_udp(self) -> None:
        h = header(build_proxy_v2(("192.0.2.1", 3478), ("192.0.2.2", 3478), transport="UDP"))
        assert h.transport == "UDP"

    def test_v2_local(self) -> None:
        assert build_proxy_v2_local() == SIG + b"\x20\x00\x00\x00"
        assert header(build_proxy_v2_local()).command == "LOCAL"

    @pytest.mark.parametrize(
        ("src", "dst"),
        [
            (("not-an-ip", 1), ("192.0.2.1", 1)),
            (("192.0.2.1", 70000), ("192.0.2.1", 1)),
            (("192.0.2.1", -1), ("192.0.2.1", 1)),
        ],
    )
    def test_bad_builder_input(self, src: tuple[str, int], dst: tuple[str, int]) -> None:
        with pytest.raises(ProxyError):
            build_proxy_v1(src, dst)
        with pytest.raises(ProxyError):
            build_proxy_v2(src, dst)

    def test_bad_tlv_input(self) -> None:
        with pytest.raises(ProxyError):
            build_proxy_v2(("192.0.2.1", 1), ("192.0.2.2", 2), alpn="ℏ2")
        with pytest.raises(ProxyError):
            build_proxy_v2(("192.0.2.1", 1), ("192.0.2.2", 2), authority="x" * V2_MAX)


class TestLooksLikeProxy:
    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"P",
            b"PROXY",
            b"PROXY ",
            b"PROXY TCP4 ",
            b"\r",
            b"\r\n\r\n\x00",
            SIG,
            SIG + b"\x21",
        ],
    )
    def test_yes(self, data: bytes) -> None:
        assert looks_like_proxy(data)

    @pytest.mark.parametrize(
        "data", [b"GET / HTTP/1.1", b"PROXZ", b"PROXYTCP4", b"\x16\x03\x01", b"\r\n\r\n\x01", b"p"]
    )
    def test_no(self, data: bytes) -> None:
        assert not looks_like_proxy(data)


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


class TestProperties:
    @given(st.binary(max_size=300))
    def test_any_bytes(self, data: bytes) -> None:
        for candidate in (data, b"PROXY " + data, SIG + data):
            try:
                result = parse_proxy(candidate)
            except CodecError:
                continue
            assert result is NEED_MORE or result.length <= len(candidate)  # type: ignore[union-attr]

    @given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports)
    def test_round_trip(self, ips: tuple[str, str], sport: int, dport: int) -> None:
        def norm(ip: str) -> str:
            a = ipaddress.ip_address(ip)
            mapped = getattr(a, "ipv4_mapped", None)
            return str(mapped or a)

        for data in (
            build_proxy_v1((ips[0], sport), (ips[1], dport)),
            build_proxy_v2((ips[0], sport), (ips[1], dport), alpn="h2"),
        ):
            assert len(data) <= 107 or data.startswith(SIG)
            h = header(data + b"tail")
            assert (h.src, h.dst, h.length) == (
                (norm(ips[0]), sport),
                (norm(ips[1]), dport),
                len(data),
            )
            assert looks_like_proxy(data)
