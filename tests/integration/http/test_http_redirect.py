"""The port-80 mode: permanent redirects to https for terminated names, ACME HTTP-01 answered by
the edge; and the client address handed over from a trusted PROXY header."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from http_peers import HttpEdge, NginxUpstream, get, nginx_upstream, read_response, request
from support import free_port, require, wait_until, write_cert


@dataclass
class Env:
    edge: HttpEdge
    nginx: NginxUpstream
    http_port: int  # the redirect listener
    tls_port: int
    plain_port: int  # plain listener whose clients arrive behind a trusted PROXY header
    acme: Path
    ca: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require("nginx")
    tmp = tmp_path_factory.mktemp("redirect")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    write_cert(ca, tmp, "edge", "meet.test", "*.cloud.test")
    acme = tmp / "acme"
    acme.mkdir()
    with nginx_upstream(tmp) as ngx:
        http_port, tls_port, plain_port = free_port(), free_port(), free_port()
        config = f"""
[http]
redirect = "127.0.0.1:{http_port}"

[services.meet]
listen = ["127.0.0.1:{tls_port}"]
names = ["meet.test", "*.cloud.test"]
to = "http://127.0.0.1:{ngx.port}"

[services.plain]
listen = ["127.0.0.1:{plain_port}"]
to = "http://127.0.0.1:{ngx.port}"
"""
        edge = HttpEdge(tmp, config, tls=[f"127.0.0.1:{tls_port}"], cert=tmp / "edge.pem", key=tmp / "edge.key",
                        acme_dir=acme, trusted_proxy_header=True, wait=[http_port, tls_port])
        try:
            yield Env(edge, ngx, http_port, tls_port, plain_port, acme, tmp / "ca.pem")
        finally:
            edge.stop()


def test_get_and_head_redirect_with_301(env: Env) -> None:
    r = get(env.http_port, "/a/b?c=d&e", host="meet.test")
    assert r.status == 301 and r.header("Location") == f"https://meet.test:{env.tls_port}/a/b?c=d&e"
    r = get(env.http_port, "/x", host="Deep.Cloud.test:80")
    assert r.status == 301 and r.header("Location") == f"https://deep.cloud.test:{env.tls_port}/x"
    r = request(env.http_port, b"HEAD / HTTP/1.1\r\nHost: meet.test\r\n\r\n", head_request=True)
    assert r is not None and r.status == 301


def test_other_methods_redirect_with_308_keeping_the_connection(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.http_port)) as s:
        s.sendall(b"POST /form HTTP/1.1\r\nHost: meet.test\r\nContent-Length: 3\r\n\r\nabc")
        r = read_response(s)
        assert r is not None and r.status == 308 and r.header("Location") == f"https://meet.test:{env.tls_port}/form"
        s.sendall(b"GET /again HTTP/1.1\r\nHost: meet.test\r\n\r\n")
        r = read_response(s)
        assert r is not None and r.status == 301


def test_unknown_names_get_404_and_are_never_proxied(env: Env) -> None:
    n = len(env.nginx.quiet_log())
    r = get(env.http_port, "/", host="evil.test")
    assert r.status == 404 and r.header("Location") is None
    r = request(env.http_port, b"GET / HTTP/1.0\r\n\r\n")
    assert r is not None and r.status == 404
    assert len(env.nginx.quiet_log()) == n


def test_acme_http01_is_answered_by_the_edge_for_any_name(env: Env) -> None:
    (env.acme / "tok_en-123").write_text("tok_en-123.thumbprint")
    for host in ("meet.test", "not-configured.test"):
        r = get(env.http_port, "/.well-known/acme-challenge/tok_en-123", host=host)
        assert r.status == 200 and r.body == b"tok_en-123.thumbprint" and r.header("Content-Type") == "text/plain"
    r = get(env.http_port, "/.well-known/acme-challenge/unknown", host="meet.test")
    assert r.status == 404
    r = get(env.http_port, "/.well-known/acme-challenge/../../etc/passwd", host="meet.test")
    assert r.status == 301  # not a token: an ordinary path, redirected


def test_curl_follows_the_redirect_to_the_tls_listener(env: Env) -> None:
    out = subprocess.run(["curl", "-sS", "-L", "--cacert", str(env.ca), "--resolve", f"meet.test:{env.http_port}:127.0.0.1",
                          "--resolve", f"meet.test:{env.tls_port}:127.0.0.1", f"http://meet.test:{env.http_port}/followed"],
                         capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert b'"uri":"/followed"' in out.stdout and b'"xfp":"https"' in out.stdout


def test_client_address_from_a_trusted_proxy_header(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.plain_port)) as s:
        s.sendall(b"CLIENT 203.0.113.9 40000\n")  # what the edge took from a PROXY header
        s.sendall(b"GET /behind HTTP/1.1\r\nHost: any.test\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
        r = read_response(s)
    assert r is not None and r.json()["xff"] == "203.0.113.9"
    assert wait_until(lambda: any(x["path"] == "/behind" for x in env.edge.records()))
    rec = next(x for x in env.edge.records() if x["path"] == "/behind")
    assert rec["client"] == "203.0.113.9" and rec["client_port"] == 40000 and rec["via_proxy"] is True
