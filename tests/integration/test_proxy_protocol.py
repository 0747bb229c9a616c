"""PROXY protocol with real peers: HAProxy in front (send-proxy-v2), HAProxy and nginx behind."""

import socket
from pathlib import Path

import pytest

from peers import haproxy, nginx, wait_for_text
from support import EdgeProcess, ThreadServer, echo_handler, free_port


def http_get_from(src_ip: str, port: int, host: str = "x") -> bytes:
    with socket.socket() as c:
        c.bind((src_ip, 0))
        c.settimeout(5)
        c.connect(("127.0.0.1", port))
        c.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while d := c.recv(4096):
            out += d
        return out


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_edge_to_nginx_proxy_protocol_logs_client(tmp_path: Path, version: str) -> None:
    ng_port, edge_port = free_port(), free_port()
    body = f"""log_format pp 'pp=$proxy_protocol_addr remote=$remote_addr';
    server {{ listen 127.0.0.1:{ng_port} proxy_protocol; access_log {tmp_path}/nginx/logs/access.log pp;
             location / {{ return 200 "ok\\n"; }} }}"""
    with nginx(tmp_path, body, [ng_port]) as prefix:
        edge = EdgeProcess(tmp_path, f"""
[services.web]
listen = ["127.0.0.1:{edge_port}"]
to = "127.0.0.1:{ng_port}"
proxy_protocol = "{version}"
""", wait=[("127.0.0.1", edge_port)])
        try:
            assert http_get_from("127.0.0.9", edge_port).startswith(b"HTTP/1.1 200")
            log = wait_for_text(prefix / "logs/access.log", "pp=127.0.0.9")
            assert "pp=127.0.0.9 remote=127.0.0.1" in log, log
        finally:
            edge.stop()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_edge_to_haproxy_accept_proxy_logs_client(tmp_path: Path, version: str) -> None:
    echo = ThreadServer(echo_handler())
    hp_port, edge_port = free_port(), free_port()
    body = f"""frontend fe
    bind 127.0.0.1:{hp_port} accept-proxy
    log-format "client=%ci:%cp"
    default_backend be
backend be
    server s1 127.0.0.1:{echo.port}
"""
    try:
        with haproxy(tmp_path, body, [hp_port]) as log:
            edge = EdgeProcess(tmp_path, f"""
[services.fwd]
listen = ["127.0.0.1:{edge_port}"]
to = "127.0.0.1:{hp_port}"
proxy_protocol = "{version}"
""", wait=[("127.0.0.1", edge_port)])
            try:
                with socket.socket() as c:
                    c.bind(("127.0.0.8", 0))
                    c.settimeout(5)
                    c.connect(("127.0.0.1", edge_port))
                    port = c.getsockname()[1]
                    c.sendall(b"hello")
                    assert c.recv(10) == b"hello"
                text = wait_for_text(log, f"client=127.0.0.8:{port}")
                assert f"client=127.0.0.8:{port}" in text, text
            finally:
                edge.stop()
    finally:
        echo.close()


def test_haproxy_send_proxy_v2_into_edge_reaches_nginx(tmp_path: Path) -> None:
    """client 127.0.0.7 → HAProxy (send-proxy-v2) → edge (trusts HAProxy) → nginx (proxy_protocol)."""
    hp_port, edge_port, ng_port = free_port(), free_port(), free_port()
    body = f"""log_format pp 'pp=$proxy_protocol_addr';
    server {{ listen 127.0.0.1:{ng_port} proxy_protocol; access_log {tmp_path}/nginx/logs/access.log pp;
             location / {{ return 200 "ok\\n"; }} }}"""
    with nginx(tmp_path, body, [ng_port]) as prefix:
        edge = EdgeProcess(tmp_path, f"""
[listeners.behind-haproxy]
bind = ["127.0.0.1:{edge_port}"]
trusted_proxies = ["127.0.0.1/32"]

[services.web]
listen = ["behind-haproxy"]
names = ["site.example.org"]
to = "127.0.0.1:{ng_port}"
proxy_protocol = "v2"
""", wait=[("127.0.0.1", edge_port)])
        try:
            hp = f"""frontend fe
    bind 127.0.0.1:{hp_port}
    default_backend be
backend be
    server edge 127.0.0.1:{edge_port} send-proxy-v2
"""
            with haproxy(tmp_path, hp, [hp_port]):
                assert http_get_from("127.0.0.7", hp_port, "site.example.org").startswith(b"HTTP/1.1 200")
                log = wait_for_text(prefix / "logs/access.log", "pp=127.0.0.7")
                assert "pp=127.0.0.7" in log, log
            # The edge itself accounted the connection to the real client, not to HAProxy.
            assert edge.counter("refused", "behind-haproxy", "proxy_untrusted") == 0
        finally:
            edge.stop()


