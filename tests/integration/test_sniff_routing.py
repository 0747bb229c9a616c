"""Routing by what the client says first: TLS SNI/ALPN (passthrough), HTTP Host, XMPP to=."""

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from edgeward.codec.testing import build_client_hello
from support import (
    EdgeProcess,
    ThreadServer,
    echo_handler,
    free_port,
    recv_line,
    require,
    tls_server_handler,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_edge(tmp_path: Path, ca: trustme.CA) -> Iterator[tuple[EdgeProcess, int, trustme.CA]]:
    servers = {}
    for tag, names in (("A", ["a.example.org"]), ("B", ["b.example.org", "x.wild.example.org"]),
                       ("X", ["a.example.org", "chat.example.org"]), ("D", ["default.example.org"])):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(ctx)
        ctx.set_alpn_protocols(["xmpp-client", "h2", "http/1.1"])
        servers[tag] = ThreadServer(tls_server_handler(ctx, tag.encode()))
    port = free_port()
    cfg = f"""
[listeners.tls]
bind = ["127.0.0.1:{port}"]
sniff_timeout = "1s"

[services.a]
listen = ["tls"]
names = ["a.example.org"]
to = "127.0.0.1:{servers['A'].port}"

[services.b]
listen = ["tls"]
names = ["b.example.org", "*.wild.example.org"]
to = "127.0.0.1:{servers['B'].port}"

[services.xmpp-over-tls]
listen = ["tls"]
names = ["a.example.org"]
alpn = ["xmpp-client"]
to = "127.0.0.1:{servers['X'].port}"

[services.default]
listen = ["tls"]
to = "127.0.0.1:{servers['D'].port}"
"""
    edge = EdgeProcess(tmp_path, cfg, wait=[("127.0.0.1", port)])
    try:
        yield edge, port, ca
    finally:
        edge.stop()
        for s in servers.values():
            s.close()


def tls_hello_line(port: int, ca: trustme.CA, sni: str | None, alpn: list[str] | None = None) -> tuple[bytes, str]:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if sni is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as s:
        line = recv_line(s)
        cert = s.getpeercert()
        assert cert is not None
        san = ",".join(v for k, v in cert.get("subjectAltName", ()) if k == "DNS")
        s.sendall(b"ping\n")
        assert recv_line(s) == b"ping\n"
        return line, san


def test_sni_routes_to_upstreams_with_their_own_certificates(tls_edge: tuple[EdgeProcess, int, trustme.CA]) -> None:
    _edge, port, ca = tls_edge
    line, san = tls_hello_line(port, ca, "a.example.org")
    assert line.startswith(b"A sni=a.example.org") and san == "a.example.org"
    line, san = tls_hello_line(port, ca, "b.example.org")
    assert line.startswith(b"B sni=b.example.org") and "b.example.org" in san
    line, _ = tls_hello_line(port, ca, "x.wild.example.org")
    assert line.startswith(b"B sni=x.wild.example.org")
    line, _ = tls_hello_line(port, ca, "default.example.org")
    assert line.startswith(b"D ")


def test_alpn_selects_a_more_specific_route(tls_edge: tuple[EdgeProcess, int, trustme.CA]) -> None:
    _edge, port, ca = tls_edge
    line, _ = tls_hello_line(port, ca, "a.example.org", ["xmpp-client"])
    assert line.startswith(b"X ") and b"alpn=xmpp-client" in line
    line, _ = tls_hello_line(port, ca, "a.example.org", ["h2"])
    assert line.startswith(b"A ") and b"alpn=h2" in line


def test_openssl_s_client_and_curl(tls_edge: tuple[EdgeProcess, int, trustme.CA], tmp_path: Path) -> None:
    _edge, port, ca = tls_edge
    openssl = require("openssl")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    out = subprocess.run([openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "b.example.org",
                          "-CAfile", str(ca_file), "-verify_return_error", "-verify_hostname", "b.example.org", "-brief"],
                         input=b"", capture_output=True, timeout=20)
    text = (out.stdout + out.stderr).decode(errors="replace")
    assert "Verification: OK" in text or "Verify return code: 0" in text, text
    # -verify_hostname: the certificate is B's own, for b.example.org.
    assert "CONNECTION ESTABLISHED" in text
    curl = require("curl")
    res = subprocess.run([curl, "-sS", "--max-time", "10", "--cacert", str(ca_file), "--resolve",
                          f"a.example.org:{port}:127.0.0.1", f"https://a.example.org:{port}/", "-o", "/dev/null",
                          "-w", "%{ssl_verify_result}", "--http1.1"], capture_output=True, timeout=20)
    # The TLS upstream is not an HTTP server: the handshake (with the upstream's own
    # certificate, verified) is what matters here, curl then fails to parse HTTP.
    assert res.stdout == b"0", res.stderr


def closed_by_peer(c: socket.socket) -> bool:
    """EOF or RST (the edge closes with the unread prefix still queued, which resets)."""
    try:
        return c.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("split", [40, 100, 7])
def test_hello_split_over_records_and_segments(tls_edge: tuple[EdgeProcess, int, trustme.CA], split: int) -> None:
    edge, port, _ = tls_edge
    hello = build_client_hello("b.example.org", ["h2"], record_split=split)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(hello), 33):  # and over TCP segments, with pauses
            c.sendall(hello[i:i + 33])
            time.sleep(0.01)
        # The B upstream's TLS stack answers a ServerHello (a handshake record).
        c.settimeout(5)
        first = c.recv(5)
    assert first[:1] == b"\x16", first
    assert edge.counter("refused", "tls", "sniff_timeout") == 0


