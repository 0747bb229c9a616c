"""The HTTP layer in front of real nginx upstreams, plain and HTTPS (self-signed, trustme)."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from http_peers import HttpEdge, NginxUpstream, get, nginx_upstream, pin_of, read_response, request
from support import free_port, require, wait_until, write_cert


@dataclass
class Env:
    edge: HttpEdge
    nginx: NginxUpstream
    port: int  # plain HTTP listener
    tls_port: int  # TLS-terminated listener
    ca_pem: Path  # trusts both the edge's and nginx's certificates
    tmp: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require("nginx")
    tmp = tmp_path_factory.mktemp("http")
    ca = trustme.CA()
    ca_pem = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    up_cert = write_cert(ca, tmp, "up", "upstream.test")
    write_cert(ca, tmp, "edge", "a.test", "s.test", "*.test")
    other_ca = trustme.CA()
    other_pem = tmp / "other-ca.pem"
    other_ca.cert_pem.write_to_path(str(other_pem))
    pin = pin_of(up_cert.cert_chain_pems[0].bytes())
    with nginx_upstream(tmp, tls=(tmp / "up.pem", tmp / "up.key"), store_bodies=True, big_bytes=8 << 20) as ngx:
        port, tls_port = free_port(), free_port()
        plain_up = f"http://127.0.0.1:{ngx.port}"
        tls_up = f"https://127.0.0.1:{ngx.tls_port}"
        config = f"""
[http]
redirect = "off"
trusted_proxies = ["127.0.0.2"]

[services.web]
listen = ["127.0.0.1:{port}", "127.0.0.1:{tls_port}"]
names = ["a.test"]
to = "{plain_up}"

[services.bosh]
listen = ["127.0.0.1:{port}"]
names = ["a.test"]
paths = ["/http-bind"]
to = "{tls_up}"
upstream_tls = {{ ca = "{ca_pem}", server_name = "upstream.test" }}

[services.secure]
listen = ["127.0.0.1:{port}", "127.0.0.1:{tls_port}"]
names = ["s.test"]
to = "{tls_up}"
upstream_tls = {{ ca = "{ca_pem}", server_name = "upstream.test" }}

[services.pinned]
listen = ["127.0.0.1:{port}"]
names = ["pin.test"]
to = "{tls_up}"
upstream_tls = {{ pin = "{pin}" }}

[services.wrongpin]
listen = ["127.0.0.1:{port}"]
names = ["wrongpin.test"]
to = "{tls_up}"
upstream_tls = {{ pin = "{'00' * 32}" }}

[services.insecure]
listen = ["127.0.0.1:{port}"]
names = ["insecure.test"]
to = "{tls_up}"
upstream_tls = {{ verify = false }}

[services.untrusted]
listen = ["127.0.0.1:{port}"]
names = ["untrusted.test"]
to = "{tls_up}"
upstream_tls = {{ ca = "{other_pem}", server_name = "upstream.test" }}

[services.wrongname]
listen = ["127.0.0.1:{port}"]
names = ["wrongname.test"]
to = "{tls_up}"
upstream_tls = {{ ca = "{ca_pem}" }}

