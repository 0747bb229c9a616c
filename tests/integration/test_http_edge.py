"""The HTTP edge inside `edgeward run`: terminated and relayed names on one port, path routes,
forwarded headers with the real client address, the port-80 redirect, bans on repeated 401s
seen by the edge itself, the access log per request, and reloads that keep connections."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from edgeward.codec import build_proxy_v1
from http_peers import NginxUpstream, get, nginx_upstream, read_response
from support import (
    EdgeProcess,
    ThreadServer,
    free_port,
    require,
    tls_server_handler,
    wait_until,
    whole_lines,
    write_cert,
)


@dataclass
class Env:
    edge: EdgeProcess
    nginx: NginxUpstream
    bosh: NginxUpstream
    tls_port: int
    http_port: int
    ca: Path  # the edge's certificates
    passthrough_ca: Path  # the relayed upstream's own certificate
    access_log: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require("nginx")
    tmp = tmp_path_factory.mktemp("httpedge")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    write_cert(ca, tmp, "edge", "web.test", "chat.test")
    (tmp / "edge.key").chmod(0o600)
    other_ca = trustme.CA()  # the relayed service's own CA: the edge never holds its key
    other_ca.cert_pem.write_to_path(str(tmp / "other-ca.pem"))
    up_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other_ca.issue_cert("mail.test").configure_cert(up_ctx)
    relayed = ThreadServer(tls_server_handler(up_ctx, b"mail"))
    with nginx_upstream(tmp / "web") as ngx, nginx_upstream(tmp / "bosh") as bosh:
        tls_port, http_port, admin = free_port(), free_port(), free_port()
        log = tmp / "access.log"
        config = f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp / 'state'}"
access_log = "{log}"
access_log_format = "json"

[tls]
certificates = [{{ cert = "{tmp / 'edge.pem'}", key = "{tmp / 'edge.key'}" }}]

[http]
redirect = "127.0.0.1:{http_port}"

[listeners.https]
bind = ["127.0.0.1:{tls_port}"]
trusted_proxies = ["127.0.0.7/32"]

[services.web]
listen = ["https"]
names = ["web.test", "chat.test"]
to = "http://127.0.0.1:{ngx.port}"

[services.bosh]                 # scenario 01/04: prosody's BOSH and websocket paths of the same name
listen = ["https"]
names = ["chat.test"]
paths = ["/http-bind", "/xmpp-websocket"]
to = "http://127.0.0.1:{bosh.port}"

[services.mail]                 # relayed untouched on the same port, chosen by SNI
listen = ["https"]
names = ["mail.test"]
to = "127.0.0.1:{relayed.port}"

[jails.http-auth]
sources = ["edge:http401"]
maxretry = 3
findtime = "1m"
bantime = "1h"
"""
        edge = EdgeProcess(tmp, config, admin_port=admin, wait=[("127.0.0.1", tls_port), ("127.0.0.1", http_port)])
        try:
            yield Env(edge, ngx, bosh, tls_port, http_port, tmp / "ca.pem", tmp / "other-ca.pem", log)
        finally:
            edge.stop()
            relayed.close()


def https_get(env: Env, host: str, path: str = "/", headers: str = "", src: str = "127.0.0.1") -> object:
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", env.tls_port))
    ctx = ssl.create_default_context(cafile=str(env.ca))
    with ctx.wrap_socket(s, server_hostname=host) as t:
        t.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
        r = read_response(t)
    assert r is not None
    return r


def test_terminated_name_is_proxied_with_forwarded_headers(env: Env) -> None:
    r = https_get(env, "web.test", "/hello?x=1", headers="X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n",
                  src="127.0.0.5")
    assert r.status == 200  # type: ignore[attr-defined]
    seen = r.json()  # type: ignore[attr-defined]
    # The client's forged copies are replaced by what the edge saw.
    assert seen["xff"] == "127.0.0.5" and seen["xfp"] == "https" and seen["xfh"] == "web.test"
    assert "6.6.6.6" not in seen["fwd"] and "for=127.0.0.5" in seen["fwd"]
    assert seen["uri"] == "/hello?x=1"


