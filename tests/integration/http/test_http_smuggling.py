"""A corpus of malformed and smuggling requests against the HTTP layer in front of nginx: each gets
its 4xx (501/505 where RFC 9112 says so), none reaches nginx, the edge keeps serving, no descriptor
is left behind."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from http_peers import HttpEdge, NginxUpstream, closed_by_peer, get, nginx_upstream, read_response
from support import free_port, require, wait_until

H = b"Host: a.test\r\n"

CORPUS: list[tuple[str, bytes, int]] = [
    # --- framing conflicts (CL.TE, TE.CL, TE obfuscation) ---
    ("cl-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", 400),
    ("te-cl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", 400),
    ("te-te-dup", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n", 400),
    ("te-space-before-colon", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("te-chunked-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-not-last", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    ("te-gzip-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("te-http10", b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-obs-fold", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-leading-space-line", b"POST / HTTP/1.1\r\n" + H + b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-bare-lf", b"POST / HTTP/1.1\r\n" + H + b"X: y\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # --- Content-Length ---
    ("cl-dup-differ", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    ("cl-dup-same", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    ("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    ("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("cl-plus", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", 400),
    ("cl-hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("cl-float", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5.0\r\n\r\nhello", 400),
    ("cl-empty", b"POST / HTTP/1.1\r\n" + H + b"Content-Length:\r\n\r\n", 400),
    ("cl-overflow", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    # --- chunks ---
    ("chunk-size-junk", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-negative", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-0x", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-space", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-overflow", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nabc\r\n", 400),
    ("chunk-data-too-long", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n", 400),
    ("chunk-lf-only", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n", 400),
    # --- request line ---
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("space-in-method", b"GE T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("tab-separator", b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("trailing-junk", b"GET / HTTP/1.1 x\r\n" + H + b"\r\n", 400),
    ("version-1.10", b"GET / HTTP/1.10\r\n" + H + b"\r\n", 400),
    ("version-2.0", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("http09", b"GET /\r\n\r\n", 400),
    ("nul-in-target", b"GET /\x00 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bare-lf-request-line", b"GET / HTTP/1.1\n" + H + b"\r\n", 400),
    ("lowercase-method", b"get / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("absolute-form", b"GET http://a.test/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("absolute-form-elsewhere", b"GET http://127.0.0.1:22/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("connect", b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n", 405),
    ("asterisk", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("fragment", b"GET /a#b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    # --- header fields ---
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n", 400),
    ("bare-cr", b"GET / HTTP/1.1\r\n" + H + b"X: a\rb\r\n\r\n", 400),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400),
    ("ctl-in-value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x01b\r\n\r\n", 400),
    ("no-colon", b"GET / HTTP/1.1\r\n" + H + b"Xb\r\n\r\n", 400),
    ("empty-name", b"GET / HTTP/1.1\r\n" + H + b": b\r\n\r\n", 400),
    ("space-in-name", b"GET / HTTP/1.1\r\n" + H + b"X Y: b\r\n\r\n", 400),
    ("host-missing", b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    ("host-twice", b"GET / HTTP/1.1\r\n" + H + b"Host: b.test\r\n\r\n", 400),
    ("host-userinfo", b"GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n", 400),
    ("host-garbage", b"GET / HTTP/1.1\r\nHost: a.test/evil\r\n\r\n", 400),
    ("expect-other", b"GET / HTTP/1.1\r\n" + H + b"Expect: 200-ok\r\n\r\n", 417),
    ("upgrade-with-body", b"POST / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 3\r\n\r\nabc", 400),
    # --- limits ---
    ("head-too-large", b"GET / HTTP/1.1\r\n" + H + b"X: " + b"a" * 40000 + b"\r\n\r\n", 431),
    ("field-never-ends", b"GET / HTTP/1.1\r\n" + H + b"X: " + b"a" * 200000, 431),
    ("too-many-fields", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n", 431),
    ("target-too-long", b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("trailer-too-large", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX: " + b"a" * 40000 + b"\r\n\r\n", 431),
    # --- not HTTP at all ---
    ("tls-hello", bytes.fromhex("160301002e0100002a0303") + os.urandom(32) + b"\x00\x00\x02\x00\x2f\x01\x00", 400),
    ("binary", b"\x00\xff\xfe\r\n\r\n", 400),
]


@dataclass
class Env:
    edge: HttpEdge
    nginx: NginxUpstream
    port: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require("nginx")
    tmp = tmp_path_factory.mktemp("smuggling")
    with nginx_upstream(tmp) as ngx:
        port = free_port()
        config = f"""