def test_incomplete_hello_closed_after_sniff_timeout(tls_edge: tuple[EdgeProcess, int, trustme.CA]) -> None:
    edge, port, _ = tls_edge
    hello = build_client_hello("a.example.org", [])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(hello[:30])
        t0 = time.monotonic()
        assert closed_by_peer(c)
        assert 0.8 < time.monotonic() - t0 < 3
    assert edge.counter("refused", "tls", "sniff_timeout") == 1


def test_http_host_and_xmpp_domain_routing(tmp_path: Path) -> None:
    ups = {t: ThreadServer(echo_handler(t.encode() + b"\n")) for t in ("web1", "web2", "xa", "xb")}
    http_port, xmpp_port = free_port(), free_port()
    cfg = f"""
[services.web1]
listen = ["127.0.0.1:{http_port}"]
names = ["one.example.org"]
to = "127.0.0.1:{ups['web1'].port}"
[services.web2]
listen = ["127.0.0.1:{http_port}"]
names = ["two.example.org"]
protocol = "http"
to = "127.0.0.1:{ups['web2'].port}"
[services.xmpp-a]
listen = ["127.0.0.1:{xmpp_port}"]
names = ["a.example"]
protocol = "xmpp"
to = "127.0.0.1:{ups['xa'].port}"
[services.xmpp-b]
listen = ["127.0.0.1:{xmpp_port}"]
names = ["b.example"]
protocol = "xmpp"
to = "127.0.0.1:{ups['xb'].port}"
"""
    edge = EdgeProcess(tmp_path, cfg, wait=[("127.0.0.1", http_port), ("127.0.0.1", xmpp_port)])
    try:
        def first_line(port: int, data: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(data)
                return recv_line(c)
        assert first_line(http_port, b"GET / HTTP/1.1\r\nHost: ONE.example.org:80\r\n\r\n") == b"web1\n"
        assert first_line(http_port, b"GET / HTTP/1.1\r\nUser-Agent: x\r\nhost: two.example.org\r\n\r\n") == b"web2\n"
        for dom, tag in (("a.example", b"xa\n"), ("b.example", b"xb\n")):
            hdr = (f"<?xml version='1.0'?><stream:stream to='{dom}' version='1.0' xmlns='jabber:client' "
                   f"xmlns:stream='http://etherx.jabber.org/streams'>").encode()
            assert first_line(xmpp_port, hdr) == tag
        # The upstream gets the sniffed bytes unchanged (peeked, not consumed).
        with socket.create_connection(("127.0.0.1", http_port), timeout=5) as c:
            req = b"GET /x HTTP/1.1\r\nHost: one.example.org\r\n\r\n"
            c.sendall(req)
            assert recv_line(c) == b"web1\n"
            got = b""
            while len(got) < len(req):
                d = c.recv(4096)
                assert d, got  # (EOF: fail here rather than spin)
                got += d
            assert got == req
        # No route for an unknown name on a listener without a default.
        with socket.create_connection(("127.0.0.1", http_port), timeout=5) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: three.example.org\r\n\r\n")
            assert recv_line(c) == b"HTTP/1.1 421 Misdirected Request\r\n"  # told why (net/refusal.py)...
            c.recv(4096)
            assert closed_by_peer(c)  # ...then closed
        assert edge.counter("refused", f"127.0.0.1:{http_port}", "no_route") == 1
    finally:
        edge.stop()
        for s in ups.values():
            s.close()


def test_server_first_protocol_goes_to_default(tmp_path: Path) -> None:
    def banner(c: socket.socket) -> None:
        c.sendall(b"220 smtp ready\r\n")
        c.recv(100)
    smtp = ThreadServer(banner)
    web = ThreadServer(echo_handler(b"web\n"))
    port = free_port()
    cfg = f"""
[listeners.mixed]
bind = ["127.0.0.1:{port}"]
server_first_wait = "300ms"
[services.web]
listen = ["mixed"]
protocol = "http"
to = "127.0.0.1:{web.port}"
[services.smtp]
listen = ["mixed"]
to = "127.0.0.1:{smtp.port}"
"""
    edge = EdgeProcess(tmp_path, cfg, wait=[("127.0.0.1", port)])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            t0 = time.monotonic()
            assert recv_line(c) == b"220 smtp ready\r\n"
            assert time.monotonic() - t0 < 2
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert recv_line(c) == b"web\n"
    finally:
        edge.stop()
        smtp.close()
        web.close()