def test_path_routes_within_a_name(env: Env) -> None:
    before = len(env.bosh.quiet_log())
    assert https_get(env, "chat.test", "/http-bind").status == 200  # type: ignore[attr-defined]
    assert https_get(env, "chat.test", "/http-bind/x?y").status == 200  # type: ignore[attr-defined]
    assert len(env.bosh.wait_log(before + 2)) == before + 2
    n_web = len(env.nginx.quiet_log())
    assert https_get(env, "chat.test", "/http-binder").status == 200  # type: ignore[attr-defined]
    assert len(env.nginx.wait_log(n_web + 1)) == n_web + 1  # not a /http-bind path: the web upstream
    assert len(env.bosh.log()) == before + 2


def test_relayed_name_on_the_same_port_keeps_its_own_certificate(env: Env) -> None:
    ctx = ssl.create_default_context(cafile=str(env.passthrough_ca))
    with socket.create_connection(("127.0.0.1", env.tls_port), timeout=10) as s, \
            ctx.wrap_socket(s, server_hostname="mail.test") as t:
        assert t.recv(100).startswith(b"mail sni=mail.test")
    # ...and the edge's certificate is not good for it (it is not the edge's to terminate).
    ctx2 = ssl.create_default_context(cafile=str(env.ca))
    with socket.create_connection(("127.0.0.1", env.tls_port), timeout=10) as s, pytest.raises(ssl.SSLError):
        ctx2.wrap_socket(s, server_hostname="mail.test")


def test_unknown_name_is_refused(env: Env) -> None:
    ctx = ssl.create_default_context(cafile=str(env.ca))
    with socket.create_connection(("127.0.0.1", env.tls_port), timeout=10) as s, \
            pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        ctx.wrap_socket(s, server_hostname="nobody.test")


def test_port_80_redirects_permanently_to_https(env: Env) -> None:
    r = get(env.http_port, "/some/page?q=1", host="web.test")
    assert r.status in (301, 308)
    assert r.header("Location") == f"https://web.test:{env.tls_port}/some/page?q=1"
    assert get(env.http_port, "/", host="elsewhere.test").status in (404, 421)