[services.down]
listen = ["127.0.0.1:{port}"]
names = ["down.test"]
to = "http://127.0.0.1:{free_port()}"
"""
        edge = HttpEdge(tmp, config, tls=[f"127.0.0.1:{tls_port}"], cert=tmp / "edge.pem", key=tmp / "edge.key",
                        wait=[port, tls_port])
        try:
            yield Env(edge, ngx, port, tls_port, ca_pem, tmp)
        finally:
            edge.stop()


def test_forwarded_headers_replace_what_an_untrusted_client_sent(env: Env) -> None:
    r = get(env.port, "/x?y=1", headers="X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n"
            "X-Forwarded-Host: evil\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n"
            "Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\n")
    assert r.status == 200
    seen = r.json()
    assert seen["uri"] == "/x?y=1" and seen["host"] == "a.test"
    assert seen["xff"] == "127.0.0.1" and seen["xfp"] == "http" and seen["xfh"] == "a.test"
    assert seen["xrip"] == "127.0.0.1" and seen["fwd"] == "for=127.0.0.1;host=a.test;proto=http"
    assert seen["hop"] == ""  # named in Connection: hop-by-hop, never forwarded
    assert seen["proto"] == "HTTP/1.1"


def test_forwarded_headers_appended_for_a_trusted_proxy(env: Env) -> None:
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.connect(("127.0.0.1", env.port))
    with s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 198.51.100.7\r\nX-Forwarded-Proto: https\r\n"
                  b"Forwarded: for=198.51.100.7;proto=https\r\n\r\n")
        r = read_response(s)
    assert r is not None and r.status == 200
    seen = r.json()
    assert seen["xff"] == "198.51.100.7, 127.0.0.2"
    assert seen["xfp"] == "https"  # the first proxy's scheme
    assert seen["fwd"] == "for=198.51.100.7;proto=https, for=127.0.0.2;host=a.test;proto=http"


def test_tls_listener_sets_proto_https_and_answers_421_for_other_names(env: Env) -> None:
    r = get(env.tls_port, "/", host="a.test", tls_host="a.test", ca=env.ca_pem)
    assert r.status == 200 and r.json()["xfp"] == "https"
    r = get(env.tls_port, "/", host="nothere.test", tls_host="a.test", ca=env.ca_pem)
    assert r.status == 421 and b"nothere" not in r.body
    r = get(env.port, "/", host="nothere.test")
    assert r.status == 404


def test_upstream_keep_alive_connections_are_reused(env: Env) -> None:
    before = env.edge.stats()["counters"]
    conns = set()
    for i in range(20):
        r = get(env.port, f"/reuse/{i}")  # a new client connection each time
        assert r.status == 200
        conns.add(r.json()["conn"])
    after = env.edge.stats()["counters"]
    assert len(conns) == 1, conns  # nginx saw one upstream connection
    assert after.get("upstream_reused", 0) - before.get("upstream_reused", 0) >= 19
    assert after.get("upstream_connected", 0) - before.get("upstream_connected", 0) <= 1


def test_client_keep_alive_and_pipelining(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port)) as s:
        s.sendall(b"".join(b"GET /p/%d HTTP/1.1\r\nHost: a.test\r\n\r\n" % i for i in range(5)))
        uris = []
        for _ in range(5):
            r = read_response(s)
            assert r is not None and r.status == 200
            uris.append(r.json()["uri"])
        assert uris == [f"/p/{i}" for i in range(5)]
        s.sendall(b"GET /last HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        r = read_response(s)
        assert r is not None and r.header("Connection") == "close" and not r.keep_alive


def test_http10_client(env: Env) -> None:
    r = request(env.port, b"GET /ten HTTP/1.0\r\nHost: a.test\r\n\r\n")
    assert r is not None and r.status == 200 and r.json()["uri"] == "/ten"
    with socket.create_connection(("127.0.0.1", env.port)) as s:
        s.sendall(b"GET /ka HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n")
        r = read_response(s)
        assert r is not None and r.header("Connection") == "keep-alive"
        s.sendall(b"GET /ka2 HTTP/1.0\r\nHost: a.test\r\n\r\n")
        r = read_response(s)
        assert r is not None and r.json()["uri"] == "/ka2"


def test_paths_route_by_segment_on_the_normalized_path(env: Env) -> None:
    assert get(env.port, "/http-bind").json()["scheme"] == "https"
    assert get(env.port, "/http-bind/x?y").json()["scheme"] == "https"
    assert get(env.port, "/http-bind?z").json()["scheme"] == "https"
    assert get(env.port, "/http-binder").json()["scheme"] == "http"
    # What the upstream would resolve to another path is routed by that path (nginx would answer
    # 400 for a path above the root, so only the routing decision is looked at).
    r = get(env.port, "/http-bind/../x")
    assert r.json()["scheme"] == "http"
    assert get(env.port, "/http-bind/..%2Fx").json()["scheme"] == "http"


@pytest.mark.parametrize("host", ["s.test", "pin.test", "insecure.test"])
def test_https_upstreams_that_verify(env: Env, host: str) -> None:
    r = get(env.port, "/tls", host=host)
    assert r.status == 200 and r.json()["scheme"] == "https"


@pytest.mark.parametrize("host", ["wrongpin.test", "untrusted.test", "wrongname.test", "down.test"])
def test_upstreams_that_fail_get_502_that_leaks_nothing(env: Env, host: str) -> None:
    r = get(env.port, "/tls", host=host)
    assert r.status == 502
    assert r.body == b"502 Bad Gateway\n"
    assert all(n.lower() not in (b"server", b"x-upstream") for n, _ in r.headers)


def test_verify_false_is_warned_at_start(env: Env) -> None:
    assert "upstream_tls.verify = false" in env.edge.output() and "insecure" in env.edge.output()


def test_post_bodies_content_length_and_chunked_reach_nginx_intact(env: Env) -> None:
    body = os.urandom(3 << 20)
    r = request(env.port, b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert r is not None and r.status == 200
    assert hashlib.sha256(Path(r.body.decode().strip()).read_bytes()).digest() == hashlib.sha256(body).digest()
    chunks = [os.urandom(n) for n in (1, 1000, 65536, 300000, 7)]
    raw = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\nX-Trailer: dropped\r\n\r\n"
    r = request(env.port, b"PUT /upload HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n" + raw)
    assert r is not None and r.status == 200
    assert Path(r.body.decode().strip()).read_bytes() == b"".join(chunks)


def test_head_and_large_get(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port)) as s:
        s.sendall(b"HEAD /big HTTP/1.1\r\nHost: a.test\r\n\r\n")
        r = read_response(s, head_request=True)
        assert r is not None and r.status == 200 and r.header("Content-Length") == str(8 << 20)
        s.sendall(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n")  # the connection is still in step
        r = read_response(s)
        assert r is not None and len(r.body) == 8 << 20
    assert env.nginx.public is not None and r.body == (env.nginx.public / "big.bin").read_bytes()


def test_expect_100_continue_with_curl(env: Env) -> None:
    body = env.tmp / "upload.bin"
    body.write_bytes(os.urandom(2 << 20))
    out = subprocess.run(["curl", "-sS", "-v", "--fail", "-T", str(body), "-H", "Host: a.test",
                          "-H", "Expect: 100-continue", f"http://127.0.0.1:{env.port}/upload"],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert b"HTTP/1.1 100 Continue" in out.stderr
    assert Path(out.stdout.decode().strip()).read_bytes() == body.read_bytes()


def test_status_and_bodiless_responses(env: Env) -> None:
    r = get(env.port, "/401")
    assert r.status == 401 and r.body == b"no\n"
    r = get(env.port, "/204")
    assert r.status == 204 and r.body == b"" and r.header("Content-Length") is None


def test_every_request_is_logged(env: Env) -> None:
    get(env.port, "/logged?q=1", host="a.test")
    get(env.port, "/logged-missing", host="nothere.test")
    assert wait_until(lambda: len([r for r in env.edge.records() if r["path"].startswith("/logged")]) == 2)
    ok, missing = [r for r in env.edge.records() if r["path"].startswith("/logged")]
    assert ok["service"] == "web" and ok["method"] == "GET" and ok["path"] == "/logged" and ok["query"] == "q=1"
    assert ok["status"] == 200 and ok["client"] == "127.0.0.1" and ok["upstream"].startswith("http://127.0.0.1:")
    assert ok["bytes_out"] > 100 and ok["bytes_in"] > 20 and ok["duration"] >= 0 and ok["error"] is None
    assert missing["service"] is None and missing["status"] == 404 and missing["error"] == "no_route"


def test_no_descriptor_leak_after_all_that(env: Env) -> None:
    env.edge.stats()  # (the first signal also opens uvloop's wakeup pair)
    base = env.edge.fds()
    for i in range(30):
        get(env.port, f"/leak/{i}", host=["a.test", "down.test", "nothere.test"][i % 3])
    assert wait_until(lambda: env.edge.fds() <= base + 1, 5), (base, env.edge.fds())


def test_failed_tls_handshakes_leave_nothing(env: Env) -> None:
    before = env.edge.counter("tls_handshake_failed")  # (the first signal also opens uvloop's wakeup pair)
    base = env.edge.fds()
    for i in range(20):
        with socket.create_connection(("127.0.0.1", env.tls_port)) as s:
            if i % 3 == 0:
                s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")  # plain HTTP to a TLS port
            elif i % 3 == 1:
                s.sendall(bytes.fromhex("1603010200010001fc0303") + os.urandom(40))  # a truncated hello
            s.settimeout(0.3)
            try:
                s.recv(100)
            except (TimeoutError, OSError):
                pass
    ctx = ssl.create_default_context()  # does not trust the edge's CA: the client aborts
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", env.tls_port)) as raw, pytest.raises(ssl.SSLError):
            ctx.wrap_socket(raw, server_hostname="a.test")
    assert get(env.tls_port, "/", host="a.test", tls_host="a.test", ca=env.ca_pem).status == 200
    assert wait_until(lambda: env.edge.fds() <= base + 1, 10), (base, env.edge.fds())
    assert env.edge.counter("tls_handshake_failed") - before >= 10