[http]
redirect = "off"

[services.web]
listen = ["127.0.0.1:{port}"]
names = ["a.test", "b.test"]
to = "http://127.0.0.1:{ngx.port}"
"""
        edge = HttpEdge(tmp, config, wait=[port])
        try:
            yield Env(edge, ngx, port)
        finally:
            edge.stop()


def nginx_requests(env: Env) -> int:
    # nginx logs when a request ends; a good request through the edge flushes the view.
    return len(env.nginx.log())


@pytest.mark.parametrize(("name", "raw", "status"), CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_request_gets_its_error_and_reaches_nothing(env: Env, name: str, raw: bytes, status: int) -> None:
    before = len(env.nginx.quiet_log())  # an earlier test's last line may still be on its way
    with socket.create_connection(("127.0.0.1", env.port)) as s:
        try:
            s.sendall(raw)
        except OSError:
            pass  # the edge may answer and close before everything is sent
        r = read_response(s)
        assert r is not None, f"{name}: no response"
        assert r.status == status, (name, r.status, r.body)
        assert r.header("Connection") == "close" and r.body.startswith(str(status).encode())
        assert closed_by_peer(s), f"{name}: connection left open"
    assert get(env.port, "/after").status == 200  # still serving
    assert wait_until(lambda: nginx_requests(env) == before + 1)
    assert env.nginx.log()[-1]["uri"] == "/after"  # and only the good request reached nginx


def test_error_after_good_pipelined_request_answers_the_good_one_first(env: Env) -> None:
    before = len(env.nginx.quiet_log())  # an earlier test's last line may still be on its way
    with socket.create_connection(("127.0.0.1", env.port)) as s:
        s.sendall(b"GET /first HTTP/1.1\r\n" + H + b"\r\n" +
                  b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG")
        first = read_response(s)
        second = read_response(s)
    assert first is not None and first.status == 200 and first.json()["uri"] == "/first"
    assert second is not None and second.status == 400
    assert wait_until(lambda: nginx_requests(env) == before + 1)


def test_invalid_chunk_mid_body_aborts_the_upstream_request(env: Env) -> None:
    before = len(env.nginx.quiet_log())  # an earlier test's last line may still be on its way
    with socket.create_connection(("127.0.0.1", env.port)) as s:
        # /upload reads the whole body before answering (nginx's `return` would answer at once)
        s.sendall(b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        time.sleep(0.2)  # the head and the first chunk are on their way upstream
        s.sendall(b"zz\r\n")
        r = read_response(s)
        assert r is not None and r.status == 400
    # nginx saw a request start and its connection cut, never a complete request
    assert get(env.port, "/after-abort").status == 200
    assert wait_until(lambda: any(x["uri"] == "/after-abort" for x in env.nginx.log()))
    assert not any(x["uri"] == "/report-after-body" for x in env.nginx.log()[before:])


def test_corpus_leaves_no_descriptor_and_bounded_memory(env: Env) -> None:
    env.edge.stats()  # (the first signal also opens uvloop's wakeup pair)
    base = env.edge.fds()
    rss0, _ = env.edge.rss_kib()
    for _ in range(3):
        for _name, raw, _status in CORPUS:
            with socket.create_connection(("127.0.0.1", env.port)) as s:
                try:
                    s.sendall(raw)
                except OSError:
                    pass
                read_response(s)
    assert get(env.port, "/still").status == 200
    assert wait_until(lambda: env.edge.fds() <= base + 1), (base, env.edge.fds())
    rss1, _ = env.edge.rss_kib()
    assert rss1 - rss0 < 20_000, (rss0, rss1)
    assert env.edge.counter("bad_requests") >= 3 * len(CORPUS)
