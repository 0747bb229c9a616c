from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeward.codec import NEED_MORE, CodecError, SSHBanner, SSHError, parse_ssh_banner


@pytest.mark.parametrize(
    ("line", "version", "software"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", "2.0", "OpenSSH_9.2p1"),
        (b"SSH-2.0-PuTTY_Release_0.78\r\n", "2.0", "PuTTY_Release_0.78"),
        (b"SSH-2.0-paramiko_3.4.0\r\n", "2.0", "paramiko_3.4.0"),
        (b"SSH-1.99-Cisco-1.25\r\n", "1.99", "Cisco-1.25"),  # '-' in software: seen in the wild
        (b"SSH-2.0-dropbear\n", "2.0", "dropbear"),  # LF only, as old clients send
    ],
)
def test_banners(line: bytes, version: str, software: str) -> None:
    data = line + b"\x00\x00\x01\x14\x0a\x14"  # the binary packet protocol follows
    result = parse_ssh_banner(data)
    assert result == SSHBanner(version, software, len(line))


def test_prefixes_need_more() -> None:
    line = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"
    for n in range(len(line)):
        assert parse_ssh_banner(line[:n]) is NEED_MORE, n


@pytest.mark.parametrize(
    "data",
    [
        b"SSh-",
        b"SSH-2.0\r\n",
        b"SSH--OpenSSH\r\n",
        b"SSH-2.0-\r\n",
        b"SSH-2.0-Open SSH\x01\r\n",
        b"SSH-2.0-a\x00",
        b"SSH-2.0-a\rb",
        b"SSH-2.0-" + b"a" * 300,
        b"GET / HTTP/1.1",
    ],
)
def test_rejected(data: bytes) -> None:
    with pytest.raises(SSHError):
        parse_ssh_banner(data)


@given(st.binary(max_size=300))
def test_any_bytes(data: bytes) -> None:
    for candidate in (data, b"SSH-" + data, b"SSH-2.0-" + data):
        try:
            result = parse_ssh_banner(candidate)
        except CodecError:
            continue
        assert result is NEED_MORE or result.length <= min(len(candidate), 255)  # type: ignore[union-attr]