def test_proxy_header_from_untrusted_sender_is_refused(tmp_path: Path) -> None:
    echo = ThreadServer(echo_handler())
    port = free_port()
    edge = EdgeProcess(tmp_path, f"""
[listeners.l]
bind = ["127.0.0.1:{port}"]
trusted_proxies = ["127.0.0.2/32"]
[services.s]
listen = ["l"]
to = "127.0.0.1:{echo.port}"
""", wait=[("127.0.0.1", port)])
    try:
        for hdr in (b"PROXY TCP4 203.0.113.1 127.0.0.1 1234 80\r\nhello",
                    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes(12) + b"hello"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(hdr)
                try:
                    assert c.recv(100) == b""
                except ConnectionResetError:
                    pass
        assert edge.counter("refused", "l", "proxy_untrusted") == 2
        assert echo.accepted == 0
        # From the trusted address, a malformed header is refused too, a good one accepted.
        for data, ok in ((b"PROXY TCP4 203.0.113.1 127.0.0.1 99999 80\r\n", False),
                         (b"PROXY TCP4 203.0.113.1 127.0.0.1 1234 80\r\nhello", True)):
            with socket.socket() as c:
                c.bind(("127.0.0.2", 0))
                c.settimeout(5)
                c.connect(("127.0.0.1", port))
                c.sendall(data)
                try:
                    got = c.recv(100)
                except ConnectionResetError:
                    got = b""
                assert (got == b"hello") is ok
        assert edge.counter("refused", "l", "proxy_invalid") == 1
    finally:
        edge.stop()
        echo.close()


def test_proxy_v2_authority_tlv_carries_the_sni_to_haproxy(tmp_path: Path) -> None:
    from edgeward.codec.testing import build_client_hello
    echo = ThreadServer(echo_handler())
    hp_port, edge_port = free_port(), free_port()
    body = f"""frontend fe
    bind 127.0.0.1:{hp_port} accept-proxy
    log-format "client=%ci authority=%[fc_pp_authority]"
    default_backend be
backend be
    server s1 127.0.0.1:{echo.port}
"""
    try:
        with haproxy(tmp_path, body, [hp_port]) as log:
            edge = EdgeProcess(tmp_path, f"""
[services.site]
listen = ["127.0.0.1:{edge_port}"]
names = ["site.example.org"]
to = "127.0.0.1:{hp_port}"
proxy_protocol = "v2"
""", wait=[("127.0.0.1", edge_port)])
            try:
                hello = build_client_hello("site.example.org", ["h2"])
                with socket.socket() as c:
                    c.bind(("127.0.0.6", 0))
                    c.settimeout(5)
                    c.connect(("127.0.0.1", edge_port))
                    c.sendall(hello)
                    got = b""
                    while len(got) < len(hello):
                        d = c.recv(65536)
                        assert d, got  # (EOF: fail here rather than spin)
                        got += d
                    assert got == hello  # the hello reaches the upstream untouched, after the header
                text = wait_for_text(log, "authority=site.example.org")
                assert "client=127.0.0.6 authority=site.example.org" in text, text
            finally:
                edge.stop()
    finally:
        echo.close()