def test_trusted_proxy_header_gives_the_client_address(env: Env) -> None:
    s = socket.socket()
    s.bind(("127.0.0.7", 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", env.tls_port))
    s.sendall(build_proxy_v1(("198.51.100.9", 5555), ("127.0.0.1", env.tls_port)))
    ctx = ssl.create_default_context(cafile=str(env.ca))
    with ctx.wrap_socket(s, server_hostname="web.test") as t:
        t.sendall(b"GET /via-proxy HTTP/1.1\r\nHost: web.test\r\n\r\n")
        r = read_response(t)
    assert r is not None and r.json()["xff"] == "198.51.100.9"


def test_each_request_is_in_the_access_log(env: Env) -> None:
    https_get(env, "web.test", "/logged-once", src="127.0.0.6")

    def entry() -> dict[str, object] | None:
        for line in whole_lines(env.access_log):
            rec = json.loads(line)
            if rec.get("path") == "/logged-once":
                return dict(rec)
        return None
    assert wait_until(lambda: entry() is not None)
    rec = entry()
    assert rec is not None
    assert rec["kind"] == "http" and rec["service"] == "web" and rec["status"] == 200
    assert str(rec["client"]).startswith("127.0.0.6:") and rec["host"] == "web.test" and rec["scheme"] == "https"
    assert rec["listener"] == "https" and str(rec["upstream"]).endswith(f":{env.nginx.port}")


def test_repeated_401_bans_the_client_with_no_log_file(env: Env) -> None:
    attacker = "127.0.0.44"
    for _ in range(3):
        assert https_get(env, "web.test", "/401", src=attacker).status == 401  # type: ignore[attr-defined]
    assert wait_until(lambda: any(b["address"] == attacker for b in env.edge.api("GET", "/bans")[1]))  # type: ignore[union-attr]
    with socket.socket() as s:
        s.bind((attacker, 0))
        s.settimeout(5)
        with pytest.raises(OSError):
            s.connect(("127.0.0.1", env.tls_port))
            s.sendall(b"\x16\x03\x01")
            assert s.recv(10) != b""
    # Others are still served.
    assert https_get(env, "web.test", "/", src="127.0.0.45").status == 200  # type: ignore[attr-defined]


def test_a_reload_keeps_a_keepalive_connection_and_applies_new_routes(env: Env) -> None:
    ctx = ssl.create_default_context(cafile=str(env.ca))
    s = socket.create_connection(("127.0.0.1", env.tls_port), timeout=10)
    with ctx.wrap_socket(s, server_hostname="web.test") as t:
        t.sendall(b"GET /before HTTP/1.1\r\nHost: web.test\r\n\r\n")
        assert read_response(t).status == 200  # type: ignore[union-attr]
        reloads = env.edge.status()["reloads"]
        env.edge.signal(signal.SIGHUP)
        assert wait_until(lambda: env.edge.status()["reloads"] == reloads + 1)  # type: ignore[operator]
        time.sleep(0.2)
        t.sendall(b"GET /after HTTP/1.1\r\nHost: web.test\r\n\r\n")
        assert read_response(t).status == 200  # type: ignore[union-attr]


def test_status_counts_each_services_requests_and_bytes_across_a_reload(env: Env) -> None:
    def web() -> dict[str, int]:
        return dict(env.edge.status()["services"]["web"])  # type: ignore[index]
    before = web()
    for i in range(5):
        assert https_get(env, "web.test", f"/counted/{i}").status == 200  # type: ignore[attr-defined]
    assert wait_until(lambda: web()["requests"] == before["requests"] + 5), (before, web())
    after = web()
    assert after["bytes_in"] - before["bytes_in"] >= 5 * 40 and after["bytes_out"] - before["bytes_out"] >= 5 * 100
    reloads = env.edge.status()["reloads"]
    env.edge.signal(signal.SIGHUP)
    assert wait_until(lambda: env.edge.status()["reloads"] == reloads + 1)  # type: ignore[operator]
    assert https_get(env, "web.test", "/counted/after-reload").status == 200  # type: ignore[attr-defined]
    assert wait_until(lambda: web()["requests"] == after["requests"] + 1), (after, web())


def test_a_service_without_names_terminates_tls_and_serves_plain_http(tmp_path: Path) -> None:
    """No names: every Host. TLS clients get the default certificate; plain clients plain HTTP."""
    require("nginx")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    write_cert(ca, tmp_path, "edge", "bench.test")
    (tmp_path / "edge.key").chmod(0o600)
    with nginx_upstream(tmp_path / "web") as ngx:
        port = free_port()
        edge = EdgeProcess(tmp_path, f"""
[tls]
certificates = [{{ cert = "{tmp_path / 'edge.pem'}", key = "{tmp_path / 'edge.key'}" }}]
default_certificate = "bench.test"
[acme]
enabled = false
[http]
redirect = "off"
[services.web]
listen = ["127.0.0.1:{port}"]
to = "http://127.0.0.1:{ngx.port}"
""", wait=[("127.0.0.1", port)])
        try:
            assert get(port, "/plain", host="anything.test").json()["xfp"] == "http"
            ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
            ctx.check_hostname = False  # a client that sends an IP as SNI, as wrk does
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s, \
                    ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
                t.sendall(b"GET /tls HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                r = read_response(t)
            assert r is not None and r.status == 200 and r.json()["xfp"] == "https"
        finally:
            edge.stop()


def test_who_is_on_counts_http_clients_under_the_service_of_their_latest_request(env: Env) -> None:
    """A terminated keep-alive connection is a client of the service its latest request went to."""
    def clients(service: str) -> int:
        return int(env.edge.status()["services"].get(service, {}).get("clients", 0))  # type: ignore[union-attr]

    base_web, base_bosh = clients("web"), clients("bosh")
    s = socket.socket()
    s.bind(("127.0.0.31", 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", env.tls_port))
    ctx = ssl.create_default_context(cafile=str(env.ca))
    with ctx.wrap_socket(s, server_hostname="chat.test") as t:
        t.sendall(b"GET / HTTP/1.1\r\nHost: chat.test\r\n\r\n")
        assert read_response(t) is not None
        assert wait_until(lambda: clients("web") == base_web + 1)
        pools = env.edge.status()["pools"]
        assert pools["service:web"]["clients"] >= 1  # type: ignore[index]  # and under its pool
        t.sendall(b"GET /http-bind HTTP/1.1\r\nHost: chat.test\r\n\r\n")  # the same connection, another service
        assert read_response(t) is not None
        assert wait_until(lambda: clients("bosh") == base_bosh + 1 and clients("web") == base_web)
    assert wait_until(lambda: clients("bosh") == base_bosh and clients("web") == base_web)
