"""Unmodified Debian nginx takes handed-off connections through the LD_PRELOAD shim
(shim/handoff_preload.c, built by `make shim`): TLS for two names with their own certificates,
`$remote_addr` is the client's address, no PROXY header configured anywhere."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from edgeward.codec.proxy import build_proxy_v2
from support import ROOT, EdgeProcess, free_port, require, wait_until

SHIM = ROOT / "build" / "shim" / "libedgeward_handoff.so"


@pytest.fixture(scope="module")
def shim() -> Path:
    require("cc")
    subprocess.run(["make", "-s", "shim"], cwd=ROOT, check=True, timeout=120)
    assert SHIM.exists()
    return SHIM


@pytest.fixture
def nginx_by_handoff(tmp_path: Path, shim: Path) -> Iterator[tuple[Path, Path, trustme.CA, int]]:
    exe = require("nginx")
    ca = trustme.CA()
    prefix = tmp_path / "nginx"
    for d in ("logs", "tmp"):
        (prefix / d).mkdir(parents=True)
    servers = ""
    for name in ("a.test", "b.test"):
        pem = tmp_path / f"{name}.pem"
        ca.issue_cert(name).private_key_and_cert_chain_pem.write_to_path(str(pem))
        servers += f"""
    server {{
        listen 127.0.0.1:{{port}} ssl;
        server_name {name};
        ssl_certificate {pem};
        ssl_certificate_key {pem};
        location / {{ return 200 "nginx {name} remote_addr=$remote_addr\\n"; }}
    }}"""
    port = free_port()  # nginx "listens" here; the shim makes it the handoff socket: nothing is bound
    sock = tmp_path / "nginx-handoff.sock"
    (prefix / "nginx.conf").write_text(f"""
worker_processes 2;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    log_format peer '$remote_addr $ssl_server_name "$request" $status';
    access_log {prefix}/logs/access.log peer;
    {servers.replace("{port}", str(port))}
}}
""")
    env = dict(os.environ, LD_PRELOAD=str(shim), EDGEWARD_HANDOFF=f"127.0.0.1:{port}={sock}")
    with open(tmp_path / "nginx.out", "wb") as out:
        p = subprocess.Popen([exe, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e",
                              str(prefix / "logs/error.log")], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: sock.exists() or p.poll() is not None, 10), "nginx made no handoff socket"
        assert p.poll() is None, (tmp_path / "nginx.out").read_text()
        with pytest.raises(ConnectionRefusedError):  # nginx's "listen" address binds nothing
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        yield sock, prefix / "logs" / "access.log", ca, p.pid
    finally:
        p.terminate()
        p.wait(10)


def test_stock_nginx_serves_two_names_through_the_shim(
        tmp_path: Path, nginx_by_handoff: tuple[Path, Path, trustme.CA, int]) -> None:
    sock, access_log, ca, _pid = nginx_by_handoff
    port = free_port()
    edge = EdgeProcess(tmp_path, f"""
[handoffs.nginx]
socket = "{sock}"

[listeners.tls]
bind = ["127.0.0.1:{port}"]
trusted_proxies = ["127.0.0.5/32"]

[services.sites]
listen = ["tls"]
names = ["a.test", "b.test"]
to = "nginx"
""", wait=[("127.0.0.1", port)])
    try:
        # A bad handoff first (no descriptor, a broken record): refused, and nginx carries on.
        with socket.socket(socket.AF_UNIX) as bad:
            bad.settimeout(5)
            bad.connect(str(sock))
            bad.sendall(b"EWHO\x01\x00\x00\x03xyz")
            assert bad.recv(1) == b"\x03"  # BAD_RECORD
        seen = []
        # Two names from 127.0.0.3, then one from a trusted proxy (127.0.0.5) speaking for 203.0.113.9:
        # nginx's $remote_addr is what the shim's accept() says, the edge's record.
        for name, src, header, client in (("a.test", "127.0.0.3", b"", "127.0.0.3"),
                                          ("b.test", "127.0.0.3", b"", "127.0.0.3"),
                                          ("a.test", "127.0.0.5", build_proxy_v2(("203.0.113.9", 4000),
                                                                                 ("127.0.0.1", port)), "203.0.113.9")):
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)  # nginx's own certificate for each name, verified
            raw = socket.socket()
            raw.bind((src, 0))
            raw.settimeout(10)
            raw.connect(("127.0.0.1", port))
            raw.sendall(header)
            with ctx.wrap_socket(raw, server_hostname=name) as s:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
            assert f"nginx {name} remote_addr={client}".encode() in answer, answer
            seen.append(f'{client} {name} "GET / HTTP/1.1" 200')
        assert wait_until(lambda: access_log.exists() and all(line in access_log.read_text() for line in seen), 5), \
            access_log.read_text() if access_log.exists() else "no access log"
        assert edge.counter("handoffs", "nginx", "accepted") == 3
    finally:
        edge.stop()
